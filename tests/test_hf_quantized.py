"""Quantized Hugging Face checkpoints as published (FP8 block-scaled, MXFP4), read dequantized: the
view against dequantizations written independently here (per element, per block) and against
transformers' own, end to end through ``from_pretrained``, and the formats we do not read refused by
name. Files are laid out as the real ones: F8_E4M3 weights with F32 ``weight_scale_inv`` grids with
partial edge blocks, U8 ``_blocks`` / ``_scales``; embeddings, norms and routers unquantized."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe_parallel import hf
from moe_parallel.hf import HFConversionError
from moe_parallel.hf.quantization import check_quantization
from tests.hf_models import random_hf_config, save_hf_model, tokens

FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
FP8_MAX = 448.0


# ---------------------------------------------------------------- independent encoders and decoders


def quantize_fp8(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(F8_E4M3 weight, F32 scale_inv) with one scale per (partial) block: amax / 448, as DeepSeek."""
    b0, b1 = block
    rows, cols = weight.shape[-2:]
    grid = (*weight.shape[:-2], math.ceil(rows / b0), math.ceil(cols / b1))
    scale = torch.empty(grid)
    quantized = torch.empty(weight.shape, dtype=torch.float8_e4m3fn)
    for i in range(grid[-2]):
        for j in range(grid[-1]):
            tile = weight[..., i * b0 : (i + 1) * b0, j * b1 : (j + 1) * b1].float()
            s = tile.abs().amax(dim=(-2, -1)).clamp(min=1e-12) / FP8_MAX
            quantized[..., i * b0 : (i + 1) * b0, j * b1 : (j + 1) * b1] = (tile / s[..., None, None]).to(
                torch.float8_e4m3fn
            )
            scale[..., i, j] = s
    return quantized, scale


