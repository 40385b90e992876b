"""Frozen models stored in 8 bits (``quantize``): the weights' format, training through them, the errors."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch._inductor.config
import yaml
from test_dit_bench import run_benchmark
from test_dit_training import fit_smoke, overfit
from torch import nn

from nested.adapter import cross_attention_layers
from nested.backbone import load_backbone
from nested.dit import text_projections
from nested.encoder import EncoderSpec
from nested.errors import ConfigError, MissingDependencyError, UsageError
from nested.inference.pipeline import NestedPipeline
from nested.quantize import pipeline_config
from nested.training.module import ConditioningDropout, NestedAttentionModule

pytest.importorskip("torchao", reason="the quantize extra (torchao) is not installed")

REPO = Path(__file__).resolve().parents[1]
FLUX_QUANTIZED = {"transformer": "int8", "text_encoder_2": "float8"}
STORAGE = {"int8": torch.int8, "float8": torch.float8_e4m3fn}


@pytest.fixture
def tiny_path(request, tiny_sdxl_path, tiny_flux_path):
    return {"sdxl": tiny_sdxl_path, "flux": tiny_flux_path}[request.param]


def linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}


def naive_dequantized(weight: torch.Tensor, format_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(the weight as its 8-bit format stores it, the per-row scale), written out: symmetric, one scale per
    output row; int8 spans [-127.5, 127.5] scale steps, float8 e4m3 up to 448."""
    if format_name == "int8":
        scale = weight.abs().amax(dim=1, keepdim=True) / 127.5
        return (weight / scale).round().clamp(-128, 127) * scale, scale
    scale = weight.abs().amax(dim=1, keepdim=True) / 448
    return (weight / scale).to(torch.float8_e4m3fn).float() * scale, scale


def test_named_components_load_with_8_bit_weights_that_round_the_dense_ones(tiny_flux_path):
    dense = load_backbone(tiny_flux_path)
    tuning = torch._inductor.config.coordinate_descent_tuning
    quantized = load_backbone(tiny_flux_path, quantize=FLUX_QUANTIZED)
    assert torch._inductor.config.coordinate_descent_tuning == tuning  # torch.compile's settings untouched
    pairs = {
        "transformer": (dense.transformer, quantized.transformer),
        "text_encoder_2": (dense.text_encoders[1], quantized.text_encoders[1]),
    }
    for component, (dense_model, quantized_model) in pairs.items():
        format_name = FLUX_QUANTIZED[component]
        dense_layers, quantized_layers = linears(dense_model), linears(quantized_model)
        assert dense_layers.keys() == quantized_layers.keys() and len(dense_layers) > 4
        for name, layer in quantized_layers.items():
            weight, expected = layer.weight, dense_layers[name].weight.detach()
            assert weight.qdata.dtype == STORAGE[format_name], (component, name)
            assert not weight.requires_grad
            rounded, scale = naive_dequantized(expected, format_name)
            torch.testing.assert_close(weight.scale.float(), scale, rtol=1e-6, atol=0)
            if format_name == "int8":
                # Within half a step everywhere; a tie may round the other way than the naive division.
                assert ((weight.dequantize() - expected).abs() <= scale / 2 * 1.001).all()
                assert (weight.dequantize() != rounded).float().mean() < 0.02
            else:
                torch.testing.assert_close(weight.dequantize(), rounded, rtol=0, atol=0)
    # What was not named stays as it was: CLIP and the VAE.
    for model in (quantized.text_encoders[0], quantized.vae):
        assert all(type(p) is nn.Parameter for p in model.parameters())


def test_a_quantized_transformer_computes_with_its_rounded_weights_forward_and_backward(tiny_flux_path):
    """Its output, and the gradient of its inputs (the path to a nested layer's output), are the dense
    transformer's with each linear weight replaced by its dequantized value."""
    quantized = load_backbone(tiny_flux_path, quantize={"transformer": "int8"}).transformer
    reference = load_backbone(tiny_flux_path).transformer
    quantized_layers = linears(quantized)
    with torch.no_grad():
        for name, layer in linears(reference).items():
            layer.weight.copy_(quantized_layers[name].weight.dequantize())
    generator = torch.Generator().manual_seed(0)
    hidden, text = torch.randn(1, 16, 64, generator=generator), torch.randn(1, 8, 32, generator=generator)
    fixed = {
        "pooled_projections": torch.randn(1, 32, generator=generator),
        "timestep": torch.tensor([0.5]),
        "img_ids": torch.zeros(16, 3),
        "txt_ids": torch.zeros(8, 3),
        "guidance": torch.tensor([3.5]),
    }
    results = []
    for model in (quantized, reference):
        inputs = {
            "hidden_states": hidden.clone().requires_grad_(),
            "encoder_hidden_states": text.clone().requires_grad_(),
        }
        out = model(**inputs, **fixed).sample
        out.square().mean().backward()
        results.append((out.detach(), inputs["hidden_states"].grad, inputs["encoder_hidden_states"].grad))
    for got, expected in zip(*results, strict=True):
        assert got.abs().sum() > 0
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        dense = load_backbone(tiny_flux_path).transformer(
            hidden_states=hidden, encoder_hidden_states=text, **fixed
        )
    assert not torch.allclose(results[0][0], dense.sample, atol=1e-6)  # the weights were rounded


