"""Model-state bytes per rank (moe_parallel.planning.states): the prediction from the meta-device stage
equals what a real DeepSpeed engine on gloo holds, exactly, on every rank, per component (parameters,
gradients, fp32 masters, AdamW states, bucket buffers), expert and non-expert apart.

Models: the reference GPT (MoE in every or every other block, odd sizes so that DeepSpeed's alignment
padding and uneven partitions matter), and tiny Mixtral-like and DeepSeek-V3-like decoders (MLA, shared
experts, first dense layers) from tests/hf_models.py. Layouts (PP, world, EP): (1, 2, 1), (1, 2, 2),
(2, 2, 1), (2, 4, 2); ZeRO 0/1/2 at PP = 1 and 0/1 in pipelines (DeepSpeed refuses ZeRO-2 there), fp32
and bf16 (see ``cases`` for pipelines with a stage holding no MoE layer). One launch per layout loops
over its cases inside the workers.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from moe_parallel.integration.engine import build_engine
from moe_parallel.integration.parallel import initialize_parallel
from moe_parallel.integration.pipeline import gpt_pipeline
from moe_parallel.models.gpt import GPT, GPTConfig, lm_loss
from moe_parallel.planning.model import build_stage, is_expert_param
from moe_parallel.planning.states import Components, StateBytes, measure_state_bytes, predict_state_bytes
from tests.dist_utils import run_distributed

NUM_EXPERTS = 4
MICRO, SEQ = 2, 6
BUCKETS = {"reduce_bucket_size": 1000, "allgather_bucket_size": 2000}  # small enough that big grads skip them


def gpt_config(moe_every: int) -> GPTConfig:
    # hidden 10, vocab 17: group sizes that are not multiples of 2 * dp
    return GPTConfig(
        vocab_size=17, seq_len=8, num_layers=2, hidden_size=10, num_heads=2, ffn_hidden_size=14,
        moe_every=moe_every, moe=dict(num_experts=NUM_EXPERTS, top_k=2, ffn_hidden_size=6),
    )  # fmt: skip


def hf_config(family: str):
    from moe_parallel import hf
    from tests.hf_models import random_hf_config, save_hf_model

    for seed in range(50):
        config = random_hf_config(family, seed, min_layers=2, even_experts=True)
        experts = getattr(config, "n_routed_experts", None) or getattr(config, "num_local_experts", None)
        if experts % 2 == 0:
            break
    with tempfile.TemporaryDirectory() as tmp:
        save_hf_model(config, 0, Path(tmp))
        return hf.load_config(tmp)


def build_model(config, pp: int, state):
    from moe_parallel.integration.pipeline import decoder_pipeline
    from moe_parallel.models.decoder import Decoder, DecoderConfig

    if isinstance(config, DecoderConfig):
        if pp == 1:
            return Decoder(config, ep_group=state.ep_group)
        return decoder_pipeline(config, ep_group=state.ep_group, topology=state.deepspeed_topology())
    if pp == 1:
        return GPT(config, ep_group=state.ep_group)
    return gpt_pipeline(config, ep_group=state.ep_group, topology=state.deepspeed_topology())


def one_step(engine, config, pp: int):
    gen = torch.Generator().manual_seed(0)
    seq = torch.randint(0, config.vocab_size, (MICRO, SEQ + 1), generator=gen)
    tokens, targets = seq[:, :-1], seq[:, 1:]
    if pp > 1:
        return lambda: engine.train_batch(data_iter=iter([(tokens, targets)]))

    def step():
        engine.backward(lm_loss(engine(tokens), targets))
        engine.step()

    return step


def _check_cases(rank: int, world: int, pp: int, ep: int, cases: list[tuple]) -> None:
    state = initialize_parallel(pipeline_parallel_size=pp, expert_parallel_size=ep, num_experts=NUM_EXPERTS)
    dp = world // pp
    for name, config, zero, precision in cases:
        torch.manual_seed(0)
        model = build_model(config, pp, state)
        ds = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
              "zero_optimization": {"stage": zero, **BUCKETS}, "bf16": {"enabled": precision == "bf16"}}  # fmt: skip
        engine, _, _ = build_engine(model, ds, lr=1e-3, weight_decay=0.1)
        measured = measure_state_bytes(engine, one_step(engine, config, pp))
        stage = build_stage(config, pp, state.stage_id, ep)
        predicted = predict_state_bytes(
            stage, dp=dp, ep=ep, zero_stage=zero, precision=precision, ds_config=ds, dp_rank=state.dp_rank
        )
        where = (name, f"pp={pp} world={world} ep={ep} zero={zero} {precision}")
        mine = None if measured.as_dict() == predicted.as_dict() else (rank, measured.as_dict(), predicted.as_dict())
        every: list = [None] * world
        dist.all_gather_object(every, mine)  # every rank fails together: none waits at a barrier for a dead one
        assert every == [None] * world, (where, [m for m in every if m])
        assert measured.params > 0 and measured.optimizer > 0 and measured.grads > 0, where
        del engine, model
        dist.barrier()


def experts_on_every_stage(config, pp: int) -> bool:
    return all(any(is_expert_param(p) for p in build_stage(config, pp, s).module.parameters()) for s in range(pp))


def cases(models: dict, pp: int, precisions=("fp32", "bf16")) -> list[tuple]:
    """Every ZeRO stage and precision DeepSpeed trains at this PP. A pipeline with a stage holding no
    MoE layer trains in fp32 at ZeRO 0 only: ZeRO 1/2 (refused by build_engine) and ZeRO 0 bf16
    (DeepSpeed's BF16_Optimizer) make one gradient-norm collective per optimizer group, and the stages'
    groups differ, so the step would hang."""
    out = []
    for name, cfg in models.items():
        everywhere = pp == 1 or experts_on_every_stage(cfg, pp)
        for zero in (0, 1, 2) if pp == 1 else (0, 1):
            for precision in precisions:
                if everywhere or (zero == 0 and precision == "fp32"):
                    out.append((name, cfg, zero, precision))
    return out


def all_models() -> dict:
    return {
        "gpt-moe1": gpt_config(1),
        "gpt-moe2": gpt_config(2),
        "mixtral": hf_config("mixtral"),
        "deepseek_v3": hf_config("deepseek_v3"),
    }


def test_state_bytes_sum_and_split():
    a = StateBytes(Components(1, 2, 3, 4, 5), Components(10, 20, 30, 40, 50))
    b = a + a
    assert b.expert == Components(2, 4, 6, 8, 10) and b.params == 22 and b.total == 2 * a.total == 330


def test_predicted_equals_measured_gpt_pp1_ep2():
    run_distributed(_check_cases, 2, 1, 2, cases({"gpt-moe2": gpt_config(2)}, 1), timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("pp,world,ep", [(1, 2, 1), (1, 2, 2), (2, 2, 1), (2, 4, 2)])
def test_predicted_equals_measured_every_layout(pp, world, ep):
    run_distributed(_check_cases, world, pp, ep, cases(all_models(), pp), timeout=900)
