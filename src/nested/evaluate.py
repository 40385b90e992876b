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
``tradeoff.png`` (identity y vs alignment x, one point per strength plus the base model). User mistakes end
with exit code 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nested.eval_args import DTYPES as DTYPES
from nested.eval_args import _check, column_suffix, eval_parser, read_prompts
from nested.generate import run_user_command
from nested.report import (
    ATTRIBUTE_PREFIX,
    JUDGE_METRICS,
    _write_csv,
    _write_grid,
    plot_tradeoff,
    result_columns,
    summarize,
)
from nested.report import CSV_COLUMNS as CSV_COLUMNS

__all__ = [
    "JudgedSubject",
    "attribute_columns",
    "eval_parser",
    "judge_chance",
    "judge_images",
    "judge_predictions",
    "judge_scores",
    "judged_subject",
    "judged_subjects",
    "main_eval",
    "plot_tradeoff",
    "read_prompts",
    "run_eval",
    "summarize",
]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


# ----------------------------------------------------------------------------- judges


@dataclass(frozen=True)
class JudgedSubject:
    """A subject of generated images as the judges see it: its true identity and where it stands."""

    token: str
    domain: str
    label: dict[str, str]
    half: str | None = None  # None: the whole image; "left" / "right" of a two-subject image


def _halves(tokens: list[str]) -> list[str | None]:
    """Where each token's subject stands: a single subject fills the image; with --pair the first token
    is on the left and the second on the right (the toy world's ``render_pair`` layout)."""
    if len(tokens) not in (1, 2):
        raise ValueError(f"one or two subjects per image, got {tokens}.")
    return [None] if len(tokens) == 1 else ["left", "right"]


def _label(reference: Any, token: str) -> dict[str, Any]:
    label = reference.meta.get("identity")
    if not isinstance(label, dict) or not label:
        raise ValueError(
            f"--judges needs the true identity of every reference, but {token} reference {reference.name!r} has "
            "no label (no 'identity' in its shard json): pass toy-world shards (nested.toyworld.write_world_shards) "
            "as --subjects."
        )
    return label


def judged_subject(
    reference: Any, token: str, domain: str | None = None, half: str | None = None
) -> JudgedSubject:
    """The truth the judges compare with: ``reference``'s identity label from its shard metadata.

    The domain is the metadata's ``domain``, else ``domain`` (the adapter config's); they must agree.

    Raises:
        ValueError: no label, no (or a disagreeing) toy-world domain, or a label that lacks an attribute
            of the domain.
    """
    from nested.toyworld import DOMAINS, identity_class

    label = _label(reference, token)
    stored = reference.meta.get("domain")
    if stored in DOMAINS and domain in DOMAINS and stored != domain:
        raise ValueError(
            f"--judges: {token} reference {reference.name!r} is from the {stored} domain but its adapter is a "
            f"{domain} adapter; pass {token}'s own shards (--subjects '{token}=...')."
        )
    chosen = stored if stored in DOMAINS else domain
    if chosen not in DOMAINS:
        raise ValueError(
            f"--judges: no toy-world domain for {token} reference {reference.name!r} (shard json: {stored!r}, "
            f"adapter config: {domain!r}); expected one of {', '.join(DOMAINS)}."
        )
    missing = [name for name in identity_class(chosen).ATTRIBUTES if name not in label]
    if missing:
        raise ValueError(
            f"--judges: the identity label of {token} reference {reference.name!r} lacks {', '.join(missing)} "
            f"of the {chosen} domain."
        )
    return JudgedSubject(token, chosen, {key: str(value) for key, value in label.items()}, half)


def judged_subjects(
    references: dict[str, list], domains: dict[str, str | None] | None = None
) -> list[list[JudgedSubject]]:
    """Per subject index, the subjects generated together: ``references`` is token -> its references
    (one token, or the two of --pair in order, placed left and right); ``domains``: token -> fallback
    domain (the adapter config's)."""
    tokens = list(references)
    count = min(len(refs) for refs in references.values())
    return [
        [
            judged_subject(references[token][i], token, (domains or {}).get(token), half)
            for token, half in zip(tokens, _halves(tokens), strict=True)
        ]
        for i in range(count)
    ]


