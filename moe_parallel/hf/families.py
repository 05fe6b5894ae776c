"""Per-family mapping between a Hugging Face config and a :class:`DecoderConfig`.

Each supported ``model_type`` is one :class:`Family`: how its config fields become ours
(:func:`decoder_config_from_hf`), how ours become its config (:func:`hf_config_from_decoder`), and
where its MoE tensors live (used by ``weights.py``). Anything in a config that changes the forward and
that we do not model is refused with the key and the fix, never ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.config import MoEConfigError
from ..models.decoder import DecoderConfig, DecoderConfigError
from ..models.rope import ROPE_OPTIONAL_KEYS, ROPE_SCALING_KEYS


class HFConversionError(ValueError):
    """A Hugging Face checkpoint or config cannot be converted; the message names the key and the fix."""


@dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str
    config_class: str
    moe_module: str  # the MoE block's attribute in a decoder layer
    expert_proj: tuple[str, str, str]  # per-expert (gate, up, down) weight names
    config_keys: tuple[str, ...]  # keys of the config class the mapping reads (besides NEUTRAL_KEYS)
    shared_module: str | None = None  # the shared expert's attribute in the MoE block, if any
    shared_gate: bool = False  # a sigmoid gate on the shared expert (``shared_expert_gate``)
    selection_bias: bool = False  # the router has ``e_score_correction_bias``
    # HF keys transformers keeps in float32 in a bf16/fp16 model (its _keep_in_fp32_modules_strict):
    # loaded and written as float32 here too.
    keep_fp32: tuple[str, ...] = ()
    dense_module: str = "mlp"  # a dense block's FFN attribute
    router_module: str = "gate"  # the router's attribute in the MoE block
    fused_experts: bool = False  # one tensor per layer holds all experts (see weights.py)
    interleaved_gate_up: bool = False  # ... with gate and up columns alternating (GPT-OSS)
    inert_keys: tuple[str, ...] = ()  # keys of the config class that transformers' forward never reads

    def keeps_fp32(self, key: str) -> bool:
        return key.endswith(".e_score_correction_bias") or any(key.endswith(s) for s in self.keep_fp32)


_COMMON_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "rms_norm_eps",
    "tie_word_embeddings",
    "rope_parameters",
    "attention_dropout",
    "num_experts_per_tok",
    "intermediate_size",
    "is_encoder_decoder",
)
_MLA_KEYS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "qk_head_dim")
_DEEPSEEK_MOE_KEYS = (
    "n_routed_experts",
    "moe_intermediate_size",
    "n_shared_experts",
    "first_k_dense_replace",
    "n_group",
    "topk_group",
    "routed_scaling_factor",
    "norm_topk_prob",
    "attention_bias",
    "head_dim",
)

FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family(
            "mixtral",
            "MixtralForCausalLM",
            "MixtralConfig",
            "block_sparse_moe",
            ("w1", "w3", "w2"),
            (*_COMMON_KEYS, "num_local_experts", "head_dim", "router_jitter_noise", "sliding_window"),
        ),
        Family(
            "qwen3_moe",
            "Qwen3MoeForCausalLM",
            "Qwen3MoeConfig",
            "mlp",
            ("gate_proj", "up_proj", "down_proj"),
            (
                *_COMMON_KEYS,
                "num_local_experts",
                "head_dim",
                "moe_intermediate_size",
                "decoder_sparse_step",
                "mlp_only_layers",
                "norm_topk_prob",
                "attention_bias",
                "sliding_window",
                "use_sliding_window",
            ),
        ),
        Family(
            "qwen2_moe",
            "Qwen2MoeForCausalLM",
            "Qwen2MoeConfig",
            "mlp",
            ("gate_proj", "up_proj", "down_proj"),
            (
                *_COMMON_KEYS,
                "num_experts",
                "head_dim",
                "moe_intermediate_size",
                "decoder_sparse_step",
                "mlp_only_layers",
                "norm_topk_prob",
                "qkv_bias",
                "shared_expert_intermediate_size",
                "sliding_window",
                "use_sliding_window",
                "max_window_layers",
                "layer_types",
            ),
            shared_module="shared_expert",
            shared_gate=True,
        ),
        Family(
            "olmoe",
            "OlmoeForCausalLM",
            "OlmoeConfig",
            "mlp",
            ("gate_proj", "up_proj", "down_proj"),
            (*_COMMON_KEYS, "num_experts", "head_dim", "norm_topk_prob", "attention_bias", "clip_qkv"),
        ),
        Family(
            "glm4_moe",
            "Glm4MoeForCausalLM",
            "Glm4MoeConfig",
            "mlp",
            ("gate_proj", "up_proj", "down_proj"),
            (*_COMMON_KEYS, *_DEEPSEEK_MOE_KEYS, "use_qk_norm", "num_nextn_predict_layers"),
            shared_module="shared_experts",
            selection_bias=True,
            keep_fp32=(".gate.weight", ".e_score_correction_bias"),
        ),
        Family(
            "deepseek_v3",
            "DeepseekV3ForCausalLM",
            "DeepseekV3Config",
            "mlp",
            ("gate_proj", "up_proj", "down_proj"),
            (*_COMMON_KEYS, *_DEEPSEEK_MOE_KEYS, *_MLA_KEYS, "rope_interleave", "num_nextn_predict_layers"),
            shared_module="shared_experts",
            selection_bias=True,
            keep_fp32=(".gate.weight", ".e_score_correction_bias"),
        ),
        Family(
            "deepseek_v2",
            "DeepseekV2ForCausalLM",
            "DeepseekV2Config",
            "mlp",
            ("gate_proj", "up_proj", "down_proj"),
            (*_COMMON_KEYS, *_DEEPSEEK_MOE_KEYS, *_MLA_KEYS, "topk_method", "mlp_bias"),
            shared_module="shared_experts",
            keep_fp32=(".gate.weight",),
        ),
        Family(
            "llama4_text",
            "Llama4ForCausalLM",
            "Llama4TextConfig",
            "feed_forward",
            ("gate_proj", "up_proj", "down_proj"),
            (
                *_COMMON_KEYS,
                "num_local_experts",
                "head_dim",
                "intermediate_size_mlp",
                "moe_layers",
                "interleave_moe_layer_step",
                "attention_bias",
                "use_qk_norm",
                "no_rope_layers",
                "no_rope_layer_interval",
                "attention_chunk_size",
                "layer_types",
                "attn_temperature_tuning",
                "floor_scale",
                "attn_scale",
            ),
            shared_module="shared_expert",
            dense_module="feed_forward",
            router_module="router",
            fused_experts=True,
            inert_keys=("router_jitter_noise",),
        ),
        Family(
            "gpt_oss",
            "GptOssForCausalLM",
            "GptOssConfig",
            "mlp",
            ("gate_proj", "up_proj", "down_proj"),
            (
                *_COMMON_KEYS,
                "num_local_experts",
                "head_dim",
                "attention_bias",
                "layer_types",
                "sliding_window",
                "swiglu_limit",
                "swiglu_alpha",
            ),
            router_module="router",
            fused_experts=True,
            interleaved_gate_up=True,
        ),
    )
}
# Multimodal checkpoints whose text tower is a supported family: model_type -> (the tower's
# model_type, the prefix of its tensors). The other towers' tensors are left unread; an export writes
# the text model alone, as its family (Llama4ForCausalLM).
TEXT_TOWERS = {"llama4": ("llama4_text", "language_model.")}

# Dense families that sparse upcycling starts from, and the MoE family each becomes.
UPCYCLE_FAMILIES = {"llama": "mixtral", "qwen3": "qwen3_moe"}

# config.json keys that do not change the forward: carried along unchanged on export.
CARRIED_KEYS = (
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "max_position_embeddings",
    "router_aux_loss_coef",
    "output_router_logits",
    "use_cache",
    "max_window_layers",
)
# Keys of every config class that never change the forward (transformers' bookkeeping, token ids,
# generation and tensor-parallel settings, and options transformers' forward does not read).
NEUTRAL_KEYS = (
    *CARRIED_KEYS,
    "_name_or_path",
    "architectures",
    "chunk_size_feed_forward",
    "dtype",
    "id2label",
    "label2id",
    "model_type",
    "output_attentions",
    "output_hidden_states",
    "problem_type",
    "return_dict",
    "transformers_version",
    "initializer_range",
    "pretraining_tp",  # a tensor-parallel slicing of the same products
    "quantization_config",  # how the weights are stored; read by the loader (quantized.py)
)


def family(model_type: str | None) -> Family:
    """The :class:`Family` of ``model_type`` (or of its text tower); a clear error for anything else."""
    if model_type in TEXT_TOWERS:
        return FAMILIES[TEXT_TOWERS[model_type][0]]
    if model_type not in FAMILIES:
        hint = ""
        if model_type in UPCYCLE_FAMILIES:
            hint = f" (a dense model: use moe_parallel.hf.upcycle to turn it into a {UPCYCLE_FAMILIES[model_type]} MoE)"
        raise HFConversionError(
            f"config.json model_type={model_type!r} is not supported{hint}: supported are {sorted(FAMILIES)}"
        )
    return FAMILIES[model_type]


def read_config_json(path: str | Path) -> dict[str, Any]:
    file = Path(path) / "config.json"
    if not file.is_file():
        raise HFConversionError(f"{file} is missing: give a Hugging Face model directory (config.json + *.safetensors)")
    try:
        raw = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise HFConversionError(f"{file} is not valid JSON ({err}): fix or re-download it") from None
    if not isinstance(raw, dict):
        raise HFConversionError(f"{file} holds a JSON {type(raw).__name__}, not an object: fix or re-download it")
    return raw


def load_hf_config(path: str | Path, allowed: tuple[str, ...] | None = None):
    """The transformers config object of the directory, after checking its ``model_type``."""
    from transformers import AutoConfig

    raw = read_config_json(path)
    model_type = raw.get("model_type")
    if allowed is None:
        family(model_type)
    elif model_type not in allowed:
        raise HFConversionError(
            f"config.json model_type={model_type!r} is not supported here: use one of {list(allowed)}"
        )
    try:
        config = AutoConfig.from_pretrained(str(path))
        return config.text_config if model_type in TEXT_TOWERS else config
    except (KeyError, ValueError, TypeError) as err:  # transformers' own checks of the values
        message = str(err).strip('"')
        raise HFConversionError(
            f"{Path(path) / 'config.json'} is refused by transformers' {model_type} config ({message}): fix the key"
        ) from None


# ---------------------------------------------------------------------------------------- HF -> ours


def _get(cfg, key: str, default: Any = None) -> Any:
    return getattr(cfg, key, default)


def _refuse(model_type: str, key: str, value: Any, fix: str) -> None:
    raise HFConversionError(f"{model_type} config.json {key}={value!r} is not supported: {fix}")


def _rope(cfg, model_type: str, partial: bool) -> tuple[float, float, dict[str, Any] | None]:
    """(rope_theta, rotary fraction, scaling): default RoPE, linear, Llama-3 or YaRN scaling."""
    rope = dict(_get(cfg, "rope_parameters") or {})
    if not rope and _get(cfg, "rope_theta") is not None:  # older transformers configs
        rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", *ROPE_SCALING_KEYS):
        _refuse(
            model_type,
            "rope_parameters.rope_type",
            rope_type,
            f"supported are default, {', '.join(ROPE_SCALING_KEYS)} (no dynamic or longrope yet)",
        )
    scaling = None
    if rope_type != "default":
        rope.setdefault("original_max_position_embeddings", _get(cfg, "max_position_embeddings"))
        if rope_type == "yarn" and rope.get("factor") is None:  # transformers' default: the context ratio
            rope["factor"] = cfg.max_position_embeddings / rope["original_max_position_embeddings"]
        keys = (*ROPE_SCALING_KEYS[rope_type], *ROPE_OPTIONAL_KEYS[rope_type])
        scaling = {"rope_type": rope_type, **{key: rope[key] for key in keys if rope.get(key) is not None}}
    fraction = float(rope.get("partial_rotary_factor", 1.0)) if partial else 1.0
    return float(rope.get("rope_theta", 10000.0)), fraction, scaling


def decoder_config_from_hf(
    cfg,
    *,
    capacity_factor: float | None = None,
    moe_overrides: dict[str, Any] | None = None,
) -> DecoderConfig:
    """Our :class:`DecoderConfig` for a transformers config object of a supported family.

    MoE layers are dropless (``capacity_factor=None``) unless ``capacity_factor`` is given (it sets
    the training capacity; evaluation stays dropless). ``moe_overrides`` sets any other
    :class:`MoEConfig` field (e.g. ``aux_loss_coeff``, ``expert_bias_update_rate``).
    """
    mt = cfg.model_type
    family(mt)
    if _get(cfg, "hidden_act", "silu") != "silu":
        _refuse(mt, "hidden_act", cfg.hidden_act, "only SwiGLU (hidden_act='silu') experts are supported")
    if float(_get(cfg, "attention_dropout", 0.0) or 0.0) != 0.0:
        _refuse(mt, "attention_dropout", cfg.attention_dropout, "set it to 0.0 (attention dropout is not modelled)")
    if _get(cfg, "is_encoder_decoder", False):
        _refuse(mt, "is_encoder_decoder", True, "only decoder-only models are supported")
    if _get(cfg, "mlp_bias", False):
        _refuse(mt, "mlp_bias", True, "FFN biases are not supported")
    theta, fraction, scaling = _rope(cfg, mt, partial=mt == "glm4_moe")

    D, H = cfg.hidden_size, cfg.num_attention_heads
    head_dim = _get(cfg, "head_dim") or D // H
    model: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size,
        num_layers=cfg.num_hidden_layers,
        hidden_size=D,
        num_heads=H,
        num_kv_heads=_get(cfg, "num_key_value_heads") or H,
        head_dim=head_dim,
        ffn_hidden_size=cfg.intermediate_size,
        rope_theta=theta,
        rotary_fraction=fraction,
        rope_scaling=scaling,
        norm_eps=float(cfg.rms_norm_eps),
        tie_embeddings=bool(_get(cfg, "tie_word_embeddings", False)),
        init_std=float(_get(cfg, "initializer_range", 0.02)),
        hf_model_type=mt,
    )
    moe: dict[str, Any] = dict(top_k=cfg.num_experts_per_tok, score_func="softmax", normalize_top_k=True)
    _FROM_HF[mt](cfg, model, moe)
    if moe["score_func"] == "softmax" and moe["top_k"] == 1 and moe["normalize_top_k"]:
        moe["score_after_topk"] = True  # the single weight is exactly 1, as theirs
    moe.update(capacity_factor=capacity_factor, eval_capacity_factor=None, z_loss_coeff=0.0, init_std=model["init_std"])
    moe.setdefault("aux_loss_coeff", float(_get(cfg, "router_aux_loss_coef", 0.0) or 0.0))
    moe.update(moe_overrides or {})
    raw = cfg.to_dict()
    model["hf_extra"] = {key: raw[key] for key in CARRIED_KEYS if key in raw}
    try:
        return DecoderConfig(**model, moe=moe)
    except (DecoderConfigError, MoEConfigError) as err:
        raise HFConversionError(f"{mt} config.json maps to an invalid model config: {err}") from err


def _window(cfg, mt: str, model: dict[str, Any], sliding: list[bool]) -> None:
    """Sliding-window blocks where ``sliding[i]``, with the config's ``sliding_window``."""
    if any(sliding):
        window = cfg.sliding_window
        if not isinstance(window, int) or window < 1:
            _refuse(mt, "sliding_window", window, "give a positive window size, or turn sliding windows off")
        model.update(
            sliding_window=window, layer_types=["sliding_attention" if s else "full_attention" for s in sliding]
        )


