#!/usr/bin/env python
"""How much identity the adapter's architecture can carry, when it is told what to carry.

A diagnostic, not a training recipe: it uses the world's labels, which an adapter's training never sees.
The adapter's resampler is trained to REGRESS, from a reference of a TRAIN identity, the class word's text
feature in the caption that names that identity: the value the base model draws the identity from. Its
nested projections are the layers' own projections of the text (``NestedAdapter.init_projections_from``), so
subject tokens equal to that feature give every layer the value the words give. The result is saved as an
ordinary adapter folder; ``nested eval`` then judges it on held-out identities like any trained adapter:

    python scripts/toyworld/regress_adapter.py --base BASE --out runs/regress
    nested eval --base BASE --adapter "<person>=runs/regress/adapters/last" \\
        --subjects data/toyworld/shards/faces/held_out/shards.json ...

What it reaches is what the encoder, the resampler and nested values can carry; the gap to an adapter
trained by ``nested fit`` is what the denoising loss does not find. Needs a base model whose class word reads
the words before it (``train_base.py --text-layers --describe-before``); with per-token text features the
target never changes and the script stops.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from nested.adapter import NestedAdapter
from nested.encoder import EncoderSpec
from nested.errors import ConfigError
from nested.files import write_json_atomic
from nested.toyworld.base_model import base_describer, transplant_class_word
from nested.toyworld.channel import prompt_ids
from nested.toyworld.world import CLASS_WORDS, Context, caption, contexts, render, split_identities


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--base", type=Path, required=True, help="base model folder (with a contextual text model)"
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="run folder: writes adapters/last and regression.json"
    )
    parser.add_argument("--domain", choices=sorted(CLASS_WORDS), default="faces")
    parser.add_argument("--steps", type=_positive, default=1500, help="optimizer steps (default 1500)")
    parser.add_argument("--batch-size", type=_positive, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--references", type=_positive, default=4, help="references per TRAIN identity (default 4)"
    )
    parser.add_argument(
        "--held-out-references", type=_positive, default=2, help="per held-out identity (default 2)"
    )
    parser.add_argument(
        "--held-out", type=_positive, default=None, help="the first N held-out identities (default all)"
    )
    parser.add_argument(
        "--train-every", type=_positive, default=1, help="use every k-th TRAIN identity (default 1)"
    )
    parser.add_argument(
        "--num-tokens", type=_positive, default=16, help="the resampler's size (default: the demo's)"
    )
    parser.add_argument("--width", type=_positive, default=128)
    parser.add_argument("--depth", type=_positive, default=2)
    parser.add_argument("--heads", type=_positive, default=4)
    parser.add_argument("--seed", type=int, default=0)
    return parser


class Regression:
    """References' frozen encoder features and the class word's text feature each should give."""

    def __init__(self, pipe, adapter: NestedAdapter, domain: str, describe, rng: random.Random):
        self.pipe, self.adapter, self.domain, self.describe, self.rng = pipe, adapter, domain, describe, rng
        tokenizer = pipe.tokenizer
        self.class_word_ids = torch.tensor(tokenizer.convert_tokens_to_ids([f"{CLASS_WORDS[domain]}</w>"]))
        self.scenes = contexts()

    @torch.no_grad()
    def examples(self, people: list, per_identity: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, L, C) encoder features of plain-background references, (N, text width) targets. Each reference's
        target comes from a caption in a random context: the feature depends on the words before the class
        word, so the context's style word is part of it."""
        features, targets = [], []
        tokenizer, text = self.pipe.tokenizer, self.pipe.text_encoder
        for person in people:
            scenes = [self.scenes[self.rng.randrange(len(self.scenes))] for _ in range(per_identity)]
            references = [
                np.array(render(person, Context("plain"), seed=self.rng.randrange(2**31)))
                for _ in range(per_identity)
            ]
            images = torch.from_numpy(np.stack(references)).permute(0, 3, 1, 2).float() / 255
            features.append(self.adapter.encoder.features(images))
            plain = prompt_ids(tokenizer, [caption(self.domain, scene) for scene in scenes])
            named = prompt_ids(tokenizer, [self.describe(person, scene) for scene in scenes])
            moved = transplant_class_word(text(plain)[0], text(named)[0], plain, named, self.class_word_ids)
            targets.append(moved[torch.isin(plain, self.class_word_ids)].view(per_identity, -1))
        return torch.cat(features), torch.cat(targets)


