"""Tiny Hugging Face models and tokenizers built offline, for the command-line and training tests."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch

EOS = "<|endoftext|>"


def tiny_tokenizer(dest: Path, vocab_size: int = 400) -> Path:
    """A byte-level BPE (every text encodes, no unknown token) trained on a few stdlib files, saved as
    tokenizer.json + tokenizer_config.json the way transformers does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = [(stdlib / name).read_text() for name in ("functools.py", "textwrap.py", "bisect.py")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(text, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS).save_pretrained(str(dest))
    return dest


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Every weight non-default (norm weights too), reproducibly."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))


def tiny_qwen3_moe(dest: Path, vocab_size: int, dtype: torch.dtype = torch.float32, **overrides) -> Path:
    """A random 2-layer Qwen3-MoE (4 experts, top-2) saved with transformers' save_pretrained."""
    import transformers

    kw = dict(
        COMMON,
        vocab_size=vocab_size,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_experts=4,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    kw.update(overrides)
    model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**kw))
    randomize_(model)
    model.to(dtype).save_pretrained(str(dest))
    return dest


def tiny_qwen3_moe_with_tokenizer(dest: Path) -> Path:
    """The tiny Qwen3-MoE and its own tokenizer in one directory, as on the Hub."""
    tiny_tokenizer(dest)
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(dest / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    return tiny_qwen3_moe(dest, vocab_size=vocab + 3)  # a little padding, as real models have


COMMON = dict(
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    num_experts_per_tok=2,
    max_position_embeddings=128,
    bos_token_id=None,
    pad_token_id=None,
    eos_token_id=0,
)
# GLM-4.5's and DeepSeek-V3's expert layout: 8 routed experts in 2 groups, one shared, a dense first layer.
_GROUPED_ROUTING = dict(
    n_routed_experts=8,
    moe_intermediate_size=16,
    intermediate_size=48,
    n_shared_experts=1,
    first_k_dense_replace=1,
    n_group=2,
    topk_group=1,
    routed_scaling_factor=2.5,
)
# DeepSeek's multi-head latent attention at a tiny width (V2 and V3).
_MLA = dict(num_key_value_heads=4, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, head_dim=4)
# One tiny config per family, with the family's features switched on (dense layers, shared experts, ...).
FAMILY_CONFIGS = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, intermediate_size=16)),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(num_experts=4, moe_intermediate_size=16, intermediate_size=48, mlp_only_layers=[1], norm_topk_prob=True),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(num_experts=4, moe_intermediate_size=16, intermediate_size=48, shared_expert_intermediate_size=24),
    ),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=4, intermediate_size=16, tie_word_embeddings=True)),
    "glm4_moe": (
        "Glm4MoeConfig",
        "Glm4MoeForCausalLM",
        dict(
            **_GROUPED_ROUTING,
            use_qk_norm=True,
            head_dim=8,
        ),
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(
            **_GROUPED_ROUTING,
            **_MLA,
            q_lora_rank=16,
            num_nextn_predict_layers=0,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 32,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
            },
        ),
    ),
    "deepseek_v2": (
        "DeepseekV2Config",
        "DeepseekV2ForCausalLM",
        dict(
            _GROUPED_ROUTING,
            n_shared_experts=2,
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            routed_scaling_factor=1.5,
            **_MLA,
            q_lora_rank=None,
        ),
    ),
    "llama4_text": (
        "Llama4TextConfig",
        "Llama4ForCausalLM",
        dict(
            num_local_experts=4,
            num_experts_per_tok=1,
            intermediate_size=16,
            intermediate_size_mlp=48,
            interleave_moe_layer_step=2,
            no_rope_layer_interval=2,
            attention_chunk_size=4,
            floor_scale=4,
            attn_scale=0.3,
        ),
    ),
    "gpt_oss": (
        "GptOssConfig",
        "GptOssForCausalLM",
        dict(
            num_local_experts=4,
            intermediate_size=16,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            swiglu_limit=1.0,
        ),
    ),
}