def _from_mixtral(cfg, model: dict[str, Any], moe: dict[str, Any]) -> None:
    moe.update(num_experts=cfg.num_local_experts, ffn_hidden_size=cfg.intermediate_size)
    jitter = float(_get(cfg, "router_jitter_noise", 0.0) or 0.0)
    if jitter > 0:  # training-time noise; ours jitters the router's input only
        moe.update(router_noise="jitter", router_jitter_eps=jitter)
    _window(cfg, "mixtral", model, [_get(cfg, "sliding_window") is not None] * cfg.num_hidden_layers)


def _from_qwen(cfg, model: dict[str, Any], moe: dict[str, Any]) -> None:
    mt = cfg.model_type
    moe.update(
        num_experts=cfg.num_experts,
        ffn_hidden_size=cfg.moe_intermediate_size,
        normalize_top_k=bool(_get(cfg, "norm_topk_prob", True)),
    )
    model.update(moe_every=cfg.decoder_sparse_step, dense_layers=list(_get(cfg, "mlp_only_layers", []) or []))
    if cfg.num_experts == 0:
        model["moe_every"] = 0
    if mt == "qwen3_moe":
        bias = bool(_get(cfg, "attention_bias", False))
        model.update(qkv_bias=bias, o_bias=bias, qk_norm="head")
        # transformers' Qwen3-MoE: one window for every block when sliding_window is set (its config
        # clears it unless use_sliding_window)
        _window(cfg, mt, model, [_get(cfg, "sliding_window") is not None] * cfg.num_hidden_layers)
    else:
        model.update(qkv_bias=bool(_get(cfg, "qkv_bias", True)))
        shared = cfg.shared_expert_intermediate_size
        if shared <= 0:
            _refuse(mt, "shared_expert_intermediate_size", shared, "Qwen2-MoE models need a shared expert (> 0)")
        moe.update(shared_expert_ffn_hidden_size=shared, shared_expert_gate=True)
        _window(cfg, mt, model, [t == "sliding_attention" for t in cfg.layer_types])


