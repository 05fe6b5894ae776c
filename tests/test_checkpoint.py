"""Topology-free checkpoints: exact resume, loading at another EP size, strictness, atomic saves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from moe_parallel.checkpoints import checkpoint as ckpt
from moe_parallel.checkpoints.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from moe_parallel.checkpoints.store import file_checksum
from moe_parallel.integration.engine import build_engine
from moe_parallel.integration.parallel import initialize_parallel
from tests.dist_utils import run_distributed
from tests.toy_models import DS_CONFIG, E, ToyMoELM, loss_fn, toy_batch


def _engine(ep: int, zero: int = 1, capacity_factor=1.0, bf16: bool = False):
    state = initialize_parallel(expert_parallel_size=ep, num_experts=E)
    model = ToyMoELM(ep_group=state.ep_group, capacity_factor=capacity_factor)
    config = {**DS_CONFIG, "zero_optimization": {"stage": zero}, "bf16": {"enabled": bf16}}
    # A warm-up schedule, so that a resume must also restore the rate the optimizer uses next.
    warmup = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 10))  # noqa: E731
    engine, _, _ = build_engine(model, config, lr=1e-2, weight_decay=0.0, lr_scheduler=warmup)
    return engine, state


def _train(engine, steps, start=0) -> list[float]:
    rank = dist.get_rank()
    losses = []
    for step in range(start, start + steps):
        loss = loss_fn(engine, toy_batch(step, rank))
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def _outputs(engine) -> torch.Tensor:
    engine.module.eval()
    with torch.no_grad():
        out = engine.module(toy_batch(99, dist.get_rank())[:, :-1])
    engine.module.train()
    return out


def _expert_optim_state(engine, state) -> torch.Tensor:
    """exp_avg of every global expert's w1, gathered over the EP group: [E, D, F]."""
    param = engine.module.moe.experts.w1
    local = ckpt._full_optim_state(engine, param, ckpt._masters(engine).get(id(param)))["exp_avg"]
    parts = [torch.empty_like(local) for _ in range(state.layout.expert_parallel_size)]
    dist.all_gather(parts, local, group=state.ep_group)
    return torch.cat(parts)


def _resume_is_exact(rank, world, tmp, zero, bf16):
    engine, _ = _engine(ep=2, zero=zero, bf16=bf16)
    straight = _train(engine, 6)

    engine, _ = _engine(ep=2, zero=zero, bf16=bf16)
    first = _train(engine, 3)
    engine.save_checkpoint(tmp, client_state={"data_position": 3})
    engine, _ = _engine(ep=2, zero=zero, bf16=bf16)
    path, client = engine.load_checkpoint(tmp)  # DeepSpeed's method, routed to ours by build_engine
    assert path.endswith("step_00000003") and client == {"data_position": 3} and engine.global_steps == 3
    resumed = _train(engine, 3, start=3)
    torch.testing.assert_close(torch.tensor(first + resumed), torch.tensor(straight), rtol=1e-6, atol=1e-6)
    if bf16:  # the model computes in bf16, the router in fp32, the optimizer keeps fp32 masters
        assert engine.module.moe.experts.w1.dtype == torch.bfloat16
        logits = engine.module.moe.router(torch.randn(3, engine.module.moe.config.hidden_size).bfloat16()).logits_TE
        assert logits.dtype == torch.float32


@pytest.mark.parametrize(
    "zero,bf16", [(2, False), (0, True), (1, True)], ids=["zero2-fp32", "zero0-bf16", "zero1-bf16"]
)
def test_resume_continues_the_loss_curve_exactly(tmp_path, zero, bf16):
    run_distributed(_resume_is_exact, 2, str(tmp_path), zero, bf16, timeout=300)


