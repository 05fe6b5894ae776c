"""The loop every process of one side of ``bench_models.py`` runs (ours or DeepSpeed AutoEP).

It runs in both virtual environments, so it imports only the standard library and torch. A side
script builds its DeepSpeed engine and hands it here with a loss function; :func:`serve` then

1. trains the first ``prelude`` steps (global steps 0, 1, ...: the first-step loss, compilation,
   warm-up) and writes ``ready_rank<r>.json``;
2. waits for the driver's commands, files ``cmd_<n>.json`` in the group directory that every rank
   polls (no collective is left waiting while the other side runs), and answers each in
   ``res_<n>_rank<r>.json``:

   - ``round``: ``warmup`` steps, then ``steps`` timed steps (wall time per optimizer step:
     forward, loss, backward, ``engine.step()``);
   - ``profile``: ``steps`` steps under ``torch.profiler``, their time split by category (see
     :func:`breakdown`);
   - ``exit``.

Step ``i`` of rank ``r`` trains on ``batches[i % N, r]`` (tokens ``[B, S + 1]``: inputs are the
first ``S``, targets the last ``S``), the same on both sides.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

POLL_S = 0.02
# Collectives by op name: the c10d ops, and autograd Functions around an all-to-all (their self time is
# the wait for the other ranks).
COMM_A2A = re.compile(r"all_?to_?all", re.IGNORECASE)
COMM_OTHER = re.compile(r"^(c10d::|gloo:|nccl)|all_?reduce|reduce_?scatter|all_?gather", re.IGNORECASE)
EVALUATE = "autograd::engine::evaluate_function"
# Categories of the breakdown, in the order the driver prints them.
CATEGORIES = (
    "attention",
    "router",
    "dispatch/combine",
    "all-to-all",
    "experts",
    "other layers",
    "backward other",
    "optimizer",
    "grad collectives",
    "unattributed",
)
TOP_OPS = 6  # the costliest ops of each category, in the results JSON
PHASES = {"forward": "other layers", "backward": "backward other", "optimizer": "optimizer"}


def load_spec(path: str) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload))
    tmp.rename(path)


class Trainer:
    """One rank's training steps on the shared batches."""

    def __init__(self, engine: Any, loss_fn: Callable[[Tensor, Tensor], Tensor], batches: Tensor) -> None:
        self.engine, self.loss_fn, self.batches = engine, loss_fn, batches
        self.rank = dist.get_rank()
        self.step_index = 0

    def step(self, phases: bool = False) -> tuple[float, float]:
        """One optimizer step; returns (loss, seconds). ``phases`` names its parts for the profiler."""
        tokens = self.batches[self.step_index % self.batches.shape[0], self.rank]
        self.step_index += 1
        start = time.perf_counter()
        with _scope("bench::forward", phases):
            loss = self.loss_fn(tokens[:, :-1], tokens[:, 1:])
        with _scope("bench::backward", phases):
            self.engine.backward(loss)
        with _scope("bench::optimizer", phases):
            self.engine.step()
        value = float(loss.detach())
        return value, time.perf_counter() - start

    def run(self, count: int) -> tuple[list[float], list[float]]:
        losses, seconds = [], []
        for _ in range(count):
            loss, dt = self.step()
            losses.append(loss)
            seconds.append(dt)
        return losses, seconds


def _scope(name: str, enabled: bool):
    import contextlib

    return torch.profiler.record_function(name) if enabled else contextlib.nullcontext()


def serve(
    engine: Any,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    spec: dict[str, Any],
    group_dir: Path,
    scopes: dict[str, str],
    started: float,
) -> None:
    """Prelude, then answer the driver's commands until ``exit`` (see the module docstring)."""
    batches = torch.load(spec["batches"], weights_only=True)
    trainer = Trainer(engine, loss_fn, batches)
    rank = trainer.rank
    losses, seconds = trainer.run(spec["prelude"])
    write_json(
        group_dir / f"ready_rank{rank}.json",
        {"losses": losses, "seconds": seconds, "startup_s": time.perf_counter() - started - sum(seconds)},
    )
    n = 0
    while True:
        command = _wait_command(group_dir / f"cmd_{n}.json")
        if command["op"] == "exit":
            break
        if command["op"] == "round":
            trainer.run(command["warmup"])
            losses, seconds = trainer.run(command["steps"])
            result: dict[str, Any] = {"losses": losses, "seconds": seconds, "step": trainer.step_index}
        elif command["op"] == "profile":
            trainer.run(command["warmup"])
            result = profile(trainer, engine.module, scopes, command["steps"])
        else:
            raise ValueError(f"unknown command {command!r}")
        write_json(group_dir / f"res_{n}_rank{rank}.json", result)
        n += 1


