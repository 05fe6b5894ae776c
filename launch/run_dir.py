"""The run directory of a training job: where it is, its lock, and the checkpoint it resumes from.

Rank 0 picks the directory, takes its lock (:mod:`launch.run_lock`) and reads its checkpoints;
every other rank learns the outcome, so all ranks agree on the path, on a refusal and on the
checkpoint to load before any of them writes anything.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

import torch.distributed as dist
from omegaconf import DictConfig

from launch import env as launch_env
from launch.run_lock import RunDirLocked, RunLock, RunLockError
from moe_parallel.checkpoints.checkpoint import CheckpointError, ResumeChoice, check_resume_step, select_resume
from moe_parallel.core.comm import broadcast_from_rank0


def resolve_run_dir(cfg: DictConfig, launch: launch_env.LaunchEnv) -> Path:
    """Rank 0 picks (and creates) the run directory; every rank returns the same path.

    Stable across a Slurm requeue (named after the job id), so a requeued job finds its checkpoints.
    """
    if launch.rank == 0:
        if cfg.train.run_dir:
            path = Path(cfg.train.run_dir)
        else:
            job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
            if job and os.environ.get("SLURM_ARRAY_TASK_ID"):
                job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
            stamp = f"slurm-{job}" if job else time.strftime("%Y%m%d-%H%M%S")
            job_of_sweep = sweep_job()
            if job_of_sweep is not None:  # jobs of one sweep start within the same second
                stamp += f"-job{job_of_sweep[0]}"
            path = Path("runs") / cfg.experiment / stamp
        path = path.resolve()
        path.mkdir(parents=True, exist_ok=True)
        name = [str(path)]
    else:
        name = [None]
    if dist.is_initialized():
        dist.broadcast_object_list(name, src=0)
    return Path(name[0])


def lock_run_dir(run_dir: Path, rank: int, held: contextlib.ExitStack) -> None:
    """Rank 0 takes the run directory's lock, held until ``held`` closes (every way out of
    ``launch.train.main`` but SIGKILL); every rank learns the outcome, so a refused job stops on
    every rank with the same message and none waits in a collective. Nothing has been written in
    ``run_dir`` yet."""
    failure: tuple[bool, str] | None = None  # (another job holds it, message)
    if rank == 0:
        lock = RunLock(run_dir, "training")
        try:
            held.enter_context(lock)
        except RunLockError as err:
            failure = (isinstance(err, RunDirLocked), str(err))
        else:
            if lock.took_over is not None:
                gone = lock.took_over
                who = gone.holder.describe() if gone.holder else "a job"
                print(f"run dir {run_dir}: took over the lock left by {who}: {gone.verdict.reason}", flush=True)
    failure = broadcast_from_rank0(failure)
    if failure is not None:
        in_use, message = failure
        raise (RunDirLocked if in_use else RunLockError)(message)


def sweep_job() -> tuple[int, str] | None:
    """(job number, its swept values as a name, e.g. ``moe.capacity_factor=1.25``) inside a Hydra
    multirun, else None. Swept keys are those given several values on the command line."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    hydra_cfg = HydraConfig.get()
    sweep_syntax = ("range(", "choice(", "interval(", "glob(")
    swept = {
        key.lstrip("+~")
        for key, _, value in (arg.partition("=") for arg in sys.argv[1:])
        if "," in value or value.startswith(sweep_syntax)
    }
    values = [o for o in hydra_cfg.overrides.task if o.partition("=")[0].lstrip("+~") in swept]
    return hydra_cfg.job.num, ",".join(values) or hydra_cfg.job.override_dirname


def choose_resume(cfg: DictConfig, checkpoints_dir: Path, rank: int) -> ResumeChoice | None:
    """The checkpoint ``train.resume`` selects (see ``select_resume``), checked against ``train.steps``.

    Rank 0 looks at the files and every rank gets its answer, or the same error: a missing or
    incomplete checkpoint, one newer than the choice (it would be overwritten), or ``train.steps``
    below the checkpoint's step. Nothing is written before this.
    """
    outcome: tuple[ResumeChoice | None, str | None] = (None, None)
    if rank == 0:
        try:
            choice = select_resume(checkpoints_dir, str(cfg.train.resume))
            check_resume_step(choice, cfg.train.steps)
            outcome = (choice, None)
        except CheckpointError as err:
            outcome = (None, str(err))
    choice, error = broadcast_from_rank0(outcome)
    if error is not None:
        raise CheckpointError(error)
    return choice
