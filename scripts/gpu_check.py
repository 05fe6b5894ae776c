"""The Python half of ``make gpu-check`` (scripts/gpu_check.sh runs the stages; this reads them).

    python scripts/gpu_check.py env OUT.json                  # device, versions, grouped GEMM op, apex, NCCL
    python scripts/gpu_check.py collect OUT_DIR WORK_DIR MODE # results.md + results.json in OUT_DIR
    python scripts/gpu_check.py fill-benchmarks OUT_DIR/results.json [--benchmarks BENCHMARKS.md]

``collect`` never fails on a failed stage: it records it (exit code, timeout, the log's tail) and
goes on, so one results file always comes back. ``fill-benchmarks`` writes the "GPU" block of
BENCHMARKS.md from a results file of a real GPU run (it refuses a dry run's).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import re
import statistics
import sys
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# Dense bf16 GEMM rate of the lent H200 as its machine description gives it (8192^3 products, 769-798 TFLOP/s).
H200_BF16_TFLOPS = 790.0
BLOCK_BEGIN, BLOCK_END = "<!-- gpu-check begin -->", "<!-- gpu-check end -->"
STAGES = ("install", "env", "tests", "bench", "sweep", "train")


# --------------------------------------------------------------------------- model FLOPs


def model_flops_per_token(model: dict[str, Any], moe: dict[str, Any], seq_len: int, vocab_size: int) -> dict[str, int]:
    """Training FLOPs per token of the reference GPT, from its *active* parameters.

    ``model`` and ``moe`` are the run's ``model.*`` and ``moe.*`` config groups. Active parameters are
    the matrix weights one token multiplies with: per block the attention (``4 D^2``) and either the
    dense FFN or, in MoE blocks, the router (``D E``), ``top_k`` routed experts and the shared expert;
    then the LM head (``V D``, tied or not). Embedding and position lookups and norms are no matmuls.

    FLOPs per token, forward + backward: ``6 * active + 12 * L * S * D``: two FLOPs per weight and
    token forward, twice that backward, plus the attention scores and their weighted sum (``QK^T``
    and ``AV``: ``2 * 2 * S * D`` per block forward, times 3), counted over the full sequence as in
    PaLM's MFU (no discount for the causal mask).
    """
    d, layers, ffn = model["hidden_size"], model["num_layers"], model["ffn_hidden_size"]
    activation = model["activation"]

    def ffn_params(width: int) -> int:
        up = 2 * width if activation == "swiglu" else width  # swiglu's fc1 holds gate and up halves
        return d * up + width * d

    moe_every = model["moe_every"]
    moe_blocks = sum(1 for i in range(layers) if moe_every > 0 and (i + 1) % moe_every == 0)
    routed = ffn_params(moe.get("expert_ffn_hidden_size") or ffn)
    shared = ffn_params(moe["shared_expert_ffn_hidden_size"]) if moe.get("shared_expert_ffn_hidden_size") else 0
    moe_active = d * moe["num_experts"] + moe["top_k"] * routed + shared
    active = layers * 4 * d * d + (layers - moe_blocks) * ffn_params(ffn) + moe_blocks * moe_active + vocab_size * d
    return {"active_params": active, "flops_per_token": 6 * active + 12 * layers * seq_len * d}


def mfu(tokens_per_s: float, flops_per_token: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the reference rate."""
    return tokens_per_s * flops_per_token / (peak_tflops * 1e12)


# --------------------------------------------------------------------------- stage readers


