"""The resumable training stream: every sample is a pure function of (seed, epoch, reader, position).

A *reader* is one DataLoader worker of one rank: reader ``rank * W + w`` of ``world_size * W``
(``W = max(1, num_workers)``). In one epoch, a reader's raw samples of one domain are laid out as::

    share       its part of the domain, as pieces of shards: with the sample counts of all its shards
                known (``shards.json``, or counted from local tar headers), the readers-th part of the
                domain's samples in shard order, so that every reader holds as many samples (within one)
                and every sample is drawn as often; without them (remote shards without an index),
                every readers-th shard. No two readers share a sample.
    lanes       ``lanes`` endless seeded sequences of piece visits, drawn with replacement from the share
    interleave  raw position p is the next sample of lane ``p % lanes`` (neighbours come from different shards)
    shuffle     positions are permuted in blocks of ``block`` (one seeded permutation per block)

and the domains are mixed by one seeded draw per output sample. Every seed is a string hashed from
(seed, domain, epoch, reader, lane / visit / block / position), so nothing but positions carries
over from one sample to the next. A reader's :class:`ReaderPosition` is (samples drawn this epoch,
raw positions consumed per domain); a skipped sample (corrupt, dropped) consumes a raw position.

A visit reads a whole piece, and pieces are drawn uniformly: each sample of a share is drawn equally often,
whatever the sizes of its shards. Shares that split the domain by whole shards hold unequal numbers of
samples when the shards do not split evenly over the readers, and a reader's samples are then drawn more
often the fewer it holds (a warning says so).

Resuming from a position decodes nothing: lanes skip whole piece visits by their sample counts
(``shards.json``, else counted once from the tar headers), skip inside the one open shard per lane
by tar headers (a local file seeks over the data) and re-read at most one block of raw samples,
which starting does too. What the training loop consumed is tracked by :class:`StreamProgress`.
"""

from __future__ import annotations

import contextlib
import logging
import random
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import IterableDataset

from nested.data.domains import SkipCounter, is_local_url, local_path
from nested.errors import DataError

log = logging.getLogger(__name__)

__all__ = [
    "DomainSource",
    "Piece",
    "ReaderPosition",
    "ResumePoint",
    "Share",
    "StreamProgress",
    "TrainStream",
    "count_samples",
    "read_shard",
]

_META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members, skipped like wds does
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext
_MAX_EMPTY_VISITS = 10_000
_COUNTS: dict[str, int] = {}
_BROKEN: dict[str, str] = {}  # url -> why its count stops early (counted as a broken shard at every visit)


def seeded(*parts: object) -> random.Random:
    """A generator seeded by ``parts`` (a str seed is hashed with sha512: stable across processes)."""
    return random.Random(":".join(map(str, parts)))


# ----------------------------------------------------------------------------- shards


def read_shard(url: str, wanted: Callable[[int], bool]) -> Iterator[tuple[int, dict[str, Any] | None]]:
    """``(index, raw sample)`` for every sample of a tar shard, in order (webdataset's grouping by key).

    Samples that are not ``wanted(index)`` come as ``(index, None)`` and their data is not read: a
    local file is opened for random access and seeks over it. Raises on a broken tar after yielding
    what came before.
    """
    with contextlib.ExitStack() as stack:
        if is_local_url(url):
            tar = stack.enter_context(tarfile.open(local_path(url), mode="r:*"))
        else:
            stream = wds.gopen(url)
            stack.callback(stream.close)
            tar = stack.enter_context(tarfile.open(fileobj=stream, mode="r|*"))
        index, key, sample = -1, None, None
        for member in tar:
            if not member.isreg() or _META.match(member.name):
                continue
            match = _KEY.match(member.name)
            if match is None:
                continue
            prefix, suffix = match.group(1), match.group(2).lower()
            if prefix != key:
                if key is not None:
                    yield index, sample
                index, key = index + 1, prefix
                sample = {"__key__": prefix, "__url__": url} if wanted(index) else None
            if sample is not None:
                if suffix in sample:
                    raise ValueError(f"{url}: duplicate member {member.name}")
                sample[suffix] = tar.extractfile(member).read()
        if key is not None:
            yield index, sample


def count_samples(url: str) -> int:
    """Samples in a tar shard, counted once per process from its member names (cached).

    A local file costs one header read per member; a remote one is streamed through. A broken
    shard counts what can be read before the break.
    """
    if url not in _COUNTS:
        count = 0
        try:
            for index, _ in read_shard(url, lambda index: False):
                count = index + 1
        except Exception as exc:
            log.warning("data: counting the samples of %s stopped at %d: %r", url, count, exc)
            _BROKEN[url] = f"{url}: readable up to sample {count}: {exc!r}"
        _COUNTS[url] = count
    return _COUNTS[url]


