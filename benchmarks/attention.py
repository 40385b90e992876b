"""Cost of one UNet step with nested attention, against the plain UNet and diffusers' IP-Adapter.

One UNet (the real SDXL architecture with random weights, or a tiny one for a smoke run) is built
once and three variants run on it, alternated in A/B pairs so that the drift of a shared machine
cancels out of the per-pair ratios:

* ``plain``: diffusers' ``AttnProcessor2_0`` everywhere.
* ``nested``: a :class:`nested.adapter.NestedAdapter` attached, one subject bound with
  ``set_subjects`` (the nested K/V of every layer are computed once, before timing, as in a real
  sampling loop), the subject token present at one prompt position.
* ``ip``: diffusers' ``IPAdapterAttnProcessor2_0`` on every ``attn2`` layer with the same number
  of image tokens M, wired the way ``UNet2DConditionModel._load_ip_adapter_weights`` wires a real
  IP-Adapter: ``unet.encoder_hid_proj = MultiIPAdapterImageProjection([...])`` and
  ``unet.config.encoder_hid_dim_type = "ip_image_proj"``, the image tokens passed as
  ``added_cond_kwargs["image_embeds"] = [(B, 1, M, cross_attention_dim)]``. The image projection
  is an ``nn.Identity`` (a real IP-Adapter Plus runs its resampler there once per step, so this
  IP-Adapter is, if anything, slightly cheaper than a real one); the per-layer ``to_k_ip`` /
  ``to_v_ip`` re-projection of the M tokens, which is what makes IP-Adapter expensive, is real.

It also prints the FLOP floor (``torch.utils.flop_counter``, with the CPU flash-attention kernel
counted, and the analytic ``4 x N_q x M x inner`` per cross-attention layer), and checks before
timing that the subject is really active and that a nested UNet without an active subject gives
exactly the plain output.

    python benchmarks/attention.py --config tiny --pairs 5 --warmup 1   # smoke run, ~20 s
    python benchmarks/attention.py --config sdxl --pairs 12 --warmup 1 --threads 1   # ~12 min
    python benchmarks/attention.py --config narrow --latent 8 --tokens 16 --token-dim 32 --cfg \
        --threads 1 --pairs 40 --no-flops   # the host cost per step: what bounds an eager GPU step

Both wall-clock and process CPU time are recorded per step. On a shared machine read the CPU-time
table of a ``--threads 1`` run: with two threads a busy neighbour stalls torch's thread barriers
and single steps took 3 s to 35 s within one run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from nested.testing import SDXL_UNET_CONFIG

SDXL_UNET = SDXL_UNET_CONFIG
# Same block types, a few channels: for a smoke run in seconds.
TINY_UNET = {
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (32, 64, 64),
    "layers_per_block": 1,
    "transformer_layers_per_block": (1, 1, 2),
    "attention_head_dim": (2, 4, 4),
    "cross_attention_dim": 64,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 32 + 6 * 8,
}
# The SDXL block structure (70 cross-attention layers) with 32-128 channels: its step costs almost no
# arithmetic, so its time is the per-step host cost (Python, op dispatch), which bounds an eager GPU step.
NARROW_SDXL_UNET = {
    **SDXL_UNET,
    "block_out_channels": (32, 64, 128),
    "attention_head_dim": (1, 2, 4),
    "cross_attention_dim": 64,
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 32 + 6 * 8,
}
CONFIGS = {  # UNet config, pooled text width
    "sdxl": (SDXL_UNET, 1280),
    "tiny": (TINY_UNET, 32),
    "narrow": (NARROW_SDXL_UNET, 32),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TEXT_TOKENS = 77
SUBJECT_POSITION = 5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Time one UNet step (batch 1, or 2 with --cfg) of plain attention, nested attention with cached K/V and "
            "diffusers' IP-Adapter at the same number of subject/image tokens M, alternated in A/B "
            "pairs; report median per-pair ratios, their IQR, and the FLOP floor."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--config", choices=sorted(CONFIGS), default="sdxl", help="UNet architecture (random weights)."
    )
    parser.add_argument("--latent", type=int, default=32, help="latent side (32 -> 256 px for SDXL).")
    parser.add_argument(
        "--tokens", type=int, default=1024, help="M, subject tokens (nested) = image tokens (IP-Adapter)."
    )
    parser.add_argument("--token-dim", type=int, default=1280, help="d, the subject encoder's output width.")
    parser.add_argument("--pairs", type=int, default=15, help="timed rounds; each runs every variant once.")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds before timing.")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument(
        "--cfg",
        action="store_true",
        help="batch 2 as a guided pipeline runs it: unconditional half without the subject, shared image.",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP count (saves 3 forwards).")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file.")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------ building
def build_unet(config: dict, dtype: torch.dtype) -> nn.Module:
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet = UNet2DConditionModel(**config).eval().requires_grad_(False)
    if dtype != torch.float32:
        unet.to(dtype)
    unet.set_attn_processor(AttnProcessor2_0())
    return unet


def build_adapter(unet: nn.Module, tokens: int, token_dim: int, dtype: torch.dtype):
    """A fresh NestedAdapter for ``unet``; its encoder's backbone is a tiny in-memory CLIP (never run)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from nested.adapter import NestedAdapter
    from nested.encoder import CLIP_MEAN, CLIP_STD, EncoderSpec, SubjectEncoder

    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=16,
    )
    backbone = (CLIPVisionModel(vision), 32, CLIP_MEAN, CLIP_STD)
    spec = EncoderSpec(
        backbone="in-memory-tiny-clip", num_tokens=tokens, width=64, depth=1, heads=4, output_dim=token_dim
    )
    encoder = SubjectEncoder.from_spec(spec, backbone=backbone)
    adapter = NestedAdapter.for_unet(unet, token="person", encoder=spec, subject_encoder=encoder)
    return adapter.eval().requires_grad_(False).to(dtype)


