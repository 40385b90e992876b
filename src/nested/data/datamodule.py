"""The LightningDataModule: mixed multi-domain shards for training and validation, with an exact resume point."""

from __future__ import annotations

import logging
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from nested.data.domains import VERIFY_MODES, DomainSpec, check_urls, expand_urls, verify_shards
from nested.data.loading import (
    TrainLoader,
    WorkerTrackingLoader,
    build_stream,
    collate_batch,
    ignore_stop_signals,
    samples_per_worker,
    worker_context,
)
from nested.data.train_stream import ResumePoint, StreamProgress, TrainStream
from nested.data.transforms import (
    ReferenceAugment,
)
from nested.data.val_stream import ValidationStream
from nested.errors import ConfigError, NestedUserError

__all__ = ["NestedDataModule"]

log = logging.getLogger(__name__)


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
        verify_shards: at setup, compare the shards a ``shards.json`` lists with its record:
            ``"size"`` (one ``stat`` per shard), ``"sha256"`` (also hashes every shard: reads all
            the data on every rank) or ``"off"``. A shard that differs fails the run at once,
            named with its index entry (``nested.data.domains.verify_shards``).

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
        verify_shards: Literal["size", "sha256", "off"] = "size",
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
        if verify_shards not in VERIFY_MODES:
            problems.append(f"verify_shards={verify_shards!r} must be one of {', '.join(VERIFY_MODES)}")
        if problems:
            raise ConfigError("invalid NestedDataModule arguments:\n  - " + "\n  - ".join(problems))
        self.resolution, self.reference_size = resolution, reference_size
        self.batch_size, self.num_workers = batch_size, num_workers
        self.epoch_samples, self.shuffle_buffer, self.seed = epoch_samples, shuffle_buffer, seed
        self.open_shards = open_shards
        self.random_flip, self.center_crop = random_flip, center_crop
        self.val_samples = val_samples
        self.reference_augment = reference_augment if reference_augment is not None else ReferenceAugment()
        self.max_consecutive_failures = max_consecutive_failures
        self.verify_shards = verify_shards
        self.progress = StreamProgress()
        self._saved_stream: dict[str, Any] | None = None

    def _rank_world(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def setup(self, stage: str | None = None) -> None:
        """Fail now, naming the shard, if any domain's shards are missing or differ from their index."""
        specs = [("data.domains", spec, "") for spec in self.domains] if stage in (None, "fit") else []
        if stage in (None, "fit", "validate"):
            # The recipes name validation shards of their own, which a user who set only data.domains lacks.
            advice = (
                " To train without validation, pass --data.val_domains=[]." if stage != "validate" else ""
            )
            specs += [("data.val_domains", spec, advice) for spec in self.val_domains]
        for option, spec, advice in specs:
            try:
                check_urls(spec)
                verify_shards(spec, self.verify_shards)
            except NestedUserError as error:
                raise type(error)(f"{option}: {error}{advice}") from error

    def _stream(self, domains: list[DomainSpec], train: bool) -> TrainStream | ValidationStream:
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

    def _loader(self, stream: TrainStream | ValidationStream) -> DataLoader:
        loader_class = TrainLoader if isinstance(stream, TrainStream) else WorkerTrackingLoader
        return loader_class(
            stream,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=collate_batch,
            # Persistent: each worker's stream counts its epochs (one iter() per epoch).
            persistent_workers=self.num_workers > 0,
            worker_init_fn=ignore_stop_signals if self.num_workers > 0 else None,
            multiprocessing_context=worker_context() if self.num_workers > 0 else None,
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
        readers = world_size * max(1, self.num_workers)
        # Several readers split each domain into equal runs of samples (earlier versions: by whole shards).
        split = {"split": "equal runs of samples"} if readers > 1 else {}
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
            **split,
        }

    def epoch_batches(self, world_size: int) -> int:
        """Training batches per rank in one epoch of the stream (at most the trainer's own count, once it has one)."""
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
            "epoch_batches": self.epoch_batches(world_size),
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
