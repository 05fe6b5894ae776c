"""Decoder blocks under ``torch.compile(fullgraph=True)``: one block of every model family, dense and
MoE, forward and backward against eager, at EP = 1; and :mod:`moe_parallel.training.block_compile`, which
compiles a whole model's blocks in place for training (``train.compile``).

The families are built tiny from transformers' config classes through ``decoder_config_from_hf``, each
with the options its real checkpoints set (GQA, a free head_dim, RoPE scaling, partial rotary, q/k
norms, q/k/v clipping, attention biases, shared experts, sigmoid group-limited routing, dense
layers), so the blocks are the ones a converted checkpoint builds. Most cases use the ``aot_eager``
backend (dynamo and AOTAutograd, eager kernels: fast, and it finds every graph break); ``make test-slow``
adds the other families' dense blocks, inductor (the default backend) and a wider sweep.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from moe_parallel.core.aux_loss import attach_aux_loss
from moe_parallel.hf.families import decoder_config_from_hf
from moe_parallel.models import GPT, Decoder, DecoderBlock, DecoderConfig, GPTConfig, TransformerBlock
from moe_parallel.training.block_compile import DYNAMO_OPTIONS, compile_blocks, compiled_owners, is_compiled
from moe_parallel.training.metrics import MoEMetricsTracker, NonFiniteProbe
from tests.hf_models import FAMILIES, LINEAR_ROPE, LLAMA3_ROPE, random_hf_config
from tests.tolerance import float_tolerance

BATCH, SEQ, HIDDEN = 2, 7, 16


@pytest.fixture(autouse=True)
def dynamo_config():
    """The settings an MoE block compiles under (data-dependent token counts), restored afterwards, and a
    fresh dynamo cache per test: every case compiles from scratch, none hits the recompile limit."""
    torch._dynamo.reset()
    with torch._dynamo.config.patch(DYNAMO_OPTIONS):
        yield
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------- models


def hf_config(model_type: str):
    """A tiny transformers config of ``model_type`` with the options its family's checkpoints use."""
    import transformers

    def common(**over):
        base = dict(
            vocab_size=32,
            hidden_size=HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            num_experts_per_tok=2,
            tie_word_embeddings=False,
        )
        return {**base, **over}

    if model_type == "mixtral":  # GQA, linear RoPE scaling, softmax top-2; every block MoE
        rope = {"rope_type": "default", "rope_theta": 1e6, **LINEAR_ROPE}
        return transformers.MixtralConfig(**common(rope_parameters=rope), num_local_experts=4, intermediate_size=8)
    if model_type == "qwen3_moe":  # head_dim != hidden / heads, one KV head, q/k norm per head, biases, top-1
        rope = {"rope_type": "default", "rope_theta": 10000.0, **LLAMA3_ROPE}
        return transformers.Qwen3MoeConfig(
            **common(num_key_value_heads=1, head_dim=8, num_experts_per_tok=1, rope_parameters=rope),
            num_experts=4, moe_intermediate_size=8, intermediate_size=24, decoder_sparse_step=1,
            mlp_only_layers=[0], norm_topk_prob=True, attention_bias=True,
        )  # fmt: skip
    if model_type == "qwen2_moe":  # q/k/v biases, a gated shared expert, every second block MoE
        return transformers.Qwen2MoeConfig(
            **common(), num_experts=4, moe_intermediate_size=8, intermediate_size=24, decoder_sparse_step=2,
            mlp_only_layers=[], norm_topk_prob=False, qkv_bias=True, shared_expert_intermediate_size=12,
        )  # fmt: skip
    if model_type == "olmoe":  # q/k norm over the projection, q/k/v clipping, biases; every block MoE
        return transformers.OlmoeConfig(
            **common(num_key_value_heads=4), num_experts=8, intermediate_size=8, norm_topk_prob=False,
            attention_bias=True, clip_qkv=1.5,
        )  # fmt: skip
    if model_type in ("deepseek_v3", "deepseek_v2"):  # latent attention (q-LoRA or not), YaRN, groups
        rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 8,
                "mscale": 1.0, "mscale_all_dim": 0.707}  # fmt: skip
        mla = dict(kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=6, head_dim=4)
        kw = dict(
            **common(num_key_value_heads=4, rope_parameters=rope), **mla, n_routed_experts=8,
            moe_intermediate_size=8, intermediate_size=24, n_shared_experts=1, n_group=2, topk_group=1,
            routed_scaling_factor=2.5, first_k_dense_replace=1,
        )  # fmt: skip
        if model_type == "deepseek_v3":
            return transformers.DeepseekV3Config(**kw, q_lora_rank=8, norm_topk_prob=True, num_nextn_predict_layers=0)
        return transformers.DeepseekV2Config(**kw, q_lora_rank=None, topk_method="group_limited_greedy")
    if model_type == "llama4_text":  # chunked RoPE blocks, a NoPE block with temperature, input-weighted top-1
        return transformers.Llama4TextConfig(
            **common(head_dim=8, num_experts_per_tok=1,
                     rope_parameters={"rope_type": "default", "rope_theta": 1e4, **LLAMA3_ROPE}),
            num_local_experts=4, intermediate_size=8, intermediate_size_mlp=24, interleave_moe_layer_step=2,
            no_rope_layer_interval=2, attention_chunk_size=4, floor_scale=2, attn_scale=0.5, use_qk_norm=True,
        )  # fmt: skip
    if model_type == "gpt_oss":  # sinks, sliding windows, biases, clamped SwiGLU, softmax over the top-k
        return transformers.GptOssConfig(
            **common(head_dim=8), num_local_experts=4, intermediate_size=8, sliding_window=3,
            layer_types=["sliding_attention", "full_attention"], swiglu_limit=1.0,
        )  # fmt: skip
    assert model_type == "glm4_moe"  # partial rotary, q/k norm, sigmoid group-limited routing, shared experts
    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    return transformers.Glm4MoeConfig(
        **common(head_dim=8, rope_parameters=rope), n_routed_experts=8, moe_intermediate_size=8,
        intermediate_size=24, n_shared_experts=1, n_group=2, topk_group=1, routed_scaling_factor=2.5,
        norm_topk_prob=True, first_k_dense_replace=1, use_qk_norm=True, attention_bias=True,
    )  # fmt: skip


