"""``checkpoint_tool import-hf`` / ``export-hf``: Hugging Face directory -> topology-free checkpoint ->
Hugging Face directory is bit-exact for every family, through a checkpoint re-saved at
(PP, EP) = (2, 2), in bf16, and from sharded input; upcycling a dense model keeps its logits; bad
input fails with a message that names the argument or key."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from launch import hf_identity
from launch.checkpoint_tool import main as tool
from moe_parallel.checkpoints.checkpoint import load_checkpoint, read_manifest, save_checkpoint
from tests.dist_utils import run_distributed
from tests.hf_app_fixtures import FAMILY_CONFIGS, random_family_overrides, tiny_family_model, tiny_tokenizer
from tests.hf_models import assert_same_tensors, hf_tensors

VOCAB = 96
BIAS_SHIFT = 0.125


def load_transformers(path: Path):
    """transformers' own model of an exported directory; no key may be missing or unexpected."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(path), output_loading_info=True, dtype=torch.float32)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


@pytest.mark.parametrize(
    "family, draw",
    # make test: one draw of every family (the draws rotate over the families); make test-slow: all three
    [
        pytest.param(family, draw, marks=() if draw == i % 3 else pytest.mark.slow)
        for i, family in enumerate(sorted(FAMILY_CONFIGS))
        for draw in range(3)
    ],
)
def test_import_export_round_trip_is_bit_identical(tmp_path, family, draw):
    src = tmp_path / "hf"
    shape = random_family_overrides(family, seed=draw) if draw else None  # draw 0: the family's features on
    original = tiny_family_model(family, src, VOCAB, seed=draw, shape=shape, max_shard_size="8KB")
    tiny_tokenizer(src, vocab_size=VOCAB - 4)
    assert (src / "model.safetensors.index.json").is_file()  # sharded input with an index

    assert tool(["import-hf", str(src), "--out", str(tmp_path / "ckpt")]) == 0
    manifest = read_manifest(tmp_path / "ckpt" / "imported")
    config = json.loads((src / "config.json").read_text())
    num_experts = next(config[k] for k in ("num_local_experts", "num_experts", "n_routed_experts") if k in config)
    assert manifest["moe_layers"] and all(ids == list(range(num_experts)) for ids in manifest["moe_layers"].values())
    assert tool(["export-hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"), "--max-shard-mb", "0.05"]) == 0

    assert_same_tensors(src, tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    tokens = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = original.eval()(tokens).logits, load_transformers(tmp_path / "out")(tokens).logits
    assert torch.equal(want, got)


@pytest.mark.parametrize("family", ["qwen3_moe", "glm4_moe", "deepseek_v3", "gpt_oss"])  # GLM, DeepSeek: fp32 router
def test_bf16_checkpoint_exports_in_its_dtype_or_the_one_asked(tmp_path, family):
    src = tmp_path / "hf"
    tiny_family_model(family, src, VOCAB, dtype=torch.bfloat16)
    assert tool(["import-hf", str(src), "--out", str(tmp_path / "ckpt")]) == 0
    assert tool(["export-hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "bf16")]) == 0
    assert_same_tensors(src, tmp_path / "bf16")  # bf16 -> fp32 checkpoint -> bf16 is exact
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert tool(["export-hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "fp32"), "--dtype", "fp32"]) == 0
    fp32 = hf_tensors(tmp_path / "fp32")
    for key, value in hf_tensors(src).items():
        assert fp32[key].dtype == torch.float32 and torch.equal(fp32[key], value.float()), key


# ---------------------------------------------------------------- a checkpoint saved at (PP, EP) = (2, 2)


def _resave_at_pp2_ep2(rank, world, ckpt: str, out: str) -> None:
    from moe_parallel import hf
    from moe_parallel.integration.engine import build_engine
    from moe_parallel.integration.parallel import initialize_parallel
    from moe_parallel.integration.pipeline import decoder_pipeline

    config = hf.load_config(Path(ckpt) / hf_identity.HF_MODEL_DIR)
    state = initialize_parallel(pipeline_parallel_size=2, expert_parallel_size=2, num_experts=config.moe.num_experts)
    model = decoder_pipeline(config, ep_group=state.ep_group, topology=state.deepspeed_topology())
    ds = {"train_micro_batch_size_per_gpu": 1, "steps_per_print": 10**9, "zero_optimization": {"stage": 1}}
    engine, _, _ = build_engine(model, ds)
    load_checkpoint(engine, ckpt)
    with torch.no_grad():  # the same shift on every rank: the export must carry it from this layout
        for name, buf in model.named_buffers():
            if name.endswith("router.expert_bias"):
                buf += BIAS_SHIFT * torch.arange(buf.numel())
    save_checkpoint(engine, out)


def test_export_from_a_checkpoint_saved_at_pp2_ep2_gives_the_original_tensors(tmp_path):
    src = tmp_path / "hf"
    tiny_family_model("glm4_moe", src, VOCAB, seed=3)  # shared experts, a dense block, correction biases
    assert tool(["import-hf", str(src), "--out", str(tmp_path / "ckpt")]) == 0
    run_distributed(_resave_at_pp2_ep2, 4, str(tmp_path / "ckpt"), str(tmp_path / "pp2ep2"), timeout=300)
    saved = read_manifest(tmp_path / "pp2ep2" / (tmp_path / "pp2ep2" / "latest").read_text())
    assert saved["saved_world_size"] == 4 and all(ids == list(range(8)) for ids in saved["moe_layers"].values())

    shutil.copytree(tmp_path / "ckpt" / hf_identity.HF_MODEL_DIR, tmp_path / "pp2ep2" / hf_identity.HF_MODEL_DIR)
    assert tool(["export-hf", str(tmp_path / "pp2ep2"), "--out", str(tmp_path / "out")]) == 0
    want, got = hf_tensors(src), hf_tensors(tmp_path / "out")
    shifted = [key for key in want if key.endswith("e_score_correction_bias")]
    assert sorted(want) == sorted(got) and shifted
    for key in shifted:  # the routers' buffers were saved at (2, 2) and exported from the checkpoint
        want[key] = want[key] + BIAS_SHIFT * torch.arange(want[key].numel())
    for key in want:
        assert want[key].dtype == got[key].dtype and torch.equal(want[key], got[key]), key


# ---------------------------------------------------------------- upcycling


@pytest.mark.parametrize("dense_type", ["qwen3", "llama"])
def test_upcycled_import_exports_an_moe_with_the_dense_logits(tmp_path, dense_type):
    import transformers

    from tests.hf_app_fixtures import COMMON, randomize_

    names = {"qwen3": ("Qwen3Config", "Qwen3ForCausalLM"), "llama": ("LlamaConfig", "LlamaForCausalLM")}[dense_type]
    kw = {k: v for k, v in COMMON.items() if k != "num_experts_per_tok"}
    config = getattr(transformers, names[0])(**kw, vocab_size=VOCAB, intermediate_size=24)
    dense = getattr(transformers, names[1])(config)
    randomize_(dense, seed=7)
    dense.save_pretrained(str(tmp_path / "dense"))
    args = [
        "import-hf",
        str(tmp_path / "dense"),
        "--out",
        str(tmp_path / "ckpt"),
        "--upcycle-experts",
        "4",
        "--top-k",
        "2",
    ]
    assert tool(args) == 0
    assert tool(["export-hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "moe")]) == 0

    moe = load_transformers(tmp_path / "moe")
    assert type(moe).__name__ == ("Qwen3MoeForCausalLM" if dense_type == "qwen3" else "MixtralForCausalLM")
    tokens = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = dense.eval()(tokens).logits, moe(tokens).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())


# ---------------------------------------------------------------- bad input


def _error(capsys, argv: list[str]) -> str:
    assert tool(argv) == 2
    return capsys.readouterr().err


def test_bad_input_is_refused_naming_the_key_and_the_fix(tmp_path, capsys):
    src = tmp_path / "hf"
    tiny_family_model("mixtral", src, VOCAB, max_shard_size="30KB")
    out = str(tmp_path / "ckpt")

    err = _error(capsys, ["import-hf", str(src), "--out", out, "--upcycle-experts", "4"])
    assert "--top-k" in err

    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    assert "model_type='gpt2' is not supported" in _error(capsys, ["import-hf", str(src), "--out", out])
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "deepseek_v3"}))  # Mixtral's keys: GQA
    assert "num_key_value_heads=2 is not supported" in _error(capsys, ["import-hf", str(src), "--out", out])
    (src / "config.json").write_text(json.dumps({**cfg, "hidden_size": 48}))
    assert "hidden_size" in _error(capsys, ["import-hf", str(src), "--out", out])
    (src / "config.json").write_text(json.dumps(cfg))

    shard = sorted(src.glob("model-*.safetensors"))[1]
    shard.rename(tmp_path / "away.safetensors")
    assert shard.name in _error(capsys, ["import-hf", str(src), "--out", out])
    (tmp_path / "away.safetensors").rename(shard)
    assert not (tmp_path / "ckpt").exists()  # nothing written by a refused import

    assert tool(["import-hf", str(src), "--out", out]) == 0
    assert "choose a new or empty directory" in _error(capsys, ["import-hf", str(src), "--out", out])
    assert "choose a new or empty directory" in _error(capsys, ["export-hf", out, "--out", str(src)])
    shutil.rmtree(tmp_path / "ckpt" / hf_identity.HF_MODEL_DIR)
    assert "--hf-config" in _error(capsys, ["export-hf", out, "--out", str(tmp_path / "x")])
    other = tmp_path / "other"
    tiny_family_model("qwen3_moe", other, VOCAB)
    err = _error(capsys, ["export-hf", out, "--out", str(tmp_path / "x"), "--hf-config", str(other)])
    assert "does not match" in err and "--hf-config" in err