def make_module(path: Path, encoder_dim: int | None = None, **kwargs) -> NestedAttentionModule:
    spec = EncoderSpec(
        backbone=str(path / "image_encoder"), num_tokens=4, width=32, depth=1, heads=2, output_dim=encoder_dim
    )
    torch.manual_seed(0)
    module = NestedAttentionModule(str(path), spec, dropout=ConditioningDropout(0.0, 0.0, 0.0), **kwargs)
    module.configure_model()
    return module


@pytest.mark.parametrize(
    ("tiny_path", "quantize"),
    [("flux", FLUX_QUANTIZED), ("sdxl", {"unet": "int8", "text_encoder_2": "int8"})],
    indirect=["tiny_path"],
)
def test_the_adapter_trains_through_a_quantized_base_which_stays_as_loaded(
    tiny_path, quantize, demo_faces_data
):
    module = make_module(tiny_path, quantize=quantize, frozen_dtype="bfloat16")
    denoiser = module.backbone.transformer if "transformer" in quantize else module.backbone.unet
    stored = {name: layer.weight.qdata.clone() for name, layer in linears(denoiser).items()}
    data = demo_faces_data(2)
    data.setup("fit")
    batch = data.on_before_batch_transfer(next(iter(data.train_dataloader())), 0)
    losses = overfit(module, batch)  # gradients reach every adapter weight through the quantized layers
    assert losses[-1] < losses[15] < losses[0], losses
    assert all(torch.equal(layer.weight.qdata, stored[name]) for name, layer in linears(denoiser).items())


def test_init_from_base_starts_from_the_weights_the_quantized_layers_compute_with(tiny_flux_path):
    module = make_module(
        tiny_flux_path, quantize={"transformer": "int8"}, init_from_base=True, encoder_dim=32
    )
    layers = cross_attention_layers(module.backbone.transformer)
    assert len(layers) == 2  # a double-stream and a single-stream block
    for name, attention in layers.items():
        key, value = text_projections(attention)
        nested = module.adapter.layers[name.replace(".", "__")]
        assert torch.equal(nested.to_k.weight, key.weight.dequantize().float())
        assert torch.equal(nested.to_v.weight, value.weight.dequantize().float())


def test_wrong_quantize_settings_are_refused_by_name(tiny_flux_path, tiny_sd_path, monkeypatch):
    with pytest.raises(
        ConfigError, match=r"model.quantize: transformer has format 'int4'; the formats are int8"
    ):
        make_module(tiny_flux_path, quantize={"transformer": "int4"})
    with pytest.raises(
        ConfigError,
        match=r"cannot quantize unet: .*its quantizable components are transformer, text_encoder, text_encoder_2",
    ):
        make_module(tiny_flux_path, quantize={"unet": "int8"})
    with pytest.raises(ConfigError, match=r"cannot quantize vae: "):
        load_backbone(tiny_sd_path, quantize={"vae": "int8"})
    monkeypatch.setitem(sys.modules, "torchao", None)  # as if torchao were not installed
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'nested\[quantize\]'"):
        load_backbone(tiny_sd_path, quantize={"unet": "int8"})


