"""Lightning callbacks: one home for every class a ``callbacks/*.yaml`` preset names.

``AdapterExport`` (the inference-ready adapter at every checkpoint), ``AdapterEMA`` (an EMA of the adapter),
``SampleGrid`` (sample grids and metrics during training), ``HubUpload`` (every export pushed to the Hub),
``DivergenceGuard`` (non-finite steps skipped, a diverged run stopped) and ``ProgressLog`` (progress lines in logs
written to files); ``nested fit`` always adds these two.
"""

from nested._lazy import lazy_exports

lazy_exports(
    globals(),
    {
        "AdapterEMA": "nested.callbacks.ema",
        "AdapterExport": "nested.callbacks.export",
        "DivergenceGuard": "nested.callbacks.divergence",
        "HubUpload": "nested.callbacks.hub_upload",
        "ProgressLog": "nested.callbacks.progress_log",
        "SampleGrid": "nested.callbacks.sample_grid",
    },
)
