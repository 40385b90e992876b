"""The toy world: procedural faces and pets, a base model trained on them, and judges that know the answer.

Research code beside the library: it uses :mod:`nested`; nothing in the library imports it. ``nested eval
--judges`` reaches the judges through the ``nested.judges`` entry point. The world's names are importable
from here (``from nested.toyworld import DOMAINS, render``); the base model is
:mod:`nested.toyworld.base_model`, the judges :mod:`nested.toyworld.judges`.
"""

from nested._lazy import lazy_exports

lazy_exports(
    globals(),
    {
        "RGB": "nested.toyworld.world",
        "WORLD_VERSION": "nested.toyworld.world",
        "DOMAINS": "nested.toyworld.world",
        "CLASS_WORDS": "nested.toyworld.world",
        "DEFAULT_TOKENS": "nested.toyworld.world",
        "SCENES": "nested.toyworld.world",
        "STYLES": "nested.toyworld.world",
        "EXPRESSIONS": "nested.toyworld.world",
        "FaceIdentity": "nested.toyworld.world",
        "PetIdentity": "nested.toyworld.world",
        "Identity": "nested.toyworld.world",
        "Context": "nested.toyworld.world",
        "contexts": "nested.toyworld.world",
        "Nuisance": "nested.toyworld.world",
        "identity_class": "nested.toyworld.world",
        "identities": "nested.toyworld.world",
        "split_identities": "nested.toyworld.world",
        "caption": "nested.toyworld.world",
        "parse_caption": "nested.toyworld.world",
        "render": "nested.toyworld.world",
        "render_pair": "nested.toyworld.world",
        "png_bytes": "nested.toyworld.world",
        "write_world_shards": "nested.toyworld.world",
    },
)
