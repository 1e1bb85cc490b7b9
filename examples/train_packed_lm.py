"""Train a small byte-level language model on packed rows: padding vs Grain packing vs a ring.

The corpus is every machine's own: the top-level ``.py`` files of Python's standard library,
cut into documents at blank lines (code paragraphs: functions, classes, docstrings, import
blocks), shuffled once with a fixed seed, every 20th document held out for evaluation. One run
trains several modes, from the same initial parameters, on the same documents in the same order:

- ``none``: one document per row, padded to ``--seq-len`` (Grain packing with
  ``max_segments_per_seq=1``), ``--padded-batch-size`` rows a step;
- ``grain``: Grain's first-fit packing, up to ``--max-segments-per-seq`` documents per row,
  ``--batch-size`` rows a step;
- ``grain-cp4``: the packed rows, striped on the host (``thdkit.data.pack(cp=4)``, whose
  ``batch["segments"]`` the layer takes as it is) and trained with ring attention over 4
  simulated CPU devices.

The two batch sizes give both packings about the same useful tokens (and documents) a step: a
padded row of 1024 holds one document, about 233 tokens (77% padding), a packed row about 4.2
documents, 980 tokens (4% padding), so 13 padded rows carry about what 3 packed rows do. The
optimisation is then alike step for step and packing changes only the cost of a step.

``--mode`` names the modes, comma-separated, each with its steps after a colon (``--steps``
where none is given). By
default the packed mode trains past the padded run's 200 steps, to 300, so that the summary can
tell when its held-out loss reaches the padded run's final one. The modes train side by side,
one step of each in turn, so that other work on the machine slows them alike. Each step's clock
covers the whole step (the next batch is packed on the host while the device computes);
compilation happens ahead of time and is reported apart (``compile_s``); evaluation is not
timed. Every mode evaluates on the same held-out documents (``--eval-documents`` of them, in its
own layout), so the held-out losses of the modes compare directly (at step 0, with the same
initial parameters, they are equal).

The model is a decoder-only transformer (pre-norm, ``thdkit.flax.PackedSelfAttention`` with RoPE
and grouped-query attention, a GELU MLP), its layers stacked and run with ``nnx.scan``; the
attention plan is computed once per step and shared by every layer. The run shows a progress bar
per mode (loss, useful tokens/s, padding share), writes ``<out>/summary.json`` and draws
``<out>/loss.png`` (loss vs step and vs wall time); the summary records the versions (thdkit,
jax, jaxlib, flax, optax, grain) and the machine. With ``none`` and ``grain`` the summary
compares them (wall time for packing to reach the padded run's final held-out loss, useful
tokens/s); with ``grain`` and ``grain-cpK``, their loss curves.

    pip install "thdkit[flax,bench]"
    python examples/train_packed_lm.py                    # --mode none,grain:300,grain-cp4:50
    python examples/train_packed_lm.py --mode none,grain --steps 100
    python examples/train_packed_lm.py --tiny             # 3 steps of each mode, for CI
    python examples/train_packed_lm.py --help             # every option, its help and default
"""

import os
import sys

# Ring attention runs on simulated CPU devices; JAX reads the flag once, when it starts.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import argparse
import dataclasses
import importlib.metadata
import json
import pathlib
import re
import sysconfig
import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import thdkit
from thdkit.data import pack
from thdkit.flax import PackedSelfAttention

VOCAB = 256  # bytes


@dataclasses.dataclass(frozen=True)
class Config:
    """The run's options (the command line), shared by its modes."""

    modes: tuple[str, ...] = ("none", "grain:300", "grain-cp4:50")
    steps: int = 200
    seq_len: int = 1024
    max_segments_per_seq: int = 32
    batch_size: int = 3  # packed rows a step (grain modes)
    padded_batch_size: int = 13  # rows a step of `none`: about the tokens of 3 packed rows
    layers: int = 4
    d_model: int = 128
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    learning_rate: float = 3e-3
    eval_every: int = 20
    eval_documents: int = 128
    max_documents: int | None = None
    seed: int = 0
    out: str = "train_out"


