"""moe_parallel.compat.MoE as a drop-in for deepspeed.moe.layer.MoE.

Single process: interface and numerical parity with DeepSpeed's own layer, expert conversion against a
naive per-token computation with the user's original expert module (fp64), argument errors.
Two processes (gloo on 127.0.0.1): ``deepspeed.initialize`` with ZeRO 0/1/2 and ep_size 1/2 recognises
the layer, trains it exactly as one process trains the same global batch, and round-trips checkpoints.
"""

from __future__ import annotations

import copy
import inspect
import multiprocessing as mp
import os
import queue
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from deepspeed.moe.layer import MoE as DeepSpeedMoE
from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer
from torch import nn

from launch.env import free_port
from moe_parallel.compat import DS_EXPERTS_PREFIX, DS_GATE_KEY, MoE, MoECompatError, UnsupportedExpertError

HIDDEN, FFN, NUM_EXPERTS = 8, 16, 4


def make_expert(activation: nn.Module | None = None, bias: bool = True, dtype=torch.float32) -> nn.Sequential:
    act = nn.GELU() if activation is None else activation
    return nn.Sequential(nn.Linear(HIDDEN, FFN, bias=bias), act, nn.Linear(FFN, HIDDEN, bias=bias)).to(dtype)


def perturb_experts(state_dict: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Give every expert slot its own weights (all slots start as copies of one expert)."""
    gen = torch.Generator().manual_seed(seed)
    return {
        key: value + 0.2 * torch.randn(value.shape, generator=gen, dtype=value.dtype)
        if DS_EXPERTS_PREFIX in key
        else value
        for key, value in state_dict.items()
    }


# -- (1) interface and parity with deepspeed.moe.layer.MoE ---------------------------------------------


def test_signature_matches_deepspeed() -> None:
    ours, theirs = inspect.signature(MoE.__init__), inspect.signature(DeepSpeedMoE.__init__)
    assert [(p.name, p.default) for p in ours.parameters.values()] == [
        (p.name, p.default) for p in theirs.parameters.values()
    ]
    ours_fwd, theirs_fwd = inspect.signature(MoE.forward), inspect.signature(DeepSpeedMoE.forward)
    assert [(p.name, p.default) for p in ours_fwd.parameters.values()] == [
        (p.name, p.default) for p in theirs_fwd.parameters.values()
    ]
    assert issubclass(MoE, DeepSpeedMoE)


def test_return_values_like_deepspeed() -> None:
    torch.manual_seed(0)
    layer = MoE(HIDDEN, make_expert(), num_experts=NUM_EXPERTS, k=2, top2_2nd_expert_sampling=False)
    x = torch.randn(3, 5, HIDDEN, requires_grad=True)
    output, l_aux, exp_counts = layer(x)
    assert output.shape == x.shape and output.dtype == x.dtype
    assert l_aux.dim() == 0 and l_aux.dtype == torch.float32 and l_aux.requires_grad
    assert exp_counts.shape == (NUM_EXPERTS,) and exp_counts.dtype == torch.int64
    assert int(exp_counts.sum()) == 15 * 2  # routed (token, choice) pairs, before dropping
    (output.sum() + l_aux).backward()
    assert x.grad is not None and layer.router.weight.grad is not None
    # DeepSpeed's engine reads these from every MoE module.
    assert (layer.num_experts, layer.ep_size, layer.num_local_experts) == (NUM_EXPERTS, 1, NUM_EXPERTS)
    assert layer.expert_group_name == "ep_size_1" and layer.enable_expert_tensor_parallelism is False


@pytest.mark.parametrize(
    "k, training, drop_tokens, use_residual",
    [
        (1, True, True, False),
        (1, False, True, True),
        (1, True, False, False),
        (2, True, True, True),
        (2, False, False, False),
        (3, True, True, False),
        (3, False, False, True),
    ],
)
def test_matches_deepspeed_layer(k: int, training: bool, drop_tokens: bool, use_residual: bool) -> None:
    """Same seed -> the same initial state dict as DeepSpeed's layer; same weights -> the same results."""
    torch.manual_seed(0)
    expert = make_expert(nn.SiLU())
    kwargs: dict[str, Any] = dict(
        num_experts=NUM_EXPERTS,
        k=k,
        capacity_factor=float(NUM_EXPERTS),  # nothing dropped: DeepSpeed's RTS would drop at random
        eval_capacity_factor=float(NUM_EXPERTS),
        drop_tokens=drop_tokens,
        use_residual=use_residual,
        top2_2nd_expert_sampling=False,
    )
    torch.manual_seed(1)
    theirs = DeepSpeedMoE(HIDDEN, copy.deepcopy(expert), **kwargs)
    torch.manual_seed(1)
    ours = MoE(HIDDEN, copy.deepcopy(expert), **kwargs)

    theirs_sd, ours_sd = theirs.state_dict(), ours.state_dict()
    assert sorted(ours_sd) == sorted(theirs_sd)
    for key in theirs_sd:
        torch.testing.assert_close(ours_sd[key], theirs_sd[key], rtol=0, atol=0, msg=key)

    weights = perturb_experts(theirs_sd, seed=2)
    theirs.load_state_dict(weights)
    ours.load_state_dict(weights)
    theirs.train(training)
    ours.train(training)
    x = torch.randn(4, 8, HIDDEN)
    x_theirs, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_theirs, aux_theirs, counts_theirs = theirs(x_theirs)
    out_ours, aux_ours, counts_ours = ours(x_ours)

    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-5, atol=1e-6)
    assert torch.equal(counts_ours, counts_theirs)
    if k != 2:  # for k=2 DeepSpeed's l_aux counts first choices only (documented difference)
        torch.testing.assert_close(aux_ours, aux_theirs, rtol=1e-5, atol=1e-6)
        loss_ours, loss_theirs = (out_ours**2).sum() + aux_ours, (out_theirs**2).sum() + aux_theirs
    else:
        loss_ours, loss_theirs = (out_ours**2).sum(), (out_theirs**2).sum()
    loss_ours.backward()
    loss_theirs.backward()
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours.router.weight.grad, theirs.deepspeed_moe.gate.wg.weight.grad, rtol=1e-4, atol=1e-6)
    fc1_grad_theirs = torch.stack([e[0].weight.grad.t() for e in theirs.deepspeed_moe.experts.deepspeed_experts])
    torch.testing.assert_close(ours.experts.w1.grad, fc1_grad_theirs, rtol=1e-4, atol=1e-6)


