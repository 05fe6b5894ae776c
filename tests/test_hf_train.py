"""A Hugging Face model trained by the app end to end, under the real ``deepspeed`` launcher:

tiny Qwen3-MoE + its own tokenizer -> ``model=hf`` 20 steps at EP=2 on the default corpus ->
``export-hf`` -> transformers loads the export and its validation loss equals the one our run
reported; then the run continues from its checkpoint at another layout (PP=2), and its export again
matches transformers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from launch import config as app_config
from launch.checkpoint_tool import main as tool
from launch.config import compose
from launch.data import PackedDataset, iter_eval_batches, prepare_data
from tests.app_cli import metric, run_app, train_command
from tests.hf_app_fixtures import tiny_qwen3_moe_with_tokenizer

MICRO, EVAL_BATCHES = 4, 2


def train(run_dir: Path, model_dir: Path, cache: Path, steps: int, *extra: str) -> None:
    cmd = [
        *train_command(2),
        "model=hf",
        f"model.path={model_dir}",
        "data.max_corpus_bytes=300000",
        "data.seq_len=32",
        f"data.cache_dir={cache}",
        f"train.steps={steps}",
        f"train.micro_batch_size={MICRO}",
        "train.log_every=2",
        f"train.eval_every={steps}",
        f"train.eval_batches={EVAL_BATCHES}",
        f"train.ckpt_every={steps}",
        "optim.warmup_steps=2",
        f"train.run_dir={run_dir}",
        "train.progress=lines",
        "logger=disabled",
        *extra,
    ]
    run_app(cmd, timeout=600)


def transformers_eval_loss(export: Path, run_dir: Path, dp_size: int, batches: int = EVAL_BATCHES) -> float:
    """The trainer's validation loss (same windows, same DP split and mean), computed by transformers."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(export), output_loading_info=True, dtype=torch.float32)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    cfg = OmegaConf.load(run_dir / "config.yaml")
    data = prepare_data(app_config.data_config(cfg))  # the run's tokenized corpus (a cache hit)
    val = PackedDataset(data.val_tokens, cfg.data.seq_len, "validation")
    per_rank = [list(iter_eval_batches(val, MICRO, r, dp_size, batches)) for r in range(dp_size)]
    losses = []
    with torch.no_grad():
        for batches in zip(*per_rank):
            per_dp = [model.eval()(tokens, labels=None).logits for tokens, _ in batches]
            losses.append(
                sum(
                    torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).item()
                    for logits, (_, targets) in zip(per_dp, batches)
                )
                / dp_size
            )
    return sum(losses) / len(losses)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf_train")
    model_dir = tiny_qwen3_moe_with_tokenizer(tmp / "qwen3_moe")
    train(tmp / "run", model_dir, tmp / "cache", 20, "parallel=ep2")
    return tmp, model_dir


def test_trained_export_loads_in_transformers_with_our_validation_loss(run):
    tmp, model_dir = run
    run_dir = tmp / "run"
    losses = metric(run_dir, "train/loss")
    assert sorted(losses) == list(range(2, 21, 2)) and losses[20] < losses[2]  # it learned
    cfg = OmegaConf.load(run_dir / "config.yaml")
    data = prepare_data(app_config.data_config(cfg))
    assert data.meta["tokenizer_type"] == "pretrained:tokenizers" and data.vocab_size == 400  # the model's own

    assert tool(["export-hf", str(run_dir / "checkpoints"), "--out", str(tmp / "export")]) == 0
    assert (tmp / "export" / "tokenizer.json").read_bytes() == (model_dir / "tokenizer.json").read_bytes()
    ours = metric(run_dir, "eval/loss")[20]
    theirs = transformers_eval_loss(tmp / "export", run_dir, dp_size=2)
    assert abs(ours - theirs) <= 1e-5 * abs(ours), (ours, theirs)


def test_the_run_continues_at_another_layout_and_still_exports_exactly(run):
    tmp, model_dir = run
    run_dir = tmp / "run_pp2"
    train(
        run_dir,
        model_dir,
        tmp / "cache",
        21,
        "parallel.pp=2",
        "parallel.ep=1",
        f"train.resume={tmp / 'run' / 'checkpoints'}",
    )
    assert sorted(metric(run_dir, "train/loss")) == [21]  # resumed at step 20
    assert tool(["export-hf", str(run_dir / "checkpoints"), "--out", str(tmp / "export_pp2")]) == 0
    ours = metric(run_dir, "eval/loss")[21]
    theirs = transformers_eval_loss(tmp / "export_pp2", run_dir, dp_size=1)
    assert abs(ours - theirs) <= 1e-5 * abs(ours), (ours, theirs)


