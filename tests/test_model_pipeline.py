"""The pipeline plumbing both model families share (moe_parallel.integration.pipeline): partitions,
plain <-> pipeline names over random shapes, canonical names, and the builders' checks, which
refuse before any collective (no process group is created here)."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from moe_parallel.integration.pipeline import (
    decoder_canonical_names,
    decoder_pipeline,
    decoder_pipeline_parts,
    decoder_pipeline_to_plain,
    decoder_plain_to_pipeline,
    gpt_pipeline,
    pipeline_canonical_names,
    pipeline_parts,
    pipeline_to_plain_state_dict,
    plain_to_pipeline_state_dict,
)
from moe_parallel.models import (
    Decoder,
    DecoderConfig,
    DecoderConfigError,
    GPTConfig,
    GPTConfigError,
    decoder_layer_names,
    pipeline_layer_names,
)
from moe_parallel.models.gpt import GPT


def gpt_config(layers: int, tie: bool) -> GPTConfig:
    return GPTConfig(
        vocab_size=16, seq_len=4, num_layers=layers, hidden_size=8, num_heads=2, ffn_hidden_size=8, moe_every=0,
        moe=None, tie_embeddings=tie,
    )  # fmt: skip


def decoder_config(layers: int, tie: bool) -> DecoderConfig:
    moe = dict(num_experts=2, top_k=1, ffn_hidden_size=4, capacity_factor=None, eval_capacity_factor=None)
    return DecoderConfig(
        vocab_size=16, num_layers=layers, hidden_size=8, num_heads=2, ffn_hidden_size=8, moe=moe,
        tie_embeddings=tie,
    )  # fmt: skip


# (config maker, plain model, layer names, parts, plain->pipe, pipe->plain, builder, error, layers before the blocks)
FAMILIES = {
    "gpt": (gpt_config, GPT, pipeline_layer_names, pipeline_parts, plain_to_pipeline_state_dict,
            pipeline_to_plain_state_dict, gpt_pipeline, GPTConfigError, 2),
    "decoder": (decoder_config, Decoder, decoder_layer_names, decoder_pipeline_parts, decoder_plain_to_pipeline,
                decoder_pipeline_to_plain, decoder_pipeline, DecoderConfigError, 1),
}  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
def test_parts_balance_blocks_with_head_and_tail_on_the_end_stages(family):
    make, _, names_of, parts_of, *_, error, lead = FAMILIES[family]
    rng = random.Random(family)
    for _ in range(40):
        layers = rng.randint(1, 24)
        stages = rng.randint(1, layers)
        cfg = make(layers, tie=rng.random() < 0.5)
        names = names_of(cfg)
        assert len(names) == lead + layers + 2 and names[lead : lead + layers] == [f"blocks.{i}" for i in range(layers)]
        parts = parts_of(cfg, stages)
        assert len(parts) == stages + 1 and parts[0] == 0 and parts[-1] == len(names)
        blocks = [sum(name.startswith("blocks.") for name in names[parts[s] : parts[s + 1]]) for s in range(stages)]
        assert sum(blocks) == layers and min(blocks) >= 1 and max(blocks) - min(blocks) <= 1
        assert parts[1] > lead - 1 and parts[-2] <= lead + layers  # embeddings first, final norm + head last
        for bad in (0, layers + 1, float(stages)):
            with pytest.raises(error, match=rf"num_stages={bad!r} is invalid.*num_layers={layers}"):
                parts_of(cfg, bad)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tie", [False, True])
def test_names_round_trip_and_every_pipeline_key_is_one_layer(family, tie):
    make, model_cls, names_of, _, to_pipe, to_plain, builder, *_ = FAMILIES[family]
    cfg = make(3, tie)
    plain = model_cls(cfg).state_dict()
    piped = to_pipe(plain, cfg)
    assert len(piped) == len(plain)
    back = to_plain(piped, cfg)
    assert list(back) == list(plain) and all(back[k] is plain[k] for k in plain)
    names = names_of(cfg)
    for key in piped:
        head, _, rest = key.partition(".")
        if key.startswith("tied_modules."):
            assert tie and key == f"tied_modules.embed.{key.split('.', 2)[2]}"
        else:
            assert head.isdigit() and f"{names[int(head)]}.{rest}" in plain
    assert (f"{len(names) - 1}.weight" in piped) is not tie  # only an untied LM head has parameters
    with pytest.raises(KeyError, match=rf"'bogus.w' is not a parameter name of {model_cls.__name__}\(3 layers\)"):
        to_pipe({"bogus.w": 0}, cfg)
    for bad in (f"{len(names)}.weight", "x.weight", "1", "tied_modules.other.weight"):
        with pytest.raises(KeyError, match=rf"is not a parameter name of {builder.__name__}\(3 layers\)"):
            to_plain({bad: 0}, cfg)


@pytest.mark.parametrize("tie", [False, True])
def test_canonical_names_of_a_stage(tie):
    """A stand-in stage with DeepSpeed's names: parameters always, persistent buffers on request."""
    stage = nn.Module()
    stage.add_module("1", nn.Linear(2, 2))
    stage.get_submodule("1").register_buffer("scale", torch.ones(1))
    if tie:
        stage.add_module("tied_modules", nn.ModuleDict({"embed": nn.Embedding(3, 2)}))
    cfg = decoder_config(3, tie)
    expected = {"1.weight": "blocks.0.weight", "1.bias": "blocks.0.bias"}
    if tie:
        expected["tied_modules.embed.weight"] = "embed.weight"
    assert decoder_canonical_names(stage, cfg) == expected
    assert decoder_canonical_names(stage, cfg, buffers=True) == {**expected, "1.scale": "blocks.0.scale"}
    gpt_expected = {k: v.replace("blocks.0", "pos_embed") for k, v in expected.items()}
    assert pipeline_canonical_names(stage, gpt_config(3, tie)) == gpt_expected


@pytest.mark.parametrize("family", FAMILIES)
def test_builders_refuse_before_any_collective(family, monkeypatch):
    make, model_cls, *_, builder, error, _ = FAMILIES[family]
    name = builder.__name__
    cfg = make(2, False)

    class Topology:  # the one method the builder reads before DeepSpeed does
        def get_dim(self, axis: str) -> int:
            assert axis == "pipe"
            return 2

    with pytest.raises(error, match=f"{name} needs num_stages or a topology"):
        builder(cfg)
    with pytest.raises(error, match="num_stages=1 disagrees with the topology's pipe size 2"):
        builder(cfg, num_stages=1, topology=Topology())
    with pytest.raises(error, match="num_stages=3 is invalid"):
        builder(cfg, num_stages=3)
    assert not torch.distributed.is_initialized()
    with pytest.raises(RuntimeError, match=rf"{name} needs torch.distributed.*use {model_cls.__name__} for a single"):
        builder(cfg, num_stages=2)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(RuntimeError, match=f"{name} needs LOCAL_RANK"):
        builder(cfg, topology=Topology())
