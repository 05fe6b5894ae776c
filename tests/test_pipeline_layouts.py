"""The MoE-GPT trained under DeepSpeed at several (PP, EP, DP) layouts follows one loss curve, and a
checkpoint saved at one layout loads at another with the same outputs.

Every layout sees the same micro-batches per step (DP x grad-accum = 2 micro-batches of 2 sequences),
so routing, capacity and aux losses are computed on identical token sets and fp32 trajectories
agree to float rounding.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from moe_parallel.checkpoints.checkpoint import load_checkpoint, save_checkpoint
from moe_parallel.integration.engine import build_engine
from moe_parallel.integration.parallel import initialize_parallel
from moe_parallel.integration.pipeline import gpt_pipeline
from moe_parallel.models import GPT, GPTConfig, lm_loss
from tests.dist_utils import run_distributed

STEPS, MICRO, MICRO_BATCHES = 8, 2, 2
CONFIG = dict(
    vocab_size=64,
    seq_len=16,
    num_layers=4,
    hidden_size=32,
    num_heads=2,
    ffn_hidden_size=64,
    moe_every=2,
    tie_embeddings=True,
    moe=dict(num_experts=4, top_k=2, capacity_factor=1.0, min_capacity=1, z_loss_coeff=1e-3),
)


def micro_batch(step: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Arithmetic sequences (random start and stride): learnable within a few steps."""
    gen = torch.Generator().manual_seed(100 * step + index)
    start = torch.randint(0, CONFIG["vocab_size"], (MICRO, 1), generator=gen)
    stride = torch.randint(1, 4, (MICRO, 1), generator=gen)
    tokens = (start + stride * torch.arange(CONFIG["seq_len"] + 1)) % CONFIG["vocab_size"]
    return tokens[:, :-1], tokens[:, 1:]


def build(pp: int, ep: int):
    state = initialize_parallel(pipeline_parallel_size=pp, expert_parallel_size=ep, num_experts=4)
    cfg = GPTConfig(**CONFIG)
    dp = state.layout.data_parallel_size
    if pp == 1:
        model = GPT(cfg, ep_group=state.ep_group)
    else:
        model = gpt_pipeline(cfg, ep_group=state.ep_group, topology=state.deepspeed_topology())
    ds = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": MICRO_BATCHES // dp,
        "steps_per_print": 10**9,
        "zero_optimization": {"stage": 1},
    }
    engine, _, _ = build_engine(model, ds, lr=3e-3, weight_decay=0.0)
    return engine, state


