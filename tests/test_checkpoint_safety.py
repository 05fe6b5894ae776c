"""Checkpoints that lose nothing: checksums, damaged manifests and pointers, resume selection,
rotation, failed saves (a full disk, on one rank or all) and refusals that change nothing."""

from __future__ import annotations

import errno
import json
import random
import re
import shutil
import uuid
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from launch.checkpoint_tool import main as tool
from moe_parallel.checkpoints import checkpoint as ckpt
from moe_parallel.checkpoints.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from moe_parallel.checkpoints.store import (
    FORMAT_VERSION,
    check_resume_step,
    file_checksum,
    lineage,
    list_checkpoints,
    read_manifest,
    resolve_checkpoint,
    rotate_checkpoints,
    select_resume,
    step_tag,
    verify_checkpoint,
    write_file,
    write_latest,
    write_manifest,
)
from tests.dist_utils import run_distributed

# ---------------------------------------------------------------- checkpoints without a model (fast)


def fake_checkpoint(root: Path, step: int, *, parent=None, clean=None, latest=True, tag=None) -> Path:
    """A valid format-2 checkpoint holding one small file (what resume selection and rotation read)."""
    path = root / (tag or step_tag(step))
    path.mkdir(parents=True)
    entry = write_file({"w": torch.full((64,), float(step))}, path / "trainer.pt")
    manifest = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "saved_world_size": 1,
        "moe_layers": {},
        "expert_parameters": {},
        "files": {"trainer.pt": entry},
        **lineage(root, parent, clean),
    }
    write_manifest(path, manifest)
    if latest:
        write_latest(root, path.name)
    return path


def _random_state(gen: random.Random) -> dict:
    dtypes = [torch.float32, torch.bfloat16, torch.int64, torch.float16]
    return {f"t{i}": torch.randn(gen.randint(0, 3000)).to(gen.choice(dtypes)) for i in range(gen.randint(1, 5))} | {
        "nested": {"step": gen.randint(0, 10**6), "name": uuid.uuid4().hex}
    }


def test_checksums_are_those_of_the_bytes_on_disk(tmp_path):
    gen = random.Random(0)
    for i in range(20):
        path = tmp_path / f"f{i}.pt"
        entry = write_file(_random_state(gen), path)
        assert entry["bytes"] == path.stat().st_size
        assert entry["crc32"] == file_checksum(path)


def test_any_in_place_corruption_of_the_same_size_is_caught(tmp_path):
    gen = random.Random(1)
    path = fake_checkpoint(tmp_path, 3)
    manifest = read_manifest(path)
    file = path / "trainer.pt"
    original = file.read_bytes()
    for _ in range(30):
        data = bytearray(original)
        start = gen.randrange(len(data))
        for k in range(start, min(len(data), start + gen.randint(1, 4096))):
            data[k] = (data[k] + gen.randint(1, 255)) % 256  # always a different byte
        file.write_bytes(bytes(data))
        assert file.stat().st_size == len(original)
        read_manifest(path)  # sizes still match: only the checksum can tell
        _, problems = verify_checkpoint(path)
        assert len(problems) == 1 and f"{file} is corrupt" in problems[0]
        with pytest.raises(CheckpointError, match=f"{file} is corrupt: its crc32 is"):
            ckpt.load_file(path, "trainer.pt", manifest)
    file.write_bytes(original)
    assert verify_checkpoint(path)[1] == []


def test_format_1_checkpoints_still_load_without_checksums(tmp_path, capsys):
    path = fake_checkpoint(tmp_path, 7)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["format_version"] = 1
    manifest["files"] = {rel: entry["bytes"] for rel, entry in manifest["files"].items()}
    for key in ("parent", "trained_cleanly", "known_good"):
        del manifest[key]
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert read_manifest(path)["files"] == {"trainer.pt": {"bytes": (path / "trainer.pt").stat().st_size}}
    assert select_resume(tmp_path, "auto").path == path
    code, out, _ = _tool(capsys, "verify", tmp_path)
    assert code == 0 and "format 1: no checksums to check" in out
    assert torch.equal(ckpt.load_file(path, "trainer.pt", read_manifest(path))["w"], torch.full((64,), 7.0))


