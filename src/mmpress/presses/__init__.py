"""Presses: one module per method family. Importing this package registers every press."""

from mmpress.presses import (  # noqa: F401
    baselines, cdpruner, dart, divprune, downsample, evs, fastv, fastvid, holov, lookm, mmtok, pdrop, prumerge, snapkv, sparsevlm,
    static_patches, temporal_merge, tome, tome_vit, visionzip, vispruner, vtc_cls, vtw,
)
from mmpress.presses import globalcom2, hiprune, scope  # noqa: F401  (AnyRes-aware presses)
from mmpress.presses import audio_merge, fastadasp, samp, silence  # noqa: F401  (audio presses)
from mmpress.presses.base import (
    PRESSES,
    KVPress,
    LayerPress,
    Press,
    ScorerPress,
    SelectorPress,
    VisualContext,
    get_press,
    list_presses,
    register,
)
from mmpress.presses.compose import AtLayerPress, ComposedPress, at_layer, compose

__all__ = [
    "PRESSES", "AtLayerPress", "ComposedPress", "KVPress", "LayerPress", "Press", "ScorerPress", "SelectorPress", "VisualContext",
    "at_layer", "compose", "get_press", "list_presses", "register",
]