def test_training_starts_from_an_imported_checkpoint(run):
    """``import-hf`` writes a weights-only checkpoint (no data position, no optimizer state): a run
    resumes from it at step 0 with the HF weights and trains on."""
    tmp, model_dir = run
    assert tool(["import-hf", str(model_dir), "--out", str(tmp / "imported")]) == 0
    run_dir = tmp / "run_from_import"
    train(run_dir, model_dir, tmp / "cache", 2, "parallel=ep2", f"train.resume={tmp / 'imported'}")
    assert sorted(metric(run_dir, "train/loss")) == [2]


# ---------------------------------------------------------------- configuration (no processes)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_qwen3_moe_with_tokenizer(tmp_path_factory.mktemp("cfg") / "qwen3_moe")


def test_model_hf_composes_dropless_and_takes_the_architecture_from_config_json(model_dir):
    from moe_parallel import hf

    cfg = compose("model=hf", f"model.path={model_dir}", "parallel=ep2")
    assert cfg.model.kind == "hf" and cfg.moe.capacity_factor is None and cfg.moe.eval_capacity_factor is None
    app_config.validate(cfg, world_size=2)
    ours = app_config.model_config(cfg, vocab_size=0)
    assert ours == hf.load_config(model_dir, moe_overrides={"aux_loss_coeff": 0.001})
    assert app_config.data_config(cfg).tokenizer == str(model_dir)  # the model's own tokenizer
    capped = app_config.model_config(compose("model=hf", f"model.path={model_dir}", "moe.capacity_factor=1.5"), 0)
    assert capped.moe.capacity_factor == 1.5 and capped.moe.num_experts == 4
    assert compose().model.kind == "gpt" and compose().moe.capacity_factor == 1.25  # the default is unchanged


@pytest.mark.parametrize(
    "overrides, world, message",
    [
        ((), 1, "model.path"),  # ??? in conf/model/hf.yaml
        (("moe.num_experts=16",), 1, "moe.num_experts=16 cannot be set with model=hf"),
        (("moe.top_k=1",), 1, "moe.top_k=1 cannot be set"),
        (("model.num_layers=8",), 1, "model.num_layers=8 cannot be set"),
        (("parallel.pp=3",), 3, "num_hidden_layers=2"),
        (("parallel.ep=3",), 3, "num_experts"),
        (("model.upcycle_experts=4",), 1, "model_type='qwen3_moe' is not supported here"),
        (("model.upcycle_experts=0",), 1, "model.upcycle_experts=0"),
    ],
)
def test_bad_model_settings_are_refused_naming_the_key(model_dir, overrides, world, message):
    path = () if overrides == () else (f"model.path={model_dir}",)
    cfg = compose("model=hf", *path, *overrides)
    with pytest.raises(Exception, match=message.replace("(", r"\(").replace("[", r"\[")):
        app_config.validate(cfg, world_size=world)


def test_broken_weights_are_refused_before_any_process_group(tmp_path, model_dir):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    raw = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**raw, "moe_intermediate_size": 24}))
    with pytest.raises(app_config.AppConfigError, match=r"model.path=.*shape"):
        app_config.validate(compose("model=hf", f"model.path={broken}"), world_size=1)
    (broken / "config.json").write_text(json.dumps(raw))
    (broken / "model.safetensors").unlink()
    with pytest.raises(app_config.AppConfigError, match=r"model.path=.*model.safetensors"):
        app_config.validate(compose("model=hf", f"model.path={broken}"), world_size=1)
    with pytest.raises(app_config.AppConfigError, match="model=hf"):
        app_config.validate(compose(f"model.path={model_dir}"), world_size=1)  # model=tiny reads no path


# ---------------------------------------------------------------- the corpus in the model's tokenizer


def _corpus(tmp_path: Path) -> tuple[Path, list[str]]:
    docs = [f"def f{i}(x):\n    return x * {i}  # é{'!' * i}\n" for i in range(12)]
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path, docs


def _prepare(corpus: Path, tokenizer: Path, cache: Path):
    from launch.data import DataConfig

    return prepare_data(
        DataConfig(files=[str(corpus)], val_fraction=0.0, cache_dir=str(cache), tokenizer=str(tokenizer))
    )


def test_corpus_is_tokenized_with_the_pretrained_tokenizer_and_cached_by_content(tmp_path, model_dir):
    import shutil

    from tokenizers import Tokenizer

    corpus, docs = _corpus(tmp_path)
    data = _prepare(corpus, model_dir, tmp_path / "cache")
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    want = [i for d in docs for i in [*tok.encode(d, add_special_tokens=False).ids, eos]]
    assert data.train_tokens.tolist() == want and data.eos_id == eos
    assert (data.directory / "tokenizer.json").read_bytes() == (model_dir / "tokenizer.json").read_bytes()

    # The same tokenizer elsewhere (e.g. an exported copy) reuses the tokens; another tokenizer does not.
    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    assert _prepare(corpus, copy / "tokenizer.json", tmp_path / "cache").directory == data.directory
    from tests.hf_app_fixtures import tiny_tokenizer

    other = tiny_tokenizer(tmp_path / "other", vocab_size=350)
    assert _prepare(corpus, other, tmp_path / "cache").directory != data.directory


