"""Tiny random diffusers checkpoints written to disk, for tests and the CPU demo.

Everything here is written in the exact layout of real checkpoints (``model_index.json``, one folder per
component, safetensors weights, ``vocab.json`` + ``merges.txt`` CLIP tokenizers, a ``tokenizer.json`` T5
tokenizer), so code under test loads it
through the same ``from_pretrained`` path as real weights. Weights are random but deterministic given the
seed; a whole pipeline is well under 3 MB.
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    Dinov2Config,
    Dinov2Model,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from nested.backbone import DiffusionBackbone
from nested.encoder import CLIP_MEAN, CLIP_STD

try:  # transformers >= 5 without torchvision: the PIL backends, imported directly to avoid a fallback warning
    from transformers import BitImageProcessorPil as BitImageProcessor
    from transformers import CLIPImageProcessorPil as CLIPImageProcessor
except ImportError:  # transformers 4.x
    from transformers import BitImageProcessor, CLIPImageProcessor

__all__ = [
    "SDXL_TEXT_ENCODER_2_CONFIG",
    "SDXL_TEXT_ENCODER_CONFIG",
    "SDXL_UNET_CONFIG",
    "SDXL_VAE_CONFIG",
    "NARROW_WIDTHS",
    "VIT_H_14_CONFIG",
    "SD_SCHEDULE",
    "TINY_WORDS",
    "build_sdxl_backbone",
    "build_tiny_t5_vocab",
    "build_tiny_tokenizer",
    "reference_nested_attention",
    "sd_pipeline",
    "tiny_text_config",
    "write_hub_cache",
    "write_tiny_clip",
    "write_tiny_pipeline",
    "write_tiny_t5_tokenizer",
    "write_tiny_tokenizer",
    "write_tiny_vision_model",
]

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"

# The real SDXL base UNet architecture (stabilityai/stable-diffusion-xl-base-1.0), for building it
# with random weights (on the meta device or the CPU) in benchmarks, without any download.
SDXL_UNET_CONFIG: dict = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}

# The other components of the real SDXL setup, for building it with random weights in benchmarks.
SDXL_TEXT_ENCODER_CONFIG: dict = {  # text_encoder: OpenAI CLIP ViT-L/14 text tower
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
}
SDXL_TEXT_ENCODER_2_CONFIG: dict = {  # text_encoder_2: OpenCLIP ViT-bigG/14 text tower + projection
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}
SDXL_VAE_CONFIG: dict = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}
VIT_H_14_CONFIG: dict = {  # OpenCLIP ViT-H/14 vision tower + projection (IP-Adapter's image_encoder)
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 16,
    "patch_size": 14,
    "image_size": 224,
    "projection_dim": 1024,
    "hidden_act": "gelu",
}

# Caption vocabulary of the tiny tokenizer: every word here becomes ONE token (``word</w>``); anything else
# still tokenizes, into sub-word pieces or single bytes, as with the real CLIP tokenizer.
_CAPTION_WORDS = """
    a an the of on at in with and or to for from by near under over behind next wearing holding
    photo picture image portrait selfie closeup close up shot painting sketch drawing cartoon anime render
    style watercolor oil pencil illustration sculpture statue
    person people man woman boy girl child baby kid face head hair eyes smile smiling beard glasses hat
    dog cat pet puppy kitten animal bird horse
    beach snow sea ocean lake river mountain forest tree trees grass field garden park city street road
    house room kitchen bed sofa chair table window wall door sky sun moon cloud clouds rain night day
    morning evening sunset light dark shadow
    red blue green yellow orange purple pink white black brown gray gold silver colorful
    big small little young old happy sad cute beautiful funny
    walking sitting standing running lying sleeping playing eating reading looking jumping swimming
    wears shirt jacket coat dress suit scarf
    high quality detailed realistic professional studio lighting background blurry lowres worst low bad
    anatomy monochrome cinematic vintage
    one two three together group friends
