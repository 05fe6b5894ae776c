"""moe_parallel.compat.MoE as a drop-in for deepspeed.moe.layer.MoE: single process.

Parity with DeepSpeed 0.19's own layer (copied weights, the same seeded RNG) for every expert form,
k in {1, 2, 4}, each noisy-gate policy, tight capacity: output, l_aux, exp_counts and gradients. State
dicts in both directions, DeepSpeed's parameter marking, argument errors, and that importing
moe_parallel does not import DeepSpeed.
"""

from __future__ import annotations

import copy
import inspect
import subprocess
import sys
import warnings
from typing import Any

import pytest
import torch
from deepspeed.moe.layer import MoE as DeepSpeedMoE
from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer
from torch import nn

from moe_parallel.experts.modules import ModuleExperts, StackedExperts
from moe_parallel.integration.compat import (
    DS_EXPERTS_PREFIX,
    MoE,
    MoECompatError,
    OptimizerLayoutWarning,
    _state_dict_to_deepspeed_layout,
)
from tests.compat_doubles import expert_zoo
from tests.tolerance import float_tolerance

HIDDEN, FFN, NUM_EXPERTS = 8, 12, 4
ZOO = expert_zoo(HIDDEN, FFN)
# One expert of each form: recognised (grouped kernels / per-expert loop / ParallelMLP) and fallback.
PARITY_FORMS = [
    "seq_gelu",
    "seq_relu_nobias",
    "one_linear",
    "two_linears",
    "squared_relu",
    "pmlp_gelu_bias_skip",
    "pmlp_swiglu_nobias_skip",
    "pmlp_squared_relu_bias_add",
    "pmlp_bias_gelu_fusion_bias_skip",
    "pmlp_openai_gelu_bias_skip",
    "seq_tanh",
    "tuple_output",
]


def make_expert() -> nn.Module:
    return copy.deepcopy(ZOO["seq_gelu"][0])


def perturb_experts(state_dict: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Give every expert slot its own weights (all slots start as copies of one expert)."""
    gen = torch.Generator().manual_seed(seed)
    return {
        key: value + 0.2 * torch.randn(value.shape, generator=gen, dtype=value.dtype)
        if DS_EXPERTS_PREFIX in key
        else value
        for key, value in state_dict.items()
    }


def grads_in_deepspeed_layout(layer: MoE) -> dict[str, torch.Tensor | None]:
    # A parameter without gradient travels as NaNs through the layout conversion and comes back as None.
    grads = {
        name: p.grad if p.grad is not None else torch.full_like(p, float("nan")) for name, p in layer.named_parameters()
    }
    _state_dict_to_deepspeed_layout(layer, grads, "", {})
    return {name: None if g.isnan().all() else g for name, g in grads.items()}


def run_pair(expert: nn.Module, x: torch.Tensor, training: bool, seed: int = 5, **kwargs: Any):
    """DeepSpeed's layer and ours, same init seed, same (perturbed) weights, same RNG for the forward."""
    torch.manual_seed(1)
    theirs = DeepSpeedMoE(HIDDEN, copy.deepcopy(expert), **kwargs)
    torch.manual_seed(1)
    ours = MoE(HIDDEN, copy.deepcopy(expert), **kwargs)
    theirs_sd, ours_sd = theirs.state_dict(), ours.state_dict()
    assert sorted(ours_sd) == sorted(theirs_sd)
    for key in theirs_sd:  # seeded init equals DeepSpeed's
        assert torch.equal(ours_sd[key], theirs_sd[key]), key
    weights = perturb_experts(theirs_sd, seed=2)
    theirs.load_state_dict(weights)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OptimizerLayoutWarning)
        ours.load_state_dict(weights)
    results = []
    for layer in (theirs, ours):
        layer.train(training)
        x_ = x.clone().requires_grad_()
        torch.manual_seed(seed)
        out, l_aux, counts = layer(x_)
        (out.square().sum() + l_aux).backward()
        results.append((layer, x_, out, l_aux, counts))
    return results