def test_sentencepiece_model_file_with_bos(tmp_path):
    import io

    import sentencepiece as spm

    corpus, docs = _corpus(tmp_path)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(docs * 4), model_writer=buf, vocab_size=290, byte_fallback=True, minloglevel=2
    )
    folder = tmp_path / "spm"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>"})
    )
    data = _prepare(corpus, folder, tmp_path / "cache")
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    want = [i for d in docs for i in [sp.bos_id(), *sp.encode(d), sp.eos_id()]]
    assert data.train_tokens.tolist() == want and data.meta["tokenizer_type"] == "pretrained:sentencepiece"


def test_missing_or_unusable_tokenizer_names_the_key(tmp_path):
    from launch.hf_tokenizer import TokenizerError

    corpus, _ = _corpus(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="data.tokenizer=.*neither tokenizer.json nor tokenizer.model"):
        _prepare(corpus, tmp_path / "empty", tmp_path / "cache")
    (tmp_path / "bad" / "tokenizer.json").parent.mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{}")
    with pytest.raises(TokenizerError, match="not a tokenizers file"):
        _prepare(corpus, tmp_path / "bad", tmp_path / "cache")


# ---------------------------------------------------------------- building the model (one process)


def test_model_is_built_with_the_weights_and_deepspeed_expert_markers(tmp_path, model_dir):
    from types import SimpleNamespace

    import transformers

    from launch import hf_model
    from moe_parallel.core.layer import moe_layers

    cfg = compose("model=hf", f"model.path={model_dir}")
    model, config = hf_model.build_model(cfg, SimpleNamespace(ep_group=None), vocab_size=400)
    experts = [p for layer in moe_layers(model) for p in layer.experts.parameters()]
    assert experts and all(p.allreduce is False and p.group_name for p in experts)  # DeepSpeed reduces them over EDP
    assert all(p.dtype == torch.float32 for p in model.parameters())
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tokens = torch.randint(0, 400, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = theirs(tokens).logits, model.eval()(tokens)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())
    with pytest.raises(app_config.AppConfigError, match="the tokenizer has 500 tokens"):
        hf_model.build_model(cfg, SimpleNamespace(ep_group=None), vocab_size=500)


def test_upcycled_training_model_starts_with_the_dense_logits(tmp_path):
    from types import SimpleNamespace

    import transformers

    from launch import hf_model
    from tests.hf_app_fixtures import COMMON, randomize_, tiny_tokenizer

    kw = {k: v for k, v in COMMON.items() if k != "num_experts_per_tok"}
    dense = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**kw, vocab_size=300, intermediate_size=24))
    randomize_(dense, seed=5)
    dense.save_pretrained(str(tmp_path / "dense"))
    tiny_tokenizer(tmp_path / "dense", vocab_size=290)
    cfg = compose("model=hf", f"model.path={tmp_path / 'dense'}", "model.upcycle_experts=4", "model.upcycle_top_k=2")
    app_config.validate(cfg, world_size=1)
    model, config = hf_model.build_model(cfg, SimpleNamespace(ep_group=None), vocab_size=290)
    assert config.hf_model_type == "qwen3_moe" and config.moe.num_experts == 4 and config.moe.top_k == 2
    tokens = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got = dense.eval()(tokens).logits, model.eval()(tokens)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())


def _train_the_bias(rank, world, ckpt: str, rate: float) -> None:
    """A few steps of a GLM model with aux-loss-free balancing from the imported checkpoint, saved."""
    from launch.hf_identity import HF_MODEL_DIR
    from moe_parallel import hf, update_expert_biases
    from moe_parallel.checkpoints.checkpoint import load_checkpoint, save_checkpoint
    from moe_parallel.integration.engine import build_engine
    from moe_parallel.models import Decoder

    config = hf.load_config(Path(ckpt) / HF_MODEL_DIR, moe_overrides={"expert_bias_update_rate": rate})
    ds = {"train_micro_batch_size_per_gpu": 2, "steps_per_print": 10**9, "zero_optimization": {"stage": 0}}
    engine, _, _ = build_engine(Decoder(config), ds, lr=1e-3)
    load_checkpoint(engine, ckpt)
    for step in range(2):
        tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(step))
        engine.backward(Decoder.loss(engine(tokens[:, :-1]), tokens[:, 1:]))
        engine.step()
        update_expert_biases(engine.module)
    save_checkpoint(engine, ckpt)
    biases = {n: b for n, b in engine.module.state_dict().items() if n.endswith("router.expert_bias")}
    torch.save(biases, Path(ckpt) / "trained_biases.pt")


