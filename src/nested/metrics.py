"""The older import path of :mod:`nested.evaluation.metrics`, kept for saved configs that name
``nested.metrics.PromptAlignment`` or ``nested.metrics.IdentitySimilarity``."""

from nested.evaluation.metrics import IdentitySimilarity, PromptAlignment, VisionEmbedder, vision_embedder

__all__ = ["IdentitySimilarity", "PromptAlignment", "VisionEmbedder", "vision_embedder"]
