"""Training from a Hugging Face model: ``python launch/train.py model=hf model.path=HF_DIR``.

The architecture (layers, attention, experts, top-k, routing) comes from ``model.path``'s
config.json through ``moe_parallel.hf``; the ``moe.*`` keys that are training settings
(:data:`TRAINING_KEYS`: capacity, losses, noise, balancing, expert GEMM) apply on top, and the ones
that describe the architecture are refused when set. ``model.upcycle_experts`` /
``model.upcycle_top_k`` start an MoE from a dense Llama or Qwen3 instead (every expert a copy of
the dense FFN, random routers). ``model.mtp_layers`` / ``model.mtp_loss_weight`` choose how many of a
DeepSeek-V3 checkpoint's multi-token-prediction modules train, and the weight of their loss.

Each rank reads only the tensors it holds (its pipeline stage's blocks, its experts), and the whole
checkpoint is checked from the file headers in :func:`validate`, before any collective. The run's
``checkpoints/hf_model/`` records the model's HF identity (config.json, tokenizer files; the
checkpoints hold weights and persistent buffers) so that ``checkpoint_tool export-hf`` can turn any
of its checkpoints into an HF directory.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from launch.config import AppConfigError, ModelConf, MoEConf
from launch.hf_identity import HF_MODEL_DIR, TRAINING_FILE, config_dtype, write_hf_model_dir
from launch.hf_tokenizer import TokenizerError, load_pretrained_tokenizer
from moe_parallel import hf
from moe_parallel.hf.load import TensorSource, build_and_load, with_mtp
from moe_parallel.hf.upcycle import UpcycledSource
from moe_parallel.integration.parallel import ParallelState
from moe_parallel.integration.pipeline import decoder_pipeline
from moe_parallel.models.decoder import DecoderConfig

# moe.* keys that are training settings of a pretrained model's MoE layers (the rest is config.json's).
TRAINING_KEYS = (
    "capacity_factor",
    "eval_capacity_factor",
    "min_capacity",
    "drop_policy",
    "aux_loss_coeff",
    "z_loss_coeff",
    "router_noise",
    "router_jitter_eps",
    "expert_bias_update_rate",
    "expert_gemm",
    "check_inputs",
)
# model.* keys of the HF model; every other model.* key shapes the reference GPT only.
HF_MODEL_KEYS = (
    "kind",
    "path",
    "upcycle_experts",
    "upcycle_top_k",
    "init_seed",  # upcycled routers
    "mtp_layers",  # how many of the checkpoint's multi-token-prediction modules to keep
    "mtp_loss_weight",
)


def _model_path(cfg: DictConfig) -> Path:
    path = cfg.model.path
    if not path:
        raise AppConfigError("model.path is not set: give the Hugging Face model directory, model.path=/models/NAME")
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise AppConfigError(
            f"model.path={path!r} holds no config.json: give a Hugging Face model directory "
            "(config.json, *.safetensors, tokenizer files)"
        )
    return folder


def _refuse_architecture_keys(cfg: DictConfig) -> None:
    """``moe.*``/``model.*`` keys that describe a from-scratch architecture must stay at their defaults."""
    for group, schema, allowed in (("model", ModelConf, HF_MODEL_KEYS), ("moe", MoEConf, TRAINING_KEYS)):
        for f in fields(schema):
            if f.name in allowed:
                continue
            default = f.default_factory() if f.default_factory is not MISSING else f.default
            if cfg[group][f.name] != default:
                raise AppConfigError(
                    f"{group}.{f.name}={cfg[group][f.name]!r} cannot be set with model=hf: the architecture comes from "
                    f"model.path's config.json; drop the override (training settings of moe.* are {list(TRAINING_KEYS)}"
                    "; model.upcycle_experts / model.upcycle_top_k change the expert count of a dense model)"
                )


def moe_overrides(cfg: DictConfig) -> dict[str, Any]:
    return {key: cfg.moe[key] for key in TRAINING_KEYS if key != "capacity_factor"}


def decoder_config(cfg: DictConfig) -> DecoderConfig:
    """The model's :class:`DecoderConfig` from ``model.path`` (and ``moe.*`` training settings)."""
    _refuse_architecture_keys(cfg)
    path, m = _model_path(cfg), cfg.model
    try:
        if m.upcycle_experts is not None:
            if not isinstance(m.upcycle_top_k, int) or not 1 <= m.upcycle_top_k <= m.upcycle_experts:
                raise AppConfigError(
                    f"model.upcycle_top_k={m.upcycle_top_k!r} is invalid: must be in [1, model.upcycle_experts="
                    f"{m.upcycle_experts}]"
                )
            config = hf.upcycle_config(
                path,
                num_experts=m.upcycle_experts,
                top_k=m.upcycle_top_k,
                capacity_factor=cfg.moe.capacity_factor,
                moe_overrides=moe_overrides(cfg),
            )
            return with_mtp(config, m.mtp_layers, m.mtp_loss_weight)
        return hf.load_config(
            path,
            capacity_factor=cfg.moe.capacity_factor,
            moe_overrides=moe_overrides(cfg),
            mtp_layers=m.mtp_layers,
            mtp_loss_weight=m.mtp_loss_weight,
        )
    except hf.HFConversionError as err:
        raise AppConfigError(f"model.path={m.path!r}: {err}") from None


