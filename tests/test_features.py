"""Soft-capped logits and attention sinks over every registered implementation, against the
float64 oracle of tests/harness.py (``logits_soft_cap`` and ``sinks`` of ``partial_oracle``).

What an implementation accepts is read from the registry, not listed here: the cap where it
declares ``"logits_soft_cap"`` in ``features``, sinks where it ``returns_lse``; every other
implementation must refuse the option with NotImplementedError naming it, and that refusal is
asserted. The accepted options run over the harness's pairwise cases (:data:`MATRIX`: every mask
type, window, GQA/MHA, self/cross, float32/bfloat16, jit/eager), each case taking one turn
(:data:`TURNS`: the cap, the sinks or both; through the layout keywords of ``thdkit.attention``
or through ``plan_attention`` with ``attention(plan=...)``), forward and gradients (dq, dk, dv
and d sinks). Then the edges: rows with no allowed key, extreme sinks, bad
arguments, a plan's cap, implementations registered here, isolation of a NaN with the features
on, and the oracle's own extensions (prefix lengths, finite differences).
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import thdkit
from thdkit import kernels
from thdkit._src.kernels.base import FEATURES
from thdkit._src.mask_types import MaskType

from . import harness
from .harness import HEADS, ROW_IDS, ROW_POS, SCALE, B, Case, D, S, T, machine_marks, refusal

CAP = 1.5  # the scaled logits of the harness's inputs reach about 4: the cap bends them
SOFT_CAP = "logits_soft_cap"
# What each refusal names: the feature, and the log-sum-exp through which sinks join.
CAP_REASON = FEATURES[SOFT_CAP]
SINKS_REASON = "log-sum-exp"
ENTRIES = ("keywords", "plan")

# Implementations that cannot run on this machine at all, with the reason (e.g. no GPU).
_REFUSED = {name: reason for name in kernels.names() if (reason := refusal(name)) is not None}


def _sinks(heads_q: int) -> np.ndarray:
    """float32[H_q]: sinks of the order of the rows' log-sum-exps, one per head."""
    return np.linspace(-1.0, 1.5, heads_q, dtype=np.float32)


def _expected_refusals(name: str, *, cap: float | None, sinks) -> list[str]:
    """What ``name`` must refuse of these options, by the reason it gives (from the registry)."""
    implementation = kernels.get(name)
    reasons = []
    if cap is not None and SOFT_CAP not in implementation.features:
        reasons.append(CAP_REASON)
    if sinks is not None and not implementation.returns_lse:
        reasons.append(SINKS_REASON)
    return reasons


def _restricted(name: str) -> bool:
    """Whether ``name`` refuses float32 arrays: a GPU kernel of a few configurations (cuDNN),
    which may refuse a case; every other implementation must run every case it accepts."""
    x = jnp.zeros((B, T, 2, D), jnp.float32)
    try:
        kernels.get(name).check_arrays(x, x, x)
    except NotImplementedError:
        return True
    return False


def _case_refusal(name: str, case: Case) -> str | None:
    """Why ``name`` refuses the case's configuration or layout without any feature (a GPU kernel
    of a few configurations may: cuDNN), or None."""
    try:
        _where(name, case, None, "plan")
    except NotImplementedError as reason:
        return str(reason)
    return None


def _where(name: str, case: Case, cap: float | None, entry: str):
    """The layout as ``attention`` takes it: the keywords' arrays, or a plan (host-side)."""
    lay = harness.layout(case.cross)
    if entry == "keywords":
        where = dict(segment_ids_q=lay["ids_q"], segment_pos_q=lay["pos_q"])
        if case.cross:
            where |= dict(segment_ids_kv=lay["ids_kv"], segment_pos_kv=lay["pos_kv"])
        return {key: jnp.asarray(x) for key, x in where.items()}
    q = thdkit.Segments.from_ids(lay["ids_q"], lay["pos_q"])
    kv = thdkit.Segments.from_ids(lay["ids_kv"], lay["pos_kv"]) if case.cross else None
    return kernels.plan_attention(
        q, kv, mask_type=case.mask, window_size=case.window, max_segments_per_seq=S,
        implementation=name, logits_soft_cap=cap,
    )  # fmt: skip


