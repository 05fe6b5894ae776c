"""Tiny random Hugging Face models of every supported family, built offline from transformers' config
classes, with every weight (norms, biases, correction biases too) set to non-default values."""

from __future__ import annotations

import math
import random
from pathlib import Path

import torch

# transformers' plainest forward as the oracle (its default grouped-GEMM experts need aligned sizes on CPU).
EAGER = {"attn_implementation": "eager", "experts_implementation": "eager"}
LINEAR_ROPE = {"rope_type": "linear", "factor": 2.0}
# Small original context so that tiny heads have frequencies in all three Llama-3 regimes.
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
FAMILIES = (
    "mixtral",
    "qwen3_moe",
    "qwen2_moe",
    "olmoe",
    "glm4_moe",
    "deepseek_v3",
    "deepseek_v2",
    "llama4_text",
    "gpt_oss",
)
NEW_FAMILIES = ("deepseek_v3", "deepseek_v2", "llama4_text", "gpt_oss")


def yarn_rope(rng: random.Random, mla: bool) -> dict:
    """YaRN over a short original context, so that tiny heads have interpolated, blended and kept
    frequencies; DeepSeek's two mscales when ``mla``."""
    rope = {"rope_type": "yarn", "factor": rng.choice([4.0, 8.0]), "original_max_position_embeddings": 8}
    rope.update(beta_fast=rng.choice([8.0, 32.0]), beta_slow=1.0, truncate=rng.random() < 0.5)
    if mla:
        rope.update(mscale=rng.choice([0.707, 1.0]), mscale_all_dim=rng.choice([0.707, 1.0]))
    return rope


