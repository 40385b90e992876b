"""The toy world's base model: a small text-to-image diffusion model trained from scratch.

It is an ordinary Stable Diffusion 1.x pipeline folder, so everything downstream (``nested fit``, ``nested
generate``, ``nested eval``, :class:`~nested.inference.NestedPipeline`) loads it through the same
``from_pretrained`` path as a real SD checkpoint:

* ``vae``: an :class:`~diffusers.AutoencoderKL` with spatial factor 4 (64 px images, 16 x 16 x 4 latents),
  trained here as a reconstruction autoencoder (L1 + MSE, a tiny KL term) on renders of the world;
* ``text_encoder`` / ``tokenizer``: a random, FROZEN tiny CLIP text model with a real byte-level BPE
  tokenizer (:func:`write_world_tokenizer`: the tiny BPE plus whole-word identity words), 24-token prompts
  and no transformer layers, so every word's feature is that word's alone (see :func:`build_text_encoder`). It is never trained: the
  UNet's cross-attention learns to read it, as a real UNet reads a frozen CLIP;
* ``unet``: an SD-layout :class:`~diffusers.UNet2DConditionModel` (cross-attention at 16 x 16 and 8 x 8),
  trained with the epsilon objective on (render, caption) pairs, captions dropped 10 % of the time for
  classifier-free guidance, weights exported from an EMA. Captions give class and context, and some also
  name the identity (:func:`described_caption`), as web captions describe people;
* ``scheduler``: DDIM with SD's scaled-linear betas;
* ``image_encoder/``: a tiny CLIP vision tower (64 px, patch 8) for the subject encoder, outside
  ``model_index.json`` (IP-Adapter's layout), pretrained here as a recognition model on TRAIN identities
  (:func:`train_image_encoder`) and frozen by the adapters, as the method freezes a pretrained CLIP. It
  never saw attribute labels or held-out identities; the adapter's resampler learns to read it.

The base model sees only TRAIN identities. Prompted with the class word ("a person at the beach"), it draws a
random identity: only an adapter (or naming the attributes in words) makes it draw a given one.
"""

from __future__ import annotations