def _step(name: str, mask: MaskType, window, cap: float | None, entry: str, cap_again: bool):
    """``(q, k, v, w, sinks, where) -> (out, grads)``: ``grads`` (dq, dk, dv), and d sinks with
    sinks, of ``sum(out * w)`` over the finite outputs; ``where`` from :func:`_where`. With a
    plan, the call passes the plan's cap again where ``cap_again`` (accepted), else None."""

    def run(q, k, v, w, sinks, where):
        def loss(q, k, v, sinks):
            if entry == "plan":
                out = kernels.attention(
                    q, k, v, plan=where, scale=SCALE, sinks=sinks,
                    logits_soft_cap=cap if cap_again else None,
                )  # fmt: skip
            else:
                out = kernels.attention(
                    q, k, v, **where, mask_type=mask, window_size=window, max_segments_per_seq=S,
                    scale=SCALE, implementation=name, logits_soft_cap=cap, sinks=sinks,
                )  # fmt: skip
            # The finite outputs: the isolation test poisons a document (clean calls: all).
            finite = jnp.where(jnp.isfinite(out), out.astype(jnp.float32), 0.0)
            return jnp.sum(finite * w), out

        argnums = (0, 1, 2) if sinks is None else (0, 1, 2, 3)
        (_, out), grads = jax.value_and_grad(loss, argnums, has_aux=True)(q, k, v, sinks)
        return out, grads

    return run


@functools.cache
def _jitted(*key) -> object:
    return jax.jit(_step(*key))


def check_features(name: str, case: Case, features: str, entry: str) -> None:
    """Runs one case with ``features`` (``"cap"``, ``"sinks"`` or ``"both"``) through ``entry``
    and checks it against the oracle, or checks that ``name`` refuses what it must."""
    cap = CAP if features in ("cap", "both") else None
    sinks = _sinks(HEADS[case.heads][0]) if features in ("sinks", "both") else None
    expected = _expected_refusals(name, cap=cap, sinks=sinks)
    q, k, v, w = harness.inputs(case)
    what = f"{name} {case.id} {features} {entry}"
    try:
        where = _where(name, case, cap, entry)
        key = (name, case.mask, case.window, cap, entry, case.jit)
        run = _jitted(*key) if case.jit else _step(*key)
        out, grads = run(q, k, v, w, None if sinks is None else jnp.asarray(sinks), where)
    except NotImplementedError as error:
        if any(reason in str(error) for reason in expected):
            return
        if _restricted(name) and _case_refusal(name, case) is not None:
            pytest.skip(f"{what}: refuses the case itself: {_case_refusal(name, case)}")
        raise AssertionError(f"{what}: refused: {error} (expected: {expected})") from error
    assert not expected, f"{what}: ran, though the registry says it refuses: {expected}"
    want = harness.partial_oracle(
        q, k, v, harness.layout(case.cross), case.mask, case.window, w_out=w,
        logits_soft_cap=cap, sinks=sinks,
    )  # fmt: skip
    harness.check_outputs((out, None, grads), want, dtype=case.dtype, what=what)


# The matrix: the harness's pairwise cases (every mask type, and every pair of values of window,
# heads, self/cross, dtype and jit/eager), each with one turn of (features, entry point): every
# feature set with each entry point, and with bfloat16, eager mode, cross-attention and MHA; each
# entry point with self- and cross-attention, jit and eager and bfloat16. (The mask types in
# float32 under jit without the features are the harness's core cases, test_implementations.py.)
MATRIX = harness.EXTRA_CASES
TURNS = [
    ("cap", "plan"),
    ("cap", "keywords"),
    ("both", "plan"),
    ("both", "keywords"),
    ("sinks", "keywords"),
    ("sinks", "plan"),
]


def _params() -> list:
    """Per implementation, each case of :data:`MATRIX` with its turn of :data:`TURNS`."""
    params = []
    for name in kernels.names():
        marks = machine_marks(name)
        for case, (features, entry) in zip(MATRIX, TURNS, strict=True):
            params.append(
                pytest.param(
                    name,
                    case,
                    features,
                    entry,
                    marks=marks,
                    id=f"{name}-{case.id}-{features}-{entry}",
                )
            )
    return params