def test_state_dict_round_trip_and_errors() -> None:
    torch.manual_seed(0)
    source = MoE(HIDDEN, make_expert(), num_experts=NUM_EXPERTS, ep_size=2)
    weights = perturb_experts(source.state_dict(), seed=3)
    # ep_size=2: two local experts, DeepSpeed's local ids 0 and 1.
    assert {key.split(".")[3] for key in weights if DS_EXPERTS_PREFIX in key} == {"0", "1"}
    assert DS_GATE_KEY in weights
    target = MoE(HIDDEN, make_expert(), num_experts=NUM_EXPERTS, ep_size=2)
    target.load_state_dict(weights)
    for key, value in target.state_dict().items():
        assert torch.equal(value, weights[key]), key
    # The internal names (named_parameters, ZeRO's consolidated weights) load as well.
    internal = {name: p.detach().clone() for name, p in target.named_parameters()}
    again = MoE(HIDDEN, make_expert(), num_experts=NUM_EXPERTS, ep_size=2)
    again.load_state_dict(internal)
    assert torch.equal(again.experts.w2, target.experts.w2)
    # An incomplete DeepSpeed layout is reported key by key, not half-loaded.
    broken = dict(weights)
    broken.pop(f"{DS_EXPERTS_PREFIX}.1.2.bias")
    with pytest.raises(RuntimeError, match="experts.w1"):
        again.load_state_dict(broken)


