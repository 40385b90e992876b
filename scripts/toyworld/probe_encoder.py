#!/usr/bin/env python
"""Which identity attributes a frozen subject encoder's features carry: a linear probe per attribute.

The adapter's resampler reads the encoder's last hidden state; an attribute that no linear map recovers
from it is hard for an adapter to carry. Each probe is fit on renders of TRAIN identities and scored on
renders of HELD-OUT identities (plain background, a fresh nuisance per render), on two feature sets: the
mean of the tokens, and every patch token side by side (the spatial layout the resampler attends over).

    python scripts/toyworld/probe_encoder.py --encoder data/models/toy-sd/image_encoder --domain faces
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from nested.encoder import CLIP_MEAN, CLIP_STD
from nested.files import write_json_atomic
from nested.toyworld.base_model import render_views
from nested.toyworld.world import DOMAINS, identity_class, split_identities

FEATURES = {
    "mean of the tokens": lambda hidden: hidden.mean(1),
    "all patch tokens": lambda hidden: hidden[:, 1:].flatten(1),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--encoder", type=Path, default=Path("data/models/toy-sd/image_encoder"))
    parser.add_argument("--domain", choices=DOMAINS, default="faces")
    parser.add_argument(
        "--train-every", type=int, default=2, help="fit on every N-th TRAIN identity (default 2: half)"
    )
    parser.add_argument(
        "--held-out", type=int, default=None, help="score on the first N held-out (default all)"
    )
    parser.add_argument("--views", type=int, default=2, help="renders per identity (default 2)")
    parser.add_argument("--steps", type=int, default=300, help="Adam steps per probe (default 300)")
    parser.add_argument("--out", type=Path, default=None, help="also write the accuracies here (JSON)")
    return parser


@torch.no_grad()
def hidden_states(encoder, images: torch.Tensor, batch: int = 128) -> torch.Tensor:
    """uint8 (N, 3, 64, 64) -> the encoder's last hidden state (N, L, d), as the subject encoder reads it."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))
    chunks = [
        encoder(
            pixel_values=(images[i : i + batch].float() / 255 - mean) / std, output_hidden_states=True
        ).hidden_states[-1]
        for i in range(0, len(images), batch)
    ]
    return torch.cat(chunks)


def probe_accuracy(
    train: torch.Tensor,
    train_labels: torch.Tensor,
    test: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    steps: int,
) -> float:
    """A softmax regression on standardized features (fit on ``train``); its accuracy on ``test``."""
    mean, std = train.mean(0), train.std(0) + 1e-6
    train, test = (train - mean) / std, (test - mean) / std
    generator = torch.Generator().manual_seed(0)
    classes = int(max(train_labels.max(), test_labels.max())) + 1
    weight = (torch.randn(train.shape[1], classes, generator=generator) * 0.01).requires_grad_(True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=1e-2, weight_decay=1e-3)
    for _ in range(steps):
        loss = F.cross_entropy(train @ weight + bias, train_labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return ((test @ weight + bias).argmax(1) == test_labels).float().mean().item()


def probe(encoder, domain: str, *, train_every: int, held_out: int | None, views: int, steps: int) -> dict:
    """{feature set: {attribute: held-out accuracy}} and the chance levels."""
    train_people, held_people = split_identities(domain)
    train_people, held_people = train_people[::train_every], held_people[:held_out]
    attributes = identity_class(domain).ATTRIBUTES
    hidden = {
        name: hidden_states(encoder, render_views(views, seed, people).flatten(0, 1))
        for name, people, seed in (("train", train_people, 1), ("held out", held_people, 2))
    }

    def labels(people, attribute: str) -> torch.Tensor:
        values = list(attributes[attribute])
        return torch.tensor([values.index(p.to_label()[attribute]) for p in people]).repeat_interleave(views)

    report = {"chance": {a: 1 / len(v) for a, v in attributes.items()}}
    for feature, pick in FEATURES.items():
        train, test = pick(hidden["train"]), pick(hidden["held out"])
        report[feature] = {
            a: probe_accuracy(train, labels(train_people, a), test, labels(held_people, a), steps=steps)
            for a in attributes
        }
    return report


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from transformers import CLIPVisionModelWithProjection

    encoder = CLIPVisionModelWithProjection.from_pretrained(args.encoder).eval()
    report = probe(
        encoder, args.domain, train_every=args.train_every, held_out=args.held_out, views=args.views,
        steps=args.steps,
    )  # fmt: skip
    attributes = list(report["chance"])
    print(f"{args.domain}, held-out % right: " + "  ".join(attributes))
    for row, scores in report.items():
        print(f"  {row:>18}: " + "  ".join(f"{100 * scores[a]:.1f}" for a in attributes))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
