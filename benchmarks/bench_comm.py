"""Communication report: collectives, bytes sent and host syncs of one MoE training step at EP=2.

Three layers run one training step each (forward and backward of one layer, its input requiring
grad as inside a model) on two gloo processes, expert-parallel over both:

- ``deepspeed``: ``deepspeed.moe.layer.MoE`` with a Linear -> GELU -> Linear expert, ``ep_size=2``;
- ``compat``: ``moe_parallel.compat.MoE``, the drop-in, with the same constructor arguments;
- ``ours``: ``moe_parallel.MoELayer`` from an ``MoEConfig``.

All three get the same gate weights and the same input on each rank, so at softmax scoring they
route alike. Each point builds a fresh layer, runs one untimed step (first-step lazy initialisation
is not counted), then counts exactly one more step with ``moe_parallel.core.counters``:

- collectives: every ``torch.distributed`` collective called in the step (DeepSpeed's
  ``deepspeed.comm`` calls them too), by name, on rank 0; rank 1's count must agree;
- bytes sent: what rank 0 sends to the other rank in those collectives, and its ratio to what
  DeepSpeed's layer sends at the same top-k and capacity (DeepSpeed has neither sigmoid scoring nor
  a shared expert; neither changes its traffic);
- host syncs: every read of device data by the host (``_local_scalar_dense`` is ``.item()``,
  ``int()`` or ``bool()`` of a tensor), by op, on rank 0.

Our experts (``MoELayer``'s and the drop-in's) run one CPU path, ``--expert-gemm`` (default
``loop``, the path of a GPU without the grouped GEMM): under ``auto`` the cost model picks the loop or
the padded path per shape, and the table's host syncs would change with the shape's path.

The expert-bias update (``update_expert_biases``) runs once per optimizer step, not per layer step,
and is not counted. Peers that do not run here are listed from their source.

    .venv/bin/python benchmarks/bench_comm.py                         # default shapes, prints the table
    .venv/bin/python benchmarks/bench_comm.py --shapes 256x32x64x8 --write comm.md
    .venv/bin/python benchmarks/bench_moe.py --comm --shapes c2       # the same, through bench_moe
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import itertools
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.harness.configs import AUX_LOSS_COEFF  # noqa: E402
from benchmarks.harness.peers import Step, deepspeed_moe_args, gelu_expert  # noqa: E402
from benchmarks.harness.report import versions_line  # noqa: E402
from launch.env import free_port  # noqa: E402
from moe_parallel import MoEConfig, MoELayer  # noqa: E402
from moe_parallel.core.counters import count_collectives, count_host_syncs  # noqa: E402

EP_SIZE = 2
GATE_STD = 0.05  # gate weights ~ N(0, GATE_STD^2): logits of std ~1 at D=512, routing neither flat nor peaked
LAYERS = ("deepspeed", "compat", "ours")
LAYER_NAMES = {
    "deepspeed": "DeepSpeed `MoE`",
    "compat": "ours: `compat.MoE` (drop-in)",
    "ours": "ours: `MoELayer`",
}


@dataclass(frozen=True)
class Shape:
    """Global tokens (half on each rank), hidden size, expert FFN size, number of experts."""

    name: str
    tokens: int
    hidden: int
    ffn: int
    experts: int

    def label(self) -> str:
        return f"T={self.tokens} D={self.hidden} F={self.ffn} E={self.experts}"


# Layer shapes of bench_moe.py's configs and sweep (top-k is a routing option here).
SHAPES = {
    "c1": Shape("c1", 4096, 512, 2048, 8),
    "c2": Shape("c2", 4096, 512, 256, 64),
    "switch": Shape("switch", 8192, 512, 1024, 16),
}
DEFAULT_SHAPES = "c1,c2"


def parse_shape(text: str) -> Shape:
    """A name from :data:`SHAPES`, or ``TxDxFxE`` (for instance ``256x32x64x8``)."""
    if text in SHAPES:
        return SHAPES[text]
    try:
        tokens, hidden, ffn, experts = (int(v) for v in text.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r}: give one of {sorted(SHAPES)} or TxDxFxE") from None
    if tokens % EP_SIZE or experts % EP_SIZE or min(tokens, hidden, ffn, experts) < 1:
        raise argparse.ArgumentTypeError(f"shape {text!r}: T and E must be positive multiples of {EP_SIZE}")
    return Shape(text, tokens, hidden, ffn, experts)


@dataclass(frozen=True)
class Routing:
    top_k: int
    capacity_factor: float | None  # None: dropless
    score_func: str = "softmax"
    shared: bool = False  # ours only: a shared expert of the routed experts' FFN size

    def label(self) -> str:
        cf = "dropless" if self.capacity_factor is None else f"cf={self.capacity_factor}"
        return f"top-{self.top_k} {self.score_func} {cf}" + (" +shared" if self.shared else "")

    def deepspeed_twin(self) -> Routing:
        """The routing DeepSpeed's layer runs that matches this one's traffic."""
        return dataclasses.replace(self, score_func="softmax", shared=False)


def routings(layer: str, top_ks: tuple[int, ...], experts: int) -> list[Routing]:
    """Every routing ``layer`` supports: DeepSpeed's gates (and the drop-in's) score by softmax only."""
    scores = ("softmax", "sigmoid") if layer == "ours" else ("softmax",)
    shared = (False, True) if layer == "ours" else (False,)
    grid = itertools.product([k for k in top_ks if k <= experts], (1.25, None), scores, shared)
    return [Routing(*point) for point in grid]


# --------------------------------------------------------------------------- one rank


def build_step(
    layer: str, shape: Shape, routing: Routing, gate_ED: Tensor, x_TD: Tensor, grad_TD: Tensor, expert_gemm: str
) -> Step:
    """A fresh ``layer`` with gate weights ``gate_ED``; its step runs on a leaf copy of ``x_TD``."""
    x_TD = x_TD.clone().requires_grad_()
    cf = routing.capacity_factor
    if layer == "ours":
        config = MoEConfig(
            hidden_size=shape.hidden,
            ffn_hidden_size=shape.ffn,
            num_experts=shape.experts,
            top_k=routing.top_k,
            score_func=routing.score_func,  # type: ignore[arg-type]
            capacity_factor=cf,
            aux_loss_coeff=AUX_LOSS_COEFF,
            shared_expert_ffn_hidden_size=shape.ffn if routing.shared else 0,
        )
        moe = MoELayer(config, ep_group=dist.group.WORLD).train()
        with torch.no_grad():
            moe.router.weight.copy_(gate_ED)

        def run() -> None:
            moe(x_TD).backward(grad_TD)  # the aux loss reaches the gradient through the output

        step = Step(run, [x_TD, *moe.parameters()], [moe])
        step.pin_expert_path(expert_gemm)
        return step

    if layer == "deepspeed":
        from deepspeed.moe.layer import MoE
    else:
        from moe_parallel.integration.compat import MoE
    args = deepspeed_moe_args(shape.hidden, shape.experts, EP_SIZE, routing.top_k, cf)
    moe = MoE(expert=gelu_expert(shape.hidden, shape.ffn), **args).train()
    with contextlib.redirect_stdout(io.StringIO()):  # "No existing process group found, creating ..."
        moe.set_deepspeed_parallelism()
    with torch.no_grad():
        (moe.deepspeed_moe.gate.wg if layer == "deepspeed" else moe.router).weight.copy_(gate_ED)

    def run_ds() -> None:
        y_TD, l_aux, _ = moe(x_TD)
        torch.autograd.backward([y_TD, l_aux], [grad_TD, torch.full_like(l_aux, AUX_LOSS_COEFF)])

    step = Step(run_ds, [x_TD, *moe.parameters()], [moe] if layer == "compat" else [])
    step.pin_expert_path(expert_gemm)
    return step


def measure(step: Step) -> dict:
    """One warm-up step, then the collectives and host syncs of exactly one step."""
    step()
    with count_collectives() as collectives, count_host_syncs() as syncs:
        step()  # its gradients start from None, as the warm-up's did
    return {"calls": collectives.calls, "bytes": collectives.total_bytes_sent, "syncs": syncs.reads}


def _rank_main(
    rank: int, port: int, shapes: list[Shape], top_ks: tuple[int, ...], expert_gemm: str, out_dir: str
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(EP_SIZE))
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(EP_SIZE), DS_ACCELERATOR="cpu")
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)  # two processes share the cores
    import deepspeed

    from moe_parallel.integration.deepspeed import unlink_shm_allreduce_buffers

    dist.init_process_group("gloo", rank=rank, world_size=EP_SIZE, timeout=timedelta(seconds=120))
    with contextlib.redirect_stdout(io.StringIO()):
        deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    unlink_shm_allreduce_buffers()
    rows = []
    for shape in shapes:
        gen = torch.Generator().manual_seed(1000 + rank)  # each rank its own tokens
        x_TD = torch.randn(shape.tokens // EP_SIZE, shape.hidden, generator=gen)
        grad_TD = torch.randn(shape.tokens // EP_SIZE, shape.hidden, generator=gen)
        gate_ED = torch.randn(shape.experts, shape.hidden, generator=torch.Generator().manual_seed(7)) * GATE_STD
        for layer in LAYERS:
            for routing in routings(layer, top_ks, shape.experts):
                counts = measure(build_step(layer, shape, routing, gate_ED, x_TD, grad_TD, expert_gemm))
                rows.append({"shape": shape.name, "layer": layer, "routing": dataclasses.asdict(routing), **counts})
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no interpreter teardown: gloo's threads sometimes abort it


def run_ranks(
    shapes: list[Shape], top_ks: tuple[int, ...], expert_gemm: str, timeout_s: float
) -> tuple[list[dict], list[dict]]:
    """Every point on two spawned gloo ranks; returns rank 0's rows and rank 1's."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))  # as the Makefile
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(
            _rank_main,
            args=(free_port(), shapes, top_ks, expert_gemm, out_dir),
            nprocs=EP_SIZE,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout_s
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError(f"the communication report did not finish in {timeout_s:.0f} s")
        rank0, rank1 = (json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(EP_SIZE))
        return rank0, rank1


# --------------------------------------------------------------------------- report


def _by_name(names: list[str]) -> str:
    counts = Counter(names)
    return f"{len(names)}" + (" (" + ", ".join(f"{n} {c}" for n, c in sorted(counts.items())) + ")" if names else "")


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:.1f} KiB"