def build_ip_processors(unet: nn.Module, tokens: int, dtype: torch.dtype) -> dict[str, object]:
    """Processors as ``_convert_ip_adapter_attn_to_diffusers`` makes them: IP on attn2, plain on attn1."""
    from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0

    processors: dict[str, object] = {}
    for name in unet.attn_processors:
        module = unet.get_submodule(name.removesuffix(".processor"))
        if name.endswith("attn2.processor"):
            processor = IPAdapterAttnProcessor2_0(
                hidden_size=module.to_q.out_features,
                cross_attention_dim=unet.config.cross_attention_dim,
                num_tokens=(tokens,),
                scale=1.0,
            )
            processors[name] = processor.eval().requires_grad_(False).to(dtype)
        else:
            processors[name] = AttnProcessor2_0()
    return processors


@dataclass
class Variant:
    name: str
    enter: Callable[[], None]
    leave: Callable[[], None]
    added: dict[str, object] = field(default_factory=dict)


@dataclass
class Bench:
    unet: nn.Module
    sample: Tensor
    timestep: Tensor
    text: Tensor
    added: dict[str, Tensor]
    adapter: object
    binding: object
    image_embeds: list[Tensor]
    variants: dict[str, Variant]


def build_bench(args: argparse.Namespace) -> Bench:
    from diffusers.models.attention_processor import AttnProcessor2_0
    from diffusers.models.embeddings import MultiIPAdapterImageProjection

    from nested.adapter import SubjectBinding

    torch.manual_seed(args.seed)
    dtype = DTYPES[args.dtype]
    config, pooled_dim = CONFIGS[args.config]
    start = time.perf_counter()
    unet = build_unet(config, dtype)
    params = sum(p.numel() for p in unet.parameters())
    print(
        f"built {args.config} UNet: {params / 1e9:.3f} B parameters ({time.perf_counter() - start:.1f} s)",
        flush=True,
    )

    cross_dim = unet.config.cross_attention_dim
    batch = 2 if args.cfg else 1
    sample = torch.randn(batch, 4, args.latent, args.latent, dtype=dtype)
    timestep = torch.tensor([500])
    text = torch.randn(batch, TEXT_TOKENS, cross_dim, dtype=dtype)
    side = 8 * args.latent
    added = {
        "text_embeds": torch.randn(batch, pooled_dim, dtype=dtype),
        "time_ids": torch.tensor([[side, side, 0, 0, side, side]] * batch, dtype=dtype),
    }

    adapter = build_adapter(unet, args.tokens, args.token_dim, dtype)
    masks = torch.zeros(1, TEXT_TOKENS, dtype=torch.bool)
    masks[0, SUBJECT_POSITION] = True
    tokens = torch.randn(1, args.tokens, args.token_dim, dtype=dtype)
    # With --cfg, as NestedPipeline binds it: one prompt, image_index for the shared image; the
    # adapter doubles the masks for the UNet batch, the unconditional half without the subject.
    image_index = torch.zeros(1, dtype=torch.long) if args.cfg else None
    binding = SubjectBinding(tokens=tokens, masks=masks, image_index=image_index)
    start = time.perf_counter()
    with torch.no_grad():
        adapter.set_subjects([binding])  # the nested K/V of every layer, once (not timed)
    print(
        f"nested K/V of {len(binding.nested_kv)} layers cached ({time.perf_counter() - start:.1f} s)",
        flush=True,
    )

    ip_processors = build_ip_processors(unet, args.tokens, dtype)
    image_projection = MultiIPAdapterImageProjection([nn.Identity()])
    image_embeds = [torch.randn(batch, 1, args.tokens, cross_dim, dtype=dtype)]

    def plain_processors() -> None:
        unet.set_attn_processor(AttnProcessor2_0())

    def enter_ip() -> None:
        unet.set_attn_processor(dict(ip_processors))  # it pops the entries of the dict it gets
        # What UNet2DConditionModel._load_ip_adapter_weights does after building the processors.
        unet.encoder_hid_proj = image_projection
        unet.config.encoder_hid_dim_type = "ip_image_proj"

    def leave_ip() -> None:
        unet.encoder_hid_proj = None
        unet.config.encoder_hid_dim_type = None
        plain_processors()

    variants = {
        "plain": Variant("plain", plain_processors, lambda: None),
        "nested": Variant("nested", lambda: adapter.attach(unet), lambda: adapter.detach(unet)),
        "ip": Variant("ip", enter_ip, leave_ip, {"image_embeds": image_embeds}),
    }
    return Bench(unet, sample, timestep, text, added, adapter, binding, image_embeds, variants)


