"""The planner at published sizes (from config.json alone), its search and the start-up refusal."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch import config as app_config
from launch import plan as app_plan
from launch.config import AppConfigError
from moe_parallel import hf
from moe_parallel.planning.model import build_stage, is_expert_param
from moe_parallel.planning.plan import Cluster, GiB, Layout, Planner, Workload, candidate_layouts, search
from tests.published_configs import DEEPSEEK_V3, MIXTRAL_8X7B, PUBLISHED, write_config

REPO = Path(__file__).resolve().parent.parent


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_total_parameters_match_the_published_counts(tmp_path, name):
    config_json, published, counts_mtp = PUBLISHED[name]
    config = hf.load_config(write_config(config_json, tmp_path / name))
    model = build_stage(config, 1, 0).module
    mtp = sum(p.numel() for n, p in model.named_parameters() if n.startswith("mtp."))
    total = _params(model) - (0 if counts_mtp else mtp)
    assert abs(total - published) <= 0.01 * published, (name, total / 1e9)
    if name == "DeepSeek-V3":  # its one MTP module, without the embedding and head it shares: 11.6B
        assert config.mtp_layers == 1 and 11.5e9 < mtp < 11.7e9


def test_mixtral_per_rank_counts_against_a_hand_count(tmp_path):
    """Mixtral-8x7B at PP=4 (8 blocks a stage), EP=8 (one expert per rank), written out by hand."""
    config = hf.load_config(write_config(MIXTRAL_8X7B, tmp_path / "mixtral"))
    d, f, v, kv = 4096, 14336, 32000, 8 * 128
    attention = d * d + 2 * d * kv + d * d  # q, k, v, o
    block_dense = attention + 2 * d + 8 * d  # two norms, the router over 8 experts
    expert = 3 * d * f  # w1 (gate and up) and w2
    first = v * d + 8 * (block_dense + expert)
    last = 8 * (block_dense + expert) + d + v * d  # final norm, untied head
    middle = 8 * (block_dense + expert)
    got = [_params(build_stage(config, 4, s, ep=8).module) for s in range(4)]
    assert got == [first, middle, middle, last]
    experts = [
        sum(p.numel() for p in build_stage(config, 4, s, ep=8).module.parameters() if is_expert_param(p))
        for s in range(4)
    ]
    assert experts == [8 * expert] * 4


def test_deepseek_v3_per_rank_counts_against_a_hand_count(tmp_path):
    """DeepSeek-V3 at PP=8, EP=64 (4 experts per rank): the first stage holds the embedding, the three
    dense blocks and five MoE blocks (61 blocks over 8 stages: 8, then 7 or 8 each)."""
    config = hf.load_config(write_config(DEEPSEEK_V3, tmp_path / "dsv3"))
    d, v, heads = 7168, 129280, 128
    q_lora, kv_lora, nope, rope, vdim = 1536, 512, 128, 64, 128
    mla = (
        d * q_lora
        + q_lora
        + q_lora * heads * (nope + rope)  # q down, its norm, q up
        + d * (kv_lora + rope)
        + kv_lora
        + kv_lora * heads * (nope + vdim)  # kv down, its norm, kv up
        + heads * vdim * d  # output
    )
    norms = 2 * d
    dense_block = mla + norms + 3 * d * 18432
    expert = 3 * d * 2048
    moe_block = mla + norms + 256 * d + 4 * expert + expert  # router, 4 local experts, the shared expert
    parts = build_stage(config, 8, 0).layer_range
    blocks = parts[1] - parts[0] - 1  # minus the embedding
    assert _params(build_stage(config, 8, 0, ep=64).module) == v * d + 3 * dense_block + (blocks - 3) * moe_block


def _tiny(tmp_path, model_type="mixtral", seed=0):
    from tests.hf_models import random_hf_config, save_hf_model

    save_hf_model(random_hf_config(model_type, seed, even_experts=True), seed, tmp_path / "m")
    return hf.load_config(tmp_path / "m")


def test_search_never_ranks_a_layout_needing_more_of_everything_above_one_needing_less(tmp_path):
    config = hf.load_config(write_config(MIXTRAL_8X7B, tmp_path / "mixtral"))
    cluster = Cluster(gpus=32, gpu_memory=80 * GiB)
    result = search(config, Workload(seq_len=4096), cluster, global_batch=64)
    assert result.fitting and result.rejected
    terms = [k for k in result.fitting[0].step_time if k != "total"]
    rng = random.Random(0)
    ranked = result.fitting
    for _ in range(2000):
        i, j = sorted(rng.sample(range(len(ranked)), 2))
        a, b = ranked[i], ranked[j]  # a ranks above b
        worse = all(a.step_time[k] >= b.step_time[k] for k in terms) and a.peak.total >= b.peak.total
        strictly = any(a.step_time[k] > b.step_time[k] for k in terms) or a.peak.total > b.peak.total
        assert not (worse and strictly), (a.layout, b.layout)
    for plan in ranked:
        assert plan.peak.total <= cluster.usable_memory
    planner = Planner(config)  # what the search pruned without planning does not fit either
    for layout, why in rng.sample(result.rejected, 25):
        assert not planner.plan(layout, Workload(seq_len=4096), cluster).fits(cluster), (layout, why)


def test_candidate_layouts_are_the_ones_deepspeed_accepts(tmp_path):
    config = hf.load_config(write_config(MIXTRAL_8X7B, tmp_path / "mixtral"))
    layouts = candidate_layouts(config, 16, global_batch=32)
    assert layouts
    for lay in layouts:
        lay.check(config)
        assert lay.world_size == 16 and lay.dp % lay.ep == 0 and 8 % lay.ep == 0
        assert not (lay.zero_stage == 2 and lay.pp > 1)
        assert lay.micro_batch * lay.grad_accum * lay.dp == 32
    assert {lay.pp for lay in layouts} == {1, 2, 4, 8, 16}


def test_a_600b_class_search_finishes_in_seconds(tmp_path):
    folder = write_config(DEEPSEEK_V3, tmp_path / "dsv3")
    start = time.monotonic()
    out = subprocess.run(
        [
            sys.executable,
            "launch/plan.py",
            "model=hf",
            f"model.path={folder}",
            "data.seq_len=4096",
            "--search",
            "--gpus",
            "1024",
            "--gpu-memory",
            "80GiB",
            "--json",
            str(tmp_path / "plan.json"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    elapsed = time.monotonic() - start
    assert out.returncode == 0, out.stderr[-3000:]
    assert "sbatch --nodes=128 --gpus-per-node=8 --ntasks-per-node=8 slurm/train.sbatch" in out.stdout
    assert "memory per rank" in out.stdout
    assert elapsed < 60, elapsed
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["layout"]["pp"] * plan["layout"]["dp"] == 1024


@pytest.mark.parametrize(
    "args, message",
    [
        (["--gpu-memory", "lots", "--gpus", "2"], "--gpu-memory='lots' is not a size"),
        (["--search", "--gpus", "2"], "--search needs --gpu-memory"),
        (["--gpus", "3", "parallel.pp=2"], "--gpus 3 is not divisible by parallel.pp=2"),
        (["model.hidden_sise=3"], "hidden_sise"),
    ],
)
def test_bad_input_is_named_without_a_traceback(args, message):
    out = subprocess.run([sys.executable, "launch/plan.py", *args], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 2, out.stdout + out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr


def test_training_refuses_a_layout_that_cannot_fit_the_declared_memory():
    cfg = app_config.compose("+experiment=cpu_demo", "train.device_memory=4MiB")
    with pytest.raises(AppConfigError) as err:
        app_plan.memory_check(cfg, 2, 4 * 2**20, "math")
    message = str(err.value)
    assert "stage 0" in message and "train.memory_check=false" in message
    # DeepSpeed's default 5e8-element gradient bucket is the tiny model's largest part
    assert "the largest part is comm buffers" in message and "reduce_bucket_size" in message
    cfg = app_config.compose("+experiment=cpu_demo")
    plan = app_plan.memory_check(cfg, 2, 64 * GiB, "math")
    assert plan.peak.total < 64 * GiB


def test_training_refusal_reaches_the_user_before_any_collective(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "launch/train.py",
            "+experiment=cpu_demo",
            "parallel.ep=1",
            "train.device_memory=2MiB",
            f"train.run_dir={tmp_path / 'run'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    assert "error: the planned memory does not fit train.device_memory" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "run").exists()  # refused before the run directory was made


def test_layout_plan_of_the_configured_layout_names_every_component(tmp_path):
    config = _tiny(tmp_path)
    plan = Planner(config).plan(
        Layout(pp=2, dp=2, ep=2, zero_stage=1, micro_batch=2, grad_accum=4),
        Workload(seq_len=16, precision="fp32", attention="math"),
    )
    assert len(plan.stages) == 2 and all(st.total > 0 for st in plan.stages)
    assert plan.stages[0].inflight_micro_batches == 2 and plan.stages[1].inflight_micro_batches == 1
    assert plan.stages[0].memory["logits"] == 0 and plan.stages[1].memory["logits"] > 0


@pytest.mark.parametrize(
    "family",
    [pytest.param("gpt", marks=pytest.mark.slow), pytest.param("mixtral", marks=pytest.mark.slow), "deepseek_v3"],
)
def test_stages_summed_from_blocks_equal_whole_stage_traces(family):
    """The search's per-block sums against tracing each stage whole, over layouts and routing."""
    import torch

    from moe_parallel.planning.activations import UnitActivations, predict_activation_bytes
    from tests.test_plan_activations import model_config

    for capacity_factor in (1.0, None):
        config = model_config(family, capacity_factor)
        units = UnitActivations(config)
        for pp in range(1, min(3, config.num_layers) + 1):
            for ep, stage in ((1, 0), (2, pp - 1)):
                kw = dict(
                    num_stages=pp, stage=stage, micro_batch=2, seq_len=32, ep=ep, dtype=torch.float32, attention="math"
                )
                assert units.stage(**kw) == predict_activation_bytes(config, **kw), (family, pp, ep, stage)


