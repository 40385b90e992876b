"""The toy world's base model: the committed folder loads through from_pretrained and draws what the
captions ask for; the training helpers are deterministic and learn."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nested.toyworld import base_model as toybase
from nested.toyworld.world import SCENES, Context, caption

REPO = Path(__file__).resolve().parents[1]
TOY_SD = REPO / "data" / "models" / "toy-sd"


def test_committed_toy_model_loads_through_from_pretrained_and_generates_64px():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(TOY_SD, safety_checker=None, requires_safety_checker=False)
    assert pipe.unet.dtype == torch.float32  # stored in float16, loaded back as float32
    assert pipe.vae.config.scaling_factor != 0.18215  # measured on the trained latents, not SD's
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        [caption("faces", Context("red")), caption("pets", Context("snow", "sketch"))],
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    assert images.shape == (2, 3, 64, 64)
    assert torch.isfinite(images).all()


def test_committed_image_encoder_loads_with_its_processor():
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    encoder = CLIPVisionModelWithProjection.from_pretrained(TOY_SD / "image_encoder")
    processor = CLIPImageProcessor.from_pretrained(TOY_SD / "image_encoder")
    pixels = processor(images=[torch.rand(3, 64, 64)], do_rescale=False, return_tensors="pt").pixel_values
    hidden = encoder(pixels, output_hidden_states=True).hidden_states[-1]
    assert hidden.shape == (1, 65, 128)  # 8 x 8 patches + CLS


def test_committed_base_model_draws_the_captioned_scene():
    """Trained, not random: the base model's images of each scene are told apart by the committed context
    judge far above chance (1/8)."""
    from diffusers import StableDiffusionPipeline

    from nested.toyworld.judges import ToyJudges

    judges = ToyJudges.from_pretrained(REPO / "data" / "toyworld" / "judges")
    pipe = StableDiffusionPipeline.from_pretrained(TOY_SD, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    scenes = list(SCENES)
    images = pipe(
        [caption("faces" if i % 2 else "pets", Context(scene)) for i, scene in enumerate(scenes)],
        num_inference_steps=15,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    predicted = [p["scene"] for p in judges.context(images)]
    correct = sum(p == s for p, s in zip(predicted, scenes, strict=True))
    assert correct >= 5, f"scenes {scenes} judged as {predicted}"


def test_render_pool_is_deterministic_and_uses_train_identities_only():
    first, second = toybase.render_pool(12, seed=3), toybase.render_pool(12, seed=3)
    assert torch.equal(first.images, second.images) and first.captions == second.captions
    assert first.images.shape == (12, 3, 64, 64) and first.images.dtype == torch.uint8
    assert not torch.equal(first.images, toybase.render_pool(12, seed=4).images)
    # Captions carry class and context, never identity attributes.
    assert all(text.startswith(("a photo of", "a sketch of", "a painting of")) for text in first.captions)
    assert not any(word in " ".join(first.captions) for word in ("ginger", "blonde", "azure", "spiky"))


def test_vae_and_unet_training_reduce_their_losses(tmp_path):
    torch.manual_seed(0)
    pool = toybase.render_pool(32, seed=0)
    vae = toybase.build_vae()
    before = toybase.reconstruction_error(vae, pool.images[:8])
    losses: list[float] = []
    toybase.train_vae(
        vae, pool, steps=30, batch_size=4, lr=2e-3, progress=lambda s, logs: losses.append(logs["loss"])
    )
    assert toybase.reconstruction_error(vae, pool.images[:8]) < before
    assert vae.config.scaling_factor == pytest.approx(
        1.0 / toybase.encode_latents(vae, pool.images[:32], scale=1.0).std().item(), rel=0.2
    )

    tokenizer = toybase.write_world_tokenizer(tmp_path / "tokenizer")
    text_encoder = toybase.build_text_encoder(tokenizer, seed=0)
    latents = toybase.encode_latents(vae, pool.images)
    unet_losses: list[float] = []
    torch.manual_seed(0)
    toybase.train_unet(
        toybase.build_unet(text_encoder.config.hidden_size), latents, pool.captions, tokenizer, text_encoder,
        steps=30, batch_size=8, lr=2e-3, progress=lambda s, logs: unet_losses.append(logs["loss"]),
    )  # fmt: skip
    assert sum(unet_losses[-10:]) < sum(unet_losses[:10])


def _script(name: str):
    """Import ``scripts/toyworld/<name>.py`` as a module."""
    spec = importlib.util.spec_from_file_location(f"toy_{name}", REPO / "scripts" / "toyworld" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _per_token_base(folder: Path) -> Path:
    """The committed base model with a per-token text model (no transformer layers) of the same width: every
    word's feature is its own, so the class word's feature never depends on the words around it."""
    from transformers import CLIPTokenizer

    folder.mkdir()
    for part in ("unet", "vae", "tokenizer", "scheduler", "image_encoder", "model_index.json"):
        (folder / part).symlink_to(TOY_SD / part)
    tokenizer = CLIPTokenizer.from_pretrained(TOY_SD / "tokenizer")
    toybase.build_text_encoder(tokenizer, seed=0).save_pretrained(folder / "text_encoder")
    # Captions that name the identity after the class word keep it at its position in both prompts, so its
    # position embedding, and with it its per-token feature, is the same.
    record = {"stages": [{"recipe": {"unet_steps": 1, "describe_before": False}}]}
    (folder / "training.json").write_text(json.dumps(record))
    return folder


def test_results_interpolates_context_at_equal_identity():
    results = _script("results")
    curve = [{"identity_exact": 0.1, "context": 0.9}, {"identity_exact": 0.5, "context": 0.5}]
    assert results.context_at_identity(curve, 0.3) == pytest.approx(0.7)
    assert results.context_at_identity(curve, 0.1) == pytest.approx(0.9)
    assert results.context_at_identity(curve, 0.6) is None  # outside the sweep: no claim


def test_committed_image_encoder_recognises_held_out_identities():
    """Pretrained, not random: mean-pooled features of two renders of one HELD-OUT identity (never seen in
    pretraining) are each other's nearest neighbour among 24 identities far above chance (1/24)."""
    from transformers import CLIPVisionModelWithProjection

    from nested.toyworld.world import render, split_identities

    encoder = CLIPVisionModelWithProjection.from_pretrained(TOY_SD / "image_encoder").eval()
    people = split_identities("faces")[1][::12][:12] + split_identities("pets")[1][::7][:12]

    def views(seed: int) -> torch.Tensor:
        images = [np.array(render(p, Context("plain"), seed=seed + i)) for i, p in enumerate(people)]
        return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)

    with torch.no_grad():
        first, second = (
            torch.nn.functional.normalize(toybase.pooled_features(encoder, views(s)), dim=-1)
            for s in (0, 100)
        )
    top1 = ((first @ second.T).argmax(1) == torch.arange(len(people))).float().mean().item()
    assert top1 >= 0.5, top1