import copy
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    UNet2DConditionModel,
)
from diffusers.models.attention_processor import AttnProcessor2_0
from transformers import (
    AddedToken,
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from nested.encoder import CLIP_MEAN, CLIP_STD
from nested.testing import (
    SD_SCHEDULE,
    save_tokenizer,
    sd_pipeline,
    tiny_text_config,
    write_tiny_tokenizer,
)
from nested.toyworld.world import (
    CLASS_WORDS,
    SCENES,
    STYLES,
    Context,
    FaceIdentity,
    Identity,
    caption,
    identity_class,
    render,
    render_pair,
    split_identities,
)

IMAGE_SIZE = 64
TEXT_LENGTH = 24  # tokens per prompt, BOS and EOS included; the longest described caption needs 21
SCHEDULE = SD_SCHEDULE  # the noise schedule of training and of the saved DDIM scheduler

Progress = Callable[[int, dict[str, float]], None]  # (step, logs) after each optimizer step


def build_vae(latent_channels: int = 4) -> AutoencoderKL:
    """Spatial factor 4 (three blocks, two downsamplings): 64 px -> 16 x 16 x ``latent_channels`` latents
    (4 as SD 1.x / SDXL; SD3 and FLUX use 16)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),  # (32, 64, 64): 2.4x the time per step
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
    )


def build_unet(cross_attention_dim: int) -> UNet2DConditionModel:
    """SD layout: cross-attention at 16 x 16 and 8 x 8 (and the 4 x 4 mid block), none at the bottom level."""
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4,
        block_out_channels=(48, 96, 96),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=6,  # SD-style configs: the number of heads (16 channels each at 96)
        norm_num_groups=16,
    )


def describe(identity: Identity) -> str:
    """Words naming every attribute of ``identity``: ``"with tan skin blonde spiky hair azure eyes round face"``.

    Only the base model's training captions use them (see :func:`render_pool`); adapter shards and prompts
    never name identity, so there only the reference image can carry it.
    """
    i = identity
    if isinstance(i, FaceIdentity):
        return (
            f"with {i.skin} skin {i.hair_colour} {i.hair_style} hair {i.eye_colour} eyes {i.face_shape} face"
        )
    return f"{i.species} with {i.fur_colour} {i.pattern} fur {i.ear_shape} ears {i.eye_colour} eyes"


def describe_before(identity: Identity) -> str:
    """The identity in words that precede the class word: ``"tan skin blonde spiky hair azure eyes round face"``
    (faces), ``"ginger striped fur pointy ears amber eyes cat"`` (pets)."""
    i = identity
    if isinstance(i, FaceIdentity):
        return f"{i.skin} skin {i.hair_colour} {i.hair_style} hair {i.eye_colour} eyes {i.face_shape} face"
    return f"{i.fur_colour} {i.pattern} fur {i.ear_shape} ears {i.eye_colour} eyes {i.species}"


def described_caption_before(identity: Identity, context: Context) -> str:
    """The caption of a render with its identity named BEFORE the class word, as adjectives precede a noun:
    ``"a photo of a tan skin blonde spiky hair azure eyes round face person at the beach"``.

    With a causal, contextual text model the class word's feature then absorbs the identity words, as CLIP's
    "person" absorbs "a blonde ..." before it: the feature nested attention replaces carries the subject.
    """
    domain = identity.DOMAIN
    return caption(domain, context, token=f"{describe_before(identity)} {CLASS_WORDS[domain]}")


def described_caption(identity: Identity, context: Context) -> str:
    """The caption of a render with its identity named after the class word, before the scene.

    ``"a photo of a person with tan skin ... round face at the beach"``. The description sits right after
    the class word so each attribute word has the same position in every context (the text model has no
    layers, so position is all that tells "brown" skin from "brown" hair).
    """
    domain = identity.DOMAIN
    # caption() writes its token after the article: a class word plus description reads "a person with ...".
    return caption(domain, context, token=f"{CLASS_WORDS[domain]} {describe(identity)}")


def description_vocabulary() -> list[str]:
    """Every word :func:`describe` can write, in a fixed order."""
    words = ["with", "skin", "hair", "eyes", "face", "fur", "ears"]
    for domain in CLASS_WORDS:
        for values in identity_class(domain).ATTRIBUTES.values():
            words += [value for value in values if value not in words]
    return words


def write_world_tokenizer(path: Path) -> CLIPTokenizer:
    """The toy base model's tokenizer: the tiny CLIP BPE plus whole-word tokens for the identity words.

    The tiny BPE splits words it did not learn ("blonde" -> b, lo, n, d, e), and a text model without layers
    cannot put the pieces back together. Added tokens keep every existing id (a UNet trained on the plain
    tokenizer still reads its captions the same) and match whole words only, so "round" inside "background"
    stays as it was. Prompts are cut to ``TEXT_LENGTH``. The folder keeps ``tokenizer.json``, where
    transformers 5 stores added tokens.
    """
    tokenizer = write_tiny_tokenizer(path)
    whole = set(tokenizer.get_vocab())
    missing = [word for word in description_vocabulary() if f"{word}</w>" not in whole]
    tokenizer.add_tokens([AddedToken(word, single_word=True, normalized=True) for word in missing])
    tokenizer.model_max_length = TEXT_LENGTH
    return save_tokenizer(tokenizer, path, expected_tokens=len(tokenizer), keep_tokenizer_json=True)


def build_text_encoder(
    tokenizer: CLIPTokenizer, seed: int, start: CLIPTextModel | None = None, layers: int = 0
) -> CLIPTextModel:
    """A random tiny CLIP text model sized for ``tokenizer`` and ``TEXT_LENGTH``: with no transformer layers
    by default, with ``layers`` causal ones to train with the UNet (the committed base model has two).

    Nested attention changes only the subject token's value, so it needs a base model that reads the subject
    from its class word, as SD reads "person" where it draws the person. A random deep causal tower does not
    give that: it smears the whole sentence into every later token, and a UNet trained on it took ~80 % of
    its cross-attention from the padding and 1-2 % from "person" (measured), so an adapter's value changed
    the image by almost nothing. Per-token features (embedding + position + final norm) make each word carry
    only itself, and a short context leaves few padding slots to absorb attention.

    ``layers`` > 0 gives the CLIP text architecture with that many causal transformer layers instead, to be
    TRAINED with the UNet (:func:`train_unet`): then each token's feature depends on the words before it, and
    the class word can carry the identity words that precede it (:func:`described_caption_before`).

    ``start`` (an earlier text model, e.g. before the identity words were added) keeps its rows: the new
    model gives the same embeddings to every token and position the old one had (and, without layers, the
    same features), so a UNet trained on it can be trained further.
    """
    torch.manual_seed(seed)
    config = tiny_text_config(tokenizer, projection_dim=64, hidden_size=64, heads=4)
    config.num_hidden_layers = layers
    config.max_position_embeddings = TEXT_LENGTH
    model = CLIPTextModel(config)
    if start is not None:
        new, old = model.state_dict(), start.state_dict()
        if not set(old) <= set(new) or (layers == 0 and set(new) != set(old)):
            raise ValueError("build_text_encoder: start is not a text model of the same layout")
        with torch.no_grad():
            for name, tensor in old.items():
                if (
                    tensor.ndim == 0
                    or tensor.shape[1:] != new[name].shape[1:]
                    or len(tensor) > len(new[name])
                ):
                    raise ValueError(f"build_text_encoder: start's {name} {tuple(tensor.shape)} does not fit")
                new[name][: len(tensor)] = tensor
    return model.eval().requires_grad_(layers > 0)


def build_image_encoder(seed: int) -> CLIPVisionModelWithProjection:
    """A random tiny CLIP vision tower: 64 px, 8 px patches (64 + 1 tokens of width 128), two layers."""
    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=8,
        projection_dim=64,
    )
    return CLIPVisionModelWithProjection(config)


def write_image_encoder(path: Path, encoder: CLIPVisionModelWithProjection) -> None:
    """Save ``encoder`` with a CLIP image processor for 64 px inputs (what ``nested`` loads as a backbone)."""
    encoder.save_pretrained(path)
    size = {"shortest_edge": IMAGE_SIZE}
    CLIPImageProcessor(size=size, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(path)


def render_views(
    views: int, seed: int, people: Sequence[Identity] | None = None, held_out_fraction: float = 0.2
) -> torch.Tensor:
    """``views`` plain-background renders (a fresh nuisance each) of each of ``people`` (default: every TRAIN
    face and pet), uint8 (identities, views, 3, 64, 64): the subject encoder's pretraining data."""
    rng = random.Random(f"toybase-views-{seed}")
    if people is None:
        people = [i for domain in ("faces", "pets") for i in split_identities(domain, held_out_fraction)[0]]
    images = [
        [np.array(render(identity, Context("plain"), seed=rng.randrange(2**31))) for _ in range(views)]
        for identity in people
    ]
    return torch.from_numpy(np.array(images, dtype=np.uint8)).permute(0, 1, 4, 2, 3)


@torch.no_grad()
def identity_text_features(
    tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, people: Sequence[Identity]
) -> torch.Tensor:
    """(identities, text width): the text model's features of each identity's description and class word
    (``"tan skin blonde spiky hair azure eyes round face person"``), averaged over its tokens and the start
    token (padding and the end token left out): the caption side of :func:`train_image_encoder`'s CLIP-style
    alignment."""
    texts = [f"{describe_before(p)} {CLASS_WORDS[p.DOMAIN]}" for p in people]
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids  # fmt: skip
    words = (ids != tokenizer.pad_token_id).unsqueeze(-1).float()
    return (text_encoder(ids)[0] * words).sum(1) / words.sum(1)


def pooled_features(encoder: CLIPVisionModelWithProjection, images: torch.Tensor) -> torch.Tensor:
    """Mean over all tokens of the last hidden state (what a fresh resampler's queries start by reading)."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    pixels = (images.float() / 255.0 - mean) / std
    return encoder(pixel_values=pixels, output_hidden_states=True).hidden_states[-1].mean(1)


def train_image_encoder(
    encoder: CLIPVisionModelWithProjection,
    views: torch.Tensor,
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    temperature: float = 0.1,
    seed: int = 0,
    text_features: torch.Tensor | None = None,
    progress: Progress | None = None,
) -> CLIPVisionModelWithProjection:
    """Pretrain the subject encoder's backbone as a recognition model: InfoNCE between two renders of one
    TRAIN identity (other nuisance) against the batch's other identities, on mean-pooled last-layer features.

    With ``text_features`` ((identities, text width), one row per identity of ``views``, e.g.
    :func:`identity_text_features`), a second InfoNCE aligns each render with its identity's description, as
    CLIP is trained on captioned images: the features then spell out what the words name (the shapes as well
    as the colours), not only what tells one identity from another.

    This stands in for the pretrained CLIP / face-recognition backbones real encoders start from (the method
    keeps them frozen). A random tower's features are dominated by what every image shares (position
    embeddings, the plain background), so a fresh resampler reads nearly the same tokens for every subject
    (measured: 0.5 % variation across references) and training cannot move off that. It never sees labels,
    only which renders show the same subject; held-out identities stay unseen.
    """
    generator = torch.Generator().manual_seed(seed)
    # The projection head (thrown away after training) draws its initialisation from the global generator,
    # right after build_image_encoder seeded it: the same seed gives the same encoder.
    head = torch.nn.Sequential(
        torch.nn.Linear(encoder.config.hidden_size, 128), torch.nn.GELU(), torch.nn.Linear(128, 64)
    )
    parameters = [*encoder.parameters(), *head.parameters()]
    text_head = None
    if text_features is not None:
        if len(text_features) != len(views):
            raise ValueError(f"{len(text_features)} text features for {len(views)} identities")
        text_head = torch.nn.Linear(text_features.shape[1], 64)
        parameters += list(text_head.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=1e-2)
    encoder.train()
    count, per_identity = views.shape[:2]

    def info_nce(first: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = first @ second.T / temperature
        target = torch.arange(len(first))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        return loss, (logits.argmax(1) == target).float().mean()

    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, steps, lr, warmup=50)
        people = torch.randperm(count, generator=generator)[:batch_size]
        pick = torch.stack([torch.randperm(per_identity, generator=generator)[:2] for _ in people])
        images = torch.cat([views[people, pick[:, 0]], views[people, pick[:, 1]]])
        embeddings = F.normalize(head(pooled_features(encoder, images)), dim=-1)
        loss, top1 = info_nce(*embeddings.chunk(2))
        logs = {"loss": loss.item(), "top1": top1.item()}
        if text_head is not None:
            described = F.normalize(text_head(text_features[people]), dim=-1).repeat(2, 1)
            text_loss, text_top1 = info_nce(embeddings, described)
            loss = loss + text_loss
            logs.update(text_loss=text_loss.item(), text_top1=text_top1.item())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if progress is not None:
            progress(step, logs)
    return encoder.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- training data


@dataclass
class RenderPool:
    """Rendered training images (uint8, (N, 3, 64, 64)), their captions, and each caption with the class
    word only (the same caption where it names no identity)."""

    images: torch.Tensor
    captions: list[str]
    class_captions: list[str]


def render_pool(
    count: int,
    seed: int,
    pair_fraction: float = 0.2,
    held_out_fraction: float = 0.2,
    described_fraction: float = 0.0,
    describe_before: bool = False,
) -> RenderPool:
    """``count`` renders of TRAIN identities: faces, pets and person + pet pairs in every captioned context.

    Deterministic in ``seed``. Captions use class words ("a photo of a person at the beach"). A
    ``described_fraction`` of the single-subject captions also name the identity (:func:`described_caption`),
    as web captions describe the people in photos: that teaches the base model to draw a hair style or an ear
    shape from a word, the pathway a subject token's value later drives (``describe_before``: the words come
    before the class word, :func:`described_caption_before`). The rest, and all pairs, never do.
    """
    rng = random.Random(f"toybase-pool-{seed}")
    faces = split_identities("faces", held_out_fraction)[0]
    pets = split_identities("pets", held_out_fraction)[0]
    scenes, images, captions, class_captions = list(SCENES), [], [], []
    for index in range(count):
        context = Context(rng.choice(scenes), rng.choice(STYLES))
        render_seed = rng.randrange(2**31)
        if rng.random() < pair_fraction:
            image = render_pair(rng.choice(faces), rng.choice(pets), context, seed=render_seed)
            text = plain = caption("pair", context)
        else:
            domain = "faces" if index % 2 == 0 else "pets"
            identity = rng.choice(faces if domain == "faces" else pets)
            image = render(identity, context, seed=render_seed)
            # No extra draw when nothing is described: a pool of the earlier recipe stays the same pool.
            described = described_fraction > 0 and rng.random() < described_fraction
            describer = described_caption_before if describe_before else described_caption
            plain = caption(domain, context)
            text = describer(identity, context) if described else plain
        images.append(torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1))
        captions.append(text)
        class_captions.append(plain)
    return RenderPool(torch.stack(images), captions, class_captions)


def _to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1], the VAE's input range."""
    return images.float().div(127.5).sub(1.0)


