"""Bad and edge inputs across the public API and the command line, as a new user would try them.

Each case asserts the exact error type and that the message names the parameter (and, for layout
errors, the row and the token). The edge cases at the end assert the documented behaviour.
"""

from __future__ import annotations

import subprocess
import sys

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from typer.testing import CliRunner

import thdkit
from thdkit import reorder
from thdkit._src.limits import MAX_POSITION
from thdkit._src.validate.segments import validate_segments
from thdkit.bench.commands import app
from thdkit.data import pack

IDS = jnp.array([[1, 1, 1, 2, 2, 0, 0, 3]])
POS = jnp.array([[0, 1, 2, 0, 1, 2, 0, 0]])
QKV = jnp.zeros((1, 8, 2, 8))


def meta(**kwargs):
    args = dict(segment_ids_q=IDS, segment_pos_q=POS, max_segments_per_seq=4)
    return thdkit.seqlens_and_offsets(**(args | kwargs))


def attend(query=QKV, key=QKV, value=QKV, **kwargs):
    args = dict(segment_ids_q=IDS, segment_pos_q=POS, max_segments_per_seq=4)
    return thdkit.attention(query, key, value, **(args | kwargs))


def ring(query=QKV, key=QKV, value=QKV, **kwargs):
    args = dict(
        q_segments=thdkit.Segments.from_ids(IDS, POS),
        max_segments_per_seq=4,
        mesh=Mesh(np.array(jax.devices()[:2]), ("cp",)),
        axis_name="cp",
    )
    return thdkit.ring_attention(query, key, value, **(args | kwargs))


def plan(**kwargs):
    args = dict(max_segments_per_seq=4, mask_type="padding_causal")
    return thdkit.plan_attention(thdkit.Segments.from_ids(IDS, POS), **(args | kwargs))


SEG = thdkit.Segments.from_ids(IDS, POS)


def segments(**fields):
    """SEG with some fields replaced."""
    return thdkit.Segments(**({"ids": SEG.ids, "positions": SEG.positions, "lengths": SEG.lengths}
                              | fields))  # fmt: skip


def check(seg=SEG, **kwargs):
    return validate_segments(seg, **({"name": "q_segments"} | kwargs))


def packed(**kwargs):
    args = dict(seq_len=8, max_segments_per_seq=2, batch_size=1)
    return pack(grain.MapDataset.source([{"inputs": np.arange(3)}]), **(args | kwargs))


def row(ids, pos=None):
    ids = np.asarray(ids)
    return ids, np.zeros_like(ids) if pos is None else pos