def test_image_encoder_pretraining_learns_to_match_renders_of_one_identity():
    from nested.toyworld.world import split_identities

    people = split_identities("faces")[0][::60] + split_identities("pets")[0][::20]  # 38 train identities
    views = toybase.render_views(2, seed=0, people=people)
    logs: list[dict[str, float]] = []
    toybase.train_image_encoder(
        toybase.build_image_encoder(seed=0), views, steps=40, batch_size=16, lr=2e-3,
        progress=lambda s, entry: logs.append(entry),
    )  # fmt: skip
    assert sum(e["loss"] for e in logs[-10:]) < sum(e["loss"] for e in logs[:10])


def test_committed_base_model_attends_to_the_class_word():
    """Nested attention changes only the subject token's value, so the base model must read the subject from
    its class word. With the class-word prompt, "person" / "pet" gets >= 20 % of the attention of the
    subject's pixels, mean of the layers (29 and 28 % on these prompts). Every layer's shares of the five
    token groups sum to 1."""
    from diffusers import StableDiffusionPipeline

    from nested.toyworld.channel import TOKEN_GROUPS, attention_channel, channel_prompts
    from nested.toyworld.world import identities

    pipe = StableDiffusionPipeline.from_pretrained(TOY_SD, safety_checker=None, requires_safety_checker=False)
    contexts_ = [Context("beach"), Context("red", "sketch"), Context("snow"), Context("city", "painting")]
    for domain in ("faces", "pets"):
        subjects = [identities(domain)[7 * i] for i in range(len(contexts_))]
        prompts = channel_prompts(subjects, contexts_)
        channel = attention_channel(pipe, subjects, contexts_, prompts, toybase.description_vocabulary())
        assert len(channel) == 7 + 1 and all(list(row) == list(TOKEN_GROUPS) for row in channel.values())
        assert all(sum(row.values()) == pytest.approx(1, abs=1e-5) for row in channel.values())
        assert channel["mean"]["class word"] >= 0.20, channel


def test_subject_mask_covers_the_subject_and_not_the_background():
    from nested.toyworld.channel import subject_mask
    from nested.toyworld.world import identities, render

    face = identities("faces")[3]
    mask = subject_mask(face, seed=5)
    assert 0.1 < mask.mean() < 0.7
    on_beach = np.asarray(render(face, Context("beach"), seed=5), dtype=np.int16)
    on_night = np.asarray(render(face, Context("night"), seed=5), dtype=np.int16)
    same = np.abs(on_beach - on_night).max(-1) <= 24  # the subject is drawn alike on any background
    assert same[mask.numpy() > 0].mean() > 0.97 and same[mask.numpy() == 0].mean() < 0.1


