"""Reading training shards: domains, transforms, multi-domain mixing and the LightningDataModule.

The sample format is documented in ``nested.shards``. One stream mixes every domain; each
sample carries its domain's subject token. The per-domain pipeline is a list of small stages::

    shards   ResampledShards(urls)            (train: with replacement, seeded per rank/worker)
             | SimpleShardList + partition    (validation: each shard/sample read exactly once)
    read     tar -> samples, counting broken shards
    shuffle  seeded buffer                    (train only)
    decode   PIL / npy / json                 (undecodable samples are counted and skipped)
    convert  caption rule, target + reference transforms -> training sample

and the domains are joined by ``mix`` (seeded weighted choice) -> ``attach_skip_counts``.

Skipped samples never crash a run: every skip is counted in a per-worker ``SkipCounter``, and
each yielded sample carries the counts accumulated since the previous yield in
``sample["skipped"]``; ``collate_batch`` sums them into ``batch["skipped"]`` so the training
module can sum them per epoch. Counter keys (``SKIP_KEYS``): ``corrupt`` (undecodable image,
missing json/caption/image), ``broken_shards`` (unreadable or truncated tar, counted once per
read), ``no_subject_dropped``, ``no_subject_inserted`` (not a skip: the caption was rewritten),
``no_reference`` (``reference="ref"`` and no ref image). A one-sample look-ahead attaches the
skips made while fetching the next sample to the current one, so a stream's (or an epoch's) last
sample carries all remaining counts; only a worker that yields no sample at all loses them.
"""

from __future__ import annotations

import io
import json
import logging
import math
import random
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import lightning as L
import numpy as np
import torch
import webdataset as wds
from PIL import Image, ImageEnhance
from torch.utils.data import DataLoader, IterableDataset

log = logging.getLogger(__name__)

SKIP_KEYS = ("corrupt", "broken_shards", "no_subject_dropped", "no_subject_inserted", "no_reference")
_TARGET_KEYS = ("jpg", "jpeg", "png", "webp")
_REF_KEYS = ("ref.jpg", "ref.png")
_LATENT_KEYS = ("latents.npy", "latents.pth")


# ----------------------------------------------------------------------------- configuration


@dataclass
class ReferenceAugment:
    """Augmentation of the encoder's reference image (training only; validation uses none).

    Attributes:
        enabled: master switch.
        scale: area fraction range of the random resized crop (taken from the square source).
        ratio: aspect-ratio range of that crop (it is resized back to a square).
        flip: random horizontal flip with p=0.5.
        color_jitter: brightness, contrast and saturation factors drawn from [1-j, 1+j].
        bbox_jitter: each side of a bbox crop gets ``DomainSpec.bbox_margin`` +- U(0, jitter)
            of the box size, so the encoder does not learn one exact framing.
    """

    enabled: bool = True
    scale: tuple[float, float] = (0.8, 1.0)
    ratio: tuple[float, float] = (0.9, 1.1)
    flip: bool = True
    color_jitter: float = 0.1
    bbox_jitter: float = 0.1


