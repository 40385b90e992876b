"""Training: the LightningModule on tiny SD/SDXL backbones, checkpoints, resume, broken data, the demo."""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import json
import shutil
import tarfile
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch._dynamo.utils import counters

import nested.adapter
from nested.adapter import NestedAdapter, check_adapter_files
from nested.callbacks.export import AdapterExport
from nested.cli.main import main
from nested.data import DomainSpec, NestedDataModule
from nested.encoder import EncoderSpec
from nested.errors import AdapterError, ConfigError, MissingFileError
from nested.training.module import ConditioningDropout, NestedAttentionModule

REPO = Path(__file__).resolve().parents[1]
DEMO_FACES = REPO / "data" / "demo" / "faces"


def make_module(pipeline_path: Path, **kwargs) -> NestedAttentionModule:
    spec = EncoderSpec(
        backbone=str(pipeline_path / "image_encoder"), num_tokens=4, width=32, depth=1, heads=2
    )
    kwargs.setdefault("subjects", {"<person>": "person"})
    kwargs.setdefault("optimizer", adamw(1e-3))
    return NestedAttentionModule(str(pipeline_path), spec, **kwargs)


def adamw(lr: float) -> dict:
    """The module's ``optimizer`` argument for AdamW at ``lr``, as a config's ``optimizer:`` section gives it."""
    return {"class_path": "torch.optim.AdamW", "init_args": {"lr": lr}}


def make_data(urls, **kwargs) -> NestedDataModule:
    domain = DomainSpec("faces", urls, "<person>")
    settings = dict(
        resolution=64, reference_size=32, batch_size=2, num_workers=0, epoch_samples=8, shuffle_buffer=8
    )
    return NestedDataModule([domain], **{**settings, **kwargs})


def make_trainer(root: Path, max_steps: int, **kwargs) -> L.Trainer:
    settings = dict(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        default_root_dir=str(root),
        logger=CSVLogger(str(root), name="logs"),
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[AdapterExport()],
    )
    return L.Trainer(**{**settings, **kwargs})


def frozen_state(module: NestedAttentionModule) -> dict[str, torch.Tensor]:
    backbone = module.backbone
    parts = {"unet": backbone.unet, "vae": backbone.vae, "image": module.adapter.encoder.backbone}
    parts.update({f"text{i}": encoder for i, encoder in enumerate(backbone.text_encoders)})
    return {f"{name}.{k}": v.clone() for name, part in parts.items() for k, v in part.state_dict().items()}


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_only_the_adapter_trains_and_the_checkpoint_holds_no_frozen_weight(
    kind, tiny_sd_path, tiny_sdxl_path, tmp_path
):
    path = {"sd": tiny_sd_path, "sdxl": tiny_sdxl_path}[kind]
    module = make_module(path)
    module.configure_model()
    before_frozen = frozen_state(module)
    before_adapter = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = make_trainer(tmp_path, max_steps=3)
    trainer.fit(module, datamodule=make_data(str(DEMO_FACES / "shards.json")))

    assert all(torch.equal(v, frozen_state(module)[k]) for k, v in before_frozen.items()), (
        "a frozen weight changed"
    )
    changed = [k for k, v in module.state_dict().items() if not torch.equal(v, before_adapter[k])]
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("adapter.") for n in trainable)
    assert {k for k in changed} == trainable - set(), "every trainable tensor moves, nothing else does"

    trainer.save_checkpoint(tmp_path / "model.ckpt")
    checkpoint = torch.load(tmp_path / "model.ckpt", weights_only=False)
    tensors = [v for v in checkpoint["state_dict"].values()]
    for state in checkpoint["optimizer_states"][0]["state"].values():
        tensors += [v for v in state.values() if torch.is_tensor(v) and v.ndim > 0]
    stored = sum(t.numel() for t in tensors)
    trainable_count = sum(p.numel() for p in module.parameters() if p.requires_grad)
    expected = 3 * trainable_count + sum(
        v.numel() for k, v in module.state_dict().items() if "token_embeddings" in k
    )
    assert abs(stored - expected) <= 0.1 * expected, (stored, expected)
    unet_count = sum(p.numel() for p in module.backbone.unet.parameters())
    assert stored < unet_count, "the checkpoint must not contain the frozen UNet"
    assert (
        NestedAdapter.from_pretrained(tmp_path / "adapters" / "last").config.layers
        == module.adapter.config.layers
    )


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_a_trained_placeholder_embedding_is_saved_and_read_back_at_inference(
    kind, tiny_sd_path, tiny_sdxl_path, tmp_path
):
    """model.train_token_embeddings: the placeholder rows move (one per text encoder), the frozen text
    encoders do not, and a fresh backbone with the exported adapter encodes prompts exactly as training did."""
    from nested.backbone import DiffusionBackbone

    path = {"sd": tiny_sd_path, "sdxl": tiny_sdxl_path}[kind]
    module = make_module(path, train_token_embeddings=True)
    module.configure_model()
    before_frozen = frozen_state(module)
    before = {k: v.detach().clone() for k, v in module.adapter.token_embeddings.items()}
    assert len(before) == len(module.backbone.text_encoders)
    make_trainer(tmp_path, max_steps=3).fit(module, datamodule=make_data(str(DEMO_FACES / "shards.json")))

    assert all(torch.equal(v, frozen_state(module)[k]) for k, v in before_frozen.items()), (
        "a frozen weight changed"
    )
    for key, vector in module.adapter.token_embeddings.items():
        assert vector.requires_grad and not torch.equal(vector.detach(), before[key]), key

    prompts = ["a photo of a <person> at the beach", "a photo of a person at the beach"]
    with torch.no_grad():
        trained = module.backbone.encode_prompts(prompts)
        fresh = DiffusionBackbone.from_pretrained(str(path))
        NestedAdapter.from_pretrained(tmp_path / "adapters" / "last").add_tokens(
            fresh.tokenizers, fresh.text_encoders
        )
        loaded = fresh.encode_prompts(prompts)
    torch.testing.assert_close(loaded.prompt_embeds, trained.prompt_embeds)
    if kind == "sdxl":
        torch.testing.assert_close(loaded.pooled_prompt_embeds, trained.pooled_prompt_embeds)
    # The placeholder no longer reads as its class word; the class word itself is unchanged.
    assert not torch.allclose(trained.prompt_embeds[0], trained.prompt_embeds[1])
    with torch.no_grad():
        plain = DiffusionBackbone.from_pretrained(str(path)).encode_prompts(prompts[1:])
    torch.testing.assert_close(trained.prompt_embeds[1:], plain.prompt_embeds)


