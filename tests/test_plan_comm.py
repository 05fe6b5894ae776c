"""Predicted communication per step (moe_parallel.planning.comm) against what real engine steps send.

Every collective of one training step (the second: the first sends the pipeline's tensor metadata)
is recorded on each rank with its group and payload, on gloo, for the reference GPT (combine
weights on the inputs) and Mixtral- and DeepSeek-V3-like decoders (a shared expert beside the
all-to-all, dense first layers) at (PP, EP, world) = (1, 1, 2), (1, 2, 2), (2, 1, 2), (2, 2, 4), the
ZeRO stages DeepSpeed runs there, in fp32 and bf16 (whose pipeline engine partitions and all-gathers
the parameters at ZeRO 0 too). Checked: the token all-to-alls' bytes (own chunk included, and the
part that leaves the rank as ``count_collectives`` counts it) equal the capacity bound when every
expert fills (the counts exchange shows that it does), stay under it with a large factor, and
dropless send exactly the rank's own rows and keep what a rank receives within the bound (summed
over the EP group, exactly the balanced expectation); the counts exchange and the number of
all-to-alls; the gradient all-reduces over DP and expert-DP and the ZeRO all-gathers, byte for byte;
the pipeline's point-to-point bytes.
"""

from __future__ import annotations

import contextlib
import inspect
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from moe_parallel.core.capacity import expert_capacity
from moe_parallel.core.counters import count_collectives
from moe_parallel.models.gpt import GPTConfig
from moe_parallel.planning.comm import predict_comm
from tests.dist_utils import run_distributed

MICRO, SEQ, ACCUM = 2, 16, 2
RECORDED = ("all_to_all_single", "all_reduce", "all_gather_into_tensor", "send", "isend")


def gpt_config(capacity_factor: float | None) -> GPTConfig:
    return GPTConfig(
        vocab_size=64,
        seq_len=SEQ,
        num_layers=4,
        hidden_size=32,
        num_heads=2,
        ffn_hidden_size=48,
        moe_every=2,
        tie_embeddings=True,
        moe=dict(num_experts=4, top_k=2, capacity_factor=capacity_factor, min_capacity=1, input_weighted=True),
    )


def hf_config(family: str, capacity_factor: float | None):
    """A tiny HF family's DecoderConfig (``mixtral``, ``deepseek_v3``: shared experts, dense first layers)."""
    from moe_parallel import hf
    from tests.hf_models import random_hf_config

    config = random_hf_config(family, 3, min_layers=2, even_experts=True)
    config.tie_word_embeddings = False  # the GPT's embedding and head are the tied pair
    with tempfile.TemporaryDirectory() as tmp:
        config.save_pretrained(tmp)
        overrides = {"min_capacity": 1}
        if capacity_factor is not None and capacity_factor < 1 and family == "deepseek_v3":
            # Group-limited routing at initialization can leave a whole group of experts without a
            # token on a rank; the exact case needs every expert to fill.
            overrides.update(num_groups=1, topk_groups=1)
        return hf.load_config(Path(tmp), capacity_factor=capacity_factor, moe_overrides=overrides)


@dataclass
class Step:
    """One rank's collectives in one step, sorted into what the prediction covers."""

    token_sent: int = 0  # token all-to-alls: rows handed in, own chunk included (bytes)
    token_dispatch: int = 0  # their forward dispatches (the rank's own rows)
    token_received: int = 0
    token_calls: int = 0
    counts_sent: int = 0
    counts_calls: int = 0
    counts: list[torch.Tensor] = field(default_factory=list)  # what the counts exchanges sent
    dp_grad: int = 0
    expert_grad: int = 0
    dp_gather: int = 0
    expert_gather: int = 0
    tied: int = 0
    p2p: int = 0