HELP = {
    "modes": "the modes, comma-separated: none (one document a row, padded), grain (packed) or "
    "grain-cp<K> (packed, striped, ring attention on K devices), each optionally :<steps>",
    "steps": "training steps of a mode that names none",
    "seq_len": "T, tokens per row",
    "max_segments_per_seq": "S, the most documents a packed row holds (the padded mode: 1)",
    "batch_size": "rows a step of the packed modes",
    "padded_batch_size": "rows a step of the padded mode (about the useful tokens of the packed "
    "rows)",
    "layers": "transformer blocks",
    "d_model": "model width",
    "heads": "query heads",
    "kv_heads": "key/value heads (dividing --heads)",
    "head_dim": "head dim",
    "learning_rate": "AdamW learning rate",
    "eval_every": "steps between held-out evaluations",
    "eval_documents": "held-out documents every evaluation reads",
    "max_documents": "documents read from the standard library",
    "seed": "seed of the document order and of the initial parameters",
    "out": "folder for summary.json and loss.png",
}
"""The help text of each option of :class:`Config` (``--`` + the field, hyphenated; ``modes``
is ``--mode``)."""
FLAGS = {"modes": "--mode"}


@dataclasses.dataclass(frozen=True)
class Mode:
    """One mode of a run: its packing, context-parallel ranks, steps, rows a step and S."""

    packing: str
    cp: int
    steps: int
    batch_size: int
    max_segments_per_seq: int  # S: 1 (one document a row) when padded, else the option's

    @property
    def name(self) -> str:
        return self.packing + (f"-cp{self.cp}" if self.cp > 1 else "")


def parse_mode(text: str, config: Config) -> Mode:
    """``none``, ``grain`` or ``grain-cp<K>``, optionally ``:<steps>``."""
    match = re.fullmatch(r"(none|grain)(?:-cp(\d+))?(?::(\d+))?", text)
    if match is None or (match[1] == "none" and match[2]):
        raise ValueError(
            f"--mode: expected none, grain or grain-cp<K>, each optionally :<steps>, got {text!r}"
        )
    padded = match[1] == "none"
    mode = Mode(
        packing=match[1],
        cp=int(match[2] or 1),
        steps=int(match[3]) if match[3] else config.steps,
        batch_size=config.padded_batch_size if padded else config.batch_size,
        max_segments_per_seq=1 if padded else config.max_segments_per_seq,
    )
    if mode.cp < 1 or mode.steps < 1:
        raise ValueError(f"--mode {text}: cp and steps must be >= 1")
    return mode


TINY = dict(
    modes=("none", "grain", "grain-cp4"),
    steps=3,
    seq_len=64,
    max_segments_per_seq=8,
    batch_size=2,
    padded_batch_size=4,
    layers=2,
    d_model=32,
    heads=2,
    kv_heads=1,
    head_dim=16,
    eval_every=2,
    eval_documents=8,
    max_documents=400,
)


# --- Data ---------------------------------------------------------------------------------------