def check_ranks_agree(rank0: list[dict], rank1: list[dict]) -> None:
    """Both ranks ran the same points and called the same number of collectives in each."""
    for a, b in zip(rank0, rank1, strict=True):
        key = (a["shape"], a["layer"], Routing(**a["routing"]).label())
        if (b["shape"], b["layer"], Routing(**b["routing"]).label()) != key or len(a["calls"]) != len(b["calls"]):
            raise RuntimeError(f"rank 1 disagrees at {key}: {len(b['calls'])} collectives, rank 0 {len(a['calls'])}")


MEGATRON_SOURCE = "NVIDIA/Megatron-LM `megatron/core/transformer/moe/token_dispatcher.py`, `MoEAlltoAllTokenDispatcher`"


def peer_lines() -> list[str]:
    """Peers not run here, counted from their source: a note, then rows in the measured rows' columns.
    (Megatron-Core: ``preprocess``, ``token_dispatch``, ``token_combine``, ``_maybe_dtoh_and_synchronize``.)"""
    name = "Megatron-Core all-to-all dispatcher (from its source, not run here)"
    return [
        f"Peers, from their source (the dispatcher alone; Megatron-Core: {MEGATRON_SOURCE}, at EP=2, TP=1): "
        "forward all-gathers the per-expert counts and sends tokens, probs and the combine by all-to-all; "
        "backward repeats the three all-to-alls; the host waits once, on the DtoH copy of the split sizes.",
        "",
        "| layer | routing | collectives | host syncs | bytes sent | vs DeepSpeed |",
        "|---|---|---|---|---|---|",
        f"| {name} | dropless | 7 (all_gather_into_tensor 1, all_to_all_single 6) | 1 (event synchronize 1) | - | - |",
        f"| {name} | padded to capacity | 6 (all_to_all_single 6) | 0 | - | - |",
    ]


