"""Presses: one module per method family. Importing this package registers every press."""

from mmpress.presses import (  # noqa: F401
    baselines, cdpruner, dart, divprune, evs, fastvid, holov, mmtok, prumerge, temporal_merge, tome, visionzip,
    vispruner, vtc_cls,
)
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