def documents(limit: int | None, seed: int) -> tuple[list[bytes], list[bytes]]:
    """The stdlib's code paragraphs, shuffled: (training documents, held-out documents)."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.glob("*.py")):
        docs += [p for p in re.split(rb"\n\s*\n", path.read_bytes()) if len(p.strip()) > 1]
    order = np.random.default_rng(seed).permutation(len(docs))
    docs = [docs[i] for i in order[:limit]]
    held_out = {i for i in range(len(docs)) if i % 20 == 19}
    train = [d for i, d in enumerate(docs) if i not in held_out]
    return train, [docs[i] for i in sorted(held_out)]


def as_examples(docs: list[bytes]) -> list[dict[str, np.ndarray]]:
    """Next-byte prediction: inputs are all bytes but the last, targets all but the first."""
    arrays = [np.frombuffer(d, np.uint8).astype(np.int32) for d in docs]
    return [{"inputs": a[:-1], "targets": a[1:]} for a in arrays]


def batches(docs: list[bytes], config: Config, mode: Mode, *, repeat: bool) -> Any:
    """The mode's batches: packed (or one document a row) by thdkit.data.pack, reordered for cp.

    Without ``repeat`` every document arrives once and the last batch is topped up with empty
    rows, so that every batch has the one shape the step is compiled for.
    """
    dataset = grain.MapDataset.source(as_examples(docs))
    if repeat:
        dataset = dataset.repeat()
    rows = mode.batch_size
    packed = pack(
        dataset,
        seq_len=config.seq_len,
        max_segments_per_seq=mode.max_segments_per_seq,
        batch_size=rows,
        features=("inputs", "targets"),
        num_packing_bins=4 * rows,
        cp=mode.cp,
        drop_remainder=repeat,
    )
    if repeat:
        return packed

    def top_up(v: np.ndarray) -> np.ndarray:  # every array and Segments field alike
        return np.concatenate([v, np.zeros((rows - len(v), *v.shape[1:]), v.dtype)])

    return [jax.tree.map(top_up, b) for b in packed]


# --- Model --------------------------------------------------------------------------------------


class Block(nnx.Module):
    """Pre-norm transformer block: packed self-attention and a GELU MLP."""

    def __init__(self, config: Config, *, rngs: nnx.Rngs) -> None:
        d = config.d_model
        self.attn_norm = nnx.RMSNorm(d, rngs=rngs)
        self.attn = PackedSelfAttention(
            config.heads,
            d,
            qkv_features=config.heads * config.head_dim,
            num_kv_heads=config.kv_heads,
            mask_type="padding_causal",
            use_bias=False,
            rngs=rngs,
        )
        self.mlp_norm = nnx.RMSNorm(d, rngs=rngs)
        self.up = nnx.Linear(d, 4 * d, rngs=rngs)
        self.down = nnx.Linear(4 * d, d, rngs=rngs)

    def __call__(self, x: jax.Array, layout: Any, ring: dict[str, Any]) -> jax.Array:
        x = x + self.attn(self.attn_norm(x), layout, **ring)
        return x + self.down(jax.nn.gelu(self.up(self.mlp_norm(x))))


class LanguageModel(nnx.Module):
    """Byte-level decoder-only LM; the layers are stacked (nnx.vmap) and run with nnx.scan."""

    def __init__(self, config: Config, *, rngs: nnx.Rngs) -> None:
        self.embed = nnx.Embed(VOCAB, config.d_model, rngs=rngs)

        @nnx.split_rngs(splits=config.layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs: nnx.Rngs) -> Block:
            return Block(config, rngs=rngs)

        self.blocks = make_blocks(rngs)
        self.norm = nnx.RMSNorm(config.d_model, rngs=rngs)
        self.head = nnx.Linear(config.d_model, VOCAB, rngs=rngs)

    def __call__(
        self,
        tokens: jax.Array,
        segments: thdkit.Segments,
        *,
        max_segments_per_seq: int,
        mesh: Mesh | None = None,
    ) -> jax.Array:
        if mesh is None:
            # One plan per step, shared by every layer (the scan closes over it).
            layout = thdkit.plan_attention(
                segments, mask_type="padding_causal", max_segments_per_seq=max_segments_per_seq
            )
            ring = {}
        else:
            layout = segments
            ring = dict(max_segments_per_seq=max_segments_per_seq, mesh=mesh, axis_name="cp")

        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def layers(x: jax.Array, block: Block) -> jax.Array:
            return block(x, layout, ring)

        x = layers(self.embed(tokens), self.blocks)
        return self.head(self.norm(x)).astype(jnp.float32)


def token_losses(model: LanguageModel, batch: dict[str, jax.Array], mode: Mode, mesh: Any) -> Any:
    """Cross-entropy of every token, float32[B, T] (0 on padding)."""
    # pack's batch["segments"]: the batch's layout, in the batch's token order (striped at cp > 1,
    # where the ring takes it as it is), checked on the host when it was packed.
    segments = batch["segments"]
    logits = model(
        batch["inputs"], segments, max_segments_per_seq=mode.max_segments_per_seq, mesh=mesh
    )
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    return jnp.where(batch["inputs_segment_ids"] > 0, losses, 0.0)


def mean_loss(model: LanguageModel, batch: dict[str, jax.Array], mode: Mode, mesh: Any) -> Any:
    real = jnp.sum(batch["inputs_segment_ids"] > 0)
    return jnp.sum(token_losses(model, batch, mode, mesh)) / jnp.maximum(real, 1)


# --- Training -----------------------------------------------------------------------------------


def per_document_check(losses: Any, batch: dict[str, Any], rows: int) -> dict:
    """Each document's loss inside a packed row vs alone in a padded row (same parameters)."""
    seq_len = batch["inputs"].shape[1]
    arrays = [k for k, v in batch.items() if isinstance(v, np.ndarray)]
    alone: list[dict[str, np.ndarray]] = []
    keys = []
    for b, ids in enumerate(batch["inputs_segment_ids"]):
        for s in np.unique(ids[ids > 0]):
            where = ids == s
            n = int(where.sum())
            row = {k: np.zeros(seq_len, np.int32) for k in arrays}
            for k in ("inputs", "targets"):
                row[k][:n] = batch[k][b][where]
            row["inputs_segment_ids"][:n] = 1
            row["inputs_positions"][:n] = np.arange(n)
            alone.append(row)
            keys.append((b, s))
    packed = np.asarray(losses(batch))
    padded = []
    for start in range(0, len(alone), rows):
        chunk = alone[start : start + rows]
        chunk += [{k: np.zeros_like(v) for k, v in alone[0].items()}] * (rows - len(chunk))
        stacked = {k: np.stack([r[k] for r in chunk]) for k in arrays}
        ids = stacked["inputs_segment_ids"]  # one document a row: its length is the row's count
        lengths = np.where(ids > 0, (ids > 0).sum(axis=1, keepdims=True), 0).astype(np.int32)
        stacked["segments"] = thdkit.Segments(ids, stacked["inputs_positions"], lengths)
        padded.append(np.asarray(losses(stacked))[: len(alone) - start])
    padded = np.concatenate(padded)
    diffs = []
    for i, (b, s) in enumerate(keys):
        where = batch["inputs_segment_ids"][b] == s
        in_row, by_itself = packed[b][where].mean(), padded[i][: int(where.sum())].mean()
        diffs.append(abs(float(in_row) - float(by_itself)) / abs(float(by_itself)))
    return {"documents": len(keys), "max_relative_difference": max(diffs)}


