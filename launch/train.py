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

A refused setting, a run directory in use or a damaged checkpoint ends the job with ``error:
<message>`` and exit status 1, without a traceback (``HYDRA_FULL_ERROR=1`` shows it); any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python launch/train.py` / `deepspeed launch/train.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import hydra
import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from launch import config as app_config
from launch import env as launch_env
from launch import hf_model, preflight
from launch import plan as app_plan
from launch.data import (
    DataConfigError,
    DataError,
    DistributedBatchIterator,
    PackedDataset,
    iter_eval_batches,
    prepare_data,
)
from launch.hf_tokenizer import TokenizerError
from launch.run_lock import RunDirLocked, RunLock, RunLockError
from launch.wandb_logger import NullRunLogger, RunLogger, RunLoggerConfigError, WandbSettings, make_run_logger
from moe_parallel.checkpoints.checkpoint import (
    CheckpointError,
    ResumeChoice,
    check_resume_step,
    clear_interrupted,
    load_checkpoint,
    rotate_checkpoints,
    save_checkpoint,
    select_resume,
)
from moe_parallel.core.comm import broadcast_from_rank0
from moe_parallel.core.config import MoEConfigError
from moe_parallel.core.layer import update_expert_biases
from moe_parallel.hf import HFConversionError
from moe_parallel.integration.engine import DeepSpeedConfigError, build_engine
from moe_parallel.integration.parallel import (
    ParallelConfigError,
    ParallelState,
    apply_timeout_to_all_groups,
    describe_collective_timeout,
    initialize_parallel,
)
from moe_parallel.integration.pipeline import gpt_pipeline
from moe_parallel.models import GPT, DecoderConfigError, GPTConfigError, lm_loss
from moe_parallel.models.mtp import pipeline_loss_parts
from moe_parallel.training.block_compile import compile_blocks, is_compiled
from moe_parallel.training.metrics import ExpertCollapseMonitor, MoEMetricsTracker, NonFiniteProbe, split_expert_load

app_config.register_configs()
# DeepSpeed 0.19 calls a collective that torch 2.13 deprecates, once per step: not the user's concern.
warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)


# ---------------------------------------------------------------- run directory and preemption


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
            sweep_job = _sweep_job()
            if sweep_job is not None:  # jobs of one sweep start within the same second
                stamp += f"-job{sweep_job[0]}"
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
    """Rank 0 takes the run directory's lock, held until ``held`` closes (every way out of :func:`main`
    but SIGKILL); every rank learns the outcome, so a refused job stops on every rank with the same
    message and none waits in a collective. Nothing has been written in ``run_dir`` yet."""
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


def _sweep_job() -> tuple[int, str] | None:
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


# Process exit statuses of `python launch/train.py` (README, "Failure behaviour").
EXIT_DONE = 0
EXIT_REFUSED = 1  # a refused setting, a run directory in use, a missing or damaged checkpoint: one line, no traceback
EXIT_DIVERGED = 65  # EX_DATAERR: non-finite loss or gradients (train.max_skipped_steps); not requeued
EXIT_STALLED = 69  # EX_UNAVAILABLE: a collective timed out (parallel.timeout_s): a rank stalled or died
EXIT_PREEMPTED = 75  # EX_TEMPFAIL, "try again later": slurm/*.sbatch requeue the job when the trainer exits with it
EXIT_INTERRUPTED = 130  # 128 + SIGINT: Ctrl-C, checkpointed; not requeued

DATA_PREP_TIMEOUT_S = 4 * 3600  # how long ranks wait for rank 0 to tokenize the corpus

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


def _agree_max(values: list[int]) -> list[int]:
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
    the same checkpoint and stops together. Installed first thing in :func:`main`, so a signal that
    arrives while the data and model are being built is not fatal: the job stops after its first step.
    A run stopped this way before its last step exits with :data:`EXIT_PREEMPTED` (requeued by the
    sbatch scripts), or :data:`EXIT_INTERRUPTED` after Ctrl-C. A second Ctrl-C stops at once.
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
        self.agreed = _agree_max([self.signal or 0])[0] or None
        return self.agreed is not None

    @property
    def exit_status(self) -> int:
        return EXIT_INTERRUPTED if self.agreed == signal.SIGINT else EXIT_PREEMPTED


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- model, schedule, engine


