"""Loading a checkpoint never runs code from it: every file we write is tensors and plain data, every
file we read goes through torch's restricted unpickler, and a file replaced by a pickle that would
run a command (its checksum recomputed, as anyone with write access can) is refused by name in
loads, ``verify``, ``export`` and ``migrate``; the command never runs. Checkpoints of earlier formats
convert once with ``checkpoint_tool migrate --trust``."""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from launch.checkpoint_tool import main as tool
from moe_parallel.checkpoints import checkpoint as ckpt
from moe_parallel.checkpoints.migrate import CONVERTED_SUFFIX, migrate_checkpoint
from moe_parallel.checkpoints.safe_files import UnsafeFileError, load_plain, require_safe_torch, to_plain
from moe_parallel.checkpoints.store import (
    CHECKSUM,
    MIGRATION_JOURNAL,
    CheckpointError,
    file_checksum,
    load_file,
    read_manifest,
    write_file,
)
from tests import crash_points

# ---------------------------------------------------------------- plain data


def _random_plain(gen: random.Random, depth: int = 0):
    leaves = [
        lambda: gen.randint(-(2**70), 2**70),
        lambda: gen.random(),
        lambda: "".join(gen.choice("aé€\n") for _ in range(gen.randint(0, 5))),
        lambda: None,
        lambda: gen.random() < 0.5,
        lambda: complex(gen.random(), 1),
        lambda: torch.randn(gen.randint(0, 5), generator=torch.Generator().manual_seed(gen.randrange(99))),
        lambda: torch.arange(gen.randint(0, 5), dtype=gen.choice([torch.int64, torch.uint8, torch.bfloat16])),
        lambda: torch.Size([gen.randint(0, 3)]),
        lambda: gen.choice([torch.float32, torch.bfloat16]),
        lambda: torch.device("cpu"),
    ]
    if depth > 2 or gen.random() < 0.4:
        return gen.choice(leaves)()
    kind = gen.choice([dict, collections.OrderedDict, list, tuple, set])
    if kind in (dict, collections.OrderedDict):
        return kind((gen.choice([str(i), i]), _random_plain(gen, depth + 1)) for i in range(gen.randint(0, 4)))
    if kind is set:
        return {gen.randint(0, 9) for _ in range(gen.randint(0, 4))}
    return kind(_random_plain(gen, depth + 1) for _ in range(gen.randint(0, 4)))


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return type(a) is type(b) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def test_plain_data_round_trips_through_the_restricted_loader(tmp_path):
    gen = random.Random(0)
    for i in range(200):
        value = {"v": _random_plain(gen)}
        write_file(value, tmp_path / f"{i}.pt")
        assert _equal(load_plain(tmp_path / f"{i}.pt"), value), value


def test_numpy_values_become_numbers_and_tensors():
    value = to_plain({"a": np.float64(1.5), "b": np.arange(4, dtype=np.uint32), "c": [np.int8(3)], "d": np.bool_(1)})
    assert value["a"] == 1.5 and type(value["a"]) is float and value["c"] == [3] and value["d"] is True
    assert value["b"].dtype == torch.int64 and value["b"].tolist() == [0, 1, 2, 3]


class _Opaque:
    pass


@pytest.mark.parametrize(
    "bad, kind",
    [
        (_Opaque(), "_Opaque"),
        (collections.defaultdict(int), "defaultdict"),
        (frozenset([1]), "frozenset"),
        (slice(1, 2), "slice"),
        (b"", "bytes"),
        (lambda: 0, "function"),
        (np.array(["x"]), "NumPy array of <U1"),
        (torch.nn.Linear(1, 1), "Linear"),
        ({(1, 2): 3}, "key of type tuple"),
    ],
)
def test_anything_else_is_refused_before_the_file_is_written(tmp_path, bad, kind):
    with pytest.raises(TypeError, match=kind) as err:
        write_file({"client_state": {"x": [1, bad]}}, tmp_path / "trainer.pt")
    assert "trainer.pt['client_state']['x'][1]" in str(err.value)
    assert not (tmp_path / "trainer.pt").exists()


def test_torch_older_than_2_6_is_refused():
    for old in ("2.5.1", "2.5.0+cu121", "1.13.1", "garbage"):
        with pytest.raises(UnsafeFileError, match="install torch>=2.6"):
            require_safe_torch(old)
    for ok in ("2.6.0", "2.13.0+cpu", "3.0.0a0"):
        require_safe_torch(ok)