def assert_parity(results, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    (theirs, x_theirs, out_theirs, aux_theirs, counts_theirs), (ours, x_ours, out_ours, aux_ours, counts_ours) = results
    torch.testing.assert_close(out_ours, out_theirs, rtol=rtol, atol=atol)
    torch.testing.assert_close(aux_ours, aux_theirs, rtol=rtol, atol=atol)
    assert counts_ours.dtype == counts_theirs.dtype and torch.equal(counts_ours, counts_theirs)
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, rtol=10 * rtol, atol=10 * atol)
    theirs_grads = {name: p.grad for name, p in theirs.named_parameters()}
    ours_grads = grads_in_deepspeed_layout(ours)
    assert sorted(ours_grads) == sorted(theirs_grads)
    # A weight gradient sums over tokens and hidden units, through gate -> expert -> loss (depth 3),
    # and may cancel: its rounding error scales with the tensor's largest entry, not with each entry.
    scale_tol = float_tolerance(torch.float32, reduction_size=x_ours.numel() // HIDDEN * FFN, depth=3)["atol"]
    for name, expected in theirs_grads.items():
        got = ours_grads[name]
        if expected is None:  # e.g. ParallelMLP's skipped output bias: unused by DeepSpeed too
            assert got is None, name
        else:
            grad_atol = max(10 * atol, scale_tol * float(expected.abs().max()))
            torch.testing.assert_close(got, expected, rtol=10 * rtol, atol=grad_atol, msg=lambda m, n=name: f"{n}: {m}")


# -- parity with deepspeed.moe.layer.MoE -----------------------------------------------------------


@pytest.mark.parametrize("policy", [None, "Jitter", "RSample"])
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("form", PARITY_FORMS)
def test_parity_every_form_k_and_noise_policy_in_eval(form: str, k: int, policy: str | None) -> None:
    """Default DeepSpeed arguments (RTS and second-expert sampling on: they draw from the RNG in eval
    too), tight capacity so that tokens are dropped."""
    x = torch.randn(2, 12, HIDDEN, generator=torch.Generator().manual_seed(k))
    kwargs = dict(num_experts=NUM_EXPERTS, k=k, noisy_gate_policy=policy, min_capacity=1, eval_capacity_factor=0.75)
    results = run_pair(ZOO[form][0], x, training=False, **kwargs)
    ours = results[1][0]
    assert isinstance(ours.experts, ModuleExperts if ZOO[form][1] is None else StackedExperts)
    assert int(ours.last_stats.dropped_fraction.item() * 1e6) > 0 or k == 4  # capacity bites
    assert_parity(results)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(k=1, noisy_gate_policy="Jitter"),
        dict(k=1, noisy_gate_policy="RSample", capacity_factor=0.5),
        dict(k=1, use_rts=True, capacity_factor=0.5, min_capacity=0),
        dict(k=2, top2_2nd_expert_sampling=True, capacity_factor=0.5),
        dict(k=2, top2_2nd_expert_sampling=False, noisy_gate_policy="Jitter"),
        dict(k=3, capacity_factor=0.5),
        dict(k=2, drop_tokens=False),
        dict(k=1, drop_tokens=False, noisy_gate_policy="RSample"),
        dict(k=2, use_residual=True, capacity_factor=0.75),
        dict(k=1, use_residual=True, noisy_gate_policy="Jitter"),
        dict(k=2, use_tutel=True, capacity_factor=0.5),  # DeepSpeed without Tutel installed: the same values
    ],
    ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()),
)
@pytest.mark.parametrize("form", ["seq_gelu", "pmlp_swiglu_bias_skip", "seq_tanh"])
def test_parity_in_training_with_every_argument(form: str, kwargs: dict[str, Any]) -> None:
    """Training mode: DeepSpeed's noise (jitter, Gumbel, RTS uniforms) drawn from the same seeded RNG."""
    x = torch.randn(24, HIDDEN, generator=torch.Generator().manual_seed(3))
    assert_parity(run_pair(ZOO[form][0], x, training=True, num_experts=NUM_EXPERTS, **kwargs))