def run(bench: Bench, variant: Variant) -> Tensor:
    """One UNet forward of ``variant`` (entered and left around it, outside any timing)."""
    variant.enter()
    try:
        with torch.no_grad():
            return bench.unet(
                bench.sample,
                bench.timestep,
                encoder_hidden_states=bench.text,
                added_cond_kwargs={**bench.added, **variant.added},
            ).sample
    finally:
        variant.leave()


def timed(bench: Bench, variant: Variant) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one forward."""
    variant.enter()
    try:
        kwargs = {**bench.added, **variant.added}
        with torch.no_grad():
            wall, cpu = time.perf_counter(), time.process_time()
            bench.unet(
                bench.sample, bench.timestep, encoder_hidden_states=bench.text, added_cond_kwargs=kwargs
            )
            return time.perf_counter() - wall, time.process_time() - cpu
    finally:
        variant.leave()


# ------------------------------------------------------------------------------------- checks
def verify(bench: Bench) -> dict[str, float]:
    """The subject is active, and nested without an active subject is exactly plain."""
    from nested.adapter import SubjectBinding

    plain = run(bench, bench.variants["plain"])
    nested = run(bench, bench.variants["nested"])
    ip = run(bench, bench.variants["ip"])
    adapter = bench.adapter
    try:
        adapter.clear_subjects()
        no_subject = run(bench, bench.variants["nested"])
        absent = SubjectBinding(
            tokens=bench.binding.tokens,
            masks=torch.zeros_like(bench.binding.masks),
            image_index=bench.binding.image_index,
        )
        with torch.no_grad():
            adapter.set_subjects([absent])
        token_absent = run(bench, bench.variants["nested"])
    finally:
        adapter.set_subjects([bench.binding])
    assert bench.binding.nested_kv, "the subject's cached nested K/V were lost"
    scale = plain.abs().mean().item()
    checks = {
        "finite": bool(
            torch.isfinite(plain).all() and torch.isfinite(nested).all() and torch.isfinite(ip).all()
        ),
        "nested_vs_plain_rel_diff": (nested - plain).abs().mean().item() / scale,
        "ip_vs_plain_rel_diff": (ip - plain).abs().mean().item() / scale,
        "no_subject_equal": bool(torch.equal(no_subject, plain)),
        "token_absent_equal": bool(torch.equal(token_absent, plain)),
        # With --cfg, the unconditional sample has no subject: exactly the plain output.
        "unconditional_equal": bool(torch.equal(nested[0], plain[0])) if len(plain) == 2 else None,
    }
    print(
        "checks: outputs finite {finite}; nested vs plain mean |diff| / mean |plain| = "
        "{nested_vs_plain_rel_diff:.3g}; ip vs plain = {ip_vs_plain_rel_diff:.3g}; nested with no "
        "subject bound == plain: {no_subject_equal}; subject bound but token absent == plain: "
        "{token_absent_equal}; unconditional sample == plain: {unconditional_equal}".format(**checks),
        flush=True,
    )
    problems = []
    if not checks["finite"]:
        problems.append("non-finite outputs")
    if not checks["nested_vs_plain_rel_diff"] > 1e-4:
        problems.append("nested output equals plain: the subject is not active")
    if not checks["ip_vs_plain_rel_diff"] > 1e-4:
        problems.append("IP-Adapter output equals plain: the image tokens are not used")
    if not (
        checks["no_subject_equal"]
        and checks["token_absent_equal"]
        and checks["unconditional_equal"] is not False
    ):
        problems.append("nested without an active subject differs from plain")
    if problems:
        raise SystemExit("verification failed: " + "; ".join(problems))
    return checks


# -------------------------------------------------------------------------------------- flops
def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def count_flops(bench: Bench) -> dict[str, float]:
    """FLOPs of one forward per variant, and the analytic nested floor 4 x N_q x M x inner per layer."""
    # torch counts the CUDA SDPA kernels but not the CPU flash kernel: count it like them.
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}
    queries: dict[str, tuple[int, int]] = {}

    def record(name: str):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            n_q = hidden.shape[1] if hidden.ndim == 3 else hidden.shape[2] * hidden.shape[3]
            queries[name] = (n_q, module.to_v.out_features)

        return hook

    from nested.adapter import cross_attention_layers

    hooks = [
        module.register_forward_pre_hook(record(name), with_kwargs=True)
        for name, module in cross_attention_layers(bench.unet).items()
    ]
    flops = {}
    try:
        for name, variant in bench.variants.items():
            with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
                run(bench, variant)
            flops[name] = float(counter.get_total_flops())
    finally:
        for hook in hooks:
            hook.remove()
    tokens = bench.binding.tokens.shape[1]
    flops["nested_extra_analytic"] = float(sum(4 * n_q * tokens * inner for n_q, inner in queries.values()))
    flops["cross_attention_layers"] = len(queries)
    flops["floor"] = (flops["plain"] + flops["nested_extra_analytic"]) / flops["plain"]
    return flops


# ------------------------------------------------------------------------------------- timing
def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def time_pairs(
    bench: Bench, pairs: int, warmup: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per round, one forward of every variant; the order cycles through all permutations.

    Returns the wall-clock and the process CPU seconds of every step, per variant.
    """
    names = list(bench.variants)
    orders = list(itertools.permutations(names))
    for _ in range(warmup):
        for name in names:
            timed(bench, bench.variants[name])
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for i in range(pairs):
        for name in orders[i % len(orders)]:
            seconds, cpu_seconds = timed(bench, bench.variants[name])
            wall[name].append(seconds)
            cpu[name].append(cpu_seconds)
        print(
            f"pair {i + 1:2d}/{pairs}: "
            + "  ".join(f"{name} {wall[name][-1]:.3f} s (cpu {cpu[name][-1]:.3f} s)" for name in names),
            flush=True,
        )
    return wall, cpu


