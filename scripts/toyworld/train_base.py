#!/usr/bin/env python
"""Train the toy world's base model and write it as an SD 1.x diffusers folder.

Stages, each timed: render a pool of train-identity images -> train the VAE -> cache latents -> train the
UNet (EMA) -> pretrain the subject encoder's image backbone (identity-contrastive, train identities) ->
save (atomically: a staging folder, then a rename) -> reload the folder through
``StableDiffusionPipeline.from_pretrained`` and draw a sample sheet (one row per subject kind, one column per
scene). See :mod:`nested.toyworld.base_model` for the models. ``--vae``, ``--text-encoder`` and
``--image-encoder`` reuse trained parts; ``--unet``, ``--vae-start`` and ``--encoder-start`` train them further.

    python scripts/toyworld/train_base.py --out runs/toy-sd --sheet runs/toy-sd-sheet.png

The committed model is several such runs, each warm-started from the one before: its ``training.json``
records them, and ``scripts/toyworld/reproduce.sh`` runs its recipe.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionModelWithProjection

from nested.testing import _tidy_tokenizer_folder
from nested.toyworld import base_model as toybase
from nested.toyworld.world import SCENES, Context, caption, split_identities


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("data/models/toy-sd"), help="output model folder")
    parser.add_argument("--pool", type=int, default=20000, help="rendered training images (default 20000)")
    parser.add_argument(
        "--described", type=float, default=0.8,
        help="fraction of single-subject captions that also name the identity (default 0.8, as the committed"
        " model; 0.5 drew less from words, see its training.json; toybase.render_pool)",
    )  # fmt: skip
    parser.add_argument(
        "--describe-before", action="store_true",
        help="name the identity before the class word (\"a photo of a ... blonde spiky hair ... person\"), for a"
        " contextual text model (--text-layers)",
    )  # fmt: skip
    parser.add_argument(
        "--text-layers", type=int, default=0,
        help="causal transformer layers in the text model, trained with the UNet (default 0: per-token"
        " features, frozen)",
    )  # fmt: skip
    parser.add_argument(
        "--transplant", type=float, default=0.0,
        help="with --text-layers: the fraction of identity-naming captions the UNet sees as the class-word"
        " caption whose class word's feature comes from the naming one (default 0; toybase.train_unet)",
    )  # fmt: skip
    parser.add_argument(
        "--value-transplant", type=float, default=0.0,
        help="with --text-layers: a further fraction of identity-naming captions where only the class word's"
        " VALUE comes from the naming caption (its key stays the class-word caption's), as nested attention"
        " swaps it (default 0; toybase.train_unet)",
    )  # fmt: skip
    parser.add_argument("--vae-steps", type=int, default=3000, help="VAE steps (default 3000)")
    parser.add_argument(
        "--vae", type=Path, default=None, help="reuse this trained VAE folder (skips its stage)"
    )
    parser.add_argument(
        "--vae-start", type=Path, default=None,
        help="train the VAE --vae-steps further from this folder (e.g. data/models/toy-sd/vae) instead of"
        " from scratch",
    )  # fmt: skip
    parser.add_argument("--vae-batch", type=int, default=16, help="VAE batch size (default 16)")
    parser.add_argument(
        "--unet", type=Path, default=None,
        help="start the UNet from this trained folder (e.g. data/models/toy-sd/unet) instead of from scratch",
    )  # fmt: skip
    parser.add_argument(
        "--unet-steps", type=int, default=9300,
        help="UNet steps (default 9300: as many as the committed UNet had in its three per-token legs, see its"
        " training.json); 0 with --unet keeps that UNet as it is",
    )  # fmt: skip
    parser.add_argument("--unet-batch", type=int, default=32, help="UNet batch size (default 32)")
    parser.add_argument("--unet-lr", type=float, default=1e-3, help="UNet peak learning rate (default 1e-3)")
    parser.add_argument(
        "--text-encoder", type=Path, default=None,
        help="keep this text model's rows (the one --unet was trained with); new tokens and positions get"
        " random rows",
    )  # fmt: skip
    parser.add_argument(
        "--encoder-steps",
        type=int,
        default=600,
        help="subject-encoder backbone pretraining steps (default 600)",
    )
    parser.add_argument(
        "--image-encoder", type=Path, default=None,
        help="reuse this pretrained image encoder folder (skips its stage)",
    )  # fmt: skip
    parser.add_argument(
        "--encoder-start", type=Path, default=None,
        help="start the image encoder's pretraining from this folder (e.g. data/models/toy-sd/image_encoder)"
        " instead of at random",
    )  # fmt: skip
    parser.add_argument(
        "--encoder-lr",
        type=float,
        default=1e-3,
        help="image encoder peak learning rate (default 1e-3; not used with --image-encoder)",
    )
    parser.add_argument(
        "--encoder-batch",
        type=int,
        default=64,
        help="image encoder batch size (default 64; not used with --image-encoder)",
    )
    parser.add_argument(
        "--encoder-views",
        type=int,
        default=4,
        help="renders per TRAIN identity the image encoder trains on, each with a fresh nuisance (at least 2; default 4)",
    )
    parser.add_argument(
        "--encoder-text", action="store_true",
        help="also align the image encoder with this base's text model's features of each identity's"
        " description, CLIP-style (toybase.train_image_encoder's text_features)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared 2-core machine two threads thrash)",
    )
    parser.add_argument("--sheet", type=Path, default=None, help="also save a sample sheet PNG here")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    return parser


def _bar(total: int, desc: str):
    bar = tqdm(total=total, desc=desc, unit="step", file=sys.stderr, mininterval=2.0)

    def progress(step: int, logs: dict[str, float]) -> None:
        bar.update(1)
        if step % 20 == 0:
            bar.set_postfix({k: f"{v:.4f}" for k, v in logs.items()})
        if step + 1 == total:
            bar.close()

    return progress


@torch.no_grad()
def sample_sheet(model: Path, path: Path, seed: int = 0, steps: int = 25, guidance: float = 5.0) -> None:
    """Rows: person, pet, person + pet; columns: every scene. Loaded back through ``from_pretrained``."""
    from diffusers import StableDiffusionPipeline

    from nested.evaluation.images import save_png

    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    prompts = [caption(kind, Context(scene)) for kind in ("faces", "pets", "pair") for scene in SCENES]
    images = pipe(
        prompts,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).images
    rows = images.reshape(3, len(SCENES), *images.shape[1:])
    sheet = torch.cat([torch.cat(list(row), dim=-1) for row in rows], dim=-2)
    save_png(sheet.clamp(0, 1), path)


def training_record(args: argparse.Namespace, times: dict[str, float]) -> dict:
    """The model's ``training.json``: the stages of the UNet it started from (``--unet``'s folder's record),
    then this run's recipe and timings."""
    recipe = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    stage = {"recipe": recipe, "seconds": {k: round(v, 1) for k, v in times.items()}}
    start = None if args.unet is None else args.unet.parent / "training.json"
    if start is None or not start.exists():
        return {"stages": [stage]}
    earlier = json.loads(start.read_text())
    if "stages" not in earlier:  # a one-stage record
        earlier = {"stages": [earlier]}
    return {**earlier, "stages": [*earlier["stages"], stage]}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.out.exists() and not args.overwrite:
        print(f"train_base: {args.out} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    if args.unet_steps < 0:
        print(f"train_base: --unet-steps must be >= 0, got {args.unet_steps}", file=sys.stderr)
        return 2
    if args.unet_steps == 0 and None in (args.unet, args.vae, args.text_encoder):
        print("train_base: --unet-steps 0 keeps a trained UNet: pass it with --unet, and the VAE and text model"
              " it was trained with (--vae, --text-encoder)", file=sys.stderr)  # fmt: skip
        return 2
    if args.encoder_views < 2:
        print(f"train_base: --encoder-views must be >= 2 (the encoder learns from two renders of one identity),"
              f" got {args.encoder_views}", file=sys.stderr)  # fmt: skip
        return 2
    if args.vae is not None and args.vae_start is not None:
        print("train_base: --vae reuses a VAE as it is; --vae-start trains one further", file=sys.stderr)
        return 2
    if args.image_encoder is not None and (args.encoder_start is not None or args.encoder_text):
        print("train_base: --image-encoder reuses an encoder as it is; --encoder-start and --encoder-text"
              " train one", file=sys.stderr)  # fmt: skip
        return 2
    if args.text_encoder is not None:
        try:
            start_layers = CLIPTextConfig.from_pretrained(args.text_encoder).num_hidden_layers
        except OSError as error:
            print(f"train_base: --text-encoder {args.text_encoder} is not a text model folder ({error})",
                  file=sys.stderr)  # fmt: skip
            return 2
        if start_layers > args.text_layers:
            print(f"train_base: --text-encoder {args.text_encoder} has {start_layers} transformer layers; pass"
                  f" --text-layers {start_layers}", file=sys.stderr)  # fmt: skip
            return 2
    torch.set_num_threads(args.threads)
    times: dict[str, float] = {}
    started = time.time()

    pool = None
    if args.vae is None or args.unet_steps > 0:
        pool = toybase.render_pool(
            args.pool, seed=args.seed, described_fraction=args.described, describe_before=args.describe_before
        )
        times["render"] = time.time() - started
        print(f"rendered {len(pool.images)} images in {times['render']:.0f} s", file=sys.stderr)

    mark = time.time()
    staging = Path(tempfile.mkdtemp(prefix=f".{args.out.name}-", dir=args.out.parent))
    if args.vae is not None:
        vae = AutoencoderKL.from_pretrained(args.vae).eval().requires_grad_(False)
    else:
        torch.manual_seed(args.seed)
        if args.vae_start is not None:
            start_vae = AutoencoderKL.from_pretrained(args.vae_start).train().requires_grad_(True)
        else:
            start_vae = toybase.build_vae()
        vae = toybase.train_vae(
            start_vae, pool, steps=args.vae_steps, batch_size=args.vae_batch, seed=args.seed,
            progress=_bar(args.vae_steps, "vae"),
        )  # fmt: skip
        vae.save_pretrained(staging / "vae")  # early, so it can be inspected while the UNet trains
    if pool is not None:
        print(f"reconstruction L1 (0-255 scale): {toybase.reconstruction_error(vae, pool.images[-256:]):.2f}")
    times["vae"] = time.time() - mark

    mark = time.time()
    tokenizer = toybase.write_world_tokenizer(staging / "tokenizer")
    start_text = None if args.text_encoder is None else CLIPTextModel.from_pretrained(args.text_encoder)
    text_encoder = toybase.build_text_encoder(
        tokenizer, seed=args.seed + 1, start=start_text, layers=args.text_layers
    )
    torch.manual_seed(args.seed + 2)
    if args.unet is not None:
        start = UNet2DConditionModel.from_pretrained(args.unet, torch_dtype=torch.float32)
    else:
        start = toybase.build_unet(text_encoder.config.hidden_size)
    if args.unet_steps == 0:
        unet = start.eval().requires_grad_(False)
    else:
        latents_started = time.time()
        latents = toybase.encode_latents(vae, pool.images)
        times["latents"] = time.time() - latents_started
        unet = toybase.train_unet(
            start, latents, pool.captions, tokenizer, text_encoder,
            steps=args.unet_steps, batch_size=args.unet_batch, lr=args.unet_lr, seed=args.seed,
            class_captions=pool.class_captions, transplant_fraction=args.transplant,
            value_transplant_fraction=args.value_transplant,
            progress=_bar(args.unet_steps, "unet"),
        )  # fmt: skip
    times["unet"] = time.time() - mark - times.get("latents", 0.0)

    mark = time.time()
    if args.image_encoder is not None:
        image_encoder = CLIPVisionModelWithProjection.from_pretrained(args.image_encoder)
    else:
        people = [i for domain in ("faces", "pets") for i in split_identities(domain)[0]]
        views = toybase.render_views(args.encoder_views, seed=args.seed, people=people)
        text_features = None
        if args.encoder_text:
            text_features = toybase.identity_text_features(tokenizer, text_encoder, people)
        if args.encoder_start is not None:
            start_encoder = CLIPVisionModelWithProjection.from_pretrained(args.encoder_start)
            torch.manual_seed(args.seed + 3)  # the pretraining heads' start, as build_image_encoder seeds it
        else:
            start_encoder = toybase.build_image_encoder(seed=args.seed + 3)
        image_encoder = toybase.train_image_encoder(
            start_encoder.train().requires_grad_(True), views, steps=args.encoder_steps,
            batch_size=args.encoder_batch, lr=args.encoder_lr, seed=args.seed, text_features=text_features,
            progress=_bar(args.encoder_steps, "image encoder"),
        )  # fmt: skip
    times["image_encoder"] = time.time() - mark

    toybase.save_base_model(
        staging,
        vae=vae,
        unet=unet,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        image_encoder=image_encoder,
    )
    _tidy_tokenizer_folder(staging / "tokenizer", keep_tokenizer_json=True)
    times["total"] = time.time() - started
    (staging / "training.json").write_text(json.dumps(training_record(args, times), indent=2) + "\n")
    if args.out.exists():
        shutil.rmtree(args.out)
    staging.rename(args.out)
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()), file=sys.stderr)

    if args.sheet is not None:
        sample_sheet(args.out, args.sheet, seed=args.seed)
        print(f"sample sheet: {args.sheet}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
