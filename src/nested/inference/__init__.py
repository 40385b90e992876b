"""Inference: ``NestedPipeline`` (adapters on a diffusers SD / SDXL pipeline), subjects, the in-memory sampler."""

from nested._lazy import lazy_exports

lazy_exports(
    globals(),
    {
        "NestedPipeline": "nested.inference.pipeline",
        "load_nested_adapters": "nested.inference.pipeline",
        "Subject": "nested.inference.subjects",
        "load_image": "nested.inference.subjects",
        "sample_images": "nested.inference.sampler",
    },
)