def _from_olmoe(cfg, model: dict[str, Any], moe: dict[str, Any]) -> None:
    D, H, head_dim = cfg.hidden_size, cfg.num_attention_heads, model["head_dim"]
    moe.update(
        num_experts=cfg.num_experts,
        ffn_hidden_size=cfg.intermediate_size,
        normalize_top_k=bool(_get(cfg, "norm_topk_prob", True)),
    )
    bias = bool(_get(cfg, "attention_bias", False))
    model.update(qkv_bias=bias, o_bias=bias, qk_norm="projection", qkv_clip=_get(cfg, "clip_qkv"))
    if head_dim * H != D:
        _refuse("olmoe", "head_dim", head_dim, f"OLMoE normalises q over hidden_size, so head_dim must be {D // H}")


def _deepseek_moe(cfg, model: dict[str, Any], moe: dict[str, Any]) -> None:
    """What GLM-4.5 and DeepSeek-V2/V3 share: routed and shared experts, groups, leading dense blocks."""
    mt = cfg.model_type
    if cfg.n_shared_experts is None or cfg.n_shared_experts <= 0:
        _refuse(mt, "n_shared_experts", cfg.n_shared_experts, f"{mt} models need at least one shared expert")
    moe.update(
        num_experts=cfg.n_routed_experts,
        ffn_hidden_size=cfg.moe_intermediate_size,
        num_groups=cfg.n_group or 1,
        topk_groups=cfg.topk_group or 1,
        routed_scaling_factor=float(cfg.routed_scaling_factor),
        shared_expert_ffn_hidden_size=cfg.moe_intermediate_size * cfg.n_shared_experts,
        aux_loss_coeff=0.0,
    )
    bias = bool(_get(cfg, "attention_bias", False))
    model.update(first_dense_layers=cfg.first_k_dense_replace or 0, qkv_bias=bias)