@contextlib.contextmanager
def record_step(pipe_ranks: set[int]):
    """Record every collective of the block into a :class:`Step`, DeepSpeed's captured all-gather too.

    ``pipe_ranks``: this rank's pipeline peers, the group over which tied weights are reduced.
    """
    import deepspeed.comm.comm as ds_comm

    step = Step()
    originals = {name: getattr(dist, name) for name in RECORDED}
    gather_fn = ds_comm.cdb.all_gather_function
    forward_dispatch = [True]  # forward token all-to-alls alternate: dispatch, then combine

    def record(name, fn):
        signature = inspect.signature(fn)

        def call(*args, **kwargs):
            bound = signature.bind(*args, **kwargs).arguments
            group = bound.get("group")
            size = dist.get_world_size(group) if group is not None else dist.get_world_size()
            ranks = set(dist.get_process_group_ranks(group)) if group is not None else set(range(size))
            desc = getattr(group, "group_desc", "") if group is not None else ""
            tensor = bound.get("tensor", bound.get("input", bound.get("input_tensor")))
            nbytes = tensor.numel() * tensor.element_size()
            if name == "all_to_all_single" and bound.get("input_split_sizes") is not None:
                row = nbytes // max(tensor.shape[0], 1)
                step.token_sent += nbytes
                step.token_received += sum(bound["output_split_sizes"]) * row
                step.token_calls += 1
                if torch._C._current_graph_task_id() == -1:  # not inside a backward pass
                    if forward_dispatch[0]:
                        step.token_dispatch += nbytes
                    forward_dispatch[0] = not forward_dispatch[0]
            elif name == "all_to_all_single":
                step.counts_sent += nbytes
                step.counts_calls += 1
                step.counts.append(tensor.clone())
            elif name == "all_reduce" and size > 1 and tensor.numel() > 1 and tensor.is_floating_point():
                if ranks == pipe_ranks:
                    step.tied += nbytes
                elif desc == "moe_expert_dp":
                    step.expert_grad += nbytes
                else:
                    step.dp_grad += nbytes
            elif name == "all_gather_into_tensor" and size > 1:
                if desc == "moe_expert_dp":
                    step.expert_gather += nbytes
                else:
                    step.dp_gather += nbytes
            elif name in ("send", "isend") and tensor.numel() > 1:  # scalars: the loss
                step.p2p += nbytes
            return fn(*args, **kwargs)

        return call

    for name, fn in originals.items():
        setattr(dist, name, record(name, fn))
    ds_comm.cdb.all_gather_function = record("all_gather_into_tensor", gather_fn)
    try:
        yield step
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
        ds_comm.cdb.all_gather_function = gather_fn


def build(family: str, capacity_factor, pp: int, ep: int, zero: int, dtype: torch.dtype, ds_extra: dict):
    from moe_parallel.integration.engine import build_engine
    from moe_parallel.integration.parallel import initialize_parallel
    from moe_parallel.integration.pipeline import decoder_pipeline, gpt_pipeline
    from moe_parallel.models import GPT
    from moe_parallel.models.decoder import Decoder

    config = gpt_config(capacity_factor) if family == "gpt" else hf_config(family, capacity_factor)
    state = initialize_parallel(pipeline_parallel_size=pp, expert_parallel_size=ep, num_experts=config.moe.num_experts)
    if pp == 1:
        model = (GPT if family == "gpt" else Decoder)(config, ep_group=state.ep_group)
    else:
        builder = gpt_pipeline if family == "gpt" else decoder_pipeline
        model = builder(config, ep_group=state.ep_group, topology=state.deepspeed_topology())
    ds = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": ACCUM,
        "steps_per_print": 10**9,
        "zero_optimization": {"stage": zero},
        "bf16": {"enabled": dtype == torch.bfloat16},
        **ds_extra,
    }
    engine, _, _ = build_engine(model, ds, lr=1e-3, weight_decay=0.1)
    return config, state, engine


def train_step(engine, config, pp: int, seed: int) -> None:
    from moe_parallel.models import lm_loss

    gen = torch.Generator().manual_seed(seed + 7 * dist.get_rank())
    batches = [
        (
            torch.randint(0, config.vocab_size, (MICRO, SEQ), generator=gen),
            torch.randint(0, config.vocab_size, (MICRO, SEQ), generator=gen),
        )
        for _ in range(ACCUM)
    ]
    if pp > 1:
        engine.train_batch(data_iter=iter(batches))
        return
    for tokens, targets in batches:
        engine.backward(lm_loss(engine(tokens), targets))
        engine.step()


