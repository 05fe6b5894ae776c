"""MoEMetricsTracker: per-step accumulation, checkpoint recomputation counted once, DP and PP reduction."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from moe_parallel import MoEConfig, MoELayer
from moe_parallel.training.metrics import (
    SCALAR_STATS,
    MoEMetricsError,
    MoEMetricsTracker,
    in_backward_pass,
    layer_key,
    split_expert_load,
)
from tests.dist_utils import run_distributed

HIDDEN = 8


def moe_config(**overrides) -> MoEConfig:
    # Large init_std: uneven routing; capacity_factor 1 and no minimum: some tokens are dropped.
    kwargs = dict(hidden_size=HIDDEN, ffn_hidden_size=12, num_experts=4, top_k=2, capacity_factor=1.0,
                  min_capacity=0, init_std=0.5, z_loss_coeff=1e-3)  # fmt: skip
    kwargs.update(overrides)
    return MoEConfig(**kwargs)


class Block(nn.Module):
    """Dense mixing, an MoE FFN and a nonlinearity, optionally under activation checkpointing.

    The GELU after the MoE layer saves its input, so a non-reentrant recomputation (which stops as
    soon as the saved tensors it needs are rebuilt) has to run the MoE forward to its end.
    """

    def __init__(self, layer_number: int, ep_group=None, checkpointing: str | None = None) -> None:
        super().__init__()
        self.mix = nn.Linear(HIDDEN, HIDDEN)
        self.moe = MoELayer(moe_config(), ep_group, layer_number=layer_number)
        self.checkpointing = checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpointing is None:
            return x + self._body(x)
        return x + checkpoint(self._body, x, use_reentrant=self.checkpointing == "reentrant")

    def _body(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(self.moe(self.mix(x)))


def make_model(layer_numbers, ep_group=None, checkpointing=None, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(*[Block(n, ep_group, checkpointing) for n in layer_numbers])


def micro_batches(count: int, seed: int, tokens: int = 12) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, tokens // 2, HIDDEN, generator=g) for _ in range(count)]


def train_step(model: nn.Module, batches: list[torch.Tensor], probe: list | None = None) -> None:
    """Forward + backward per micro-batch; ``probe`` collects every layer's stats after each forward."""
    for x in batches:
        out = model(x.requires_grad_(True))
        if probe is not None:
            probe.append({m.layer_number: m.last_stats for m in model.modules() if isinstance(m, MoELayer)})
        out.square().mean().backward()


def expected_metrics(per_micro_batch: list[dict]) -> dict:
    """The reduction, written out naively from raw per-micro-batch stats (any ranks, pooled)."""
    out = {}
    for number in sorted({n for mb in per_micro_batch for n in mb}):
        stats = [mb[number] for mb in per_micro_batch if number in mb]
        for name in SCALAR_STATS:
            out[layer_key(number, name)] = sum(float(getattr(s, name)) for s in stats) / len(stats)
        tokens = sum(s.tokens_per_expert.numpy().astype(np.int64) for s in stats)
        out[layer_key(number, "tokens_per_expert")] = tokens
        out[layer_key(number, "num_tokens")] = float(sum(s.num_tokens for s in stats))
        out[layer_key(number, "max_load_ratio")] = tokens.max() / tokens.mean()
        out[layer_key(number, "min_load_ratio")] = tokens.min() / tokens.mean()
    return out


