"""The Slurm scripts on a real two-node Slurm cluster, and the trainer's pre-flight check.

The cluster (tests/slurm_cluster.py) runs Debian's slurmctld and two slurmd on the loopback
interface. The real ``slurm/train.sbatch`` trains with EP=2 over gloo, one task per node; a second
job of the same config is sent the preemption signal mid-run and must checkpoint, requeue itself
and resume in the same W&B run with exactly the losses of the uninterrupted job. The DeepSpeed
launcher variant and the sweep array run short jobs. Every test that uses the cluster is marked
``slurm`` (by tests/slurm_cluster.py): deselect them with ``-m "not slurm"``.

The pre-flight tests need no Slurm: gloo processes on this machine.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from launch import preflight
from launch.compare import read_wandb_history, read_wandb_run_info, wandb_files
from tests.app_cli import REPO, metric, tiny_overrides
from tests.dist_utils import free_port, run_distributed

if TYPE_CHECKING:  # imported by pytest as a plugin (below), which must come first
    from tests.slurm_cluster import SlurmCluster

# The cluster fixture, and the `slurm` marker on every test that uses it.
pytest_plugins = ["tests.slurm_cluster"]

SLURM = REPO / "slurm"
STEPS = 40
TINY = tiny_overrides(hidden=64, seq_len=32, log_every=2, eval_every=None, eval_batches=2)
# Two nodes, one task each, no GPUs: the #SBATCH defaults ask for 8 GPUs per node.
CPU_JOB = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=15"]
JOB_TIMEOUT = 240  # seconds; a job takes ~15 s here, more on a busy machine


# ---------------------------------------------------------------- helpers


def submit(
    cluster: SlurmCluster,
    tmp: Path,
    script: str,
    *overrides: str,
    sbatch_args=CPU_JOB,
    env: dict[str, str] | None = None,
) -> int:
    """Submit a slurm/ script as a user would, from the repo root; the job runs in ``tmp/work``."""
    job_env = {
        "PYTHON": sys.executable,  # the venv's interpreter, whatever PATH the job gets
        "MOE_WORKDIR": str(tmp / "work"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{cluster.env['PATH']}",
        **(env or {}),
    }
    return cluster.sbatch(
        SLURM / script,
        *TINY,
        f"data.cache_dir={tmp / 'cache'}",
        *overrides,
        sbatch_args=[*sbatch_args, f"--output={tmp}/%x-%j.out"],
        env=job_env,
    )


def job_log(tmp: Path, name: str, job_id: int) -> str:
    return (tmp / f"{name}-{job_id}.out").read_text(errors="replace")


def _tail_log(tmp: Path, name: str, job_id: int, chars: int = 4000) -> str:
    try:
        return job_log(tmp, name, job_id)[-chars:]
    except OSError:
        return "(no log)"


def assert_completed(cluster: SlurmCluster, info: dict[str, str], log: str) -> None:
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", (
        f"job {info.get('JobId')} ended {info.get('JobState')} {info.get('ExitCode')}\n"
        f"--- job log (tail)\n{log[-6000:]}\n--- cluster\n{cluster.describe()}"
    )


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):  # a line being written
            pass
    return steps


# ---------------------------------------------------------------- pre-flight (no Slurm)


def _preflight_ok(rank: int, world: int) -> None:
    infos = preflight.check(timeout_s=30)
    assert sorted(infos) == list(range(world))
    assert len({(i["torch"], i["deepspeed"], i["moe_parallel"], i["git_commit"]) for i in infos.values()}) == 1
    # Without the rendezvous store (a private torch API): the backend's all_gather under the watchdog.
    preflight._default_store = lambda: None
    assert preflight.check(timeout_s=30) == infos


def _preflight_missing_rank(rank: int, world: int) -> None:
    if rank == 1:
        time.sleep(6)  # reaches the check after the others gave up on it
    with pytest.raises(preflight.PreflightError) as err:
        preflight.check(timeout_s=2)
    assert "rank 1 did not answer within 2 s" in str(err.value), str(err.value)


def _preflight_version_mismatch(rank: int, world: int) -> None:
    info = preflight.local_info()
    if rank == 1:
        info["deepspeed"] = "0.0.1"
    with pytest.raises(preflight.PreflightError) as err:
        preflight.check(timeout_s=30, info=info)
    message = str(err.value)
    assert "deepspeed:" in message and "0.0.1 on rank 1" in message and "on rank 0" in message, message
    assert "torch:" not in message  # only what differs


def test_preflight_passes_when_ranks_agree():
    run_distributed(_preflight_ok, 2)


def test_preflight_names_the_rank_that_does_not_answer():
    run_distributed(_preflight_missing_rank, 2)


def test_preflight_lists_version_mismatches_on_every_rank():
    run_distributed(_preflight_version_mismatch, 2)


_HUNG_COLLECTIVE = """
import os, sys, time
from datetime import timedelta
sys.path.insert(0, {repo!r})
import torch.distributed as dist
from launch import preflight
dist.init_process_group("gloo", timeout=timedelta(seconds=120))
if dist.get_rank() == 1:  # answers the roll call, then does not join the all_to_all
    preflight._collectives = lambda *a: time.sleep(60)
