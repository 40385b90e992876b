#!/usr/bin/env python
"""Train the toy-world judges and write them to one folder with their accuracies.

Three small CNNs (``nested.judges``): an identity recognizer per domain (predicts every attribute of
the subject) and a context classifier (scene + style). Training images are renders of the *train*
identities only: single renders in every context (plain included, all styles, random nuisances)
and ``render_pair`` images, whose matching half trains the identity judges. Every batch is
degraded like a tiny latent-diffusion output (blur, noise, colour shifts, resolution / chroma
softening, slight resize / translation), because the judges score generated images, not renders.
Accuracy is measured on renders of the *held-out* identities (new seeds), clean and degraded, and
stored in ``config.json`` under ``"accuracy"``.

Rendering costs ~5 ms an image (~9 ms a pair), so a uint8 pool is rendered once by ``--threads``
processes and every image is reused under fresh random degradations. The judges then train in
parallel, one process and one torch thread each (small convolutions gain little from a second
thread, and independent processes stay deterministic). Identity judges need thousands of steps:
eye colour is a 2-3 pixel cue that "clicks" late (faces, photo style, exact identity: 68% after
1500 steps, 92% after 3000).

    python scripts/toyworld/train_judges.py --out data/toyworld/judges
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm import tqdm

from nested.toyworld.judges import (
    CONTEXT_CHANCE,
    CONTEXT_SCENES,
    JudgeNet,
    ToyJudges,
    build_net,
    chance_levels,
    default_config,
    prepare_context,
    prepare_identity,
)
from nested.toyworld.world import (
    DOMAINS,
    STYLES,
    Context,
    identity_class,
    render,
    render_pair,
    split_identities,
)

ALL_CONTEXTS = [Context(scene, style) for style in STYLES for scene in CONTEXT_SCENES]
HALF = {"faces": "left", "pets": "right"}  # render_pair layout
KINDS = ("faces", "pets", "pair")
EYE_WEIGHT = 2.0  # eye colour (a 2-3 pixel cue) is learnt last; weighting its loss speeds it up


# ----------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class Job:
    """One image to render: a single subject of ``kind`` "faces" / "pets", or a "pair"."""

    split: str  # "train" or "held_out": which identity lists ``face`` / ``pet`` index
    kind: str
    face: int  # -1 when unused
    pet: int
    context: Context
    seed: int


_WORKER_IDS: dict[tuple[str, str], list[Any]] = {}


def _init_worker(ids: dict[tuple[str, str], list[Any]]) -> None:
    _WORKER_IDS.clear()
    _WORKER_IDS.update(ids)


def _render_job(job: Job) -> np.ndarray:
    faces, pets = _WORKER_IDS[(job.split, "faces")], _WORKER_IDS[(job.split, "pets")]
    if job.kind == "pair":
        image = render_pair(faces[job.face], pets[job.pet], job.context, job.seed)
    else:
        ident = faces[job.face] if job.kind == "faces" else pets[job.pet]
        image = render(ident, job.context, seed=job.seed)
    return np.array(image, dtype=np.uint8)  # a writable copy (PIL arrays are read-only)


def make_jobs(split: str, ids: dict[str, list[Any]], kinds: Sequence[str], rng: random.Random) -> list[Job]:
    """Jobs of the given ``kinds`` (one per entry), identities and contexts drawn in balanced rounds.

    Each identity and each context comes up about equally often (shuffled rounds), so a small
    prefix of the list is already balanced.
    """
    rounds: dict[str, list[int]] = {}

    def draw(key: str, n: int) -> int:
        if not rounds.get(key):
            block = list(range(n))
            rng.shuffle(block)
            rounds[key] = block
        return rounds[key].pop()

    jobs = []
    for kind in kinds:
        face = draw("faces", len(ids["faces"])) if kind in ("faces", "pair") else -1
        pet = draw("pets", len(ids["pets"])) if kind in ("pets", "pair") else -1
        context = ALL_CONTEXTS[draw(f"context-{kind}", len(ALL_CONTEXTS))]
        jobs.append(Job(split, kind, face, pet, context, rng.getrandbits(31)))
    return jobs


@dataclass
class RenderPool:
    """Rendered images (uint8, (N, 3, 64, 64)) with their labels.

    ``labels[domain]``: attribute value indices of the image's subject of that domain (-1 when it
    has none); ``labels["context"]``: (scene, style) indices.
    """

    images: Tensor
    labels: dict[str, Tensor]
    kinds: list[str]
    index: dict[str, Tensor] = field(init=False)  # kind -> indices of its images

    def __post_init__(self) -> None:
        self.index = {
            kind: torch.tensor([i for i, k in enumerate(self.kinds) if k == kind]) for kind in KINDS
        }


def render_pool(
    jobs: Sequence[Job], ids: dict[tuple[str, str], list[Any]], workers: int, desc: str
) -> RenderPool:
    """Render ``jobs`` in order with ``workers`` processes (in-process for one)."""
    images = torch.empty((len(jobs), 3, 64, 64), dtype=torch.uint8)
    bar = tqdm(total=len(jobs), desc=desc, unit="img", file=sys.stderr, leave=False)
    if workers > 1:
        with _context().Pool(workers, _init_worker, (ids,)) as pool:
            for i, image in enumerate(pool.imap(_render_job, jobs, chunksize=16)):
                images[i] = torch.from_numpy(image).permute(2, 0, 1)
                bar.update()
    else:
        _init_worker(ids)
        for i, job in enumerate(jobs):
            images[i] = torch.from_numpy(_render_job(job)).permute(2, 0, 1)
            bar.update()
    bar.close()
    labels: dict[str, Tensor] = {}
    for domain in DOMAINS:
        width = len(identity_class(domain).ATTRIBUTES)
        rows = []
        for job in jobs:
            index = job.face if domain == "faces" else job.pet
            ident = ids[(job.split, domain)][index] if index >= 0 else None
            rows.append(list(ident.indices().values()) if ident is not None else [-1] * width)
        labels[domain] = torch.tensor(rows)
    labels["context"] = torch.tensor(
        [[CONTEXT_SCENES.index(j.context.scene), STYLES.index(j.context.style)] for j in jobs]
    )
    return RenderPool(images, labels, [job.kind for job in jobs])


def _context() -> Any:
    """Fork where available: workers inherit the pools and identity lists instead of pickling them."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