def test_fit_trains_the_smoke_config_on_a_quantized_flux_and_refuses_an_unknown_component(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(REPO)
    monkeypatch.setattr("sys.argv", ["nested"])
    # The modules nested fit trains, to look at the frozen weights they trained through.
    trained = []
    configure = NestedAttentionModule.configure_model

    def keep(module):
        configure(module)
        trained.append(module)

    monkeypatch.setattr(NestedAttentionModule, "configure_model", keep)
    root = tmp_path / "run"
    quantize = ["--model.quantize={transformer: int8, text_encoder_2: int8}", "--model.frozen_dtype=bfloat16"]
    losses = fit_smoke("flux", root, 4, *quantize)
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)
    backbone = trained[0].backbone
    assert all(module is trained[0] for module in trained)  # one module (configure_model is idempotent)
    for name, model in (("transformer", backbone.transformer), ("text_encoder_2", backbone.text_encoders[1])):
        assert linears(model) and all(
            layer.weight.qdata.dtype == torch.int8 for layer in linears(model).values()
        ), name
    assert all(type(p) is nn.Parameter for p in backbone.text_encoders[0].parameters())  # not named
    recorded = yaml.safe_load(next(root.rglob("config.yaml")).read_text())
    assert recorded["model"]["quantize"] == {"transformer": "int8", "text_encoder_2": "int8"}
    assert (root / "adapters" / "last" / "adapter_config.json").is_file()
    capsys.readouterr()

    with pytest.raises(SystemExit) as exit_info:
        fit_smoke("flux", tmp_path / "refused", 2, "--model.quantize={unet: int8}")
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(
        "nested fit: error: cannot quantize unet: data/models/tiny-flux has no such component"
    )


def test_the_memory_benchmark_counts_what_the_quantized_models_hold():
    done, results = run_benchmark("quantize.py", "--smoke")
    for format_name in ("int8", "float8"):
        row = results["check"][format_name]
        assert row["flux_1+1_blocks_stored_gib"] == pytest.approx(
            row["flux_1+1_blocks_counted_gib"], rel=1e-9
        )
        assert row["t5_1_layer_stored_gib"] == pytest.approx(row["t5_1_layer_counted_gib"], rel=1e-9)
    assert (
        0
        < results["check"]["int8"]["weights_relative_rms"]
        < results["check"]["float8"]["weights_relative_rms"]
    )
    flux = results["memory"]["FLUX.1-dev"]
    assert 0.49 < flux["int8_gib"] / flux["bf16_gib"] < 0.51  # its weights are linear ones
    assert set(results["budget"]) == {"FLUX.1-dev", "SD3.5-Large", "SD3.5-Medium", "SDXL"}
    for row in [
        "| FLUX.1-dev | 32.6 | transformer, text_encoder_2 | 17.2 | 412 M | 6.1 | 23.4 | 3.9 | 21.1 | 16.5 |",
        "| SD3.5-Large | 26.7 | transformer, text_encoder_3 | 14.9 | 243 M | 3.6 | 18.6 | 2.3 | 17.2 | 12.6 |",
        "| SD3.5-Medium | 15.9 | transformer, text_encoder_3 | 9.5 | 129 M | 1.9 | 11.4 | 1.2 | 10.7 | 6.2 |",
        "| SDXL | 7.6 | unet, text_encoder_2 | 5.0 | 224 M | 3.3 | 8.3 | 2.1 | 7.1 | - |",
    ]:
        assert row in done.stdout  # the README's table
    optimizer = results["check"]["adamw8bit"]
    assert optimizer["moments_stored_gib"] == pytest.approx(optimizer["moments_counted_gib"], rel=1e-9)
    assert 0.2 < optimizer["moments_stored_gib"] / optimizer["moments_float32_gib"] < 0.3


def test_a_quantized_flux_compiles_whole_to_the_eager_loss_and_is_refused_block_by_block(
    tiny_flux_path, demo_faces_data
):
    data = demo_faces_data(2)
    data.setup("fit")
    batch = data.on_before_batch_transfer(next(iter(data.train_dataloader())), 0)
    results = []
    for compile_options in (False, {"backend": "aot_eager", "fullgraph": True}):
        torch._dynamo.reset()
        module = make_module(tiny_flux_path, quantize={"transformer": "int8"}, compile=compile_options)
        loss = module.diffusion_loss(batch, torch.Generator().manual_seed(0))["loss"]
        loss.backward()
        results.append((loss, [p.grad for p in module.adapter.trainable_parameters()]))
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    torch.testing.assert_close(compiled_loss, eager_loss)
    for compiled, eager in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(compiled, eager)
    regional = {"backend": "aot_eager", "fullgraph": True, "regional": True}
    with pytest.raises(ConfigError, match=r"regional: true\} cannot train FLUX.1 with its transformer in"):
        make_module(tiny_flux_path, quantize={"transformer": "int8"}, compile=regional)
    make_module(tiny_flux_path, quantize={"text_encoder_2": "int8"}, compile=regional)  # its blocks are dense


def test_the_pipeline_refuses_quantize_beside_its_own_quantization_config(tiny_flux_path):
    own = pipeline_config({"transformer": "int8"})
    with pytest.raises(UsageError, match="pass quantize or quantization_config, not both"):
        NestedPipeline.from_pretrained(
            tiny_flux_path, quantize={"transformer": "int8"}, quantization_config=own
        )
