"""One FLUX.1 / SD3.5 transformer step, plain against nested, nested against FLUX's IP-Adapter, and the
training step, measured side by side.

For each architecture (FLUX.1-dev: 19 double- + 38 single-stream blocks; SD3.5-Large: 38 joint blocks;
SD3.5-Medium: 24, the first 13 with MMDiT-X's extra self-attention), built from its config with random
weights:

* ``inference``: one no-grad transformer forward, batch 1, with
  ``plain`` (diffusers' default processors), ``nested`` (one subject of M tokens bound, its nested K/V
  computed once by ``set_subjects`` and cached across steps, as ``NestedPipeline`` does),
  ``nested_recomputed`` (the K/V projected again inside the step) and, on FLUX, ``ip`` (diffusers'
  ``FluxIPAdapterAttnProcessor`` on the 19 double-stream blocks, installed as the transformer's
  IP-Adapter loader installs them, at the same M and token width; it projects its K/V inside every step).
* ``training``: ``nested``: bind the subject (nested projections with gradients), forward, MSE loss,
  backward, AdamW (``--optimizer adamw8bit``: torchao's AdamW8bit) on the adapter's nested projections; ``frozen``: the frozen transformer's own forward
  + backward on the same inputs (gradients to its input only), the floor any adapter's step pays.
  Peak memory of each on CUDA.

Models: ``--models real`` (default on CUDA): the real architectures in bf16 at 1024 px (4096 image
tokens, 512 T5 tokens for FLUX, 77 + 256 for SD3), M = 1024; ``narrow`` (default on CPU): the real depths
with tiny widths (2 heads of 16) at small latents (16 x 16 image tokens, 64 text tokens, M = 64: about
the real M / sequence proportion), float32; ``--head-dim 128`` gives them FLUX's head dim, where the
arithmetic, not the per-kernel cost, sets the ratios. ``--smoke``: 2-block models (narrow widths; the real ones with
``--models real``), tiny sizes, two rounds, for the test that keeps this script running.

Timing (``benchmarks/gpu/bench.py``'s helpers): CUDA events on a GPU, the process's CPU time on a CPU (run
with one torch thread, so other load on a shared host does not change it); variants interleaved in rounds
with the order rotating; ratios are medians of the per-round ratios.

    python benchmarks/dit_step.py                          # CPU: narrow models, a few minutes
    python benchmarks/dit_step.py --models real --json benchmarks/gpu/results/dit.json   # on a GPU
    python benchmarks/dit_step.py --smoke --json out.json  # seconds
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import FluxTransformer2DModel
from torch import Tensor, nn

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS / "gpu"))
sys.path.insert(0, str(BENCHMARKS))
import attention as attention_bench  # noqa: E402  (benchmarks/attention.py)
import bench as gpu_bench  # noqa: E402  (benchmarks/gpu/bench.py)
import quantize as quantize_bench  # noqa: E402  (benchmarks/quantize.py)
from dit_subject_share import ARCHITECTURES  # noqa: E402

from nested.adapter import SubjectBinding  # noqa: E402
from nested.files import write_text_atomic  # noqa: E402

Variant = gpu_bench.Variant
# Tiny widths; the depths (and SD3.5-Medium's dual-attention blocks) stay the real ones.
NARROW = dict(num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32)
NARROW_FLUX = dict(in_channels=16)
NARROW_SD3 = dict(sample_size=32, pos_embed_max_size=64)
SUBJECT_POSITION = 5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models", choices=["real", "narrow"], default=None, help="default: real on CUDA, else narrow"
    )
    parser.add_argument("--smoke", action="store_true", help="2-block models, tiny sizes, two rounds")
    parser.add_argument(
        "--architectures", nargs="+", choices=list(ARCHITECTURES), default=list(ARCHITECTURES)
    )
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument(
        "--side", type=int, default=None, help="image tokens per side (real 64 = 1024 px; narrow 16)"
    )
    parser.add_argument(
        "--text", type=int, default=None, help="text tokens (real: 512 FLUX, 333 SD3; narrow 64)"
    )
    parser.add_argument(
        "--tokens", type=int, default=None, help="M, nested tokens per subject (real 1024; narrow 64)"
    )
    parser.add_argument(
        "--token-dim", type=int, default=None, help="subject token width (real 1024; narrow 32)"
    )
    parser.add_argument(
        "--head-dim", type=int, default=16, help="narrow models' head dim, a multiple of 16 (2 heads)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 10; smoke 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 2; smoke 1)")
    parser.add_argument(
        "--dtype",
        choices=["bfloat16", "float32"],
        default=None,
        help="default: bfloat16 on CUDA, else float32",
    )
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="training steps with the transformer's checkpointing",
    )
    parser.add_argument(
        "--quantize",
        choices=["int8", "float8"],
        default=None,
        help="the frozen transformer's linear weights in 8 bits, as model.quantize stores them (torchao)",
    )
    parser.add_argument(
        "--optimizer",
        choices=["adamw", "adamw8bit"],
        default="adamw",
        help="the training step's optimizer: torch's AdamW, or torchao's AdamW8bit (moments in 8 bits)",
    )
    parser.add_argument("--no-training", action="store_true")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.models = args.models or ("real" if args.device.type == "cuda" and not args.smoke else "narrow")
    real = args.models == "real" and not args.smoke
    args.side = args.side or (64 if real else 4 if args.smoke else 16)
    args.tokens = args.tokens or (1024 if real else 4 if args.smoke else 64)
    args.token_dim = args.token_dim or (1024 if real else 32)
    args.repeats = args.repeats or (2 if args.smoke else 10)
    args.warmup = args.warmup or (1 if args.smoke else 2)
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.type == "cuda" else "float32"))
    return args


def build_model(name: str, args: argparse.Namespace) -> tuple[nn.Module, int]:
    """The transformer of ``name`` (random weights, frozen, on the device) and its text length."""
    cls, config, text = ARCHITECTURES[name]
    config = dict(config)
    if args.models == "narrow":
        config.update(NARROW, **(NARROW_FLUX if cls is FluxTransformer2DModel else NARROW_SD3))
        config["attention_head_dim"] = args.head_dim
        if cls is not FluxTransformer2DModel:  # SD3 projects the text to the blocks' width
            config["caption_projection_dim"] = NARROW["num_attention_heads"] * args.head_dim
        if cls is FluxTransformer2DModel:
            # The rotary axes split the head dim as FLUX's (16, 56, 56) splits 128.
            config["axes_dims_rope"] = (args.head_dim // 4, 3 * args.head_dim // 8, 3 * args.head_dim // 8)
        text = 64
    if args.smoke:
        depth = (
            {"num_layers": 2, "num_single_layers": 2} if cls is FluxTransformer2DModel else {"num_layers": 2}
        )
        config.update(depth)
        if "dual_attention_layers" in config:
            config["dual_attention_layers"] = (0,)
        text = 8
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    # Built in the run's dtype: FLUX.1's 12 B parameters in float32 would take 48 GB before the cast.
    torch.set_default_dtype(args.dtype)
    try:
        with torch.device(args.device):
            model = cls(**config)
    finally:
        torch.set_default_dtype(default_dtype)
    model = model.to(args.dtype).eval().requires_grad_(False)
    if args.quantize:
        from torchao.quantization import quantize_

        from nested.quantize import torchao_config

        quantize_(model, torchao_config(args.quantize))  # what from_pretrained's quantization_config applies
    return model, args.text or text


def model_inputs(model: nn.Module, side: int, text: int, generator: torch.Generator, args) -> dict[str, Any]:
    """One sample's transformer inputs: ``side`` x ``side`` image tokens and ``text`` text tokens."""
    config, device = model.config, args.device

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator, device=device, dtype=args.dtype)

    common = dict(
        encoder_hidden_states=randn(1, text, config.joint_attention_dim),
        pooled_projections=randn(1, config.pooled_projection_dim),
    )
    if isinstance(model, FluxTransformer2DModel):
        ids = torch.zeros(side, side, 3, device=device)
        ids[..., 1] = torch.arange(side, device=device)[:, None]
        ids[..., 2] = torch.arange(side, device=device)[None]
        guidance = torch.full((1,), 3.5, device=device) if config.guidance_embeds else None
        return dict(
            hidden_states=randn(1, side * side, config.in_channels),
            timestep=torch.full((1,), 0.5, device=device),
            img_ids=ids.reshape(-1, 3),
            txt_ids=torch.zeros(text, 3, device=device),
            guidance=guidance,
            **common,
        )
    pixels = side * config.patch_size
    return dict(
        hidden_states=randn(1, config.in_channels, pixels, pixels),
        timestep=torch.full((1,), 500.0, device=device),
        **common,
    )


