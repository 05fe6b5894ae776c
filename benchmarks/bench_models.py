"""Whole Hugging Face MoE models trained by our app vs by DeepSpeed AutoEP, step time side by side.

What is compared: a tiny random Mixtral and Qwen3-MoE (transformers' config classes,
``save_pretrained`` to a temporary directory; nothing downloads), trained

- by our app (``benchmarks/models_ours.py``): what ``launch/train.py model=hf model.path=DIR``
  builds: ``launch.hf_model.build_model`` and ``moe_parallel.integration.engine.build_engine``, main venv;
- by DeepSpeed AutoEP (``benchmarks/models_peer_autoep.py``): the HF model itself, its MoE blocks
  swapped by ``deepspeed.initialize`` with ``expert_parallel.preset_model``, in ``.venv-autoep``
  (AutoEP 0.19.8 needs transformers 5.15; ``make bench-models`` builds that venv);

from the same weights on the same batches: fp32 on CPU, the same micro-batch and sequence length,
dropless softmax top-k routing as config.json says on both sides (no aux loss), AdamW with the same
lr, betas, eps and weight decay, the app's ZeRO stage and gradient clipping, no lr schedule, the
same number of torch threads per process. At EP=1 (one process) and EP=2 (two gloo processes, the
experts split over both, a micro-batch each), eager and ``torch.compile``d.

How: for each (family, EP, mode) the driver starts our process group, which trains the prelude
steps (first-step loss, compilation, warm-up), then AutoEP's; both then wait, idle, for commands
(``models_side``). Each paired round runs ``--warmup`` + ``--steps`` steps on one side and then
on the other (which side goes first alternates), so load that drifts on a shared machine hits both
alike. A round's time is the median of its timed steps (the slowest rank per step); the table gives
the median over rounds of AutoEP/ours with an order-statistic confidence interval for that median
(distribution-free; its coverage is printed, at least 95% where the number of rounds allows). The
first-step losses must agree (``--loss-rtol``): else the two do not train the same model and the
run fails. At each EP of ``--profile-ep`` (default 2), eager, a profiled round splits each side's
step into categories (router, dispatch/combine, all-to-all, experts, attention, optimizer, ...;
``models_side.breakdown``).

    make bench-models                                  # everything (builds .venv-autoep first)
    make bench-models MODELS_ARGS="--quick"            # Mixtral, EP=1 and 2, eager, a few steps
    .venv/bin/python benchmarks/bench_models.py --peer-python .venv-autoep/bin/python \\
        --families qwen3_moe --ep 2 --modes eager,compiled --rounds 5 --steps 10 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from benchmarks.harness.report import cpu_model  # noqa: E402
from benchmarks.harness.rounds import median_ci  # noqa: E402

FAMILIES = ("mixtral", "qwen3_moe")
SIDES = ("ours", "autoep")
SCRIPTS = {"ours": HERE / "models_ours.py", "autoep": HERE / "models_peer_autoep.py"}
NUM_BATCHES = 64  # step i trains on batch i % 64


# ---------------------------------------------------------------------------------------- model, data


def hf_config(family: str, args: argparse.Namespace):
    """A tiny config of ``family`` whose every layer is MoE (dropless softmax top-k, normalised)."""
    import transformers

    common = dict(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=max(1, args.heads // 2),
        head_dim=args.hidden // args.heads,
        num_experts_per_tok=args.top_k,
        max_position_embeddings=max(512, args.seq_len),
        tie_word_embeddings=False,
    )
    if family == "mixtral":
        return transformers.MixtralConfig(**common, num_local_experts=args.experts, intermediate_size=args.ffn)
    return transformers.Qwen3MoeConfig(
        **common,
        num_experts=args.experts,
        moe_intermediate_size=args.ffn,
        intermediate_size=4 * args.hidden,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
    )


@torch.no_grad()
def save_model(family: str, args: argparse.Namespace, out: Path) -> Path:
    """Random weights scaled by fan-in (routers x2, so routing is decisive), saved as safetensors."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(hf_config(family, args))
    gen = torch.Generator().manual_seed(args.seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen)
        if param.dim() == 1:
            param.copy_(1.0 + 0.1 * noise if "norm" in name else 0.1 * noise)
        else:
            scale = 2.0 if name.endswith("gate.weight") else 1.0
            param.copy_(noise * scale / math.sqrt(param.shape[-1]))
    model.save_pretrained(str(out))
    return out