@dataclass(frozen=True)
class Piece:
    """Samples ``start:stop`` of shard ``shard`` (``stop`` None: to the shard's end)."""

    shard: int
    start: int = 0
    stop: int | None = None

    def units(self, count: int) -> int:
        """How many samples the piece holds in a shard of ``count`` samples."""
        stop = count if self.stop is None else min(self.stop, count)
        return max(0, stop - self.start)


@dataclass(frozen=True)
class Share:
    """The part of a domain one reader reads: pieces of its shards."""

    pieces: tuple[Piece, ...]

    @classmethod
    def of(cls, num_shards: int, reader: int, readers: int, counts: list[int] | None = None) -> Share:
        """Reader ``reader``'s share of ``readers``: with ``counts`` (samples per shard), the reader-th of
        ``readers`` equal runs of the domain's samples in shard order; without, every readers-th shard."""
        if readers == 1:
            return cls(tuple(Piece(shard) for shard in range(num_shards)))
        if counts is None:
            return cls(tuple(Piece(shard) for shard in range(reader, num_shards, readers)))
        total = sum(counts)
        low, high = reader * total // readers, (reader + 1) * total // readers
        pieces, first = [], 0
        for shard, count in enumerate(counts):
            start, stop = max(low, first) - first, min(high, first + count) - first
            if start < stop:
                pieces.append(Piece(shard, start, stop))
            first += count
        return cls(tuple(pieces))


@dataclass
class DomainSource:
    """One domain as the stream sees it.

    Attributes:
        name: the domain name (part of every seed).
        urls: its shard urls.
        weight: relative mixing weight.
        counts: known samples per url (from ``shards.json``); others are counted from the tar.
        prepare: ``(raw sample, rng) -> training sample``, or None when it skipped (and counted) it.
    """

    name: str
    urls: list[str]
    weight: float
    counts: dict[str, int]
    prepare: Callable[[dict[str, Any], random.Random], dict[str, Any] | None]
    counted: dict[str, int] = field(default_factory=dict)
    broken: dict[str, str] = field(default_factory=dict)

    def count(self, shard: int) -> int:
        url = self.urls[shard]
        if url in self.counts:
            return self.counts[url]
        return self.counted[url] if url in self.counted else count_samples(url)

    def all_counts(self, remote: bool = False) -> list[int] | None:
        """Samples per shard, counting shards without an index from their tar headers once (kept in
        ``counted``, which travels to the loader's workers, and ``broken``); None when a remote shard has
        no count, unless ``remote``: then it is streamed through to count it."""
        missing = [url for url in self.urls if url not in self.counts and url not in self.counted]
        if not remote and any(not is_local_url(url) for url in missing):
            return None
        if missing:
            log.info(
                "data: domain %r: counting the samples of %d shard(s) without an index",
                self.name,
                len(missing),
            )
        for url in missing:
            self.counted[url] = count_samples(url)
            if url in _BROKEN:
                self.broken[url] = _BROKEN[url]
        return [self.count(shard) for shard in range(len(self.urls))]