def ip_processors(model: nn.Module, tokens: int, token_dim: int, dtype: torch.dtype) -> dict[str, object]:
    """FLUX IP-Adapter processors as ``FluxTransformer2DModel``'s IP-Adapter loader makes them: on the
    double-stream blocks, the default processor elsewhere."""
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, FluxIPAdapterAttnProcessor

    processors: dict[str, object] = {}
    for name in model.attn_processors:
        if name.startswith("transformer_blocks."):
            attn = model.get_submodule(name.removesuffix(".processor"))
            processor = FluxIPAdapterAttnProcessor(
                hidden_size=attn.inner_dim, cross_attention_dim=token_dim, num_tokens=(tokens,), scale=1.0
            )
            processors[name] = processor.to(device=model.device, dtype=dtype).eval().requires_grad_(False)
        else:
            processors[name] = FluxAttnProcessor()
    return processors


class StepBench:
    """One architecture: the transformer, a nested adapter for it, FLUX IP-Adapter processors, inputs."""

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        self.name, self.args = name, args
        self.model, self.text = build_model(name, args)
        self.is_flux = isinstance(self.model, FluxTransformer2DModel)
        self.generator = torch.Generator(device=args.device).manual_seed(1)
        self.inputs = model_inputs(self.model, args.side, self.text, self.generator, args)
        with torch.device(args.device):
            # float32 projections, as a trained adapter's; the processor casts the K/V to the model's dtype.
            self.adapter = attention_bench.build_adapter(
                self.model, args.tokens, args.token_dim, torch.float32
            )
        self.subject_tokens = torch.randn(
            1, args.tokens, args.token_dim, generator=self.generator, device=args.device
        )
        self.masks = torch.zeros(1, self.text, dtype=torch.bool)
        self.masks[0, SUBJECT_POSITION] = True
        self.default_processors = dict(self.model.attn_processors)
        self.ip = ip_processors(self.model, args.tokens, args.token_dim, args.dtype) if self.is_flux else None

    def binding(self) -> SubjectBinding:
        return SubjectBinding(tokens=self.subject_tokens, masks=self.masks)

    def forward(self, extra: dict | None = None) -> Tensor:
        return self.model(**self.inputs, **(extra or {})).sample

    # ------------------------------------------------------------------------------ variants
    def plain(self) -> None:
        self.model.set_attn_processor(dict(self.default_processors))

    def attach(self) -> None:
        self.adapter.attach(self.model)

    def detach(self) -> None:
        self.adapter.detach(self.model)

    def ip_enter(self) -> None:
        from diffusers.models.embeddings import MultiIPAdapterImageProjection

        self.model.set_attn_processor(dict(self.ip))  # it pops the entries of the dict it gets
        # What the IP-Adapter loader adds besides the processors: the image projection (here the identity:
        # the subject tokens are already the projected image embeddings).
        self.model.encoder_hid_proj = MultiIPAdapterImageProjection([nn.Identity()])

    def ip_leave(self) -> None:
        self.model.encoder_hid_proj = None
        self.plain()

    def inference_variants(self) -> dict[str, Variant]:
        def no_grad(fn: Callable[[], Tensor]) -> Callable[[], Tensor]:
            def run() -> Tensor:
                with torch.no_grad():
                    return fn()

            return run

        def recomputed() -> Tensor:
            self.adapter.set_subjects([self.binding()])
            return self.forward()

        with torch.no_grad():
            self.adapter.set_subjects([self.binding()])
        variants = {
            "plain": Variant(no_grad(self.forward), self.plain),
            "nested": Variant(no_grad(self.forward), self.attach, self.detach),
            "nested_recomputed": Variant(no_grad(recomputed), self.attach, self.detach),
        }
        if self.ip is not None:
            embeds = self.subject_tokens.to(self.args.dtype)[:, None]  # (B, 1 image, M, token dim)

            def ip_call() -> Tensor:
                # The transformer pops the embeddings from the dict: a new one per call.
                return self.forward({"joint_attention_kwargs": {"ip_adapter_image_embeds": [embeds]}})

            variants["ip"] = Variant(no_grad(ip_call), self.ip_enter, self.ip_leave)
        return variants

    def training_steps(self) -> dict[str, Callable[[], None]]:
        parameters = [p for layer in self.adapter.layers.values() for p in layer.parameters()]
        for parameter in parameters:
            parameter.requires_grad_(True)
        if self.args.optimizer == "adamw8bit":
            from torchao.optim import AdamW8bit

            optimizer = AdamW8bit(parameters, lr=1e-5)
        else:
            optimizer = torch.optim.AdamW(parameters, lr=1e-5)
        if self.args.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        target = torch.randn(
            self.forward_shape(), generator=self.generator, device=self.args.device, dtype=torch.float32
        )
        noisy = self.inputs["hidden_states"].clone().requires_grad_(True)

        def nested_step() -> None:
            self.adapter.set_subjects([self.binding()])
            loss = F.mse_loss(self.forward().float(), target)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            self.adapter.clear_subjects()

        def frozen_step() -> None:
            inputs = {**self.inputs, "hidden_states": noisy}
            loss = F.mse_loss(self.model(**inputs).sample.float(), target)
            loss.backward()
            noisy.grad = None

        return {
            "nested": Variant(nested_step, self.attach, self.detach),
            "frozen": Variant(frozen_step, self.plain),
        }

    def forward_shape(self) -> torch.Size:
        with torch.no_grad():
            return self.forward().shape


