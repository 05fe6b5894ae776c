"""Peak memory of ``import-hf`` and ``export-hf`` against the model's size.

Builds random bf16 Qwen3-MoE models of a few sizes (a transformers config class saved with
``save_pretrained``, random weights written straight into safetensors shards: no hub, no
transformers model in memory), converts each in a child process, and reports the child's peak
resident memory over its baseline (the resident set once its imports are done, those that building
the model on the meta device triggers included) next to the model's bytes. The peak is the
kernel's high-water mark of the child (``VmHWM``, reset after the imports through
``/proc/self/clear_refs``), so it counts every page the conversion touched, the pages of the files
it maps included. Sources are written in 100 MB shards and exported in 100 MB shards by default (a
scaled-down Hub layout: the bound is about one shard).

    .venv/bin/python benchmarks/bench_convert.py                     # 0.1, 0.5 and 1.1 GB models
    .venv/bin/python benchmarks/bench_convert.py --layers 12 --keep /tmp/conv
    .venv/bin/python benchmarks/bench_convert.py --source-shard-mb 5000 --export-shard-mb 5000 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.harness.procmem import reset_high_water_mark, status_bytes  # noqa: E402

# A model whose layers are small and many: its size grows with the layer count, its largest
# tensor (the embedding, 8 MiB in bf16) does not.
SHAPE = dict(
    vocab_size=16384,
    hidden_size=256,
    intermediate_size=512,
    moe_intermediate_size=256,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    num_experts=16,
    num_experts_per_tok=2,
    tie_word_embeddings=False,
)
DEFAULT_LAYERS = (12, 72, 166)  # about 0.1, 0.5 and 1.1 GB in bf16


def write_random_model(
    dest: Path, layers: int, *, shard_bytes: int = 100 << 20, seed: int = 0, shape: dict | None = None
) -> int:
    """A random bf16 Qwen3-MoE of ``layers`` layers in ``dest`` (config.json, shards, index); returns its
    bytes. ``shape``: Qwen3MoeConfig fields over :data:`SHAPE`."""
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen3MoeConfig

    from moe_parallel import hf
    from moe_parallel.hf.load import expected_keys
    from moe_parallel.hf.safetensors_io import plan_shards, write_index

    dest.mkdir(parents=True, exist_ok=True)
    Qwen3MoeConfig(num_hidden_layers=layers, dtype="bfloat16", **{**SHAPE, **(shape or {})}).save_pretrained(str(dest))
    expected = expected_keys(hf.load_config(dest))
    sizes = [(key, 0, 2 * _numel(shape)) for key, shape in expected.items()]
    file_of = plan_shards(sizes, shard_bytes)
    gen = torch.Generator().manual_seed(seed)
    for file in dict.fromkeys(file_of.values()):
        content = {
            key: (torch.randn(expected[key], generator=gen) * 0.02).to(torch.bfloat16)
            for key, f in file_of.items()
            if f == file
        }
        save_file(content, str(dest / file), metadata={"format": "pt"})
    write_index(dest, file_of, sum(n for _, _, n in sizes))
    return sum(n for _, _, n in sizes)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# ---------------------------------------------------------------- the child: one conversion, measured


def warm_up(config_dir: Path) -> None:
    """Import what a conversion imports on first use: transformers' config classes, and the ~800
    modules (torch.fx, sympy, ...) that building the model on the meta device pulls in."""
    import safetensors.torch  # noqa: F401
    import transformers  # noqa: F401

    from moe_parallel import hf
    from moe_parallel.hf.load import expected_keys

    expected_keys(hf.load_config(config_dir))  # meta tensors only: no memory stays


def child(argv: list[str]) -> None:
    """Run ``checkpoint_tool`` with ``argv`` after its imports; print {"baseline", "peak", "seconds", "rc"}."""
    from launch.checkpoint_tool import main

    source = Path(argv[1])
    warm_up(source if argv[0] == "import-hf" else source / "hf_model")
    baseline = status_bytes("VmRSS")
    reset_high_water_mark()  # the high-water mark starts again from here
    start = time.perf_counter()
    rc = main(argv)
    seconds = time.perf_counter() - start
    print(json.dumps({"baseline": baseline, "peak": status_bytes("VmHWM"), "seconds": seconds, "rc": rc}))


def measure(argv: list[str], env: dict[str, str] | None = None) -> dict[str, float]:
    """Run one conversion in a child interpreter; its peak resident memory over its baseline, in bytes."""
    code = f"import sys; sys.path.insert(0, {str(REPO)!r}); from benchmarks.bench_convert import child; child({argv!r})"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=REPO
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{argv} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    result = json.loads(lines[-1])
    if result["rc"] != 0:
        raise RuntimeError(f"{argv} exited {result['rc']}:\n{done.stderr[-4000:]}")
    return {"over_baseline": result["peak"] - result["baseline"], **result}


# ---------------------------------------------------------------- the table


def run(layers: list[int], work: Path, source_shard_mb: float, export_shard_mb: float) -> list[dict]:
    """Write, import and export a model of each layer count; one row each (printed as it comes)."""
    rows = []
    for count in layers:
        src, ckpt, out = work / f"hf{count}", work / f"ckpt{count}", work / f"out{count}"
        size = write_random_model(src, count, shard_bytes=int(source_shard_mb * 2**20))
        imp = measure(["import-hf", str(src), "--out", str(ckpt)])
        exp = measure(["export-hf", str(ckpt), "--out", str(out), "--max-shard-mb", str(export_shard_mb)])
        rows.append({"layers": count, "model_bytes": size, "import": imp, "export": exp})
        print(_row(rows[-1]), flush=True)
        for folder in (src, ckpt, out):
            shutil.rmtree(folder, ignore_errors=True)
    return rows


def _row(row: dict) -> str:
    mib = 2**20
    size = row["model_bytes"]
    imp, exp = row["import"]["over_baseline"], row["export"]["over_baseline"]
    return (
        f"| {row['layers']} | {size / mib:,.0f} | {imp / mib:,.0f} ({imp / size:.2f}x) | "
        f"{row['import']['seconds']:.1f} | {exp / mib:,.0f} ({exp / size:.2f}x) | {row['export']['seconds']:.1f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=list(DEFAULT_LAYERS))
    parser.add_argument("--source-shard-mb", type=float, default=100, help="shard size of the models written")
    parser.add_argument("--export-shard-mb", type=float, default=100, help="export-hf --max-shard-mb")
    parser.add_argument("--keep", type=Path, help="work in this directory (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="write the measurements here too")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_convert_"))
    print("| layers | model MiB (bf16) | import-hf peak over baseline, MiB | s | export-hf peak, MiB | s |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    rows = run(args.layers, work, args.source_shard_mb, args.export_shard_mb)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
