"""Bad and edge inputs of the jax.nn-compatible entry points, as a user of jax.nn would try them.

``thdkit.dot_product_attention`` and ``thdkit.dot_product_attention_weights``: values outside
int32 raise (never wrap), ``implementation`` names as jax.nn and the registry give them, empty
sequences, ``padding_id``, and every error naming the caller's own argument (and, for layout
errors, the row and the token). Shapes are fixed and small: most cases raise before compiling.
"""

from __future__ import annotations

import ast
import inspect
import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import thdkit
from thdkit._src.doors import jax_nn as dot_product
from thdkit._src.doors import jax_nn_layout
from thdkit._src.kernels import base

B, T, N, H = 2, 8, 2, 4
KEYS = jax.random.split(jax.random.key(0), 3)
Q = jax.random.normal(KEYS[0], (B, T, N, H))
K = jax.random.normal(KEYS[1], (B, T, N, H))
V = jax.random.normal(KEYS[2], (B, T, N, H))
IDS = np.array([[1, 1, 1, 2, 2, 0, 0, 3], [1, 1, 2, 2, 2, 2, 3, 3]])
POS = np.array([[0, 1, 2, 0, 1, 2, 0, 0], [0, 1, 0, 1, 2, 3, 0, 1]])
CORE_WORDS = ("q_segments", "kv_segments", "segment_pos ", "segment_pos_q", "context parallel")


def attend(**kwargs):
    return thdkit.dot_product_attention(Q, K, V, **kwargs)


def weights(**kwargs):
    kwargs.pop("implementation", None)
    return thdkit.dot_product_attention_weights(Q, K, **kwargs)


def dense(**kwargs):  # the dense path (a mask) of the attention
    return thdkit.dot_product_attention(Q, K, V, mask=jnp.ones((T, T), bool), **kwargs)


FUNCTIONS = {"attention": attend, "weights": weights, "dense": dense}


def raises(error, fn, *words, **kwargs) -> str:
    """Calls fn, asserts the exception type and that every word is in the message."""
    with pytest.raises(error) as info:
        fn(**kwargs)
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    for word in CORE_WORDS:
        assert word not in message, f"{word!r} in {message!r}"
    return message


# --- 1. Values outside int32 raise, never wrap -----------------------------------------------

WIDE = [2**31, 2**32 + 3, 2**32, 2**40, -(2**31) - 1, -(2**40)]


@pytest.mark.parametrize("function", list(FUNCTIONS))
@pytest.mark.parametrize("value", WIDE)
def test_int64_ids_outside_int32_raise(function, value):
    ids = IDS.astype(np.int64)
    ids[1, 6] = value
    raises(
        ValueError, FUNCTIONS[function], "segment_ids", "row 1, token 6", str(value), "int32",
        segment_ids=ids, implementation="reference",
    )  # fmt: skip


@pytest.mark.parametrize("value", WIDE)
def test_int64_positions_outside_int32_raise(value):
    pos = POS.astype(np.int64)
    pos[0, 4] = value
    raises(
        ValueError, attend, "segment_positions", "row 0, token 4", str(value), "int32",
        segment_ids=IDS, segment_positions=pos, implementation="reference",
    )  # fmt: skip


@pytest.mark.parametrize("name", ["query_seq_lengths", "key_value_seq_lengths"])
@pytest.mark.parametrize("value", [2**31, 2**32 + 3, 2**40, -(2**40)])
def test_int64_seq_lengths_outside_int32_raise(name, value):
    lengths = np.array([8, value], np.int64)
    raises(ValueError, attend, name, "row 1", str(value), "int32", **{name: lengths})
    raises(ValueError, weights, name, "row 1", **{name: lengths})


def test_wide_values_in_other_containers_raise():
    big = [[1] * 7 + [2**40], [1] * 8]  # a nested list of Python ints
    raises(ValueError, attend, "segment_ids", "row 0, token 7", segment_ids=big)
    huge = [[1] * 7 + [2**70]] * 2  # beyond int64: an object array
    raises(ValueError, attend, "segment_ids", "row 0, token 7", segment_ids=huge)
    ids = IDS.astype(np.uint32)
    ids[0, 7] = 2**32 - 1
    raises(ValueError, attend, "segment_ids", "row 0, token 7", "4294967295", segment_ids=ids)
    pair = (IDS, np.where(IDS == 3, 2**33, IDS))
    raises(ValueError, attend, "segment_ids[1]", "row 0, token 7", segment_ids=pair)