def _load_at_other_ep_sizes(rank, world, tmp):
    # Dropless, so that the model's function does not depend on how tokens are split into ranks.
    engine2, state2 = _engine(ep=2, capacity_factor=None)
    _train(engine2, 2)
    save_checkpoint(engine2, f"{tmp}/ep2")
    out, optim = _outputs(engine2), _expert_optim_state(engine2, state2)

    for ep in (1, 4):  # 2 -> 1 and 2 -> 4
        engine, state = _engine(ep=ep, capacity_factor=None)
        load_checkpoint(engine, f"{tmp}/ep2")
        torch.testing.assert_close(_outputs(engine), out, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(_expert_optim_state(engine, state), optim, rtol=0, atol=0)
        if ep == 1:
            save_checkpoint(engine, f"{tmp}/ep1")

    engine4, state4 = _engine(ep=4, capacity_factor=None)  # 1 -> 4
    load_checkpoint(engine4, f"{tmp}/ep1")
    torch.testing.assert_close(_outputs(engine4), out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(_expert_optim_state(engine4, state4), optim, rtol=0, atol=0)
    # Training goes on identically from any of them.
    torch.testing.assert_close(torch.tensor(_train(engine4, 2, start=2)), torch.tensor(_train(engine2, 2, start=2)))


def test_load_at_another_expert_parallel_size(tmp_path):
    run_distributed(_load_at_other_ep_sizes, 4, str(tmp_path), timeout=400)


def _strictness(rank, world, tmp):
    engine, _ = _engine(ep=1, zero=0)
    path = save_checkpoint(engine, tmp)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["moe_layers"] == {"0": list(range(E))}
    assert (path / "experts" / "layer_0" / "expert_3.pt").exists()

    (path / "experts" / "layer_0" / "expert_3.pt").unlink()
    with pytest.raises(CheckpointError, match="missing experts/layer_0/expert_3.pt"):
        load_checkpoint(engine, tmp)
    manifest["files"]["dense/stage_0.pt"]["bytes"] += 1
    manifest["files"].pop("experts/layer_0/expert_3.pt")
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="stage_0.pt has .* bytes, manifest.json says"):
        load_checkpoint(engine, tmp)
    manifest["files"]["dense/stage_0.pt"]["bytes"] -= 1
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"layer 0 has experts .* missing \[3\]"):
        load_checkpoint(engine, tmp)

    other = save_checkpoint(engine, tmp, tag="other")
    dense = torch.load(other / "dense" / "stage_0.pt")
    dense["not.in.model"] = dense["head.bias"]
    del dense["embed.weight"]
    torch.save(dense, other / "dense" / "stage_0.pt")
    manifest = json.loads((other / "manifest.json").read_text())
    dense_file = other / "dense" / "stage_0.pt"
    manifest["files"]["dense/stage_0.pt"] = {"bytes": dense_file.stat().st_size, "crc32": file_checksum(dense_file)}
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"missing \['embed.weight'\], unexpected \['not.in.model'\]"):
        load_checkpoint(engine, tmp, tag="other")


def test_strict_loading_names_what_is_wrong(tmp_path):
    run_distributed(_strictness, 1, str(tmp_path), timeout=200)


def _crash_mid_save(rank, world, tmp):
    engine, _ = _engine(ep=1, zero=0)
    _train(engine, 1)
    good = save_checkpoint(engine, tmp)
    before = {p: p.read_bytes() for p in sorted(good.rglob("*")) if p.is_file()}
    _train(engine, 1, start=1)

    real_save = ckpt.write_file

    def crashing(obj, path: Path):
        if "expert_2" in path.name:
            raise OSError("I/O error (simulated)")
        return real_save(obj, path)

    ckpt.write_file = crashing
    with pytest.raises(CheckpointError, match=r"not saved: cannot write to .*expert_2.pt\): I/O error \(simulated\)"):
        save_checkpoint(engine, tmp)
    ckpt.write_file = real_save

    assert (Path(tmp) / "latest").read_text() == good.name
    assert not list(Path(tmp).glob("*.tmp-*"))  # the staging directory is gone
    assert {p: p.read_bytes() for p in sorted(good.rglob("*")) if p.is_file()} == before
    assert not (Path(tmp) / "step_00000002").exists()
    load_checkpoint(engine, tmp)  # the previous checkpoint still loads
    assert engine.global_steps == 1


def test_crash_mid_save_keeps_the_previous_checkpoint(tmp_path):
    run_distributed(_crash_mid_save, 1, str(tmp_path), timeout=200)


def _export_import_round_trip(rank, world, tmp):
    from launch.checkpoint_tool import main as tool

    engine, _ = _engine(ep=2, capacity_factor=None)
    _train(engine, 2)
    save_checkpoint(engine, f"{tmp}/ckpt")
    out = _outputs(engine)
    if rank == 0:
        assert tool(["verify", f"{tmp}/ckpt"]) == 0
        assert tool(["export", f"{tmp}/ckpt", "--out", f"{tmp}/model.pt"]) == 0
        assert tool(["import", f"{tmp}/model.pt", "--out", f"{tmp}/imported"]) == 0
        assert tool(["verify", f"{tmp}/missing"]) == 2
    dist.barrier()
    # The consolidated file is the plain EP=1 model's state dict.
    plain = ToyMoELM(capacity_factor=None).eval()
    plain.load_state_dict(torch.load(f"{tmp}/model.pt"), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(plain(toy_batch(99, rank)[:, :-1]), out, rtol=1e-6, atol=1e-6)
    # And the imported checkpoint loads at yet another layout.
    engine1, _ = _engine(ep=1, capacity_factor=None)
    load_checkpoint(engine1, f"{tmp}/imported")
    torch.testing.assert_close(_outputs(engine1), out, rtol=1e-6, atol=1e-6)


def test_export_and_import_consolidated_weights(tmp_path):
    run_distributed(_export_import_round_trip, 2, str(tmp_path), timeout=300)


def test_duplicate_layer_numbers_are_refused():
    from moe_parallel import MoEConfig, MoELayer

    cfg = MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=2, top_k=1)
    model = torch.nn.Sequential(MoELayer(cfg), MoELayer(cfg))
    with pytest.raises(CheckpointError, match=r"share layer_number \[0\]: give each MoELayer its own"):
        ckpt.numbered_moe_layers(model)
