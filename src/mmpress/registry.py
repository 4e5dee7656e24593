"""Which adapter applies a press to which model: a registry that the family files fill (the
``@family`` decorator, imported by ``mmpress.models``) and ``Press.__call__``, ``eval/`` and the
CLI read, so none of them names a family (and presses never import the adapters)."""

from __future__ import annotations

from torch import nn

#: transformers ``model_type`` -> adapter class
ADAPTERS: dict[str, type] = {}
#: family name (``mmpress list``, ``bench-cost --arch``) -> adapter class
FAMILIES: dict[str, type] = {}


def family(cls: type) -> type:
    """Class decorator of a family file's adapter: registers it under its ``family`` name and
    every transformers ``model_type`` it adapts."""
    if not cls.family or cls.family in FAMILIES or not cls.model_types:
        raise ValueError(f"family {cls.family!r} is empty, already registered, or names no model_types")
    taken = [t for t in cls.model_types if t in ADAPTERS]
    if taken:
        raise ValueError(f"model types {taken} already have an adapter")
    FAMILIES[cls.family] = cls
    ADAPTERS.update(dict.fromkeys(cls.model_types, cls))
    return cls


def supported() -> str:
    """The model classes mmpress adapts, for error messages."""
    names = sorted({name for cls in FAMILIES.values() for name in cls.classes})
    return ", ".join(names)


def family_of(model_or_config) -> type:
    """The adapter class of a model (or its config), by ``config.model_type``."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(f"unsupported model {type(model_or_config).__name__} (model_type={model_type!r}); "
                         f"mmpress supports: {supported()}")
    return ADAPTERS[model_type]


def get_adapter(model: nn.Module, **options):
    """The adapter for ``model`` (a transformers vision-language model)."""
    return family_of(model)(model, **options)
