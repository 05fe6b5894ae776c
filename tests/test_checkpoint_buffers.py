"""Persistent buffers in checkpoints: the routers' expert_bias (aux-loss-free balancing) survives a
resume exactly, loads at another layout, and a missing or damaged buffer is refused by name."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

from moe_parallel import MoEConfig, MoELayer, update_expert_biases
from moe_parallel.checkpoints.checkpoint import (
    CheckpointError,
    canonical_buffer_names,
    export_consolidated,
    load_checkpoint,
    save_checkpoint,
)
from moe_parallel.checkpoints.store import file_checksum
from moe_parallel.integration.engine import build_engine
from moe_parallel.integration.parallel import initialize_parallel
from tests.dist_utils import run_distributed
from tests.toy_models import DS_CONFIG, E, ToyMoELM, loss_fn, toy_batch

BIAS = "moe.router.expert_bias"


def bias_lm(ep_group=None) -> ToyMoELM:
    """The toy model with aux-loss-free balancing: its router's expert_bias moves every step."""
    return ToyMoELM(ep_group, capacity_factor=None, aux_loss_coeff=0.0, z_loss_coeff=0.0, expert_bias_update_rate=0.05)


def _engine(ep: int):
    state = initialize_parallel(expert_parallel_size=ep, num_experts=E)
    config = {**DS_CONFIG, "zero_optimization": {"stage": 1}}
    engine, _, _ = build_engine(bias_lm(state.ep_group), config, lr=1e-2, weight_decay=0.0)
    return engine


def _train(engine, steps: int, start: int = 0) -> list[float]:
    losses = []
    for step in range(start, start + steps):
        loss = loss_fn(engine, toy_batch(step, dist.get_rank()))
        engine.backward(loss)
        engine.step()
        update_expert_biases(engine.module, dist.group.WORLD)  # every rank routes its own tokens
        losses.append(loss.item())
    return losses


def _bias(engine) -> torch.Tensor:
    return engine.module.moe.router.expert_bias.clone()


def _resume_and_relayout(rank, world, tmp):
    engine = _engine(ep=2)
    straight = _train(engine, 6)
    straight_bias = _bias(engine)

    engine = _engine(ep=2)
    first = _train(engine, 3)
    saved_bias = _bias(engine)
    assert saved_bias.abs().sum() > 0  # the bias moved: a resume that dropped it would differ
    path = save_checkpoint(engine, tmp)
    engine = _engine(ep=2)
    load_checkpoint(engine, tmp)
    assert torch.equal(_bias(engine), saved_bias)
    resumed = _train(engine, 3, start=3)
    # One process, one layout: the resumed run is the uninterrupted one, bit for bit.
    assert first + resumed == straight
    assert torch.equal(_bias(engine), straight_bias)

    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["buffers"] == [BIAS]
    assert [rel for rel in manifest["files"] if rel.startswith("buffers/")] == ["buffers/stage_0.pt"]
    assert torch.equal(export_consolidated(path)[BIAS], saved_bias)

    # Saved at EP=2, loaded at EP=1 (each rank a whole model): the same bias, the same next step.
    engine1 = _engine(ep=1)
    load_checkpoint(engine1, tmp)
    assert torch.equal(_bias(engine1), saved_bias)


def test_expert_bias_resumes_exactly_and_loads_at_another_layout(tmp_path):
    run_distributed(_resume_and_relayout, 2, str(tmp_path), timeout=300)


def _rewrite(path, rel, obj, manifest) -> None:
    torch.save(obj, path / rel)
    manifest["files"][rel] = {"bytes": (path / rel).stat().st_size, "crc32": file_checksum(path / rel)}
    (path / "manifest.json").write_text(json.dumps(manifest))