def test_world_tokenizer_keeps_every_tiny_id_and_makes_identity_words_whole(tmp_path):
    from transformers import CLIPTokenizer

    from nested.testing import write_tiny_tokenizer
    from nested.toyworld.world import contexts, identities

    tiny = write_tiny_tokenizer(tmp_path / "tiny")
    world = toybase.write_world_tokenizer(tmp_path / "world")
    assert len(CLIPTokenizer.from_pretrained(tmp_path / "world")) == len(world) > len(tiny)
    plain = [caption(d, c) for d in ("faces", "pets", "pair") for c in contexts()] + ["a background standing"]
    assert world(plain).input_ids == tiny(plain).input_ids  # "round" in "background" is not split out
    longest = 0
    for domain in ("faces", "pets"):
        for identity in identities(domain)[::7]:
            text = toybase.described_caption(identity, Context("red", "painting"))  # the longest scene phrase
            tokens = world.convert_ids_to_tokens(world(text).input_ids)
            described = toybase.describe(identity).split()
            words = [token.removesuffix("</w>") for token in tokens[6 : 6 + len(described)]]
            assert words == described, (
                tokens
            )  # one token per word, right after the class word in every caption
            longest = max(longest, len(tokens))
    assert longest <= toybase.TEXT_LENGTH == world.model_max_length


def test_described_captions_name_each_identity_uniquely():
    from nested.toyworld.world import identities

    for domain in ("faces", "pets"):
        texts = {toybase.describe(identity) for identity in identities(domain)}
        assert len(texts) == len(identities(domain))
    pool = toybase.render_pool(40, seed=0, described_fraction=0.5)
    described = [text for text in pool.captions if " with " in text]
    assert 5 <= len(described) <= 30 and not any(" and a " in text for text in described)


def test_identity_words_before_the_class_word_fit_the_prompt_length(tmp_path):
    """Every identity, named before its class word, fits TEXT_LENGTH whole: the class word comes right after
    the last identity word, and the caption differs from the class-word caption only by those words."""
    from nested.toyworld.world import identities

    tokenizer = toybase.write_world_tokenizer(tmp_path / "tokenizer")
    context = Context("beach", "painting")
    for domain, class_word in (("faces", "person"), ("pets", "pet")):
        everyone = identities(domain)
        texts = [toybase.described_caption_before(identity, context) for identity in everyone]
        assert len(set(texts)) == len(everyone)
        lengths = [len(ids) for ids in tokenizer(texts).input_ids]
        assert max(lengths) <= toybase.TEXT_LENGTH
        words = texts[0].split()
        assert words[words.index(class_word) - 1] == toybase.describe_before(everyone[0]).split()[-1]
        assert texts[0].replace(toybase.describe_before(everyone[0]) + " ", "") == caption(domain, context)


def test_a_contextual_text_model_trains_with_the_unet_and_ends_frozen_on_its_average(tmp_path):
    """With layers, the text model is causal (a word's feature depends on the words before it, not after),
    trains with the UNet, and ends frozen with its EMA weights; the rows of its start are kept."""
    from transformers import CLIPTextModel

    tokenizer = toybase.write_world_tokenizer(tmp_path / "tokenizer")
    start = toybase.build_text_encoder(tokenizer, seed=0)
    start.save_pretrained(tmp_path / "start")
    text = toybase.build_text_encoder(
        tokenizer, seed=1, start=CLIPTextModel.from_pretrained(tmp_path / "start"), layers=2
    )
    assert text.config.num_hidden_layers == 2 and all(p.requires_grad for p in text.parameters())
    embeddings = text.get_input_embeddings().weight
    assert torch.equal(embeddings, start.get_input_embeddings().weight)
    ids = tokenizer(["a photo of a blonde person at the beach", "a photo of a grey person in the city"],
                    padding="max_length", max_length=toybase.TEXT_LENGTH, return_tensors="pt").input_ids  # fmt: skip
    with torch.no_grad():
        features = text(ids).last_hidden_state
    blonde_at = ids[0].tolist().index(tokenizer.convert_tokens_to_ids("blonde"))
    assert torch.allclose(features[0, :blonde_at], features[1, :blonde_at])  # causal: the same words before
    assert not torch.allclose(features[0, blonde_at + 1], features[1, blonde_at + 1])  # "person" reads it

    pool = toybase.render_pool(16, seed=0, described_fraction=1.0, describe_before=True)
    latents = torch.randn(16, 4, 16, 16)
    unet = toybase.build_unet(text.config.hidden_size)
    before = {name: p.detach().clone() for name, p in text.named_parameters()}
    ema = toybase.train_unet(
        unet, latents, pool.captions, tokenizer, text, steps=3, batch_size=4, ema_decay=0.5
    )
    assert isinstance(ema, type(unet)) and not text.training
    assert not any(p.requires_grad for p in text.parameters())
    moved = [name for name, p in text.named_parameters() if not torch.equal(p, before[name])]
    assert any(".layers.0." in name for name in moved) and any("token_embedding" in name for name in moved)


