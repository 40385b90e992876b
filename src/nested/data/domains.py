"""What the training data is: domains, their shard urls and sample counts, and skip counting."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import webdataset as wds

from nested.errors import ConfigError, DataError, MissingFileError
from nested.files import file_sha256

log = logging.getLogger(__name__)

__all__ = [
    "SKIP_KEYS",
    "VERIFY_MODES",
    "DomainSpec",
    "SkipCounter",
    "check_urls",
    "expand_urls",
    "is_local_url",
    "local_path",
    "read_index",
    "shard_counts",
    "verify_shards",
]

SKIP_KEYS = ("corrupt", "broken_shards", "no_subject_dropped", "no_subject_inserted", "no_reference")
VERIFY_MODES = ("size", "sha256", "off")


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
            raise ConfigError(f"invalid DomainSpec {self.name!r}:\n  - " + "\n  - ".join(problems))


# ----------------------------------------------------------------------------- urls


def is_local_url(url: str) -> bool:
    return url.startswith("file://") or ("://" not in url and not url.startswith("pipe:"))


def local_path(url: str) -> Path:
    return Path(url.removeprefix("file://"))


def read_index(path: Path) -> dict[str, Any]:
    """The ``shards.json`` at ``path``, checked to be an object with a ``shards`` list of entries
    that each have a ``url``.

    Raises:
        DataError: naming the file (and the line and column of a JSON syntax error) and the fix.
    """
    fix = f"rebuild it with `nested shards SRC {path.parent} --domain NAME --subject TOKEN --overwrite`"
    try:
        index = json.loads(path.read_bytes().decode("utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); {fix}"
        ) from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (byte offset {exc.start}); {fix}") from None
    shards = index.get("shards") if isinstance(index, dict) else None
    bad = (
        "it has no 'shards' list"
        if not isinstance(shards, list)
        else next(
            (
                f"shard entry {i} has no 'url'"
                for i, shard in enumerate(shards)
                if not isinstance(shard, dict) or not isinstance(shard.get("url"), str) or not shard["url"]
            ),
            None,
        )
    )
    if bad is not None:
        raise DataError(f"{path} is not a shards index: {bad}; {fix}")
    return index


@dataclass(frozen=True)
class _Shard:
    """A shard url, and what the ``shards.json`` that lists it records (None: not recorded)."""

    url: str
    samples: int | None = None
    size: int | None = None
    sha256: str | None = None
    index: Path | None = None
    position: int = 0  # its entry in the index


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _expand(urls: str | list[str]) -> list[_Shard]:
    """Every shard ``urls`` expands to, with what a shards.json records about it."""
    result: list[_Shard] = []
    for item in [urls] if isinstance(urls, str) else list(urls):
        for url in wds.shardlists.expand_urls(item):
            path = local_path(url)
            if is_local_url(url) and url.endswith(".json") and path.is_file():
                for position, shard in enumerate(read_index(path)["shards"]):
                    shard_url = (
                        str(path.parent / shard["url"]) if is_local_url(shard["url"]) else shard["url"]
                    )
                    sha256 = shard.get("sha256")
                    result.append(
                        _Shard(
                            shard_url,
                            samples=_int(shard.get("samples")),
                            size=_int(shard.get("bytes")),
                            sha256=sha256 if isinstance(sha256, str) else None,
                            index=path,
                            position=position,
                        )
                    )
            else:
                result.append(_Shard(url))
    return result


def expand_urls(urls: str | list[str]) -> list[str]:
    """Expand brace patterns, ``::``-joined lists and ``shards.json`` indexes into shard urls.

    A shards.json that does not exist is kept as is, so ``check_urls`` can name it.
    """
    return [shard.url for shard in _expand(urls)]


def shard_counts(urls: str | list[str]) -> dict[str, int]:
    """Samples per shard url, for the shards a ``shards.json`` in ``urls`` lists with a count.

    The resumable training stream skips whole shards by these counts; shards without one are
    counted from their tar headers when first needed (``nested.data.train_stream.count_samples``).
    """
    return {shard.url: shard.samples for shard in _expand(urls) if shard.samples is not None}


def verify_shards(spec: DomainSpec, mode: str = "size") -> None:
    """Check the local shards that a ``shards.json`` in ``spec.urls`` lists against what it records.

    ``mode``: ``"size"`` compares byte sizes (one ``stat`` per shard), ``"sha256"`` also hashes
    every shard (reads all the data), ``"off"`` checks nothing. Shards given without an index, remote
    shards and entries without a record are not checked; missing files are ``check_urls``'s.

    Raises:
        DataError: naming the first shard that differs, its index and its entry there.
    """
    if mode not in VERIFY_MODES:
        raise ConfigError(f"verify_shards={mode!r} must be one of {', '.join(VERIFY_MODES)}")
    if mode == "off":
        return
    for shard in _expand(spec.urls):
        if shard.index is None or not is_local_url(shard.url) or not local_path(shard.url).is_file():
            continue
        path = local_path(shard.url)
        difference = _difference(path, shard, mode)
        if difference is not None:
            raise DataError(
                f"domain {spec.name!r}: shard {path} differs from its index {shard.index} (entry "
                f"{shard.position}): {difference}. The file was changed or cut short after `nested shards` "
                "wrote it: restore it or rebuild the shards with `nested shards ... --overwrite` "
                "(data.verify_shards=off skips this check)."
            )


def _difference(path: Path, shard: _Shard, mode: str) -> str | None:
    """How the file ``path`` differs from the index's record ``shard`` (None: it does not)."""
    size = path.stat().st_size
    if shard.size is not None and size != shard.size:
        return f"it has {size} bytes, the index records {shard.size}"
    if mode == "sha256" and shard.sha256 is not None:
        digest = file_sha256(path)
        if digest != shard.sha256.lower():
            return f"its sha256 is {digest}, the index records {shard.sha256}"
    return None