class _DomainReader:
    """The raw samples of one domain for one reader in one epoch, addressable by position."""

    def __init__(
        self, source: DomainSource, share: Share, key: str, lanes: int, block: int, counter: SkipCounter
    ) -> None:
        self.source, self.share, self.key = source, share, key
        self.lanes, self.block, self.counter = lanes, block, counter

    def samples(self, start: int) -> Iterator[tuple[int, dict[str, Any] | None]]:
        """``(position, raw sample or None)`` from ``start`` on, forever (None: missing in a broken shard)."""
        lanes, block = self.lanes, self.block
        index = start // block
        first = index * block
        readers = [self._lane(lane, max(0, -(-(first - lane) // lanes))) for lane in range(lanes)]
        skip = start - first
        try:
            while True:
                base = index * block
                items = [next(readers[p % lanes]) for p in range(base, base + block)]
                order = list(range(block))
                if block > 1:
                    seeded(self.key, "block", index).shuffle(order)
                for i in range(skip, block):
                    item, items[order[i]] = items[order[i]], None  # free each sample once it is out
                    yield base + i, item
                skip, index = 0, index + 1
        finally:
            for reader in readers:
                reader.close()

    def _lane(self, lane: int, start: int) -> Iterator[dict[str, Any] | None]:
        pieces = self.share.pieces
        visit, skip, empty = 0, start, 0
        while True:
            piece = pieces[seeded(self.key, "visit", lane, visit).randrange(len(pieces))]
            visit += 1
            units = piece.units(self.source.count(piece.shard))
            if units == 0:
                empty += 1
                if empty > _MAX_EMPTY_VISITS:
                    urls = [self.source.urls[p.shard] for p in pieces[:3]]
                    raise DataError(
                        f"data: domain {self.source.name!r}: {empty} shard visits in a row found no sample for "
                        f"this reader (shards {urls}...). Are the shards empty?"
                    )
                continue
            empty = 0
            if skip >= units:  # fast-forward: a whole visit is skipped by its count, unread
                skip -= units
                continue
            yield from self._visit(piece, skip, units)
            skip = 0

    def _visit(self, piece: Piece, first: int, units: int) -> Iterator[dict[str, Any] | None]:
        url = self.source.urls[piece.shard]
        low, high = piece.start + first, piece.start + units

        def wanted(index: int) -> bool:
            return low <= index < high

        emitted = first
        # A header count that stopped at a break: the piece ends before it, so the read never meets it.
        broken = self.source.broken.get(url) or (_BROKEN.get(url) if url not in self.source.counts else None)
        if broken:
            self.counter.add("broken_shards", broken)
        try:
            for _, sample in read_shard(url, wanted):
                if sample is not None:
                    yield sample
                    emitted += 1
                    if emitted == units:
                        return
        except Exception as exc:
            self.counter.add("broken_shards", f"{url}: {exc!r}")
        else:
            self.counter.add(
                "broken_shards", f"{url}: {units - emitted} of the samples its count promised are missing"
            )
        for _ in range(units - emitted):  # positions stay where the count put them
            yield None


# ----------------------------------------------------------------------------- positions


@dataclass(frozen=True)
class ReaderPosition:
    """Where a reader is in its epoch: samples drawn, and raw positions consumed per domain."""

    drawn: int = 0
    raw: tuple[int, ...] = ()


@dataclass(frozen=True)
class ResumePoint:
    """Where one rank's stream resumes.

    Attributes:
        epoch: the stream epoch the training loop was in.
        batches: batches of that epoch the training loop consumed on this rank.
        readers: local reader -> its position after its last consumed batch (absent: none consumed).
        complete: the epoch was consumed to its end; the stream resumes at ``epoch + 1``.
    """

    epoch: int
    batches: int
    readers: dict[int, ReaderPosition]
    complete: bool


class StreamProgress:
    """What the training loop consumed (main process): fed every training batch's ``stream`` entry."""

    def __init__(self) -> None:
        self.epoch: int | None = None
        self.batches = 0
        self.readers: dict[int, ReaderPosition] = {}

    def consume(self, meta: dict[str, Any]) -> None:
        """Record one consumed batch (``meta``: the batch's ``stream`` entry)."""
        if meta["epoch"] != self.epoch:
            self.epoch, self.batches, self.readers = int(meta["epoch"]), 0, {}
        self.batches += 1
        self.readers[int(meta["reader"])] = ReaderPosition(int(meta["drawn"]), tuple(map(int, meta["raw"])))

    def state(self) -> dict[str, Any]:
        """Plain data (loads with ``torch.load(weights_only=True)``)."""
        return {
            "epoch": self.epoch,
            "batches": self.batches,
            "readers": {str(k): {"drawn": p.drawn, "raw": list(p.raw)} for k, p in self.readers.items()},
        }

    @staticmethod
    def resume_point(state: dict[str, Any], epoch_batches: int) -> ResumePoint | None:
        """The :class:`ResumePoint` of a saved ``state`` (None: nothing was consumed yet)."""
        if state.get("epoch") is None:
            return None
        readers = {int(k): ReaderPosition(v["drawn"], tuple(v["raw"])) for k, v in state["readers"].items()}
        batches = int(state["batches"])
        return ResumePoint(int(state["epoch"]), batches, readers, complete=batches >= epoch_batches)


# ----------------------------------------------------------------------------- the dataset


class TrainStream(IterableDataset):
    """One rank's training stream; each ``iter()`` (one per epoch, in each worker) yields one epoch.

    Every sample carries ``skipped`` (the skip counts made while fetching it) and ``stream`` =
    {"epoch", "reader", "drawn", "raw"}: its reader's position after it. ``len()`` is the samples
    per rank per epoch.

    Args:
        sources: the domains.
        counter: the skip counter shared with the sources' ``prepare`` (one copy per worker).
        seed, rank, world_size, num_workers: the stream's identity; ``num_workers`` must be the
            DataLoader's.
        per_reader: samples per reader per epoch.
        lanes: shards read side by side per reader and domain.
        block: the shuffle block (raw samples held in memory per reader and domain).
        first_epoch: the epoch of the first ``iter()`` when not resuming (the trainer's epoch).
        resume: where to resume; the first ``iter()`` finishes that epoch, or starts the next if
            it was complete.
    """

    def __init__(
        self,
        sources: list[DomainSource],
        *,
        counter: SkipCounter,
        seed: int,
        rank: int,
        world_size: int,
        num_workers: int,
        per_reader: int,
        lanes: int = 4,
        block: int = 1000,
        first_epoch: int = 0,
        resume: ResumePoint | None = None,
    ) -> None:
        super().__init__()
        if lanes < 1 or block < 1 or per_reader < 1:
            raise ValueError(f"lanes={lanes}, block={block} and per_reader={per_reader} must be >= 1")
        self.sources, self.counter, self.seed = sources, counter, seed
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.per_reader, self.lanes, self.block = per_reader, lanes, block
        self.resume = resume
        self.first_epoch = first_epoch if resume is None else resume.epoch + int(resume.complete)
        self._iterations = 0
        self._counts = [self._shard_counts(source) for source in sources]

    @property
    def readers_per_rank(self) -> int:
        return max(1, self.num_workers)

    def __len__(self) -> int:
        return self.per_reader * self.readers_per_rank

    def _shard_counts(self, source: DomainSource) -> list[int] | None:
        """Samples per shard of ``source`` for its shares (None: it splits by whole shards), checked to give
        every reader data; counted here, once per rank, so that the loader's workers start with them."""
        readers = self.world_size * self.readers_per_rank
        if readers == 1:
            return None
        few_shards = len(source.urls) < readers  # whole shards cannot go round: count even remote ones
        counts = source.all_counts(remote=few_shards)
        if counts is None:
            if self.rank == 0 and len(source.urls) % readers:
                log.warning(
                    "data: domain %r: %d remote shard(s) without sample counts go to %d readers by whole "
                    "shards, unevenly: the samples of readers with fewer are drawn more often. A shards.json "
                    "with counts (nested shards writes one) splits them evenly.",
                    source.name,
                    len(source.urls),
                    readers,
                )
            return None
        if sum(counts) < readers:
            raise DataError(
                f"domain {source.name!r}: {sum(counts)} samples in {len(counts)} shard(s) cannot feed "
                f"{readers} readers ({self.world_size} ranks x {self.readers_per_rank} workers): some would "
                "get none and hang DDP. Write more samples or use fewer workers."
            )
        return counts

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != self.readers_per_rank:
            raise RuntimeError(
                f"the training stream was built for num_workers={self.num_workers} but runs in {workers} "
                "process(es): pass the DataLoader's num_workers to build_stream"
            )
        iteration, self._iterations = self._iterations, self._iterations + 1
        resume = self.resume
        if resume is not None and not resume.complete and iteration == 0:
            # The DataLoader takes batch i from worker i % W; the interrupted epoch's next batch came
            # from reader batches % W, so worker w continues reader (w + batches) % W.
            reader = (worker + resume.batches) % self.readers_per_rank
            yield from self._epoch(resume.epoch, reader, resume.readers.get(reader))
        else:
            yield from self._epoch(self.first_epoch + iteration, worker, None)

    def _epoch(self, epoch: int, local: int, start: ReaderPosition | None) -> Iterator[dict[str, Any]]:
        readers = self.world_size * self.readers_per_rank
        reader = self.rank * self.readers_per_rank + local
        sources = self.sources
        start = start or ReaderPosition(0, (0,) * len(sources))
        drawn, raw = start.drawn, list(start.raw)
        weights = [s.weight for s in sources]
        streams: dict[int, Iterator[tuple[int, dict[str, Any] | None]]] = {}
        try:
            while drawn < self.per_reader:
                domain = 0
                if len(sources) > 1:
                    domain = seeded(self.seed, "mix", epoch, reader, drawn).choices(
                        range(len(sources)), weights
                    )[0]
                source = sources[domain]
                if domain not in streams:
                    share = Share.of(len(source.urls), reader, readers, self._counts[domain])
                    key = f"{self.seed}:{source.name}:{epoch}:{reader}"
                    streams[domain] = _DomainReader(
                        source, share, key, self.lanes, self.block, self.counter
                    ).samples(raw[domain])
                while True:
                    position, item = next(streams[domain])
                    raw[domain] = position + 1
                    if item is None:
                        continue
                    rng = seeded(self.seed, "sample", source.name, epoch, reader, position)
                    sample = source.prepare(item, rng)
                    if sample is not None:
                        break
                drawn += 1
                sample["skipped"] = self.counter.drain()
                sample["stream"] = {"epoch": epoch, "reader": local, "drawn": drawn, "raw": list(raw)}
                yield sample
        finally:
            for stream in streams.values():
                stream.close()