def environment() -> dict[str, Any]:
    """What the machine offers: the facts the results file names next to its numbers."""
    import torch
    import torch.nn.functional as F

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "grouped_mm": "torch.nn.functional.grouped_mm"
        if hasattr(F, "grouped_mm")
        else ("torch._grouped_mm" if hasattr(torch, "_grouped_mm") else None),
        "nccl_available": torch.distributed.is_available() and torch.distributed.is_nccl_available(),
    }
    for name in ("deepspeed", "hydra-core", "omegaconf", "wandb", "triton", "numpy"):
        try:
            info[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info[name] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info |= {
            "device": torch.cuda.get_device_name(0),
            "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
            "memory_gib": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count,
            "device_count": torch.cuda.device_count(),
            "nccl": ".".join(map(str, torch.cuda.nccl.version())) if info["nccl_available"] else None,
        }
    else:
        info["device"] = f"CPU ({platform.processor() or platform.machine()}), no CUDA"
    try:  # DeepSpeed detects its accelerator at run time (the wheel built here says "cpu" and has no ops)
        from deepspeed.accelerator import get_accelerator

        info["deepspeed_accelerator"] = get_accelerator().device_name()
    except Exception as err:
        info["deepspeed_accelerator"] = f"error: {err}"
    try:
        sys.path.insert(0, str(REPO))
        from moe_parallel.models.gpt import _fused_norm_classes

        info["apex_fused_norms"] = _fused_norm_classes() is not None
    except Exception as err:  # the check records what it finds; a broken import is a finding
        info["apex_fused_norms"] = f"error: {err}"
    return info


def read_stages(work: Path) -> dict[str, dict[str, Any]]:
    path = work / "stages.jsonl"
    if not path.exists():
        return {}
    return {s["stage"]: s for s in map(json.loads, path.read_text().splitlines()) if s}


def read_tests(junit: Path) -> dict[str, Any] | None:
    """Counts and the failed / skipped tests (with their reasons) of a pytest junit file."""
    if not junit.exists():
        return None
    root = ET.parse(junit).getroot()
    cases = root.iter("testcase")
    result: dict[str, Any] = {"passed": 0, "failed": [], "skipped": []}
    for case in cases:
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        skip = case.find("skipped")
        if bad is not None:
            result["failed"].append({"test": name, "message": (bad.get("message") or "")[:500]})
        elif skip is not None:
            result["skipped"].append({"test": name, "reason": (skip.get("message") or "")[:300]})
        else:
            result["passed"] += 1
    return result


def read_train(run_dir: Path, log: Path, peak_tflops: float) -> dict[str, Any] | None:
    """Tokens/s (mean over the log windows after the first, which holds start-up), MFU, losses."""
    metrics, config = run_dir / "metrics.jsonl", run_dir / "config.yaml"
    if not metrics.exists() or not config.exists():
        return None
    import yaml

    cfg = yaml.safe_load(config.read_text())
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    train = [r for r in records if "train/tokens_per_s" in r]
    if not train:
        return None
    windows = train[1:] or train
    tokens_per_s = statistics.fmean(r["train/tokens_per_s"] for r in windows)
    vocab = cfg["data"]["vocab_size"]
    flops = model_flops_per_token(cfg["model"], cfg["moe"], cfg["data"]["seq_len"], vocab)
    evals = [r["eval/loss"] for r in records if "eval/loss" in r]
    text = log.read_text(errors="replace") if log.exists() else ""
    params = re.search(r"\| ([\d,]+) params on rank 0", text)
    return {
        "steps": max(r["step"] for r in train),
        "tokens_per_step": cfg["train"]["micro_batch_size"] * cfg["train"]["grad_accum"] * cfg["data"]["seq_len"],
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_windows": [r["train/tokens_per_s"] for r in train],
        "first_loss": train[0]["train/loss"],
        "last_loss": train[-1]["train/loss"],
        "eval_loss": evals[-1] if evals else None,
        "precision": cfg["deepspeed"]["precision"],
        "backend": cfg["parallel"]["backend"] or "default (nccl on GPUs, gloo on CPUs)",
        "total_params": int(params.group(1).replace(",", "")) if params else None,
        **flops,
        "model_tflops": tokens_per_s * flops["flops_per_token"] / 1e12,
        "mfu": mfu(tokens_per_s, flops["flops_per_token"], peak_tflops),
        "peak_tflops": peak_tflops,
        "model": (
            f"{cfg['model']['num_layers']} layers, D={cfg['model']['hidden_size']}, MoE every "
            f"{cfg['model']['moe_every']} blocks ({cfg['moe']['num_experts']} experts, top-{cfg['moe']['top_k']})"
        ),
    }


def _tail(path: Path, lines: int = 25) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# --------------------------------------------------------------------------- results


def collect(out: Path, work: Path, mode: str) -> dict[str, Any]:
    """Assemble every stage's outcome into ``results.json`` and ``results.md`` in ``out``."""
    env_path = work / "env.json"
    env = json.loads(env_path.read_text()) if env_path.exists() else {}
    peak = H200_BF16_TFLOPS
    bench_path, sweep_path = work / "bench.json", work / "sweep.json"
    results: dict[str, Any] = {
        "dry_run": mode != "cuda",
        "mode": mode,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": env.get("device", "unknown"),
        "environment": env,
        "stages": read_stages(work),
        "tests": read_tests(work / "tests.xml"),
        "bench": json.loads(bench_path.read_text()) if bench_path.exists() else None,
        "sweep": json.loads(sweep_path.read_text()) if sweep_path.exists() else None,
        "train": read_train(work / "train_run", out / "train.log", peak),
    }
    failures = []
    for name in STAGES:
        stage = results["stages"].get(name)
        if stage is None:
            continue
        if stage["rc"] != 0:
            why = "timed out" if stage.get("timed_out") else f"exit code {stage['rc']}"
            failures.append(f"stage {name}: {why} after {stage['seconds']} s (budget {stage['budget_s']} s)")
            stage["log_tail"] = _tail(out / f"{name}.log")
    if results["tests"]:
        failures += [f"test {f['test']}: {f['message'][:200]}" for f in results["tests"]["failed"]]
    for row in (results["bench"] or {}).get("rows", []):
        failures += [f"bench {row['config']['name']}: {impl} failed" for impl in row["failed"]]
    for point in (results["sweep"] or {}).get("points", []):
        failures += [f"sweep {point['config']['name']}: {impl} failed" for impl in point["failed"]]
    results["failures"] = failures
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "results.md").write_text(markdown(results))
    return results


