"""Every GPU check of the SDXL path in one run: correctness, speed, memory, compile, data loading.

On a GPU it measures the real SDXL architecture (random weights, bf16, 1024 x 1024 px = 128 x 128
latents); with ``--smoke`` it runs the same code on tiny models in about 30 s, on any device, so the
script cannot rot (the test suite runs it). Sections, each recorded even when another one fails:

* ``tests``: ``pytest -m cuda tests/test_cuda.py`` (float64-reference precision at SDXL shapes in
  fp32 / bf16 / fp16, exact attach/detach, a training step of the tiny SD and SDXL models in
  ``bf16-mixed`` and ``16-mixed``, a compiled (inductor) training step against eager,
  ``NestedPipeline`` generation, the sync-free denoising step).
* ``accuracy``: the relative error of ``nested_attention`` against the float64 reference, beside
  plain SDPA's own error in the same dtype, N = 4096 and 1024 queries, T = 77, D = 64, M = 1024.
* ``inference``: one UNet step, batch 1 and a guided batch 2, plain / nested (K/V cached) /
  diffusers' ``IPAdapterAttnProcessor2_0`` at M = 1024 and 16; FLOPs; a guided nested step under
  CUDA's sync debug mode ("error": any host-device sync raises).
* ``training``: the faces-sdxl recipe's step (text encoders, ViT-H/14-sized vision tower, resampler,
  M = 1024 nested layers, UNet forward + backward, gradient clipping, AdamW) against the frozen
  UNet's own forward + backward, gradient checkpointing off and on, batch 1 / 2 / 4, cached latents
  (and the VAE-encoded pixels at batch 1 and 4); the IP-Adapter-style ``decoupled`` injection at the
  same M; peak memory of each; the largest batch that fits 80 GB.
* ``compile``: ``torch.compile`` of the UNet with an adapter attached and a subject bound: graph
  breaks, compile time, compiled step time, whether binding a new subject recompiles. With
  ``--compile-regional`` each transformer block compiles on its own (``nested.adapter.compile_blocks``),
  and a plain copy compiled the same way gives the compiled nested / compiled plain ratio
  (``--compile-plain`` does it for whole UNets: two more minutes).
* ``compiled_training`` (only when named: it compiles the UNet's forward and backward twice): the
  recipe's step with ``model.compile`` against the compiled frozen UNet's forward + backward, and both
  eager, checkpointing on, at the largest of ``--batches``; whether steps that dropout binds
  differently recompile (``--compile-regional``: block by block). It builds its own models, so later
  sections run eager.
* ``loader``: training-stream samples/s per CPU worker at 1024 px from real JPEG shards, against the
  training step's samples/s (when ``training`` ran before it): the loader workers one GPU needs.
* ``dit`` (only when named): ``benchmarks/dit_step.py`` on the real FLUX.1-dev, SD3.5-Large and
  SD3.5-Medium transformers (bf16, 1024 px, M = 1024; training with gradient checkpointing), or its
  2-block models with ``--smoke``: nested / plain, nested / FLUX IP-Adapter, training step / frozen and
  peak memory. An architecture that fails (out of memory) is recorded, and the next one runs.
* ``dit_quantized`` (only when named): the same on FLUX.1-dev with its transformer's linear weights in
  int8 (``model.quantize``) and torchao's AdamW8bit, the configuration meant for a 24 GB card (T5 is not
  loaded by either section, as with ``model.prompt_cache``): what it costs in speed, and its peak memory.

Sections run in the order named. ``--budget SECONDS`` fits a run into a lease of GPU time: a section
starts only if what it is expected to take (``expected_seconds``: the real models' times on an H200 where
measured, else estimates) fits in what is left of the budget; the others are listed as skipped. Name the
sections by priority.

Timing: CUDA events around each call after warm-up, variants interleaved in rounds (the order
rotating), medians of per-round ratios. Output: ``gpu.json`` (every figure) and ``gpu.md`` (the
table), rewritten after each section.

    python benchmarks/gpu/bench.py --out benchmarks/gpu/results       # on a GPU, ~7 min
    python benchmarks/gpu/bench.py --smoke --out runs/gpu-smoke       # tiny models, 30 s
    benchmarks/gpu/device.sh                                          # the next GPU lease's one command
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import importlib.metadata
import importlib.util
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BENCHMARKS = Path(__file__).resolve().parents[1]
REPO = BENCHMARKS.parent
sys.path.insert(0, str(BENCHMARKS))

import attention as attention_bench  # noqa: E402  (benchmarks/attention.py)

# What a run without --sections measures (7 minutes on an H200), then what runs only when named.
DEFAULT_SECTIONS = ("environment", "tests", "accuracy", "inference", "training", "loader", "compile")
SECTIONS = (*DEFAULT_SECTIONS, "compiled_training", "dit", "dit_quantized")
GIB = 1024**3
CARD_80GB = 80 * 10**9  # an "80 GB" card (A100 / H100 80GB) holds about 79.6 GiB
USABLE_80GB = 0.95 * CARD_80GB  # room for the CUDA context and fragmentation
TARGETS = {
    "nested/plain": 1.08,
    "nested/ip": 0.55,
    "train/frozen": 1.15,
    "memory_gib": 24.0,
    "graph_breaks": 0,
    "loader_workers": 4,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="All GPU checks of nested's SDXL path; writes gpu.json and gpu.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", required=True, help="folder for gpu.json and gpu.md.")
    parser.add_argument("--smoke", action="store_true", help="tiny models and few repeats (any device).")
    parser.add_argument(
        "--sections",
        nargs="+",
        choices=SECTIONS,
        default=list(DEFAULT_SECTIONS),
        help="what to measure, in this order (default: all but compiled_training, dit and dit_quantized, "
        "which run only when named).",
    )
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu.")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 10; smoke 2).")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 3; smoke 1).")
    parser.add_argument(
        "--models",
        choices=["real", "narrow", "tiny"],
        default=None,
        help="the real SDXL architecture (default); narrow: its depths with tiny widths (the host's cost "
        "of a step, on a CPU); tiny SDXL-like models (default with --smoke).",
    )
    parser.add_argument(
        "--resolution", type=int, default=None, help="image side in pixels (default 1024; smoke 64)."
    )
    parser.add_argument(
        "--batches",
        type=int,
        nargs="+",
        default=None,
        help="training batch sizes (default 1 2 4; smoke 1 2).",
    )
    parser.add_argument(
        "--compile-plain",
        action="store_true",
        help="also compile a plain copy of the UNet, for the compiled nested / compiled plain ratio "
        "(doubles the compile time: about 2 more minutes on an H200).",
    )
    parser.add_argument(
        "--compile-regional",
        action="store_true",
        help="compile each transformer block on its own (regional compilation: a fraction of the compile "
        "time) in the compile section, with a plain copy compiled the same way, and in compiled_training.",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds the whole run may take: a section starts only if its expected time fits in what is "
        "left (default: no limit).",
    )
    parser.add_argument(
        "--compile-backend",
        default=None,
        help="torch.compile backend (default inductor; smoke: eager, which traces but generates no code).",
    )
    args = parser.parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.repeats = args.repeats or (2 if args.smoke else 10)
    args.warmup = args.warmup or (1 if args.smoke else 3)
    args.compile_backend = args.compile_backend or ("eager" if args.smoke else "inductor")
    args.models = args.models or ("tiny" if args.smoke else "real")
    args.resolution = args.resolution or (64 if args.smoke else 1024)
    args.batches = args.batches or ([1, 2] if args.smoke else [1, 2, 4])
    args.sections = list(dict.fromkeys(args.sections))
    return args


def expected_seconds(name: str, args: argparse.Namespace) -> float:
    """What a section takes with the real models on an H200, with a margin (the 2026-12-04 run; dit,
    compiled_training and the regional compiles estimated); other models count as free."""
    if args.models != "real":
        return 0.0
    per_section = {
        "environment": 5,
        "tests": 150,  # 50 s on 2026-12-04, before the compiled (inductor), quantized, AdamW8bit and cache tests
        "accuracy": 10,
        "inference": 30,
        "training": 60 + 35 * len(args.batches),
        "loader": 30,
        # Regional compiles are estimated from a CPU's ratios (12x and 34x less compile time than whole).
        "compile": 60 if args.compile_regional else 170 + (160 if args.compile_plain else 0),
        "compiled_training": 150 if args.compile_regional else 600,
        "dit": 150,
        "dit_quantized": 120,  # FLUX.1-dev alone, plus quantizing it and compiling AdamW8bit's step
    }
    return float(per_section[name])


# --------------------------------------------------------------------------------------- report
class Report:
    """The results so far, written to ``gpu.json`` and ``gpu.md`` (atomically) after every section."""

    def __init__(self, out: Path, args: argparse.Namespace) -> None:
        self.out = out
        self.data: dict[str, Any] = {
            "args": {k: str(v) for k, v in vars(args).items()},
            "sections": {},
            "errors": {},
            "skipped": {},
        }
        self.started = time.perf_counter()
        self.budget = args.budget
        out.mkdir(parents=True, exist_ok=True)

    def run(self, name: str, section: Callable[[], dict], expected: float = 0.0) -> None:
        elapsed = time.perf_counter() - self.started
        if self.budget is not None and elapsed + expected > self.budget:
            self.data["skipped"][name] = (
                f"expected {expected:.0f} s, {max(0.0, self.budget - elapsed):.0f} s of the {self.budget:.0f} s "
                "budget left"
            )
            print(f"\n=== {name}: skipped ({self.data['skipped'][name]})", flush=True)
            self.save()
            return
        print(f"\n=== {name}", flush=True)
        start = time.perf_counter()
        try:
            self.data["sections"][name] = section()
        except Exception:  # a failed section is a result too; the others still run
            self.data["errors"][name] = traceback.format_exc()
            print(self.data["errors"][name], flush=True)
        # A section that measures several things (dit: one per architecture) reports its own failures.
        for part, text in self.data["sections"].get(name, {}).get("errors", {}).items():
            self.data["errors"][f"{name}: {part}"] = text
        self.data.setdefault("seconds", {})[name] = round(time.perf_counter() - start, 1)
        print(f"=== {name}: {self.data['seconds'][name]} s", flush=True)
        self.save()

    def save_section(self, name: str, partial: dict) -> None:
        """A section's figures so far (a run stopped at its time limit keeps them)."""
        self.data["sections"][name] = partial
        self.save()

    def save(self) -> None:
        for name, text in (
            ("gpu.json", json.dumps(self.data, indent=2, default=str)),
            ("gpu.md", markdown(self.data)),
        ):
            partial = self.out / f".{name}.partial"
            partial.write_text(text + "\n", encoding="utf-8")
            os.replace(partial, self.out / name)