@dataclass
class DomainSpec:
    """One training domain (faces, pets...): its shards and the subject token it binds to.

    Attributes:
        name: domain name (logged, and ``batch["domains"]``).
        urls: a brace pattern (``"data/faces/faces-{000000..000009}.tar"``), a list of tar
            paths/urls, or the path of a ``shards.json`` (expands to its shards, relative to it).
        subject: the token the subject binds to, e.g. ``"<person>"`` or ``"dog"``.
        weight: relative sampling weight in the mixed stream (> 0).
        caption_rule: what to do with a caption that lacks the subject token (matched as a whole
            word, case-insensitively): ``"insert"`` prepends the formatted ``insert_template``
            and a comma, ``"a cat on a sofa"`` -> ``"a photo of <cat>, a cat on a sofa"`` (an
            empty caption becomes the template alone); ``"drop"`` skips the sample.
        insert_template: must contain ``{subject}``.
        reference: where the encoder's reference comes from when a sample has no ref image (a
            ref image is always used when present): ``"bbox_crop"`` crops the target around its
            ``bbox`` (the whole target when there is none); ``"target"`` uses the whole target;
            ``"ref"`` requires a ref image and skips samples without one.
        bbox_margin: context added on every side of a bbox crop, as a fraction of the box size.
    """

    name: str
    urls: str | list[str]
    subject: str
    weight: float = 1.0
    caption_rule: Literal["insert", "drop"] = "insert"
    insert_template: str = "a photo of {subject}"
    reference: Literal["ref", "bbox_crop", "target"] = "bbox_crop"
    bbox_margin: float = 0.1

    def __post_init__(self) -> None:
        problems = []
        if not self.name:
            problems.append("name is empty: give the domain a name such as 'faces'")
        if not self.urls or (isinstance(self.urls, list) and not all(self.urls)):
            problems.append("urls is empty: give a brace pattern, a list of .tar paths or a shards.json path")
        if not self.subject or self.subject != self.subject.strip():
            problems.append(f"subject {self.subject!r} must be a non-empty token without surrounding spaces")
        if not (self.weight > 0 and math.isfinite(self.weight)):
            problems.append(f"weight={self.weight} must be a positive number")
        if self.caption_rule not in ("insert", "drop"):
            problems.append(f"caption_rule={self.caption_rule!r} must be 'insert' or 'drop'")
        if self.reference not in ("ref", "bbox_crop", "target"):
            problems.append(f"reference={self.reference!r} must be 'ref', 'bbox_crop' or 'target'")
        if "{subject}" not in self.insert_template:
            problems.append(f"insert_template={self.insert_template!r} must contain '{{subject}}'")
        else:
            try:
                self.insert_template.format(subject=self.subject)
            except (KeyError, IndexError, ValueError) as exc:
                problems.append(
                    f"insert_template={self.insert_template!r} has a field other than {{subject}}: {exc}"
                )
        if not self.bbox_margin >= 0:
            problems.append(f"bbox_margin={self.bbox_margin} must be >= 0")
        if problems:
            raise ValueError(f"invalid DomainSpec {self.name!r}:\n  - " + "\n  - ".join(problems))


# ----------------------------------------------------------------------------- urls


def _is_local(url: str) -> bool:
    return url.startswith("file://") or ("://" not in url and not url.startswith("pipe:"))


def _local_path(url: str) -> Path:
    return Path(url.removeprefix("file://"))


def expand_urls(urls: str | list[str]) -> list[str]:
    """Expand brace patterns, ``::``-joined lists and ``shards.json`` indexes into shard urls.

    A shards.json that does not exist is kept as is, so ``check_urls`` can name it.
    """
    result: list[str] = []
    for item in [urls] if isinstance(urls, str) else list(urls):
        for url in wds.shardlists.expand_urls(item):
            path = _local_path(url)
            if _is_local(url) and url.endswith(".json") and path.is_file():
                index = json.loads(path.read_text(encoding="utf-8"))
                result.extend(
                    str(path.parent / s["url"]) if _is_local(s["url"]) else s["url"]
                    for s in index.get("shards", [])
                )
            else:
                result.append(url)
    return result


def check_urls(spec: DomainSpec) -> list[str]:
    """Expand ``spec.urls`` and fail now, naming the urls, if there is nothing to read.

    Remote urls (``http://``, ``pipe:``...) cannot be checked here and are trusted.

    Raises:
        FileNotFoundError: when no url expands, or local shard files are missing.
    """
    urls = expand_urls(spec.urls)
    if not urls:
        raise FileNotFoundError(
            f"domain {spec.name!r}: urls {spec.urls!r} expand to no shard files; expected a brace pattern like "
            "'data/faces/faces-{000000..000009}.tar', a list of .tar files or a shards.json listing shards"
        )
    missing = [url for url in urls if _is_local(url) and not _local_path(url).is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" ... ({len(missing) - 5} more)" if len(missing) > 5 else "")
        raise FileNotFoundError(
            f"domain {spec.name!r}: {len(missing)} of {len(urls)} shard files from urls {spec.urls!r} do not exist: "
            f"{shown}. Build them with `nested shards` or fix the path (relative paths are resolved from the "
            "working directory)."
        )
    return urls


# ----------------------------------------------------------------------------- transforms


class TargetView(NamedTuple):
    """The transformed target: pixels (3, R, R) float32 in [-1, 1] + SDXL micro-conditioning."""

    pixel_values: torch.Tensor
    original_size: tuple[int, int]  # (h, w) before the resize
    crop_top_left: tuple[int, int]  # (top, left) in the resized (and, if flipped, mirrored) image


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)