@pytest.mark.parametrize(("name", "case", "features", "entry"), _params())
def test_features_match_the_float64_oracle(name, case, features, entry) -> None:
    check_features(name, case, features, entry)


def test_the_turns_pair_every_feature_set_with_every_entry_and_axis() -> None:
    turns = list(zip(MATRIX, TURNS, strict=True))
    assert {turn for _, turn in turns} == {
        (f, e) for f in ("cap", "sinks", "both") for e in ENTRIES
    }
    assert {c.mask for c in MATRIX} == set(MaskType)
    for features in ("cap", "sinks", "both"):
        cases = [c for c, (f, _) in turns if f == features]
        assert {c.dtype for c in cases} >= {"bfloat16"} and not all(c.jit for c in cases)
        assert any(c.cross for c in cases) and any(c.heads == "mha" for c in cases)
    assert any(c.window for c, (f, _) in turns if f == "both")
    for entry in ENTRIES:
        cases = [c for c, (_, e) in turns if e == entry]
        assert {c.cross for c in cases} == {False, True} and {c.jit for c in cases} == {False, True}
        assert any(c.dtype == "bfloat16" for c in cases)
    # Not vacuous: some implementation implements each feature.
    assert any(SOFT_CAP in kernels.get(n).features for n in kernels.names())
    assert any(kernels.get(n).returns_lse for n in kernels.names())


# --- Rows with no allowed key, extreme sinks -----------------------------------------------------

# Cross-attention, one row: document 1's queries (positions 0, 1) precede all its keys
# (positions 5, 6), so under padding_causal they have no allowed key; so have the padding queries.
EMPTY_LAYOUT = dict(
    ids_q=np.array([[1, 1, 2, 2, 2, 0]], np.int32),
    pos_q=np.array([[0, 1, 0, 1, 2, 3]], np.int32),
    ids_kv=np.array([[1, 1, 2, 2, 2, 0, 0]], np.int32),
    pos_kv=np.array([[5, 6, 0, 1, 2, 3, 4]], np.int32),
)
EMPTY_ROWS = np.array([[True, True, False, False, False, True]])


def _sinks_implementations() -> list:
    """The implementations that take sinks (they return a log-sum-exp), GPU-marked and skipped
    where they cannot run here."""
    params = []
    for name in kernels.names():
        if not kernels.get(name).returns_lse:
            continue
        marks = machine_marks(name)
        params.append(pytest.param(name, marks=marks, id=name))
    return params


@functools.cache
def _small(name: str):
    """``(q, k, v, w, sinks) -> (out, (dq, dk, dv, dsinks))`` of ``sum(out * w)`` on
    :data:`EMPTY_LAYOUT` (padding_causal, cross), jitted."""
    lay = {key: jnp.asarray(x) for key, x in EMPTY_LAYOUT.items()}

    def loss(q, k, v, w, sinks):
        out = kernels.attention(
            q, k, v, segment_ids_q=lay["ids_q"], segment_pos_q=lay["pos_q"],
            segment_ids_kv=lay["ids_kv"], segment_pos_kv=lay["pos_kv"], max_segments_per_seq=2,
            mask_type="padding_causal", scale=SCALE, implementation=name, sinks=sinks,
        )  # fmt: skip
        return jnp.sum(out * w), out

    def run(q, k, v, w, sinks):
        (_, out), grads = jax.value_and_grad(loss, (0, 1, 2, 4), has_aux=True)(q, k, v, w, sinks)
        return out, grads

    return jax.jit(run)


def _small_inputs() -> tuple[np.ndarray, ...]:
    """``(q, k, v, w)``: float32, two query heads over one key/value head, D = D_v = 4."""
    q, k, v, w, _ = harness.random_inputs(
        5, batch=1, seq_q=6, seq_kv=7, heads=(2, 1), dim=4, dim_v=4
    )
    return q, k, v, w


