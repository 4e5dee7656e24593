"""Qwen3-VL (transformers ``Qwen3VLForConditionalGeneration``): the Qwen-VL family file plus
DeepStack.

Qwen3-VL adds features of several vision blocks to the hidden states of its first language-model
layers, at the visual positions (``visual_pos_masks`` (B, L) and ``deepstack_visual_embeds``, one
(visual tokens, D) tensor per injected layer, in row-major order of the mask). A press keeps the
same tokens there as in the input embeddings: the pressed mask marks the kept visual tokens, and
each layer's features are those of the kept tokens, in the same order. A merging press (ToMe,
VisionZip's contextual tokens, PruMerge, temporal_merge) merges the input embeddings only: the
merged token gets the DeepStack features of the token whose position it takes.
"""

from __future__ import annotations

from torch import Tensor

from mmpress.models.base import family
from mmpress.models.qwen_vl import QwenVLAdapter
from mmpress.ops.sequence import flat_positions, gather_rows


@family
class Qwen3VLAdapter(QwenVLAdapter):
    """Applies presses to a Qwen3-VL model, DeepStack features pressed with the same kept tokens."""

    family = "qwen3_vl"
    model_types = ("qwen3_vl",)
    classes = ("Qwen3VLForConditionalGeneration",)
    deepstack = True
    # in-vision: the tower on kept units (DeepStack features of the kept units placed as the tokens)
    # and downsampling; ToMe is not run here (a DeepStack feature taken mid-tower would stand for
    # units that later blocks merge further)
    vision_modes = frozenset({"drop", "resize"})

    @classmethod
    def build(cls, size: str = "tiny", seed: int = 0, attn: str = "sdpa", model_type: str | None = None, **overrides):
        """As Qwen-VL's; "tiny" has 4 LM layers, so that an in-LLM press has a layer after the 3
        DeepStack injections (layer 3) to act at."""
        if size == "tiny":
            overrides.setdefault("lm_layers", 4)
        return super().build(size, seed=seed, attn=attn, model_type=model_type, **overrides)

    @staticmethod
    def _vision_config(model_type: str, shape: dict, text: dict) -> dict:
        """Full attention, DeepStack features from 3 blocks, interleaved M-RoPE."""
        width, depth = shape["vision_hidden"], shape["vision_layers"]
        text["head_dim"] = shape["lm_hidden"] // shape["lm_heads"]
        text["rope_scaling"] = {**text.pop("rope_scaling"), "rope_type": "default", "mrope_interleaved": True}
        text["rope_scaling"].pop("type", None)
        return dict(hidden_size=width, intermediate_size=shape["vision_intermediate"] or width * 4,
                    out_hidden_size=shape["lm_hidden"], num_position_embeddings=2304,
                    deepstack_visual_indexes=[depth // 4, depth // 2, 3 * depth // 4])

    @staticmethod
    def _medium_tokens(config, grid: tuple[int, int, int], video: bool) -> list[int]:
        """Qwen3-VL lays a video out frame by frame: a timestamp (its processor writes "<t seconds>";
        one text token stands for it here), then the frame between vision-start / vision-end."""
        if not video:
            return QwenVLAdapter._medium_tokens(config, grid, video)
        frame = QwenVLAdapter._medium_tokens(config, (1, *grid[1:]), video)
        return [t for _ in range(grid[0]) for t in (11, *frame)]

    def check_stages(self, stages: dict) -> None:
        super().check_stages(stages)
        press = stages.get("in_llm")
        injected = len(self.config.vision_config.deepstack_visual_indexes or ())
        if press is not None and press.layers()[0] < injected:
            raise ValueError(f"Qwen3-VL adds DeepStack features to the visual tokens entering layers 1..{injected}: "
                             f"an in-LLM press must act at layer {injected} or later (got layer {press.layers()[0]})")

    def press_extras(self, kwargs: dict, keep: Tensor, visual: Tensor, src: Tensor, new_mask: Tensor,
                     kept_visual: int) -> dict:
        masks, features = kwargs.get("visual_pos_masks"), kwargs.get("deepstack_visual_embeds")
        if masks is None or features is None:
            return kwargs
        rank = visual.reshape(-1).cumsum(0) - 1  # index of each visual position in the features
        kept = rank[flat_positions(keep & visual, kept_visual)]  # kept ones, row-major: the pressed order
        return {**kwargs, "visual_pos_masks": gather_rows(keep & visual, src) & new_mask,
                "deepstack_visual_embeds": [f.index_select(0, kept.to(f.device)) for f in features]}
