"""Sparse upcycling: a dense Llama or Qwen3 checkpoint becomes an MoE model of the matching family
(Mixtral or Qwen3-MoE) whose every expert is a copy of the dense FFN and whose router is random.

The top-k weights are renormalised to sum to one and all experts are equal, so at step 0 every MoE
FFN computes exactly the dense FFN and the logits equal the dense model's.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..core.comm import ProcessGroup
from ..models.decoder import Decoder, DecoderConfig
from .families import UPCYCLE_FAMILIES, HFConversionError, decoder_config_from_hf, family, load_hf_config
from .load import build_and_load, expected_keys
from .safetensors_io import SafetensorsDir

_EXPERT = re.compile(r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.\d+\.(\w+)\.weight")
_ROUTER = re.compile(r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.gate\.weight")
_DENSE_NAME = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def upcycle_config(
    path: str | Path,
    *,
    num_experts: int,
    top_k: int,
    capacity_factor: float | None = None,
    moe_overrides: dict[str, Any] | None = None,
) -> DecoderConfig:
    """The MoE :class:`DecoderConfig` that :func:`upcycle` builds from the dense model in ``path``."""
    import transformers

    dense = load_hf_config(path, allowed=tuple(UPCYCLE_FAMILIES))
    mt = dense.model_type
    for key in ("attention_bias", "mlp_bias"):
        if mt == "llama" and getattr(dense, key, False):
            raise HFConversionError(
                f"llama config.json {key}=true is not supported for upcycling: Mixtral has no such biases"
            )
    common = dict(
        vocab_size=dense.vocab_size,
        hidden_size=dense.hidden_size,
        num_hidden_layers=dense.num_hidden_layers,
        num_attention_heads=dense.num_attention_heads,
        num_key_value_heads=dense.num_key_value_heads,
        head_dim=getattr(dense, "head_dim", None) or dense.hidden_size // dense.num_attention_heads,
        hidden_act=dense.hidden_act,
        rms_norm_eps=dense.rms_norm_eps,
        tie_word_embeddings=dense.tie_word_embeddings,
        rope_parameters=dense.rope_parameters,
        initializer_range=dense.initializer_range,
        attention_dropout=getattr(dense, "attention_dropout", 0.0),
        max_position_embeddings=dense.max_position_embeddings,
        bos_token_id=dense.bos_token_id,
        eos_token_id=dense.eos_token_id,
        pad_token_id=dense.pad_token_id,
        num_experts_per_tok=top_k,
    )
    if mt == "llama":
        moe_cfg = transformers.MixtralConfig(
            **common, num_local_experts=num_experts, intermediate_size=dense.intermediate_size
        )
    else:
        if getattr(dense, "use_sliding_window", False):
            raise HFConversionError("qwen3 config.json use_sliding_window=true is not supported: set it to false")
        moe_cfg = transformers.Qwen3MoeConfig(
            **common,
            num_experts=num_experts,
            moe_intermediate_size=dense.intermediate_size,
            intermediate_size=dense.intermediate_size,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            norm_topk_prob=True,
            attention_bias=dense.attention_bias,
        )
    overrides = {"aux_loss_coeff": 0.01, **(moe_overrides or {})}
    return decoder_config_from_hf(moe_cfg, capacity_factor=capacity_factor, moe_overrides=overrides)


class UpcycledSource:
    """A dense checkpoint seen through the MoE family's keys: every expert reads the dense FFN, and
    the routers are drawn from a seeded normal (the same on every rank)."""

    def __init__(self, dense: SafetensorsDir, config: DecoderConfig, seed: int) -> None:
        self.path = dense.path
        self._dense = dense
        self._config = config
        self._seed = seed
        self.shapes: dict[str, tuple[int, ...]] = {}
        for key, shape in expected_keys(config).items():
            source = self._dense_key(key)
            if source is None:
                self.shapes[key] = shape  # a router: made here
            elif source in dense.shapes:
                self.shapes[key] = dense.shapes[source]

    def _dense_key(self, key: str) -> str | None:
        match = _EXPERT.fullmatch(key)
        if match is not None:
            layer, name = match.groups()
            return f"model.layers.{layer}.mlp.{_DENSE_NAME.get(name, name)}.weight"
        if _ROUTER.fullmatch(key):
            return None
        return key

    def keys(self) -> set[str]:
        return set(self.shapes)

    def get(self, key: str) -> Tensor:
        source = self._dense_key(key)
        if source is not None:
            return self._dense.get(source)
        layer = int(_ROUTER.fullmatch(key).group(1))
        gen = torch.Generator().manual_seed(self._seed * 1_000_003 + layer)
        return torch.empty(self.shapes[key]).normal_(0.0, self._config.init_std, generator=gen)

    def torch_dtype(self, key: str) -> torch.dtype:
        source = self._dense_key(key)
        return self._dense.torch_dtype(source if source is not None else "model.embed_tokens.weight")


def upcycle(
    path: str | Path,
    *,
    num_experts: int,
    top_k: int,
    ep_group: ProcessGroup | None = None,
    dtype: torch.dtype | None = None,
    capacity_factor: float | None = None,
    moe_overrides: dict[str, Any] | None = None,
    seed: int = 0,
) -> Decoder:
    """An MoE :class:`Decoder` (Mixtral family from Llama, Qwen3-MoE from Qwen3) from a dense HF model.

    Every MoE layer holds ``num_experts`` copies of the dense FFN of its block and a router drawn
    with ``std = initializer_range`` from ``seed``; ``top_k`` experts per token, weights renormalised
    to sum to one, so the upcycled logits equal the dense model's at step 0. The aux-loss coefficient
    defaults to 0.01 (``moe_overrides`` changes it or any other MoE field). Save it with
    ``save_pretrained`` to get a checkpoint of the MoE family.
    """
    config = upcycle_config(
        path, num_experts=num_experts, top_k=top_k, capacity_factor=capacity_factor, moe_overrides=moe_overrides
    )
    family(config.hf_model_type)
    return build_and_load(config, UpcycledSource(SafetensorsDir(path), config, seed), ep_group=ep_group, dtype=dtype)