def test_a_checkpoint_resumes_only_with_the_embedding_setting_it_was_trained_with(tiny_sd_path):
    module = make_module(tiny_sd_path, train_token_embeddings=True)
    module.configure_model()
    state = module.state_dict()
    with pytest.raises(ValueError, match="train_token_embeddings=False.*model.train_token_embeddings: false"):
        module.on_load_checkpoint({"hyper_parameters": {}, "state_dict": state})  # from before the option
    module.on_load_checkpoint({"hyper_parameters": dict(module.hparams), "state_dict": state})


def test_a_checkpoint_of_another_encoder_function_is_refused_and_moved_models_warn(tiny_sd_path, tmp_path):
    module = make_module(tiny_sd_path)
    module.configure_model()
    state = module.state_dict()
    recorded = dict(module.hparams)
    for option, value in (("heads", 1), ("feature_layer", -2)):  # the same tensors, another function
        encoder = {**recorded["encoder"], option: value}
        with pytest.raises(ValueError, match=rf"trained with another encoder: encoder.{option}: {value} -> "):
            module.on_load_checkpoint(
                {"hyper_parameters": {**recorded, "encoder": encoder}, "state_dict": state}
            )
    elsewhere = str(tmp_path / "tiny-sd")
    moved = {
        **recorded,
        "base_model": elsewhere,
        "encoder": {**recorded["encoder"], "backbone": f"{elsewhere}/image_encoder"},
    }
    with pytest.warns(
        UserWarning, match=r"from elsewhere: base_model: .*encoder.backbone: .*if they are not"
    ):
        module.on_load_checkpoint({"hyper_parameters": moved, "state_dict": state})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module.on_load_checkpoint({"hyper_parameters": recorded, "state_dict": state})


def test_a_training_token_weight_reweights_the_subject_and_is_saved_in_the_adapter(tiny_sd_path, tmp_path):
    data = make_data(str(DEMO_FACES / "shards.json"))
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    modules = [make_module(tiny_sd_path, token_weight=weight) for weight in (1.0, 3.0)]
    for module in modules:
        module.configure_model()
    modules[1].adapter.load_state_dict(modules[0].adapter.state_dict())  # the same adapter, two weights
    losses = [
        m.diffusion_loss(batch, torch.Generator().manual_seed(0), apply_dropout=False)["loss"].item()
        for m in modules
    ]
    assert abs(losses[0] - losses[1]) > 1e-7, "the token weight must act during training"
    modules[1].adapter.save_pretrained(tmp_path / "adapter")
    assert NestedAdapter.from_pretrained(tmp_path / "adapter").config.token_weight == 3.0
    with pytest.raises(ValueError, match="token_weight=2.0 .*decoupled"):
        make_module(tiny_sd_path, token_weight=2.0, injection="decoupled")
    with pytest.raises(ConfigError, match="model.token_weight must be > 0"):
        make_module(tiny_sd_path, token_weight=0.0)
    with pytest.raises(ConfigError, match="model.subjects must name at least one token"):
        make_module(tiny_sd_path, subjects={})


