"""``nested eval``'s outputs: ``results.csv``, the trade-off points, ``grid.png`` and ``tradeoff.png``."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path
from typing import Any

import torch.nn.functional as F

from nested.evaluation.images import labelled_grid, save_png

__all__ = [
    "ATTRIBUTE_PREFIX",
    "CSV_COLUMNS",
    "JUDGE_COLUMNS",
    "JUDGE_METRICS",
    "column_suffix",
    "plot_tradeoff",
    "result_columns",
    "summarize",
    "write_csv",
    "write_grid",
]

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
# With --judges (nested.evaluation.judging): accuracies in [0, 1] per image, after the columns above.
JUDGE_COLUMNS = ("identity_exact", "identity_attributes", "context_scene", "context")
ATTRIBUTE_PREFIX = "identity_attr_"  # + attribute (+ "_<token>" with --pair): one column per attribute
JUDGE_METRICS = {
    "identity_exact": "1 if the identity judge predicts every attribute of the reference's true label "
    "(with --pair: of both subjects, each in its half), else 0",
    "identity_attributes": "fraction of the true label's attributes the identity judge predicts (--pair: mean)",
    "context_scene": "1 if the context judge sees the scene the prompt asks for, else 0",
    "context": "1 if the context judge sees both the scene and the style the prompt asks for, else 0",
    "identity_attr_<attribute>": "1 if the identity judge predicts that attribute of the true label, else 0 "
    "(--pair: identity_attr_<attribute>_<token>)",
    "chance": "each judge column's value under uniform guessing (the no-subject level)",
}


def column_suffix(token: str) -> str:
    """The per-token CSV column suffix of a --pair token: ``<person>`` -> ``person``."""
    return re.sub(r"[^A-Za-z0-9]+", "_", token).strip("_").lower() or "token"


def result_columns(pair_suffixes: list[str] | tuple[str, ...] = (), judged: bool = False) -> list[str]:
    """results.csv's columns: ``CSV_COLUMNS``, then with --pair each token's identity similarity
    (``identity_similarity_<suffix>``), then with --judges ``JUDGE_COLUMNS`` and with --pair each
    token's ``identity_exact_<suffix>`` / ``identity_attributes_<suffix>``."""
    columns = [*CSV_COLUMNS, *(f"identity_similarity_{suffix}" for suffix in pair_suffixes)]
    if judged:
        columns += JUDGE_COLUMNS
        columns += [f"identity_{m}_{suffix}" for suffix in pair_suffixes for m in ("exact", "attributes")]
    return columns


def _mean_std(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if v == v]
    if not finite:
        return float("nan"), float("nan")
    mean = sum(finite) / len(finite)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in finite) / len(finite))


def summarize(
    rows: list[dict[str, Any]],
    tokens: list[str],
    strengths: list[float],
    columns: list[str] | tuple[str, ...] = CSV_COLUMNS,
    chance: dict[str, dict[str, float]] | None = None,
) -> list[dict[str, Any]]:
    """The trade-off points: per token, the base model and each strength, with means, stds and counts.

    ``columns``: the csv's; those beyond ``CSV_COLUMNS`` (per-token similarities, judge columns) add their
    mean. ``chance``: token -> the judge columns' chance levels, added to each of its points.
    """
    extra = [column for column in columns if column not in CSV_COLUMNS]
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
            point = {
                "token": token,
                "label": "base" if strength is None else f"s={strength:g}",
                "variant": variant,
                "strength": strength,
                "identity_similarity": identity_mean,
                "identity_similarity_std": identity_std,
                "prompt_alignment": alignment_mean,
                "prompt_alignment_std": alignment_std,
            }
            for column in extra:  # not a column of another token's domain (an attribute this one lacks)
                if any(column in r for r in selected):
                    point[column] = _mean_std([r[column] for r in selected])[0]
            point["n"] = len(selected)
            if chance and token in chance:
                point["chance"] = dict(chance[token])
            points.append(point)
    return points


def _cell(column: str, value: Any) -> Any:
    """How results.csv writes a value: fixed decimals for scores, shortest form for accuracies."""
    if not isinstance(value, float):
        return value
    if column.startswith("identity_similarity"):
        return f"{value:.6f}"
    if column == "prompt_alignment":
        return f"{value:.4f}"
    if column in JUDGE_COLUMNS or column.startswith(
        ("identity_exact_", "identity_attributes_", ATTRIBUTE_PREFIX)
    ):
        return f"{value:.6g}"
    return value  # e.g. the strength: as before