"""
TINY_WORDS: tuple[str, ...] = tuple(_CAPTION_WORDS.split())


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of byte-level BPE (GPT-2 / CLIP): 256 distinct symbols.

    Printable latin-1 bytes map to themselves; the others are shifted past U+0100 so that every byte has a
    visible, non-whitespace symbol. Printable bytes come first in the dict, as in CLIP's vocab.json, so
    ``"!"`` gets id 0 (SDXL's second tokenizer pads with it).
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {byte: chr(byte) for byte in printable}
    others = [byte for byte in range(256) if byte not in table]
    table |= {byte: chr(256 + index) for index, byte in enumerate(others)}
    return table


def build_tiny_tokenizer(words: tuple[str, ...] = TINY_WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn a CLIP-style byte-level BPE on ``words``; returns ``(vocab, merges)`` in CLIP's file layout.

    Plain greedy BPE: repeatedly merge the most frequent adjacent symbol pair (ties broken by the pair's text,
    so the result is identical in every process, unlike the ``tokenizers`` trainer whose ties follow hash
    order) until every word is one symbol, so words of the list always stay whole. The vocabulary is
    ordered like OpenAI CLIP's: the 256 byte symbols, the same with ``</w>``, one entry per merge, then
    ``<|startoftext|>`` and ``<|endoftext|>`` last (EOS has the largest id, as in real CLIP).
    """
    byte_to_symbol = _bytes_to_unicode()
    pieces: dict[str, list[str]] = {}  # word -> its current symbols, the last one carrying </w>
    for word in words:
        symbols = [byte_to_symbol[byte] for byte in word.lower().encode("utf-8")]
        pieces[word.lower()] = [*symbols[:-1], symbols[-1] + END_OF_WORD]

    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for symbols in pieces.values():
            for pair in itertools.pairwise(symbols):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        for word, symbols in pieces.items():
            merged: list[str] = []
            index = 0
            while index < len(symbols):
                if index + 1 < len(symbols) and (symbols[index], symbols[index + 1]) == best:
                    merged.append(symbols[index] + symbols[index + 1])
                    index += 2
                else:
                    merged.append(symbols[index])
                    index += 1
            pieces[word] = merged

    byte_symbols = list(byte_to_symbol.values())
    entries = byte_symbols + [symbol + END_OF_WORD for symbol in byte_symbols]
    entries += [left + right for left, right in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: index for index, token in enumerate(entries)}
    if len(vocab) != len(entries):
        raise RuntimeError("tiny BPE produced duplicate vocabulary entries")
    return vocab, merges


