"""A press written as text, for places that take a string: lmms-eval's ``--model_args``, a CLI
flag, a settings file written by ``mmpress tune``.

    visionzip:128             VisionZip keeping 128 visual tokens per image
    divprune:0.25             DivPrune keeping a quarter of them (keep_ratio)
    fastv:64@3                FastV at decoder layer 3 (an in-LLM press's ``layer``)
    divprune:64@2             DivPrune run inside the LM on the hidden states entering layer 2 (at_layer)
    visionzip:128+fastv:64    a composition, in the order a forward meets the stages
    none                      the unpressed model

``parse_press`` reads it, ``press_spec`` writes it back (``parse_press(press_spec(p)) == p`` for
every press the grammar can say), and ``load_press`` / ``save_press`` keep it in a JSON file
together with the adapter options (``positions``) and any further press fields.
"""

from __future__ import annotations

import json
import re
from dataclasses import fields
from pathlib import Path

from mmpress.presses.base import PRESSES, LayerPress, Press, get_press, press_suggestion
from mmpress.presses.compose import AtLayerPress, ComposedPress, at_layer, compose

_PART = re.compile(r"^(?P<name>[A-Za-z0-9_]+)(?::(?P<budget>[0-9.]+))?(?:@(?P<layer>-?[0-9]+))?$")


def parse_press(text: str, **fields_) -> Press | ComposedPress:
    """The press ``text`` names (grammar in the module docstring). ``fields_`` go to every part
    that has such a field (e.g. ``theta=0.5``); a field no part has raises."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("a press spec is a non-empty string, e.g. 'divprune:64' or 'visionzip:128+fastv:64'")
    parts = [_part(part.strip(), text) for part in text.split("+")]
    unused = set(fields_) - {f.name for p in parts for f in fields(p)}
    if unused:
        raise ValueError(f"no press in {text!r} has the field(s) {sorted(unused)}")
    if fields_:
        parts = [_with_fields(p, fields_) for p in parts]
    return parts[0] if len(parts) == 1 else compose(*parts)


def _part(part: str, text: str) -> Press:
    match = _PART.match(part)
    if match is None:
        raise ValueError(f"cannot read {part!r} in press spec {text!r}; write name[:keep or ratio][@layer], "
                         "e.g. divprune:64, divprune:0.25, fastv:64@3, joined by '+'")
    name, budget, layer = match["name"], match["budget"], match["layer"]
    if name not in PRESSES:
        raise ValueError(f"unknown press {name!r} in {text!r}; {press_suggestion(name)}")
    kwargs = {}
    if budget is not None:
        if re.fullmatch(r"[0-9]+", budget):
            kwargs["keep"] = int(budget)
        else:
            try:
                kwargs["keep_ratio"] = float(budget)
            except ValueError:
                raise ValueError(f"the budget in {part!r} is neither a token count (64) nor a ratio (0.25)") from None
    cls = PRESSES[name]
    if layer is None:
        return get_press(name, **kwargs)
    if issubclass(cls, LayerPress):
        if "layer" not in {f.name for f in fields(cls)}:
            raise ValueError(f"{name} sets its layers with its own fields, not '@layer'; write {name}:budget")
        return get_press(name, layer=int(layer), **kwargs)
    if cls.stage != "pre_llm":
        raise ValueError(f"{name} is a {cls.stage} press: '@layer' applies to in-LLM presses (their layer) or to "
                         f"pre-LLM selectors (run inside the LM, at_layer)")
    return at_layer(get_press(name, **kwargs), layer=int(layer))


def _with_fields(press: Press, given: dict) -> Press:
    from dataclasses import replace

    own = {k: v for k, v in given.items() if k in {f.name for f in fields(press)}}
    return replace(press, **own) if own else press


def press_spec(press: Press | ComposedPress) -> str:
    """The spec string of ``press``: budget and layer only (other fields go in ``save_press``'s
    ``fields``)."""
    if isinstance(press, ComposedPress):
        return "+".join(press_spec(p) for p in press.presses)
    if isinstance(press, AtLayerPress):
        return f"{press_spec(press.inner)}@{press.layer}"
    text = type(press).name if isinstance(getattr(type(press), "name", None), str) else press.name
    if press.keep is not None:
        text += f":{press.keep}"
    elif press.keep_ratio is not None:
        text += f":{press.keep_ratio}"
    if isinstance(press, LayerPress) and getattr(press, "layer", None) != getattr(type(press), "layer", None):
        text += f"@{press.layer}"
    return text


def save_press(path: str | Path, press: Press | ComposedPress | str, *, positions: str | None = None,
               **extra) -> Path:
    """Write ``{"press": spec, "positions": ..., ...extra}`` as JSON (``extra``: e.g. the tune
    search's figures, kept for the record and ignored by ``load_press``)."""
    spec = press if isinstance(press, str) else press_spec(press)
    parse_press(spec)  # never write a file that does not load
    path = Path(path)
    path.write_text(json.dumps({"press": spec, "positions": positions, **extra}, indent=2) + "\n")
    return path


def load_press(path: str | Path) -> Press | ComposedPress:
    """The press a settings file names (``save_press``; ``mmpress tune --out``). Its adapter options
    (``positions``) come from :func:`load_settings`."""
    return parse_press(load_settings(path)["press"], **load_settings(path).get("fields", {}))


def load_settings(path: str | Path) -> dict:
    """The settings file as a dict, checked: ``press`` (a spec) and ``positions`` (None, "keep" or
    "reindex")."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no press settings file at {path}; write one with `mmpress tune --out {path.name}`")
    try:
        settings = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not JSON ({err}); write it with `mmpress tune --out`") from None
    if not isinstance(settings, dict) or not isinstance(settings.get("press"), str):
        raise ValueError(f"{path} has no \"press\" spec string (e.g. {{\"press\": \"divprune:64\"}})")
    if settings.get("positions") not in (None, "keep", "reindex"):
        raise ValueError(f"positions in {path} must be null, \"keep\" or \"reindex\"; got {settings['positions']!r}")
    return settings