def judge_predictions(judges: Any, images: Any, subjects: list[JudgedSubject]) -> dict[str, Any]:
    """What the judges see in ``images``: the identity for each (domain, half) of ``subjects``, and the
    context. Computed once per image batch, then compared with every subject's truth."""
    identity: dict[tuple[str, str | None], list[dict[str, str]]] = {}
    for subject in subjects:
        key = (subject.domain, subject.half)
        if key not in identity:
            identity[key] = judges.identity(subject.domain, images, half=subject.half)
    return {"identity": identity, "context": judges.context(images)}


def judge_scores(
    predictions: dict[str, Any], subjects: list[JudgedSubject], contexts: list[Any]
) -> list[dict[str, float]]:
    """Per image, the judge columns: each subject's predicted identity vs its label, and the predicted
    context vs ``contexts`` (what each image's prompt asked for).

    ``identity_exact`` / ``identity_attributes`` cover every subject (all exact; mean fraction); with two
    subjects, ``identity_exact_<token>`` / ``identity_attributes_<token>`` give each on its own. Each
    attribute has its own column too (:func:`attribute_columns`), so a partial transfer (skin and hair but
    not the eyes) shows where exact identity cannot.
    """
    from nested.judges import attribute_matches, identity_match

    rows = []
    for k, asked in enumerate(contexts):
        row: dict[str, float] = {}
        exact, fractions = [], []
        for subject in subjects:
            predicted = predictions["identity"][(subject.domain, subject.half)][k]
            matches = attribute_matches(predicted, subject.label)
            for attribute, column in attribute_columns(subject, len(subjects) > 1).items():
                row[column] = float(matches[attribute])
            right, fraction = identity_match(predicted, subject.label)
            exact.append(right)
            fractions.append(fraction)
            if len(subjects) > 1:
                suffix = column_suffix(subject.token)
                row[f"identity_exact_{suffix}"] = float(right)
                row[f"identity_attributes_{suffix}"] = fraction
        seen = predictions["context"][k]
        scene = seen["scene"] == asked.scene
        row["identity_exact"] = float(all(exact))
        row["identity_attributes"] = sum(fractions) / len(fractions)
        row["context_scene"] = float(scene)
        row["context"] = float(scene and seen["style"] == asked.style)
        rows.append(row)
    return rows


def judge_images(
    judges: Any, images: Any, prompts: list[str], subjects: list[JudgedSubject]
) -> list[dict[str, float]]:
    """The judge columns ``nested eval --judges`` writes for ``images`` generated from ``prompts`` with
    ``subjects`` (the context asked for is read from each prompt with :func:`nested.toyworld.parse_caption`)."""
    from nested.toyworld import parse_caption

    asked = [parse_caption(prompt) for prompt in prompts]
    return judge_scores(judge_predictions(judges, images, subjects), subjects, asked)


def attribute_columns(subject: JudgedSubject, suffixed: bool) -> dict[str, str]:
    """Attribute name -> its results.csv column, ``identity_attr_<attribute>`` (``..._<token>`` if ``suffixed``,
    i.e. with --pair), for every attribute of the subject's domain."""
    from nested.toyworld import identity_class

    suffix = f"_{column_suffix(subject.token)}" if suffixed else ""
    return {a: f"{ATTRIBUTE_PREFIX}{a}{suffix}" for a in identity_class(subject.domain).ATTRIBUTES}


def judge_chance(subjects: list[JudgedSubject]) -> dict[str, float]:
    """Each judge column's value under uniform guessing: the level a model without the subject gets."""
    from nested.judges import CONTEXT_CHANCE, chance_levels
    from nested.toyworld import identity_class

    levels = [chance_levels(subject.domain) for subject in subjects]
    chance = {
        "identity_exact": math.prod(level["identity"] for level in levels),
        "identity_attributes": sum(level["attributes"] for level in levels) / len(levels),
        "context_scene": CONTEXT_CHANCE["scene"],
        "context": CONTEXT_CHANCE["context"],
    }
    if len(subjects) > 1:
        for subject, level in zip(subjects, levels, strict=True):
            chance[f"identity_exact_{column_suffix(subject.token)}"] = level["identity"]
            chance[f"identity_attributes_{column_suffix(subject.token)}"] = level["attributes"]
    for subject in subjects:
        values = identity_class(subject.domain).ATTRIBUTES
        for attribute, column in attribute_columns(subject, len(subjects) > 1).items():
            chance[column] = 1.0 / len(values[attribute])
    return chance


# ----------------------------------------------------------------------------- the sweep


