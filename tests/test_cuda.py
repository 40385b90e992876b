"""The core paths on a CUDA GPU: precision at real SDXL shapes, exact attach/detach, mixed-precision
training (quantized bases, 8-bit optimizer states, a prompt cache), generation, and a denoising step that
never waits for the device.

Selected with ``pytest -m cuda``; without a CUDA device every test here skips, with the reason.
"""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from test_adapter import bind, make_adapter, run_unet, unet_inputs
from test_module import (
    DEMO_FACES,
    caption_batch,
    eager_and_compiled,
    frozen_state,
    loss_and_gradients,
    make_data,
    make_module,
    make_trainer,
)
from test_pipeline import tiny_pipeline, write_adapter
from test_resume import ADAMW_8BIT, fit
from torch._dynamo.utils import counters

from nested.attention import nested_attention
from nested.backbone import DiffusionBackbone, load_t5
from nested.data.domains import DomainSpec
from nested.data.prompts import domain_prompts, domain_source
from nested.inference.pipeline import NestedPipeline
from nested.prompt_cache import write_prompt_states
from nested.testing import reference_nested_attention

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CUDA = torch.device("cuda")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max()).item()


def sdxl_attention_case(queries: int, heads: int, dtype: torch.dtype, tokens: int = 1024):
    """A guided batch at one SDXL attention level: sample 0 (unconditional) has no subject, sample 1
    binds it at text position 5. Inputs are rounded to ``dtype`` once; the reference reads the same
    rounded values, so the comparison measures the computation alone."""
    generator = torch.Generator(device=CUDA).manual_seed(queries + heads)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=CUDA).to(dtype)

    query, key, value = randn(2, heads, queries, 64), randn(2, heads, 77, 64), randn(2, heads, 77, 64)
    nested_keys, nested_values = randn(2, heads, tokens, 64), randn(2, heads, tokens, 64)
    mask = torch.zeros(2, 77, dtype=torch.bool, device=CUDA)
    mask[1, 5] = True
    return query, key, value, [nested_keys], [nested_values], [mask]


def plain_reference(query, key, value):
    q, k, v = query.double(), key.double(), value.double()
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize(("queries", "heads"), [(4096, 10), (1024, 20)])
def test_nested_attention_matches_a_float64_reference_at_sdxl_shapes(queries, heads, dtype):
    """N = 4096 / 1024 queries (SDXL's 64 x 64 and 32 x 32 levels at 1024 px), T = 77, D = 64,
    M = 1024 subject tokens: the fused path is as accurate as the dtype's own attention (within 4x
    of plain SDPA's error against float64), and the unbound sample is plain SDPA bit for bit."""
    case = sdxl_attention_case(queries, heads, DTYPES[dtype])
    query, key, value = case[:3]
    got = nested_attention(*case)
    nested_error = relative_error(got, reference_nested_attention(*case))
    plain = F.scaled_dot_product_attention(query, key, value)
    plain_error = relative_error(plain, plain_reference(query, key, value))
    assert nested_error <= 4 * plain_error + 1e-6, (nested_error, plain_error)
    assert torch.equal(got[0], plain[0])


def test_attach_detach_and_unbound_rows_are_exact_on_cuda(tiny_sdxl_path):
    backbone = DiffusionBackbone.from_pretrained(tiny_sdxl_path, dtype=torch.bfloat16).to(CUDA)
    adapter = make_adapter(backbone, tiny_sdxl_path / "image_encoder").to(CUDA, torch.bfloat16)
    prompts = ["a photo of a person on the beach", "a photo of a dog in the snow"]
    latents, timesteps, embeds, added = unet_inputs(backbone, prompts)
    inputs = (
        latents.to(CUDA, torch.bfloat16),
        timesteps.to(CUDA),
        embeds,
        {name: tensor.to(CUDA) for name, tensor in added.items()},
    )
    plain = run_unet(backbone, inputs)
    adapter.attach(backbone.unet)
    assert torch.equal(run_unet(backbone, inputs), plain)  # attached, nothing bound
    with torch.no_grad():
        bind(adapter, backbone, prompts, torch.rand(2, 3, 40, 40, device=CUDA))
    personalised = run_unet(backbone, inputs)
    assert torch.isfinite(personalised).all()
    assert torch.equal(personalised[1], plain[1]), "the prompt without the subject must be untouched"
    assert not torch.equal(personalised[0], plain[0])
    adapter.detach(backbone.unet)
    assert torch.equal(run_unet(backbone, inputs), plain)


