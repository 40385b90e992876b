"""What storing the frozen models' linear weights in 8 bits (``model.quantize``) saves, and what it changes.

1. ``memory``: the weight memory of each large frozen model of the recipes, in bf16 and with its linear
   weights in int8 or float8 as torchao stores them (1 byte per weight, a float32 scale per output row, and
   for int8 an int8 zero point per row; everything else stays bf16). Counted on the meta device from the
   real architectures: FLUX.1-dev, SD3.5-Large and -Medium, T5-XXL, the SDXL UNet and the CLIP text towers.
2. ``budget``: per faces recipe (M = 1024 subject tokens of width 1024, a 4-layer resampler over ViT-H/14),
   the memory every step holds before any activation: the frozen models' weights in bf16, and with the
   denoiser and T5 (SDXL: CLIP-G) quantized as ``model.quantize`` stores them in int8, plus the adapter's
   training state (float32 weights, gradients and AdamW's two moments: 16 bytes per parameter), and that
   state with torchao's ``AdamW8bit`` (its moments in 8 bits with a float32 scale per block of 256, and a
   256-entry float32 code map, for tensors of at least 4096 values; smaller ones keep float32 moments),
   and all of that without T5, which a prompt cache (``model.prompt_cache``) leaves unloaded.
3. ``check``: the count checked against real quantized models, loaded through ``from_pretrained`` with the
   project's ``quantization_config`` (:func:`nested.backbone.load_backbone`'s path): a real-width FLUX.1
   transformer cut to one double- and one single-stream block, and a real-width T5-XXL cut to one layer,
   random weights. Their tensors' bytes are summed and compared with the count, and the output drift of the
   quantized transformer against bf16 is measured on random inputs (random weights: trained ones have other
   outliers, so this is the order of magnitude, not the trained model's figure). The 8-bit optimizer's
   count is checked the same way: AdamW8bit steps once on the real-width adapter of the cut transformer,
   and the bytes its state holds are summed.

    python benchmarks/quantize.py                 # under a minute, 2 GB of disk in a temporary folder
    python benchmarks/quantize.py --json benchmarks/quantize.cpu.json
    python benchmarks/quantize.py --smoke         # the check on narrow cuts: seconds (the test's)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel, UNet2DConditionModel
from torch import nn
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    T5Config,
    T5EncoderModel,
)

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS))
import attention as attention_bench  # noqa: E402  (benchmarks/attention.py)
from dit_subject_share import ARCHITECTURES  # noqa: E402

from nested.encoder import Resampler  # noqa: E402
from nested.files import write_text_atomic  # noqa: E402
from nested.quantize import FORMATS, component_config  # noqa: E402
from nested.testing import (  # noqa: E402
    SDXL_TEXT_ENCODER_2_CONFIG,
    SDXL_TEXT_ENCODER_CONFIG,
    SDXL_UNET_CONFIG,
    SDXL_VAE_CONFIG,
    VIT_H_14_CONFIG,
)

# google/t5-v1_1-xxl's encoder: FLUX.1's text_encoder_2 and SD3's text_encoder_3.
T5_XXL = dict(
    d_model=4096,
    d_ff=10240,
    d_kv=64,
    num_heads=64,
    num_layers=24,
    vocab_size=32128,
    feed_forward_proj="gated-gelu",
    is_encoder_decoder=False,
)


def real_models() -> dict[str, callable]:
    """Name -> builder of the real architecture (called under the meta device)."""
    models = {
        name: (lambda cls=cls, config=config: cls(**config))
        for name, (cls, config, _) in ARCHITECTURES.items()
    }
    models.update(
        {
            "T5-XXL encoder": lambda: T5EncoderModel(T5Config(**T5_XXL)),
            "SDXL UNet": lambda: UNet2DConditionModel(**SDXL_UNET_CONFIG),
            "CLIP-L text": lambda: CLIPTextModel(CLIPTextConfig(**SDXL_TEXT_ENCODER_CONFIG)),
            "CLIP-G text": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_ENCODER_2_CONFIG)),
            "VAE (16 channels)": lambda: AutoencoderKL(**{**SDXL_VAE_CONFIG, "latent_channels": 16}),
            "VAE (4 channels)": lambda: AutoencoderKL(**SDXL_VAE_CONFIG),
            "ViT-H/14 image": lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**VIT_H_14_CONFIG)),
        }
    )
    return models


def counted_bytes(model: nn.Module, format_name: str | None) -> int:
    """Weight bytes of ``model`` in bf16, with its linear weights stored in ``format_name`` (None: bf16)."""
    total, seen = 0, set()
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            if id(parameter) in seen:  # tied weights (T5's shared embedding) count once
                continue
            seen.add(id(parameter))
            if format_name and isinstance(module, nn.Linear) and name == "weight":
                rows = parameter.shape[0]
                total += parameter.numel() + rows * 4 + (rows if format_name == "int8" else 0)
            else:
                total += parameter.numel() * 2
    return total


def held_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes ``tensors`` hold, each storage once: a torchao tensor's inner tensors (its 8-bit data, scales,
    code map), a plain tensor's own."""
    total, seen = 0, set()
    for tensor in tensors:
        inner = (
            [getattr(tensor, name) for name in tensor.__tensor_flatten__()[0]]
            if hasattr(tensor, "__tensor_flatten__")
            else [tensor]
        )
        for part in inner:
            if part.untyped_storage().data_ptr() not in seen:  # tied weights, a shared code map: once
                seen.add(part.untyped_storage().data_ptr())
                total += part.nbytes
    return total


