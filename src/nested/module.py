"""The older import path of :mod:`nested.training.module`, kept for code and configs that name it."""

from nested.training.module import ConditioningDropout, NestedAttentionModule

__all__ = ["ConditioningDropout", "NestedAttentionModule"]
