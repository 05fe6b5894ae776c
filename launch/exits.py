"""How a training job ends: its process exit statuses, the errors that are the user's to fix, and
the signals that ask it to stop.

The statuses are those of ``python launch/train.py`` on every rank (docs/failure-behaviour.md);
``slurm/lib.sh`` requeues a job that exits with :data:`EXIT_PREEMPTED`.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

from launch import config as app_config
from launch import preflight
from launch.data import DataConfigError, DataError
from launch.hf_tokenizer import TokenizerError
from launch.run_lock import RunLockError
from launch.wandb_logger import RunLoggerConfigError
from moe_parallel.checkpoints.checkpoint import CheckpointError
from moe_parallel.core.config import MoEConfigError
from moe_parallel.hf import HFConversionError
from moe_parallel.integration.engine import DeepSpeedConfigError
from moe_parallel.integration.parallel import ParallelConfigError
from moe_parallel.models import DecoderConfigError, GPTConfigError

EXIT_DONE = 0
EXIT_REFUSED = 1  # a refused setting, a run directory in use, a missing or damaged checkpoint: one line, no traceback
EXIT_DIVERGED = 65  # EX_DATAERR: non-finite loss or gradients (train.max_skipped_steps); not requeued
EXIT_STALLED = 69  # EX_UNAVAILABLE: a collective timed out (parallel.timeout_s): a rank stalled or died
EXIT_PREEMPTED = 75  # EX_TEMPFAIL, "try again later": slurm/*.sbatch requeue the job when the trainer exits with it
EXIT_INTERRUPTED = 130  # 128 + SIGINT: Ctrl-C, checkpointed; not requeued

# What the user can fix, each with a message naming the setting, file or job and the fix: the job
# ends with `error: <message>` and EXIT_REFUSED. Anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[Exception], ...] = (
    app_config.AppConfigError,
    MoEConfigError,
    GPTConfigError,
    DecoderConfigError,
    ParallelConfigError,
    DeepSpeedConfigError,
    RunLoggerConfigError,
    DataConfigError,
    DataError,
    TokenizerError,
    HFConversionError,
    CheckpointError,
    preflight.PreflightError,
    RunLockError,
)


def agree_max(values: list[int]) -> list[int]:
    """Element-wise maximum over all ranks (one tiny all-reduce; the values themselves without dist)."""
    if not dist.is_initialized():
        return values
    # NCCL process groups only reduce CUDA tensors.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    values_t = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(values_t, op=dist.ReduceOp.MAX)
    return [int(v) for v in values_t.tolist()]


class Preemption:
    """Turns SIGUSR1 / SIGTERM (Slurm's warning before the time limit, a requeue, ``kill``) and SIGINT
    (Ctrl-C) into a flag.

    The flag is agreed on by all ranks at a step boundary (:meth:`requested`), so every rank saves
    the same checkpoint and stops together. Installed first thing in ``launch.train.main``, so a signal
    that arrives while the data and model are being built is not fatal: the job stops after its first
    step. A run stopped this way before its last step exits with :data:`EXIT_PREEMPTED` (requeued by
    the sbatch scripts), or :data:`EXIT_INTERRUPTED` after Ctrl-C. A second Ctrl-C stops at once.
    """

    EXIT_PREEMPTED = EXIT_PREEMPTED

    def __init__(self) -> None:
        self.signal: int | None = None  # the first one received by this rank
        self.agreed: int | None = None  # received by some rank, as of the last requested()
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        if signum == signal.SIGINT and self.signal == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: the user does not want to wait for the checkpoint
        self.signal = self.signal or signum

    def requested(self) -> bool:
        """Whether any rank has received a signal: the same answer on every rank (srun delivers the
        signal to the ranks one by one, so some may not have it yet)."""
        self.agreed = agree_max([self.signal or 0])[0] or None
        return self.agreed is not None

    @property
    def exit_status(self) -> int:
        """The status to exit with once stopped by a signal before the last step."""
        return EXIT_INTERRUPTED if self.agreed == signal.SIGINT else EXIT_PREEMPTED