def test_training_the_embedding_of_a_vocabulary_word_is_refused(tiny_sd_path):
    module = make_module(tiny_sd_path, subjects={"person": "person"}, train_token_embeddings=True)
    with pytest.raises(ValueError, match="no placeholder embedding to train.*<person>"):
        module.configure_model()


def test_resume_continues_at_the_right_step_with_the_same_optimizer_state(tiny_sd_path, tmp_path):
    data = str(DEMO_FACES / "shards.json")
    first = make_module(tiny_sd_path)
    trainer = make_trainer(tmp_path / "a", max_steps=2)
    trainer.fit(first, datamodule=make_data(data))
    ckpt = tmp_path / "a" / "step2.ckpt"
    trainer.save_checkpoint(ckpt)
    saved_optimizer = copy.deepcopy(trainer.optimizers[0].state_dict())

    resumed = make_module(tiny_sd_path)
    checks = {}

    class Inspect(L.Callback):
        def on_train_start(self, trainer, pl_module):
            checks["step"] = trainer.global_step
            checks["optimizer"] = copy.deepcopy(trainer.optimizers[0].state_dict())
            checks["weights"] = {k: v.clone() for k, v in pl_module.state_dict().items()}

    trainer2 = make_trainer(tmp_path / "b", max_steps=3, callbacks=[Inspect()])
    trainer2.fit(resumed, datamodule=make_data(data), ckpt_path=str(ckpt))
    assert checks["step"] == 2 and trainer2.global_step == 3
    for key, value in saved_optimizer["state"].items():
        for name, tensor in value.items():
            assert torch.equal(
                torch.as_tensor(tensor), torch.as_tensor(checks["optimizer"]["state"][key][name])
            )
    assert all(torch.equal(v, first.state_dict()[k]) for k, v in checks["weights"].items())


def test_checkpoint_of_another_model_is_refused(tiny_sd_path, tiny_sdxl_path, tmp_path):
    sd = make_module(tiny_sd_path)
    trainer = make_trainer(tmp_path, max_steps=1)
    trainer.fit(sd, datamodule=make_data(str(DEMO_FACES / "shards.json")))
    trainer.save_checkpoint(tmp_path / "sd.ckpt")
    with pytest.raises(
        ValueError, match="cannot resume from the checkpoint .*sd.ckpt: its adapter does not fit"
    ):
        make_trainer(tmp_path / "x", max_steps=2).fit(
            make_module(tiny_sdxl_path),
            datamodule=make_data(str(DEMO_FACES / "shards.json")),
            ckpt_path=str(tmp_path / "sd.ckpt"),
        )


def _demo_samples(count: int) -> list[dict]:
    """Raw samples (bytes per extension) from the committed demo shard."""
    samples: dict[str, dict] = {}
    with tarfile.open(DEMO_FACES / "faces-000000.tar") as tar:
        for member in tar.getmembers():
            key, _, ext = member.name.partition(".")
            samples.setdefault(key, {"__key__": key})[ext] = tar.extractfile(member).read()
    return list(samples.values())[:count]