def target_transform(
    image: Image.Image,
    *,
    resolution: int,
    center_crop: bool = True,
    random_flip: bool = False,
    rng: random.Random | None = None,
) -> TargetView:
    """Resize the short side to ``resolution``, crop a square, optionally flip.

    The crop is random (uniform position) unless ``center_crop``; a flip happens with p=0.5.
    ``crop_top_left`` is reported in the mirrored image when flipped, which is what the SDXL
    training recipes report (they flip before cropping).
    """
    rng = rng or random.Random(0)
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if size != image.size:
        image = image.resize(size, Image.Resampling.BICUBIC)
    if center_crop:
        top, left = (size[1] - resolution) // 2, (size[0] - resolution) // 2
    else:
        top, left = rng.randint(0, size[1] - resolution), rng.randint(0, size[0] - resolution)
    image = image.crop((left, top, left + resolution, top + resolution))
    if random_flip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        left = size[0] - resolution - left
    return TargetView(_to_tensor(image).mul_(2.0).sub_(1.0), (height, width), (top, left))


def bbox_square(
    bbox: list[float],
    image_size: tuple[int, int],
    margin: float,
    jitter: float = 0.0,
    rng: random.Random | None = None,
) -> tuple[int, int, int, int]:
    """The square crop box around ``bbox`` = [x0, y0, x1, y1] with a margin, kept in the image.

    Each side grows by (margin +- U(0, jitter)) x the box size; the result is squared around the
    box centre (side = the longer side, at most the image's short side) and shifted inside.
    """
    rng = rng or random.Random(0)
    x0, y0, x1, y1 = bbox
    width, height = x1 - x0, y1 - y0

    def grow() -> float:
        return max(0.0, margin + rng.uniform(-jitter, jitter)) if jitter else margin

    x0, x1 = x0 - grow() * width, x1 + grow() * width
    y0, y1 = y0 - grow() * height, y1 + grow() * height
    side = max(1, min(round(max(x1 - x0, y1 - y0)), *image_size))
    left = min(max(0, round((x0 + x1 - side) / 2)), image_size[0] - side)
    top = min(max(0, round((y0 + y1 - side) / 2)), image_size[1] - side)
    return left, top, left + side, top + side


def _center_square(image: Image.Image) -> Image.Image:
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side))


def _random_resized_crop(image: Image.Image, augment: ReferenceAugment, rng: random.Random) -> Image.Image:
    width, height = image.size
    for _ in range(10):  # rejection sampling; falls back to the whole image
        area = width * height * rng.uniform(*augment.scale)
        ratio = math.exp(rng.uniform(math.log(augment.ratio[0]), math.log(augment.ratio[1])))
        crop_w, crop_h = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            left, top = rng.randint(0, width - crop_w), rng.randint(0, height - crop_h)
            return image.crop((left, top, left + crop_w, top + crop_h))
    return image


def reference_transform(
    target: Image.Image,
    *,
    size: int,
    ref: Image.Image | None = None,
    bbox: list[float] | None = None,
    bbox_margin: float = 0.1,
    augment: ReferenceAugment | None = None,
    rng: random.Random | None = None,
) -> torch.Tensor:
    """The encoder's input: (3, size, size) float32 in [0, 1].

    Source: ``ref`` if given, else the ``bbox`` square crop of ``target`` (see ``bbox_square``),
    else ``target``; made square by a center crop; then (if ``augment`` is enabled) random
    resized crop, flip and colour jitter; finally resized to ``size`` x ``size``.
    """
    rng = rng or random.Random(0)
    augmenting = augment is not None and augment.enabled
    if ref is not None:
        source = ref
    elif bbox is not None:
        jitter = augment.bbox_jitter if augmenting else 0.0
        source = target.crop(bbox_square(bbox, target.size, bbox_margin, jitter, rng))
    else:
        source = target
    source = _center_square(source)
    if augmenting:
        source = _random_resized_crop(source, augment, rng)
        if augment.flip and rng.random() < 0.5:
            source = source.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if augment.color_jitter > 0:
            for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
                source = enhance(source).enhance(
                    rng.uniform(1 - augment.color_jitter, 1 + augment.color_jitter)
                )
    if source.size != (size, size):
        source = source.resize((size, size), Image.Resampling.BICUBIC)
    return _to_tensor(source)


