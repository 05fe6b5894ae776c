"""DeepSeek-V3 multi-token prediction (models/mtp.py): the loss against a reference written here from
the paper's definition (one position at a time, on the same weights), a tiny random DeepSeek-V3 with
MTP layers imported (main logits as transformers', MTP losses against transformers' own decoder
layer as the MTP block) and exported bit-identical, the model without MTP unchanged, and training at
PP=2 under DeepSpeed with the loss and every gradient of PP=1."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from moe_parallel import hf
from moe_parallel.models import Decoder, DecoderConfig, DecoderConfigError, decoder_layer_names
from tests.dist_utils import run_distributed
from tests.hf_models import EAGER, hf_tensors, random_hf_config, save_hf_model, tokens

MOE = dict(num_experts=4, top_k=2, ffn_hidden_size=8, capacity_factor=None, eval_capacity_factor=None,
           aux_loss_coeff=0.0, z_loss_coeff=0.0)  # fmt: skip


def make(mtp_layers: int = 2, tie: bool = False, **overrides) -> DecoderConfig:
    kw = dict(vocab_size=40, num_layers=2, hidden_size=16, num_heads=2, num_kv_heads=1, ffn_hidden_size=24,
              moe=dict(MOE), first_dense_layers=1, tie_embeddings=tie, mtp_layers=mtp_layers,
              mtp_loss_weight=0.3)  # fmt: skip
    kw.update(overrides)
    return DecoderConfig(**kw)


def sequence(vocab: int, seed: int, batch: int = 2, seq: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.randint(0, vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(seed))
    return t[:, :-1].clone(), t[:, 1:].clone()


# ------------------------------------------------------------------------ reference, from the paper


def rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return weight * (x32 / torch.sqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def cross_entropy(logits_V: torch.Tensor, target: int) -> torch.Tensor:
    return -torch.log_softmax(logits_V.float(), dim=-1)[target]


def reference_depth_losses(h0, t_full, embedding, head, modules, eps, run_block) -> list[torch.Tensor]:
    """``[L_1, .., L_D]`` one position at a time: ``h_k[i]`` from ``h_{k-1}[0..i]`` and
    ``Emb(t[k..i+k])`` through the causal block on that prefix (its last row), then the head's
    cross entropy against ``t[i+k+1]``, averaged over the positions where that token exists.

    ``modules[k-1]`` = (enorm, hnorm, eh_proj, head_norm) weights; ``run_block(k, x_B1PD)`` runs
    block k on a prefix and returns its last position.
    """
    B, S1 = t_full.shape
    S = S1 - 1
    h_prev, losses = h0, []
    for k, (enorm, hnorm, eh_proj, head_norm) in enumerate(modules, start=1):
        rows, terms = [], []
        for i in range(S - k):
            emb = embedding[t_full[:, k : i + k + 1]]  # Emb(t[p + k]) for p = 0..i
            x = torch.cat((rms(emb, enorm, eps), rms(h_prev[:, : i + 1], hnorm, eps)), dim=-1) @ eh_proj.t()
            rows.append(rms(run_block(k, x), head_norm, eps))  # h_k[:, i]
            for b in range(B):
                terms.append(cross_entropy(rows[-1][b] @ head.t(), int(t_full[b, i + k + 1])))
        losses.append(torch.stack(terms).mean())
        h_prev = torch.stack(rows, dim=1)
    return losses


def reference_total(model: Decoder, tokens_BS, targets_BS) -> tuple[torch.Tensor, list[torch.Tensor]]:
    cfg = model.config
    x = model.embed(tokens_BS)
    for block in model.blocks:
        x = block(x)
    h0 = model.final_norm(x)
    head = model.lm_head_weight
    B, S = targets_BS.shape
    main = torch.stack([cross_entropy(h0[b, i] @ head.t(), int(targets_BS[b, i])) for b in range(B) for i in range(S)])
    main = main.mean()
    depths = model.mtp.depths
    modules = [(m.enorm.weight, m.hnorm.weight, m.eh_proj.weight, m.head_norm.weight) for m in depths]
    t_full = torch.cat((tokens_BS[:, :1], targets_BS), dim=1)
    losses = reference_depth_losses(
        h0, t_full, model.embed.weight, head, modules, cfg.norm_eps, lambda k, x: depths[k - 1].block(x)[:, -1]
    )
    return main + cfg.mtp_loss_weight / len(losses) * sum(losses), losses


@pytest.mark.parametrize(
    "attention, tie",
    # make test: each attention and each head tying once; the other pairs in make test-slow
    [
        ("gqa", False),
        ("mla", True),
        *(pytest.param(*pair, marks=pytest.mark.slow) for pair in [("gqa", True), ("mla", False)]),
    ],
)
def test_mtp_loss_and_gradients_match_the_reference(attention, tie):
    mla = dict(attention="mla", num_kv_heads=2, kv_lora_rank=6, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=6,
               q_lora_rank=8, rope_interleave=True)  # fmt: skip
    cfg = make(2, tie, **(mla if attention == "mla" else {}))
    model = Decoder(cfg).train()
    assert [m.layer_number for m in model.mtp.depths] == [2, 3]
    assert all(m.block.is_moe for m in model.mtp.depths)  # DeepSeek-V3's MTP blocks are MoE
    tokens_BS, targets_BS = sequence(cfg.vocab_size, seed=1)

    total, lm, mtp = model.training_loss(model(tokens_BS), targets_BS)
    total.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    want, want_depths = reference_total(model, tokens_BS, targets_BS)
    want.backward()
    torch.testing.assert_close(total, want, rtol=1e-5, atol=0)
    torch.testing.assert_close(mtp, want - lm, rtol=1e-4, atol=1e-7)
    h0 = model.final_norm(_trunk(model, tokens_BS)).detach()
    depth_losses = model.mtp.losses(h0, targets_BS, model.embed.weight, model.lm_head_weight)
    torch.testing.assert_close(torch.stack(depth_losses), torch.stack(want_depths).detach(), rtol=1e-5, atol=0)
    for name, param in model.named_parameters():
        torch.testing.assert_close(got[name], param.grad, rtol=1e-4, atol=1e-7, msg=name)
    assert all(got[n].abs().sum() > 0 for n in got if n.startswith("mtp.") and "experts" not in n)


def _trunk(model: Decoder, tokens_BS):
    x = model.embed(tokens_BS)
    for block in model.blocks:
        x = block(x)
    return x


def test_ignored_targets_and_short_sequences():
    cfg = make(2)
    model = Decoder(cfg).train()
    tokens_BS, targets_BS = sequence(cfg.vocab_size, seed=2)
    targets_BS[0, 4] = -100
    model(tokens_BS)
    loss = model.mtp_loss(targets_BS)  # the unknown token is neither an input (embedded) nor a target
    assert torch.isfinite(loss)
    with pytest.raises(RuntimeError, match="call it once after each forward"):
        model.mtp_loss(targets_BS)
    model(tokens_BS[:, :2])
    with pytest.raises(ValueError, match="longer than model.mtp_layers=2"):
        model.mtp_loss(targets_BS[:, :2])
    model.eval()
    _, _, none = model.training_loss(model(tokens_BS), targets_BS)
    assert none is None  # evaluation reports the LM loss only


@pytest.mark.parametrize(
    "key,value", [("mtp_layers", -1), ("mtp_layers", 1.5), ("mtp_loss_weight", -0.1), ("mtp_loss_weight", "x")]
)
def test_invalid_mtp_settings_name_the_key(key, value):
    with pytest.raises(DecoderConfigError, match=rf"model\.{key}="):
        make(**{key: value})


def test_model_without_mtp_is_unchanged():
    """No MTP: no parameter, layer or loss term added; the main model's parameters (names and
    values) and logits are the same with MTP modules beside them."""
    plain, with_mtp = Decoder(make(0)), Decoder(make(2))
    names = [n for n, _ in plain.named_parameters()]
    assert plain.mtp is None and not any(n.startswith("mtp") for n in names)
    assert [n for n, _ in with_mtp.named_parameters() if not n.startswith("mtp.")] == names
    for (name, a), (_, b) in zip(plain.state_dict().items(), with_mtp.state_dict().items()):
        assert torch.equal(a, b), name
    tokens_BS, targets_BS = sequence(40, seed=3)
    torch.testing.assert_close(plain(tokens_BS), with_mtp(tokens_BS), rtol=0, atol=0)
    total, lm, mtp = plain.train().training_loss(plain(tokens_BS), targets_BS)
    assert mtp is None and total is lm
    cfg = make(0)
    assert decoder_layer_names(cfg) == ["embed", "blocks.0", "blocks.1", "final_norm", "lm_head"]
    assert decoder_layer_names(make(2)) == ["embed", "blocks.0", "blocks.1", "final_norm", "mtp", "embed", "lm_head"]
    assert decoder_layer_names(make(2, tie=True)) == ["embed", "blocks.0", "blocks.1", "final_norm", "mtp", "lm_head"]


# ------------------------------------------------------------------------ Hugging Face


def save_mtp_model(hf_config, mtp_layers: int, seed: int, path: Path):
    """A random DeepSeek-V3 with ``mtp_layers`` MTP layers in the released layout. transformers has no
    MTP module: its model with ``L + mtp_layers`` layers provides the MTP blocks (layers ``L..``),
    then config.json says ``L`` layers and the MTP tensors are added. Returns that model."""
    import transformers
    from safetensors.torch import load_file, save_file

    L, D = hf_config.num_hidden_layers, hf_config.hidden_size
    big = transformers.DeepseekV3Config(**{**hf_config.to_dict(), "num_hidden_layers": L + mtp_layers})
    model = save_hf_model(big, seed, path)
    file = path / "model.safetensors"
    tensors = load_file(str(file))
    gen = torch.Generator().manual_seed(seed)
    for j in range(L, L + mtp_layers):
        for name in ("enorm", "hnorm", "shared_head.norm"):
            tensors[f"model.layers.{j}.{name}.weight"] = 1 + 0.2 * torch.randn(D, generator=gen)
        tensors[f"model.layers.{j}.eh_proj.weight"] = torch.randn(D, 2 * D, generator=gen) / math.sqrt(2 * D)
        tensors[f"model.layers.{j}.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
        head = tensors.get("lm_head.weight", tensors["model.embed_tokens.weight"])
        tensors[f"model.layers.{j}.shared_head.head.weight"] = head.clone()
    save_file(tensors, str(file), metadata={"format": "pt"})
    raw = json.loads((path / "config.json").read_text())
    raw.update(num_hidden_layers=L, num_nextn_predict_layers=mtp_layers)
    (path / "config.json").write_text(json.dumps(raw))
    return model


def _is_mtp_key(key: str, num_layers: int) -> bool:
    parts = key.split(".")
    return parts[:2] == ["model", "layers"] and int(parts[2]) >= num_layers


@pytest.mark.parametrize("seed,mtp_layers", [(4, 1), (5, 2)])
def test_deepseek_v3_with_mtp_imports_matches_and_round_trips(tmp_path, seed, mtp_layers):
    from transformers import AutoModelForCausalLM

    hf_config = random_hf_config("deepseek_v3", seed)
    L = hf_config.num_hidden_layers
    src = tmp_path / "src"
    full = save_mtp_model(hf_config, mtp_layers, seed, src)
    model = hf.from_pretrained(src).eval()
    assert model.config.mtp_layers == mtp_layers
    assert sorted(model.mtp._modules) == [str(j) for j in range(L, L + mtp_layers)]

    reference = AutoModelForCausalLM.from_pretrained(str(src), **EAGER).eval()
    x = tokens(hf_config.vocab_size, seed=seed)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x).logits, rtol=1e-5, atol=1e-5)

        # MTP losses against transformers' own decoder layers L.. as the MTP blocks, on the HF tensors.
        x_full = tokens(hf_config.vocab_size, seed=seed + 1, seq=12)
        inputs, targets = x_full[:, :-1], x_full[:, 1:]
        h0 = reference.model(inputs).last_hidden_state  # after the final norm
        source = hf.SafetensorsDir(src)
        get = source.get
        modules = [
            tuple(get(f"model.layers.{j}.{n}.weight") for n in ("enorm", "hnorm", "eh_proj", "shared_head.norm"))
            for j in range(L, L + mtp_layers)
        ]

        def run_block(k: int, x_B1PD):
            positions = torch.arange(x_B1PD.shape[1])[None].expand(x_B1PD.shape[0], -1)
            cos_sin = full.model.rotary_emb(x_B1PD, positions)
            out = full.model.layers[L + k - 1](x_B1PD, attention_mask=None, position_embeddings=cos_sin)
            return (out[0] if isinstance(out, tuple) else out)[:, -1]  # the last row sees the whole prefix

        want = reference_depth_losses(
            h0,
            x_full,
            get(f"model.layers.{L}.embed_tokens.weight"),
            get(f"model.layers.{L}.shared_head.head.weight"),
            modules,
            hf_config.rms_norm_eps,
            run_block,
        )
        got = model.mtp.losses(model.final_norm(_trunk(model, inputs)), targets, model.embed.weight,
                               model.lm_head_weight)  # fmt: skip
        torch.testing.assert_close(torch.stack(got), torch.stack(want), rtol=1e-5, atol=1e-6)

    out = tmp_path / "out"
    hf.save_pretrained(model, out, max_shard_bytes=4096)
    original, exported = hf_tensors(src), hf_tensors(out)
    mtp_keys = {k for k in original if _is_mtp_key(k, L)}
    assert len(mtp_keys) > 6 * mtp_layers and {k for k in exported if _is_mtp_key(k, L)} == mtp_keys
    for key in sorted(mtp_keys):  # the MTP layers on their own, copies included
        assert torch.equal(exported[key], original[key]), key
    assert set(exported) == set(original)
    for key, tensor in original.items():
        assert torch.equal(exported[key], tensor), key
    assert json.loads((out / "config.json").read_text())["num_nextn_predict_layers"] == mtp_layers

    # Without the MTP modules (as transformers loads it): their keys are skipped, the export has none.
    plain = hf.from_pretrained(src, mtp_layers=0).eval()
    assert plain.mtp is None and plain.config.mtp_layers == 0
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), rtol=0, atol=0)
    hf.save_pretrained(plain, tmp_path / "plain")
    assert not any(_is_mtp_key(k, L) for k in hf_tensors(tmp_path / "plain"))
    with pytest.raises(hf.HFConversionError, match=r"model\.mtp_layers=3 is invalid"):
        hf.load_config(src, mtp_layers=3)


def test_mtp_copies_that_differ_and_missing_mtp_layers_are_refused_by_name(tmp_path):
    from safetensors.torch import load_file, save_file

    hf_config = random_hf_config("deepseek_v3", 6)
    save_mtp_model(hf_config, 1, 6, tmp_path)
    key = f"model.layers.{hf_config.num_hidden_layers}.shared_head.head.weight"
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors[key][0, 0] += 1.0
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(hf.HFConversionError, match=rf"{key} differs from .*mtp_layers=0"):
        hf.from_pretrained(tmp_path)
    from launch.checkpoint_tool import main as tool

    assert tool(["import-hf", str(tmp_path), "--out", str(tmp_path / "ckpt")]) == 2  # offline import too
    assert not (tmp_path / "ckpt").exists()
    assert hf.from_pretrained(tmp_path, mtp_layers=0).mtp is None  # skipped, as transformers skips it
    stripped = {k: v for k, v in tensors.items() if not _is_mtp_key(k, hf_config.num_hidden_layers)}
    save_file(stripped, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(hf.HFConversionError, match=r"announces 1 multi-token-prediction layer.*mtp_layers=0"):
        hf.from_pretrained(tmp_path)
    assert hf.from_pretrained(tmp_path, mtp_layers=0).mtp is None


# ------------------------------------------------------------------------ PP=2 under DeepSpeed


MICRO_BATCHES = 2


def _pipeline_vs_plain(rank: int, world: int, out_dir: str) -> None:
    from moe_parallel.integration.engine import build_engine
    from moe_parallel.integration.parallel import initialize_parallel
    from moe_parallel.integration.pipeline import decoder_canonical_names, decoder_pipeline
    from moe_parallel.models.mtp import pipeline_loss_parts

    state = initialize_parallel(pipeline_parallel_size=2, expert_parallel_size=1)
    results = {}
    for tie in (False, True):
        cfg = make(2, tie, num_layers=4, first_dense_layers=0)  # an MoE layer on both stages
        batches = [sequence(cfg.vocab_size, seed=10 + m) for m in range(MICRO_BATCHES)]
        module = decoder_pipeline(cfg, topology=state.deepspeed_topology())
        ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": MICRO_BATCHES,
              "steps_per_print": 10**9, "zero_optimization": {"stage": 0}}  # fmt: skip
        engine, optimizer, _ = build_engine(module, ds, lr=1e-3, weight_decay=0.0)
        grads: dict[str, torch.Tensor] = {}
        # The update is replaced by a copy of the gradients it would apply, all-reduced (tied ones too).
        engine.optimizer.step = _capture_gradients(module, grads)
        total = float(engine.train_batch(data_iter=iter(batches)))
        lm, mtp = pipeline_loss_parts(module, state.pp_group, state.dp_group)

        plain = Decoder(cfg).train()
        want_total = want_lm = want_mtp = 0.0
        for tokens_BS, targets_BS in batches:
            t, lm_, mtp_ = plain.training_loss(plain(tokens_BS), targets_BS)
            (t / MICRO_BATCHES).backward()
            want_total, want_lm, want_mtp = want_total + t.item(), want_lm + lm_.item(), want_mtp + mtp_.item()
        n = MICRO_BATCHES
        torch.testing.assert_close(torch.tensor([total, lm, mtp]), torch.tensor([want_total, want_lm, want_mtp]) / n,
                                   rtol=1e-5, atol=0, msg=f"tie={tie}")  # fmt: skip
        canonical = decoder_canonical_names(module, cfg)
        want = dict(plain.named_parameters())
        assert grads and (state.stage_id == 0 or any(c.startswith("mtp.") for c in canonical.values()))
        for local, grad in grads.items():
            torch.testing.assert_close(grad, want[canonical[local]].grad, rtol=1e-4, atol=1e-7, msg=canonical[local])
        results[f"tie={tie}/stage{state.stage_id}"] = sorted(canonical.values())
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        Path(out_dir, "names.json").write_text(json.dumps({k: v for r in gathered for k, v in r.items()}))


def _capture_gradients(module, into: dict):
    def step(*args, **kwargs) -> None:
        for name, p in module.named_parameters():
            into[name] = p.grad.detach().clone()

    return step


def test_pipeline_training_matches_the_plain_model(tmp_path):
    run_distributed(_pipeline_vs_plain, 2, str(tmp_path), timeout=300)
    names = json.loads((tmp_path / "names.json").read_text())
    for tie in (False, True):
        first, last = names[f"tie={tie}/stage0"], names[f"tie={tie}/stage1"]
        assert "embed.weight" in first and "embed.weight" in last  # tied onto the last stage for MTP
        assert not any(n.startswith("mtp.") for n in first) and any(n.startswith("mtp.4.block.ffn") for n in last)
        every = set(first) | set(last)
        assert every == {n for n, _ in Decoder(make(2, tie, num_layers=4, first_dense_layers=0)).named_parameters()}


# ------------------------------------------------------------------------ Hydra keys


def test_hydra_keys_choose_the_mtp_modules_and_their_weight(tmp_path):
    from launch import config as app_config
    from launch.config import compose

    save_mtp_model(random_hf_config("deepseek_v3", 8), 2, 8, tmp_path)
    path = f"model.path={tmp_path}"
    config = app_config.model_config(compose("model=hf", path), 0)
    assert (config.mtp_layers, config.mtp_loss_weight) == (2, 0.1)
    config = app_config.model_config(compose("model=hf", path, "model.mtp_layers=1", "model.mtp_loss_weight=0.3"), 0)
    assert (config.mtp_layers, config.mtp_loss_weight) == (1, 0.3)
    assert app_config.model_config(compose("model=hf", path, "model.mtp_layers=0"), 0).mtp_layers == 0
    with pytest.raises(app_config.AppConfigError, match=r"model\.mtp_layers=3 is invalid.*keep 0\.\.2"):
        app_config.model_config(compose("model=hf", path, "model.mtp_layers=3"), 0)
    with pytest.raises(DecoderConfigError, match=r"model\.mtp_loss_weight=-1\.0 is invalid"):
        app_config.model_config(compose("model=hf", path, "model.mtp_loss_weight=-1"), 0)
    for key in ("model.mtp_layers=1", "model.mtp_loss_weight=0.3"):
        with pytest.raises(app_config.AppConfigError, match=r"model\.mtp_layers / model\.mtp_loss_weight .*model=hf"):
            app_config.validate(compose(key), world_size=1)
