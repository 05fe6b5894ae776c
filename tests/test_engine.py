"""DeepSpeed engine with our MoE layers: gradients and losses equal a single-process reference.

World size 2 (DP=2). Each rank gets one micro-batch of the same global batch; the reference runs
both micro-batches in one process (gradient accumulation 2, plain autograd, no DeepSpeed). At EP=1
and EP=2, with ZeRO 0, 1 and 2, every reduced gradient (expert gradients gathered by global id)
and the next losses equal the reference: DeepSpeed reduces expert gradients over expert-DP with the
right scale and replicated ones over DP.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from moe_parallel.integration.engine import DeepSpeedConfigError, build_engine, validate_deepspeed_config
from moe_parallel.integration.parallel import initialize_parallel
from tests.dist_utils import run_distributed
from tests.toy_models import VOCAB, E, ToyMoELM, loss_fn


def batches(steps, world):
    gen = torch.Generator().manual_seed(5)
    return [[torch.randint(0, VOCAB, (2, 9), generator=gen) for _ in range(world)] for _ in range(steps)]


def reference(steps, world, lr):
    """Single process, no DeepSpeed: each step accumulates the world's micro-batches."""
    model = ToyMoELM().train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    first_grads, losses = None, []
    for micro in batches(steps, world):
        opt.zero_grad()
        loss = 0.0
        for tokens in micro:
            # attach_aux_loss gives the aux loss a gradient of 1/world, like the main loss.
            from moe_parallel import set_aux_loss_grad_scale

            set_aux_loss_grad_scale(1.0 / world)
            step_loss = loss_fn(model, tokens) / world
            step_loss.backward()
            loss += step_loss.item()
        if first_grads is None:
            first_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        losses.append(loss)
        opt.step()
    return first_grads, losses


def full_grad(engine_param, param_name, model, state):
    from deepspeed.utils import safe_get_full_grad

    grad = safe_get_full_grad(engine_param)
    if param_name.startswith("moe.experts.") and state.layout.expert_parallel_size > 1:
        parts = [torch.empty_like(grad) for _ in range(state.layout.expert_parallel_size)]
        dist.all_gather(parts, grad.contiguous(), group=state.ep_group)
        grad = torch.cat(parts)
    return grad


def _engine_matches_reference(rank, world, zero_stage, ep):
    steps, lr = 4, 1e-2
    ref_grads, ref_losses = reference(steps, world, lr)
    state = initialize_parallel(expert_parallel_size=ep, num_experts=E)
    model = ToyMoELM(ep_group=state.ep_group)
    ds_config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": zero_stage},
        "steps_per_print": 10**9,
    }
    engine, _, _ = build_engine(model, ds_config, lr=lr, weight_decay=0.0)
    losses = []
    for step, micro in enumerate(batches(steps, world)):
        loss = loss_fn(engine, micro[rank])
        engine.backward(loss)
        if step == 0:
            for name, param in engine.module.named_parameters():
                torch.testing.assert_close(
                    full_grad(param, name, model, state), ref_grads[name], rtol=1e-5, atol=1e-6, msg=name
                )
        engine.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "ep, zero_stage",
    # make test: each ZeRO stage and each EP size once; the other pairs in make test-slow
    [(1, 0), (2, 1), (1, 2), *(pytest.param(*pair, marks=pytest.mark.slow) for pair in [(1, 1), (2, 0), (2, 2)])],
)
def test_engine_gradients_and_losses_equal_single_process(ep, zero_stage):
    run_distributed(_engine_matches_reference, 2, zero_stage, ep, timeout=300)


def test_zero3_and_fp16_are_refused_with_the_fix():
    model = ToyMoELM()
    with pytest.raises(DeepSpeedConfigError, match="stage=3 .* use stage 1 or 2"):
        validate_deepspeed_config({"zero_optimization": {"stage": 3}}, model)
    with pytest.raises(DeepSpeedConfigError, match="fp16.enabled=true .* use bf16"):
        validate_deepspeed_config({"fp16": {"enabled": True}}, model)
    with pytest.raises(DeepSpeedConfigError, match="train_micro_batch_size_per_gpu=0"):
        validate_deepspeed_config({"train_micro_batch_size_per_gpu": 0}, model)


def test_fused_adam_from_apex_when_a_cuda_build_is_importable(monkeypatch):
    """The torch fallback runs here; a CUDA machine with NVIDIA Apex gets its FusedAdam."""
    import sys
    import types

    from moe_parallel.integration.engine import make_optimizer

    params = [{"params": [torch.nn.Parameter(torch.zeros(2))]}]
    assert type(make_optimizer(params, lr=1e-3)) is torch.optim.AdamW

    class FusedAdam:
        def __init__(self, groups, **kwargs):
            self.kwargs = kwargs

    fake_apex = types.ModuleType("apex")
    fake_apex.optimizers = types.ModuleType("apex.optimizers")
    fake_apex.optimizers.FusedAdam = FusedAdam
    monkeypatch.setitem(sys.modules, "apex", fake_apex)
    monkeypatch.setitem(sys.modules, "apex.optimizers", fake_apex.optimizers)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    fused = make_optimizer(params, lr=1e-3)
    assert isinstance(fused, FusedAdam) and fused.kwargs["adam_w_mode"] is True


def test_pipeline_partition_key_is_gone_so_an_override_cannot_be_silently_ignored():
    """The pipeline partition is fixed by moe_parallel.integration.pipeline.pipeline_parts (and checked against
    DeepSpeed's in gpt_pipeline); no config key sets it, so overriding one fails."""
    from hydra.errors import ConfigCompositionException

    from launch import config as app_config

    assert "pipeline_partition" not in app_config.compose().deepspeed
    with pytest.raises(ConfigCompositionException, match="pipeline_partition"):
        app_config.compose("deepspeed.pipeline_partition=parameters")


def test_module_copy_experts_are_refused_by_build_engine_with_the_fix():
    from torch import nn

    from moe_parallel.integration.compat import MoE
    from moe_parallel.integration.engine import DeepSpeedConfigError, validate_deepspeed_config

    expert = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
    model = nn.Sequential(nn.Linear(8, 8), MoE(8, expert, num_experts=2))
    with pytest.raises(DeepSpeedConfigError, match="module-copy experts.*deepspeed.initialize"):
        validate_deepspeed_config({"zero_optimization": {"stage": 1}}, model)
    stacked = nn.Sequential(nn.Linear(8, 8), MoE(8, nn.Linear(8, 8), num_experts=2))
    validate_deepspeed_config({"zero_optimization": {"stage": 1}}, stacked)