def check_urls(spec: DomainSpec) -> list[str]:
    """Expand ``spec.urls`` and fail now, naming the urls, if there is nothing to read.

    Remote urls (``http://``, ``pipe:``...) cannot be checked here and are trusted.

    Raises:
        FileNotFoundError: when no url expands, or local shard files are missing.
    """
    urls = expand_urls(spec.urls)
    if len(urls) == 1 and is_local_url(urls[0]) and local_path(urls[0]).is_dir():
        folder = local_path(urls[0])
        index = " (its shards.json)" if (folder / "shards.json").is_file() else ""
        raise MissingFileError(
            f"domain {spec.name!r}: urls {spec.urls!r} is a folder; name its shards instead{index}: "
            f"'{folder / 'shards.json'}', a brace pattern like '{folder}/faces-{{000000..000009}}.tar' or a list "
            "of .tar files"
        )
    if not urls:
        raise MissingFileError(
            f"domain {spec.name!r}: urls {spec.urls!r} expand to no shard files; expected a brace pattern like "
            "'data/faces/faces-{000000..000009}.tar', a list of .tar files or a shards.json listing shards"
        )
    missing = [url for url in urls if is_local_url(url) and not local_path(url).is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" ... ({len(missing) - 5} more)" if len(missing) > 5 else "")
        raise MissingFileError(
            f"domain {spec.name!r}: {len(missing)} of {len(urls)} shard files from urls {spec.urls!r} do not exist: "
            f"{shown}. Build them with `nested shards` or fix the path (relative paths are resolved from the "
            "working directory)."
        )
    return urls


# ----------------------------------------------------------------------------- skip counting


class TooManySkips(DataError):
    """Raised by :class:`SkipCounter`: the data yields no usable sample. Not itself a skip to count."""


# What to do when the skips in a row are mostly of one kind.
_SKIP_FIXES = {
    "no_reference": "The domain's reference: ref needs a ref.jpg / ref.png in every sample: set its reference "
    "to bbox_crop or target, or build the shards with references (nested shards --faces or --identity-folders).",
    "no_subject_dropped": "The domain's caption_rule: drop drops every caption without its subject token: set "
    "caption_rule: insert, or check the domain's subject against the captions.",
}
_SKIP_FIX = "Check the shards (corrupt or unreadable?) and the domains' caption_rule/reference settings."


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
            counts = {name: n for name, n in self.pending.items() if n and name != "no_subject_inserted"}
            most = max(counts, key=counts.__getitem__)
            raise TooManySkips(
                f"data: {self.consecutive} samples/shards in a row were skipped "
                f"({', '.join(f'{name}: {count}' for name, count in counts.items())}); last: {reason}. "
                f"{_SKIP_FIXES.get(most, _SKIP_FIX)}"
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
        self.counter.add(self.kind, _skip_reason(exc))
        return True


def _skip_reason(exc: BaseException) -> str:
    """What a skip's log line says: webdataset's DecodingError carries the sample and member it failed on in
    attributes (its repr is a bare ``DecodingError()``) and the decoder's own error as its cause."""
    key = getattr(exc, "key", None)
    if key is None:
        return repr(exc)[:300]
    return f"{getattr(exc, 'url', None)} {key} ({getattr(exc, 'k', None)}): {exc.__cause__!r}"[:300]
