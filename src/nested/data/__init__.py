"""Training data: domains and transforms, writing shards, the training and validation streams, the DataModule.

The names below are imported on first use: ``nested shards`` (the writer) never imports Lightning.
"""

from nested._lazy import lazy_exports

lazy_exports(
    globals(),
    {
        "NestedDataModule": "nested.data.datamodule",
        "SKIP_KEYS": "nested.data.domains",
        "DomainSpec": "nested.data.domains",
        "SkipCounter": "nested.data.domains",
        "check_urls": "nested.data.domains",
        "expand_urls": "nested.data.domains",
        "ReferenceAugment": "nested.data.transforms",
        "TargetView": "nested.data.transforms",
        "bbox_square": "nested.data.transforms",
        "contains_subject": "nested.data.transforms",
        "insert_subject": "nested.data.transforms",
        "reference_transform": "nested.data.transforms",
        "target_transform": "nested.data.transforms",
        "build_stream": "nested.data.loading",
        "collate_batch": "nested.data.loading",
        "samples_per_worker": "nested.data.loading",
        "ShardReport": "nested.data.shards",
        "build_shards": "nested.data.shards",
    },
)