def contains_subject(caption: str, subject: str) -> bool:
    """Whether ``subject`` occurs in ``caption`` as a whole word (case-insensitive)."""
    return re.search(rf"(?<!\w){re.escape(subject)}(?!\w)", caption, flags=re.IGNORECASE) is not None


def insert_subject(caption: str, spec: DomainSpec) -> str:
    """``"a cat on a sofa"`` -> ``"a photo of <cat>, a cat on a sofa"`` (see ``DomainSpec``)."""
    prefix = spec.insert_template.format(subject=spec.subject)
    return f"{prefix}, {caption}" if caption else prefix


# ----------------------------------------------------------------------------- skip counting


class SkipCounter:
    """Per-worker counts of skipped samples since the last yielded sample.

    Raises after ``max_consecutive`` skips without a single good sample, so a dataset that is
    entirely broken (or a ``drop`` rule that drops everything) fails loudly instead of spinning.
    """

    def __init__(self, max_consecutive: int = 1000) -> None:
        self.max_consecutive = max_consecutive
        self.pending = dict.fromkeys(SKIP_KEYS, 0)
        self.totals = dict.fromkeys(SKIP_KEYS, 0)
        self.consecutive = 0

    def add(self, kind: str, reason: object = None) -> None:
        self.pending[kind] += 1
        self.totals[kind] += 1
        total = self.totals[kind]
        if reason is not None and total & (total - 1) == 0:  # log the 1st, 2nd, 4th, 8th...
            log.warning("data: %s #%d in this worker: %s", kind, total, reason)
        if kind == "no_subject_inserted":
            return
        self.consecutive += 1
        if self.consecutive > self.max_consecutive:
            raise RuntimeError(
                f"data: {self.consecutive} samples/shards in a row were skipped ({self.totals}); last: {reason}. "
                "Check the shards (corrupt or unreadable?) and the domains' caption_rule/reference settings."
            )

    def handler(self, kind: str) -> Callable[[BaseException], bool]:
        """A webdataset exception handler that counts under ``kind`` and continues."""
        return _CountingHandler(self, kind)

    def drain(self) -> dict[str, int]:
        counts, self.pending, self.consecutive = self.pending, dict.fromkeys(SKIP_KEYS, 0), 0
        return counts


class _CountingHandler:
    def __init__(self, counter: SkipCounter, kind: str) -> None:
        self.counter, self.kind = counter, kind

    def __call__(self, exc: BaseException) -> bool:
        self.counter.add(self.kind, repr(exc)[:300])
        return True


# ----------------------------------------------------------------------------- pipeline stages


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class _Seeded:
    """Base of stages whose randomness depends on (seed, rank, worker, epoch) and nothing else.

    Each call (one per epoch, inside the worker) advances the epoch; ``epoch_offset`` (the
    trainer's epoch when the loader was built) keeps a resumed run from replaying epoch 0.
    """

    def __init__(self, seed: int, rank: int, epoch_offset: int) -> None:
        self.seed, self.rank, self.epoch = seed, rank, epoch_offset - 1

    def next_rng(self, salt: str) -> random.Random:
        self.epoch += 1
        # A str seed is hashed with sha512: stable across processes, unlike hash().
        return random.Random(f"{salt}:{self.seed}:{self.rank}:{_worker()[0]}:{self.epoch}")


