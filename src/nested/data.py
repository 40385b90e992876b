"""Reading training shards: decoding, conversion, the validation stream and the LightningDataModule.

The sample format is documented in ``nested.shards``; domains and urls in ``nested.domains``; image
transforms in ``nested.transforms``. One stream mixes every domain; each sample carries its
domain's subject token.

Training reads :class:`nested.trainstream.TrainStream`: resampled, partitioned over ranks x workers,
shuffled, and a pure function of (seed, epoch, rank, worker, position), so a checkpoint resumes it
exactly (see :meth:`NestedDataModule.state_dict`). Validation reads every shard/sample once::

    shards   SimpleShardList + partition    (each shard/sample read exactly once over ranks x workers)
    read     tar -> samples, counting broken shards
    decode   PIL / npy / json               (undecodable samples are counted and skipped)
    convert  caption rule, target + reference transforms -> training sample

and the domains are joined by ``mix`` (seeded weighted choice) -> ``attach_skip_counts``.

Skipped samples never crash a run: every skip is counted in a per-worker ``SkipCounter``, and
each yielded sample carries the counts accumulated since the previous yield in
``sample["skipped"]``; ``collate_batch`` sums them into ``batch["skipped"]`` so the training
module can sum them per epoch. Counter keys (``SKIP_KEYS``): ``corrupt`` (undecodable image,
missing json/caption/image), ``broken_shards`` (unreadable or truncated tar, counted once per
read), ``no_subject_dropped``, ``no_subject_inserted`` (not a skip: the caption was rewritten),
``no_reference`` (``reference="ref"`` and no ref image).
"""

from __future__ import annotations

import io
import logging
import math
import random
import signal
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import lightning as L
import numpy as np
import torch
import webdataset as wds
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from PIL import Image
from torch.utils.data import DataLoader, default_collate

from nested.domains import SKIP_KEYS, DomainSpec, SkipCounter, check_urls, expand_urls, shard_counts
from nested.trainstream import DomainSource, ResumePoint, StreamProgress, TrainStream
from nested.transforms import (  # re-exported: ``nested.data`` is where users look
    ReferenceAugment,
    TargetView,
    bbox_square,
    contains_subject,
    insert_subject,
    reference_transform,
    target_transform,
)
from nested.valstream import NestedStream, _AttachSkipCounts, _Partition, _ReadShards, _WeightedMix

__all__ = [
    "SKIP_KEYS",
    "DomainSpec",
    "NestedDataModule",
    "ReferenceAugment",
    "SkipCounter",
    "TargetView",
    "bbox_square",
    "build_stream",
    "check_urls",
    "collate_batch",
    "contains_subject",
    "expand_urls",
    "insert_subject",
    "reference_transform",
    "samples_per_worker",
    "target_transform",
]

log = logging.getLogger(__name__)

_TARGET_KEYS = ("jpg", "jpeg", "png", "webp")
_REF_KEYS = ("ref.jpg", "ref.png")
_LATENT_KEYS = ("latents.npy", "latents.pth")


# ----------------------------------------------------------------------------- pipeline stages


def _load_tensor(data: bytes) -> torch.Tensor:
    # webdataset's own .pth decoder uses weights_only=False: arbitrary code from a shard.
    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


_DECODED = [*_TARGET_KEYS, *_REF_KEYS, *_LATENT_KEYS, "json"]


def _decode_rgb(data: bytes) -> Image.Image:
    """An image member -> RGB PIL. webdataset's "pil" handler converts twice (two full copies of
    every decoded image); this converts only what is not RGB already."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image if image.mode == "RGB" else image.convert("RGB")


_IMAGE_HANDLER = wds.handle_extension(" ".join(_TARGET_KEYS), _decode_rgb)  # also ref.jpg, ref.png


def decoder() -> wds.autodecode.Decoder:
    """Decodes images to RGB PIL, json, npy/pth latents; everything else stays bytes (no pickle)."""
    return wds.autodecode.Decoder([wds.handle_extension("pth", _load_tensor), _IMAGE_HANDLER], only=_DECODED)


def decode_stage(counter: SkipCounter) -> Callable[[Iterable[Any]], Iterator[Any]]:
    """``decoder()`` as a pipeline stage that counts undecodable samples as ``corrupt`` and skips them."""
    return wds.decode(
        wds.handle_extension("pth", _load_tensor),
        _IMAGE_HANDLER,
        only=_DECODED,
        handler=counter.handler("corrupt"),
    )


class _ToTrainingSample:
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
    ) -> None:
        self.spec, self.counter, self.augment = spec, counter, augment
        self.resolution, self.reference_size = resolution, reference_size
        self.center_crop, self.random_flip = center_crop, random_flip

    def __call__(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Pipeline stage (validation: no randomness is used, the generator is a formality)."""
        for raw in src:
            sample = self.checked(raw, random.Random(0))
            if sample is not None:
                yield sample

    def checked(self, raw: dict[str, Any], rng: random.Random) -> dict[str, Any] | None:
        """``convert`` that counts an exception as ``corrupt`` and returns None."""
        try:
            return self.convert(raw, rng)
        except Exception as exc:  # a malformed sample must never stop the run
            self.counter.add("corrupt", f"{raw.get('__url__')} {raw.get('__key__')}: {exc!r}")
            return None

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


