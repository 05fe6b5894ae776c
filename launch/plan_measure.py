"""``python launch/plan.py ... --measure``: the plan of the configured layout against one real step.

The configured model and layout run one training step on this machine's CPUs (``--gpus``
processes joined by gloo on 127.0.0.1), built exactly as ``launch/train.py`` builds them, with
random tokens. Each rank reports what it held and moved; the planner's prediction for the same
layout (fp32 unless ``deepspeed.precision`` says bf16, SDPA's math path as CPUs run it) is printed
beside it. Meant for a user's own small config: it proves the plan before the big run is planned.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import DictConfig, OmegaConf

from launch import config as app_config
from launch.env import free_port

ACTIVATION_TOLERANCE = 0.10  # balanced routing is the prediction; a real step's routing is not balanced


def _worker(rank: int, world: int, port: int, cfg_dict: dict, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
    )  # fmt: skip
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    try:
        report = _measure_rank(OmegaConf.create(cfg_dict))
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(report))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # as launch/train.py leaves: no teardown races with gloo's threads


def _measure_rank(cfg: DictConfig) -> dict[str, Any]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from launch import build
    from moe_parallel.core.counters import count_collectives
    from moe_parallel.integration.parallel import initialize_parallel
    from moe_parallel.models import lm_loss
    from moe_parallel.planning.activations import count_pipeline_forwards, saved_tensor_bytes
    from moe_parallel.planning.states import measure_state_bytes

    model_cfg = app_config.model_config(cfg, cfg.data.vocab_size)
    num_experts = model_cfg.moe.num_experts if model_cfg.moe else None
    state = initialize_parallel(cfg.parallel.pp, cfg.parallel.ep, num_experts)
    torch.manual_seed(cfg.train.seed)
    model, model_cfg = build.build_model(cfg, state, model_cfg.vocab_size, eager=True)
    engine = build.build_engine(cfg, model)
    gen = torch.Generator().manual_seed(1000 + state.dp_rank)
    mb, seq, accum = cfg.train.micro_batch_size, cfg.data.seq_len, cfg.train.grad_accum
    batches = []
    for _ in range(accum):
        tokens = torch.randint(0, model_cfg.vocab_size, (mb, seq + 1), generator=gen)
        batches.append((tokens[:, :-1], tokens[:, 1:]))
    saved: list[int] = []
    pipelined = cfg.parallel.pp > 1
    if pipelined:
        saved = count_pipeline_forwards(engine)

    def step() -> None:
        if pipelined:
            engine.train_batch(data_iter=iter(batches))
            return
        for tokens_BS, targets_BS in batches:
            with saved_tensor_bytes(engine.module) as counter:
                logits = engine(tokens_BS)
                mtp = getattr(engine.module, "training_loss", None)
                loss = mtp(logits, targets_BS)[0] if mtp is not None else lm_loss(logits, targets_BS)
            saved.append(counter.bytes)
            engine.backward(loss)
            engine.step()

    with sdpa_kernel(SDPBackend.MATH), count_collectives() as log:
        states = measure_state_bytes(engine, step)
    alltoall = sum(n for name, n in zip(log.calls, log.bytes_sent) if name.startswith("all_to_all"))
    return {
        "stage": state.stage_id,
        "dp_rank": state.dp_rank,
        "states": states.combined.as_dict(),
        "saved_per_micro_batch": saved,
        "alltoall_to_others": alltoall,
    }


def measure(cfg: DictConfig, overrides: list[str], args) -> int:
    """Run the step on ``--gpus`` CPU processes and print prediction against measurement; 0 when
    model states match exactly, activations within 10% and the all-to-all within its bound."""
    from launch.plan import layout_of, model_of, workload_of
    from moe_parallel.planning.plan import Planner

    world = args.gpus or cfg.parallel.pp * cfg.parallel.ep
    app_config.validate(cfg, world)
    precision = app_config.resolve_precision(cfg.deepspeed.precision)
    layout = layout_of(cfg, world)
    planner = Planner(model_of(cfg))
    workload = workload_of(cfg, precision=precision, attention="math")
    plan = planner.plan(layout, workload)
    with tempfile.TemporaryDirectory() as out:
        ctx = mp.start_processes(
            _worker,
            args=(world, free_port(), OmegaConf.to_container(cfg, resolve=True), out),
            nprocs=world,
            join=False,
            start_method="spawn",
        )
        while not ctx.join():
            pass
        reports = [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(world)]
    for rep in reports:  # the plan shows the busiest rank of a stage; each rank is compared with its own
        rep["predicted_states"] = planner.states(layout, workload, rep["stage"], rep["dp_rank"]).combined.as_dict()
    return compare(plan, reports)


def compare(plan, reports: list[dict[str, Any]]) -> int:
    """Print per rank: each model-state component, the saved bytes per micro-batch and the
    all-to-all bytes, predicted and measured; 0 when all hold."""
    ok = True
    names = {"params": "parameters", "grads": "gradients", "master": "master weights", "optimizer": "optimizer states",
             "buffers": "comm buffers"}  # fmt: skip
    # each rank's own model-state prediction (``predicted_states``), else its stage's busiest rank
    print(f"{'rank':>4} {'stage':>5}  {'what':<26}{'predicted':>16}{'measured':>16}  ")
    for rank, rep in enumerate(reports):
        st = plan.stages[rep["stage"]]
        for key, label in names.items():
            got = rep["states"][key]
            want = rep["predicted_states"][key] if "predicted_states" in rep else st.memory[label]
            ok &= got == want
            print(
                f"{rank:>4} {rep['stage']:>5}  {label:<26}{want:>16,}{got:>16,}  {'ok' if got == want else 'DIFFERS'}"
            )
        acts = st.activations
        checkpointed = plan.layout.activation_checkpointing and plan.layout.pp > 1
        want_saved = acts.saved_checkpointed if checkpointed else acts.saved
        capacity = plan.config.moe is not None and plan.config.moe.capacity_factor is not None
        for mb, got in enumerate(rep["saved_per_micro_batch"]):
            err = abs(got - want_saved) / max(got, 1)
            # With a capacity factor, imbalanced routing drops rows a balanced step keeps: the
            # prediction bounds the step from above; dropless it is the expectation.
            ok &= got <= want_saved * (1 + ACTIVATION_TOLERANCE) if capacity else err <= ACTIVATION_TOLERANCE
            print(
                f"{rank:>4} {rep['stage']:>5}  {f'saved, micro-batch {mb}':<26}{want_saved:>16,}{got:>16,}  {err:.1%}"
            )
        bound = st.comm.alltoall_bound * st.comm.alltoall_remote_share
        expect = st.comm.alltoall_remote_bytes
        got = rep["alltoall_to_others"]
        ok &= got <= bound
        print(
            f"{rank:>4} {rep['stage']:>5}  {'all-to-all to others':<26}{expect:>16,.0f}{got:>16,}  bound {bound:,.0f}"
        )
    print("prediction holds" if ok else "prediction DIFFERS from the step")
    return 0 if ok else 4
