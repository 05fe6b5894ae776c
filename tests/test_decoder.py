"""The decoder family on its own: config validation, dense/MoE layer patterns, RoPE, causality,
plain <-> pipeline names and layout-independent initialisation."""

from __future__ import annotations

import random

import pytest
import torch

from moe_parallel.integration.pipeline import (
    decoder_pipeline_parts,
    decoder_pipeline_to_plain,
    decoder_plain_to_pipeline,
)
from moe_parallel.models import Decoder, DecoderConfig, DecoderConfigError, decoder_layer_names
from moe_parallel.models.rope import apply_rotary, rotary_cos_sin

BASE = dict(vocab_size=40, num_layers=3, hidden_size=16, num_heads=4, ffn_hidden_size=24)
MOE = dict(num_experts=4, top_k=2, ffn_hidden_size=8, capacity_factor=None, eval_capacity_factor=None)


def make(**overrides) -> DecoderConfig:
    return DecoderConfig(**{**BASE, "moe": dict(MOE), **overrides})


@pytest.mark.parametrize(
    "fields, key",
    [
        (dict(num_kv_heads=3), "num_kv_heads"),
        (dict(hidden_size=18), "num_heads"),
        (dict(head_dim=6, rotary_fraction=0.5), "rotary_fraction"),  # 3 rotated features: odd
        (dict(rotary_fraction=0.0), "rotary_fraction"),
        (dict(qk_norm="layer"), "qk_norm"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "rope_scaling"),
        (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "rope_scaling"),
        (dict(rope_scaling={"rope_type": "linear", "factor": 0.0}), "rope_scaling"),
        (dict(dense_layers=[3]), "dense_layers"),
        (dict(moe_every=-1), "moe_every"),
        (dict(first_dense_layers=-1), "first_dense_layers"),
        (dict(qkv_clip=0.0), "qkv_clip"),
        (dict(norm_eps=0.0), "norm_eps"),
        (dict(moe=None), "moe"),
        (dict(moe={**MOE, "activation": "gelu"}), "moe.activation"),
        (dict(moe={**MOE, "bogus": 1}), "moe"),
    ],
)
def test_invalid_config_names_the_field(fields, key):
    with pytest.raises(DecoderConfigError, match=rf"model\.{key}"):
        make(**fields)


def test_moe_placement_follows_qwen_and_glm_rules():
    rng = random.Random(0)
    for _ in range(50):
        layers = rng.randint(1, 8)
        step = rng.randint(1, 3)
        mlp_only = sorted(rng.sample(range(layers), rng.randint(0, layers)))
        first_dense = rng.randint(0, layers)
        cfg = make(num_layers=layers, moe_every=step, dense_layers=mlp_only, first_dense_layers=first_dense)
        qwen_glm = [i for i in range(layers) if i not in mlp_only and (i + 1) % step == 0 and i >= first_dense]
        assert cfg.moe_layer_numbers == qwen_glm
        model = Decoder(cfg)
        assert [b.layer_number for b in model.blocks if b.is_moe] == qwen_glm
        assert all(b.ffn.layer_number == b.layer_number for b in model.blocks if b.is_moe)
    assert make(moe_every=0, moe=None).moe_layer_numbers == []


@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_is_a_rotation_of_the_first_features_only(interleaved):
    cfg = make(head_dim=8, num_heads=2, rotary_fraction=0.5, rope_theta=100.0)
    cos, sin = rotary_cos_sin(cfg.rotary_dim, cfg.rope_theta, None, 5, torch.device("cpu"), torch.float32)
    x = torch.randn(1, 2, 5, 8)
    y = apply_rotary(x, cos, sin, interleaved)
    torch.testing.assert_close(y[..., 4:], x[..., 4:])  # pass-through features
    torch.testing.assert_close(y[..., :4].norm(dim=-1), x[..., :4].norm(dim=-1))  # a rotation keeps norms
    if not interleaved:
        torch.testing.assert_close(y[:, :, 0], x[:, :, 0])  # position 0: angle 0
    # Relative positions: <R_m q, R_n k> depends on m - n only.
    q, k = torch.randn(8), torch.randn(8)
    rq = apply_rotary(q.expand(1, 1, 5, 8), cos, sin, interleaved)[0, 0]
    rk = apply_rotary(k.expand(1, 1, 5, 8), cos, sin, interleaved)[0, 0]
    torch.testing.assert_close(rq[3] @ rk[1], rq[4] @ rk[2])


@pytest.mark.parametrize("qk_norm", ["none", "head", "projection"])
def test_causal_and_shapes(qk_norm):
    cfg = make(num_kv_heads=2, qk_norm=qk_norm, qkv_bias=True, o_bias=True, tie_embeddings=qk_norm == "head")
    model = Decoder(cfg).eval()
    t = torch.randint(0, 40, (2, 9))
    t2 = t.clone()
    t2[:, 6] = (t2[:, 6] + 1) % 40
    with torch.no_grad():
        a, b = model(t), model(t2)
    assert a.shape == (2, 9, 40)
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=1e-6)  # no position sees a later token
    assert not torch.allclose(a[:, 6:], b[:, 6:])


@pytest.mark.parametrize("tie", [False, True])
def test_plain_and_pipeline_names_round_trip(tie):
    cfg = make(tie_embeddings=tie, first_dense_layers=1)
    state = Decoder(cfg).state_dict()
    piped = decoder_plain_to_pipeline(state, cfg)
    assert decoder_pipeline_to_plain(piped, cfg).keys() == state.keys()
    L = cfg.num_layers
    assert "1.attn.q_proj.weight" in piped and f"{L}.ffn.router.weight" in piped
    assert f"{L + 1}.weight" in piped  # the final norm
    assert ("tied_modules.embed.weight" in piped) == tie and ("0.weight" in piped) == (not tie)
    assert (f"{L + 2}.weight" in piped) == (not tie)  # the untied LM head
    assert decoder_layer_names(cfg)[L + 1] == "final_norm"
    with pytest.raises(KeyError, match="is not a parameter name"):
        decoder_plain_to_pipeline({"nope.weight": 0}, cfg)


def test_pipeline_parts_balance_blocks_and_refuse_too_many_stages():
    cfg = make(num_layers=5)
    for stages in range(1, 6):
        parts = decoder_pipeline_parts(cfg, stages)
        assert parts[0] == 0 and parts[-1] == cfg.num_layers + 3
        blocks = [len(set(range(parts[s], parts[s + 1])) & set(range(1, 6))) for s in range(stages)]
        assert min(blocks) >= 1 and max(blocks) - min(blocks) <= 1
    with pytest.raises(DecoderConfigError, match="num_stages=6"):
        decoder_pipeline_parts(cfg, 6)


def test_initialisation_is_seeded_by_name_not_by_global_rng():
    cfg = make()
    torch.manual_seed(0)
    a = Decoder(cfg).state_dict()
    torch.manual_seed(1)
    b = Decoder(cfg).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = Decoder(make(init_seed=7)).state_dict()
    assert not torch.equal(a["blocks.0.attn.q_proj.weight"], other["blocks.0.attn.q_proj.weight"])
