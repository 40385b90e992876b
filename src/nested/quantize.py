"""Weight-only quantization of the frozen backbone's large models, so that a big base fits a small card.

The frozen denoiser (UNet or diffusion transformer) and text encoders can be loaded with their linear
layers' weights stored in 8 bits instead of 16, through torchao as diffusers' and transformers'
``from_pretrained`` apply it (``quantization_config``): the same loading path as unquantized weights, each
layer quantized as it is read. Activations, gradients and the trainable adapter stay in their own dtype:
a quantized layer dequantizes its weight for every product, so gradients flow through it to the adapter
as through the original layer.

Formats, both symmetric with one float32 scale per output row:

- ``int8``: ``w ≈ s * round(w / s)``, ``s = max|w_row| / 127.5`` (torchao's ``Int8WeightOnlyConfig``).
- ``float8``: ``w ≈ s * e4m3(w / s)``, ``s = max|w_row| / 448`` (``Float8WeightOnlyConfig``).

The mapping names components as the checkpoint's ``model_index.json`` does: ``{"transformer": "int8",
"text_encoder_2": "int8"}`` stores FLUX.1's transformer and its T5-XXL in int8. Meant for bf16 frozen models
(the recipes'): in float32 diffusers warns that integer formats support only bf16, and they work. torchao is
an optional dependency (the ``quantize`` extra).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nested.errors import ConfigError, MissingDependencyError

__all__ = [
    "FORMATS",
    "check_quantize",
    "component_config",
    "pipeline_config",
    "torchao_config",
]

# Format name -> torchao's weight-only config class.
FORMATS = {"int8": "Int8WeightOnlyConfig", "float8": "Float8WeightOnlyConfig"}


def check_quantize(quantize: Mapping[str, str] | None, option: str) -> dict[str, str]:
    """The ``{component: format}`` mapping of ``option``, its formats checked; {} for none."""
    if quantize is None:
        return {}
    if not isinstance(quantize, Mapping):
        raise ConfigError(
            f"{option} maps components to formats, e.g. {{transformer: int8}}; got {quantize!r}."
        )
    for component, format_name in quantize.items():
        if not isinstance(format_name, str) or format_name not in FORMATS:
            raise ConfigError(
                f"{option}: {component} has format {format_name!r}; the formats are {', '.join(FORMATS)}."
            )
    for format_name in set(quantize.values()):
        torchao_config(format_name)  # a missing torchao is named now, not after the models before it load
    return dict(quantize)


def component_config(component: str, format_name: str) -> Any:
    """The ``quantization_config`` that ``from_pretrained`` of ``component`` takes: diffusers' TorchAoConfig
    for the denoiser, transformers' for a text encoder."""
    weights_config = torchao_config(format_name)
    if component.startswith("text_encoder"):  # the libraries load here: `import nested` loads none
        from transformers import TorchAoConfig
    else:
        from diffusers import TorchAoConfig
    return TorchAoConfig(weights_config)


def pipeline_config(quantize: Mapping[str, str]) -> Any:
    """``quantize`` as the ``quantization_config`` of ``DiffusionPipeline.from_pretrained`` (None if empty)."""
    if not quantize:
        return None
    from diffusers import PipelineQuantizationConfig  # here: `import nested` loads no framework

    return PipelineQuantizationConfig(
        quant_mapping={name: component_config(name, format_name) for name, format_name in quantize.items()}
    )


def torchao_config(format_name: str) -> Any:
    """torchao's weight-only config of ``format_name`` (what ``quantize_`` and the loaders' TorchAoConfig take)."""
    try:
        import torchao.quantization  # here: an optional extra, needed only when a quantization is asked for
    except ImportError as error:
        raise MissingDependencyError(
            "quantizing the frozen weights needs torchao: pip install 'nested[quantize]' (or pip install torchao)."
        ) from error
    # set_inductor_config=False: the default retunes torch.compile's inductor for the whole process.
    return getattr(torchao.quantization, FORMATS[format_name])(set_inductor_config=False)