def test_transplant_training_shows_the_unet_the_class_caption_with_the_named_class_word(tmp_path):
    """With transplant_fraction 1, every identity-naming caption reaches the UNet as its class-word caption
    whose class word's feature comes from the naming caption."""
    tokenizer = toybase.write_world_tokenizer(tmp_path / "tokenizer")
    text = toybase.build_text_encoder(tokenizer, seed=0, layers=2)
    pool = toybase.render_pool(8, seed=0, pair_fraction=0.0, described_fraction=1.0, describe_before=True)
    assert all(c != p for c, p in zip(pool.captions, pool.class_captions, strict=True))
    unet = toybase.build_unet(text.config.hidden_size)
    seen = []
    unet.register_forward_pre_hook(lambda module, args: seen.append(args[2].detach().clone()))
    with pytest.raises(ValueError, match="transplant_fraction and value_transplant_fraction need"):
        toybase.train_unet(unet, torch.randn(8, 4, 16, 16), pool.captions, tokenizer,
                           toybase.build_text_encoder(tokenizer, seed=0), steps=1, transplant_fraction=0.5)  # fmt: skip
    seen.clear()
    toybase.train_unet(
        unet, torch.randn(8, 4, 16, 16), pool.captions, tokenizer, text, steps=1, batch_size=8,
        caption_dropout=0.0, class_captions=pool.class_captions, transplant_fraction=1.0, lr=0.0,
    )  # fmt: skip
    # The batch draws captions at random: each condition must be some caption's transplant.
    ids = {name: tokenizer(captions, padding="max_length", max_length=toybase.TEXT_LENGTH, return_tensors="pt")
           .input_ids for name, captions in (("named", pool.captions), ("class", pool.class_captions))}  # fmt: skip
    with torch.no_grad():
        class_word_ids = torch.tensor(tokenizer.convert_tokens_to_ids(["person</w>", "pet</w>"]))
        expected = toybase.transplant_class_word(
            text(ids["class"])[0], text(ids["named"])[0], ids["class"], ids["named"], class_word_ids
        )
    for condition in seen[0]:
        assert min((condition - candidate).abs().max().item() for candidate in expected) < 1e-5


def test_value_transplant_training_keeps_the_class_captions_keys_and_moves_the_class_words_value(tmp_path):
    """With value_transplant_fraction 1, every identity-naming caption reaches the UNet's keys as its class-word
    caption and its values as that caption with the named class word's feature; the UNet ends with its own
    attention processors."""
    tokenizer = toybase.write_world_tokenizer(tmp_path / "tokenizer")
    text = toybase.build_text_encoder(tokenizer, seed=0, layers=2)
    pool = toybase.render_pool(8, seed=0, pair_fraction=0.0, described_fraction=1.0, describe_before=True)
    unet = toybase.build_unet(text.config.hidden_size)
    processors = unet.attn_processors
    seen = []
    unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(
            (args[2].detach().clone(), kwargs["cross_attention_kwargs"])
        ),
        with_kwargs=True,
    )
    with pytest.raises(ValueError, match="sum to 1.5"):
        toybase.train_unet(unet, torch.randn(8, 4, 16, 16), pool.captions, tokenizer, text, steps=1,
                           class_captions=pool.class_captions, transplant_fraction=0.5,
                           value_transplant_fraction=1.0)  # fmt: skip
    toybase.train_unet(
        unet, torch.randn(8, 4, 16, 16), pool.captions, tokenizer, text, steps=1, batch_size=8,
        caption_dropout=0.0, class_captions=pool.class_captions, value_transplant_fraction=1.0, lr=0.0,
    )  # fmt: skip
    assert unet.attn_processors == processors
    ids = {name: tokenizer(captions, padding="max_length", max_length=toybase.TEXT_LENGTH, return_tensors="pt")
           .input_ids for name, captions in (("named", pool.captions), ("class", pool.class_captions))}  # fmt: skip
    with torch.no_grad():
        class_word_ids = torch.tensor(tokenizer.convert_tokens_to_ids(["person</w>", "pet</w>"]))
        plain = text(ids["class"])[0]
        expected = toybase.transplant_class_word(
            plain, text(ids["named"])[0], ids["class"], ids["named"], class_word_ids
        )
    keys, extra = seen[0]
    for key, value in zip(keys, extra["value_states"], strict=True):
        matches = [(key - k).abs().max() < 1e-5 and (value - v).abs().max() < 1e-5
                   for k, v in zip(plain, expected, strict=True)]  # fmt: skip
        assert any(matches)


