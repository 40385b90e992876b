"""Evaluation: identity and prompt-alignment metrics, reference images and grids, the ``nested eval`` sweep
and its report, and the interface of judges."""

from nested._lazy import lazy_exports

lazy_exports(
    globals(),
    {
        "IdentitySimilarity": "nested.evaluation.metrics",
        "PromptAlignment": "nested.evaluation.metrics",
        "vision_embedder": "nested.evaluation.metrics",
        "Reference": "nested.evaluation.images",
        "load_references": "nested.evaluation.images",
        "make_grid": "nested.evaluation.images",
        "Judges": "nested.evaluation.judging",
        "load_judges": "nested.evaluation.judging",
        "run_eval": "nested.evaluation.sweep",
    },
)
