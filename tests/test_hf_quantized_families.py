"""The checkpoints DeepSeek-V3 and GPT-OSS ship, end to end: FP8 block-scaled weights and MXFP4
experts load exactly as their independently dequantized bf16 twins, and export to those bf16 tensors
bit for bit (without ``quantization_config``)."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe_parallel import hf
from tests.hf_models import random_hf_config, save_hf_model, tokens
from tests.test_hf_quantized import FP8_CONFIG, fp8_twins, mxfp4_per_element

E2M1_VALUES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def _twins(tmp_path, raw: dict, quantized: dict, twin: dict, quantization: dict):
    for name, tensors, quant in (("quantized", quantized, quantization), ("twin", twin, None)):
        (tmp_path / name).mkdir()
        save_file(tensors, str(tmp_path / name / "model.safetensors"), metadata={"format": "pt"})
        (tmp_path / name / "config.json").write_text(
            json.dumps(raw | ({"quantization_config": quant} if quant else {}))
        )
    return tmp_path / "quantized", tmp_path / "twin"


def _assert_same_model_and_export(tmp_path, quantized_dir, twin_dir, vocab: int) -> None:
    ours, reference = hf.from_pretrained(quantized_dir).eval(), hf.from_pretrained(twin_dir).eval()
    want = reference.state_dict()
    for name, value in ours.state_dict().items():
        assert value.dtype == want[name].dtype and torch.equal(value, want[name]), name
    ids = tokens(vocab)
    with torch.no_grad():
        assert torch.equal(ours(ids), reference(ids))
    # Export writes the dequantized values in bf16 (the twin's tensors, float32 ones kept) and no
    # quantization_config.
    hf.save_pretrained(ours, tmp_path / "exported", dtype=torch.bfloat16)
    exported, twin = (
        load_file(str(tmp_path / "exported" / "model.safetensors")),
        load_file(str(twin_dir / "model.safetensors")),
    )
    assert exported.keys() == twin.keys()
    fam = hf.FAMILIES[json.loads((twin_dir / "config.json").read_text())["model_type"]]
    for key, value in twin.items():
        dtype = torch.float32 if fam.keeps_fp32(key) else torch.bfloat16  # as transformers saves them
        assert exported[key].dtype == dtype and torch.equal(exported[key], value.to(dtype)), key
    assert "quantization_config" not in json.loads((tmp_path / "exported" / "config.json").read_text())


def _fp8_quantizable(key: str, tensor: torch.Tensor) -> bool:
    """DeepSeek-V3's files: linear weights in FP8; embedding, head, norms, router and bias as they are."""
    return (
        tensor.dim() == 2
        and key.endswith(".weight")
        and "embed_tokens" not in key
        and key != "lm_head.weight"
        and not key.endswith(".gate.weight")
    )


@pytest.mark.parametrize("draw", [0, 1, 2])
def test_deepseek_v3_fp8_checkpoint_loads_and_exports_as_its_bf16_twin(tmp_path, draw):
    config = random_hf_config("deepseek_v3", draw)
    save_hf_model(config, draw, tmp_path / "src", dtype=torch.bfloat16)
    stored = load_file(str(tmp_path / "src" / "model.safetensors"))
    raw = json.loads((tmp_path / "src" / "config.json").read_text())
    for key in [k for k in stored if k.endswith("e_score_correction_bias")]:  # float32 in DeepSeek's files
        stored[key] = stored[key].float()
    block = random.Random(draw).choice([(4, 4), (3, 8), (8, 5)])  # partial edge blocks everywhere
    fp8, twin = fp8_twins(stored, block, _fp8_quantizable)
    assert any(k.endswith("kv_b_proj.weight_scale_inv") for k in fp8) and any(
        ".experts." in k for k in fp8 if k.endswith("_inv")
    )
    quantized_dir, twin_dir = _twins(tmp_path, raw, fp8, twin, {**FP8_CONFIG, "weight_block_size": list(block)})
    _assert_same_model_and_export(tmp_path, quantized_dir, twin_dir, config.vocab_size)


def _encode_mxfp4(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks [..., G, 16] U8, scales [..., G] U8) of ``values [..., G*32]``: per group of 32 a
    power-of-two scale that brings the largest magnitude to at most 6, each value rounded to the
    nearest E2M1 magnitude, two codes per byte, low nibble first."""
    *lead, width = values.shape
    groups = values.float().reshape(-1, width // 32, 32)
    amax = groups.abs().amax(dim=-1).clamp(min=2.0**-100)
    exponent = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    scaled = groups / (2.0**exponent)[..., None]
    table = torch.tensor(E2M1_VALUES)
    index = (scaled.abs()[..., None] - table).abs().argmin(dim=-1)
    codes = index + 8 * (scaled < 0).long() * (index > 0).long()
    pairs = codes.reshape(*codes.shape[:-1], 16, 2)
    blocks = (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8)
    scales = (exponent + 127).to(torch.uint8)
    return blocks.reshape(*lead, width // 32, 16), scales.reshape(*lead, width // 32)


@pytest.mark.parametrize("draw", [0, 1])
def test_gpt_oss_mxfp4_experts_load_and_export_as_their_bf16_twin(tmp_path, draw):
    import transformers

    rng = random.Random(draw)
    config = transformers.GptOssConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=rng.choice([32, 64]),
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_local_experts=4,
        num_experts_per_tok=2,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=3,
        swiglu_limit=1.5,
    )
    save_hf_model(config, draw, tmp_path / "src", dtype=torch.bfloat16)
    stored = load_file(str(tmp_path / "src" / "model.safetensors"))
    raw = json.loads((tmp_path / "src" / "config.json").read_text())
    mx, twin = {}, {}
    for key, tensor in stored.items():
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = _encode_mxfp4(tensor.transpose(-2, -1))  # stored [E, out, in/32, 16]
            mx[key + "_blocks"], mx[key + "_scales"] = blocks, scales
            twin[key] = mxfp4_per_element(blocks, scales)
            assert twin[key].shape == tensor.shape
            assert (twin[key].float() - tensor.float()).abs().max() <= tensor.float().abs().max() / 2  # an encoding
        else:
            mx[key] = twin[key] = tensor
    quantization = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
    }
    quantized_dir, twin_dir = _twins(tmp_path, raw, mx, twin, quantization)
    assert hf.SafetensorsDir(quantized_dir).quantization == "mxfp4"
    _assert_same_model_and_export(tmp_path, quantized_dir, twin_dir, config.vocab_size)
