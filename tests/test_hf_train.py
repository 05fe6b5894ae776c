"""A Hugging Face model trained by the app end to end, under the real ``deepspeed`` launcher:

tiny Qwen3-MoE + its own tokenizer -> ``model=hf`` 20 steps at EP=2 on the default corpus ->
``export-hf`` -> transformers loads the export and its validation loss equals the one our run
reported; then the run continues from its checkpoint at another layout (PP=2), and its export again
matches transformers.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from launch import config as app_config
from launch.checkpoint_tool import main as tool
from launch.data import PackedDataset, iter_eval_batches, prepare_data
from tests.dist_utils import free_port
from tests.hf_app_fixtures import tiny_qwen3_moe_with_tokenizer

REPO = Path(__file__).resolve().parent.parent
DEEPSPEED = Path(sys.executable).parent / "deepspeed"
MICRO, EVAL_BATCHES = 4, 2


def train(run_dir: Path, model_dir: Path, cache: Path, steps: int, *extra: str) -> None:
    cmd = [
        str(DEEPSPEED),
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        "launch/train.py",
        "model=hf",
        f"model.path={model_dir}",
        "data.max_corpus_bytes=300000",
        "data.seq_len=32",
        f"data.cache_dir={cache}",
        f"train.steps={steps}",
        f"train.micro_batch_size={MICRO}",
        "train.log_every=2",
        f"train.eval_every={steps}",
        f"train.eval_batches={EVAL_BATCHES}",
        f"train.ckpt_every={steps}",
        "optim.warmup_steps=2",
        f"train.run_dir={run_dir}",
        "train.progress=lines",
        "logger=disabled",
        *extra,
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def metrics(run_dir: Path, key: str) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row[key] for row in rows if key in row}


def transformers_eval_loss(export: Path, run_dir: Path, dp_size: int) -> float:
    """The trainer's validation loss (same windows, same DP split and mean), computed by transformers."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(export), output_loading_info=True, dtype=torch.float32)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    cfg = OmegaConf.load(run_dir / "config.yaml")
    data = prepare_data(app_config.data_config(cfg))  # the run's tokenized corpus (a cache hit)
    val = PackedDataset(data.val_tokens, cfg.data.seq_len, "validation")
    per_rank = [list(iter_eval_batches(val, MICRO, r, dp_size, EVAL_BATCHES)) for r in range(dp_size)]
    losses = []
    with torch.no_grad():
        for batches in zip(*per_rank):
            per_dp = [model.eval()(tokens, labels=None).logits for tokens, _ in batches]
            losses.append(
                sum(
                    torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).item()
                    for logits, (_, targets) in zip(per_dp, batches)
                )
                / dp_size
            )
    return sum(losses) / len(losses)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf_train")
    model_dir = tiny_qwen3_moe_with_tokenizer(tmp / "qwen3_moe")
    train(tmp / "run", model_dir, tmp / "cache", 20, "parallel=ep2")
    return tmp, model_dir


def test_trained_export_loads_in_transformers_with_our_validation_loss(run):
    tmp, model_dir = run
    run_dir = tmp / "run"
    losses = metrics(run_dir, "train/loss")
    assert sorted(losses) == list(range(2, 21, 2)) and losses[20] < losses[2]  # it learned
    cfg = OmegaConf.load(run_dir / "config.yaml")
    data = prepare_data(app_config.data_config(cfg))
    assert data.meta["tokenizer_type"] == "pretrained:tokenizers" and data.vocab_size == 400  # the model's own

    assert tool(["export-hf", str(run_dir / "checkpoints"), "--out", str(tmp / "export")]) == 0
    assert (tmp / "export" / "tokenizer.json").read_bytes() == (model_dir / "tokenizer.json").read_bytes()
    ours = metrics(run_dir, "eval/loss")[20]
    theirs = transformers_eval_loss(tmp / "export", run_dir, dp_size=2)
    assert abs(ours - theirs) <= 1e-5 * abs(ours), (ours, theirs)


def test_the_run_continues_at_another_layout_and_still_exports_exactly(run):
    tmp, model_dir = run
    run_dir = tmp / "run_pp2"
    train(
        run_dir,
        model_dir,
        tmp / "cache",
        22,
        "parallel.pp=2",
        "parallel.ep=1",
        f"train.resume={tmp / 'run' / 'checkpoints'}",
    )
    assert sorted(metrics(run_dir, "train/loss")) == [22]  # resumed at step 20
    assert tool(["export-hf", str(run_dir / "checkpoints"), "--out", str(tmp / "export_pp2")]) == 0
    ours = metrics(run_dir, "eval/loss")[22]
    theirs = transformers_eval_loss(tmp / "export_pp2", run_dir, dp_size=1)
    assert abs(ours - theirs) <= 1e-5 * abs(ours), (ours, theirs)
