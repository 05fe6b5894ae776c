"""What the end-to-end tests of the training app share: the command that starts it, the Hydra overrides
of a tiny run, and readers of what a run leaves in its directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from launch.env import free_port

REPO = Path(__file__).resolve().parent.parent
DEEPSPEED = Path(sys.executable).parent / "deepspeed"


def train_command(ranks: int = 1) -> list[str]:
    """``python launch/train.py`` (one process) or ``deepspeed --num_gpus R ... launch/train.py`` (R CPU ranks),
    to run from the repository root; the overrides follow."""
    if ranks == 1:
        return [sys.executable, "launch/train.py"]
    return [str(DEEPSPEED), "--num_gpus", str(ranks), "--master_port", str(free_port()), "launch/train.py"]


def tiny_overrides(
    *,
    layers: int = 2,
    hidden: int = 32,
    moe_every: int = 1,
    corpus_bytes: int = 300_000,
    seq_len: int = 16,
    micro_batch: int = 4,
    log_every: int = 1,
    eval_every: int | None = 1000,
    eval_batches: int = 1,
) -> list[str]:
    """A model and run small enough for a CPU test: 2 heads, FFN 2 x hidden, 4 experts, a 512-token
    vocabulary, and progress as plain lines. ``eval_every=None`` keeps the config's own."""
    overrides = [
        f"model.num_layers={layers}",
        f"model.hidden_size={hidden}",
        "model.num_heads=2",
        f"model.ffn_hidden_size={2 * hidden}",
        f"model.moe_every={moe_every}",
        "moe.num_experts=4",
        f"data.max_corpus_bytes={corpus_bytes}",
        "data.vocab_size=512",
        f"data.seq_len={seq_len}",
        f"train.micro_batch_size={micro_batch}",
        f"train.log_every={log_every}",
        f"train.eval_batches={eval_batches}",
        "train.progress=lines",
    ]
    if eval_every is not None:
        overrides.append(f"train.eval_every={eval_every}")
    return overrides


def run_app(cmd: list[str], timeout: float = 420, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run an app command to its end; it must succeed (the failure shows the output's tail)."""
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def metric_rows(run_dir: Path) -> list[dict]:
    """Every row of the run's metrics.jsonl."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def metric(run_dir: Path, key: str) -> dict[int, float]:
    """``key`` by step, from the rows that log it."""
    return {row["step"]: row[key] for row in metric_rows(run_dir) if key in row}


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file below ``directory``, by content."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def tokenized_cache(path: Path, corpus_bytes: int, seq_len: int) -> Path:
    """``path`` holding the default corpus tokenized as ``tiny_overrides`` asks (a run's start is then a
    cache hit instead of a tokenizer training)."""
    from launch.data import DataConfig, prepare_data

    prepare_data(DataConfig(max_corpus_bytes=corpus_bytes, vocab_size=512, seq_len=seq_len, cache_dir=str(path)))
    return path
