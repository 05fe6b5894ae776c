"""Fixtures shared across test modules.

Helpers that tests import live in small modules beside this file: ``dist_utils`` (the one harness for
multi-process tests), ``app_cli`` (the training app's command, tiny overrides, run-directory readers),
``app_job`` (a running app job), ``toy_models`` (the toy MoE LM), ``reference`` (naive oracles),
``hf_models`` / ``hf_app_fixtures`` (tiny Hugging Face models), ``slurm_cluster`` (the local Slurm
cluster, a pytest plugin of the modules that use it).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def app_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ``data.cache_dir`` for the app runs of the whole session: each corpus and tokenizer that
    ``tests.app_cli.tiny_overrides`` asks for is built once and found by every later run (entries are
    keyed by their config and built under a lock). Tests that damage a cache make their own."""
    return tmp_path_factory.mktemp("app_cache")


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs mounted for the test (a disk that fills up); skips where mounting is not allowed."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN): {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