CASES = {
    # --- metadata: layout arrays -------------------------------------------------------------
    "float ids": (lambda: meta(segment_ids_q=IDS * 1.0), TypeError, "segment_ids_q"),
    "bool ids": (lambda: meta(segment_ids_q=IDS > 0), TypeError, "segment_ids_q"),
    "float positions": (lambda: meta(segment_pos_q=POS * 1.0), TypeError, "segment_pos_q"),
    "scalar ids": (
        lambda: meta(segment_ids_q=jnp.int32(1), segment_pos_q=jnp.int32(0)),
        ValueError,
        "segment_ids_q",
    ),
    "empty row": (
        lambda: meta(segment_ids_q=jnp.zeros((1, 0), int), segment_pos_q=jnp.zeros((1, 0), int)),
        ValueError,
        "segment_ids_q",
    ),
    "shapes differ": (lambda: meta(segment_pos_q=POS[:, :4]), ValueError, "segment_pos_q"),
    "half-given kv": (lambda: meta(segment_ids_kv=IDS), ValueError, "segment_ids_kv"),
    "kv batch dims differ": (
        lambda: meta(segment_ids_kv=IDS[0], segment_pos_kv=POS[0]),
        ValueError,
        "segment_ids_kv",
    ),
    "id above S": (
        lambda: meta(max_segments_per_seq=2),
        ValueError,
        r"segment_ids_q row 0, token 7",
    ),
    "negative id": (
        lambda: meta(segment_ids_q=IDS.at[0, 6].set(-1)),
        ValueError,
        r"segment_ids_q row 0, token 6",
    ),
    "second run": (
        lambda: meta(segment_ids_q=IDS.at[0, 6].set(2)),
        ValueError,
        r"segment_ids_q row 0, token 6",
    ),
    "ids decrease": (
        lambda: meta(
            segment_ids_q=jnp.array([[2, 2, 1, 1]]), segment_pos_q=jnp.array([[0, 1, 0, 1]])
        ),
        ValueError,
        r"segment_ids_q row 0, token 2",
    ),
    "negative position": (
        lambda: meta(segment_pos_q=POS.at[0, 4].set(-3)),
        ValueError,
        r"segment_pos_q row 0, token 4",
    ),
    "positions stall (causal)": (
        lambda: meta(segment_pos_q=POS.at[0, 1].set(0)),
        ValueError,
        r"segment_pos_q row 0, token 1",
    ),
    "position above MAX_POSITION": (
        lambda: meta(segment_pos_q=POS.at[0, 7].set(MAX_POSITION + 1)),
        ValueError,
        r"segment_pos_q row 0, token 7",
    ),
    "int64 id beyond int32": (
        lambda: meta(
            segment_ids_q=np.array([[1, 2**32 + 2]], np.int64),
            segment_pos_q=np.zeros((1, 2), np.int64),
        ),
        ValueError,
        r"segment_ids_q row 0, token 1",
    ),
    "uint32 id 2**32-1": (
        lambda: meta(
            segment_ids_q=np.array([[1, 2**32 - 1]], np.uint32),
            segment_pos_q=np.zeros((1, 2), np.uint32),
        ),
        ValueError,
        r"segment_ids_q row 0, token 1",
    ),
    "list holding 2**33": (
        lambda: meta(segment_ids_q=[[1, 1]], segment_pos_q=[[0, 2**33]]),
        ValueError,
        r"segment_pos_q row 0, token 1",
    ),
    "int64 position beyond int32": (
        lambda: meta(segment_pos_q=np.array([[0, 1, 2, 0, 1, 2, 0, -(2**40)]], np.int64)),
        ValueError,
        r"segment_pos_q row 0, token 7",
    ),
    "kv second run": (
        lambda: meta(segment_ids_kv=IDS.at[0, 6].set(1), segment_pos_kv=POS),
        ValueError,
        r"segment_ids_kv row 0, token 6",
    ),
    "error in row 1": (
        lambda: meta(
            segment_ids_q=jnp.concatenate([IDS, IDS.at[0, 5].set(1)]),
            segment_pos_q=jnp.concatenate([POS, POS]),
        ),
        ValueError,
        r"segment_ids_q row 1, token 5",
    ),
    "error in row (1, 0)": (
        lambda: meta(
            segment_ids_q=jnp.stack([IDS, IDS.at[0, 5].set(1)]),
            segment_pos_q=jnp.stack([POS, POS]),
        ),
        ValueError,
        r"segment_ids_q row \(1, 0\), token 5",
    ),
    # --- metadata: options -------------------------------------------------------------------
    "S zero": (lambda: meta(max_segments_per_seq=0), ValueError, "max_segments_per_seq"),
    "S 2**31-1": (lambda: meta(max_segments_per_seq=2**31 - 1), ValueError, "max_segments_per_seq"),
    "S float": (lambda: meta(max_segments_per_seq=4.0), TypeError, "max_segments_per_seq"),
    "S bool": (lambda: meta(max_segments_per_seq=True), TypeError, "max_segments_per_seq"),
    "S traced": (
        lambda: jax.jit(lambda s: meta(max_segments_per_seq=s))(4),
        TypeError,
        "max_segments_per_seq",
    ),
    "unknown mask": (lambda: meta(mask_type="causal_top_left"), ValueError, "mask_type"),
    "mask as int": (lambda: meta(mask_type=3), TypeError, "mask_type"),
    "unknown method": (lambda: meta(method="quadratic"), ValueError, "method"),
    "method as list": (lambda: meta(method=["linear"]), TypeError, "method"),
    "compact as str": (lambda: meta(compact="yes"), TypeError, "compact"),
    # --- SeqMeta.flat ------------------------------------------------------------------------
    "flat seq_len 0": (lambda: meta().flat(seq_len_q=0), ValueError, "seq_len_q"),
    "flat seq_len negative": (lambda: meta().flat(seq_len_q=-8), ValueError, "seq_len_q"),
    "flat seq_len float": (lambda: meta().flat(seq_len_q=8.0), TypeError, "seq_len_q"),
    "flat seq_len too small": (lambda: meta().flat(seq_len_q=6), ValueError, "seq_len_q"),
    "flat seq_len_kv bool": (
        lambda: meta().flat(seq_len_q=8, seq_len_kv=True),
        TypeError,
        "seq_len_kv",
    ),
    # --- layout checks -----------------------------------------------------------------------
    "validate_layout traced": (
        lambda: jax.jit(lambda i, p: thdkit.validate_layout(i, p, max_segments_per_seq=4))(
            IDS, POS
        ),
        TypeError,
        "segment_ids",
    ),
    "error codes, bad mask": (
        lambda: thdkit.layout_error_codes(IDS, POS, max_segments_per_seq=4, mask_type="diagonal"),
        ValueError,
        "mask_type",
    ),
    # --- attention ---------------------------------------------------------------------------
    "integer query": (lambda: attend(query=jnp.zeros((1, 8, 2, 8), int)), TypeError, "query"),
    "mixed dtypes": (lambda: attend(key=QKV.astype(jnp.bfloat16)), TypeError, "key"),
    "query rank 3": (lambda: attend(query=QKV[0]), ValueError, "query"),
    "heads not grouped": (
        lambda: attend(key=jnp.zeros((1, 8, 3, 8)), value=jnp.zeros((1, 8, 3, 8))),
        ValueError,
        "H_kv",
    ),
    "head dims differ": (lambda: attend(key=jnp.zeros((1, 8, 2, 4))), ValueError, "key"),
    "scale inf": (lambda: attend(scale=float("inf")), ValueError, "scale"),
    "scale nan": (lambda: attend(scale=float("nan")), ValueError, "scale"),
    "scale str": (lambda: attend(scale="0.1"), TypeError, "scale"),
    "window not a pair": (lambda: attend(window_size=(1, 2, 3)), ValueError, "window_size"),
    "window float bound": (lambda: attend(window_size=(1.5, None)), TypeError, "window_size"),
    "block_q zero": (lambda: attend(block_q=0), ValueError, "block_q"),
    "unknown implementation": (
        lambda: attend(implementation="flash"),
        ValueError,
        "implementation",
    ),
    "zero kv heads": (
        lambda: attend(key=jnp.zeros((1, 8, 0, 8)), value=jnp.zeros((1, 8, 0, 8))),
        ValueError,
        "H_kv",
    ),
    "zero head dim": (
        lambda: attend(*(jnp.zeros((1, 8, 2, 0)),) * 3),
        ValueError,
        "D",
    ),
    "ids do not match query": (
        lambda: attend(segment_ids_q=IDS[:, :4], segment_pos_q=POS[:, :4]),
        ValueError,
        "segment_ids_q",
    ),
    "self-attention T_kv != T_q": (
        lambda: attend(key=jnp.zeros((1, 4, 2, 8)), value=jnp.zeros((1, 4, 2, 8))),
        ValueError,
        "T_kv",
    ),
    "attention layout error": (
        lambda: attend(segment_ids_q=IDS.at[0, 6].set(2)),
        ValueError,
        r"segment_ids_q row 0, token 6",
    ),
    "plan and layout keywords": (
        lambda: thdkit.attention(QKV, QKV, QKV, plan=plan(), segment_ids_q=IDS),
        ValueError,
        "plan",
    ),
    "plan S zero": (lambda: plan(max_segments_per_seq=0), ValueError, "max_segments_per_seq"),
    "plan of wrong length": (
        lambda: thdkit.attention(
            jnp.zeros((1, 4, 2, 8)), *(jnp.zeros((1, 4, 2, 8)),) * 2, plan=plan()
        ),
        ValueError,
        "plan",
    ),
    # --- ring attention ----------------------------------------------------------------------
    "ring mesh not a Mesh": (lambda: ring(mesh="cp"), TypeError, "mesh"),
    "ring unknown axis": (lambda: ring(axis_name="sp"), ValueError, "axis_name"),
    "ring cp does not divide T": (
        lambda: ring(mesh=Mesh(np.array(jax.devices()[:3]), ("cp",))),
        ValueError,
        "cp=3",
    ),
    "ring scale inf": (lambda: ring(scale=float("inf")), ValueError, "scale"),
    "ring mixed dtypes": (lambda: ring(value=QKV.astype(jnp.float16)), TypeError, "value"),
    "ring self-attention T_kv != T_q": (
        lambda: ring(key=jnp.zeros((1, 4, 2, 8)), value=jnp.zeros((1, 4, 2, 8))),
        ValueError,
        "T_kv",
    ),
    "ring_schedule cp zero": (
        lambda: thdkit.ring_schedule(
            q_segments=thdkit.Segments.from_ids(IDS, POS), cp=0, max_segments_per_seq=4
        ),
        ValueError,
        "cp",
    ),
    # --- reorders ----------------------------------------------------------------------------
    "striped cp bool": (lambda: reorder.striped(np.arange(8), cp=True), TypeError, "cp"),
    "striped cp zero": (lambda: reorder.striped(np.arange(8), cp=0), ValueError, "cp"),
    "striped axis out of range": (
        lambda: reorder.striped(np.arange(8), cp=2, axis=5),
        ValueError,
        "axis",
    ),
    "striped 0-d": (lambda: reorder.striped(np.int32(3), cp=2), ValueError, "x"),
    "striped stripe_size zero": (
        lambda: reorder.striped(np.arange(8), cp=2, stripe_size=0),
        ValueError,
        "stripe_size",
    ),
    "striped T not a multiple": (lambda: reorder.striped(np.arange(6), cp=4), ValueError, "T=6"),
    "dual_chunk_swap T not a multiple": (
        lambda: reorder.dual_chunk_swap(np.arange(6), cp=2),
        ValueError,
        "T=6",
    ),
    "shard rank float": (lambda: reorder.shard(np.arange(8), cp=4, rank=1.5), TypeError, "rank"),
    "shard rank too big": (lambda: reorder.shard(np.arange(8), cp=4, rank=4), ValueError, "rank"),
    # --- Segments and plans ------------------------------------------------------------------
    "plan of arrays, not Segments": (
        lambda: thdkit.plan_attention(IDS, mask_type="causal", max_segments_per_seq=4),
        TypeError,
        "q_segments",
    ),
    "plan kv batch differs": (
        lambda: plan(kv_segments=thdkit.Segments.from_ids(jnp.concatenate([IDS, IDS]))),
        ValueError,
        "kv_segments",
    ),
    "plan id above S": (
        lambda: plan(max_segments_per_seq=2),
        ValueError,
        r"q_segments row 0, token 7",
    ),
    "plan unknown implementation": (
        lambda: plan(implementation="flash"),
        ValueError,
        "implementation",
    ),
    "plan block_kv float": (lambda: plan(block_kv=64.0), TypeError, "block_kv"),
    "plan not a plan": (
        lambda: thdkit.attention(QKV, QKV, QKV, plan={"ids": IDS}),
        TypeError,
        "plan",
    ),
    "padding_id 2": (lambda: thdkit.Segments.from_ids(IDS, padding_id=2), ValueError, "padding_id"),
    "cu_seqlens decreasing": (
        lambda: thdkit.Segments.from_cu_seqlens(jnp.array([0, 4, 3]), total_len=8),
        ValueError,
        "cu_seqlens row 0, entry 2",
    ),
    "cu_seqlens past total_len": (
        lambda: thdkit.Segments.from_cu_seqlens(jnp.array([0, 9]), total_len=8),
        ValueError,
        "total_len",
    ),
    "cu_seqlens ragged rows": (
        lambda: thdkit.Segments.from_cu_seqlens([[0, 3], [0, 2, 4]], total_len=8),
        ValueError,
        "cu_seqlens must be a rectangular",
    ),
    "cu_seqlens ragged nesting": (
        lambda: thdkit.Segments.from_cu_seqlens([0, [1, 2]], total_len=8),
        ValueError,
        "cu_seqlens must be a rectangular",
    ),
    "from_positions int64 beyond int32": (
        lambda: thdkit.Segments.from_positions(np.array([[0, 1, 2**32 + 1]], np.int64)),
        ValueError,
        r"position_ids row 0, token 2: position 4294967297 is outside the int32",
    ),
    "from_positions list holding 2**33": (
        lambda: thdkit.Segments.from_positions([[0, 1], [0, 2**33]]),
        ValueError,
        r"position_ids row 1, token 1: position 8589934592",
    ),
    "from_positions negative": (
        lambda: thdkit.Segments.from_positions(jnp.array([0, 1, -1])),
        ValueError,
        r"position_ids row 0, token 2: position -1 is negative",
    ),
    "from_positions above MAX_POSITION": (
        lambda: thdkit.Segments.from_positions(np.array([0, MAX_POSITION + 1])),
        ValueError,
        r"position_ids row 0, token 1: position 1073741824 exceeds",
    ),
    "from_positions float": (
        lambda: thdkit.Segments.from_positions(jnp.array([0.0, 1.0])),
        TypeError,
        "position_ids",
    ),
    "with_global_lengths S float": (
        lambda: SEG.with_global_lengths(axis_name="cp", max_segments_per_seq=4.0),
        TypeError,
        "max_segments_per_seq",
    ),
    "with_global_lengths S bool": (
        lambda: SEG.with_global_lengths(axis_name="cp", max_segments_per_seq=True),
        TypeError,
        "max_segments_per_seq",
    ),
    "with_global_lengths S zero": (
        lambda: SEG.with_global_lengths(axis_name="cp", max_segments_per_seq=0),
        ValueError,
        "max_segments_per_seq",
    ),
    # --- validate_segments: the whole Segments ------------------------------------------------
    "validate_segments of arrays": (lambda: check(IDS), TypeError, "q_segments"),
    "validate_segments lengths a tuple": (
        lambda: check(segments(lengths=((3,) * 8,))),
        TypeError,
        r"q_segments\.lengths",
    ),
    "validate_segments float lengths": (
        lambda: check(segments(lengths=SEG.lengths * 1.0)),
        TypeError,
        r"q_segments\.lengths must be int32",
    ),
    "validate_segments int64 lengths": (
        lambda: check(segments(lengths=np.asarray(SEG.lengths, np.int64))),
        TypeError,
        r"q_segments\.lengths must be int32",
    ),
    "validate_segments lengths shape": (
        lambda: check(segments(lengths=SEG.lengths[:, :4])),
        ValueError,
        r"q_segments\.lengths must have the shape",
    ),
    "validate_segments float positions": (
        lambda: check(segments(positions=SEG.positions * 1.0)),
        TypeError,
        "q_segments positions",
    ),
    "validate_segments id above S": (
        lambda: check(max_segments_per_seq=2),
        ValueError,
        r"q_segments row 0, token 7",
    ),
    "validate_segments second run": (
        lambda: check(segments(ids=IDS.at[0, 6].set(2))),
        ValueError,
        r"q_segments row 0, token 6",
    ),
    "validate_segments positions stall (causal)": (
        lambda: check(segments(positions=POS.at[0, 1].set(0)), mask_type="causal"),
        ValueError,
        r"q_segments positions row 0, token 1",
    ),
    "validate_segments length inside a run": (
        lambda: check(segments(lengths=SEG.lengths.at[0, 1].set(2))),
        ValueError,
        r"q_segments\.lengths row 0, token 1: 2 inside a run of length 3",
    ),
    "validate_segments length on padding": (
        lambda: check(segments(lengths=SEG.lengths.at[0, 5].set(2))),
        ValueError,
        r"q_segments\.lengths row 0, token 5: 2 on a padding token",
    ),
    "validate_segments length in row (1, 0)": (
        lambda: check(
            thdkit.Segments(
                jnp.stack([IDS, IDS]),
                jnp.stack([POS, POS]),
                jnp.stack([SEG.lengths, SEG.lengths.at[0, 7].set(5)]),
            )
        ),
        ValueError,
        r"q_segments\.lengths row \(1, 0\), token 7: 5 inside a run of length 1",
    ),
    "validate_segments global length varies": (
        lambda: check(segments(lengths=(SEG.lengths * 2).at[0, 2].set(7)), global_lengths=True),
        ValueError,
        r"q_segments\.lengths row 0, token 2: 7 differs from 6 at token 0",
    ),
    "validate_segments global length short": (
        lambda: check(segments(lengths=SEG.lengths.at[0, 3:5].set(1)), global_lengths=True),
        ValueError,
        r"q_segments\.lengths row 0, token 3: 1 inside a run of length 2",
    ),
    "validate_segments global length on padding": (
        lambda: check(segments(lengths=SEG.lengths.at[0, 6].set(4)), global_lengths=True),
        ValueError,
        r"q_segments\.lengths row 0, token 6: 4 on a padding token",
    ),
    "validate_segments global length above MAX_SEQ_LEN": (
        lambda: check(segments(lengths=SEG.lengths.at[0, 7].set(2**30 + 1)), global_lengths=True),
        ValueError,
        r"q_segments\.lengths row 0, token 7: 1073741825 exceeds",
    ),
    "validate_segments kv name": (
        lambda: check(segments(lengths=SEG.lengths.at[0, 0].set(9)), name="kv_segments"),
        ValueError,
        r"kv_segments\.lengths row 0, token 0",
    ),
    "validate_segments S float": (
        lambda: check(max_segments_per_seq=4.0),
        TypeError,
        "max_segments_per_seq",
    ),
    "validate_segments unknown mask": (
        lambda: check(mask_type="diagonal"),
        ValueError,
        "mask_type",
    ),
    "validate_segments global_lengths str": (
        lambda: check(global_lengths="yes"),
        TypeError,
        "global_lengths",
    ),
    # --- data.pack: checked at construction -----------------------------------------------------
    "pack features a str": (lambda: packed(features="inputs"), TypeError, "features"),
    "pack features unknown": (lambda: packed(features=("tokens",)), ValueError, "features"),
    "pack features of ints": (lambda: packed(features=(1, 2)), TypeError, "features"),
    "pack features repeated": (
        lambda: packed(features=("inputs", "inputs")),
        ValueError,
        "features",
    ),
    "pack features collide": (
        lambda: packed(features=("inputs", "inputs_segment_ids")),
        ValueError,
        "features",
    ),
    "pack not a dataset": (
        lambda: pack([{"inputs": [1]}], seq_len=8, max_segments_per_seq=2, batch_size=1),
        TypeError,
        "dataset",
    ),
    "pack seq_len above MAX_SEQ_LEN": (lambda: packed(seq_len=2**31), ValueError, "seq_len"),
    "pack algorithm a list": (lambda: packed(algorithm=["best_fit"]), TypeError, "algorithm"),
    "pack shuffle_bins str": (lambda: packed(shuffle_bins="no"), TypeError, "shuffle_bins"),
    "pack seed negative": (lambda: packed(seed=-3), ValueError, "seed"),
    "pack drop_remainder int": (lambda: packed(drop_remainder=0), TypeError, "drop_remainder"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_names_the_parameter(case):
    call, error, match = CASES[case]
    with pytest.raises(error, match=match):
        call()


def test_at_least_sixty_cases():
    assert len(CASES) + len(CLI_CASES) >= 60


# --- The command line: every option is checked before any work, exit code 2, one line ---------

CLI_CASES = {
    "seed negative": (["bench", "--seed", "-1"], "--seed"),
    "dtype bogus": (["bench", "attention", "--dtype", "bogus"], "--dtype"),
    "json dir missing": (["bench", "--json", "/missing/dir/x.json"], "--json"),
    "compile-timeout negative": (["bench", "--compile-timeout", "-1"], "--compile-timeout"),
    "mask-type empty": (["bench", "--mask-type", ","], "--mask-type"),
    "seq-len not a size": (["bench", "--seq-len", "12q"], "--seq-len"),
    "unknown method": (["bench", "--method", "linear,quadratic"], "--method"),
    "seq-len above MAX_SEQ_LEN": (["bench", "--seq-len", "3G"], "--seq-len"),
    "attention seq-len above MAX_SEQ_LEN": (
        ["bench", "attention", "--seq-len", "2G"],
        "--seq-len",
    ),
    "plan seq-len above MAX_SEQ_LEN": (["bench", "plan", "--seq-len", "2G"], "--seq-len"),
    "ring seq-len above MAX_SEQ_LEN": (["bench", "ring", "--seq-len", "2G"], "--seq-len"),
    "cp seq-len above MAX_SEQ_LEN": (["bench", "cp", "--seq-len", "2G"], "--seq-len"),
    "metadata segments above MAX_SEGMENTS": (["bench", "--segments", "1G"], "--segments"),
    "segments above MAX_SEGMENTS": (["bench", "attention", "--segments", "1G"], "--segments"),
    "ranks above MAX_RANKS": (["bench", "ring", "--cp", "512", "--seq-len", "1M"], "--cp"),
    "time-per-program inf": (["bench", "--time-per-program", "inf"], "--time-per-program"),
    "heads beyond host memory": (["bench", "attention", "--heads", "1T"], "--heads"),
    "dtype float64 without x64": (["bench", "attention", "--dtype", "float64"], "--dtype"),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_rejects_bad_options_up_front(case):
    args, option = CLI_CASES[case]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert option in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output  # nothing ran


def test_python_m_cli_reaches_every_subcommand():
    for sub in ("ring", "attention"):
        done = subprocess.run(
            [sys.executable, "-m", "thdkit.cli", "bench", sub, "--help"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        assert "Usage" in done.stdout


# --- Edge inputs with a defined answer ---------------------------------------------------------


def test_empty_batch_gives_empty_results():
    ids = jnp.zeros((0, 8), jnp.int32)
    m = thdkit.seqlens_and_offsets(segment_ids_q=ids, segment_pos_q=ids, max_segments_per_seq=4)
    assert m.q_seqlens.shape == (0, 4) and m.q_offsets.shape == (0, 5)
    out = thdkit.attention(
        *(jnp.zeros((0, 8, 2, 8)),) * 3,
        segment_ids_q=ids,
        segment_pos_q=ids,
        max_segments_per_seq=4,
    )
    assert out.shape == (0, 8, 2, 8)


@pytest.mark.parametrize(
    ("mask_type", "window"),
    [
        ("padding", (None, 2**31 - 1)),
        ("padding_causal_bottom_right", (2**31 - 1, None)),
        ("causal", (2**40, 0)),
    ],
)
def test_huge_window_bounds_mean_unbounded(mask_type, window):
    q = jax.random.normal(jax.random.key(0), (1, 8, 2, 8))
    wide = attend(q, q, q, mask_type=mask_type, window_size=window)
    none = attend(q, q, q, mask_type=mask_type, window_size=(None, 0) if window[1] == 0 else None)
    np.testing.assert_allclose(wide, none, rtol=1e-6, atol=1e-6)


def test_ring_with_huge_window_bounds_equals_no_window():
    q = jax.random.normal(jax.random.key(2), (1, 8, 2, 8))
    for mask_type, window in (
        ("padding", (None, 2**31 - 1)),
        ("padding_causal_bottom_right", (2**40, None)),
    ):
        np.testing.assert_allclose(
            ring(q, q, q, mask_type=mask_type, window_size=window),
            ring(q, q, q, mask_type=mask_type),
            rtol=1e-6,
            atol=1e-6,
        )


def test_positions_at_the_top_of_the_range():
    top = POS + (MAX_POSITION - int(POS.max()))
    for mask in ("padding_causal", "padding_causal_bottom_right"):
        for shifted, plain in zip(
            meta(segment_pos_q=top, mask_type=mask), meta(mask_type=mask), strict=True
        ):
            np.testing.assert_array_equal(shifted, plain)
        q = jax.random.normal(jax.random.key(1), (1, 8, 2, 8))
        np.testing.assert_allclose(
            attend(q, q, q, segment_pos_q=top, mask_type=mask),
            attend(q, q, q, mask_type=mask),
            atol=1e-6,
        )


def test_reference_attention_stays_right_at_huge_scales_under_jit():
    """The dense oracle at scale 1e10..1e30: the output of each row is its top key's value (or the
    mean over tied top keys), like blockwise's; rows with no key give 0."""
    rng = np.random.default_rng(7)
    q, k = (jnp.asarray(rng.integers(-8, 9, (1, 8, 2, 8)) / 8, jnp.float32) for _ in range(2))
    v = jnp.asarray(rng.standard_normal((1, 8, 2, 8)), jnp.float32)
    for scale in (1e10, 1e20, 1e30):
        outs = {
            impl: jax.jit(
                lambda q, k, v, impl=impl, scale=scale: attend(
                    q, k, v, implementation=impl, scale=scale
                )
            )(q, k, v)
            for impl in ("reference", "blockwise")
        }
        assert np.isfinite(outs["reference"]).all(), scale
        np.testing.assert_allclose(outs["reference"], outs["blockwise"], atol=1e-6, rtol=1e-6)
        np.testing.assert_array_equal(outs["reference"][0, 5:7], 0.0)  # padding rows


def test_striped_accepts_numpy_ints_in_a_fresh_process():
    code = (
        "import numpy as np; from thdkit._src.reorder import striped; "
        "print(striped(np.arange(8), cp=np.int64(4)).tolist())"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(reorder.striped(np.arange(8), cp=4).tolist())


def test_concrete_layouts_closed_over_by_jit_are_still_validated():
    """Arrays a jitted function closes over are concrete: they are checked while tracing, and a
    valid one runs as if passed eagerly."""
    q = jnp.ones((1, 8, 2, 8))
    calls = {
        "attention": lambda ids: thdkit.attention(
            q, q, q, segment_ids_q=ids, segment_pos_q=POS, max_segments_per_seq=4
        ),
        "seqlens_and_offsets": lambda ids: meta(segment_ids_q=ids).q_seqlens,
        "Segments": lambda ids: thdkit.Segments.from_ids(ids, POS).lengths,
        "plan": lambda ids: (
            thdkit.plan_attention(
                thdkit.Segments.from_ids(ids, POS), mask_type="causal", max_segments_per_seq=4
            )
            .aux["blockwise"]
            .lo
        ),
        "ring_attention": lambda ids: ring(q, q, q, q_segments=thdkit.Segments(ids, POS, 0 * ids)),
    }
    bad = IDS.at[0, 6].set(2)
    for name, call in calls.items():
        np.testing.assert_array_equal(
            jax.jit(lambda call=call: call(IDS))(), call(IDS), err_msg=name
        )
        # The ring validates each shard: row (batch, shard), token inside the shard.
        where = r"row \(0, 1\), token 2" if name == "ring_attention" else "row 0, token 6"
        with pytest.raises(ValueError, match=where):
            jax.jit(lambda call=call: call(bad))()