def _from_glm(cfg, model: dict[str, Any], moe: dict[str, Any]) -> None:
    _deepseek_moe(cfg, model, moe)
    norm_topk = bool(_get(cfg, "norm_topk_prob", True))
    if moe["top_k"] == 1 and norm_topk:
        _refuse("glm4_moe", "num_experts_per_tok", 1, "with sigmoid scores and norm_topk_prob, use top-k >= 2")
    moe.update(score_func="sigmoid", normalize_top_k=norm_topk, selection_bias=True)
    model.update(qk_norm="head" if _get(cfg, "use_qk_norm", False) else "none")


def _latent_attention(cfg, model: dict[str, Any]) -> None:
    mt = cfg.model_type
    if (_get(cfg, "num_key_value_heads") or cfg.num_attention_heads) != cfg.num_attention_heads:
        _refuse(
            mt,
            "num_key_value_heads",
            cfg.num_key_value_heads,
            f"latent attention has one key/value per head: set it to num_attention_heads={cfg.num_attention_heads}",
        )
    model.update(
        attention="mla",
        num_kv_heads=cfg.num_attention_heads,
        head_dim=cfg.qk_rope_head_dim,
        q_lora_rank=cfg.q_lora_rank,
        kv_lora_rank=cfg.kv_lora_rank,
        qk_nope_head_dim=cfg.qk_nope_head_dim,
        qk_rope_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim,
        o_bias=model["qkv_bias"],
    )


