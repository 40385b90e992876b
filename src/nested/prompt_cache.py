"""T5's prompt states computed ahead, so that training an SD3 / FLUX adapter never holds T5 (4.8 B parameters).

A prompt cache is a folder of T5 last hidden states, one safetensors file per distinct prompt, named by the
sha256 of the prompt's T5 token ids (padded and truncated to ``max_sequence_length``, as the pipelines
tokenize): ``states/ab/ab12....safetensors`` holding ``states`` (L, C) in the dtype T5 ran in. Keying by the ids
makes the lookup exact: the same ids give the same states, whatever the spelling of the caption that made
them. ``prompt_cache.json`` records the base model, T5's component, ``max_sequence_length``, the width, the
dtype, how many prompts the folder holds, and which data it was built for (``sources``, checked by
:func:`nested.data.prompts.check_prompt_sources` when training starts).

:func:`write_prompt_states` encodes prompts with T5 and adds them (each file written atomically; prompts
already there are skipped, so an interrupted build resumes). :class:`PromptCache` stands in for T5 in a
:class:`~nested.backbone.TransformerBackbone`: called with token ids like T5, it returns the cached states,
and a prompt that is not in the cache is an error naming it.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import Tensor, nn

from nested.errors import ConfigError, MissingFileError
from nested.files import write_bytes_atomic, write_json_atomic
from nested.tokens import padded_ids

__all__ = [
    "MANIFEST",
    "PromptCache",
    "dtype_name",
    "prompt_key",
    "read_manifest",
    "state_path",
    "write_prompt_states",
]

MANIFEST = "prompt_cache.json"
FORMAT = 1


def prompt_key(input_ids: Tensor) -> str:
    """The cache key of one prompt: the sha256 of its T5 token ids (L,) as little-endian int64."""
    return hashlib.sha256(input_ids.to(torch.int64).cpu().numpy().astype("<i8").tobytes()).hexdigest()


def state_path(folder: str | Path, key: str) -> Path:
    """Where the states of the prompt with ``key`` are stored (256 subfolders keep directories small)."""
    return Path(folder) / "states" / key[:2] / f"{key}.safetensors"


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """``folder``'s ``prompt_cache.json``; a missing or unreadable one is a user error naming the fix."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise MissingFileError(
            f"{folder} is not a prompt cache (no {MANIFEST}): build it with `nested prompts` and the same "
            "configuration as nested fit."
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path} is unreadable ({error}): build the prompt cache again.") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a prompt cache manifest of format {FORMAT}: build it again.")
    return manifest


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``: how the manifest records a dtype."""
    return str(dtype).removeprefix("torch.")


def model_reference(name_or_path: str | Path) -> str:
    """How the manifest names a base model: a local folder by its absolute path (a cache may be used from
    another working directory), a hub id as given."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.is_dir() else str(name_or_path)


def check_settings(manifest: dict[str, Any], folder: str | Path, **expected: Any) -> None:
    """Refuse a cache built with other settings (``max_sequence_length``, ``width``...): its states would not
    fit, or would not be found."""
    for name, value in expected.items():
        if manifest.get(name) != value:
            raise ConfigError(
                f"the prompt cache {folder} was built with {name}={manifest.get(name)!r} (base model "
                f"{manifest.get('base_model')}), this run needs {name}={value!r}: build a cache for this "
                "configuration with `nested prompts` into another folder."
            )


class PromptCache(nn.Module):
    """T5's stand-in: ``cache(input_ids)`` returns ``(states,)``, the cached last hidden states (B, L, C) of the
    prompts those ids encode, on this module's device and in its dtype (``.to()`` moves it like a model).

    Args:
        folder: a folder written by :func:`write_prompt_states`.
        tokenizer: T5's tokenizer, to name a missing prompt and for :meth:`missing`.
        max_sequence_length: the T5 tokens of this backbone; the cache must have been built with them.
        width: T5's hidden size; the cache must hold states of that width.
        dtype: the dtype the states are returned in (the frozen models'); the cache must have been built in it,
            so that its states are the ones T5 in this dtype computes.
        base_model: the base model whose T5 the states stand in for. T5's weights are not loaded to compare, so
            a cache built from another base model is used, with a warning naming both.
    """

    def __init__(
        self,
        folder: str | Path,
        tokenizer: Any,
        *,
        max_sequence_length: int,
        width: int,
        dtype: torch.dtype,
        base_model: str | None = None,
    ) -> None:
        super().__init__()
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        check_settings(
            self.manifest,
            self.folder,
            max_sequence_length=max_sequence_length,
            width=width,
            dtype=dtype_name(dtype),
        )
        built_from = self.manifest.get("base_model")
        if base_model is not None and built_from not in (model_reference(base_model), str(base_model)):
            warnings.warn(
                f"the prompt cache {self.folder} holds the T5 states of {built_from}, and this run's base model is "
                f"{base_model}: they are right only if both have the same T5 weights (FLUX.1 and SD3.5 share "
                "T5-XXL); otherwise build a cache for this base model with `nested prompts`.",
                UserWarning,
                stacklevel=2,
            )
        self.tokenizer = tokenizer
        self.max_sequence_length = max_sequence_length
        # No weights: this buffer carries the device and dtype that .to() sets and the states are returned in.
        self.register_buffer("anchor", torch.empty(0, dtype=dtype), persistent=False)

    # Read like a transformers model's by the diffusers pipelines that hold this module as their T5.
    @property
    def dtype(self) -> torch.dtype:
        return self.anchor.dtype

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    def forward(self, input_ids: Tensor, output_hidden_states: bool = False) -> tuple[Tensor]:
        if output_hidden_states:
            raise ValueError("a prompt cache holds T5's last hidden states only, not every layer's")
        paths = [state_path(self.folder, prompt_key(ids)) for ids in input_ids]
        absent = [ids for ids, path in zip(input_ids, paths, strict=True) if not path.is_file()]
        if absent:
            raise self._missing_error(
                [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in absent]
            )
        states = torch.stack([load_file(path)["states"] for path in paths])
        return (states.to(self.anchor.device, self.anchor.dtype),)

    def missing(self, prompts: list[str]) -> list[str]:
        """The prompts of ``prompts`` that the cache does not hold."""
        if not prompts:
            return []
        ids = padded_ids(self.tokenizer, prompts, self.max_sequence_length)
        return [
            p
            for p, row in zip(prompts, ids, strict=True)
            if not state_path(self.folder, prompt_key(row)).is_file()
        ]

    def require(self, prompts: list[str], used_by: str) -> None:
        """Raise the missing-prompt error if any of ``prompts`` (which ``used_by`` will encode) is not cached."""
        absent = self.missing(prompts)
        if absent:
            raise self._missing_error(absent, used_by)

    def _missing_error(self, prompts: list[str], used_by: str = "this batch") -> ConfigError:
        shown = ", ".join(repr(p) for p in prompts[:3]) + (
            f" and {len(prompts) - 3} more" if len(prompts) > 3 else ""
        )
        return ConfigError(
            f"{len(prompts)} prompt(s) of {used_by} are not in the prompt cache {self.folder}: {shown}. Run "
            "`nested prompts` with this run's configuration (it caches the data's captions, each subject token "
            "alone, the empty prompt and SampleGrid's prompts); add other prompts with --prompts FILE."
        )