def _write(path: Path, samples: list[dict]) -> Path:
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for ext, data in sample.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_broken_data_is_skipped_counted_and_logged(tiny_sd_path, tmp_path):
    good = _demo_samples(6)
    corrupt = dict(good[0], __key__="corrupt", jpg=np.random.default_rng(0).bytes(500))
    no_subject = dict(good[1], __key__="nosubject", json=json.dumps({"caption": "a man in a suit"}).encode())
    for sample in (corrupt, no_subject):
        sample.pop("ref.jpg", None)
    a = _write(tmp_path / "a.tar", [*good[:3], corrupt, no_subject])
    b = _write(tmp_path / "b.tar", good[3:])
    with tarfile.open(b) as tar:
        last = tar.getmembers()[-1]
    b.write_bytes(b.read_bytes()[: last.offset_data + last.size // 2])  # truncated inside a file

    module = make_module(tiny_sd_path)
    trainer = make_trainer(tmp_path, max_steps=8)
    # One shard open at a time: the 16 samples of the run read all of a.tar and reach b.tar.
    trainer.fit(module, datamodule=make_data([str(a), str(b)], epoch_samples=16, open_shards=1))
    assert trainer.global_step == 8
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    totals = {k: sum(float(r[k]) for r in rows if r.get(k)) for k in rows[0] if k.startswith("data/skipped_")}
    # The seeded stream reads a.tar twice and b.tar 7 times (b.tar's readable count ends at the break: 2
    # samples; the break is counted at each read, in blocks of 8 positions read ahead of the draws). Each
    # read of a.tar skips the corrupt sample and rewrites 2 captions (nosubject's, and good[0]'s "a woman");
    # the 8 samples drawn from b.tar rewrite good[4]'s 4 times.
    assert totals == {
        "data/skipped_corrupt": 2,
        "data/skipped_broken_shards": 7,
        "data/skipped_no_subject_inserted": 2 * 2 + 4,
        "data/skipped_no_subject_dropped": 0,
        "data/skipped_no_reference": 0,
        "data/skipped_subject_cut": 0,
    }


def test_empty_url_list_fails_with_a_clear_message(tmp_path):
    with pytest.raises(ValueError, match="urls is empty"):
        make_data([])
    data = make_data([str(tmp_path / "missing-{000..001}.tar")])
    with pytest.raises(
        MissingFileError,
        match=r"^data.domains: domain 'faces': 2 of 2 shard files .* do not exist: .*missing-000\.tar",
    ):
        data.setup("fit")


def test_dropout_rates_are_within_tolerance():
    dropout = ConditioningDropout(text=0.1, image=0.2, both=0.05)
    drop_text, drop_image = dropout.sample(20000, torch.Generator().manual_seed(0))
    both = (drop_text & drop_image).float().mean().item()
    assert abs(both - 0.05) < 0.01
    assert abs((drop_text & ~drop_image).float().mean().item() - 0.1) < 0.01
    assert abs((drop_image & ~drop_text).float().mean().item() - 0.2) < 0.01
    with pytest.raises(ValueError, match="sum to <= 1"):
        ConditioningDropout(text=0.6, image=0.5)


@pytest.mark.parametrize(("dropout", "bound"), [({"text": 1.0, "image": 0.0}, 1.0), ({"both": 1.0}, 0.0)])
def test_text_dropout_keeps_the_subject_token_and_both_drops_it(tiny_sd_path, dropout, bound):
    """Text-only dropout leaves the subject token as the whole caption, so the image still conditions every
    sample; dropping both leaves an empty caption and no subject."""
    module = make_module(
        tiny_sd_path, dropout=ConditioningDropout(**{"text": 0.0, "image": 0.0, "both": 0.0, **dropout})
    )
    module.configure_model()
    data = make_data(str(DEMO_FACES / "shards.json"))
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    seen: list[list[str]] = []
    encode = module.backbone.encode_prompts
    module.backbone.encode_prompts = lambda captions: seen.append(list(captions)) or encode(captions)
    out = module.diffusion_loss(batch, torch.Generator().manual_seed(0))
    assert out["subject_fraction"] == bound
    assert seen == [list(batch["subjects"]) if bound else [""] * len(batch["subjects"])]


def test_a_subject_token_past_the_text_window_is_counted_and_warned(tiny_sd_path, caplog):
    """A long caption (a captioning model's paragraph) that names the token past CLIP's 77 tokens binds no
    subject; the contains-the-token caption rule cannot see that, the module can."""
    module = make_module(tiny_sd_path, dropout=ConditioningDropout(text=0.0, image=0.0, both=0.0))
    module.configure_model()
    batch = caption_batch((True, True, False), seed=0)
    batch["captions"][1] = "a photo of " + "a quiet street in the old town, " * 12 + "<person>"
    with caplog.at_level("WARNING", logger="nested.training.module"):
        out = module.diffusion_loss(batch, torch.Generator().manual_seed(0), apply_dropout=False)
        module.validation_step(batch, 0)  # validation's captions are not counted again at every validation
        for step in range(3):
            module.training_step(batch, step)
    assert out["subject_cut"] == 1 and out["subject_fraction"] == pytest.approx(1 / 3)
    warned = [r.getMessage() for r in caplog.records if "past what the text encoders read" in r.getMessage()]
    assert [message.split(" captions")[0] for message in warned] == [
        "data: 1",
        "data: 2",
    ]  # 3rd: not a power of 2
    assert "(CLIP's 77 tokens)" in warned[0]


def test_every_adapter_weight_gets_a_gradient_even_when_all_subjects_dropped(tiny_sd_path):
    module = make_module(tiny_sd_path, dropout=ConditioningDropout(text=0.0, image=1.0, both=0.0))
    module.configure_model()
    data = make_data(str(DEMO_FACES / "shards.json"))
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    out = module.diffusion_loss(batch, torch.Generator().manual_seed(0))
    assert out["subject_fraction"] == 0
    out["loss"].backward()
    missing = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters outside the graph would break DDP: {missing[:3]}"


def test_demo_config_trains_from_the_cli_and_the_loss_falls(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setattr("sys.argv", ["nested"])  # LightningCLI warns when it sees pytest's argv too
    root = tmp_path / "demo"
    main(
        [
            "fit",
            "--config",
            "configs/smoke.yaml",
            f"--trainer.default_root_dir={root}",
            "--trainer.logger=CSVLogger",
            f"--trainer.logger.save_dir={root}",
            "--trainer.log_every_n_steps=1",
            "--trainer.enable_progress_bar=false",
        ]
    )
    metrics = next(root.rglob("metrics.csv"))
    with open(metrics) as handle:
        losses = [float(r["train/loss"]) for r in csv.DictReader(handle) if r.get("train/loss")]
    fifth = len(losses) // 5
    assert len(losses) >= 50
    assert np.mean(losses[-fifth:]) < np.mean(losses[:fifth]), (
        np.mean(losses[:fifth]),
        np.mean(losses[-fifth:]),
    )
    adapter = NestedAdapter.from_pretrained(root / "adapters" / "last")
    assert adapter.config.token == "<person>" and adapter.config.domain == "faces"
    assert (root / "adapters" / "step=50").is_dir()


def test_gradient_checkpointing_keeps_the_subjects_bound_through_backward(tiny_sdxl_path):
    module = make_module(tiny_sdxl_path)
    module.configure_model()
    data = make_data(str(DEMO_FACES / "shards.json"))
    data.setup("fit")
    batch = data.on_before_batch_transfer(next(iter(data.train_dataloader())), 0)
    unet, grads = module.backbone.unet, []
    for enabled in (False, True):
        unet.enable_gradient_checkpointing() if enabled else unet.disable_gradient_checkpointing()
        module.zero_grad(set_to_none=True)
        loss = module.diffusion_loss(batch, torch.Generator().manual_seed(0), apply_dropout=False)["loss"]
        loss.backward()  # re-runs the UNet blocks when checkpointing: the subject must still be bound
        module.on_after_backward()
        assert not module.adapter._bindings
        grads.append({n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None})
    assert grads[0] and grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad)


def test_init_from_base_starts_every_nested_projection_as_the_layers_own(tiny_sd_path):
    """model.init_from_base copies each cross-attention layer's text projections into its nested ones; the
    adapter is otherwise the same, and a too-narrow encoder is refused with the setting to change."""
    from diffusers import UNet2DConditionModel

    from nested.adapter import cross_attention_layers

    width = UNet2DConditionModel.load_config(tiny_sd_path / "unet")["cross_attention_dim"]
    spec = EncoderSpec(backbone=str(tiny_sd_path / "image_encoder"), num_tokens=4, width=16, depth=1, heads=2,
                       output_dim=width)  # fmt: skip
    module = NestedAttentionModule(
        str(tiny_sd_path), spec, subjects={"<person>": "person"}, init_from_base=True
    )
    module.configure_model()
    layers = cross_attention_layers(module.frozen.unet)
    assert len(layers) == len(module.adapter.layers) > 0
    for name, attn in layers.items():
        nested = module.adapter.layers[name.replace(".", "__")]
        assert torch.equal(nested.to_k.weight, attn.to_k.weight) and torch.equal(
            nested.to_v.weight, attn.to_v.weight
        )
    narrow = NestedAttentionModule(str(tiny_sd_path), dataclasses.replace(spec, output_dim=None),
                                   subjects={"<person>": "person"}, init_from_base=True)  # fmt: skip
    with pytest.raises(ConfigError, match=f"model.encoder.output_dim: {width}"):
        narrow.configure_model()


def test_init_adapter_starts_training_from_an_exported_adapters_weights(
    tiny_sd_path, tiny_sdxl_path, tiny_adapter, tmp_path
):
    """model.init_adapter copies a saved adapter's resampler and nested projections, and its trained token
    embeddings of the tokens both have; an adapter of another architecture or encoder size is refused naming
    the tensor, and other training settings are named in a warning."""
    from safetensors.torch import load_file, save_file

    spec = EncoderSpec(backbone=str(tiny_sd_path / "image_encoder"), num_tokens=4, width=32, depth=1, heads=2)
    saved = load_file(tiny_adapter / "adapter.safetensors")
    module = NestedAttentionModule(
        str(tiny_sd_path), spec, subjects={"<dog>": "dog"}, init_adapter=str(tiny_adapter)
    )
    module.configure_model()
    ours = module.adapter.adapter_state_dict()
    copied = [name for name in saved if not name.startswith("token_embeddings.")]
    assert len(copied) > 4 and all(torch.equal(ours[name], saved[name]) for name in copied)
    assert module.adapter.config.token == "<dog>"  # this run's own token and options stay
    assert all(p.requires_grad for p in module.adapter.trainable_parameters())
    fresh = NestedAttentionModule(str(tiny_sd_path), spec, subjects={"<dog>": "dog"})
    fresh.configure_model()
    assert not torch.equal(fresh.adapter.adapter_state_dict()[copied[0]], saved[copied[0]])

    wider = NestedAttentionModule(str(tiny_sd_path), dataclasses.replace(spec, num_tokens=8),
                                  subjects={"<dog>": "dog"}, init_adapter=str(tiny_adapter))  # fmt: skip
    with pytest.raises(AdapterError, match=r"cannot start this training: it has resampler.latents \[1, 4, 32\], "
                       r"this adapter's is \[1, 8, 32\] \(it was trained on .*\)\. Start from"):  # fmt: skip
        wider.configure_model()
    other_base = NestedAttentionModule(str(tiny_sdxl_path), spec, subjects={"<dog>": "dog"},
                                       init_adapter=str(tiny_adapter))  # fmt: skip
    with pytest.raises(AdapterError, match=r"cannot start this training: it (has|has no) layers\."):
        other_base.configure_model()
    with pytest.raises(ConfigError, match="set one of them"):
        NestedAttentionModule(str(tiny_sd_path), spec, init_from_base=True, init_adapter=str(tiny_adapter))

    # A trained <person> embedding: the run that learns <person> starts from it, in its text encoder too.
    trained = shutil.copytree(tiny_adapter, tmp_path / "trained")
    (key,) = [name for name in saved if name.startswith("token_embeddings.")]
    save_file({**saved, key: saved[key] + 0.5}, trained / "adapter.safetensors", metadata={"format": "pt"})
    person = NestedAttentionModule(str(tiny_sd_path), spec, subjects={"<person>": "person"},
                                   injection="decoupled", init_adapter=f"{trained}")  # fmt: skip
    with pytest.warns(
        UserWarning, match=r"was trained with injection 'nested' \(this run: 'decoupled'\): its weights"
    ):
        person.configure_model()
    assert torch.equal(person.adapter.adapter_state_dict()[key], saved[key] + 0.5)
    text_encoder = person.backbone.text_encoders[0]
    (token_id,) = person.backbone.tokenizers[0].convert_tokens_to_ids(["<person>"])
    assert torch.equal(text_encoder.get_input_embeddings().weight[token_id], saved[key] + 0.5)
    # <dog> shares no token with it: its embedding is its own, from the class word.
    assert [name for name in ours if name.startswith("token_embeddings.")] == [
        "token_embeddings.text_encoder:<dog>"
    ]


def test_init_adapter_user_repo_at_revision_downloads_that_revision(tiny_sd_path, tiny_adapter, monkeypatch):
    calls = []

    def snapshot_download(repo_id, revision=None, **kwargs):
        calls.append((repo_id, revision))
        return str(tiny_adapter)

    monkeypatch.setattr(nested.adapter, "snapshot_download", snapshot_download)
    spec = EncoderSpec(backbone=str(tiny_sd_path / "image_encoder"), num_tokens=4, width=32, depth=1, heads=2)
    module = NestedAttentionModule(
        str(tiny_sd_path), spec, subjects={"<person>": "person"}, init_adapter="me/faces@v1"
    )
    module.configure_model()
    assert calls == [("me/faces", "v1")]


def test_init_adapter_of_another_encoder_is_named_its_options_not_taken_and_its_embedding_exported(
    tiny_sd_path, tiny_adapter, tmp_path
):
    """The start adapter's image encoder, if another, is named in a warning; its options (here its token weight)
    are not taken; the run's export records the text encoder that holds the embedding it started from, and
    reads back."""
    other = shutil.copytree(tiny_adapter, tmp_path / "other")
    config = json.loads((other / "adapter_config.json").read_text())
    config["encoder"]["backbone"] = "someone/another-encoder"
    config["token_weight"] = 3.0
    (other / "adapter_config.json").write_text(json.dumps(config))
    spec = EncoderSpec(backbone=str(tiny_sd_path / "image_encoder"), num_tokens=4, width=32, depth=1, heads=2)
    module = NestedAttentionModule(
        str(tiny_sd_path), spec, subjects={"<person>": "person"}, init_adapter=str(other)
    )
    with pytest.warns(
        UserWarning, match=r"was trained with image encoder 'someone/another-encoder' \(this run: "
    ):
        module.configure_model()
    assert module.adapter.config.token_weight == 1.0
    assert module.adapter.config.token_encoders == ["text_encoder"]
    folder = module.adapter.save_pretrained(tmp_path / "export")
    check_adapter_files(folder)
    assert NestedAdapter.from_pretrained(folder).config.token_encoders == ["text_encoder"]


def caption_batch(present: tuple[bool, ...], seed: int, sdxl: bool = False) -> dict:
    """A collated batch whose captions name the subject token where ``present`` says (with SDXL's size
    conditioning when ``sdxl``)."""
    generator = torch.Generator().manual_seed(seed)
    size = len(present)
    batch = {
        "captions": ["a photo of <person>" if p else "a photo of a person" for p in present],
        "subjects": ["<person>"] * size,
        "pixel_values": torch.rand(size, 3, 64, 64, generator=generator),
        "reference": torch.rand(size, 3, 32, 32, generator=generator),
    }
    if sdxl:
        batch["original_sizes"] = torch.full((size, 2), 64)
        batch["crops_top_left"] = torch.zeros(size, 2, dtype=torch.long)
    return batch


def eager_and_compiled(path: Path, compile: dict, **settings) -> tuple[NestedAttentionModule, ...]:
    """Two modules of ``path`` with the same adapter weights, the second with ``model.compile``; image
    dropout at 0.5 so that steps bind different samples; torch.compile's caches and counters reset."""
    settings = {
        "gradient_checkpointing": True,
        "dropout": ConditioningDropout(text=0.0, image=0.5, both=0.0),
        **settings,
    }
    eager, compiled = make_module(path, **settings), make_module(path, compile=compile, **settings)
    for module in (eager, compiled):
        module.configure_model()
    compiled.adapter.load_state_dict(eager.adapter.state_dict())
    torch._dynamo.reset()
    counters.clear()
    return eager, compiled


def loss_and_gradients(module, batch: dict, seed: int, autocast: torch.device | None = None):
    """(diffusion_loss's outputs, the adapter's gradients) of one step on ``batch``; the gradients are then
    cleared. ``autocast``: run the loss under bf16 autocast on that device, as bf16-mixed training does."""
    with torch.autocast(
        autocast.type if autocast else "cpu", dtype=torch.bfloat16, enabled=autocast is not None
    ):
        out = module.diffusion_loss(batch, torch.Generator().manual_seed(seed))
    out["loss"].backward()
    module.on_after_backward()
    gradients = {n: p.grad.clone() for n, p in module.adapter.named_parameters() if p.grad is not None}
    module.adapter.zero_grad(set_to_none=True)
    return out, gradients


@pytest.mark.parametrize("regional", [False, True], ids=["whole", "regional"])
@pytest.mark.parametrize("kind", ["sd", "flux"])
def test_a_compiled_denoiser_trains_as_the_eager_one_in_one_graph_whatever_dropout_binds(
    kind, regional, tiny_sd_path, tiny_flux_path
):
    """model.compile: the UNet or transformer compiles whole (fullgraph: no break, the nested layers and
    the adapter's pre-hook included) under gradient checkpointing, and steps that bind different samples
    (captions without the token, image dropout) reuse that one graph. AOTAutograd's eager backend traces
    the forward and backward as inductor would, without generating code: the losses and gradients equal the
    eager module's (inductor's own output is checked in test_adapter). ``regional: true`` compiles each
    block on its own instead: a graph per kind of block and input (the tiny SD UNet's: its first block, whose
    input needs no gradient, and the later ones at each of its two widths; the tiny FLUX's double- and
    single-stream block), the same losses and gradients."""
    path = {"sd": tiny_sd_path, "flux": tiny_flux_path}[kind]
    options = {"backend": "aot_eager", "fullgraph": True, "regional": regional}
    eager, compiled = eager_and_compiled(path, options)
    fractions = set()
    for step, present in enumerate(
        [(True,) * 4, (True, False, True, True), (False,) * 4, (False, True, True, False)]
    ):
        batch = caption_batch(present, step)
        (out, gradients), (compiled_out, compiled_gradients) = (
            loss_and_gradients(module, batch, step) for module in (eager, compiled)
        )
        fractions.add(out["subject_fraction"].item())
        assert compiled_out["subject_fraction"] == out["subject_fraction"]
        torch.testing.assert_close(compiled_out["loss"], out["loss"], rtol=1e-5, atol=1e-6)
        assert compiled_gradients.keys() == gradients.keys() and gradients
        for name, gradient in gradients.items():
            torch.testing.assert_close(compiled_gradients[name], gradient, rtol=1e-4, atol=1e-7)
    assert len(fractions) >= 3  # the steps bound different samples
    assert counters["stats"]["unique_graphs"] == ({"sd": 3, "flux": 2}[kind] if regional else 1)


def test_a_compile_option_torch_does_not_take_is_refused_by_name(tiny_sd_path):
    with pytest.raises(ConfigError, match="torch.compile takes no option 'mod'; it takes backend,"):
        make_module(tiny_sd_path, compile={"mod": "reduce-overhead"})
    with pytest.raises(ConfigError, match="model.compile.regional must be true or false, got 'yes'"):
        make_module(tiny_sd_path, compile={"regional": "yes"})


def test_nested_fit_compiles_the_unet_from_the_config_and_refuses_an_unknown_option(
    tmp_path, monkeypatch, capsys
):
    """--model.compile reaches torch.compile through the CLI: training and validation run (each in its own
    graph, with no break: fullgraph), the adapter is exported; an option torch.compile lacks ends in one line
    and exit code 2."""
    monkeypatch.chdir(REPO)
    monkeypatch.setattr("sys.argv", ["nested"])
    root = tmp_path / "compiled"
    common = ["fit", "--config", "configs/smoke.yaml", f"--trainer.default_root_dir={root}"]
    settings = [
        "--trainer.max_steps=4",
        "--trainer.val_check_interval=2",
        "--trainer.enable_progress_bar=false",
    ]
    torch._dynamo.reset()
    counters.clear()
    assert main([*common, *settings, "--model.compile", "{backend: aot_eager, fullgraph: true}"]) in (0, None)
    assert NestedAdapter.from_pretrained(root / "adapters" / "last").config.token == "<person>"
    # Dynamo captured the UNet's forward: one graph for training, one for validation (without grad).
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([*common, "--model.compile", "{mod: reduce-overhead}"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith("nested fit: error: model.compile: torch.compile takes no option 'mod'")
    assert NestedAdapter.from_pretrained(root / "adapters" / "last").config.token == "<person>"  # run kept


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_the_min_snr_loss_weights_each_sample_as_the_paper_defines(tiny_sd_path, tmp_path, prediction_type):
    """Min-SNR-gamma (Hang et al. 2023): a sample at timestep t weighs min(SNR(t), gamma) / SNR(t) with a noise
    target, min(SNR(t), gamma) / (SNR(t) + 1) with a v target; SNR from the scheduler's betas, in float64."""
    path = shutil.copytree(tiny_sd_path, tmp_path / "base")
    config_file = path / "scheduler" / "scheduler_config.json"
    config_file.write_text(
        json.dumps(json.loads(config_file.read_text()) | {"prediction_type": prediction_type})
    )
    module = make_module(path, min_snr_gamma=5.0)
    module.configure_model()
    scheduler = module.backbone.noise_scheduler
    generator = torch.Generator().manual_seed(0)
    latents, noise, prediction = (torch.randn(4, 4, 8, 8, generator=generator) for _ in range(3))
    timesteps = torch.tensor([0, 10, 500, 999])
    alphas_cumprod = torch.cumprod(1 - scheduler.betas.double(), 0)[timesteps]
    snr = alphas_cumprod / (1 - alphas_cumprod)
    if prediction_type == "v_prediction":
        target = (
            alphas_cumprod.sqrt()[:, None, None, None] * noise.double()
            - (1 - alphas_cumprod).sqrt()[:, None, None, None] * latents.double()
        )
        weights = snr.clamp(max=5.0) / (snr + 1)
    else:
        target, weights = noise.double(), snr.clamp(max=5.0) / snr
    expected = weights * ((prediction.double() - target) ** 2).mean(dim=(1, 2, 3))
    assert snr[0] > 5.0 > snr[-1]  # the clamp acts on some of these timesteps, not on all
    loss = module._unet_loss(prediction, latents, noise, timesteps)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=0)