def _from_deepseek_v3(cfg, model: dict[str, Any], moe: dict[str, Any]) -> None:
    _deepseek_moe(cfg, model, moe)
    norm_topk = bool(_get(cfg, "norm_topk_prob", True))
    moe.update(score_func="sigmoid", normalize_top_k=norm_topk, selection_bias=True)
    _latent_attention(cfg, model)
    model.update(rope_interleave=bool(_get(cfg, "rope_interleave", True)))
    model.update(mtp_layers=int(_get(cfg, "num_nextn_predict_layers", 0) or 0))  # alias num_mtp_layers


def _from_deepseek_v2(cfg, model: dict[str, Any], moe: dict[str, Any]) -> None:
    _deepseek_moe(cfg, model, moe)
    method = _get(cfg, "topk_method", "greedy")
    if method == "greedy":
        moe.update(num_groups=1, topk_groups=1)
    elif method == "group_limited_greedy":
        moe.update(group_score="max")
    else:
        _refuse("deepseek_v2", "topk_method", method, "transformers' DeepSeek-V2 runs greedy or group_limited_greedy")
    # DeepSeek-V2 never renormalises the top-k softmax weights (transformers ignores norm_topk_prob).
    moe.update(score_func="softmax", normalize_top_k=False)
    _latent_attention(cfg, model)
    model.update(rope_interleave=True)  # its RoPE rotates complex pairs