def print_setup(args: argparse.Namespace, flops: dict[str, float] | None) -> None:
    print(
        f"config {args.config}, latent {args.latent}x{args.latent}, batch {2 if args.cfg else 1}, M = {args.tokens}, d = {args.token_dim}, "
        f"{args.dtype}, {torch.get_num_threads()} threads, {args.pairs} pairs after {args.warmup} warmup rounds"
    )
    if flops is not None:
        print(
            f"FLOPs per step (torch FlopCounterMode): plain {flops['plain'] / 1e12:.4f} T, nested "
            f"{flops['nested'] / 1e12:.4f} T ({flops['nested'] / flops['plain']:.4f}x), IP-Adapter "
            f"{flops['ip'] / 1e12:.4f} T ({flops['ip'] / flops['plain']:.4f}x)"
        )
        print(
            f"nested floor: 4 x N_q x M x inner over {flops['cross_attention_layers']:.0f} attn2 layers = "
            f"{flops['nested_extra_analytic'] / 1e12:.4f} TFLOP -> {flops['floor']:.4f}x plain"
        )


def report(
    args: argparse.Namespace,
    times: dict[str, list[float]],
    flops: dict[str, float] | None,
    clock: str = "wall",
) -> dict:
    """The table: per variant, step times and the median (and IQR) of its per-pair ratio to plain.

    Every variant other than ``plain`` gets a ratio to plain; every ``nested*`` variant also one to
    ``ip``. ``min ratio`` is the ratio of the fastest steps, a second estimate that resists the
    one-sided slowdowns of a shared machine.
    """

    def per_pair(a: str, b: str) -> list[float]:
        return [x / y for x, y in zip(times[a], times[b], strict=True)]

    others = [name for name in times if name != "plain"]
    ratios = {f"{name}/plain": per_pair(name, "plain") for name in others}
    if "ip" in times:
        ratios.update({f"{name}/ip": per_pair(name, "ip") for name in others if name.startswith("nested")})
    summary = {name: quartiles(values) for name, values in {**times, **ratios}.items()}
    floors: dict[str, float] = {"plain": 1.0}
    if flops is not None:
        floors.update({name: flops["floor"] for name in times if name.startswith("nested")})
        floors["ip"] = flops["ip"] / flops["plain"]

    print()
    print(f"{clock} time per step:")
    width = max(8, *(len(name) for name in times))
    header = (
        f"{'variant':<{width}} | {'median step (s)':>15} | {'step IQR (s)':>15} | {'ratio vs plain':>14} | "
        f"{'ratio IQR':>13} | {'floor':>6} | {'min ratio':>9}"
    )
    print(header)
    print("-" * len(header))
    for name in times:
        t1, t2, t3 = summary[name]
        ratio, spread = "1.000", "-"
        if name != "plain":
            r1, r2, r3 = summary[f"{name}/plain"]
            ratio, spread = f"{r2:.3f}", f"{r1:.3f}-{r3:.3f}"
        floor = f"{floors[name]:.3f}" if name in floors else "-"
        best = min(times[name]) / min(times["plain"])
        print(
            f"{name:<{width}} | {t2:>15.3f} | {f'{t1:.3f}-{t3:.3f}':>15} | {ratio:>14} | {spread:>13} | "
            f"{floor:>6} | {best:>9.3f}"
        )
    verdicts, last_lines = [], []
    for name in (n for n in others if n.startswith("nested")):
        nested_plain = summary[f"{name}/plain"][1]
        verdicts.append(
            f"{name} <= 1.10x plain: {'PASS' if nested_plain <= 1.10 else 'MISS'} ({nested_plain:.3f})"
        )
        if "ip" in times:
            r1, r2, r3 = summary[f"{name}/ip"]
            flop_ratio = "" if flops is None else f", FLOP ratio {flops['nested'] / flops['ip']:.3f}"
            best = min(times[name]) / min(times["ip"])
            last_lines.append(
                f"{name}/IP-Adapter (equal M = {args.tokens}): median {r2:.3f}, IQR {r1:.3f}-{r3:.3f}, "
                f"min ratio {best:.3f}{flop_ratio}"
            )
            verdicts.append(f"{name} <= 1.03x IP-Adapter: {'PASS' if r2 <= 1.03 else 'MISS'} ({r2:.3f})")
    print("targets: " + "; ".join(verdicts))
    for line in last_lines:
        print(line)
    return {"times": times, "ratios": ratios, "summary": summary, "flops": flops}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.pairs < 1:
        raise SystemExit("--pairs must be >= 1")
    bench = build_bench(args)
    checks = verify(bench)
    flops = None
    if not args.no_flops:
        flops = count_flops(bench)
        print(
            f"FLOPs counted: plain {flops['plain'] / 1e12:.4f} T, floor {flops['floor']:.4f}x",
            flush=True,
        )
    wall, cpu = time_pairs(bench, args.pairs, args.warmup)
    print()
    print_setup(args, flops)
    results = {
        "wall": report(args, wall, flops, "wall-clock"),
        "cpu": report(args, cpu, flops, "process CPU"),
    }
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "checks": checks, "flops": flops, **results}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