def write_csv(
    rows: list[dict[str, Any]], path: Path, columns: list[str] | tuple[str, ...] = CSV_COLUMNS
) -> None:
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({column: _cell(column, value) for column, value in row.items()})


def write_grid(context: Any, references: dict[str, list], columns: list) -> None:
    """grid.png: per (token, subject, prompt), the reference, the base image, then each strength (first seed),
    labelled: a header names the columns, each row's prompt is written above it.

    ``context``: the sweep's :class:`nested.evaluation.sweep._Context` (its ``grid_keys``, ``grid_labels``,
    ``thumbnails`` and ``out``); ``references``: token (or --pair group) -> each subject's reference image,
    (3, S, S) in [0, 1]; ``columns``: "base", then the strengths.
    """

    rows = []
    for token, s_index, p_index in context.grid_keys:
        generated = [context.thumbnails[(token, s_index, p_index, column)] for column in columns]
        reference = references[token][s_index][None]
        size = tuple(generated[0].shape[-2:])
        reference = F.interpolate(reference, size=size, mode="bicubic", antialias=True)[0].clamp(0, 1)
        rows.append([reference, *generated])
    if rows:
        names = ["reference", *("base model" if c == "base" else f"adapter s={c:g}" for c in columns)]
        labels = [context.grid_labels.get(key, "") for key in context.grid_keys]
        save_png(labelled_grid(rows, names, labels), context.out / "grid.png")


def plot_tradeoff(
    points: list[dict[str, Any]],
    path: str | Path,
    title: str = "identity vs prompt alignment",
    judged: bool = False,
) -> Path:
    """Draw identity similarity (y) against prompt alignment (x): per token, its strengths joined by a line,
    and the base model as a star, every point labelled. Returns the path of the PNG.

    ``judged`` (points from ``nested eval --judges``): identity accuracy (y: exact, solid; attributes,
    dashed) against context accuracy (x: scene and style right), with dotted chance lines.
    """
    # Here, not at the top: matplotlib is needed by the plot alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.8), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    tokens = list(dict.fromkeys(point["token"] for point in points))
    colors = [f"C{i}" for i in range(len(tokens))]
    if judged:
        x_key = "context"
        curves = [("identity_exact", "-o", "exact"), ("identity_attributes", "--s", "attributes")]
    else:
        x_key = "prompt_alignment"
        curves = [("identity_similarity", "-o", "")]
    for token, color in zip(tokens, colors, strict=True):
        own = [p for p in points if p["token"] == token]
        curve = sorted((p for p in own if p["variant"] == "adapter"), key=lambda p: p["strength"])
        for y_key, style, name in curves:
            suffix = f", {name}" if name else ""
            xs = [p[x_key] for p in curve]
            ys = [p[y_key] for p in curve]
            axes.plot(xs, ys, style, color=color, label=f"{token} (adapter{suffix})")
            for p in own:
                if p["variant"] == "base":
                    axes.plot(
                        p[x_key],
                        p[y_key],
                        "*",
                        markersize=14,
                        color=color,
                        markeredgecolor="black",
                        label=f"{token}: base model{suffix}",
                    )
                label = p["label"] if len(tokens) == 1 else f"{p['label']} {token}"
                axes.annotate(
                    label, (p[x_key], p[y_key]), textcoords="offset points", xytext=(6, 6), fontsize=9
                )
        chance = next((p["chance"] for p in own if p.get("chance")), None)
        if judged and chance:
            for y_key, _, name in curves:
                axes.axhline(chance[y_key], color=color, linestyle=":", linewidth=1)
                axes.annotate(
                    f"chance ({name})",
                    (1.0, chance[y_key]),
                    xycoords=("axes fraction", "data"),
                    xytext=(-4, 2),
                    textcoords="offset points",
                    ha="right",
                    fontsize=7,
                    color=color,
                )
            axes.axvline(chance[x_key], color="grey", linestyle=":", linewidth=1)
            axes.annotate(
                "chance",
                (chance[x_key], 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(3, -10),
                textcoords="offset points",
                fontsize=7,
                color="grey",
            )
    if judged:
        axes.set_xlabel("context accuracy: scene and style right (context judge)")
        axes.set_ylabel("identity accuracy (identity judge vs the true label)")
        axes.set_xlim(-0.05, 1.05)
        axes.set_ylim(-0.05, 1.05)
    else:
        axes.set_xlabel("prompt alignment: CLIP score (higher follows the prompt better)")
        axes.set_ylabel("identity similarity: cosine (higher keeps the subject better)")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="best", fontsize=8)
    if not judged:
        axes.margins(0.15)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path
