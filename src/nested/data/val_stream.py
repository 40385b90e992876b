"""The finite validation stream's stages: every shard/sample once, split over ranks x workers.

(The training stream is ``nested.data.train_stream``; ``nested.data.build_stream`` assembles both.)
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import IterableDataset

from nested.data.domains import SkipCounter

__all__ = ["ValidationStream"]


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class Partition:
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


class ReadShards:
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


class WeightedMix(IterableDataset):
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
    ) -> None:
        self.sources, self.weights, self.longest = sources, weights, longest
        self.seed, self.rank = seed, rank

    def __iter__(self) -> Iterator[Any]:
        rng = random.Random(f"mix:{self.seed}:{self.rank}:{_worker()[0]}")  # the same every pass
        iterators, weights = [iter(s) for s in self.sources], list(self.weights)
        while iterators:
            index = rng.choices(range(len(iterators)), weights=weights)[0]
            try:
                yield next(iterators[index])
            except StopIteration:
                if not self.longest:
                    return
                del iterators[index], weights[index]


class AttachSkipCounts:
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


class ValidationStream(IterableDataset):
    """The mixed validation stream (finite, no length)."""

    def __init__(self, pipeline: wds.DataPipeline) -> None:
        super().__init__()
        self.pipeline = pipeline

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.pipeline)

    def __len__(self) -> int:
        raise TypeError("a validation stream has no length")  # what has_len() expects