def test_k1_without_rts_keeps_the_first_tokens() -> None:
    """The one documented difference: DeepSpeed keeps whichever tokens torch.topk returns among equal
    mask values (unspecified order); we keep the first ones. Same counts, same l_aux, same number kept
    per expert, and the outputs agree on every token both keep."""
    x = torch.randn(40, HIDDEN, generator=torch.Generator().manual_seed(0))
    kwargs = dict(num_experts=NUM_EXPERTS, k=1, use_rts=False, capacity_factor=0.5, min_capacity=0)
    (theirs, _, out_theirs, aux_theirs, counts_theirs), (ours, _, out_ours, aux_ours, counts_ours) = run_pair(
        ZOO["seq_gelu"][0], x, training=True, **kwargs
    )
    assert torch.equal(counts_ours, counts_theirs)
    torch.testing.assert_close(aux_ours, aux_theirs)
    kept_theirs, kept_ours = out_theirs.abs().sum(-1) > 0, out_ours.abs().sum(-1) > 0
    assert int(kept_theirs.sum()) == int(kept_ours.sum()) == int(counts_ours.clamp(max=5).sum())
    capacity = 5  # ceil(40 / 4 * 0.5)
    expert_T = torch.argmax(ours.router.weight.detach() @ x.t(), dim=0)
    for e in range(NUM_EXPERTS):  # ours: the first `capacity` tokens of each expert
        tokens = (expert_T == e).nonzero().flatten()
        assert kept_ours[tokens[:capacity]].all() and not kept_ours[tokens[capacity:]].any()
    both = kept_theirs & kept_ours
    torch.testing.assert_close(out_ours[both], out_theirs[both], rtol=1e-5, atol=1e-6)


def test_return_values_like_deepspeed() -> None:
    torch.manual_seed(0)
    layer = MoE(HIDDEN, make_expert(), num_experts=NUM_EXPERTS, k=2)
    x = torch.randn(3, 5, HIDDEN, requires_grad=True)
    output, l_aux, exp_counts = layer(x)
    assert output.shape == x.shape and output.dtype == x.dtype
    assert l_aux.dim() == 0 and l_aux.dtype == torch.float32 and l_aux.requires_grad
    assert exp_counts.shape == (NUM_EXPERTS,) and exp_counts.dtype == torch.int64
    assert int(exp_counts.sum()) == 15 * 2  # routed (token, choice) pairs, before dropping
    assert (layer.num_experts, layer.ep_size, layer.num_local_experts) == (NUM_EXPERTS, 1, NUM_EXPERTS)
    assert layer.expert_group_name == "ep_size_1" and layer.enable_expert_tensor_parallelism is False


def test_signature_matches_deepspeed() -> None:
    for ours, theirs in ((MoE.__init__, DeepSpeedMoE.__init__), (MoE.forward, DeepSpeedMoE.forward)):
        ours_params = inspect.signature(ours).parameters.values()
        assert [(p.name, p.default) for p in ours_params] == [
            (p.name, p.default) for p in inspect.signature(theirs).parameters.values()
        ]
    assert isinstance(MoE(HIDDEN, make_expert(), num_experts=2), DeepSpeedMoE)