def test_value_transplant_processor_is_the_default_without_values_and_a_naive_attention_with_them():
    """Same values as keys: diffusers' output bit for bit. Other values: softmax(q k^T / sqrt(d)) v, heads
    split, through the output projection."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(96, cross_attention_dim=64, heads=6, dim_head=16).eval()
    hidden, text, values = torch.randn(2, 10, 96), torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    processor = toybase.ValueTransplantProcessor()
    with torch.no_grad():
        default = attn(hidden, text)
        attn.set_processor(processor)
        assert torch.equal(attn(hidden, text, value_states=text), default)
        assert torch.equal(attn(hidden, text), default)
        out = attn(hidden, text, value_states=values)
        q, k, v = (x.double().unflatten(-1, (6, 16)).transpose(1, 2)
                   for x in (attn.to_q(hidden), attn.to_k(text), attn.to_v(values)))  # fmt: skip
        weights = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1)
        naive = attn.to_out[0]((weights @ v).transpose(1, 2).flatten(2).float())
    assert torch.allclose(out, naive, atol=1e-5)
    assert not torch.allclose(out, default, atol=1e-3)


def test_text_encoder_grown_from_a_start_keeps_its_features(tmp_path):
    from transformers import CLIPTextModel

    from nested.testing import tiny_text_config, write_tiny_tokenizer

    tiny = write_tiny_tokenizer(tmp_path / "tiny")
    config = tiny_text_config(tiny, projection_dim=64, hidden_size=64, heads=4)
    config.num_hidden_layers, config.max_position_embeddings = 0, 20  # the layout of the v2 base model
    torch.manual_seed(5)
    old = CLIPTextModel(config).eval()
    world = toybase.write_world_tokenizer(tmp_path / "world")
    grown = toybase.build_text_encoder(world, seed=1, start=old)
    assert (
        grown.config.vocab_size == len(world) and grown.config.max_position_embeddings == toybase.TEXT_LENGTH
    )
    ids = tiny(
        ["a photo of a pet at night"], padding="max_length", max_length=20, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        assert torch.equal(old(ids).last_hidden_state, grown(ids).last_hidden_state)
    with pytest.raises(ValueError, match="does not fit"):
        toybase.build_text_encoder(tiny, seed=1, start=grown)


def test_check_base_scores_described_and_plain_prompts_and_results_tables_them(tmp_path):
    """check_base.py end to end on the committed UNet with a per-token text model (a few images): every
    domain gets chance, plain and words scores that are fractions, the mean is the mean of the attributes,
    and results.py tables them."""
    out = tmp_path / "base-words.json"
    base = _per_token_base(tmp_path / "base")
    argv = ["--base", str(base), "--images", "4", "--steps", "2", "--batch-size", "4", "--channel-images", "4"]  # fmt: skip
    assert _script("check_base").main([*argv, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report) == {"faces", "pets"}
    for domain, kinds in report.items():
        assert set(kinds) == {"chance", "plain", "words", "class word", "class word value", "channel"}
        # Per-token text features: the class word's feature is the same in both prompts, so both
        # transplants draw the class-word prompt's images.
        assert kinds["class word"] == kinds["class word value"] == kinds["plain"]
        channel = kinds.pop("channel")
        assert channel["plain"]["mean"]["identity words"] == 0 < channel["words"]["mean"]["identity words"]
        for scores in kinds.values():
            attributes = [v for k, v in scores.items() if k.startswith("attr_")]
            assert len(attributes) == 5 and all(0 <= v <= 1 for v in scores.values())
            assert scores["attributes"] == pytest.approx(sum(attributes) / 5)
        assert kinds["chance"]["exact"] == pytest.approx(1 / (1440 if domain == "faces" else 432))
    rows = _script("results").words_table(tmp_path)
    assert sum(row.startswith("| identity in words |") for row in rows) == 2
    assert sum(row.startswith("| class word's feature from the words |") for row in rows) == 2
    assert sum(row.startswith("| class word's value from the words |") for row in rows) == 2
    assert rows[0].startswith("| faces | skin | hair colour |")
    channel_rows = _script("results").channel_table(tmp_path)
    assert (
        channel_rows[0]
        == "| domain | prompt | start | class word | identity words | other words | end and padding |"
    )
    assert len(channel_rows) == 2 + 4
    # On the committed contextual text model the class word's value does depend on the words.
    committed = tmp_path / "committed.json"
    assert _script("check_base").main(["--base", str(TOY_SD), *argv[2:], "--out", str(committed)]) == 0
    for kinds in json.loads(committed.read_text()).values():
        assert kinds["class word value"] != kinds["plain"]


def test_transplanted_class_word_features_come_from_the_described_prompt(tmp_path):
    """check_base's "class word" row: the class-word prompt's features with the class word's feature from
    the described prompt. Per-token features (no layers, the words after the class word, at its position)
    carry nothing of the words there: unchanged. A contextual model changes the class word's feature only."""
    from types import SimpleNamespace

    from nested.toyworld.world import identities

    check_base = _script("check_base")
    tokenizer = toybase.write_world_tokenizer(tmp_path / "tokenizer")
    people = identities("faces")[:3] + identities("pets")[:1]
    context = Context("snow", "sketch")
    plain = [caption(p.DOMAIN, context) for p in people]
    described = {
        0: [toybase.described_caption(p, context) for p in people],
        2: [toybase.described_caption_before(p, context) for p in people],
    }
    ids = tokenizer(
        plain, padding="max_length", max_length=toybase.TEXT_LENGTH, return_tensors="pt"
    ).input_ids
    class_at = [row.index(tokenizer.convert_tokens_to_ids(f"{p.DOMAIN == 'faces' and 'person' or 'pet'}</w>"))
                for row, p in zip(ids.tolist(), people, strict=True)]  # fmt: skip
    for layers in (0, 2):
        text = toybase.build_text_encoder(tokenizer, seed=0, layers=layers).eval()
        pipe = SimpleNamespace(tokenizer=tokenizer, text_encoder=text)
        plain_features, features = check_base.transplanted(pipe, plain, described[layers])
        with torch.no_grad():
            own = text(ids)[0]
        assert torch.equal(plain_features, own)
        changed = (features - own).abs().amax(-1) > 1e-6  # (B, T)
        if layers == 0:
            assert not changed.any()
        else:
            assert changed.sum(1).tolist() == [1] * len(people)
            assert [row.nonzero().item() for row in changed] == class_at


