"""Time to the first training sample when resuming deep into an epoch, against a fresh start.

The training stream (``nested.data.train_stream``) resumes from a checkpointed position by skipping
whole shard visits by their sample counts and seeking inside the open shards: no sample is read or decoded to get
there; what grows with the position is one seeded draw per skipped shard visit (~10 us each). This builds the demo faces stream (3 shards of 16 samples, counts
from shards.json) with a huge epoch, and times ``next(iter(stream))`` fresh and resumed at
positions 10^3 ... 10^6 samples into the epoch (each resumed reader also re-reads one shuffle
block, as a fresh start does).

    python benchmarks/resume.py            # ~10 s

Measured here (2 shared CPU cores): fresh 0.009 s; resumed at 10^3 / 10^4 / 10^5 / 10^6 samples
0.010 / 0.017 / 0.087 / 0.75 s. The demo shards hold 16 samples; with real shards (1000+ samples)
a million samples are < 1000 visits: milliseconds.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from nested.data import DomainSpec, build_stream
from nested.data.train_stream import ReaderPosition, ResumePoint

SHARDS = Path(__file__).resolve().parents[1] / "data" / "demo" / "faces" / "shards.json"


def first_sample_seconds(position: int | None, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        resume = None
        if position is not None:
            # A reader that drew `position` samples; a few skips make its raw position a bit larger.
            resume = ResumePoint(
                0, position // 2, {0: ReaderPosition(position, (position + position // 50,))}, False
            )
        stream = build_stream(
            [DomainSpec("faces", str(SHARDS), "<person>")],
            train=True,
            resolution=64,
            reference_size=32,
            batch_size=2,
            epoch_samples=10**7,
            shuffle_buffer=64,
            open_shards=4,
            resume=resume,
        )
        start = time.perf_counter()
        next(iter(stream))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    print(f"{'resumed at sample':>18}  first sample (s)")
    print(f"{'fresh start':>18}  {first_sample_seconds(None):.3f}")
    for position in (10**3, 10**4, 10**5, 10**6):
        print(f"{position:>18,}  {first_sample_seconds(position):.3f}")


if __name__ == "__main__":
    main()