@pytest.mark.parametrize("name", _sinks_implementations())
def test_rows_with_no_allowed_key_output_zero_and_give_the_sinks_no_gradient(name) -> None:
    q, k, v, w = _small_inputs()
    sinks = np.array([0.5, -0.5], np.float32)
    # Only the rows with no allowed key weigh in the loss: nothing flows to the sinks.
    only_empty = np.where(EMPTY_ROWS[..., None, None], w, 0.0).astype(np.float32)
    out, (dq, dk, dv, dsinks) = _small(name)(q, k, v, only_empty, sinks)
    assert np.all(np.asarray(out)[EMPTY_ROWS] == 0)
    np.testing.assert_array_equal(np.asarray(dsinks), np.zeros(2, np.float32))
    for g in (dq, dk, dv):
        np.testing.assert_array_equal(np.asarray(g), np.zeros_like(g))
    # Every row in the loss: the oracle, the empty rows still exactly zero.
    got = _small(name)(q, k, v, w, sinks)
    want = harness.partial_oracle(
        q, k, v, EMPTY_LAYOUT, MaskType.PADDING_CAUSAL, None, w_out=w, sinks=sinks
    )
    empty = harness.check_outputs((got[0], None, got[1]), want, dtype="float32", what=name)
    np.testing.assert_array_equal(empty, np.broadcast_to(EMPTY_ROWS[..., None], empty.shape))


@pytest.mark.parametrize("name", _sinks_implementations())
def test_very_negative_and_very_positive_sinks_give_finite_results(name) -> None:
    """A sink of -1e4 leaves its head's rows as without sinks; one of 1e4 takes all their weight
    (outputs 0); both finite, forward and gradients, and as the oracle says."""
    q, k, v, w = _small_inputs()
    sinks = np.array([-1e4, 1e4], np.float32)
    out, grads = _small(name)(q, k, v, w, sinks)
    for x in (out, *grads):
        assert np.all(np.isfinite(np.asarray(x)))
    want = harness.partial_oracle(
        q, k, v, EMPTY_LAYOUT, MaskType.PADDING_CAUSAL, None, w_out=w, sinks=sinks
    )
    harness.check_outputs((out, None, grads), want, dtype="float32", what=name)
    assert np.all(np.asarray(out)[:, :, 1] == 0)
    without = harness.partial_oracle(q, k, v, EMPTY_LAYOUT, MaskType.PADDING_CAUSAL, None)
    tol = harness.TOLERANCES["float32"]["forward"]
    harness.assert_close(out[:, :, 0], without[0][:, :, 0], tol, "the head of -1e4")


# --- Bad arguments --------------------------------------------------------------------------------


def _row_inputs(heads: tuple[int, int] = (2, 1)) -> tuple[jax.Array, ...]:
    """``(q, k, v)`` of the one-row layout of the argument checks (harness.ROW_IDS)."""
    q, k, v, _, _ = harness.random_inputs(0, batch=1, seq_q=8, heads=heads, dim=4, dim_v=4)
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)


ROW_KEYWORDS = dict(segment_ids_q=ROW_IDS, segment_pos_q=ROW_POS, max_segments_per_seq=2)


@pytest.mark.parametrize(
    ("sinks", "error"),
    [
        (np.zeros(3, np.float32), ValueError),
        (np.zeros((1, 2), np.float32), ValueError),
        (np.float32(0.0), ValueError),
        (np.zeros(2, np.int32), TypeError),
        (np.zeros(2, bool), TypeError),
    ],
    ids=["three-heads", "two-axes", "scalar", "int", "bool"],
)
@pytest.mark.parametrize("entry", ENTRIES)
def test_bad_sinks_raise_naming_sinks(sinks, error, entry) -> None:
    q, k, v = _row_inputs()
    if entry == "keywords":
        where = ROW_KEYWORDS
    else:
        segments = thdkit.Segments.from_ids(ROW_IDS, ROW_POS)
        where = dict(plan=kernels.plan_attention(segments, mask_type="causal",
                                                 max_segments_per_seq=2))  # fmt: skip
    with pytest.raises(error, match="sinks"):
        kernels.attention(q, k, v, sinks=sinks, **where)