def test_expert_params_marked_for_deepspeed() -> None:
    layer = MoE(HIDDEN, make_expert(), num_experts=NUM_EXPERTS, ep_size=2, use_residual=True)
    experts = layer.experts
    expert_ids = {id(p) for p in experts.parameters()}
    assert len(expert_ids) == 4  # w1, w2, b1, b2
    for name, param in layer.named_parameters():
        assert is_moe_param(param) == (id(param) in expert_ids), name
        if is_moe_param(param):
            assert param.group_name == "ep_size_2"
    groups = split_params_into_different_moe_groups_for_optimizer({"params": list(layer.parameters()), "name": "dense"})
    moe_groups = [g for g in groups if g.get("moe")]
    assert [g["name"] for g in moe_groups] == ["ep_size_2"]
    assert {id(p) for p in moe_groups[0]["params"]} == expert_ids
    dense = [g for g in groups if not g.get("moe")]
    assert all(not is_moe_param(p) for g in dense for p in g["params"])


# -- (2) expert conversion -----------------------------------------------------------------------------


class FunctionalExpert(nn.Module):
    def __init__(self, act: Callable[[torch.Tensor], torch.Tensor], bias: bool = True) -> None:
        super().__init__()
        self.act = act
        self.up = nn.Linear(HIDDEN, FFN, bias=bias)
        self.down = nn.Linear(FFN, HIDDEN, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))


class MethodReluExpert(FunctionalExpert):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.up(x).relu())


EXPERTS: dict[str, Callable[[], nn.Module]] = {
    "seq-gelu": lambda: make_expert(nn.GELU()),
    "seq-relu": lambda: make_expert(nn.ReLU()),
    "seq-silu-nobias": lambda: make_expert(nn.SiLU(), bias=False),
    "fn-gelu": lambda: FunctionalExpert(F.gelu),
    "fn-silu": lambda: FunctionalExpert(F.silu),
    "fn-relu-nobias": lambda: FunctionalExpert(F.relu, bias=False),
    "torch-relu": lambda: FunctionalExpert(torch.relu),
    "method-relu": lambda: MethodReluExpert(torch.relu),
}