def _tidy_tokenizer_folder(path: Path, keep_tokenizer_json: bool = False) -> None:
    """Make a saved tokenizer folder look like the real SD / SDXL ones.

    transformers 5 also writes ``tokenizer.json``: dropping it makes loading go through vocab.json +
    merges.txt, as for the real repositories, which ship none. Keep it (``keep_tokenizer_json``) when the
    tokenizer has added tokens: transformers 5 stores them only there. It also records how the tokenizer was
    last loaded (``is_local``, ``local_files_only``) in tokenizer_config.json; that is not part of the model.
    """
    if not keep_tokenizer_json:
        (path / "tokenizer.json").unlink(missing_ok=True)
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    for key in ("is_local", "local_files_only"):
        config.pop(key, None)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_tiny_tokenizer(path: str | Path, pad_token: str = EOS_TOKEN) -> CLIPTokenizer:
    """Write a real CLIP tokenizer (``vocab.json``, ``merges.txt``, ``tokenizer_config.json``) to ``path``.

    ``pad_token`` is ``<|endoftext|>`` like SD / SDXL's first tokenizer, or ``"!"`` like SDXL's second.
    Returns the tokenizer loaded back from disk, after checking it is not the offline 2-token fallback.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_tiny_tokenizer()
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tokenizer = CLIPTokenizer(
        vocab=str(path / "vocab.json"),
        merges=str(path / "merges.txt"),
        pad_token=pad_token,
        model_max_length=77,
    )
    return save_tokenizer(tokenizer, path, expected_tokens=len(vocab))


def save_tokenizer(
    tokenizer: Any, path: Path, expected_tokens: int, keep_tokenizer_json: bool = False
) -> Any:
    """Save ``tokenizer`` to ``path`` (tidied, see :func:`_tidy_tokenizer_folder`) and load it back.

    Raises if the folder reloads with other than ``expected_tokens`` tokens: the offline fallback
    tokenizer, or added tokens lost with ``tokenizer.json``, would otherwise go unnoticed.
    """
    tokenizer.save_pretrained(path)
    _tidy_tokenizer_folder(path, keep_tokenizer_json=keep_tokenizer_json)
    loaded = type(tokenizer).from_pretrained(path)
    if len(loaded) != expected_tokens:
        raise RuntimeError(
            f"tokenizer at {path} reloads with {len(loaded)} tokens, expected {expected_tokens}"
        )
    return loaded


T5_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2, as in every T5 vocabulary
METASPACE = "\u2581"  # SentencePiece's word-start mark


def build_tiny_t5_vocab(words: tuple[str, ...] = TINY_WORDS) -> list[tuple[str, float]]:
    """A SentencePiece-style Unigram vocabulary ``[(piece, log-probability), ...]`` in T5's layout.

    ``<pad>``, ``</s>``, ``<unk>`` first (ids 0, 1, 2), then each word as a whole word (``\u2581word``), the
    same words without the word-start mark (so they can sit inside a longer string, as in ``<person>`` ->
    ``\u2581 < person >``), the bare mark, and every printable ASCII character. The scores make a listed word
    one piece and anything else the fewest known pieces, never ``<unk>`` for ASCII text.
    """
    scored: dict[str, float] = {}
    for word in words:
        scored.setdefault(METASPACE + word.lower(), -5.0)
    for word in words:
        scored.setdefault(word.lower(), -6.0)
    scored.setdefault(METASPACE, -8.0)
    for code in range(ord("!"), ord("~") + 1):
        scored.setdefault(chr(code), -10.0)
    return [(token, 0.0) for token in T5_SPECIAL_TOKENS] + list(scored.items())


def write_tiny_t5_tokenizer(path: str | Path, model_max_length: int = 512) -> T5TokenizerFast:
    """Write a real T5 tokenizer (Unigram ``tokenizer.json`` + ``tokenizer_config.json``) to ``path``.

    Built offline from :func:`build_tiny_t5_vocab`, with T5's pre-tokenizer (whitespace, ``\u2581`` word
    marks) and ``</s>`` appended to every sequence; no sentinel ``<extra_id_N>`` tokens. Returns the
    tokenizer loaded back from disk, after checking its size (an offline ``from_pretrained`` of missing
    files returns a 2-token tokenizer instead of failing).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = build_tiny_t5_vocab()
    tokenizer = T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)
    return save_tokenizer(tokenizer, path, expected_tokens=len(vocab), keep_tokenizer_json=True)


def tiny_t5_config(tokenizer: T5TokenizerFast, width: int) -> T5Config:
    """Tiny two-layer T5 v1.1-style encoder config (gated GELU) whose vocabulary matches ``tokenizer``."""
    return T5Config(
        vocab_size=len(tokenizer),
        d_model=width,
        d_kv=8,
        d_ff=2 * width,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )


