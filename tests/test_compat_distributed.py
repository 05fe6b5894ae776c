"""moe_parallel.compat.MoE under plain ``deepspeed.initialize`` on two processes (gloo, 127.0.0.1).

The scenarios of DeepSpeed's own MoE unit tests: a SimpleMoEModel-like network (two MoE layers, the
second with PR-MoE's ``use_residual``) trains under ZeRO 0/1/2 at EP 1 and 2 exactly as one process
trains the same global batch (so EP=2 equals EP=1), with module-copy and stacked experts; engine
checkpoints resume exactly; a checkpoint written with DeepSpeed's own MoE layer resumes with ours;
and an engine checkpoint loads at another EP size.
"""

from __future__ import annotations

import copy
import os
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moe_parallel.experts.modules import ModuleExperts, StackedExperts
from moe_parallel.integration.compat import DS_EXPERTS_PREFIX, MoE, OptimizerLayoutWarning
from tests.compat_doubles import ParallelMLP
from tests.dist_utils import run_distributed

WORLD_SIZE = 2
STEPS = 5
LR = 1e-2
HIDDEN, NUM_EXPERTS, TOKENS = 8, 4, 16
SPAWN_TIMEOUT_S = 300


def make_expert(kind: str) -> nn.Module:
    if kind == "two_linears":  # DeepSpeed's SimpleMoEModel expert: stacked experts
        return nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.Linear(HIDDEN, HIDDEN))
    if kind == "parallel_mlp":
        return ParallelMLP(HIDDEN, 12, "gelu")
    return nn.Sequential(nn.Linear(HIDDEN, 12), nn.Tanh(), nn.Linear(12, HIDDEN))  # module copies


class SimpleMoEModel(nn.Module):
    """Linear -> MoE -> MoE (PR-MoE, residual) -> Linear, cross-entropy over HIDDEN classes."""

    def __init__(self, moe_cls: type, kind: str, ep_size: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(HIDDEN, HIDDEN)
        kwargs = dict(num_experts=NUM_EXPERTS, ep_size=ep_size, k=2, capacity_factor=1.0, min_capacity=1)
        kwargs["top2_2nd_expert_sampling"] = False  # the same routing on every run without seeding forwards
        self.moe_1 = moe_cls(HIDDEN, make_expert(kind), **kwargs)
        self.moe_2 = moe_cls(HIDDEN, make_expert(kind), use_residual=True, **kwargs)
        self.linear2 = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.linear1(x)
        h, l_aux_1, _ = self.moe_1(h)
        h, l_aux_2, _ = self.moe_2(h)
        return F.cross_entropy(self.linear2(h), y) + 0.01 * (l_aux_1 + l_aux_2)


def rank_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + rank)
    return torch.randn(TOKENS, HIDDEN, generator=gen), torch.randint(0, HIDDEN, (TOKENS,), generator=gen)


def global_state(model: nn.Module, ep_rank: int, num_local: int) -> dict[str, torch.Tensor]:
    """The model's state dict with local expert ids turned into global ones."""
    out = {}
    for key, value in model.state_dict().items():
        if DS_EXPERTS_PREFIX + "." in key:
            head, rest = key.split(DS_EXPERTS_PREFIX + ".")
            local, tail = rest.split(".", 1)
            key = f"{head}{DS_EXPERTS_PREFIX}.{ep_rank * num_local + int(local)}.{tail}"
        out[key] = value
    return out


def quiet_deepspeed() -> None:
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    warnings.simplefilter("ignore", OptimizerLayoutWarning)


@pytest.fixture(scope="module")
def deepspeed_cpu_ops() -> None:
    """Build (or load from the cache) DeepSpeed's CPU shared-memory comm op once, here, instead of
    inside both ranks under the spawn timeout: on a fresh machine its JIT build takes a minute."""
    from deepspeed.comm.torch import build_shm_op

    build_shm_op()


def ds_config(zero_stage: int) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        # torch's Adam: DeepSpeed's CPU Adam would need its C++ op compiled first.
        "optimizer": {"type": "Adam", "params": {"lr": LR, "torch_adam": True, "adam_w_mode": False}},
        "zero_optimization": {"stage": zero_stage},
        "gradient_clipping": 0.0,  # DeepSpeed's default is 1.0; the single-process reference does not clip
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
        "steps_per_print": 10_000,
    }


