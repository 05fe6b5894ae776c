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
from ..models.decoder import ROPE_SCALING_KEYS, DecoderConfig, DecoderConfigError


class HFConversionError(ValueError):
    """A Hugging Face checkpoint or config cannot be converted; the message names the key and the fix."""


@dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str
    config_class: str
    moe_module: str  # the MoE block's attribute in a decoder layer
    expert_proj: tuple[str, str, str]  # per-expert (gate, up, down) weight names
    shared_module: str | None = None  # the shared expert's attribute, if any
    shared_gate: bool = False  # a sigmoid gate on the shared expert (``shared_expert_gate``)
    selection_bias: bool = False  # the router has ``e_score_correction_bias``
    # HF keys transformers keeps in float32 in a bf16/fp16 model (its _keep_in_fp32_modules_strict):
    # loaded and written as float32 here too.
    keep_fp32: tuple[str, ...] = ()

    def keeps_fp32(self, key: str) -> bool:
        return key.endswith(".e_score_correction_bias") or any(key.endswith(s) for s in self.keep_fp32)


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("mixtral", "MixtralForCausalLM", "MixtralConfig", "block_sparse_moe", ("w1", "w3", "w2")),
        Family("qwen3_moe", "Qwen3MoeForCausalLM", "Qwen3MoeConfig", "mlp", ("gate_proj", "up_proj", "down_proj")),
        Family(
            "qwen2_moe",
            "Qwen2MoeForCausalLM",
            "Qwen2MoeConfig",
            "mlp",
            ("gate_proj", "up_proj", "down_proj"),
            shared_module="shared_expert",
            shared_gate=True,
        ),
        Family("olmoe", "OlmoeForCausalLM", "OlmoeConfig", "mlp", ("gate_proj", "up_proj", "down_proj")),
        Family(
            "glm4_moe",
            "Glm4MoeForCausalLM",
            "Glm4MoeConfig",
            "mlp",
            ("gate_proj", "up_proj", "down_proj"),
            shared_module="shared_experts",
            selection_bias=True,
            keep_fp32=(".gate.weight", ".e_score_correction_bias"),
        ),
    )
}
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


def family(model_type: str | None) -> Family:
    """The :class:`Family` of ``model_type``; a clear error for anything else."""
    if model_type not in FAMILIES:
        hint = ""
        if model_type in ("deepseek_v3", "deepseek_v2"):
            hint = " (DeepSeek's multi-head latent attention and multi-token prediction are not supported yet)"
        elif model_type in ("llama4", "llama4_text"):
            hint = " (Llama 4 is not supported yet)"
        elif model_type in UPCYCLE_FAMILIES:
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
    return AutoConfig.from_pretrained(str(path))


# ---------------------------------------------------------------------------------------- HF -> ours


def _get(cfg, key: str, default: Any = None) -> Any:
    return getattr(cfg, key, default)


def _refuse(model_type: str, key: str, value: Any, fix: str) -> None:
    raise HFConversionError(f"{model_type} config.json {key}={value!r} is not supported: {fix}")