# --------------------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Variant:
    """A call to time, with what sets it up and undoes it (switching processors): not timed."""

    call: Callable[[], Any]
    enter: Callable[[], None] = lambda: None
    leave: Callable[[], None] = lambda: None

    def __call__(self) -> Any:
        self.enter()
        try:
            return self.call()
        finally:
            self.leave()


def time_call(variant: Variant | Callable[[], Any], device: torch.device) -> float:
    """Seconds of one call: CUDA events on a GPU (after the queue is drained), else the process's CPU
    time (what a shared machine's other load does not change; run torch on one thread)."""
    variant = variant if isinstance(variant, Variant) else Variant(variant)
    variant.enter()
    try:
        synchronize(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            variant.call()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000
        start_time = time.process_time()
        variant.call()
        return time.process_time() - start_time
    finally:
        variant.leave()


def interleaved(
    variants: dict[str, Variant | Callable[[], Any]], warmup: int, repeats: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per call of each variant; every round runs each once, the order rotating."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(time_call(variants[name], device))
    return times


def median_ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))


def summarize(times: dict[str, list[float]]) -> dict[str, float]:
    return {f"{name}_ms": 1000 * statistics.median(values) for name, values in times.items()}


def peak_memory(fn: Callable[[], object], device: torch.device, calls: int = 2) -> dict[str, float]:
    """Peak allocated GiB over ``calls`` calls, and its rise above what was allocated before them."""
    if device.type != "cuda":
        for _ in range(calls):
            fn()
        return {}
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    resident = torch.cuda.memory_allocated(device)
    for _ in range(calls):
        fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {
        "peak_gib": peak / GIB,
        "resident_gib": resident / GIB,
        "activations_gib": (peak - resident) / GIB,
    }


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------- environment
def environment(args: argparse.Namespace) -> dict:
    import diffusers
    import lightning
    import transformers

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(args.device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "lightning": lightning.__version__,
        "torchao": importlib.metadata.version("torchao") if importlib.util.find_spec("torchao") else None,
        "cpu_count": os.cpu_count(),
        "smoke": args.smoke,
    }
    if args.device.type == "cuda":
        properties = torch.cuda.get_device_properties(args.device)
        info.update(
            gpu=properties.name,
            gpu_memory_gib=properties.total_memory / GIB,
            capability=f"{properties.major}.{properties.minor}",
            multiprocessors=properties.multi_processor_count,
        )
    print(json.dumps(info, indent=1))
    return info


