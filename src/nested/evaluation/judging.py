"""Judges: classifiers that know what a generated image should show, for ``nested eval --judges FOLDER``.

A judges folder holds a ``config.json`` whose ``format`` names its kind. The class that reads that kind is
found among the installed ``nested.judges`` entry points (``format = "package.module:Class"``), so the
evaluation never imports any particular world's code; the toy world registers
``nested-toyworld-judges``. The class's ``from_pretrained(folder)`` loads it, and it provides the
:class:`Judges` methods below.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Protocol

from torch import Tensor

from nested.errors import ConfigError, MissingFileError

__all__ = ["ENTRY_POINT_GROUP", "Judges", "load_judges"]

ENTRY_POINT_GROUP = "nested.judges"


class Judges(Protocol):
    """What ``nested eval`` asks of judges. A *subject* is the judges' own record of one reference's truth
    (its identity, the domain, where it stands in the image)."""

    metrics: dict[str, str]  # column -> what it measures, for summary.json

    def to(self, device: Any) -> Judges: ...

    def check_prompts(self, prompts: Sequence[str], source: str) -> None:
        """Raise a :class:`~nested.errors.NestedUserError` naming ``source`` for a prompt they cannot score."""

    def check_references(self, token: str, references: Sequence[Any]) -> None:
        """Raise a :class:`~nested.errors.NestedUserError` for a reference whose truth they cannot know."""

    def subjects(
        self, references: dict[str, list], domains: dict[str, str | None], halves: list[str | None]
    ) -> list[list[Any]]:
        """Per subject index, the subjects generated together: ``references`` is token -> its references
        (one token, or the two of a pair), ``domains`` token -> the adapter's domain, ``halves`` where each
        token's subject stands (None: the whole image; "left" / "right")."""

    def predict(self, images: Tensor, subjects: Sequence[Any]) -> Any:
        """What they see in (B, 3, H, W) ``images``, once per batch, for every subject to be compared."""

    def scores(
        self, predictions: Any, subjects: Sequence[Any], prompts: Sequence[str]
    ) -> list[dict[str, float]]:
        """Per image, the judge columns: ``predictions`` against ``subjects`` and what each prompt asks for."""

    def columns(self, subjects: Sequence[Any]) -> list[str]:
        """The columns :meth:`scores` adds beyond :data:`nested.evaluation.report.JUDGE_COLUMNS`."""

    def chance(self, subjects: Sequence[Any]) -> dict[str, float]:
        """Each judge column's value under uniform guessing: what a model without the subject gets."""


def load_judges(folder: str | Path, device: Any = "cpu") -> Judges:
    """The judges saved in ``folder``, by the ``format`` of its ``config.json``, on ``device``."""
    path = Path(folder).expanduser()
    config_path = path / "config.json"
    if not config_path.is_file():
        raise MissingFileError(f"--judges {str(folder)!r} is not a judges folder (no config.json).")
    try:
        kind = json.loads(config_path.read_text(encoding="utf-8")).get("format")
    except (json.JSONDecodeError, AttributeError) as error:
        raise ConfigError(f"--judges {config_path} is not a JSON object with a 'format': {error}.") from error
    installed = {point.name: point for point in entry_points(group=ENTRY_POINT_GROUP)}
    if kind not in installed:
        raise ConfigError(
            f"--judges {config_path}: no installed judges read the format {kind!r} (installed: "
            f"{', '.join(sorted(installed)) or 'none'}; they register under the {ENTRY_POINT_GROUP!r} entry points)."
        )
    return installed[kind].load().from_pretrained(path).to(device)