def tiny_family_model(
    family: str,
    dest: Path,
    vocab_size: int = 96,
    dtype=torch.float32,
    seed: int = 0,
    shape: dict | None = None,
    **save_kw,
):
    """A random tiny model of ``family`` (every weight and buffer non-default) saved to ``dest``;
    ``shape`` overrides config fields (e.g. :func:`random_family_overrides`). Returns the
    transformers model (fp32)."""
    import transformers

    config_class, model_class, extra = FAMILY_CONFIGS[family]
    kw = {**COMMON, **extra, "vocab_size": vocab_size}
    if family == "olmoe":
        kw.pop("head_dim")
    kw.update(shape or {})
    if family == "gpt_oss":  # one attention pattern per block
        kw["layer_types"] = (kw["layer_types"] * kw["num_hidden_layers"])[: kw["num_hidden_layers"]]
    config = getattr(transformers, config_class)(**kw)
    model = getattr(transformers, model_class)(config)
    randomize_(model, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.1 * torch.randn(buf.shape, generator=gen))
    model.to(dtype)
    keep = getattr(model, "_keep_in_fp32_modules_strict", None) or []  # as transformers saves them (GLM's router)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if any(k in name for k in keep):
                tensor.data = tensor.data.float()
    model.save_pretrained(str(dest), **save_kw)
    return model.float()


def random_family_overrides(family: str, seed: int) -> dict:
    """A random valid shape for ``family`` (layers, heads, experts, top-k, ties, dense layers, groups)."""
    import random

    rng = random.Random(seed)
    layers = rng.randint(1, 3)
    heads = rng.choice([2, 4])
    experts = rng.choice([2, 4, 6, 8])
    kw = dict(
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=rng.choice([g for g in (1, 2, 4) if heads % g == 0]),
        head_dim=rng.choice([4, 8]),
        num_experts_per_tok=rng.randint(1, min(3, experts)),
        tie_word_embeddings=rng.random() < 0.5,
    )
    if family == "mixtral":
        kw.update(num_local_experts=experts)
    elif family == "qwen3_moe":
        dense = rng.sample(range(layers), rng.randint(0, layers - 1))
        kw.update(num_experts=experts, mlp_only_layers=sorted(dense), norm_topk_prob=rng.random() < 0.5)
    elif family == "qwen2_moe":
        kw.update(num_experts=experts, shared_expert_intermediate_size=rng.choice([8, 24]))
    elif family == "olmoe":
        kw.update(num_experts=experts, head_dim=32 // heads)
    elif family == "glm4_moe":
        experts = rng.choice([4, 8])
        groups = rng.choice(
            [g for g in (1, 2, 4) if experts % g == 0 and experts // g >= 2]
        )  # transformers: top-2 per group
        topk_groups = rng.choice([t for t in range(1, groups + 1) if t * experts // groups >= 2])  # room for top-2
        top_k = rng.randint(2, min(4, topk_groups * experts // groups))
        kw.update(
            n_routed_experts=experts,
            n_group=groups,
            topk_group=topk_groups,
            num_experts_per_tok=top_k,
            first_k_dense_replace=rng.randint(0, layers - 1),
            n_shared_experts=rng.randint(1, 2),
            use_qk_norm=rng.random() < 0.5,
        )
    elif family in ("deepseek_v3", "deepseek_v2"):
        experts = rng.choice([4, 8])
        groups = rng.choice([g for g in (1, 2) if experts // g >= 2])
        kw.update(
            n_routed_experts=experts,
            n_group=groups,
            topk_group=groups,
            num_experts_per_tok=rng.randint(2, 3),
            num_key_value_heads=heads,
            first_k_dense_replace=rng.randint(0, layers - 1),
            q_lora_rank=rng.choice([None, 8]),
            head_dim=4,
        )
    elif family == "llama4_text":
        kw.update(
            num_local_experts=experts,
            num_experts_per_tok=1,
            interleave_moe_layer_step=rng.choice([1, 2]) if layers >= 2 else 1,  # at least one MoE layer
            use_qk_norm=rng.random() < 0.5,
            attn_temperature_tuning=rng.random() < 0.5,
        )
    elif family == "gpt_oss":
        kw.update(num_local_experts=experts, swiglu_limit=rng.choice([0.5, 7.0]))
    return kw