def test_export_carries_the_expert_bias_the_run_trained(tmp_path, capsys):
    import shutil

    from launch import hf_identity, hf_model
    from moe_parallel.checkpoints.checkpoint import read_manifest
    from tests.dist_utils import run_distributed
    from tests.hf_app_fixtures import tiny_family_model
    from tests.hf_models import assert_same_tensors, hf_tensors

    src, ckpt = tmp_path / "glm", tmp_path / "ckpt"
    tiny_family_model("glm4_moe", src, vocab_size=64, seed=4)  # non-zero e_score_correction_bias
    assert tool(["import-hf", str(src), "--out", str(ckpt)]) == 0
    assert tool(["export-hf", str(ckpt), "--out", str(tmp_path / "imported")]) == 0
    assert_same_tensors(src, tmp_path / "imported")  # the correction biases travel in the checkpoint

    rate = 1e-2
    cfg = compose("model=hf", f"model.path={src}", f"moe.expert_bias_update_rate={rate}")
    shutil.rmtree(ckpt / hf_identity.HF_MODEL_DIR)
    hf_model.save_identity(cfg, app_config.model_config(cfg, 0), ckpt)  # what a run writes
    run_distributed(_train_the_bias, 1, str(ckpt), rate, timeout=300)
    trained = torch.load(ckpt / "trained_biases.pt")
    assert (ckpt / "latest").read_text() == "step_00000002" and trained
    assert tool(["export-hf", str(ckpt), "--out", str(tmp_path / "trained")]) == 0
    exported, original = hf_tensors(tmp_path / "trained"), hf_tensors(src)
    for name, bias in trained.items():  # blocks.<i>.ffn.router.expert_bias
        key = f"model.layers.{name.split('.')[1]}.mlp.gate.e_score_correction_bias"
        assert torch.equal(exported[key], bias.to(exported[key].dtype)), key
        assert not torch.equal(exported[key], original[key]), f"{key}: the bias did not move in training"

    # A checkpoint saved before checkpoints held buffers lost the trained bias: its export is refused.
    step = ckpt / "step_00000002"
    manifest = read_manifest(step)
    del manifest["buffers"], manifest["files"]["buffers/stage_0.pt"]
    (step / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert tool(["export-hf", str(ckpt), "--out", str(tmp_path / "older")]) == 2
    assert "predates buffers in checkpoints" in capsys.readouterr().err


def test_tokenizer_is_checked_with_the_model_before_training(tmp_path, model_dir):
    import shutil

    from tests.hf_app_fixtures import tiny_tokenizer

    weights_only = tmp_path / "weights_only"
    shutil.copytree(model_dir, weights_only, ignore=shutil.ignore_patterns("tokenizer*"))
    with pytest.raises(app_config.AppConfigError, match="model.path=.*neither tokenizer.json nor tokenizer.model"):
        app_config.validate(compose("model=hf", f"model.path={weights_only}"), world_size=1)
    big = tiny_tokenizer(tmp_path / "big", vocab_size=450)  # more tokens than the model's 403 embeddings
    with pytest.raises(app_config.AppConfigError, match="data.tokenizer: the tokenizer has 450 tokens"):
        app_config.validate(compose("model=hf", f"model.path={weights_only}", f"data.tokenizer={big}"), world_size=1)
    app_config.validate(compose("model=hf", f"model.path={weights_only}", f"data.tokenizer={model_dir}"), world_size=1)


# DeepSeek-V3 in make test (latent attention, MTP-ready pipeline, grouped routing); the rest in make test-slow.
@pytest.mark.parametrize(
    "family",
    ["deepseek_v3", *(pytest.param(f, marks=pytest.mark.slow) for f in ("deepseek_v2", "llama4_text", "gpt_oss"))],
)
def test_each_new_family_trains_under_deepspeed_at_ep2_and_exports_exactly(tmp_path, family):
    from tests.hf_app_fixtures import tiny_family_model, tiny_tokenizer

    model_dir = tmp_path / family
    tiny_tokenizer(model_dir)
    tiny_family_model(family, model_dir, vocab_size=403)
    train(tmp_path / "run", model_dir, tmp_path / "cache", 4, "parallel=ep2", "train.eval_batches=1")
    losses = metric(tmp_path / "run", "train/loss")
    assert sorted(losses) == [2, 4] and all(map(math.isfinite, losses.values()))
    assert tool(["export-hf", str(tmp_path / "run" / "checkpoints"), "--out", str(tmp_path / "export")]) == 0
    ours = metric(tmp_path / "run", "eval/loss")[4]
    theirs = transformers_eval_loss(tmp_path / "export", tmp_path / "run", dp_size=2, batches=1)
    assert abs(ours - theirs) <= 1e-5 * abs(ours), (family, ours, theirs)