# ------------------------------------------------------------------------------------- checks
def inference(bench: StepBench, args: argparse.Namespace) -> dict:
    variants = bench.inference_variants()
    outputs = {name: variant().float() for name, variant in variants.items()}
    checks = {
        "finite": all(bool(out.isfinite().all()) for out in outputs.values()),
        "nested_differs_from_plain": not torch.equal(outputs["nested"], outputs["plain"]),
        "recomputed_equals_cached": torch.equal(outputs["nested"], outputs["nested_recomputed"]),
    }
    if "ip" in outputs:
        checks["ip_differs_from_plain"] = not torch.equal(outputs["ip"], outputs["plain"])
    times = gpu_bench.interleaved(variants, args.warmup, args.repeats, args.device)
    row: dict[str, Any] = {**gpu_bench.summarize(times), "checks": checks}
    row["nested/plain"] = gpu_bench.median_ratio(times, "nested", "plain")
    row["nested_recomputed/plain"] = gpu_bench.median_ratio(times, "nested_recomputed", "plain")
    if "ip" in times:
        row["ip/plain"] = gpu_bench.median_ratio(times, "ip", "plain")
        row["nested/ip"] = gpu_bench.median_ratio(times, "nested", "ip")
    return row


def training(bench: StepBench, args: argparse.Namespace) -> dict:
    steps = bench.training_steps()
    row: dict[str, Any] = {}
    for name, step in steps.items():
        memory = gpu_bench.peak_memory(step, args.device)
        row.update({f"{name}_{key}": value for key, value in memory.items()})
    times = gpu_bench.interleaved(steps, args.warmup, args.repeats, args.device)
    row.update(gpu_bench.summarize(times))
    row["nested/frozen"] = gpu_bench.median_ratio(times, "nested", "frozen")
    return row