BAD_CAPS = [
    (0.0, ValueError),
    (-1.0, ValueError),
    (float("inf"), ValueError),
    (float("nan"), ValueError),
    (True, TypeError),
    (jnp.array(1.0), TypeError),
    (np.array([1.0]), TypeError),
    ("1.0", TypeError),
]


@pytest.mark.parametrize(("cap", "error"), BAD_CAPS, ids=lambda x: repr(x)[:20])
def test_bad_soft_caps_raise_naming_the_parameter(cap, error) -> None:
    q, k, v = _row_inputs()
    segments = thdkit.Segments.from_ids(ROW_IDS, ROW_POS)
    with pytest.raises(error, match=SOFT_CAP):
        kernels.attention(q, k, v, logits_soft_cap=cap, **ROW_KEYWORDS)
    with pytest.raises(error, match=SOFT_CAP):
        kernels.plan_attention(segments, mask_type="causal", max_segments_per_seq=2,
                               logits_soft_cap=cap)  # fmt: skip
    plan = kernels.plan_attention(segments, mask_type="causal", max_segments_per_seq=2)
    with pytest.raises(error, match=SOFT_CAP):
        kernels.attention(q, k, v, plan=plan, logits_soft_cap=cap)
    with pytest.raises(error, match=SOFT_CAP):
        kernels.attention_partial(
            q, k, v, q_segments=segments, kv_segments=segments, mask_type="causal",
            window_size=None, scale=SCALE, logits_soft_cap=cap,
        )  # fmt: skip


def test_a_plan_takes_its_own_cap_or_none_and_refuses_another() -> None:
    q, k, v = _row_inputs()
    segments = thdkit.Segments.from_ids(ROW_IDS, ROW_POS)
    options = dict(mask_type="causal", max_segments_per_seq=2)
    capped = kernels.plan_attention(segments, **options, logits_soft_cap=2.0)
    plain = kernels.plan_attention(segments, **options)
    with pytest.raises(ValueError, match=r"logits_soft_cap=3\.0 differs from the plan's \(2\.0\)"):
        kernels.attention(q, k, v, plan=capped, logits_soft_cap=3.0)
    with pytest.raises(ValueError, match=r"logits_soft_cap=2\.0 differs from the plan's \(None\)"):
        kernels.attention(q, k, v, plan=plain, logits_soft_cap=2.0)
    want = kernels.attention(q, k, v, **ROW_KEYWORDS, mask_type="causal", logits_soft_cap=2.0)
    for cap in (None, 2.0, np.float32(2.0)):
        np.testing.assert_array_equal(
            kernels.attention(q, k, v, plan=capped, logits_soft_cap=cap), want
        )
    uncapped = kernels.attention(q, k, v, plan=plain)
    assert not np.allclose(uncapped, want)


# --- Implementations registered here ------------------------------------------------------------


class _Plain(kernels.Implementation):
    """An implementation written before the optional features: the reference's computation
    under another name, declaring none."""

    name = "plain_in_a_feature_test"

    def prepare(self, q, kv, config, **kwargs):
        return kernels.get("reference").prepare(q, kv, config, **kwargs)

    def forward(self, query, key, value, q, kv, aux, config, *, scale):
        return kernels.get("reference").forward(query, key, value, q, kv, aux, config, scale=scale)


class _NoLse(_Plain):
    """One that returns no log-sum-exp (as cuDNN), so no sinks."""

    name = "no_lse_in_a_feature_test"
    returns_lse = False

    def forward(self, *args, **kwargs):
        out, _ = super().forward(*args, **kwargs)
        return out, None


class _IgnoresTheCap(_Plain):
    """One that declares the cap and ignores it."""

    name = "ignores_the_cap_in_a_feature_test"
    features = frozenset({SOFT_CAP})

    def forward(self, query, key, value, q, kv, aux, config, *, scale):
        uncapped = dataclasses.replace(config, logits_soft_cap=None)
        return super().forward(query, key, value, q, kv, aux, uncapped, scale=scale)