# -- state dicts ------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["seq_gelu", "pmlp_gelu_bias_skip", "seq_tanh"])
def test_state_dict_both_directions_with_deepspeed(form: str) -> None:
    expert = ZOO[form][0]
    torch.manual_seed(0)
    theirs = DeepSpeedMoE(HIDDEN, copy.deepcopy(expert), num_experts=NUM_EXPERTS, ep_size=2, use_residual=True)
    ours = MoE(HIDDEN, copy.deepcopy(expert), num_experts=NUM_EXPERTS, ep_size=2, use_residual=True)
    weights = perturb_experts(theirs.state_dict(), seed=3)
    assert {key.split(".")[3] for key in weights if DS_EXPERTS_PREFIX in key} == {"0", "1"}  # local ids
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours.load_state_dict(weights)  # DeepSpeed -> ours
    # A DeepSpeed-layer state dict fits module copies' optimizer layout; stacked experts are warned about.
    stacked = isinstance(ours.experts, StackedExperts)
    assert any(issubclass(w.category, OptimizerLayoutWarning) for w in caught) == stacked
    back = ours.state_dict()
    assert sorted(back) == sorted(weights)
    for key in weights:
        assert torch.equal(back[key], weights[key]), key
    fresh = DeepSpeedMoE(HIDDEN, copy.deepcopy(expert), num_experts=NUM_EXPERTS, ep_size=2, use_residual=True)
    fresh.load_state_dict(back)  # ours -> DeepSpeed (strict)
    # Per-expert tensors are copies: a checkpoint file holds one expert, not the stacked storage.
    if stacked:
        value = back[f"{DS_EXPERTS_PREFIX}.0.{ours.experts.deepspeed_names()['w1']}"]
        assert value.untyped_storage().nbytes() == value.numel() * value.element_size()
    # An incomplete DeepSpeed layout is reported key by key, not half-loaded.
    broken = dict(weights)
    broken.pop(next(key for key in weights if DS_EXPERTS_PREFIX + ".1." in key))
    with pytest.raises(RuntimeError, match="Missing key|Unexpected key"), warnings.catch_warnings():
        warnings.simplefilter("ignore", OptimizerLayoutWarning)  # asserted above; not the point here
        ours.load_state_dict(broken)