def tiny_text_config(
    tokenizer: CLIPTokenizer, projection_dim: int = 32, hidden_size: int = 32, heads: int = 2
) -> CLIPTextConfig:
    """Tiny two-layer CLIP text config whose vocabulary and special ids match ``tokenizer``."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=heads,
        max_position_embeddings=77,
        projection_dim=projection_dim,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _tiny_unet(kind: Literal["sd", "sdxl"]) -> UNet2DConditionModel:
    """A two-level UNet shaped like SD 1.x (attention at full resolution) or SDXL (not at full resolution).

    Both have 8-dim attention heads; SDXL's has two transformer blocks per attention at the second level,
    like the real SDXL's varying ``transformer_layers_per_block``.
    """
    if kind == "sd":
        return UNet2DConditionModel(
            sample_size=16,
            block_out_channels=(16, 32),  # (32, 64) would pass 3 MB per pipeline
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            layers_per_block=1,
            cross_attention_dim=32,
            attention_head_dim=2,  # for SD-style configs this is the number of heads
            norm_num_groups=8,
        )
    return UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(16, 32),  # (32, 64) would pass 3 MB per pipeline
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        # pooled text_embeds (32) + 6 micro-conditioning numbers x 8 Fourier features
        projection_class_embeddings_input_dim=32 + 6 * 8,
        cross_attention_dim=64,  # the two text encoders' hidden states concatenated: 32 + 32
        norm_num_groups=8,
    )


def _tiny_vae(kind: Literal["sd", "sdxl", "sd3", "flux"]) -> AutoencoderKL:
    """A three-block VAE (spatial factor 4) with the latent layout of ``kind``: 4 channels with SD's or SDXL's
    scaling, or 16 channels, no quant convs, and SD3's or FLUX's scaling and shift, like the real ones."""
    blocks = {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 3,
        "up_block_types": ("UpDecoderBlock2D",) * 3,
        "block_out_channels": (8, 16, 16),
        "layers_per_block": 1,
        "norm_num_groups": 8,
    }
    if kind in ("sd", "sdxl"):
        return AutoencoderKL(
            **blocks,
            latent_channels=4,
            sample_size=64,
            scaling_factor=0.13025 if kind == "sdxl" else 0.18215,
            force_upcast=kind == "sdxl",
        )
    scaling, shift = (1.5305, 0.0609) if kind == "sd3" else (0.3611, 0.1159)
    return AutoencoderKL(
        **blocks,
        latent_channels=16,
        sample_size=32,
        scaling_factor=scaling,
        shift_factor=shift,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def _write_image_encoder(path: Path, seed: int) -> None:
    """Tiny CLIP vision tower + its image processor, both in ``path`` (IP-Adapter's ``image_encoder/`` layout)."""
    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=32,
    )
    CLIPVisionModelWithProjection(config).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        path
    )


# SD 1.x's noise schedule (scaled-linear betas, 1000 steps, epsilon prediction).
SD_SCHEDULE: dict = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
}


def sd_pipeline(
    *, vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, unet: UNet2DConditionModel
) -> StableDiffusionPipeline:
    """An SD 1.x pipeline around these modules, with SD's DDIM scheduler and no safety checker."""
    scheduler = DDIMScheduler(**SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


# The training schedules of the real checkpoints' scheduler/ folders: SD3 / SD3.5 shift the flow-matching
# sigmas by 3; FLUX.1 shifts them by the image's token count (dynamic shifting).
SD3_FLOW_SCHEDULE: dict = {"num_train_timesteps": 1000, "shift": 3.0}
FLUX_FLOW_SCHEDULE: dict = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}