def fp8_per_element(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Each element times the scale at (row // b0, column // b1), one at a time."""
    flat_w = weight.float().reshape(-1, *weight.shape[-2:])
    flat_s = scale.reshape(-1, *scale.shape[-2:])
    out = torch.empty(flat_w.shape)
    for m in range(flat_w.shape[0]):
        for r in range(flat_w.shape[1]):
            for c in range(flat_w.shape[2]):
                out[m, r, c] = flat_w[m, r, c] * flat_s[m, r // block[0], c // block[1]]
    return out.reshape(weight.shape).to(torch.bfloat16)


def fp8_twins(
    stored: dict[str, torch.Tensor], block: tuple[int, int], quantizable: Callable[[str, torch.Tensor], bool]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A checkpoint's tensors as a block-FP8 checkpoint (``quantizable`` ones quantized, with their
    ``weight_scale_inv``) and its twin: the same tensors with each quantized weight dequantized per block."""
    fp8, twin = {}, {}
    for key, tensor in stored.items():
        if quantizable(key, tensor):
            q, s = quantize_fp8(tensor, block)
            fp8[key], fp8[key.removesuffix(".weight") + ".weight_scale_inv"] = q, s
            twin[key] = fp8_per_block(q, s, block)
        else:
            fp8[key] = twin[key] = tensor
    return fp8, twin


def fp8_per_block(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    out = weight.float()
    for i in range(scale.shape[-2]):
        for j in range(scale.shape[-1]):
            out[..., i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]] *= scale[
                ..., i, j, None, None
            ]
    return out.to(torch.bfloat16)


def e2m1(code: int) -> float:
    """An E2M1 nibble from its bits: sign, 2 exponent bits (bias 1, 0 = subnormal), 1 mantissa bit."""
    sign = -1.0 if code & 8 else 1.0
    exponent, mantissa = (code >> 1) & 3, code & 1
    magnitude = mantissa * 0.5 if exponent == 0 else (1 + mantissa / 2) * 2.0 ** (exponent - 1)
    return sign * magnitude


def mxfp4_per_element(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    *lead, groups, width = blocks.shape
    flat_b = blocks.reshape(-1, groups, width).tolist()
    flat_s = scales.reshape(-1, groups).tolist()
    out = []
    for row_b, row_s in zip(flat_b, flat_s):
        values = []
        for group, s in zip(row_b, row_s):
            for byte in group:
                values += [e2m1(byte & 15) * 2.0 ** (s - 127), e2m1(byte >> 4) * 2.0 ** (s - 127)]
        out.append(values)
    result = torch.tensor(out).reshape(*lead, groups * 2 * width).to(torch.bfloat16)
    return result.transpose(-2, -1).contiguous() if result.dim() == 3 else result


def write_dir(
    path: Path, tensors: dict[str, torch.Tensor], quantization: dict | None, model_type="deepseek_v3"
) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    raw = {"model_type": model_type}
    if quantization is not None:
        raw["quantization_config"] = quantization
    (path / "config.json").write_text(json.dumps(raw))
    return path


# ---------------------------------------------------------------- the view, property tests


@pytest.mark.parametrize("draw", range(6))
def test_fp8_view_matches_a_per_element_dequantization(tmp_path, draw):
    rng = random.Random(draw)
    gen = torch.Generator().manual_seed(draw)
    block = (rng.randint(2, 7), rng.randint(2, 7))
    tensors, expected = {}, {}
    for i in range(3):
        lead = (rng.randint(1, 3),) if i == 2 else ()  # a stacked (expert) weight too
        shape = (*lead, rng.randint(1, 17), rng.randint(1, 17))
        weight = torch.randn(shape, generator=gen) * 10.0 ** rng.uniform(-3, 2)
        q, s = quantize_fp8(weight, block)
        tensors[f"layers.{i}.proj.weight"], tensors[f"layers.{i}.proj.weight_scale_inv"] = q, s
        expected[f"layers.{i}.proj.weight"] = fp8_per_element(q, s, block)
    tensors["norm.weight"] = torch.randn(5, generator=gen).to(torch.bfloat16)
    tensors["router.bias"] = torch.randn(5, generator=gen)
    path = write_dir(tmp_path / "fp8", tensors, {**FP8_CONFIG, "weight_block_size": list(block)})

    source = hf.SafetensorsDir(path)
    assert source.keys() == {*expected, "norm.weight", "router.bias"}  # the scales are hidden
    assert source.quantization == "fp8"
    for key, want in expected.items():
        assert source.shapes[key] == tuple(want.shape) and source.torch_dtype(key) == torch.bfloat16
        assert torch.equal(source.get(key), want), key
    assert torch.equal(source.get("norm.weight"), tensors["norm.weight"])  # unquantized: passed through
    assert (
        torch.equal(source.get("router.bias"), tensors["router.bias"])
        and source.torch_dtype("router.bias") == torch.float32
    )
    stacked = "layers.2.proj.weight"
    for j in range(expected[stacked].shape[0]):
        assert torch.equal(source.get_rows(stacked, j), expected[stacked][j])


def test_fp8_view_matches_transformers_dequantization(tmp_path):
    """transformers' ``Fp8Dequantize`` (it needs whole blocks) on the same tensors, as a second oracle."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 24, 40, generator=gen)
    q, s = quantize_fp8(weight, (8, 20))
    path = write_dir(
        tmp_path / "fp8", {"w.weight": q, "w.weight_scale_inv": s}, {**FP8_CONFIG, "weight_block_size": [8, 20]}
    )
    theirs = Fp8Dequantize(None)._dequantize_one(q, s, output_dtype=torch.bfloat16)
    assert torch.equal(hf.SafetensorsDir(path).get("w.weight"), theirs)


@pytest.mark.parametrize("draw", range(4))
def test_mxfp4_view_matches_a_per_element_decode_in_gpt_oss_layout(tmp_path, draw):
    rng = random.Random(draw)
    gen = torch.Generator().manual_seed(draw)
    experts, width, hidden = rng.randint(1, 3), 32 * rng.randint(1, 2), 32 * rng.randint(1, 2)
    prefix = "model.layers.0.mlp.experts."
    shapes = {"gate_up_proj": (experts, 2 * width, hidden // 32), "down_proj": (experts, hidden, width // 32)}
    tensors = {}
    for name, (e, rows, groups) in shapes.items():
        tensors[prefix + name + "_blocks"] = torch.randint(
            0, 256, (e, rows, groups, 16), generator=gen, dtype=torch.uint8
        )
        tensors[prefix + name + "_scales"] = torch.randint(
            118, 134, (e, rows, groups), generator=gen, dtype=torch.uint8
        )
    tensors["model.layers.0.attn.o_blocks"] = torch.randint(0, 256, (5, 2, 16), generator=gen, dtype=torch.uint8)
    tensors["model.layers.0.attn.o_scales"] = torch.randint(120, 130, (5, 2), generator=gen, dtype=torch.uint8)
    tensors["model.layers.0.mlp.router.weight"] = torch.randn(experts, hidden, generator=gen).to(torch.bfloat16)
    path = write_dir(
        tmp_path / "mx", tensors, {"quant_method": "mxfp4", "modules_to_not_convert": ["router"]}, "gpt_oss"
    )

    source = hf.SafetensorsDir(path)
    assert source.keys() == {
        prefix + "gate_up_proj",
        prefix + "down_proj",
        "model.layers.0.attn.o",
        "model.layers.0.mlp.router.weight",
    }
    assert source.quantization == "mxfp4"
    # GPT-OSS's unquantized layout: gate_up_proj [E, D, 2F], down_proj [E, F, D]
    assert source.shapes[prefix + "gate_up_proj"] == (experts, hidden, 2 * width)
    assert source.shapes[prefix + "down_proj"] == (experts, width, hidden)
    assert source.shapes["model.layers.0.attn.o"] == (5, 64)
    for name in ("gate_up_proj", "down_proj", "attn.o"):
        key = prefix + name if "proj" in name else "model.layers.0." + name
        want = mxfp4_per_element(tensors[key + "_blocks"], tensors[key + "_scales"])
        got = source.get(key)
        assert got.dtype == torch.bfloat16 and torch.equal(got, want), key
        if got.dim() == 3:
            assert all(torch.equal(source.get_rows(key, j), want[j]) for j in range(got.shape[0]))


def test_mxfp4_view_matches_transformers_dequantization(tmp_path):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    gen = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 256, (2, 64, 3, 16), generator=gen, dtype=torch.uint8)
    scales = torch.randint(115, 135, (2, 64, 3), generator=gen, dtype=torch.uint8)
    path = write_dir(
        tmp_path / "mx",
        {"e.down_proj_blocks": blocks, "e.down_proj_scales": scales},
        {"quant_method": "mxfp4"},
        "gpt_oss",
    )
    assert torch.equal(hf.SafetensorsDir(path).get("e.down_proj"), convert_moe_packed_tensors(blocks, scales))


# ---------------------------------------------------------------- refusals


def _fp8_pair(shape=(10, 12), block=(4, 4)):
    q, s = quantize_fp8(torch.randn(shape, generator=torch.Generator().manual_seed(0)), block)
    return q, s


@pytest.mark.parametrize(
    "tensors, quantization, match",
    [
        (
            lambda: {"w.weight": _fp8_pair()[0], "w.weight_scale_inv": torch.ones(2, 3)},
            {**FP8_CONFIG, "weight_block_size": [4, 4]},
            r"FP8 scale tensor w\.weight_scale_inv has shape \[2, 3\] \(a scale grid\).*needs \[3, 3\]",
        ),
        (
            lambda: {"w.weight": _fp8_pair()[0], "w.weight_scale_inv": torch.ones(())},
            {**FP8_CONFIG, "weight_block_size": [4, 4]},
            r"w\.weight_scale_inv has shape \[\] \(a per-tensor scale\)",
        ),
        (lambda: {"w.weight": _fp8_pair()[0]}, FP8_CONFIG, r"FP8 tensor w\.weight has no w\.weight_scale_inv"),
        (
            lambda: {"w.weight": _fp8_pair()[0].to(torch.float8_e5m2), "w.weight_scale_inv": _fp8_pair()[1]},
            {**FP8_CONFIG, "weight_block_size": [4, 4]},
            r"FP8 tensor w\.weight is F8_E5M2, not F8_E4M3",
        ),
        (
            lambda: {"w.weight": torch.randn(4, 4), "w.weight_scale_inv": torch.ones(1, 1)},
            FP8_CONFIG,
            r"FP8 scale tensor w\.weight_scale_inv has no F8_E4M3 weight",
        ),
        (
            lambda: dict(zip(("w.weight", "w.weight_scale_inv"), _fp8_pair())),
            None,
            r"w\.weight is FP8 but config.json has no quantization_config",
        ),
        (
            lambda: {"p_blocks": torch.zeros(4, 2, 16, dtype=torch.uint8)},
            {"quant_method": "mxfp4"},
            r"MXFP4 tensor p_blocks has no p_scales beside it",
        ),
        (
            lambda: {"p_scales": torch.zeros(4, 2, dtype=torch.uint8)},
            {"quant_method": "mxfp4"},
            r"MXFP4 tensor p_scales has no p_blocks beside it",
        ),
        (
            lambda: {
                "p_blocks": torch.zeros(4, 2, 16, dtype=torch.uint8),
                "p_scales": torch.zeros(4, 3, dtype=torch.uint8),
            },
            {"quant_method": "mxfp4"},
            r"MXFP4 tensor p_scales has shape \[4, 3\], p_blocks needs \[4, 2\]",
        ),
    ],
)
def test_quantized_tensors_we_cannot_read_are_refused_by_name(tmp_path, tensors, quantization, match):
    path = write_dir(tmp_path / "q", tensors(), quantization)
    with pytest.raises(HFConversionError, match=match) as err:
        hf.SafetensorsDir(path)
    assert str(path) in str(err.value) and "supported are" in str(err.value)


@pytest.mark.parametrize(
    "quantization, match",
    [
        ({"quant_method": "compressed-tensors"}, "quant_method='compressed-tensors' is not supported"),
        ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "quant_method='bitsandbytes' is not supported"),
        ({"quant_method": "gptq", "bits": 4}, "quant_method='gptq' is not supported"),
        ({"quant_method": "awq"}, "quant_method='awq' is not supported"),
        ({**FP8_CONFIG, "fmt": "e5m2"}, r"FP8 quantization_config.fmt='e5m2' is not supported: only E4M3"),
        (
            {**FP8_CONFIG, "weight_block_size": None},
            r"FP8 quantization_config.weight_block_size=None .* not per-tensor",
        ),
        ({**FP8_CONFIG, "activation_scheme": "static"}, r"FP8 quantization_config.activation_scheme='static'"),
        ([1, 2], "quantization_config is a JSON list"),
    ],
)
def test_quantization_configs_we_cannot_read_are_refused_up_front(tmp_path, quantization, match):
    with pytest.raises(HFConversionError, match=match) as err:
        check_quantization({"quantization_config": quantization}, tmp_path)
    assert str(tmp_path / "config.json") in str(err.value)
    hf_dir = tmp_path / "model"
    save_hf_model(random_hf_config("qwen3_moe", 0), 0, hf_dir)
    raw = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**raw, "quantization_config": quantization}))
    with pytest.raises(HFConversionError, match=match):
        hf.load_config(hf_dir)
    with pytest.raises(HFConversionError, match=match):
        hf.from_pretrained(hf_dir)