def explained_variance(predicted: torch.Tensor, target: torch.Tensor) -> float:
    """R^2 of ``predicted`` over all target dimensions: 1 is exact, 0 is the mean target."""
    spread = ((target - target.mean(0)) ** 2).sum()
    return float(1 - ((predicted - target) ** 2).sum() / spread)


def regress(args: argparse.Namespace) -> dict:
    from diffusers import StableDiffusionPipeline

    if not (args.base / "model_index.json").is_file():
        raise ConfigError(
            f"{args.base} is not a diffusers pipeline folder (no model_index.json): pass a base model"
        )
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    pipe = StableDiffusionPipeline.from_pretrained(
        args.base, safety_checker=None, requires_safety_checker=False
    )
    token, class_word = f"<{CLASS_WORDS[args.domain]}>", CLASS_WORDS[args.domain]
    spec = EncoderSpec(
        backbone=str(args.base / "image_encoder"),
        num_tokens=args.num_tokens,
        width=args.width,
        depth=args.depth,
        heads=args.heads,
        output_dim=pipe.text_encoder.config.hidden_size,
    )
    adapter = NestedAdapter.for_unet(
        pipe.unet,
        token=token,
        class_word=class_word,
        encoder=spec,
        domain=args.domain,
        base_model=str(args.base),
    )
    adapter.init_projections_from(pipe.unet)
    adapter.add_tokens([pipe.tokenizer], [pipe.text_encoder])
    train, held_out = split_identities(args.domain)[:2]
    data = Regression(pipe, adapter, args.domain, base_describer(args.base), rng)
    if float(data.examples(train[:8], 1)[1].var(0).sum()) < 1e-8:  # before rendering every reference
        raise ConfigError(
            f"in {args.base} the class word's feature does not depend on the words naming the identity "
            "(a text model without layers): there is nothing to regress. Use a base from train_base.py "
            "--text-layers N --describe-before."
        )
    train_x, train_y = data.examples(train[:: args.train_every], args.references)
    held_x, held_y = data.examples(held_out[: args.held_out], args.held_out_references)

    resampler = adapter.encoder.resampler
    optimizer = torch.optim.AdamW(resampler.parameters(), lr=args.lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(args.seed)
    history = []

    def scores(step: int, loss: float) -> dict:
        with torch.no_grad():
            fit = {
                name: explained_variance(resampler(x).mean(1), y)
                for name, (x, y) in {"train": (train_x, train_y), "held_out": (held_x, held_y)}.items()
            }
        return {"step": step, "loss": loss, **fit}

    for step in range(1, args.steps + 1):
        batch = torch.randint(0, len(train_x), (args.batch_size,), generator=generator)
        # Every token regresses the feature: v* is then the feature's value whatever the nested attention weights.
        loss = ((resampler(train_x[batch]) - train_y[batch, None]) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % max(1, args.steps // 6) == 0 or step == args.steps:
            history.append(scores(step, loss.item()))
            print(
                f"step {step}: loss {loss.item():.4f}, R^2 train {history[-1]['train']:.3f}, "
                f"held-out {history[-1]['held_out']:.3f}",
                flush=True,
            )
    adapter.save_pretrained(args.out / "adapters" / "last")
    return {"recipe": vars(args), "history": history}  # paths are written as strings


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    start = time.monotonic()
    try:
        report = regress(args)
    except ConfigError as error:
        print(f"regress_adapter: error: {error}", file=sys.stderr)
        return 2
    report["seconds"] = round(time.monotonic() - start, 1)
    write_json_atomic(args.out / "regression.json", report)
    print(f"wrote {args.out / 'adapters' / 'last'} and regression.json in {report['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