def family_config(model_type: str, capacity_factor: float | None = None) -> DecoderConfig:
    return decoder_config_from_hf(hf_config(model_type), capacity_factor=capacity_factor)


def family_block(config: DecoderConfig, moe: bool) -> DecoderBlock:
    """The family's first MoE block, or its first dense one (Mixtral and OLMoE have none: block 0 is
    made dense, with the family's attention)."""
    dense = [i for i in range(config.num_layers) if not config.is_moe_layer(i)]
    if not moe and not dense:
        config, dense = dataclasses.replace(config, dense_layers=[0]), [0]
    return DecoderBlock(config, config.moe_layer_numbers[0] if moe else dense[0])


def gpt_config(moe: dict | None = None, **overrides) -> GPTConfig:
    base = dict(vocab_size=32, seq_len=16, num_layers=2, hidden_size=HIDDEN, num_heads=2, ffn_hidden_size=24)
    if moe is None:
        return GPTConfig(**base, moe_every=0, **overrides)
    return GPTConfig(**base, moe_every=1, moe={"num_experts": 4, "top_k": 2, **moe}, **overrides)


@torch.no_grad()
def randomize_(module: nn.Module, seed: int) -> None:
    """Every parameter (and the routers' selection bias) away from its init: norms around 1, biases
    nonzero, matrices of unit-scale outputs, so that every option changes the result."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in module.named_parameters():
        noise = torch.randn(param.shape, generator=gen)
        if param.dim() == 1:
            param.copy_(1.0 + 0.2 * noise if "norm" in name else 0.1 * noise)
        else:
            param.copy_(noise / HIDDEN**0.5)
    for name, buf in module.named_buffers():
        if buf.is_floating_point() and "bias" in name:
            buf.copy_(0.1 * torch.randn(buf.shape, generator=gen))


# ---------------------------------------------------------------------------------------- checks


def forward_backward(block: Callable, module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor):
    """The output and the gradients of the input and of every parameter (None where unused)."""
    x = x.detach().requires_grad_(True)
    torch.manual_seed(0)  # dropout draws the same masks in both runs
    out = block(x)
    if not torch.is_grad_enabled():
        return out, []
    params = [x, *module.parameters()]
    return out, list(torch.autograd.grad(out, params, grad_out, allow_unused=True))


def moe_counts(module: nn.Module) -> torch.Tensor | None:
    stats = getattr(getattr(module, "ffn", None), "last_stats", None)
    return None if stats is None else stats.tokens_per_expert.clone()


def check_block(module: nn.Module, backend: str = "aot_eager", training: bool = True, seed: int = 0) -> None:
    """``torch.compile(module, fullgraph=True)`` against eager: output, input and parameter gradients
    (training) or the output alone (eval, no grad), within the fp32 tolerance of the block's depth."""
    randomize_(module, seed)
    module.train(training)
    hidden = module.attn.config.hidden_size
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(BATCH, SEQ, hidden, generator=gen)
    grad_out = torch.randn(BATCH, SEQ, hidden, generator=gen)
    width = max(p.shape[-1] for p in module.parameters())
    tol = float_tolerance(torch.float32, max(width, BATCH * SEQ), depth=4)
    with torch.set_grad_enabled(training):
        want, want_grads = forward_backward(module, module, x, grad_out)
        want_counts = moe_counts(module)
        compiled = torch.compile(module, fullgraph=True, backend=backend)
        got, got_grads = forward_backward(compiled, module, x, grad_out)
    torch.testing.assert_close(got, want, **tol)
    names = ["input", *(name for name, _ in module.named_parameters())]
    for name, g, w in zip(names, got_grads, want_grads):
        assert (g is None) == (w is None), name
        if w is not None:
            torch.testing.assert_close(g, w, **tol, msg=lambda m, name=name: f"grad of {name}: {m}")
    got_counts = moe_counts(module)
    if want_counts is not None and got_counts is not None:  # the compiled forward's routing statistics
        torch.testing.assert_close(got_counts, want_counts, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------- blocks

# (family, MoE block?, capacity factor): every family's dense and MoE block; Mixtral and Qwen3's MoE
# blocks also with capacity-factor dropping (Qwen3: top-1 routing).
# A family's MoE block holds its attention too: make test compiles the dense block only of the families
# whose checkpoints have dense layers (GLM-4.5, DeepSeek-V3); make test-slow compiles every family's.
DENSE_IN_MAKE_TEST = ("glm4_moe", "deepseek_v3")
FAMILY_CASES = [
    pytest.param(
        family,
        moe,
        cf,
        id=f"{family}-{'moe' if moe else 'dense'}" + ("-capacity" if cf else ""),
        marks=() if moe or family in DENSE_IN_MAKE_TEST else pytest.mark.slow,
    )
    for family, moe, cf in [
        *((family, False, None) for family in FAMILIES),
        *((family, True, None) for family in FAMILIES),
        ("mixtral", True, 1.0),
        ("qwen3_moe", True, 1.0),
    ]
]


@pytest.mark.parametrize("family,moe,capacity_factor", FAMILY_CASES)
def test_family_block_compiles_fullgraph(family, moe, capacity_factor):
    config = family_config(family, capacity_factor)
    block = family_block(config, moe)
    assert block.is_moe == moe
    check_block(block)


# (dense options or MoE router options) of the reference GPT's block.
GPT_CASES = {
    "dense-rmsnorm-gelu": dict(),
    "dense-layernorm-swiglu-dropout": dict(norm="layernorm", activation="swiglu", dropout=0.1),
    "moe-capacity-softmax-top2": dict(moe=dict(capacity_factor=1.0)),
    "moe-dropless-sigmoid-groups-shared": dict(
        moe=dict(
            capacity_factor=None,
            score_func="sigmoid",
            num_groups=2,
            topk_groups=1,
            selection_bias=True,
            shared_expert_ffn_hidden_size=8,
        ),
    ),
    "moe-capacity-top1-position": dict(moe=dict(top_k=1, capacity_factor=1.0, drop_policy="position")),
}


@pytest.mark.parametrize("case", GPT_CASES)
def test_gpt_block_compiles_fullgraph(case):
    check_block(TransformerBlock(gpt_config(**GPT_CASES[case]), 0))


def test_moe_block_in_eval_compiles_fullgraph():
    """Evaluation: no autograd, and the eval capacity factor."""
    config = gpt_config(moe=dict(capacity_factor=1.0, eval_capacity_factor=1.5))
    check_block(TransformerBlock(config, 0), training=False)


@pytest.mark.slow  # a cold inductor cache costs a minute per case; test_layer_compile keeps one in make test
@pytest.mark.parametrize("case", ["gpt-moe-capacity", "mixtral-moe-dropless"])
def test_moe_block_compiles_with_inductor(case):
    """The default backend generates its own kernels: the same results within the fp32 tolerance."""
    if case == "gpt-moe-capacity":
        block = TransformerBlock(gpt_config(moe=dict(capacity_factor=1.0)), 0)
    else:
        block = family_block(family_config("mixtral"), moe=True)
    check_block(block, backend="inductor")


def test_attached_aux_loss_keeps_its_gradient_when_the_output_is_a_graph_input():
    """A view of the attached output, whose input enters the graph from outside (a graph break before
    it): AOTAutograd must not rebuild the view from the input, around the aux-loss backward."""

    def attach_and_view(y, w):
        return attach_aux_loss(y, (w * w).sum()).view(-1)

    y, w = torch.randn(3, 2, requires_grad=True), torch.randn(4, requires_grad=True)
    out = torch.compile(attach_and_view, backend="aot_eager", fullgraph=True)(y, w)
    grad_y, grad_w = torch.autograd.grad(out.sum(), [y, w], allow_unused=True)
    torch.testing.assert_close(grad_y, torch.ones_like(y))
    assert grad_w is not None
    torch.testing.assert_close(grad_w, 2 * w.detach())


# ---------------------------------------------------------------------------------------- whole models


def mixed_decoder(layers: int) -> Decoder:
    """A Qwen2-MoE-like decoder whose blocks alternate dense and MoE."""
    return Decoder(dataclasses.replace(family_config("qwen2_moe"), num_layers=layers))


@pytest.mark.parametrize("kind", ["dense", "mixed"])
def test_blocks_of_one_kind_share_one_graph_whatever_the_depth(kind):
    """Regional compilation compiles each kind of block once: no block guards on its own index."""
    model = mixed_decoder(6)
    if kind == "dense":
        model = Decoder(dataclasses.replace(model.config, moe_every=0, moe=None))
    randomize_(model, 3)
    blocks = compile_blocks(model, backend="aot_eager", fullgraph=True)
    assert len(blocks) == 6 and all(is_compiled(b) for b in model.blocks)
    counters.clear()
    tokens = torch.randint(0, 32, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    model(tokens).sum().backward()
    assert counters["stats"]["unique_graphs"] == (1 if kind == "dense" else 2), dict(counters["stats"])


def run_steps(model: nn.Module, steps: int = 2) -> tuple[list[torch.Tensor], list[torch.Tensor], dict, list]:
    """A few forward/backward passes with the training hooks attached: logits, gradients, the MoE
    metrics of the last step and the probe's labels."""
    tracker, probe = MoEMetricsTracker(model), NonFiniteProbe(model)
    gen = torch.Generator().manual_seed(7)
    logits = []
    for _ in range(steps):
        model.zero_grad()
        probe.start_step()
        tokens = torch.randint(0, 32, (BATCH, SEQ), generator=gen)
        out = model(tokens)
        (out.float() * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        logits.append(out.detach())
    metrics = tracker.reduce()
    labels = [label for label, _ in probe._flags]
    return logits, [p.grad.clone() for p in model.parameters()], metrics, labels


@pytest.mark.parametrize("family", ["gpt", "qwen2_moe"])
def test_compile_blocks_keeps_names_hooks_and_results(family):
    """``compile_blocks`` (what ``train.compile`` runs, with the default ``fullgraph=False``): the same
    state-dict names, logits, gradients and MoE metrics as eager; the probe and the tracker hook the
    compiled blocks, not what runs inside them."""

    def build() -> nn.Module:
        config = gpt_config(moe=dict(capacity_factor=1.0)) if family == "gpt" else family_config("qwen2_moe")
        model = GPT(dataclasses.replace(config, moe_every=2)) if family == "gpt" else Decoder(config)
        randomize_(model, 5)
        return model

    eager, compiled = build(), build()
    names = list(compiled.state_dict())
    compile_blocks(compiled, backend="aot_eager")
    assert list(compiled.state_dict()) == names
    owners = compiled_owners(compiled)
    assert all(owners[id(m)] is compiled.blocks[i] for i in range(2) for m in compiled.blocks[i].modules()
               if m is not compiled.blocks[i])  # fmt: skip
    want_logits, want_grads, want_metrics, want_labels = run_steps(eager)
    got_logits, got_grads, got_metrics, got_labels = run_steps(compiled)
    tol = float_tolerance(torch.float32, 64, depth=4)
    for got, want in zip(got_logits + got_grads, want_logits + want_grads):
        torch.testing.assert_close(got, want, **tol)
    assert got_metrics.keys() == want_metrics.keys() and any(k.startswith("moe/layer_1/") for k in got_metrics)
    for key, want in want_metrics.items():
        assert got_metrics[key] == pytest.approx(want, rel=1e-5, abs=1e-6), key
    block_kind = type(compiled.blocks[0]).__name__
    assert got_labels == [label for label in want_labels if ".attn" not in label and ".ffn" not in label]
    assert f"blocks.1 ({block_kind}, layer 1)" in got_labels


# ---------------------------------------------------------------------------------------- slow sweep

SWEEP_ROUTERS = {
    "softmax-top1-score-after": dict(top_k=1, score_after_topk=True, capacity_factor=None),
    "softmax-top2-unnormalised-probs": dict(normalize_top_k=False, capacity_factor=1.25),
    "sigmoid-top2-scaled": dict(score_func="sigmoid", routed_scaling_factor=2.0, capacity_factor=None),
    "groups-4-top2-bias": dict(num_experts=8, num_groups=4, topk_groups=2, selection_bias=True, capacity_factor=1.0),
    "shared-gated": dict(shared_expert_ffn_hidden_size=8, shared_expert_gate=True, capacity_factor=None),
    "expert-bias-zloss": dict(expert_bias=True, z_loss_coeff=1e-2, min_capacity=0, capacity_factor=0.5),
    "groups-max-router-bias": dict(num_experts=8, num_groups=4, topk_groups=2, group_score="max", router_bias=True),
    "input-weighted-top1-sigmoid": dict(top_k=1, score_func="sigmoid", input_weighted=True, capacity_factor=1.0),
}


@pytest.mark.slow
@pytest.mark.parametrize("router", SWEEP_ROUTERS)
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_gpt_moe_router_sweep(router, activation):
    check_block(TransformerBlock(gpt_config(moe=SWEEP_ROUTERS[router], activation=activation), 0), seed=11)


@pytest.mark.slow
@pytest.mark.parametrize("draw", [0, 1, 2])
@pytest.mark.parametrize("family", FAMILIES)
def test_random_family_blocks(family, draw):
    """Every block of random tiny configs of each family (sizes, GQA, RoPE scaling, dense patterns),
    dropless and with capacity, in training and in evaluation."""
    hf = random_hf_config(family, draw)
    for capacity_factor in (None, 1.0):
        config = decoder_config_from_hf(hf, capacity_factor=capacity_factor)
        for i in range(config.num_layers):
            for training in (True, False):
                torch._dynamo.reset()
                check_block(DecoderBlock(config, i), training=training, seed=draw)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2_moe", "glm4_moe"])
def test_family_moe_block_with_inductor(family):
    check_block(family_block(family_config(family, capacity_factor=1.0), moe=True), backend="inductor")