def _train(rank: int, world_size: int, zero_stage: int, ep_size: int, kind: str, ckpt_dir: str) -> dict:
    import deepspeed

    quiet_deepspeed()
    torch.manual_seed(0)
    model = SimpleMoEModel(MoE, kind, ep_size)
    expected_experts = StackedExperts if kind != "tanh" else ModuleExperts
    assert isinstance(model.moe_1.experts, expected_experts)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=ds_config(zero_stage)
    )
    assert engine.has_moe_layers and engine.num_experts == [NUM_EXPERTS, NUM_EXPERTS]
    layer = model.moe_1
    assert torch.distributed.get_world_size(layer.ep_group) == ep_size
    if zero_stage > 0:
        assert any(engine.optimizer.is_moe_param_group)

    x, y = rank_batch(rank)
    losses = []
    for _ in range(STEPS):
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())

    # The same training in one process at ep_size=1: both ranks' batches, mean loss.
    torch.manual_seed(0)
    reference = SimpleMoEModel(MoE, kind, 1)
    optimizer = torch.optim.Adam(reference.parameters(), lr=LR)
    for _ in range(STEPS):
        optimizer.zero_grad()
        (sum(reference(*rank_batch(r)) for r in range(world_size)) / world_size).backward()
        optimizer.step()
    ep_rank = torch.distributed.get_rank(layer.ep_group)
    ours = global_state(model, ep_rank, layer.num_local_experts)
    expected = reference.state_dict()
    for key, value in ours.items():
        torch.testing.assert_close(value, expected[key], rtol=1e-4, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")

    # Engine checkpoints: one file per global expert; a fresh engine resumes exactly.
    engine.save_checkpoint(ckpt_dir, tag="t")
    expert_files = sorted(f for f in os.listdir(os.path.join(ckpt_dir, "t")) if "_expert_" in f)
    torch.manual_seed(1)  # different initial weights
    fresh = SimpleMoEModel(MoE, kind, ep_size)
    fresh_engine, _, _, _ = deepspeed.initialize(
        model=fresh, model_parameters=fresh.parameters(), config=ds_config(zero_stage)
    )
    fresh_engine.load_checkpoint(ckpt_dir, tag="t")
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key
    for eng in (engine, fresh_engine):
        loss = eng(x, y)
        eng.backward(loss)
        eng.step()
    for key, value in fresh.state_dict().items():
        torch.testing.assert_close(value, model.state_dict()[key], rtol=1e-6, atol=1e-7, msg=key)
    return {"losses": losses, "expert_files": expert_files}


@pytest.mark.timeout(SPAWN_TIMEOUT_S + 30)
@pytest.mark.parametrize(
    "zero_stage, ep_size, kind",
    [
        (0, 2, "tanh"),
        (2, 2, "tanh"),
        (1, 2, "parallel_mlp"),
        pytest.param(2, 2, "two_linears", marks=pytest.mark.slow),  # stacked experts, as parallel_mlp
    ],
)
def test_simple_moe_model_trains_like_one_process(zero_stage, ep_size, kind, tmp_path, deepspeed_cpu_ops) -> None:
    results = run_distributed(
        _train, WORLD_SIZE, zero_stage, ep_size, kind, str(tmp_path), timeout=SPAWN_TIMEOUT_S, init="deepspeed"
    )
    for result in results:
        assert result["losses"][-1] < result["losses"][0], result["losses"]
    expected = sorted(f"layer_{i}_expert_{e}_mp_rank_00_model_states.pt" for i in (0, 1) for e in range(NUM_EXPERTS))
    assert results[0]["expert_files"] == expected


def _resume_deepspeed_checkpoint(rank: int, world_size: int, kind: str, ckpt_dir: str) -> None:
    """Train with DeepSpeed's own MoE layer, save; resume with ours (same ep) and at another ep size."""
    import deepspeed
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    quiet_deepspeed()
    config = ds_config(1)
    torch.manual_seed(0)
    theirs = SimpleMoEModel(DeepSpeedMoE, kind, 2)
    engine, _, _, _ = deepspeed.initialize(model=theirs, model_parameters=theirs.parameters(), config=config)
    x, y = rank_batch(rank)
    for _ in range(2):
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
    engine.save_checkpoint(ckpt_dir, tag="ds")

    torch.manual_seed(1)
    ours = SimpleMoEModel(MoE, kind, 2)
    ours_engine, _, _, _ = deepspeed.initialize(model=ours, model_parameters=ours.parameters(), config=config)
    module_copies = isinstance(ours.moe_1.experts, ModuleExperts)
    # Module copies have DeepSpeed's parameter layout: the optimizer state resumes too. Stacked experts
    # take the weights (load_module_only, as the layout warning says).
    ours_engine.load_checkpoint(ckpt_dir, tag="ds", load_module_only=not module_copies)
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    ep_rank = torch.distributed.get_rank(ours.moe_1.ep_group)
    written = {k: v.clone() for k, v in global_state(ours, ep_rank, ours.moe_1.num_local_experts).items()}
    if module_copies:  # exact resume: the next step is the same
        for eng in (engine, ours_engine):
            loss = eng(x, y)
            eng.backward(loss)
            eng.step()
        for key, value in theirs.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[key], value, rtol=1e-6, atol=1e-7, msg=key)

    # Another EP size: DeepSpeed's per-expert files are read by global id; the weights fit.
    torch.manual_seed(2)
    other = SimpleMoEModel(MoE, kind, 1)
    other_engine, _, _, _ = deepspeed.initialize(model=other, model_parameters=other.parameters(), config=config)
    other_engine.load_checkpoint(ckpt_dir, tag="ds", load_module_only=True)
    # This rank holds all four experts now; the two it did not write come from the other rank's files.
    gathered: list[dict[str, torch.Tensor]] = [{}, {}]
    torch.distributed.all_gather_object(gathered, written)
    everything = gathered[0] | gathered[1]
    assert sorted(other.state_dict()) == sorted(everything)
    for key, value in other.state_dict().items():
        assert torch.equal(value, everything[key]), key


