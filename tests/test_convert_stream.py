"""``import-hf`` / ``export-hf`` at real size: they stream (peak memory far below the model's size),
keep the source's dtype unless asked, resume after a kill without redoing finished work, start clean
for a different command, refuse a live writer, and refuse an output the disk cannot hold before
writing anything. A bf16 import loads into training's fp32 master weights exactly."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.bench_convert import measure, write_random_model
from launch.checkpoint_tool import main as tool
from moe_parallel.checkpoints import resumable
from moe_parallel.checkpoints.checkpoint import ConsolidatedReader
from tests.dist_utils import run_distributed
from tests.hf_app_fixtures import tiny_family_model
from tests.hf_models import assert_same_tensors, hf_tensors

REPO = Path(__file__).resolve().parent.parent
SMALL = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    moe_intermediate_size=16,
    num_experts=4,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    """A bf16 Qwen3-MoE of 3 layers in shards: 3 x (4 experts + 8 dense) + 3 files to import."""
    src = tmp_path_factory.mktemp("small") / "hf"
    write_random_model(src, 3, shard_bytes=20_000, shape=SMALL, seed=1)
    return src


def _checkpoint_files(ckpt: Path) -> dict[str, dict]:
    return json.loads((ckpt / "imported" / "manifest.json").read_text())["files"]


def _identity(folder: Path) -> dict[str, tuple[int, int]]:
    """{file: (inode, mtime)}: a file kept by a resume keeps both through the final rename."""
    return {p.relative_to(folder).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def _killed_after(argv: list[str], files: int) -> subprocess.CompletedProcess:
    """Run ``checkpoint_tool argv`` in a child that is SIGKILLed right after its ``files``-th finished file."""
    code = (
        "import os, signal, sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from moe_parallel.checkpoints import resumable\n"
        "record = resumable.ResumableOutput.record\n"
        "def dying(self, rel, entry):\n"
        "    record(self, rel, entry)\n"
        f"    if len(self.finished) >= {files}:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "resumable.ResumableOutput.record = dying\n"
        "from launch.checkpoint_tool import main\n"
        f"sys.exit(main({argv!r}))\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)


# ---------------------------------------------------------------- memory


def test_peak_memory_of_both_conversions_is_a_fraction_of_the_model(tmp_path):
    """A 340 MB bf16 model (24 small layers, 40 MB shards): each conversion's peak resident memory
    over its baseline stays under a third of the model (about one shard plus one tensor)."""
    shape = dict(
        hidden_size=512,
        intermediate_size=1024,
        moe_intermediate_size=1024,
        num_experts=4,
        num_attention_heads=8,
        head_dim=64,
    )
    size = write_random_model(tmp_path / "hf", 24, shard_bytes=40 << 20, shape=shape)
    assert size > 300 << 20
    imp = measure(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")])
    exp = measure(["export-hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"), "--max-shard-mb", "40"])
    assert imp["over_baseline"] < size / 3, (imp, size)
    assert exp["over_baseline"] < size / 3, (exp, size)
    reader = ConsolidatedReader(tmp_path / "ckpt" / "imported")
    assert reader.tensor("embed.weight").dtype == torch.bfloat16  # kept, not widened to fp32
    checkpoint_bytes = sum(e["bytes"] for e in reader.manifest["files"].values())
    assert checkpoint_bytes < size * 1.05


# ---------------------------------------------------------------- resume


def test_a_killed_import_resumes_without_redoing_finished_files(tmp_path, small_model, capsys):
    assert tool(["import-hf", str(small_model), "--out", str(tmp_path / "straight")]) == 0
    out = tmp_path / "ckpt"
    argv = ["import-hf", str(small_model), "--out", str(out)]
    assert _killed_after(argv, 10).returncode == -9
    staging = resumable.resumable_staging(out)
    assert not out.exists() and (staging / resumable.JOURNAL).is_file()
    kept = {rel: ident for rel, ident in _identity(staging).items() if rel.startswith("imported/")}
    assert len([r for r in kept if r.endswith(".pt")]) == 10
    capsys.readouterr()
    assert tool(argv) == 0
    assert "resuming an interrupted conversion of the same command: 10 finished file(s)" in capsys.readouterr().out
    assert not staging.exists()
    after = _identity(out)
    assert all(after[rel] == ident for rel, ident in kept.items() if rel.endswith(".pt"))  # not written again
    assert _checkpoint_files(out) == _checkpoint_files(tmp_path / "straight")  # bit-identical (sizes, CRCs)
    assert tool(["export-hf", str(out), "--out", str(tmp_path / "hf")]) == 0
    assert_same_tensors(small_model, tmp_path / "hf")


def test_a_killed_export_resumes_shard_by_shard(tmp_path, small_model, capsys):
    ckpt = tmp_path / "ckpt"
    assert tool(["import-hf", str(small_model), "--out", str(ckpt)]) == 0
    shards = ["--max-shard-mb", "0.02"]
    assert tool(["export-hf", str(ckpt), "--out", str(tmp_path / "straight"), *shards]) == 0
    out = tmp_path / "hf"
    argv = ["export-hf", str(ckpt), "--out", str(out), *shards]
    assert _killed_after(argv, 3).returncode == -9
    kept = _identity(resumable.resumable_staging(out))
    capsys.readouterr()
    assert tool(argv) == 0
    assert "3 finished file(s)" in capsys.readouterr().out
    after = _identity(out)
    assert sum(after.get(rel) == ident for rel, ident in kept.items() if rel.endswith(".safetensors")) == 3
    for shard in (tmp_path / "straight").glob("*.safetensors"):
        assert (out / shard.name).read_bytes() == shard.read_bytes(), shard.name
    assert_same_tensors(small_model, out)


def test_a_damaged_finished_file_is_written_again(tmp_path, small_model, capsys):
    out = tmp_path / "ckpt"
    argv = ["import-hf", str(small_model), "--out", str(out)]
    assert _killed_after(argv, 4).returncode == -9
    staging = resumable.resumable_staging(out)
    victim = next((staging / "imported" / "dense" / "stage_0").glob("*.pt"))
    data = bytearray(victim.read_bytes())
    data[-40] ^= 0xFF
    victim.write_bytes(bytes(data))
    capsys.readouterr()
    assert tool(argv) == 0
    said = capsys.readouterr().out
    assert "3 finished file(s)" in said and "1 incomplete or damaged file(s) written again" in said
    assert tool(["verify", str(out)]) == 0


def test_another_command_on_the_same_out_starts_clean_and_says_so(tmp_path, small_model, capsys):
    out = tmp_path / "ckpt"
    assert _killed_after(["import-hf", str(small_model), "--out", str(out)], 5).returncode == -9
    capsys.readouterr()
    assert tool(["import-hf", str(small_model), "--out", str(out), "--dtype", "fp32"]) == 0
    said = capsys.readouterr().out
    assert "discarding 5 file(s) left by a conversion of a different command (changed: dtype)" in said
    reader = ConsolidatedReader(out / "imported")
    assert reader.tensor("embed.weight").dtype == torch.float32
    assert reader.expert(1, 0)["w1"].dtype == torch.float32


def test_a_live_writer_is_refused(tmp_path, small_model, capsys):
    out = tmp_path / "ckpt"
    staging = resumable.resumable_staging(out)
    staging.mkdir(parents=True)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (staging / resumable.WRITER).write_text(json.dumps({"host": socket.gethostname(), "pid": sleeper.pid}))
        assert tool(["import-hf", str(small_model), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"pid {sleeper.pid}" in err and "still running" in err
    finally:
        sleeper.kill()
        sleeper.wait()
    (staging / resumable.WRITER).write_text(json.dumps({"host": "elsewhere", "pid": 1}))
    assert tool(["import-hf", str(small_model), "--out", str(out)]) == 2
    assert f"delete {staging / resumable.WRITER}" in capsys.readouterr().err
    (staging / resumable.WRITER).unlink()
    assert tool(["import-hf", str(small_model), "--out", str(out)]) == 0  # that writer's work taken over


# ---------------------------------------------------------------- disk space


def test_an_output_that_does_not_fit_is_refused_before_anything_is_written(tmp_path, small_model, monkeypatch, capsys):
    monkeypatch.setattr(resumable, "free_bytes", lambda path: 1000)
    out = tmp_path / "ckpt"
    assert tool(["import-hf", str(small_model), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--out {out}: the checkpoint needs" in err and "1,000 bytes" in err and "free space there" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither the output nor its staging
    monkeypatch.undo()
    assert tool(["import-hf", str(small_model), "--out", str(out)]) == 0
    monkeypatch.setattr(resumable, "free_bytes", lambda path: 1000)
    assert tool(["export-hf", str(out), "--out", str(tmp_path / "hf")]) == 2
    assert "the Hugging Face model needs" in capsys.readouterr().err


def test_a_resume_needs_only_the_space_of_the_files_left(tmp_path, small_model, monkeypatch):
    from launch import hf_import

    needs = []
    check = hf_import.require_disk_space
    monkeypatch.setattr(hf_import, "require_disk_space", lambda out, n, what: needs.append(n) or check(out, n, what))
    argv = ["import-hf", str(small_model), "--out", str(tmp_path / "ckpt")]
    assert _killed_after(argv, 20).returncode == -9
    kept = sum(p.stat().st_size for p in resumable.resumable_staging(tmp_path / "ckpt").rglob("*.pt"))
    assert tool(argv) == 0
    assert tool(["import-hf", str(small_model), "--out", str(tmp_path / "fresh")]) == 0
    resumed, fresh = needs
    assert fresh - resumed >= kept  # the margin is the same: the kept files are not counted again


# ---------------------------------------------------------------- dtype


@pytest.mark.parametrize("asked", [None, "bf16", "fp32", "fp16"])
def test_dtype_is_the_sources_or_the_one_asked_and_glm_keeps_its_fp32_tensors(tmp_path, asked):
    src = tmp_path / "glm"
    tiny_family_model("glm4_moe", src, 96, dtype=torch.bfloat16, seed=2)
    argv = ["import-hf", str(src), "--out", str(tmp_path / "ckpt")] + (["--dtype", asked] if asked else [])
    assert tool(argv) == 0
    reader = ConsolidatedReader(tmp_path / "ckpt" / "imported")
    want = {None: torch.bfloat16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[asked]
    fp32 = {n for n in reader.file_of if n.endswith(("router.weight", "router.expert_bias"))}
    assert fp32, "the GLM model has routers"
    for name in reader.file_of:
        assert reader.tensor(name).dtype == (torch.float32 if name in fp32 else want), name
    layer = next(iter(reader.expert_parameters))
    assert reader.expert(int(layer), 0)["w1"].dtype == want
    assert tool(["export-hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 0
    if asked in (None, "bf16", "fp32"):  # bf16 values survive a trip through fp32 exactly
        assert_same_tensors(src, tmp_path / "hf")
    exported = hf_tensors(tmp_path / "hf")
    assert exported["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32


# ---------------------------------------------------------------- training starts from a bf16 import


def _load_imported(rank, world, ckpt: str, bf16: bool, result: str) -> None:
    from deepspeed.utils import safe_get_full_fp32_param

    from launch import hf_identity
    from moe_parallel import hf
    from moe_parallel.checkpoints.checkpoint import canonical_names, load_checkpoint
    from moe_parallel.integration.engine import build_engine
    from moe_parallel.integration.parallel import initialize_parallel
    from moe_parallel.integration.pipeline import decoder_pipeline

    config = hf.load_config(Path(ckpt) / hf_identity.HF_MODEL_DIR)
    state = initialize_parallel(pipeline_parallel_size=1, expert_parallel_size=1, num_experts=config.moe.num_experts)
    model = decoder_pipeline(config, ep_group=state.ep_group, topology=state.deepspeed_topology())
    ds = {
        "train_micro_batch_size_per_gpu": 1,
        "steps_per_print": 10**9,
        "zero_optimization": {"stage": 1},
        "bf16": {"enabled": bf16},
    }
    engine, _, _ = build_engine(model, ds)
    load_checkpoint(engine, ckpt)
    names = canonical_names(engine.module)
    masters = {
        names[n]: safe_get_full_fp32_param(p).detach().cpu().clone() for n, p in engine.module.named_parameters()
    }
    torch.save(
        {"masters": masters, "dtypes": {names[n]: str(p.dtype) for n, p in engine.module.named_parameters()}}, result
    )


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32-training", "bf16-training"])
def test_training_loads_a_bf16_import_into_fp32_master_weights_exactly(tmp_path, small_model, bf16):
    ckpt = tmp_path / "ckpt"
    assert tool(["import-hf", str(small_model), "--out", str(ckpt)]) == 0
    run_distributed(_load_imported, 1, str(ckpt), bf16, str(tmp_path / "result.pt"), timeout=240)
    result = torch.load(tmp_path / "result.pt")
    reader = ConsolidatedReader(ckpt / "imported")
    stacked = {c: (int(layer), s) for layer, names in reader.expert_parameters.items() for s, c in names.items()}
    assert set(result["masters"]) == reader.names() - set(reader.manifest["buffers"])
    for name, master in result["masters"].items():
        assert master.dtype == torch.float32, name
        if name in stacked:
            layer, short = stacked[name]
            want = torch.stack([reader.expert(layer, e)[short] for e in reader.expert_ids[layer]])
        else:
            want = reader.tensor(name)
        assert want.dtype == torch.bfloat16 and torch.equal(master, want.float()), name
    assert set(result["dtypes"].values()) == {"torch.bfloat16" if bf16 else "torch.float32"}
    assert os.path.isdir(ckpt / "hf_model")
