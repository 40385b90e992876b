"""Sharing adapters on the Hugging Face Hub: :func:`push_adapter` and the model card.

``HubUpload`` lives in :mod:`nested.callbacks`; ``nested.hub.HubUpload``, the path older configs name,
still resolves to it.
"""

from nested._lazy import lazy_exports

lazy_exports(
    globals(),
    {
        "push_adapter": "nested.hub.push",
        "write_model_card": "nested.hub.push",
        "model_card": "nested.hub.model_card",
        "redact": "nested.hub.model_card",
        # An older home, kept so that saved configs and checkpoints still load.
        "HubUpload": "nested.callbacks.hub_upload",
    },
)