preflight.check(timeout_s=3 if dist.get_rank() == 0 else 60)
print("not reached")
"""


def test_preflight_watchdog_ends_a_hung_all_to_all_with_a_message():
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", _HUNG_COLLECTIVE.format(repo=str(REPO))],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    start = time.monotonic()
    try:
        stdout, stderr = procs[0].communicate(timeout=90)
    finally:
        procs[1].kill()  # still "in" its all_to_all
        procs[1].communicate()
    assert time.monotonic() - start < 50  # not the 120 s process-group timeout
    assert procs[0].returncode == preflight.EXIT_PREFLIGHT_HUNG, stderr[-3000:]
    assert "all ranks answered, but a tiny all_to_all over gloo did not complete within 3 s on rank 0" in stderr
    assert "GLOO_SOCKET_IFNAME" in stderr and "not reached" not in stdout


def test_preflight_verdict_messages():
    info = {
        "torch": "2.4",
        "deepspeed": "0.16",
        "moe_parallel": "0.1.0",
        "git_commit": "abc",
        "python": "3.11",
        "host": "n1",
        "device": "cpu",
    }
    infos = {r: dict(info, host=f"n{r // 4}") for r in range(8)}
    assert preflight.verdict(infos, 8, 10) is None
    missing = {r: i for r, i in infos.items() if r not in (3, 5, 6)}
    assert preflight.verdict(missing, 8, 10).startswith("ranks 3,5-6 did not answer within 10 s (ranks 0-2,4,7 on")
    infos[6]["git_commit"] = "def"
    message = preflight.verdict(infos, 8, 10)
    assert "git_commit: abc on ranks 0-5,7 (n0, n1); def on rank 6 (n1)" in message
    gpus = {r: dict(info, device="cuda:0") for r in range(2)}
    assert "ranks 0-1 all use cuda:0 on n1" in preflight.verdict(gpus, 2, 10)


# ---------------------------------------------------------------- real Slurm jobs


@pytest.fixture(scope="module")
def train_jobs(slurm_cluster: SlurmCluster, tmp_path_factory):
    """An uninterrupted job and one preempted mid-run, same config, submitted together (they share
    the two nodes: each node has 2 CPUs and each job one task per node)."""
    from tests.slurm_cluster import SlurmClusterError  # loaded as a plugin by now

    cluster = slurm_cluster
    tmp = tmp_path_factory.mktemp("train")
    common = ["+experiment=cpu_demo", f"train.steps={STEPS}", "train.eval_every=20", "train.ckpt_every=20"]
    straight = submit(cluster, tmp, "train.sbatch", *common)
    preempted = submit(cluster, tmp, "train.sbatch", *common)
    run_dir = tmp / "work" / "runs" / "cpu_demo" / f"slurm-{preempted}"

    try:
        # Signal the preempted job once it has logged a few steps: the batch shell gets SIGUSR1 (as from
        # --signal=B:USR1@...), forwards it to srun, and the trainer stops at the next step boundary.
        info = cluster.wait_job(
            preempted,
            lambda i: any(s >= 6 for s in logged_steps(run_dir)) or i.get("JobState") not in ("PENDING", "RUNNING"),
            JOB_TIMEOUT,
            what="at step 6",
        )
        assert info.get("JobState") == "RUNNING", f"job {preempted} ended before it could be preempted: {info}"
        cluster.command("scancel", "--signal=USR1", "--batch", str(preempted))
        cluster.release_requeued(preempted)
        preempted_info = cluster.wait_finished(preempted, JOB_TIMEOUT, restarts=1)
        straight_info = cluster.wait_finished(straight, JOB_TIMEOUT)
    except (AssertionError, SlurmClusterError) as exc:
        logs = "\n".join(f"--- job {j} log (tail)\n{_tail_log(tmp, 'moe-train', j)}" for j in (straight, preempted))
        raise AssertionError(f"{exc}\n{logs}") from None
    return {
        "cluster": cluster,
        "tmp": tmp,
        "straight": (straight, straight_info, tmp / "work" / "runs" / "cpu_demo" / f"slurm-{straight}"),
        "preempted": (preempted, preempted_info, run_dir),
    }


def test_two_node_job_trains_with_ep2_and_writes_wandb_offline_files(train_jobs):
    cluster, tmp = train_jobs["cluster"], train_jobs["tmp"]
    job_id, info, run_dir = train_jobs["straight"]
    log = job_log(tmp, "moe-train", job_id)
    assert_completed(cluster, info, log)
    assert info["NumNodes"] == "2" and info["NodeList"] == "n[1-2]"
    # Rendezvous as slurm/lib.sh derives it: the first node's NodeAddr, a port from the job id.
    assert f"master 127.0.0.2:{15000 + job_id % 20000}" in log
    assert "pre-flight ok" in log and "2 ranks on 2 hosts, all_to_all over gloo" in log
    assert "world 2 = pp 1 x dp 2 (ep 2)" in log
    assert f"run dir {run_dir} " in log  # stable name: runs/<experiment>/slurm-<job id>
    assert "done: train_loss" in log and "job step exited with status 0" in log

    files = wandb_files(run_dir)
    assert len(files) == 1
    history = read_wandb_history(files[0])
    logged = [row for row in history if "train/loss" in row]
    assert [row["_step"] for row in logged] == list(range(2, STEPS + 1, 2))
    for row in logged:
        for layer in (0, 1):
            assert 0.5 < row[f"moe/layer_{layer}/balance_loss"] < 4.0
            assert 0.0 <= row[f"moe/layer_{layer}/dropped_fraction"] < 1.0
    assert logged[-1]["train/loss"] < logged[0]["train/loss"]
    run_info = read_wandb_run_info(files[0])
    assert run_info["group"] == "cpu_demo" and run_info["project"] == "moe_parallel"


def test_preempted_job_checkpoints_requeues_and_resumes_the_same_run(train_jobs):
    cluster, tmp = train_jobs["cluster"], train_jobs["tmp"]
    job_id, info, run_dir = train_jobs["preempted"]
    _, _, straight_dir = train_jobs["straight"]
    log = job_log(tmp, "moe-train", job_id)
    assert_completed(cluster, info, log)
    assert info["Restarts"] == "1"

    stopped = re.search(r"step (\d+): SIGUSR1 received: checkpointing and stopping", log)
    assert stopped, log[-6000:]
    stop_step = int(stopped.group(1))
    assert 6 <= stop_step < STEPS
    # The protocol, in order: signal to the batch shell, trainer exits 75, requeue, restart, resume.
    for line in (
        "SIGUSR1 received",
        f"step {stop_step}: SIGUSR1 received: checkpointing",
        "job step exited with status 75",
        f"requeueing job {job_id} (restart 1)",
        f"job {job_id}, restart 1",
        f"resumed from {run_dir}/checkpoints/step_{stop_step:08d} at step {stop_step}",
        "job step exited with status 0",
    ):
        assert line in log, f"missing {line!r} in\n{log[-6000:]}"
        log = log[log.index(line) :]
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{STEPS:08d}"

    # Same losses as the uninterrupted job at every logged step, on both sides of the stop.
    want, got = metric(straight_dir, "train/loss"), metric(run_dir, "train/loss")
    assert sorted(got) == sorted(want) == list(range(2, STEPS + 1, 2))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), step
    assert any(step > stop_step for step in got)

    # One W&B offline run directory per job start, one run id: `wandb sync` joins them.
    files = wandb_files(run_dir)
    assert len(files) == 2
    assert len({read_wandb_run_info(f)["run_id"] for f in files}) == 1
    second = [row["_step"] for row in read_wandb_history(files[1]) if "train/loss" in row]
    assert second and min(second) > stop_step and max(second) == STEPS


def test_deepspeed_launcher_variant_trains_through_srun(slurm_cluster: SlurmCluster, tmp_path):
    job_id = submit(
        slurm_cluster,
        tmp_path,
        "train_deepspeed.sbatch",
        "+experiment=cpu_demo",
        "train.steps=4",
        "train.eval_every=4",
        "train.ckpt_every=4",
    )
    info = slurm_cluster.wait_finished(job_id, JOB_TIMEOUT)
    log = job_log(tmp_path, "moe-train-ds", job_id)
    assert_completed(slurm_cluster, info, log)
    assert "hostfile" in log and "n1 slots=1 n2 slots=1" in log
    assert "cmd = srun -n 2" in log  # DeepSpeed's SlurmRunner, not pdsh/ssh
    assert "2 ranks on 2 hosts" in log and "world 2 = pp 1 x dp 2 (ep 2)" in log and "done: train_loss" in log


def test_sweep_array_runs_each_value_in_one_wandb_group(slurm_cluster: SlurmCluster, tmp_path):
    # One single-process job per value (the EP=2 path is covered above): the array is what is tested.
    sbatch_args = [
        "--array=0-1",
        "--nodes=1",
        "--ntasks-per-node=1",
        "--gpus-per-node=0",
        "--cpus-per-task=1",
        "--time=15",
    ]
    array_id = submit(
        slurm_cluster,
        tmp_path,
        "sweep.sbatch",
        "train.steps=4",
        "train.eval_every=4",
        "train.ckpt_every=4",
        sbatch_args=sbatch_args,
        env={"SWEEP_VALUES": "1.0 2.0"},
    )
    runs = tmp_path / "work" / "runs" / "cf_sweep"
    for task, value in enumerate(("1.0", "2.0")):
        info = slurm_cluster.wait_finished(f"{array_id}_{task}", JOB_TIMEOUT)
        log = job_log(tmp_path, "moe-sweep", int(info["JobId"]))
        assert_completed(slurm_cluster, info, log)
        assert f"sweep task {task}: moe.capacity_factor={value}" in log
        run_dir = runs / f"slurm-{array_id}_{task}"
        assert f"capacity_factor: {value}" in (run_dir / "config.yaml").read_text()
        (wandb_file,) = wandb_files(run_dir)
        run_info = read_wandb_run_info(wandb_file)
        assert run_info["group"] == "cf_sweep"
        assert run_info["display_name"] == f"moe.capacity_factor={value}"
        losses = [row["train/loss"] for row in read_wandb_history(wandb_file) if "train/loss" in row]
        assert losses and all(math.isfinite(v) for v in losses)