# ---------------------------------------------------------------------------------------- tests
def cuda_tests(args: argparse.Namespace) -> dict:
    """Run ``pytest -m cuda tests/test_cuda.py`` in a subprocess and read its JUnit report."""
    with tempfile.TemporaryDirectory(prefix="nested-cuda-tests-") as tmp:
        junit = Path(tmp) / "junit.xml"
        command = [
            sys.executable,
            "-m",
            "pytest",
            "-m",
            "cuda",
            "tests/test_cuda.py",
            "-q",
            "-rs",
            "-p",
            "no:cacheprovider",
        ]
        command.append(f"--junitxml={junit}")
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
        print(done.stdout[-4000:], done.stderr[-2000:], flush=True)
        cases = []
        for case in ElementTree.parse(junit).getroot().iter("testcase"):
            outcome, details = "passed", None
            for tag in ("failure", "error", "skipped"):
                element = case.find(tag)
                if element is not None:
                    outcome = tag if tag != "skipped" else "skipped: " + (element.get("message") or "")
                    if tag != "skipped":  # the assertion and the end of the traceback
                        details = f"{element.get('message')}\n{(element.text or '')[-2500:]}"
            cases.append(
                {
                    "name": case.get("name"),
                    "seconds": float(case.get("time", 0)),
                    "outcome": outcome,
                    "details": details,
                }
            )
    counts = {
        kind: sum(c["outcome"].startswith(kind) for c in cases)
        for kind in ("passed", "failure", "error", "skipped")
    }
    return {
        "returncode": done.returncode,
        "counts": counts,
        "cases": cases,
        "summary": done.stdout.strip().splitlines()[-1:],
    }


# ------------------------------------------------------------------------------------- accuracy
def accuracy(args: argparse.Namespace) -> dict:
    from nested.attention import nested_attention
    from nested.testing import reference_nested_attention

    shapes = [(64, 2, 16)] if args.smoke else [(4096, 10, 1024), (1024, 20, 1024)]  # (N, H, M)
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    rows = []
    for (queries, heads, tokens), (name, dtype) in itertools.product(shapes, dtypes.items()):
        generator = torch.Generator(device=args.device).manual_seed(queries + heads)

        def randn(*shape, dtype=dtype, generator=generator):
            return torch.randn(*shape, generator=generator, device=args.device).to(dtype)

        q, k, v = randn(2, heads, queries, 64), randn(2, heads, 77, 64), randn(2, heads, 77, 64)
        nested_k, nested_v = randn(2, heads, tokens, 64), randn(2, heads, tokens, 64)
        mask = torch.zeros(2, 77, dtype=torch.bool, device=args.device)
        mask[1, 5] = True
        case = (q, k, v, [nested_k], [nested_v], [mask])
        want = reference_nested_attention(*case)
        got = nested_attention(*case)
        plain = F.scaled_dot_product_attention(q, k, v)
        plain_want = torch.softmax(q.double() @ k.double().transpose(-1, -2) / 8.0, -1) @ v.double()

        def error(a: Tensor, b: Tensor) -> float:
            return ((a.double() - b).abs().max() / b.abs().max()).item()

        row = {
            "queries": queries,
            "heads": heads,
            "tokens": tokens,
            "dtype": name,
            "nested_error": error(got, want),
            "plain_sdpa_error": error(plain, plain_want),
            "unbound_row_exact": bool(torch.equal(got[0], plain[0])),
        }
        row["error_ratio"] = row["nested_error"] / max(row["plain_sdpa_error"], 1e-12)
        print(row, flush=True)
        rows.append(row)
    return {"rows": rows}


# ------------------------------------------------------------------------------------ inference
class InferenceBench:
    """The real SDXL UNet (or the tiny SDXL-like one) in bf16, a nested adapter and IP-Adapter
    processors for it, and the calls of one UNet step for each variant."""

    def __init__(self, args: argparse.Namespace) -> None:
        config, self.pooled = attention_bench.CONFIGS[{"real": "sdxl"}.get(args.models, args.models)]
        self.device, self.dtype = args.device, torch.bfloat16
        self.side = args.resolution // 8
        self.tokens, token_dim = (1024, 1280) if args.models == "real" else (16, 32)
        with torch.device(self.device):
            self.unet = attention_bench.build_unet(config, self.dtype)
            self.adapter = attention_bench.build_adapter(self.unet, self.tokens, token_dim, self.dtype)
            self.ip_processors = {
                m: attention_bench.build_ip_processors(self.unet, m, self.dtype)
                for m in sorted({self.tokens, 16})
            }
        self.generator = torch.Generator(device=self.device).manual_seed(0)
        self.token_shape = (1, self.tokens, token_dim)

    def randn(self, *shape: int) -> Tensor:
        return torch.randn(*shape, generator=self.generator, device=self.device, dtype=self.dtype)

    def inputs(self, batch: int) -> dict[str, Any]:
        pixels = 8 * self.side
        return {
            "sample": self.randn(batch, 4, self.side, self.side),
            "timestep": torch.full((batch,), 500, device=self.device),
            "encoder_hidden_states": self.randn(batch, 77, self.unet.config.cross_attention_dim),
            "added_cond_kwargs": {
                "text_embeds": self.randn(batch, self.pooled),
                "time_ids": torch.tensor(
                    [[pixels, pixels, 0, 0, pixels, pixels]] * batch, device=self.device
                ).to(self.dtype),
            },
        }

    def bind_subject(self, batch: int) -> None:
        """A new subject image's tokens, bound at prompt position 5. Batch 2 is a guided batch as
        NestedPipeline binds it: one prompt, its image shared, the unconditional half unbound."""
        from nested.adapter import SubjectBinding

        masks = torch.zeros(1, 77, dtype=torch.bool)
        masks[0, 5] = True
        index = torch.zeros(1, dtype=torch.long) if batch == 2 else None
        with torch.no_grad():
            self.adapter.set_subjects(
                [SubjectBinding(tokens=self.randn(*self.token_shape), masks=masks, image_index=index)]
            )

    def plain_processors(self) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.unet.set_attn_processor(AttnProcessor2_0())

    def _ip_enter(self, m: int) -> None:
        from diffusers.models.embeddings import MultiIPAdapterImageProjection

        self.unet.set_attn_processor(dict(self.ip_processors[m]))  # it pops the entries of the dict it gets
        # What UNet2DConditionModel._load_ip_adapter_weights does after building the processors.
        self.unet.encoder_hid_proj = MultiIPAdapterImageProjection([nn.Identity()])
        self.unet.config.encoder_hid_dim_type = "ip_image_proj"

    def _ip_leave(self) -> None:
        self.unet.encoder_hid_proj = None
        self.unet.config.encoder_hid_dim_type = None
        self.plain_processors()

    def variants(self, kwargs: dict[str, Any]) -> dict[str, Variant]:
        """One no-grad UNet call per variant; its processors are switched before it, outside the timing."""
        batch = kwargs["sample"].shape[0]

        def call(extra: dict | None = None) -> Callable[[], Tensor]:
            def run() -> Tensor:
                with torch.no_grad():
                    added = {**kwargs["added_cond_kwargs"], **(extra or {})}
                    return self.unet(**{**kwargs, "added_cond_kwargs": added}).sample

            return run

        variants = {
            "plain": Variant(call(), self.plain_processors),
            "nested": Variant(
                call(), lambda: self.adapter.attach(self.unet), lambda: self.adapter.detach(self.unet)
            ),
        }
        for m in sorted(self.ip_processors, reverse=True):
            embeds = [self.randn(batch, 1, m, self.unet.config.cross_attention_dim)]
            variants[f"ip{m}"] = Variant(
                call({"image_embeds": embeds}), lambda m=m: self._ip_enter(m), self._ip_leave
            )
        return variants


