#!/usr/bin/env python
"""How much the denoising loss rewards each part of an identity, through the column nested attention drives.

An adapter learns only what lowers its training loss. This measures, on renders of TRAIN faces in their
contexts, the base UNet's epsilon loss with the class-word prompt when the class word's VALUE (its key
kept, as nested attention does) comes from a prompt that names:

* nothing (``plain``: the class-word prompt itself),
* the identity (``identity``),
* the identity with its shapes wrong (``shapes wrong``: hair style and face shape changed),
* the identity with its colours wrong (``colours wrong``: skin and hair colour changed),

per band of timesteps, with the same noise for every row. The gap between ``identity`` and a wrong row is
what getting those attributes right is worth to the loss. Meaningful for a base model with a contextual
text model (``train_base.py --text-layers``); with per-token features every row is ``plain``.

    python scripts/toyworld/loss_gap.py --base data/models/toy-sd
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
from pathlib import Path

import numpy as np
import torch

from nested.files import write_json_atomic
from nested.toyworld.base_model import ValueTransplantProcessor, base_describer, transplant_class_word
from nested.toyworld.channel import prompt_ids
from nested.toyworld.world import CLASS_WORDS, FaceIdentity, caption, contexts, render, split_identities

WRONG = {"shapes wrong": ("hair_style", "face_shape"), "colours wrong": ("skin", "hair_colour")}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", type=Path, default=Path("data/models/toy-sd"), help="base model folder")
    parser.add_argument("--images", type=int, default=64, help="TRAIN faces, one render each (default 64)")
    parser.add_argument("--bands", type=int, default=4, help="timestep bands (default 4)")
    parser.add_argument("--repeats", type=int, default=4, help="noise draws per band (default 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the losses here (JSON)")
    return parser


def wrong(identity: FaceIdentity, attributes: tuple[str, ...]) -> FaceIdentity:
    """``identity`` with each of ``attributes`` moved to the next value of its list."""
    values = identity.ATTRIBUTES
    return dataclasses.replace(
        identity,
        **{a: values[a][(values[a].index(getattr(identity, a)) + 1) % len(values[a])] for a in attributes},
    )


@torch.no_grad()
def loss_gap(pipe, describe, *, images: int, bands: int, repeats: int, seed: int) -> dict[str, dict]:
    """{band "lo-hi": {row: mean epsilon MSE}}; ``describe(identity, context)`` is the naming caption."""
    rng = random.Random(seed)
    people = split_identities("faces")[0][:images]
    scenes = contexts()
    chosen = [scenes[i % len(scenes)] for i in range(len(people))]
    pixels = torch.stack(
        [
            torch.from_numpy(np.array(render(p, c, seed=rng.randrange(2**31))))
            for p, c in zip(people, chosen, strict=True)
        ]
    )
    pixels = pixels.permute(0, 3, 1, 2).float() / 127.5 - 1
    latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
    tokenizer, text = pipe.tokenizer, pipe.text_encoder
    plain_ids = prompt_ids(tokenizer, [caption("faces", c) for c in chosen])
    plain = text(plain_ids)[0]
    class_word_ids = torch.tensor(tokenizer.convert_tokens_to_ids([f"{w}</w>" for w in CLASS_WORDS.values()]))
    namings = {"identity": people, **{row: [wrong(p, a) for p in people] for row, a in WRONG.items()}}
    values = {"plain": plain}
    for row, named_people in namings.items():
        named_ids = prompt_ids(tokenizer, [describe(p, c) for p, c in zip(named_people, chosen, strict=True)])
        values[row] = transplant_class_word(plain, text(named_ids)[0], plain_ids, named_ids, class_word_ids)
    unet, scheduler = pipe.unet, pipe.scheduler
    processors = unet.attn_processors
    unet.set_attn_processor(ValueTransplantProcessor())
    generator = torch.Generator().manual_seed(seed)
    steps = scheduler.config.num_train_timesteps
    report = {}
    try:
        for band in range(bands):
            lo, hi = band * steps // bands, (band + 1) * steps // bands
            losses = {row: [] for row in values}
            for _ in range(repeats):
                t = torch.randint(lo, hi, (len(people),), generator=generator)
                noise = torch.randn(latents.shape, generator=generator)
                noisy = scheduler.add_noise(latents, noise, t)
                for row, value in values.items():
                    out = unet(noisy, t, plain, cross_attention_kwargs={"value_states": value}).sample
                    losses[row].append(((out - noise) ** 2).mean().item())
            report[f"{lo}-{hi}"] = {row: float(np.mean(v)) for row, v in losses.items()}
    finally:
        unet.set_attn_processor(processors)
    return report


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        args.base, safety_checker=None, requires_safety_checker=False
    )
    report = loss_gap(
        pipe, base_describer(args.base), images=args.images, bands=args.bands, repeats=args.repeats,
        seed=args.seed,
    )  # fmt: skip
    rows = list(next(iter(report.values())))
    print(
        "timesteps  " + "  ".join(rows) + "  (epsilon MSE; the class word's value from a prompt naming ...)"
    )
    for band, losses in report.items():
        print(f"{band:>9}  " + "  ".join(f"{losses[r]:.5f}" for r in rows))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
