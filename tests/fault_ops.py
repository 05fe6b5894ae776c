"""The operations the crash sweeps kill (run in a child by :mod:`tests.crash_points`), and the
state they start from. Each arms the kill counter just before the part under test."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import torch

from tests import crash_points

TOOL = "launch.checkpoint_tool"


def _engine():
    """A one-process DeepSpeed engine over the toy MoE model (gloo, world 1)."""
    import torch.distributed as dist

    from launch.env import free_port
    from moe_parallel.integration.engine import build_engine
    from moe_parallel.integration.parallel import initialize_parallel
    from tests.toy_models import DS_CONFIG, E, ToyMoELM

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=0, world_size=1, timeout=timedelta(seconds=60))
    state = initialize_parallel(expert_parallel_size=1, num_experts=E)
    engine, _, _ = build_engine(ToyMoELM(ep_group=state.ep_group), {**DS_CONFIG, "zero_optimization": {"stage": 1}})
    return engine


def _train_step(engine, step: int) -> None:
    from tests.toy_models import VOCAB, loss_fn

    tokens = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(step))
    engine.backward(loss_fn(engine, tokens))
    engine.step()


def save_and_rotate(checkpoints_dir: str, armed_save: int) -> None:
    """Train and save steps 1..armed_save with rotation (keep 1), as the trainer does; the last save
    and its rotation are armed. From step 3 on, rotation deletes the checkpoint two saves back."""
    from moe_parallel.checkpoints.checkpoint import rotate_checkpoints, save_checkpoint

    engine = _engine()
    parent = None
    for step in range(1, armed_save + 1):
        _train_step(engine, step)
        if step == armed_save:
            crash_points.arm()
        parent = save_checkpoint(
            engine, checkpoints_dir, client_state={"step": step}, parent=parent, trained_cleanly=True
        )
        rotate_checkpoints(checkpoints_dir, keep=1)


def tool(*argv: str) -> None:
    """``python -m launch.checkpoint_tool <argv>``, armed from its first file operation."""
    from launch.checkpoint_tool import main

    crash_points.arm()
    code = main(list(argv))
    if code != 0:
        raise SystemExit(f"checkpoint_tool {' '.join(argv)} exited {code}")


def toy_checkpoints(checkpoints_dir: str, steps: int) -> None:
    """Unarmed: a checkpoints folder with ``steps`` saves (rotation keeps them all)."""
    from moe_parallel.checkpoints.checkpoint import save_checkpoint

    engine = _engine()
    for step in range(1, steps + 1):
        _train_step(engine, step)
        save_checkpoint(engine, checkpoints_dir, client_state={"step": step})


def exported_state(path: str | Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)
