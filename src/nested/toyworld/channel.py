"""Where the toy base model reads a subject from: each kind of text token's share of the cross-attention
in the subject's pixels.

Nested attention replaces only the subject token's value, so it can drive the UNet only as far as the UNet
reads the subject from that token. This measures the channel on real renders: every ``attn2`` layer's
attention probabilities (mean over heads), weighted by a mask of the subject's pixels at the layer's
resolution, summed per token group. A render's subject mask comes from drawing the same subject with the
same nuisance on two flat backgrounds: the pixels that differ are background.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from nested.toyworld.world import CLASS_WORDS, Context, Identity, caption, render

TOKEN_GROUPS = ("start", "class word", "identity words", "other words", "end and padding")


def subject_mask(identity: Identity, seed: int, size: int = 64) -> torch.Tensor:
    """(size, size) float in [0, 1]: 1 where render(identity, ..., seed=seed) shows the subject."""
    red = np.asarray(render(identity, Context("red"), seed=seed, size=size), dtype=np.int16)
    blue = np.asarray(render(identity, Context("blue"), seed=seed, size=size), dtype=np.int16)
    background = np.abs(red - blue).max(-1) > 24
    return torch.from_numpy(~background).float()


def prompt_ids(tokenizer: Any, prompts: Sequence[str]) -> torch.Tensor:
    """(B, T) token ids of ``prompts`` as the pipeline pads them."""
    return tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
        return_tensors="pt",
    ).input_ids  # fmt: skip


def token_groups(tokenizer: Any, ids: torch.Tensor, identity_words: Sequence[str]) -> torch.Tensor:
    """(B, T) index into :data:`TOKEN_GROUPS` of every token of ``ids`` (:func:`prompt_ids`)."""
    vocabulary = tokenizer.get_vocab()

    def ids_of(words: Sequence[str]) -> torch.Tensor:
        # Whole-word tokens: BPE words end in </w>, added tokens are stored as the bare word.
        found = [vocabulary[w + "</w>"] if w + "</w>" in vocabulary else vocabulary.get(w) for w in words]
        return torch.tensor([i for i in found if i is not None])

    groups = torch.full(ids.shape, TOKEN_GROUPS.index("other words"))
    groups[torch.isin(ids, ids_of(identity_words))] = TOKEN_GROUPS.index("identity words")
    groups[torch.isin(ids, ids_of(list(CLASS_WORDS.values())))] = TOKEN_GROUPS.index("class word")
    end = (ids == tokenizer.eos_token_id).int().argmax(1)
    groups[torch.arange(ids.shape[1]) >= end[:, None]] = TOKEN_GROUPS.index("end and padding")
    groups[:, 0] = TOKEN_GROUPS.index("start")
    return groups


@torch.no_grad()
def attention_channel(
    pipe: Any,
    subjects: Sequence[Identity],
    contexts: Sequence[Context],
    prompts: Sequence[str],
    identity_words: Sequence[str],
    *,
    timestep: int = 500,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """``{layer: {group: share}}`` and ``{"mean": ...}`` over layers: the mean share of each token group in
    the cross-attention of the subject's pixels, for renders of ``subjects`` in ``contexts`` (one each)
    captioned ``prompts``, noised to ``timestep``. Every row sums to 1."""
    rng = random.Random(f"channel-{seed}")
    seeds = [rng.randrange(2**31) for _ in subjects]
    images = np.stack(
        [np.asarray(render(s, c, seed=r)) for s, c, r in zip(subjects, contexts, seeds, strict=True)]
    )
    masks = torch.stack([subject_mask(s, r) for s, r in zip(subjects, seeds, strict=True)])[:, None]
    ids = prompt_ids(pipe.tokenizer, prompts)
    groups = F.one_hot(token_groups(pipe.tokenizer, ids, identity_words), len(TOKEN_GROUPS)).float()
    sums: dict[str, torch.Tensor] = {}

    def measure(name: str):
        def hook(module, args, kwargs):
            query = module.to_q(args[0] if args else kwargs["hidden_states"])
            key = module.to_k(kwargs["encoder_hidden_states"])
            query = query.unflatten(-1, (module.heads, -1)).transpose(1, 2)
            key = key.unflatten(-1, (module.heads, -1)).transpose(1, 2)
            probs = (query @ key.transpose(-1, -2) * module.scale).softmax(-1).mean(1)  # (B, N, T)
            side = int(round(probs.shape[1] ** 0.5))
            weight = F.adaptive_avg_pool2d(masks, side).flatten(
                1
            )  # (B, N): the subject's share of each pixel
            per_token = (probs * weight[..., None]).sum(1) / weight.sum(1, keepdim=True)  # (B, T)
            sums[name] = (per_token[..., None] * groups).sum(1).mean(0)  # (groups,)

        return hook

    handles = [
        module.register_forward_pre_hook(measure(name), with_kwargs=True)
        for name, module in pipe.unet.named_modules()
        if name.endswith("attn2")
    ]
    try:
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
        timesteps = torch.full((len(prompts),), timestep)
        pipe.unet(pipe.scheduler.add_noise(latents, noise, timesteps), timesteps, pipe.text_encoder(ids)[0])
    finally:
        for handle in handles:
            handle.remove()
    report = {name: dict(zip(TOKEN_GROUPS, share.tolist(), strict=True)) for name, share in sums.items()}
    mean = torch.stack(list(sums.values())).mean(0)
    report["mean"] = dict(zip(TOKEN_GROUPS, mean.tolist(), strict=True))
    return report


def channel_prompts(
    subjects: Sequence[Identity], contexts: Sequence[Context], described: Any = None
) -> list[str]:
    """Class-word captions, or ``described(subject, context)`` captions when given."""
    if described is None:
        return [caption(s.DOMAIN, c) for s, c in zip(subjects, contexts, strict=True)]
    return [described(s, c) for s, c in zip(subjects, contexts, strict=True)]