def naive_moe(
    layer: MoE, expert: nn.Module, x_TD: torch.Tensor, capacity: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route like DeepSpeed (fp32 softmax gate, top-k, renormalised) and run the user's own module class
    with each expert's weights on each routed token; an expert keeps its first ``capacity`` tokens."""
    k, num_local = layer.k, layer.num_local_experts
    sd = layer.state_dict()
    modules = []
    for j in range(num_local):
        module = copy.deepcopy(expert)
        prefix = f"{DS_EXPERTS_PREFIX}.{j}."
        module.load_state_dict({key[len(prefix) :]: v for key, v in sd.items() if key.startswith(prefix)})
        modules.append(module)
    probs_TE = torch.softmax(x_TD.float() @ sd[DS_GATE_KEY].float().t(), dim=-1)
    top_w, top_e = probs_TE.topk(k, dim=-1)
    if k > 1:
        top_w = top_w / top_w.sum(-1, keepdim=True)
    y_TD = torch.zeros_like(x_TD)
    taken = [0] * num_local
    for choice in range(k):  # first choices before second choices, tokens in order
        for t in range(x_TD.shape[0]):
            e = int(top_e[t, choice])
            if capacity is not None and taken[e] >= capacity:
                continue
            taken[e] += 1
            y_TD[t] += top_w[t, choice].to(x_TD.dtype) * modules[e](x_TD[t])
    return y_TD, torch.bincount(top_e.flatten(), minlength=num_local)


@pytest.mark.parametrize("name", sorted(EXPERTS))
@pytest.mark.parametrize("k", [1, 2])
def test_converted_expert_matches_naive_fp64(name: str, k: int) -> None:
    torch.manual_seed(0)
    expert = EXPERTS[name]().double()
    layer = MoE(HIDDEN, expert, num_experts=NUM_EXPERTS, k=k, drop_tokens=False, top2_2nd_expert_sampling=False)
    # DeepSpeed deep-copies the expert into every slot: so do we.
    for j in range(NUM_EXPERTS):
        prefix = f"{DS_EXPERTS_PREFIX}.{j}."
        slot = {key[len(prefix) :]: v for key, v in layer.state_dict().items() if key.startswith(prefix)}
        assert slot.keys() == expert.state_dict().keys()
        for key, value in expert.state_dict().items():
            assert torch.equal(slot[key], value)
    assert layer.experts.w1.dtype == torch.float64
    layer.load_state_dict(perturb_experts(layer.state_dict(), seed=5))

    x_TD = torch.randn(24, HIDDEN, dtype=torch.float64)
    y_TD, _, counts_E = layer(x_TD)
    expected_TD, expected_counts_E = naive_moe(layer, expert, x_TD, capacity=None)
    torch.testing.assert_close(y_TD, expected_TD, rtol=1e-12, atol=1e-12)
    assert torch.equal(counts_E, expected_counts_E)


def test_capacity_drops_first_come_without_rts() -> None:
    torch.manual_seed(0)
    expert = make_expert(nn.ReLU(), dtype=torch.float64)
    # capacity = max(min_capacity, ceil(32 tokens * k=1 / 4 experts * 0.5)) = 4 tokens per expert.
    layer = MoE(HIDDEN, expert, num_experts=NUM_EXPERTS, k=1, capacity_factor=0.5, min_capacity=0, use_rts=False)
    layer.load_state_dict(perturb_experts(layer.state_dict(), seed=6))
    x_TD = torch.randn(32, HIDDEN, dtype=torch.float64)
    y_TD, _, counts_E = layer(x_TD)
    expected_TD, expected_counts_E = naive_moe(layer, expert, x_TD, capacity=4)
    assert int(counts_E.max()) > 4  # something was dropped
    torch.testing.assert_close(y_TD, expected_TD, rtol=1e-12, atol=1e-12)
    assert torch.equal(counts_E, expected_counts_E)


class BranchingExpert(FunctionalExpert):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: not traceable
            return self.down(F.gelu(self.up(x)))
        return x


class ExtraParamExpert(FunctionalExpert):
    def __init__(self) -> None:
        super().__init__(F.gelu)
        self.scale = nn.Parameter(torch.ones(HIDDEN))


UNSUPPORTED: dict[str, Callable[[], Any]] = {
    "linear": lambda: nn.Linear(HIDDEN, HIDDEN),
    "tanh-gelu": lambda: make_expert(nn.GELU(approximate="tanh")),
    "tanh": lambda: make_expert(nn.Tanh()),
    "dropout": lambda: nn.Sequential(nn.Linear(HIDDEN, FFN), nn.GELU(), nn.Dropout(0.1), nn.Linear(FFN, HIDDEN)),
    "three-linears": lambda: nn.Sequential(
        nn.Linear(HIDDEN, FFN), nn.GELU(), nn.Linear(FFN, FFN), nn.Linear(FFN, HIDDEN)
    ),
    "wrong-size": lambda: nn.Sequential(nn.Linear(HIDDEN, FFN), nn.GELU(), nn.Linear(FFN, HIDDEN + 1)),
    "mixed-bias": lambda: nn.Sequential(nn.Linear(HIDDEN, FFN), nn.GELU(), nn.Linear(FFN, HIDDEN, bias=False)),
    "branching": lambda: BranchingExpert(F.gelu),
    "extra-param": ExtraParamExpert,
    "fn-gelu-tanh": lambda: FunctionalExpert(lambda h: F.gelu(h, approximate="tanh")),
    "not-a-module": lambda: lambda x: x,
}


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_unsupported_expert_raises(name: str) -> None:
    with pytest.raises(UnsupportedExpertError, match="Supported experts compute Linear") as info:
        MoE(HIDDEN, UNSUPPORTED[name](), num_experts=NUM_EXPERTS)
    assert "deepspeed.moe.layer.MoE" in str(info.value)


# -- (4) bad arguments -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_experts=6, ep_size=4), r"num_experts=6, ep_size=4.*divisible"),
        (dict(num_experts=0), r"num_experts=0"),
        (dict(ep_size=0), r"ep_size=0"),
        (dict(k=5), r"k=5, num_experts=4.*lower k"),
        (dict(k=0), r"k=0"),
        (dict(capacity_factor=0.0), r"capacity_factor=0.0"),
        (dict(eval_capacity_factor=-1.0), r"eval_capacity_factor=-1.0"),
        (dict(min_capacity=-1), r"min_capacity=-1"),
        (dict(noisy_gate_policy="Gumbel"), r"noisy_gate_policy='Gumbel'.*'Jitter' or 'RSample'"),
        (dict(use_tutel=True), r"use_tutel=True.*pass use_tutel=False"),
        (
            dict(enable_expert_tensor_parallelism=True),
            r"enable_expert_tensor_parallelism=True.*pass enable_expert_tensor_parallelism=False",
        ),
    ],
)
def test_bad_arguments_raise(kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = dict(num_experts=NUM_EXPERTS) | kwargs
    with pytest.raises(MoECompatError, match=match):
        MoE(HIDDEN, make_expert(), **args)


def test_bad_arguments_at_forward() -> None:
    layer = MoE(HIDDEN, make_expert(), num_experts=NUM_EXPERTS)
    x = torch.randn(6, HIDDEN)
    with pytest.raises(MoECompatError, match=r"used_token=.*not supported"):
        layer(x, used_token=torch.ones(6))
    with pytest.raises(ValueError, match="hidden_size=8"):
        layer(torch.randn(6, HIDDEN + 1))


def test_ep_size_2_without_distributed_raises() -> None:
    if torch.distributed.is_initialized():
        pytest.skip("torch.distributed is initialised in this process")
    layer = MoE(HIDDEN, make_expert(), num_experts=NUM_EXPERTS, ep_size=2)
    with pytest.raises(MoECompatError, match=r"ep_size=2.*deepspeed.init_distributed"):
        layer(torch.randn(6, HIDDEN))


def test_hidden_size_mismatch_names_hidden_size() -> None:
    with pytest.raises(UnsupportedExpertError, match=r"hidden_size=16"):
        MoE(2 * HIDDEN, make_expert(), num_experts=NUM_EXPERTS)


def test_top2_sampling_difference_is_announced() -> None:
    with pytest.warns(UserWarning, match="top2_2nd_expert_sampling=False"):
        MoE(HIDDEN, make_expert(), num_experts=NUM_EXPERTS, k=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        MoE(HIDDEN, make_expert(), num_experts=NUM_EXPERTS, k=2, top2_2nd_expert_sampling=False)
        MoE(HIDDEN, make_expert(), num_experts=NUM_EXPERTS, k=1)
    assert not [w for w in caught if "top2_2nd_expert_sampling" in str(w.message)]


# -- (3) deepspeed.initialize on two processes -----------------------------------------------------------

WORLD_SIZE = 2
STEPS = 6
LR = 1e-2
IN_FEATURES, OUT_FEATURES, TOKENS = 6, 3, 16
SPAWN_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def deepspeed_cpu_ops() -> None:
    """Build (or load from the cache) DeepSpeed's CPU shared-memory comm op once, here, instead of
    inside both ranks under the spawn timeout: on a fresh machine its JIT build takes a minute."""
    from deepspeed.comm.torch import build_shm_op

    build_shm_op()


class TinyMoEModel(nn.Module):
    """Linear -> compat MoE (with a residual connection) -> Linear; returns (prediction, l_aux)."""

    def __init__(self, ep_size: int, use_residual: bool) -> None:
        super().__init__()
        self.inp = nn.Linear(IN_FEATURES, HIDDEN)
        self.moe = MoE(
            HIDDEN,
            make_expert(),
            num_experts=NUM_EXPERTS,
            ep_size=ep_size,
            k=2,
            capacity_factor=1.0,  # tokens are dropped now and then
            use_residual=use_residual,
            top2_2nd_expert_sampling=False,
        )
        self.out = nn.Linear(HIDDEN, OUT_FEATURES)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.inp(x)
        y, l_aux, _ = self.moe(h)
        return self.out(h + y), l_aux


def rank_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(TOKENS, IN_FEATURES, generator=gen)
    return x, torch.sin(3 * x[:, :OUT_FEATURES]) + x[:, OUT_FEATURES:]


def loss_of(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    prediction, l_aux = model(x)
    return F.mse_loss(prediction, target) + 0.01 * l_aux


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


def _worker_entry(
    rank: int,
    world_size: int,
    port: int,
    init: str,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    results: Any,
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)  # two ranks on two cores
    try:
        if init == "deepspeed":
            import deepspeed

            deepspeed.init_distributed(dist_backend="gloo", verbose=False)
        else:  # the user's own torch.distributed, DeepSpeed's comm left uninitialised
            torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
        results.put((rank, "ok", fn(rank, world_size, *args)))
    except BaseException:  # report everything, including assertion failures, to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run_ranks(
    fn: Callable[..., Any], *args: Any, init: str = "deepspeed", timeout_s: float = SPAWN_TIMEOUT_S
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on WORLD_SIZE spawned gloo ranks; fail (never hang) on timeout.

    ``init``: "deepspeed" (``deepspeed.init_distributed``) or "torch" (``init_process_group`` only).
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker_entry, args=(rank, WORLD_SIZE, port, init, fn, args, results), daemon=True)
        for rank in range(WORLD_SIZE)
    ]
    for proc in procs:
        proc.start()
    outcome: dict[int, tuple[str, Any]] = {}
    try:
        deadline = time.monotonic() + timeout_s
        while len(outcome) < WORLD_SIZE:
            try:
                rank, status, payload = results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                missing = sorted(set(range(WORLD_SIZE)) - set(outcome))
                pytest.fail(f"ranks {missing} did not finish within {timeout_s:.0f} s (hang?); got {outcome}")
            outcome[rank] = (status, payload)
            if status == "error":
                pytest.fail(f"rank {rank} failed:\n{payload}")
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
    return [outcome[rank][1] for rank in range(WORLD_SIZE)]


def _train_with_deepspeed(rank: int, world_size: int, zero_stage: int, ep_size: int, ckpt_dir: str) -> dict:
    import logging

    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    use_residual = ep_size == 2
    torch.manual_seed(0)
    model = TinyMoEModel(ep_size, use_residual)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=ds_config(zero_stage)
    )

    # DeepSpeed sees an MoE layer and our expert parameters as expert parameters.
    assert engine.has_moe_layers and engine.num_experts == [NUM_EXPERTS]
    layer = model.moe
    assert layer.ep_group is not None and torch.distributed.get_world_size(layer.ep_group) == ep_size
    expert_params = list(layer.experts.parameters())
    split = split_params_into_different_moe_groups_for_optimizer({"params": list(model.parameters()), "name": "d"})
    moe_groups = [g for g in split if g.get("moe")]
    assert [g["name"] for g in moe_groups] == [f"ep_size_{ep_size}"]
    assert {id(p) for p in moe_groups[0]["params"]} == {id(p) for p in expert_params}
    if zero_stage > 0:
        assert any(engine.optimizer.is_moe_param_group)

    x, target = rank_batch(rank)
    losses = []
    for _ in range(STEPS):
        loss = loss_of(engine, x, target)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())

    # The same training in one process: each rank's batch through an ep_size=1 copy, mean loss.
    torch.manual_seed(0)
    reference = TinyMoEModel(1, use_residual)
    optimizer = torch.optim.Adam(reference.parameters(), lr=LR)
    batches = [rank_batch(r) for r in range(world_size)]
    for _ in range(STEPS):
        optimizer.zero_grad()
        (sum(loss_of(reference, *batch) for batch in batches) / world_size).backward()
        optimizer.step()
    ours = dict(model.named_parameters())
    first = torch.distributed.get_rank(layer.ep_group) * layer.num_local_experts
    for name, expected in reference.named_parameters():
        if name.startswith("moe.experts."):
            expected = expected[first : first + layer.num_local_experts]
        torch.testing.assert_close(
            ours[name].detach(), expected.detach(), rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}"
        )

    # Engine checkpoints: one file per global expert, and a fresh engine loads them back.
    engine.save_checkpoint(ckpt_dir, tag="t")
    expert_files = sorted(f for f in os.listdir(os.path.join(ckpt_dir, "t")) if f.startswith("layer_0_expert_"))
    torch.manual_seed(1)  # different initial weights
    fresh = TinyMoEModel(ep_size, use_residual)
    fresh_engine, _, _, _ = deepspeed.initialize(
        model=fresh, model_parameters=fresh.parameters(), config=ds_config(zero_stage)
    )
    fresh_engine.load_checkpoint(ckpt_dir, tag="t")
    for name, param in fresh.named_parameters():
        assert torch.equal(param, ours[name]), name
    # Training continues identically from the loaded state (optimizer state included).
    next_loss = loss_of(engine, x, target)
    engine.backward(next_loss)
    engine.step()
    fresh_loss = loss_of(fresh_engine, x, target)
    fresh_engine.backward(fresh_loss)
    fresh_engine.step()
    for name, param in fresh.named_parameters():
        torch.testing.assert_close(param, ours[name], rtol=1e-6, atol=1e-7, msg=name)
    return {"losses": losses, "expert_files": expert_files}