def test_supported_quantization_configs_are_read(tmp_path):
    assert check_quantization({}, tmp_path) is None
    assert check_quantization({"quantization_config": {"quant_method": "fp8"}}, tmp_path).block == (128, 128)
    assert check_quantization(
        {"quantization_config": FP8_CONFIG | {"weight_block_size": [64, 32]}}, tmp_path
    ).block == (64, 32)
    assert check_quantization({"quantization_config": {"quant_method": "mxfp4"}}, tmp_path).method == "mxfp4"


# ---------------------------------------------------------------- end to end through from_pretrained


def _quantizable(key: str, tensor: torch.Tensor) -> bool:
    """Linear weights; the embedding, LM head, norms and routers stay unquantized, as DeepSeek's files."""
    routers = (".gate.weight", "shared_expert_gate.weight")
    return (
        tensor.dim() == 2
        and key.endswith(".weight")
        and "embed_tokens" not in key
        and key != "lm_head.weight"
        and not key.endswith(routers)
    )


@pytest.mark.parametrize("family, draw", [("qwen3_moe", 0), ("qwen3_moe", 1), ("glm4_moe", 0)])
def test_fp8_checkpoint_loads_as_its_independently_dequantized_bf16_twin(tmp_path, family, draw):
    config = random_hf_config(family, draw)
    save_hf_model(config, draw, tmp_path / "bf16_src", dtype=torch.bfloat16)
    stored = load_file(str(tmp_path / "bf16_src" / "model.safetensors"))
    raw = json.loads((tmp_path / "bf16_src" / "config.json").read_text())
    block = random.Random(draw).choice([(4, 4), (3, 8), (8, 5)])  # tiny blocks: every shape has partial edges
    fp8, twin = fp8_twins(stored, block, _quantizable)
    assert any(t.dtype == torch.float8_e4m3fn for t in fp8.values()) and any(
        "experts" in k for k in fp8 if k.endswith("_inv")
    )
    for name, tensors, quant in (("fp8", fp8, {**FP8_CONFIG, "weight_block_size": list(block)}), ("twin", twin, None)):
        (tmp_path / name).mkdir()
        save_file(tensors, str(tmp_path / name / "model.safetensors"), metadata={"format": "pt"})
        (tmp_path / name / "config.json").write_text(
            json.dumps(raw | ({"quantization_config": quant} if quant else {}))
        )

    ours, reference = hf.from_pretrained(tmp_path / "fp8").eval(), hf.from_pretrained(tmp_path / "twin").eval()
    assert hf.SafetensorsDir(tmp_path / "fp8").quantization == "fp8"
    want = reference.state_dict()
    for name, value in ours.state_dict().items():
        assert value.dtype == want[name].dtype and torch.equal(value, want[name]), name
    ids = tokens(config.vocab_size)
    with torch.no_grad():
        assert torch.equal(ours(ids), reference(ids))
    # a pipeline stage / an existing model filled from the path
    hf.load_weights(reference, tmp_path / "fp8")
    assert all(torch.equal(v, want[k]) for k, v in reference.state_dict().items())