def _refusals(rank, world, tmp):
    from launch.checkpoint_tool import main as tool

    engine = _engine(ep=1)
    _train(engine, 2)
    trained = _bias(engine)

    # export -> import keeps the buffer a buffer: the imported checkpoint loads it back.
    save_checkpoint(engine, f"{tmp}/run")
    assert tool(["export", f"{tmp}/run", "--out", f"{tmp}/model.pt"]) == 0
    assert torch.equal(torch.load(f"{tmp}/model.pt")[BIAS], trained)
    assert tool(["import", f"{tmp}/model.pt", "--out", f"{tmp}/imported"]) == 0
    fresh = _engine(ep=1)
    load_checkpoint(fresh, f"{tmp}/imported")
    assert torch.equal(_bias(fresh), trained)

    path = save_checkpoint(engine, tmp, tag="corrupt")
    data = bytearray((path / "buffers" / "stage_0.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / "buffers" / "stage_0.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"buffers/stage_0.pt is corrupt"):
        load_checkpoint(engine, tmp, tag="corrupt")

    path = save_checkpoint(engine, tmp, tag="gone")
    (path / "buffers" / "stage_0.pt").unlink()
    with pytest.raises(CheckpointError, match=r"missing buffers/stage_0.pt"):
        load_checkpoint(engine, tmp, tag="gone")

    path = save_checkpoint(engine, tmp, tag="emptied")  # the file is sound, the buffer is not in it
    manifest = json.loads((path / "manifest.json").read_text())
    _rewrite(path, "buffers/stage_0.pt", {}, manifest)
    with pytest.raises(CheckpointError, match=rf"missing \['{BIAS}'\]"):
        load_checkpoint(engine, tmp, tag="emptied")
    _rewrite(path, "buffers/stage_0.pt", {BIAS: trained, "not.a.buffer": trained}, manifest)
    with pytest.raises(CheckpointError, match=r"unexpected \['not.a.buffer'\]"):
        load_checkpoint(engine, tmp, tag="emptied")
    _rewrite(path, "buffers/stage_0.pt", {BIAS: trained[:-1]}, manifest)
    with pytest.raises(CheckpointError, match=rf"buffer {BIAS}: checkpoint shape \({E - 1},\)"):
        load_checkpoint(engine, tmp, tag="emptied")
    assert torch.equal(_bias(engine), trained)  # every refusal changed nothing

    # A checkpoint from before buffers were kept: loads, and says what keeps its value.
    path = save_checkpoint(engine, tmp, tag="older")
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["buffers"], manifest["files"]["buffers/stage_0.pt"]
    (path / "buffers" / "stage_0.pt").unlink()
    (path / "manifest.json").write_text(json.dumps(manifest))
    fresh = _engine(ep=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_checkpoint(fresh, tmp, tag="older")
    assert [str(w.message) for w in caught if "predates buffers" in str(w.message)] == [
        f"checkpoint {path} predates buffers in checkpoints: ['{BIAS}'] keep their current values "
        "(the initial ones in a new run; a router's trained expert_bias is lost)"
    ]
    assert torch.equal(_bias(fresh), torch.zeros(E))


def test_missing_or_damaged_buffers_are_refused_by_name(tmp_path):
    run_distributed(_refusals, 1, str(tmp_path), timeout=200)


def test_canonical_buffer_names_follow_the_renamed_module_paths():
    """A pipeline stage renames module paths (layer index -> plain name); buffers follow their module,
    including one nested below a module without parameters of its own."""
    cfg = MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=4, top_k=1, expert_bias_update_rate=0.1)
    inner = nn.Module()
    inner.register_buffer("scale", torch.ones(2))
    block = nn.Module()
    block.ffn = MoELayer(cfg)
    block.norm = nn.LayerNorm(8)
    block.norm.register_buffer("cache", torch.ones(2), persistent=False)  # not in the state dict: left out
    block.extra = nn.Module()
    block.extra.inner = inner
    stage = nn.Sequential(nn.Identity(), nn.Identity(), block)
    names = {n: n.replace("2.", "blocks.7.", 1) for n, _ in stage.named_parameters()}
    stage.canonical_parameter_names = lambda: names
    assert canonical_buffer_names(stage) == {
        "2.ffn.router.expert_bias": "blocks.7.ffn.router.expert_bias",
        "2.extra.inner.scale": "blocks.7.extra.inner.scale",
    }
    lone = nn.Module()
    lone.register_buffer("orphan", torch.zeros(1))
    assert canonical_buffer_names(lone) == {"orphan": "orphan"}  # a plain model: its own names
    lone.canonical_parameter_names = dict  # renamed, but nothing to derive the buffer's new name from
    with pytest.raises(CheckpointError, match="no canonical name for buffer orphan"):
        canonical_buffer_names(lone)