def _tiny_dit_pipeline(
    path: Path, kind: Literal["sd3", "flux"], seed: int
) -> StableDiffusion3Pipeline | FluxPipeline:
    """The SD3.5-like or FLUX.1-dev-like pipeline :func:`write_tiny_pipeline` saves; tokenizers are written
    to ``path`` first (the text encoders' vocabularies come from them).

    SD3: CLIP-L (width 16) and CLIP-G (width 32), both with projection; T5 of width 64, so the concatenated
    CLIP states (48) are padded to T5's width as in the real model; two joint blocks, the first with SD3.5's
    extra image self-attention, RMS q/k norms. FLUX: CLIP-L (width 32, pooled output only) and T5 (width
    32); one double- and one single-stream block, guidance embedding (the distilled dev model).
    """
    tokenizer = write_tiny_tokenizer(path / "tokenizer", pad_token=EOS_TOKEN)
    torch.manual_seed(seed + 2)
    vae = _tiny_vae(kind)
    if kind == "sd3":
        tokenizer_2 = write_tiny_tokenizer(path / "tokenizer_2", pad_token="!")  # like the real SD3
        tokenizer_3 = write_tiny_t5_tokenizer(path / "tokenizer_3")
        torch.manual_seed(seed)
        text_encoder = CLIPTextModelWithProjection(
            tiny_text_config(tokenizer, projection_dim=16, hidden_size=16)
        )
        torch.manual_seed(seed + 3)
        text_encoder_2 = CLIPTextModelWithProjection(tiny_text_config(tokenizer_2, projection_dim=32))
        torch.manual_seed(seed + 5)
        text_encoder_3 = T5EncoderModel(tiny_t5_config(tokenizer_3, width=64))
        torch.manual_seed(seed + 1)
        transformer = SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=64,
            caption_projection_dim=32,
            pooled_projection_dim=16 + 32,
            pos_embed_max_size=16,
            dual_attention_layers=(0,),
            qk_norm="rms_norm",
        )
        return StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=FlowMatchEulerDiscreteScheduler(**SD3_FLOW_SCHEDULE),
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            text_encoder_3=text_encoder_3,
            tokenizer_3=tokenizer_3,
        )
    tokenizer_2 = write_tiny_t5_tokenizer(path / "tokenizer_2")
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(tiny_text_config(tokenizer))
    torch.manual_seed(seed + 5)
    text_encoder_2 = T5EncoderModel(tiny_t5_config(tokenizer_2, width=32))
    torch.manual_seed(seed + 1)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels packed 2 x 2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),
    )
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_FLOW_SCHEDULE),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def write_tiny_pipeline(
    path: str | Path,
    kind: Literal["sd", "sdxl", "sd3", "flux"],
    seed: int = 0,
    with_image_encoder: bool = True,
) -> Path:
    """Write a tiny random diffusers pipeline to ``path``: SD 1.x-like (``"sd"``), SDXL-like (``"sdxl"``),
    SD3.5-like (``"sd3"``) or FLUX.1-dev-like (``"flux"``).

    The folder loads with the matching ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` /
    ``StableDiffusion3Pipeline`` / ``FluxPipeline.from_pretrained``. The VAE has a spatial factor of 4:
    images of H x W pixels use latents (B, 4, H/4, W/4) for SD / SDXL, (B, 16, H/4, W/4) for SD3 / FLUX
    (FLUX: H and W multiples of 8). With ``with_image_encoder`` an ``image_encoder/`` folder (CLIP vision,
    32 px) is added that is NOT registered in ``model_index.json``. Same ``seed`` -> identical weights.
    Returns ``path``.
    """
    if kind not in ("sd", "sdxl", "sd3", "flux"):
        raise ValueError(f"kind must be 'sd', 'sdxl', 'sd3' or 'flux', got {kind!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)

    if kind in ("sd3", "flux"):
        pipeline = _tiny_dit_pipeline(path, kind, seed)
    else:
        pipeline = _tiny_unet_pipeline(path, kind, seed)
    pipeline.save_pretrained(path, safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        if (path / name).is_dir():
            # T5's tokenizer lives in tokenizer.json; CLIP's in vocab.json + merges.txt.
            _tidy_tokenizer_folder(
                path / name, keep_tokenizer_json=not (path / name / "vocab.json").is_file()
            )
    if with_image_encoder:
        _write_image_encoder(path / "image_encoder", seed + 4)
    return path


def _tiny_unet_pipeline(
    path: Path, kind: Literal["sd", "sdxl"], seed: int
) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """The SD 1.x-like or SDXL-like pipeline :func:`write_tiny_pipeline` saves; tokenizers are written to
    ``path`` first (the text encoders' vocabulary size and special ids come from them)."""
    tokenizer = write_tiny_tokenizer(path / "tokenizer", pad_token=EOS_TOKEN)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(tiny_text_config(tokenizer))
    torch.manual_seed(seed + 1)
    unet = _tiny_unet(kind)
    torch.manual_seed(seed + 2)
    vae = _tiny_vae(kind)
    if kind == "sd":
        return sd_pipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet)
    tokenizer_2 = write_tiny_tokenizer(path / "tokenizer_2", pad_token="!")  # like the real SDXL
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(tiny_text_config(tokenizer_2, projection_dim=32))
    scheduler = EulerDiscreteScheduler(**SD_SCHEDULE, timestep_spacing="leading", steps_offset=1)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        image_encoder=None,
        feature_extractor=None,
    )


