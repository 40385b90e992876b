"""Reading shards: decoding, conversion to training samples, the training and validation streams, batches.

The sample format is documented in :mod:`nested.data.shards`; domains and urls in
:mod:`nested.data.domains`; image transforms in :mod:`nested.data.transforms`. One stream mixes every
domain; each sample carries its domain's subject token. The Lightning side is
:class:`nested.data.datamodule.NestedDataModule`.

Training reads :class:`nested.data.train_stream.TrainStream`: resampled, partitioned over ranks x workers,
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
import multiprocessing
import random
import signal
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from multiprocessing import resource_tracker
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, default_collate

from nested.data.domains import SKIP_KEYS, DomainSpec, SkipCounter, TooManySkips, check_urls, shard_counts
from nested.data.train_stream import DomainSource, ResumePoint, TrainStream
from nested.data.transforms import (
    ReferenceAugment,
    caption_text,
    contains_subject,
    insert_subject,
    reference_transform,
    target_transform,
    upright_original_size,
)
from nested.data.val_stream import AttachSkipCounts, Partition, ReadShards, ValidationStream, WeightedMix
from nested.errors import ConfigError
from nested.image_files import to_rgb, upright

__all__ = [
    "TrainLoader",
    "WorkerTrackingLoader",
    "apply_caption_rule",
    "build_stream",
    "collate_batch",
    "decode_stage",
    "decoder",
    "ignore_stop_signals",
    "sample_caption",
    "sample_original_size",
    "samples_per_worker",
    "training_caption",
    "worker_context",
]

log = logging.getLogger(__name__)

_TARGET_KEYS = ("jpg", "jpeg", "png", "webp")
_REF_KEYS = ("ref.jpg", "ref.png")
_LATENT_KEYS = ("latents.npy", "latents.pth")


# ----------------------------------------------------------------------------- sample metadata


def sample_caption(meta: dict[str, Any], txt: bytes | str | None) -> str:
    """A sample's caption: the json's ``caption`` string, else the ``txt`` member (img2dataset writes both),
    read as ``nested shards`` reads a caption file: UTF-8, a byte-order mark dropped, line ends made ``\n``.

    Raises:
        ValueError: neither holds a caption.
    """
    caption = meta.get("caption")
    if isinstance(caption, str):
        return caption
    if isinstance(txt, bytes):
        txt = txt.decode("utf-8")
    if isinstance(txt, str):
        return caption_text(txt)
    raise ValueError("no caption: the json has no 'caption' string and there is no txt member")


def apply_caption_rule(caption: str, spec: DomainSpec) -> str | None:
    """``caption`` if the subject token is in it, else the domain's ``caption_rule``: the template inserted,
    or None (the sample is skipped)."""
    if contains_subject(caption, spec.subject):
        return caption
    return None if spec.caption_rule == "drop" else insert_subject(caption, spec)


def training_caption(meta: dict[str, Any], txt: bytes | str | None, spec: DomainSpec) -> str | None:
    """The caption a sample of ``spec``'s domain trains with (None: skipped): :func:`sample_caption`, stripped,
    through :func:`apply_caption_rule`."""
    return apply_caption_rule(sample_caption(meta, txt).strip(), spec)


def sample_original_size(meta: dict[str, Any], stored: tuple[int, int]) -> tuple[int, int] | None:
    """``(h, w)`` of the image before any resize made when the data was prepared, for SDXL's
    micro-conditioning: the json's ``original_size``, else img2dataset's ``original_height`` and
    ``original_width`` (see :func:`upright_original_size`; ``stored`` is the upright image's ``(h, w)``); None
    when neither is there (the stored image's own size is then the original)."""
    size = meta.get("original_size")
    if size:
        return int(size[0]), int(size[1])
    height, width = meta.get("original_height"), meta.get("original_width")
    if isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0:
        return upright_original_size((height, width), stored)
    return None


# ----------------------------------------------------------------------------- pipeline stages


def _load_tensor(data: bytes) -> torch.Tensor:
    # webdataset's own .pth decoder uses weights_only=False: arbitrary code from a shard.
    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


_DECODED = [*_TARGET_KEYS, *_REF_KEYS, *_LATENT_KEYS, "json"]


def _decode_rgb(data: bytes) -> Image.Image:
    """An image member -> upright 8-bit RGB PIL: turned by its EXIF orientation and made RGB by
    :func:`nested.image_files.to_rgb`, for the 16-bit, transparent or camera-oriented images of shards
    written by other tools (``nested shards`` stores them upright, without the tag). webdataset's "pil"
    handler converts twice (two full copies of every decoded image); this converts only what is not RGB
    already."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return to_rgb(upright(image))


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
        except TooManySkips:  # the counter's own verdict, not a malformed sample
            raise
        except Exception as exc:  # a malformed sample must never stop the run
            self.counter.add("corrupt", f"{raw.get('__url__')} {raw.get('__key__')}: {exc!r}")
            return None

    def convert(self, raw: dict[str, Any], rng: random.Random) -> dict[str, Any] | None:
        target = next((raw[k] for k in _TARGET_KEYS if k in raw), None)
        if not isinstance(target, Image.Image):
            raise ValueError(f"no target image (expected one of {_TARGET_KEYS}, got {sorted(raw)})")
        meta = raw.get("json", {})
        if not isinstance(meta, dict):
            raise ValueError("json member is not a JSON object")
        original = sample_caption(meta, raw.get("txt")).strip()
        caption = apply_caption_rule(original, self.spec)
        if caption is None:
            self.counter.add("no_subject_dropped")
            return None
        if caption != original:
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
        original_size = sample_original_size(meta, (target.height, target.width)) or view.original_size
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
            # The VAE they were encoded with (None in shards from before it was recorded), checked by training.
            sample["latents_space"] = meta.get("latents_space")
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
) -> TrainStream | ValidationStream:
    """Build the mixed stream of training samples for one rank.

    ``train=True``: a :class:`~nested.data.train_stream.TrainStream` (resampled shards split over ranks x
    workers, ``open_shards`` read side by side, shuffled in blocks of ``shuffle_buffer``, the given
    crop/flip/augmentation, ``samples_per_worker`` samples per worker per epoch, resumable from
    ``resume``). ``train=False``: every shard/sample once, split disjointly over ranks x workers
    (``Partition``), center crop, no flip, no augmentation, at most ``ceil(max_samples /
    (world_size * workers))`` samples per worker when ``max_samples`` is set.

    ``rank``/``world_size`` are passed in (the DataModule reads them from its trainer) rather than
    read from the environment like ``wds.split_by_node``; ``num_workers`` must equal the
    DataLoader's, since the split and the epoch length per worker depend on it.

    Raises:
        FileNotFoundError: when a domain's urls name no or missing shard files.
        ValueError: when a domain has too few samples to give every rank and worker some.
    """
    if not domains:
        raise ConfigError("no domains given: pass at least one DomainSpec")
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
        partition = Partition(rank, world_size, len(urls))
        stages = [wds.SimpleShardList(urls), partition.shards, ReadShards(counter), partition.samples]
        pipelines.append(wds.DataPipeline(*stages, decode_stage(counter), convert))
    mix = WeightedMix(pipelines, [d.weight for d in domains], longest=True, seed=seed, rank=rank)
    pipeline = wds.DataPipeline(mix, AttachSkipCounts(counter))
    if max_samples is not None:
        pipeline.append(wds.slice(math.ceil(max_samples / (world_size * max(1, num_workers)))))
    return ValidationStream(pipeline)


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
        int64 as (h, w) and (top, left); ``latents`` (B, C, R/f, R/f) float32 (f: the VAE's factor, 8 for the
        real models) only if every sample has cached latents, with ``latents_space``: for each sample the
        :func:`~nested.backbone.latent_space` of the VAE that encoded them (None if unrecorded);
        ``skipped``: {key: 0-d int64 tensor} for every ``SKIP_KEYS``;
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
        batch["latents_space"] = [s.get("latents_space") for s in samples]
    if "stream" in samples[-1]:  # a batch is consecutive samples of one worker: the last is its position
        batch["stream"] = samples[-1]["stream"]
    return batch


# The worker processes of this process's WorkerTrackingLoaders, which end_loader_workers ends.
_LOADER_WORKERS: weakref.WeakSet = weakref.WeakSet()
# What a worker's start signals would end it with; see WorkerTrackingLoader.
_WORKER_STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


def worker_context() -> multiprocessing.context.BaseContext:
    """How loader workers start: as fresh interpreters (spawn), each a child of this process.

    A training process has threads by the time its workers start (DDP's process group, TensorBoard's writer,
    the Hub uploads, OpenMP), and a worker forked from it can hang inside ``fork`` on a lock one of them held:
    seen with two gloo ranks, a worker that never ran a line, its rank waiting for its first batch and the
    other rank in DDP's first broadcast. A forkserver would avoid that too, but its workers end with it, and
    another part of the process may have started it without the stop signals blocked
    (:class:`WorkerTrackingLoader`)."""
    return multiprocessing.get_context("spawn")


class WorkerTrackingLoader(DataLoader):
    """A DataLoader whose worker processes :func:`end_loader_workers` knows (a started process no longer says
    what it runs, so the loader records them as they start).

    Its workers start with the stop signals blocked (:func:`ignore_stop_signals` then ignores them): a job
    scheduler signals every process of a job, and a worker ended by SIGUSR1 or SIGTERM, even while it starts,
    would crash the run before it checkpoints. This process gets the signals it receives meanwhile when the
    workers have started."""

    def __iter__(self):
        if threading.current_thread() is not threading.main_thread() or self.num_workers == 0:
            iterator = super().__iter__()
        else:
            blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _WORKER_STOP_SIGNALS)
            try:
                # Starting a worker starts multiprocessing's resource tracker first, which unblocks SIGINT and
                # SIGTERM once it has started it: started here, the block is whole again for the workers.
                resource_tracker.ensure_running()
                signal.pthread_sigmask(signal.SIG_BLOCK, _WORKER_STOP_SIGNALS)
                iterator = super().__iter__()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        _LOADER_WORKERS.update(getattr(iterator, "_workers", ()))  # torch's multi-process iterator keeps them
        return iterator


class TrainLoader(WorkerTrackingLoader):
    """The training DataLoader. Its position lives in ``NestedDataModule.state_dict`` (gathered from
    every rank); being "stateful" tells Lightning that a mid-epoch resume is supported here."""

    def state_dict(self) -> dict[str, Any]:
        return {"position": "saved by NestedDataModule.state_dict"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass  # NestedDataModule.load_state_dict restores the position


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: SLURM signals every process of a job step (``--signal``,
    scancel) and Ctrl-C every process of the terminal's foreground group; a worker ended by
    SIGUSR1/SIGTERM/SIGINT would crash the main process before it can checkpoint. The main process
    handles them (``nested.training.resume.PreemptionCheckpoint``); if it is killed, the workers
    notice and exit too. A main process that leaves on an error must end them itself
    (:func:`end_loader_workers`)."""
    for signum in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)


def end_loader_workers() -> None:
    """Kill the workers of this process's :class:`WorkerTrackingLoader` s, which ignore the stop signals
    (:func:`ignore_stop_signals`), and wait for them.

    The loader shuts its workers down when a fit ends, even on most errors. An error raised while Lightning
    handles another (a logger that cannot write its last lines to a full disk) skips that shutdown, and at
    exit multiprocessing ends daemonic children with SIGTERM, which these workers ignore, and waits for
    them: the process would never exit. Other processes (a caller's pool, other loaders' workers) are left
    alone.
    """
    workers = [worker for worker in list(_LOADER_WORKERS) if worker.is_alive()]
    if not workers:
        return
    # torch's SIGCHLD handler would report each worker's death as a new error, hiding the one being raised.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGCHLD, signal.SIG_DFL) if in_main_thread else None
    try:
        for worker in workers:
            worker.kill()
            worker.join(timeout=10)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGCHLD, previous)