def _check_cases(rank: int, world: int, cases: list[tuple]) -> None:
    for family, pp, ep, zero, capacity_factor, dtype, *comm_dtype in cases:
        ds_extra = {"communication_data_type": comm_dtype[0]} if comm_dtype else {}
        what = (
            f"{family} pp={pp} ep={ep} world={world} zero={zero} capacity_factor={capacity_factor} {dtype} {ds_extra}"
        )
        config, state, engine = build(family, capacity_factor, pp, ep, zero, dtype, ds_extra)
        train_step(engine, config, pp, seed=0)
        with record_step(set(dist.get_process_group_ranks(state.pp_group))) as got, count_collectives() as counted:
            train_step(engine, config, pp, seed=1)
        dp = world // pp
        want = predict_comm(
            config,
            num_stages=pp,
            stage=state.stage_id,
            ep=ep,
            dp=dp,
            zero_stage=zero,
            micro_batch=MICRO,
            seq_len=SEQ,
            grad_accum=ACCUM,
            dtype=dtype,
            ds_config=ds_extra,
        )
        assert got.token_calls + got.counts_calls == want.alltoall_calls, what
        assert got.counts_sent == want.counts_exchange_bytes, what
        assert got.token_sent <= want.alltoall_bound and got.token_received <= want.alltoall_bound, what
        assert got.token_sent == got.token_received, what  # a rank receives what it sends
        remote = sum(b for c, b in zip(counted.calls, counted.bytes_sent) if c == "all_to_all_single")
        moe = [layer.config for layer in _moe_configs(engine)]
        if capacity_factor is None:
            assert got.token_dispatch * 2 == want.alltoall_dispatch_bytes, what
            group_sent = torch.tensor([got.token_sent])
            dist.all_reduce(group_sent, group=state.ep_group)
            assert group_sent.item() == ep * want.alltoall_bytes, what  # balanced in sum: exact
        elif capacity_factor < 1:
            capacity = {
                expert_capacity(MICRO * SEQ, m.top_k, m.num_experts, capacity_factor, m.min_capacity) for m in moe
            }
            assert len(capacity) <= 1, what
            filled = all(bool((sent[:, :-1] == c).all()) for sent in got.counts for c in capacity)
            everywhere = torch.tensor([int(filled)])  # what a rank receives depends on the others
            dist.all_reduce(everywhere, op=dist.ReduceOp.MIN, group=state.ep_group)
            assert everywhere.item() and want.alltoall_exact, f"{what}: an expert did not fill its capacity"
            assert got.token_sent == want.alltoall_bytes, what
            assert got.token_dispatch * 2 == want.alltoall_dispatch_bytes, (what, got, want)
            assert remote == want.alltoall_remote_bytes + want.counts_exchange_bytes * want.alltoall_remote_share
        else:
            assert got.token_sent <= want.alltoall_bytes, what
        assert (got.dp_grad, got.expert_grad) == (want.dp_grad_bytes, want.expert_dp_grad_bytes), what
        assert (got.dp_gather, got.expert_gather) == (want.dp_param_gather_bytes, want.expert_dp_param_gather_bytes), (
            what
        )
        assert got.tied == want.tied_grad_bytes, what
        assert got.p2p == want.p2p_bytes, what
        engine.destroy()
        # A pipeline engine leaves its grid as DeepSpeed's global mpu, which a plain engine built
        # next in this process would take for model parallelism.
        from deepspeed.utils import groups

        groups.mpu = None


def _moe_configs(engine):
    from moe_parallel.core.layer import moe_layers

    return moe_layers(engine.module)