def write_tiny_vision_model(
    path: str | Path, kind: Literal["clip", "dinov2"] = "clip", seed: int = 0
) -> Path:
    """Write a tiny standalone vision backbone (model + image processor) to ``path``; returns ``path``.

    ``"clip"``: ``CLIPVisionModelWithProjection``, 32 px, patch 8 -> hidden states (B, 17, 32).
    ``"dinov2"``: ``Dinov2Model``, 28 px, patch 14 -> hidden states (B, 5, 32).
    Both load with ``AutoModel`` / ``AutoImageProcessor.from_pretrained(path)``.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if kind == "clip":
        _write_image_encoder(path, seed)
    elif kind == "dinov2":
        torch.manual_seed(seed)
        config = Dinov2Config(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            mlp_ratio=2,
            image_size=28,
            patch_size=14,
        )
        Dinov2Model(config).save_pretrained(path)
        BitImageProcessor(
            size={"shortest_edge": 32},
            crop_size={"height": 28, "width": 28},
            image_mean=[0.485, 0.456, 0.406],  # ImageNet statistics, as DINOv2 uses
            image_std=[0.229, 0.224, 0.225],
            do_convert_rgb=True,
        ).save_pretrained(path)
    else:
        raise ValueError(f"kind must be 'clip' or 'dinov2', got {kind!r}")
    return path


def write_tiny_clip(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny random full CLIP (``CLIPModel`` + ``CLIPProcessor``) to ``path``; returns ``path``.

    For prompt-alignment tests and demos: text and vision towers of width 32, projection 16, 32 px images;
    the tokenizer is :func:`write_tiny_tokenizer`'s. Loads with ``CLIPModel.from_pretrained(path)`` and
    ``CLIPProcessor.from_pretrained(path)`` (the PIL image processor: no torchvision needed).
    """

    path = Path(path)
    tokenizer = write_tiny_tokenizer(path, pad_token=EOS_TOKEN)
    text_config = tiny_text_config(tokenizer).to_dict()
    vision_config = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
    }
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=16))
    model.save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    _tidy_tokenizer_folder(path)
    return path


def write_hub_cache(folder: str | Path, cache: str | Path, repo_id: str) -> Path:
    """Copy the model ``folder`` into the Hugging Face Hub cache at ``cache`` as the repo ``repo_id``, in the
    layout a download leaves (``models--user--name/refs/main`` -> ``snapshots/<commit>/``), so that
    ``from_pretrained(repo_id)`` reads it offline through the same Hub path as a real download. Returns
    ``cache``."""
    repo = Path(cache) / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return Path(cache)


# Every width of the SDXL setup divided down, every depth kept: a step of it costs almost no arithmetic,
# so its time is the host's (Python, op dispatch) share of a real step.
NARROW_WIDTHS: dict[str, dict] = {
    "unet": {
        "block_out_channels": (32, 64, 128),
        "attention_head_dim": (1, 2, 4),
        "cross_attention_dim": 64,
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 32 + 6 * 8,
    },
    "text": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2},
    "text_2": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "projection_dim": 32},
    "vae": {"block_out_channels": (32, 32, 32, 32), "norm_num_groups": 8},
    "vision": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "projection_dim": 32},
}


