"""Judges for the toy world: who is in an image, and in which context.

Personalization is proven in the toy world by asking two questions of every generated image: is the
subject the reference identity (an *identity recognizer* per domain, the toy analogue of a
face-recognition model) and does the image follow the caption (a *context classifier* for scene and
style, the toy analogue of CLIP-T). Since every toy identity is a tuple of discrete attributes, the
recognizer predicts each attribute; an identity counts as kept when all of them are right.

The judges are small plain-torch CNNs trained by ``scripts/toyworld/train_judges.py`` on renders of
the *train* identities only (heavily degraded: blur, noise, colour shifts, softening, small
resize/translation, because they score blurry, noisy images generated through a 4x latent VAE) and
evaluated on renders of the held-out identities. All three live in one folder: ``config.json``
(architectures, vocabularies, training settings, measured accuracies) and ``model.safetensors``.

    judges = ToyJudges.from_pretrained("data/toyworld/judges")
    judges.identity("faces", images)              # [{"skin": "tan", ...}, ...]
    judges.identity("pets", pairs, half="right")  # the pet of render_pair images
    judges.context(images)                        # [{"scene": "beach", "style": None}, ...]
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from nested.errors import ConfigError, DataError, MissingFileError
from nested.evaluation.report import ATTRIBUTE_PREFIX, JUDGE_METRICS, column_suffix
from nested.files import staged_directory
from nested.toyworld.world import DOMAINS, SCENES, STYLES, identity_class, parse_caption

__all__ = [
    "CONFIG_NAME",
    "CONTEXT_CHANCE",
    "CONTEXT_INPUT",
    "CONTEXT_SCENES",
    "CONTEXT_STYLES",
    "FORMAT",
    "FORMAT_VERSION",
    "IDENTITY_INPUT",
    "WEIGHTS_NAME",
    "JudgeNet",
    "JudgedSubject",
    "ToyJudges",
    "attribute_columns",
    "judge_chance",
    "judge_images",
    "judge_predictions",
    "judge_scores",
    "judged_subject",
    "judged_subjects",
    "build_net",
    "chance_levels",
    "context_heads",
    "default_config",
    "identity_heads",
    "attribute_matches",
    "identity_match",
    "prepare_context",
    "prepare_identity",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "nested-toyworld-judges"
FORMAT_VERSION = 1
IDENTITY_INPUT = 64  # side of the identity judges' input: a single render's native size
CONTEXT_INPUT = 32  # scene and style are global: half the resolution is enough and 4x cheaper
CONTEXT_SCENES: tuple[str, ...] = (*SCENES, "plain")
CONTEXT_STYLES: tuple[str | None, ...] = STYLES
# Chance of guessing the caption-controlled context: scene and style both right over the 8 x 3
# captioned contexts, or the scene alone (the reference "plain" background is never captioned).
CONTEXT_CHANCE: dict[str, float] = {"context": 1.0 / (len(SCENES) * len(STYLES)), "scene": 1.0 / len(SCENES)}
_HALVES = ("left", "right")
_BATCH = 256


def chance_levels(domain: str) -> dict[str, float]:
    """What uniform guessing scores in ``domain``: the exact identity and the mean attribute accuracy.

    The baselines the judges (and a personalized generator) must beat by a wide margin.
    """
    attributes = identity_class(domain).ATTRIBUTES
    return {
        "identity": 1.0 / math.prod(len(values) for values in attributes.values()),
        "attributes": sum(1.0 / len(values) for values in attributes.values()) / len(attributes),
    }


def attribute_matches(predicted: Mapping[str, str], truth: Mapping[str, Any]) -> dict[str, bool]:
    """Per attribute of a prediction, whether it equals the truth.

    The attributes are the keys of ``predicted`` (a judge output); keys only in ``truth`` (like
    ``"domain"``) are ignored, so a shard's label dict can be passed as is.
    """
    if not predicted:
        raise ValueError("identity_match: the prediction has no attributes")
    missing = [name for name in predicted if name not in truth]
    if missing:
        raise ValueError(f"identity_match: the truth {dict(truth)} lacks attributes {missing}")
    return {name: predicted[name] == truth[name] for name in predicted}


def identity_match(predicted: Mapping[str, str], truth: Mapping[str, Any]) -> tuple[bool, float]:
    """``(all attributes right, fraction of attributes right)`` of a prediction against the truth."""
    matches = attribute_matches(predicted, truth)
    right = sum(matches.values())
    return right == len(matches), right / len(matches)


# ----------------------------------------------------------------------------- inputs


def _check_images(images: Tensor) -> Tensor:
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a (N, 3, H, W) float tensor in [0, 1], got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"images must be float in [0, 1], got dtype {images.dtype} (divide uint8 by 255)")
    return images.float().clamp(0.0, 1.0)


def _resize(images: Tensor, size: int) -> Tensor:
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def prepare_identity(images: Tensor, half: str | None = None, size: int = IDENTITY_INPUT) -> Tensor:
    """The identity judges' input: the whole image, or the subject's square of one half, at 64 x 64.

    ``render_pair`` centres each subject in its half (person left, pet right) at mid height with a
    side of about the half's width, so the half's vertically centred square holds the subject; it
    is upsampled to the single-render size. Training crops with this same function, so any caller
    gets exactly the judges' view.
    """
    images = _check_images(images)
    if half is not None:
        if half not in _HALVES:
            raise ValueError(f"half={half!r}: expected None, 'left' or 'right'")
        h, w = images.shape[-2:]
        side = w // 2
        top = max(0, (h - side) // 2)
        x0 = 0 if half == "left" else w - side
        images = images[..., top : top + side, x0 : x0 + side]
    return _resize(images, size)


def prepare_context(images: Tensor, size: int = CONTEXT_INPUT) -> Tensor:
    """The context judge's input: the whole image at 32 x 32 (antialiased)."""
    return _resize(_check_images(images), size)