@pytest.mark.parametrize(
    "overrides",
    [
        ["+experiment=cpu_demo"],
        pytest.param(
            [
                "+experiment=cpu_demo",
                "parallel.pp=2",
                "parallel.ep=1",
                "deepspeed.activation_checkpointing=true",
                "train.grad_accum=2",
            ],
            marks=pytest.mark.slow,
        ),
    ],
)
def test_measure_mode_holds_on_the_users_own_small_config(overrides):
    out = subprocess.run(
        [sys.executable, "launch/plan.py", *overrides, "data.seq_len=32", "train.micro_batch_size=2", "--gpus", "2",
         "--measure"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "prediction holds" in out.stdout
    assert out.stdout.count(" ok\n") == 2 * 5  # five model-state components on each of the two ranks


def test_measure_comparison_fails_on_a_wrong_prediction():
    from launch.plan_measure import compare

    cfg = app_config.compose("+experiment=cpu_demo")
    plan = Planner(app_plan.model_of(cfg)).plan(app_plan.layout_of(cfg, 2), app_plan.workload_of(cfg, "fp32", "math"))
    states = {k: plan.stages[0].memory[v] for k, v in
              (("params", "parameters"), ("grads", "gradients"), ("master", "master weights"),
               ("optimizer", "optimizer states"), ("buffers", "comm buffers"))}  # fmt: skip
    acts = plan.stages[0].activations.saved
    good = {"stage": 0, "dp_rank": 0, "states": states, "saved_per_micro_batch": [acts], "alltoall_to_others": 0}
    assert compare(plan, [good]) == 0
    assert compare(plan, [{**good, "states": {**states, "grads": states["grads"] + 4}}]) == 4
    assert compare(plan, [{**good, "saved_per_micro_batch": [acts * 2]}]) == 4
    assert compare(plan, [{**good, "alltoall_to_others": 10 * plan.stages[0].comm.alltoall_bound}]) == 4


@pytest.mark.parametrize("value", ["lots", "0GiB", "-5MiB", "80 parsecs"])
def test_a_bad_device_memory_is_refused_by_name(value):
    cfg = app_config.compose("+experiment=cpu_demo", f"train.device_memory={value}")
    with pytest.raises(AppConfigError, match="train.device_memory="):
        app_config.validate(cfg, 2)


@pytest.mark.parametrize(
    "text, size", [("80GiB", 80 * 2**30), ("80GB", 80 * 10**9), ("1.5 MiB", 3 * 2**19), (4096, 4096)]
)
def test_sizes_parse_in_binary_and_decimal_units(text, size):
    from launch.config import parse_bytes

    assert parse_bytes(text, "k") == size


def test_a_layout_whose_stages_have_different_optimizer_groups_is_refused_as_build_engine_refuses_it():
    """A stage of dense blocks only (a DeepSeek-V3-like model's first block, one block a stage) has
    fewer optimizer groups than the others: DeepSpeed's ZeRO-1 gradient norm would hang, so the plan
    says so, as build_engine does."""
    from moe_parallel.planning.plan import PlanError
    from tests.test_plan_activations import model_config

    config = model_config("deepseek_v3", 1.0)
    assert config.first_dense_layers >= 1
    planner, pp = Planner(config), config.num_layers
    with pytest.raises(PlanError, match=f"parallel.pp={pp} gives the stages different optimizer param groups"):
        planner.plan(Layout(pp=pp, dp=2, ep=2, zero_stage=1), Workload(seq_len=16))
    with pytest.raises(PlanError, match="with bf16"):
        planner.plan(Layout(pp=pp, dp=2, ep=2, zero_stage=0), Workload(seq_len=16, precision="bf16"))
    assert planner.plan(Layout(pp=pp, dp=2, ep=2, zero_stage=0), Workload(seq_len=16, precision="fp32")).stages
