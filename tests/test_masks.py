"""Mask type names, aliases and the rel predicate."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from thdkit import MaskType
from thdkit._src.masks import rel

NAMES = {
    "no_mask": MaskType.NO_MASK,
    "padding": MaskType.PADDING,
    "causal": MaskType.CAUSAL,
    "padding_causal": MaskType.PADDING_CAUSAL,
    "causal_padding": MaskType.PADDING_CAUSAL,
    "causal_bottom_right": MaskType.CAUSAL_BOTTOM_RIGHT,
    "bottom_right_causal": MaskType.CAUSAL_BOTTOM_RIGHT,
    "padding_causal_bottom_right": MaskType.PADDING_CAUSAL_BOTTOM_RIGHT,
    "causal_padding_bottom_right": MaskType.PADDING_CAUSAL_BOTTOM_RIGHT,
    "bottom_right_causal_padding": MaskType.PADDING_CAUSAL_BOTTOM_RIGHT,
    "bottom_right_padding_causal": MaskType.PADDING_CAUSAL_BOTTOM_RIGHT,
}


@pytest.mark.parametrize(("name", "member"), NAMES.items())
def test_names_and_aliases(name, member):
    assert MaskType.parse(name) is member
    assert MaskType.parse(name.upper()) is member
    assert MaskType.parse(member) is member


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown mask_type 'top_left'; valid names: ") as info:
        MaskType.parse("top_left")
    for name in NAMES:
        assert name in str(info.value)


def test_rel_predicates():
    pos_q = jnp.array([0, 1, 2])[:, None]
    pos_kv = jnp.array([0, 1, 2, 3])[None, :]
    assert rel(MaskType.PADDING, pos_q, pos_kv, 3, 4) is True
    np.testing.assert_array_equal(rel(MaskType.CAUSAL, pos_q, pos_kv, 3, 4), pos_q >= pos_kv)
    # Bottom-right: the last query (key 1) sees every key (keys 4..1); the first sees 2 of 4.
    np.testing.assert_array_equal(
        rel(MaskType.CAUSAL_BOTTOM_RIGHT, pos_q, pos_kv, 3, 4),
        [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]],
    )