def markdown(results: dict) -> str:
    setup = results["setup"]
    lines = [
        f"{setup['models']} models on {setup['device']} ({setup['dtype']}), {setup['side']} x {setup['side']} "
        f"image tokens, M = {setup['tokens']}, token dim {setup['token_dim']}"
        + (f", 2 heads of {setup['head_dim']}" if setup["head_dim"] else "")
        + (", training with gradient checkpointing" if setup["gradient_checkpointing"] else "")
        + (f", the transformer's linear weights in {setup['quantize']}" if setup.get("quantize") else "")
        + (", torchao's AdamW8bit" if setup.get("optimizer") == "adamw8bit" else "")
        + f"; medians of {setup['repeats']} rounds",
        "",
        "| architecture | text | weights GiB | plain ms | nested / plain | recomputed K/V / plain "
        "| IP-Adapter / plain | nested / IP-Adapter | train / frozen | train peak GiB | frozen peak GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in results["architectures"].items():
        infer, train = row.get("inference", {}), row.get("training", {})

        def cell(table: dict, key: str, digits: int = 3) -> str:
            value = table.get(key)
            return "-" if value is None else f"{value:.{digits}f}"

        lines.append(
            f"| {name} | {row.get('text_tokens', '-')} | {cell(row, 'weights_gib', 2)} | {cell(infer, 'plain_ms', 1)} "
            f"| {cell(infer, 'nested/plain')} "
            f"| {cell(infer, 'nested_recomputed/plain')} | {cell(infer, 'ip/plain')} | {cell(infer, 'nested/ip')} "
            f"| {cell(train, 'nested/frozen')} | {cell(train, 'nested_peak_gib', 1)} "
            f"| {cell(train, 'frozen_peak_gib', 1)} |"
        )
    lines += [
        f"\n{name} failed: {text.strip().splitlines()[-1]}"
        for name, text in results.get("errors", {}).items()
    ]
    return "\n".join(lines) + "\n"


def measure(name: str, args: argparse.Namespace, row: dict[str, Any]) -> None:
    """Fill ``row`` with one architecture's figures, section by section (a failure keeps the earlier ones)."""
    bench = StepBench(name, args)
    row.update(
        blocks=len(bench.adapter.config.layers),
        text_tokens=bench.text,
        weights_gib=quantize_bench.stored_bytes(bench.model) / 2**30,
    )
    row["inference"] = inference(bench, args)
    if not args.no_training:
        row["training"] = training(bench, args)


def run(args: argparse.Namespace, saved: Callable[[dict], None] = lambda results: None) -> dict:
    """Every architecture of ``args``; ``saved(results)`` after each. A failed architecture (out of memory,
    say) is recorded in ``errors`` with its traceback, and the next one still runs."""
    results: dict[str, Any] = {
        "setup": {
            "models": "smoke" if args.smoke else args.models,
            "device": torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "cpu",
            "dtype": str(args.dtype).removeprefix("torch."),
            "side": args.side,
            "tokens": args.tokens,
            "token_dim": args.token_dim,
            "head_dim": args.head_dim if args.models == "narrow" else None,
            "repeats": args.repeats,
            "gradient_checkpointing": args.gradient_checkpointing,
            "quantize": args.quantize,
            "optimizer": args.optimizer,
        },
        "architectures": {},
        "errors": {},
    }
    for name in args.architectures:
        row = results["architectures"][name] = {}
        try:
            measure(name, args, row)
        except Exception:  # a failed architecture is a result too
            results["errors"][name] = traceback.format_exc()
            print(results["errors"][name], file=sys.stderr, flush=True)
        # Outside the handler: the traceback no longer holds the failed step's tensors.
        gpu_bench.free_memory(args.device)
        print(f"{name}: {json.dumps(row)}", flush=True)
        saved(results)
    return results


def failed_checks(results: dict) -> list[str]:
    return [
        f"{name}: {check}"
        for name, row in results["architectures"].items()
        for check, ok in row.get("inference", {}).get("checks", {}).items()
        if not ok
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device.type == "cpu":
        torch.set_num_threads(1)

    def save(results: dict) -> None:
        if args.json:
            write_text_atomic(args.json, json.dumps(results, indent=2) + "\n")

    results = run(args, save)
    print("\n" + markdown(results))
    failed = failed_checks(results)
    if failed:
        print("checks failed: " + ", ".join(failed), file=sys.stderr)
    if results["errors"]:
        print("failed: " + ", ".join(results["errors"]), file=sys.stderr)
    return 1 if failed or results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