def assert_metrics_equal(actual: dict, expected: dict) -> None:
    for key, value in expected.items():
        assert key in actual, f"{key} missing from {sorted(actual)}"
        if isinstance(value, np.ndarray):
            assert isinstance(actual[key], np.ndarray) and actual[key].dtype == np.int64, key
            np.testing.assert_array_equal(actual[key], value, err_msg=key)
        else:
            assert actual[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


# ---------------------------------------------------------------- one process


def test_step_reduction_single_process():
    model = make_model([2, 5])
    tracker = MoEMetricsTracker(model)
    probe: list = []
    train_step(model, micro_batches(3, seed=1), probe)
    assert tracker.layer_numbers == [2, 5] and tracker.micro_batches(2) == 3

    metrics = tracker.reduce()
    expected = expected_metrics(probe)
    assert_metrics_equal(metrics, expected)
    assert metrics[layer_key(2, "tokens_per_expert")].sum() == 3 * 12 * 2  # T * K per micro-batch
    assert any(metrics[layer_key(n, "dropped_fraction")] > 0 for n in (2, 5))  # the config drops tokens
    for name in SCALAR_STATS:  # across-layer means, one line per run in W&B
        assert metrics[f"moe/{name}"] == pytest.approx(
            (expected[layer_key(2, name)] + expected[layer_key(5, name)]) / 2
        )
    assert metrics["moe/max_load_ratio"] == pytest.approx(
        max(expected[layer_key(2, "max_load_ratio")], expected[layer_key(5, "max_load_ratio")])
    )
    # reduce() starts the next step from zero; a step without forwards has nothing to report.
    assert tracker.micro_batches(2) == 0 and tracker.reduce() == {}

    scalars, loads = split_expert_load(metrics)
    assert sorted(loads) == [2, 5] and all(isinstance(v, float) for v in scalars.values())
    np.testing.assert_array_equal(loads[5], metrics[layer_key(5, "tokens_per_expert")])


def test_eval_forwards_are_not_mixed_into_the_step():
    model = make_model([1])
    tracker = MoEMetricsTracker(model)
    train_step(model, micro_batches(2, seed=2))
    model.eval()
    with torch.no_grad():
        model(torch.randn(4, HIDDEN))
    model.train()
    assert tracker.micro_batches(1) == 2


@pytest.mark.parametrize("checkpointing", ["non_reentrant", "reentrant"])
def test_checkpoint_recomputation_counted_once(checkpointing):
    plain = make_model([0, 3], seed=7)
    ckpt = make_model([0, 3], checkpointing=checkpointing, seed=7)
    forwards = []
    for module in ckpt.modules():
        if isinstance(module, MoELayer):
            module.register_forward_hook(lambda *_: forwards.append(in_backward_pass()))
    tracker_plain, tracker_ckpt = MoEMetricsTracker(plain), MoEMetricsTracker(ckpt)
    batches = micro_batches(3, seed=3)
    train_step(plain, [x.clone() for x in batches])
    train_step(ckpt, [x.clone() for x in batches])

    # The layer really ran twice per micro-batch (the second time inside backward), yet counts once.
    assert forwards.count(False) == 2 * 3 and forwards.count(True) == 2 * 3
    assert tracker_ckpt.micro_batches(0) == tracker_ckpt.micro_batches(3) == 3
    assert_metrics_equal(tracker_ckpt.reduce(), tracker_plain.reduce())


def test_explicit_record_mode():
    model = make_model([4])
    hooked, explicit = MoEMetricsTracker(model), MoEMetricsTracker(model, hooks=False)
    for x in micro_batches(2, seed=4):
        model(x).sum().backward()
        explicit.record()
    assert_metrics_equal(explicit.reduce(), hooked.reduce())
    with pytest.raises(RuntimeError, match="hooks=False"):
        hooked.record()
    hooked.detach()
    model(torch.randn(3, HIDDEN))
    assert hooked.micro_batches(4) == 0


def test_duplicate_layer_numbers_are_refused():
    with pytest.raises(MoEMetricsError, match="layer_number=1"):
        MoEMetricsTracker(make_model([1, 1]))


def test_model_without_moe_layers():
    tracker = MoEMetricsTracker(nn.Linear(HIDDEN, HIDDEN))
    assert tracker.layer_numbers == [] and tracker.reduce() == {}


# ---------------------------------------------------------------- 2 gloo processes


def _gather_probe(probe: list) -> list:
    """Every rank's per-micro-batch stats, pooled (the naive expectation reduces over all of them)."""
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, probe)
    return [mb for rank_probe in gathered for mb in rank_probe]


def _data_parallel(rank: int, world_size: int) -> None:
    from moe_parallel.integration.parallel import initialize_parallel

    state = initialize_parallel(expert_parallel_size=2)  # DP = EP = 2: experts split over both ranks
    model = make_model([1, 6], state.ep_group)
    tracker = MoEMetricsTracker(model)
    probe: list = []
    # Different data and token counts per rank; the same number of micro-batches (EP needs it).
    train_step(model, micro_batches(2, seed=10 + rank, tokens=8 + 8 * rank), probe)
    metrics = tracker.reduce(state)
    assert_metrics_equal(metrics, expected_metrics(_gather_probe(probe)))
    assert metrics[layer_key(1, "num_tokens")] == 2 * 8 + 2 * 16


def _pipeline_stages(rank: int, world_size: int) -> None:
    from moe_parallel.integration.parallel import initialize_parallel

    state = initialize_parallel(pipeline_parallel_size=2)  # 2 stages, DP = 1
    layouts = {
        "different layers per stage": {0: [1], 1: [2, 4]},
        "stage 0 holds no MoE layer": {0: [], 1: [3]},
    }
    for case, layout in layouts.items():
        numbers = layout[state.stage_id]
        model = nn.Sequential(nn.Linear(HIDDEN, HIDDEN), *make_model(numbers, seed=state.stage_id))
        tracker = MoEMetricsTracker(model)
        probe: list = []
        train_step(model, micro_batches(2, seed=20 + rank), probe)
        metrics = tracker.reduce(state)
        every_layer = sorted(layout[0] + layout[1])
        assert sorted({int(k.split("/")[1][6:]) for k in metrics if k.startswith("moe/layer_")}) == every_layer, case
        assert_metrics_equal(metrics, expected_metrics(_gather_probe(probe)))
        assert metrics["moe/balance_loss"] == pytest.approx(
            math.fsum(metrics[layer_key(n, "balance_loss")] for n in every_layer) / len(every_layer)
        )


def test_data_parallel_reduction_two_ranks():
    run_distributed(_data_parallel, 2)


def test_pipeline_stages_gathered_on_every_rank():
    run_distributed(_pipeline_stages, 2)