def initial_state(config: Config) -> tuple[nnx.GraphDef, Any]:
    """The model and its optimizer, built in one compiled call: (graph, state), shared by modes."""

    @nnx.jit
    def create() -> tuple[LanguageModel, nnx.Optimizer]:
        model = LanguageModel(config, rngs=nnx.Rngs(config.seed))
        return model, nnx.Optimizer(model, optax.adamw(config.learning_rate), wrt=nnx.Param)

    return nnx.split(create())


class Run:
    """One mode's training: its compiled step and loss, batch stream, clock and record."""

    def __init__(
        self,
        config: Config,
        mode: Mode,
        start: tuple[nnx.GraphDef, Any],
        train_docs: list[bytes],
        eval_docs: list[bytes],
    ) -> None:
        self.config, self.mode = config, mode
        self.mesh = Mesh(np.array(jax.devices()[: mode.cp]), ("cp",)) if mode.cp > 1 else None
        graphdef, self.state = start
        mesh, replicated = self.mesh, None
        if mesh is not None:
            replicated = NamedSharding(mesh, P())
            self.state = jax.device_put(self.state, replicated)

        def train_step(state: Any, batch: dict) -> tuple[Any, jax.Array]:
            model, optimizer = nnx.merge(graphdef, state)
            loss, grads = nnx.value_and_grad(lambda m: mean_loss(m, batch, mode, mesh))(model)
            optimizer.update(model, grads)
            return nnx.state((model, optimizer)), loss

        def losses(state: Any, batch: dict) -> jax.Array:
            return token_losses(nnx.merge(graphdef, state)[0], batch, mode, mesh)

        self.stream = iter(batches(train_docs, config, mode, repeat=True))
        self.batch = next(self.stream)
        self.eval_set = [self.on_device(b) for b in batches(eval_docs, config, mode, repeat=False)]
        # Every batch has the one shape [rows, T]: each function is compiled once, ahead of time
        # (compile), and no step on the training clock includes compilation.
        example = self.on_device(self.batch)
        self.lowered = (
            jax.jit(train_step, out_shardings=replicated).lower(self.state, example),
            jax.jit(losses).lower(self.state, example),
        )
        self.record: dict[str, Any] = {"mode": dataclasses.asdict(mode), "steps": []}
        self.step_count = self.tokens = self.real = self.documents = 0
        self.wall = 0.0

    def compile(self) -> None:
        """Compiles the step and the loss; checks per-document losses (packed modes at cp 1)."""
        start = time.perf_counter()
        self.train_step, self.losses = (lowered.compile() for lowered in self.lowered)
        self.record["compile_s"] = time.perf_counter() - start
        # Step 0: the initial parameters, identical in every mode, on the same held-out documents.
        self.record["evals"] = [{"step": 0, "wall_s": 0.0, "loss": self.evaluate()}]
        if self.mode.packing == "grain" and self.mode.cp == 1:
            self.record["per_document_check"] = per_document_check(
                lambda b: self.losses(self.state, self.on_device(b)),
                self.batch,
                self.mode.batch_size,
            )

    def on_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch (arrays and its Segments) on the device; at cp > 1 sharded over the ring."""
        if self.mesh is None:
            return jax.tree.map(jnp.asarray, batch)
        return jax.device_put(batch, NamedSharding(self.mesh, P(None, "cp")))

    @property
    def done(self) -> bool:
        return self.step_count >= self.mode.steps

    @property
    def padding(self) -> float:
        return 1 - self.real / max(self.tokens, 1)

    def step(self) -> float:
        """One timed training step (then an untimed evaluation when one is due); its loss."""
        start = time.perf_counter()
        batch = self.batch
        self.state, loss = self.train_step(self.state, self.on_device(batch))
        # The step runs asynchronously: the host packs the next batch meanwhile.
        self.batch = next(self.stream)
        loss = float(loss)
        self.wall += time.perf_counter() - start
        self.step_count += 1
        ids = batch["inputs_segment_ids"]
        self.tokens += ids.size
        self.real += int((ids > 0).sum())
        self.documents += sum(len(np.unique(row[row > 0])) for row in ids)
        self.record["steps"].append({"step": self.step_count, "wall_s": self.wall, "loss": loss})
        if self.step_count % self.config.eval_every == 0 or self.done:
            self.record["evals"].append(
                {"step": self.step_count, "wall_s": self.wall, "loss": self.evaluate()}
            )
        return loss

    def evaluate(self) -> float:
        """The mean loss of the held-out tokens (the same documents in every mode)."""
        total = sum(float(jnp.sum(self.losses(self.state, b))) for b in self.eval_set)
        return total / sum(int(jnp.sum(b["inputs_segment_ids"] > 0)) for b in self.eval_set)

    def finish(self) -> dict[str, Any]:
        self.record.update(
            wall_s=self.wall,
            tokens_per_s=self.tokens / self.wall,
            useful_tokens_per_s=self.real / self.wall,
            padding_share=self.padding,
            documents_per_step=self.documents / self.step_count,
            final_eval_loss=self.record["evals"][-1]["loss"],
            device=f"{jax.devices()[0].platform} x{self.mode.cp}",
        )
        return self.record


def train(config: Config, modes: list[Mode]) -> dict[str, Any]:
    """Trains the modes side by side, one step of each in turn; returns their JSON records."""
    import rich.progress

    train_docs, eval_docs = documents(config.max_documents, config.seed)
    eval_docs = eval_docs[: config.eval_documents]
    start = initial_state(config)
    runs = [Run(config, mode, start, train_docs, eval_docs) for mode in modes]
    for run in runs:
        run.compile()
    columns = (
        rich.progress.TextColumn("[bold]{task.description:>10}"),
        rich.progress.BarColumn(),
        rich.progress.MofNCompleteColumn(),
        rich.progress.TextColumn("loss {task.fields[loss]:.3f}"),
        rich.progress.TextColumn("{task.fields[rate]:>7,.0f} useful tok/s"),
        rich.progress.TextColumn("padding {task.fields[padding]:.0%}"),
        rich.progress.TimeElapsedColumn(),
    )
    with rich.progress.Progress(*columns) as progress:
        fields = dict(loss=float("nan"), rate=0, padding=0)
        tasks = [progress.add_task(r.mode.name, total=r.mode.steps, **fields) for r in runs]
        while not all(run.done for run in runs):
            for run, task in zip(runs, tasks, strict=True):
                if not run.done:
                    loss = run.step()
                    rate = run.real / run.wall
                    progress.update(task, advance=1, loss=loss, rate=rate, padding=run.padding)
    return {run.mode.name: run.finish() for run in runs}


# --- Summary and figure -------------------------------------------------------------------------


def compare(runs: dict[str, Any]) -> dict[str, Any]:
    """The targets, from whichever modes ran."""
    out: dict[str, Any] = {}
    if "none" in runs and "grain" in runs:
        padded, packed = runs["none"], runs["grain"]
        goal, last = padded["final_eval_loss"], padded["evals"][-1]["step"]
        reached = [e for e in packed["evals"] if e["loss"] <= goal]
        same_step = [e["loss"] for e in packed["evals"] if e["step"] == last]
        out["packed_vs_padded"] = {
            "padded_final_eval_loss": goal,
            "padded_steps": last,
            "padded_wall_s": padded["wall_s"],
            "packed_eval_loss_at_that_step": same_step[0] if same_step else None,
            "packed_step_reaching_it": reached[0]["step"] if reached else None,
            "packed_wall_s_to_reach_it": reached[0]["wall_s"] if reached else None,
            "time_ratio": reached[0]["wall_s"] / padded["wall_s"] if reached else None,
            "useful_tokens_per_s_ratio": packed["useful_tokens_per_s"]
            / padded["useful_tokens_per_s"],
        }
    for name, run in runs.items():
        if name.startswith("grain-cp") and "grain" in runs:
            base = {s["step"]: s["loss"] for s in runs["grain"]["steps"]}
            common = [s for s in run["steps"] if s["step"] in base]
            rel = [abs(s["loss"] - base[s["step"]]) / abs(base[s["step"]]) for s in common]
            out[f"{name}_vs_cp1"] = {"steps": len(common), "max_relative_difference": max(rel)}
    return out


def plot(runs: dict[str, Any], comparisons: dict[str, Any], path: pathlib.Path) -> None:
    """Loss vs step and vs wall time, every mode (held-out: dots; training: thin lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4))
    for name, run in runs.items():
        steps, evals = run["steps"], run["evals"]
        line = by_step.plot([s["step"] for s in steps], [s["loss"] for s in steps], lw=0.6)[0]
        for axis, x in ((by_step, "step"), (by_time, "wall_s")):
            axis.plot(
                [e[x] for e in evals],
                [e["loss"] for e in evals],
                "o-",
                color=line.get_color(),
                ms=3,
                label=f"{name} (held-out)",
            )
        by_time.plot(
            [s["wall_s"] for s in steps], [s["loss"] for s in steps], lw=0.6, alpha=0.4,
            color=line.get_color(), label=f"{name} (train)",
        )  # fmt: skip
    target = comparisons.get("packed_vs_padded")
    if target is not None:
        by_time.axhline(
            target["padded_final_eval_loss"], color="gray", ls=":", lw=1,
            label="padded final held-out loss",
        )  # fmt: skip
    # The initial loss (step 0, ~ln 256) would flatten the curves: start the axis below it.
    later = [e["loss"] for run in runs.values() for e in run["evals"] if e["step"] > 0]
    for axis in (by_step, by_time):
        axis.set_ylim(top=max(later) + 0.5)
    by_step.set(xlabel="step", ylabel="loss (nats/byte)", title="loss vs step")
    by_time.set(
        xlabel="wall time of the training steps (s)",
        ylabel="loss (nats/byte)",
        title="loss vs wall time",
    )
    by_time.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def environment() -> dict[str, Any]:
    """Where the run was measured: thdkit's benchmark environment (versions of thdkit, jax and
    jaxlib, backend, devices, CPUs, memory, date) and the versions of flax, optax and grain."""
    from thdkit.bench.measure import environment as bench_environment

    env = bench_environment()
    for name in ("flax", "optax", "grain"):
        env[name] = importlib.metadata.version(name)
    return env


