"""Everything a training job builds before its first step: rendezvous, layout, run directory, data,
model, engine, resume and logger (:func:`build_trainer`).

Every check that can fail on the config runs before any collective, so a refused setting stops
every rank with the same message instead of a hang.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from launch import config as app_config
from launch import env as launch_env
from launch import hf_model, preflight
from launch import plan as app_plan
from launch.data import DataError, DistributedBatchIterator, PackedDataset, prepare_data
from launch.exits import Preemption
from launch.loop import Trainer, say
from launch.run_dir import choose_resume, lock_run_dir, resolve_run_dir, sweep_job
from launch.wandb_logger import NullRunLogger, RunLogger, WandbSettings, make_run_logger
from moe_parallel.checkpoints.checkpoint import clear_interrupted
from moe_parallel.core.comm import broadcast_from_rank0
from moe_parallel.integration.engine import build_engine as build_deepspeed_engine
from moe_parallel.integration.parallel import ParallelState, apply_timeout_to_all_groups, initialize_parallel
from moe_parallel.integration.pipeline import gpt_pipeline
from moe_parallel.models import GPT
from moe_parallel.training.block_compile import compile_blocks, is_compiled
from moe_parallel.training.metrics import ExpertCollapseMonitor, MoEMetricsTracker, NonFiniteProbe

DATA_PREP_TIMEOUT_S = 4 * 3600  # how long ranks wait for rank 0 to tokenize the corpus


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
    train_iter, val_data = build_data(cfg, data, state)
    model, model_cfg = build_model(cfg, state, int(data.meta["vocab_size"]))
    engine = build_engine(cfg, model)
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
    trainer.logger = NullRunLogger() if nothing_to_train else build_logger(cfg, run_dir, client, rank)
    trainer.run_id = broadcast_from_rank0(getattr(trainer.logger, "run_id", None))
    compiled = f" | {sum(map(is_compiled, model.modules()))} blocks compiled" if cfg.train.compile else ""
    say(
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


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators: the same seed builds the same model and data order."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(cfg: DictConfig, state: ParallelState, vocab_size: int, *, eager: bool = False) -> tuple[Any, Any]:
    """The model (this rank's pipeline stage with ``parallel.pp > 1``) and its library config.

    With ``train.compile`` (and not ``eager``) each transformer block is compiled in place (regional
    compilation, as torchtitan does; ``moe_parallel.training.block_compile``): names, the engine and
    the pipeline see the same modules, and the metrics hooks attached later run outside the compiled
    code. ``eager=True`` builds the uncompiled model whatever the config says (``launch/plan.py
    --measure`` counts its saved tensors).
    """
    if app_config.is_hf(cfg):  # model=hf: a Hugging Face model's weights (launch/hf_model.py)
        model, model_cfg = hf_model.build_model(cfg, state, vocab_size)
    else:
        model_cfg = app_config.gpt_config(cfg, vocab_size)
        if cfg.parallel.pp == 1:
            model = GPT(model_cfg, ep_group=state.ep_group)
        else:
            model = gpt_pipeline(
                model_cfg,
                ep_group=state.ep_group,
                topology=state.deepspeed_topology(),
                activation_checkpoint_interval=1 if cfg.deepspeed.activation_checkpointing else 0,
            )
    if cfg.train.compile and not eager:
        compile_blocks(model, backend=cfg.train.compile_backend)
    return model, model_cfg


def lr_lambda(cfg: DictConfig) -> Callable[[int], float]:
    """The learning-rate factor of each step (for ``LambdaLR``): linear warm-up over ``optim.warmup_steps``,
    then ``optim.schedule`` (constant, cosine or linear) down to ``optim.min_lr`` at ``train.steps``."""
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


def build_engine(cfg: DictConfig, model: torch.nn.Module) -> Any:
    """The DeepSpeed engine of ``model`` from the generated DeepSpeed config, with AdamW and :func:`lr_lambda`."""
    ds_config = app_config.deepspeed_config(cfg)
    schedule = lr_lambda(cfg)
    engine, _, _ = build_deepspeed_engine(
        model,
        ds_config,
        lr=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay,
        betas=(cfg.optim.beta1, cfg.optim.beta2),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
    )
    return engine


def build_data(cfg: DictConfig, data: Any, state: ParallelState) -> tuple[DistributedBatchIterator, PackedDataset]:
    """This rank's training batches and the validation windows of the prepared ``data``; a validation
    split smaller than one evaluation batch is refused (the same on every rank)."""
    t, dp = cfg.train, state.layout.data_parallel_size
    train_iter = DistributedBatchIterator(
        PackedDataset(data.train_tokens, cfg.data.seq_len, "train"),
        t.micro_batch_size,
        dp_rank=state.dp_rank,
        dp_size=dp,
        grad_accum_steps=t.grad_accum,
        seed=cfg.data.seed,
    )
    val_data = PackedDataset(data.val_tokens, cfg.data.seq_len, "validation")
    if len(val_data) < t.micro_batch_size * dp:  # the same on every rank: raised before any collective uses it
        raise DataError(
            f"the validation split holds {len(val_data)} windows of data.seq_len={cfg.data.seq_len}, fewer than one "
            f"evaluation batch (train.micro_batch_size={t.micro_batch_size} x {dp} data-parallel ranks); raise "
            "data.val_fraction or lower train.micro_batch_size"
        )
    return train_iter, val_data


def build_logger(cfg: DictConfig, run_dir: Path, client: dict[str, Any] | None, rank: int) -> RunLogger | NullRunLogger:
    """The run's logger (``logger`` config group) on rank 0, a no-op elsewhere; a resumed run continues
    the W&B run its checkpoint names. A sweep's job is named after its swept values."""
    job_of_sweep = sweep_job()
    settings = WandbSettings(
        **{
            **OmegaConf.to_container(cfg.logger, resolve=True),
            "group": cfg.logger.group or cfg.experiment,  # W&B groups a sweep's runs for comparison
            "name": cfg.logger.name or (job_of_sweep[1] if job_of_sweep else None),
        }
    )
    return make_run_logger(
        run_dir,
        settings,
        config=OmegaConf.to_container(cfg, resolve=True),
        resume_id=client.get("wandb_run_id") if client else None,
        rank=rank,
    )