def test_committed_base_model_draws_an_identity_it_is_told_in_words():
    """The pathway an adapter drives: told a HELD-OUT identity in words, the base model draws it (the judges'
    mean attribute accuracy >= 20 points over the same prompts with the class word only, where identity is
    random). Measured at 96 images per domain: faces 66.5 vs 23.1 %, pets 68.8 vs 31.2 %."""
    from argparse import Namespace

    from diffusers import StableDiffusionPipeline

    from nested.toyworld.judges import ToyJudges

    check_base = _script("check_base")
    judges = ToyJudges.from_pretrained(REPO / "data" / "toyworld" / "judges")
    pipe = StableDiffusionPipeline.from_pretrained(TOY_SD, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    args = Namespace(base=TOY_SD, steps=15, guidance=5.0, batch_size=16, seed=0)
    for domain in ("faces", "pets"):
        plain, words = (
            check_base.score(pipe, judges, domain, 16, kind=kind, args=args) for kind in ("plain", "words")
        )
        assert words["attributes"] >= plain["attributes"] + 0.2, (domain, plain, words)


def test_results_finds_token_weight_sweeps_and_skips_their_logs(tmp_path):
    folder = tmp_path / "eval-faces-nested-tw3"
    folder.mkdir()
    points = [{"variant": "base", "strength": None}, {"variant": "adapter", "strength": 1.0}]
    (folder / "summary.json").write_text(json.dumps({"points": points}))
    (tmp_path / "eval-faces-nested-tw3.log").write_text("a log, not a sweep\n")
    sweeps = _script("results").weighted_sweeps("faces", tmp_path)
    assert sweeps == {"nested, token weight 3": [points[1]]}


def test_train_base_records_the_stages_of_the_unet_it_started_from(tmp_path):
    """A warm start's training.json lists every earlier stage (from either record format), then its own."""
    train_base = _script("train_base")
    times = {"unet": 1.26}
    fresh = train_base.training_record(train_base._parser().parse_args(["--out", "x"]), times)
    assert fresh == {"stages": [{"recipe": fresh["stages"][0]["recipe"], "seconds": {"unet": 1.3}}]}
    assert fresh["stages"][0]["recipe"]["unet"] is None
    staged, single = tmp_path / "staged", tmp_path / "single"
    for folder in (staged, single):
        (folder / "unet").mkdir(parents=True)
    (staged / "training.json").write_text(json.dumps({"how": "two legs", "stages": [{"recipe": {"a": 1}},
                                                                                      {"recipe": {"b": 2}}]}))  # fmt: skip
    (single / "training.json").write_text(json.dumps({"recipe": {"c": 3}, "seconds": {"unet": 9}}))
    args = train_base._parser().parse_args(["--out", "y", "--unet", str(staged / "unet")])
    record = train_base.training_record(args, times)
    assert record["how"] == "two legs"
    assert [stage["recipe"].get("unet") for stage in record["stages"]] == [None, None, str(staged / "unet")]
    args = train_base._parser().parse_args(["--out", "y", "--unet", str(single / "unet")])
    record = train_base.training_record(args, times)
    assert set(record) == {"stages"} and record["stages"][0] == {"recipe": {"c": 3}, "seconds": {"unet": 9}}
    assert record["stages"][1]["recipe"]["out"] == "y"


def test_probe_encoder_reads_colours_from_the_committed_encoder_above_chance(tmp_path):
    """probe_encoder.py end to end on a few identities: every feature set scores every attribute, and the
    committed encoder's colours (the broadest regions) are read far above chance on held-out faces."""
    out = tmp_path / "probe.json"
    argv = ["--train-every", "8", "--held-out", "48", "--steps", "100", "--out", str(out)]
    assert _script("probe_encoder").main(argv) == 0
    report = json.loads(out.read_text())
    assert set(report) == {"chance", "mean of the tokens", "all patch tokens"}
    for scores in report.values():
        assert list(scores) == ["skin", "hair_colour", "hair_style", "eye_colour", "face_shape"]
        assert all(0 <= v <= 1 for v in scores.values())
    for features in ("mean of the tokens", "all patch tokens"):
        assert report[features]["skin"] >= report["chance"]["skin"] + 0.4


def test_loss_gap_moves_only_the_named_attributes_and_is_flat_on_per_token_features(tmp_path):
    """loss_gap.py: a "wrong" identity differs in exactly the listed attributes; with a per-token text model
    the class word's feature never depends on the words, so every row is the plain loss, while the committed
    contextual one moves it; the UNet keeps its own attention processors."""
    from diffusers import StableDiffusionPipeline

    from nested.toyworld.world import identities

    loss_gap = _script("loss_gap")
    person = identities("faces")[7]
    for attributes in loss_gap.WRONG.values():
        changed = loss_gap.wrong(person, attributes)
        differing = {a for a in person.ATTRIBUTES if getattr(changed, a) != getattr(person, a)}
        assert differing == set(attributes)
    for base, flat in ((_per_token_base(tmp_path / "base"), True), (TOY_SD, False)):
        pipe = StableDiffusionPipeline.from_pretrained(
            base, safety_checker=None, requires_safety_checker=False
        )
        processors = {name: type(p) for name, p in pipe.unet.attn_processors.items()}
        report = loss_gap.loss_gap(pipe, toybase.base_describer(base), images=4, bands=2, repeats=1, seed=0)
        assert list(report) == ["0-500", "500-1000"]
        for losses in report.values():
            assert list(losses) == ["plain", "identity", "shapes wrong", "colours wrong"]
            assert (len(set(losses.values())) == 1) == flat and losses["plain"] > 0
        assert {name: type(p) for name, p in pipe.unet.attn_processors.items()} == processors


def test_regress_adapter_fits_the_class_words_feature_and_saves_an_adapter_that_loads(tmp_path, capsys):
    """regress_adapter.py on the committed base (a causal text model): the resampler's fit to the class word's
    feature improves, the saved adapter loads through from_pretrained with the UNet's own value projections
    as its nested ones; on a per-token text model it stops with one line and exit code 2."""
    from diffusers import UNet2DConditionModel

    from nested.adapter import NestedAdapter, cross_attention_layers

    base = TOY_SD  # its text model is contextual
    script = _script("regress_adapter")
    out = tmp_path / "run"
    argv = ["--base", str(base), "--out", str(out), "--steps", "60", "--train-every", "24", "--references", "2",
            "--held-out", "8", "--held-out-references", "1", "--num-tokens", "4", "--width", "32", "--depth", "1"]  # fmt: skip
    assert script.main(argv) == 0
    history = json.loads((out / "regression.json").read_text())["history"]
    assert history[-1]["step"] == 60 and history[-1]["train"] > history[0]["train"]
    adapter = NestedAdapter.from_pretrained(out / "adapters" / "last")
    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    for name, attn in cross_attention_layers(unet).items():
        layer = adapter.layers[name.replace(".", "__")]
        assert torch.equal(layer.to_v.weight, attn.to_v.weight) and torch.equal(
            layer.to_k.weight, attn.to_k.weight
        )

    argv[1] = str(_per_token_base(tmp_path / "per-token"))
    assert script.main(argv) == 2
    assert "does not depend on the words naming the identity" in capsys.readouterr().err
    argv[1] = str(tmp_path)
    assert script.main(argv) == 2
    assert "not a diffusers pipeline folder" in capsys.readouterr().err


def test_image_encoder_text_alignment_matches_renders_to_their_descriptions():
    """With text features, train_image_encoder also aligns renders with their identity's description (CLIP
    style): that loss falls; a feature count that does not match the identities is refused."""
    from transformers import CLIPTextModel, CLIPTokenizer

    from nested.toyworld.world import split_identities

    people = split_identities("faces")[0][::60] + split_identities("pets")[0][::20]
    views = toybase.render_views(2, seed=0, people=people)
    text = toybase.identity_text_features(
        CLIPTokenizer.from_pretrained(TOY_SD / "tokenizer"),
        CLIPTextModel.from_pretrained(TOY_SD / "text_encoder"),
        people,
    )
    assert text.shape == (len(people), 64) and len(set(map(tuple, text.tolist()))) == len(people)
    logs: list[dict[str, float]] = []
    toybase.train_image_encoder(
        toybase.build_image_encoder(seed=0), views, steps=40, batch_size=16, lr=2e-3, text_features=text,
        progress=lambda s, entry: logs.append(entry),
    )  # fmt: skip
    assert set(logs[0]) == {"loss", "top1", "text_loss", "text_top1"}
    assert sum(e["text_loss"] for e in logs[-10:]) < sum(e["text_loss"] for e in logs[:10])
    with pytest.raises(ValueError, match="text features for"):
        toybase.train_image_encoder(
            toybase.build_image_encoder(seed=0), views, steps=1, text_features=text[1:]
        )


def test_train_base_trains_only_the_image_encoder_on_a_kept_unet(tmp_path, monkeypatch, capsys):
    """--unet-steps 0 keeps the UNet bit for bit and renders no pool; --encoder-start warm-starts the encoder
    and --encoder-text aligns it; the record keeps the UNet stage's caption style for base_describer."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPVisionModelWithProjection

    train_base = _script("train_base")
    base = tmp_path / "base"
    base.mkdir()
    (base / "unet").symlink_to(TOY_SD / "unet")
    record = {"stages": [{"recipe": {"unet_steps": 100, "describe_before": True}}]}
    (base / "training.json").write_text(json.dumps(record))
    everyone = train_base.split_identities
    monkeypatch.setattr(train_base, "split_identities", lambda domain: (everyone(domain)[0][::100], []))
    monkeypatch.setattr(toybase, "render_pool", None)  # no stage may need it
    trained_on = []
    real_train_image_encoder = toybase.train_image_encoder

    def recording_train_image_encoder(encoder, views, **kwargs):
        trained_on.append(views.shape)
        return real_train_image_encoder(encoder, views, **kwargs)

    monkeypatch.setattr(toybase, "train_image_encoder", recording_train_image_encoder)
    out = tmp_path / "out"
    argv = ["--out", str(out), "--vae", str(TOY_SD / "vae"), "--unet", str(base / "unet"), "--unet-steps", "0",
            "--text-encoder", str(TOY_SD / "text_encoder"), "--text-layers", "2",
            "--encoder-start", str(TOY_SD / "image_encoder"), "--encoder-steps", "3", "--encoder-batch", "4",
            "--encoder-views", "3", "--encoder-text"]  # fmt: skip
    assert train_base.main(argv) == 0
    people = sum(len(everyone(domain)[0][::100]) for domain in ("faces", "pets"))
    assert trained_on == [(people, 3, 3, 64, 64)]  # --encoder-views renders per identity
    kept, trained = (
        UNet2DConditionModel.from_pretrained(TOY_SD / "unet"),
        UNet2DConditionModel.from_pretrained(out / "unet"),
    )
    assert all(
        torch.equal(a, b)
        for a, b in zip(kept.state_dict().values(), trained.state_dict().values(), strict=True)
    )
    start = CLIPVisionModelWithProjection.from_pretrained(TOY_SD / "image_encoder").state_dict()
    encoder = CLIPVisionModelWithProjection.from_pretrained(out / "image_encoder").state_dict()
    assert any(not torch.equal(start[name], encoder[name]) for name in start)
    stages = json.loads((out / "training.json").read_text())["stages"]
    assert len(stages) == 2 and stages[1]["recipe"]["encoder_text"] and "render" not in stages[1]["seconds"]
    assert stages[1]["recipe"]["encoder_views"] == 3
    assert toybase.base_describer(out) is toybase.described_caption_before

    assert (
        train_base.main(["--out", str(tmp_path / "x"), "--unet-steps", "0", "--unet", str(base / "unet")])
        == 2
    )
    assert "pass it with --unet, and the VAE and text model" in capsys.readouterr().err
    narrower = [*argv]
    narrower[1], narrower[narrower.index("--text-layers") + 1] = str(tmp_path / "y"), "1"
    assert train_base.main(narrower) == 2
    assert "has 2 transformer layers; pass --text-layers 2" in capsys.readouterr().err
    assert train_base.main(["--out", str(tmp_path / "x"), "--unet-steps", "-1"]) == 2
    assert "--unet-steps must be >= 0" in capsys.readouterr().err
    assert train_base.main(["--out", str(tmp_path / "x"), "--encoder-views", "1"]) == 2
    assert "--encoder-views must be >= 2" in capsys.readouterr().err


def test_train_base_trains_the_vae_further_from_a_folder(tmp_path, monkeypatch, capsys):
    """--vae-start hands the saved VAE's weights to train_vae (not a fresh one), the result is that VAE moved
    by --vae-steps, and the UNet trains on its latents; --vae (reuse as it is) and --vae-start conflict."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    train_base = _script("train_base")
    started = {}
    real_train_vae = toybase.train_vae

    def recording_train_vae(vae, pool, **kwargs):
        started.update({k: v.clone() for k, v in vae.state_dict().items()})
        return real_train_vae(vae, pool, **kwargs)

    monkeypatch.setattr(toybase, "train_vae", recording_train_vae)
    out = tmp_path / "out"
    argv = ["--out", str(out), "--pool", "24", "--vae-start", str(TOY_SD / "vae"), "--vae-steps", "2",
            "--vae-batch", "2", "--unet", str(TOY_SD / "unet"), "--unet-steps", "1", "--unet-batch", "2",
            "--text-encoder", str(TOY_SD / "text_encoder"), "--text-layers", "2", "--describe-before",
            "--image-encoder", str(TOY_SD / "image_encoder"), "--threads", "2"]  # fmt: skip
    assert train_base.main(argv) == 0
    committed = AutoencoderKL.from_pretrained(TOY_SD / "vae").state_dict()
    trained = AutoencoderKL.from_pretrained(out / "vae").state_dict()
    assert started.keys() == committed.keys()
    assert all(torch.equal(started[k], committed[k]) for k in committed)
    moved = [(trained[k].float() - committed[k].float()).abs().max().item() for k in committed]
    assert 0 < max(moved) < 0.05  # two small steps from the committed weights, not a fresh VAE
    start_unet = UNet2DConditionModel.from_pretrained(TOY_SD / "unet").state_dict()
    trained_unet = UNet2DConditionModel.from_pretrained(out / "unet").state_dict()
    assert any(not torch.equal(start_unet[k], trained_unet[k]) for k in start_unet)  # trained on the latents
    stages = json.loads((out / "training.json").read_text())["stages"]
    assert stages[-1]["recipe"]["vae_start"] == str(TOY_SD / "vae") and stages[-1]["recipe"]["vae_steps"] == 2

    conflicting = [
        "--out",
        str(tmp_path / "x"),
        "--vae",
        str(TOY_SD / "vae"),
        "--vae-start",
        str(TOY_SD / "vae"),
    ]
    assert train_base.main(conflicting) == 2
    assert "--vae reuses a VAE as it is; --vae-start trains one further" in capsys.readouterr().err
