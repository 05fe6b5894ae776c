"""Every ``checkpoint_tool`` command, every file it reads, damaged in place: the command exits 2 with a
message naming the file (never a traceback, never a result built from the damaged bytes).

Damage: the file truncated at a random length (empty included), or its bytes replaced by random ones
of the same length. Drawn with fixed seeds; ``make test-slow`` draws more per file.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from launch.checkpoint_tool import main as tool
from tests import crash_points

DRAWS = [pytest.param(1, id="sample"), pytest.param(6, id="full", marks=pytest.mark.slow)]


def damage(file: Path, gen: random.Random) -> str:
    data = file.read_bytes()
    if gen.random() < 0.5 or len(data) < 2:
        cut = gen.randrange(len(data))
        file.write_bytes(data[:cut])
        return f"truncated to {cut} of {len(data)} bytes"
    noise = bytes(gen.randrange(256) for _ in range(len(data)))
    file.write_bytes(noise)
    return f"{len(data)} random bytes"


def _files(root: Path, skip: tuple[str, ...] = ()) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and not p.name.startswith(skip))


def _check(capsys, argv: list[str], damaged: Path, what: str) -> None:
    capsys.readouterr()
    code = tool(argv)
    out, err = capsys.readouterr()
    assert code == 2, f"{damaged} {what}: {' '.join(argv[:1])} exited {code}\n{out}{err}"
    assert str(damaged) in out + err or str(damaged.parent) in out + err, f"{damaged} {what}: not named\n{out}{err}"


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    from tests.hf_app_fixtures import tiny_family_model

    tmp = tmp_path_factory.mktemp("cli")
    crash_points.run("tests.fault_ops:toy_checkpoints", str(tmp / "toy"), 1)
    assert tool(["export", str(tmp / "toy"), "--out", str(tmp / "export" / "model.pt")]) == 0
    tiny_family_model("qwen3_moe", tmp / "hf", vocab_size=64, seed=1)
    assert tool(["import-hf", str(tmp / "hf"), "--out", str(tmp / "imported")]) == 0
    return {"toy": tmp / "toy", "export": tmp / "export", "hf": tmp / "hf", "imported": tmp / "imported"}


def damaged_copies(source: Path, rels: list[str], draws: int, into: Path) -> Iterator[tuple[Path, Path, str]]:
    """For each file of ``rels`` and each draw: a fresh copy of ``source`` with that file damaged;
    yields (the copy, the damaged file, how it was damaged)."""
    gen = random.Random(draws)
    for rel in rels:
        for i in range(draws):
            folder = into / f"{source.name}-{rel.replace('/', '_')}-{i}"
            shutil.copytree(source, folder)
            yield folder, folder / rel, damage(folder / rel, gen)


@pytest.mark.parametrize("draws", DRAWS)
def test_verify_and_export_name_any_damaged_checkpoint_file(tmp_path, sources, capsys, draws):
    for folder, file, what in damaged_copies(sources["toy"], _files(sources["toy"]), draws, tmp_path):
        _check(capsys, ["verify", str(folder)], file, what)
        needed = not file.name.startswith(("trainer", "rank_")) or what.startswith("truncated")
        if needed:  # export reads every file but the trainer's and RNG state (their sizes it checks)
            _check(capsys, ["export", str(folder), "--out", str(tmp_path / "m.pt")], file, what)


@pytest.mark.parametrize("draws", DRAWS)
def test_migrate_names_any_damaged_file_of_an_earlier_format(tmp_path, sources, capsys, draws):
    from tests.test_checkpoint_security import to_format_2

    old = tmp_path / "format2"
    shutil.copytree(sources["toy"] / "step_00000001", old)
    to_format_2(old)
    for folder, file, what in damaged_copies(old, _files(old), draws, tmp_path):
        before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        _check(capsys, ["migrate", str(folder), "--trust"], file, what)
        assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before  # nothing converted


@pytest.mark.parametrize("draws", DRAWS)
def test_import_names_a_damaged_export(tmp_path, sources, capsys, draws):
    for folder, file, what in damaged_copies(sources["export"], _files(sources["export"]), draws, tmp_path):
        _check(capsys, ["import", str(folder / "model.pt"), "--out", str(folder / "out")], file, what)
        assert not (folder / "out").exists()


@pytest.mark.parametrize("draws", DRAWS)
def test_import_hf_and_export_hf_name_a_damaged_file(tmp_path, sources, capsys, draws):
    read = ["config.json", "model.safetensors"]  # the tokenizer files are copied, not parsed
    for folder, file, what in damaged_copies(sources["hf"], read, draws, tmp_path):
        out = folder.parent / f"{folder.name}-out"
        _check(capsys, ["import-hf", str(folder), "--out", str(out)], file, what)
        assert not out.exists()
    # export-hf reads the checkpoint's weights and buffers and the model's config.json; the other files
    # of hf_model/ are copied as they are, the trainer's state is not read.
    files = [r for r in _files(sources["imported"]) if not r.endswith("trainer.pt")]
    parsed = [r for r in files if r == "hf_model/config.json" or not r.startswith("hf_model/")]
    for folder, file, what in damaged_copies(sources["imported"], parsed, draws, tmp_path):
        out = folder.parent / f"{folder.name}-hf"
        _check(capsys, ["export-hf", str(folder), "--out", str(out)], file, what)
        assert not out.exists()
