"""Failure behaviour of the training app, driven as a user would: the CLI, a real run directory, real signals.

Divergence (non-finite loss, overflow-skipped steps), expert collapse, a stalled rank, Ctrl-C and
SIGTERM to the `deepspeed` command. Tiny models, 1-2 processes; the corpus is tokenized once per session.
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import psutil
import pytest

from launch.compare import iter_wandb_records, read_wandb_history, wandb_files
from tests.app_cli import REPO, metric_rows, tiny_overrides, tokenized_cache, train_command
from tests.app_job import AppJob

TINY = tiny_overrides()


@pytest.fixture(scope="module")
def cache(app_cache) -> Path:
    """The corpus tokenized before the first run (a cold cache would dominate short timeouts)."""
    return tokenized_cache(app_cache, 300_000, 16)


def single(run_dir: Path, cache: Path, *extra: str, timeout: float = 400) -> subprocess.CompletedProcess:
    cmd = [*train_command(), *TINY, f"data.cache_dir={cache}", f"train.run_dir={run_dir}", *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*") if ".tmp-" not in p.name)


# ---------------------------------------------------------------- divergence


def test_diverging_learning_rate_stops_after_max_skipped_steps(tmp_path, cache):
    run = tmp_path / "run"
    proc = single(run, cache, "optim.lr=1e4", "optim.min_lr=0", "train.steps=12", "train.ckpt_every=1",
                  "train.max_skipped_steps=3", "logger=disabled")  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 65, out[-3000:]
    assert "training diverged" in out and "train.max_skipped_steps=3" in out, out[-3000:]
    logged = metric_rows(run)
    skipped = [r for r in logged if "train/skipped_loss" in r]
    assert len(skipped) == 3, skipped
    # A skipped step is retried as the same step, on the same batch, at the same learning rate:
    # neither the step count, nor the data position, nor the LR schedule advanced.
    assert len({r["step"] for r in skipped}) == 1
    assert len({r["train/lr"] for r in skipped}) == 1
    finite = [r["train/skipped_loss"] for r in skipped if math.isfinite(r["train/skipped_loss"])]
    if finite:
        assert max(finite) == pytest.approx(min(finite), rel=1e-5)
    bad_step = skipped[0]["step"]
    steps = [r["step"] for r in logged if "train/loss" in r]
    assert steps == list(range(1, bad_step)), steps
    # No checkpoint of the bad step; the last finite one is what `latest` names, with a data position
    # of exactly its steps' samples.
    assert checkpoint_steps(run) and max(checkpoint_steps(run)) == bad_step - 1
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    assert latest.name == f"step_{bad_step - 1:08d}"
    assert not (run / "run.lock").exists()  # released on the way out (exit 65)


def test_nan_in_fp32_stops_at_the_first_step_naming_the_layer(tmp_path, cache):
    run = tmp_path / "run"
    # Weights of std 1e30 overflow fp32 in the first forward that uses them; ZeRO-0 applies updates unchecked.
    proc = single(run, cache, "model.init_std=1e30", "deepspeed=zero0", "deepspeed.precision=fp32",
                  "train.steps=6", "train.ckpt_every=1", "train.max_skipped_steps=5", "logger=disabled")  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 65, out[-3000:]
    stopped = r"training diverged: non-finite loss nan; .*(update was applied|does not recover)"
    assert re.search(stopped, out), out[-3000:]
    assert "The first output that went non-finite:" in out
    losses = [r for r in metric_rows(run) if "train/loss" in r]
    assert all(math.isfinite(r["train/loss"]) for r in losses)
    bad = [r for r in metric_rows(run) if "train/skipped_loss" in r]
    assert len(bad) == 1  # stopped at the first non-finite step, max_skipped_steps notwithstanding
    assert not (run / "checkpoints").exists() or max(checkpoint_steps(run), default=0) < bad[0]["step"]


# ---------------------------------------------------------------- expert collapse


def test_expert_collapse_warns_once_records_an_alert_and_trains_on(tmp_path, cache):
    run = tmp_path / "run"
    # A bound every real run exceeds (max/mean load 1.01) stands in for a collapsed router.
    proc = single(run, cache, "train.steps=6", "train.ckpt_every=6", "train.collapse_window=3",
                  "train.collapse_max_load_ratio=1.01", "logger=offline")  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    warnings_ = [line for line in out.splitlines() if line.startswith("warning: MoE layer")]
    assert len(warnings_) == 2, warnings_  # one per layer, not one per step
    assert "degenerate for 3 steps" in warnings_[0] and "the mean load (bound 1.01)" in warnings_[0]
    alerts = [r for r in metric_rows(run) if r.get("alert", "").startswith("expert collapse")]
    assert sorted(a["alert/data"]["layer"] for a in alerts) == [0, 1]
    assert all(a["step"] == 3 and a["alert/data"]["max_load_ratio"] > 1.01 for a in alerts)
    assert "done:" in proc.stdout
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a damaged .wandb file warns
        kinds = [r.WhichOneof("record_type") for r in iter_wandb_records(wandb_files(run)[0])]
    assert "exit" in kinds


# ---------------------------------------------------------------- multi-process: stall and signals


class Job(AppJob):
    """`deepspeed --num_gpus 2 launch/train.py ...` in its own session (like a shell's foreground job)."""

    def __init__(self, run_dir: Path, cache: Path, *extra: str) -> None:
        args = [*TINY, "parallel.ep=2", f"data.cache_dir={cache}", f"train.run_dir={run_dir}", *extra]
        super().__init__([*train_command(2), *args])

    def workers(self) -> dict[int, psutil.Process]:
        """local rank -> worker process, found by session (the launcher itself may be gone)."""
        found = {}
        for proc in psutil.process_iter():
            try:
                if os.getsid(proc.pid) != self.proc.pid or proc.status() == psutil.STATUS_ZOMBIE:
                    continue
                cmdline = proc.cmdline()
            except (psutil.Error, OSError):
                continue
            for arg in cmdline:
                if arg.startswith("--local_rank="):
                    found[int(arg.split("=")[1])] = proc
        return found

    def session(self) -> list[psutil.Process]:
        """Every live process of the job's session: the launcher, `deepspeed.launcher.launch`, the workers."""
        found = []
        for proc in psutil.process_iter():
            try:
                if os.getsid(proc.pid) == self.proc.pid and proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
            except (psutil.Error, OSError):
                continue
        return found

    def wait(self, timeout: float) -> int:
        """Until every process of the job has ended (the `deepspeed` command may return before its
        workers do); the command's exit status. Raises TimeoutExpired."""
        deadline = time.monotonic() + timeout
        code = self.proc.wait(timeout=timeout)
        _, alive = psutil.wait_procs(self.session(), timeout=max(1.0, deadline - time.monotonic()))
        if alive:
            raise subprocess.TimeoutExpired(str(alive), timeout)
        self._reader.join(timeout=10)
        return code

    def kill(self) -> None:
        """Leave nothing behind: SIGKILL the whole session (also stopped processes)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for worker in self.workers().values():
            try:
                worker.kill()
            except psutil.Error:
                pass


def test_stalled_rank_fails_the_job_within_the_timeout(tmp_path, cache):
    timeout_s, margin_s = 15, 30  # margin: the rank's current step and the error path
    job = Job(tmp_path / "run", cache, "train.steps=100000", "train.ckpt_every=100000",
              f"parallel.timeout_s={timeout_s}", "logger=disabled")  # fmt: skip
    try:
        job.wait_for("step     3/")
        workers = job.workers()
        workers[1].suspend()  # SIGSTOP: alive, holds its sockets, never answers
        stopped_at = time.monotonic()
        job.wait_for("did not complete within", timeout=timeout_s + margin_s)
        elapsed = time.monotonic() - stopped_at
        # Rank 0 exits at once (DeepSpeed's launcher then SIGTERMs the stopped rank and SIGKILLs
        # it 30 s later: not waited for here).
        workers[0].wait(timeout=30)  # psutil.TimeoutExpired if it lingers
        assert not (tmp_path / "run" / "run.lock").exists()  # rank 0 released it on the way out (exit 69)
    finally:
        job.kill()
    assert timeout_s * 0.9 < elapsed < timeout_s + margin_s  # it waited for the timeout, and not much longer
    message = job.output.split("did not complete within")[0].splitlines()[-1]
    assert "parallel.timeout_s=15 s" in job.output and "group" in message, job.output[-4000:]


def _assert_stopped_cleanly(job: Job, run_dir: Path, code: int) -> None:
    out = job.output
    assert "checkpointing and stopping" in out, out[-4000:]
    assert not (run_dir / "run.lock").exists()  # released on the way out: the next job (or requeue) takes it
    stopped = int(out.split("checkpointing and stopping")[0].rsplit("step ", 1)[1].split(":")[0])
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{stopped:08d}"
    files = wandb_files(run_dir)
    assert len(files) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a .wandb file cut short warns
        kinds = [r.WhichOneof("record_type") for r in iter_wandb_records(files[0])]
        history = read_wandb_history(files[0])
    assert "exit" in kinds, kinds  # finished: `wandb sync` uploads it as a complete run
    assert max(row["_step"] for row in history if "train/loss" in row) == stopped


def test_ctrl_c_checkpoints_and_leaves_a_complete_wandb_run(tmp_path, cache):
    run = tmp_path / "run"
    job = Job(run, cache, "train.steps=100000", "train.ckpt_every=100000", "logger=offline")
    try:
        job.wait_for("step     3/")
        os.killpg(job.proc.pid, signal.SIGINT)  # what a terminal sends its foreground job on Ctrl-C
        code = job.wait(timeout=120)
    finally:
        job.kill()
    assert code != 0  # interrupted before its last step
    _assert_stopped_cleanly(job, run, code)
    assert "SIGINT received" in job.output


def test_sigterm_to_the_deepspeed_command_stops_the_workers(tmp_path, cache):
    run = tmp_path / "run"
    job = Job(run, cache, "train.steps=100000", "train.ckpt_every=100000", "logger=offline")
    try:
        job.wait_for("step     3/")
        workers = job.workers()
        assert len(workers) == 2
        job.proc.send_signal(signal.SIGTERM)  # `kill <pid of deepspeed>`: the launcher dies at once
        code = job.wait(timeout=120)
    finally:
        job.kill()
    assert all(not w.is_running() for w in workers.values()), job.output[-3000:]
    _assert_stopped_cleanly(job, run, code)
    assert "the deepspeed launcher" in job.output and "SIGTERM received" in job.output


# ---------------------------------------------------------------- refused settings


# One refused value per config group, each raising a different error class: config errors before any
# process group exists, a data error, a checkpoint error after the rendezvous.
REFUSED = [
    ("moe.top_k=0", "moe.top_k=0 is invalid: must be a positive integer"),
    ("model.num_heads=5", "model.num_heads=5 is invalid: must divide hidden_size=32"),
    ("model.moe_every=0", "model.moe_every=0"),
    ("train.progress=fancy", "train.progress='fancy' is invalid"),
    ("data.seq_len=0", "data.seq_len=0 is invalid"),
    ("optim.min_lr=1.0", "need lr > 0 and 0 <= min_lr <= lr"),
    ("train.resume=/nonexistent/step_00000002", "train.resume=/nonexistent/step_00000002: /nonexistent"),
]
REFUSED_SLOW = [
    ("parallel.pp=4", "parallel.pp=4"),
    ("moe.drop_policy=random", "moe.drop_policy='random'"),
    ("deepspeed.zero_stage=3", "deepspeed.zero_stage=3 is invalid"),
    ("data.val_fraction=2", "data.val_fraction=2.0 is invalid"),
    ("logger.init_timeout=0", "logger.init_timeout=0.0 must be > 0"),
    ("model.kind=hf", "model.num_layers=2 cannot be set with model=hf"),
]


def _refused_runs(tmp_path: Path, cache: Path, cases: list[tuple[str, str]], env=None) -> list[tuple]:
    """Every case at once (two cores): (override, expected message, process)."""
    procs = []
    for i, (override, message) in enumerate(cases):
        cmd = [*train_command(), *TINY, f"data.cache_dir={cache}",
               f"train.run_dir={tmp_path / f'run{i}'}", "logger=disabled", override]  # fmt: skip
        procs.append((override, message, subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE,
                                                          stderr=subprocess.PIPE, text=True, env=env)))  # fmt: skip
    return [(override, message, proc, *proc.communicate(timeout=300)) for override, message, proc in procs]


def _assert_refused_cleanly(cases: list[tuple]) -> None:
    for override, message, proc, out, err in cases:
        assert proc.returncode == 1, (override, out[-2000:], err[-3000:])
        assert "Traceback" not in out + err and "HYDRA_FULL_ERROR" not in err, (override, err[-3000:])
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and message in errors[0], (override, err[-3000:])


def test_refused_settings_print_one_line_without_a_traceback(tmp_path, cache):
    _assert_refused_cleanly(_refused_runs(tmp_path, cache, REFUSED))


@pytest.mark.slow
def test_more_refused_settings_print_one_line_without_a_traceback(tmp_path, cache):
    _assert_refused_cleanly(_refused_runs(tmp_path, cache, REFUSED_SLOW))


def test_hydra_full_error_shows_the_traceback_of_a_refused_setting(tmp_path, cache):
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    ((override, message, proc, out, err),) = _refused_runs(tmp_path, cache, REFUSED[:1], env=env)
    assert proc.returncode == 1, err[-3000:]
    assert "Traceback (most recent call last)" in err and f"MoEConfigError: {message}" in err, err[-3000:]


def test_a_genuine_bug_keeps_its_traceback_and_releases_the_run_directory(tmp_path):
    # A bug (not a refusal) anywhere in the job: the traceback stays, the lock on the run directory goes.
    run = tmp_path / "run"
    code = (
        "import runpy, sys\n"
        "import moe_parallel.checkpoints.store as store\n"
        "def bug(*args, **kwargs):\n"
        "    raise TypeError(\"argument of type 'NoneType' is not iterable\")\n"
        "store.list_checkpoints = bug  # called while the resume is chosen, after the run directory is locked\n"
        f"sys.argv = ['launch/train.py', 'train.run_dir={run}', 'logger=disabled']\n"
        "runpy.run_path('launch/train.py', run_name='__main__')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" in proc.stderr and "TypeError: argument of type" in proc.stderr, proc.stderr[-3000:]
    assert not proc.stderr.startswith("error: ")
    assert run.is_dir() and not (run / "run.lock").exists()
