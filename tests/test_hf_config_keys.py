"""Every key of each supported family's transformers config class is modelled, refused by name, or
provably without effect on transformers' own forward.

Per family and key: the key must be known to the family's mapping (``Family.config_keys``) or be a
neutral key; then, perturbing it in a random tiny config must change our ``DecoderConfig``, be
refused with an ``HFConversionError`` naming it, or leave transformers' logits unchanged (same
weights), so a key we ignore is one transformers ignores too.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch

from moe_parallel import hf
from moe_parallel.hf.families import NEUTRAL_KEYS
from tests.hf_models import EAGER, FAMILIES, random_hf_config, randomize_, tokens

BASE_KEYS = {"is_encoder_decoder", "tie_word_embeddings"}


def _class_keys(fam: hf.Family) -> set[str]:
    import transformers

    return set(getattr(transformers, fam.config_class)().to_dict())


@pytest.mark.parametrize("family", FAMILIES)
def test_every_config_class_key_is_known_to_the_family(family):
    fam = hf.FAMILIES[family]
    known = set(fam.config_keys) | set(fam.inert_keys) | set(NEUTRAL_KEYS) | BASE_KEYS
    unknown = sorted(_class_keys(fam) - known)
    assert not unknown, f"{family}: config keys neither modelled nor neutral: {unknown}"


def _perturbed(key: str, value, cfg, rng: random.Random):
    """A different value of ``key`` that the config class accepts, or None."""
    L = cfg.num_hidden_layers
    if isinstance(value, bool):
        return not value
    if key == "rope_parameters":
        return {**value, "rope_theta": value["rope_theta"] * 3}
    if key in ("layer_types",):
        kinds = sorted(set(value) | {"full_attention"})
        other = [k for k in ("sliding_attention", "chunked_attention", "full_attention") if k != value[0]]
        allowed = [k for k in other if k in kinds or k == "full_attention"] or other
        return [allowed[0], *value[1:]]
    if key in ("moe_layers", "mlp_only_layers"):
        return sorted(set(value) ^ {L - 1})
    if key == "no_rope_layers":
        return [1 - value[0], *value[1:]]
    if isinstance(value, int) and key in ("num_hidden_layers", "num_experts_per_tok"):
        return value + 1 if key == "num_hidden_layers" else max(1, value - 1) if value > 1 else None
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 1.5 + 0.01
    if value is None:
        return {"q_lora_rank": 4, "sliding_window": 3, "attention_chunk_size": 3, "clip_qkv": 0.5}.get(key)
    if isinstance(value, str):
        return {"hidden_act": "gelu", "topk_method": "group_limited_greedy"}.get(key)
    return None


def _logits(config, seed: int, x: torch.Tensor) -> torch.Tensor | None:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_config(config, **EAGER).eval()
    except Exception:  # a perturbation transformers cannot build
        return None
    randomize_(model, seed)
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("draw", [0, pytest.param(1, marks=pytest.mark.slow)])
@pytest.mark.parametrize("family", FAMILIES)
def test_each_key_changes_our_config_is_refused_or_changes_nothing_in_transformers(family, draw):
    fam = hf.FAMILIES[family]
    rng = random.Random(family)
    cfg = random_hf_config(family, 100 + draw)
    ours = hf.decoder_config_from_hf(cfg).to_dict()
    kwargs = cfg.to_dict()
    x = tokens(cfg.vocab_size, draw)
    base_logits = None
    for key in sorted((set(fam.config_keys) | set(fam.inert_keys)) & set(kwargs)):
        new = _perturbed(key, copy.deepcopy(kwargs[key]), cfg, rng)
        if new is None or new == kwargs[key]:
            continue
        try:
            changed = type(cfg).from_dict({**kwargs, key: new})
        except Exception:
            continue  # transformers refuses the value itself
        try:
            mapped = hf.decoder_config_from_hf(changed).to_dict()
        except hf.HFConversionError:
            continue  # refused, with a message naming the key (or the field it breaks)
        if mapped != ours:
            continue
        # We ignore the change: transformers' forward must ignore it too (same weights).
        if base_logits is None:
            base_logits = _logits(cfg, draw, x)
        got = _logits(changed, draw, x)
        assert got is None or torch.equal(got, base_logits), f"{family}: {key}={new!r} changes transformers' logits"
