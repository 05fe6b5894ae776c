"""The activation bytes the planner predicts from a meta-device trace against the bytes a real CPU step
saves for backward (fp32, SDPA's math path, the grouped-GEMM experts), per micro-batch and stage:
the reference GPT, a Mixtral-like and a DeepSeek-V3-like decoder (latent attention, shared experts,
leading dense blocks, multi-token prediction), with a capacity factor and dropless, at PP = 1
EP = 1, PP = 1 EP = 2 and PP = 2 (a DeepSpeed PipelineEngine step), with and without activation
checkpointing; and a DeepSeek-V3-sized stage that traces in seconds.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend, sdpa_kernel

from moe_parallel.models import GPT, Decoder, DecoderConfig, GPTConfig
from moe_parallel.planning.activations import (
    GPU_ATTENTION,
    SavedTensorBytes,
    count_pipeline_forwards,
    measure_plain_step,
    predict_activation_bytes,
    saved_tensor_bytes,
)
from tests.dist_utils import run_distributed

TOLERANCE = 0.10
MICRO, SEQ = 2, 32
FAMILIES = ("gpt", "mixtral", "deepseek_v3")


def model_config(family: str, capacity_factor: float | None) -> GPTConfig | DecoderConfig:
    """A tiny model of ``family``; vocabularies and widths differ, so no activation is V wide."""
    moe: dict[str, Any] = dict(capacity_factor=capacity_factor, expert_gemm="grouped", min_capacity=1)
    if family == "gpt":
        moe.update(num_experts=4, top_k=2, z_loss_coeff=1e-3)
        return GPTConfig(
            vocab_size=101, seq_len=SEQ, num_layers=4, hidden_size=32, num_heads=4, ffn_hidden_size=48, moe=moe
        )
    if family == "mixtral":
        moe.update(num_experts=4, top_k=2, ffn_hidden_size=40)
        return DecoderConfig(
            vocab_size=103,
            num_layers=4,
            hidden_size=32,
            num_heads=4,
            num_kv_heads=2,
            ffn_hidden_size=56,
            layer_types=["sliding_attention", "full_attention"] * 2,
            sliding_window=8,
            moe=moe,
            hf_model_type="mixtral",
        )
    moe.update(
        num_experts=8,
        top_k=2,
        ffn_hidden_size=16,
        shared_expert_ffn_hidden_size=16,
        score_func="sigmoid",
        normalize_top_k=True,
        selection_bias=True,
        num_groups=4,
        topk_groups=2,
        routed_scaling_factor=2.5,
        aux_loss_coeff=0.0,
    )
    return DecoderConfig(
        vocab_size=107,
        num_layers=4,
        hidden_size=32,
        num_heads=4,
        ffn_hidden_size=56,
        attention="mla",
        q_lora_rank=24,
        kv_lora_rank=20,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=6,
        head_dim=4,
        first_dense_layers=1,
        mtp_layers=1,
        rope_interleave=True,
        moe=moe,
        hf_model_type="deepseek_v3",
    )


def batch(config, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, config.vocab_size, (MICRO, SEQ + 1), generator=gen)
    return tokens[:, :-1].clone(), tokens[:, 1:].clone()  # two storages, as the trace's inputs


def predict(config, *, num_stages: int = 1, stage: int = 0, ep: int = 1, attention: str = "math"):
    return predict_activation_bytes(
        config,
        num_stages=num_stages,
        stage=stage,
        micro_batch=MICRO,
        seq_len=SEQ,
        ep=ep,
        dtype=torch.float32,
        attention=attention,
    )


def relative_error(predicted: int, measured: int) -> float:
    return abs(predicted - measured) / measured


# ---------------------------------------------------------------------------------------- the counter


def test_counter_counts_a_storage_once_and_leaves_out_parameters():
    linear = torch.nn.Linear(8, 16)
    x = torch.randn(4, 8, requires_grad=True)
    with saved_tensor_bytes(linear) as counter:
        y = linear(x)  # saves x (and the weight: a parameter)
        z = (y * y).sum()  # saves y twice: one storage
        w = y[:, :4].exp()  # saves its output, a new storage
    assert counter.bytes == (4 * 8 + 4 * 16 + 4 * 4) * 4 and counter.count == 3
    (z + w.sum()).backward()
    meta = SavedTensorBytes()
    view = torch.empty(10, 6, device="meta")
    meta.add(view[2:5])
    meta.add(view.t())
    assert meta.bytes == 10 * 6 * 4 and meta.count == 1


def test_flash_saves_q_k_v_out_and_logsumexp_not_the_probabilities():
    config = model_config("gpt", None)
    math = predict(config, attention="math")
    flash = predict(config, attention="flash")
    cpu_flash = predict(config, attention="cpu_flash")
    B, H, S, L = MICRO, config.num_heads, SEQ, config.num_layers
    # Math saves the [B, H, S, S] probabilities (and its scaled copy of q); flash keeps the fp32
    # logsumexp [B, H, S] and the output in its own layout instead.
    assert math.saved - flash.saved >= L * B * H * S * S * 4 - L * B * H * S * 4 - L * B * S * config.hidden_size * 8
    assert flash.saved < math.saved
    assert GPU_ATTENTION == "flash" and math.attention == "math"
    # The same tensors by the GPU's kernel and the CPU's; the GPU's also keeps its RNG seed and offset.
    assert 0 <= flash.saved - cpu_flash.saved <= L * 64
    model = GPT(config)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        measured = measure_plain_step(model, *batch(config, 0))
    assert relative_error(cpu_flash.saved, measured) <= TOLERANCE, (cpu_flash.saved, measured)


@pytest.mark.parametrize("family", [f if f == "gpt" else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES])
def test_plain_model_at_ep1_matches_a_real_step(family):
    for capacity_factor in (1.0, None):
        config = model_config(family, capacity_factor)
        torch.manual_seed(0)
        model = Decoder(config) if isinstance(config, DecoderConfig) else GPT(config)
        with sdpa_kernel(SDPBackend.MATH):
            measured = measure_plain_step(model, *batch(config, 1))
        predicted = predict(config)
        # At EP = 1 the grouped experts' shapes are static: the trace is the step.
        assert predicted.saved == measured, (family, capacity_factor, predicted.saved, measured)
        # The app builds the plain model at PP = 1: no activation checkpointing there.
        assert not predicted.checkpointing and predicted.saved_checkpointed == predicted.saved
        assert predicted.received == 0 and predicted.sent == 0
        assert predicted.moe_rows == MICRO * SEQ * config.moe.top_k
        V = config.vocab_size
        # fp32: the logits and the loss's log-probabilities (plus each MTP depth's, shorter by one position).
        mtp = getattr(config, "mtp_layers", 0)
        assert predicted.logits == 2 * MICRO * SEQ * V * 4 + mtp * 2 * MICRO * (SEQ - 1) * V * 4


def test_bf16_prediction_keeps_fp32_copies_for_the_loss_and_the_router():
    config = model_config("gpt", None)
    fp32 = predict(config, attention="flash")
    bf16 = predict_activation_bytes(
        config, num_stages=1, stage=0, micro_batch=MICRO, seq_len=SEQ, ep=1, dtype=torch.bfloat16, attention="flash"
    )
    V = config.vocab_size
    # bf16 logits, their fp32 copy, fp32 log-probabilities.
    assert bf16.logits == MICRO * SEQ * V * (2 + 4 + 4) and bf16.dtype == torch.bfloat16
    assert fp32.saved / 2 < bf16.saved < fp32.saved


# ---------------------------------------------------------------------------------------- EP = 2


def _ep2_worker(rank: int, world_size: int, cases: list[tuple[str, float | None]]) -> None:
    from moe_parallel.integration.parallel import initialize_parallel

    state = initialize_parallel(pipeline_parallel_size=1, expert_parallel_size=2)
    for family, capacity_factor in cases:
        config = model_config(family, capacity_factor)
        torch.manual_seed(0)
        cls = Decoder if isinstance(config, DecoderConfig) else GPT
        model = cls(config, ep_group=state.ep_group)
        with sdpa_kernel(SDPBackend.MATH):
            measured = measure_plain_step(model, *batch(config, 10 + rank))
        predicted = predict(config, ep=2)
        assert predicted.moe_rows <= MICRO * SEQ * config.moe.top_k
        everyone = [None] * world_size
        dist.all_gather_object(everyone, measured)
        mean = sum(everyone) / len(everyone)
        case = (family, capacity_factor, predicted, everyone)
        for got in everyone:  # every rank: routing imbalance moves its rows away from the expectation
            assert relative_error(predicted.saved, got) <= TOLERANCE, case
        if capacity_factor is None:
            # Dropless, the group receives all T * K rows of each rank: the mean over the ranks is the
            # balanced expectation, to the byte (what a rank saves is affine in the rows it receives).
            assert mean == predicted.saved, case
        else:  # imbalance drops rows a balanced step keeps: the expectation bounds the mean
            assert mean <= predicted.saved, case


def test_ep2_gpt_matches_real_steps_on_every_rank():
    run_distributed(_ep2_worker, 2, [("gpt", 1.0), ("gpt", None)], timeout=240)


@pytest.mark.slow
def test_ep2_decoders_match_real_steps_on_every_rank():
    cases = [(family, cf) for family in ("mixtral", "deepseek_v3") for cf in (1.0, None)]
    run_distributed(_ep2_worker, 2, cases, timeout=400)


# ---------------------------------------------------------------------------------------- PP = 2


def _pp2_worker(rank: int, world_size: int, cases: list[tuple[str, float | None, bool]]) -> None:
    from moe_parallel.integration.engine import build_engine
    from moe_parallel.integration.parallel import initialize_parallel
    from moe_parallel.integration.pipeline import decoder_pipeline, gpt_pipeline

    state = initialize_parallel(pipeline_parallel_size=2, expert_parallel_size=1)
    micro_batches = 2
    for family, capacity_factor, checkpointing in cases:
        config = model_config(family, capacity_factor)
        builder = decoder_pipeline if isinstance(config, DecoderConfig) else gpt_pipeline
        torch.manual_seed(0)
        model = builder(
            config,
            ep_group=state.ep_group,
            topology=state.deepspeed_topology(),
            activation_checkpoint_interval=int(checkpointing),  # as launch/train.py sets it
        )
        ds = {
            "train_micro_batch_size_per_gpu": MICRO,
            "gradient_accumulation_steps": micro_batches,
            "steps_per_print": 10**9,
            "zero_optimization": {"stage": 0},
        }
        engine, _, _ = build_engine(model, ds, lr=1e-3, weight_decay=0.0)
        measured = count_pipeline_forwards(engine)
        with sdpa_kernel(SDPBackend.MATH):
            engine.train_batch(data_iter=iter([batch(config, 20 + k) for k in range(micro_batches)]))
        predicted = predict(config, num_stages=2, stage=engine.stage_id)
        want = predicted.saved_checkpointed if checkpointing else predicted.saved
        case = (family, capacity_factor, checkpointing, engine.stage_id, predicted, measured)
        assert len(measured) == micro_batches and predicted.checkpointing, case
        for got in measured:  # at EP = 1 the trace is the step, to the byte
            assert got == want, case
        if checkpointing:  # a block keeps its input alone: far less than all it saves
            assert predicted.saved_checkpointed < predicted.saved / 2, case
        hidden = MICRO * SEQ * config.hidden_size * 4
        assert (predicted.received, predicted.sent) == ((0, hidden) if engine.stage_id == 0 else (hidden, 0)), case
        assert (predicted.logits > 0) == (engine.stage_id == 1), case


def test_pp2_gpt_matches_a_pipeline_engine_step_per_stage_and_micro_batch():
    run_distributed(_pp2_worker, 2, [("gpt", 1.0, False), ("gpt", None, True)], timeout=300)


@pytest.mark.slow
def test_pp2_every_family_with_and_without_checkpointing():
    cases = [
        (family, cf, checkpointing)
        for family in FAMILIES
        for cf in (1.0, None)
        for checkpointing in (False, True)
        if (family, cf, checkpointing) not in (("gpt", 1.0, False), ("gpt", None, True))
    ]
    run_distributed(_pp2_worker, 2, cases, timeout=600)


# ---------------------------------------------------------------------------------------- 600B class


def test_deepseek_v3_sized_stage_traces_in_seconds_without_memory(tmp_path):
    import resource

    from moe_parallel import hf
    from tests.published_configs import DEEPSEEK_V3, write_config

    config = hf.load_config(write_config(DEEPSEEK_V3, tmp_path / "dsv3"))  # dropless, as from_pretrained loads it
    assert config.moe.capacity_factor is None
    T, D, K = 4096, config.hidden_size, config.moe.top_k
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    middle = predict_activation_bytes(
        config, num_stages=16, stage=5, micro_batch=1, seq_len=T, ep=8, dtype=torch.bfloat16, attention="flash"
    )
    elapsed = time.perf_counter() - start
    rss_growth_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    assert elapsed < 20, f"a DeepSeek-V3 stage traced in {elapsed:.1f}s"
    assert rss_growth_kib < 1 << 20, f"the trace took {rss_growth_kib} KiB of memory: something was allocated"
    # Four MoE blocks; each keeps at least its experts' input, gate/up and down-projection input rows.
    F_ = config.moe.ffn_hidden_size
    assert middle.saved > 4 * T * K * (D + 2 * F_ + F_) * 2
    assert middle.moe_rows == T * K and middle.received == middle.sent == T * D * 2
    assert middle.saved_checkpointed < middle.saved / 10