def _wait_command(path: Path) -> dict[str, Any]:
    while not path.exists():
        time.sleep(POLL_S)
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------- profile


def _hook_scopes(model: nn.Module, scopes: dict[str, str]) -> list:
    """Forward hooks that open ``bench::<category>`` around every module whose name matches a pattern."""
    handles = []
    for name, module in model.named_modules():
        category = next((cat for pattern, cat in scopes.items() if re.search(pattern, name)), None)
        if category is None:
            continue
        stack: list = []

        def pre(_module, _args, stack=stack, category=category):
            ctx = torch.profiler.record_function(f"bench::{category}")
            ctx.__enter__()
            stack.append(ctx)

        def post(_module, _args, _out, stack=stack):
            stack.pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    return handles


def profile(trainer: Trainer, model: nn.Module, scopes: dict[str, str], steps: int) -> dict[str, Any]:
    """``steps`` steps under the profiler; milliseconds per step by category, and the step's wall time."""
    handles = _hook_scopes(model, scopes)
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            wall = [trainer.step(phases=True)[1] for _ in range(steps)]
    finally:
        for handle in handles:
            handle.remove()
    totals, ops = breakdown(prof.events())
    per_step = {cat: totals.get(cat, 0.0) / steps / 1e3 for cat in CATEGORIES}
    wall_ms = 1e3 * sum(wall) / steps
    per_step["unattributed"] = wall_ms - sum(v for k, v in per_step.items() if k != "unattributed")
    top = {
        cat: [[name, us / steps / 1e3, n / steps] for name, (us, n) in sorted(by_op.items(), key=lambda kv: -kv[1][0])]
        for cat, by_op in ops.items()
    }
    collectives = {
        name: n / steps for by_op in ops.values() for name, (_, n) in by_op.items() if name.startswith("c10d::")
    }
    return {
        "ms": per_step,
        "wall_ms": wall_ms,
        "top_ops_ms": {cat: rows[:TOP_OPS] for cat, rows in top.items()},
        "collective_calls": collectives,
    }


def breakdown(events) -> tuple[dict[str, float], dict[str, dict[str, list[float]]]]:
    """Self CPU time (us) of the profiled ops by category, and [us, calls] by category and op name.

    A collective (by op name) counts whole as ``all-to-all`` or ``grad collectives``. Else a
    backward op takes the category of the forward op that made its autograd node (same sequence
    number), and a forward op that of the innermost ``bench::<category>`` scope around it (module
    hooks); what no module scope covers falls to its phase: forward -> ``other layers`` (embedding,
    norms, head, loss), backward -> ``backward other`` (gradient accumulation, DeepSpeed's hooks),
    ``engine.step()`` -> ``optimizer``.
    """
    forward_of: dict[int, str] = {}
    for e in events:
        if e.sequence_nr >= 0 and e.sequence_nr not in forward_of and not _under(e, EVALUATE):
            forward_of[e.sequence_nr] = _scope_category(e) or "other layers"
    totals: dict[str, float] = defaultdict(float)
    ops: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0.0, 0]))
    for e in events:
        category = _category(e, forward_of)
        totals[category] += e.self_cpu_time_total
        entry = ops[category][e.name]
        entry[0] += e.self_cpu_time_total
        entry[1] += 1
    return dict(totals), {cat: dict(by_op) for cat, by_op in ops.items()}


def _chain(e):
    while e is not None:
        yield e
        e = e.cpu_parent


def _under(e, prefix: str) -> bool:
    return any(x.name.startswith(prefix) for x in _chain(e))


def _scope_category(e) -> str | None:
    for x in _chain(e):
        if x.name.startswith("bench::"):
            name = x.name[len("bench::") :]
            return PHASES.get(name, name)
    return None


def _category(e, forward_of: dict[int, str]) -> str:
    chain = list(_chain(e))
    for x in reversed(chain):  # outermost collective first
        if COMM_A2A.search(x.name):
            return "all-to-all"
        if COMM_OTHER.search(x.name):
            return "grad collectives"
    for x in chain:
        if x.name.startswith(EVALUATE):
            return forward_of.get(x.sequence_nr, "backward other")
    return _scope_category(e) or "unattributed"