def _from_llama4(cfg, model: dict[str, Any], moe: dict[str, Any]) -> None:
    L = cfg.num_hidden_layers
    moe_layers = sorted(int(i) for i in cfg.moe_layers)
    model.update(
        ffn_hidden_size=cfg.intermediate_size_mlp,
        dense_layers=[i for i in range(L) if i not in moe_layers],
        qkv_bias=bool(cfg.attention_bias),
        o_bias=bool(cfg.attention_bias),
        rope_interleave=True,  # complex pairs
        nope_layers=[i for i in range(L) if not cfg.no_rope_layers[i]],
        qk_norm="weightless" if cfg.use_qk_norm else "none",
        layer_types=["chunked_attention" if t == "chunked_attention" else "full_attention" for t in cfg.layer_types],
        attention_chunk_size=cfg.attention_chunk_size if "chunked_attention" in cfg.layer_types else None,
        temperature_floor_scale=float(cfg.floor_scale) if cfg.attn_temperature_tuning else None,
        temperature_scale=float(cfg.attn_scale),
    )
    bad = sorted(set(cfg.layer_types) - {"chunked_attention", "full_attention"})
    if bad:
        _refuse("llama4_text", "layer_types", bad, "Llama 4 blocks are chunked_attention or full_attention")
    if not moe_layers:
        model["moe_every"] = 0
    moe.update(
        num_experts=cfg.num_local_experts,
        ffn_hidden_size=cfg.intermediate_size,
        score_func="sigmoid",
        normalize_top_k=False,
        input_weighted=True,
        shared_expert_ffn_hidden_size=cfg.intermediate_size,
    )


def _from_gpt_oss(cfg, model: dict[str, Any], moe: dict[str, Any]) -> None:
    bias = bool(cfg.attention_bias)
    model.update(qkv_bias=bias, o_bias=bias, attention_sinks=True)
    bad = sorted(set(cfg.layer_types) - {"sliding_attention", "full_attention"})
    if bad:
        _refuse("gpt_oss", "layer_types", bad, "GPT-OSS blocks are sliding_attention or full_attention")
    _window(cfg, "gpt_oss", model, [t == "sliding_attention" for t in cfg.layer_types])
    moe.update(
        num_experts=cfg.num_local_experts,
        ffn_hidden_size=cfg.intermediate_size,
        score_func="softmax",
        score_after_topk=True,  # softmax over the k selected logits
        normalize_top_k=False,
        router_bias=True,
        expert_bias=True,
        activation="clamped_swiglu",
        swiglu_limit=float(cfg.swiglu_limit),
        swiglu_alpha=float(cfg.swiglu_alpha),
    )


_FROM_HF = {
    "mixtral": _from_mixtral,
    "qwen3_moe": _from_qwen,
    "qwen2_moe": _from_qwen,
    "olmoe": _from_olmoe,
    "glm4_moe": _from_glm,
    "deepseek_v3": _from_deepseek_v3,
    "deepseek_v2": _from_deepseek_v2,
    "llama4_text": _from_llama4,
    "gpt_oss": _from_gpt_oss,
}


# ---------------------------------------------------------------------------------------- ours -> HF


def hf_config_from_decoder(config: DecoderConfig, dtype: Any = None):
    """The transformers config object that describes ``config`` in its family.

    Refuses (naming the field) a configuration the family cannot express, e.g. a Mixtral with q/k
    norm: the result is converted back and every forward-relevant field must survive the round trip.
    """
    import transformers

    mt = config.hf_model_type
    if mt is None:
        raise HFConversionError(
            f"model.hf_model_type is not set: choose the family to export as, one of {sorted(FAMILIES)}"
        )
    fam = family(mt)
    moe = config.moe
    if moe is None:
        raise HFConversionError(f"model.moe is None: a {mt} export needs MoE layers")
    kw: dict[str, Any] = dict(config.hf_extra)
    kw.update(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        hidden_act="silu",
        rms_norm_eps=config.norm_eps,
        tie_word_embeddings=config.tie_embeddings,
        initializer_range=config.init_std,
        num_experts_per_tok=moe.top_k,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta, **(config.rope_scaling or {})},
        architectures=[fam.architecture],
    )
    _TO_HF[mt](config, kw)
    if dtype is not None:
        kw["dtype"] = str(dtype).removeprefix("torch.")
    hf = getattr(transformers, fam.config_class)(**kw)
    _check_round_trip(config, decoder_config_from_hf(hf, capacity_factor=moe.capacity_factor), mt)
    return hf


def _dense_after(config: DecoderConfig, step: int) -> list[int]:
    """Blocks that are dense although every ``step``-th block is MoE (Qwen's ``mlp_only_layers``)."""
    moe_layers = set(config.moe_layer_numbers)
    return [i for i in range(config.num_layers) if (i + 1) % step == 0 and i not in moe_layers]


def _sliding_flags(config: DecoderConfig) -> list[bool]:
    return [config.layer_type(i) == "sliding_attention" for i in range(config.num_layers)]


