"""The prompts a run's data makes, for T5's prompt cache (:mod:`nested.prompt_cache`).

:func:`domain_prompts` reads a domain's shards (the json and txt members only; images are not decoded) and
returns every caption as training sees it (:func:`~nested.data.loading.training_caption`: the caption rule
applied) plus the subject token alone, the caption that text dropout leaves. :func:`domain_source` is what a
cache records about a domain it was built for: the shard files with their sizes and the caption settings.
:func:`check_prompt_sources` refuses, when training starts, a cache that was not built for every configured
domain, so a missing caption is found before the first step, not hours into the run.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

import webdataset as wds

from nested.data.domains import DomainSpec, check_urls, is_local_url, local_path
from nested.data.loading import training_caption
from nested.errors import ConfigError
from nested.prompt_cache import read_manifest

__all__ = ["check_prompt_sources", "domain_prompts", "domain_source"]


def domain_source(spec: DomainSpec) -> dict[str, Any]:
    """What decides the captions of ``spec``'s samples: its shard files (local ones by absolute path, with
    their byte sizes, so that a run started from another folder matches; remote ones by url alone) and its
    subject and caption rule."""
    shards = [
        [str(local_path(url).resolve()), local_path(url).stat().st_size] if is_local_url(url) else [url, None]
        for url in check_urls(spec)
    ]
    return {
        "subject": spec.subject,
        "caption_rule": spec.caption_rule,
        "insert_template": spec.insert_template,
        "shards": shards,
    }


def domain_prompts(
    spec: DomainSpec, progress: Callable[[list[str]], Iterable[str]] | None = None
) -> tuple[list[str], dict[str, int]]:
    """Every prompt training encodes for ``spec``'s samples: each sample's caption as training sees it, and the
    subject token alone. Returns ``(prompts, counts)``; counts: ``samples`` read, ``dropped`` by the caption
    rule, ``unreadable`` (a sample without a caption, or a broken json or shard; training skips those too).
    ``progress`` wraps the shard list (e.g. ``tqdm``)."""
    counts = {"samples": 0, "dropped": 0, "unreadable": 0}
    prompts = {spec.subject: None}
    urls = check_urls(spec)

    def unreadable(error: BaseException) -> bool:
        counts["unreadable"] += 1
        return True  # go on with the next sample (a broken shard: its next member or the next shard)

    for url in progress(urls) if progress else urls:
        for sample in wds.tarfile_samples([{"url": url}], handler=unreadable):
            counts["samples"] += 1
            try:
                meta = json.loads(sample["json"]) if "json" in sample else {}
                caption = training_caption(meta if isinstance(meta, dict) else {}, sample.get("txt"), spec)
            except (ValueError, UnicodeDecodeError):
                counts["unreadable"] += 1
                continue
            if caption is None:
                counts["dropped"] += 1
            else:
                prompts[caption] = None
    return list(prompts), counts


def check_prompt_sources(folder: str, domains: Iterable[DomainSpec]) -> None:
    """Refuse the prompt cache at ``folder`` unless it was built for each of ``domains`` as configured now
    (the same shard files and sizes, subject and caption rule)."""
    sources = read_manifest(folder).get("sources", [])
    for spec in domains:
        if domain_source(spec) not in sources:
            raise ConfigError(
                f"the prompt cache {folder} was not built for domain {spec.name!r} as configured (urls "
                f"{spec.urls!r}, subject {spec.subject!r}): its shards or caption settings differ, or it was never "
                "added. Run `nested prompts` with this run's configuration to add it."
            )