def _fmt(value: Any, spec: str = ".3g") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def markdown(results: dict[str, Any]) -> str:
    env = results["environment"]
    lines = [f"# GPU check: {results['device']}", ""]
    if results["dry_run"]:
        lines += ["**DRY RUN** (no CUDA device): tiny shapes on the CPU; no number here is a GPU measurement.", ""]
    lines += [
        f"Date: {results['date']}  ",
        f"torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), grouped GEMM: {env.get('grouped_mm')}, "
        f"deepspeed {env.get('deepspeed')}, Python {env.get('python')}, NCCL {env.get('nccl', '-')}, "
        f"DeepSpeed accelerator: {env.get('deepspeed_accelerator')}, apex fused norms: {env.get('apex_fused_norms')}",
        "",
        "## Stages",
        "",
        "| stage | exit code | seconds | budget s |",
        "|---|---|---|---|",
    ]
    for name in STAGES:
        s = results["stages"].get(name)
        if s:
            rc = f"{s['rc']} (timed out)" if s.get("timed_out") else str(s["rc"])
            lines.append(f"| {name} | {rc} | {s['seconds']} | {s['budget_s']} |")
    tests = results["tests"]
    lines += ["", "## CUDA correctness (`pytest -m gpu tests/test_gpu.py`)", ""]
    if tests is None:
        lines.append("No test report (see tests.log).")
    else:
        lines.append(f"{tests['passed']} passed, {len(tests['failed'])} failed, {len(tests['skipped'])} skipped.")
        lines += [f"- FAILED {f['test']}: {f['message']}" for f in tests["failed"]]
        lines += [f"- skipped {s['test']}: {s['reason']}" for s in tests["skipped"]]
    lines += ["", "## Benchmark (`benchmarks/bench_moe.py`)", ""]
    bench = results["bench"]
    if bench is None:
        lines.append("No benchmark results (see bench.log).")
    else:
        lines += [f"Command: `{bench['command']}`  ", f"Machine: {bench['machine']}", "", bench["markdown"]]
    lines += ["", "## Shape sweep (`benchmarks/bench_moe.py --sweep`, a sample of its points)", ""]
    sweep = results.get("sweep")
    if sweep is None:
        lines.append("No sweep results (see sweep.log).")
    else:
        lines += [f"Command: `{sweep['command']}`  ", f"Machine: {sweep['machine']}", "", sweep["markdown"]]
    lines += ["", "## Training (`deepspeed` launcher, `+experiment=gpu_check`)", ""]
    train = results["train"]
    if train is None:
        lines.append("No training metrics (see train.log).")
    else:
        lines += [
            "| steps | tokens/step | tokens/s | active params | total params | FLOPs/token | model TFLOP/s "
            f"| MFU (of {train['peak_tflops']:g} TFLOP/s) | loss first → last | eval loss | precision |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
            f"| {train['steps']} | {train['tokens_per_step']} | {train['tokens_per_s']:,.0f} "
            f"| {train['active_params']:,} | {_fmt(train['total_params'], ',')} | {train['flops_per_token']:.3g} "
            f"| {train['model_tflops']:.1f} | {100 * train['mfu']:.1f}% "
            f"| {train['first_loss']:.3f} → {train['last_loss']:.3f} | {_fmt(train['eval_loss'], '.3f')} "
            f"| {train['precision']} |",
            "",
            f"Model: {train['model']}.  ",
            "Tokens/s: mean over the log windows after the first (start-up). MFU: model FLOPs "
            "(6 × active params + 12 × layers × seq × D per token) per second over the reference rate.",
        ]
    lines += ["", "## Failures", ""]
    lines += [f"- {f}" for f in results["failures"]] or ["None."]
    for name, stage in results["stages"].items():
        if stage.get("log_tail"):
            lines += [
                "",
                f"<details><summary>{name}.log (tail)</summary>",
                "",
                "```",
                stage["log_tail"],
                "```",
                "</details>",
            ]
    return "\n".join(lines) + "\n"