def save_batches(args: argparse.Namespace, out: Path) -> Path:
    """Token ids ``[NUM_BATCHES, 2 ranks, micro-batch, seq_len + 1]``, read with ``weights_only=True``."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    shape = (NUM_BATCHES, 2, args.micro_batch, args.seq_len + 1)
    torch.save(torch.randint(1, args.vocab, shape, generator=gen), out)
    return out


def app_settings(model_dir: Path, ep: int, args: argparse.Namespace) -> tuple[list[str], dict, dict]:
    """Our Hydra overrides, and from them the app's DeepSpeed config and AdamW settings (for both sides)."""
    from models_ours import compose

    from launch import config as app_config

    overrides = [
        "model=hf",
        f"model.path={model_dir}",
        f"parallel.ep={ep}",
        "moe.aux_loss_coeff=0.0",
        f"train.micro_batch_size={args.micro_batch}",
        f"optim.lr={args.lr}",
        "logger=disabled",
        *args.ours_override,
    ]
    cfg = compose(overrides)
    optim = {"lr": cfg.optim.lr, "betas": [cfg.optim.beta1, cfg.optim.beta2], "eps": 1e-8}
    optim["weight_decay"] = cfg.optim.weight_decay
    return overrides, app_config.deepspeed_config(cfg), optim


# ---------------------------------------------------------------------------------------- process groups


class GroupError(RuntimeError):
    pass


@dataclass
class Group:
    """One side's torchrun process group, driven through files in ``dir``."""

    side: str
    dir: Path
    nproc: int
    proc: subprocess.Popen
    log: Any
    commands: int = 0
    ready: list[dict] = field(default_factory=list)

    @classmethod
    def start(cls, side: str, spec: dict, work: Path, python: str) -> Group:
        group_dir = work / f"{spec['family']}-ep{spec['ep']}-{spec['mode']}-{side}"
        group_dir.mkdir(parents=True)
        (group_dir / "spec.json").write_text(json.dumps(spec, indent=1))
        env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "TORCHINDUCTOR_COMPILE_THREADS": "1"}
        env["DS_ACCELERATOR"] = "cpu"
        # DeepSpeed JIT-builds a CPU op at start-up: each venv keeps its own build (as the Makefile does for
        # .venv), never waiting on another venv's build lock in the shared ~/.cache.
        env["TORCH_EXTENSIONS_DIR"] = str(Path(python).parent.parent.absolute() / "torch_extensions")
        if side == "ours":
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        else:  # nothing of this repository or of the main venv
            env.pop("PYTHONPATH", None)
        cmd = [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(spec["ep"])]
        cmd += [str(SCRIPTS[side]), "--spec", str(group_dir / "spec.json"), "--dir", str(group_dir)]
        log = open(group_dir / "log.txt", "w")
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        group = cls(side, group_dir, spec["ep"], proc, log)
        try:
            group.ready = group._wait([f"ready_rank{r}.json" for r in range(group.nproc)], spec["timeout_s"])
        except BaseException:
            group.kill()
            raise
        return group

    def command(self, op: str, timeout_s: float, **kw: Any) -> list[dict]:
        n = self.commands
        self.commands += 1
        tmp = self.dir / f"cmd_{n}.tmp"
        tmp.write_text(json.dumps({"op": op, **kw}))
        tmp.rename(self.dir / f"cmd_{n}.json")
        if op == "exit":
            return []
        return self._wait([f"res_{n}_rank{r}.json" for r in range(self.nproc)], timeout_s)

    def _wait(self, names: list[str], timeout_s: float) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        while not all((self.dir / name).exists() for name in names):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                why = "exited" if self.proc.poll() is not None else f"gave no answer in {timeout_s:.0f} s"
                tail = (self.dir / "log.txt").read_text()[-6000:]
                raise GroupError(f"{self.side} ({self.dir.name}) {why}; its log ends:\n{tail}")
            time.sleep(0.05)
        return [json.loads((self.dir / name).read_text()) for name in names]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.command("exit", 0)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        self.log.close()


def per_step(results: list[dict], key: str, reduce) -> list[float]:
    """Per step across ranks: the slowest rank's time (``max``) or the mean loss (``mean``)."""
    return [reduce(values) for values in zip(*(r[key] for r in results))]


# ---------------------------------------------------------------------------------------- results


@dataclass
class Row:
    family: str
    ep: int
    mode: str
    ms: dict[str, list[float]]  # side -> per-round median step ms
    first_loss: dict[str, float]
    first_step_s: dict[str, float]  # start-up and the first step (compilation)

    @property
    def ratios(self) -> list[float]:
        return [a / o for a, o in zip(self.ms["autoep"], self.ms["ours"])]

    @property
    def loss_rel(self) -> float:
        ours, theirs = self.first_loss["ours"], self.first_loss["autoep"]
        return abs(theirs - ours) / abs(ours)

    def as_json(self) -> dict[str, Any]:
        low, high, cov = median_ci(self.ratios)
        return {
            "family": self.family,
            "ep": self.ep,
            "mode": self.mode,
            "round_median_ms": self.ms,
            "ratio_autoep_over_ours": statistics.median(self.ratios),
            "ratio_ci": [low, high],
            "ratio_ci_coverage": cov,
            "first_step_loss": self.first_loss,
            "first_step_loss_rel_diff": self.loss_rel,
            "startup_and_first_step_s": self.first_step_s,
        }


