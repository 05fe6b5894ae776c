"""The training app end to end under the real `deepspeed` launcher: 2 CPU processes, EP=2.

The W&B offline run files are read back (not just found) for the balance loss of every MoE layer,
and a resumed job continues the same W&B run (with exactly the losses of an uninterrupted run: that
comparison, one more launch, runs in make test-slow).
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch.compare import read_wandb_history, read_wandb_run_info, wandb_files
from tests.app_cli import REPO, metric, metric_rows, run_app, tiny_overrides, train_command

MOE_LAYERS = (0, 1)


def train(run_dir: Path, cache: Path, steps: int, *extra: str) -> subprocess.CompletedProcess:
    """``steps`` steps of the tiny model at EP=2 under ``deepspeed --num_gpus 2``, W&B offline."""
    overrides = tiny_overrides(hidden=64, seq_len=32, log_every=2, eval_every=4, eval_batches=2)
    cmd = [*train_command(2), "+experiment=cpu_demo", *overrides, f"data.cache_dir={cache}", f"train.steps={steps}",
           "train.ckpt_every=4", f"train.run_dir={run_dir}", *extra]  # fmt: skip
    return run_app(cmd, timeout=420)


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, app_cache):
    """12 steps in two jobs: the first stops itself after step 8 (checkpointing), the second resumes."""
    stopped = tmp_path_factory.mktemp("e2e") / "stopped"
    first = train(stopped, app_cache, 12, "train.exit_after_steps=8")
    resumed = train(stopped, app_cache, 12)
    return stopped, first, resumed


def test_wandb_offline_files_hold_every_layers_balance_loss(stopped_run):
    stopped, _, _ = stopped_run
    files = wandb_files(stopped)
    assert len(files) == 2  # one offline run directory per job
    history = [row for file in files for row in read_wandb_history(file)]
    logged = [row for row in history if "train/loss" in row]
    assert [row["_step"] for row in logged] == [2, 4, 6, 8, 10, 12]
    for row in logged:
        for layer in MOE_LAYERS:
            balance = row[f"moe/layer_{layer}/balance_loss"]
            assert math.isfinite(balance) and 0.5 < balance < 4.0  # 1.0 is perfect balance
            assert 0.0 <= row[f"moe/layer_{layer}/dropped_fraction"] < 1.0
    info = read_wandb_run_info(files[0])
    assert info["group"] == "cpu_demo" and info["project"] == "moe_parallel"
    assert any("eval/ppl" in row for row in history)
    losses = [row["train/loss"] for row in logged]
    assert losses[-1] < losses[0]  # it learns


def test_resume_continues_the_same_wandb_run(stopped_run):
    stopped, first, resumed = stopped_run
    assert "step 8: 8 steps done: checkpointing and stopping" in first.stdout
    assert "resumed from" in resumed.stdout and "at step 8" in resumed.stdout
    files = wandb_files(stopped)
    ids = {read_wandb_run_info(f)["run_id"] for f in files}
    assert len(files) == 2 and len(ids) == 1  # same run id: `wandb sync` joins them
    second_job = read_wandb_history(files[1])
    assert [row["_step"] for row in second_job if "train/loss" in row] == [10, 12]
    assert (stopped / "checkpoints" / "latest").read_text() == "step_00000012"


@pytest.mark.slow  # one more launch; make test checks exact resumes through test_checkpoint's engines
def test_resumed_losses_equal_an_uninterrupted_run(stopped_run, tmp_path, app_cache):
    stopped, _, _ = stopped_run
    straight = tmp_path / "straight"
    train(straight, app_cache, 12)
    want, got = metric(straight, "train/loss"), metric(stopped, "train/loss")
    assert sorted(got) == sorted(want)
    for step in (10, 12):
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), step


def test_hydra_sweep_makes_one_grouped_run_per_value(tmp_path, app_cache):
    """`-m moe.capacity_factor=0.5,2.0`: two runs, grouped in W&B by experiment, compared by launch.compare."""
    cmd = [
        sys.executable,
        str(REPO / "launch" / "train.py"),
        "-m",
        "+experiment=cf_sweep",
        "moe.capacity_factor=0.5,2.0",
        "train.steps=3",
        "train.log_every=1",
        "train.eval_every=3",
        "train.eval_batches=1",
        "train.ckpt_every=3",
        "model.num_layers=2",
        "model.hidden_size=64",
        "model.num_heads=2",
        "model.ffn_hidden_size=128",
        "data.max_corpus_bytes=300000",
        "data.vocab_size=512",
        "data.seq_len=32",
        f"data.cache_dir={app_cache}",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = sorted((tmp_path / "runs" / "cf_sweep").iterdir())
    assert len(runs) == 2
    assert not any((run / "run.lock").exists() for run in runs)  # each job locked its own and released it
    infos = [read_wandb_run_info(wandb_files(run)[0]) for run in runs]
    assert {info["group"] for info in infos} == {"cf_sweep"}
    assert [info["display_name"] for info in infos] == ["moe.capacity_factor=0.5", "moe.capacity_factor=2.0"]
    dropped = [list(metric(run, "moe/dropped_fraction").values()) for run in runs]
    assert min(dropped[0]) > max(dropped[1])  # a smaller capacity factor drops more
    compare = subprocess.run(
        [sys.executable, "-m", "launch.compare", *map(str, runs), "--out", str(tmp_path / "cmp.png")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert compare.returncode == 0, compare.stderr
    assert "train/loss" in compare.stdout and (tmp_path / "cmp.png").stat().st_size > 1000


def test_aux_loss_free_balancing_moves_the_expert_bias_and_checkpoints_it(tmp_path, app_cache):
    """moe.expert_bias_update_rate > 0: the app updates every router's selection bias once per step
    (loads summed over DP) and checkpoints it. Each update moves an expert by -rate, 0 or +rate, so
    after an odd number of steps a bias is an odd multiple of rate unless a load tied the mean."""
    from moe_parallel.checkpoints.checkpoint import export_consolidated, resolve_checkpoint

    run_dir, rate, steps = tmp_path / "run", 0.01, 5
    train(run_dir, app_cache, steps, f"moe.expert_bias_update_rate={rate}", "logger=disabled")
    weights = export_consolidated(resolve_checkpoint(run_dir / "checkpoints"))
    biases = {name: value for name, value in weights.items() if name.endswith("expert_bias")}
    assert len(biases) == len(MOE_LAYERS), sorted(weights)
    for name, bias_E in biases.items():
        steps_taken = bias_E / rate
        assert bias_E.shape == (4,) and torch.allclose(steps_taken, steps_taken.round(), atol=1e-4), (name, bias_E)
        assert steps_taken.abs().max() <= steps, (name, bias_E)
    assert any(bias_E.abs().max() > 0 for bias_E in biases.values()), biases  # it moved (never without updates)


def single_process(run_dir: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    """The app in one process (world size 1), on the tiny shapes of test_failures with one dense and
    one MoE block."""
    cmd = [*train_command(), *tiny_overrides(moe_every=2), f"data.cache_dir={cache}", "train.ckpt_every=1000",
           "logger=disabled", f"train.run_dir={run_dir}", *extra]  # fmt: skip
    return run_app(cmd, timeout=420)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_blocks_train_to_the_losses_of_eager_blocks(tmp_path, app_cache, backend):
    """train.compile=true: every block through torch.compile (aot_eager: the traced graphs; inductor,
    the default: generated kernels), the same training losses as eager within the fp32 tolerance of
    the model's depth over the steps."""
    from tests.tolerance import float_tolerance

    steps = 4
    eager = tmp_path / "eager"
    single_process(eager, app_cache, f"train.steps={steps}")
    compiled = tmp_path / "compiled"
    proc = single_process(
        compiled, app_cache, f"train.steps={steps}", "train.compile=true", f"train.compile_backend={backend}"
    )
    assert "2 blocks compiled" in proc.stdout, proc.stdout[-2000:]
    want, got = metric(eager, "train/loss"), metric(compiled, "train/loss")
    assert sorted(got) == sorted(want) == list(range(1, steps + 1))
    tol = float_tolerance(torch.float32, reduction_size=64, depth=2 * steps)["rtol"]
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=tol, abs=tol), (step, got, want)