class _WorkerSeed:
    """``worker_seed`` for ``wds.ResampledShards``: our rank, not the env/torch.distributed one."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def __call__(self) -> int:
        return self.rank * 1000 + _worker()[0]


class _Partition:
    """Deterministic split over ranks x workers: by shard when every slot gets one, else by sample.

    Splitting by sample costs each slot a read of every shard, but no rank is ever left without
    data (which would hang DDP collectives).
    """

    def __init__(self, rank: int, world_size: int, num_shards: int) -> None:
        self.rank, self.world_size, self.num_shards = rank, world_size, num_shards

    def _slot(self) -> tuple[int, int]:
        worker, num_workers = _worker()
        return self.rank * num_workers + worker, self.world_size * num_workers

    def shards(self, src: Iterable[Any]) -> Iterator[Any]:
        slot, slots = self._slot()
        return iter(src) if self.num_shards < slots else (s for i, s in enumerate(src) if i % slots == slot)

    def samples(self, src: Iterable[Any]) -> Iterator[Any]:
        slot, slots = self._slot()
        return iter(src) if self.num_shards >= slots else (s for i, s in enumerate(src) if i % slots == slot)


class _ReadShards:
    """Shard dicts -> raw samples (``wds.tarfile_samples`` per shard, to count each broken shard once).

    A shard cut inside a member raises (counted here); Python's tarfile treats a cut inside a
    header as a clean end of archive, which only shows up as an incomplete last sample.
    """

    def __init__(self, counter: SkipCounter) -> None:
        self.counter = counter

    def __call__(self, shards: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for shard in shards:
            errors: list[BaseException] = []

            def on_error(exc: BaseException, errors: list[BaseException] = errors) -> bool:
                errors.append(exc)
                return True

            yield from wds.tarfile_samples([shard], handler=on_error)
            if errors:
                self.counter.add("broken_shards", f"{shard['url']}: {errors[0]!r}")


class _Shuffle(_Seeded):
    def __init__(self, bufsize: int, salt: str, seed: int, rank: int, epoch_offset: int) -> None:
        super().__init__(seed, rank, epoch_offset)
        self.bufsize, self.salt = bufsize, salt

    def __call__(self, src: Iterator[Any]) -> Iterator[Any]:
        rng = self.next_rng(self.salt)
        return wds.shuffle(self.bufsize, initial=max(1, self.bufsize // 10), rng=rng)(src)


def _load_tensor(data: bytes) -> torch.Tensor:
    # webdataset's own .pth decoder uses weights_only=False: arbitrary code from a shard.
    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


def decode_stage(counter: SkipCounter) -> Callable[[Iterable[Any]], Iterator[Any]]:
    """Decode images to RGB PIL, json, npy/pth latents; everything else stays bytes (no pickle)."""
    return wds.decode(
        wds.handle_extension("pth", _load_tensor),
        "pil",
        only=[*_TARGET_KEYS, *_REF_KEYS, *_LATENT_KEYS, "json"],
        handler=counter.handler("corrupt"),
    )


class _ToTrainingSample(_Seeded):
    """Decoded sample -> training sample (see ``collate_batch`` for the fields), or a counted skip."""

    def __init__(
        self,
        spec: DomainSpec,
        counter: SkipCounter,
        *,
        resolution: int,
        reference_size: int,
        center_crop: bool,
        random_flip: bool,
        augment: ReferenceAugment | None,
        seed: int,
        rank: int,
        epoch_offset: int,
    ) -> None:
        super().__init__(seed, rank, epoch_offset)
        self.spec, self.counter, self.augment = spec, counter, augment
        self.resolution, self.reference_size = resolution, reference_size
        self.center_crop, self.random_flip = center_crop, random_flip

    def __call__(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        rng = self.next_rng(f"sample:{self.spec.name}")
        for raw in src:
            try:
                sample = self.convert(raw, rng)
            except Exception as exc:  # a malformed sample must never stop the run
                self.counter.add("corrupt", f"{raw.get('__url__')} {raw.get('__key__')}: {exc!r}")
                continue
            if sample is not None:
                yield sample

    def convert(self, raw: dict[str, Any], rng: random.Random) -> dict[str, Any] | None:
        target = next((raw[k] for k in _TARGET_KEYS if k in raw), None)
        if not isinstance(target, Image.Image):
            raise ValueError(f"no target image (expected one of {_TARGET_KEYS}, got {sorted(raw)})")
        meta = raw.get("json")
        if not isinstance(meta, dict) or not isinstance(meta.get("caption"), str):
            raise ValueError("json member missing or without a 'caption' string")
        caption = meta["caption"].strip()
        if not contains_subject(caption, self.spec.subject):
            if self.spec.caption_rule == "drop":
                self.counter.add("no_subject_dropped")
                return None
            caption = insert_subject(caption, self.spec)
            self.counter.add("no_subject_inserted")
        ref = next((raw[k] for k in _REF_KEYS if k in raw), None)
        if ref is None and self.spec.reference == "ref":
            self.counter.add("no_reference", raw.get("__key__"))
            return None
        bbox = meta.get("bbox") if self.spec.reference == "bbox_crop" else None
        view = target_transform(
            target,
            resolution=self.resolution,
            center_crop=self.center_crop,
            random_flip=self.random_flip,
            rng=rng,
        )
        reference = reference_transform(
            target,
            size=self.reference_size,
            ref=ref,
            bbox=bbox,
            bbox_margin=self.spec.bbox_margin,
            augment=self.augment,
            rng=rng,
        )
        original_size = meta.get("original_size") or view.original_size
        sample = {
            "pixel_values": view.pixel_values,
            "reference": reference,
            "caption": caption,
            "subject": self.spec.subject,
            "domain": self.spec.name,
            "key": raw["__key__"],
            "original_size": (int(original_size[0]), int(original_size[1])),
            "crop_top_left": view.crop_top_left,
        }
        # Cached latents are only valid for the exact deterministic view they were encoded from.
        latents = next((raw[k] for k in _LATENT_KEYS if k in raw), None)
        if (
            latents is not None
            and self.center_crop
            and not self.random_flip
            and meta.get("latents_resolution") == self.resolution
        ):
            sample["latents"] = torch.as_tensor(np.asarray(latents), dtype=torch.float32)
        return sample


class _WeightedMix(IterableDataset, _Seeded):
    """Draws each sample from domain i with probability weight_i / sum(weights), seeded.

    With ``longest`` (finite validation streams) an exhausted domain leaves the draw; otherwise
    the first exhausted domain ends the stream.
    """

    def __init__(
        self,
        sources: list[Iterable[Any]],
        weights: list[float],
        *,
        longest: bool,
        seed: int,
        rank: int,
        epoch_offset: int,
    ) -> None:
        _Seeded.__init__(self, seed, rank, epoch_offset)
        self.sources, self.weights, self.longest = sources, weights, longest

    def __iter__(self) -> Iterator[Any]:
        rng = self.next_rng("mix")
        iterators, weights = [iter(s) for s in self.sources], list(self.weights)
        while iterators:
            index = rng.choices(range(len(iterators)), weights=weights)[0]
            try:
                yield next(iterators[index])
            except StopIteration:
                if not self.longest:
                    return
                del iterators[index], weights[index]


class _AttachSkipCounts:
    """Attaches the counts made since the previous yield to each sample, one sample late.

    Holding one sample back means the skips that happen while fetching the NEXT sample (or
    before the stream ends) ride on the held one: the last sample of a finite stream carries
    everything, and none are left behind at the end of an epoch.
    """

    def __init__(self, counter: SkipCounter) -> None:
        self.counter = counter

    def __call__(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        held = None
        for sample in src:
            if held is not None:
                held["skipped"] = self.counter.drain()
                yield held
            held = sample
        if held is not None:
            held["skipped"] = self.counter.drain()
            yield held


# ----------------------------------------------------------------------------- dataset + batches


class NestedStream(IterableDataset):
    """The mixed sample stream. ``len()`` is the samples per rank per epoch (training only)."""

    def __init__(self, pipeline: wds.DataPipeline, length: int | None) -> None:
        super().__init__()
        self.pipeline, self.length = pipeline, length

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.pipeline)

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError("a validation stream has no length")  # what has_len() expects
        return self.length


def samples_per_worker(epoch_samples: int, world_size: int, num_workers: int, batch_size: int) -> int:
    """Samples each loader worker yields per epoch (the ``with_epoch`` count).

    ``epoch_samples`` is global (all ranks). It is rounded UP so that every worker yields whole
    batches and every rank the same number of batches: ``max(1, num_workers) *
    ceil(epoch_samples / (world_size * max(1, num_workers) * batch_size))`` batches per rank.
    """
    slots = world_size * max(1, num_workers)
    return math.ceil(epoch_samples / (slots * batch_size)) * batch_size


def build_stream(
    domains: list[DomainSpec],
    *,
    train: bool,
    resolution: int,
    reference_size: int = 224,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    batch_size: int = 1,
    epoch_samples: int = 10000,
    max_samples: int | None = None,
    shuffle_buffer: int = 1000,
    seed: int = 0,
    epoch_offset: int = 0,
    center_crop: bool = False,
    random_flip: bool = False,
    reference_augment: ReferenceAugment | None = None,
    max_consecutive_failures: int = 1000,
) -> NestedStream:
    """Build the mixed stream of training samples for one rank.

    ``train=True``: resampled shards (any number of ranks/workers works and nothing runs dry),
    seeded shuffle, the given crop/flip/augmentation, and ``samples_per_worker`` samples per
    worker per epoch. ``train=False``: every shard/sample once, split disjointly over ranks x
    workers (``_Partition``), center crop, no flip, no augmentation, at most ``ceil(max_samples
    / (world_size * workers))`` samples per worker when ``max_samples`` is set.

    ``rank``/``world_size`` are passed in (the DataModule reads them from its trainer) rather than
    read from the environment like ``wds.split_by_node``; ``num_workers`` must equal the
    DataLoader's, since the epoch length per worker depends on it.

    Raises:
        FileNotFoundError: when a domain's urls name no or missing shard files.
    """
    if not domains:
        raise ValueError("no domains given: pass at least one DomainSpec")
    counter = SkipCounter(max_consecutive_failures)
    if not train:
        center_crop, random_flip, reference_augment = True, False, None
    pipelines = []
    for index, spec in enumerate(domains):
        urls = check_urls(spec)
        if train:
            stages: list[Any] = [
                wds.ResampledShards(
                    urls,
                    seed=wds.utils.make_seed(seed, index, epoch_offset),
                    worker_seed=_WorkerSeed(rank),
                    deterministic=True,
                ),
                _ReadShards(counter),
            ]
            if shuffle_buffer > 1:
                stages.append(_Shuffle(shuffle_buffer, f"shuffle:{spec.name}", seed, rank, epoch_offset))
        else:
            partition = _Partition(rank, world_size, len(urls))
            stages = [wds.SimpleShardList(urls), partition.shards, _ReadShards(counter), partition.samples]
        stages += [
            decode_stage(counter),
            _ToTrainingSample(
                spec,
                counter,
                resolution=resolution,
                reference_size=reference_size,
                center_crop=center_crop,
                random_flip=random_flip,
                augment=reference_augment,
                seed=seed,
                rank=rank,
                epoch_offset=epoch_offset,
            ),
        ]
        pipelines.append(wds.DataPipeline(*stages))
    mix = _WeightedMix(
        pipelines,
        [d.weight for d in domains],
        longest=not train,
        seed=seed,
        rank=rank,
        epoch_offset=epoch_offset,
    )
    pipeline = wds.DataPipeline(mix, _AttachSkipCounts(counter))
    if train:
        per_worker = samples_per_worker(epoch_samples, world_size, num_workers, batch_size)
        # with_epoch counts PER WORKER and restarts the pipeline (a new seeded epoch) each time.
        return NestedStream(pipeline.with_epoch(per_worker), per_worker * max(1, num_workers))
    if max_samples is not None:
        pipeline.append(wds.slice(math.ceil(max_samples / (world_size * max(1, num_workers)))))
    return NestedStream(pipeline, None)


def collate_batch(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Training samples -> the batch dict the training module consumes.

    Returns:
        ``pixel_values`` (B, 3, R, R) float32 in [-1, 1]; ``reference`` (B, 3, S, S) float32 in
        [0, 1]; ``captions``, ``subjects``, ``domains``, ``keys``: list[str] of length B (each
        caption contains its subject token); ``original_sizes``, ``crops_top_left``: (B, 2)
        int64 as (h, w) and (top, left); ``latents`` (B, C, R/8, R/8) float32 only if every
        sample has cached latents; ``skipped``: {key: 0-d int64 tensor} for every ``SKIP_KEYS``.
    """
    batch: dict[str, Any] = {
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
        "reference": torch.stack([s["reference"] for s in samples]),
        "captions": [s["caption"] for s in samples],
        "subjects": [s["subject"] for s in samples],
        "domains": [s["domain"] for s in samples],
        "keys": [s["key"] for s in samples],
        "original_sizes": torch.tensor([s["original_size"] for s in samples], dtype=torch.long),
        "crops_top_left": torch.tensor([s["crop_top_left"] for s in samples], dtype=torch.long),
        "skipped": {
            k: torch.tensor(sum(s.get("skipped", {}).get(k, 0) for s in samples), dtype=torch.long)
            for k in SKIP_KEYS
        },
    }
    if all("latents" in s for s in samples):
        batch["latents"] = torch.stack([s["latents"] for s in samples])
    return batch