def test_an_implementation_ignoring_the_cap_is_caught() -> None:
    """The matrix is not vacuous: an implementation that declares the cap and ignores it fails."""
    kernels.register(_IgnoresTheCap())
    try:
        with pytest.raises(AssertionError, match="out"):
            check_features(_IgnoresTheCap.name, MATRIX[1], "cap", "keywords")
    finally:
        kernels.unregister(_IgnoresTheCap.name)


def _first_in_the_default_order(implementation: kernels.Implementation) -> tuple[str, ...]:
    """Registers ``implementation`` as the first the default order tries; returns the order
    before, for :func:`_restore_the_default_order`."""
    before = kernels.default_order()
    for name in before:
        kernels.register(kernels.get(name), replace=True, default=False)
    kernels.register(implementation, default=True)
    for name in before:
        kernels.register(kernels.get(name), replace=True, default=True)
    return before


def _restore_the_default_order(name: str, before: tuple[str, ...]) -> None:
    kernels.unregister(name)
    for other in before:
        kernels.register(kernels.get(other), replace=True, default=False)
    for other in before:
        kernels.register(kernels.get(other), replace=True, default=True)
    assert kernels.default_order() == before


def test_an_implementation_declaring_no_features_is_refused_the_cap() -> None:
    q, k, v = _row_inputs()
    segments = thdkit.Segments.from_ids(ROW_IDS, ROW_POS)
    options = dict(mask_type="causal", max_segments_per_seq=2)
    before = _first_in_the_default_order(_Plain())
    try:
        assert kernels.default_order()[0] == _Plain.name
        for cap_keywords in (dict(logits_soft_cap=CAP), {}):
            # Named: refused the cap with the feature named, else it runs.
            if cap_keywords:
                with pytest.raises(
                    NotImplementedError, match=rf"{_Plain.name}: .*{re.escape(CAP_REASON)}"
                ):
                    kernels.plan_attention(segments, **options, implementation=_Plain.name,
                                           **cap_keywords)  # fmt: skip
                with pytest.raises(NotImplementedError, match=re.escape(CAP_REASON)):
                    kernels.attention(q, k, v, **ROW_KEYWORDS, mask_type="causal",
                                      implementation=_Plain.name, **cap_keywords)  # fmt: skip
            # The default order: skipped for the cap, first without it.
            plan = kernels.plan_attention(segments, **options, **cap_keywords)
            if cap_keywords:
                assert _Plain.name not in plan.candidates
                assert all(SOFT_CAP in kernels.get(n).features for n in plan.candidates)
            else:
                assert _Plain.name in plan.candidates
            got = kernels.attention(q, k, v, **ROW_KEYWORDS, mask_type="causal", scale=SCALE,
                                    **cap_keywords)  # fmt: skip
            lay = dict(ids_q=ROW_IDS, pos_q=ROW_POS, ids_kv=ROW_IDS, pos_kv=ROW_POS)
            want = harness.partial_oracle(q, k, v, lay, MaskType.CAUSAL, None,
                                          logits_soft_cap=cap_keywords.get(SOFT_CAP))  # fmt: skip
            harness.assert_close(got, want[0], harness.TOLERANCES["float32"]["forward"], "out")
    finally:
        _restore_the_default_order(_Plain.name, before)


def test_an_implementation_without_a_log_sum_exp_is_refused_sinks() -> None:
    q, k, v = _row_inputs()
    sinks = _sinks(2)
    kernels.register(_NoLse())
    try:
        with pytest.raises(NotImplementedError, match=rf"{_NoLse.name}: .*{SINKS_REASON}"):
            kernels.attention(q, k, v, **ROW_KEYWORDS, implementation=_NoLse.name, sinks=sinks)
        out = kernels.attention(q, k, v, **ROW_KEYWORDS, implementation=_NoLse.name)
        assert np.all(np.isfinite(np.asarray(out)))
    finally:
        kernels.unregister(_NoLse.name)


@pytest.mark.parametrize("name", [n for n in kernels.names() if not kernels.get(n).returns_lse])
def test_built_ins_without_a_log_sum_exp_are_refused_sinks(name) -> None:
    """cuDNN: refused sinks for its missing log-sum-exp, or, where it cannot run at all (no
    GPU), for that reason first."""
    q, k, v = (x.astype(jnp.bfloat16) for x in _row_inputs())
    with pytest.raises(NotImplementedError) as error:
        kernels.attention(q, k, v, **ROW_KEYWORDS, implementation=name, sinks=_sinks(2))
    reason = _REFUSED.get(name, SINKS_REASON)
    assert reason in str(error.value), str(error.value)