class _Prepare:
    """Training: raw sample -> decoded -> training sample, or None (counted). Picklable for workers."""

    def __init__(self, convert: _ToTrainingSample) -> None:
        self.convert, self.decode = convert, decoder()

    def __call__(self, raw: dict[str, Any], rng: random.Random) -> dict[str, Any] | None:
        try:
            decoded = self.decode(raw)
        except Exception as exc:
            self.convert.counter.add("corrupt", f"{raw.get('__url__')} {raw.get('__key__')}: {exc!r}")
            return None
        return self.convert.checked(decoded, rng)


# ----------------------------------------------------------------------------- dataset + batches


def samples_per_worker(epoch_samples: int, world_size: int, num_workers: int, batch_size: int) -> int:
    """Samples each loader worker yields per epoch.

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
    open_shards: int = 4,
    seed: int = 0,
    epoch_offset: int = 0,
    center_crop: bool = False,
    random_flip: bool = False,
    reference_augment: ReferenceAugment | None = None,
    max_consecutive_failures: int = 1000,
    resume: ResumePoint | None = None,
) -> TrainStream | NestedStream:
    """Build the mixed stream of training samples for one rank.

    ``train=True``: a :class:`~nested.trainstream.TrainStream` (resampled shards split over ranks x
    workers, ``open_shards`` read side by side, shuffled in blocks of ``shuffle_buffer``, the given
    crop/flip/augmentation, ``samples_per_worker`` samples per worker per epoch, resumable from
    ``resume``). ``train=False``: every shard/sample once, split disjointly over ranks x workers
    (``_Partition``), center crop, no flip, no augmentation, at most ``ceil(max_samples /
    (world_size * workers))`` samples per worker when ``max_samples`` is set.

    ``rank``/``world_size`` are passed in (the DataModule reads them from its trainer) rather than
    read from the environment like ``wds.split_by_node``; ``num_workers`` must equal the
    DataLoader's, since the split and the epoch length per worker depend on it.

    Raises:
        FileNotFoundError: when a domain's urls name no or missing shard files.
        ValueError: when a domain has too few samples to give every rank and worker some.
    """
    if not domains:
        raise ValueError("no domains given: pass at least one DomainSpec")
    counter = SkipCounter(max_consecutive_failures)
    if not train:
        center_crop, random_flip, reference_augment = True, False, None
    converters = [
        _ToTrainingSample(
            spec,
            counter,
            resolution=resolution,
            reference_size=reference_size,
            center_crop=center_crop,
            random_flip=random_flip,
            augment=reference_augment,
        )
        for spec in domains
    ]
    if train:
        sources = [
            DomainSource(spec.name, check_urls(spec), spec.weight, shard_counts(spec.urls), _Prepare(convert))
            for spec, convert in zip(domains, converters, strict=True)
        ]
        return TrainStream(
            sources,
            counter=counter,
            seed=seed,
            rank=rank,
            world_size=world_size,
            num_workers=num_workers,
            per_reader=samples_per_worker(epoch_samples, world_size, num_workers, batch_size),
            lanes=open_shards,
            block=max(1, shuffle_buffer),
            first_epoch=epoch_offset,
            resume=resume,
        )
    pipelines = []
    for spec, convert in zip(domains, converters, strict=True):
        urls = check_urls(spec)
        partition = _Partition(rank, world_size, len(urls))
        stages = [wds.SimpleShardList(urls), partition.shards, _ReadShards(counter), partition.samples]
        pipelines.append(wds.DataPipeline(*stages, decode_stage(counter), convert))
    mix = _WeightedMix(pipelines, [d.weight for d in domains], longest=True, seed=seed, rank=rank)
    pipeline = wds.DataPipeline(mix, _AttachSkipCounts(counter))
    if max_samples is not None:
        pipeline.append(wds.slice(math.ceil(max_samples / (world_size * max(1, num_workers)))))
    return NestedStream(pipeline)


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One sample: a view (no copy of a 12 MB image). Several: ``default_collate``, which in a
    worker stacks straight into shared memory (``torch.stack`` would be copied there once more)."""
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else default_collate(tensors)


