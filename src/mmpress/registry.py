"""Which adapter applies a press to which model: a registry that ``mmpress.models`` fills and
``Press.__call__`` reads, so presses never import the adapters (which import presses)."""

from __future__ import annotations

from torch import nn

#: transformers ``model_type`` -> adapter class
ADAPTERS: dict[str, type] = {}


def get_adapter(model: nn.Module, **options):
    """The adapter for ``model`` (a transformers vision-language model)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"unsupported model {type(model).__name__} (model_type={model_type!r}); "
            f"mmpress supports these model types: {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[model_type](model, **options)
