"""The subject token's attention share in diffusion transformers, and what nested attention costs there.

Two parts, both on CPU in seconds:

1. ``p_s`` per layer: the attention probability the image queries give the subject token (summed over
   its positions), on tiny random SD3 and FLUX transformers built from config, through a probe processor
   that computes the layer's joint query and key exactly as :class:`nested.dit.NestedJointAttnProcessor`
   does (which equals diffusers' default processors bit for bit) and the softmax explicitly. Printed per
   layer: the mean over image queries, heads and prompts, the peak (largest single query-head value),
   and the uniform share 1 / S of a sequence of S keys for scale. In a joint block the subject token
   competes with every image and text key (4608 at FLUX's 1024 px, against 77 text keys in an SDXL
   cross-attention), so this is the first thing to measure on trained weights; random weights give
   shares near uniform, so these numbers only check the measurement. ``--flux-layers``, ``--latent``,
   ``--text`` size the model.

2. Counts on the real architectures, built on the meta device (no weights, no download; configs written
   out below): parameters of the transformer and of a nested adapter's per-layer projections, and the
   FLOPs (``torch.utils.flop_counter``) of one transformer forward at ``--resolution`` px with and without
   one bound subject of M = ``--tokens`` nested tokens, on every joint / single-stream layer. The nested
   share is split into the nested attention itself (``4 x N_image x M x inner`` per layer), the extra value
   columns of the fused call (the one-hot column padded to a multiple of 8: head dim 128 -> 136, 64 -> 72,
   which the counter charges to the whole attention) and the per-layer K/V projection of the M tokens,
   which does not depend on the timestep: computed once per subject image when cached across steps.

    python benchmarks/dit_subject_share.py                # both parts, about 10 s
    python benchmarks/dit_subject_share.py --no-counts    # the p_s table only
    python benchmarks/dit_subject_share.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from torch.utils.flop_counter import FlopCounterMode

from nested.adapter import cross_attention_layers
from nested.attention import NestedSubject
from nested.dit import NestedJointAttnProcessor, joint_layer_fingerprint, joint_layout

# black-forest-labs/FLUX.1-dev, transformer/config.json (FLUX.1-schnell: the same without guidance_embeds).
FLUX1_DEV = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
# stabilityai/stable-diffusion-3.5-large, transformer/config.json.
SD35_LARGE = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    num_layers=38,
    attention_head_dim=64,
    num_attention_heads=38,
    joint_attention_dim=4096,
    caption_projection_dim=2432,
    pooled_projection_dim=2048,
    out_channels=16,
    pos_embed_max_size=192,
    qk_norm="rms_norm",
)
# stabilityai/stable-diffusion-3.5-medium, transformer/config.json (MMDiT-X: an extra image self-attention
# in the first 13 blocks).
SD35_MEDIUM = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    out_channels=16,
    pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)),
    qk_norm="rms_norm",
)
ARCHITECTURES = {
    # name: (class, config, text tokens: FLUX's T5 512; SD3's 77 CLIP + 256 T5)
    "FLUX.1-dev": (FluxTransformer2DModel, FLUX1_DEV, 512),
    "SD3.5-Large": (SD3Transformer2DModel, SD35_LARGE, 333),
    "SD3.5-Medium": (SD3Transformer2DModel, SD35_MEDIUM, 333),
}


class FixedSubject:
    """A binding handing every layer one subject whose nested keys/values it makes up (random or meta)."""

    def __init__(self, mask: torch.Tensor, tokens: int, *, seed: int = 0):
        self.mask, self.tokens, self.seed = mask, tokens, seed

    def subjects(self, attn, batch_size, dtype):
        heads, head_dim = attn.heads, attn.to_q.out_features // attn.heads
        shape = (batch_size, heads, self.tokens, head_dim)
        if self.mask.is_meta:
            keys = values = torch.empty(shape, device="meta", dtype=dtype)
        else:
            generator = torch.Generator().manual_seed(self.seed)
            keys, values = (torch.randn(shape, generator=generator, dtype=dtype) for _ in range(2))
        present = (True,) * batch_size
        return [NestedSubject(mask=self.mask, keys=keys, values=values, present=present)]


# ---------------------------------------------------------------------------------------- p_s
class ShareProbe(NestedJointAttnProcessor):
    """The layer's plain output, recording the subject token's attention share on the image queries."""

    def __init__(self, layer_name, original_processor, layout, positions: list[int], text_length: int):
        super().__init__(layer_name, original_processor, layout)
        self.positions = positions
        self.text_length = text_length if layout == "single" else None
        self.shares: list[torch.Tensor] = []

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None
    ):
        query, key, _ = self.joint_projections(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        start, stop = self.text_span(hidden_states, encoder_hidden_states)
        q, k = query.transpose(1, 2).double(), key.transpose(1, 2).double()  # (B, H, S, D)
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        image = torch.cat([torch.arange(0, start), torch.arange(stop, q.shape[2])])
        subject = torch.tensor(self.positions) + start
        self.shares.append(probs[:, :, image][..., subject].sum(-1))  # (B, H, N_image)
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)


def tiny_models(flux_layers: tuple[int, int]) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    flux = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=flux_layers[0],
        num_single_layers=flux_layers[1],
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(4, 4, 8),
    )
    sd3 = SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=4,
        num_layers=sum(flux_layers),
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=32,
        pooled_projection_dim=32,
        out_channels=4,
        pos_embed_max_size=64,
        qk_norm="rms_norm",
    )
    return {"tiny FLUX": flux.eval(), "tiny SD3": sd3.eval()}


def tiny_inputs(model, latent: int, text: int, batch: int) -> dict:
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randn(batch, text, 32, generator=generator)
    pooled = torch.randn(batch, 32, generator=generator)
    if isinstance(model, FluxTransformer2DModel):
        ids = torch.zeros(latent, latent, 3)
        ids[..., 1] = torch.arange(latent)[:, None]
        ids[..., 2] = torch.arange(latent)[None]
        return dict(
            hidden_states=torch.randn(batch, latent * latent, 4, generator=generator),
            encoder_hidden_states=prompt,
            pooled_projections=pooled,
            timestep=torch.full((batch,), 0.5),
            img_ids=ids.reshape(-1, 3),
            txt_ids=torch.zeros(text, 3),
        )
    return dict(
        hidden_states=torch.randn(batch, 4, 2 * latent, 2 * latent, generator=generator),
        encoder_hidden_states=prompt,
        pooled_projections=pooled,
        timestep=torch.full((batch,), 500.0),
    )


def measure_shares(args) -> dict:
    results = {}
    for name, model in tiny_models(tuple(args.flux_layers)).items():
        probes = {}
        for layer, attn in cross_attention_layers(model).items():
            probes[layer] = ShareProbe(layer, attn.processor, joint_layout(attn), [args.position], args.text)
            attn.set_processor(probes[layer])
        inputs = tiny_inputs(model, args.latent, args.text, args.prompts)
        with torch.no_grad():
            model(**inputs)
        keys = args.latent * args.latent + args.text
        rows = []
        for layer, probe in probes.items():
            (share,) = probe.shares
            rows.append({"layer": layer, "mean": share.mean().item(), "peak": share.max().item()})
        results[name] = {"keys": keys, "uniform": 1 / keys, "layers": rows}
        print(
            f"\n{name}: p_s of the subject token (position {args.position}) on the image queries, "
            f"{args.prompts} prompts, {keys} keys (uniform 1/S = {1 / keys:.4f}); random weights"
        )
        print(f"  {'layer':40s} {'mean':>8s} {'peak':>8s}")
        for row in rows:
            print(f"  {row['layer']:40s} {row['mean']:8.4f} {row['peak']:8.4f}")
    return results


# ------------------------------------------------------------------------------------- counts
def meta_inputs(model, resolution: int, text: int) -> dict:
    """One 1024 px sample's transformer inputs on the meta device (FLUX: 2x2-packed latents)."""
    latent = resolution // 8
    config = model.config
    with torch.device("meta"):
        if isinstance(model, FluxTransformer2DModel):
            tokens = (latent // 2) ** 2
            return dict(
                hidden_states=torch.empty(1, tokens, config.in_channels),
                encoder_hidden_states=torch.empty(1, text, config.joint_attention_dim),
                pooled_projections=torch.empty(1, config.pooled_projection_dim),
                timestep=torch.empty(1),
                img_ids=torch.zeros(tokens, 3),
                txt_ids=torch.zeros(text, 3),
                guidance=torch.empty(1) if config.guidance_embeds else None,
            )
        return dict(
            hidden_states=torch.empty(1, config.in_channels, latent, latent),
            encoder_hidden_states=torch.empty(1, text, config.joint_attention_dim),
            pooled_projections=torch.empty(1, config.pooled_projection_dim),
            timestep=torch.empty(1),
        )


def forward_flops(model, inputs) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(**inputs)
    return counter.get_total_flops()


def count(name: str, args) -> dict:
    cls, config, text = ARCHITECTURES[name]
    with torch.device("meta"):
        model = cls(**config).eval()
    parameters = sum(p.numel() for p in model.parameters())
    layers = cross_attention_layers(model)
    fingerprints = {layer: joint_layer_fingerprint(attn) for layer, attn in layers.items()}
    inputs = meta_inputs(model, args.resolution, text)
    image_tokens = (args.resolution // 16) ** 2

    plain = forward_flops(model, inputs)
    binding = FixedSubject(torch.zeros(1, text, dtype=torch.bool, device="meta"), args.tokens)
    for layer, attn in layers.items():
        processor = NestedJointAttnProcessor(layer, attn.processor, joint_layout(attn))
        processor.text_length = text
        processor.bindings.append(binding)
        attn.set_processor(processor)
    nested = forward_flops(model, inputs)

    inner = [dims["inner_dim"] for dims in fingerprints.values()]
    attention = sum(4 * image_tokens * args.tokens * width for width in inner)
    projection = sum(4 * args.tokens * args.token_dim * width for width in inner)
    adapter_parameters = sum(2 * args.token_dim * width for width in inner)
    double = [layer for layer in layers if not layer.startswith("single_")]
    result = {
        "parameters": parameters,
        "layers": len(layers),
        "double_stream_layers": len(double),
        "adapter_projection_parameters": adapter_parameters,
        "image_tokens": image_tokens,
        "text_tokens": text,
        "plain_tflops": plain / 1e12,
        "nested_tflops": nested / 1e12,
        "nested_attention_tflops": attention / 1e12,
        "value_columns_tflops": (nested - plain - attention) / 1e12,
        "projection_tflops_per_image": projection / 1e12,
        # what caching them costs: every layer's (M, inner) keys and values of one subject image, in bf16
        "cached_kv_gib_per_image_bf16": sum(2 * args.tokens * width * 2 for width in inner) / 2**30,
        "share_cached": (nested - plain) / plain,
        "share_recomputed": (nested - plain + projection) / plain,
    }
    print(
        f"\n{name}: {parameters / 1e9:.2f} B parameters, {len(layers)} nested layers ({len(double)} joint/double, "
        f"{len(layers) - len(double)} single), {image_tokens} image + {text} text tokens at {args.resolution} px, "
        f"M = {args.tokens}, token dim {args.token_dim}"
    )
    print(f"  adapter projections      {adapter_parameters / 1e6:9.1f} M parameters")
    print(f"  plain forward            {plain / 1e12:9.2f} TFLOP")
    print(f"  nested forward           {nested / 1e12:9.2f} TFLOP  (+{100 * result['share_cached']:.2f} %)")
    print(f"    nested attention       {attention / 1e12:9.2f} TFLOP")
    print(f"    extra value columns    {result['value_columns_tflops']:9.2f} TFLOP")
    print(
        f"  K/V projection per image {projection / 1e12:9.2f} TFLOP  (every step: +{100 * result['share_recomputed']:.2f} %); "
        f"cached: {result['cached_kv_gib_per_image_bf16']:.2f} GiB in bf16"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flux-layers", type=int, nargs=2, default=(2, 4), metavar=("DOUBLE", "SINGLE"))
    parser.add_argument("--latent", type=int, default=16, help="tiny models: image tokens per side")
    parser.add_argument("--text", type=int, default=32, help="tiny models: text tokens")
    parser.add_argument("--position", type=int, default=5, help="the subject token's position in the text")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=1024, help="M, the nested tokens per subject")
    parser.add_argument("--token-dim", type=int, default=1024, help="the subject tokens' width")
    parser.add_argument("--no-counts", action="store_true")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    started = time.perf_counter()
    results = {"shares": measure_shares(args)}
    if not args.no_counts:
        results["counts"] = {name: count(name, args) for name in ARCHITECTURES}
    print(f"\n{time.perf_counter() - started:.1f} s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