def _lr(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10 % of ``peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# ----------------------------------------------------------------------------- the VAE


def train_vae(
    vae: AutoencoderKL,
    pool: RenderPool,
    *,
    steps: int,
    batch_size: int = 16,
    lr: float = 1e-3,
    kl_weight: float = 1e-6,
    seed: int = 0,
    progress: Progress | None = None,
) -> AutoencoderKL:
    """Reconstruction training (L1 + MSE + ``kl_weight`` KL), then the latent scaling factor is set to 1/std."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    vae.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, steps, lr, warmup=50)
        index = torch.randint(len(pool.images), (batch_size,), generator=generator)
        images = _to_model_range(pool.images[index])
        posterior = vae.encode(images).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        recon = F.l1_loss(reconstruction, images) + F.mse_loss(reconstruction, images)
        loss = recon + kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if progress is not None:
            progress(step, {"loss": loss.item(), "recon": recon.item()})
    vae.eval().requires_grad_(False)
    latents = encode_latents(vae, pool.images[:1024], scale=1.0)
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return vae


@torch.no_grad()
def reconstruction_error(vae: AutoencoderKL, images: torch.Tensor) -> float:
    """Mean absolute error of encode -> decode (posterior mean) on uint8 ``images``, in 0-255 units."""
    latents = vae.encode(_to_model_range(images)).latent_dist.mean
    decoded = vae.decode(latents).sample.clamp(-1, 1)
    return (decoded.add(1).mul(127.5) - images.float()).abs().mean().item()


@torch.no_grad()
def encode_latents(
    vae: AutoencoderKL, images: torch.Tensor, scale: float | None = None, batch_size: int = 256
):
    """Posterior means of uint8 ``images``, times ``scale`` (default: the VAE's scaling factor)."""
    scale = vae.config.scaling_factor if scale is None else scale
    chunks = [
        vae.encode(_to_model_range(images[i : i + batch_size])).latent_dist.mean * scale
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(chunks)


# ----------------------------------------------------------------------------- the UNet


@torch.no_grad()
def encode_captions(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, captions: Sequence[str]):
    """Last hidden states of each distinct caption (SD conditions on them): ``(texts, (K, 77, D))``."""
    texts = sorted(set(captions))
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
    return texts, text_encoder(ids.input_ids).last_hidden_state


def train_unet(
    unet: UNet2DConditionModel,
    latents: torch.Tensor,
    captions: Sequence[str],
    tokenizer: CLIPTokenizer,
    text_encoder: CLIPTextModel,
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    caption_dropout: float = 0.1,
    ema_decay: float = 0.999,
    text_lr_scale: float = 0.3,
    class_captions: Sequence[str] | None = None,
    transplant_fraction: float = 0.0,
    value_transplant_fraction: float = 0.0,
    seed: int = 0,
    progress: Progress | None = None,
) -> UNet2DConditionModel:
    """Epsilon-prediction training on cached latents; returns the EMA copy of the weights (what is saved).

    A text encoder with trainable parameters (:func:`build_text_encoder` with layers) trains with the UNet,
    at ``text_lr_scale`` times its learning rate, and ends holding its own EMA weights. Then, for a
    ``transplant_fraction`` of the captions that name an identity, the UNet sees the caption's class-word-only
    version (``class_captions``) whose class word's feature comes from the naming caption
    (:func:`transplant_class_word`): the identity reaches the UNet through the class word alone, the one
    column nested attention acts on, and the text model learns to put it there. For a further
    ``value_transplant_fraction`` of them, only the class word's VALUE comes from the naming caption and its
    key stays the class-word caption's (:class:`ValueTransplantProcessor`), which is exactly what nested
    attention swaps: the UNet learns to attend to the class word for the subject's appearance.
    """
    joint = any(p.requires_grad for p in text_encoder.parameters())
    transplanting = transplant_fraction + value_transplant_fraction
    if transplanting and not (joint and class_captions is not None):
        raise ValueError(
            "transplant_fraction and value_transplant_fraction need a trained text encoder (layers) and"
            " class_captions"
        )
    if transplanting > 1:
        raise ValueError(f"transplant fractions sum to {transplanting}; at most 1")
    texts = sorted({*captions, *(class_captions or []), ""})
    position = {text: i for i, text in enumerate(texts)}
    caption_index = torch.tensor([position[text] for text in captions])
    empty = position[""]
    if joint:
        token_ids = tokenizer(
            texts, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
        ).input_ids
        if class_captions is not None:
            class_index = torch.tensor([position[text] for text in class_captions])
            class_word_ids = torch.tensor(
                tokenizer.convert_tokens_to_ids([f"{w}</w>" for w in CLASS_WORDS.values()])
            )
    else:
        embeddings = encode_captions(tokenizer, text_encoder, texts)[1]
    scheduler = DDPMScheduler(**SCHEDULE)
    generator = torch.Generator().manual_seed(seed)
    trained = torch.nn.ModuleList([unet, text_encoder] if joint else [unet])
    ema = copy.deepcopy(trained).eval().requires_grad_(False)
    groups = [{"params": list(unet.parameters()), "scale": 1.0}]
    if joint:
        groups.append({"params": list(text_encoder.parameters()), "scale": text_lr_scale})
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=1e-2)
    default_processors = unet.attn_processors
    if value_transplant_fraction:
        unet.set_attn_processor(ValueTransplantProcessor())
    trained.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, steps, lr, warmup=100) * group["scale"]
        index = torch.randint(len(latents), (batch_size,), generator=generator)
        text = caption_index[index].clone()
        text[torch.rand(batch_size, generator=generator) < caption_dropout] = empty
        clean = latents[index]
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        noisy = scheduler.add_noise(clean, noise, timesteps)
        values = None
        if not joint:
            condition = embeddings[text]
        else:
            condition = text_encoder(token_ids[text])[0]
            if transplanting:
                plain = class_index[index]
                named = (plain != caption_index[index]) & (text != empty)
                draw = torch.rand(batch_size, generator=generator)
                swap = named & (draw < transplant_fraction)
                value_swap = named & (draw >= transplant_fraction) & (draw < transplanting)
                moved = swap | value_swap
                if moved.any():
                    plain_features = text_encoder(token_ids[plain[moved]])[0]
                    transplanted = transplant_class_word(
                        plain_features, condition[moved],
                        token_ids[plain[moved]], token_ids[text[moved]], class_word_ids,
                    )  # fmt: skip
                    if value_swap.any():  # keys from the class-word caption, values as if fully transplanted
                        values = condition.clone()
                        values[moved] = transplanted
                    condition = condition.clone()
                    condition[moved] = torch.where(swap[moved, None, None], transplanted, plain_features)
        extra = None if values is None else {"value_states": values}
        prediction = unet(noisy, timesteps, condition, cross_attention_kwargs=extra).sample
        loss = F.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained.parameters(), 1.0)
        optimizer.step()
        decay = min(ema_decay, (1 + step) / (10 + step))  # warm-up: early averages are not stuck at init
        with torch.no_grad():
            for averaged, live in zip(ema.parameters(), trained.parameters(), strict=True):
                averaged.lerp_(live, 1 - decay)
        if progress is not None:
            progress(step, {"loss": loss.item()})
    unet.set_attn_processor(default_processors)
    if joint:
        text_encoder.load_state_dict(ema[1].state_dict())
        text_encoder.eval().requires_grad_(False)
    return ema[0]