def test_layout_warning_names_the_fix() -> None:
    stacked = MoE(HIDDEN, make_expert(), num_experts=NUM_EXPERTS, ep_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stacked.load_state_dict(MoE(HIDDEN, make_expert(), num_experts=NUM_EXPERTS, ep_size=2).state_dict())
    other_ep = MoE(HIDDEN, make_expert(), num_experts=NUM_EXPERTS, ep_size=4).state_dict()
    other_ep = {k: v for k, v in other_ep.items()} | {
        k.replace(".0.", ".1.", 1): v for k, v in other_ep.items() if f"{DS_EXPERTS_PREFIX}.0." in k
    }
    other_ep = type(stacked.state_dict())(other_ep)
    other_ep._metadata = {"": {"moe_parallel": {"experts": "stacked", "ep_size": 4}}}
    with pytest.warns(OptimizerLayoutWarning, match=r"ep_size=4.*load_module_only=True"):
        stacked.load_state_dict(other_ep)


def test_expert_params_marked_for_deepspeed() -> None:
    for form in ("seq_gelu", "seq_tanh"):
        layer = MoE(HIDDEN, copy.deepcopy(ZOO[form][0]), num_experts=NUM_EXPERTS, ep_size=2, use_residual=True)
        expert_ids = {id(p) for p in layer.experts.parameters()}
        for name, param in layer.named_parameters():
            assert is_moe_param(param) == (id(param) in expert_ids), name
            if is_moe_param(param):
                assert param.group_name == "ep_size_2"
        groups = split_params_into_different_moe_groups_for_optimizer({"params": list(layer.parameters()), "name": "d"})
        moe_groups = [g for g in groups if g.get("moe")]
        assert [g["name"] for g in moe_groups] == ["ep_size_2"]
        assert {id(p) for p in moe_groups[0]["params"]} == expert_ids


# -- arguments --------------------------------------------------------------------------------------


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
        (dict(use_tutel="yes"), r"use_tutel='yes'"),
        (
            dict(enable_expert_tensor_parallelism=True),
            r"enable_expert_tensor_parallelism=True.*pass enable_expert_tensor_parallelism=False",
        ),
    ],
)
def test_bad_arguments_raise_before_any_collective(kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = dict(num_experts=NUM_EXPERTS) | kwargs
    with pytest.raises(MoECompatError, match=match):
        MoE(HIDDEN, make_expert(), **args)
    with pytest.raises(MoECompatError, match="expert must be an nn.Module"):
        MoE(HIDDEN, lambda x: x, num_experts=NUM_EXPERTS)


def test_bad_arguments_at_forward() -> None:
    layer = MoE(HIDDEN, make_expert(), num_experts=NUM_EXPERTS)
    x = torch.randn(6, HIDDEN)
    with pytest.raises(MoECompatError, match=r"used_token=\(5,\)\) is invalid.*6 here"):
        layer(x, used_token=torch.ones(5))
    with pytest.raises(ValueError, match="hidden_size=8"):
        layer(torch.randn(6, HIDDEN + 1))


def test_ep_size_2_without_distributed_raises() -> None:
    if torch.distributed.is_initialized():
        pytest.skip("torch.distributed is initialised in this process")
    layer = MoE(HIDDEN, make_expert(), num_experts=NUM_EXPERTS, ep_size=2)
    with pytest.raises(MoECompatError, match=r"ep_size=2.*deepspeed.init_distributed"):
        layer(torch.randn(6, HIDDEN))


def test_import_does_not_load_deepspeed() -> None:
    code = (
        "import sys, torch, moe_parallel\n"
        "from moe_parallel import MoEConfig, MoELayer\n"
        "layer = MoELayer(MoEConfig(hidden_size=8, ffn_hidden_size=16, num_experts=4))\n"
        "layer(torch.randn(3, 8)).sum().backward()\n"
        "assert 'deepspeed' not in sys.modules, 'deepspeed was imported'\n"
        "import deepspeed.moe.layer\n"
        "assert isinstance(MoELayer(MoEConfig(hidden_size=8, ffn_hidden_size=16, num_experts=4)), "
        "deepspeed.moe.layer.MoE)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "accelerator" not in result.stderr.split("import deepspeed")[0]


def test_frozen_expert_parameters_stay_frozen() -> None:
    for form in ("seq_gelu", "seq_tanh"):
        expert = copy.deepcopy(ZOO[form][0])
        expert[0].weight.requires_grad_(False)
        layer = MoE(HIDDEN, expert, num_experts=NUM_EXPERTS)
        frozen = [name for name, p in layer.named_parameters() if not p.requires_grad]
        assert frozen and all("experts" in name for name in frozen), frozen


def test_moe_layer_late_binding_api() -> None:
    """The public MoELayer API the drop-in builds on: prebuilt experts, ep_size without a group, set_ep_group."""
    from moe_parallel import MoEConfig, MoELayer
    from moe_parallel.core.config import MoEConfigError
    from moe_parallel.experts.modules import build_module_experts

    cfg = MoEConfig(hidden_size=HIDDEN, ffn_hidden_size=FFN, num_experts=NUM_EXPERTS, top_k=2)
    layer = MoELayer(cfg, ep_size=2)
    assert layer.num_local_experts == 2 and layer.experts.w1.shape[0] == 2 and layer.ep_group is None
    with pytest.raises(RuntimeError, match="set_ep_group"):
        layer(torch.randn(4, HIDDEN))
    with pytest.raises(MoEConfigError, match="ep_size=2"):
        layer.set_ep_group(None)  # one rank, not two
    with pytest.raises(MoEConfigError, match="ep_size=0"):
        MoELayer(cfg, ep_size=0)
    with pytest.raises(MoEConfigError, match="holds 3 experts.*= 4"):
        MoELayer(cfg, experts=build_module_experts(ZOO["seq_tanh"][0], HIDDEN, 3))
    custom = MoELayer(cfg, experts=build_module_experts(ZOO["seq_tanh"][0], HIDDEN, NUM_EXPERTS))
    assert isinstance(custom.experts, ModuleExperts)
    assert all(p.group_name == "ep_size_1" and p.allreduce is False for p in custom.experts.parameters())
    custom(torch.randn(5, HIDDEN)).sum().backward()


def test_benchmark_drop_in_rows_smoke(tmp_path) -> None:
    """`make bench` prints the drop-in rows (module-copy and ParallelMLP experts vs DeepSpeed's layer);
    timings are not checked, only that each implementation ran."""
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    args = ["--quick", "--configs", "c2", "--no-memory", "--compat", "only", "--output", str(tmp_path / "B.md")]
    proc = subprocess.run(
        [sys.executable, "benchmarks/bench_moe.py", *args], cwd=repo, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if "drop-in, module-copy expert ms" in line)
    columns = [c.strip() for c in header.strip("|").split("|")]
    rows = [line for line in lines if re.match(r"\| c2 \(drop-in\): T=", line)]
    assert rows, proc.stdout[-3000:]
    for row in rows:
        cells = dict(zip(columns, (c.strip() for c in row.strip("|").split("|"))))
        assert all(float(cells[c]) > 0 for c in columns[1:]), row
    assert not (tmp_path / "B.md").exists()


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("form", ["seq_gelu", "seq_tanh"])
def test_used_token_as_deepspeed(form: str, k: int) -> None:
    """k=1: only used tokens are routed and counted (DeepSpeed's top1gating); k=2: ignored, as there."""
    x = torch.randn(3, 8, HIDDEN, generator=torch.Generator().manual_seed(4))
    used = (torch.rand(24, generator=torch.Generator().manual_seed(5)) < 0.6).float()
    torch.manual_seed(1)
    theirs = DeepSpeedMoE(HIDDEN, copy.deepcopy(ZOO[form][0]), num_experts=NUM_EXPERTS, k=k, min_capacity=1)
    torch.manual_seed(1)
    ours = MoE(HIDDEN, copy.deepcopy(ZOO[form][0]), num_experts=NUM_EXPERTS, k=k, min_capacity=1)
    results = []
    for layer in (theirs, ours):
        x_ = x.clone().requires_grad_()
        torch.manual_seed(9)
        out, l_aux, counts = layer(x_, used)
        (out.square().sum() + l_aux).backward()
        results.append((layer, x_, out, l_aux, counts))
    assert_parity(results)
    if k == 1:
        assert int(results[1][4].sum()) == int(used.sum())
        assert not results[1][2].reshape(24, HIDDEN)[used == 0].any()


@pytest.mark.parametrize("form", ["seq_gelu", "pmlp_swiglu_bias_skip", "seq_tanh"])
def test_parity_in_bfloat16(form: str) -> None:
    """A bf16 model: the gate runs in fp32 in both layers (same routing), the experts in bf16."""
    expert = copy.deepcopy(ZOO[form][0]).to(torch.bfloat16)
    x = torch.randn(16, HIDDEN, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    kwargs = dict(num_experts=NUM_EXPERTS, k=2, min_capacity=1, top2_2nd_expert_sampling=False)
    torch.manual_seed(1)
    theirs = DeepSpeedMoE(HIDDEN, copy.deepcopy(expert), **kwargs)
    torch.manual_seed(1)
    ours = MoE(HIDDEN, copy.deepcopy(expert), **kwargs)
    outputs = []
    for layer in (theirs, ours):
        out, l_aux, counts = layer(x)
        assert out.dtype == torch.bfloat16 and l_aux.dtype == torch.float32
        outputs.append((out.detach().float(), l_aux.detach(), counts))
    (out_t, aux_t, counts_t), (out_o, aux_o, counts_o) = outputs
    assert torch.equal(counts_o, counts_t)
    torch.testing.assert_close(aux_o, aux_t)
    torch.testing.assert_close(out_o, out_t, rtol=2e-2, atol=2e-2 * float(out_t.abs().max()))


def test_marked_layers_pickle_and_copy() -> None:
    """Layers carry DeepSpeed's MoE class as an extra base once DeepSpeed is loaded; they still pickle
    (torch.save of a whole model), also into a process where nothing was marked yet, and deep-copy."""
    import io
    import pickle

    from moe_parallel import MoEConfig, MoELayer

    layers = [MoE(HIDDEN, make_expert(), num_experts=2), MoELayer(MoEConfig(HIDDEN, FFN, num_experts=2))]
    for layer in layers:
        assert isinstance(layer, DeepSpeedMoE)
        for clone in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):
            assert type(clone) is type(layer) and isinstance(clone, DeepSpeedMoE)
    buffer = io.BytesIO()
    torch.save(layers[1], buffer)
    code = (
        "import io, sys, torch, deepspeed.moe.layer\n"
        "layer = torch.load(io.BytesIO(sys.stdin.buffer.read()), weights_only=False)\n"
        "assert isinstance(layer, deepspeed.moe.layer.MoE), type(layer).__mro__\n"
        "print(type(layer).__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], input=buffer.getvalue(), capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.decode().strip().splitlines()[-1] == "MoELayer"
