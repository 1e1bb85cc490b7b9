"""Flax on packed rows: an ``attention_fn`` for Flax's own attention modules, and a layer with RoPE.

Axis legend: B batch, T row length (T_kv the key/value length in cross-attention), F the input
features (``in_features``), N query heads, K key/value heads (``num_kv_heads``, dividing N),
D head dim, S = ``max_segments_per_seq`` (the largest segment id).

- :func:`make_attention_fn` returns a function with Flax's ``attention_fn`` signature: pass it to
  a stock ``flax.nnx.MultiHeadAttention(attention_fn=...)`` or
  ``flax.linen.MultiHeadDotProductAttention(attention_fn=...)``, and give the module the batch's
  layout (an :class:`thdkit.AttentionPlan` or :class:`thdkit.Segments`) through its ``mask``
  argument, which Flax forwards untouched (or close over it when the module is built per call,
  as linen modules are). Parameters, checkpoints and the rest of the module stay Flax's.

Both take a layout as :class:`thdkit.Segments`, never as raw ids: build it with
``thdkit.Segments.from_ids(ids, positions)``, and with ``padding_id=-1`` where ids are numbered
from 0 (else the document with id 0 would be read as padding).

- :class:`PackedSelfAttention` is an NNX self-attention layer with Flax's argument names and
  parameter layout (``query``, ``key``, ``value``, ``out``: ``nnx.LinearGeneral``) plus what a
  packed decoder needs: RoPE from each token's position inside its document (:func:`rope`),
  grouped-query attention, one plan per batch shared by the layers, and context parallelism
  (:func:`thdkit.ring_attention`) on a mesh.

Attention-weight dropout and sowing the weights (Flax's ``dropout_rate`` / ``deterministic`` and
``sow_weights``) need the weights themselves: they run the dense path
(:func:`thdkit.dot_product_attention_weights`, O(B·N·T·T_kv) memory); everything else runs
thdkit's kernels, which never build a ``[T, T_kv]`` array.

Under ``jit`` nothing validates the values of a layout; ``PackedSelfAttention(...,
check_layout=True)`` adds :func:`thdkit.check_layout` (``jax.experimental.checkify``) for traced
layouts, so a step wrapped with ``checkify.checkify`` reports an id above S or a broken run.

Install with ``pip install "thdkit[flax]"``; the rest of thdkit never imports this
subpackage. Its modules: ``thdkit.flax.rotary``, ``thdkit.flax.plumbing`` (planning and
attending on a plan, shared), ``thdkit.flax.attention_fn`` and ``thdkit.flax.layer``.
"""

from thdkit.flax.attention_fn import make_attention_fn
from thdkit.flax.layer import PackedSelfAttention
from thdkit.flax.rotary import rope

__all__ = [
    "PackedSelfAttention",
    "make_attention_fn",
    "rope",
]