def markdown(shapes: list[Shape], rank0: list[dict], expert_gemm: str, argv: list[str]) -> str:
    ds_bytes = {(r["shape"], Routing(**r["routing"])): r["bytes"] for r in rank0 if r["layer"] == "deepspeed"}
    header = [
        "| layer | routing | collectives | host syncs | bytes sent | vs DeepSpeed |",
        "|---|---|---|---|---|---|",
    ]
    lines = [
        f"One training step of one layer (forward + backward) at EP={EP_SIZE} on {EP_SIZE} gloo ranks, counted on "
        "rank 0 after one warm-up step (rank 1 calls as many collectives). Bytes: what rank 0 sends to the other "
        "rank; `vs DeepSpeed`: over DeepSpeed's at the same top-k and capacity. `_local_scalar_dense` is "
        f"`.item()`/`int()`/`bool()` of a tensor. Our experts: `expert_gemm={expert_gemm!r}`. "
        f"{versions_line()}. "
        f"Command: `{command_line(argv)}`.",
    ]
    for shape in shapes:
        lines += ["", f"**{shape.name}: {shape.label()}** ({shape.tokens // EP_SIZE} tokens per rank)", "", *header]
        for r in (r for r in rank0 if r["shape"] == shape.name):
            routing = Routing(**r["routing"])
            ds = ds_bytes.get((shape.name, routing.deepspeed_twin()))
            ratio = f"{r['bytes'] / ds:.2f}" if ds else "-"
            lines.append(
                f"| {LAYER_NAMES[r['layer']]} | {routing.label()} | {_by_name(r['calls'])} "
                f"| {_by_name(r['syncs'])} | {_size(r['bytes'])} | {ratio} |"
            )
    lines += ["", *peer_lines()]
    return "\n".join(lines) + "\n"