@pytest.mark.timeout(SPAWN_TIMEOUT_S + 30)
@pytest.mark.parametrize("kind", ["tanh", "parallel_mlp"])
def test_deepspeed_layer_checkpoint_resumes_with_ours(kind: str, tmp_path, deepspeed_cpu_ops) -> None:
    run_distributed(
        _resume_deepspeed_checkpoint, WORLD_SIZE, kind, str(tmp_path), timeout=SPAWN_TIMEOUT_S, init="deepspeed"
    )


def _forward_without_engine(rank: int, world_size: int, kind: str) -> None:
    from deepspeed.utils import groups

    quiet_deepspeed()
    torch.manual_seed(0)
    expert = make_expert(kind)
    kwargs: dict[str, Any] = dict(num_experts=NUM_EXPERTS, k=2, drop_tokens=False, top2_2nd_expert_sampling=False)
    layer = MoE(HIDDEN, copy.deepcopy(expert), ep_size=world_size, **kwargs)
    reference = MoE(HIDDEN, copy.deepcopy(expert), ep_size=1, **kwargs)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # every expert its own weights, the same on both ranks
        for param in reference.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=gen))
    first, local = rank * layer.num_local_experts, layer.num_local_experts
    weights = {}
    for key, value in reference.state_dict().items():
        if DS_EXPERTS_PREFIX + "." in key:
            global_id, rest = key.split(DS_EXPERTS_PREFIX + ".")[1].split(".", 1)
            if first <= int(global_id) < first + local:
                weights[f"{DS_EXPERTS_PREFIX}.{int(global_id) - first}.{rest}"] = value
        else:
            weights[key] = value
    layer.load_state_dict(weights)

    # Uneven token counts over the ranks: dropless routing exchanges split sizes.
    x = torch.randn(5 + 3 * rank, HIDDEN, generator=torch.Generator().manual_seed(rank))
    x_ep, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, l_aux, counts = layer(x_ep)  # the first forward creates DeepSpeed's groups (a collective)
    assert layer.ep_group is groups._get_expert_parallel_group("ep_size_2")
    expected_out, expected_aux, expected_counts = reference(x_ref)
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(l_aux, expected_aux)
    assert torch.equal(counts, expected_counts)
    (out.square().sum() + l_aux).backward()
    (expected_out.square().sum() + expected_aux).backward()
    torch.testing.assert_close(x_ep.grad, x_ref.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.timeout(SPAWN_TIMEOUT_S + 30)
def test_ep2_without_engine_matches_one_process(deepspeed_cpu_ops) -> None:
    """Outside deepspeed.initialize, with only torch.distributed set up: groups are created at the
    first forward, and EP=2 (module-copy experts, ragged all-to-all) gives each rank what one process
    computes with all experts."""
    run_distributed(_forward_without_engine, WORLD_SIZE, "tanh", timeout=SPAWN_TIMEOUT_S)
