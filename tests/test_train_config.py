"""The training app's configuration: composition, validation messages, DeepSpeed JSON generation."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException

from launch import config as app_config
from launch.config import compose
from launch.env import LaunchEnv, detect, first_slurm_node, slurm_port, strip_launcher_args
from moe_parallel.core.config import MoEConfigError
from moe_parallel.integration.engine import validate_deepspeed_config
from moe_parallel.integration.parallel import ParallelConfigError
from moe_parallel.models import GPT, GPTConfigError


def test_default_and_experiment_compose():
    cfg = compose()
    assert cfg.moe.capacity_factor == 1.25 and cfg.parallel.ep == 1
    demo = compose("+experiment=cpu_demo")
    assert demo.experiment == "cpu_demo" and demo.parallel.ep == 2 and demo.train.steps == 300
    swapped = compose("model=small", "moe=dropless", "parallel=pp2_ep2", "deepspeed=zero2")
    assert swapped.model.num_layers == 8 and swapped.moe.capacity_factor is None
    assert swapped.parallel.pp == 2 and swapped.deepspeed.zero_stage == 2


def test_every_named_config_validates():
    for group, names in {
        "model": ["tiny", "small", "medium"],
        "moe": ["default", "dropless", "fine_grained"],
        "deepspeed": ["zero0", "zero1", "zero2", "bf16"],
    }.items():
        for name in names:
            app_config.validate(compose(f"{group}={name}"), world_size=1)


@pytest.mark.parametrize(
    "override,world,error,message",
    [
        ("moe.top_k=20", 1, MoEConfigError, r"moe.top_k=20 is invalid: must be <= num_experts \(8\)"),
        ("moe.drop_policy=random", 1, MoEConfigError, "moe.drop_policy='random'"),
        ("model.num_heads=5", 1, GPTConfigError, "model.num_heads=5 is invalid: must divide hidden_size=128"),
        ("parallel.ep=3", 2, ParallelConfigError, r"parallel.ep=3: choose ep among \[1, 2\]"),
        ("parallel.pp=2", 3, ParallelConfigError, "world size 3 is not divisible by pipeline stages parallel.pp=2"),
        ("deepspeed.zero_stage=3", 1, app_config.AppConfigError, r"zero_stage=3 is invalid: choose one of \(0, 1, 2\)"),
        ("optim.min_lr=1.0", 1, app_config.AppConfigError, "need lr > 0 and 0 <= min_lr <= lr"),
        ("train.progress=fancy", 1, app_config.AppConfigError, "train.progress='fancy'"),
        ("train.max_skipped_steps=0", 1, app_config.AppConfigError, "train.max_skipped_steps=0 is invalid"),
        ("train.collapse_window=-1", 1, app_config.AppConfigError, "train.collapse_window=-1 is invalid"),
        ("train.collapse_max_load_ratio=1.0", 1, app_config.AppConfigError, r"train.collapse_max_load_ratio=1.0 .*> 1"),
        (
            "train.collapse_min_load_fraction=1.5",
            1,
            app_config.AppConfigError,
            r"collapse_min_load_fraction=1.5 .*\[0, 1\)",
        ),
        ("train.collapse_min_entropy=-1", 1, app_config.AppConfigError, "train.collapse_min_entropy=-1.0 is invalid"),
        ("parallel.timeout_s=0", 1, app_config.AppConfigError, "parallel.timeout_s=0 is invalid"),
    ],
)
def test_bad_values_name_the_field(override, world, error, message):
    with pytest.raises(error, match=message):
        app_config.validate(compose(override), world_size=world)


def test_wrong_types_and_unknown_keys_fail_at_composition():
    with pytest.raises(ConfigCompositionException) as err:
        compose("train.steps=many")
    assert "train.steps" in str(err.value.__cause__)
    with pytest.raises(ConfigCompositionException) as err:
        compose("moe.capacity=2")
    assert "capacity" in str(err.value.__cause__)


def test_deepspeed_json_comes_from_the_config():
    cfg = compose(
        "deepspeed=zero2",
        "train.micro_batch_size=4",
        "train.grad_accum=3",
        "+deepspeed.extra={communication_data_type: fp32}",
    )
    ds = app_config.deepspeed_config(cfg)
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 3
    assert ds["zero_optimization"] == {"stage": 2} and ds["bf16"] == {"enabled": False}
    assert ds["communication_data_type"] == "fp32" and ds["gradient_clipping"] == 1.0
    model = GPT(app_config.gpt_config(cfg, vocab_size=cfg.data.vocab_size))
    validate_deepspeed_config(ds, model)


def test_model_config_inherits_and_overrides_expert_width():
    cfg = compose("moe=fine_grained")
    gpt = app_config.gpt_config(cfg, vocab_size=512)
    assert gpt.moe.ffn_hidden_size == 128 and gpt.moe.num_experts == 64 and gpt.moe.top_k == 8
    assert gpt.moe.hidden_size == cfg.model.hidden_size and gpt.vocab_size == 512


def test_launcher_environments():
    assert strip_launcher_args(["train.py", "--local_rank=1", "a=1", "--local_rank", "0", "b=2"]) == [
        "train.py",
        "a=1",
        "b=2",
    ]
    torch_env = detect(
        {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"}
    )
    assert torch_env == LaunchEnv(3, 4, 1, 4, "10.0.0.1", 1234, "torch")
    slurm = detect(
        {
            "SLURM_PROCID": "5",
            "SLURM_NTASKS": "8",
            "SLURM_LOCALID": "1",
            "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NODELIST": "gpu[07-09,12]",
            "SLURM_TASKS_PER_NODE": "4(x2)",
        }
    )
    assert slurm == LaunchEnv(5, 8, 1, 4, "gpu07", slurm_port("4242"), "slurm")
    assert first_slurm_node("n1,n2") == "n1" and first_slurm_node("node-[3,5]") == "node-3"
    single = detect({})
    assert single.world_size == 1 and single.launcher == "single"


@pytest.mark.parametrize("override", ["model.moe_every=0", "model.moe_every=5"])
def test_a_config_without_moe_layers_is_refused_unless_dense_is_asked_for(override):
    # model=tiny has 4 blocks: moe_every=0 or 5 would train a dense model under an MoE experiment.
    with pytest.raises(app_config.AppConfigError) as err:
        app_config.validate(compose("+experiment=cpu_demo", override), world_size=2)
    message = str(err.value)
    assert f"{override} " in message and "model.num_layers=4" in message, message
    assert "model.dense=true" in message and "model.moe_every=1" in message, message
    dense = compose("+experiment=cpu_demo", override, "model.dense=true")
    app_config.validate(dense, world_size=2)
    assert app_config.gpt_config(dense, vocab_size=512).moe is None


def test_dense_with_moe_layers_is_refused():
    refused = r"model.dense=true, but model.moe_every=2 makes blocks \[1, 3\] .*set model.moe_every=0"
    with pytest.raises(app_config.AppConfigError, match=refused):
        app_config.validate(compose("model.dense=true"), world_size=1)


def test_train_compile_is_a_checked_boolean(monkeypatch):
    assert compose().train.compile is False
    app_config.validate(compose("train.compile=true"), world_size=1)  # this machine has a C++ compiler
    with pytest.raises(ConfigCompositionException) as err:
        compose("train.compile=fast")
    assert "train.compile" in str(err.value.__cause__)
    with pytest.raises(app_config.AppConfigError, match=r"train.compile='fast' is invalid: must be true or false"):
        app_config._check_compile("fast")

    from torch._inductor import cpp_builder, exc

    def no_compiler() -> str:
        raise exc.InvalidCxxCompiler

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(app_config.AppConfigError) as err:
        app_config.validate(compose("train.compile=true"), world_size=1)
    message = str(err.value)
    assert "train.compile=true" in message and "C++ compiler" in message, message
    assert "CXX" in message and "set train.compile=false" in message, message
    app_config.validate(compose(), world_size=1)  # train.compile=false never looks for one
    app_config.validate(compose("train.compile=true", "train.compile_backend=aot_eager"), world_size=1)  # no compiler


def test_train_compile_backend_is_one_torch_compile_knows():
    assert compose().train.compile_backend == "inductor"
    with pytest.raises(app_config.AppConfigError) as err:
        app_config.validate(compose("train.compile=true", "train.compile_backend=inductr"), world_size=1)
    message = str(err.value)
    assert "train.compile_backend='inductr' is not a torch.compile backend" in message, message
    assert "aot_eager" in message and "inductor" in message, message
    app_config.validate(compose("train.compile_backend=inductr"), world_size=1)  # not compiling: not read


def test_router_options_reach_the_moe_layer_and_bad_ones_name_the_key():
    cfg = compose("moe.router_bias=true", "moe.input_weighted=true", "moe.group_score=max", "moe.num_groups=2")
    moe = app_config.gpt_config(cfg, vocab_size=64).moe
    assert (moe.router_bias, moe.input_weighted, moe.group_score, moe.num_groups) == (True, True, "max", 2)
    with pytest.raises(MoEConfigError, match=r"moe\.group_score='sum'"):
        app_config.gpt_config(compose("moe.group_score=sum"), vocab_size=64)