@pytest.mark.slow
def test_compiled_blocks_in_pipeline_stages_with_activation_checkpointing(tmp_path, app_cache):
    """train.compile=true on 2 pipeline stages that recompute their blocks in backward: the same losses
    and the same MoE token counts (each micro-batch counted once) as eager blocks."""
    from tests.tolerance import float_tolerance

    def pipeline_run(run_dir: Path, *extra: str) -> list[dict]:
        pipeline = ["parallel.pp=2", "deepspeed.activation_checkpointing=true", "train.grad_accum=2"]
        run = [f"data.cache_dir={app_cache}", "train.steps=3", "train.ckpt_every=1000", "logger=disabled"]
        cmd = [*train_command(2), *pipeline, *tiny_overrides(layers=4, moe_every=2), *run, f"train.run_dir={run_dir}"]
        cmd += extra
        run_app(cmd, timeout=600)
        return metric_rows(run_dir)

    want = [row for row in pipeline_run(tmp_path / "eager") if "train/loss" in row]
    got = [row for row in pipeline_run(tmp_path / "compiled", "train.compile=true") if "train/loss" in row]
    assert [row["step"] for row in got] == [row["step"] for row in want] == [1, 2, 3]
    tol = float_tolerance(torch.float32, reduction_size=64, depth=4 * 3)["rtol"]
    for g, w in zip(got, want):
        assert g["train/loss"] == pytest.approx(w["train/loss"], rel=tol, abs=tol), (g, w)
        for layer in (1, 3):  # one MoE block on each stage; 2 micro-batches of 4 x 16 tokens
            assert g[f"moe/layer_{layer}/num_tokens"] == w[f"moe/layer_{layer}/num_tokens"] == 128