def fill_benchmarks(results_path: Path, benchmarks: Path) -> None:
    """Replace the GPU block of BENCHMARKS.md with a real run's results (device named)."""
    results = json.loads(results_path.read_text())
    if results["dry_run"]:
        raise SystemExit(f"{results_path} is a dry run's (no GPU): BENCHMARKS.md takes GPU measurements only")
    body = markdown(results).split("\n", 1)[1]  # the page has its own heading
    body = re.sub(r"^## ", "#### ", body, flags=re.MULTILINE)
    block = f"{BLOCK_BEGIN}\n### {results['device']} ({results['date']}, `make gpu-check`)\n{body}{BLOCK_END}"
    text = benchmarks.read_text()
    if BLOCK_BEGIN not in text or BLOCK_END not in text:
        raise SystemExit(f"{benchmarks} has no {BLOCK_BEGIN} ... {BLOCK_END} block (in its GPU section)")
    before, rest = text.split(BLOCK_BEGIN, 1)
    benchmarks.write_text(before + block + rest.split(BLOCK_END, 1)[1])
    print(f"wrote the GPU block of {benchmarks} ({results['device']})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    env = sub.add_parser("env", help="write the machine's facts as JSON")
    env.add_argument("output", type=Path)
    col = sub.add_parser("collect", help="results.md + results.json from the stages' outputs")
    col.add_argument("out", type=Path)
    col.add_argument("work", type=Path)
    col.add_argument("mode", choices=("cuda", "dry-run"))
    fill = sub.add_parser("fill-benchmarks", help="write BENCHMARKS.md's GPU block from a results.json")
    fill.add_argument("results", type=Path)
    fill.add_argument("--benchmarks", type=Path, default=REPO / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    if args.command == "env":
        info = environment()
        args.output.write_text(json.dumps(info, indent=1))
        print(json.dumps(info, indent=1))
    elif args.command == "collect":
        results = collect(args.out, args.work, args.mode)
        print((args.out / "results.md").read_text())
        print(f"{len(results['failures'])} failure(s); results in {args.out}/results.md and results.json")
    else:
        fill_benchmarks(args.results, args.benchmarks)


if __name__ == "__main__":
    main()
