"""The older import path of :mod:`nested.inference.pipeline`: every model card pushed so far says
``from nested.pipeline import NestedPipeline``, so it keeps working."""

from nested.inference.pipeline import NestedPipeline, load_nested_adapters
from nested.inference.subjects import Subject, load_image

__all__ = ["NestedPipeline", "Subject", "load_image", "load_nested_adapters"]