@pytest.mark.parametrize("padding_id", [0, -1])
def test_ids_above_the_accepted_range_blame_the_ids(padding_id):
    for value in (2**30, 2**31 - 1):
        ids = np.where(IDS == 3, value, IDS) + padding_id
        message = raises(
            ValueError, attend, "segment_ids", "row 0, token 7", "MAX_SEGMENTS",
            segment_ids=ids, padding_id=padding_id,
        )  # fmt: skip
        assert "max_segments_per_seq" not in message  # the caller did not pass it


def test_int64_values_under_x64_raise_and_small_ones_run():
    with jax.enable_x64(True):
        ids = jnp.asarray(IDS, jnp.int64).at[0, 7].set(2**32 + 3)
        raises(ValueError, attend, "segment_ids", "row 0, token 7", segment_ids=ids)
        pos = jnp.asarray(POS, jnp.int64).at[1, 0].set(2**40)
        raises(
            ValueError, attend, "segment_positions", "row 1, token 0",
            segment_ids=IDS, segment_positions=pos,
        )  # fmt: skip
        lengths = jnp.array([8, 2**40], jnp.int64)
        raises(ValueError, weights, "query_seq_lengths", segment_ids=IDS, query_seq_lengths=lengths)
        wide = attend(segment_ids=jnp.asarray(IDS, jnp.int64), implementation="reference")
    narrow = attend(segment_ids=IDS.astype(np.int32), implementation="reference")
    np.testing.assert_allclose(wide, narrow, atol=1e-6)
    assert not jax.config.read("jax_enable_x64")  # nothing leaks out of the block


# --- 2. implementation="xla" with bias or mask runs the dense path -----------------------------


def test_xla_with_bias_and_mask_runs_the_dense_path_as_jax_nn():
    bias = jax.random.normal(KEYS[0], (1, N, T, T))
    mask = jnp.tril(jnp.ones((T, T), bool))

    def ours(q, k, v, bias):
        return thdkit.dot_product_attention(q, k, v, bias, mask, implementation="xla")

    def theirs(q, k, v, bias):
        return jax.nn.dot_product_attention(q, k, v, bias, mask, implementation="xla")

    def outputs_and_grads(fn):
        def loss(*args):
            return jnp.sum(jnp.sin(fn(*args)))

        return fn(Q, K, V, bias), jax.grad(loss, argnums=(0, 1, 2, 3))(Q, K, V, bias)

    (got, got_grads), (want, want_grads) = map(outputs_and_grads, (ours, theirs))
    np.testing.assert_allclose(got, want, atol=2e-6)
    for g, r in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, r, atol=1e-5)
    np.testing.assert_array_equal(
        thdkit.dot_product_attention(Q, K, V, mask=mask, implementation="xla"),
        thdkit.dot_product_attention(Q, K, V, mask=mask),
    )


@pytest.mark.parametrize("implementation", ["blockwise", "pallas", "cudnn"])
@pytest.mark.parametrize("extra", ["bias", "mask"])
def test_kernels_refuse_bias_and_mask_naming_the_callers_choice(implementation, extra):
    value = jnp.zeros((T, T)) if extra == "bias" else jnp.ones((T, T), bool)
    message = raises(
        NotImplementedError, attend, "implementation", repr(implementation), extra,
        implementation=implementation, **{extra: value},
    )  # fmt: skip
    others = {"blockwise", "pallas", "cudnn"} - {implementation}
    assert not any(repr(other) in message for other in others), message


def test_xla_errors_name_xla():
    plan = thdkit.plan_attention(
        thdkit.Segments.from_ids(IDS), mask_type="padding", max_segments_per_seq=3
    )
    message = raises(ValueError, attend, "implementation", plan=plan, implementation="xla")
    assert "blockwise" not in message
    raises(ValueError, attend, "implementation", "'XLA'", "'xla'", implementation="XLA")


# --- 3. Empty sequences ------------------------------------------------------------------------

EMPTY = [(1, 0, 0), (0, 0, 0), (2, 0, 8), (2, 8, 0), (0, 8, 0)]


