"""Hugging Face interop at one process: our decoder against transformers' own forward (the oracle),
export and round trips, bf16 checkpoints, upcycling and the refusals. Nothing downloads: every model
is a tiny random one built from transformers' config classes."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from moe_parallel import hf
from moe_parallel.hf import HFConversionError
from moe_parallel.hf.load import local_tensors
from moe_parallel.hf.weights import disassemble, tensor_map
from moe_parallel.models import lm_loss
from tests.hf_models import (
    EAGER,
    FAMILIES,
    LLAMA3_ROPE,
    make_hf_model,
    random_hf_config,
    randomize_,
    relative_error,
    save_hf_model,
    tokens,
)

DRAWS = (0, 1, 2)
CASES = [(family, draw) for family in FAMILIES for draw in DRAWS]


def read_all(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({key: f.get_tensor(key) for key in f.keys()})
    return out


def load_transformers(path: Path, **kwargs):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(path), output_loading_info=True, **EAGER, **kwargs)
    return model.eval(), info


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """(family, draw) -> (directory, the transformers model saved there)."""
    root = tmp_path_factory.mktemp("hf")
    return {
        (family, draw): (
            root / f"{family}_{draw}",
            save_hf_model(random_hf_config(family, draw), draw, root / f"{family}_{draw}"),
        )
        for family, draw in CASES
    }


@pytest.mark.parametrize("family,draw", CASES)
def test_logits_match_transformers(hf_dirs, family, draw):
    path, reference = hf_dirs[family, draw]
    ours = hf.from_pretrained(path).eval()
    x = tokens(reference.config.vocab_size, seed=draw)
    with torch.no_grad():
        want, got = reference(x).logits, ours(x)
    assert relative_error(got, want) <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_training_step_loss_and_every_gradient_match(hf_dirs, family):
    path, reference = hf_dirs[family, 0]
    reference.train().zero_grad()
    ours = hf.from_pretrained(path, moe_overrides={"aux_loss_coeff": 0.0}).train()
    x = tokens(reference.config.vocab_size, seed=5)
    want = reference(input_ids=x, labels=x).loss
    want.backward()
    got = lm_loss(ours(x)[:, :-1], x[:, 1:])
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    from transformers.modeling_utils import revert_weight_conversion

    ref_grads = revert_weight_conversion(
        reference, {name: p.grad for name, p in reference.named_parameters() if p.grad is not None}
    )
    fam = hf.FAMILIES[family]
    our_grads = {}
    for canonical, (_, tensor, ids) in local_tensors(ours).items():
        if isinstance(tensor, torch.nn.Parameter):
            our_grads.update(disassemble(tensor_map(canonical, fam, ids), tensor.grad))
    assert set(our_grads) == set(ref_grads)
    # Rounding of a sum scales with its terms, not its result (k biases cancel to ~0): one scale for all.
    scale = max(float(g.abs().max()) for g in ref_grads.values())
    for key, grad in ref_grads.items():
        torch.testing.assert_close(our_grads[key], grad, rtol=1e-4, atol=2e-6 * scale, msg=key)
    reference.eval()


@pytest.mark.parametrize("family,draw", CASES)
def test_export_round_trip_is_bit_identical_and_loads_in_transformers(hf_dirs, tmp_path, family, draw, caplog):
    path, reference = hf_dirs[family, draw]
    ours = hf.from_pretrained(path)
    (path / "tokenizer.json").write_text('{"stub": "tokenizer files are copied along"}')
    out = hf.save_pretrained(ours, tmp_path / "export", max_shard_bytes=2048)

    original, exported = read_all(path), read_all(out)
    assert set(exported) == set(original)
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), key
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(original)
    assert {p.name for p in out.glob("*.safetensors")} == set(index["weight_map"].values())
    assert (out / "tokenizer.json").read_text() == (path / "tokenizer.json").read_text()

    import transformers

    transformers.utils.logging.enable_propagation()  # let caplog see transformers' load report
    try:
        with caplog.at_level(logging.WARNING):
            loaded, info = load_transformers(out)
    finally:
        transformers.utils.logging.disable_propagation()
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    reports = [r.getMessage() for r in caplog.records]
    assert not [m for m in reports if "LOAD REPORT" in m or "missing" in m.lower() or "unexpected" in m.lower()]
    x = tokens(reference.config.vocab_size, seed=draw)
    with torch.no_grad():
        assert relative_error(loaded(x).logits, reference(x).logits) <= 1e-6
    assert type(loaded).__name__ == type(reference).__name__


def test_config_round_trips_through_the_family(hf_dirs):
    for (family, draw), (path, reference) in hf_dirs.items():
        config = hf.load_config(path)
        back = hf.hf_config_from_decoder(config)
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"):
            assert getattr(back, key) == getattr(reference.config, key), (family, draw, key)
        assert back.eos_token_id == reference.config.eos_token_id  # carried along


def _token_errors(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    return ((got.float() - want).abs().amax(-1) / want.abs().amax()).flatten()


@pytest.mark.parametrize("family", ["qwen3_moe", "glm4_moe", "deepseek_v3", "deepseek_v2", "llama4_text", "gpt_oss"])
def test_bf16_checkpoint_loads_in_bf16_and_fp32_and_round_trips(tmp_path, family):
    config = random_hf_config(family, 7)
    save_hf_model(config, 7, tmp_path / "fp32")
    # A bf16 checkpoint as transformers writes one (GLM's correction bias stays float32).
    reference = load_transformers(tmp_path / "fp32", dtype=torch.bfloat16)[0]
    reference.save_pretrained(str(tmp_path / "bf16"))
    x = tokens(config.vocab_size, seed=3, seq=6)

    ours16 = hf.from_pretrained(tmp_path / "bf16").eval()
    keeps_router = family in ("glm4_moe", "deepseek_v3", "deepseek_v2")
    kept = {n for n, p in ours16.named_parameters() if n.endswith("router.weight")} if keeps_router else set()
    assert {p.dtype for n, p in ours16.named_parameters() if n not in kept} == {torch.bfloat16}
    assert {ours16.get_parameter(n).dtype for n in kept} <= {torch.float32}  # as transformers keeps them
    ours32 = hf.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()
    assert {p.dtype for p in ours32.parameters()} == {torch.float32}
    for (name, p16), p32 in zip(ours16.named_parameters(), ours32.parameters()):
        assert torch.equal(p16.float(), p32), name  # the same values, upcast exactly

    ref32 = load_transformers(tmp_path / "bf16", dtype=torch.float32)[0]
    with torch.no_grad():
        want32 = ref32(x).logits
        assert relative_error(ours32(x), want32) <= 1e-5
        got16, want16 = ours16(x), reference(x).logits
    assert got16.dtype == torch.bfloat16
    # As close to the fp32 truth as transformers' own bf16 forward is (per-token median: in bf16 a
    # near-tie in routing may flip for a token in either implementation).
    ours_err, theirs_err = _token_errors(got16, want32).median(), _token_errors(want16, want32).median()
    assert ours_err <= 2 * theirs_err + 1e-3, (ours_err, theirs_err)

    out = hf.save_pretrained(ours16, tmp_path / "export")
    original, exported = read_all(tmp_path / "bf16"), read_all(out)
    assert set(original) == set(exported)
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), key


@pytest.mark.parametrize("dense_type", ["llama", "qwen3"])
def test_upcycled_logits_equal_the_dense_model(tmp_path, dense_type):
    import transformers

    cls = transformers.LlamaConfig if dense_type == "llama" else transformers.Qwen3Config
    dense_cfg = cls(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        bos_token_id=1,
        eos_token_id=2,
        rope_parameters={"rope_theta": 500000.0, **LLAMA3_ROPE} if dense_type == "llama" else None,
    )
    dense = save_hf_model(dense_cfg, 3, tmp_path / "dense")
    x = tokens(50, seed=1)
    for experts, top_k in ((4, 2), (6, 1), (3, 3)):
        moe = hf.upcycle(tmp_path / "dense", num_experts=experts, top_k=top_k).eval()
        assert moe.config.hf_model_type == ("mixtral" if dense_type == "llama" else "qwen3_moe")
        router = moe.blocks[0].ffn.router.weight
        assert router.std() > 0  # random, not copied
        with torch.no_grad():
            want, got = dense(x).logits, moe(x)
        assert relative_error(got, want) <= 1e-5, (experts, top_k)
    out = hf.save_pretrained(moe, tmp_path / "moe")
    loaded, info = load_transformers(out)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
        assert relative_error(loaded(x).logits, want) <= 1e-5


# ---------------------------------------------------------------------------------------- refusals


def _edit_config(path: Path, **changes) -> None:
    file = path / "config.json"
    config = json.loads(file.read_text())
    config.update(changes)
    file.write_text(json.dumps(config))


@pytest.fixture
def qwen_dir(tmp_path):
    path = tmp_path / "qwen"
    save_hf_model(random_hf_config("qwen3_moe", 3), 3, path, max_shard_size="4KB")
    return path


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(model_type="gpt2"), r"model_type='gpt2' is not supported: supported are"),
        (dict(model_type="llama"), r"model_type='llama' is not supported \(a dense model: use moe_parallel.hf.upcycle"),
        (dict(hidden_act="gelu"), r"hidden_act='gelu' is not supported: only SwiGLU"),
        (dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}), r"rope_type='dynamic'"),
        (dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}), r"config.json is refused by .*longrope"),
        (dict(attention_dropout=0.1), r"attention_dropout=0.1 is not supported: set it to 0.0"),
        (dict(is_encoder_decoder=True), r"is_encoder_decoder=True is not supported"),
    ],
)
def test_unsupported_architecture_or_option_is_refused(qwen_dir, changes, match):
    _edit_config(qwen_dir, **changes)
    with pytest.raises(HFConversionError, match=match):
        hf.from_pretrained(qwen_dir)


def test_missing_shard_is_refused(qwen_dir):
    index = json.loads((qwen_dir / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (qwen_dir / shard).unlink()
    with pytest.raises(HFConversionError, match=rf"shard\(s\) \['{shard}'\] .* are missing .* copy every shard"):
        hf.from_pretrained(qwen_dir)


def test_shape_that_does_not_match_the_config_is_refused(qwen_dir):
    config = json.loads((qwen_dir / "config.json").read_text())
    _edit_config(qwen_dir, moe_intermediate_size=config["moe_intermediate_size"] + 2)
    with pytest.raises(
        HFConversionError, match=r"tensor model\.layers\.\d+\.mlp\.experts\.0\.[\w.]+ has shape .* implies"
    ):
        hf.from_pretrained(qwen_dir)


def test_expert_count_that_does_not_match_the_weights_is_refused(qwen_dir):
    config = json.loads((qwen_dir / "config.json").read_text())
    _edit_config(
        qwen_dir, num_experts=config["num_local_experts"] + 1, num_local_experts=config["num_local_experts"] + 1
    )
    with pytest.raises(HFConversionError, match=r"tensor\(s\) that config.json implies are missing"):
        hf.from_pretrained(qwen_dir)


def test_no_weights_is_refused(tmp_path, qwen_dir):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((qwen_dir / "config.json").read_text())
    with pytest.raises(HFConversionError, match=r"has neither model.safetensors nor model.safetensors.index.json"):
        hf.from_pretrained(tmp_path / "empty")
    with pytest.raises(HFConversionError, match=r"config.json is missing"):
        hf.from_pretrained(tmp_path)


def test_export_of_a_config_the_family_cannot_express_is_refused(tmp_path):
    path = tmp_path / "mixtral"
    save_hf_model(random_hf_config("mixtral", 1), 1, path)
    model = hf.from_pretrained(path)
    model.config.qk_norm = "head"
    with pytest.raises(HFConversionError, match=r"model\.qk_norm='head' cannot be expressed as mixtral"):
        hf.save_pretrained(model, tmp_path / "out")
    model.config.qk_norm = "none"
    model.config.moe.num_groups = 2
    with pytest.raises(HFConversionError, match=r"model\.moe\.num_groups=2, .* cannot be expressed as mixtral"):
        hf.save_pretrained(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before writing anything


def test_reference_is_transformers_eager_and_differs_when_a_weight_changes(hf_dirs):
    # Guards the oracle: a one-element change in one expert must show in the comparison.
    path, reference = hf_dirs["glm4_moe", 0]
    ours = hf.from_pretrained(path).eval()
    x = tokens(reference.config.vocab_size, seed=0)
    with torch.no_grad():
        ours.blocks[-1].ffn_norm.weight[0] += 0.5
        assert relative_error(ours(x), reference(x).logits) > 1e-4


def test_make_hf_model_sets_non_default_weights():
    model = make_hf_model(random_hf_config("glm4_moe", 0), 0)
    for name, p in model.named_parameters():
        assert not torch.all(p == 1) and not torch.all(p == 0), name
    biases = [b for n, b in model.named_buffers() if "e_score_correction_bias" in n]
    assert biases and all(b.abs().min() > 0 for b in biases)


def test_saving_again_into_a_directory_leaves_no_stale_shards(hf_dirs, tmp_path):
    path, reference = hf_dirs["olmoe", 0]
    ours = hf.from_pretrained(path)
    hf.save_pretrained(ours, tmp_path / "out", max_shard_bytes=1024)
    assert len(list((tmp_path / "out").glob("*.safetensors"))) > 2
    hf.save_pretrained(ours, tmp_path / "out")  # one file now
    assert sorted(p.name for p in (tmp_path / "out").glob("model*")) == ["model.safetensors"]
    loaded, info = load_transformers(tmp_path / "out")
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info


@pytest.mark.parametrize("family", FAMILIES)
def test_loaded_expert_parameters_carry_deepspeeds_expert_flags(hf_dirs, family):
    """DeepSpeed reduces a parameter over the expert-data-parallel group only when it is flagged
    (``allreduce=False``, ``group_name``); the meta-device build must not lose those flags."""
    from moe_parallel.core.layer import moe_layers

    model = hf.from_pretrained(hf_dirs[family, 0][0])
    layers = moe_layers(model)
    assert layers
    for layer in layers:
        for param in layer.experts.parameters():
            assert param.allreduce is False and param.group_name == layer.expert_group_name
    routed = {id(p) for layer in layers for p in layer.experts.parameters()}
    assert all(getattr(p, "allreduce", True) for p in model.parameters() if id(p) not in routed)


def test_llama4_text_tower_loads_and_exports_as_the_text_model(tmp_path):
    """A multimodal Llama 4 checkpoint: its text tower is read (the vision tower is left alone) and
    exported as the text model, Llama4ForCausalLM, with the same logits."""
    import transformers

    text = random_hf_config("llama4_text", 5).to_dict()
    vision = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, image_size=28,
                  patch_size=14, vision_output_dim=16, projector_input_dim=16, projector_output_dim=16)  # fmt: skip
    config = transformers.Llama4Config(text_config=text, vision_config=vision)
    reference = transformers.Llama4ForConditionalGeneration(config).eval()
    randomize_(reference, 5)
    reference.save_pretrained(str(tmp_path / "multimodal"))
    x = tokens(config.text_config.vocab_size)
    ours = hf.from_pretrained(tmp_path / "multimodal").eval()
    assert ours.config.hf_model_type == "llama4_text"
    with torch.no_grad():
        want = reference(input_ids=x).logits
        assert relative_error(ours(x), want) <= 1e-5
    hf.save_pretrained(ours, tmp_path / "text")
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "text"), output_loading_info=True, **EAGER
    )
    assert type(loaded).__name__ == "Llama4ForCausalLM"
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
        assert relative_error(loaded.eval()(x).logits, want) <= 1e-5