def build_model(cfg: DictConfig, state: ParallelState, vocab_size: int):
    """The model (this rank's pipeline stage with ``parallel.pp > 1``) and its library config. With
    ``train.compile`` each transformer block is compiled in place (regional compilation, as torchtitan
    does; ``moe_parallel.training.block_compile``): names, the engine and the pipeline see the same modules, and
    the metrics hooks attached later run outside the compiled code."""
    model, model_cfg = _build_model(cfg, state, vocab_size)
    if cfg.train.compile:
        compile_blocks(model, backend=cfg.train.compile_backend)
    return model, model_cfg


def _build_model(cfg: DictConfig, state: ParallelState, vocab_size: int):
    if app_config.is_hf(cfg):  # model=hf: a Hugging Face model's weights (launch/hf_model.py)
        return hf_model.build_model(cfg, state, vocab_size)
    gpt_cfg = app_config.gpt_config(cfg, vocab_size)
    if cfg.parallel.pp == 1:
        return GPT(gpt_cfg, ep_group=state.ep_group), gpt_cfg
    interval = 1 if cfg.deepspeed.activation_checkpointing else 0
    model = gpt_pipeline(
        gpt_cfg,
        ep_group=state.ep_group,
        topology=state.deepspeed_topology(),
        activation_checkpoint_interval=interval,
    )
    return model, gpt_cfg


