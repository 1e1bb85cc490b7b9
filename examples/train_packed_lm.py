"""Train a small byte-level language model on packed rows: padding vs Grain packing vs a ring.

The corpus is every machine's own: the top-level ``.py`` files of Python's standard library,
cut into documents at blank lines (code paragraphs: functions, classes, docstrings, import
blocks), shuffled once with a fixed seed, every 20th document held out for evaluation. Every mode
reads the same documents in the same order:

- ``--packing none``: one document per row, padded to ``--seq-len`` (Grain packing with
  ``max_segments_per_seq=1``);
- ``--packing grain``: Grain's first-fit packing, up to ``--max-segments`` documents per row;
- ``--packing grain --cp 4``: the same rows, striped on the host (``thdkit.data.pack(cp=4)``)
  and trained with ring attention over 4 simulated CPU devices.

The two packings train on about the same number of useful tokens (and documents) per step:
``none`` takes 12 rows a step, ``grain`` 5 (one packed row holds about 2.4 documents), so the
optimisation is alike step for step and packing changes only the cost of a step.

The model is a decoder-only transformer (pre-norm, ``thdkit.flax.PackedSelfAttention`` with RoPE
and grouped-query attention, a GELU MLP), its layers stacked and run with ``nnx.scan``; the
attention plan is computed once per step and shared by every layer. Each run prints a progress
bar (loss, tokens/s, padding share), then adds its record to ``<out>/summary.json`` and redraws
``<out>/loss.png`` (loss vs step and vs wall time) for every run recorded there. With both
``none`` and ``grain`` recorded the summary compares them (time for packing to reach the padded
run's final evaluation loss, useful tokens/s); with ``grain`` at cp 1 and cp > 1, the loss curves.

    pip install "thdkit[flax,bench]"
    python examples/train_packed_lm.py --packing none
    python examples/train_packed_lm.py --packing grain
    python examples/train_packed_lm.py --packing grain --cp 4 --steps 50
    python examples/train_packed_lm.py --tiny --packing grain   # seconds, for CI
"""

import os
import sys

# Ring attention runs on simulated CPU devices; JAX reads the flag once, when it starts.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import argparse
import dataclasses
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
    """One run's options (the command line)."""

    packing: str = "grain"
    cp: int = 1
    steps: int = 200
    batch_size: int = 0  # 0: 12 rows for --packing none, 5 for grain (similar useful tokens)
    seq_len: int = 512
    max_segments: int = 32
    layers: int = 4
    d_model: int = 128
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    learning_rate: float = 3e-3
    eval_every: int = 25
    eval_batches: int = 4
    max_documents: int | None = None
    seed: int = 0
    out: str = "train_out"

    @property
    def name(self) -> str:
        return self.packing + (f"-cp{self.cp}" if self.cp > 1 else "")

    @property
    def segments(self) -> int:
        return 1 if self.packing == "none" else self.max_segments