def test_rng_states_round_trip_as_plain_data():
    random.seed(3)
    np.random.seed(4)
    np.random.standard_normal()  # a cached Gaussian in NumPy's state
    torch.manual_seed(5)
    saved = ckpt._rng_state()
    buf = io.BytesIO()
    torch.save(saved, buf)
    buf.seek(0)
    expected = (random.random(), np.random.standard_normal(), np.random.rand(), torch.rand(2))
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    ckpt._set_rng_state(torch.load(buf, weights_only=True))
    again = (random.random(), np.random.standard_normal(), np.random.rand(), torch.rand(2))
    assert expected[:3] == again[:3] and torch.equal(expected[3], again[3])


# ---------------------------------------------------------------- tampered files


class _RunsACommand:
    """What an attacker puts in a file: unpickling it calls os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _payloads(marker: Path) -> dict[str, bytes]:
    """The same command as a torch zip archive (beside real tensors) and as a bare pickle."""
    archive = io.BytesIO()
    torch.save({"param": torch.zeros(2), "x": _RunsACommand(marker)}, archive)
    return {"zip": archive.getvalue(), "pickle": pickle.dumps(_RunsACommand(marker))}


def tamper(checkpoint: Path, rel: str, payload: bytes) -> None:
    """Replace one file and record its new size and checksum in the manifest, as an attacker can."""
    (checkpoint / rel).write_bytes(payload)
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["files"][rel] = {"bytes": len(payload), CHECKSUM: file_checksum(checkpoint / rel)}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def toy_checkpoints(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("toy") / "checkpoints"
    crash_points.run("tests.fault_ops:toy_checkpoints", str(path), 1)
    return path


def test_every_file_tampered_in_turn_is_refused_by_name_and_runs_nothing(tmp_path, toy_checkpoints, capsys):
    marker = tmp_path / "pwned"
    source = toy_checkpoints / "step_00000001"
    files = list(read_manifest(source)["files"])
    assert {f.split("/")[0] for f in files} == {"dense", "buffers", "experts", "rng", "trainer.pt"}
    for rel in files:
        for form, payload in _payloads(marker).items():
            checkpoint = tmp_path / f"{rel.replace('/', '_')}-{form}" / "step_00000001"
            shutil.copytree(source, checkpoint)
            tamper(checkpoint, rel, payload)
            manifest = read_manifest(checkpoint)
            with pytest.raises(CheckpointError, match="could run code, so it is refused") as err:
                load_file(checkpoint, rel, manifest)
            assert str(checkpoint / rel) in str(err.value) and "changed after it was written" in str(err.value)
            capsys.readouterr()
            assert tool(["verify", str(checkpoint)]) == 2
            assert f"{checkpoint / rel} holds objects other than tensors" in capsys.readouterr().out
            export = tool(["export", str(checkpoint), "--out", str(checkpoint.parent / "model.pt")])
            assert export == (2 if rel.split("/")[0] in ("dense", "buffers", "experts") else 0)
            assert not marker.exists(), f"{rel} ({form}) ran its command"


# ---------------------------------------------------------------- earlier formats


def to_format_2(checkpoint: Path) -> dict:
    """Rewrite a checkpoint as format 2 wrote it: NumPy's RNG state as NumPy objects. Returns the states."""
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    states = {}
    for rel in [r for r in manifest["files"] if r.startswith("rng/")]:
        state = torch.load(checkpoint / rel, weights_only=True)
        n = state["numpy"]
        state["numpy"] = (n["bit_generator"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], 0.25)
        states[rel] = state
        with open(checkpoint / rel, "wb") as f:  # torch.save as format 2 did, NumPy objects and all
            torch.save(state, f)
        manifest["files"][rel] = {"bytes": (checkpoint / rel).stat().st_size, CHECKSUM: file_checksum(checkpoint / rel)}
    manifest["format_version"] = 2
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    return states


