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
import csv
import json
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nested.generate import USER_ERRORS, UsageError, _one_line, _quiet_libraries

__all__ = ["eval_parser", "main_eval", "plot_tradeoff", "read_prompts", "run_eval", "summarize"]

DTYPES = ("float32", "float16", "bfloat16")
CSV_COLUMNS = (
    "token",
    "subject",
    "variant",
    "strength",
    "seed",
    "prompt_index",
    "prompt",
    "clip_text",
    "identity_similarity",
    "prompt_alignment",
    "image",
)


def eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nested eval",
        description="Measure identity similarity vs prompt alignment of nested adapters over strengths and seeds, "
        "against the base model, and plot the trade-off.",
        epilog=(
            "example: nested eval --base data/models/tiny-sd --adapter '<person>=runs/demo/adapters/last' "
            "--prompts data/prompts/faces.txt --subjects data/demo/faces/val/shards.json --clip openai/clip-vit-large-patch14 "
            "--out runs/demo/eval"
        ),
    )
    models = parser.add_argument_group("models")
    models.add_argument("--base", required=True, help="base SD / SDXL diffusers folder or hub id")
    models.add_argument("--revision", default=None, help="hub revision of the base model")
    models.add_argument(
        "--adapter",
        action="append",
        default=[],
        required=True,
        metavar="TOKEN=PATH_OR_REPO",
        help="an adapter folder or hub repo bound to TOKEN; repeatable (each token is evaluated on its own)",
    )
    models.add_argument(
        "--clip",
        default="openai/clip-vit-large-patch14",
        help="full CLIP (folder or hub id) for prompt alignment (default: openai/clip-vit-large-patch14)",
    )
    models.add_argument(
        "--identity-model",
        default=None,
        help="CLIP vision or DINOv2 folder / hub id for identity similarity (default: the adapter's image encoder)",
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--prompts",
        required=True,
        help="text file, one template per line with {token} or the literal token (# comments)",
    )
    data.add_argument(
        "--subjects",
        action="append",
        default=[],
        required=True,
        metavar="[TOKEN=]DIR_OR_SHARDS",
        help="reference images: a folder, an image, or shards (shards.json, .tar, brace pattern); "
        "TOKEN=... for one token only; repeatable",
    )
    data.add_argument("--max-subjects", type=int, default=4, help="subjects per token (default 4)")
    data.add_argument(
        "--reference-size", type=int, default=512, help="side of the reference images (default 512)"
    )
    sweep = parser.add_argument_group("sweep")
    sweep.add_argument(
        "--strengths", default="0.25,0.5,1.0", help="comma-separated subject strengths (default 0.25,0.5,1.0)"
    )
    sweep.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
    sweep.add_argument("--steps", type=int, default=30, help="denoising steps (default 30)")
    sweep.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance (default 5)")
    sweep.add_argument("--negative-prompt", default=None)
    sweep.add_argument("--height", type=int, default=None, help="pixels (default: the base model's)")
    sweep.add_argument("--width", type=int, default=None, help="pixels (default: the base model's)")
    sweep.add_argument("--batch-size", type=int, default=4, help="images per pipeline call (default 4)")
    output = parser.add_argument_group("output")
    output.add_argument("--out", required=True, help="output folder")
    output.add_argument("--grid-rows", type=int, default=12, help="rows of grid.png (default 12)")
    output.add_argument("--no-images", action="store_true", help="do not keep every generated image")
    runtime = parser.add_argument_group("runtime")
    runtime.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps... (default cpu)")
    runtime.add_argument("--dtype", default="float32", choices=DTYPES)
    runtime.add_argument("--no-progress", action="store_true", help="no progress bar")
    runtime.add_argument(
        "--verbose", action="store_true", help="show the libraries' loading bars and warnings"
    )
    return parser


# ----------------------------------------------------------------------------- arguments