def build_sdxl_backbone(
    tokenizer_folder: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    narrow: bool = False,
) -> tuple[DiffusionBackbone, tuple]:
    """The real SDXL base architecture with random weights, built in memory on ``device`` (no download).

    UNet (:data:`SDXL_UNET_CONFIG`), both text encoders, the VAE, and an OpenCLIP ViT-H/14-sized vision
    tower for the subject encoder: what the faces / pets SDXL recipes train on, for measuring speed and
    memory. The tokenizers are the tiny ones written to ``tokenizer_folder`` (``tokenizer/``,
    ``tokenizer_2/``); the text encoders' vocabularies match them. ``narrow`` keeps every depth but
    divides the widths (:data:`NARROW_WIDTHS`): for measuring the host's cost of a step on a CPU.

    Returns:
        ``(backbone, image_backbone)``: a :class:`~nested.backbone.DiffusionBackbone` and
        ``(vision_model, 224, mean, std)`` as :func:`~nested.encoder.load_vision_backbone` returns it.
    """
    folder = Path(tokenizer_folder)
    tokenizer = write_tiny_tokenizer(folder / "tokenizer", pad_token=EOS_TOKEN)
    tokenizer_2 = write_tiny_tokenizer(folder / "tokenizer_2", pad_token="!")

    def text_config(config: dict, tokenizer: CLIPTokenizer) -> CLIPTextConfig:
        special = {
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
        return CLIPTextConfig(**config, vocab_size=len(tokenizer), **special)

    def sized(config: dict, part: str) -> dict:
        return {**config, **NARROW_WIDTHS[part]} if narrow else config

    with torch.device(device):
        unet = UNet2DConditionModel(**sized(SDXL_UNET_CONFIG, "unet")).to(dtype)
        text_encoder = CLIPTextModel(text_config(sized(SDXL_TEXT_ENCODER_CONFIG, "text"), tokenizer)).to(
            dtype
        )
        text_encoder_2 = CLIPTextModelWithProjection(
            text_config(sized(SDXL_TEXT_ENCODER_2_CONFIG, "text_2"), tokenizer_2)
        )
        vae = AutoencoderKL(**sized(SDXL_VAE_CONFIG, "vae")).to(dtype)
        vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**sized(VIT_H_14_CONFIG, "vision"))).to(dtype)
    text_encoder_2.to(dtype)
    for module in (unet, text_encoder, text_encoder_2, vae, vision):
        module.eval().requires_grad_(False)
    scheduler = DDPMScheduler(**SD_SCHEDULE)
    backbone = DiffusionBackbone(
        unet=unet,
        vae=vae,
        noise_scheduler=scheduler,
        tokenizers=[tokenizer, tokenizer_2],
        text_encoders=[text_encoder, text_encoder_2],
        kind="sdxl",
        source="random SDXL architecture",
        scheduler_config=dict(scheduler.config),
    )
    return backbone, (vision, VIT_H_14_CONFIG["image_size"], CLIP_MEAN, CLIP_STD)


def reference_nested_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    nested_keys: list[torch.Tensor],
    nested_values: list[torch.Tensor],
    subject_masks: list[torch.Tensor],
) -> torch.Tensor:
    """Nested attention by its definition, in float64, for checking the fused path at real shapes.

    Explicit softmaxes, no fused kernel: ``out_n = sum_t a_{n,t} V_t`` with each subject position's value
    ``V_s`` replaced by the query's own ``v*_n = softmax(q_n K~^T / sqrt(D)) V~``. It needs the (B, H, N, T)
    probabilities and one (B, H, N, D) ``v*`` per subject, never the (B, H, N, T, D) per-query values.
    Shapes as :func:`nested.attention.nested_attention`; returns (B, H, N, D) float64.
    """
    q, k, v = query.double(), key.double(), value.double()
    scale = q.shape[-1] ** -0.5
    probs = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)  # (B, H, N, T)
    out = probs @ v
    for nested_k, nested_v, mask in zip(nested_keys, nested_values, subject_masks, strict=True):
        v_star = torch.softmax(q @ nested_k.double().transpose(-1, -2) * scale, dim=-1) @ nested_v.double()
        on_subject = probs * mask[:, None, None, :].to(probs)  # (B, H, N, T): a_{n,t} for t in s
        out = out - on_subject @ v + on_subject.sum(-1, keepdim=True) * v_star
    return out
