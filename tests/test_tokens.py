"""Subject tokens: placeholders in one or two tokenizers, their embeddings, and their masks in prompts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nested.backbone import DiffusionBackbone
from nested.tokens import (
    add_placeholder_token,
    get_token_embedding,
    set_token_embedding,
    subject_masks,
    subject_masks_for_tokenizers,
    subject_token_ids,
)


@pytest.fixture
def sdxl(tiny_sdxl_path: Path) -> DiffusionBackbone:
    """A fresh backbone per test: adding tokens mutates tokenizers and text encoders."""
    return DiffusionBackbone.from_pretrained(tiny_sdxl_path)


def _token(tokenizer, token_id: int) -> str:
    return tokenizer.convert_ids_to_tokens([token_id])[0]


def test_subject_token_ids(sdxl: DiffusionBackbone) -> None:
    tokenizer = sdxl.tokenizers[0]
    assert [_token(tokenizer, i) for i in subject_token_ids(tokenizer, "person")] == ["person</w>"]
    assert [_token(tokenizer, i) for i in subject_token_ids(tokenizer, "sunglasses")] == [
        "sun",
        "glasses</w>",
    ]
    assert len(subject_token_ids(tokenizer, "<person>")) == 3  # "<", "person", ">" until it is added
    with pytest.raises(ValueError, match="tokenizes to nothing"):
        subject_token_ids(tokenizer, "  ")


def test_placeholder_in_both_sdxl_tokenizers(sdxl: DiffusionBackbone) -> None:
    sizes = [len(tokenizer) for tokenizer in sdxl.tokenizers]
    ids = []
    for tokenizer, text_encoder, size in zip(sdxl.tokenizers, sdxl.text_encoders, sizes, strict=True):
        class_row = get_token_embedding(text_encoder, subject_token_ids(tokenizer, "person")[0])
        placeholder_id = add_placeholder_token(tokenizer, text_encoder, "<person>", "person")
        ids.append(placeholder_id)
        assert subject_token_ids(tokenizer, "<person>") == [placeholder_id]
        assert subject_token_ids(tokenizer, "<PERSON>") == [placeholder_id]  # CLIP lower-cases prompts
        assert len(tokenizer) == size + 1
        weight = text_encoder.get_input_embeddings().weight
        assert weight.shape[0] == len(tokenizer) and not weight.requires_grad
        assert text_encoder.config.vocab_size == len(tokenizer)
        torch.testing.assert_close(
            get_token_embedding(text_encoder, placeholder_id), class_row, rtol=0, atol=0
        )
    assert ids[0] == ids[1] == sizes[0]

    # Idempotent: same id, no growth, and a trained embedding is not reset.
    tokenizer, text_encoder = sdxl.tokenizers[1], sdxl.text_encoders[1]
    trained = torch.randn(32)
    set_token_embedding(text_encoder, ids[1], trained)
    assert add_placeholder_token(tokenizer, text_encoder, "<person>", "person") == ids[1]
    assert (
        len(tokenizer) == sizes[1] + 1 and text_encoder.get_input_embeddings().weight.shape[0] == sizes[1] + 1
    )
    torch.testing.assert_close(get_token_embedding(text_encoder, ids[1]), trained)

    # The conditioning with the placeholder equals the one with the class word until the embedding is trained.
    set_token_embedding(
        text_encoder, ids[1], get_token_embedding(text_encoder, subject_token_ids(tokenizer, "person")[0])
    )
    with torch.no_grad():
        placeholder = sdxl.encode_prompts(["a photo of <person> on the beach"])
        class_word = sdxl.encode_prompts(["a photo of person on the beach"])
    torch.testing.assert_close(placeholder.prompt_embeds, class_word.prompt_embeds)
    torch.testing.assert_close(placeholder.pooled_prompt_embeds, class_word.pooled_prompt_embeds)


def test_multi_piece_class_word_initialisation(sdxl: DiffusionBackbone) -> None:
    tokenizer, text_encoder = sdxl.tokenizers[0], sdxl.text_encoders[0]
    pieces = subject_token_ids(tokenizer, "sunglasses")
    expected = torch.stack([get_token_embedding(text_encoder, i) for i in pieces]).mean(dim=0)
    placeholder_id = add_placeholder_token(tokenizer, text_encoder, "<shades>", "sunglasses")
    torch.testing.assert_close(get_token_embedding(text_encoder, placeholder_id), expected)


def test_legacy_eos_pooling_fixed(sdxl: DiffusionBackbone) -> None:
    # Real SD / SDXL text encoder configs carry eos_token_id 2: pooling then takes argmax(input_ids), which
    # would land on an added placeholder (the largest id) instead of EOS.
    tokenizer, text_encoder = sdxl.tokenizers[1], sdxl.text_encoders[1]
    text_encoder.text_model.eos_token_id = text_encoder.config.eos_token_id = 2
    with torch.no_grad():
        before = sdxl.encode_prompts(["a photo of a person"]).pooled_prompt_embeds
    add_placeholder_token(tokenizer, text_encoder, "<person>", "person")
    assert text_encoder.text_model.eos_token_id == tokenizer.eos_token_id
    text_encoder.text_model.eos_token_id = 2  # e.g. saved with the token, reloaded from a legacy config
    add_placeholder_token(tokenizer, text_encoder, "<person>", "person")
    assert text_encoder.text_model.eos_token_id == tokenizer.eos_token_id
    with torch.no_grad():
        after = sdxl.encode_prompts(["a photo of a person"]).pooled_prompt_embeds
        torch.testing.assert_close(after, before)
        ids = sdxl.tokenize(["a <person> on the beach"])[1]
        output = text_encoder(ids)
        eos_position = int((ids[0] == tokenizer.eos_token_id).nonzero()[0])
        expected = text_encoder.text_projection(output.last_hidden_state[0, eos_position])
    torch.testing.assert_close(output.text_embeds[0], expected)


def test_masks_occurrences(sdxl: DiffusionBackbone) -> None:
    tokenizer = sdxl.tokenizers[0]
    prompts = ["a photo of a person", "a dog in the park", "a person and a person", "person"]
    masks = subject_masks(tokenizer, prompts, "person")
    assert masks.shape == (4, 77) and masks.dtype == torch.bool
    assert masks[0].nonzero().flatten().tolist() == [5]  # <bos> a photo of a person
    assert not masks[1].any()
    assert masks[2].nonzero().flatten().tolist() == [2, 5]
    assert masks[3].nonzero().flatten().tolist() == [1]
    # The masks point at the subject's id in exactly the ids the backbone feeds the text encoder.
    ids = sdxl.tokenize(prompts)[0]
    assert (ids[masks] == subject_token_ids(tokenizer, "person")[0]).all()


def test_masks_multi_piece_and_truncation(sdxl: DiffusionBackbone) -> None:
    tokenizer = sdxl.tokenizers[0]
    prompts = [
        "a man wearing sunglasses",
        "a " * 74 + "person",  # person is the last token kept (position 75, EOS at 76)
        "a " * 75 + "person",  # person truncated away
        "a " * 74 + "sunglasses",  # "sun" kept, "glasses" truncated: not a whole occurrence
    ]
    sunglasses = subject_masks(tokenizer, prompts, "sunglasses")
    assert sunglasses[0].nonzero().flatten().tolist() == [4, 5]
    assert not sunglasses[3].any()
    person = subject_masks(tokenizer, prompts, "person")
    assert person[1].nonzero().flatten().tolist() == [75]
    assert not person[2].any()


def test_masks_never_mark_padding(sdxl: DiffusionBackbone) -> None:
    tokenizer_2 = sdxl.tokenizers[1]  # pads with "!"
    masks = subject_masks(tokenizer_2, ["a dog!", "a cat"], "!")
    assert masks[0].nonzero().flatten().tolist() == [3]
    assert not masks[1].any()


def test_masks_for_two_tokenizers(sdxl: DiffusionBackbone) -> None:
    prompts = ["a photo of <person> with a dog", "a cat", "<person> and <person>"]
    # Before the placeholder exists both tokenizers split it the same way: they agree.
    split = subject_masks_for_tokenizers(sdxl.tokenizers, prompts, "<person>")
    assert split[0].nonzero().flatten().tolist() == [4, 5, 6]

    add_placeholder_token(sdxl.tokenizers[0], sdxl.text_encoders[0], "<person>", "person")
    with pytest.raises(
        ValueError, match="different positions in the prompt 'a photo of <person> with a dog'"
    ):
        subject_masks_for_tokenizers(sdxl.tokenizers, prompts, "<person>")

    add_placeholder_token(sdxl.tokenizers[1], sdxl.text_encoders[1], "<person>", "person")
    masks = subject_masks_for_tokenizers(sdxl.tokenizers, prompts, "<person>")
    assert masks[0].nonzero().flatten().tolist() == [4]
    assert not masks[1].any()
    assert masks[2].nonzero().flatten().tolist() == [1, 3]
    torch.testing.assert_close(masks, subject_masks(sdxl.tokenizers[1], prompts, "<person>"))
    with pytest.raises(ValueError, match="at least one tokenizer"):
        subject_masks_for_tokenizers([], prompts, "<person>")


def test_set_token_embedding_checks_shape(sdxl: DiffusionBackbone) -> None:
    text_encoder = sdxl.text_encoders[0]
    set_token_embedding(text_encoder, 5, torch.ones(32, dtype=torch.float64))
    assert torch.equal(get_token_embedding(text_encoder, 5), torch.ones(32))
    copy = get_token_embedding(text_encoder, 5)
    copy.zero_()  # a copy: the model is untouched
    assert torch.equal(get_token_embedding(text_encoder, 5), torch.ones(32))
    with pytest.raises(ValueError, match="must have shape \\(32,\\)"):
        set_token_embedding(text_encoder, 5, torch.ones(33))