def _numbers(text: str, option: str, convert) -> list:
    try:
        values = [convert(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"{option} expects comma-separated numbers, got {text!r}.") from None
    if not values:
        raise UsageError(f"{option} is empty.")
    if len(set(values)) != len(values):
        raise UsageError(f"{option} repeats a value: {text!r}.")
    return values


def read_prompts(path: str | Path, tokens: list[str]) -> dict[str, list[tuple[int, str]]]:
    """Prompt templates -> for each token, its (line index, prompt) pairs.

    A line with ``{token}`` applies to every token; a line with a literal token applies to that token.
    Blank lines and ``#`` comments are skipped.

    Raises:
        FileNotFoundError: no such file. UsageError: a line names no token, or no prompt at all.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {str(path)!r} does not exist.")
    per_token: dict[str, list[tuple[int, str]]] = {token: [] for token in tokens}
    index = 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        template = line.strip()
        if not template or template.startswith("#"):
            continue
        matched = False
        for token in tokens:
            if "{token}" in template or token in template:
                per_token[token].append((index, template.replace("{token}", token)))
                matched = True
        if not matched:
            raise UsageError(
                f"{path}:{number}: {template!r} names no subject: write {{token}} (or one of {', '.join(tokens)}) "
                "where the subject goes."
            )
        index += 1
    if index == 0:
        raise UsageError(
            f"{path} holds no prompt (one template a line, e.g. 'a photo of {{token}} at the beach')."
        )
    return per_token


def _subject_sources(values: list[str], tokens: list[str]) -> dict[str, str]:
    """``--subjects`` -> token -> source; an unprefixed source serves every token without its own."""
    shared, own = None, {}
    for value in values:
        token, sep, rest = value.partition("=")
        if sep and token in tokens:
            if token in own:
                raise UsageError(f"--subjects is given twice for {token!r}.")
            own[token] = rest
        elif shared is None:
            shared = value
        else:
            raise UsageError("--subjects without TOKEN= is given twice; prefix each with its token.")
    missing = [token for token in tokens if token not in own and shared is None]
    if missing:
        raise UsageError(
            f"no --subjects for {', '.join(missing)}: add --subjects '{missing[0]}=DIR_OR_SHARDS'."
        )
    return {token: own.get(token, shared) for token in tokens}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def _check(args: argparse.Namespace) -> dict[str, Any]:
    """Every problem that needs no model, found before loading; returns the parsed options."""
    from nested.generate import _pairs

    adapters = _pairs(args.adapter, "--adapter")
    tokens = list(adapters)
    strengths = _numbers(args.strengths, "--strengths", float)
    seeds = _numbers(args.seeds, "--seeds", int)
    if args.steps < 1 or args.batch_size < 1 or args.max_subjects < 1 or args.grid_rows < 1:
        raise UsageError("--steps, --batch-size, --max-subjects and --grid-rows must be >= 1.")
    for size in (args.height, args.width):
        if size is not None and (size < 8 or size % 8):
            raise UsageError(f"--height and --width must be positive multiples of 8, got {size}.")
    prompts = read_prompts(args.prompts, tokens)
    sources = _subject_sources(args.subjects, tokens)
    return {
        "adapters": adapters,
        "tokens": tokens,
        "strengths": strengths,
        "seeds": seeds,
        "prompts": prompts,
        "sources": sources,
    }


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
            from nested.sampling import save_png

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


def _mean_std(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if v == v]
    if not finite:
        return float("nan"), float("nan")
    mean = sum(finite) / len(finite)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in finite) / len(finite))


def summarize(rows: list[dict[str, Any]], tokens: list[str], strengths: list[float]) -> list[dict[str, Any]]:
    """The trade-off points: per token, the base model and each strength, with means, stds and counts."""
    points = []
    for token in tokens:
        for variant, strength in [("base", None)] + [("adapter", s) for s in strengths]:
            selected = [
                r
                for r in rows
                if r["token"] == token
                and r["variant"] == variant
                and (strength is None or r["strength"] == strength)
            ]
            identity_mean, identity_std = _mean_std([r["identity_similarity"] for r in selected])
            alignment_mean, alignment_std = _mean_std([r["prompt_alignment"] for r in selected])
            points.append(
                {
                    "token": token,
                    "label": "base" if strength is None else f"s={strength:g}",
                    "variant": variant,
                    "strength": strength,
                    "identity_similarity": identity_mean,
                    "identity_similarity_std": identity_std,
                    "prompt_alignment": alignment_mean,
                    "prompt_alignment_std": alignment_std,
                    "n": len(selected),
                }
            )
    return points


def _write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {
                    **row,
                    "identity_similarity": f"{row['identity_similarity']:.6f}",
                    "prompt_alignment": f"{row['prompt_alignment']:.4f}",
                }
            )


def _write_grid(context: _Context, references: dict[str, list], columns: list) -> None:
    """grid.png: per (token, subject, prompt), the reference, the base image, then each strength (first seed)."""
    import torch.nn.functional as F

    from nested.sampling import make_grid, save_png

    rows = []
    for token, s_index, p_index in context.grid_keys:
        generated = [context.thumbnails[(token, s_index, p_index, column)] for column in columns]
        reference = references[token][s_index].image[None]
        size = tuple(generated[0].shape[-2:])
        reference = F.interpolate(reference, size=size, mode="bicubic", antialias=True)[0].clamp(0, 1)
        rows.append([reference, *generated])
    if rows:
        save_png(make_grid(rows), context.out / "grid.png")


def run_eval(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Run the sweep and write every output; returns the summary (also written to summary.json)."""
    import diffusers
    import torch
    from tqdm.auto import tqdm

    import nested
    from nested.metrics import PromptAlignment, vision_embedder
    from nested.pipeline import NestedPipeline
    from nested.sampling import load_references

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


# ----------------------------------------------------------------------------- the plot


def plot_tradeoff(
    points: list[dict[str, Any]], path: str | Path, title: str = "identity vs prompt alignment"
) -> Path:
    """Draw identity similarity (y) against prompt alignment (x): per token, its strengths joined by a line,
    and the base model as a star, every point labelled. Returns the path of the PNG."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:  # pragma: no cover - matplotlib is a dependency
        raise ImportError("the trade-off plot needs matplotlib: pip install matplotlib") from error

    figure = Figure(figsize=(6.4, 4.8), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    tokens = list(dict.fromkeys(point["token"] for point in points))
    colors = [f"C{i}" for i in range(len(tokens))]
    for token, color in zip(tokens, colors, strict=True):
        own = [p for p in points if p["token"] == token]
        curve = sorted((p for p in own if p["variant"] == "adapter"), key=lambda p: p["strength"])
        xs = [p["prompt_alignment"] for p in curve]
        ys = [p["identity_similarity"] for p in curve]
        axes.plot(xs, ys, "-o", color=color, label=f"{token} (adapter)")
        for p in own:
            if p["variant"] == "base":
                axes.plot(
                    p["prompt_alignment"],
                    p["identity_similarity"],
                    "*",
                    markersize=14,
                    color=color,
                    markeredgecolor="black",
                    label=f"{token}: base model",
                )
            label = p["label"] if len(tokens) == 1 else f"{p['label']} {token}"
            axes.annotate(
                label,
                (p["prompt_alignment"], p["identity_similarity"]),
                textcoords="offset points",
                xytext=(6, 6),
                fontsize=9,
            )
    axes.set_xlabel("prompt alignment: CLIP score (higher follows the prompt better)")
    axes.set_ylabel("identity similarity: cosine (higher keeps the subject better)")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="best", fontsize=8)
    axes.margins(0.15)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


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