# --- Isolation with the features on ---------------------------------------------------------------


def _isolation_params() -> list:
    params = []
    for name in kernels.names():
        implementation = kernels.get(name)
        cap = CAP if SOFT_CAP in implementation.features else None
        if cap is None and not implementation.returns_lse:
            continue  # neither feature: nothing of this file to isolate
        marks = machine_marks(name)
        params.append(pytest.param(name, cap, implementation.returns_lse, marks=marks, id=name))
    return params


# The case of the isolation test, and its turn: the matrix's compiled program serves it.
ISOLATION_CASE = 3


@pytest.mark.parametrize(("name", "cap", "with_sinks"), _isolation_params())
def test_a_nan_stays_in_its_document_with_the_features_on(name, cap, with_sinks) -> None:
    """A NaN in one token of the first document of row 0, in its query, key or value: every other
    document's output and gradients bit-equal to the call without it; d sinks finite, and
    bit-equal to the clean call's where that document stays out of the loss."""
    case = MATRIX[ISOLATION_CASE]
    assert TURNS[ISOLATION_CASE] == ("both", "keywords") and not case.cross and case.jit
    ids = harness.layout(False)["ids_q"]
    doc = (np.arange(B) == 0)[:, None] & (ids == ids[0][ids[0] > 0][0])  # [B, T]
    token = np.flatnonzero(doc[0])[1]  # its second token
    q, k, v, w = (np.array(x) for x in harness.inputs(case))
    sinks = jnp.asarray(_sinks(HEADS[case.heads][0])) if with_sinks else None
    w_without = np.where(doc[..., None, None], 0.0, w).astype(np.float32)
    run = _jitted(name, case.mask, case.window, cap, "keywords", True)
    where = _where(name, case, cap, "keywords")
    clean = run(q, k, v, w_without, sinks, where)
    other = ~doc
    for side in range(3):
        dirty_inputs = [x.copy() for x in (q, k, v)]
        dirty_inputs[side][0, token] = np.nan
        out, grads = run(*dirty_inputs, w_without, sinks, where)
        np.testing.assert_array_equal(np.asarray(out)[other], np.asarray(clean[0])[other])
        for g, g_clean in zip(grads[:3], clean[1][:3], strict=True):
            assert np.all(np.isfinite(np.asarray(g)))
            np.testing.assert_array_equal(np.asarray(g)[other], np.asarray(g_clean)[other])
        assert np.isnan(np.asarray(out)[doc]).any(), "the poison reached no row of its document"
        if with_sinks:
            np.testing.assert_array_equal(np.asarray(grads[3]), np.asarray(clean[1][3]))
            _, grads_full = run(*dirty_inputs, w, sinks, where)  # the poisoned rows weigh too
            assert np.all(np.isfinite(np.asarray(grads_full[3])))


# --- The oracle's extensions ----------------------------------------------------------------------


