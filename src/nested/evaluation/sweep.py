"""``nested eval``: the identity vs prompt-alignment trade-off of one or more adapters.

For every adapter token, subject image, prompt template, strength and seed it generates one image, plus
the base model's image for every (prompt, seed) (the token replaced by its class word, no adapter), and
scores each image with :mod:`nested.metrics`:

* identity similarity: cosine between image embeddings of the generated image and the subject's reference
  (``--identity-model``; default: the adapter's own image encoder);
* prompt alignment: CLIP score between the image and the prompt with the token replaced by its class word
  (``--clip``), so adapter and base images are scored against the same text.

With ``--judges`` (toy-world judges, :mod:`nested.judges`) every image is also scored by classifiers that
know the answer: ``identity_exact`` / ``identity_attributes`` (the identity judge's prediction vs the
reference's true label from its shard metadata; base-model rows against every subject: the no-adapter
baseline, at chance) and ``context_scene`` / ``context`` (the context judge vs the scene and style the
prompt asks for, :func:`nested.toyworld.parse_caption`). ``tradeoff.png`` then plots identity accuracy vs
context accuracy with the chance levels, and ``--clip none`` skips the CLIP model.

With ``--pair A,B`` every prompt names two tokens: the i-th subjects of A and B are generated together (both
adapters bound in one call), each measured in its half of the image (A left, B right, the toy world's
``render_pair`` layout) in columns suffixed with its token (``identity_exact_person``); the unsuffixed
columns cover both (exact: both right; otherwise the mean).

Writes to ``--out``: ``results.csv`` (one row per image and subject), ``summary.json`` (settings, means per
strength, and the plotted ``points``), ``grid.png`` (reference | base | each strength, first seed) and
``tradeoff.png`` (identity y vs alignment x, one point per strength plus the base model); the folder appears
complete when the sweep ends (:func:`nested.files.staged_directory`). User mistakes, a damaged or oversized
reference image among them (named, before any model loads), end with exit code 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import nested
from nested.evaluation.images import load_references, save_png
from nested.evaluation.judging import Judges, load_judges
from nested.evaluation.metrics import IdentitySimilarity, PromptAlignment, VisionEmbedder, identity_embedder
from nested.evaluation.report import (
    column_suffix,
    plot_tradeoff,
    result_columns,
    summarize,
    write_csv,
    write_grid,
)
from nested.files import staged_directory, write_json_atomic
from nested.inference.pipeline import NestedPipeline, sampling_guidance

__all__ = ["point_line", "run_eval", "subject_halves"]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


# ----------------------------------------------------------------------------- the sweep


def subject_halves(tokens: list[str]) -> list[str | None]:
    """Where each token's subject stands: a single subject fills the image; with --pair the first token
    is on the left and the second on the right (the toy world's ``render_pair`` layout)."""
    if len(tokens) not in (1, 2):
        raise ValueError(f"one or two subjects per image, got {tokens}.")
    return [None] if len(tokens) == 1 else ["left", "right"]


@dataclass
class _Group:
    """What one generation binds: one token, or the two tokens of ``--pair``, with their subjects."""

    name: str  # the rows' "token": "<person>", or "<person>+<pet>" with --pair
    tokens: list[str]
    class_words: dict[str, str]
    references: dict[str, list]  # token -> references; the i-th of every token are generated together
    identity: dict[str, Any]  # token -> its IdentitySimilarity
    judged: list[list[Any]] | None = None  # per subject index, the judges' truths (with --judges)

    @property
    def count(self) -> int:
        return min(len(refs) for refs in self.references.values())

    def subject_name(self, index: int) -> str:
        return "+".join(self.references[token][index].name for token in self.tokens)

    def class_text(self, prompt: str) -> str:
        """``prompt`` with every token replaced by its class word (the base model's and CLIP's text)."""
        for token in self.tokens:
            prompt = prompt.replace(token, self.class_words[token])
        return prompt

    def grid_reference(self, index: int) -> Any:
        """The reference column of grid.png: the subject, or the pair side by side at half size."""

        images = [self.references[token][index].image for token in self.tokens]
        if len(images) == 1:
            return images[0]
        side = images[0].shape[-1]
        canvas = torch.ones(3, side, side)
        half = side // 2
        top = (side - half) // 2
        for position, image in enumerate(images):
            small = F.interpolate(image[None], size=(half, half), mode="bicubic", antialias=True)[0]
            canvas[:, top : top + half, position * half : (position + 1) * half] = small.clamp(0, 1)
        return canvas


def _half_box(half: str | None, height: int, width: int) -> tuple[int, int, int, int] | None:
    """The pixels of a subject's half: the same vertically centred square the identity judges crop."""
    if half is None:
        return None
    side = width // 2
    top = max(0, (height - side) // 2)
    left = 0 if half == "left" else width - side
    return (left, top, left + side, top + side)


@dataclass
class _Context:
    """What every generation of the sweep shares."""

    args: argparse.Namespace
    pipe: Any  # NestedPipeline
    bar: Any  # tqdm
    out: Path
    alignment: Any = None  # PromptAlignment, None with --clip none
    judges: Judges | None = None  # with --judges
    token_weights: dict[str, float] = field(default_factory=dict)  # --token-weight
    rows: list[dict[str, Any]] = field(default_factory=list)
    thumbnails: dict[tuple, Any] = field(default_factory=dict)  # (group, subject, prompt, column) -> image
    grid_keys: list[tuple[str, int, int]] = field(default_factory=list)  # (group, subject, prompt) rows
    grid_labels: dict[tuple[str, int, int], str] = field(default_factory=dict)  # a row's prompt
    saved: set[Path] = field(default_factory=set)

    def generate(self, prompts: list[str], seeds: list[int], subjects=None, strengths=None):
        """Images for (prompt, seed) pairs, in batches of ``--batch-size``: (N, 3, H, W) in [0, 1], CPU.

        ``subjects`` / ``strengths``: token -> image / strength (None: the base model).
        """

        args, images = self.args, []
        for start in range(0, len(prompts), args.batch_size):
            chunk = prompts[start : start + args.batch_size]
            kwargs = dict(
                negative_prompt=[args.negative_prompt] * len(chunk) if args.negative_prompt else None,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                height=args.height,
                width=args.width,
                generator=[torch.Generator().manual_seed(s) for s in seeds[start : start + args.batch_size]],
                output_type="pt",
            )
            if subjects:
                weights = {t: w for t, w in self.token_weights.items() if t in subjects}
                kwargs.update(subjects=subjects, strengths=strengths, token_weights=weights or None)
            images.append(self.pipe(chunk, **kwargs).images.float().cpu().clamp(0, 1))
            self.bar.update(len(chunk))
        return torch.cat(images)

    def keep(self, image, path: Path, grid_key: tuple | None = None) -> str:
        """Save an image once (unless --no-images), and its thumbnail when grid.png shows it.

        Returns its path relative to ``--out`` for the csv ("" with --no-images).
        """
        if grid_key is not None:
            self.thumbnails.setdefault(grid_key, _thumbnail(image))
        if self.args.no_images:
            return ""
        if path not in self.saved:
            save_png(image, path)
            self.saved.add(path)
        return str(path.relative_to(self.out))


def _thumbnail(image):
    """An image for grid.png: at most 256 px on its longer side."""

    scale = min(1.0, 256 / max(image.shape[-2:]))
    size = (round(image.shape[-2] * scale), round(image.shape[-1] * scale))
    return F.interpolate(image[None], size=size, mode="bicubic", antialias=True)[0].clamp(0, 1)


def _identity_metric(adapter: Any, shared_embedder: Any) -> Any:
    """Identity similarity with ``--identity-model``, else the adapter's own image encoder."""

    encoder = adapter.encoder
    embedder = shared_embedder or VisionEmbedder(
        encoder.backbone,
        crop=(encoder.image_size, encoder.image_size),
        mean=encoder.image_mean.flatten().tolist(),
        std=encoder.image_std.flatten().tolist(),
    )
    return IdentitySimilarity(embedder, sync_on_compute=False)


def _scores(context: _Context, group: _Group, images: Any, s_indices: list[int], texts: list[str]) -> dict:
    """(subject index, image index) -> the row's scores: identity similarity per token (in its half with
    --pair; the plain column is their mean), prompt alignment, and the judge columns with --judges."""
    n, (height, width) = images.shape[0], images.shape[-2:]
    if context.alignment is not None:
        aligned = context.alignment.score_batch(images, [group.class_text(t) for t in texts]).tolist()
    else:
        aligned = [float("nan")] * n
    predictions = None
    if context.judges is not None:
        assert group.judged is not None
        subjects = [subject for s in s_indices for subject in group.judged[s]]
        predictions = context.judges.predict(images, subjects)
    scores = {}
    for s_index in s_indices:
        similarity, found = {}, {}
        for token, half in zip(group.tokens, subject_halves(group.tokens), strict=True):
            box = _half_box(half, height, width)
            reference = group.references[token][s_index].image[None]
            boxes = None if box is None else [box] * n
            values, detected = group.identity[token].score_and_detect(images, reference, boxes=boxes)
            similarity[token], found[token] = values.tolist(), detected.float().tolist()
        judged = [{}] * n
        if predictions is not None:
            judged = context.judges.scores(predictions, group.judged[s_index], texts)
        for k in range(n):
            row = {
                "identity_similarity": sum(v[k] for v in similarity.values()) / len(similarity),
                "prompt_alignment": aligned[k],
            }
            if len(group.tokens) > 1:
                row.update({f"identity_similarity_{column_suffix(t)}": v[k] for t, v in similarity.items()})
            if group.identity[group.tokens[0]].detects_subjects:  # a face embedder: was a face found
                row["face_detected"] = sum(v[k] for v in found.values()) / len(found)
            scores[s_index, k] = {**row, **judged[k]}
    return scores


def _evaluate_group(
    context: _Context, group: _Group, prompts: list[tuple[int, str]], strengths: list[float], seeds: list[int]
) -> None:
    """Base and adapter images of one group (a token, or the --pair), scored, appended to ``context.rows``."""
    args = context.args
    pairs = [(index, prompt, seed) for index, prompt in prompts for seed in seeds]
    texts = [prompt for _, prompt, _ in pairs]
    clip_texts = [group.class_text(text) for text in texts]
    pair_seeds = [seed for _, _, seed in pairs]
    folder = context.out / "images" / _slug(group.name)
    # The grid's rows go through the subjects first, each with another prompt, so a short grid already
    # shows several references in several contexts.
    for shift in range(len(prompts)):
        for s_index in range(group.count):
            p_index, prompt = prompts[(s_index + shift) % len(prompts)]
            if len(context.grid_keys) < args.grid_rows:
                context.grid_keys.append((group.name, s_index, p_index))
                context.grid_labels[(group.name, s_index, p_index)] = prompt

    def add_rows(
        images, variant: str, strength: Any, prompts_used: list[str], s_indices: list[int], name
    ) -> None:
        scores = _scores(context, group, images, s_indices, texts)
        for s_index in s_indices:
            for k, (p_index, _, seed) in enumerate(pairs):
                shown = seed == seeds[0] and (group.name, s_index, p_index) in context.grid_keys
                column = strength if variant == "adapter" else "base"
                grid_key = (group.name, s_index, p_index, column) if shown else None
                image = context.keep(images[k], folder / name(s_index, p_index, seed), grid_key)
                context.rows.append(
                    {
                        "token": group.name,
                        "subject": group.subject_name(s_index),
                        "variant": variant,
                        "strength": strength,
                        "seed": seed,
                        "prompt_index": p_index,
                        "prompt": prompts_used[k],
                        "clip_text": clip_texts[k],
                        **scores[s_index, k],
                        "image": image,
                    }
                )

    # The base model: every token replaced by its class word, no subject; one image per (prompt, seed),
    # compared with every subject (with --judges: the no-adapter baseline, identity at chance).
    base = context.generate(clip_texts, pair_seeds)
    add_rows(
        base,
        "base",
        "",
        clip_texts,
        list(range(group.count)),
        lambda s, p, seed: f"base/p{p:02d}_seed{seed}.png",
    )
    for s_index in range(group.count):
        subjects = {token: group.references[token][s_index].image for token in group.tokens}
        for strength in strengths:
            images = context.generate(
                texts, pair_seeds, subjects, {token: strength for token in group.tokens}
            )
            add_rows(
                images,
                "adapter",
                strength,
                texts,
                [s_index],
                lambda s, p, seed, st=strength: (
                    f"{_slug(group.subject_name(s))}/p{p:02d}_s{st:g}_seed{seed}.png"
                ),
            )


def run_eval(args: argparse.Namespace, parsed: dict[str, Any], argv: list[str]) -> dict[str, Any]:
    """Run the sweep and write every output; returns the summary (also written to summary.json).

    ``args``: the ``nested eval`` options; ``parsed``: what :func:`nested.cli.eval.check_eval_arguments`
    made of them (adapters, groups, prompts, strengths, seeds, subject sources).
    """

    strengths, seeds, groups = parsed["strengths"], parsed["seeds"], parsed["groups"]
    judges = None
    if args.judges:  # before any image or model: prompts the judges cannot score
        judges = load_judges(args.judges, device=args.device)
        prompts = [prompt for per_group in parsed["prompts"].values() for _, prompt in per_group]
        judges.check_prompts(prompts, source=f"--prompts {args.prompts}")
    references = {
        token: load_references(
            source,
            count=args.max_subjects,
            size=args.reference_size,
            token=token,
            align_faces=token in args.align_face,
        )
        for token, source in parsed["sources"].items()
    }
    if judges is not None:  # before the diffusion model: references whose truth the judges cannot know
        for token, refs in references.items():
            judges.check_references(token, refs)
    skip_clip = args.clip.lower() == "none"
    alignment = None if skip_clip else PromptAlignment(args.clip, sync_on_compute=False).to(args.device)
    shared_embedder = (
        identity_embedder(args.identity_model, device=args.device) if args.identity_model else None
    )
    if shared_embedder is not None:  # before the diffusion model: a reference it finds no face in
        for refs in references.values():
            IdentitySimilarity(shared_embedder).check_references(
                [r.image for r in refs], [r.name for r in refs]
            )
    pipe = NestedPipeline.from_pretrained(
        args.base,
        parsed["adapters"],
        dtype=getattr(torch, args.dtype),
        device=args.device,
        revision=args.revision,
        image_encoder=args.image_encoder,
        quantize=parsed["quantize"],
    )
    pipe.pipe.set_progress_bar_config(disable=True)
    args.guidance = sampling_guidance(pipe, args.base, args.guidance, args.negative_prompt)
    with staged_directory(args.out) as out:  # --out appears complete, or stays as it was
        built = []
        for name, tokens in groups.items():
            adapters = {token: pipe.adapter(token) for token in tokens}
            own = {token: references[token] for token in tokens}
            # --pair: the i-th of each token together, as many as the shorter list
            count = min(len(refs) for refs in own.values())
            group = _Group(
                name=name,
                tokens=tokens,
                class_words={t: a.config.tokens.get(t, a.config.class_word) for t, a in adapters.items()},
                references={token: refs[:count] for token, refs in own.items()},
                identity={t: _identity_metric(a, shared_embedder) for t, a in adapters.items()},
            )
            if judges is not None:
                group.judged = judges.subjects(
                    group.references,
                    {t: a.config.domain for t, a in adapters.items()},
                    subject_halves(tokens),
                )
            built.append(group)

        total = sum(
            len(parsed["prompts"][g.name]) * len(seeds) * (1 + g.count * len(strengths)) for g in built
        )
        bar = tqdm(total=total, desc="nested eval", unit="image", disable=args.no_progress, file=sys.stderr)
        context = _Context(
            args=args,
            pipe=pipe,
            bar=bar,
            out=out,
            alignment=alignment,
            judges=judges,
            token_weights=parsed["token_weights"],
        )
        started = time.time()
        try:
            for group in built:
                _evaluate_group(context, group, parsed["prompts"][group.name], strengths, seeds)
        finally:
            bar.close()

        suffixes = [column_suffix(t) for t in parsed["pair"]] if parsed["pair"] else []
        columns = result_columns(suffixes, judged=judges is not None)
        faces = getattr(shared_embedder, "detects_subjects", False)
        if faces:
            columns.append("face_detected")
        for group in built:  # the judges' extra columns of every group, in order, once
            if group.judged:
                columns += [c for c in judges.columns(group.judged[0]) if c not in columns]
        write_csv(context.rows, out / "results.csv", columns)
        chance = {g.name: judges.chance(g.judged[0]) for g in built if g.judged}
        names = [g.name for g in built]
        points = summarize(context.rows, names, strengths, columns=columns, chance=chance or None)
        grid_columns = ["base", *strengths]
        write_grid(
            context, {g.name: [g.grid_reference(i) for i in range(g.count)] for g in built}, grid_columns
        )
        title = f"{Path(args.base).name or args.base}: " + (
            "identity vs context (judges)" if judges is not None else "identity vs prompt alignment"
        )
        plot_tradeoff(points, out / "tradeoff.png", title=title, judged=judges is not None)
        metrics = {
            "identity_similarity": (
                "cosine of face-recognition embeddings (dlib), generated vs reference face; 0 where no face is found"
                if faces
                else "cosine of image embeddings, generated vs reference, in [-1, 1]"
            )
            + ("; with --pair the mean over the tokens, each in its half" if suffixes else ""),
            "prompt_alignment": "CLIP score 100 * cos(image, prompt with the token replaced by its class word)"
            if alignment is not None
            else "not measured (--clip none)",
        }
        if faces:
            metrics["face_detected"] = (
                "1 if a face is found in the generated image, else 0 (--pair: the fraction of the two halves)"
            )
        if judges is not None:
            metrics.update(judges.metrics)
        summary = {
            "command": ["nested", "eval", *argv],
            "versions": {
                "nested": nested.__version__,
                "diffusers": diffusers.__version__,
                "torch": torch.__version__,
            },
            "base": args.base,
            "quantize": parsed["quantize"],
            "adapters": pipe.describe(),
            "pair": list(parsed["pair"]) if parsed["pair"] else None,
            "subjects": {g.name: [g.subject_name(i) for i in range(g.count)] for g in built},
            "prompts": {name: [p for _, p in parsed["prompts"][name]] for name in names},
            "strengths": strengths,
            "token_weights": parsed["token_weights"],
            "seeds": seeds,
            "steps": args.steps,
            "guidance": args.guidance,
            "negative_prompt": args.negative_prompt,
            "height": args.height or pipe.default_size,
            "width": args.width or pipe.default_size,
            "clip": None if skip_clip else args.clip,
            "identity_model": args.identity_model or "the adapter's image encoder",
            "judges": args.judges,
            "metrics": metrics,
            "points": points,
            "grid": {
                "rows": [list(key) for key in context.grid_keys],
                "columns": ["reference", *map(str, grid_columns)],
            },
            "files": {"csv": "results.csv", "grid": "grid.png", "tradeoff": "tradeoff.png"},
            "rows": len(context.rows),
            "seconds": round(time.time() - started, 2),
        }
        write_json_atomic(out / "summary.json", _no_nan(summary))
    pipe.unload()
    return summary


def _no_nan(value: Any) -> Any:
    """NaN or infinity (e.g. prompt alignment with --clip none) as JSON null, which every JSON reader accepts."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _no_nan(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_no_nan(item) for item in value]
    return value


def point_line(point: dict[str, Any]) -> str:
    """One line of the final report: a point's means (and with --judges, the chance levels)."""
    line = f"  {point['token']} {point['label']:>8}: identity {point['identity_similarity']:.3f}"
    if point["prompt_alignment"] == point["prompt_alignment"]:
        line += f"  prompt alignment {point['prompt_alignment']:.2f}"
    if "face_detected" in point:
        line += f"  faces found {point['face_detected']:.0%}"
    chance = point.get("chance")
    if chance:
        labels = {"identity_exact": "identity exact", "identity_attributes": "attributes"}
        labels.update(  # --pair: each token's exact identity too
            {key: key.removeprefix("identity_exact_") for key in chance if key.startswith("identity_exact_")}
        )
        labels.update(context="context", context_scene="scene")
        line += "  judges: " + ", ".join(
            f"{label} {point[key]:.3f} (chance {chance[key]:.3g})" for key, label in labels.items()
        )
    return line