def inference(args: argparse.Namespace, state: dict) -> dict:
    bench = state["inference"] = InferenceBench(args)
    results: dict[str, Any] = {"latent_side": bench.side, "tokens": bench.tokens, "batches": {}}
    for batch in (1, 2):
        kwargs = bench.inputs(batch)
        bench.bind_subject(batch)
        variants = bench.variants(kwargs)
        plain_out, nested_out = variants["plain"](), variants["nested"]()
        checks = {
            "nested_differs_from_plain": bool((nested_out - plain_out).abs().max() > 0),
            "unbound_row_equals_plain": bool(torch.equal(nested_out[0], plain_out[0]))
            if batch == 2
            else None,
            "finite": bool(torch.isfinite(nested_out).all()),
        }
        times = interleaved(variants, args.warmup, args.repeats, args.device)
        row: dict[str, Any] = {"checks": checks, **summarize(times)}
        for name in variants:
            if name != "plain":
                row[f"{name}/plain"] = median_ratio(times, name, "plain")
        for m in bench.ip_processors:
            row[f"nested/ip{m}"] = median_ratio(times, "nested", f"ip{m}")
        if batch == 2:
            row["sync_debug"] = sync_check(variants, args.device)
        else:
            row["flops"] = count_flops(variants)
        print(json.dumps(row, indent=1, default=str), flush=True)
        results["batches"][str(batch)] = row
    return results


def sync_check(variants: dict[str, Variant], device: torch.device) -> dict[str, str]:
    """Run plain and nested once more with any host-device sync raising (CUDA only)."""
    if device.type != "cuda":
        return {"plain": "not run (no CUDA device)", "nested": "not run (no CUDA device)"}
    outcome = {}
    for name in ("plain", "nested"):
        variant = variants[name]
        variant.enter()  # attaching processors is set-up, not part of the step
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            variant.call()
            outcome[name] = "ok: no host-device synchronisation"
        except RuntimeError as error:
            outcome[name] = f"synchronised: {str(error).splitlines()[0]}"
        finally:
            torch.cuda.set_sync_debug_mode("default")
            variant.leave()
    print(f"sync debug mode 'error': {outcome}", flush=True)
    return outcome


def count_flops(variants: dict[str, Variant]) -> dict[str, float]:
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa}
    flops = {}
    for name, run in variants.items():
        with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
            run()
        flops[name] = float(counter.get_total_flops())
    return {
        **{f"{n}_tflop": f / 1e12 for n, f in flops.items()},
        **{f"{n}/plain": f / flops["plain"] for n, f in flops.items()},
    }


# ------------------------------------------------------------------------------------- training
def training_parts(args: argparse.Namespace, tmp: Path) -> tuple[Any, tuple, Any, int]:
    """(backbone, image backbone, encoder spec, resolution) of the faces-sdxl recipe, or tiny ones."""
    from nested.backbone import DiffusionBackbone
    from nested.encoder import EncoderSpec, load_vision_backbone
    from nested.testing import build_sdxl_backbone, write_tiny_pipeline

    if args.models == "tiny":
        path = write_tiny_pipeline(tmp / "tiny-sdxl", "sdxl")
        spec = EncoderSpec(backbone=str(path / "image_encoder"), num_tokens=16, width=32, depth=1, heads=2)
        backbone = DiffusionBackbone.from_pretrained(path, dtype=torch.bfloat16).to(args.device)
        image_backbone = load_vision_backbone(spec, dtype=torch.bfloat16)
        image_backbone[0].to(args.device)
        return backbone, image_backbone, spec, args.resolution
    # configs/faces-sdxl.yaml's encoder: M = 1024 tokens of width 1024 from ViT-H/14 features.
    spec = EncoderSpec(
        backbone="random ViT-H/14", num_tokens=1024, width=1024, depth=4, heads=16, output_dim=1024
    )
    if args.models == "narrow":
        spec = EncoderSpec(
            backbone="narrow ViT-H/14", num_tokens=16, width=32, depth=4, heads=2, output_dim=32
        )
    backbone, image_backbone = build_sdxl_backbone(
        tmp / "tokenizers", device=args.device, dtype=torch.bfloat16, narrow=args.models == "narrow"
    )
    return backbone, image_backbone, spec, args.resolution


def build_module(backbone, image_backbone, spec, injection: str, device: torch.device, compile=False):
    from nested.training.module import NestedAttentionModule

    module = NestedAttentionModule(
        "random SDXL",
        spec,
        subjects={"<person>": "person"},
        value_norm_factor=2.0 if injection == "nested" else None,
        injection=injection,
        domain="faces",
        frozen_dtype="bfloat16",
        compile=compile,
    )
    module.build_adapter(backbone, image_backbone)
    module.to(device)
    optimizer = module.configure_optimizers()
    return module, optimizer


def training_batch(module, resolution: int, batch_size: int, latents: bool) -> dict[str, Any]:
    """A collated batch (random pixels, one caption with the subject token per sample) on the module's
    device; with ``latents``, cached latents instead of pixels (shards built with cached latents)."""
    import train_step  # benchmarks/train_step.py

    side = resolution // module.backbone.vae_scale_factor
    batch = train_step.make_batch(resolution, batch_size, side if latents else None)
    if latents:
        del batch["pixel_values"]
    return {k: v.to(module.device) if isinstance(v, Tensor) else v for k, v in batch.items()}


def set_checkpointing(unet: nn.Module, enabled: bool) -> None:
    (unet.enable_gradient_checkpointing if enabled else unet.disable_gradient_checkpointing)()


def module_step(
    module, optimizer, batch: dict[str, Any], device: torch.device, new_draws: bool = False
) -> Callable[[], None]:
    """One training step as Lightning runs it for the recipe: bf16 autocast around the loss,
    backward, gradient clipping at 1.0, AdamW. Every step draws the same dropout, noise and time, or with
    ``new_draws`` new ones, as training does (dropout then unbinds different samples)."""
    parameters = module.adapter.trainable_parameters()
    seeds = itertools.count()

    def step() -> None:
        generator = torch.Generator().manual_seed(next(seeds)) if new_draws else module._generator()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = module.diffusion_loss(batch, generator)["loss"]
        loss.backward()
        module.on_after_backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def frozen_unet_step(module, batch: dict[str, Any], device: torch.device) -> Callable[[], None]:
    """The frozen UNet's own forward + backward on the same inputs (conditioning precomputed): the
    floor any adapter training step pays. No subject is bound (each training step unbinds its own after
    backward), so every cross-attention layer computes exactly the plain SDPA."""
    backbone = module.backbone
    unet = backbone.unet
    with torch.no_grad():
        conditioning = backbone.encode_prompts(list(batch["captions"]))
    pixels = batch["latents"].shape[-1] * backbone.vae_scale_factor
    time_ids = backbone.time_ids(batch["original_sizes"], batch["crops_top_left"], (pixels, pixels))
    added = backbone.unet_added_cond_kwargs(conditioning, time_ids.to(device))
    noisy = batch["latents"].to(unet.dtype).clone().requires_grad_(True)
    timesteps = torch.full((noisy.shape[0],), 500, device=device)
    target = torch.randn(noisy.shape, device=device)
    embeds = conditioning.prompt_embeds.to(unet.dtype)

    def step() -> None:
        if module.adapter._bindings:
            raise RuntimeError("a subject is still bound: the frozen step would not be plain")
        with torch.autocast(device.type, dtype=torch.bfloat16):
            prediction = unet(noisy, timesteps, embeds, added_cond_kwargs=added).sample.float()
            loss = F.mse_loss(prediction, target)
        loss.backward()
        noisy.grad = None

    return step