class DeviceLog(L.Callback):
    """Where each training step ran: (the module's device, the UNet's or transformer's device)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        backbone = pl_module.backbone
        denoiser = backbone.unet if hasattr(backbone, "unet") else backbone.transformer
        self.seen.append((pl_module.device.type, denoiser.device.type))


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_one_training_step_in_mixed_precision(kind, precision, tiny_sd_path, tiny_sdxl_path, tmp_path):
    path = {"sd": tiny_sd_path, "sdxl": tiny_sdxl_path}[kind]
    frozen_dtype = "bfloat16" if precision == "bf16-mixed" else "float16"
    module = make_module(path, frozen_dtype=frozen_dtype, gradient_checkpointing=kind == "sdxl")
    module.configure_model()
    frozen_before = {k: v.cpu() for k, v in frozen_state(module).items()}
    adapter_before = {k: v.clone() for k, v in module.state_dict().items()}
    devices = DeviceLog()
    trainer = make_trainer(tmp_path, max_steps=4, accelerator="gpu", precision=precision)
    trainer.callbacks.append(devices)
    trainer.fit(module, datamodule=make_data(str(DEMO_FACES / "shards.json")))

    # Lightning moves the module back to the CPU when fit ends: ask where the steps ran.
    assert devices.seen == [(CUDA.type, CUDA.type)] * 4
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    frozen_after = frozen_state(module)
    assert all(torch.equal(v, frozen_after[k].cpu()) for k, v in frozen_before.items())
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    changed = {k for k, v in module.state_dict().items() if not torch.equal(v.cpu(), adapter_before[k].cpu())}
    assert changed == trainable


def quantized_layers(module) -> list[torch.nn.Module]:
    """The linear layers of a FLUX module's transformer and T5 (model.quantize stores them in int8)."""
    models = (module.backbone.transformer, module.backbone.text_encoders[1])
    return [layer for model in models for layer in model.modules() if isinstance(layer, torch.nn.Linear)]


class StateAtStart(L.Callback):
    """The adapter's state and the 8-bit weights when training starts: after Lightning has called
    configure_model (under its device context, as `nested fit` does) and moved the module."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.adapter = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        self.quantized = [layer.weight.qdata.cpu().clone() for layer in quantized_layers(pl_module)]


def test_training_steps_on_a_flux_whose_transformer_and_t5_are_stored_in_int8(tiny_flux_path, tmp_path):
    """model.quantize on CUDA, loaded where `nested fit` loads it (Lightning calls configure_model):
    bf16-mixed steps with checkpointing; the 8-bit weights stay as loaded, every adapter weight trains."""
    pytest.importorskip("torchao", reason="the quantize extra (torchao) is not installed")
    module = make_module(
        tiny_flux_path,
        frozen_dtype="bfloat16",
        quantize={"transformer": "int8", "text_encoder_2": "int8"},
        max_sequence_length=32,
        gradient_checkpointing=True,
    )
    devices, start = DeviceLog(), StateAtStart()
    trainer = make_trainer(tmp_path, max_steps=4, accelerator="gpu", precision="bf16-mixed")
    trainer.callbacks += [devices, start]
    trainer.fit(module, datamodule=make_data(str(DEMO_FACES / "shards.json")))

    assert devices.seen == [(CUDA.type, CUDA.type)] * 4
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    layers = quantized_layers(module)
    assert len(layers) == len(start.quantized) > 4
    assert all(
        torch.equal(layer.weight.qdata.cpu(), q) for layer, q in zip(layers, start.quantized, strict=True)
    )
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    changed = {k for k, v in module.state_dict().items() if not torch.equal(v.cpu(), start.adapter[k])}
    assert changed == trainable


class CacheDevice(L.Callback):
    """Where the prompt cache returns T5's states during training."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.device = pl_module.backbone.text_encoders[-1].device


