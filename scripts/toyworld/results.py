#!/usr/bin/env python
"""Tables and the trade-off plot of a toy-world reproduction (scripts/toyworld/reproduce.sh).

Reads ``RUNS/eval-{faces,pets}-{nested,decoupled}/summary.json`` (and ``-nested-tw<W>``),
``RUNS/eval-pairs-*/summary.json``, ``RUNS/base-words.json`` (scripts/toyworld/check_base.py),
``RUNS/timings.tsv`` and the judges' ``config.json`` (their accuracy on held-out real renders), and writes
``RUNS/results.md`` and ``RUNS/tradeoff.png``. With ``--publish`` it also copies them to
``benchmarks/toyworld.md`` and ``docs/toyworld-tradeoff.png`` and replaces the README's block between
``<!-- toyworld-results:start -->`` and ``<!-- toyworld-results:end -->``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

DOMAINS = {"faces": "<person>", "pets": "<pet>"}
# The largest single region of each domain's identity, the attribute an adapter carries first: plotted too.
MAIN_ATTRIBUTE = {"faces": "identity_attr_hair_colour", "pets": "identity_attr_fur_colour"}
METHODS = ("nested", "decoupled")
README_START, README_END = "<!-- toyworld-results:start -->", "<!-- toyworld-results:end -->"


def _points(path: Path) -> list[dict]:
    if not path.is_file():
        raise SystemExit(f"results.py: {path} is missing; run scripts/toyworld/reproduce.sh first")
    return json.loads(path.read_text())["points"]


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def context_at_identity(curve: list[dict], identity: float) -> float | None:
    """Context accuracy of a strength sweep interpolated at ``identity`` (exact) accuracy; None outside it.

    ``curve``: the sweep's points; linear interpolation between the two strengths that bracket ``identity``.
    """
    points = sorted((p["identity_exact"], p["context"]) for p in curve)
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x0 <= identity <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (identity - x0) / (x1 - x0)
    return None


def weighted_sweeps(domain: str, runs: Path) -> dict[str, list[dict]]:
    """Extra nested sweeps at a token weight (``RUNS/eval-DOMAIN-nested-tw<W>``): label -> adapter points."""
    sweeps = {}
    for folder in sorted(f for f in runs.glob(f"eval-{domain}-nested-tw*") if f.is_dir()):
        weight = folder.name.rsplit("-tw", 1)[1]
        points = [p for p in _points(folder / "summary.json") if p["variant"] == "adapter"]
        sweeps[f"nested, token weight {weight}"] = points
    return sweeps


def domain_table(
    domain: str, runs: Path, extra: dict[str, list[dict]]
) -> tuple[list[str], dict[str, list[dict]]]:
    """Markdown rows for one domain: chance, base, each method x strength, then the ``extra`` labelled
    sweeps (:func:`weighted_sweeps`); and the sweeps by method."""
    sweeps = {method: _points(runs / f"eval-{domain}-{method}" / "summary.json") for method in METHODS}
    base = next(p for p in sweeps["nested"] if p["variant"] == "base")
    chance = base["chance"]
    lines = [
        f"**{domain}** (token `{DOMAINS[domain]}`, {base['n']} base rows: each base image is scored against every subject; chance: identity "
        f"{_pct(chance['identity_exact'])} %, attributes {_pct(chance['identity_attributes'])} %, "
        f"context {_pct(chance['context'])} %)",
        "",
        "| model | strength | identity exact % | attributes % | context (scene + style) % | scene % "
        "| decoupled context at equal identity % |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| base (no adapter) | - | {_pct(base['identity_exact'])} | {_pct(base['identity_attributes'])} "
        f"| {_pct(base['context'])} | {_pct(base['context_scene'])} | |",
    ]
    adapters = {m: [p for p in sweeps[m] if p["variant"] == "adapter"] for m in METHODS}
    for method, points in {**adapters, **extra}.items():
        for point in points:
            matched = ""
            # Only where there is identity to match: at chance level every sweep "matches" trivially, and
            # one or two exact images in hundreds (already 3x chance for faces) are not a level to match.
            exact = point["identity_exact"]
            if (
                method.startswith("nested")
                and exact >= 3 * chance["identity_exact"] > 0
                and exact * point["n"] >= 5
            ):
                matched = _pct(context_at_identity(adapters["decoupled"], point["identity_exact"]))
            lines.append(
                f"| {method} | {point['strength']:g} | {_pct(point['identity_exact'])} "
                f"| {_pct(point['identity_attributes'])} | {_pct(point['context'])} "
                f"| {_pct(point['context_scene'])} | {matched} |"
            )
    return lines, sweeps


def attribute_table(
    title: str, sweeps: dict[str, list[dict]], suffix: str = "", extra: dict[str, list[dict]] | None = None
) -> list[str]:
    """Markdown rows: each identity attribute's accuracy (``identity_attr_*``), base and every sweep point.

    Exact identity needs every attribute at once; this table shows which ones an adapter does carry.
    ``suffix``: a two-subject evaluation's token suffix (``"_person"``), selecting that subject's columns.
    ``extra``: more labelled adapter sweeps (:func:`weighted_sweeps`).
    """
    base = next(p for p in sweeps["nested"] if p["variant"] == "base")
    columns = [k for k in base["chance"] if k.startswith("identity_attr_") and k.endswith(suffix)]
    if not columns:
        return []  # evaluated before nested eval wrote per-attribute columns
    names = [k.removeprefix("identity_attr_").removesuffix(suffix).replace("_", " ") for k in columns]
    lines = [
        f"Per attribute, {title} (% right; chance in the header):",
        "",
        "| model | strength | "
        + " | ".join(f"{n} ({_pct(base['chance'][c])})" for n, c in zip(names, columns, strict=True))
        + " |",
        "| --- | --- |" + " --- |" * len(columns),
        "| base (no adapter) | - | " + " | ".join(_pct(base.get(c)) for c in columns) + " |",
    ]
    labelled = {m: [p for p in sweeps[m] if p["variant"] == "adapter"] for m in METHODS} | (extra or {})
    for method, points in labelled.items():
        for point in points:
            cells = " | ".join(_pct(point.get(c)) for c in columns)
            lines.append(f"| {method} | {point['strength']:g} | {cells} |")
    return lines


def pair_table(runs: Path) -> list[str]:
    """Markdown rows of the two-subject prompts: each subject judged in its half."""
    lines = [
        "| model | strength | person exact % | pet exact % | person attributes % | pet attributes % "
        "| context % |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for method in METHODS:
        path = runs / f"eval-pairs-{method}" / "summary.json"
        if not path.is_file():
            continue
        for point in _points(path):
            if point["variant"] == "base" and method != "nested":
                continue
            label = "base (no adapter)" if point["variant"] == "base" else method
            strength = "-" if point["strength"] is None else f"{point['strength']:g}"
            cells = [
                point.get(f"identity_{m}_{s}") for m in ("exact", "attributes") for s in ("person", "pet")
            ]
            lines.append(
                f"| {label} | {strength} | {' | '.join(_pct(c) for c in cells)} | {_pct(point['context'])} |"
            )
    return lines


def judges_table(judges: Path) -> list[str]:
    """The judges' accuracy on held-out real renders, clean and degraded, as recorded in their config.json."""
    accuracy = json.loads((judges / "config.json").read_text()).get("accuracy", {})
    lines = [
        "| renders of held-out identities | clean: exact identity % / attributes % / context % "
        "| degraded (blur 1 px + noise) |",
        "| --- | --- | --- |",
    ]

    def cell(values: dict) -> str:
        keys = ("identity", "attributes") if "identity" in values else ("context",)
        return " / ".join(_pct(values.get(key)) for key in keys)

    for name, values in accuracy.get("clean", {}).items():
        degraded = accuracy.get("degraded", {}).get(name)
        lines.append(f"| {name.replace('_', ' ')} | {cell(values)} | {cell(degraded) if degraded else '-'} |")
    return lines