def tensor_source(cfg: DictConfig, config: DecoderConfig) -> TensorSource:
    """Where the weights come from: the HF directory, or (upcycling) a view of the dense one."""
    try:
        source = hf.SafetensorsDir(_model_path(cfg))
    except hf.HFConversionError as err:
        raise AppConfigError(f"model.path={cfg.model.path!r}: {err}") from None
    if cfg.model.upcycle_experts is not None:
        return UpcycledSource(source, config, seed=cfg.model.init_seed)
    return source


def validate(cfg: DictConfig) -> DecoderConfig:
    """Check ``model.*``, config.json and every weight's name and shape (file headers only)."""
    if cfg.model.upcycle_experts is not None and (
        not isinstance(cfg.model.upcycle_experts, int) or cfg.model.upcycle_experts < 1
    ):
        raise AppConfigError(f"model.upcycle_experts={cfg.model.upcycle_experts!r} must be a positive integer or null")
    config = decoder_config(cfg)
    try:
        hf.check_source(config, tensor_source(cfg, config))
    except hf.HFConversionError as err:
        raise AppConfigError(f"model.path={cfg.model.path!r}: {err}") from None
    key = "data.tokenizer" if cfg.data.tokenizer is not None else "model.path"
    try:
        tokenizer = load_pretrained_tokenizer(cfg.data.tokenizer or cfg.model.path, key=key)
    except TokenizerError as err:
        raise AppConfigError(f"{err} (the corpus is tokenized with it)") from None
    check_vocab(tokenizer.vocab_size, config, key)
    return config


def check_vocab(tokenizer_vocab: int, config: DecoderConfig, key: str = "data.tokenizer") -> None:
    if tokenizer_vocab > config.vocab_size:
        raise AppConfigError(
            f"{key}: the tokenizer has {tokenizer_vocab} tokens, model.path's config.json vocab_size="
            f"{config.vocab_size}: tokenize the corpus with the model's own tokenizer (leave data.tokenizer unset)"
        )


def build_model(cfg: DictConfig, state: ParallelState, vocab_size: int):
    """This rank's part of the model with the pretrained weights: a plain Decoder (PP=1) or this
    stage of the decoder pipeline; its experts only. Parameters in fp32 (DeepSpeed casts for bf16)."""
    config = decoder_config(cfg)
    check_vocab(vocab_size, config)
    source = tensor_source(cfg, config)
    if cfg.parallel.pp == 1:
        model = build_and_load(config, source, ep_group=state.ep_group, dtype=torch.float32)
        return model, config
    interval = 1 if cfg.deepspeed.activation_checkpointing else 0
    model = decoder_pipeline(
        config, ep_group=state.ep_group, topology=state.deepspeed_topology(), activation_checkpoint_interval=interval
    )
    hf.load_weights(model, source, check=False)  # checked in validate()
    return model, config


def save_identity(cfg: DictConfig, config: DecoderConfig, ckpt_dir: Path) -> Path:
    """Write ``ckpt_dir/hf_model/`` (config.json of the family, tokenizer files): what ``checkpoint_tool
    export-hf`` needs beside the run's checkpoints, which hold the weights and buffers. Rank 0 only."""
    path = _model_path(cfg)
    dest = write_hf_model_dir(config, ckpt_dir / HF_MODEL_DIR, tokenizer_dir=path, dtype=config_dtype(path))
    rate = float(config.moe.expert_bias_update_rate) if config.moe else 0.0
    (dest / TRAINING_FILE).write_text(json.dumps({"expert_bias_update_rate": rate}))
    return dest