def test_training_from_a_prompt_cache_written_by_t5_on_the_gpu(tiny_flux_path, tmp_path):
    """`nested prompts`' path on CUDA (T5 in bf16 on the GPU) and bf16-mixed training that never loads T5."""
    spec = DomainSpec("faces", str(DEMO_FACES / "shards.json"), "<person>")
    tokenizer, t5, component, length = load_t5(tiny_flux_path, dtype=torch.bfloat16, max_sequence_length=32)
    t5.to(CUDA)
    prompts = [*domain_prompts(spec)[0], ""]
    folder = tmp_path / "cache"
    write_prompt_states(
        folder,
        prompts,
        tokenizer,
        t5,
        max_sequence_length=length,
        base_model=str(tiny_flux_path),
        component=component,
        sources=[domain_source(spec)],
    )
    module = make_module(
        tiny_flux_path, frozen_dtype="bfloat16", max_sequence_length=32, prompt_cache=str(folder)
    )
    devices, cache = DeviceLog(), CacheDevice()
    trainer = make_trainer(tmp_path, max_steps=4, accelerator="gpu", precision="bf16-mixed")
    trainer.callbacks += [devices, cache]
    trainer.fit(module, datamodule=make_data(spec.urls))

    assert devices.seen == [(CUDA.type, CUDA.type)] * 4 and cache.device.type == CUDA.type
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    assert not any(type(m).__name__ == "T5EncoderModel" for m in module.backbone.text_encoders)
    # The cached states are T5's, up to the rounding of another batch size's kernels.
    ids = module.backbone.tokenize(prompts[:2])[-1]
    with torch.no_grad():
        live = t5(ids.to(CUDA))[0].float().cpu()
    torch.testing.assert_close(
        module.backbone.text_encoders[-1](ids)[0].float().cpu(), live, rtol=2e-2, atol=2e-2
    )


def dequantized_moments(optimizer_state: dict) -> dict:
    """Each parameter's AdamW moments as plain float32 tensors on the CPU (8-bit ones dequantized)."""

    def plain(value: torch.Tensor) -> torch.Tensor:
        return (value.dequantize() if hasattr(value, "qmap") else value).float().cpu().clone()

    return {
        (index, name): plain(value)
        for index, state in optimizer_state.items()
        for name, value in state.items()
        if name in ("exp_avg", "exp_avg_sq")
    }


class MomentsAtStart(L.Callback):
    """The optimizer's moments and their devices when a resumed run starts training."""

    def on_train_start(self, trainer, pl_module) -> None:
        state = trainer.optimizers[0].state_dict()["state"]
        self.devices = {v.device.type for s in state.values() for k, v in s.items() if k != "step"}
        self.moments = dequantized_moments(state)


def test_8_bit_optimizer_states_resume_onto_the_gpu(tiny_sd_path, tmp_path):
    """torchao's AdamW8bit: a run stopped by SIGTERM resumes on CUDA with the 8-bit moments it saved."""
    pytest.importorskip("torchao", reason="the quantize extra (torchao) is not installed")
    fit(tiny_sd_path, tmp_path, sigterm_at=3, optimizer=ADAMW_8BIT, accelerator="gpu")
    saved = torch.load(tmp_path / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=False)
    at_start = MomentsAtStart()
    trainer, _ = fit(tiny_sd_path, tmp_path, optimizer=ADAMW_8BIT, accelerator="gpu", callbacks=(at_start,))

    assert trainer.global_step == 6
    assert at_start.devices == {CUDA.type}
    want = dequantized_moments(saved["optimizer_states"][0]["state"])
    assert want.keys() == at_start.moments.keys()
    assert all(torch.equal(at_start.moments[key], value) for key, value in want.items())
    assert any(hasattr(s, "qmap") for state in trainer.optimizers[0].state.values() for s in state.values())


@pytest.mark.parametrize("regional", [False, True], ids=["whole", "regional"])
def test_a_compiled_training_step_runs_in_one_inductor_graph_and_matches_eager(regional, tiny_sdxl_path):
    """model.compile with inductor on CUDA: the recipe's settings (bf16 frozen model and autocast, gradient
    checkpointing), steps that bind different samples, one graph, losses and gradients as eager's. Compiled
    block by block (``regional``): two graphs, for the first block (its input needs no gradient) and the
    others."""
    options = {"fullgraph": True, "regional": regional}
    eager, compiled = eager_and_compiled(tiny_sdxl_path, options, frozen_dtype="bfloat16")
    eager.to(CUDA), compiled.to(CUDA)
    for step, present in enumerate([(True,) * 4, (True, False, True, True), (False, True, False, True)]):
        batch = caption_batch(present, step, sdxl=True)
        (out, gradients), (compiled_out, compiled_gradients) = (
            loss_and_gradients(module, batch, step, autocast=CUDA) for module in (eager, compiled)
        )
        torch.testing.assert_close(compiled_out["loss"].float(), out["loss"].float(), rtol=2e-2, atol=1e-3)
        assert compiled_gradients.keys() == gradients.keys()
        difference = torch.cat([(compiled_gradients[n] - g).flatten().float() for n, g in gradients.items()])
        total = torch.cat([g.flatten().float() for g in gradients.values()])
        assert difference.norm() <= 0.05 * total.norm()  # bf16 rounding
    assert counters["stats"]["unique_graphs"] == (2 if regional else 1)