# ---------------------------------------------------------------------------------------- the run


def run_config(family: str, ep: int, mode: str, base: dict, args: argparse.Namespace, work: Path):
    """One (family, EP, mode): both groups, the paired rounds, and (eager, EP in ``--profile-ep``) the profile."""
    overrides, ds_config, optim = app_settings(base["model_dirs"][family], ep, args)
    spec = {
        "family": family,
        "ep": ep,
        "mode": mode,
        "model_dir": str(base["model_dirs"][family]),
        "batches": str(base["batches"]),
        "threads": max(1, args.cores // ep),
        "prelude": args.prelude + (2 if mode == "compiled" else 0),
        "timeout_s": args.timeout,
        "ours_overrides": overrides,
        "ds_config": ds_config,
        "optim": optim,
    }
    groups: dict[str, Group] = {}
    try:
        for side in SIDES:  # one after the other: never two start-ups or compilations at once
            print(f"  {family} EP={ep} {mode}: starting {side}", file=sys.stderr, flush=True)
            python = sys.executable if side == "ours" else args.peer_python
            groups[side] = Group.start(side, spec, work, python)
        ms: dict[str, list[float]] = {side: [] for side in SIDES}
        for r in range(args.rounds):
            for side in SIDES if r % 2 == 0 else SIDES[::-1]:
                out = groups[side].command("round", args.timeout, warmup=args.warmup, steps=args.steps)
                ms[side].append(1e3 * statistics.median(per_step(out, "seconds", max)))
        profile = {}
        if ep in args.profile_ep and mode == "eager" and args.profile_steps:
            for side in SIDES:
                out = groups[side].command("profile", args.timeout, warmup=1, steps=args.profile_steps)
                cats = out[0]["ms"]
                profile[side] = {
                    "ms": {c: statistics.mean(o["ms"][c] for o in out) for c in cats},
                    "wall_ms": statistics.mean(o["wall_ms"] for o in out),
                    "top_ops_ms_rank0": out[0]["top_ops_ms"],
                    "collective_calls_rank0": out[0]["collective_calls"],
                }
    finally:
        for group in groups.values():
            group.close()
    first_loss = {s: statistics.mean(r["losses"][0] for r in groups[s].ready) for s in SIDES}
    first_s = {s: max(r["startup_s"] + r["seconds"][0] for r in groups[s].ready) for s in SIDES}
    return Row(family, ep, mode, ms, first_loss, first_s), profile


def results_table(rows: list[Row]) -> str:
    head = (
        "| model | EP | mode | ours ms/step | AutoEP ms/step | AutoEP / ours (median) | CI (coverage) "
        "| first-step loss | rel. diff | start-up + 1st step s (ours / AutoEP) |"
    )
    lines = [head, "|" + "---|" * 10]
    for row in rows:
        low, high, cov = median_ci(row.ratios)
        lines.append(
            f"| {row.family} | {row.ep} | {row.mode} | {statistics.median(row.ms['ours']):.1f} "
            f"| {statistics.median(row.ms['autoep']):.1f} | {statistics.median(row.ratios):.2f} "
            f"| {low:.2f}-{high:.2f} ({100 * cov:.0f}%) | {row.first_loss['ours']:.6f} | {row.loss_rel:.1e} "
            f"| {row.first_step_s['ours']:.0f} / {row.first_step_s['autoep']:.0f} |"
        )
    return "\n".join(lines)


def profile_table(key: str, profile: dict[str, dict]) -> str:
    from models_side import CATEGORIES

    lines = [
        f"{key}, eager: ms per step by category (mean of the ranks, profiled steps)",
        "",
        "| category | ours ms | ours % | AutoEP ms | AutoEP % |",
        "|---|---|---|---|---|",
    ]
    for cat in CATEGORIES:
        cells = []
        for side in SIDES:
            ms, wall = profile[side]["ms"][cat], profile[side]["wall_ms"]
            cells += [f"{ms:.1f}", f"{100 * ms / wall:.0f}%"]
        lines.append(f"| {cat} | " + " | ".join(cells) + " |")
    walls = [f"{profile[s]['wall_ms']:.1f}" for s in SIDES]
    lines.append(f"| **profiled step** | {walls[0]} | 100% | {walls[1]} | 100% |")
    lines.append("")
    for side in SIDES:
        calls = ", ".join(f"{n:g} {name}" for name, n in sorted(profile[side]["collective_calls_rank0"].items()))
        lines.append(f"{side}: collectives per step on rank 0: {calls}  ")
    return "\n".join(lines)


def machine_line(args: argparse.Namespace) -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{os.cpu_count()}-core CPU ({cpu_model()}), torch {torch.__version__}, fp32, gloo; torch threads per process: "
        f"{args.cores} at EP=1, {max(1, args.cores // 2)} at EP=2; load average now {load}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peer-python", default=str(REPO / ".venv-autoep" / "bin" / "python"), help="AutoEP's venv")
    p.add_argument("--families", default=",".join(FAMILIES), help="comma-separated: mixtral,qwen3_moe")
    p.add_argument("--ep", default="1,2", help="expert-parallel sizes (processes)")
    p.add_argument("--modes", default="eager,compiled")
    p.add_argument("--rounds", type=int, default=5, help="paired rounds per config")
    p.add_argument("--steps", type=int, default=10, help="timed steps per round and side")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before each round's timed ones")
    p.add_argument("--prelude", type=int, default=3, help="first steps after start-up (compiled: +2)")
    p.add_argument("--profile-steps", type=int, default=3, help="profiled steps per profiled config (0: none)")
    p.add_argument("--profile-ep", default="2", help="comma-separated EP sizes whose eager step is profiled")
    p.add_argument("--quick", action="store_true", help="Mixtral, EP=1 and 2, eager, 2 rounds of 3 steps")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--ffn", type=int, default=256, help="expert FFN width")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loss-rtol", type=float, default=1e-4, help="allowed relative first-step loss difference")
    p.add_argument(
        "--cores",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="cores to share out: torch threads per process = cores // EP, at least 1 (on a loaded machine: 1)",
    )
    p.add_argument("--timeout", type=float, default=900, help="seconds a start-up or a command may take")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument(
        "--ours-override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra Hydra override for our side (repeatable), e.g. moe.expert_gemm=loop",
    )
    p.add_argument("--keep", type=Path, help="work directory to keep (logs, specs, results)")
    args = p.parse_args(argv)
    if args.quick:
        args.families, args.ep, args.modes = "mixtral", "1,2", "eager"
        args.rounds, args.steps, args.warmup, args.prelude, args.profile_steps = 2, 3, 1, 1, 0
    args.families = [f for f in args.families.split(",") if f]
    args.ep = [int(e) for e in args.ep.split(",") if e]
    args.profile_ep = [int(e) for e in args.profile_ep.split(",") if e]
    args.modes = [m for m in args.modes.split(",") if m]
    if unknown := set(args.families) - set(FAMILIES):
        p.error(f"--families: unknown {sorted(unknown)}; choose from {FAMILIES}")
    if not set(args.ep) <= {1, 2} or not set(args.modes) <= {"eager", "compiled"}:
        p.error("--ep takes 1 and/or 2, --modes eager and/or compiled")
    if args.rounds < 1 or args.steps < 1 or args.prelude < 1:
        p.error("--rounds, --steps and --prelude must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not Path(args.peer_python).exists():
        print(f"no AutoEP venv at {args.peer_python}: `make bench-models` builds .venv-autoep", file=sys.stderr)
        return 2
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_models_"))
    if args.keep:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    sys.path[:0] = [str(HERE), str(REPO)]  # models_ours, models_side; launch
    try:
        base = {
            "model_dirs": {f: save_model(f, args, work / f) for f in args.families},
            "batches": save_batches(args, work / "batches.pt"),
        }
        rows, profiles = [], {}
        for family in args.families:
            for ep in args.ep:
                for mode in args.modes:
                    row, profile = run_config(family, ep, mode, base, args, work)
                    rows.append(row)
                    if profile:
                        profiles[f"{family}, EP={ep}"] = profile
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"Machine: {machine_line(args)}")
    print(
        f"Model: {args.layers} layers, hidden {args.hidden}, {args.experts} experts top-{args.top_k}, expert FFN "
        f"{args.ffn}, vocab {args.vocab}; micro-batch {args.micro_batch} x {args.seq_len} tokens per process; "
        f"{args.rounds} paired rounds of {args.warmup} + {args.steps} steps\n"
    )
    print(results_table(rows))
    for key, profile in profiles.items():
        print("\n" + profile_table(key, profile))
    if args.json:
        payload = {"machine": machine_line(args), "args": {k: str(v) for k, v in vars(args).items()}}
        payload |= {"rows": [row.as_json() for row in rows], "profiles": profiles}
        args.json.write_text(json.dumps(payload, indent=1))
    bad = [row for row in rows if not row.loss_rel <= args.loss_rtol]
    if bad:
        for row in bad:
            print(
                f"FAIL {row.family} EP={row.ep} {row.mode}: first-step loss ours {row.first_loss['ours']!r} vs "
                f"AutoEP {row.first_loss['autoep']!r} (relative difference {row.loss_rel:.2e} > {args.loss_rtol}):"
                " the two sides do not train the same model",
                file=sys.stderr,
            )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