def test_import_hf_of_an_fp8_checkpoint_says_export_writes_bf16(tmp_path, capsys):
    from launch.checkpoint_tool import main as tool

    config = random_hf_config("qwen3_moe", 2)
    save_hf_model(config, 2, tmp_path / "src", dtype=torch.bfloat16)
    stored = load_file(str(tmp_path / "src" / "model.safetensors"))
    tensors = {}
    for key, tensor in stored.items():
        if _quantizable(key, tensor):
            tensors[key], tensors[key.removesuffix(".weight") + ".weight_scale_inv"] = quantize_fp8(tensor, (4, 4))
        else:
            tensors[key] = tensor
    save_file(tensors, str(tmp_path / "src" / "model.safetensors"), metadata={"format": "pt"})
    raw = json.loads((tmp_path / "src" / "config.json").read_text())
    (tmp_path / "src" / "config.json").write_text(
        json.dumps(raw | {"quantization_config": FP8_CONFIG | {"weight_block_size": [4, 4]}})
    )
    assert tool(["import-hf", str(tmp_path / "src"), "--out", str(tmp_path / "ckpt")]) == 0
    assert "is quantized (fp8)" in capsys.readouterr().out
    assert (
        tool(
            ["export-hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"), "--hf-config", str(tmp_path / "src")]
        )
        == 0
    )
    assert "export-hf writes bf16" in capsys.readouterr().out
    # From the checkpoint alone too: the import recorded that its weights were dequantized.
    assert tool(["export-hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out2")]) == 0
    assert "imported from a quantized (fp8) model: export-hf writes bf16" in capsys.readouterr().out
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in exported
    assert {t.dtype for t in load_file(str(tmp_path / "out" / "model.safetensors")).values()} <= {
        torch.bfloat16,
        torch.float32,
    }
