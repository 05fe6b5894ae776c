"""The reference GPT: shapes, causality, tying, MoE placement, plain == pipeline, config errors, training."""

from __future__ import annotations

import math
import os
import sys
import types

import pytest
import torch
import torch.distributed as dist
from torch import nn

from moe_parallel import MoEConfig, MoEConfigError
from moe_parallel.integration.pipeline import (
    gpt_pipeline,
    pipeline_parts,
    pipeline_to_plain_state_dict,
    plain_to_pipeline_state_dict,
)
from moe_parallel.models import GPT, GPTConfig, GPTConfigError, make_norm, moe_layers, pipeline_layer_names
from tests.dist_utils import free_port, run_distributed
from tests.tolerance import float_tolerance

V, S, B = 32, 8, 2


def make_config(**overrides) -> GPTConfig:
    kwargs = dict(
        vocab_size=V,
        seq_len=S,
        num_layers=2,
        hidden_size=16,
        num_heads=2,
        ffn_hidden_size=24,
        moe_every=2,
        moe={"num_experts": 4, "top_k": 2, "min_capacity": 0},
        init_std=0.1,
    )
    kwargs.update(overrides)
    return GPTConfig(**kwargs)


def tokens(seed: int = 0, batch: int = B, seq: int = S) -> torch.Tensor:
    return torch.randint(0, V, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def world1():
    """A world-size-1 gloo group (PipelineModule needs torch.distributed and DeepSpeed's comm)."""
    import deepspeed

    owned = not dist.is_initialized()
    with pytest.MonkeyPatch.context() as env:
        if owned:
            env.setenv("MASTER_ADDR", "127.0.0.1")
            env.setenv("MASTER_PORT", str(free_port()))
            env.setenv("RANK", "0")
            env.setenv("WORLD_SIZE", "1")
            dist.init_process_group("gloo", rank=0, world_size=1)
        if "LOCAL_RANK" not in os.environ:
            env.setenv("LOCAL_RANK", "0")
        deepspeed.init_distributed(dist_backend="gloo")
        yield
        if owned:
            dist.destroy_process_group()


def run_pipeline_locally(pipe: nn.Module, tokens_BS: torch.Tensor) -> torch.Tensor:
    """Run a 1-stage PipelineModule's layers in order, checking that only one tensor passes between them."""
    x = tokens_BS
    for fn in pipe.forward_funcs:
        x = fn(x)
        assert isinstance(x, torch.Tensor)
    return x


# ---------------------------------------------------------------- plain model


def test_forward_shapes_and_loss():
    model = GPT(make_config())
    logits = model(tokens())
    assert logits.shape == (B, S, V) and logits.dtype == torch.float32
    assert model(tokens(seq=S - 3)).shape == (B, S - 3, V)  # shorter sequences are fine
    loss = model.loss(logits, tokens(1))
    assert loss.shape == () and torch.isfinite(loss)
    assert abs(loss.item() - torch.log(torch.tensor(float(V))).item()) < 1.0  # near-uniform at init


def test_causal():
    cfg = make_config(num_layers=3, moe_every=1)
    model = GPT(cfg).eval()
    t = tokens()
    t2 = t.clone()
    t2[:, 5] = (t2[:, 5] + 1) % V
    a, b = model(t), model(t2)
    # Earlier positions never see a future token. Not bitwise: the changed token changes which rows
    # each expert's GEMM holds, and kernels may round differently with the row count (AMD vs Intel).
    close = float_tolerance(torch.float32, cfg.ffn_hidden_size, depth=cfg.num_layers + 1)
    torch.testing.assert_close(a[:, :5], b[:, :5], **close)
    assert (a[:, 5:] - b[:, 5:]).abs().max() > 1e3 * close["atol"]


@pytest.mark.parametrize("moe_every,expected", [(0, []), (1, [0, 1, 2, 3, 4]), (2, [1, 3]), (3, [2]), (6, [])])
def test_moe_every_placement(moe_every, expected):
    cfg = make_config(num_layers=5, moe_every=moe_every)
    assert cfg.moe_layer_numbers == expected
    model = GPT(cfg)
    assert [block.is_moe for block in model.blocks] == [i in expected for i in range(5)]
    assert [layer.layer_number for layer in moe_layers(model)] == expected  # global block index
    assert all(model.blocks[i].ffn is layer for i, layer in zip(expected, moe_layers(model)))


def test_tied_embeddings_share_storage():
    model = GPT(make_config(tie_embeddings=True))
    assert model.lm_head is None
    assert model.lm_head_weight is model.embed.weight
    assert not any(k.startswith("lm_head") for k in model.state_dict())
    untied = GPT(make_config())
    n_params = sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in model.parameters())
    assert n_params == V * 16
    # The head's gradient lands on the embedding: rows of tokens absent from the input get one too.
    t = torch.randint(0, 4, (B, S))
    model.loss(model(t), t).backward()
    assert model.embed.weight.grad[4:].abs().sum() > 0


