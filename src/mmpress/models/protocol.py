"""transformers' call protocol, in one place, read from the installed version's signatures.

transformers renames the arguments its models pass to each other between minor releases
(5.24: the language model's ``past_key_values`` became ``cache``; later 5.x: ``generate``
encodes images first and passes them as ``mm_encoder_outputs``). Adapters ask this module
instead of guessing, and a version outside the range mmpress is tested on warns once at import.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from importlib import metadata

import transformers
from packaging.requirements import Requirement
from packaging.version import Version
from torch import nn

CACHE_NAMES = ("cache", "past_key_values")  # newest first


def supported_range() -> str | None:
    """The transformers specifier mmpress declares (pyproject: the tested range), or None when
    mmpress runs from a source tree without installed metadata."""
    try:
        requires = metadata.requires("mmpress") or []
    except metadata.PackageNotFoundError:
        return None
    for line in requires:
        req = Requirement(line)
        if req.name == "transformers" and not req.marker:
            return str(req.specifier)
    return None


def check_version(version: str = transformers.__version__) -> bool:
    """Warn (once, at import) when the installed transformers is outside the tested range."""
    spec = supported_range()
    if spec is None or Requirement(f"transformers{spec}").specifier.contains(Version(version), prereleases=True):
        return True
    warnings.warn(f"mmpress is tested with transformers{spec}, found {version}: its call protocol changes "
                  f"between minor releases, so pressed decoding may break; install a version in that range",
                  stacklevel=2)
    return False


@dataclass(frozen=True)
class Protocol:
    """How a vision-language model and its language model call each other.

    cache:          keyword under which the language model receives the KV cache.
    encoded_images: keyword under which the VLM's forward receives images ``generate`` encoded
                    beforehand (``mm_encoder_outputs``), or None when it always gets pixels.
    """

    cache: str
    encoded_images: str | None

    def cache_of(self, kwargs: dict):
        """The KV cache in a call's kwargs (also under the deprecated alias, if a caller used it)."""
        for name in (self.cache, *CACHE_NAMES):
            if kwargs.get(name) is not None:
                return kwargs[name]
        return None

    def starts_generate(self, kwargs: dict) -> bool:
        """Whether a VLM forward is the first step of a ``generate`` call: generate passes a dict
        of pre-encoded images (empty without images) on its first step only; forward passes None."""
        return self.encoded_images is not None and kwargs.get(self.encoded_images) is not None

    def encoded_in(self, kwargs: dict, modality: str = "image") -> list | None:
        """Per-item feature tensors of ``modality`` ("image", "video") that ``generate`` encoded
        beforehand, or None."""
        encoded = kwargs.get(self.encoded_images) if self.encoded_images else None
        output = (encoded or {}).get(modality)
        return None if output is None else list(output.pooler_output)


def protocol(vlm: nn.Module, language_model: nn.Module) -> Protocol:
    lm_params = inspect.signature(language_model.forward).parameters
    cache = next((name for name in CACHE_NAMES if name in lm_params), None)
    if cache is None:
        raise ValueError(f"{type(language_model).__name__}.forward takes none of {CACHE_NAMES}: this transformers "
                         f"({transformers.__version__}) is not supported; install one in {supported_range()}")
    encoded = "mm_encoder_outputs" if "mm_encoder_outputs" in inspect.signature(vlm.forward).parameters else None
    return Protocol(cache=cache, encoded_images=encoded)


def cache_length(cache, layer: int = 0) -> int:
    """Tokens held by a KV cache's ``layer`` (0 for None); a host integer, read from shapes, no sync."""
    return 0 if cache is None else int(cache.get_seq_length(layer))