def stored_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters and buffers as they are held."""
    return held_bytes([*model.parameters(), *model.buffers()])


def memory() -> dict[str, dict[str, float]]:
    rows = {}
    for name, build in real_models().items():
        if name.startswith(("VAE", "ViT")):  # not quantizable by model.quantize: only in the budget
            continue
        with torch.device("meta"):
            model = build()
        parameters = sum(p.numel() for p in model.parameters())
        linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
        rows[name] = {
            "parameters_b": parameters / 1e9,
            "linear_share": linear / parameters,
            "bf16_gib": counted_bytes(model, None) / 2**30,
            **{f"{fmt}_gib": counted_bytes(model, fmt) / 2**30 for fmt in FORMATS},
        }
        print(f"{name}: {json.dumps(rows[name])}", flush=True)
    return rows


# Per recipe: its frozen models by component name, and the components model.quantize stores in int8 (the
# denoiser and T5; SDXL, without T5: its CLIP-G). Every recipe also holds the ViT-H/14 image tower.
SD3_TEXT = {
    "text_encoder": "CLIP-L text",
    "text_encoder_2": "CLIP-G text",
    "text_encoder_3": "T5-XXL encoder",
}
RECIPES = {
    "FLUX.1-dev": (
        {
            "transformer": "FLUX.1-dev",
            "text_encoder": "CLIP-L text",
            "text_encoder_2": "T5-XXL encoder",
            "vae": "VAE (16 channels)",
        },
        ["transformer", "text_encoder_2"],
    ),
    "SD3.5-Large": (
        {"transformer": "SD3.5-Large", **SD3_TEXT, "vae": "VAE (16 channels)"},
        ["transformer", "text_encoder_3"],
    ),
    "SD3.5-Medium": (
        {"transformer": "SD3.5-Medium", **SD3_TEXT, "vae": "VAE (16 channels)"},
        ["transformer", "text_encoder_3"],
    ),
    "SDXL": (
        {
            "unet": "SDXL UNet",
            "text_encoder": "CLIP-L text",
            "text_encoder_2": "CLIP-G text",
            "vae": "VAE (4 channels)",
        },
        ["unet", "text_encoder_2"],
    ),
}


def adapter_parameters(denoiser: nn.Module) -> list[nn.Parameter]:
    """The faces recipes' adapter on ``denoiser``: the resampler over ViT-H/14 features and every layer's
    nested key and value projections (float32; built on the current device)."""
    resampler = Resampler(input_dim=1280, num_tokens=1024, width=1024, depth=4, heads=16, output_dim=1024)
    adapter = attention_bench.build_adapter(denoiser, 1024, 1024, torch.float32)
    return [*resampler.parameters(), *adapter.layers.parameters()]


# torchao's AdamW8bit (block_size 256): a moment is stored in 8 bits when its tensor has at least 4096 values,
# a multiple of the block size; each such moment holds a float32 scale per block and a 256-entry float32 map.
BLOCK = 256


def adamw_state_bytes(parameters: list[nn.Parameter], eight_bit: bool) -> int:
    """Bytes of AdamW's two moments for ``parameters``: float32, or as torchao's AdamW8bit stores them."""
    total = 0
    for parameter in parameters:
        size = parameter.numel()
        if eight_bit and size >= 4096 and size % BLOCK == 0:
            total += 2 * (size + size // BLOCK * 4 + 256 * 4)
        else:
            total += 2 * size * 4
    return total


def adapter_state_bytes(parameters: list[nn.Parameter], eight_bit: bool) -> int:
    """The adapter's training state: float32 weights and gradients, and AdamW's moments."""
    return sum(p.numel() * 8 for p in parameters) + adamw_state_bytes(parameters, eight_bit)


def budget() -> dict[str, dict[str, float]]:
    builders = real_models()
    rows = {}
    for recipe, (components, quantized_components) in RECIPES.items():
        frozen = {}
        for component, name in {**components, "image_encoder": "ViT-H/14 image"}.items():
            with torch.device("meta"):
                frozen[component] = builders[name]()
        bf16 = sum(counted_bytes(model, None) for model in frozen.values())
        quantized = sum(
            counted_bytes(model, "int8" if component in quantized_components else None)
            for component, model in frozen.items()
        )
        with torch.device("meta"):
            adapter = adapter_parameters(frozen["unet" if "unet" in frozen else "transformer"])
        t5 = [component for component, name in components.items() if name == "T5-XXL encoder"]
        rows[recipe] = {
            "quantize": ", ".join(quantized_components),
            "frozen_bf16_gib": bf16 / 2**30,
            "frozen_quantized_gib": quantized / 2**30,
            "adapter_parameters_m": sum(p.numel() for p in adapter) / 1e6,
            "adapter_training_state_gib": adapter_state_bytes(adapter, eight_bit=False) / 2**30,
            "adapter_training_state_8bit_gib": adapter_state_bytes(adapter, eight_bit=True) / 2**30,
            # With a prompt cache (model.prompt_cache) T5 is not loaded at all.
            "frozen_quantized_without_t5_gib": (quantized - sum(counted_bytes(frozen[c], "int8") for c in t5))
            / 2**30
            if t5
            else None,
        }
        print(f"{recipe}: {json.dumps(rows[recipe])}", flush=True)
    return rows


def flux_inputs(config, generator: torch.Generator) -> dict:
    side, text = 16, 32
    ids = torch.zeros(side, side, 3)
    ids[..., 1] = torch.arange(side)[:, None]
    ids[..., 2] = torch.arange(side)[None]
    return dict(
        hidden_states=torch.randn(1, side * side, config.in_channels, generator=generator).bfloat16(),
        encoder_hidden_states=torch.randn(
            1, text, config.joint_attention_dim, generator=generator
        ).bfloat16(),
        pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=generator).bfloat16(),
        timestep=torch.full((1,), 0.5),
        img_ids=ids.reshape(-1, 3),
        txt_ids=torch.zeros(text, 3),
        guidance=torch.full((1,), 3.5),
    )


def relative_rms(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float(
        (value.float() - reference.float()).pow(2).mean().sqrt() / reference.float().pow(2).mean().sqrt()
    )


# The narrow cuts of --smoke: FLUX.1's and T5's layers with tiny widths.
NARROW_FLUX = dict(
    num_attention_heads=2, attention_head_dim=16, joint_attention_dim=32, axes_dims_rope=(4, 4, 8)
)
NARROW_T5 = dict(d_model=32, d_ff=64, d_kv=16, num_heads=2, vocab_size=128)


def check(folder: Path, smoke: bool = False) -> dict[str, dict]:
    """Count against the tensors of real-width models quantized through from_pretrained; output drift."""
    cls, config, _ = ARCHITECTURES["FLUX.1-dev"]
    torch.manual_seed(0)
    flux_config = {**config, "num_layers": 1, "num_single_layers": 1, **(NARROW_FLUX if smoke else {})}
    dense = cls(**flux_config).to(torch.bfloat16).eval().requires_grad_(False)
    dense.save_pretrained(folder / "flux")
    t5_config = {**T5_XXL, "num_layers": 1, **(NARROW_T5 if smoke else {})}
    t5 = T5EncoderModel(T5Config(**t5_config)).to(torch.bfloat16).eval()
    t5.save_pretrained(folder / "t5")
    inputs = flux_inputs(dense.config, torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = dense(**inputs).sample
    results = {}
    for fmt in FORMATS:
        flux = FluxTransformer2DModel.from_pretrained(
            folder / "flux",
            torch_dtype=torch.bfloat16,
            quantization_config=component_config("transformer", fmt),
        )
        encoder = T5EncoderModel.from_pretrained(
            folder / "t5", dtype=torch.bfloat16, quantization_config=component_config("text_encoder_2", fmt)
        )
        with torch.no_grad():
            output = flux(**inputs).sample
        weights = [
            relative_rms(layer.weight.dequantize(), dict(dense.named_modules())[name].weight)
            for name, layer in flux.named_modules()
            if isinstance(layer, nn.Linear)
        ]
        results[fmt] = {
            "flux_1+1_blocks_stored_gib": stored_bytes(flux) / 2**30,
            "flux_1+1_blocks_counted_gib": counted_bytes(dense, fmt) / 2**30,
            "t5_1_layer_stored_gib": stored_bytes(encoder) / 2**30,
            "t5_1_layer_counted_gib": counted_bytes(t5, fmt) / 2**30,
            "weights_relative_rms": sum(weights) / len(weights),
            "output_relative_rms": relative_rms(output, reference),
        }
        print(f"{fmt}: {json.dumps(results[fmt])}", flush=True)
    results["bf16"] = {
        "flux_1+1_blocks_stored_gib": stored_bytes(dense) / 2**30,
        "flux_1+1_blocks_counted_gib": counted_bytes(dense, None) / 2**30,
    }
    results["adamw8bit"] = check_optimizer_state(dense)
    return results


def check_optimizer_state(denoiser: nn.Module) -> dict[str, float]:
    """torchao's AdamW8bit after one step on the faces adapter of ``denoiser``: the bytes its moments hold
    against :func:`adamw_state_bytes`."""
    from torchao.optim import AdamW8bit

    torch.manual_seed(0)
    parameters = adapter_parameters(denoiser)
    for parameter in parameters:
        parameter.requires_grad_(True)
        parameter.grad = torch.randn_like(parameter)
    optimizer = AdamW8bit(parameters, lr=1e-4)
    optimizer.step()
    held = held_bytes(
        [state[name] for state in optimizer.state.values() for name in ("exp_avg", "exp_avg_sq")]
    )
    row = {
        "adapter_parameters_m": sum(p.numel() for p in parameters) / 1e6,
        "moments_stored_gib": held / 2**30,
        "moments_counted_gib": adamw_state_bytes(parameters, eight_bit=True) / 2**30,
        "moments_float32_gib": adamw_state_bytes(parameters, eight_bit=False) / 2**30,
    }
    print(f"adamw8bit: {json.dumps(row)}", flush=True)
    return row


def markdown(results: dict) -> str:
    lines = [
        "| frozen model | parameters | linear share | bf16 GiB | int8 GiB | float8 GiB |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in results["memory"].items():
        lines.append(
            f"| {name} | {row['parameters_b']:.2f} B | {row['linear_share']:.1%} | {row['bf16_gib']:.2f} "
            f"| {row['int8_gib']:.2f} | {row['float8_gib']:.2f} |"
        )
    lines += [
        "",
        "| faces recipe | frozen models, bf16 GiB | quantized (`model.quantize`: int8) | GiB | adapter parameters "
        "| adapter weights + gradients + AdamW GiB | held before activations, quantized GiB "
        "| adapter state with AdamW8bit GiB | held, quantized + AdamW8bit GiB | the same, T5 cached GiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for recipe, row in results["budget"].items():
        held = row["frozen_quantized_gib"] + row["adapter_training_state_gib"]
        held_8bit = row["frozen_quantized_gib"] + row["adapter_training_state_8bit_gib"]
        without_t5 = row["frozen_quantized_without_t5_gib"]
        cached = "-" if without_t5 is None else f"{without_t5 + row['adapter_training_state_8bit_gib']:.1f}"
        lines.append(
            f"| {recipe} | {row['frozen_bf16_gib']:.1f} | {row['quantize']} | {row['frozen_quantized_gib']:.1f} "
            f"| {row['adapter_parameters_m']:.0f} M | {row['adapter_training_state_gib']:.1f} | {held:.1f} "
            f"| {row['adapter_training_state_8bit_gib']:.1f} | {held_8bit:.1f} | {cached} |"
        )
    if "check" in results:
        check_rows = results["check"]
        lines += [
            "",
            "| FLUX.1 and T5 cut to one block / layer, from_pretrained | bytes held / counted | weights' relative RMS error "
            "| transformer output's relative RMS drift (random weights) |",
            "|---|---|---|---|",
        ]
        for fmt in FORMATS:
            row = check_rows[fmt]
            flux = row["flux_1+1_blocks_stored_gib"] / row["flux_1+1_blocks_counted_gib"]
            t5 = row["t5_1_layer_stored_gib"] / row["t5_1_layer_counted_gib"]
            lines.append(
                f"| {fmt} | FLUX {flux:.4f}, T5 {t5:.4f} | {row['weights_relative_rms']:.4f} "
                f"| {row['output_relative_rms']:.4f} |"
            )
        row = check_rows["adamw8bit"]
        lines += [
            "",
            f"AdamW8bit after one step on the cut transformer's adapter ({row['adapter_parameters_m']:.1f} M "
            f"parameters): its moments hold {row['moments_stored_gib']:.4f} GiB, counted "
            f"{row['moments_counted_gib']:.4f} (float32 AdamW: {row['moments_float32_gib']:.4f}).",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-check", action="store_true", help="only the counts (seconds, no disk)")
    parser.add_argument("--smoke", action="store_true", help="the check on narrow cuts (seconds)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    results = {"memory": memory(), "budget": budget()}
    if not args.no_check:
        with tempfile.TemporaryDirectory() as folder:
            results["check"] = check(Path(folder), args.smoke)
    print(markdown(results))
    if args.json:
        write_text_atomic(Path(args.json), json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
