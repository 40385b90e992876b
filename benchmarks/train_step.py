"""Training-step cost with and without gradient checkpointing, and the real SDXL parameter budget.

(a) A tiny SDXL-like pipeline (``nested.testing.write_tiny_pipeline(tmp, "sdxl")``) trained at
``--resolution`` px (256: 64 x 64 latents with its 4x VAE, so activations dominate its memory):
one ``NestedAttentionModule`` is built once, and its training step (``diffusion_loss`` + backward
+ AdamW step) runs alternately with ``backbone.unet.enable_gradient_checkpointing()`` and
``disable_gradient_checkpointing()``, in A/B rounds (order reversed every other round); the
reported ratio is the median of per-round time ratios. Peak memory is measured per variant in a
fresh subprocess (glibc's mmap threshold fixed at 128 KiB so that freed tensors leave the RSS;
CPU tensors have no allocator counter), over a few steps after a warm-up step, relative to the RSS
just before them, two ways: the peak of the *anonymous* RSS (``/proc/self/statm`` resident -
shared, sampled every 0.5 ms by a thread; this is the tensors' memory, and the number to use), and
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` with the high-water mark reset via
``/proc/self/clear_refs``. The latter also counts file-backed pages (library code faulted in),
whose amount follows the page cache: measured from a parent that had itself just run a training
step it read ~100 MiB more in both variants, while the anonymous peak did not move.

Before timing, the script checks the current ``diffusion_loss`` under checkpointing. It unbinds
the subjects (``adapter.clear_subjects()``) in a ``finally`` before returning the loss, but
checkpointing re-runs each UNet block's forward during ``backward()``, which then runs without the
nested attention: torch raises ``CheckpointError`` (a different number of tensors saved). The
timed step therefore keeps the subjects bound until after ``backward()`` (the fix proposed for
``src/nested/module.py``), and the check also confirms that the fixed step gives the same loss and
gradients with and without checkpointing.

(b) Parameter counts of the real SDXL configuration built on the meta device (no download, no
memory): the UNet, both text encoders, the VAE, the
ViT-H/14 image backbone, and the trainable part, ``Resampler(1280, num_tokens=1024, width=1024,
depth=4, heads=16, output_dim=1024)`` + one ``NestedLayer(1024, inner_dim, heads)`` per
cross-attention layer of ``unet_fingerprint(unet)``; with bytes for trainable fp32 weights,
gradients and AdamW state against the frozen bf16 weights, and the expected checkpoint size.

    python benchmarks/train_step.py                       # both parts, ~1-2 min
    python benchmarks/train_step.py --part params         # (b) only, seconds
    python benchmarks/train_step.py --resolution 512 --batch-size 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nested.testing import (
    SDXL_TEXT_ENCODER_2_CONFIG,
    SDXL_TEXT_ENCODER_CONFIG,
    SDXL_UNET_CONFIG,
    SDXL_VAE_CONFIG,
    VIT_H_14_CONFIG,
)

SDXL_UNET = SDXL_UNET_CONFIG
CLIP_L_TEXT: dict[str, Any] = {"vocab_size": 49408, **SDXL_TEXT_ENCODER_CONFIG}
BIGG_TEXT: dict[str, Any] = {"vocab_size": 49408, **SDXL_TEXT_ENCODER_2_CONFIG}
VAE = SDXL_VAE_CONFIG
VIT_H = VIT_H_14_CONFIG
RESAMPLER = {"num_tokens": 1024, "width": 1024, "depth": 4, "heads": 16, "output_dim": 1024}
MB = 1024**2
GIB = 1024**3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "(a) tiny-SDXL training step with vs without gradient checkpointing (time A/B, peak RSS per "
            "variant in a subprocess); (b) trainable vs frozen parameters of the real SDXL setup (meta device)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--part", choices=["all", "step", "params"], default="all")
    parser.add_argument(
        "--resolution", type=int, default=256, help="training resolution of the tiny SDXL (px)."
    )
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=16, help="M of the tiny adapter's resampler.")
    parser.add_argument(
        "--encode-pixels",
        action="store_true",
        help="encode the pixels with the VAE in every step instead of using cached latents (the tiny "
        "VAE's no-grad mid-block attention over (R/4)^2 positions then sets the memory peak).",
    )
    parser.add_argument("--pairs", type=int, default=5, help="timed A/B rounds.")
    parser.add_argument("--steps", type=int, default=3, help="training steps per variant per round.")
    parser.add_argument("--memory-steps", type=int, default=3, help="steps per memory subprocess.")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: steadier A/B ratios on a shared machine)."
    )
    parser.add_argument("--json", default=None, help="also write the results to this JSON file.")
    # Internal: the memory-measuring subprocess.
    parser.add_argument("--memory-child", choices=["plain", "checkpointing"], help=argparse.SUPPRESS)
    parser.add_argument("--pipeline", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- (a) the training step
def build_module(pipeline: Path, tokens: int):
    from nested.encoder import EncoderSpec
    from nested.training.module import NestedAttentionModule

    spec = EncoderSpec(
        backbone=str(pipeline / "image_encoder"), num_tokens=tokens, width=32, depth=1, heads=2
    )
    module = NestedAttentionModule(str(pipeline), spec, subjects={"<person>": "person"})
    module.configure_model()
    return module


def make_batch(resolution: int, batch_size: int, latent_side: int | None = None) -> dict[str, Any]:
    """A training batch as ``collate_batch`` makes it (random pixels; every caption has the token).

    With ``latent_side`` it also carries cached ``latents`` (as shards built with
    ``--cache-latents`` give), so the step skips the VAE encoder.
    """
    from nested.data import SKIP_KEYS

    generator = torch.Generator().manual_seed(0)
    batch = {
        "pixel_values": torch.rand(batch_size, 3, resolution, resolution, generator=generator) * 2 - 1,
        "reference": torch.rand(batch_size, 3, 224, 224, generator=generator),
        "captions": ["a photo of <person> walking on the beach, high quality"] * batch_size,
        "subjects": ["<person>"] * batch_size,
        "domains": ["faces"] * batch_size,
        "keys": [f"k{i}" for i in range(batch_size)],
        "original_sizes": torch.tensor([[resolution, resolution]] * batch_size),
        "crops_top_left": torch.zeros(batch_size, 2, dtype=torch.long),
        "skipped": {k: torch.tensor(0) for k in SKIP_KEYS},
    }
    if latent_side is not None:
        batch["latents"] = torch.randn(batch_size, 4, latent_side, latent_side, generator=generator)
    return batch


@contextlib.contextmanager
def subjects_kept_bound(adapter: nn.Module) -> Iterator[None]:
    """The proposed fix, applied from outside: ``diffusion_loss``'s ``clear_subjects()`` is deferred
    until the caller has run ``backward()`` (in src: ``on_after_backward``)."""
    adapter.clear_subjects = lambda: None  # an instance attribute shadows the method
    try:
        yield
    finally:
        del adapter.clear_subjects


def train_step(module, optimizer, batch: dict[str, Any], *, fixed: bool = True) -> float:
    """diffusion_loss + backward + AdamW step; with ``fixed``, the subjects stay bound for backward."""
    adapter = module.adapter
    with subjects_kept_bound(adapter) if fixed else contextlib.nullcontext():
        loss = module.diffusion_loss(batch, module._generator())["loss"]
    try:
        loss.backward()
    finally:
        adapter.clear_subjects()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def set_checkpointing(module, enabled: bool) -> None:
    unet = module.backbone.unet
    (unet.enable_gradient_checkpointing if enabled else unet.disable_gradient_checkpointing)()
    if unet.is_gradient_checkpointing != enabled:
        raise RuntimeError("gradient checkpointing did not switch")


def gradients(module, batch: dict[str, Any], *, checkpointing: bool, fixed: bool) -> tuple[float, dict]:
    set_checkpointing(module, checkpointing)
    module.zero_grad(set_to_none=True)
    adapter = module.adapter
    with subjects_kept_bound(adapter) if fixed else contextlib.nullcontext():
        loss = module.diffusion_loss(batch, module._generator())["loss"]
    try:
        loss.backward()
    finally:
        adapter.clear_subjects()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    return loss.item(), grads


def check_checkpointing(module, batch: dict[str, Any]) -> dict[str, Any]:
    """Does the current diffusion_loss survive checkpointing, and does the fix give the same gradients?"""
    result: dict[str, Any] = {}
    try:
        gradients(module, batch, checkpointing=True, fixed=False)
        result["current"] = "ok"
    except torch.utils.checkpoint.CheckpointError as error:
        result["current"] = f"CheckpointError: {str(error).splitlines()[1:3]}"
    except RuntimeError as error:  # other recomputation failures
        result["current"] = f"{type(error).__name__}: {str(error).splitlines()[0]}"
    loss_plain, plain = gradients(module, batch, checkpointing=False, fixed=True)
    loss_ckpt, ckpt = gradients(module, batch, checkpointing=True, fixed=True)
    if plain.keys() != ckpt.keys() or not plain:
        raise RuntimeError("checkpointing changed which parameters get gradients")
    worst = max(
        (plain[n] - ckpt[n]).abs().max().item() / max(plain[n].abs().max().item(), 1e-30) for n in plain
    )
    result.update(loss_plain=loss_plain, loss_checkpointing=loss_ckpt, max_rel_grad_diff=worst)
    print(f"current diffusion_loss with gradient checkpointing: {result['current']}")
    print(
        f"fixed step: loss {loss_plain:.6f} (plain) vs {loss_ckpt:.6f} (checkpointing); gradients of "
        f"{len(plain)} trainable tensors agree to max relative difference {worst:.1e}"
    )
    set_checkpointing(module, False)
    return result


def rss_now() -> int:
    """Current resident set size in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def latent_side(module, args: argparse.Namespace) -> int | None:
    return None if args.encode_pixels else args.resolution // module.backbone.vae_scale_factor


