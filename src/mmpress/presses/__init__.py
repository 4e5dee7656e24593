"""Presses: one module per method family. Importing this package registers every press."""

from mmpress.presses import baselines, dart, divprune, mmtok, prumerge, tome, visionzip, vtc_cls  # noqa: F401
from mmpress.presses.base import (
    PRESSES,
    Press,
    ScorerPress,
    SelectorPress,
    VisualContext,
    get_press,
    list_presses,
    register,
)

__all__ = [
    "PRESSES", "Press", "ScorerPress", "SelectorPress", "VisualContext", "get_press", "list_presses", "register",
]