def _tool(capsys, *argv) -> tuple[int, str, str]:
    code = tool([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_damaged_manifest_is_an_error_naming_it(tmp_path, capsys):
    path = fake_checkpoint(tmp_path, 5)
    manifest_file = path / "manifest.json"
    text = manifest_file.read_text()
    gen = random.Random(2)
    cut_points = [0, 1, len(text) - 1] + [gen.randrange(len(text)) for _ in range(10)]
    damaged = [text[:n] for n in cut_points] + ["\x00\xff garbage", "[1, 2]"]
    valid = json.loads(text)
    for key, value in [
        ("step", "5"),
        ("files", ["trainer.pt"]),
        ("files", {"../../etc/passwd": {"bytes": 1, "crc32": "00000000"}}),
        ("files", {"trainer.pt": {"bytes": 1, "crc32": "xyz"}}),
        ("format_version", 99),
    ]:
        damaged.append(json.dumps({**valid, key: value}))
    for content in damaged:
        manifest_file.write_bytes(content.encode("utf-8", "surrogateescape"))
        with pytest.raises(CheckpointError, match=f"{manifest_file} is not (valid JSON|a valid manifest)"):
            read_manifest(path)
        for command in (["verify", tmp_path], ["export", tmp_path, "--out", tmp_path / "x.pt"]):
            code, out, err = _tool(capsys, *command)
            assert code == 2 and str(manifest_file) in out + err and "Traceback" not in out + err
        # Resume selection treats it as incomplete: no other checkpoint, so nothing would load.
        with pytest.raises(CheckpointError, match="none is complete.*No checkpoint would load"):
            select_resume(tmp_path, "auto")


@pytest.mark.parametrize("content", [b"", b"\n", b"\xff\xfe\x00", b"../elsewhere", b"step_00000099"])
def test_a_damaged_latest_pointer_is_named_and_auto_resume_falls_back(tmp_path, content):
    fake_checkpoint(tmp_path, 2)
    newest = fake_checkpoint(tmp_path, 4)
    (tmp_path / "latest").write_bytes(content)
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'latest'} .*newest complete checkpoint is {newest}"):
        resolve_checkpoint(tmp_path)
    choice = select_resume(tmp_path, "auto")
    assert choice.path == newest and choice.step == 4 and str(tmp_path / "latest") in choice.reason


# ---------------------------------------------------------------- resume selection


def test_resume_auto_and_never_on_an_empty_folder(tmp_path):
    assert select_resume(tmp_path / "missing", "auto") is None
    assert select_resume(tmp_path, "auto") is None
    assert select_resume(tmp_path, "never") is None
    (tmp_path / "step_00000001.tmp-1234abcd").mkdir()  # a first save that crashed is no checkpoint
    assert select_resume(tmp_path, "auto") is None


def test_resume_auto_prefers_latest_and_falls_back_to_the_newest_complete(tmp_path):
    fake_checkpoint(tmp_path, 10)
    second = fake_checkpoint(tmp_path, 20)
    choice = select_resume(tmp_path, "auto")
    assert (choice.path, choice.step) == (second, 20) and "names it" in choice.reason

    (tmp_path / "latest").unlink()  # a crash between the rename and the pointer update
    choice = select_resume(tmp_path, "auto")
    assert (choice.path, choice.step) == (second, 20) and "is missing" in choice.reason

    write_latest(tmp_path, "step_00000010")  # a stale pointer: the newer checkpoint is complete
    choice = select_resume(tmp_path, "auto")
    assert choice.path == second and "names step_00000010, but this one is newer" in choice.reason


def test_resume_never_destroys_a_newer_checkpoint(tmp_path):
    older = fake_checkpoint(tmp_path, 10)
    newer = fake_checkpoint(tmp_path, 20)
    with pytest.raises(CheckpointError, match="train.resume=never, but .* already holds checkpoints"):
        select_resume(tmp_path, "never")
    with pytest.raises(CheckpointError, match=f"would overwrite .* {newer.name} .*train.resume={newer}"):
        select_resume(tmp_path, str(older))
    # A newer checkpoint that is incomplete (truncated manifest) blocks auto-resume from the older one.
    (newer / "manifest.json").write_text('{"format_version": 2, "st')
    with pytest.raises(CheckpointError, match=f"would overwrite .*{newer.name} .*incomplete.*not valid JSON.*mv "):
        select_resume(tmp_path, "auto")
    aside = tmp_path.parent / "aside"
    aside.mkdir()
    shutil.move(newer, aside)
    choice = select_resume(tmp_path, "auto")
    assert choice.path == older and "latest" in choice.reason


def test_an_explicit_resume_path_must_exist_and_be_complete(tmp_path):
    run = tmp_path / "run" / "checkpoints"
    good = fake_checkpoint(run, 8)
    typo = tmp_path / "run" / "checkpoints" / "step_0000008"
    with pytest.raises(CheckpointError, match=f"{typo} does not exist .*newest complete checkpoint is {good}"):
        select_resume(run, str(typo))
    # A checkpoint of another run (e.g. to fine-tune) into an empty folder is fine; a checkpoints
    # folder means its newest complete checkpoint.
    other = fake_checkpoint(tmp_path / "other", 3)
    assert select_resume(tmp_path / "fresh", str(other)).path == other
    assert select_resume(tmp_path / "fresh", str(tmp_path / "other")).path == other
    (other / "trainer.pt").unlink()
    with pytest.raises(CheckpointError, match="is missing trainer.pt.*No earlier complete checkpoint"):
        select_resume(tmp_path / "fresh", str(other))


def test_only_incomplete_checkpoints_is_an_error_not_a_fresh_start(tmp_path):
    path = fake_checkpoint(tmp_path, 4)
    (path / "trainer.pt").unlink()
    (tmp_path / "step_00000008").mkdir()  # renamed by hand, emptied
    with pytest.raises(CheckpointError, match="none is complete"):
        select_resume(tmp_path, "auto")
    # A pointer without any checkpoint: removed by hand; not a reason to start over silently.
    shutil.rmtree(path)
    shutil.rmtree(tmp_path / "step_00000008")
    with pytest.raises(CheckpointError, match="names step_00000004, which does not exist.*holds no checkpoint"):
        select_resume(tmp_path, "auto")


def test_train_steps_below_the_checkpoint_step_names_both(tmp_path):
    choice = select_resume(tmp_path, str(fake_checkpoint(tmp_path, 12)))
    with pytest.raises(CheckpointError, match="train.steps=7 is below the step of the checkpoint .*\\(12, "):
        check_resume_step(choice, 7)
    check_resume_step(choice, 12)
    check_resume_step(choice, 13)
    check_resume_step(None, 1)


# ---------------------------------------------------------------- rotation


@pytest.mark.parametrize("seed", range(6))
def test_rotation_keeps_the_newest_a_known_good_and_the_resume_point(tmp_path, seed):
    """A random run: resumes, clean and non-finite segments, crashes that leave staging folders."""
    gen = random.Random(seed)
    keep = gen.randint(1, 3)
    fake_checkpoint(tmp_path, 0, tag="imported")  # another tag: never rotated
    step, parent, protect = 0, None, None
    good: set[str] = set()  # names of checkpoints that a later clean save names as parent
    for _ in range(25):
        event = gen.random()
        if event < 0.15 and list_checkpoints(tmp_path):
            # A new job resumes from the newest complete checkpoint.
            choice = select_resume(tmp_path, "auto")
            step, parent, protect = choice.step, choice.path, choice.path
            continue
        if event < 0.25:
            (tmp_path / f"{step_tag(step + 1)}.tmp-{gen.randrange(16**8):08x}").mkdir()  # a crashed save
            continue
        step += gen.randint(1, 5)
        clean = gen.random() < 0.8
        if clean and parent is not None:
            good.add(Path(parent).name)
        parent = fake_checkpoint(tmp_path, step, parent=parent, clean=clean)
        before = {c.path.name for c in list_checkpoints(tmp_path)}
        rotate_checkpoints(tmp_path, keep, protect=protect)
        after = [c for c in list_checkpoints(tmp_path)]
        names = {c.path.name for c in after}
        rotated = sorted(n for n in before if n.startswith("step_"))
        assert set(rotated[-keep:]) <= names  # the newest `keep`
        assert "imported" in names
        assert all(c.complete for c in after)
        assert not list(tmp_path.glob("*.tmp-*"))  # stale staging is gone
        good_now = sorted(n for n in good if n in before and n.startswith("step_"))
        if good_now:
            assert good_now[-1] in names  # the newest known-good survives
        if protect is not None and protect.name in before:
            newer_good = [n for n in good_now if n > protect.name]
            assert newer_good or protect.name in names  # the resume point, until a newer one is known-good
        # Deleted only what the rules allow.
        allowed = set(rotated[:-keep]) - ({good_now[-1]} if good_now else set())
        assert before - names <= allowed


def test_rotation_with_keep_one_keeps_a_checkpoint_that_trained_cleanly(tmp_path):
    resumed = fake_checkpoint(tmp_path, 10)
    a = fake_checkpoint(tmp_path, 12, parent=resumed, clean=False)  # the loss went non-finite after resuming
    rotate_checkpoints(tmp_path, 1, protect=resumed)
    assert resumed.exists() and a.exists()
    b = fake_checkpoint(tmp_path, 14, parent=a, clean=True)
    rotate_checkpoints(tmp_path, 1, protect=resumed)
    # `a` is known-good now (b trained cleanly from it), so the resume point may go.
    assert not resumed.exists() and a.exists() and b.exists()
    c = fake_checkpoint(tmp_path, 16, parent=b, clean=True)
    rotate_checkpoints(tmp_path, 1, protect=resumed)
    assert not a.exists() and b.exists() and c.exists()
    with pytest.raises(ValueError, match="keep=0"):
        rotate_checkpoints(tmp_path, 0)


# ---------------------------------------------------------------- with a model: loads and saves on 2 ranks


def _engine(ep: int):
    from tests.test_checkpoint import _engine as build

    return build(ep=ep, zero=1)


def _params(engine) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def _two_rank_faults(rank, world, tmp):
    from tests.test_checkpoint import _train

    tmp = Path(tmp)
    engine, _ = _engine(ep=2)
    _train(engine, 2)
    good = save_checkpoint(engine, tmp)
    _train(engine, 1, start=2)
    before = _params(engine)

    # A fault in a file only rank 1 reads (its expert) fails the load on both ranks, before any change.
    expert = good / "experts" / "layer_0" / "expert_3.pt"
    original = expert.read_bytes()
    dist.barrier()
    if rank == 0:
        data = bytearray(original)
        data[len(data) // 2 : len(data) // 2 + 2048] = bytes(
            b ^ 0x5A for b in data[len(data) // 2 : len(data) // 2 + 2048]
        )
        expert.write_bytes(bytes(data))
    dist.barrier()
    with pytest.raises(CheckpointError, match=f"rank 1: checkpoint file {expert} is corrupt"):
        load_checkpoint(engine, tmp)
    assert all(torch.equal(p, before[n]) for n, p in _params(engine).items())
    if rank == 0:
        code = tool(["verify", str(tmp)])
        assert code == 2
        assert tool(["export", str(tmp), "--out", str(tmp / "model.pt")]) == 2 and not (tmp / "model.pt").exists()
        expert.write_bytes(original)
    dist.barrier()

    # A full disk on one rank only: every rank gets the same error, none hangs, nothing changes.
    real_write = ckpt.write_file

    def full_on_rank_1(obj, path):
        if rank == 1 and "rng" in path.parts:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(obj, path)

    ckpt.write_file = full_on_rank_1
    with pytest.raises(
        CheckpointError, match=f"step 3 not saved: rank 1: no space left on {tmp} .*{good} is unchanged"
    ):
        save_checkpoint(engine, tmp)
    ckpt.write_file = real_write
    dist.barrier()
    assert (tmp / "latest").read_text() == good.name and not list(tmp.glob("*.tmp-*"))
    assert not (tmp / step_tag(3)).exists()

    # A tag is never re-used for the same or an older step.
    engine.global_steps = 2
    with pytest.raises(CheckpointError, match="already holds a checkpoint of step 2; saving step 2 there"):
        save_checkpoint(engine, tmp)
    engine.global_steps = 1
    with pytest.raises(CheckpointError, match="already holds a checkpoint of step 2; saving step 1 there"):
        save_checkpoint(engine, tmp, tag=good.name)
    assert (tmp / "latest").read_text() == good.name and not list(tmp.glob("*.tmp-*"))
    engine.global_steps = 3
    rolling = save_checkpoint(engine, tmp, tag=good.name, parent=good, trained_cleanly=True)  # a later step: fine
    assert read_manifest(rolling)["step"] == 3
    load_checkpoint(engine, tmp)
    assert engine.global_steps == 3 and all(torch.equal(p, before[n]) for n, p in _params(engine).items())


def test_faults_on_one_rank_fail_every_rank_and_change_nothing(tmp_path):
    run_distributed(_two_rank_faults, 2, str(tmp_path), timeout=300)


# ---------------------------------------------------------------- a real full disk (tmpfs)


def _fill_to(directory: Path, free: int) -> Path:
    """Leave about ``free`` bytes free on ``directory``'s filesystem."""
    filler = directory.parent / f"filler-{uuid.uuid4().hex[:6]}"
    size = max(0, shutil.disk_usage(directory).free - free)
    with open(filler, "wb") as file:
        try:
            file.write(b"\0" * size)
        except OSError:
            pass
    return filler


def _disk_full(rank, world, mount):
    from tests.test_checkpoint import _train

    ckpts = Path(mount) / "checkpoints"
    engine, _ = _engine(ep=1)
    _train(engine, 1)
    save_checkpoint(engine, ckpts)
    one = shutil.disk_usage(ckpts).used  # this filesystem holds nothing else
    failed_writing = set()
    gen = random.Random(0)
    for i in range(14):
        _train(engine, 1, start=i + 1)
        filler = _fill_to(ckpts, gen.randint(0, int(one * 1.3)))
        previous = (ckpts / "latest").read_text()
        try:
            saved = save_checkpoint(engine, ckpts, parent=ckpts / previous, trained_cleanly=True)
        except CheckpointError as err:
            msg = str(err)
            assert f"not saved: no space left on {ckpts}" in msg, msg
            assert f"{ckpts / previous} is unchanged" in msg
            writing = re.search(r"\(writing (\S+?)[,)]", msg)
            failed_writing.add(Path(writing.group(1)).name if writing else "")
            assert (ckpts / "latest").read_text() == previous
            assert not list(ckpts.glob("*.tmp-*")), "the staging directory is left behind"
            assert not (ckpts / step_tag(engine.global_steps)).exists()
            assert verify_checkpoint(ckpts / previous)[1] == []
        else:
            assert (ckpts / "latest").read_text() == saved.name and verify_checkpoint(saved)[1] == []
            rotate_checkpoints(ckpts, 1)
        filler.unlink()
    assert len(failed_writing) >= 2, failed_writing  # the fault struck at several points of a save
    load_checkpoint(engine, ckpts)  # what `latest` names loads


def test_a_full_disk_fails_the_save_cleanly(small_tmpfs):
    run_distributed(_disk_full, 1, str(small_tmpfs), timeout=300)