def test_prefix_lengths_open_each_documents_prefix_both_ways() -> None:
    """One row: document 1 (tokens 0-3) has a prefix of 2 tokens, document 2 (tokens 4-6)
    none, token 7 is padding."""
    ids = np.array([[1, 1, 1, 1, 2, 2, 2, 0]])
    pos = np.array([[0, 1, 2, 3, 0, 1, 2, 3]])
    pl = np.array([[2, 2, 2, 2, 0, 0, 0, 0]])
    lay = dict(ids_q=ids, pos_q=pos, ids_kv=ids, pos_kv=pos, pl_q=pl, pl_kv=pl)
    causal = np.array(
        [
            [1, 1, 0, 0, 0, 0, 0, 0],  # query 0 reads key 1: both in the prefix
            [1, 1, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 0],
            [0, 0, 0, 0, 1, 0, 0, 0],
            [0, 0, 0, 0, 1, 1, 0, 0],
            [0, 0, 0, 0, 1, 1, 1, 0],
            [0, 0, 0, 0, 0, 0, 0, 0],
        ],
        bool,
    )
    np.testing.assert_array_equal(harness.allowed(lay, MaskType.PADDING_CAUSAL, None)[0], causal)
    # A window (1, 0) narrows what the mask type allows, never the prefix.
    windowed = np.array(
        [
            [1, 1, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0, 0],
            [0, 1, 1, 0, 0, 0, 0, 0],
            [0, 0, 1, 1, 0, 0, 0, 0],
            [0, 0, 0, 0, 1, 0, 0, 0],
            [0, 0, 0, 0, 1, 1, 0, 0],
            [0, 0, 0, 0, 0, 1, 1, 0],
            [0, 0, 0, 0, 0, 0, 0, 0],
        ],
        bool,
    )
    np.testing.assert_array_equal(harness.allowed(lay, MaskType.CAUSAL, (1, 0))[0], windowed)
    # Without prefixes (zero lengths, or none given) the mask type's rule alone.
    zeros = lay | dict(pl_q=0 * pl, pl_kv=0 * pl)
    plain = dict(ids_q=ids, pos_q=pos, ids_kv=ids, pos_kv=pos)
    np.testing.assert_array_equal(
        harness.allowed(zeros, MaskType.CAUSAL, None), harness.allowed(plain, MaskType.CAUSAL, None)
    )
    with pytest.raises(ValueError, match="pl_q, pl_kv"):
        harness.allowed(plain | dict(pl_q=pl), MaskType.CAUSAL, None)


def test_the_oracles_gradients_match_finite_differences() -> None:
    """The hand-written gradients of the cap and the sinks against central differences of the
    oracle's own loss, in float64, on the one-row cross layout with empty rows."""
    q, k, v, w_out, w_lse = (
        x.astype(np.float64)
        for x in harness.random_inputs(9, batch=1, seq_q=6, seq_kv=7, heads=(2, 1), dim=3, dim_v=2)
    )
    sinks = np.array([0.3, -0.7])
    options = dict(w_out=w_out, w_lse=w_lse, logits_soft_cap=0.8)
    lay, mask = EMPTY_LAYOUT, MaskType.PADDING_CAUSAL

    def loss(q, k, v, sinks):
        out, lse, _ = harness.partial_oracle(q, k, v, lay, mask, None, sinks=sinks, **options)
        return np.sum(out * w_out) + np.sum(np.where(np.isfinite(lse), lse * w_lse, 0.0))

    _, _, grads = harness.partial_oracle(q, k, v, lay, mask, None, sinks=sinks, **options)
    args, eps = [q, k, v, sinks], 1e-6
    for i, grad in enumerate(grads):
        numeric = np.zeros_like(args[i])
        for index in np.ndindex(args[i].shape):
            up, down = [a.copy() for a in args], [a.copy() for a in args]
            up[i][index] += eps
            down[i][index] -= eps
            numeric[index] = (loss(*up) - loss(*down)) / (2 * eps)
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8, err_msg=f"grad {i}")
    assert np.all(grads[3] != 0)


def test_the_oracle_without_sinks_or_cap_is_their_limit() -> None:
    """Sinks of -inf join nothing; a cap far above the logits bends nothing."""
    case = harness.CORE_CASES[3]
    q, k, v, w = (np.asarray(x) for x in harness.inputs(case))
    lay, mask = harness.layout(False), case.mask
    plain = harness.partial_oracle(q, k, v, lay, mask, None, w_out=w)
    sunk = harness.partial_oracle(q, k, v, lay, mask, None, w_out=w, sinks=np.full(4, -np.inf))
    loose = harness.partial_oracle(q, k, v, lay, mask, None, w_out=w, logits_soft_cap=1e9)
    for other in (sunk, loose):
        np.testing.assert_allclose(other[0], plain[0], rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(np.isneginf(other[1]), np.isneginf(plain[1]))
        for g, g_plain in zip(other[2][:3], plain[2], strict=True):
            np.testing.assert_allclose(g, g_plain, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(sunk[2][3], np.zeros(4))