@pytest.mark.parametrize(("b", "t", "s"), EMPTY)
@pytest.mark.parametrize("packed", [False, True])
def test_empty_sequences_give_empty_results_and_gradients(b, t, s, packed):
    q, k, v = jnp.ones((b, t, 4, 8)), jnp.ones((b, s, 2, 8)), jnp.ones((b, s, 2, 8))
    options = {}
    if packed:
        ids = tuple(np.ones((b, n), np.int64) for n in (t, s))
        pos = tuple(np.broadcast_to(np.arange(n), (b, n)) for n in (t, s))
        options = dict(segment_ids=ids, segment_positions=pos)
    want = jax.nn.dot_product_attention(q, k, v)
    for is_causal in (False, True):
        out = thdkit.dot_product_attention(q, k, v, is_causal=is_causal, **options)
        assert out.shape == want.shape == (b, t, 4, 8) and out.dtype == q.dtype
        np.testing.assert_array_equal(out, want)  # zeros (no key) or empty
        w = thdkit.dot_product_attention_weights(q, k, is_causal=is_causal, **options)
        assert w.shape == (b, 4, t, s) and w.dtype == q.dtype

    def loss(q, k, v):
        out = thdkit.dot_product_attention(q, k, v, is_causal=True, **options)
        return jnp.sum(out) + jnp.sum(thdkit.dot_product_attention_weights(q, k, **options))

    for f in (loss, jax.jit(loss)):
        grads = jax.grad(f, argnums=(0, 1, 2))(q, k, v)
        for g, x in zip(grads, (q, k, v), strict=True):
            assert g.shape == x.shape
            np.testing.assert_array_equal(g, 0)


def test_empty_sequences_still_check_their_arguments():
    q = jnp.ones((1, 0, 2, 4))
    empty = dict(query=q, key=q, value=q)

    def call(**kwargs):
        return thdkit.dot_product_attention(**(empty | kwargs))

    raises(ValueError, call, "segment_ids", "(1, 3)", segment_ids=np.ones((1, 3), int))
    raises(TypeError, call, "segment_ids", "float", segment_ids=np.ones((1, 0)))
    raises(TypeError, call, "query", "int32", query=jnp.ones((1, 0, 2, 4), jnp.int32))
    raises(ValueError, call, "key", "H", key=jnp.ones((1, 0, 2, 5)))
    raises(ValueError, call, "query_seq_lengths", query_seq_lengths=np.array([1, 2]))
    raises(ValueError, call, "mask", mask=jnp.ones((3, 0, 0), bool))
    raises(TypeError, call, "mask", mask=jnp.ones((0, 0)))
    raises(ValueError, call, "bias", bias=jnp.ones((1, 1, 1, 1, 1)))
    raises(ValueError, call, "scale", scale=float("inf"))
    raises(ValueError, call, "implementation", implementation="flash")
    raises(ValueError, call, "local_window_size", local_window_size=-1)
    raises(ValueError, call, "max_segments_per_seq", max_segments_per_seq=0)


# --- 4. Errors in the caller's vocabulary ------------------------------------------------------

BAD_LAYOUTS = {
    # name: (keywords, words the message must hold)
    "positions not increasing": (
        dict(segment_ids=IDS, segment_positions=np.where(POS == 2, 1, POS), is_causal=True),
        ("segment_positions", "row 0, token 2", "is_causal", "0, 1, 2"),
    ),
    "negative position": (
        dict(segment_ids=IDS, segment_positions=-POS),
        ("segment_positions", "row 0, token 1", "negative"),
    ),
    "position above max": (
        dict(segment_ids=IDS, segment_positions=POS + 2**30),
        ("segment_positions", "row 0, token 0", "MAX_POSITION"),
    ),
    "id above max_segments_per_seq": (
        dict(segment_ids=IDS, max_segments_per_seq=2),
        (
            "segment_ids",
            "row 0, token 7",
            "max_segments_per_seq=2",
            "max_segments_per_seq=3",
            "renumber",
        ),
    ),
    "second run": (
        dict(segment_ids=np.array([IDS[0], [1, 1, 2, 2, 0, 2, 3, 3]])),
        ("segment_ids", "row 1, token 5", "second run", "one run"),
    ),
    "ids not increasing": (
        dict(segment_ids=IDS[:, ::-1].copy()),
        ("segment_ids", "row 0, token 3", "increase"),
    ),
    "negative id": (
        dict(segment_ids=IDS - 1),
        ("segment_ids", "row 0, token 5", "negative", "padding_id=-1"),
    ),
    "key/value side": (
        dict(segment_ids=(IDS, np.where(IDS == 3, 2, IDS))),
        ("segment_ids[1]", "row 0, token 7", "second run"),
    ),
    "key/value positions": (
        dict(segment_ids=(IDS, IDS), segment_positions=(POS, -POS), is_causal=True),
        ("segment_positions[1]", "row 0, token 1"),
    ),
}