def lr_lambda(cfg: DictConfig):
    o, steps = cfg.optim, cfg.train.steps

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - o.warmup_steps) / max(1, steps - o.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if o.schedule == "cosine" else 1 - progress
        return (o.min_lr + (o.lr - o.min_lr) * shape) / o.lr

    return factor


# ---------------------------------------------------------------- the trainer


def _due(step: int, every: int, last: int) -> bool:
    return step % every == 0 or step == last


def _say(rank: int, message: str) -> None:
    if rank == 0:
        print(message, flush=True)


@dataclass(frozen=True)
class StepCheck:
    """A step's health, the same on every rank."""

    bad_loss: bool  # the loss is NaN or inf
    skipped: bool  # DeepSpeed did not apply the update (gradient overflow)
    problem: str  # what was wrong, for messages; "" when nothing


@dataclass
class Trainer:
    """The training loop over a built engine; :func:`build_trainer` sets everything up.

    :meth:`fit` runs steps until ``train.steps``, a preemption signal or ``train.exit_after_steps``, and
    returns the process exit status.
    """

    cfg: DictConfig
    engine: Any
    state: ParallelState
    train_iter: DistributedBatchIterator
    val_data: PackedDataset
    tracker: MoEMetricsTracker
    run_dir: Path
    preemption: Preemption
    logger: RunLogger | NullRunLogger = field(default_factory=NullRunLogger)
    run_id: str | None = None
    start_step: int = 0
    val_loss: float = float("nan")  # the latest validation loss (what a Hydra sweep optimises)
    last_loss: float = float("nan")  # the latest training loss
    probe: NonFiniteProbe | None = None  # names the first layer with a non-finite output
    collapse: ExpertCollapseMonitor | None = None  # None: train.collapse_window=0
    loss_scaling: bool = False  # fp16 with a dynamic loss scale: an overflow is expected now and then
    skipped_steps: int = 0  # in this job
    mtp: bool = False  # the model has multi-token-prediction modules: their loss is trained and logged apart
    last_mtp_loss: float = float("nan")  # the latest weighted MTP loss (train/mtp_loss)
    _skipped_in_a_row: int = 0
    _report: Any = None  # prints progress on rank 0
    _last_log_time: float = field(default_factory=time.perf_counter)
    _tokens_since_log: int = 0
    _saved_step: int | None = None  # the step of this job's latest checkpoint
    resume_from: ResumeChoice | None = None  # what this job resumes from (chosen before anything is built)
    _parent: Path | None = None  # the checkpoint the current state was trained from
    _clean_since_save: bool = True  # every loss since _parent was finite

    @property
    def pipelined(self) -> bool:
        return self.cfg.parallel.pp > 1

    @property
    def rank(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def tokens_per_step(self) -> int:
        t = self.cfg.train
        return t.micro_batch_size * t.grad_accum * self.state.layout.data_parallel_size * self.cfg.data.seq_len

    # ------------------------------------------------------------ the loop

    def fit(self) -> int:
        """Train until done or told to stop; returns the process exit status (``EXIT_*``)."""
        t = self.cfg.train
        self.start_step = self.engine.global_steps
        if self.start_step >= t.steps:  # resumed from the final checkpoint: nothing to do, nothing to change
            _say(self.rank, f"the checkpoint is at step {self.start_step} = train.steps: nothing to train")
            self.logger.finish()
            return EXIT_DONE
        self._report = _progress(self.rank, t, start=self.start_step)
        self._last_log_time = time.perf_counter()
        while self.engine.global_steps < t.steps:
            position = self.train_iter.state_dict()
            if self.probe is not None:
                self.probe.start_step()
            loss = self.train_step()
            self._clean_since_save &= math.isfinite(loss)  # recorded in the next checkpoint (rotation)
            moe_metrics = self.tracker.reduce(self.state)  # every step: the tracker counts one step's micro-batches
            check = self._check_step(loss)
            if check.problem:
                status = self._skip_step(loss, check, position)
                if status is not None:
                    return status
                continue
            self._skipped_in_a_row = 0
            # Aux-loss-free balancing (moe.expert_bias_update_rate > 0): one bias update per applied step,
            # from the expert loads summed over the data-parallel ranks of this stage.
            update_expert_biases(self.engine.module, self.state.dp_group)
            self.last_loss = loss
            step = self.engine.global_steps
            self._log_step(step, moe_metrics)
            self._watch_collapse(step, moe_metrics)
            if _due(step, t.eval_every, t.steps):
                self._evaluate_and_log(step)
            if _due(step, t.ckpt_every, t.steps):
                self.save()
            why = self._stop_reason(step)
            if why is not None:
                return self._stop(step, why)
        return self._finish()

    def train_step(self) -> float:
        """One optimizer step (all micro-batches); the LM loss averaged over micro-batches and DP ranks.

        With multi-token prediction the MTP loss is trained too (added to the LM loss) and kept
        apart in :attr:`last_mtp_loss`, averaged the same way.
        """
        if self.pipelined:
            loss = float(self.engine.train_batch(data_iter=self.train_iter))
            if not self.mtp:
                return loss
            lm, self.last_mtp_loss = pipeline_loss_parts(self.engine.module, self.state.pp_group, self.state.dp_group)
            return lm
        sums = torch.zeros(2)  # LM loss, MTP loss
        for _ in range(self.cfg.train.grad_accum):
            tokens_BS, targets_BS = next(self.train_iter)
            targets_BS = targets_BS.to(self.engine.device)
            logits_BSV = self.engine(tokens_BS.to(self.engine.device))
            if self.mtp:
                total, loss, mtp = self.engine.module.training_loss(logits_BSV, targets_BS)
                sums[1] += mtp.detach().float().cpu()
            else:
                total = loss = lm_loss(logits_BSV, targets_BS)
            self.engine.backward(total)
            self.engine.step()
            sums[0] += loss.detach().float().cpu()
        if self.mtp:
            self.last_mtp_loss = self._mean_over_dp(sums[1].item() / self.cfg.train.grad_accum)
        return self._mean_over_dp(sums[0].item() / self.cfg.train.grad_accum)

    def _mean_over_dp(self, value: float) -> float:
        if not dist.is_initialized():
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.engine.device)  # NCCL: CUDA tensors only
        dist.all_reduce(t, group=self.state.dp_group)
        return t.item() / dist.get_world_size(self.state.dp_group)

    # ------------------------------------------------------------ divergence and collapse

    def _check_step(self, loss: float) -> StepCheck:
        """What was wrong with the step just taken, agreed on by every rank."""
        applied = self.engine.was_step_applied() if hasattr(self.engine, "was_step_applied") else True
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else 0.0
        flags = [int(not math.isfinite(loss)), int(not math.isfinite(norm)), int(not applied)]
        bad_loss, bad_norm, skipped = _agree_max(flags)  # a NaN on one rank is everyone's
        problems = []
        if bad_loss:
            problems.append(f"non-finite loss {loss}")
        if bad_norm:
            problems.append(f"non-finite gradient norm {norm}")
        if skipped:
            problems.append("DeepSpeed skipped the optimizer step (gradient overflow)")
        return StepCheck(bool(bad_loss), bool(skipped), "; ".join(problems))

    def _skip_step(self, loss: float, check: StepCheck, position: dict[str, Any]) -> int | None:
        """Handle a bad step: undo it as a step, or stop. Returns the exit status to stop with, or None."""
        t = self.cfg.train
        step = self.engine.global_steps  # DeepSpeed counted the attempt
        self.skipped_steps += 1
        self._skipped_in_a_row += 1
        if check.skipped:
            # Not a step: the step number, sample count and data position stay; the LR schedule did not
            # advance either (DeepSpeed steps it only for applied updates). The next attempt retries the batch.
            self.engine.global_steps -= 1
            self.engine.global_samples -= self.engine.train_batch_size()
            self.train_iter.load_state_dict(position)
        self.logger.log(
            step,
            {
                "train/skipped_steps": self.skipped_steps,
                "train/skipped_loss": loss,
                "train/lr": self.engine.get_lr()[0],
                "train/skipped_grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
            },
        )
        if not check.skipped:  # the optimizer applied it: the weights hold it now, a retry cannot help
            why = "the update was applied, so the weights are no longer finite"
        elif check.bad_loss and not self.loss_scaling:  # fp32/bf16: a NaN forward is no overflow that passes
            why = "a non-finite loss without fp16 loss scaling does not recover"
        elif self._skipped_in_a_row >= t.max_skipped_steps:
            why = f"{self._skipped_in_a_row} skipped steps in a row (train.max_skipped_steps={t.max_skipped_steps})"
        else:
            _say(
                self.rank,
                f"step {step} skipped ({check.problem}): {self._skipped_in_a_row} of train.max_skipped_steps="
                f"{t.max_skipped_steps} in a row; retrying it",
            )
            return None
        where = _gather_first_layer(self.probe.first_non_finite() if self.probe else None, self.state)
        last = self._last_checkpoint_step()
        message = (
            f"step {step}: training diverged: {check.problem}; {why}. "
            + (f"The first output that went non-finite: {where}. " if where else "")
            + "No checkpoint was written for this or later steps; "
            + (f"the last one is step {last} in {self.ckpt_dir}. " if last is not None else "there is none before. ")
            + "Lower optim.lr, raise optim.warmup_steps or lower deepspeed.grad_clip, then resume (the same command; "
            "for an earlier checkpoint, move the newer ones out of checkpoints/) or start over."
        )
        if self.rank == 0:
            print(f"error: {message}", file=sys.stderr, flush=True)
        self.logger.alert(step, "training diverged", message, {"problem": check.problem, "layer": where or ""})
        self.logger.finish()
        return EXIT_DIVERGED

    def _last_checkpoint_step(self) -> int | None:
        latest = self.ckpt_dir / "latest"
        try:
            return int(latest.read_text().strip().rsplit("_", 1)[-1])
        except (OSError, ValueError):
            return None

    def _watch_collapse(self, step: int, moe_metrics: dict[str, Any]) -> None:
        if self.collapse is None:
            return
        for report in self.collapse.update(step, moe_metrics):
            message = report.message(self.collapse.thresholds.window)
            if self.rank == 0:
                print(f"warning: {message}", file=sys.stderr, flush=True)
            self.logger.alert(step, f"expert collapse in MoE layer {report.layer_number}", message, report.as_record())

    # ------------------------------------------------------------ logging and evaluation

    def _log_step(self, step: int, moe_metrics: dict[str, Any]) -> None:
        self._tokens_since_log += self.tokens_per_step
        if not _due(step, self.cfg.train.log_every, self.cfg.train.steps):
            return
        now = time.perf_counter()
        scalars, expert_load = split_expert_load(moe_metrics)
        scalars.update(
            {
                "train/loss": self.last_loss,
                "train/lr": self.engine.get_lr()[0],
                "train/grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
                "train/tokens_per_s": self._tokens_since_log / (now - self._last_log_time),
                "train/skipped_steps": self.skipped_steps,
            }
        )
        if self.mtp:  # train/loss stays the LM loss; the weighted MTP loss is logged beside it
            scalars["train/mtp_loss"] = self.last_mtp_loss
        self.logger.log(step, scalars, expert_load)
        self._report(step, self.last_loss, scalars)
        self._last_log_time, self._tokens_since_log = now, 0

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over the first ``train.eval_batches`` batches (the same every time)."""
        t = self.cfg.train
        batches = iter_eval_batches(
            self.val_data,
            t.micro_batch_size,
            dp_rank=self.state.dp_rank,
            dp_size=self.state.layout.data_parallel_size,
            max_batches=t.eval_batches,
        )
        losses = []
        for tokens_BS, targets_BS in batches:
            if self.pipelined:
                batch_iter = iter([(tokens_BS, targets_BS)] * self.engine.micro_batches)
                losses.append(float(self.engine.eval_batch(batch_iter)))
            else:
                self.engine.module.eval()
                logits = self.engine(tokens_BS.to(self.engine.device))
                losses.append(self._mean_over_dp(lm_loss(logits, targets_BS.to(self.engine.device)).item()))
                self.engine.module.train()
        return float(np.mean(losses))

    def _evaluate_and_log(self, step: int) -> None:
        self.val_loss = self.evaluate()
        ppl = math.exp(min(self.val_loss, 50))
        self.logger.log(step, {"eval/loss": self.val_loss, "eval/ppl": ppl})
        _say(self.rank, f"step {step}: validation loss {self.val_loss:.4f}, perplexity {ppl:.2f}")

    # ------------------------------------------------------------ checkpoints

    def save(self) -> None:
        """Save a checkpoint of this step (all ranks), then rotate old ones.

        The checkpoint records what it was trained from and whether every loss since was finite;
        rotation keeps a checkpoint known to have trained cleanly (see ``rotate_checkpoints``).
        A failed save (e.g. no space left) raises on every rank and changes no earlier checkpoint.
        """
        client_state = {
            "data": self.train_iter.state_dict(),
            "wandb_run_id": self.run_id,
            "experiment": self.cfg.experiment,
        }
        self._parent = save_checkpoint(
            self.engine,
            self.ckpt_dir,
            client_state=client_state,
            parent=self._parent,
            trained_cleanly=self._clean_since_save,
        )
        self._clean_since_save = True
        self._saved_step = self.engine.global_steps
        if self.rank == 0:
            protect = self.resume_from.path if self.resume_from else None
            rotate_checkpoints(self.ckpt_dir, self.cfg.train.keep_checkpoints, protect=protect)

    def restore(self) -> dict[str, Any] | None:
        """Load the checkpoint :func:`choose_resume` picked (model, optimizer, schedule, RNG, data position);
        returns its client state, or None when starting fresh. A fault raises on every rank."""
        if self.resume_from is None:
            return None
        client = load_checkpoint(self.engine, self.resume_from.path)
        if client is None:  # the same answer on every rank: load_checkpoint agrees on what it found
            raise CheckpointError(
                f"checkpoint {self.resume_from.path}, chosen to resume from ({self.resume_from.reason}), vanished "
                f"before it was loaded: it was removed, moved or rotated away meanwhile (by another job in "
                f"{self.run_dir}?). Nothing was changed; run the same command again to resume from the newest "
                "complete checkpoint"
            )
        if "data" in client:  # absent in weights-only checkpoints (checkpoint_tool import / import-hf)
            self.train_iter.load_state_dict(client["data"])
        self._parent = self.resume_from.path
        _say(
            self.rank,
            f"resumed from {self.resume_from.path} at step {self.engine.global_steps} ({self.resume_from.reason})",
        )
        return client

    # ------------------------------------------------------------ stopping

    def _stop_reason(self, step: int) -> str | None:
        """Why this job stops after ``step`` (the same answer on every rank), or None to go on."""
        signalled = self.preemption.requested()  # a collective: every rank, every step
        if signalled:
            return f"{signal.Signals(self.preemption.agreed).name} received"
        done = step - self.start_step
        if self.cfg.train.exit_after_steps is not None and done >= self.cfg.train.exit_after_steps:
            return f"{done} steps done"
        return None

    def _stop(self, step: int, why: str) -> int:
        """Checkpoint (unless this step just did), close the logger; the exit status."""
        _say(self.rank, f"step {step}: {why}: checkpointing and stopping")
        if self._saved_step != step:
            self.save()
        self.logger.finish()
        if self.preemption.agreed and step < self.cfg.train.steps:
            if dist.is_initialized():
                dist.barrier()  # no rank exits non-zero before rank 0 has closed its W&B files
            return self.preemption.exit_status  # SIGTERM/SIGUSR1: unfinished, the sbatch script requeues the job
        return EXIT_DONE

    def _finish(self) -> int:
        summary = {
            "final/train_loss": self.last_loss,
            "final/eval_loss": self.val_loss,
            "final/eval_ppl": math.exp(min(self.val_loss, 50)),
            "final/step": self.cfg.train.steps,
        }
        self.logger.summary(summary)
        self.logger.finish()
        _say(self.rank, "done: " + ", ".join(f"{k.split('/')[1]} {v:.4g}" for k, v in summary.items()))
        return EXIT_DONE


# ---------------------------------------------------------------- building the trainer


def build_trainer(cfg: DictConfig, preemption: Preemption, held: contextlib.ExitStack) -> Trainer:
    """Everything before the first step: validate, rendezvous, layout, run directory and its lock
    (entered into ``held``), data, model, engine, resume, logger. Every check that can fail on the
    config runs before any collective."""
    launch = launch_env.detect()
    app_config.validate(cfg, launch.world_size)
    check_memory(cfg, launch.world_size)
    if not dist.is_initialized():
        launch_env.init_distributed(launch, cfg.parallel.backend, cfg.parallel.timeout_s)
    # All ranks here, same versions, the backend moves data: else a clear error now, not a hang later.
    preflight.check(preflight.default_timeout(cfg.parallel.timeout_s))
    rank = dist.get_rank()
    model_cfg = app_config.model_config(cfg, cfg.data.vocab_size)
    num_experts = model_cfg.moe.num_experts if model_cfg.moe else cfg.moe.num_experts
    state = initialize_parallel(cfg.parallel.pp, cfg.parallel.ep, num_experts, timeout=cfg.parallel.timeout_s)
    run_dir = resolve_run_dir(cfg, launch)
    lock_run_dir(run_dir, rank, held)  # before anything in run_dir is read for resuming or written
    if rank == 0:  # the lock holder: no save is in progress, so every staging entry is a leftover
        for leftover in clear_interrupted(run_dir / "checkpoints"):
            print(f"removed {leftover} (left by a save or rotation that was cut short)", flush=True)
    resume_from = choose_resume(cfg, run_dir / "checkpoints", rank)
    seed_everything(cfg.train.seed)

    # Rank 0 may tokenize a large corpus for longer than parallel.timeout_s; the others wait for it in a
    # group of their own with a bound for that (a rank 0 that died still ends the job at once).
    prep_wait = timedelta(seconds=max(DATA_PREP_TIMEOUT_S, cfg.parallel.timeout_s))
    prep_group = dist.new_group(backend="gloo", timeout=prep_wait, group_desc="data_preparation")
    data = prepare_data(app_config.data_config(cfg), rank=rank, barrier=lambda: dist.barrier(group=prep_group))
    train_iter, val_data = _build_data(cfg, data, state)
    model, model_cfg = build_model(cfg, state, int(data.meta["vocab_size"]))
    engine = _build_engine(cfg, model)
    apply_timeout_to_all_groups(cfg.parallel.timeout_s)  # also DeepSpeed's own groups
    thresholds = app_config.collapse_thresholds(cfg)
    trainer = Trainer(
        cfg,
        engine,
        state,
        train_iter,
        val_data,
        MoEMetricsTracker(engine.module),
        run_dir,
        preemption,
        probe=NonFiniteProbe(engine.module),
        collapse=ExpertCollapseMonitor(thresholds) if thresholds is not None else None,
        loss_scaling=bool(engine.fp16_enabled()) if hasattr(engine, "fp16_enabled") else False,
        resume_from=resume_from,
        mtp=getattr(model_cfg, "mtp_layers", 0) > 0,
    )
    client = trainer.restore()
    # Written once the resume has succeeded (a refused or failed one changes nothing), and only when
    # there is something to train (resumed at train.steps: the run is left as it is).
    nothing_to_train = resume_from is not None and resume_from.step >= cfg.train.steps
    if rank == 0 and not nothing_to_train:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        (run_dir / "deepspeed_config.json").write_text(json.dumps(app_config.deepspeed_config(cfg), indent=1))
        if app_config.is_hf(cfg):  # what checkpoint_tool export-hf reads beside the checkpoints
            hf_model.save_identity(cfg, model_cfg, run_dir / "checkpoints")
    trainer.logger = NullRunLogger() if nothing_to_train else _build_logger(cfg, run_dir, client, rank)
    trainer.run_id = broadcast_from_rank0(getattr(trainer.logger, "run_id", None))
    compiled = f" | {sum(map(is_compiled, model.modules()))} blocks compiled" if cfg.train.compile else ""
    _say(
        rank,
        f"run dir {run_dir} | world {launch.world_size} = pp {cfg.parallel.pp} x dp "
        f"{state.layout.data_parallel_size} (ep {cfg.parallel.ep}) | {model_cfg.num_layers} layers, "
        f"{model_cfg.moe.num_experts if model_cfg.moe else 0} experts top-{model_cfg.moe.top_k if model_cfg.moe else 0}"
        f" | {sum(p.numel() for p in model.parameters()):,} "
        f"params on rank 0{compiled}",
    )
    return trainer


def check_memory(cfg: DictConfig, world_size: int) -> None:
    """Refuse, before any collective, a layout whose planned peak per rank exceeds the device's memory
    (``train.device_memory``, else the GPU's own; a CPU run is checked only when it is declared)."""
    if not cfg.train.memory_check:
        return
    if cfg.train.device_memory is not None:
        size = app_config.parse_bytes(cfg.train.device_memory, "train.device_memory")
    elif torch.cuda.is_available():
        size = torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", 0))).total_memory
    else:
        return
    attention = "flash" if torch.cuda.is_available() else "math"  # what SDPA saves for backward here
    app_plan.memory_check(cfg, world_size, size, attention)


def _gather_first_layer(layer: str | None, state: ParallelState) -> str | None:
    """The first non-finite layer over pipeline stages (the earliest stage's, since a NaN flows
    forward); every rank of a stage saw the same forward order."""
    if state.layout.pipeline_parallel_size == 1 or not dist.is_initialized():
        return layer
    found: list[Any] = [None] * dist.get_world_size(state.pp_group)
    dist.all_gather_object(found, (state.stage_id, layer), group=state.pp_group)
    return next((name for _, name in sorted(found, key=lambda f: f[0]) if name), None)


def _build_data(cfg: DictConfig, data, state: ParallelState) -> tuple[DistributedBatchIterator, PackedDataset]:
    t, dp = cfg.train, state.layout.data_parallel_size
    train_iter = DistributedBatchIterator(
        PackedDataset(data.train_tokens, cfg.data.seq_len, "train"),
        t.micro_batch_size,
        dp_rank=state.dp_rank,
        dp_size=dp,
        grad_accum_steps=t.grad_accum,
        seed=t.seed,
    )
    val_data = PackedDataset(data.val_tokens, cfg.data.seq_len, "validation")
    if len(val_data) < t.micro_batch_size * dp:  # the same on every rank: raised before any collective uses it
        raise DataError(
            f"the validation split holds {len(val_data)} windows of data.seq_len={cfg.data.seq_len}, fewer than one "
            f"evaluation batch (train.micro_batch_size={t.micro_batch_size} x {dp} data-parallel ranks); raise "
            "data.val_fraction or lower train.micro_batch_size"
        )
    return train_iter, val_data


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


def _build_engine(cfg: DictConfig, model):
    ds_config = app_config.deepspeed_config(cfg)
    schedule = lr_lambda(cfg)
    engine, _, _ = build_engine(
        model,
        ds_config,
        lr=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay,
        betas=(cfg.optim.beta1, cfg.optim.beta2),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
    )
    return engine


def _build_logger(cfg: DictConfig, run_dir: Path, client: dict[str, Any] | None, rank: int):
    sweep_job = _sweep_job()
    settings = WandbSettings(
        **{
            **OmegaConf.to_container(cfg.logger, resolve=True),
            "group": cfg.logger.group or cfg.experiment,  # W&B groups a sweep's runs for comparison
            "name": cfg.logger.name or (sweep_job[1] if sweep_job else None),
        }
    )
    return make_run_logger(
        run_dir,
        settings,
        config=OmegaConf.to_container(cfg, resolve=True),
        resume_id=client.get("wandb_run_id") if client else None,
        rank=rank,
    )


def _progress(rank: int, t: DictConfig, start: int):
    """A tqdm bar on an interactive rank 0, plain log lines otherwise."""
    if rank != 0:
        return lambda *a: None
    use_bar = t.progress == "bar" or (t.progress == "auto" and launch_env.is_interactive())
    if use_bar:
        from tqdm import tqdm

        bar = tqdm(total=t.steps, initial=start, unit="step", dynamic_ncols=True)

        def update(step: int, loss: float, scalars: dict[str, Any]) -> None:
            bar.update(step - bar.n)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{scalars['train/tokens_per_s']:.0f}")

        return update

    def line(step: int, loss: float, scalars: dict[str, Any]) -> None:
        balance = [v for k, v in scalars.items() if k.endswith("/balance_loss")]
        dropped = [v for k, v in scalars.items() if k.endswith("/dropped_fraction")]
        extra = f" | balance {np.mean(balance):.3f} | dropped {np.mean(dropped):.3f}" if balance else ""
        if "train/mtp_loss" in scalars:
            extra = f" | mtp {scalars['train/mtp_loss']:.4f}{extra}"
        print(
            f"step {step:>5}/{t.steps} | loss {loss:.4f} | lr {scalars['train/lr']:.2e} | "
            f"{scalars['train/tokens_per_s']:,.0f} tok/s{extra}",
            flush=True,
        )

    return line


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
    if _sweep_job() is None:
        # A single run leaves at once after a clean finish too (checkpoints and W&B are closed by now):
        # interpreter teardown with gloo's and the rendezvous store's threads still running aborted a
        # finished run now and then (SIGABRT, "terminate called without an active exception"), which
        # the launcher and Slurm report as a failed job.
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
