"""ops.sequence (sync-free compaction) against naive references, and models.protocol."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mmpress.models.protocol import Protocol, check_version, protocol, supported_range
from mmpress.ops.sequence import compact_index, flat_positions, gather_rows


@st.composite
def keep_masks(draw):
    b, length = draw(st.integers(1, 5)), draw(st.integers(1, 12))
    bits = draw(st.lists(st.booleans(), min_size=b * length, max_size=b * length))
    return torch.tensor(bits).view(b, length)


@settings(max_examples=60, deadline=None)
@given(keep=keep_masks(), extra=st.integers(0, 3))
def test_compact_index_left_pads_the_kept_entries_in_order(keep, extra):
    width = int(keep.sum(1).max()) + extra
    x = torch.arange(keep.numel()).view(keep.shape) * 10 + 1
    src, mask = compact_index(keep, width)
    got = gather_rows(x, src)
    for row in range(keep.shape[0]):
        kept = x[row][keep[row]]  # naive: boolean index, then pad on the left
        pad = width - kept.numel()
        assert mask[row].tolist() == [False] * pad + [True] * kept.numel()
        assert got[row, pad:].tolist() == kept.tolist()


@settings(max_examples=60, deadline=None)
@given(keep=keep_masks())
def test_flat_positions_equal_nonzero(keep):
    count = int(keep.sum())
    assert flat_positions(keep, count).tolist() == keep.view(-1).nonzero()[:, 0].tolist()


def test_gather_rows_keeps_trailing_dims():
    x = torch.randn(2, 5, 3, 4)
    src = torch.tensor([[4, 0], [1, 1]])
    assert torch.equal(gather_rows(x, src)[1, 0], x[1, 1]) and gather_rows(x, src).shape == (2, 2, 3, 4)


def test_protocol_reads_the_cache_keyword_from_signatures():
    class New(torch.nn.Module):
        def forward(self, inputs_embeds=None, cache=None, mm_encoder_outputs=None): ...

    class Old(torch.nn.Module):
        def forward(self, inputs_embeds=None, past_key_values=None): ...

    class Neither(torch.nn.Module):
        def forward(self, inputs_embeds=None): ...

    assert protocol(New(), New()) == Protocol(cache="cache", encoded_images="mm_encoder_outputs")
    assert protocol(Old(), Old()) == Protocol(cache="past_key_values", encoded_images=None)
    with pytest.raises(ValueError, match="not supported"):
        protocol(Old(), Neither())
    p = protocol(New(), New())
    sentinel = object()
    assert p.cache_of({"cache": sentinel}) is sentinel and p.cache_of({"past_key_values": sentinel}) is sentinel
    assert p.starts_generate({"mm_encoder_outputs": {}}) and not p.starts_generate({"mm_encoder_outputs": None})


def test_installed_transformers_matches_the_adapter_protocol():
    from conftest import tiny_llava

    llava = tiny_llava().model
    params = inspect.signature(llava.language_model.forward).parameters
    assert protocol(llava, llava.language_model).cache in params


def test_a_version_outside_the_declared_range_warns():
    spec = supported_range()
    assert spec is not None and "<" in spec and ">=" in spec, "pyproject must declare transformers>=A,<B"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_version()  # the installed one is in range: CI runs both ends
    with pytest.warns(UserWarning, match="tested with transformers"):
        assert not check_version("99.0.0")