def training(args: argparse.Namespace, state: dict) -> dict:
    device = args.device
    state.clear()  # the inference section's UNet: freed before the recipe's modules are built
    free_memory(device)
    batches = tuple(args.batches)
    results: dict[str, Any] = {"rows": []}
    with tempfile.TemporaryDirectory(prefix="nested-gpu-train-") as tmp:
        backbone, image_backbone, spec, resolution = training_parts(args, Path(tmp))
        results["resolution"] = resolution
        unet = backbone.unet
        for injection in ("nested", "decoupled"):
            module, optimizer = build_module(backbone, image_backbone, spec, injection, device)
            results.setdefault("trainable_parameters", {})[injection] = sum(
                p.numel() for p in module.adapter.trainable_parameters()
            )
            for checkpointing, batch_size in itertools.product((False, True), batches):
                set_checkpointing(unet, checkpointing)
                batch = training_batch(module, resolution, batch_size, latents=True)
                variants = {injection: module_step(module, optimizer, batch, device)}
                if injection == "nested":
                    variants["frozen"] = frozen_unet_step(module, batch, device)
                times = interleaved(variants, args.warmup, max(1, args.repeats // 3), device)
                row: dict[str, Any] = {
                    "injection": injection,
                    "checkpointing": checkpointing,
                    "batch": batch_size,
                    "inputs": "latents",
                    **summarize(times),
                }
                if "frozen" in times:
                    row["step/frozen"] = median_ratio(times, injection, "frozen")
                row["samples_per_s"] = batch_size / statistics.median(times[injection])
                row.update(
                    {f"{injection}_{k}": v for k, v in peak_memory(variants[injection], device).items()}
                )
                if "frozen" in variants:
                    row.update({f"frozen_{k}": v for k, v in peak_memory(variants["frozen"], device).items()})
                print(json.dumps(row), flush=True)
                results["rows"].append(row)
                del batch, variants
            if injection == "nested":
                results["rows"] += vae_rows(args, module, optimizer, resolution, batches)
                results["largest_batch"] = largest_batch(args, module, optimizer, resolution, results["rows"])
            module.adapter.detach(unet)
            del module, optimizer
            free_memory(device)
        set_checkpointing(unet, False)
    return results


def vae_rows(args, module, optimizer, resolution: int, batches: tuple[int, ...]) -> list[dict]:
    """The recipe as configured, with pixels VAE-encoded every step (no cached latents), checkpointing on."""
    rows = []
    set_checkpointing(module.backbone.unet, True)
    for batch_size in sorted({batches[0], batches[-1]}):
        batch = training_batch(module, resolution, batch_size, latents=False)
        step = module_step(module, optimizer, batch, args.device)
        times = interleaved({"nested": step}, args.warmup, max(1, args.repeats // 3), args.device)
        row = {"injection": "nested", "checkpointing": True, "batch": batch_size, "inputs": "pixels (VAE)"}
        row.update(summarize(times))
        row["samples_per_s"] = batch_size / statistics.median(times["nested"])
        row.update({f"nested_{k}": v for k, v in peak_memory(step, args.device).items()})
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def largest_batch(args, module, optimizer, resolution: int, rows: list[dict]) -> dict:
    """Extrapolate the checkpointed nested step's peak memory to an 80 GB card, then measure that batch."""
    points = [
        (r["batch"], r.get("nested_peak_gib"))
        for r in rows
        if r["checkpointing"] and r["inputs"] == "latents"
    ]
    points = [(b, p) for b, p in points if p is not None]
    if len(points) < 2:
        return {"note": "needs peak memory at two batch sizes (CUDA)"}
    (b0, p0), (b1, p1) = points[0], points[-1]
    per_sample = (p1 - p0) / (b1 - b0)
    fixed = p0 - per_sample * b0
    batch_size = max(1, min(64, int((USABLE_80GB / GIB - fixed) / per_sample)))
    result: dict[str, Any] = {"per_sample_gib": per_sample, "fixed_gib": fixed, "predicted": batch_size}
    set_checkpointing(module.backbone.unet, True)
    while batch_size >= 1:
        try:
            batch = training_batch(module, resolution, batch_size, latents=True)
            step = module_step(module, optimizer, batch, args.device)
            memory = peak_memory(step, args.device, calls=1)
            times = interleaved({"nested": step}, 1, 3, args.device)
            step_seconds = statistics.median(times["nested"])
            result.update(
                batch=batch_size,
                step_ms=1000 * step_seconds,
                samples_per_s=batch_size / step_seconds,
                gpu_hours_per_100k_steps=step_seconds * 100_000 / 3600,
                **memory,
            )
            break
        except torch.OutOfMemoryError:
            batch_size = batch_size * 3 // 4
            free_memory(args.device)
    print(json.dumps(result), flush=True)
    return result


def compiled_training(args: argparse.Namespace, state: dict) -> dict:
    """The recipe's step with ``model.compile`` (the UNet compiled in place, its nested layers in the
    graph) against the compiled frozen UNet's forward + backward; both also eager, before compiling.
    Checkpointing on (the recipe's setting), cached latents, the largest of ``--batches``."""
    from torch._dynamo.utils import counters

    device = args.device
    state.clear()
    free_memory(device)
    batch_size = max(args.batches)
    result: dict[str, Any] = {
        "batch": batch_size,
        "checkpointing": True,
        "backend": args.compile_backend,
        "regional": args.compile_regional,
    }
    with tempfile.TemporaryDirectory(prefix="nested-gpu-compiled-") as tmp:
        backbone, image_backbone, spec, resolution = training_parts(args, Path(tmp))
        unet = backbone.unet
        set_checkpointing(unet, True)
        rounds = max(1, args.repeats // 3)
        times: dict[str, list[float]] = {}
        for compiled in (False, True):
            options = (
                {"backend": args.compile_backend, "regional": args.compile_regional} if compiled else False
            )
            module, optimizer = build_module(
                backbone, image_backbone, spec, "nested", device, compile=options
            )
            batch = training_batch(module, resolution, batch_size, latents=True)
            variants = {"nested": module_step(module, optimizer, batch, device, new_draws=True)}
            variants["frozen"] = frozen_unet_step(module, batch, device)
            suffix = "_compiled" if compiled else "_eager"
            if compiled:
                torch._dynamo.reset()
                counters.clear()
                for name, variant in variants.items():  # the first call of each compiles its graph
                    result[f"compile_seconds_{name}"] = time_call(variant, device)
                graphs = counters["stats"]["unique_graphs"]
            measured = interleaved(variants, args.warmup, rounds, device)
            times.update({name + suffix: seconds for name, seconds in measured.items()})
            result[f"nested{suffix}_peak_gib"] = peak_memory(variants["nested"], device).get("peak_gib")
            if compiled:
                result["graphs"] = graphs
                result["recompiled_while_timing"] = counters["stats"]["unique_graphs"] != graphs
            module.adapter.detach(unet)
            del module, optimizer, batch, variants
            free_memory(device)
        set_checkpointing(unet, False)
    result.update(summarize(times))
    for mode in ("eager", "compiled"):
        result[f"step/frozen_{mode}"] = median_ratio(times, f"nested_{mode}", f"frozen_{mode}")
    result["compiled/eager_nested"] = statistics.median(times["nested_compiled"]) / statistics.median(
        times["nested_eager"]
    )
    print(json.dumps(result, default=str), flush=True)
    return result


# -------------------------------------------------------------------------------------- compile
def compile_check(args: argparse.Namespace, state: dict) -> dict:
    """torch.compile of the UNet with the adapter attached and a subject bound (guided batch 2): the whole
    UNet, or with ``--compile-regional`` each transformer block on its own (``compile_blocks``), which also
    compiles a plain copy (cheap) for the compiled nested / compiled plain ratio."""
    from torch._dynamo.utils import counters

    from nested.adapter import compile_blocks

    bench = state.get("inference") or InferenceBench(args)
    unet, adapter, device = bench.unet, bench.adapter, args.device
    kwargs = bench.inputs(2)
    bench.bind_subject(2)
    bench.plain_processors()
    regional = args.compile_regional
    result: dict[str, Any] = {
        "backend": args.compile_backend,
        "regional": regional,
        "nested_layers": len(adapter.layers),
    }
    # Eager before compiling. Compiled regionally, the UNet itself then runs compiled, so its eager nested
    # step is timed now too; compiled whole, it is timed later beside the compiled wrapper, interleaved.
    variants = bench.variants(kwargs)
    eager = {"eager_plain": variants["plain"]}
    if regional:
        eager["eager_nested"] = variants["nested"]
    times = interleaved(eager, args.warmup, args.repeats, device)
    eager_out = variants["nested"]().float()
    plain_unet = copy.deepcopy(unet) if args.compile_plain or regional else None
    adapter.attach(unet)
    torch._dynamo.reset()
    counters.clear()

    def compile_unet(model: nn.Module) -> Callable:
        if regional:
            result["compiled_blocks"] = compile_blocks(model, backend=args.compile_backend, fullgraph=True)
            return model
        return torch.compile(model, backend=args.compile_backend, fullgraph=True)

    def first_call(compiled: Callable) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            compiled(**kwargs)
        synchronize(device)
        return time.perf_counter() - start

    try:
        compiled = compile_unet(unet)
        result["compile_seconds"] = first_call(compiled)
        result["fullgraph"] = True
        result["graph_breaks"] = result["graph_breaks_in_nested"] = 0
    except Exception as error:  # a graph break under fullgraph=True: count and locate them
        if regional:
            raise
        result["fullgraph"] = False
        result["fullgraph_error"] = str(error).splitlines()[0]
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(unet)(**kwargs)
        reasons = [str(reason) for reason in explanation.break_reasons]
        result["graph_breaks"] = explanation.graph_break_count
        result["break_reasons"] = reasons[:20]
        result["graph_breaks_in_nested"] = sum("nested" in reason for reason in reasons)
        torch._dynamo.reset()
        compiled = torch.compile(unet, backend=args.compile_backend)
        result["compile_seconds"] = first_call(compiled)
    result["graphs"] = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        compiled_out = compiled(**kwargs).sample.float()
    result["max_abs_difference_vs_eager"] = (compiled_out - eager_out).abs().max().item()
    result["eager_output_max_abs"] = eager_out.abs().max().item()

    def compiled_nested() -> Tensor:
        with torch.no_grad():
            return compiled(**kwargs).sample

    def eager_nested() -> Tensor:
        with torch.no_grad():
            return unet(**kwargs).sample

    # The adapter stays attached while the compiled UNet runs: swapping processors would change
    # what the compiled graph was specialised on.
    timed = (
        {"compiled_nested": compiled_nested}
        if regional
        else {"compiled_nested": compiled_nested, "eager_nested": eager_nested}
    )
    times.update(interleaved(timed, args.warmup, args.repeats, device))
    result["graphs_after_timing"] = counters["stats"]["unique_graphs"]
    bench.bind_subject(2)  # a new subject image, as the next generation call binds it
    result["rebound_subject_step_ms"] = 1000 * time_call(compiled_nested, device)
    result["recompiled_on_rebinding"] = counters["stats"]["unique_graphs"] != result["graphs_after_timing"]
    result.update(summarize(times))
    if regional:  # timed apart: a ratio of medians
        result["compiled_nested/eager_nested"] = statistics.median(
            times["compiled_nested"]
        ) / statistics.median(times["eager_nested"])
    else:
        result["compiled_nested/eager_nested"] = median_ratio(times, "compiled_nested", "eager_nested")
    result["compiled_nested/eager_plain"] = statistics.median(times["compiled_nested"]) / statistics.median(
        times["eager_plain"]
    )
    if plain_unet is not None:
        # A second UNet, plain, compiled the same way: the ratio both would run at in a compiled pipeline.
        compiled_plain = compile_unet(plain_unet)
        result["compile_plain_seconds"] = first_call(compiled_plain)

        def compiled_plain_call() -> Tensor:
            with torch.no_grad():
                return compiled_plain(**kwargs).sample

        both = interleaved(
            {"compiled_nested": compiled_nested, "compiled_plain": compiled_plain_call},
            args.warmup,
            args.repeats,
            device,
        )
        result["compiled_plain_ms"] = 1000 * statistics.median(both["compiled_plain"])
        result["compiled_nested/compiled_plain"] = median_ratio(both, "compiled_nested", "compiled_plain")
        del plain_unet, compiled_plain
    adapter.detach(unet)
    if regional:  # its blocks stay compiled: a later section builds its own UNet
        state.pop("inference", None)
    print(json.dumps(result, indent=1, default=str), flush=True)
    return result


# --------------------------------------------------------------------------------------- loader
def loader(args: argparse.Namespace, results: dict) -> dict:
    import data as data_bench  # benchmarks/data.py

    size, images = (128, 8) if args.smoke else (1024, 32)
    worker_counts = (0, 1) if args.smoke else (0, 4)
    seconds = 0.5 if args.smoke else 6.0
    out: dict[str, Any] = {"resolution": size, "rates": {}}
    with tempfile.TemporaryDirectory(prefix="nested-gpu-loader-") as tmp:
        settings = argparse.Namespace(images=images, size=size, quality=90)
        index, _ = data_bench.build_dataset(Path(tmp), settings)
        for workers in worker_counts:
            variant = data_bench.LoaderVariant("stream", index, size, workers)
            try:
                variant.block(min(seconds, 2.0))  # warm-up: worker start, shuffle buffer
                rate = variant.block(seconds)
            finally:
                variant.close()
            out["rates"][str(workers)] = {"samples_per_s": rate, "per_worker": rate / max(1, workers)}
    per_worker = out["rates"][str(worker_counts[-1])]["per_worker"]
    out["samples_per_s_per_worker"] = per_worker
    recipe = [
        r
        for r in results.get("training", {}).get("rows", [])
        if r["injection"] == "nested" and r["checkpointing"] and r["inputs"] == "latents"
    ]
    if recipe:
        fastest = max(r["samples_per_s"] for r in recipe)
        out["train_samples_per_s"] = fastest
        out["workers_needed"] = math.ceil(fastest / per_worker)
    print(json.dumps(out, indent=1), flush=True)
    return out


# ------------------------------------------------------------------------------------------ dit
def dit(
    args: argparse.Namespace, state: dict, saved: Callable[[dict], None], extra: tuple[str, ...] = ()
) -> dict:
    """``benchmarks/dit_step.py`` on the diffusion transformers, training with gradient checkpointing;
    ``saved`` gets the figures after each architecture. ``extra``: more of its options."""
    import dit_step  # benchmarks/dit_step.py

    state.clear()  # an SDXL UNet of an earlier section: freed before the transformers are built
    free_memory(args.device)
    argv = ["--device", str(args.device), "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    argv += ["--gradient-checkpointing", *extra]
    if args.smoke or args.models == "tiny":  # 2-block transformers (real widths with --models real)
        argv.append("--smoke")
    if args.models != "tiny":
        argv += ["--models", args.models]
    results = dit_step.run(dit_step.parse_args(argv), saved)
    failed = dit_step.failed_checks(results)
    if failed:
        results["errors"]["checks"] = "checks failed: " + ", ".join(failed)
    return results


# ------------------------------------------------------------------------------------- markdown
def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return "-" if value is None else str(value)


def _verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("PASS" if ok else "MISS")


def markdown(data: dict) -> str:
    """The measured table: targets first, then each section's figures."""
    sections, lines = data["sections"], []
    env = sections.get("environment", {})
    lines.append(f"# GPU benchmark: {env.get('gpu', env.get('device', '?'))}")
    lines.append("")
    lines.append(
        f"{env.get('date', '?')}; torch {env.get('torch')} (CUDA {env.get('cuda')}), diffusers {env.get('diffusers')}, "
        f"transformers {env.get('transformers')}, lightning {env.get('lightning')}; {env.get('cpu_count')} CPU cores"
        + ("; SMOKE RUN (tiny models)" if env.get("smoke") else "")
    )
    lines += ["", "## Targets", "", "| measure | target | measured | verdict |", "| --- | --- | --- | --- |"]
    inference_rows = sections.get("inference", {}).get("batches", {})
    for batch, row in inference_rows.items():
        ratio = row.get("nested/plain")
        lines.append(
            f"| inference step, nested / plain, M = {sections['inference'].get('tokens')}, batch {batch} | <= {TARGETS['nested/plain']} | {_fmt(ratio)} | {_verdict(ratio <= TARGETS['nested/plain'] if ratio else None)} |"
        )
    for batch, row in inference_rows.items():
        ratio = row.get("nested/ip1024") or row.get(f"nested/ip{sections['inference'].get('tokens')}")
        lines.append(
            f"| nested / IP-Adapter at equal M, batch {batch} | <= {TARGETS['nested/ip']} | {_fmt(ratio)} | {_verdict(ratio <= TARGETS['nested/ip'] if ratio else None)} |"
        )
    train_rows = sections.get("training", {}).get("rows", [])
    for row in train_rows:
        if "step/frozen" in row:
            ratio = row["step/frozen"]
            label = f"training step / frozen UNet fwd+bwd, batch {row['batch']}, checkpointing {'on' if row['checkpointing'] else 'off'}"
            lines.append(
                f"| {label} | <= {TARGETS['train/frozen']} | {_fmt(ratio)} | {_verdict(ratio <= TARGETS['train/frozen'])} |"
            )
    for row in train_rows:
        if (
            row["injection"] == "nested"
            and row["batch"] == 1
            and row["checkpointing"]
            and "nested_peak_gib" in row
        ):
            peak = row["nested_peak_gib"]
            lines.append(
                f"| peak memory, batch 1, checkpointing on, {row['inputs']} | <= {TARGETS['memory_gib']} GiB | {peak:.2f} GiB | {_verdict(peak <= TARGETS['memory_gib'])} |"
            )
    compiled_training_row = sections.get("compiled_training", {})
    if "step/frozen_compiled" in compiled_training_row:
        ratio = compiled_training_row["step/frozen_compiled"]
        lines.append(
            f"| training step / frozen UNet fwd+bwd, both compiled, batch {compiled_training_row['batch']}, checkpointing on | <= {TARGETS['train/frozen']} | {_fmt(ratio)} | {_verdict(ratio <= TARGETS['train/frozen'])} |"
        )
    compiled = sections.get("compile", {})
    if "compiled_nested/compiled_plain" in compiled:
        ratio = compiled["compiled_nested/compiled_plain"]
        how = "each block compiled" if compiled.get("regional") else "whole UNets compiled"
        lines.append(
            f"| inference step, nested / plain, both compiled ({how}), guided batch 2 | <= {TARGETS['nested/plain']} | {_fmt(ratio)} | {_verdict(ratio <= TARGETS['nested/plain'])} |"
        )
    if compiled:
        breaks = compiled.get("graph_breaks_in_nested")
        lines.append(
            f"| graph breaks in the nested processor under torch.compile | 0 | {breaks} (all: {compiled.get('graph_breaks')}) | {_verdict(breaks == 0 if breaks is not None else None)} |"
        )
    loaded = sections.get("loader", {})
    if "workers_needed" in loaded:
        lines.append(
            f"| loader workers per GPU at {loaded['resolution']} px | <= {TARGETS['loader_workers']} | {loaded['workers_needed']} | {_verdict(loaded['workers_needed'] <= TARGETS['loader_workers'])} |"
        )
    largest = sections.get("training", {}).get("largest_batch", {})
    if "batch" in largest:
        lines.append(
            f"| faces-sdxl samples/s at the largest batch that fits 80 GB | report | batch {largest['batch']}: "
            f"{largest['samples_per_s']:.2f} samples/s, {largest['peak_gib']:.1f} GiB, {largest['gpu_hours_per_100k_steps']:.0f} GPU-h / 100k steps | - |"
        )
    for row in train_rows:
        if (
            row["injection"] == "nested"
            and row["batch"] == 4
            and row["checkpointing"]
            and row["inputs"] == "latents"
        ):
            hours = row["nested_ms"] / 1000 * 100_000 / 3600
            lines.append(
                f"| faces-sdxl GPU-hours per 100k steps (batch 4, checkpointing, cached latents) | report | {hours:.0f} | - |"
            )

    tests = sections.get("tests")
    if tests:
        lines += [
            "",
            "## CUDA tests",
            "",
            f"`pytest -m cuda tests/test_cuda.py`: {tests['counts']} ({' '.join(tests['summary'])})",
            "",
        ]
        lines += ["| test | outcome | s |", "| --- | --- | ---: |"]
        lines += [f"| {c['name']} | {c['outcome']} | {c['seconds']:.1f} |" for c in tests["cases"]]
        for case in tests["cases"]:
            if case.get("details"):
                lines += ["", f"`{case['name']}`:", "", "```", case["details"].strip(), "```"]
    rows = sections.get("accuracy", {}).get("rows", [])
    if rows:
        lines += [
            "",
            "## Precision against float64",
            "",
            "| N | H | M | dtype | nested rel. error | plain SDPA rel. error | ratio | unbound row = SDPA |",
            "| ---: | ---: | ---: | --- | ---: | ---: | ---: | --- |",
        ]
        lines += [
            f"| {r['queries']} | {r['heads']} | {r['tokens']} | {r['dtype']} | {r['nested_error']:.2e} | {r['plain_sdpa_error']:.2e} | {r['error_ratio']:.2f} | {r['unbound_row_exact']} |"
            for r in rows
        ]
    if inference_rows:
        lines += ["", "## Inference: one UNet step (bf16, median ms)", ""]
        names = [k[:-3] for k in next(iter(inference_rows.values())) if k.endswith("_ms")]
        lines += [
            "| batch | "
            + " | ".join(names)
            + " | nested/plain | nested/ip (equal M) | sync debug (nested) |",
            "| --- |" + " ---: |" * (len(names) + 2) + " --- |",
        ]
        for batch, row in inference_rows.items():
            ip_key = f"nested/ip{sections['inference'].get('tokens')}"
            sync = (row.get("sync_debug") or {}).get("nested", "-")
            lines.append(
                f"| {batch} | "
                + " | ".join(_fmt(row[f"{n}_ms"], 2) for n in names)
                + f" | {_fmt(row.get('nested/plain'))} | {_fmt(row.get(ip_key))} | {sync} |"
            )
        flops = inference_rows.get("1", {}).get("flops")
        if flops:
            lines.append("")
            lines.append(
                "FLOPs per step, batch 1: "
                + ", ".join(f"{k[:-6]} {v:.3f} T" for k, v in flops.items() if k.endswith("_tflop"))
                + "; ratios to plain: "
                + ", ".join(f"{k} {v:.3f}" for k, v in flops.items() if "/" in k)
            )
    if train_rows:
        lines += ["", "## Training step (bf16 autocast, AdamW, clipping)", ""]
        lines += [
            "| injection | checkpointing | batch | inputs | step ms | frozen fwd+bwd ms | step/frozen | samples/s | peak GiB | frozen peak GiB |",
            "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in train_rows:
            inj = r["injection"]
            lines.append(
                f"| {inj} | {'on' if r['checkpointing'] else 'off'} | {r['batch']} | {r['inputs']} | {_fmt(r.get(f'{inj}_ms'), 1)} | {_fmt(r.get('frozen_ms'), 1)} | "
                f"{_fmt(r.get('step/frozen'))} | {_fmt(r.get('samples_per_s'), 2)} | {_fmt(r.get(f'{inj}_peak_gib'), 2)} | {_fmt(r.get('frozen_peak_gib'), 2)} |"
            )
        if largest:
            lines += [
                "",
                f"Largest batch for 80 GB (checkpointing on, cached latents): {json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in largest.items()})}",
            ]
    if compiled:
        lines += [
            "",
            "## torch.compile",
            "",
            "```",
            json.dumps({k: v for k, v in compiled.items() if k != "break_reasons"}, indent=1, default=str),
            "```",
        ]
    if "step/frozen_compiled" in compiled_training_row:
        row = compiled_training_row
        lines += [
            "",
            f"## Training step with model.compile (batch {row['batch']}, checkpointing on, backend {row['backend']}"
            + (", each block compiled)" if row.get("regional") else ")"),
            "",
            "| mode | step ms | frozen fwd+bwd ms | step/frozen | peak GiB |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for mode in ("eager", "compiled"):
            lines.append(
                f"| {mode} | {_fmt(row[f'nested_{mode}_ms'], 1)} | {_fmt(row[f'frozen_{mode}_ms'], 1)} | "
                f"{_fmt(row[f'step/frozen_{mode}'])} | {_fmt(row.get(f'nested_{mode}_peak_gib'), 2)} |"
            )
        lines += [
            "",
            f"Compiled / eager step: {_fmt(row['compiled/eager_nested'])}. First calls (compiling): nested "
            f"{row['compile_seconds_nested']:.0f} s, frozen {row['compile_seconds_frozen']:.0f} s; {row['graphs']} "
            f"graphs, recompiled while timing (dropout binding other samples): {row['recompiled_while_timing']}.",
        ]
    if loaded:
        lines += ["", "## Data loader", "", "```", json.dumps(loaded, indent=1), "```"]
    transformer_sections = {
        "dit": "Diffusion transformers (benchmarks/dit_step.py)",
        "dit_quantized": "FLUX.1-dev with its transformer in int8 and AdamW8bit, T5 not loaded: the 24 GB "
        "configuration (benchmarks/dit_step.py --quantize int8 --optimizer adamw8bit)",
    }
    for name, title in transformer_sections.items():
        if name in sections:
            import dit_step  # benchmarks/dit_step.py

            lines += ["", f"## {title}", "", dit_step.markdown(sections[name])]
    if data.get("skipped"):
        lines += ["", "## Skipped (over the --budget)", ""]
        lines += [f"- {name}: {reason}" for name, reason in data["skipped"].items()]
    if data["errors"]:
        lines += ["", "## Errors", ""]
        for name, text in data["errors"].items():
            lines += [f"### {name}", "", "```", text.strip()[-3000:], "```"]
    lines += ["", "Section times (s): " + json.dumps(data.get("seconds", {}))]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    report = Report(Path(args.out), args)
    state: dict[str, Any] = {}
    sections = report.data["sections"]
    steps: dict[str, Callable[[], dict]] = {
        "environment": lambda: environment(args),
        "tests": lambda: cuda_tests(args),
        "accuracy": lambda: accuracy(args),
        "inference": lambda: inference(args, state),
        "training": lambda: training(args, state),
        "loader": lambda: loader(args, sections),
        "compile": lambda: compile_check(args, state),
        "compiled_training": lambda: compiled_training(args, state),
        "dit": lambda: dit(args, state, lambda partial: report.save_section("dit", partial)),
        "dit_quantized": lambda: dit(
            args,
            state,
            lambda partial: report.save_section("dit_quantized", partial),
            ("--quantize", "int8", "--optimizer", "adamw8bit", "--architectures", "FLUX.1-dev"),
        ),
    }
    for name in args.sections:
        report.run(name, steps[name], expected_seconds(name, args))
    print(f"\nwrote {Path(args.out) / 'gpu.json'} and {Path(args.out) / 'gpu.md'}")
    return 1 if report.data["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
