"""Hugging Face checkpoints laid out other than the Hub's per-expert safetensors: transformers 5's fused
expert layout, tied embeddings that also store ``lm_head.weight``, and damaged files, named as
such on every path (``from_pretrained``, ``load_weights``, ``checkpoint_tool import-hf``, training
with ``model=hf``)."""

from __future__ import annotations

import json
import os
import random
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe_parallel import hf
from moe_parallel.hf import HFConversionError
from moe_parallel.hf.fused_experts import FUSED_LAYOUT_FAMILIES
from moe_parallel.hf.safetensors_io import SafetensorFiles
from tests.hf_models import EAGER, make_hf_model, random_hf_config, relative_error, save_hf_model, tokens

# A draw of each family with at least one MoE layer.
MOE_DRAWS = {
    "mixtral": 0,
    "qwen3_moe": 0,
    "qwen2_moe": 1,
    "olmoe": 0,
    "glm4_moe": 0,
    "deepseek_v3": 0,
    "deepseek_v2": 0,
}


def _transformers(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), **EAGER).eval()


def _logits_match(path: Path, reference=None) -> None:
    reference = reference if reference is not None else _transformers(path)
    ours = hf.from_pretrained(path).eval()
    x = tokens(reference.config.vocab_size)
    with torch.no_grad():
        assert relative_error(ours(x), reference(x).logits) <= 1e-5


# ---------------------------------------------------------------- transformers' fused expert layout


@pytest.mark.parametrize(
    "family",  # a renamed MoE block, shared experts with a correction bias, latent attention; the rest slow
    [
        f if f in ("mixtral", "glm4_moe", "deepseek_v3") else pytest.param(f, marks=pytest.mark.slow)
        for f in FUSED_LAYOUT_FAMILIES
    ],
)
def test_fused_expert_layout_loads_as_the_per_expert_one(tmp_path, family):
    draw = MOE_DRAWS[family]
    model = make_hf_model(random_hf_config(family, draw), draw)
    model.save_pretrained(str(tmp_path / "fused"), save_original_format=False)
    model.save_pretrained(str(tmp_path / "hub"))
    stored = load_file(str(tmp_path / "fused" / "model.safetensors"))
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in stored)  # the layout under test
    assert not any(".experts.0." in k for k in stored)
    assert hf.SafetensorsDir(tmp_path / "fused").fused_experts and not hf.SafetensorsDir(tmp_path / "hub").fused_experts
    for layout in ("fused", "hub"):
        _logits_match(tmp_path / layout, _transformers(tmp_path / layout))
    fused, hub = hf.from_pretrained(tmp_path / "fused").state_dict(), hf.from_pretrained(tmp_path / "hub").state_dict()
    assert fused.keys() == hub.keys() and all(torch.equal(fused[k], hub[k]) for k in hub)


def test_fused_expert_layout_that_cannot_be_mapped_is_refused_by_name(tmp_path):
    model = make_hf_model(random_hf_config("qwen3_moe", 0), 0)
    model.save_pretrained(str(tmp_path / "fused"), save_original_format=False)
    file = tmp_path / "fused" / "model.safetensors"
    stored = load_file(str(file))
    down = next(k for k in stored if k.endswith("experts.down_proj"))
    save_file({k: v for k, v in stored.items() if k != down}, str(file), metadata={"format": "pt"})
    with pytest.raises(
        HFConversionError, match=r"fused expert layout, which cannot be mapped .* holds only one of"
    ) as err:
        hf.from_pretrained(tmp_path / "fused")
    assert "save_original_format=True" in str(err.value) and "missing" not in str(err.value)
    # A family whose fused layout is not read gets the same fix, not a list of missing tensors.
    save_file(stored, str(file), metadata={"format": "pt"})
    with pytest.raises(HFConversionError, match=r"fused expert layout .* not read for model_type='qwen3_moe'.*=True"):
        hf.check_source(hf.load_config(tmp_path / "fused"), SafetensorFiles(tmp_path / "fused"))


# ---------------------------------------------------------------- tied embeddings that store lm_head too


def _tied_checkpoint(path: Path, head: str) -> torch.Tensor:
    """A tied Qwen3-MoE whose file stores ``head``: "equal" (lm_head = embedding), "different", or "only"
    (lm_head alone). Returns the stored embedding matrix (or lm_head, for "only")."""
    config = random_hf_config("qwen3_moe", 0)
    config.tie_word_embeddings = True
    save_hf_model(config, 0, path)
    file = path / "model.safetensors"
    stored = load_file(str(file))
    embed = stored["model.embed_tokens.weight"]
    if head == "equal":
        stored["lm_head.weight"] = embed.clone()
    elif head == "different":
        stored["lm_head.weight"] = torch.randn(embed.shape, generator=torch.Generator().manual_seed(7)) * 0.1
    else:
        stored["lm_head.weight"] = stored.pop("model.embed_tokens.weight")
    save_file(stored, str(file), metadata={"format": "pt"})
    return stored["lm_head.weight"]