@dataclass
class _Group:
    """What one generation binds: one token, or the two tokens of ``--pair``, with their subjects."""

    name: str  # the rows' "token": "<person>", or "<person>+<pet>" with --pair
    tokens: list[str]
    class_words: dict[str, str]
    references: dict[str, list]  # token -> references; the i-th of every token are generated together
    identity: dict[str, Any]  # token -> its IdentitySimilarity
    judged: list[list[JudgedSubject]] | None = None  # per subject index, with --judges

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
        import torch
        import torch.nn.functional as F

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
    judges: Any = None  # ToyJudges with --judges
    contexts: dict[str, Any] = field(default_factory=dict)  # prompt -> the toy-world Context it asks for
    token_weights: dict[str, float] = field(default_factory=dict)  # --token-weight
    rows: list[dict[str, Any]] = field(default_factory=list)
    thumbnails: dict[tuple, Any] = field(default_factory=dict)  # (group, subject, prompt, column) -> image
    grid_keys: list[tuple[str, int, int]] = field(default_factory=list)  # (group, subject, prompt) rows
    saved: set[Path] = field(default_factory=set)

    def generate(self, prompts: list[str], seeds: list[int], subjects=None, strengths=None):
        """Images for (prompt, seed) pairs, in batches of ``--batch-size``: (N, 3, H, W) in [0, 1], CPU.

        ``subjects`` / ``strengths``: token -> image / strength (None: the base model).
        """
        import torch

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
            from nested.images import save_png

            save_png(image, path)
            self.saved.add(path)
        return str(path.relative_to(self.out))


def _thumbnail(image):
    """An image for grid.png: at most 256 px on its longer side."""
    import torch.nn.functional as F

    scale = min(1.0, 256 / max(image.shape[-2:]))
    size = (round(image.shape[-2] * scale), round(image.shape[-1] * scale))
    return F.interpolate(image[None], size=size, mode="bicubic", antialias=True)[0].clamp(0, 1)


def _identity_metric(adapter: Any, shared_embedder: Any) -> Any:
    """Identity similarity with ``--identity-model``, else the adapter's own image encoder."""
    from nested.metrics import IdentitySimilarity, VisionEmbedder

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
        predictions = judge_predictions(context.judges, images, subjects)
    scores = {}
    for s_index in s_indices:
        similarity = {}
        for token, half in zip(group.tokens, _halves(group.tokens), strict=True):
            box = _half_box(half, height, width)
            reference = group.references[token][s_index].image[None]
            boxes = None if box is None else [box] * n
            similarity[token] = group.identity[token].score_batch(images, reference, boxes=boxes).tolist()
        judged = [{}] * n
        if predictions is not None:
            asked = [context.contexts[text] for text in texts]
            judged = judge_scores(predictions, group.judged[s_index], asked)
        for k in range(n):
            row = {
                "identity_similarity": sum(v[k] for v in similarity.values()) / len(similarity),
                "prompt_alignment": aligned[k],
            }
            if len(group.tokens) > 1:
                row.update({f"identity_similarity_{column_suffix(t)}": v[k] for t, v in similarity.items()})
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
    for s_index in range(group.count):
        for p_index, _ in prompts:
            if len(context.grid_keys) < args.grid_rows:
                context.grid_keys.append((group.name, s_index, p_index))

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


