#!/usr/bin/env python
"""How much of an identity the toy base model can draw when the prompt NAMES it.

Nested attention drives the base model through one token's value, so an adapter can only make the model draw
what the model already knows how to draw from words. This measures that ceiling: held-out identities (never
in any training caption) prompted with their attributes in words (``toybase.described_caption``), against the
same prompts without them (the base row of the evaluation, where identity is random). The committed judges
score every image.

    python scripts/toyworld/check_base.py --base data/models/toy-sd --judges data/toyworld/judges \\
        --out runs/toyworld/base-words.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from nested.files import write_json_atomic
from nested.toyworld.base_model import (
    ValueTransplantProcessor,
    base_describer,
    description_vocabulary,
    transplant_class_word,
)
from nested.toyworld.channel import TOKEN_GROUPS, attention_channel, prompt_ids
from nested.toyworld.judges import ToyJudges, attribute_matches, chance_levels
from nested.toyworld.world import CLASS_WORDS, DOMAINS, caption, contexts, identity_class, split_identities


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", type=Path, default=Path("data/models/toy-sd"), help="base model folder")
    parser.add_argument("--judges", type=Path, default=Path("data/toyworld/judges"), help="judges folder")
    parser.add_argument(
        "--images", type=int, default=96, help="images per domain and prompt kind (default 96)"
    )
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps (default 20, as nested eval)")
    parser.add_argument(
        "--guidance", type=float, default=5.0, help="guidance scale (default 5, as nested eval)"
    )
    parser.add_argument("--batch-size", type=int, default=16, help="images per pipeline call (default 16)")
    parser.add_argument(
        "--channel-images", type=int, default=48,
        help="renders per domain and prompt kind for the attention channel (default 48)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    parser.add_argument("--out", type=Path, default=None, help="also write the scores here (JSON)")
    return parser


def held_out_prompts(domain: str, count: int, describe) -> tuple[list, list, list[str]]:
    """``count`` held-out identities (cycled), every context in turn, and their prompts (``describe``:
    None for the class word only)."""
    held_out = split_identities(domain)[1]
    step = max(1, len(held_out) // count)
    subjects = [held_out[(i * step) % len(held_out)] for i in range(count)]
    scenes = contexts()
    chosen = [scenes[i % len(scenes)] for i in range(count)]
    prompts = [
        caption(domain, c) if describe is None else describe(s, c)
        for s, c in zip(subjects, chosen, strict=True)
    ]
    return subjects, chosen, prompts


KINDS = {
    "plain": "class word only (the base row)",
    "words": "identity in words",
    "class word": "class word's feature from the words",
    "class word value": "class word's value from the words",
}


@torch.no_grad()
def transplanted(pipe, plain: list[str], described: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The text features of the class-word prompts ``plain``, and the same except the class word's, which
    comes from the same prompt with the identity in words (``described``). A contextual text model puts
    identity there; the frozen UNet then draws what the class word alone carries. Given as both key and value
    ("class word"), that is what the token can carry; given as the value only ("class word value"), it is
    what nested attention, which replaces the token's value and keeps its key, can reach."""
    tokenizer = pipe.tokenizer
    ids = [prompt_ids(tokenizer, texts) for texts in (plain, described)]
    class_word_ids = torch.tensor(tokenizer.convert_tokens_to_ids([f"{w}</w>" for w in CLASS_WORDS.values()]))
    plain_features, described_features = (pipe.text_encoder(i)[0] for i in ids)
    return plain_features, transplant_class_word(plain_features, described_features, *ids, class_word_ids)


@torch.no_grad()
def text_arguments(pipe, kind: str, prompts: list[str], described: list[str]) -> dict:
    """One pipeline call's text arguments for ``prompts`` of ``kind`` (``described``: the same prompts naming
    the identity). Classifier-free guidance runs the negatives first, so the value source is [empty; moved]."""
    if kind not in ("class word", "class word value"):
        return {"prompt": prompts}
    plain, moved = transplanted(pipe, prompts, described)
    if kind == "class word":
        return {"prompt_embeds": moved}
    empty = pipe.text_encoder(prompt_ids(pipe.tokenizer, [""] * len(prompts)))[0]
    return {
        "prompt_embeds": plain,
        "negative_prompt_embeds": empty,
        "cross_attention_kwargs": {"value_states": torch.cat([empty, moved])},
    }


@torch.no_grad()
def score(pipe, judges: ToyJudges, domain: str, count: int, *, kind: str, args) -> dict[str, float]:
    """Per-attribute and exact accuracy of ``count`` images of held-out identities (cycled), every context,
    prompted as ``kind`` says (a key of :data:`KINDS`)."""
    subjects, chosen, prompts = held_out_prompts(
        domain, count, base_describer(args.base) if kind == "words" else None
    )
    described = held_out_prompts(domain, count, base_describer(args.base))[2]
    hits: dict[str, float] = dict.fromkeys(identity_class(domain).ATTRIBUTES, 0.0)
    exact = 0
    generator = torch.Generator().manual_seed(args.seed)
    for start in tqdm(
        range(0, count, args.batch_size), desc=f"{domain} {kind}", file=sys.stderr, mininterval=5
    ):
        batch = slice(start, start + args.batch_size)
        text = text_arguments(pipe, kind, prompts[batch], described[batch])
        images = pipe(**text, num_inference_steps=args.steps, guidance_scale=args.guidance,
                      generator=generator, output_type="pt").images  # fmt: skip
        for predicted, truth in zip(judges.identity(domain, images), subjects[batch], strict=True):
            matches = attribute_matches(predicted, truth.to_label())
            for name, ok in matches.items():
                hits[name] += ok
            exact += all(matches.values())
    result = {f"attr_{name}": value / count for name, value in hits.items()}
    result["attributes"] = sum(hits.values()) / count / len(hits)
    result["exact"] = exact / count
    return result


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        args.base, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.set_attn_processor(ValueTransplantProcessor())  # diffusers' default without value_states
    judges = ToyJudges.from_pretrained(args.judges)
    report: dict[str, dict[str, dict[str, float]]] = {}
    for domain in DOMAINS:
        report[domain] = {
            **{kind: score(pipe, judges, domain, args.images, kind=kind, args=args) for kind in KINDS},
            "chance": {
                **{f"attr_{n}": 1 / len(v) for n, v in identity_class(domain).ATTRIBUTES.items()},
                "attributes": chance_levels(domain)["attributes"],
                "exact": chance_levels(domain)["identity"],
            },
        }
        columns = list(report[domain]["plain"])
        print(f"{domain}: " + "  ".join(columns))
        for kind in ("chance", *KINDS):
            print(f"  {kind:>10}: " + "  ".join(f"{100 * report[domain][kind][c]:.1f}" for c in columns))
        report[domain]["channel"] = {}
        print(f"{domain} attention in the subject's pixels (mean of the layers): " + "  ".join(TOKEN_GROUPS))
        for kind, describe in (("plain", None), ("words", base_describer(args.base))):
            subjects, chosen, prompts = held_out_prompts(domain, args.channel_images, describe)
            channel = attention_channel(
                pipe, subjects, chosen, prompts, description_vocabulary(), seed=args.seed
            )
            report[domain]["channel"][kind] = channel
            print(f"  {kind:>10}: " + "  ".join(f"{100 * channel['mean'][g]:.1f}" for g in TOKEN_GROUPS))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
