"""``nested eval``'s outputs: ``results.csv``, the trade-off points, ``grid.png`` and ``tradeoff.png``."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

__all__ = ["CSV_COLUMNS", "plot_tradeoff", "summarize"]

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


def _write_grid(context: Any, references: dict[str, list], columns: list) -> None:
    """grid.png: per (token, subject, prompt), the reference, the base image, then each strength (first seed).

    ``context``: the sweep's :class:`nested.evaluate._Context` (its ``grid_keys``, ``thumbnails`` and ``out``).
    """
    import torch.nn.functional as F

    from nested.images import make_grid, save_png

    rows = []
    for token, s_index, p_index in context.grid_keys:
        generated = [context.thumbnails[(token, s_index, p_index, column)] for column in columns]
        reference = references[token][s_index].image[None]
        size = tuple(generated[0].shape[-2:])
        reference = F.interpolate(reference, size=size, mode="bicubic", antialias=True)[0].clamp(0, 1)
        rows.append([reference, *generated])
    if rows:
        save_png(make_grid(rows), context.out / "grid.png")


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