def test_generation_with_an_adapter_in_half_precision(tiny_sdxl_path, tmp_path):
    pipe = tiny_pipeline(tiny_sdxl_path)
    adapter = write_adapter(
        pipe.unet, tmp_path / "faces", tiny_sdxl_path / "image_encoder", "<person>", "person", 3
    )
    pipe = pipe.to(CUDA, torch.float16)
    kwargs = {"num_inference_steps": 3, "guidance_scale": 5.0, "height": 64, "width": 64, "output_type": "pt"}
    prompt = "a <person> on the beach"

    def generate(nested_or_pipe, **extra):
        generator = torch.Generator(device=CUDA).manual_seed(0)
        return nested_or_pipe(prompt, generator=generator, **kwargs, **extra).images

    plain = generate(pipe)
    with NestedPipeline(pipe, {"<person>": adapter}) as nested:
        personalised = generate(nested, subjects={"<person>": torch.rand(1, 3, 40, 40)})
    assert personalised.device.type == CUDA.type and torch.isfinite(personalised).all()
    assert (personalised - plain).abs().max() > 1e-3
    # Unloaded, the pipeline draws the plain images again (the subject moved them by far more).
    torch.testing.assert_close(generate(pipe), plain, atol=1e-3, rtol=0)


def test_a_pipeline_moved_to_the_gpu_or_offloaded_after_its_adapters_loaded(tiny_sdxl_path, tmp_path):
    pipe = tiny_pipeline(tiny_sdxl_path)
    adapter = write_adapter(
        pipe.unet, tmp_path / "faces", tiny_sdxl_path / "image_encoder", "<person>", "person", 3
    )
    kwargs = {"num_inference_steps": 3, "guidance_scale": 5.0, "height": 64, "width": 64, "output_type": "pt"}
    subject = torch.rand(1, 3, 40, 40)

    def generate(nested_or_pipe, **extra):
        generator = torch.Generator(device=CUDA).manual_seed(0)
        return nested_or_pipe("a <person> on the beach", generator=generator, **kwargs, **extra).images

    on_the_gpu = generate(
        NestedPipeline(tiny_pipeline(tiny_sdxl_path).to(CUDA), {"<person>": adapter}),
        subjects={"<person>": subject},
    )
    nested = NestedPipeline(pipe, {"<person>": adapter})  # loaded on the CPU
    pipe.to(CUDA)
    moved = generate(nested, subjects={"<person>": subject})
    pipe.to("cpu")
    pipe.enable_model_cpu_offload(device=CUDA)
    offloaded = generate(nested, subjects={"<person>": subject})
    torch.testing.assert_close(moved, on_the_gpu, atol=1e-4, rtol=0)
    torch.testing.assert_close(offloaded, on_the_gpu, atol=1e-4, rtol=0)
    nested.unload()
    torch.testing.assert_close(
        generate(pipe), generate(tiny_pipeline(tiny_sdxl_path).to(CUDA)), atol=1e-4, rtol=0
    )


def test_a_guided_denoising_step_never_waits_for_the_device(tiny_sdxl_path):
    """The UNet call of a guided step (70 layers on SDXL, each with the subject's masks, presence and
    image rows) plus the guidance combination, run with CUDA's sync debug mode set to raise on any
    host-device synchronisation. Binding the subject, before the step, may read the device."""
    backbone = DiffusionBackbone.from_pretrained(tiny_sdxl_path).to(CUDA)
    adapter = make_adapter(backbone, tiny_sdxl_path / "image_encoder", value_norm_factor=2.0).to(CUDA)
    adapter.attach(backbone.unet)
    latents, timesteps, embeds, added = unet_inputs(backbone, ["", "a photo of a person on the beach"])
    inputs = (
        latents.to(CUDA),
        timesteps.to(CUDA),
        embeds,
        {name: tensor.to(CUDA) for name, tensor in added.items()},
    )
    with torch.no_grad():  # one prompt, one image shared through image_index: the pipeline's binding
        masks = bind(adapter, backbone, ["a photo of a person on the beach"], torch.rand(1, 3, 40, 40))
    assert masks.any()

    def guided_step() -> torch.Tensor:
        unconditional, conditional = run_unet(backbone, inputs).chunk(2)
        return unconditional + 5.0 * (conditional - unconditional)

    expected = guided_step()  # warm-up: kernels chosen, workspaces allocated
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step = guided_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(step, expected)
