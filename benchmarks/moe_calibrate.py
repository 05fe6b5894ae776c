"""Calibration of the expert cost model (``moe_parallel/experts/choice.py``) on this machine.

A tool of ``benchmarks/bench_moe.py`` (``--calibrate PATH``): measures the model's constants with
``--threads`` torch threads, writes them to PATH (the JSON file that ``MOE_PARALLEL_EXPERT_COST``
pins), and prints them beside the defaults.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from moe_parallel.experts import choice


def calibrate(path: Path, threads: int | None = None) -> dict[str, float]:
    """Measure the cost model's constants, write them to ``path`` and return them."""
    if threads:
        torch.set_num_threads(threads)
    if choice.main(["calibrate", str(path)]) != 0:
        raise SystemExit(f"--calibrate: writing {path} failed")
    measured = json.loads(path.read_text())
    print(f"measured ({torch.get_num_threads()} threads): {measured}")
    print(f"defaults:                {dataclasses.asdict(choice.DEFAULT_COST_MODEL)}")
    return measured