def run_eval(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Run the sweep and write every output; returns the summary (also written to summary.json)."""
    import diffusers
    import torch
    from tqdm.auto import tqdm

    import nested
    from nested.images import load_references
    from nested.metrics import PromptAlignment, vision_embedder
    from nested.pipeline import NestedPipeline

    parsed = _check(args)
    strengths, seeds, groups = parsed["strengths"], parsed["seeds"], parsed["groups"]
    references = {
        token: load_references(source, count=args.max_subjects, size=args.reference_size, token=token)
        for token, source in parsed["sources"].items()
    }
    if args.judges:  # before loading any model: a reference without a label cannot be judged
        for token, refs in references.items():
            for reference in refs:
                _label(reference, token)
    judges = None
    if args.judges:
        from nested.judges import ToyJudges

        judges = ToyJudges.from_pretrained(Path(args.judges).expanduser()).to(args.device)
    skip_clip = args.clip.lower() == "none"
    alignment = None if skip_clip else PromptAlignment(args.clip, sync_on_compute=False).to(args.device)
    shared_embedder = (
        vision_embedder(args.identity_model, device=args.device) if args.identity_model else None
    )
    pipe = NestedPipeline.from_pretrained(
        args.base,
        parsed["adapters"],
        dtype=getattr(torch, args.dtype),
        device=args.device,
        revision=args.revision,
    )
    pipe.pipe.set_progress_bar_config(disable=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    built = []
    for name, tokens in groups.items():
        adapters = {token: pipe.adapter(token) for token in tokens}
        own = {token: references[token] for token in tokens}
        count = min(len(refs) for refs in own.values())  # --pair: the i-th of each, as many as the shorter
        group = _Group(
            name=name,
            tokens=tokens,
            class_words={t: a.config.tokens.get(t, a.config.class_word) for t, a in adapters.items()},
            references={token: refs[:count] for token, refs in own.items()},
            identity={t: _identity_metric(a, shared_embedder) for t, a in adapters.items()},
        )
        if judges is not None:
            group.judged = judged_subjects(
                group.references, {t: a.config.domain for t, a in adapters.items()}
            )
        built.append(group)

    total = sum(len(parsed["prompts"][g.name]) * len(seeds) * (1 + g.count * len(strengths)) for g in built)
    bar = tqdm(total=total, desc="nested eval", unit="image", disable=args.no_progress, file=sys.stderr)
    context = _Context(
        args=args,
        pipe=pipe,
        bar=bar,
        out=out,
        alignment=alignment,
        judges=judges,
        contexts=parsed["contexts"],
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
    for group in built:  # the judged attributes of every group's domain(s), in order, once
        for subject in group.judged[0] if group.judged else []:
            suffixed = len(group.judged[0]) > 1
            columns += [c for c in attribute_columns(subject, suffixed).values() if c not in columns]
    _write_csv(context.rows, out / "results.csv", columns)
    chance = {g.name: judge_chance(g.judged[0]) for g in built if g.judged}
    names = [g.name for g in built]
    points = summarize(context.rows, names, strengths, columns=columns, chance=chance or None)
    grid_columns = ["base", *strengths]
    _write_grid(context, {g.name: [g.grid_reference(i) for i in range(g.count)] for g in built}, grid_columns)
    title = f"{Path(args.base).name or args.base}: " + (
        "identity vs context (judges)" if judges is not None else "identity vs prompt alignment"
    )
    plot_tradeoff(points, out / "tradeoff.png", title=title, judged=judges is not None)
    metrics = {
        "identity_similarity": "cosine of image embeddings, generated vs reference, in [-1, 1]"
        + ("; with --pair the mean over the tokens, each in its half" if suffixes else ""),
        "prompt_alignment": "CLIP score 100 * cos(image, prompt with the token replaced by its class word)"
        if alignment is not None
        else "not measured (--clip none)",
    }
    if judges is not None:
        metrics.update(JUDGE_METRICS)
    summary = {
        "command": ["nested", "eval", *argv],
        "versions": {
            "nested": nested.__version__,
            "diffusers": diffusers.__version__,
            "torch": torch.__version__,
        },
        "base": args.base,
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
        "height": args.height,
        "width": args.width,
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
    (out / "summary.json").write_text(json.dumps(_no_nan(summary), indent=2, default=str) + "\n")
    pipe.unload()
    return summary


def _no_nan(value: Any) -> Any:
    """NaN (e.g. prompt alignment with --clip none) as JSON null, which every JSON reader accepts."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {key: _no_nan(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_no_nan(item) for item in value]
    return value


def _point_line(point: dict[str, Any]) -> str:
    """One line of the final report: a point's means (and with --judges, the chance levels)."""
    line = f"  {point['token']} {point['label']:>8}: identity {point['identity_similarity']:.3f}"
    if point["prompt_alignment"] == point["prompt_alignment"]:
        line += f"  prompt alignment {point['prompt_alignment']:.2f}"
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


def main_eval(argv: list[str] | None = None) -> int:
    """``nested eval``: returns the exit code (0 ok, 2 for a user error, shown in one line)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = eval_parser().parse_args(argv)
    summary = run_user_command("nested eval", args.verbose, lambda: run_eval(args, argv))
    if summary is None:
        return 2
    out = Path(args.out).resolve()
    print(f"Wrote {summary['rows']} rows to {out / 'results.csv'}, summary.json, grid.png and tradeoff.png")
    for point in summary["points"]:
        print(_point_line(point))
    return 0


if __name__ == "__main__":  # python -m nested.evaluate ...
    sys.exit(main_eval())