def test_a_format_2_checkpoint_is_refused_with_the_fix_and_migrates_once(tmp_path, toy_checkpoints, capsys):
    folder = tmp_path / "checkpoints"
    shutil.copytree(toy_checkpoints, folder)
    checkpoint = folder / "step_00000001"
    states = to_format_2(checkpoint)
    untouched = {p: p.read_bytes() for p in checkpoint.rglob("*.pt") if not p.parts[-2] == "rng"}
    with pytest.raises(CheckpointError, match=f"migrate --trust {folder}"):
        load_file(checkpoint, "rng/rank_0.pt", read_manifest(checkpoint))
    assert tool(["migrate", str(folder)]) == 2
    assert "--trust" in capsys.readouterr().err
    assert tool(["migrate", str(folder), "--trust"]) == 0
    assert "format 2 -> 3, rewrote rng/rank_0.pt" in capsys.readouterr().out
    manifest = read_manifest(checkpoint)
    assert manifest["format_version"] == 3 and manifest["migrated_from"] == 2
    rng = load_file(checkpoint, "rng/rank_0.pt", manifest)
    old = states["rng/rank_0.pt"]["numpy"]
    assert rng["numpy"]["key"].tolist() == old[1].tolist() and rng["numpy"]["cached_gaussian"] == 0.25
    assert {p: p.read_bytes() for p in untouched} == untouched  # tensors are not rewritten
    assert tool(["verify", str(folder), "--all"]) == 0
    assert tool(["migrate", str(folder), "--trust"]) == 0  # once: a second run changes nothing
    assert "format 3: nothing to convert" in capsys.readouterr().out


def test_migrate_converts_numpy_arrays_only_and_runs_nothing(tmp_path, toy_checkpoints, capsys):
    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "step_00000001"
    shutil.copytree(toy_checkpoints / "step_00000001", checkpoint)
    to_format_2(checkpoint)
    tamper(checkpoint, "rng/rank_0.pt", _payloads(marker)["zip"])
    before = {p: p.read_bytes() for p in checkpoint.rglob("*") if p.is_file()}
    assert tool(["migrate", str(checkpoint), "--trust"]) == 2
    err = capsys.readouterr().err
    assert "posix.system" in err and "not converted" in err
    assert not marker.exists()
    assert {p: p.read_bytes() for p in checkpoint.rglob("*") if p.is_file()} == before


def migrate_for_sweep(checkpoint: str) -> None:
    crash_points.arm()
    migrate_checkpoint(checkpoint, trust=True)


@pytest.mark.parametrize("n", [pytest.param(3, id="sample"), pytest.param(24, id="full", marks=pytest.mark.slow)])
def test_a_kill_during_migrate_is_finished_or_undone_by_the_next_run(tmp_path, toy_checkpoints, n):
    source = tmp_path / "format2"
    shutil.copytree(toy_checkpoints / "step_00000001", source)
    states = to_format_2(source)
    count = tmp_path / "count"
    shutil.copytree(source, count)
    total = crash_points.count("tests.test_checkpoint_security:migrate_for_sweep", str(count)).events
    for k in crash_points.kill_points(total, n, seed=n):
        checkpoint = tmp_path / f"kill{k}"
        shutil.copytree(source, checkpoint)
        crash_points.run("tests.test_checkpoint_security:migrate_for_sweep", str(checkpoint), kill_at=k)
        journal = (checkpoint / MIGRATION_JOURNAL).exists()
        if journal:  # mid-way: refused, naming the command that finishes it
            with pytest.raises(CheckpointError, match="migrate --trust"):
                read_manifest(checkpoint)
        migrate_checkpoint(checkpoint, trust=True)
        manifest = read_manifest(checkpoint)
        assert manifest["format_version"] == 3, k
        for rel in manifest["files"]:
            load_file(checkpoint, rel, manifest)
        rng = load_file(checkpoint, "rng/rank_0.pt", manifest)["numpy"]
        assert rng["key"].tolist() == states["rng/rank_0.pt"]["numpy"][1].tolist(), k
        assert not list(checkpoint.rglob(f"*{CONVERTED_SUFFIX}")) and not (checkpoint / MIGRATION_JOURNAL).exists()


# ---------------------------------------------------------------- signed checkpoints