# ----------------------------------------------------------------------------- networks


class JudgeNet(nn.Module):
    """A small CNN with one linear classifier over all heads (logits split per head).

    A patchifying stem (4x4 conv, stride 2: keeps small cues like a 3-pixel iris while halving the
    cost of every later layer), then stages of a stride-2 and a stride-1 3x3 conv. The head sees
    the final features pooled globally (mean and max) and, when ``grid`` > 0, on a ``grid`` x
    ``grid`` layout (where on the subject: hair on top, eyes in the middle). With ``detail`` > 0 a
    1x1 conv of the stem's features is max-pooled on the same grid: a short path for tiny local
    cues (an iris is 2-3 pixels) that three stride-2 stages would otherwise have to carry along.
    """

    def __init__(
        self,
        widths: Sequence[int],
        head_sizes: Sequence[int],
        stem_stride: int = 2,
        grid: int = 0,
        detail: int = 0,
    ) -> None:
        super().__init__()
        kernel = 4 if stem_stride == 2 else 3
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], kernel, stem_stride, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        layers: list[nn.Module] = []
        channels = widths[0]
        for width in widths[1:]:
            for c_in, stride in ((channels, 2), (width, 1)):
                layers += [nn.Conv2d(c_in, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            channels = width
        self.features = nn.Sequential(*layers)
        self.grid, self.detail_channels = grid, detail
        if detail:
            if not grid:
                raise ValueError("JudgeNet: detail features need a grid > 0")
            self.detail = nn.Sequential(
                nn.Conv2d(widths[0], detail, 1, bias=False), nn.BatchNorm2d(detail), nn.ReLU()
            )
        n_features = (2 + grid * grid) * channels + grid * grid * detail
        self.head = nn.Linear(n_features, sum(head_sizes))
        self.head_sizes = tuple(int(n) for n in head_sizes)

    def forward(self, x: Tensor) -> list[Tensor]:
        """(N, 3, H, W) in [0, 1] -> one (N, classes) logit tensor per head."""
        s = self.stem(x * 2.0 - 1.0)
        f = self.features(s)
        pooled = [f.mean(dim=(2, 3)), f.amax(dim=(2, 3))]
        if self.grid:
            pooled.append(F.adaptive_avg_pool2d(f, self.grid).flatten(1))
        if self.detail_channels:
            pooled.append(F.adaptive_max_pool2d(self.detail(s), self.grid).flatten(1))
        return list(self.head(torch.cat(pooled, dim=1)).split(self.head_sizes, dim=1))


def build_net(spec: Mapping[str, Any]) -> JudgeNet:
    """The (untrained) network of one judge's config entry."""
    sizes = [len(values) for values in spec["heads"].values()]
    return JudgeNet(
        spec["widths"], sizes, spec.get("stem_stride", 2), spec.get("grid", 0), spec.get("detail", 0)
    )


def identity_heads(domain: str) -> dict[str, list[str]]:
    """Attribute name -> value vocabulary of ``domain`` (the identity judge's heads, in order)."""
    return {name: list(values) for name, values in identity_class(domain).ATTRIBUTES.items()}


def context_heads() -> dict[str, list[str | None]]:
    """The context judge's heads: scene (the 8 captioned scenes + plain) and style."""
    return {"scene": list(CONTEXT_SCENES), "style": list(CONTEXT_STYLES)}


def default_config() -> dict[str, Any]:
    """A fresh judges config (untrained): architectures and vocabularies of the three judges.

    Identity judges see 64 x 64 inputs with a 4 x 4 layout head and stem detail features (eye colour
    is a 2-3 pixel cue); the context judge needs neither and runs at 32 x 32.
    """
    judges: dict[str, Any] = {}
    for domain in DOMAINS:
        judges[domain] = {
            "kind": "identity", "input": IDENTITY_INPUT, "stem_stride": 2, "widths": [24, 32, 48, 64],
            "grid": 4, "detail": 32, "heads": identity_heads(domain),
        }  # fmt: skip
    judges["context"] = {
        "kind": "context", "input": CONTEXT_INPUT, "stem_stride": 1, "widths": [16, 24, 32, 48],
        "grid": 0, "detail": 0, "heads": context_heads(),
    }  # fmt: skip
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "storage_dtype": "float16", "judges": judges}


# ----------------------------------------------------------------------------- the judges


class ToyJudges:
    """The identity judges (one per domain) and the context judge, loaded from / saved to one folder."""

    def __init__(self, config: dict[str, Any], nets: dict[str, JudgeNet] | None = None) -> None:
        _validate_config(config)
        self.config = config
        self.nets: dict[str, JudgeNet] = {}
        for name, spec in config["judges"].items():
            net = nets[name] if nets is not None else build_net(spec)
            self.nets[name] = net.eval()

    # ------------------------------------------------------------------- nested eval --judges
    # The methods of nested.evaluation.judging.Judges.

    metrics = JUDGE_METRICS

    def check_prompts(self, prompts: Sequence[str], source: str) -> None:
        """Every prompt must ask for one of the world's scenes in the world's phrasing."""
        for prompt in prompts:
            try:
                asked = parse_caption(prompt)
            except ValueError as error:
                raise ConfigError(
                    f"{source}: {error}; --judges needs the toy world's phrasing (data/prompts/toyworld-*.txt)."
                ) from None
            if asked.scene == "plain":
                raise ConfigError(
                    f"{source}: {prompt!r} names no scene; --judges score prompts that ask for one of the "
                    "world's scenes (data/prompts/toyworld-*.txt)."
                )

    def check_references(self, token: str, references: Sequence[Any]) -> None:
        """Every reference needs its true identity label in its shard metadata."""
        for reference in references:
            _label(reference, token)

    def subjects(
        self, references: dict[str, list], domains: dict[str, str | None], halves: list[str | None]
    ) -> list[list[JudgedSubject]]:
        return judged_subjects(references, domains, halves)

    def predict(self, images: Tensor, subjects: Sequence[JudgedSubject]) -> dict[str, Any]:
        return judge_predictions(self, images, list(subjects))

    def scores(
        self, predictions: dict[str, Any], subjects: Sequence[JudgedSubject], prompts: Sequence[str]
    ) -> list[dict[str, float]]:
        return judge_scores(predictions, list(subjects), [parse_caption(prompt) for prompt in prompts])

    def columns(self, subjects: Sequence[JudgedSubject]) -> list[str]:
        suffixed = len(subjects) > 1
        return [column for s in subjects for column in attribute_columns(s, suffixed).values()]

    def chance(self, subjects: Sequence[JudgedSubject]) -> dict[str, float]:
        return judge_chance(list(subjects))

    # --------------------------------------------------------------------- persistence

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> ToyJudges:
        """Load judges written by :meth:`save_pretrained` (safetensors only, never pickle)."""
        folder = Path(path)
        if not folder.is_dir():
            raise MissingFileError(f"judges folder {folder} does not exist (train one with train_judges.py)")
        config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
        for needed in (config_path, weights_path):
            if not needed.is_file():
                raise MissingFileError(f"{folder} is not a judges folder: {needed.name} is missing")
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"{config_path} is not valid JSON: {err}") from err
        judges = cls(config)
        try:
            tensors = load_file(str(weights_path))
        except Exception as err:  # safetensors raises its own error types on a corrupt file
            raise DataError(f"{weights_path} is not a readable safetensors file: {err}") from err
        for name, net in judges.nets.items():
            prefix = f"{name}."
            state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            try:
                net.load_state_dict(state, strict=True)
            except RuntimeError as err:
                raise DataError(
                    f"{weights_path} does not match the {name!r} judge of {config_path}: {err}"
                ) from err
        return judges

    def round_weights_(self) -> ToyJudges:
        """Round every float weight and statistic to the stored precision (float16), in place.

        Weights are stored as float16 (half the size; the judges lose no measurable accuracy), so
        a trainer calls this before measuring accuracy: the reported numbers are then exactly those
        of the saved judges, and a save / load round trip changes no prediction.
        """
        with torch.no_grad():
            for net in self.nets.values():
                for value in net.state_dict().values():
                    if value.is_floating_point():
                        value.copy_(value.to(torch.float16))
        return self

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write ``config.json`` + ``model.safetensors`` atomically: a temp sibling folder, then a rename.

        A reader never sees a half-written folder; an existing folder at ``path`` is replaced. Float
        tensors are stored as float16 (see :meth:`round_weights_`).
        """
        with staged_directory(path) as tmp:
            tensors = {
                f"{name}.{key}": _storage(value)
                for name, net in self.nets.items()
                for key, value in net.state_dict().items()
            }
            save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": FORMAT})
            text = json.dumps(self.config, indent=2) + "\n"
            (tmp / CONFIG_NAME).write_text(text, encoding="utf-8")

    def to(self, device: str | torch.device) -> ToyJudges:
        """Move the networks to ``device`` (inputs are moved to it on every call)."""
        for net in self.nets.values():
            net.to(device)
        return self

    # --------------------------------------------------------------------- judging

    @torch.no_grad()
    def logits(self, name: str, inputs: Tensor) -> list[Tensor]:
        """Per-head logits of judge ``name`` on already prepared ``inputs`` (batched, eval mode)."""
        net = self.nets[name]
        device = next(net.parameters()).device
        chunks = [net(chunk.to(device)) for chunk in inputs.split(_BATCH)]
        if not chunks:
            return [torch.zeros(0, n) for n in net.head_sizes]
        return [torch.cat(parts).cpu() for parts in zip(*chunks, strict=True)]

    def identity(self, domain: str, images: Tensor, half: str | None = None) -> list[dict[str, str]]:
        """Predicted identity attributes of the subject of each image (``{"skin": "tan", ...}``).

        ``images`` is (N, 3, H, W) float in [0, 1]. ``half="left"`` / ``"right"`` judges the subject of
        that half of a two-subject image (``render_pair`` layout: person left, pet right).
        """
        if domain not in DOMAINS or domain not in self.nets:
            raise ValueError(f"unknown domain {domain!r}: expected one of {DOMAINS}")
        inputs = prepare_identity(images, half, self.config["judges"][domain]["input"])
        return self._decode(domain, self.logits(domain, inputs))

    def context(self, images: Tensor) -> list[dict[str, str | None]]:
        """Predicted ``{"scene": ..., "style": ...}`` of each image (scene may be ``"plain"``)."""
        inputs = prepare_context(images, self.config["judges"]["context"]["input"])
        return self._decode("context", self.logits("context", inputs))

    def _decode(self, name: str, logits: list[Tensor]) -> list[dict[str, Any]]:
        heads = self.config["judges"][name]["heads"]
        picks = [head.argmax(dim=1).tolist() for head in logits]
        n = len(picks[0]) if picks else 0
        return [
            {key: values[p[i]] for (key, values), p in zip(heads.items(), picks, strict=True)}
            for i in range(n)
        ]


def _storage(value: Tensor) -> Tensor:
    value = value.detach().cpu()
    return (value.to(torch.float16) if value.is_floating_point() else value).contiguous()


def _validate_config(config: Any) -> None:
    """Raise a clear ``ValueError`` unless ``config`` is a judges config this code can load."""
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        got = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"not a toy-world judges config: format is {got!r}, expected {FORMAT!r}")
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"judges format_version {config.get('format_version')!r} unsupported (expected {FORMAT_VERSION})"
        )
    judges = config.get("judges")
    expected = {*DOMAINS, "context"}
    if not isinstance(judges, dict) or set(judges) != expected:
        raise ValueError(f"judges config must define the judges {sorted(expected)}, got {judges!r:.200}")
    for name, spec in judges.items():
        ok = (
            isinstance(spec, dict)
            and isinstance(spec.get("widths"), list)
            and isinstance(spec.get("input"), int)
            and spec.get("stem_stride", 2) in (1, 2)
            and spec["input"] >= 8
            and spec["widths"]
            and all(isinstance(w, int) and w > 0 for w in spec["widths"])
            and isinstance(spec.get("heads"), dict)
            and spec["heads"]
            and all(isinstance(v, list) and v for v in spec["heads"].values())
        )
        if not ok:
            raise ValueError(
                f"judges config: judge {name!r} needs an int 'input', positive int 'widths' and non-empty 'heads'"
            )


# ----------------------------------------------------------------- what nested eval --judges compares


@dataclass(frozen=True)
class JudgedSubject:
    """A subject of generated images as the judges see it: its true identity and where it stands."""

    token: str
    domain: str
    label: dict[str, str]
    half: str | None = None  # None: the whole image; "left" / "right" of a two-subject image


def _label(reference: Any, token: str) -> dict[str, Any]:
    label = reference.meta.get("identity")
    if not isinstance(label, dict) or not label:
        raise DataError(
            f"--judges needs the true identity of every reference, but {token} reference {reference.name!r} has "
            "no label (no 'identity' in its shard json): pass toy-world shards (nested.toyworld.world.write_world_shards) "
            "as --subjects."
        )
    return label


def judged_subject(
    reference: Any, token: str, domain: str | None = None, half: str | None = None
) -> JudgedSubject:
    """The truth the judges compare with: ``reference``'s identity label from its shard metadata.

    The domain is the metadata's ``domain``, else ``domain`` (the adapter config's); they must agree.

    Raises:
        ValueError: no label, no (or a disagreeing) toy-world domain, or a label that lacks an attribute
            of the domain.
    """
    label = _label(reference, token)
    stored = reference.meta.get("domain")
    if stored in DOMAINS and domain in DOMAINS and stored != domain:
        raise DataError(
            f"--judges: {token} reference {reference.name!r} is from the {stored} domain but its adapter is a "
            f"{domain} adapter; pass {token}'s own shards (--subjects '{token}=...')."
        )
    chosen = stored if stored in DOMAINS else domain
    if chosen not in DOMAINS:
        raise DataError(
            f"--judges: no toy-world domain for {token} reference {reference.name!r} (shard json: {stored!r}, "
            f"adapter config: {domain!r}); expected one of {', '.join(DOMAINS)}."
        )
    missing = [name for name in identity_class(chosen).ATTRIBUTES if name not in label]
    if missing:
        raise DataError(
            f"--judges: the identity label of {token} reference {reference.name!r} lacks {', '.join(missing)} "
            f"of the {chosen} domain."
        )
    return JudgedSubject(token, chosen, {key: str(value) for key, value in label.items()}, half)


def judged_subjects(
    references: dict[str, list],
    domains: dict[str, str | None] | None = None,
    halves: list[str | None] | None = None,
) -> list[list[JudgedSubject]]:
    """Per subject index, the subjects generated together: ``references`` is token -> its references
    (one token, or the two of --pair in order); ``domains``: token -> fallback domain (the adapter
    config's); ``halves``: where each token's subject stands (default: one token fills the image, a pair
    stands left and right, the toy world's ``render_pair`` layout)."""
    halves = halves or ([None] if len(references) == 1 else ["left", "right"])
    tokens = list(references)
    count = min(len(refs) for refs in references.values())
    return [
        [
            judged_subject(references[token][i], token, (domains or {}).get(token), half)
            for token, half in zip(tokens, halves, strict=True)
        ]
        for i in range(count)
    ]


def judge_predictions(judges: Any, images: Any, subjects: list[JudgedSubject]) -> dict[str, Any]:
    """What the judges see in ``images``: the identity for each (domain, half) of ``subjects``, and the
    context. Computed once per image batch, then compared with every subject's truth."""
    identity: dict[tuple[str, str | None], list[dict[str, str]]] = {}
    for subject in subjects:
        key = (subject.domain, subject.half)
        if key not in identity:
            identity[key] = judges.identity(subject.domain, images, half=subject.half)
    return {"identity": identity, "context": judges.context(images)}


def judge_scores(
    predictions: dict[str, Any], subjects: list[JudgedSubject], contexts: list[Any]
) -> list[dict[str, float]]:
    """Per image, the judge columns: each subject's predicted identity vs its label, and the predicted
    context vs ``contexts`` (what each image's prompt asked for).

    ``identity_exact`` / ``identity_attributes`` cover every subject (all exact; mean fraction); with two
    subjects, ``identity_exact_<token>`` / ``identity_attributes_<token>`` give each on its own. Each
    attribute has its own column too (:func:`attribute_columns`), so a partial transfer (skin and hair but
    not the eyes) shows where exact identity cannot.
    """
    rows = []
    for k, asked in enumerate(contexts):
        row: dict[str, float] = {}
        exact, fractions = [], []
        for subject in subjects:
            predicted = predictions["identity"][(subject.domain, subject.half)][k]
            matches = attribute_matches(predicted, subject.label)
            for attribute, column in attribute_columns(subject, len(subjects) > 1).items():
                row[column] = float(matches[attribute])
            right, fraction = identity_match(predicted, subject.label)
            exact.append(right)
            fractions.append(fraction)
            if len(subjects) > 1:
                suffix = column_suffix(subject.token)
                row[f"identity_exact_{suffix}"] = float(right)
                row[f"identity_attributes_{suffix}"] = fraction
        seen = predictions["context"][k]
        scene = seen["scene"] == asked.scene
        row["identity_exact"] = float(all(exact))
        row["identity_attributes"] = sum(fractions) / len(fractions)
        row["context_scene"] = float(scene)
        row["context"] = float(scene and seen["style"] == asked.style)
        rows.append(row)
    return rows


def judge_images(
    judges: Any, images: Any, prompts: list[str], subjects: list[JudgedSubject]
) -> list[dict[str, float]]:
    """The judge columns ``nested eval --judges`` writes for ``images`` generated from ``prompts`` with
    ``subjects`` (the context asked for is read from each prompt with :func:`nested.toyworld.world.parse_caption`)."""
    asked = [parse_caption(prompt) for prompt in prompts]
    return judge_scores(judge_predictions(judges, images, subjects), subjects, asked)


def attribute_columns(subject: JudgedSubject, suffixed: bool) -> dict[str, str]:
    """Attribute name -> its results.csv column, ``identity_attr_<attribute>`` (``..._<token>`` if ``suffixed``,
    i.e. with --pair), for every attribute of the subject's domain."""
    suffix = f"_{column_suffix(subject.token)}" if suffixed else ""
    return {a: f"{ATTRIBUTE_PREFIX}{a}{suffix}" for a in identity_class(subject.domain).ATTRIBUTES}


def judge_chance(subjects: list[JudgedSubject]) -> dict[str, float]:
    """Each judge column's value under uniform guessing: the level a model without the subject gets."""

    levels = [chance_levels(subject.domain) for subject in subjects]
    chance = {
        "identity_exact": math.prod(level["identity"] for level in levels),
        "identity_attributes": sum(level["attributes"] for level in levels) / len(levels),
        "context_scene": CONTEXT_CHANCE["scene"],
        "context": CONTEXT_CHANCE["context"],
    }
    if len(subjects) > 1:
        for subject, level in zip(subjects, levels, strict=True):
            chance[f"identity_exact_{column_suffix(subject.token)}"] = level["identity"]
            chance[f"identity_attributes_{column_suffix(subject.token)}"] = level["attributes"]
    for subject in subjects:
        values = identity_class(subject.domain).ATTRIBUTES
        for attribute, column in attribute_columns(subject, len(subjects) > 1).items():
            chance[column] = 1.0 / len(values[attribute])
    return chance