def random_hf_config(model_type: str, seed: int, min_layers: int = 2, even_experts: bool = False):
    """A random tiny config of ``model_type``: sizes, heads, top-k, groups and dense-layer patterns."""
    import transformers

    rng = random.Random(f"{model_type}/{seed}")
    heads = rng.choice([2, 4])
    kv_heads = rng.choice([g for g in (1, 2, heads) if heads % g == 0])
    head_dim = rng.choice([4, 8]) if model_type in ("glm4_moe", "olmoe") else rng.choice([4, 6, 8])
    hidden = heads * head_dim if model_type == "olmoe" else rng.choice([12, 16, 20])
    layers = rng.randint(min_layers, 4)
    experts = rng.choice([4, 6, 8] if even_experts else [3, 4, 6, 8])
    top_k = rng.randint(1, min(3, experts))
    common = dict(
        vocab_size=rng.randint(40, 90),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=rng.choice([1e-5, 1e-6]),
        tie_word_embeddings=rng.random() < 0.3,
        rope_parameters={"rope_type": "default", "rope_theta": rng.choice([10000.0, 1e6])},
        num_experts_per_tok=top_k,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    scaling = rng.choice([None, None, None, LINEAR_ROPE, LLAMA3_ROPE])
    if scaling is not None and model_type != "glm4_moe":
        common["rope_parameters"].update(scaling)
    dense_ffn, expert_ffn = rng.choice([16, 24]), rng.choice([6, 8, 12])
    if model_type in NEW_FAMILIES:
        return _new_family_config(transformers, model_type, rng, common, experts, dense_ffn, expert_ffn)
    if model_type == "mixtral":
        window = rng.choice([None, None, rng.randint(2, 6)])
        return transformers.MixtralConfig(
            **common, num_local_experts=experts, intermediate_size=expert_ffn, sliding_window=window
        )
    if model_type in ("qwen3_moe", "qwen2_moe"):
        step = rng.choice([1, 1, 2])
        kw = dict(
            num_experts=experts,
            moe_intermediate_size=expert_ffn,
            intermediate_size=dense_ffn,
            decoder_sparse_step=step,
            mlp_only_layers=sorted(rng.sample(range(layers), rng.randint(0, layers - 1))),
            norm_topk_prob=rng.random() < 0.5,
        )
        kw.update(use_sliding_window=rng.random() < 0.3, sliding_window=rng.randint(2, 6))
        if model_type == "qwen3_moe":
            return transformers.Qwen3MoeConfig(**common, **kw, attention_bias=rng.random() < 0.5)
        return transformers.Qwen2MoeConfig(
            **common,
            **kw,
            qkv_bias=rng.random() < 0.7,
            shared_expert_intermediate_size=rng.choice([8, 20]),
            max_window_layers=rng.randint(1, layers),
        )
    if model_type == "olmoe":
        return transformers.OlmoeConfig(
            **common,
            num_experts=experts,
            intermediate_size=expert_ffn,
            norm_topk_prob=rng.random() < 0.5,
            attention_bias=rng.random() < 0.5,
            clip_qkv=rng.choice([None, 1.5]),
        )
    # GLM-4.5: groups of >= 2 experts (DeepSeek-V3 scores a group by its best two), k >= 2.
    experts = rng.choice([4, 8, 12])
    groups = rng.choice([g for g in (2, 4) if experts % g == 0 and experts // g >= 2])  # n_group=1: router tests
    topk_group = rng.randint(1, max(1, groups - 1)) if rng.random() < 0.8 else groups  # mostly a real limit
    common.update(num_experts_per_tok=rng.randint(2, min(4, topk_group * experts // groups)))
    common["rope_parameters"]["partial_rotary_factor"] = rng.choice([0.5, 1.0])
    kw = _grouped_experts(rng, layers, experts, groups, topk_group, expert_ffn, dense_ffn)
    return transformers.Glm4MoeConfig(**common, **kw, use_qk_norm=seed % 2 == 0)  # both kinds among the draws


def _grouped_experts(
    rng: random.Random, layers: int, experts: int, groups: int, topk_group: int, expert_ffn: int, dense_ffn: int
) -> dict:
    """The expert and routing fields GLM-4.5 and DeepSeek share (drawn in one order, so a seed keeps its
    config): shared experts, group-limited routing, scaling, dense first layers, attention biases."""
    return dict(
        n_routed_experts=experts,
        moe_intermediate_size=expert_ffn,
        intermediate_size=dense_ffn,
        n_shared_experts=rng.choice([1, 2]),
        n_group=groups,
        topk_group=topk_group,
        routed_scaling_factor=rng.choice([1.0, 2.5]),
        norm_topk_prob=rng.random() < 0.7,
        first_k_dense_replace=rng.randint(0, layers - 1),
        attention_bias=rng.random() < 0.5,
    )


def _groups(rng: random.Random, experts: int) -> tuple[int, int, int]:
    """(n_group, topk_group, top_k) with groups of >= 2 experts and k within the kept groups."""
    groups = rng.choice([g for g in (1, 2, 4) if experts % g == 0 and experts // g >= 2])
    topk_group = rng.randint(1, max(1, groups - 1)) if rng.random() < 0.8 else groups
    return groups, topk_group, rng.randint(2, min(4, topk_group * experts // groups))


def _new_family_config(transformers, model_type: str, rng, common: dict, experts: int, dense_ffn: int, expert_ffn: int):
    layers = common["num_hidden_layers"]
    if model_type in ("deepseek_v3", "deepseek_v2"):
        experts = rng.choice([4, 8])
        groups, topk_group, top_k = _groups(rng, experts)
        heads = common["num_attention_heads"]
        rope_dim = rng.choice([4, 8])
        common.update(num_experts_per_tok=top_k, num_key_value_heads=heads, head_dim=rope_dim)
        if rng.random() < 0.5:
            common["rope_parameters"].update(yarn_rope(rng, mla=True))
        kw = dict(
            **_grouped_experts(rng, layers, experts, groups, topk_group, expert_ffn, dense_ffn),
            q_lora_rank=rng.choice([None, 6, 12]),
            kv_lora_rank=rng.choice([6, 8]),
            qk_nope_head_dim=rng.choice([4, 8]),
            qk_rope_head_dim=rope_dim,
            v_head_dim=rng.choice([4, 6, 8]),
        )
        if model_type == "deepseek_v3":
            return transformers.DeepseekV3Config(
                **common, **kw, rope_interleave=rng.random() < 0.7, num_nextn_predict_layers=0
            )
        method = rng.choice(["greedy", "group_limited_greedy"])
        return transformers.DeepseekV2Config(**common, **kw, topk_method=method)
    if model_type == "llama4_text":
        interval = rng.choice([2, 3, 4])
        moe = dict(interleave_moe_layer_step=rng.choice([1, 2]))
        if rng.random() < 0.3:
            moe = dict(moe_layers=sorted(rng.sample(range(layers), rng.randint(1, layers))))
        common.update(num_experts_per_tok=rng.choice([1, 1, 2]))
        return transformers.Llama4TextConfig(
            **common,
            **moe,
            num_local_experts=experts,
            intermediate_size=expert_ffn,
            intermediate_size_mlp=dense_ffn,
            no_rope_layer_interval=interval,
            attention_chunk_size=rng.choice([3, 4, 5, None]),
            use_qk_norm=rng.random() < 0.6,
            attn_temperature_tuning=rng.random() < 0.7,
            floor_scale=rng.choice([2, 4]),
            attn_scale=rng.choice([0.1, 0.5]),
            attention_bias=rng.random() < 0.3,
        )
    # GPT-OSS: sliding and full blocks, biases everywhere, a clamp the random activations reach.
    if rng.random() < 0.6:
        common["rope_parameters"].update(yarn_rope(rng, mla=False))
    return transformers.GptOssConfig(
        **common,
        num_local_experts=experts,
        intermediate_size=expert_ffn,
        layer_types=[rng.choice(["sliding_attention", "full_attention"]) for _ in range(layers)],
        sliding_window=rng.randint(2, 6),
        swiglu_limit=rng.choice([0.7, 1.5, 7.0]),
        attention_bias=rng.random() < 0.8,
    )


@torch.no_grad()
def randomize_(model, seed: int) -> None:
    """Every parameter and float buffer of an HF model to non-default values, scaled by fan-in."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen)
        if param.dim() == 1:
            value = (1.0 + 0.2 * noise) if "norm" in name else 0.1 * noise
        elif name.endswith("_bias"):  # fused expert biases [E, 2F] / [E, D]
            value = 0.1 * noise
        else:
            fan_in = (
                param.shape[-2] if name.endswith(("experts.gate_up_proj", "experts.down_proj")) else param.shape[-1]
            )
            scale = (2.0 if name.endswith(("gate.weight", "router.weight")) else 1.0) / math.sqrt(fan_in)
            value = noise * scale
        param.copy_(value)
    for name, buf in model.named_buffers():
        if "e_score_correction_bias" in name:
            buf.copy_(0.1 * torch.randn(buf.shape, generator=gen))


def make_hf_model(config, seed: int, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, **EAGER).eval()
    randomize_(model, seed)
    return model.to(dtype)


def save_hf_model(config, seed: int, path: Path, dtype: torch.dtype = torch.float32, max_shard_size=None):
    model = make_hf_model(config, seed, dtype)
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(str(path), **kw)
    return model


def tokens(vocab: int, seed: int = 0, batch: int = 2, seq: int = 11) -> torch.Tensor:
    """Random ids without the pad id 0: transformers' embeddings give the pad row no gradient (ours do)."""
    return torch.randint(1, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max())


def hf_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face directory's safetensors files, by name."""
    from safetensors.torch import load_file

    out = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def assert_same_tensors(original: Path, exported: Path) -> None:
    """The two directories hold the same tensor names with equal dtypes and values, bit for bit."""
    a, b = hf_tensors(original), hf_tensors(exported)
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key