@pytest.mark.parametrize("head, tied", [("equal", True), ("different", False), ("only", True)])
def test_tied_embeddings_with_a_stored_lm_head_load_as_transformers_loads_them(tmp_path, head, tied):
    stored_head = _tied_checkpoint(tmp_path, head)
    reference = _transformers(tmp_path)
    assert (reference.lm_head.weight is reference.model.embed_tokens.weight) == tied  # transformers' own verdict
    assert hf.load_config(tmp_path).tie_embeddings == tied
    _logits_match(tmp_path, reference)
    ours = hf.from_pretrained(tmp_path)
    weight = ours.lm_head.weight if ours.lm_head is not None else ours.state_dict()["embed.weight"]
    assert torch.equal(weight, stored_head)


# ---------------------------------------------------------------- damaged files, on every path


def _damage(file: Path, kind: str) -> None:
    data = file.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    if kind == "truncated header":
        file.write_bytes(data[: 8 + length // 2])
    elif kind == "truncated data":
        file.write_bytes(data[:-37])
    elif kind == "garbage":
        file.write_bytes(random.Random(0).randbytes(len(data)))
    else:  # "header claims more data": the last tensor grows by one row the file does not hold
        header = json.loads(data[8 : 8 + length])
        last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
        entry = header[last]
        row = (entry["data_offsets"][1] - entry["data_offsets"][0]) // entry["shape"][0]
        entry["shape"][0] += 1
        entry["data_offsets"][1] += row
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        file.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length :])


DAMAGE = ("truncated header", "truncated data", "garbage", "header claims more data")


@pytest.fixture(scope="module")
def intact(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("intact") / "qwen3_moe"
    save_hf_model(random_hf_config("qwen3_moe", 0), 0, path)
    return path


def _damaged_copy(intact: Path, into: Path, kind: str) -> tuple[Path, Path]:
    import shutil

    shutil.copytree(intact, into)
    _damage(into / "model.safetensors", kind)
    return into, into / "model.safetensors"


@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_safetensors_file_is_named_on_every_path(tmp_path, intact, capsys, kind):
    from launch import config as app_config
    from launch.checkpoint_tool import main as tool
    from launch.config import compose

    path, file = _damaged_copy(intact, tmp_path / "hf", kind)
    named = rf"{file} cannot be read as safetensors .* truncated or damaged"
    with pytest.raises(HFConversionError, match=named):
        hf.SafetensorsDir(path)
    with pytest.raises(HFConversionError, match=named):
        hf.from_pretrained(path)
    model = hf.from_pretrained(intact)
    with pytest.raises(HFConversionError, match=named):
        hf.load_weights(model, path)
    capsys.readouterr()
    assert tool(["import-hf", str(path), "--out", str(tmp_path / "ckpt")]) == 2
    err = capsys.readouterr().err
    assert str(file) in err and "Traceback" not in err and not (tmp_path / "ckpt").exists()
    with pytest.raises(app_config.AppConfigError, match=rf"model.path=.*{file}"):
        app_config.validate(compose("model=hf", f"model.path={path}"), world_size=1)


def test_data_lost_after_the_headers_were_checked_is_named_not_a_crash(tmp_path, intact, capsys, monkeypatch):
    """A file cut short while it is read (re-downloaded, a failing disk): the read names the file
    instead of the SIGBUS a memory-mapped read would die of."""
    import shutil

    from launch import hf_import
    from launch.checkpoint_tool import main as tool
    from moe_parallel.hf import load

    shutil.copytree(intact, tmp_path / "hf")
    file = tmp_path / "hf" / "model.safetensors"
    source = hf.SafetensorsDir(tmp_path / "hf")
    os.truncate(file, 64)  # inside the header: every tensor's data is gone
    key = "model.embed_tokens.weight"
    with pytest.raises(HFConversionError, match=rf"{file} cannot be read .*EOFError.*truncated or damaged"):
        source.get(key)

    def cut_after_check(check):
        def checked(config, source):
            check(config, source)
            os.truncate(file, 64)

        return checked

    shutil.copy(intact / "model.safetensors", file)
    monkeypatch.setattr(load, "check_source", cut_after_check(load.check_source))
    with pytest.raises(HFConversionError, match=rf"{file} cannot be read"):
        hf.from_pretrained(tmp_path / "hf")
    shutil.copy(intact / "model.safetensors", file)
    monkeypatch.setattr(hf_import, "check_source", cut_after_check(hf_import.check_source))
    capsys.readouterr()
    assert tool(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 2
    err = capsys.readouterr().err
    assert str(file) in err and "Traceback" not in err and not (tmp_path / "ckpt").exists()