TINY = dict(
    steps=4,
    batch_size=2,
    seq_len=64,
    max_segments=8,
    layers=2,
    d_model=32,
    heads=2,
    kv_heads=1,
    head_dim=16,
    eval_every=2,
    eval_batches=1,
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


def batches(docs: list[bytes], config: Config, *, repeat: bool) -> Any:
    """The run's batches: packed (or one document a row) by thdkit.data.pack, reordered for cp."""
    dataset = grain.MapDataset.source(as_examples(docs))
    if repeat:
        dataset = dataset.repeat()
    return pack(
        dataset,
        seq_len=config.seq_len,
        max_segments_per_seq=config.segments,
        batch_size=config.batch_size,
        features=("inputs", "targets"),
        num_packing_bins=4 * config.batch_size,
        cp=config.cp,
    )


# --- Model --------------------------------------------------------------------------------------


class Block(nnx.Module):
    """Pre-norm transformer block: packed self-attention and a GELU MLP."""

    def __init__(self, config: Config, *, rngs: nnx.Rngs) -> None:
        d = config.d_model
        self.attn_norm = nnx.RMSNorm(d, rngs=rngs)
        self.attn = PackedSelfAttention(
            d,
            config.heads,
            config.kv_heads,
            config.head_dim,
            mask_type="padding_causal",
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
        self.config = config
        self.embed = nnx.Embed(VOCAB, config.d_model, rngs=rngs)

        @nnx.split_rngs(splits=config.layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs: nnx.Rngs) -> Block:
            return Block(config, rngs=rngs)

        self.blocks = make_blocks(rngs)
        self.norm = nnx.RMSNorm(config.d_model, rngs=rngs)
        self.head = nnx.Linear(config.d_model, VOCAB, rngs=rngs)

    def __call__(
        self, tokens: jax.Array, segments: thdkit.Segments, *, mesh: Any = None
    ) -> jax.Array:
        if mesh is None:
            # One plan per step, shared by every layer (the scan closes over it).
            layout = thdkit.plan_attention(
                segments, mask_type="padding_causal", max_segments_per_seq=self.config.segments
            )
            ring = {}
        else:
            layout = segments
            ring = dict(max_segments_per_seq=self.config.segments, mesh=mesh, axis_name="cp")

        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def layers(x: jax.Array, block: Block) -> jax.Array:
            return block(x, layout, ring)

        x = layers(self.embed(tokens), self.blocks)
        return self.head(self.norm(x)).astype(jnp.float32)


def token_losses(model: LanguageModel, batch: dict[str, jax.Array], mesh: Any) -> jax.Array:
    """Cross-entropy of every token, float32[B, T] (0 on padding)."""
    # Under jit nothing is validated, so reordered (striped) rows are accepted; the ring reads
    # only ids and positions.
    segments = thdkit.Segments.from_ids(batch["inputs_segment_ids"], batch["inputs_positions"])
    logits = model(batch["inputs"], segments, mesh=mesh)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    return jnp.where(batch["inputs_segment_ids"] > 0, losses, 0.0)


def mean_loss(model: LanguageModel, batch: dict[str, jax.Array], mesh: Any) -> jax.Array:
    real = jnp.sum(batch["inputs_segment_ids"] > 0)
    return jnp.sum(token_losses(model, batch, mesh)) / jnp.maximum(real, 1)


# --- Training -----------------------------------------------------------------------------------


def per_document_check(
    losses: Any, model: LanguageModel, batch: dict[str, np.ndarray], config: Config
) -> dict:
    """Each document's loss inside a packed row vs alone in a padded row (same parameters)."""
    rows: list[dict[str, np.ndarray]] = []
    keys = []
    for b, ids in enumerate(batch["inputs_segment_ids"]):
        for s in np.unique(ids[ids > 0]):
            where = ids == s
            n = int(where.sum())
            row = {k: np.zeros(config.seq_len, np.int32) for k in batch}
            for k in ("inputs", "targets"):
                row[k][:n] = batch[k][b][where]
            row["inputs_segment_ids"][:n] = 1
            row["inputs_positions"][:n] = np.arange(n)
            rows.append(row)
            keys.append((b, s))
    packed = np.asarray(losses(model, batch))
    padded = []
    for start in range(0, len(rows), config.batch_size):
        chunk = rows[start : start + config.batch_size]
        chunk += [{k: np.zeros_like(v) for k, v in rows[0].items()}] * (
            config.batch_size - len(chunk)
        )
        stacked = {k: np.stack([r[k] for r in chunk]) for k in rows[0]}
        padded.append(np.asarray(losses(model, stacked))[: len(rows) - start])
    padded = np.concatenate(padded)
    diffs = []
    for i, (b, s) in enumerate(keys):
        in_row = packed[b][batch["inputs_segment_ids"][b] == s].mean()
        alone = padded[i][: int((batch["inputs_segment_ids"][b] == s).sum())].mean()
        diffs.append(abs(float(in_row) - float(alone)) / abs(float(alone)))
    return {"documents": len(keys), "max_relative_difference": max(diffs)}


def train(config: Config) -> dict[str, Any]:
    """Trains one mode; returns its JSON record."""
    import rich.progress

    train_docs, eval_docs = documents(config.max_documents, config.seed)
    mesh = None
    if config.cp > 1:
        mesh = Mesh(np.array(jax.devices()[: config.cp]), ("cp",))
    model = LanguageModel(config, rngs=nnx.Rngs(config.seed))
    if mesh is not None:
        replicated = NamedSharding(mesh, P())
        nnx.update(model, jax.device_put(nnx.state(model), replicated))
    optimizer = nnx.Optimizer(model, optax.adamw(config.learning_rate), wrt=nnx.Param)

    def on_device(batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        if mesh is None:
            return {k: jnp.asarray(v) for k, v in batch.items()}
        return jax.device_put(batch, NamedSharding(mesh, P(None, "cp")))

    @nnx.jit
    def train_step(model: LanguageModel, optimizer: nnx.Optimizer, batch: dict) -> jax.Array:
        loss, grads = nnx.value_and_grad(lambda m: mean_loss(m, batch, mesh))(model)
        optimizer.update(model, grads)
        return loss

    losses = nnx.jit(lambda model, batch: token_losses(model, batch, mesh))

    def evaluate() -> float:
        total = sum(float(jnp.sum(losses(model, b))) for b in eval_set)
        return total / sum(int(jnp.sum(b["inputs_segment_ids"] > 0)) for b in eval_set)

    eval_set = [on_device(b) for b in list(batches(eval_docs, config, repeat=False))]
    eval_set = eval_set[: config.eval_batches]

    record: dict[str, Any] = {"config": dataclasses.asdict(config), "steps": [], "evals": []}
    stream = iter(batches(train_docs, config, repeat=True))
    first = next(stream)
    if config.cp == 1 and config.packing == "grain":
        record["per_document_check"] = per_document_check(losses, model, first, config)
    tokens = real = 0
    wall = 0.0
    columns = (
        rich.progress.TextColumn(f"[bold]{config.name}"),
        rich.progress.BarColumn(),
        rich.progress.MofNCompleteColumn(),
        rich.progress.TextColumn("loss {task.fields[loss]:.3f}"),
        rich.progress.TextColumn("{task.fields[rate]:,.0f} tok/s"),
        rich.progress.TextColumn("padding {task.fields[padding]:.0%}"),
        rich.progress.TimeElapsedColumn(),
    )
    with rich.progress.Progress(*columns) as progress:
        task = progress.add_task("train", total=config.steps, loss=float("nan"), rate=0, padding=0)
        batch = first
        for step in range(1, config.steps + 1):
            start = time.perf_counter()
            if step > 1:
                batch = next(stream)
            loss = float(train_step(model, optimizer, on_device(batch)))
            wall += time.perf_counter() - start
            tokens += batch["inputs"].size
            real += int((batch["inputs_segment_ids"] > 0).sum())
            record["steps"].append({"step": step, "wall_s": wall, "loss": loss})
            if step % config.eval_every == 0 or step == config.steps:
                record["evals"].append({"step": step, "wall_s": wall, "loss": evaluate()})
            progress.update(
                task, advance=1, loss=loss, rate=tokens / wall, padding=1 - real / tokens
            )
    record.update(
        wall_s=wall,
        tokens_per_s=tokens / wall,
        useful_tokens_per_s=real / wall,
        padding_share=1 - real / tokens,
        final_eval_loss=record["evals"][-1]["loss"],
        device=f"{jax.devices()[0].platform} x{config.cp}",
    )
    return record


# --- Summary and figure -------------------------------------------------------------------------


def compare(runs: dict[str, Any]) -> dict[str, Any]:
    """The targets, from whichever runs are recorded."""
    out: dict[str, Any] = {}
    if "none" in runs and "grain" in runs:
        padded, packed = runs["none"], runs["grain"]
        goal = padded["final_eval_loss"]
        reached = [e for e in packed["evals"] if e["loss"] <= goal]
        out["packed_vs_padded"] = {
            "padded_final_eval_loss": goal,
            "padded_wall_s": padded["wall_s"],
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


def plot(runs: dict[str, Any], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4))
    for name, run in sorted(runs.items()):
        steps = run["steps"]
        line = by_step.plot([s["step"] for s in steps], [s["loss"] for s in steps], lw=0.8)[0]
        evals = run["evals"]
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
            [s["wall_s"] for s in steps], [s["loss"] for s in steps], lw=0.8, alpha=0.4,
            color=line.get_color(), label=f"{name} (train)",
        )  # fmt: skip
    by_step.set(xlabel="step", ylabel="loss (nats/byte)", title="loss vs step")
    by_time.set(xlabel="wall time (s)", ylabel="loss (nats/byte)", title="loss vs wall time")
    by_time.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse(argv: list[str]) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--packing", choices=("none", "grain"), default="grain")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long CI configuration")
    defaults = Config()
    for field in dataclasses.fields(Config):
        if field.name == "packing":
            continue
        kind = int if field.name in ("max_documents",) else type(getattr(defaults, field.name))
        parser.add_argument("--" + field.name.replace("_", "-"), type=kind, default=None)
    args = parser.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None and k != "tiny"}
    config = Config(**({**TINY, **given} if args.tiny else given))
    if config.batch_size == 0:
        config = dataclasses.replace(config, batch_size=12 if config.packing == "none" else 5)
    if config.cp > len(jax.devices()):
        parser.error(f"--cp {config.cp}: only {len(jax.devices())} devices")
    return config


def main(argv: list[str]) -> None:
    config = parse(argv)
    record = train(config)
    out = pathlib.Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {"runs": {}}
    summary["runs"][config.name] = record
    summary["comparisons"] = compare(summary["runs"])
    summary_path.write_text(json.dumps(summary, indent=1))
    plot(summary["runs"], out / "loss.png")
    brief = {k: record[k] for k in ("wall_s", "useful_tokens_per_s", "padding_share")}
    brief["final_eval_loss"] = record["final_eval_loss"]
    print(json.dumps({config.name: brief, **summary["comparisons"]}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