def vae_ceiling(base: Path, judges_path: Path, count: int = 96, seed: int = 7) -> list[str]:
    """What the judges score on held-out renders, and on the same renders after the base model's VAE.

    Every generated image passes through the VAE decoder, so the second row is a ceiling for any adapter:
    an attribute the VAE cannot reproduce (e.g. a 3-pixel iris) cannot be judged right in generations.
    """
    import random

    import numpy as np
    import torch
    from diffusers import AutoencoderKL

    from nested.toyworld.judges import ToyJudges, identity_match
    from nested.toyworld.world import contexts, render, split_identities

    judges = ToyJudges.from_pretrained(judges_path)
    vae = AutoencoderKL.from_pretrained(base / "vae").eval()
    lines = [
        "| domain | images | identity exact % | attributes % | context % |",
        "| --- | --- | --- | --- | --- |",
    ]
    for domain in DOMAINS:
        rng = random.Random(f"{seed}-{domain}")
        held_out = split_identities(domain)[1]
        identities = [rng.choice(held_out) for _ in range(count)]
        chosen = [rng.choice(contexts()) for _ in range(count)]
        pixels = [
            np.array(render(i, c, seed=rng.randrange(2**31))) for i, c in zip(identities, chosen, strict=True)
        ]
        real = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 255
        with torch.no_grad():
            decoded = vae.decode(vae.encode(real * 2 - 1).latent_dist.mean).sample
        for name, images in (("real renders", real), ("through the VAE", decoded.add(1).div(2).clamp(0, 1))):
            matches = [
                identity_match(p, i.to_label())
                for p, i in zip(judges.identity(domain, images), identities, strict=True)
            ]
            found = judges.context(images)
            context = [
                f["scene"] == c.scene and f["style"] == c.style for f, c in zip(found, chosen, strict=True)
            ]
            lines.append(
                f"| {domain} | {name} | {_pct(sum(m[0] for m in matches) / count)} "
                f"| {_pct(sum(m[1] for m in matches) / count)} | {_pct(sum(context) / count)} |"
            )
    return lines