def parse(argv: list[str]) -> tuple[Config, list[Mode]]:
    """The command line: every option of :class:`Config`, with its help and default."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Options given with --tiny override its values.",
    )
    tiny = ", ".join(f"{_flag(k)} {_shown(v)}" for k, v in TINY.items())
    parser.add_argument(
        "--tiny", action="store_true", help=f"the CI configuration: {tiny} (default: off)"
    )
    defaults = Config()
    for field in dataclasses.fields(Config):
        flag, default = _flag(field.name), getattr(defaults, field.name)
        help_text = f"{HELP[field.name]} (default: {_shown(default)})"
        if field.name == "modes":
            kind: Any = _names
        else:
            kind = int if field.name == "max_documents" else type(default)
        metavar = {"modes": "LIST", "out": "PATH"}.get(field.name, kind.__name__.upper())
        parser.add_argument(
            flag, type=kind, default=None, dest=field.name, metavar=metavar, help=help_text
        )
    args = parser.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None and k != "tiny"}
    config = Config(**({**TINY, **given} if args.tiny else given))
    try:
        modes = [parse_mode(text, config) for text in config.modes]
    except ValueError as error:
        parser.error(str(error))
    if len({m.name for m in modes}) < len(modes):
        parser.error(f"--mode names a mode twice: {','.join(config.modes)}")
    for mode in modes:
        if mode.cp > len(jax.devices()):
            parser.error(f"--mode {mode.name}: only {len(jax.devices())} devices")
    return config, modes


def _flag(field: str) -> str:
    """The option of a :class:`Config` field."""
    return FLAGS.get(field, "--" + field.replace("_", "-"))


def _names(text: str) -> tuple[str, ...]:
    """A comma-separated list."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _shown(value: Any) -> str:
    """An option's value as it is typed (lists comma-separated)."""
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return "all" if value is None else str(value)


def main(argv: list[str]) -> None:
    config, modes = parse(argv)
    runs = train(config, modes)
    out = pathlib.Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    comparisons = compare(runs)
    summary = {
        "config": dataclasses.asdict(config),
        "environment": environment(),
        "runs": runs,
        "comparisons": comparisons,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    plot(runs, comparisons, out / "loss.png")
    keys = ("compile_s", "wall_s", "useful_tokens_per_s", "padding_share", "final_eval_loss")
    brief = {name: {k: run[k] for k in keys} for name, run in runs.items()}
    print(json.dumps({**brief, **comparisons}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