@pytest.mark.timeout(SPAWN_TIMEOUT_S + 30)
@pytest.mark.parametrize("zero_stage", [0, 1, 2], ids=lambda stage: f"zero{stage}")
@pytest.mark.parametrize("ep_size", [1, 2], ids=lambda size: f"ep{size}")
def test_deepspeed_initialize_trains(zero_stage: int, ep_size: int, tmp_path, deepspeed_cpu_ops) -> None:
    results = run_ranks(_train_with_deepspeed, zero_stage, ep_size, str(tmp_path))
    for result in results:
        losses = result["losses"]
        assert losses[-1] < 0.8 * losses[0], losses
    expected_files = [f"layer_0_expert_{e}_mp_rank_00_model_states.pt" for e in range(NUM_EXPERTS)]
    assert results[0]["expert_files"] == expected_files


def _forward_without_engine(rank: int, world_size: int) -> None:
    from deepspeed.utils import groups

    torch.manual_seed(0)
    expert = make_expert(nn.ReLU())
    kwargs: dict[str, Any] = dict(num_experts=NUM_EXPERTS, k=2, drop_tokens=False, top2_2nd_expert_sampling=False)
    layer = MoE(HIDDEN, copy.deepcopy(expert), ep_size=world_size, **kwargs)
    reference = MoE(HIDDEN, copy.deepcopy(expert), ep_size=1, **kwargs)
    weights = perturb_experts(reference.state_dict(), seed=7)
    reference.load_state_dict(weights)
    # This rank holds global experts [first, first + local): DeepSpeed's keys count them locally.
    local, first = layer.num_local_experts, rank * layer.num_local_experts
    local_weights = {}
    for key, value in weights.items():
        if key.startswith(DS_EXPERTS_PREFIX + "."):
            global_id, rest = key[len(DS_EXPERTS_PREFIX) + 1 :].split(".", 1)
            if first <= int(global_id) < first + local:
                local_weights[f"{DS_EXPERTS_PREFIX}.{int(global_id) - first}.{rest}"] = value
        else:
            local_weights[key] = value
    layer.load_state_dict(local_weights)

    # Uneven token counts over the ranks: dropless routing exchanges split sizes.
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(5 + 3 * rank, HIDDEN, generator=gen)
    x_ep, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, l_aux, counts = layer(x_ep)  # first forward creates DeepSpeed's groups (collective)
    assert "ep_size_2" in groups._get_expert_parallel_group_dict()
    assert layer.ep_group is groups._get_expert_parallel_group("ep_size_2")
    expected_out, expected_aux, expected_counts = reference(x_ref)
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(l_aux, expected_aux)
    assert torch.equal(counts, expected_counts)
    (out.square().sum() + l_aux).backward()
    (expected_out.square().sum() + expected_aux).backward()
    torch.testing.assert_close(x_ep.grad, x_ref.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.timeout(SPAWN_TIMEOUT_S + 30)
def test_ep2_without_engine_matches_single_process(deepspeed_cpu_ops) -> None:
    """Outside deepspeed.initialize, with only torch.distributed set up: groups are created at the
    first forward, and EP=2 gives each rank what one process computes with all experts."""
    run_ranks(_forward_without_engine, init="torch")
