"""nested: Nested Attention personalization of text-to-image diffusion models.

The names users need are importable from here, each on first use, so ``import nested`` loads neither torch
nor diffusers nor Lightning::

    from nested import NestedPipeline, Subject          # inference
    from nested import NestedAdapter, SubjectBinding    # an adapter on a UNet you hold
    from nested import NestedAttentionModule, NestedDataModule  # training

The layers, from the core up (each imports only from those before it): the core (``attention``,
``adapter``, ``encoder``, ``tokens``, ``backbone``, ``quantize``, ``errors``, ``testing``); ``data``,
``inference`` and ``hub``; ``evaluation``; ``training`` and ``callbacks``; ``cli``. ``toyworld`` is research code that uses
the library; the library never imports it.
"""

from nested._lazy import lazy_exports
from nested.library_messages import quiet_library_messages

__version__ = "0.1.0"
quiet_library_messages()  # filters only: the libraries whose messages they drop are imported later

lazy_exports(
    globals(),
    {
        # the method
        "nested_attention": "nested.attention",
        "NestedAttnProcessor": "nested.attention",
        "NestedSubject": "nested.attention",
        "NestedAdapter": "nested.adapter",
        "SubjectBinding": "nested.adapter",
        "AdapterConfig": "nested.adapter",
        "EncoderSpec": "nested.encoder",
        "SubjectEncoder": "nested.encoder",
        "DiffusionBackbone": "nested.backbone",
        "TransformerBackbone": "nested.backbone",
        # inference
        "NestedPipeline": "nested.inference.pipeline",
        "Subject": "nested.inference.subjects",
        "load_image": "nested.inference.subjects",
        # training
        "NestedAttentionModule": "nested.training.module",
        "ConditioningDropout": "nested.training.module",
        "NestedDataModule": "nested.data.datamodule",
        "DomainSpec": "nested.data.domains",
        # sharing
        "push_adapter": "nested.hub.push",
        # what users get wrong
        "NestedUserError": "nested.errors",
    },
)
__all__ = ["__version__", *__all__]  # noqa: F821  (lazy_exports defined it)