def words_table(runs: Path) -> list[str]:
    """Markdown rows of ``check_base.py``: the base model prompted with and without the identity in words.

    The "words" row is what the frozen base model can draw of a held-out identity when told it: the most an
    adapter, which only changes the subject token's value, can be expected to reach.
    """
    path = runs / "base-words.json"
    if not path.is_file():
        return []
    report = json.loads(path.read_text())
    lines = []
    for domain, kinds in report.items():
        columns = list(kinds["plain"])
        names = [c.removeprefix("attr_").replace("_", " ") for c in columns]
        lines += [
            f"| {domain} | " + " | ".join(names) + " |",
            "| --- |" + " --- |" * len(columns),
        ]
        labels = {
            "chance": "chance",
            "plain": "class word only (the base row)",
            "words": "identity in words",
            "class word": "class word's feature from the words",
            "class word value": "class word's value from the words",
        }
        for kind, label in labels.items():
            if kind not in kinds:  # a report from before the class-word row
                continue
            lines.append(f"| {label} | " + " | ".join(_pct(kinds[kind][c]) for c in columns) + " |")
        lines.append("")
    return lines[:-1]


def channel_table(runs: Path) -> list[str]:
    """Markdown rows of ``check_base.py``'s attention channel: each token group's share of the cross-attention
    in the subject's pixels (mean of the layers), with the identity in words and without."""
    path = runs / "base-words.json"
    if not path.is_file():
        return []
    report = json.loads(path.read_text())
    if not all("channel" in kinds for kinds in report.values()):
        return []
    groups = list(next(iter(report.values()))["channel"]["plain"]["mean"])
    lines = ["| domain | prompt | " + " | ".join(groups) + " |", "| --- | --- |" + " --- |" * len(groups)]
    labels = {"plain": "class word only", "words": "identity in words"}
    for domain, kinds in report.items():
        for kind, label in labels.items():
            mean = kinds["channel"][kind]["mean"]
            lines.append(f"| {domain} | {label} | " + " | ".join(_pct(mean[g]) for g in groups) + " |")
    return lines


def timings_table(runs: Path) -> list[str]:
    path = runs / "timings.tsv"
    if not path.is_file():
        return []
    rows = [line.split("\t") for line in path.read_text().splitlines() if line.strip()]
    total = sum(int(seconds) for _, seconds in rows)
    lines = ["| stage | wall-clock |", "| --- | --- |"]
    lines += [f"| {name} | {int(s) // 60} min {int(s) % 60:02d} s |" for name, s in rows]
    return [*lines, f"| total | {total // 60} min {total % 60:02d} s |"]


