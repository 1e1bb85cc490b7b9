"""Grain's and MaxText's names for the packed layout, to a plan and attention (the recipe of
docs/conventions.md); and docs/conventions.md's code runs as written.

Grain's packers emit, for each packed feature ``f``, ``f_segment_ids`` (1..n, 0 = padding) and
``f_positions`` (restarting at 0 in each document). MaxText renames them (its input pipeline's
``Rekey``) to ``inputs_segmentation`` / ``inputs_position`` in the batch and passes them to the
model as ``decoder_segment_ids`` / ``decoder_positions``. All of them are thdkit's layout as it is:
``thdkit.Segments.from_ids(ids, positions)``.
"""

from __future__ import annotations

import re
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np

import thdkit

T, N, H = 32, 2, 8
LENGTHS = [9, 14, 3, 20, 7, 5, 11]  # documents, packed into rows of T tokens


def _grain_batch() -> dict[str, np.ndarray]:
    docs = [{"inputs": np.arange(1, n + 1) + 100 * i} for i, n in enumerate(LENGTHS)]
    packed = grain.experimental.FirstFitPackIterDataset(
        grain.MapDataset.source(docs).to_iter_dataset(),
        length_struct={"inputs": T},
        num_packing_bins=3,
    )
    return next(iter(packed.batch(3)))


def _maxtext_batch(grain_batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """MaxText's Rekey of Grain's packed batch."""
    rekey = {"inputs_segmentation": "inputs_segment_ids", "inputs_position": "inputs_positions"}
    return {"inputs": grain_batch["inputs"]} | {new: grain_batch[old] for new, old in rekey.items()}


def _qkv(tokens: np.ndarray):
    """q, k, v of each token from its id (an embedding lookup), so a token's vectors do not
    depend on where the packer put it."""
    tables = jax.random.normal(jax.random.key(0), (3, 1000, N, H))
    return tuple(table[jnp.asarray(tokens)] for table in tables)


def _alone(tokens: np.ndarray, segment_ids: np.ndarray) -> dict[int, jax.Array]:
    """Every document of the batch alone in a row of its own (right padding, jax.nn's
    query_seq_lengths), with causal attention: token id -> output."""
    rows, lengths = [], []
    for b in range(tokens.shape[0]):
        for s in np.unique(segment_ids[b][segment_ids[b] > 0]):
            doc = tokens[b][segment_ids[b] == s]
            rows.append(np.pad(doc, (0, T - len(doc))))
            lengths.append(len(doc))
    rows, lengths = np.array(rows), jnp.asarray(lengths, jnp.int32)
    q, k, v = _qkv(rows)
    options = dict(
        is_causal=True,
        query_seq_lengths=lengths,
        key_value_seq_lengths=lengths,
        implementation="reference",
    )
    out = jax.jit(lambda q, k, v: thdkit.dot_product_attention(q, k, v, **options))(q, k, v)
    return {int(rows[r, t]): out[r, t] for r in range(len(rows)) for t in range(int(lengths[r]))}


def test_grain_names_to_a_plan_and_attention():
    batch = _grain_batch()
    assert batch["inputs_segment_ids"].max() >= 2  # several documents a row
    # The recipe: Grain's names are thdkit's layout.
    segments = thdkit.Segments.from_ids(batch["inputs_segment_ids"], batch["inputs_positions"])
    plan = thdkit.plan_attention(segments, mask_type="padding_causal", max_segments_per_seq=T)
    q, k, v = _qkv(batch["inputs"])
    out = jax.jit(lambda q, k, v: thdkit.attention(q, k, v, plan=plan))(q, k, v)
    alone = _alone(batch["inputs"], batch["inputs_segment_ids"])
    real = np.argwhere(batch["inputs_segment_ids"] > 0)
    assert len(real) == sum(LENGTHS)
    for b, t in real:
        np.testing.assert_allclose(out[b, t], alone[int(batch["inputs"][b, t])], atol=2e-6)
    assert np.all(np.asarray(out)[batch["inputs_segment_ids"] == 0] == 0)


def maxtext_style_attention(query, key, value, decoder_segment_ids, decoder_positions):
    """What a MaxText attention layer's call becomes: its arguments passed as they are."""
    return thdkit.dot_product_attention(
        query, key, value, is_causal=True, segment_ids=decoder_segment_ids,
        segment_positions=decoder_positions, implementation="reference",
    )  # fmt: skip


def test_maxtext_names_packed_and_unpacked():
    batch = _maxtext_batch(_grain_batch())
    q, k, v = _qkv(batch["inputs"])
    out = jax.jit(maxtext_style_attention)(
        q, k, v, batch["inputs_segmentation"], batch["inputs_position"]
    )
    alone = _alone(batch["inputs"], batch["inputs_segmentation"])
    for b, t in np.argwhere(batch["inputs_segmentation"] > 0):
        np.testing.assert_allclose(out[b, t], alone[int(batch["inputs"][b, t])], atol=2e-6)
    # Without packing MaxText marks tokens 1 and padding 0, positions 0, 1, 2, ...: the same call
    # is jax.nn's right padding.
    lengths = np.array([T, 12, 1])
    segmentation = (np.arange(T)[None, :] < lengths[:, None]).astype(np.int32)
    position = np.broadcast_to(np.arange(T), (3, T))
    got = jax.jit(maxtext_style_attention)(q, k, v, segmentation, position)
    want = jax.nn.dot_product_attention(
        q, k, v, is_causal=True, query_seq_lengths=jnp.asarray(lengths, jnp.int32),
        key_value_seq_lengths=jnp.asarray(lengths, jnp.int32),
    )  # fmt: skip
    np.testing.assert_allclose(got, want, atol=2e-6)


def test_conventions_doc_runs():
    """Every python block of docs/conventions.md runs, in order, in one namespace."""
    path = Path(__file__).resolve().parent.parent / "docs" / "conventions.md"
    blocks = re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), re.S)
    assert len(blocks) >= 10
    namespace: dict[str, object] = {"__name__": "docs_conventions"}
    for block in blocks:
        exec(compile(block, str(path), "exec"), namespace)
    assert namespace["cu_seqlens"].tolist() == [0, 3, 5, 6]