def test_layernorm_and_swiglu_and_dense_model():
    model = GPT(make_config(norm="layernorm", activation="swiglu", moe_every=0, moe=None, tie_embeddings=True))
    assert isinstance(model.blocks[0].norm1, nn.LayerNorm) and moe_layers(model) == []
    assert model(tokens()).shape == (B, S, V)


def test_weights_do_not_depend_on_global_rng():
    torch.manual_seed(0)
    a = GPT(make_config()).state_dict()
    torch.manual_seed(1)
    b = GPT(make_config()).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = GPT(make_config(init_seed=7)).state_dict()
    assert not torch.equal(a["blocks.0.attn.qkv.weight"], c["blocks.0.attn.qkv.weight"])
    assert not torch.equal(a["blocks.1.ffn.router.weight"], c["blocks.1.ffn.router.weight"])  # moe inherits it
    # Different blocks differ.
    assert not torch.equal(a["blocks.0.attn.qkv.weight"], a["blocks.1.attn.qkv.weight"])


def test_training_reduces_loss():
    torch.manual_seed(0)
    model = GPT(make_config())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    t = tokens(3, batch=4)
    inputs, targets = t[:, :-1], t[:, 1:]
    losses = []
    for _ in range(8):
        loss = model.loss(model(inputs), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0], losses


def test_aux_loss_gradient_reaches_router():
    model = GPT(make_config(moe={"num_experts": 4, "aux_loss_coeff": 0.5, "z_loss_coeff": 0.1})).train()
    logits = model(tokens())
    (logits * 0.0).sum().backward()  # no gradient from the main loss: the router sees only the aux loss
    (layer,) = moe_layers(model)
    grad = layer.router.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    # It is exactly d aux / d router: the attach function adds it once.
    model.zero_grad()
    model(tokens())
    (expected,) = torch.autograd.grad(layer.aux_loss, layer.router.weight)
    torch.testing.assert_close(grad, expected)


# ---------------------------------------------------------------- norm selection


def test_make_norm_uses_torch_without_apex(monkeypatch):
    monkeypatch.setitem(sys.modules, "apex.normalization", None)  # import raises ImportError
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert type(make_norm("rmsnorm", 8)) is nn.RMSNorm
    assert type(make_norm("layernorm", 8)) is nn.LayerNorm
    with pytest.raises(GPTConfigError, match="model.norm='batchnorm'"):
        make_norm("batchnorm", 8)


def _fake_apex(monkeypatch, with_kernels: bool):
    class FusedRMSNorm(nn.RMSNorm):
        pass

    class FusedLayerNorm(nn.LayerNorm):
        pass

    normalization = types.ModuleType("apex.normalization")
    normalization.FusedRMSNorm, normalization.FusedLayerNorm = FusedRMSNorm, FusedLayerNorm
    apex = types.ModuleType("apex")
    apex.normalization = normalization
    monkeypatch.setitem(sys.modules, "apex", apex)
    monkeypatch.setitem(sys.modules, "apex.normalization", normalization)
    monkeypatch.setitem(sys.modules, "fused_layer_norm_cuda", types.ModuleType("k") if with_kernels else None)
    return FusedRMSNorm, FusedLayerNorm