def train_step(engine, state, step: int, pp: int) -> float:
    dp, dp_rank = state.layout.data_parallel_size, state.dp_rank
    mine = [micro_batch(step, k * dp + dp_rank) for k in range(MICRO_BATCHES // dp)]
    if pp > 1:
        return float(engine.train_batch(data_iter=iter(mine)))
    total = 0.0
    for tokens, targets in mine:
        loss = lm_loss(engine(tokens), targets)
        engine.backward(loss)
        engine.step()
        total += loss.item()
    mean = torch.tensor([total / len(mine)])
    dist.all_reduce(mean, group=state.dp_group)
    return mean.item() / dp


def eval_loss(engine, pp: int) -> float:
    tokens, targets = micro_batch(999, 0)
    if pp > 1:
        return float(engine.eval_batch(iter([(tokens, targets)] * engine.micro_batches)))
    engine.module.eval()
    with torch.no_grad():
        loss = lm_loss(engine(tokens), targets).item()
    engine.module.train()
    return loss


def _train_layout(rank, world, pp, ep, out_dir, save_to, load_from):
    engine, state = build(pp, ep)
    result = {}
    if load_from:
        load_checkpoint(engine, load_from)
        result["loaded_eval"] = eval_loss(engine, pp)
    else:
        result["losses"] = [train_step(engine, state, s, pp) for s in range(STEPS)]
        result["eval"] = eval_loss(engine, pp)
    if save_to:
        save_checkpoint(engine, save_to)
    if rank == 0:
        Path(out_dir, f"pp{pp}_ep{ep}_w{world}.json").write_text(json.dumps(result))


LAYOUTS = [(1, 1, 1), (1, 2, 2), (2, 1, 2), (2, 2, 4)]  # (PP, EP, world): DP = world / PP


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("layouts")
    for pp, ep, world in LAYOUTS:
        save = str(out / "ckpt") if (pp, ep, world) == (2, 2, 4) else None
        run_distributed(_train_layout, world, pp, ep, str(out), save, None, timeout=400)
    return out


def _result(out: Path, pp: int, ep: int, world: int) -> dict:
    return json.loads((out / f"pp{pp}_ep{ep}_w{world}.json").read_text())


def test_loss_trajectory_is_the_same_at_every_layout(trained):
    reference = _result(trained, *LAYOUTS[0])
    assert reference["losses"][-1] < reference["losses"][0]
    for layout in LAYOUTS[1:]:
        got = _result(trained, *layout)
        torch.testing.assert_close(
            torch.tensor(got["losses"]),
            torch.tensor(reference["losses"]),
            rtol=1e-4,
            atol=1e-5,
            msg=f"(PP, EP, world) = {layout}",
        )
        assert got["eval"] == pytest.approx(reference["eval"], rel=1e-4)


@pytest.mark.parametrize(
    "pp,ep,world",
    # make test: one process, every axis changed; make test-slow: the other layouts too
    [(1, 1, 1), pytest.param(1, 2, 2, marks=pytest.mark.slow), pytest.param(2, 1, 2, marks=pytest.mark.slow)],
)
def test_checkpoint_from_pp2_ep2_loads_at_other_layouts(trained, pp, ep, world):
    run_distributed(_train_layout, world, pp, ep, str(trained), None, str(trained / "ckpt"), timeout=300)
    saved = _result(trained, 2, 2, 4)["eval"]
    assert _result(trained, pp, ep, world)["loaded_eval"] == pytest.approx(saved, rel=1e-5)


def _stage_without_moe_under_zero1(rank: int, world_size: int) -> None:
    from moe_parallel.integration.engine import DeepSpeedConfigError

    state = initialize_parallel(pipeline_parallel_size=2, expert_parallel_size=1, num_experts=4)
    cfg = GPTConfig(**{**CONFIG, "moe_every": 4})  # only block 3 is MoE: stage 0 holds none
    model = gpt_pipeline(cfg, ep_group=state.ep_group, topology=state.deepspeed_topology())
    ds = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1, "steps_per_print": 10**9}
    with pytest.raises(DeepSpeedConfigError, match=r"zero_optimization.stage=1 .*stage=0"):
        build_engine(model, {**ds, "zero_optimization": {"stage": 1}}, lr=1e-3)
    # bf16 at ZeRO 0 runs DeepSpeed's BF16_Optimizer in a pipeline: partitioned per group, the same hang
    with pytest.raises(DeepSpeedConfigError, match=r"zero_optimization.stage=0 with bf16 .*in fp32"):
        build_engine(model, {**ds, "zero_optimization": {"stage": 0}, "bf16": {"enabled": True}}, lr=1e-3)
    engine, _, _ = build_engine(model, {**ds, "zero_optimization": {"stage": 0}}, lr=1e-3)  # this one trains
    assert engine.train_batch(data_iter=iter([micro_batch(0, 0)])).isfinite()


def test_zero_refuses_a_stage_without_moe_layers_instead_of_hanging():
    """DeepSpeed's ZeRO 1/2 (and bf16 ZeRO 0) gradient norm makes one collective per optimizer param
    group: a stage with no MoE layer (fewer groups) would hang the job. build_engine refuses it on
    every rank."""
    run_distributed(_stage_without_moe_under_zero1, 2)
