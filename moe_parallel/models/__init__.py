"""Models built from :class:`moe_parallel.MoELayer`: the reference GPT and the decoder family of the open MoE models.

The plain modules live here; :mod:`moe_parallel.integration.pipeline` builds them as DeepSpeed
pipelines (``gpt_pipeline``, ``decoder_pipeline``) and maps names between the two forms.
"""

from .decoder import (
    Decoder,
    DecoderBlock,
    DecoderConfig,
    DecoderConfigError,
    decoder_layer_names,
)
from .gpt import (
    GPT,
    CausalSelfAttention,
    DenseFFN,
    FinalNorm,
    GPTConfig,
    GPTConfigError,
    LMHead,
    PositionEmbedding,
    TokenEmbedding,
    TransformerBlock,
    lm_loss,
    make_norm,
    moe_layers,
    pipeline_layer_names,
)

__all__ = [
    "Decoder",
    "DecoderBlock",
    "DecoderConfig",
    "DecoderConfigError",
    "decoder_layer_names",
    "GPT",
    "CausalSelfAttention",
    "DenseFFN",
    "FinalNorm",
    "GPTConfig",
    "GPTConfigError",
    "LMHead",
    "PositionEmbedding",
    "TokenEmbedding",
    "TransformerBlock",
    "lm_loss",
    "make_norm",
    "moe_layers",
    "pipeline_layer_names",
]