@pytest.mark.parametrize("function", list(FUNCTIONS))
@pytest.mark.parametrize("case", list(BAD_LAYOUTS))
def test_layout_errors_name_the_argument_row_token_and_fix(function, case):
    keywords, words = BAD_LAYOUTS[case]
    raises(ValueError, FUNCTIONS[function], *words, implementation="reference", **keywords)


def test_layout_errors_under_an_unbatched_call():
    with pytest.raises(ValueError, match=r"segment_ids row 0, token 3: id 1 starts a second") as e:
        thdkit.dot_product_attention(Q[0], K[0], V[0], segment_ids=[1, 1, 0, 1, 2, 2, 0, 0])
    assert "context" not in str(e.value)


BAD_CALLS = {
    "heads and tokens swapped": (
        dict(
            query=jnp.ones((B, N, T, H)),
            key=jnp.ones((B, N, T, H)),
            value=jnp.ones((B, N, T, H)),
            segment_ids=IDS,
        ),
        ValueError,
        ("query", "[B, N, T, H]", "transpose"),
    ),
    "heads and tokens swapped, unbatched": (
        dict(
            query=jnp.ones((N, T, H)),
            key=jnp.ones((N, T, H)),
            value=jnp.ones((N, T, H)),
            segment_ids=IDS[0],
        ),
        ValueError,
        ("query", "[N, T, H]", "transpose"),
    ),
    "5-D query": (
        dict(query=jnp.ones((1, B, T, N, H)), segment_ids=IDS),
        ValueError,
        ("query", "rank", "(1, 2, 8, 2, 4)", "reshape"),
    ),
    "2-D key": (dict(key=jnp.ones((T, H))), ValueError, ("key", "rank")),
    "batch of ids": (
        dict(segment_ids=IDS[:1]),
        ValueError,
        ("segment_ids", "B = 1", "query", "B = 2"),
    ),
    "tokens of ids": (
        dict(segment_ids=IDS[:, :5]),
        ValueError,
        ("segment_ids", "5 tokens", "query"),
    ),
    "one array for cross-attention": (
        dict(key=K[:, :4], value=V[:, :4], segment_ids=IDS),
        ValueError,
        ("segment_ids", "key", "tuple"),
    ),
    "a pair as a list": (
        dict(segment_ids=[IDS, IDS]),
        ValueError,
        ("segment_ids", "rank 2", "tuple"),
    ),
    "a tuple of three": (
        dict(segment_ids=(IDS, IDS, IDS)),
        ValueError,
        ("segment_ids", "pair", "3"),
    ),
    "ragged list": (dict(segment_ids=[[1, 1], [1]]), ValueError, ("segment_ids", "rectangular")),
    "float ids": (dict(segment_ids=IDS * 1.0), TypeError, ("segment_ids", "float64")),
    "bool positions": (
        dict(segment_ids=IDS, segment_positions=POS > 0),
        TypeError,
        ("segment_positions", "bool"),
    ),
    "unbatched ids for a batched query": (
        dict(segment_ids=IDS[0]),
        ValueError,
        ("segment_ids", "rank 2", "[B, T]"),
    ),
    "batched ids for an unbatched query": (
        dict(query=Q[0], key=K[0], value=V[0], segment_ids=IDS),
        ValueError,
        ("segment_ids", "rank 1", "unbatched"),
    ),
    "positions alone": (
        dict(segment_positions=POS),
        ValueError,
        ("segment_positions", "segment_ids"),
    ),
    "lengths shape": (
        dict(query_seq_lengths=np.array([3])),
        ValueError,
        ("query_seq_lengths", "(2,)"),
    ),
    "lengths dtype": (
        dict(key_value_seq_lengths=np.array([3.0, 1.0])),
        TypeError,
        ("key_value_seq_lengths",),
    ),
    "max_segments_per_seq float": (
        dict(segment_ids=IDS, max_segments_per_seq=3.0),
        TypeError,
        ("max_segments_per_seq",),
    ),
    "max_segments_per_seq zero": (
        dict(segment_ids=IDS, max_segments_per_seq=0),
        ValueError,
        ("max_segments_per_seq",),
    ),
    "padding_id value": (dict(padding_id=1), ValueError, ("padding_id", "0 or -1")),
    "padding_id type": (dict(padding_id=True), TypeError, ("padding_id",)),
    "window": (dict(local_window_size=(1, -2)), ValueError, ("local_window_size", "right")),
    "implementation": (dict(implementation="flash"), ValueError, ("implementation", "'flash'")),
    "implementation type": (dict(implementation=3), ValueError, ("implementation",)),
    "query dtype": (dict(query=Q.astype(jnp.int32)), TypeError, ("query", "int32")),
    "mixed dtypes": (dict(key=K.astype(jnp.bfloat16)), TypeError, ("key", "bfloat16")),
    "heads": (
        dict(key=K[:, :, :1].repeat(3, 2), value=V[:, :, :1].repeat(3, 2)),
        ValueError,
        ("query", "N=2", "K=3"),
    ),
    "head dims": (dict(key=K[..., :3]), ValueError, ("query", "key", "H")),
    "value length": (dict(value=V[:, :4]), ValueError, ("value", "key")),
    "mask dtype": (dict(mask=jnp.ones((T, T))), TypeError, ("mask", "bool")),
    "bias rank": (dict(bias=jnp.ones((1, 1, 1, T, T))), ValueError, ("bias",)),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_calls_name_the_argument(case):
    keywords, error, words = BAD_CALLS[case]
    arrays = dict(query=Q, key=K, value=V)

    def call(**kwargs):
        return thdkit.dot_product_attention(**(arrays | kwargs))

    raises(error, call, *words, **keywords)


@pytest.mark.parametrize("case", ["heads and tokens swapped", "5-D query", "batch of ids"])
def test_bad_calls_of_the_weights_function(case):
    keywords, error, words = BAD_CALLS[case]
    keywords = dict(query=Q, key=K) | keywords
    keywords.pop("value", None)

    def call(**kwargs):
        return thdkit.dot_product_attention_weights(**kwargs)

    raises(error, call, *words, **keywords)


def test_nested_lists_are_arrays_and_tuples_are_pairs():
    want = attend(segment_ids=IDS, segment_positions=POS, implementation="reference")
    got = attend(
        segment_ids=IDS.tolist(), segment_positions=POS.tolist(), implementation="reference"
    )
    np.testing.assert_array_equal(got, want)
    one = thdkit.dot_product_attention(
        Q[:1], K[:1], V[:1], segment_ids=IDS[:1].tolist(), implementation="reference"
    )
    whole = attend(segment_ids=IDS, implementation="reference")
    np.testing.assert_allclose(one, whole[:1], atol=1e-6)
    pair = attend(segment_ids=(IDS.tolist(), IDS.tolist()), implementation="reference")
    np.testing.assert_array_equal(pair, whole)


# --- 5. padding_id -----------------------------------------------------------------------------

ZERO_BASED = np.array([[0, 0, 0, 1, 1, -1, -1, 2], [0, 0, 1, 1, 1, 1, 2, 2]])  # IDS - 1


@pytest.mark.parametrize("function", list(FUNCTIONS))
def test_padding_id_minus_one_equals_renumbered_ids(function):
    fn = FUNCTIONS[function]
    options = dict(is_causal=True, implementation="reference")
    want = fn(segment_ids=IDS, **options)
    got = fn(segment_ids=ZERO_BASED, padding_id=-1, **options)
    np.testing.assert_array_equal(got, want)
    # With lengths, positions, a pair and an explicit S (three documents: ids 0..2).
    lengths = np.array([6, 8])
    extra = dict(segment_positions=(POS, POS), query_seq_lengths=lengths, max_segments_per_seq=3)
    want = fn(segment_ids=(IDS, IDS), **extra, **options)
    got = fn(segment_ids=(ZERO_BASED, ZERO_BASED), padding_id=-1, **extra, **options)
    np.testing.assert_array_equal(got, want)
    # Read as padding_id=0, the first document of each row is padding: different results.
    assert not np.array_equal(fn(segment_ids=np.maximum(ZERO_BASED, 0), **options), want)


def test_padding_id_minus_one_under_jit():
    @jax.jit
    def run(ids):
        options = dict(padding_id=-1, max_segments_per_seq=3, implementation="reference")
        return thdkit.dot_product_attention(Q, K, V, segment_ids=ids, **options)

    want = attend(segment_ids=IDS, max_segments_per_seq=3, implementation="reference")
    np.testing.assert_allclose(run(jnp.asarray(ZERO_BASED)), want, atol=1e-6)


def test_padding_id_errors_point_to_the_fix():
    raises(
        ValueError, attend, "segment_ids", "row 0, token 5", "padding_id=-1",
        segment_ids=ZERO_BASED,
    )  # fmt: skip
    below = np.where(ZERO_BASED == -1, -2, ZERO_BASED)
    raises(
        ValueError, attend, "segment_ids", "row 0, token 5", "-2", "padding_id=-1",
        segment_ids=below, padding_id=-1,
    )  # fmt: skip
    # 1-based ids with 0 padding read with padding_id=-1: 0 is a document there.
    raises(
        ValueError, attend, "segment_ids", "row 0, token 5", "padding_id=0",
        segment_ids=IDS, padding_id=-1,
    )  # fmt: skip
    raises(
        ValueError, attend, "segment_ids", "max_segments_per_seq=2", "max_segments_per_seq=3",
        segment_ids=ZERO_BASED, padding_id=-1, max_segments_per_seq=2,
    )  # fmt: skip
    plan = thdkit.plan_attention(
        thdkit.Segments.from_ids(IDS), mask_type="padding", max_segments_per_seq=3
    )
    raises(ValueError, attend, "padding_id", "plan", plan=plan, padding_id=-1)


def test_padding_id_is_documented():
    for fn in (thdkit.dot_product_attention, thdkit.dot_product_attention_weights):
        assert inspect.signature(fn).parameters["padding_id"].kind is inspect.Parameter.KEYWORD_ONLY
        assert inspect.signature(fn).parameters["padding_id"].default == 0
        assert "padding_id" in fn.__doc__
    doc = thdkit.dot_product_attention.__doc__
    assert "0 = padding unless padding_id" in " ".join(doc.split())


# --- 6. Parameters passed by name; 7. implementation names from the registry --------------------


def test_layout_parameters_are_passed_by_name():
    for module in (dot_product, jax_nn_layout):
        assert "locals()" not in inspect.getsource(module)
    kinds = {p.kind for p in inspect.signature(jax_nn_layout.layout_of).parameters.values()}
    assert inspect.Parameter.VAR_KEYWORD not in kinds


def test_no_module_imports_the_package_face():
    for module in (dot_product, jax_nn_layout):
        tree = ast.parse(inspect.getsource(module))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert all(alias.name != "thdkit" for alias in node.names), module.__name__
            if isinstance(node, ast.ImportFrom) and node.module == "thdkit":
                raise AssertionError(f"{module.__name__}: from thdkit import ...")


class _Halves(base.Implementation):
    name = "halves_for_jax_nn_test"
    returns_lse = False

    def forward(self, query, key, value, q, kv, aux, config, *, scale):
        return jnp.full(query.shape[:3] + value.shape[3:], 0.5, query.dtype), None


def test_implementation_registered_at_run_time_is_accepted():
    assert set(typing.get_args(dot_product.Implementation)) >= {"xla", "cudnn", "blockwise"}
    name = _Halves.name
    raises(ValueError, attend, "implementation", repr(name), implementation=name)
    base.register(_Halves())
    try:
        out = attend(segment_ids=IDS, implementation=name)
        np.testing.assert_array_equal(out, 0.5)
        raises(NotImplementedError, attend, repr(name), mask=jnp.ones((T, T), bool),
               implementation=name)  # fmt: skip
    finally:
        base.unregister(name)
    raises(ValueError, attend, "implementation", implementation=name)
