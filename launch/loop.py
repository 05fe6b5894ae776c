"""The training loop of ``launch/train.py``: steps, evaluation, divergence and collapse checks,
checkpoint cadence and stopping.

:class:`Trainer` runs over an engine that :func:`launch.build.build_trainer` has built. Every
decision that ends or changes a step (a non-finite loss, a skipped update, a signal, the step count)
is agreed on by all ranks, so they save the same checkpoint and stop together.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig

from launch import env as launch_env
from launch.data import DistributedBatchIterator, PackedDataset, iter_eval_batches
from launch.exits import EXIT_DIVERGED, EXIT_DONE, Preemption, agree_max
from launch.wandb_logger import NullRunLogger, RunLogger
from moe_parallel.checkpoints.checkpoint import (
    CheckpointError,
    ResumeChoice,
    load_checkpoint,
    rotate_checkpoints,
    save_checkpoint,
)
from moe_parallel.core.layer import update_expert_biases
from moe_parallel.integration.parallel import ParallelState
from moe_parallel.models import lm_loss
from moe_parallel.models.mtp import pipeline_loss_parts
from moe_parallel.training.metrics import ExpertCollapseMonitor, MoEMetricsTracker, NonFiniteProbe, split_expert_load


def _due(step: int, every: int, last: int) -> bool:
    """Whether a ``train.*_every`` action runs after ``step``: every ``every`` steps, and at the last."""
    return step % every == 0 or step == last


def say(rank: int, message: str) -> None:
    """Print a progress line on rank 0 only (every rank reaches the same point)."""
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
    """The training loop over a built engine; :func:`launch.build.build_trainer` sets everything up.

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
            say(self.rank, f"the checkpoint is at step {self.start_step} = train.steps: nothing to train")
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
        bad_loss, bad_norm, skipped = agree_max(flags)  # a NaN on one rank is everyone's
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
            say(
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
        say(self.rank, f"step {step}: validation loss {self.val_loss:.4f}, perplexity {ppl:.2f}")

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
        """Load the checkpoint :func:`launch.run_dir.choose_resume` picked (model, optimizer, schedule,
        RNG, data position); returns its client state, or None when starting fresh. A fault raises on
        every rank."""
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
        say(
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
        say(self.rank, f"step {step}: {why}: checkpointing and stopping")
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
        say(self.rank, "done: " + ", ".join(f"{k.split('/')[1]} {v:.4g}" for k, v in summary.items()))
        return EXIT_DONE


def _gather_first_layer(layer: str | None, state: ParallelState) -> str | None:
    """The first non-finite layer over pipeline stages (the earliest stage's, since a NaN flows
    forward); every rank of a stage saw the same forward order."""
    if state.layout.pipeline_parallel_size == 1 or not dist.is_initialized():
        return layer
    found: list[Any] = [None] * dist.get_world_size(state.pp_group)
    dist.all_gather_object(found, (state.stage_id, layer), group=state.pp_group)
    return next((name for _, name in sorted(found, key=lambda f: f[0]) if name), None)


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
