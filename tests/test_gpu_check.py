"""`make gpu-check` cannot rot: its dry run runs every stage at tiny shapes on the CPU, and its parts
(the model-FLOPs formula, the results file, BENCHMARKS.md's GPU block, the wheel recipe) are
checked here without a GPU and without network."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from moe_parallel.models import GPT, GPTConfig

REPO = Path(__file__).resolve().parents[1]
STAGES = ("install", "env", "tests", "bench", "sweep", "train")


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


gpu_check = _script("gpu_check")
gpu_wheels = _script("gpu_wheels")


# --------------------------------------------------------------------------- the dry run


@pytest.mark.slow  # every stage at tiny shapes, the CUDA tests on the CPU included: minutes
def test_dry_run_runs_every_stage_and_writes_one_results_file(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "GPU_CHECK_WORK": str(tmp_path / "work"), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        ["bash", "scripts/gpu_check.sh", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=1500
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "DRY RUN" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["dry_run"] and results["failures"] == [], results["failures"]
    assert {name: stage["rc"] for name, stage in results["stages"].items()} == dict.fromkeys(STAGES, 0)
    tests = results["tests"]
    assert tests["passed"] >= 20 and not tests["failed"] and not tests["skipped"]
    (row,) = results["bench"]["rows"]
    assert (row["config"]["name"], row["config"]["top_k"], row["failed"]) == ("large", 6, {})
    assert all(row["tflops"][impl] > 0 for impl in ("ours", "deepspeed", "floor", "moved"))
    (point,) = results["sweep"]["points"]
    assert point["config"]["name"] == "q2" and point["failed"] == {}
    assert all(point["ratios"][r] > 0 for r in ("deepspeed/ours", "deepspeed/compat", "compat/ours", "ours/moved"))
    train = results["train"]
    assert train["steps"] == 4 and train["tokens_per_s"] > 0 and 0 < train["mfu"] < 1
    markdown = (out / "results.md").read_text()
    assert "**DRY RUN**" in markdown and "| large: T=" in markdown and "| 4 | 128 |" in markdown
    assert "| q2 | T=" in markdown  # the sweep's table
    # What comes back from a lent machine: at most 8 plain files.
    assert len(list(out.iterdir())) <= 8 and all(p.is_file() for p in out.iterdir())
    with pytest.raises(SystemExit, match="dry run"):
        gpu_check.fill_benchmarks(out / "results.json", REPO / "BENCHMARKS.md")


def test_stages_past_the_deadline_are_recorded_and_the_results_file_still_written(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "GPU_CHECK_WORK": str(tmp_path / "work"), "GPU_CHECK_TOTAL_S": "20"}
    proc = subprocess.run(
        ["bash", "scripts/gpu_check.sh", str(out), "--dry-run"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "no time left before the 20s deadline" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert all(results["stages"][name]["timed_out"] for name in STAGES)
    assert len(results["failures"]) == len(STAGES) and results["tests"] is None and results["train"] is None


# --------------------------------------------------------------------------- benchmark pieces


def test_grouped_floor_computes_what_the_per_expert_floor_does():
    """On a GPU the floor is two grouped GEMMs on pre-aligned rows: the same gradients as the loop."""
    from benchmarks.harness import configs, peers

    cfg = configs.QUICK_CONFIGS["large"]
    floors = {}
    for gemm in ("loop", "grouped"):
        problem = peers.make_problem(cfg, target=configs.Target(expert_gemm=gemm))
        step = peers.build_floor(problem)
        step()
        floors[gemm] = step.leaves
    loop, grouped = floors["loop"], floors["grouped"]
    num_experts = cfg.experts
    w1_loop, w2_loop = loop[-2 * num_experts : -num_experts], loop[-num_experts:]
    assert len(grouped) == 3  # x_ND, w1_eDF, w2_eFD: the grouped form was taken
    torch.testing.assert_close(grouped[1].grad, torch.stack([w.grad for w in w1_loop]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grouped[2].grad, torch.stack([w.grad for w in w2_loop]), rtol=1e-4, atol=1e-5)
    assert configs.expert_gemm_flops(cfg, 10) == 12 * 10 * cfg.hidden * cfg.ffn
    assert (configs.CONFIGS["large"].tokens, configs.CONFIGS["large"].top_k) == (65536, 6)


# --------------------------------------------------------------------------- model FLOPs


def _active_params_of(model: GPT) -> float:
    """Matrix weights one token multiplies with, counted on the built model."""
    total = 0.0
    for block in model.blocks:
        total += block.attn.qkv.weight.numel() + block.attn.proj.weight.numel()
        if block.is_moe:
            moe = block.ffn
            total += moe.router.weight.numel()
            total += (moe.experts.w1.numel() + moe.experts.w2.numel()) * moe.config.top_k / moe.config.num_experts
            if moe.shared_expert is not None:
                total += moe.shared_expert.w1.numel() + moe.shared_expert.w2.numel()
        else:
            total += block.ffn.fc1.weight.numel() + block.ffn.fc2.weight.numel()
    return total + model.lm_head_weight.numel()


def test_model_flops_count_the_active_parameters_of_the_built_model():
    rng = random.Random(0)
    for _ in range(12):
        heads = rng.choice([1, 2, 4])
        model = {
            "num_layers": rng.randint(1, 4),
            "hidden_size": heads * rng.choice([4, 8]),
            "num_heads": heads,
            "ffn_hidden_size": rng.choice([8, 24]),
            "moe_every": rng.randint(0, 3),
            "activation": rng.choice(["gelu", "swiglu"]),
            "tie_embeddings": rng.random() < 0.5,
        }
        num_experts = rng.randint(1, 6)
        moe = {
            "num_experts": num_experts,
            "top_k": rng.randint(1, num_experts),
            "expert_ffn_hidden_size": rng.choice([None, 12]),
            "shared_expert_ffn_hidden_size": rng.choice([0, 16]),
        }
        seq_len, vocab = rng.choice([8, 16]), rng.choice([32, 50])
        moe_fields = {
            "num_experts": moe["num_experts"],
            "top_k": moe["top_k"],
            "ffn_hidden_size": moe["expert_ffn_hidden_size"] or model["ffn_hidden_size"],
            "shared_expert_ffn_hidden_size": moe["shared_expert_ffn_hidden_size"],
        }
        built = GPT(
            GPTConfig(
                vocab_size=vocab,
                seq_len=seq_len,
                moe=moe_fields if model["moe_every"] else None,
                **{k: v for k, v in model.items()},
            )
        )
        got = gpu_check.model_flops_per_token(model, moe, seq_len, vocab)
        assert got["active_params"] == pytest.approx(_active_params_of(built), abs=0.5), (model, moe)
        attention = 12 * model["num_layers"] * seq_len * model["hidden_size"]
        assert got["flops_per_token"] == 6 * got["active_params"] + attention


def test_mfu_is_model_flops_per_second_over_the_reference_rate():
    assert gpu_check.mfu(tokens_per_s=2e5, flops_per_token=1e9, peak_tflops=400) == pytest.approx(0.5)


def test_the_gpu_check_experiment_is_the_checks_training_run():
    """+experiment=gpu_check: the reference model, 50 steps, bf16, world size 1, no W&B; valid as composed."""
    from launch import config as app_config

    cfg = app_config.compose("+experiment=gpu_check")
    assert (cfg.experiment, cfg.train.steps, cfg.deepspeed.precision) == ("gpu_check", 50, "bf16")
    assert (cfg.parallel.pp, cfg.parallel.ep, cfg.parallel.backend, cfg.logger.mode) == (1, 1, None, "disabled")
    assert cfg.model.num_layers == 8 and cfg.model.moe_every == 2  # model=small
    app_config.validate(cfg, world_size=1)
    flops = gpu_check.model_flops_per_token(cfg.model, cfg.moe, cfg.data.seq_len, cfg.data.vocab_size)
    assert flops["active_params"] < 0.5 * sum(  # top-2 of 8 experts: well under the total
        p.numel() for p in GPT(app_config.gpt_config(cfg, cfg.data.vocab_size)).parameters()
    )


# --------------------------------------------------------------------------- results file


def _fake_work(work: Path, out: Path) -> None:
    """The stage outputs of a run whose benchmark timed out, with one failed and one skipped test."""
    work.mkdir()
    out.mkdir()
    (work / "env.json").write_text(json.dumps({"device": "NVIDIA H200", "torch": "2.11.0+cu130"}))
    stages = [
        {"stage": "env", "rc": 0, "seconds": 3, "budget_s": 30, "timed_out": False},
        {"stage": "tests", "rc": 1, "seconds": 40, "budget_s": 90, "timed_out": False},
        {"stage": "bench", "rc": 124, "seconds": 181, "budget_s": 180, "timed_out": True},
    ]
    (work / "stages.jsonl").write_text("".join(json.dumps(s) + "\n" for s in stages))
    (work / "tests.xml").write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_gpu" name="test_a"/>'
        '<testcase classname="tests.test_gpu" name="test_b"><failure message="AssertionError: y off"/></testcase>'
        '<testcase classname="tests.test_gpu" name="test_c"><skipped message="refuses fp32"/></testcase>'
        "</testsuite></testsuites>"
    )
    (out / "bench.log").write_text("== c1\n== large: T=65536\n")


def test_results_record_failed_and_hung_stages(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    _fake_work(work, out)
    results = gpu_check.collect(out, work, "cuda")
    assert results["device"] == "NVIDIA H200" and not results["dry_run"]
    assert results["tests"]["passed"] == 1
    assert results["tests"]["skipped"] == [{"test": "test_gpu::test_c", "reason": "refuses fp32"}]
    assert "stage bench: timed out after 181 s (budget 180 s)" in results["failures"]
    assert "stage tests: exit code 1 after 40 s (budget 90 s)" in results["failures"]
    assert any(f.startswith("test test_gpu::test_b: AssertionError") for f in results["failures"])
    markdown = (out / "results.md").read_text()
    assert "| bench | 124 (timed out) | 181 | 180 |" in markdown
    assert "== large: T=65536" in markdown  # the hung stage's log tail
    assert "No training metrics" in markdown and "No benchmark results" in markdown
    assert json.loads((out / "results.json").read_text())["failures"] == results["failures"]


def test_fill_benchmarks_replaces_only_the_gpu_block(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    _fake_work(work, out)
    gpu_check.collect(out, work, "cuda")
    page = tmp_path / "BENCHMARKS.md"
    shutil.copy(REPO / "BENCHMARKS.md", page)
    original = page.read_text()
    before, after = original.split(gpu_check.BLOCK_BEGIN)[0], original.split(gpu_check.BLOCK_END)[1]
    gpu_check.fill_benchmarks(out / "results.json", page)
    text = page.read_text()
    assert text.startswith(before) and text.endswith(after)
    block = text[len(before) : len(text) - len(after)]
    assert "### NVIDIA H200 (" in block and "| bench | 124 (timed out) |" in block
    gpu_check.fill_benchmarks(out / "results.json", page)
    assert page.read_text() == text  # the same results, the same page
    page.write_text("# Benchmarks\n")
    with pytest.raises(SystemExit, match="no <!-- gpu-check begin -->"):
        gpu_check.fill_benchmarks(out / "results.json", page)


# --------------------------------------------------------------------------- wheel recipe


def _wheel(folder: Path, name: str, version: str, requires: list[str], tag: str = "py3-none-any") -> Path:
    dist = f"{name.replace('-', '_')}-{version}"
    path = folder / f"{dist}-{tag}.whl"
    extras = sorted({r.split("extra == '")[1].split("'")[0] for r in requires if "extra == '" in r})
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    meta += "".join(f"Provides-Extra: {e}\n" for e in extras) + "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{dist}.dist-info/METADATA", meta)
        zf.writestr(f"{dist}.dist-info/WHEEL", f"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: {tag}\n")
        zf.writestr(f"{dist}.dist-info/RECORD", "")
    return path


CATALOG = {  # a root that needs: a missing dep, a present one, an extra, and deps behind false markers
    "rootpkg": ["dep-a>=1", "torch>=2.0", "dep-c[fast]", "dep-old; python_version < '3.9'", "dep-dev; extra == 'dev'"],
    "dep-a": ["typing-extensions>=4", "dep-win; sys_platform == 'win32'"],
    "dep-c": ["dep-d; extra == 'fast'"],
    "dep-d": [],
}


def _fake_fetcher(fetched: list[str]):
    def fetch(name, spec, folder):
        fetched.append(name)
        return _wheel(folder, name, "1.0", CATALOG[name])

    return fetch


def test_wheel_closure_follows_markers_and_extras_and_skips_what_the_machine_has(tmp_path):
    present = {"torch": "2.11.0", "typing-extensions": None}
    fetched: list[str] = []
    carried, present_specs = gpu_wheels.collect(tmp_path, present, roots=["rootpkg"], fetcher=_fake_fetcher(fetched))
    assert sorted(carried) == ["dep-a", "dep-c", "dep-d", "rootpkg"]
    assert sorted(fetched) == ["dep-a", "dep-c", "dep-d", "rootpkg"]  # each once
    assert str(present_specs["torch"]) == ">=2.0"
    assert gpu_wheels.check_present_versions(present, present_specs) == []
    assert gpu_wheels.check_present_versions({**present, "torch": "1.13"}, present_specs) == [
        "torch>=2.0 (the machine has 1.13)"
    ]
    again: list[str] = []  # a second run reuses the folder
    gpu_wheels.collect(tmp_path, present, roots=["rootpkg"], fetcher=_fake_fetcher(again))
    assert again == []


@pytest.mark.parametrize(
    "tag, fits",
    [
        ("py3-none-any", True),
        ("cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64", True),
        ("cp38-abi3-manylinux_2_28_x86_64", True),
        ("cp311-cp311-manylinux_2_17_x86_64", False),
        ("cp312-cp312-macosx_11_0_arm64", False),
        ("cp312-cp312-manylinux_2_17_aarch64", False),
    ],
)
def test_wheel_tags_for_cpython_312_manylinux(tmp_path, tag, fits):
    assert gpu_wheels.wheel_fits_target(tmp_path / f"pkg-1.0-{tag}.whl") == fits


def test_dry_run_resolves_only_a_complete_set(tmp_path):
    """The proof the recipe prints: pip, offline, for CPython 3.12 manylinux."""
    folder = tmp_path / "whl"
    folder.mkdir()
    present = {"torch": "2.11.0", "typing-extensions": None}
    _, present_specs = gpu_wheels.collect(folder, present, roots=["rootpkg"], fetcher=_fake_fetcher([]))
    proc = gpu_wheels.dry_run(folder, present, present_specs, roots=["rootpkg"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Would install" in proc.stdout and "dep-d-1.0" in proc.stdout and "torch-2.11.0" in proc.stdout
    next(folder.glob("dep_d-*.whl")).unlink()
    proc = gpu_wheels.dry_run(folder, present, present_specs, roots=["rootpkg"])
    assert proc.returncode != 0 and "dep-d" in proc.stderr
