"""Silence removal by energy: the short-time-energy voice activity detection of speech front ends
(Rabiner and Sambur, "An algorithm for determining the endpoints of isolated utterances", Bell
System Technical Journal 1975; the practice of ``librosa.effects.split``: frames whose energy lies
far below the clip's loudest are silence), as a budgeted press on audio tokens."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from mmpress.ops.audio import loudest
from mmpress.presses.base import SelectorPress, VisualContext, register


@register
@dataclass
class SilencePress(SelectorPress):
    """Drops the quietest tokens: keeps the k tokens whose input frames carry the most energy.

    Signal: ``ctx.audio_energy`` (M, N), the mean log-mel energy of the input frames each token
    covers (the adapter's; silence and steady low noise are low). Within a clip, energy VAD
    calls a frame silent when its energy lies far below the loudest frame's; ranking by energy
    and keeping the top k drops exactly those frames first, relative to the clip and whatever the
    recording level. Ties (silence padding: many frames of one value) keep the earlier frame.
    The kept tokens are returned verbatim, in time order.

    Why a budget, not a threshold: a press returns the same number of tokens for every clip of a
    group (one (M, k) selection), and a threshold gives each clip its own count; the budget also
    makes silence comparable with every other press at a fixed cost. A clip with less silence
    than N - k loses its quietest speech frames too: pick the budget from the data (``mmpress
    tune``). Positions: renumbered 0..L'-1 by default (a shorter placeholder run, as pre-LLM
    audio pruning inserts it, ``official_positions``); ``positions="keep"`` keeps the original
    ids, so the kept speech keeps its time offsets.
    """

    name = "silence"
    paper = "energy VAD: Rabiner & Sambur, Bell Syst. Tech. J. 1975"
    needs = ("audio_energy",)

    def select(self, tokens: Tensor, ctx: VisualContext, k: int) -> Tensor:
        energy = ctx.require("audio_energy")
        if energy.shape != tokens.shape[:2]:
            raise ValueError(f"audio_energy {tuple(energy.shape)} must hold one value per token of the "
                             f"{tuple(tokens.shape[:2])} tokens; the adapter gave a mismatched signal")
        return loudest(energy, k)