def _to_mixtral(config: DecoderConfig, kw: dict[str, Any]) -> None:
    moe = config.moe
    sliding = _sliding_flags(config)
    kw.update(
        num_local_experts=moe.num_experts,
        intermediate_size=moe.ffn_hidden_size,
        sliding_window=config.sliding_window if all(sliding) else None,
    )
    if moe.router_noise == "jitter":
        kw["router_jitter_noise"] = moe.router_jitter_eps


def _to_qwen(config: DecoderConfig, kw: dict[str, Any]) -> None:
    moe, mt = config.moe, config.hf_model_type
    step = config.moe_every or 1
    kw.update(
        num_experts=moe.num_experts,
        moe_intermediate_size=moe.ffn_hidden_size,
        intermediate_size=config.ffn_hidden_size,
        decoder_sparse_step=step,
        mlp_only_layers=_dense_after(config, step),
        norm_topk_prob=moe.normalize_top_k or moe.score_after_topk,
    )
    sliding = _sliding_flags(config)
    if mt == "qwen3_moe":
        kw.update(attention_bias=config.qkv_bias, use_sliding_window=all(sliding), sliding_window=config.sliding_window)
        return
    kw.update(qkv_bias=config.qkv_bias, shared_expert_intermediate_size=moe.shared_expert_ffn_hidden_size)
    kw.update(
        use_sliding_window=any(sliding),
        sliding_window=config.sliding_window,
        layer_types=["sliding_attention" if s else "full_attention" for s in sliding],
    )


def _to_olmoe(config: DecoderConfig, kw: dict[str, Any]) -> None:
    moe = config.moe
    kw.update(
        num_experts=moe.num_experts,
        intermediate_size=moe.ffn_hidden_size,
        norm_topk_prob=moe.normalize_top_k or moe.score_after_topk,
        attention_bias=config.qkv_bias,
        clip_qkv=config.qkv_clip,
    )