def test_bubble_and_alltoall_arithmetic():
    config = gpt_config(0.5)
    one = predict_comm(config, num_stages=1, stage=0, ep=1, dp=2, zero_stage=0, micro_batch=MICRO, seq_len=SEQ,
                       grad_accum=ACCUM, dtype=torch.float32)  # fmt: skip
    assert (one.alltoall_bytes, one.alltoall_calls, one.p2p_bytes, one.bubble_fraction) == (0, 0, 0, 0.0)
    # stage 1 of 2 at EP=2, ZeRO-1, 6 micro-batches in bf16, with and without a capacity
    stage1 = dict(num_stages=2, stage=1, ep=2, dp=2, zero_stage=1, micro_batch=MICRO, seq_len=SEQ, grad_accum=6)
    piped = predict_comm(config, **stage1, dtype=torch.bfloat16)
    assert piped.bubble_fraction == 1 / 7
    capacity = expert_capacity(MICRO * SEQ, 2, 4, 0.5, 1)
    # stage 1 of 2 holds block 3, the second MoE block: one layer, 6 micro-batches, 2-byte rows
    assert piped.alltoall_bytes == 6 * 4 * 4 * capacity * 32 * 2
    assert piped.alltoall_calls == 6 * 5 and piped.alltoall_remote_share == 0.5
    dropless = predict_comm(gpt_config(None), **stage1, dtype=torch.bfloat16)
    assert dropless.alltoall_dispatch_bytes == 6 * 2 * MICRO * SEQ * 2 * 32 * 2
    assert dropless.alltoall_bound == 6 * (2 + 2 * 2) * MICRO * SEQ * 2 * 32 * 2
    assert piped.p2p_bytes == 6 * MICRO * SEQ * 32 * 2  # the last stage sends gradients back only
    assert piped.tied_grad_bytes == 64 * 32 * 2  # the head's tied embedding, reduced once per step
    assert one.tied_grad_bytes == 0  # one stage: the pair is one parameter


# A factor under which every expert fills on every rank (checked), one that never binds, dropless.
FILLED = {"gpt": 0.25, "mixtral": 0.25, "deepseek_v3": 0.125}
FAMILIES = tuple(FILLED)
F32, BF16 = torch.float32, torch.bfloat16


def test_settings_whose_bytes_are_not_predicted_are_refused():
    kwargs = dict(num_stages=1, stage=0, ep=1, dp=2, micro_batch=MICRO, seq_len=SEQ, grad_accum=ACCUM)
    with pytest.raises(ValueError, match="parameter_alignment"):
        predict_comm(gpt_config(None), zero_stage=1, dtype=torch.float32, **kwargs,
                     ds_config={"zero_optimization": {"parameter_alignment": True}})  # fmt: skip
    with pytest.raises(ValueError, match="zero_stage=3"):
        predict_comm(gpt_config(None), zero_stage=3, dtype=torch.float32, **kwargs)
    with pytest.raises(ValueError, match="ZeRO 0 or 1"):
        predict_comm(gpt_config(None), **{**kwargs, "num_stages": 2}, zero_stage=2, dtype=torch.float32)


WORLD2 = [
    ("gpt", 1, 1, 0, 0.25, F32), ("gpt", 1, 2, 1, 0.25, F32), ("gpt", 1, 2, 2, None, F32),
    ("gpt", 2, 1, 1, 0.25, F32), ("gpt", 2, 1, 0, 2.0, BF16), ("gpt", 1, 2, 1, None, BF16),
    ("mixtral", 1, 2, 0, None, F32), ("mixtral", 2, 1, 0, 0.25, F32), ("deepseek_v3", 1, 2, 1, 0.125, F32),
    ("gpt", 1, 1, 2, 0.25, BF16, "fp32"),  # gradients travel in fp32, parameters in bf16
]  # fmt: skip
WORLD2_SLOW = [
    (family, pp, ep, zero, factor, dtype)
    for family in FAMILIES
    for pp, ep in ((1, 1), (1, 2), (2, 1))
    for zero in ((0, 1, 2) if pp == 1 else (0, 1))
    for factor in (FILLED[family], 2.0, None)
    for dtype in ((F32, BF16) if factor != 2.0 else (F32,))  # bf16 steps take 4x as long on a CPU
]
WORLD4 = [
    (family, 2, 2, zero, factor, dtype)
    for family in FAMILIES
    for zero in (0, 1)
    for factor in (FILLED[family], 2.0, None)
    for dtype in (F32, BF16)
] + [("gpt", 2, 2, 1, None, BF16, "fp32"), ("mixtral", 2, 2, 0, 0.25, BF16, "fp32")]


def test_predicted_bytes_equal_an_engine_step_world2():
    run_distributed(_check_cases, 2, WORLD2, timeout=300)


@pytest.mark.slow
def test_predicted_bytes_equal_an_engine_step_world2_all_cases():
    run_distributed(_check_cases, 2, WORLD2_SLOW, timeout=900)


@pytest.mark.slow
def test_predicted_bytes_equal_an_engine_step_world4():
    run_distributed(_check_cases, 4, WORLD4, timeout=900)
