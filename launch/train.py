"""Train the reference MoE-GPT with DeepSpeed: the project's main job.

    python launch/train.py                                   # one process
    deepspeed --num_gpus 2 launch/train.py parallel.ep=2     # local launcher (--local_rank is tolerated)
    torchrun --nproc_per_node 2 launch/train.py parallel.ep=2
    srun python launch/train.py ...                          # under Slurm (see slurm/train.sbatch)
    python launch/train.py -m moe.capacity_factor=1.0,1.25,2.0   # a Hydra sweep

Every value comes from ``conf/`` (Hydra); the DeepSpeed JSON is generated from it. Only rank 0
creates the run directory and writes files; the other ranks learn its path. Rank 0 locks the run
directory before anything is written in it (``launch/run_lock.py``): a second job on the same
directory stops at once, on every rank, naming the job that holds it.

This module is the entry point: it parses the config, builds the job (:mod:`launch.build`), runs
the loop (:mod:`launch.loop`) and turns the outcome into the process exit status
(:mod:`launch.exits`).

A refused setting, a run directory in use or a damaged checkpoint ends the job with ``error:
<message>`` and exit status 1, without a traceback (``HYDRA_FULL_ERROR=1`` shows it); any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import warnings
from pathlib import Path

if __package__ in (None, ""):  # `python launch/train.py` / `deepspeed launch/train.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import hydra
from omegaconf import DictConfig

from launch import config as app_config
from launch import env as launch_env
from launch.build import build_trainer
from launch.exits import EXIT_DONE, EXIT_REFUSED, EXIT_STALLED, USER_ERRORS, Preemption
from launch.loop import Trainer
from launch.run_dir import sweep_job
from moe_parallel.integration.parallel import describe_collective_timeout

app_config.register_configs()
# DeepSpeed 0.19 calls a collective that torch 2.13 deprecates, once per step: not the user's concern.
warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)


def _exit_now(status: int) -> None:
    """Leave at once, all ranks alike: `srun --kill-on-bad-exit` terminates the other ranks as soon as
    one exits non-zero, and a rank still tearing down (Python has restored SIGTERM's default action by
    then) would die of it and hide the exit code the sbatch script requeues on."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _stop_as_on_sigterm(launcher_pid: int) -> None:
    print(f"the deepspeed launcher (pid {launcher_pid}) is gone: stopping as on SIGTERM", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """Train as configured; returns the final validation loss (Hydra sweeps can optimise it)."""
    preemption = Preemption()  # first: a signal during start-up must not kill the process
    launch_env.watch_deepspeed_launcher(_stop_as_on_sigterm)
    with contextlib.ExitStack() as held:  # the run directory's lock: released before the process leaves
        trainer, status = _run(cfg, preemption, held)
    if status != EXIT_DONE:
        _exit_now(status)  # also ends a sweep: a preempted job is requeued as a whole
    if sweep_job() is None:
        # A single run leaves at once after a clean finish too (checkpoints and W&B are closed by now):
        # interpreter teardown with gloo's and the rendezvous store's threads still running can abort a
        # finished run (SIGABRT, "terminate called without an active exception"), which the launcher
        # and Slurm report as a failed job.
        _exit_now(EXIT_DONE)
    return trainer.val_loss


def _run(cfg: DictConfig, preemption: Preemption, held: contextlib.ExitStack) -> tuple[Trainer | None, int]:
    """Build and train; the trainer (None if it was not built) and the exit status. A user error or a
    stalled collective becomes a one-line message and its status; a bug propagates with its traceback."""
    trainer = None
    try:
        trainer = build_trainer(cfg, preemption, held)
        return trainer, trainer.fit()
    except USER_ERRORS as exc:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise  # Hydra prints the whole traceback
        print(f"error: {exc}", file=sys.stderr, flush=True)
        status = EXIT_REFUSED
    except RuntimeError as exc:
        message = describe_collective_timeout(exc, cfg.parallel.timeout_s)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr, flush=True)
        status = EXIT_STALLED
    if trainer is not None:
        trainer.logger.finish()
    return trainer, status


if __name__ == "__main__":
    sys.argv = launch_env.strip_launcher_args(sys.argv)
    main()
