"""A damaged token cache ends a real training run (the CLI, one process) before any step, naming the file."""

from __future__ import annotations

import re
import subprocess

import pytest

from launch import config as app_config
from launch.data import prepare_data
from tests.app_cli import REPO, metric_rows, tiny_overrides, train_command

TINY = [*tiny_overrides(), "train.steps=4", "logger=disabled"]  # the failure tests' tiny run, 4 steps


@pytest.mark.slow  # ~12 s; the fast tier checks the same data path through launch.build.build_data
def test_zeroed_train_bin_stops_training_before_a_step(tmp_path):
    overrides = [*TINY, f"data.cache_dir={tmp_path / 'cache'}", f"train.run_dir={tmp_path / 'run'}"]
    data = prepare_data(app_config.data_config(app_config.compose(*overrides)))  # the cache the run opens
    damaged = data.directory / "train.bin"
    damaged.write_bytes(bytes(damaged.stat().st_size))  # the right size, every byte zero
    run = tmp_path / "run"
    cmd = [*train_command(), *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    entry = re.escape(str(data.directory))
    where = rf"{re.escape(str(damaged))} bytes \[\d+, \d+\) .* the cache entry {entry} .*delete it"
    assert re.search(where, out), out[-3000:]
    rows = metric_rows(run) if (run / "metrics.jsonl").exists() else []
    assert not [row for row in rows if "train/loss" in row], rows  # not one step trained on it