def test_make_norm_uses_apex_when_available(monkeypatch):
    fused_rms, fused_ln = _fake_apex(monkeypatch, with_kernels=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert type(make_norm("rmsnorm", 8, eps=1e-6)) is fused_rms
    assert type(make_norm("layernorm", 8)) is fused_ln
    assert make_norm("rmsnorm", 8, eps=1e-6).eps == 1e-6
    # Without CUDA, or with apex's Python-only build (no kernels), torch's norms are used.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert type(make_norm("rmsnorm", 8)) is nn.RMSNorm
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    _fake_apex(monkeypatch, with_kernels=False)
    assert type(make_norm("rmsnorm", 8)) is nn.RMSNorm


# ---------------------------------------------------------------- config validation


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"vocab_size": 0}, r"model\.vocab_size=0 .*positive integer"),
        ({"num_layers": 2.5}, r"model\.num_layers=2\.5"),
        ({"num_heads": 3}, r"model\.num_heads=3 .*divide hidden_size=16"),
        ({"moe_every": -1}, r"model\.moe_every=-1"),
        ({"norm": "batchnorm"}, r"model\.norm='batchnorm' .*rmsnorm"),
        ({"activation": "tanh"}, r"model\.activation='tanh'"),
        ({"dropout": 1.0}, r"model\.dropout=1\.0 .*\[0, 1\)"),
        ({"init_std": 0.0}, r"model\.init_std=0\.0"),
        ({"tie_embeddings": "yes"}, r"model\.tie_embeddings='yes'"),
        ({"moe": None}, r"model\.moe is missing .*moe_every=0"),
        ({"moe": {"top_k": 1}}, r"model\.moe\.num_experts is missing"),
        ({"moe": {"num_experts": 4, "experts": 2}}, r"unknown field\(s\) \['experts'\]"),
        ({"moe": {"num_experts": 4, "hidden_size": 8}}, r"model\.moe\.hidden_size=8 must equal model\.hidden_size=16"),
        ({"moe": MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=2)}, r"model\.moe\.hidden_size=8"),
        ({"moe": "four"}, r"model\.moe='four'"),
    ],
)
def test_config_errors(overrides, match):
    with pytest.raises(GPTConfigError, match=match):
        make_config(**overrides)


def test_moe_config_errors_name_the_moe_field():
    with pytest.raises(MoEConfigError, match=r"moe\.top_k=5"):
        make_config(moe={"num_experts": 4, "top_k": 5})


def test_moe_config_inherits_and_round_trips():
    cfg = make_config(activation="swiglu", moe={"num_experts": 4, "ffn_hidden_size": 8})
    assert isinstance(cfg.moe, MoEConfig)
    assert (cfg.moe.hidden_size, cfg.moe.ffn_hidden_size, cfg.moe.activation) == (16, 8, "swiglu")
    assert (cfg.moe.init_std, cfg.moe.init_seed) == (cfg.init_std, cfg.init_seed)
    assert GPTConfig(**cfg.to_dict()) == cfg  # a plain dict (e.g. from Hydra) rebuilds it
    explicit = make_config(moe=cfg.moe)
    assert explicit.moe is cfg.moe


def test_expert_output_weights_get_the_residual_init():
    """Experts' fc2 is drawn like the dense fc2: init_std / sqrt(2 * num_layers) (Megatron's output init)."""
    cfg = make_config(num_layers=4, moe_every=2, ffn_hidden_size=256, moe={"num_experts": 4})
    residual_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
    assert cfg.moe.output_init_std == pytest.approx(residual_std)
    model = GPT(cfg)
    moe, dense = model.blocks[1].ffn, model.blocks[0].ffn
    assert moe.experts.w1.std().item() == pytest.approx(cfg.init_std, rel=0.05)
    assert moe.experts.w2.std().item() == pytest.approx(residual_std, rel=0.05)
    assert dense.fc2.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    with pytest.raises(MoEConfigError, match=r"moe\.output_init_std=-1"):
        make_config(moe={"num_experts": 4, "output_init_std": -1})


def test_bad_input():
    model = GPT(make_config())
    with pytest.raises(ValueError, match=r"sequence length 9 exceeds model\.seq_len=8"):
        model(tokens(seq=S + 1))
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.zeros(B, S))


# ---------------------------------------------------------------- pipeline form


def test_pipeline_parts():
    for layers in range(1, 7):
        cfg = make_config(num_layers=layers, moe_every=0, moe=None)
        for stages in range(1, layers + 1):
            parts = pipeline_parts(cfg, stages)
            assert parts[0] == 0 and parts[-1] == layers + 4 and len(parts) == stages + 1
            blocks_per_stage = [
                sum(2 <= idx < layers + 2 for idx in range(parts[s], parts[s + 1])) for s in range(stages)
            ]
            assert min(blocks_per_stage) >= 1 and max(blocks_per_stage) - min(blocks_per_stage) <= 1
            assert parts[1] >= 2  # both embeddings on the first stage
    with pytest.raises(GPTConfigError, match=r"num_stages=3 .*num_layers=2"):
        pipeline_parts(make_config(), 3)