class ValueTransplantProcessor:
    """Cross-attention whose values come from ``value_states`` (a ``cross_attention_kwargs`` entry, the same
    shape as the text features) while its keys come from the text features, as nested attention swaps a
    token's value and keeps its key. Without ``value_states``, and in self-attention, it is diffusers' default
    processor. Written for the toy UNet's attention layers: no norms, no mask, no residual connection."""

    def __init__(self) -> None:
        self.default = AttnProcessor2_0()

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        value_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if value_states is None or encoder_hidden_states is None:
            return self.default(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if (
            hidden_states.ndim != 3
            or attention_mask is not None
            or attn.norm_cross
            or attn.residual_connection
        ):
            raise NotImplementedError("ValueTransplantProcessor supports the toy UNet's cross-attention only")

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.unflatten(-1, (attn.heads, -1)).transpose(1, 2)

        query, key = heads(attn.to_q(hidden_states)), heads(attn.to_k(encoder_hidden_states))
        out = F.scaled_dot_product_attention(query, key, heads(attn.to_v(value_states)), scale=attn.scale)
        out = attn.to_out[1](attn.to_out[0](out.transpose(1, 2).flatten(2)))
        return out / attn.rescale_output_factor


def base_describer(base: Path) -> Callable:
    """The described-caption function the base model's UNet was trained with: the recipe of the last stage of
    its training.json with UNet steps (a stage with ``unet_steps: 0``, or none recorded, trained other parts)."""
    record = base / "training.json"
    recipe = {}
    if record.exists():
        data = json.loads(record.read_text())
        stages = (
            [stage["recipe"] for stage in data["stages"]] if "stages" in data else [data.get("recipe", {})]
        )
        recipe = ([r for r in stages if r.get("unet_steps")] or [{}])[-1]
    return described_caption_before if recipe.get("describe_before") else described_caption


def transplant_class_word(
    class_features: torch.Tensor,
    named_features: torch.Tensor,
    class_ids: torch.Tensor,
    named_ids: torch.Tensor,
    class_word_ids: torch.Tensor,
) -> torch.Tensor:
    """``class_features`` (the text features of class-word-only captions, token ids ``class_ids``) with each
    caption's class word's feature replaced by the class word's feature in ``named_features`` (the same
    captions naming the identity, ``named_ids``). The first class word of each caption is the subject's."""
    rows = torch.arange(len(class_ids))
    class_at = torch.isin(class_ids, class_word_ids).int().argmax(1)
    named_at = torch.isin(named_ids, class_word_ids).int().argmax(1)
    out = class_features.clone()
    out[rows, class_at] = named_features[rows, named_at]
    return out


def save_base_model(
    path: Path,
    *,
    vae: AutoencoderKL,
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    image_encoder: CLIPVisionModelWithProjection,
) -> Path:
    """Write an SD 1.x pipeline folder (safetensors) plus ``image_encoder/``; returns ``path``.

    The UNet and VAE are stored in float16 to halve the committed size; diffusers' ``from_pretrained`` loads
    them back as float32 unless asked otherwise. The text encoder stays float32: transformers 5 loads
    weights in their stored dtype by default, and a float16 CLIP on the CPU is slow and mismatched.
    """
    unet, vae = copy.deepcopy(unet).half(), copy.deepcopy(vae).half()
    pipeline = sd_pipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet)
    pipeline.save_pretrained(path, safe_serialization=True)
    for part in ("unet", "vae"):  # a warm start (train_base.py --unet/--vae) records where it came from
        config_file = path / part / "config.json"
        config = json.loads(config_file.read_text())
        if config.pop("_name_or_path", None) is not None:
            config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    write_image_encoder(path / "image_encoder", image_encoder)
    return path