def collate_batch(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Training samples -> the batch dict the training module consumes.

    Returns:
        ``pixel_values`` (B, 3, R, R) float32 in [-1, 1]; ``reference`` (B, 3, S, S) float32 in
        [0, 1]; ``captions``, ``subjects``, ``domains``, ``keys``: list[str] of length B (each
        caption contains its subject token); ``original_sizes``, ``crops_top_left``: (B, 2)
        int64 as (h, w) and (top, left); ``latents`` (B, C, R/8, R/8) float32 only if every
        sample has cached latents; ``skipped``: {key: 0-d int64 tensor} for every ``SKIP_KEYS``;
        ``stream`` (training only): the stream position after the batch, which the DataModule
        takes out of the batch (``on_before_batch_transfer``) and keeps for checkpoints.
    """
    n = len(samples)
    # One int64 tensor, and views of it: a worker sends one shared-memory block for these small
    # fields instead of 7 (each costs a shared-memory file and a file-descriptor round trip).
    ints = torch.tensor(
        [v for s in samples for v in s["original_size"]]
        + [v for s in samples for v in s["crop_top_left"]]
        + [sum(s.get("skipped", {}).get(k, 0) for s in samples) for k in SKIP_KEYS],
        dtype=torch.long,
    )
    batch: dict[str, Any] = {
        "pixel_values": _stack([s["pixel_values"] for s in samples]),
        "reference": _stack([s["reference"] for s in samples]),
        "captions": [s["caption"] for s in samples],
        "subjects": [s["subject"] for s in samples],
        "domains": [s["domain"] for s in samples],
        "keys": [s["key"] for s in samples],
        "original_sizes": ints[: 2 * n].view(n, 2),
        "crops_top_left": ints[2 * n : 4 * n].view(n, 2),
        "skipped": {k: ints[4 * n + i] for i, k in enumerate(SKIP_KEYS)},
    }
    if all("latents" in s for s in samples):
        batch["latents"] = _stack([s["latents"] for s in samples])
    if "stream" in samples[-1]:  # a batch is consecutive samples of one worker: the last is its position
        batch["stream"] = samples[-1]["stream"]
    return batch


class _TrainLoader(DataLoader):
    """The training DataLoader. Its position lives in ``NestedDataModule.state_dict`` (gathered from
    every rank); being "stateful" tells Lightning that a mid-epoch resume is supported here."""

    def state_dict(self) -> dict[str, Any]:
        return {"position": "saved by NestedDataModule.state_dict"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass  # NestedDataModule.load_state_dict restores the position


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: SLURM signals every process of a job step (``--signal``,
    scancel); a worker killed by SIGUSR1/SIGTERM would crash the main process before it can
    checkpoint. The main process handles them (``nested.resume.PreemptionCheckpoint``)."""
    for signum in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


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
        shuffle_buffer: per-domain, per-worker shuffle block (raw samples held in memory).
        open_shards: shards each worker reads side by side per domain (consecutive samples come
            from different shards).
        seed: seeds shard resampling, shuffling, mixing and augmentation per rank/worker/epoch.
        random_flip, center_crop: target augmentation (training only).
        val_domains: validation domains, read once per pass without augmentation; None: no
            validation loader.
        val_samples: cap on validation samples per pass (all ranks); None: all.
        reference_augment: reference augmentation (default ``ReferenceAugment()``).
        max_consecutive_failures: raise after this many skips in a row in one worker.

    Checkpoints hold the training stream's position (``state_dict``: per rank, per worker, the
    samples drawn and raw positions consumed by the batches the training loop took). Resumed with
    the same world size, workers, batch size, seed, ``epoch_samples``, ``shuffle_buffer``,
    ``open_shards`` and domains, the stream continues exactly where it was, without decoding the
    samples it skips; with any of those changed, it restarts the interrupted epoch from fresh
    positions (logged: valid, not bit-exact).
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
        open_shards: int = 4,
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
        if open_shards < 1:
            problems.append(f"open_shards={open_shards} must be >= 1")
        if val_samples is not None and val_samples <= 0:
            problems.append(f"val_samples={val_samples} must be > 0 or None")
        if problems:
            raise ValueError("invalid NestedDataModule arguments:\n  - " + "\n  - ".join(problems))
        self.resolution, self.reference_size = resolution, reference_size
        self.batch_size, self.num_workers = batch_size, num_workers
        self.epoch_samples, self.shuffle_buffer, self.seed = epoch_samples, shuffle_buffer, seed
        self.open_shards = open_shards
        self.random_flip, self.center_crop = random_flip, center_crop
        self.val_samples = val_samples
        self.reference_augment = reference_augment if reference_augment is not None else ReferenceAugment()
        self.max_consecutive_failures = max_consecutive_failures
        self.progress = StreamProgress()
        self._saved_stream: dict[str, Any] | None = None

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

    def _stream(self, domains: list[DomainSpec], train: bool) -> TrainStream | NestedStream:
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
            open_shards=self.open_shards,
            seed=self.seed,
            epoch_offset=self.trainer.current_epoch if self.trainer is not None else 0,
            center_crop=self.center_crop,
            random_flip=self.random_flip,
            reference_augment=self.reference_augment,
            max_consecutive_failures=self.max_consecutive_failures,
            resume=self._resume_point(rank, world_size) if train else None,
        )

    def _loader(self, stream: TrainStream | NestedStream) -> DataLoader:
        loader_class = _TrainLoader if isinstance(stream, TrainStream) else DataLoader
        return loader_class(
            stream,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=collate_batch,
            # Persistent: each worker's stream counts its epochs (one iter() per epoch).
            persistent_workers=self.num_workers > 0,
            worker_init_fn=_ignore_stop_signals if self.num_workers > 0 else None,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._stream(self.domains, train=True))

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        if not self.val_domains:
            return []  # Lightning then skips validation
        return self._loader(self._stream(self.val_domains, train=False))

    # ------------------------------------------------------------------ resumable position
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Takes the stream position out of each training batch the loop consumes."""
        if isinstance(batch, dict) and "stream" in batch:
            self.progress.consume(batch.pop("stream"))
        return batch

    def _topology(self, world_size: int) -> dict[str, Any]:
        """What the stream's layout depends on: a resume is exact only if all of it is unchanged."""
        return {
            "world_size": world_size,
            "num_workers": self.num_workers,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "samples_per_worker": samples_per_worker(
                self.epoch_samples, world_size, self.num_workers, self.batch_size
            ),
            "shuffle_buffer": max(1, self.shuffle_buffer),
            "open_shards": self.open_shards,
            "domains": [[d.name, d.weight, len(expand_urls(d.urls))] for d in self.domains],
        }

    def _epoch_batches(self, world_size: int) -> int:
        per_worker = samples_per_worker(self.epoch_samples, world_size, self.num_workers, self.batch_size)
        batches = per_worker * max(1, self.num_workers) // self.batch_size
        limit = getattr(self.trainer, "num_training_batches", None)
        return min(batches, limit) if isinstance(limit, int) else batches

    def state_dict(self) -> dict[str, Any]:
        """The training stream's position on EVERY rank (gathered: the checkpoint is written by rank 0).

        Called by Lightning on every rank while it assembles a checkpoint (a collective under DDP).
        """
        rank, world_size = self._rank_world()
        local = self.progress.state()
        ranks = [local]
        if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            ranks = [None] * world_size
            torch.distributed.all_gather_object(ranks, local)
        return {
            "version": 1,
            "topology": self._topology(world_size),
            "epoch_batches": self._epoch_batches(world_size),
            "ranks": ranks,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keeps the saved position until the training stream is built (``train_dataloader``)."""
        self._saved_stream = state_dict

    def _resume_point(self, rank: int, world_size: int) -> ResumePoint | None:
        saved, self._saved_stream = self._saved_stream, None
        if not saved or saved.get("version") != 1:
            return None
        topology = self._topology(world_size)
        changed = {
            k: (saved["topology"].get(k), v) for k, v in topology.items() if saved["topology"].get(k) != v
        }
        position = saved["ranks"][0] if saved["ranks"] else {}
        if changed:
            rank_zero_warn(
                "data: the training stream cannot resume exactly: "
                + ", ".join(f"{k} was {old}, now {new}" for k, (old, new) in changed.items())
                + f". Epoch {position.get('epoch')} restarts from fresh seeded positions: training resumes "
                "correctly (weights, optimizer, schedule, step) but not bit-exactly, and samples of the "
                "interrupted epoch may be seen twice."
            )
            return None
        point = StreamProgress.resume_point(saved["ranks"][rank], saved["epoch_batches"])
        if point is not None:
            self.progress.epoch, self.progress.batches = point.epoch, point.batches
            self.progress.readers = dict(point.readers)
            where = "its end" if point.complete else f"batch {point.batches} of {saved['epoch_batches']}"
            rank_zero_info(
                f"data: the training stream resumes exactly at epoch {point.epoch}, {where} "
                f"({max(1, self.num_workers)} worker position(s) per rank restored; nothing is decoded to get there)"
            )
        return point