def _to_deepseek_moe(config: DecoderConfig, kw: dict[str, Any]) -> None:
    moe = config.moe
    shared, width = moe.shared_expert_ffn_hidden_size, moe.ffn_hidden_size
    kw.update(
        n_routed_experts=moe.num_experts,
        moe_intermediate_size=width,
        intermediate_size=config.ffn_hidden_size,
        n_shared_experts=max(1, shared // width),
        first_k_dense_replace=config.first_dense_layers,
        n_group=moe.num_groups,
        topk_group=moe.topk_groups,
        routed_scaling_factor=moe.routed_scaling_factor,
        norm_topk_prob=moe.normalize_top_k,
        attention_bias=config.qkv_bias,
    )


def _to_glm(config: DecoderConfig, kw: dict[str, Any]) -> None:
    _to_deepseek_moe(config, kw)
    kw.update(use_qk_norm=config.qk_norm == "head", num_nextn_predict_layers=0)  # we hold no MTP layers
    kw["rope_parameters"]["partial_rotary_factor"] = config.rotary_fraction


def _to_latent(config: DecoderConfig, kw: dict[str, Any]) -> None:
    kw.update(
        q_lora_rank=config.q_lora_rank,
        kv_lora_rank=config.kv_lora_rank,
        qk_nope_head_dim=config.qk_nope_head_dim,
        qk_rope_head_dim=config.qk_rope_head_dim,
        v_head_dim=config.v_head_dim,
        head_dim=config.qk_rope_head_dim,
    )


def _to_deepseek_v3(config: DecoderConfig, kw: dict[str, Any]) -> None:
    _to_deepseek_moe(config, kw)
    _to_latent(config, kw)
    kw.update(rope_interleave=config.rope_interleave, num_nextn_predict_layers=config.mtp_layers)


def _to_deepseek_v2(config: DecoderConfig, kw: dict[str, Any]) -> None:
    _to_deepseek_moe(config, kw)
    _to_latent(config, kw)
    moe = config.moe
    if moe.num_groups > 1:
        kw["topk_method"] = "group_limited_greedy"
    else:
        kw.update(topk_method="greedy", n_group=None, topk_group=None)


def _to_llama4(config: DecoderConfig, kw: dict[str, Any]) -> None:
    moe, L = config.moe, config.num_layers
    kinds = [config.layer_type(i) for i in range(L)]
    kw.update(
        num_local_experts=moe.num_experts,
        intermediate_size=moe.ffn_hidden_size,
        intermediate_size_mlp=config.ffn_hidden_size,
        moe_layers=config.moe_layer_numbers,
        attention_bias=config.qkv_bias,
        use_qk_norm=config.qk_norm == "weightless",
        no_rope_layers=[int(config.uses_rope(i)) for i in range(L)],
        layer_types=kinds,
        attention_chunk_size=config.attention_chunk_size,
        attn_temperature_tuning=config.temperature_floor_scale is not None,
        # an int in transformers: a fractional scale fails the round-trip check below, by name
        floor_scale=round(config.temperature_floor_scale or 8192),
        attn_scale=config.temperature_scale,
    )


def _to_gpt_oss(config: DecoderConfig, kw: dict[str, Any]) -> None:
    moe = config.moe
    kw.update(
        num_local_experts=moe.num_experts,
        intermediate_size=moe.ffn_hidden_size,
        attention_bias=config.qkv_bias,
        layer_types=[config.layer_type(i) for i in range(config.num_layers)],
        sliding_window=config.sliding_window,
        swiglu_limit=moe.swiglu_limit,
        swiglu_alpha=moe.swiglu_alpha,
    )


_TO_HF = {
    "mixtral": _to_mixtral,
    "qwen3_moe": _to_qwen,
    "qwen2_moe": _to_qwen,
    "olmoe": _to_olmoe,
    "glm4_moe": _to_glm,
    "deepseek_v3": _to_deepseek_v3,
    "deepseek_v2": _to_deepseek_v2,
    "llama4_text": _to_llama4,
    "gpt_oss": _to_gpt_oss,
}


def _forward_signature(config: DecoderConfig) -> dict[str, Any]:
    """What decides the forward of ``config``, in a form where equivalent configs compare equal."""
    moe = config.moe
    dense = set(range(config.num_layers)) - set(config.moe_layer_numbers)
    sig = {
        key: getattr(config, key)
        for key in (
            "vocab_size",
            "num_layers",
            "hidden_size",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "rope_theta",
            "rotary_fraction",
            "rope_scaling",
            "qkv_bias",
            "o_bias",
            "qk_norm",
            "qkv_clip",
            "norm_eps",
            "tie_embeddings",
        )
    }
    sig["moe layers (moe_every, first_dense_layers, dense_layers)"] = config.moe_layer_numbers
    if dense:
        sig["ffn_hidden_size"] = config.ffn_hidden_size
    kinds = [config.layer_type(i) for i in range(config.num_layers)]
    sig["layer_types"] = kinds
    if "sliding_attention" in kinds:
        sig["sliding_window"] = config.sliding_window
    if "chunked_attention" in kinds:
        sig["attention_chunk_size"] = config.attention_chunk_size
    sig["nope_layers"] = config.nope_layers
    if len(config.nope_layers) < config.num_layers:
        sig["rope_interleave"] = config.rope_interleave
    if config.nope_layers:
        sig["temperature_floor_scale"] = config.temperature_floor_scale
        if config.temperature_floor_scale is not None:
            sig["temperature_scale"] = config.temperature_scale
    sig["attention_sinks"] = config.attention_sinks
    sig["attention"] = config.attention
    if config.attention == "mla":
        for key in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            sig[key] = getattr(config, key)
        del sig["head_dim"], sig["num_kv_heads"]  # implied by the latent sizes
    sig["mtp_layers"] = config.mtp_layers
    if moe is not None:
        for key in (
            "num_experts",
            "top_k",
            "ffn_hidden_size",
            "score_func",
            "num_groups",
            "topk_groups",
            "routed_scaling_factor",
            "shared_expert_ffn_hidden_size",
            "shared_expert_gate",
            "expert_bias",
        ):
            sig[f"moe.{key}"] = getattr(moe, key)
        sig["moe.selection_bias"] = moe.selection_bias or moe.expert_bias_update_rate > 0
        if moe.num_groups > 1:
            sig["moe.group_score"] = moe.group_score
        for key in ("input_weighted", "router_bias", "activation"):
            sig[f"moe.{key}"] = getattr(moe, key)
        if moe.activation == "clamped_swiglu":
            sig["moe.swiglu_limit"], sig["moe.swiglu_alpha"] = moe.swiglu_limit, moe.swiglu_alpha
        if moe.top_k > 1:  # softmax after top-k is the same as renormalised softmax scores
            sig["moe.normalize_top_k"] = moe.normalize_top_k or moe.score_after_topk
        else:
            sig["moe.score_after_topk"] = moe.score_after_topk
    return sig


def _check_round_trip(ours: DecoderConfig, back: DecoderConfig, model_type: str) -> None:
    want, got = _forward_signature(ours), _forward_signature(back)
    bad = [key for key in want if want[key] != got.get(key)]
    if bad:
        details = ", ".join(f"model.{key}={want[key]!r}" for key in bad)
        raise HFConversionError(
            f"{details} cannot be expressed as {model_type} ({FAMILIES[model_type].architecture}): "
            f"a {model_type} checkpoint would give {', '.join(f'{k}={got.get(k)!r}' for k in bad)}; "
            "change the model config or export as another family (model.hf_model_type)"
        )
