"""Hugging Face interop for the decoder family (Mixtral, Qwen3-MoE, Qwen2-MoE, OLMoE, GLM-4.5,
DeepSeek-V2/V3, Llama 4, GPT-OSS).

API (stable; the command line and training build on it):

    from moe_parallel import hf
    config = hf.load_config(path, capacity_factor=None, moe_overrides=None)     # -> DecoderConfig
    model = hf.from_pretrained(path, ep_group=None, dtype=None, capacity_factor=None,
                               moe_overrides=None, device="cpu")                 # -> Decoder (plain)
    hf.load_weights(module, path)          # fill a Decoder or one decoder_pipeline stage (reads only its tensors)
    hf.save_pretrained(model, out_dir, dtype=None, tokenizer_dir=None, max_shard_bytes=5 GiB)
    hf.save_state_dict(state_dict, config, out_dir, dtype=None, tokenizer_dir=None, max_shard_bytes=...)
                                           # full canonical state (experts stacked by global id), one process
    hf.hf_config_from_decoder(config, dtype=None)   # transformers config object; refuses what the family can't express
    hf.decoder_config_from_hf(transformers_config, capacity_factor=None, moe_overrides=None)
    model = hf.upcycle(dense_path, num_experts=E, top_k=K, ep_group=None, dtype=None, seed=0)
    config = hf.upcycle_config(dense_path, num_experts=E, top_k=K)
    hf.copy_tokenizer_files(src_dir, dest_dir)
    hf.check_quantization(raw_config_json_dict, path)   # -> Quantization | None; refuses formats we do not read
    hf.SafetensorsDir(path)                # the tensors as the loader reads them: FP8 / MXFP4 dequantized to
                                           # bf16, transformers' fused experts per expert; .quantization

- ``from_pretrained`` builds MoE layers dropless unless ``capacity_factor`` is given (training only;
  evaluation stays dropless). ``DecoderConfig.hf_model_type`` names the family an export writes;
  ``hf_extra`` carries config.json keys we do not model (token ids, max positions).
- Canonical names are the plain ``Decoder``'s state-dict names (``blocks.3.ffn.experts.w1``), the
  names topology-free checkpoints store; routed experts are stacked ``[E, D, 2F]`` / ``[E, F, D]``
  by global id. ``blocks.i.ffn.router.expert_bias`` (GLM's ``e_score_correction_bias``) is a buffer.
- Every error is an :class:`HFConversionError` naming the key and the fix, raised before any
  collective (every rank checks the whole checkpoint from the file headers).
"""

# First: fails with the command that installs the Hugging Face packages when they are missing.
from . import _extra  # noqa: F401
from .families import (
    FAMILIES,
    Family,
    HFConversionError,
    decoder_config_from_hf,
    hf_config_from_decoder,
    load_hf_config,
)
from .load import check_source, from_pretrained, load_config, load_weights
from .quantization import Quantization, check_quantization
from .safetensors_io import SafetensorsDir
from .save import copy_tokenizer_files, save_pretrained, save_state_dict
from .upcycle import upcycle, upcycle_config

__all__ = [
    "FAMILIES",
    "Family",
    "HFConversionError",
    "Quantization",
    "SafetensorsDir",
    "check_quantization",
    "check_source",
    "copy_tokenizer_files",
    "decoder_config_from_hf",
    "from_pretrained",
    "hf_config_from_decoder",
    "load_config",
    "load_hf_config",
    "load_weights",
    "save_pretrained",
    "save_state_dict",
    "upcycle",
    "upcycle_config",
]