def _signed_checkpoint(root: Path) -> Path:
    from moe_parallel.checkpoints.store import FORMAT_VERSION, lineage, write_manifest

    path = root / "step_00000001"
    path.mkdir(parents=True)
    files = {
        rel: write_file({"w": torch.arange(1000.0) * i}, path / rel)
        for i, rel in enumerate(["trainer.pt", "dense/stage_0.pt"])
        if (path / rel).parent.mkdir(exist_ok=True) is None
    }
    manifest = {"format_version": FORMAT_VERSION, "step": 1, "saved_world_size": 1, "moe_layers": {}, "files": files}
    write_manifest(path, {**manifest, **lineage(root, None, None)})
    return path


def _forge_crc(original: bytes, at: int) -> bytes:
    """``original`` with its last bytes changed and bytes [at, at+4) patched so that the CRC-32 (and the
    size) stay the same: CRC-32 is affine in the message bits, so 32 free bits reach any target."""
    import zlib

    data = original[:-8] + bytes(b ^ 0x5A for b in original[-8:])

    def crc_with(patch: int) -> int:
        return zlib.crc32(data[:at] + patch.to_bytes(4, "little") + data[at + 4 :])

    base, target = crc_with(0), zlib.crc32(original)
    columns = [crc_with(1 << bit) ^ base for bit in range(32)]  # the linear part, column by column
    rows = [(columns_bit, 1 << bit) for bit, columns_bit in enumerate(columns)]
    want, solution = base ^ target, 0
    basis: list[tuple[int, int]] = []  # Gaussian elimination over GF(2) on (effect, patch) pairs
    for effect, patch in rows:
        for b_effect, b_patch in basis:
            if effect ^ b_effect < effect:
                effect, patch = effect ^ b_effect, patch ^ b_patch
        if effect:
            basis.append((effect, patch))
            basis.sort(reverse=True)
    for b_effect, b_patch in basis:
        if want ^ b_effect < want:
            want, solution = want ^ b_effect, solution ^ b_patch
    assert want == 0
    forged = data[:at] + solution.to_bytes(4, "little") + data[at + 4 :]
    assert forged != original and zlib.crc32(forged) == zlib.crc32(original) and len(forged) == len(original)
    return forged


def test_with_a_key_a_run_loads_only_checkpoints_signed_with_it(tmp_path, monkeypatch):
    from moe_parallel.checkpoints.store import SIGNATURE, SIGNING_KEY_ENV, verify_checkpoint

    monkeypatch.setenv(SIGNING_KEY_ENV, "our secret")
    path = _signed_checkpoint(tmp_path / "signed")
    manifest = read_manifest(path)
    assert SIGNATURE in manifest and all("sha256" in e for e in manifest["files"].values())
    assert torch.equal(load_file(path, "dense/stage_0.pt", manifest)["w"], torch.arange(1000.0))
    assert verify_checkpoint(path)[1] == []

    # A file replaced and its CRC recorded anew: the manifest no longer matches its signature.
    copy = tmp_path / "recorded" / "step_00000001"
    shutil.copytree(path, copy)
    tamper(copy, "dense/stage_0.pt", (copy / "trainer.pt").read_bytes())
    with pytest.raises(CheckpointError, match="signature that does not match"):
        read_manifest(copy)
    # A file changed with its CRC-32 forged to match (the manifest untouched): the SHA-256 tells.
    copy = tmp_path / "forged" / "step_00000001"
    shutil.copytree(path, copy)
    data = (copy / "dense/stage_0.pt").read_bytes()
    (copy / "dense/stage_0.pt").write_bytes(_forge_crc(data, len(data) // 2))
    with pytest.raises(CheckpointError, match="does not match the SHA-256 its signed manifest records"):
        load_file(copy, "dense/stage_0.pt", read_manifest(copy))
    assert len(verify_checkpoint(copy)[1]) == 1

    # Another key, or none at save time: refused, naming the variable.
    monkeypatch.setenv(SIGNING_KEY_ENV, "another secret")
    with pytest.raises(CheckpointError, match=f"does not match with the key in {SIGNING_KEY_ENV}"):
        read_manifest(path)
    monkeypatch.delenv(SIGNING_KEY_ENV)
    unsigned = _signed_checkpoint(tmp_path / "unsigned")
    assert read_manifest(path)[SIGNATURE]  # without a key, signatures are not required or checked
    monkeypatch.setenv(SIGNING_KEY_ENV, "our secret")
    with pytest.raises(CheckpointError, match=f"is not signed with the key in {SIGNING_KEY_ENV}"):
        read_manifest(unsigned)