def reset_peak_rss() -> None:
    """Reset the kernel's resident high-water mark (VmHWM, and with it ru_maxrss) to the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class AnonPeak:
    """Samples the anonymous RSS (``/proc/self/statm`` resident - shared) every 0.5 ms in a thread.

    Tensors are anonymous memory; the kernel's high-water mark also counts file-backed pages
    (library code, mmapped weights), which can move with the page cache, not with the model."""

    def __init__(self) -> None:
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def now() -> int:
        with open("/proc/self/statm") as f:
            fields = f.read().split()
        return (int(fields[1]) - int(fields[2])) * resource.getpagesize()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(0.0005)

    def __enter__(self) -> AnonPeak:
        self.peak = self.now()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def memory_child(args: argparse.Namespace) -> None:
    """Subprocess: peak RSS above the RSS just before ``--memory-steps`` steps of one variant."""
    module = build_module(Path(args.pipeline), args.tokens)
    set_checkpointing(module, args.memory_child == "checkpointing")
    optimizer = module.configure_optimizers()
    batch = make_batch(args.resolution, args.batch_size, latent_side(module, args))
    train_step(module, optimizer, batch)  # warm-up: AdamW state, lazy initialisations
    reset_peak_rss()
    before, anon_before = rss_now(), AnonPeak.now()
    with AnonPeak() as anon:
        for _ in range(args.memory_steps):
            train_step(module, optimizer, batch)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({"before": before, "peak": peak, "anon_before": anon_before, "anon_peak": anon.peak}))


def measure_memory(args: argparse.Namespace, pipeline: Path, variant: str) -> dict[str, Any]:
    command = [sys.executable, __file__, "--memory-child", variant, "--pipeline", str(pipeline)]
    command += ["--resolution", str(args.resolution), "--batch-size", str(args.batch_size)]
    command += ["--tokens", str(args.tokens), "--memory-steps", str(args.memory_steps)]
    command += ["--threads", str(args.threads)] + (["--encode-pixels"] if args.encode_pixels else [])
    # A fixed glibc mmap threshold: every block >= 128 KiB is returned to the OS when freed, so the
    # RSS follows the live tensors instead of malloc's cached heap.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"memory subprocess ({variant}) failed:\n{done.stderr[-3000:]}")
    data = json.loads(done.stdout.strip().splitlines()[-1])
    data["growth"] = data["peak"] - data["before"]
    data["anon_growth"] = data["anon_peak"] - data["anon_before"]
    return data


def bench_step(args: argparse.Namespace) -> dict[str, Any]:
    from nested.testing import write_tiny_pipeline

    with tempfile.TemporaryDirectory(prefix="nested-train-step-") as tmp:
        pipeline = write_tiny_pipeline(Path(tmp) / "tiny-sdxl", "sdxl")
        # Memory first, in fresh subprocesses, before this process has run any step.
        memory = {name: measure_memory(args, pipeline, name) for name in ("plain", "checkpointing")}
        module = build_module(pipeline, args.tokens)
        batch = make_batch(args.resolution, args.batch_size, latent_side(module, args))
        unet = module.backbone.unet
        latent = args.resolution // module.backbone.vae_scale_factor
        print(
            f"\n(a) tiny SDXL: UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M params, "
            f"{len(module.adapter.layers)} nested layers, {args.resolution} px -> {latent} x {latent} latents "
            f"({'VAE-encoded every step' if args.encode_pixels else 'cached'}), batch {args.batch_size}, "
            f"M={args.tokens}, torch threads {torch.get_num_threads()}"
        )
        check = check_checkpointing(module, batch)

        optimizer = module.configure_optimizers()
        variants = {"plain": False, "checkpointing": True}
        for enabled in variants.values():  # warm-up
            set_checkpointing(module, enabled)
            train_step(module, optimizer, batch)
        times: dict[str, list[float]] = {name: [] for name in variants}
        for round_index in range(args.pairs):
            order = list(variants.items())
            for name, enabled in order if round_index % 2 == 0 else order[::-1]:
                set_checkpointing(module, enabled)
                start = time.perf_counter()
                for _ in range(args.steps):
                    train_step(module, optimizer, batch)
                times[name].append((time.perf_counter() - start) / args.steps)
        set_checkpointing(module, False)
        ratios = [c / p for c, p in zip(times["checkpointing"], times["plain"], strict=True)]

    header = (
        f"{'variant':<14} | {'step (s)':>8} | {'x plain':>17} | {'peak anon growth':>16} | {'x plain':>7} | "
        f"{'ru_maxrss growth':>16}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for name in variants:
        ratio = statistics.median(ratios) if name == "checkpointing" else 1.0
        spread = f"[{min(ratios):.2f}-{max(ratios):.2f}]" if name == "checkpointing" else ""
        anon = memory[name]["anon_growth"]
        print(
            f"{name:<14} | {statistics.median(times[name]):>8.3f} | {ratio:>5.2f} {spread:>11} | "
            f"{anon / MB:>12.1f} MiB | {anon / memory['plain']['anon_growth']:>7.2f} | "
            f"{memory[name]['growth'] / MB:>12.1f} MiB"
        )
    print(
        f"\ntime: median over {args.pairs} alternating rounds of {args.steps} steps (diffusion_loss + backward + "
        "AdamW); 'x plain' = median of per-round ratios [min-max]. Memory: one fresh subprocess per variant "
        f"(MALLOC_MMAP_THRESHOLD_=131072, so freed tensors leave the RSS), after one warm-up step, over "
        f"{args.memory_steps} steps, relative to just before them: 'peak anon growth' = peak of the anonymous "
        "RSS (/proc/self/statm resident - shared, sampled every 0.5 ms: activations + gradients); "
        "'ru_maxrss growth' = resource.getrusage(RUSAGE_SELF).ru_maxrss (high-water mark reset via "
        "/proc/self/clear_refs) minus the RSS before: it also counts file-backed pages (library code), "
        "which follow the machine's page cache rather than the model."
    )
    return {"check": check, "times": times, "ratios": ratios, "memory": memory}


# --------------------------------------------------------------------------- (b) the real budget
def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_real_sdxl_on_meta() -> dict[str, Any]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    from nested.adapter import NestedLayer, unet_fingerprint
    from nested.encoder import Resampler

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
        text = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT))
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**BIGG_TEXT))
        vae = AutoencoderKL(**VAE)
        vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**VIT_H))
        resampler = Resampler(VIT_H["hidden_size"], **RESAMPLER)
        layers = unet_fingerprint(unet)
        nested = nn.ModuleList(
            [NestedLayer(RESAMPLER["output_dim"], d["inner_dim"], d["heads"]) for d in layers.values()]
        )
    inner = sorted({d["inner_dim"] for d in layers.values()})
    per_inner = {i: sum(d["inner_dim"] == i for d in layers.values()) for i in inner}
    return {
        "frozen": {
            "UNet (SDXL base)": count(unet),
            "text encoder 1 (CLIP ViT-L/14 text)": count(text),
            "text encoder 2 (OpenCLIP bigG text + proj)": count(text_2),
            "VAE": count(vae),
            "image backbone (ViT-H/14 vision + proj)": count(vision),
        },
        "trainable": {
            "Resampler (1280 -> 1024 x 1024, depth 4)": count(resampler),
            f"{len(layers)} NestedLayers ({', '.join(f'{n}x{i}' for i, n in per_inner.items())} inner)": count(
                nested
            ),
        },
        "layers": len(layers),
        "placeholder_embeddings": CLIP_L_TEXT["hidden_size"] + BIGG_TEXT["hidden_size"],
    }


def bench_params() -> dict[str, Any]:
    start = time.perf_counter()
    counts = build_real_sdxl_on_meta()
    frozen, trainable = counts["frozen"], counts["trainable"]
    n_frozen, n_trainable = sum(frozen.values()), sum(trainable.values())
    print(
        f"\n(b) real SDXL + nested adapter, built on the meta device in {time.perf_counter() - start:.1f} s"
    )
    header = (
        f"{'component':<52} | {'params (M)':>10} | {'weights':>15} | {'+ grads':>8} | "
        f"{'+ AdamW m, v':>12} | {'total':>9}"
    )
    print(header + "\n" + "-" * len(header))

    def row(name: str, n: int, trainable_row: bool) -> None:
        if trainable_row:
            weights = f"{n * 4 / GIB:>6.2f} GiB fp32"
            extra = f"{n * 4 / GIB:>4.2f} GiB | {n * 8 / GIB:>8.2f} GiB | {n * 16 / GIB:>5.2f} GiB"
        else:
            weights = f"{n * 2 / GIB:>6.2f} GiB bf16"
            extra = f"{'-':>8} | {'-':>12} | {n * 2 / GIB:>5.2f} GiB"
        print(f"{name:<52} | {n / 1e6:>10.1f} | {weights:>15} | {extra}")

    for name, n in frozen.items():
        row(f"frozen: {name}", n, False)
    row("frozen total", n_frozen, False)
    print("-" * len(header))
    for name, n in trainable.items():
        row(f"trainable: {name}", n, True)
    row("trainable total", n_trainable, True)
    print("-" * len(header))
    checkpoint = n_trainable * 12
    print(
        f"trainable share: {n_trainable / (n_trainable + n_frozen):.1%} of {(n_trainable + n_frozen) / 1e9:.2f} B "
        f"parameters ({counts['layers']} cross-attention layers). Training memory before activations: "
        f"{n_frozen * 2 / GIB:.2f} GiB frozen bf16 + {n_trainable * 16 / GIB:.2f} GiB trainable "
        f"(fp32 weights + grads + AdamW m, v) = {(n_frozen * 2 + n_trainable * 16) / GIB:.2f} GiB."
    )
    print(
        f"expected checkpoint: trainable fp32 weights + 2 x AdamW state = {n_trainable} x 12 B = "
        f"{checkpoint / GIB:.2f} GiB ({checkpoint / 1e9:.2f} GB decimal); plus the {counts['placeholder_embeddings']} "
        "placeholder-token embedding values (stored, not trained) and scalars. The exported adapter "
        f"(fp32 weights only) is {n_trainable * 4 / GIB:.2f} GiB, {n_trainable * 2 / GIB:.2f} GiB in fp16/bf16."
    )
    return {
        "frozen": frozen,
        "trainable": trainable,
        "checkpoint_bytes": checkpoint,
        "layers": counts["layers"],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args)
        return {}
    output: dict[str, Any] = {"args": vars(args)}
    if args.part in ("all", "params"):
        output["params"] = bench_params()
    if args.part in ("all", "step"):
        output["step"] = bench_step(args)
    if args.json:
        Path(args.json).write_text(json.dumps(output, indent=2, default=str), encoding="utf-8")
    return output


if __name__ == "__main__":
    main()