def command_line(argv: list[str]) -> str:
    """The command that makes this table (where it was written to left out)."""
    shown = [a for i, a in enumerate(argv) if not a.startswith("--write") and argv[i - 1 : i] != ["--write"]]
    return " ".join([".venv/bin/python benchmarks/bench_comm.py", *shown])


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--shapes",
        default=DEFAULT_SHAPES,
        help=f"comma-separated names ({', '.join(SHAPES)}) or TxDxFxE (default: {DEFAULT_SHAPES})",
    )
    parser.add_argument("--top-k", default="1,2,4", help="comma-separated top-k values (default: 1,2,4)")
    parser.add_argument(
        "--expert-gemm",
        choices=("loop", "padded", "auto"),
        default="loop",
        help="our experts' CPU path (default loop; auto: the cost model's choice, moe_parallel/experts/choice.py)",
    )
    parser.add_argument("--write", type=Path, default=None, help="also write the markdown block to this file")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds before the ranks are killed")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> str:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        shapes = [parse_shape(s) for s in args.shapes.split(",")]
        top_ks = tuple(int(k) for k in args.top_k.split(","))
    except (argparse.ArgumentTypeError, ValueError) as err:
        raise SystemExit(f"bench_comm: {err}") from None
    rank0, rank1 = run_ranks(shapes, top_ks, args.expert_gemm, args.timeout)
    check_ranks_agree(rank0, rank1)
    block = markdown(shapes, rank0, args.expert_gemm, argv)
    print(block, end="")
    if args.write is not None:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(block)
        print(f"wrote {args.write}")
    return block


if __name__ == "__main__":
    main()
