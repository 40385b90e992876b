"""The older import path of :class:`nested.callbacks.SampleGrid`, kept for saved configs that name
``nested.sampling.SampleGrid``."""

from nested.callbacks.sample_grid import SampleGrid

__all__ = ["SampleGrid"]