# ----------------------------------------------------------------------------- the DataModule


class NestedDataModule(L.LightningDataModule):
    """Mixed multi-domain webdataset loading for Nested Attention training.

    Args:
        domains: training domains (mixed by weight into one stream).
        resolution: target crop size R (pixels, multiple of 8).
        reference_size: encoder input size S.
        batch_size: per-rank batch size; batches are formed by the DataLoader (``collate_batch``),
            each from one worker's samples.
        num_workers: DataLoader workers per rank (persistent when > 0).
        epoch_samples: samples per epoch over ALL ranks, rounded up to whole batches per worker
            (see ``samples_per_worker``); ``len(train_dataloader())`` is exact.
        shuffle_buffer: per-domain, per-worker shuffle buffer (samples).
        seed: seeds shard resampling, shuffling, mixing and augmentation per rank/worker/epoch.
        random_flip, center_crop: target augmentation (training only).
        val_domains: validation domains, read once per pass without augmentation; None: no
            validation loader.
        val_samples: cap on validation samples per pass (all ranks); None: all.
        reference_augment: reference augmentation (default ``ReferenceAugment()``).
        max_consecutive_failures: raise after this many skips in a row in one worker.
    """

    def __init__(
        self,
        domains: list[DomainSpec],
        resolution: int = 1024,
        reference_size: int = 224,
        batch_size: int = 1,
        num_workers: int = 4,
        epoch_samples: int = 10000,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        random_flip: bool = False,
        center_crop: bool = False,
        val_domains: list[DomainSpec] | None = None,
        val_samples: int | None = None,
        reference_augment: ReferenceAugment | None = None,
        max_consecutive_failures: int = 1000,
    ) -> None:
        super().__init__()
        self.domains = [d if isinstance(d, DomainSpec) else DomainSpec(**d) for d in domains]
        self.val_domains = [d if isinstance(d, DomainSpec) else DomainSpec(**d) for d in val_domains or []]
        problems = []
        if not self.domains:
            problems.append("domains is empty: give at least one DomainSpec")
        if resolution <= 0 or resolution % 8:
            problems.append(f"resolution={resolution} must be a positive multiple of 8")
        for name, value in [("reference_size", reference_size), ("batch_size", batch_size)]:
            if value <= 0:
                problems.append(f"{name}={value} must be > 0")
        if epoch_samples <= 0:
            problems.append(f"epoch_samples={epoch_samples} must be > 0")
        if num_workers < 0:
            problems.append(f"num_workers={num_workers} must be >= 0")
        if val_samples is not None and val_samples <= 0:
            problems.append(f"val_samples={val_samples} must be > 0 or None")
        if problems:
            raise ValueError("invalid NestedDataModule arguments:\n  - " + "\n  - ".join(problems))
        self.resolution, self.reference_size = resolution, reference_size
        self.batch_size, self.num_workers = batch_size, num_workers
        self.epoch_samples, self.shuffle_buffer, self.seed = epoch_samples, shuffle_buffer, seed
        self.random_flip, self.center_crop = random_flip, center_crop
        self.val_samples = val_samples
        self.reference_augment = reference_augment if reference_augment is not None else ReferenceAugment()
        self.max_consecutive_failures = max_consecutive_failures

    def _rank_world(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def setup(self, stage: str | None = None) -> None:
        """Fail now, naming the urls, if any domain's shards are missing."""
        if stage in (None, "fit"):
            for spec in self.domains:
                check_urls(spec)
        if stage in (None, "fit", "validate"):
            for spec in self.val_domains:
                check_urls(spec)

    def _stream(self, domains: list[DomainSpec], train: bool) -> NestedStream:
        rank, world_size = self._rank_world()
        return build_stream(
            domains,
            train=train,
            resolution=self.resolution,
            reference_size=self.reference_size,
            rank=rank,
            world_size=world_size,
            num_workers=self.num_workers,
            batch_size=self.batch_size,
            epoch_samples=self.epoch_samples,
            max_samples=self.val_samples,
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
            epoch_offset=self.trainer.current_epoch if self.trainer is not None else 0,
            center_crop=self.center_crop,
            random_flip=self.random_flip,
            reference_augment=self.reference_augment,
            max_consecutive_failures=self.max_consecutive_failures,
        )

    def _loader(self, stream: NestedStream) -> DataLoader:
        return DataLoader(
            stream,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=collate_batch,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._stream(self.domains, train=True))

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        if not self.val_domains:
            return []  # Lightning then skips validation
        return self._loader(self._stream(self.val_domains, train=False))
