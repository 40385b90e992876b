"""Subject tokens: placeholder tokens (``<person>``), their embeddings, and where they sit in prompts.

A subject is anchored to one text token (a class word such as ``person`` or a new placeholder such as
``<person>``). Nested attention needs, per prompt, the positions of that token among the 77 text tokens:
:func:`subject_masks` computes them with exactly the padding / truncation the backbone uses.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from nested.errors import ConfigError

WORD_START = "\u2581"  # SentencePiece's mark on the first piece of each word

__all__ = [
    "add_placeholder_token",
    "get_token_embedding",
    "padded_ids",
    "read_token_embeddings_from",
    "set_token_embedding",
    "subject_masks",
    "subject_masks_for_tokenizers",
    "subject_token_ids",
    "word_spans",
]


def padded_ids(tokenizer: Any, prompts: Sequence[str], length: int | None = None) -> torch.Tensor:
    """(B, ``length``) ids of ``prompts``, padded and truncated to ``length`` (default the tokenizer's
    ``model_max_length``: 77 for CLIP) as the diffusers pipelines tokenize them for their text encoders."""
    return tokenizer(
        list(prompts),
        padding="max_length",
        max_length=length or tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def subject_token_ids(tokenizer: Any, token: str) -> list[int]:
    """The ids ``token`` becomes inside a prompt, without BOS / EOS.

    One id for a vocabulary word (``person`` -> ``[id("person</w>")]``) or an added placeholder, several for a
    word that splits into pieces. CLIP pre-tokenizes on whitespace, letters and punctuation, so a word is
    tokenized the same alone and inside a prompt.
    """
    ids = tokenizer(token, add_special_tokens=False).input_ids
    if not ids:
        raise ConfigError(f"subject token {token!r} tokenizes to nothing; use a non-empty word.")
    return list(ids)


def add_placeholder_token(tokenizer: Any, text_encoder: Any, placeholder: str, class_word: str) -> int:
    """Add ``placeholder`` as ONE new token, initialised from ``class_word``; returns its id. Idempotent.

    The text encoder's input embeddings are resized to ``len(tokenizer)`` and the new row is set to the mean
    of the class word's piece embeddings (C,). Calling again changes nothing, so a trained embedding is never
    reset. For SDXL call it once per (tokenizer, text encoder) pair.
    """
    embeddings = text_encoder.get_input_embeddings()
    old_rows = embeddings.weight.shape[0]
    if tokenizer.add_tokens([placeholder]) == 0 and old_rows >= len(tokenizer):
        ids = subject_token_ids(tokenizer, placeholder)
        if len(ids) != 1:
            raise ConfigError(
                f"{placeholder!r} is already in the vocabulary but tokenizes to {len(ids)} ids."
            )
        _pool_at_eos(tokenizer, text_encoder)
        return ids[0]
    ids = subject_token_ids(tokenizer, placeholder)
    if len(ids) != 1:
        raise ConfigError(
            f"placeholder {placeholder!r} tokenizes to {len(ids)} ids after being added; use a placeholder "
            "without spaces, like '<person>'."
        )
    placeholder_id = ids[0]
    class_ids = subject_token_ids(tokenizer, class_word)

    requires_grad = embeddings.weight.requires_grad
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    embeddings = text_encoder.get_input_embeddings()
    embeddings.weight.requires_grad_(requires_grad)  # resizing may build a new, trainable, Parameter
    with torch.no_grad():
        embeddings.weight[placeholder_id] = embeddings.weight[class_ids].mean(dim=0)
    _pool_at_eos(tokenizer, text_encoder)
    return placeholder_id


def _pool_at_eos(tokenizer: Any, text_encoder: Any) -> None:
    """Make a CLIP text encoder pool its output at the tokenizer's EOS token.

    CLIP checkpoints with the legacy ``eos_token_id == 2`` in their config (SD 1.x, SDXL) pool at
    ``argmax(input_ids)``: the largest id, which is EOS only as long as no token was added. Pooling at the
    real EOS id gives the same output on prompts without added tokens, and the right one with them.
    """
    # transformers 5 keeps eos_token_id on CLIPTextModel itself, and on .text_model of the
    # projection variant; older versions on .text_model for both.
    text_model = getattr(text_encoder, "text_model", None)
    if not hasattr(text_model, "eos_token_id"):
        text_model = text_encoder
    if getattr(text_model, "eos_token_id", None) == 2 and tokenizer.eos_token_id != 2:
        text_model.eos_token_id = tokenizer.eos_token_id
        text_encoder.config.eos_token_id = tokenizer.eos_token_id


def _find(
    sequence: list[int], pattern: list[int], starts_word: Callable[[list[int], int], bool]
) -> list[int]:
    """Every position of ``sequence`` covered by an occurrence of ``pattern`` where ``starts_word(sequence,
    start)``."""
    width = len(pattern)
    positions: list[int] = []
    for start in range(len(sequence) - width + 1):
        if sequence[start : start + width] == pattern and starts_word(sequence, start):
            positions.extend(range(start, start + width))
    return positions


def _word_starts(tokenizer: Any, pattern: list[int]) -> Callable[[list[int], int], bool]:
    """Whether the token at an index of ids starts a word, for a CLIP-style tokenizer, whose pieces mark a
    word's END (``dog</w>``): ``hotdog`` is ``ho t dog</w>``, and ``dog</w>`` there ends a word it does not
    start. A piece starts a word after one that ends a word, a special token or an added token (the
    tokenizer cuts the text around those). Every position counts when ``pattern`` itself ends without that
    mark (an added placeholder such as ``<person>``, always a word of its own). Built once per call of
    :func:`subject_masks`; only the piece before a match is looked up."""
    if not tokenizer.convert_ids_to_tokens(pattern[-1]).endswith("</w>"):
        return lambda ids, index: True
    separate = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())

    def starts_word(ids: list[int], index: int) -> bool:
        before = ids[index - 1] if index else None
        return (
            before is None or before in separate or tokenizer.convert_ids_to_tokens(before).endswith("</w>")
        )

    return starts_word


def _marks_word_starts(tokenizer: Any, token: str) -> bool:
    """Whether ``tokenizer`` is SentencePiece-style (T5): pieces carry a word-start mark, none a word end."""
    pieces = tokenizer.convert_ids_to_tokens(subject_token_ids(tokenizer, token))
    return pieces[0].startswith(WORD_START)


# What CLIP's pre-tokenizer cuts off after an apostrophe before it looks for words.
_CONTRACTIONS = ("s", "t", "re", "ve", "m", "ll", "d")


def word_spans(text: str, token: str) -> list[tuple[int, int]]:
    """The (start, end) character spans of ``token`` in ``text`` where it is a whole word, case-insensitive.

    A word as CLIP's tokenizers cut text: runs of letters, single digits, runs of other characters, after the
    contractions ``'s 't 're 've 'm 'll 'd`` are cut off. So an end of ``token`` that is a letter may not
    touch another letter: ``person2`` and ``(person)`` hold ``person``, ``persons`` does not, and neither
    does ``'dog'`` hold ``dog`` (CLIP reads ``'d`` and ``og``). The data pipeline (does a caption hold its subject?) and the T5 masks use this, so
    that they agree with the CLIP masks, which match token ids.
    """
    spans = []
    for match in re.finditer(re.escape(token), text, flags=re.IGNORECASE):
        first, last = match.span()
        if first > 0 and token[0].isalpha() and text[first - 1].isalpha():
            continue
        if text[max(first - 1, 0) : first] == "'" and token.lower().startswith(_CONTRACTIONS):
            continue  # CLIP cuts 's 't 're 've 'm 'll 'd first: 'dog' is 'd og '
        if last < len(text) and token[-1].isalpha() and text[last].isalpha():
            continue
        spans.append((first, last))
    return spans


def _positions_by_offsets(text: str, offsets: list[tuple[int, int]], token: str) -> list[int]:
    """The positions of the tokens that overlap a whole-word occurrence of ``token`` in ``text``
    (:func:`word_spans`).

    For SentencePiece tokenizers, where matching ids would find ``person`` at the start of ``persons`` and
    miss ``<person>`` in ``(<person>)`` (there ``<`` carries no word-start mark): every piece whose character
    span overlaps an occurrence is marked. Zero-width spans (special tokens, padding) are never marked; an
    occurrence not fully inside the kept tokens (truncated) is not.
    """
    end_of_tokens = max((stop for _, stop in offsets), default=0)
    positions: list[int] = []
    for first, last in word_spans(text, token):
        if last <= end_of_tokens:
            positions.extend(
                index for index, (a, b) in enumerate(offsets) if b > a and a < last and b > first
            )
    return positions


def subject_masks(
    tokenizer: Any, prompts: Sequence[str], token: str, max_length: int | None = None
) -> torch.Tensor:
    """Positions of ``token`` in each prompt, as the text encoder sees it: bool (B, T).

    Prompts are padded to ``max_length`` (default ``tokenizer.model_max_length``, 77 for CLIP) and truncated
    like the backbone does. Every occurrence is marked, all pieces of a multi-piece token (T5's tokenizer
    splits ``<person>`` into ``\u2581 < person >``); an occurrence cut (even partly) by truncation is not; a
    prompt without the token gives an all-False row. Padding is never marked. A SentencePiece tokenizer
    (T5) is matched on the text (:func:`_positions_by_offsets`), whole words only, as CLIP's tokenizers
    match by construction.
    """
    pattern = subject_token_ids(tokenizer, token)
    length = max_length or tokenizer.model_max_length
    by_offsets = _marks_word_starts(tokenizer, token)
    starts_word = None if by_offsets else _word_starts(tokenizer, pattern)
    encoded = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=length,
        truncation=True,
        return_offsets_mapping=by_offsets,
    )
    masks = torch.zeros(len(prompts), length, dtype=torch.bool)
    for row, (ids, attention) in enumerate(zip(encoded.input_ids, encoded.attention_mask, strict=True)):
        if by_offsets:
            positions = _positions_by_offsets(prompts[row], encoded.offset_mapping[row], token)
        else:
            # Search only real tokens: SDXL's second tokenizer pads with "!", which may be a subject piece.
            positions = _find(list(ids[: sum(attention)]), pattern, starts_word)
        masks[row, positions] = True
    return masks


def subject_masks_for_tokenizers(
    tokenizers: Sequence[Any], prompts: Sequence[str], token: str
) -> torch.Tensor:
    """:func:`subject_masks` for each tokenizer (SDXL has two); they must agree. Returns bool (B, T).

    The UNet sees both encoders' tokens concatenated per position, so a position is the subject's only if both
    tokenizers put the subject there; raises ValueError naming the first prompt where they disagree.
    """
    if not tokenizers:
        raise ValueError("subject_masks_for_tokenizers needs at least one tokenizer.")
    first, *others = (subject_masks(tokenizer, prompts, token) for tokenizer in tokenizers)
    for index, other in enumerate(others, start=1):
        if other.shape != first.shape:
            raise ConfigError(
                f"tokenizers 0 and {index} have different max lengths: {first.shape} vs {other.shape}"
            )
        differing = (first != other).any(dim=1).nonzero()
        if len(differing):
            raise ConfigError(
                f"tokenizers 0 and {index} place the subject token {token!r} at different positions in the "
                f"prompt {prompts[int(differing[0])]!r}; add the same placeholder to both tokenizers "
                "(add_placeholder_token)."
            )
    return first


def get_token_embedding(text_encoder: Any, token_id: int) -> torch.Tensor:
    """A detached copy of the input embedding row of ``token_id``: (C,)."""
    return text_encoder.get_input_embeddings().weight[token_id].detach().clone()


def set_token_embedding(text_encoder: Any, token_id: int, vector: torch.Tensor) -> None:
    """Overwrite the input embedding row of ``token_id`` with ``vector`` (C,), e.g. when loading an adapter."""
    weight = text_encoder.get_input_embeddings().weight
    if vector.shape != weight.shape[1:]:
        raise ValueError(
            f"embedding for token {token_id} must have shape {tuple(weight.shape[1:])}, got {tuple(vector.shape)}"
        )
    with torch.no_grad():
        weight[token_id] = vector.to(weight.device, weight.dtype)


def read_token_embeddings_from(
    text_encoder: Any, rows: Callable[[], Mapping[int, torch.Tensor]]
) -> RemovableHandle:
    """Make ``text_encoder`` embed each ``token_id`` in ``rows()`` as the tensor ``rows()[token_id]`` (C,).

    Used to train a placeholder's embedding while the text encoder stays frozen: its embedding matrix is
    not touched, the rows are substituted in the output of its input-embedding layer, so gradients reach
    only those tensors (e.g. the adapter's ``token_embeddings`` Parameters). ``rows`` is called at every
    forward, not once: FSDP swaps a module's parameters for views of its gathered flat parameter, and a
    tensor captured here would go stale. ``handle.remove()`` undoes it.
    """

    def substitute(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        input_ids = args[0]
        for token_id, vector in rows().items():
            at_token = (input_ids == token_id).unsqueeze(-1)
            output = torch.where(at_token, vector.to(output.device, output.dtype), output)
        return output

    return text_encoder.get_input_embeddings().register_forward_hook(substitute)