# ----------------------------------------------------------------------------- degradations


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def gaussian_blur(x: Tensor, sigma: Tensor, radius: int = 4) -> Tensor:
    """Blur each image with its own Gaussian ``sigma`` (pixels; 0 = unchanged), separably."""
    n, c, h, w = x.shape
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    s = sigma.clamp_min(1e-3).to(x.dtype)[:, None]
    k = torch.exp(-0.5 * (t[None] / s) ** 2)
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (n*c, taps)
    y = F.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="replicate")
    y = F.conv2d(y, k[:, None, None, :], groups=n * c)
    y = F.conv2d(y, k[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


def degrade(x: Tensor, g: torch.Generator, strength: float = 1.0) -> Tensor:
    """Random generator-like damage to full images in [0, 1]: colour shifts, softening, blur, noise.

    Colour jitter is small (a few percent): the judges tell ``hazel`` from ``dark`` eyes, washed-out
    sketch colours apart and a posterized painting from a photo by colour, so larger shifts teach
    them to ignore it. Softening halves the resolution (a crude stand-in for a 4x latent VAE's lost
    detail) or only the chroma (like JPEG); blur sigma is uniform in [0, 1.5] px (85% of images);
    the noise is Gaussian per pixel, std up to 0.06 (80% of images). ``strength`` scales it all.
    """
    n = x.shape[0]
    a = strength
    gain = 1 + a * (torch.rand(n, 3, generator=g) * 2 - 1) * 0.03
    offset = a * (torch.rand(n, 1, generator=g) * 2 - 1) * 0.03
    x = x * gain[:, :, None, None] + offset[:, :, None, None]
    contrast = 1 + a * (torch.rand(n, generator=g) * 2 - 1) * 0.08
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast[:, None, None, None] + mean
    saturation = 1 + a * (torch.rand(n, generator=g) * 2 - 1) * 0.1
    grey = x.mean(dim=1, keepdim=True)
    x = grey + (x - grey) * saturation[:, None, None, None]
    soft = torch.rand(n, generator=g)
    half = F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode="bilinear", align_corners=False)
    x = torch.where((soft < 0.25 * a)[:, None, None, None], half, x)
    chroma_only = ((soft >= 0.25 * a) & (soft < 0.45 * a))[:, None, None, None]
    x = torch.where(chroma_only, x.mean(dim=1, keepdim=True) + (half - half.mean(dim=1, keepdim=True)), x)
    sigma = _uniform(n, 0.0, 1.5 * a, g) * (torch.rand(n, generator=g) < 0.85).float()
    x = gaussian_blur(x, sigma)
    noise = _uniform(n, 0.0, 0.06 * a, g) * (torch.rand(n, generator=g) < 0.8).float()
    x = x + noise[:, None, None, None] * torch.randn(x.shape, generator=g)
    return x.clamp(0.0, 1.0)


def eval_degrade(x: Tensor, g: torch.Generator, sigma: float = 1.0, noise: float = 0.03) -> Tensor:
    """The fixed damage of the "degraded" evaluation: Gaussian blur ``sigma`` px, noise std ``noise``."""
    x = gaussian_blur(x, torch.full((x.shape[0],), sigma))
    return (x + noise * torch.randn(x.shape, generator=g)).clamp(0.0, 1.0)


def jitter_geometry(
    x: Tensor, g: torch.Generator, scale: float = 0.06, shift: float = 0.04, degrees: float = 4.0
) -> Tensor:
    """Random resize (+-``scale``), translation (+-``shift`` of the side), rotation and h-flip.

    Slight on purpose: the renders already vary position, size and angle (the nuisance), so this
    only covers generated subjects a little off the render distribution; stronger geometric
    jitter markedly slowed the learning of the 2-3 pixel eye colour.
    """
    n = x.shape[0]
    s = torch.exp(_uniform(n, math.log(1 - scale), math.log(1 + scale), g))
    angle = _uniform(n, -degrees, degrees, g) * math.pi / 180
    flip = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    tx, ty = _uniform(n, -2 * shift, 2 * shift, g), _uniform(n, -2 * shift, 2 * shift, g)
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    theta = torch.stack([torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# ----------------------------------------------------------------------------- batches


def _pick(candidates: Tensor, k: int, g: torch.Generator) -> Tensor:
    return candidates[torch.randint(0, len(candidates), (k,), generator=g)]


def identity_batch(
    pool: RenderPool, domain: str, size: int, g: torch.Generator, input_size: int, strength: float
) -> tuple[Tensor, Tensor]:
    """Half singles, half pair halves of ``domain``: degraded whole, then cropped as the judge crops."""
    i = _pick(pool.index[domain], size // 2, g)
    j = _pick(pool.index["pair"], size - size // 2, g)
    singles = prepare_identity(degrade(pool.images[i].float() / 255, g, strength), None, input_size)
    halves = prepare_identity(degrade(pool.images[j].float() / 255, g, strength), HALF[domain], input_size)
    x = jitter_geometry(torch.cat([singles, halves]), g)
    return x, torch.cat([pool.labels[domain][i], pool.labels[domain][j]])


def context_batch(
    pool: RenderPool, size: int, g: torch.Generator, input_size: int, strength: float
) -> tuple[Tensor, Tensor]:
    """Singles of both domains and pairs, a third each, degraded at full size then resized."""
    parts = [
        _pick(pool.index[kind], k, g)
        for kind, k in zip(KINDS, (size // 3, size // 3, size - 2 * (size // 3)), strict=True)
    ]
    i = torch.cat(parts)
    x = prepare_context(degrade(pool.images[i].float() / 255, g, strength), input_size)
    return jitter_geometry(x, g), pool.labels["context"][i]


# ----------------------------------------------------------------------------- training


def train_net(
    net: JudgeNet,
    make_batch: Callable[[torch.Generator, float], tuple[Tensor, Tensor]],
    steps: int,
    lr: float,
    g: torch.Generator,
    desc: str,
    weights: Sequence[float],
    ramp: float = 0.4,
    position: int = 0,
) -> list[float]:
    """AdamW, linear warm-up then cosine decay; weighted sum of the heads' cross-entropies.

    The degradation strength ramps up linearly over the first ``ramp`` of the steps: features are
    learnt much faster on clean images and then made robust (full strength from the start cost
    several points of eye-colour accuracy at the same budget).
    """
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    net.to(memory_format=torch.channels_last).train()  # ~2x faster convolutions on CPU
    losses: list[float] = []
    bar = tqdm(range(steps), desc=desc, unit="step", file=sys.stderr, leave=False, position=position)
    for step in bar:
        x, y = make_batch(g, min(1.0, step / max(1.0, ramp * steps)))
        heads = net(x.contiguous(memory_format=torch.channels_last))
        loss = sum(
            w * F.cross_entropy(z, y[:, h], label_smoothing=0.05)
            for h, (w, z) in enumerate(zip(weights, heads, strict=True))
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 25 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-25:]):.3f}")
    bar.close()
    net.to(memory_format=torch.contiguous_format).eval()
    return losses


# ----------------------------------------------------------------------------- evaluation


def _decode(indices: Tensor, heads: dict[str, list[Any]]) -> list[dict[str, Any]]:
    return [{k: v[int(row[h])] for h, (k, v) in enumerate(heads.items())} for row in indices]


def identity_accuracy(pred: list[dict[str, str]], truth: list[dict[str, str]]) -> dict[str, float]:
    """Per-attribute, mean-attribute and exact-identity accuracy."""
    pairs = list(zip(pred, truth, strict=True))
    out = {name: float(np.mean([p[name] == t[name] for p, t in pairs])) for name in truth[0]}
    out["attributes"] = float(np.mean(list(out.values())))
    out["identity"] = float(np.mean([p == t for p, t in pairs]))
    return out


def context_accuracy(pred: list[dict[str, Any]], truth: list[dict[str, Any]]) -> dict[str, float]:
    """Scene, style and scene+style accuracy over the captioned contexts (plain excluded)."""
    pairs = [(p, t) for p, t in zip(pred, truth, strict=True) if t["scene"] != "plain"]
    return {
        "scene": float(np.mean([p["scene"] == t["scene"] for p, t in pairs])),
        "style": float(np.mean([p["style"] == t["style"] for p, t in pairs])),
        "context": float(np.mean([p == t for p, t in pairs])),
    }


STYLE_NAMES = {None: "photo", "sketch": "sketch", "painting": "painting"}  # style None is "a photo of"


def _by_style(pred: list[dict], truth: list[dict], styles: list[int]) -> dict[str, dict[str, float]]:
    out = {}
    for k, style in enumerate(STYLES):
        keep = [i for i, s in enumerate(styles) if s == k]
        if keep:
            out[STYLE_NAMES[style]] = identity_accuracy([pred[i] for i in keep], [truth[i] for i in keep])
    return out


def evaluate(judges: ToyJudges, pool: RenderPool, seed: int) -> dict[str, Any]:
    """Held-out accuracy on clean renders and degraded copies; clean identity accuracy per style too.

    Per style matters: sketches wash colours out to 30% and draw black edges over the eyes, so
    their colour attributes (eye colour above all) are much harder than in photos and paintings.
    """
    heads = {name: spec["heads"] for name, spec in judges.config["judges"].items()}
    g = torch.Generator().manual_seed(seed + 999)
    views = {"clean": lambda x: x.float() / 255, "degraded": lambda x: eval_degrade(x.float() / 255, g)}
    result: dict[str, Any] = {"clean": {}, "degraded": {}, "clean_by_style": {}}
    for view, make in views.items():
        acc = result[view]
        pair_i = pool.index["pair"]
        pairs = make(pool.images[pair_i])
        for domain in DOMAINS:
            for kind, i, half in (("single", pool.index[domain], None), ("pair", pair_i, HALF[domain])):
                images = pairs if kind == "pair" else make(pool.images[i])
                truth = _decode(pool.labels[domain][i], heads[domain])
                pred = judges.identity(domain, images, half=half)
                acc[f"{domain}_{kind}"] = identity_accuracy(pred, truth)
                if view == "clean":
                    styles = pool.labels["context"][i, 1].tolist()
                    result["clean_by_style"][f"{domain}_{kind}"] = _by_style(pred, truth, styles)
                if kind == "single":
                    contexts = _decode(pool.labels["context"][i], heads["context"])
                    acc[f"context_{domain}_single"] = context_accuracy(judges.context(images), contexts)
        contexts = _decode(pool.labels["context"][pair_i], heads["context"])
        acc["context_pair"] = context_accuracy(judges.context(pairs), contexts)
    return result


def format_table(accuracy: dict[str, Any]) -> str:
    """Plain-text tables: clean and degraded side by side, then clean identity accuracy per style."""
    lines = [f"{'held-out accuracy':<34}{'clean':>9}{'degraded':>10}"]
    for key, clean in accuracy["clean"].items():
        for name, value in clean.items():
            lines.append(f"{key + ' ' + name:<34}{value:>9.1%}{accuracy['degraded'][key][name]:>10.1%}")
    styles = list(STYLE_NAMES.values())
    lines += ["", f"{'clean, by style':<34}" + "".join(f"{s:>9}" for s in styles)]
    for key, by_style in accuracy["clean_by_style"].items():
        for name in next(iter(by_style.values())):
            cells = "".join(f"{by_style[s][name]:>9.1%}" if s in by_style else f"{'-':>9}" for s in styles)
            lines.append(f"{key + ' ' + name:<34}{cells}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output folder (replaced atomically)")
    p.add_argument("--steps", type=int, default=3000, help="training steps of each identity judge")
    p.add_argument("--context-steps", type=int, default=300, help="training steps of the context judge")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="processes that render, then train (1 thread each)")
    p.add_argument(
        "--pool", type=int, default=4000, help="training renders of each kind (faces, pets, pairs)"
    )
    p.add_argument("--eval", type=int, default=540, help="held-out renders of each kind")
    return p.parse_args(argv)


_TRAINING: dict[str, Any] = {}  # what forked training workers need: pool, args, config, folder


def _train_judge(task: tuple[int, str]) -> tuple[str, float, float]:
    """Train judge ``name`` (index ``k``) on the shared pool; weights go to a safetensors file.

    Runs in a worker process (or in-process for ``--threads 1``), always on one torch thread, so
    the result depends on the seed only. Returns (name, final loss, seconds).
    """
    k, name = task
    pool, args, config, folder = (_TRAINING[key] for key in ("pool", "args", "config", "folder"))
    start = time.perf_counter()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed * 1000 + k)
    g = torch.Generator().manual_seed(args.seed * 1000 + k)
    spec = config["judges"][name]
    net = build_net(spec)
    size = spec["input"]
    if spec["kind"] == "identity":

        def batch(gen: torch.Generator, strength: float) -> tuple[Tensor, Tensor]:
            return identity_batch(pool, name, args.batch, gen, size, strength)

        weights = [EYE_WEIGHT if head == "eye_colour" else 1.0 for head in spec["heads"]]
        steps = args.steps
    else:

        def batch(gen: torch.Generator, strength: float) -> tuple[Tensor, Tensor]:
            return context_batch(pool, args.batch, gen, size, strength)

        weights, steps = [1.0] * len(spec["heads"]), args.context_steps
    losses = train_net(net, batch, steps, args.lr, g, f"train {name}", weights, position=k)
    save_file(
        {key: value.contiguous() for key, value in net.state_dict().items()},
        str(folder / f"{name}.safetensors"),
    )
    return name, float(np.mean(losses[-50:])), time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    start = time.perf_counter()
    torch.set_num_threads(1)  # also before forking: no OpenMP pool is inherited by the workers
    splits = {domain: split_identities(domain) for domain in DOMAINS}
    ids = {(split, d): splits[d][k] for d in DOMAINS for k, split in enumerate(("train", "held_out"))}
    kinds = [kind for _ in range(args.pool) for kind in KINDS]
    train_ids = {d: ids[("train", d)] for d in DOMAINS}
    jobs = make_jobs("train", train_ids, kinds, random.Random(f"judges-train-{args.seed}"))
    held_ids = {d: ids[("held_out", d)] for d in DOMAINS}
    eval_kinds = [kind for _ in range(args.eval) for kind in KINDS]
    eval_jobs = make_jobs("held_out", held_ids, eval_kinds, random.Random(f"judges-eval-{args.seed}"))
    train_pool = render_pool(jobs, ids, args.threads, "render train pool")
    eval_pool = render_pool(eval_jobs, ids, args.threads, "render held-out")
    render_seconds = time.perf_counter() - start

    t = time.perf_counter()
    config = default_config()
    names = list(config["judges"])  # faces, pets, context: the two long jobs first
    with tempfile.TemporaryDirectory() as tmp:
        _TRAINING.update(pool=train_pool, args=args, config=config, folder=Path(tmp))
        try:
            if args.threads > 1:
                with _context().Pool(min(args.threads, len(names))) as workers:
                    results = workers.map(_train_judge, list(enumerate(names)), chunksize=1)
            else:
                results = [_train_judge(task) for task in enumerate(names)]
        finally:
            _TRAINING.clear()
        nets = {}
        for name in names:
            nets[name] = build_net(config["judges"][name])
            nets[name].load_state_dict(load_file(str(Path(tmp) / f"{name}.safetensors")))
    train_seconds = time.perf_counter() - t

    judges = ToyJudges(config, nets).round_weights_()
    t = time.perf_counter()
    accuracy = evaluate(judges, eval_pool, args.seed)
    eval_seconds = time.perf_counter() - t
    config["training"] = {
        "script": "scripts/toyworld/train_judges.py", "seed": args.seed, "processes": args.threads,
        "torch_threads": 1, "identity_steps": args.steps, "context_steps": args.context_steps,
        "batch": args.batch, "lr": args.lr, "optimizer": "AdamW, 5% warm-up, cosine decay",
        "eye_colour_loss_weight": EYE_WEIGHT, "renders_per_kind": args.pool,
        "identities": "split_identities(domain)[0] (train split)",
        "final_loss": {name: loss for name, loss, _ in results},
        "seconds": {name: round(sec, 1) for name, _, sec in results},
        "augmentation": "colour gain/offset/contrast/saturation (a few %), half-res or chroma softening, "
        "Gaussian blur sigma 0-1.5 px, Gaussian noise std 0-0.06, resize +-6%, shift +-4%, rotation "
        "+-4 deg, h-flip; strength ramped up over the first 40% of the steps",
    }  # fmt: skip
    config["evaluation"] = {
        "identities": "split_identities(domain)[1] (held out)", "renders_per_kind": args.eval,
        "contexts": "all scenes incl. plain x all styles, balanced; context accuracy over the captioned ones",
        "degraded": "Gaussian blur sigma 1 px + Gaussian noise std 0.03",
        "clean_by_style": "style None is reported as photo",
    }  # fmt: skip
    config["accuracy"] = accuracy
    config["chance"] = {**{d: chance_levels(d) for d in DOMAINS}, "context": CONTEXT_CHANCE}
    judges.config = config
    judges.save_pretrained(args.out)
    total = time.perf_counter() - start
    print(format_table(accuracy))
    print(
        f"wall-clock {total:.0f} s (render {render_seconds:.0f} s, train {train_seconds:.0f} s, "
        f"evaluate {eval_seconds:.0f} s) -> {args.out}"
    )
    return config


if __name__ == "__main__":
    main()