def _rope(cfg, model_type: str, partial: bool) -> tuple[float, float, dict[str, Any] | None]:
    """(rope_theta, rotary fraction, scaling): default RoPE, linear or Llama-3 frequency scaling."""
    rope = dict(_get(cfg, "rope_parameters") or {})
    if not rope and _get(cfg, "rope_theta") is not None:  # older transformers configs
        rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", *ROPE_SCALING_KEYS):
        _refuse(
            model_type,
            "rope_parameters.rope_type",
            rope_type,
            f"supported are default, {', '.join(ROPE_SCALING_KEYS)} (no yarn, dynamic or longrope yet)",
        )
    scaling = None
    if rope_type != "default":
        rope.setdefault("original_max_position_embeddings", _get(cfg, "max_position_embeddings"))
        scaling = {"rope_type": rope_type, **{key: rope[key] for key in ROPE_SCALING_KEYS[rope_type]}}
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
    if _get(cfg, "use_sliding_window", False) or (mt == "mixtral" and _get(cfg, "sliding_window") is not None):
        key = "use_sliding_window" if _get(cfg, "use_sliding_window", False) else "sliding_window"
        _refuse(mt, key, _get(cfg, key), "sliding-window attention is not supported; set it to null/false")
    if _get(cfg, "mlp_bias", False):
        _refuse(mt, "mlp_bias", True, "FFN biases are not supported")
    theta, fraction, scaling = _rope(cfg, mt, partial=mt == "glm4_moe")

    D, H = cfg.hidden_size, cfg.num_attention_heads
    head_dim = _get(cfg, "head_dim") or D // H
    L = cfg.num_hidden_layers
    k = cfg.num_experts_per_tok
    dense_ffn = cfg.intermediate_size
    model: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size,
        num_layers=L,
        hidden_size=D,
        num_heads=H,
        num_kv_heads=_get(cfg, "num_key_value_heads") or H,
        head_dim=head_dim,
        ffn_hidden_size=dense_ffn,
        rope_theta=theta,
        rotary_fraction=fraction,
        rope_scaling=scaling,
        norm_eps=float(cfg.rms_norm_eps),
        tie_embeddings=bool(_get(cfg, "tie_word_embeddings", False)),
        init_std=float(_get(cfg, "initializer_range", 0.02)),
        hf_model_type=mt,
    )
    moe: dict[str, Any] = dict(top_k=k, score_func="softmax", normalize_top_k=True)
    norm_topk = bool(_get(cfg, "norm_topk_prob", True))
    if mt == "mixtral":
        moe.update(num_experts=cfg.num_local_experts, ffn_hidden_size=cfg.intermediate_size)
        jitter = float(_get(cfg, "router_jitter_noise", 0.0) or 0.0)
        if jitter > 0:  # training-time noise; ours jitters the router's input only
            moe.update(router_noise="jitter", router_jitter_eps=jitter)
    elif mt in ("qwen3_moe", "qwen2_moe"):
        moe.update(num_experts=cfg.num_experts, ffn_hidden_size=cfg.moe_intermediate_size, normalize_top_k=norm_topk)
        model.update(moe_every=cfg.decoder_sparse_step, dense_layers=list(_get(cfg, "mlp_only_layers", []) or []))
        if cfg.num_experts == 0:
            model["moe_every"] = 0
        if mt == "qwen3_moe":
            bias = bool(_get(cfg, "attention_bias", False))
            model.update(qkv_bias=bias, o_bias=bias, qk_norm="head")
        else:
            model.update(qkv_bias=bool(_get(cfg, "qkv_bias", True)))
            shared = cfg.shared_expert_intermediate_size
            if shared <= 0:
                _refuse(mt, "shared_expert_intermediate_size", shared, "Qwen2-MoE models need a shared expert (> 0)")
            moe.update(shared_expert_ffn_hidden_size=shared, shared_expert_gate=True)
    elif mt == "olmoe":
        moe.update(num_experts=cfg.num_experts, ffn_hidden_size=cfg.intermediate_size, normalize_top_k=norm_topk)
        bias = bool(_get(cfg, "attention_bias", False))
        model.update(qkv_bias=bias, o_bias=bias, qk_norm="projection", qkv_clip=_get(cfg, "clip_qkv"))
        if head_dim * H != D:
            _refuse(mt, "head_dim", head_dim, f"OLMoE normalises q over hidden_size, so head_dim must be {D // H}")
    elif mt == "glm4_moe":
        if cfg.n_shared_experts <= 0:
            _refuse(mt, "n_shared_experts", cfg.n_shared_experts, "GLM-4.5 models need at least one shared expert")
        if k == 1 and norm_topk:
            _refuse(mt, "num_experts_per_tok", 1, "with sigmoid scores and norm_topk_prob, use top-k >= 2")
        moe.update(
            num_experts=cfg.n_routed_experts,
            ffn_hidden_size=cfg.moe_intermediate_size,
            score_func="sigmoid",
            normalize_top_k=norm_topk,
            num_groups=cfg.n_group,
            topk_groups=cfg.topk_group,
            routed_scaling_factor=float(cfg.routed_scaling_factor),
            selection_bias=True,
            shared_expert_ffn_hidden_size=cfg.moe_intermediate_size * cfg.n_shared_experts,
        )
        model.update(
            first_dense_layers=cfg.first_k_dense_replace,
            qkv_bias=bool(_get(cfg, "attention_bias", False)),
            qk_norm="head" if _get(cfg, "use_qk_norm", False) else "none",
        )
    if moe["score_func"] == "softmax" and k == 1 and moe["normalize_top_k"]:
        moe["score_after_topk"] = True  # the single weight is exactly 1, as theirs
    moe.update(
        capacity_factor=capacity_factor,
        eval_capacity_factor=None,
        aux_loss_coeff=float(_get(cfg, "router_aux_loss_coef", 0.0) or 0.0) if mt != "glm4_moe" else 0.0,
        z_loss_coeff=0.0,
        init_std=model["init_std"],
    )
    moe.update(moe_overrides or {})
    raw = cfg.to_dict()
    model["hf_extra"] = {key: raw[key] for key in CARRIED_KEYS if key in raw}
    try:
        return DecoderConfig(**model, moe=moe)
    except (DecoderConfigError, MoEConfigError) as err:
        raise HFConversionError(f"{mt} config.json maps to an invalid model config: {err}") from err


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
    moe_layers = config.moe_layer_numbers
    if mt == "mixtral":
        kw.update(num_local_experts=moe.num_experts, intermediate_size=moe.ffn_hidden_size, sliding_window=None)
        if moe.router_noise == "jitter":
            kw["router_jitter_noise"] = moe.router_jitter_eps
    elif mt in ("qwen3_moe", "qwen2_moe"):
        step = config.moe_every or 1
        dense = sorted(
            set(range(config.num_layers)) - set(moe_layers) - {i for i in range(config.num_layers) if (i + 1) % step}
        )
        kw.update(
            num_experts=moe.num_experts,
            moe_intermediate_size=moe.ffn_hidden_size,
            intermediate_size=config.ffn_hidden_size,
            decoder_sparse_step=step,
            mlp_only_layers=dense,
            norm_topk_prob=moe.normalize_top_k or moe.score_after_topk,
            use_sliding_window=False,
        )
        if mt == "qwen3_moe":
            kw["attention_bias"] = config.qkv_bias
        else:
            kw.update(qkv_bias=config.qkv_bias, shared_expert_intermediate_size=moe.shared_expert_ffn_hidden_size)
    elif mt == "olmoe":
        kw.update(
            num_experts=moe.num_experts,
            intermediate_size=moe.ffn_hidden_size,
            norm_topk_prob=moe.normalize_top_k or moe.score_after_topk,
            attention_bias=config.qkv_bias,
            clip_qkv=config.qkv_clip,
        )
    elif mt == "glm4_moe":
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
            use_qk_norm=config.qk_norm == "head",
            num_nextn_predict_layers=0,  # we hold no multi-token-prediction layers
        )
        kw["rope_parameters"]["partial_rotary_factor"] = config.rotary_fraction
    if dtype is not None:
        kw["dtype"] = str(dtype).removeprefix("torch.")
    hf = getattr(transformers, fam.config_class)(**kw)
    _check_round_trip(config, decoder_config_from_hf(hf, capacity_factor=moe.capacity_factor), mt)
    return hf


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