@pytest.mark.parametrize("tie", [False, True])
def test_state_dict_name_mapping_round_trips(tie):
    cfg = make_config(tie_embeddings=tie)
    plain = GPT(cfg).state_dict()
    piped = plain_to_pipeline_state_dict(plain, cfg)
    embed_key = "tied_modules.embed.weight" if tie else "0.weight"
    assert piped[embed_key] is plain["embed.weight"]
    assert piped["1.weight"] is plain["pos_embed.weight"]
    assert piped["3.ffn.router.weight"] is plain["blocks.1.ffn.router.weight"]
    assert piped["4.norm.weight"] is plain["final_norm.norm.weight"]
    assert ("5.weight" in piped) is not tie
    back = pipeline_to_plain_state_dict(piped, cfg)
    assert back.keys() == plain.keys() and all(back[k] is plain[k] for k in plain)
    assert pipeline_layer_names(cfg)[3] == "blocks.1"
    with pytest.raises(KeyError, match="not a parameter name"):
        plain_to_pipeline_state_dict({"bogus.weight": torch.zeros(1)}, cfg)


@pytest.mark.parametrize("tie", [False, True])
def test_plain_equals_single_stage_pipeline(world1, tie):
    cfg = make_config(tie_embeddings=tie)
    model = GPT(cfg)
    pipe = gpt_pipeline(cfg, num_stages=1)
    assert pipe.parts == pipeline_parts(cfg, 1)
    expected = plain_to_pipeline_state_dict(model.state_dict(), cfg)
    got = pipe.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got)
    assert [m.layer_number for m in moe_layers(pipe)] == [1]
    if tie:  # the first and the last layer use the same embedding module
        assert pipe.forward_funcs[-1].args[0] is pipe.forward_funcs[0]
    t, targets = tokens(), tokens(1)
    for train in (False, True):
        model.train(train)
        pipe.train(train)
        # The same layers on the same batch; a tolerance still, as memory alignment may change the kernel.
        close = float_tolerance(torch.float32, cfg.ffn_hidden_size, depth=cfg.num_layers + 1)
        torch.testing.assert_close(run_pipeline_locally(pipe, t), model(t), **close)
        torch.testing.assert_close(pipe(t), model(t), **close)
    torch.testing.assert_close(pipe.loss_fn(pipe(t), targets), model.loss(model(t), targets), **close)


def _two_stages(rank: int, world_size: int, cfg: GPTConfig) -> None:
    import deepspeed

    os.environ.setdefault("LOCAL_RANK", str(rank))
    deepspeed.init_distributed(dist_backend="gloo")
    pipe = gpt_pipeline(cfg, num_stages=2)
    assert pipe.stage_id == rank and pipe.parts == pipeline_parts(cfg, 2)

    # Identical weights to the plain model, and together the stages hold all of them.
    plain = GPT(cfg)
    expected = plain_to_pipeline_state_dict(plain.state_dict(), cfg)
    local = pipe.state_dict()
    for key, value in local.items():
        assert torch.equal(value, expected[key]), key
    keys: list = [None] * world_size
    dist.all_gather_object(keys, sorted(local))
    assert set().union(*keys) == set(expected)
    parts = pipe.parts
    on_stage = [i for i in cfg.moe_layer_numbers if parts[rank] <= i + 2 < parts[rank + 1]]
    assert [m.layer_number for m in moe_layers(pipe)] == on_stage
    if cfg.tie_embeddings:
        assert "embed" in pipe.tied_comms  # DeepSpeed ties (and all-reduces) the embedding across stages

    # Forward across the stages, only x_BSD crossing, equals the plain model; gradients reach stage 0.
    pipe.train()
    t, targets = tokens(), tokens(1)
    shape = (B, S, cfg.hidden_size)
    if rank == 0:
        x_BSD = pipe(t)
        assert x_BSD.shape == shape
        dist.send(x_BSD.detach().contiguous(), dst=1)
        grad = torch.empty(shape)
        dist.recv(grad, src=1)
        x_BSD.backward(grad)
        assert all(p.grad is not None for p in pipe.parameters())
    else:
        x_BSD = torch.empty(shape)
        dist.recv(x_BSD, src=0)
        x_BSD.requires_grad_(True)
        logits = pipe(x_BSD)
        plain.train()
        torch.testing.assert_close(logits, plain(t), rtol=1e-6, atol=1e-6)
        pipe.loss_fn(logits, targets).backward()
        dist.send(x_BSD.grad, dst=0)
        assert all(layer.router.weight.grad.abs().sum() > 0 for layer in moe_layers(pipe))


def test_two_stage_pipeline_matches_plain_model():
    cfg = make_config(tie_embeddings=True)
    assert pipeline_parts(cfg, 2) == [0, 3, 6]  # stage 0: embeddings + dense block 0 (no MoE layer)
    run_distributed(_two_stages, 2, cfg)