def plot(sweeps_by_domain: dict[str, dict[str, list[dict]]], path: Path) -> None:
    """One panel per domain: identity accuracy (y: attributes solid, exact dashed, the domain's main colour
    attribute dotted) vs context accuracy (x).

    Attribute accuracy is on the y axis as well as exact identity because it moves before exact identity
    does: a run that transfers skin and hair but not eye colour shows up here and not in the exact curve.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(sweeps_by_domain), figsize=(5.5 * len(sweeps_by_domain), 4.5))
    for axis, (domain, sweeps) in zip(axes, sweeps_by_domain.items(), strict=True):
        base = next(p for p in sweeps["nested"] if p["variant"] == "base")
        curves = [("identity_attributes", "-"), ("identity_exact", "--")]
        if MAIN_ATTRIBUTE[domain] in base:
            curves.append((MAIN_ATTRIBUTE[domain], ":"))
        for key, style in curves:
            name = key.removeprefix("identity_attr_").removeprefix("identity_").replace("_", " ")
            axis.scatter([base["context"]], [base[key]], color="black", marker="s", label=f"base ({name})")
            for method, colour in zip(METHODS, ("tab:blue", "tab:orange"), strict=True):
                points = [p for p in sweeps[method] if p["variant"] == "adapter"]
                xs, ys = [p["context"] for p in points], [p[key] for p in points]
                axis.plot(xs, ys, "o" + style, color=colour, label=f"{method} ({name})")
                if key == "identity_attributes":
                    for p in points:
                        axis.annotate(f"s={p['strength']:g}", (p["context"], p[key]), fontsize=7)
            axis.axhline(base["chance"][key], color="grey", linestyle=":", linewidth=1)
        axis.set_xlabel("context accuracy (scene + style)")
        axis.set_ylabel("identity accuracy (dotted: chance)")
        axis.set_title(f"{domain}: held-out identities")
        # Zoomed to the measured contexts: when every point keeps the scene, the differences are small.
        lowest = min(p["context"] for points in sweeps.values() for p in points)
        axis.set_xlim(max(0.0, lowest - 0.1), 1.01)
        axis.set_ylim(0, 1.02)
        # The points sit at the right edge (high context); the lower left is empty.
        axis.legend(loc="lower left", fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=Path, default=Path("runs/toyworld"), help="reproduce.sh's OUT")
    parser.add_argument("--judges", type=Path, default=Path("data/toyworld/judges"))
    parser.add_argument("--base", type=Path, default=Path("data/models/toy-sd"), help="the base model folder")
    parser.add_argument("--publish", action="store_true", help="update benchmarks/, docs/ and the README")
    args = parser.parse_args(argv)

    lines = ["### Held-out identities, one domain at a time", ""]
    sweeps_by_domain = {}
    for domain in DOMAINS:
        weighted = weighted_sweeps(domain, args.runs)
        rows, sweeps_by_domain[domain] = domain_table(domain, args.runs, weighted)
        lines += [*rows, ""]
        attributes = attribute_table(f"**{domain}**", sweeps_by_domain[domain], extra=weighted)
        lines += [*attributes, ""] if attributes else []
    lines += ["### Two subjects in one prompt (faces + pets adapters, each judged in its half)", ""]
    lines += [*pair_table(args.runs), ""]
    pair_sweeps = {m: _points(args.runs / f"eval-pairs-{m}" / "summary.json") for m in METHODS}
    for token, domain in (("person", "faces"), ("pet", "pets")):
        attributes = attribute_table(f"the {token} of each pair ({domain})", pair_sweeps, suffix=f"_{token}")
        lines += [*attributes, ""] if attributes else []
    lines += ["### The judges", "", *judges_table(args.judges), ""]
    lines += [
        "Held-out renders, judged as drawn and after an encode/decode by the base model's VAE (a ceiling for",
        "any adapter: every generated image is decoded by this VAE):",
        "",
        *vae_ceiling(args.base, args.judges),
        "",
    ]
    words = words_table(args.runs)
    if words:
        lines += [
            "### What the base model draws when the prompt names the identity",
            "",
            "Held-out identities, % right (`scripts/toyworld/check_base.py`). An adapter drives the frozen base",
            "model through one token's value, so the words row is about the most it can carry:",
            "",
            *words,
            "",
        ]
    channel = channel_table(args.runs)
    if channel:
        lines += [
            "Where the base model reads the subject from: each kind of text token's share of the cross-attention",
            "in the subject's pixels (% of the attention, mean of the seven layers, held-out renders at t = 500).",
            "Nested attention acts through the class word's column only:",
            "",
            *channel,
            "",
        ]
    timings = timings_table(args.runs)
    if timings:
        lines += ["### Wall-clock on this machine (2 CPU cores, shared)", "", *timings, ""]
    text = "\n".join(lines)
    (args.runs / "results.md").write_text(text + "\n")
    plot(sweeps_by_domain, args.runs / "tradeoff.png")
    print(text)
    if args.publish:
        header = Path("benchmarks/toyworld.header.md")
        intro = header.read_text() if header.is_file() else "# Toy world results\n\n"
        Path("benchmarks/toyworld.md").write_text(intro + text + "\n")
        shutil.copyfile(args.runs / "tradeoff.png", "docs/toyworld-tradeoff.png")
        readme = Path("README.md").read_text()
        if README_START in readme and README_END in readme:
            before, rest = readme.split(README_START, 1)
            after = rest.split(README_END, 1)[1]
            Path("README.md").write_text(f"{before}{README_START}\n{text}\n{README_END}{after}")
        else:
            print(f"results.py: README.md has no {README_START} block; not updated", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
