"""``nested eval``: the identity vs prompt-alignment trade-off of one or more adapters.

For every adapter token, subject image, prompt template, strength and seed it generates one image, plus
the base model's image for every (prompt, seed) (the token replaced by its class word, no adapter), and
scores each image with :mod:`nested.metrics`:

* identity similarity: cosine between image embeddings of the generated image and the subject's reference
  (``--identity-model``; default: the adapter's own image encoder);
* prompt alignment: CLIP score between the image and the prompt with the token replaced by its class word
  (``--clip``), so adapter and base images are scored against the same text.

Writes to ``--out``: ``results.csv`` (one row per image and subject), ``summary.json`` (settings, means per
strength, and the plotted ``points``), ``grid.png`` (reference | base | each strength, first seed) and
``tradeoff.png`` (identity y vs alignment x, one point per strength plus the base model). User mistakes end
with exit code 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nested.eval_args import DTYPES as DTYPES
from nested.eval_args import _check, eval_parser, read_prompts
from nested.generate import USER_ERRORS, _one_line, _quiet_libraries
from nested.report import CSV_COLUMNS as CSV_COLUMNS
from nested.report import _write_csv, _write_grid, plot_tradeoff, summarize

__all__ = ["eval_parser", "main_eval", "plot_tradeoff", "read_prompts", "run_eval", "summarize"]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


# ----------------------------------------------------------------------------- the sweep


@dataclass
class _Context:
    """What every generation of the sweep shares."""

    args: argparse.Namespace
    pipe: Any  # NestedPipeline
    bar: Any  # tqdm
    out: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    thumbnails: dict[tuple, Any] = field(default_factory=dict)  # (token, subject, prompt, column) -> image
    grid_keys: list[tuple[str, int, int]] = field(default_factory=list)  # (token, subject, prompt) rows
    saved: set[Path] = field(default_factory=set)

    def generate(self, prompts: list[str], seeds: list[int], token=None, subject=None, strength=None):
        """Images for (prompt, seed) pairs, in batches of ``--batch-size``: (N, 3, H, W) in [0, 1], CPU."""
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
            if subject is not None:
                kwargs.update(subjects={token: subject}, strengths={token: strength})
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


def _evaluate_token(
    context: _Context,
    token: str,
    prompts: list[tuple[int, str]],
    subjects: list,
    strengths: list[float],
    seeds: list[int],
    metrics: tuple[Any, Any],
) -> None:
    """Base and adapter images of one token, scored, appended to ``context.rows``.

    ``metrics``: the (identity similarity, prompt alignment) metrics; only their ``score_batch`` is used.
    """
    args = context.args
    identity, alignment = metrics
    adapter = context.pipe.adapter(token)
    class_word = adapter.config.tokens.get(token, adapter.config.class_word)
    pairs = [(index, prompt, seed) for index, prompt in prompts for seed in seeds]
    clip_texts = [prompt.replace(token, class_word) for _, prompt, _ in pairs]
    pair_seeds = [seed for _, _, seed in pairs]
    folder = context.out / "images" / _slug(token)
    for s_index in range(len(subjects)):
        for p_index, _ in prompts:
            if len(context.grid_keys) < args.grid_rows:
                context.grid_keys.append((token, s_index, p_index))

    def add_rows(
        images, variant: str, strength: Any, prompts_used: list[str], s_indices: list[int], name
    ) -> None:
        aligned = alignment.score_batch(images, clip_texts).tolist()
        for s_index in s_indices:
            similarity = identity.score_batch(images, subjects[s_index].image[None]).tolist()
            for k, (p_index, _, seed) in enumerate(pairs):
                shown = seed == seeds[0] and (token, s_index, p_index) in context.grid_keys
                column = strength if variant == "adapter" else "base"
                grid_key = (token, s_index, p_index, column) if shown else None
                image = context.keep(images[k], folder / name(s_index, p_index, seed), grid_key)
                context.rows.append(
                    {
                        "token": token,
                        "subject": subjects[s_index].name,
                        "variant": variant,
                        "strength": strength,
                        "seed": seed,
                        "prompt_index": p_index,
                        "prompt": prompts_used[k],
                        "clip_text": clip_texts[k],
                        "identity_similarity": similarity[k],
                        "prompt_alignment": aligned[k],
                        "image": image,
                    }
                )

    # The base model: the token replaced by its class word, no subject; one image per (prompt, seed),
    # compared with every subject.
    base = context.generate(clip_texts, pair_seeds)
    add_rows(
        base,
        "base",
        "",
        clip_texts,
        list(range(len(subjects))),
        lambda s, p, seed: f"base/p{p:02d}_seed{seed}.png",
    )
    for s_index, subject in enumerate(subjects):
        for strength in strengths:
            images = context.generate([p for _, p, _ in pairs], pair_seeds, token, subject.image, strength)
            add_rows(
                images,
                "adapter",
                strength,
                [p for _, p, _ in pairs],
                [s_index],
                lambda s, p, seed, st=strength: f"{_slug(subjects[s].name)}/p{p:02d}_s{st:g}_seed{seed}.png",
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
    tokens, strengths, seeds = parsed["tokens"], parsed["strengths"], parsed["seeds"]
    references = {
        token: load_references(source, count=args.max_subjects, size=args.reference_size, token=token)
        for token, source in parsed["sources"].items()
    }
    alignment = PromptAlignment(args.clip, sync_on_compute=False).to(args.device)
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

    total = sum(
        len(parsed["prompts"][t]) * len(seeds) * (1 + len(references[t]) * len(strengths)) for t in tokens
    )
    bar = tqdm(total=total, desc="nested eval", unit="image", disable=args.no_progress, file=sys.stderr)
    context = _Context(args=args, pipe=pipe, bar=bar, out=out)
    started = time.time()
    try:
        for token in tokens:
            identity = _identity_metric(pipe.adapter(token), shared_embedder)
            prompts = parsed["prompts"][token]
            metrics = (identity, alignment)
            _evaluate_token(context, token, prompts, references[token], strengths, seeds, metrics)
    finally:
        bar.close()

    _write_csv(context.rows, out / "results.csv")
    points = summarize(context.rows, tokens, strengths)
    columns = ["base", *strengths]
    _write_grid(context, references, columns)
    plot_tradeoff(
        points,
        out / "tradeoff.png",
        title=f"{Path(args.base).name or args.base}: identity vs prompt alignment",
    )
    summary = {
        "command": ["nested", "eval", *argv],
        "versions": {
            "nested": nested.__version__,
            "diffusers": diffusers.__version__,
            "torch": torch.__version__,
        },
        "base": args.base,
        "adapters": pipe.describe(),
        "subjects": {token: [r.name for r in references[token]] for token in tokens},
        "prompts": {token: [p for _, p in parsed["prompts"][token]] for token in tokens},
        "strengths": strengths,
        "seeds": seeds,
        "steps": args.steps,
        "guidance": args.guidance,
        "negative_prompt": args.negative_prompt,
        "height": args.height,
        "width": args.width,
        "clip": args.clip,
        "identity_model": args.identity_model or "the adapter's image encoder",
        "metrics": {
            "identity_similarity": "cosine of image embeddings, generated vs reference, in [-1, 1]",
            "prompt_alignment": "CLIP score 100 * cos(image, prompt with the token replaced by its class word)",
        },
        "points": points,
        "grid": {
            "rows": [list(key) for key in context.grid_keys],
            "columns": ["reference", *map(str, columns)],
        },
        "files": {"csv": "results.csv", "grid": "grid.png", "tradeoff": "tradeoff.png"},
        "rows": len(context.rows),
        "seconds": round(time.time() - started, 2),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    pipe.unload()
    return summary


def main_eval(argv: list[str] | None = None) -> int:
    """``nested eval``: returns the exit code (0 ok, 2 for a user error, shown in one line)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = eval_parser().parse_args(argv)
    try:
        with _quiet_libraries(args.verbose):
            summary = run_eval(args, argv)
    except USER_ERRORS as error:
        print(f"nested eval: error: {_one_line(error)}", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    print(f"Wrote {summary['rows']} rows to {out / 'results.csv'}, summary.json, grid.png and tradeoff.png")
    for point in summary["points"]:
        print(
            f"  {point['token']} {point['label']:>8}: identity {point['identity_similarity']:.3f}  "
            f"prompt alignment {point['prompt_alignment']:.2f}"
        )
    return 0


if __name__ == "__main__":  # python -m nested.evaluate ...
    sys.exit(main_eval())