def write_prompt_states(
    folder: str | Path,
    prompts: Iterable[str],
    tokenizer: Any,
    text_encoder: nn.Module,
    *,
    max_sequence_length: int,
    base_model: str,
    component: str,
    sources: Iterable[dict[str, Any]] = (),
    batch_size: int = 16,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> dict[str, int]:
    """Encode ``prompts`` with ``text_encoder`` (T5, on its device and in its dtype, without autocast) into the
    cache at ``folder``.

    Prompts with the same ids are encoded once; those already cached are skipped. The manifest's settings are
    written before the first state file, so that an interrupted build resumed with other settings is refused
    like a finished one; each state file is written atomically; ``sources`` are added to the manifest's at
    the end, when every prompt they need is there. ``progress`` wraps the batches (e.g. ``tqdm``). Returns
    counts: ``prompts`` (distinct ids asked for), ``written``, ``cached`` (already there), ``total`` (the
    prompts the folder now holds) and ``bytes_per_prompt``.
    """
    folder = Path(folder)
    width = int(text_encoder.config.d_model)
    dtype = next(text_encoder.parameters()).dtype
    settings = {
        "base_model": model_reference(base_model),
        "component": component,
        "max_sequence_length": max_sequence_length,
        "width": width,
        "dtype": dtype_name(dtype),
    }
    manifest = read_manifest(folder) if (folder / MANIFEST).is_file() else None
    if manifest is not None:
        if manifest.get("base_model") == str(base_model):  # the same name, stored as given
            settings["base_model"] = manifest["base_model"]
        check_settings(manifest, folder, **settings)
    manifest = {
        "format": FORMAT,
        **settings,
        "prompts": (manifest or {}).get("prompts", 0),
        "bytes_per_prompt": max_sequence_length * width * dtype.itemsize,
        "sources": list((manifest or {}).get("sources", [])),
    }
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / MANIFEST, manifest)
    unique: dict[str, Tensor] = {}
    prompts = list(dict.fromkeys(prompts))
    for start in range(0, len(prompts), 1024):
        for row in padded_ids(tokenizer, prompts[start : start + 1024], max_sequence_length):
            unique.setdefault(prompt_key(row), row)
    todo = [(key, ids) for key, ids in unique.items() if not state_path(folder, key).is_file()]
    batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    device = next(text_encoder.parameters()).device
    # No autocast: training runs T5 without it too (TransformerBackbone.encode_prompts), as the pipelines do.
    with torch.inference_mode(), torch.autocast(device.type, enabled=False):
        for batch in progress(batches) if progress else batches:
            ids = torch.stack([row for _, row in batch]).to(device)
            states = text_encoder(ids)[0].to(dtype).cpu()
            for (key, _), row in zip(batch, states, strict=True):
                path = state_path(folder, key)
                path.parent.mkdir(parents=True, exist_ok=True)
                write_bytes_atomic(path, save({"states": row.contiguous()}))
    manifest["prompts"] = sum(1 for _ in folder.glob("states/*/*.safetensors"))  # an interrupted build's too
    manifest["sources"] += [source for source in sources if source not in manifest["sources"]]
    write_json_atomic(folder / MANIFEST, manifest)
    return {
        "prompts": len(unique),
        "written": len(todo),
        "cached": len(unique) - len(todo),
        "total": manifest["prompts"],
        "bytes_per_prompt": manifest["bytes_per_prompt"],
    }
