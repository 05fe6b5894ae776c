"""The on-disk side of checkpoints: checksummed files, manifests, the ``latest`` pointer, listing,
resume selection and rotation. It knows files and directories, not models (:mod:`.checkpoint` does).

One run's checkpoint directory::

    checkpoints/
      latest                        tag of the last completed save (``resume=auto`` checks it against the listing)
      step_00000100/                one checkpoint: manifest.json and the files it lists
      step_00000200.tmp-1a2b3c4d/   a save in progress or cut short: never loaded, removed by rotation

Guarantees (docs/failure-behaviour.md states them for users):

- Every file holds only tensors and plain data and is read with ``weights_only=True``
  (:mod:`.safe_files`): loading a checkpoint never runs code from it, and a file that holds anything
  else is refused by name (checksums prove integrity, not authorship).
- Signed checkpoints (optional): with a secret in ``MOE_PARALLEL_CHECKPOINT_KEY``, every file's
  SHA-256 is recorded beside its CRC and the manifest carries an HMAC-SHA256 of its content; with
  the variable set, only checkpoints signed with that key list, load or verify (a run requires its
  own checkpoints), and each file read is checked against its SHA-256 (a CRC is easy to forge).
- Persistent buffers (a router's ``expert_bias``) are files like parameters: listed by name in
  ``manifest.json`` (``buffers``), checksummed, and required by a load.
- Every file's CRC-32 is computed while ``torch.save`` streams it to disk (no second read) and
  recorded in ``manifest.json``; every load checks the files it reads against it.
- A save that fails on any rank (no space left, I/O error) fails on every rank, removes its staging
  directory and leaves ``latest`` and every earlier checkpoint as they were.
- A run never overwrites or rotates away a checkpoint newer than the one it resumed from:
  :func:`select_resume` refuses to start such a run, and a save refuses to replace a newer tag.
- Rotation keeps the newest ``keep`` checkpoints, the newest known-good one (see
  :func:`rotate_checkpoints`) and the checkpoint the run resumed from until a newer one is known-good.
  It renames a checkpoint out of the listing before deleting it, so a kill mid-delete leaves only a
  staging-marked directory that :func:`clear_interrupted` removes.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import hmac
import json
import os
import re
import shutil
import socket
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .safe_files import UnsafeFileError, load_plain, to_plain

# 3: every file loads with weights_only=True (RNG states without NumPy objects); 2: per-file
# {"bytes", "crc32"} and lineage fields; 1: {"file": bytes}
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
CHECKSUM = "crc32"
DIGEST = "sha256"  # recorded when checkpoints are signed
SIGNATURE = "hmac_sha256"
SIGNING_KEY_ENV = "MOE_PARALLEL_CHECKPOINT_KEY"
LATEST = "latest"
STAGING_MARK = ".tmp-"
DELETED_MARK = f"{STAGING_MARK}deleted-"  # a checkpoint that rotation has taken out of the listing
MIGRATION_JOURNAL = "manifest.migrating.json"  # a `checkpoint_tool migrate` in progress (see checkpoint_migrate)
_STEP_TAG = re.compile(r"step_(\d+)")
_CHUNK = 8 << 20


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt, does not match the model, or cannot be written."""


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def staging_name(tag: str) -> str:
    return f"{tag}{STAGING_MARK}{uuid.uuid4().hex[:8]}"


def signing_key() -> bytes | None:
    """The secret of :data:`SIGNING_KEY_ENV`, or None: checkpoints are not signed or required to be."""
    key = os.environ.get(SIGNING_KEY_ENV, "")
    return key.encode() if key else None


def _signature(manifest: dict[str, Any], key: bytes) -> str:
    body = {k: v for k, v in manifest.items() if k != SIGNATURE}
    return hmac.new(key, json.dumps(body, sort_keys=True, separators=(",", ":")).encode(), hashlib.sha256).hexdigest()


# ---------------------------------------------------------------- checksummed files


class _ChecksumWriter:
    """The file object ``torch.save`` writes to: each chunk is hashed on its way to disk.

    torch's zip writer only appends (``write`` and ``flush``), so the running CRC is the file's.
    A failed write is remembered: torch replaces it with its own "unexpected pos" error.
    """

    def __init__(self, file, digest: bool = False) -> None:
        self._file = file
        self.crc = 0
        self.sha256 = hashlib.sha256() if digest else None
        self.bytes = 0
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            written = self._file.write(data)
        except OSError as err:
            self.error = err
            raise
        self.crc = zlib.crc32(data, self.crc)
        if self.sha256 is not None:
            self.sha256.update(data)
        self.bytes += memoryview(data).nbytes
        return written

    def flush(self) -> None:
        try:
            self._file.flush()
        except OSError as err:
            self.error = err
            raise


def write_file(obj: Any, path: Path) -> dict[str, Any]:
    """``torch.save`` ``obj`` to ``path`` (synced to disk); returns its manifest entry ``{"bytes", "crc32"}``
    (and ``"sha256"`` when checkpoints are signed).

    ``obj`` must be tensors and plain data (NumPy values are converted): anything else is a
    ``TypeError`` naming where it sits, raised before the file is created. An ``OSError`` (e.g.
    ENOSPC) is raised as itself, not as torch's wrapper of it.
    """
    obj = to_plain(obj, path.name)
    with open(path, "wb") as file:
        writer = _ChecksumWriter(file, digest=signing_key() is not None)
        try:
            torch.save(obj, writer)
        except RuntimeError as err:
            if writer.error is not None:
                raise writer.error from err
            raise
        file.flush()
        os.fsync(file.fileno())
    entry = {"bytes": writer.bytes, CHECKSUM: f"{writer.crc:08x}"}
    if writer.sha256 is not None:
        entry[DIGEST] = writer.sha256.hexdigest()
    return entry


def file_checksum(path: Path) -> str:
    """CRC-32 of a file, read in chunks (bounded memory)."""
    return _file_digests(path, sha256=False)[0]


def file_entry(path: Path) -> dict[str, Any]:
    """The manifest entry of a file already on disk (what :func:`write_file` returns for it)."""
    crc, digest = _file_digests(path, sha256=signing_key() is not None)
    entry = {"bytes": path.stat().st_size, CHECKSUM: crc}
    return entry if digest is None else {**entry, DIGEST: digest}


def _file_digests(path: Path, *, sha256: bool) -> tuple[str, str | None]:
    """(CRC-32, SHA-256 or None) of a file, in one pass of 8 MiB chunks."""
    crc = 0
    sha = hashlib.sha256() if sha256 else None
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as file:
        while n := file.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
            if sha is not None:
                sha.update(view[:n])
    return f"{crc:08x}", sha.hexdigest() if sha is not None else None


def check_file(checkpoint: Path, rel: str, entry: dict[str, Any], *, content: bool = True) -> None:
    """Raise :class:`CheckpointError` naming the file if it is missing, has the wrong size or
    (``content``) does not match its recorded checksum."""
    file = checkpoint / rel
    if not file.is_file():
        raise CheckpointError(f"checkpoint {checkpoint} is missing {rel} (listed in manifest.json)")
    size = file.stat().st_size
    if size != entry["bytes"]:
        raise CheckpointError(f"checkpoint file {file} has {size} bytes, manifest.json says {entry['bytes']}")
    expected = entry.get(CHECKSUM)
    if not content or expected is None:
        return
    signed = signing_key() is not None  # the manifest's signature covers the SHA-256, not the CRC alone
    actual, digest = _file_digests(file, sha256=signed)
    if actual != expected:
        raise CheckpointError(
            f"checkpoint file {file} is corrupt: its {CHECKSUM} is {actual}, manifest.json recorded "
            f"{expected} when it was written (damaged on disk or in a copy)"
        )
    if signed and digest != entry.get(DIGEST):
        raise CheckpointError(
            f"checkpoint file {file} does not match the SHA-256 its signed manifest records: it was replaced "
            "after the checkpoint was written (its CRC-32 forged to match); restore the checkpoint from a copy "
            "you trust"
        )


def load_file(checkpoint: Path, rel: str, manifest: dict[str, Any], *, mmap: bool = False, check: bool = True) -> Any:
    """One file of a checkpoint, after checking it against the manifest: tensors and plain data only.

    A file that holds anything else is a :class:`CheckpointError` that names it and says what to do:
    nothing from it has run. ``check=False`` skips the checksum, for a file the caller has checked
    already (a file read again, memory-mapped).
    """
    entry = manifest["files"].get(rel)
    if entry is None:
        raise CheckpointError(f"checkpoint {checkpoint}: manifest.json does not list {rel}")
    if check:
        check_file(checkpoint, rel, entry)
    try:
        return load_plain(checkpoint / rel, mmap=mmap)
    except UnsafeFileError as err:
        raise CheckpointError(f"checkpoint file {err}. {_unsafe_file_fix(checkpoint, manifest)}") from None
    except Exception as err:  # a damaged zip, or a format-1 file without a checksum
        raise CheckpointError(
            f"checkpoint file {checkpoint / rel} cannot be read: {type(err).__name__}: {err}"
        ) from err


def _unsafe_file_fix(checkpoint: Path, manifest: dict[str, Any]) -> str:
    if manifest["format_version"] < 3:
        return (
            f"Checkpoints of format {manifest['format_version']} (moe_parallel before format 3) stored RNG states as "
            "NumPy objects: if this checkpoint is your own or comes from someone you trust, convert it once with "
            f"`python -m launch.checkpoint_tool migrate --trust {checkpoint.parent}`"
        )
    return (
        f"moe_parallel writes only tensors and plain data, so {checkpoint} was changed after it was written (its "
        "checksums recomputed to match): do not use it; restore the checkpoint from a copy you trust"
    )


def sync_dir(path: Path) -> None:
    """Make renames and new entries in ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def describe_os_error(err: OSError, where: Path, file: Path | None = None) -> str:
    """A one-line reason for a failed write: "no space left on <where>" for ENOSPC / EDQUOT."""
    target = f" (writing {file})" if file is not None else ""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = f", {shutil.disk_usage(where).free / 2**20:.1f} MiB free"
        except OSError:
            free = ""
        return f"no space left on {where}{target}{free}"
    return f"cannot write to {where}{target}: {err.strerror or err}"


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


# ---------------------------------------------------------------- outputs written whole or not at all


def owned_staging(target: Path) -> Path:
    """A temporary name beside ``target`` for writing it whole before one rename; the name records
    its writer (host and PID), so that a later run can tell a dead writer's leftover from a live one."""
    return target.with_name(f".{target.name}{STAGING_MARK}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def clear_dead_staging(target: Path) -> list[Path]:
    """Remove the leftovers of :func:`owned_staging` for ``target`` whose writer is provably gone (this
    host, that PID no longer running); returns them. Another host's leftovers stay: nothing proves
    their writer dead."""
    pattern = re.compile(rf"\.{re.escape(target.name)}{re.escape(STAGING_MARK)}(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{{8}}")
    removed = []
    for entry in target.parent.glob(f".{glob.escape(target.name)}{STAGING_MARK}*"):
        match = pattern.fullmatch(entry.name)
        if match and match["host"] == socket.gethostname() and not pid_running(int(match["pid"])):
            remove_tree(entry)
            removed.append(entry)
    return removed


def pid_running(pid: int) -> bool:
    """Whether a process with this PID exists on this host (a PID of another user counts)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def publish_file(obj: Any, target: Path) -> dict[str, Any]:
    """``torch.save`` ``obj`` to ``target`` through a temporary file and one rename: a kill leaves the
    previous ``target`` as it was. Returns the file's ``{"bytes", "crc32"}``."""
    clear_dead_staging(target)
    tmp = owned_staging(target)
    try:
        entry = write_file(obj, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    sync_dir(target.parent)
    return entry


def publish_text(text: str, target: Path) -> None:
    """Write ``text`` to ``target`` through a temporary file and one rename (synced)."""
    clear_dead_staging(target)
    tmp = owned_staging(target)
    try:
        with open(tmp, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    sync_dir(target.parent)


# ---------------------------------------------------------------- manifest and pointer


def write_manifest(checkpoint: Path, manifest: dict[str, Any], name: str = "manifest.json") -> None:
    """Write a manifest (signed with :func:`signing_key` when one is set), synced to disk."""
    key = signing_key()
    if key is not None:
        manifest = {**manifest, SIGNATURE: _signature(manifest, key)}
    with open(checkpoint / name, "w") as file:
        file.write(json.dumps(manifest, indent=1))
        file.flush()
        os.fsync(file.fileno())


def read_manifest(path: str | os.PathLike, *, check_files: bool = True) -> dict[str, Any]:
    """A checkpoint's manifest, validated; ``files`` normalised to ``{rel: {"bytes", "crc32"?}}``.

    ``check_files``: also check that every listed file is present with its recorded size (a few
    ``stat`` calls; checksums are checked when a file is loaded, or by :func:`verify_checkpoint`).
    """
    path = Path(path)
    file = path / "manifest.json"
    if (path / MIGRATION_JOURNAL).exists():
        raise CheckpointError(
            f"{path} is half converted by an interrupted `checkpoint_tool migrate` ({MIGRATION_JOURNAL} is there): "
            f"run `python -m launch.checkpoint_tool migrate --trust {path}` again to finish it"
        )
    if not file.is_file():
        raise CheckpointError(
            f"{file} does not exist: {path} is incomplete (a copy cut short, a hand-edited directory) "
            "or not a moe_parallel checkpoint"
        )
    try:
        manifest = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{file} is not valid JSON ({err}): the file is truncated or damaged") from err
    problem = _manifest_problem(manifest)
    if problem:
        raise CheckpointError(f"{file} is not a valid manifest: {problem}")
    _check_signature(file, manifest)
    if manifest["format_version"] == 1:
        manifest["files"] = {rel: {"bytes": size} for rel, size in manifest["files"].items()}
    if check_files:
        for rel, entry in manifest["files"].items():
            check_file(path, rel, entry, content=False)
    return manifest


def _check_signature(file: Path, manifest: dict[str, Any]) -> None:
    """With a signing key set, a manifest must carry its HMAC and every file its SHA-256."""
    key = signing_key()
    if key is None:
        return
    signature = manifest.get(SIGNATURE)
    if not isinstance(signature, str) or not hmac.compare_digest(signature, _signature(manifest, key)):
        why = "is not signed" if signature is None else "carries a signature that does not match"
        raise CheckpointError(
            f"{file} {why} with the key in {SIGNING_KEY_ENV}: this run loads only checkpoints written by runs "
            f"that hold the key. If the checkpoint is yours, load it with {SIGNING_KEY_ENV} unset"
            + (", or with the key it was signed with" if signature is not None else "")
        )
    unsigned = [rel for rel, entry in manifest["files"].items() if DIGEST not in entry]
    if unsigned:
        raise CheckpointError(f"{file} is signed but records no {DIGEST} of {unsigned[:3]}: it is damaged")


def _manifest_problem(manifest: Any) -> str | None:
    if not isinstance(manifest, dict):
        return f"a JSON {type(manifest).__name__}, not an object"
    version = manifest.get("format_version")
    if version not in READABLE_VERSIONS:
        return f"format_version={version!r}; this version reads {list(READABLE_VERSIONS)}"
    for key, kind in (("step", int), ("saved_world_size", int), ("moe_layers", dict), ("files", dict)):
        if not isinstance(manifest.get(key), kind):
            return f"'{key}' is {manifest.get(key)!r}, expected a {kind.__name__}"
    if not isinstance(manifest.get("expert_parameters", {}), dict):
        return "'expert_parameters' is not an object"
    buffers = manifest.get("buffers", [])
    if not (isinstance(buffers, list) and all(isinstance(name, str) for name in buffers)):
        return f"'buffers' is {buffers!r}, expected a list of names"
    for rel, entry in manifest["files"].items():
        parts = Path(rel).parts
        if Path(rel).is_absolute() or ".." in parts or not parts:
            return f"file name {rel!r} leaves the checkpoint directory"
        if version == 1:
            if not isinstance(entry, int):
                return f"files[{rel!r}] is {entry!r}, expected a size"
        elif not (
            isinstance(entry, dict)
            and isinstance(entry.get("bytes"), int)
            and re.fullmatch(r"[0-9a-f]{8}", str(entry.get(CHECKSUM)))
        ):
            return f"files[{rel!r}] is {entry!r}, expected {{'bytes': int, '{CHECKSUM}': 8 hex digits}}"
    return None


def verify_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], list[str]]:
    """(manifest, problems): every listed file's presence, size and checksum, and that it loads as
    tensors and plain data (reads the whole checkpoint; tensors are mapped, not copied)."""
    path = Path(path)
    manifest = read_manifest(path, check_files=False)
    problems = []
    for rel in manifest["files"]:
        try:
            load_file(path, rel, manifest, mmap=True)
        except (CheckpointError, OSError) as err:
            problems.append(str(err))
    return manifest, problems


def read_latest(checkpoints_dir: Path) -> str | None:
    """The tag ``latest`` names; None when there is no ``latest``; an error naming the file when it is
    unreadable or does not name a checkpoint directory."""
    pointer = checkpoints_dir / LATEST
    if not pointer.exists():
        return None
    try:
        tag = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{pointer} cannot be read ({err}): it is damaged") from err
    if not tag or "/" in tag or tag in (".", "..") or "\n" in tag:
        raise CheckpointError(f"{pointer} holds {tag[:60]!r}, not the name of a checkpoint: it is damaged")
    if not (checkpoints_dir / tag).is_dir():
        raise CheckpointError(f"{pointer} names {tag}, which does not exist in {checkpoints_dir}")
    return tag


def write_latest(checkpoints_dir: Path, tag: str) -> None:
    publish_text(tag, checkpoints_dir / LATEST)


def resolve_checkpoint(load_dir: str | os.PathLike, tag: str | None = None) -> Path | None:
    """The checkpoint directory for ``tag`` in ``load_dir`` (default: the one ``latest`` names, or
    ``load_dir`` itself when it is a checkpoint); None when there is no ``latest``."""
    load_dir = Path(load_dir)
    if tag is None:
        if (load_dir / "manifest.json").exists():
            return load_dir
        try:
            tag = read_latest(load_dir)
        except CheckpointError as err:
            raise CheckpointError(f"{err}. {earlier_checkpoint_hint(load_dir)}") from err
        if tag is None:
            return None
    return load_dir / tag


# ---------------------------------------------------------------- listing


@dataclass(frozen=True)
class CheckpointInfo:
    """One directory of a checkpoints folder: complete (loadable as far as a listing can tell) or not."""

    path: Path
    step: int | None
    problem: str | None  # None: complete (manifest valid, every file present with its size)
    manifest: dict[str, Any] | None

    @property
    def complete(self) -> bool:
        return self.problem is None

    def describe(self) -> str:
        state = "complete" if self.complete else f"incomplete: {self.problem}"
        return f"{self.path.name} (step {self.step if self.step is not None else '?'}, {state})"


def inspect_checkpoint(path: Path) -> CheckpointInfo:
    """Whether ``path`` is a complete checkpoint (checksums are not read: that is the load's job)."""
    match = _STEP_TAG.fullmatch(path.name)
    step = int(match.group(1)) if match else None
    try:
        manifest = read_manifest(path)
    except (CheckpointError, OSError) as err:
        return CheckpointInfo(path, step, str(err), None)
    return CheckpointInfo(path, manifest["step"], None, manifest)


def list_checkpoints(checkpoints_dir: str | os.PathLike) -> list[CheckpointInfo]:
    """Every checkpoint in the folder, complete or not, oldest first; staging directories excluded.

    A directory counts when it holds a ``manifest.json`` or is named ``step_<n>``.
    """
    checkpoints_dir = Path(checkpoints_dir)
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for path in checkpoints_dir.iterdir():
        if not path.is_dir() or STAGING_MARK in path.name:
            continue
        if (path / "manifest.json").exists() or _STEP_TAG.fullmatch(path.name):
            found.append(inspect_checkpoint(path))
    return sorted(found, key=lambda c: (c.step if c.step is not None else -1, c.path.name))


def earlier_checkpoint_hint(checkpoints_dir: Path, than: CheckpointInfo | None = None) -> str:
    """Which complete checkpoint in ``checkpoints_dir`` would load instead (older than ``than``)."""
    candidates = [
        c
        for c in list_checkpoints(checkpoints_dir)
        if c.complete
        and (than is None or (c.path.resolve() != than.path.resolve() and (than.step is None or c.step < than.step)))
    ]
    if not candidates:
        return f"No {'earlier ' if than else ''}complete checkpoint is in {checkpoints_dir}."
    best = candidates[-1]
    hint = f"The newest {'earlier ' if than else ''}complete checkpoint is {best.path} (step {best.step})"
    if than is not None and than.path.parent.resolve() == Path(checkpoints_dir).resolve():
        aside = Path(checkpoints_dir).parent / f"{Path(checkpoints_dir).name}.set-aside"
        hint += (
            f"; to resume from it, move {than.path.name} out of the way (mkdir -p {aside} && mv {than.path} {aside}/)"
        )
    return hint + f"; `python -m launch.checkpoint_tool verify {best.path}` checks its contents."


# ---------------------------------------------------------------- lineage: which checkpoints are known-good


def lineage(checkpoints_dir: Path, parent: str | os.PathLike | None, trained_cleanly: bool | None) -> dict[str, Any]:
    """Manifest fields that record what a checkpoint was trained from, for rotation.

    - ``parent``: the checkpoint this state was trained from (the run's previous save, or the
      checkpoint it resumed from); ``trained_cleanly``: every step since ``parent`` had a finite loss.
    - ``known_good``: the newest checkpoint of this lineage known to load (or be in memory) and then
      train without a fault: ``parent`` when ``trained_cleanly``, else what ``parent`` recorded.
      It is carried from save to save, so the evidence survives the rotation of the checkpoint
      that first showed it.

    Names are tags when in ``checkpoints_dir``, else absolute paths.
    """
    if parent is None:
        return {"parent": None, "trained_cleanly": trained_cleanly, "known_good": None}
    parent = Path(parent).resolve()
    good: Path | None = parent if trained_cleanly else None
    if good is None:
        try:
            inherited = read_manifest(parent, check_files=False).get("known_good")
        except (CheckpointError, OSError):
            inherited = None
        good = (parent.parent / inherited).resolve() if inherited else None
    return {
        "parent": _reference(checkpoints_dir, parent),
        "trained_cleanly": trained_cleanly,
        "known_good": _reference(checkpoints_dir, good) if good is not None else None,
    }


def _reference(checkpoints_dir: Path, path: Path) -> str:
    return path.name if path.parent == Path(checkpoints_dir).resolve() else str(path)


def known_good(checkpoints: list[CheckpointInfo], checkpoints_dir: Path) -> set[Path]:
    """Resolved paths of the checkpoints that some checkpoint records as known-good (see :func:`lineage`)."""
    good = set()
    for c in checkpoints:
        if c.complete and c.manifest.get("known_good"):
            good.add((Path(checkpoints_dir) / c.manifest["known_good"]).resolve())  # absolute stays absolute
    return good


# ---------------------------------------------------------------- resume


@dataclass(frozen=True)
class ResumeChoice:
    """The checkpoint a run resumes from, and why (print ``reason``)."""

    path: Path
    step: int
    reason: str


def select_resume(checkpoints_dir: str | os.PathLike, resume: str) -> ResumeChoice | None:
    """Which checkpoint a run with ``train.resume=<resume>`` starts from; None: a fresh start.

    - ``"auto"``: the newest complete checkpoint of ``checkpoints_dir`` (normally the one ``latest``
      names; when ``latest`` is missing, damaged or stale the reason says so). None when the folder
      holds no checkpoint at all; an error when it holds only incomplete ones.
    - ``"never"``: None; an error when ``checkpoints_dir`` already holds checkpoints (a fresh run would
      overwrite their step tags and rotate them away).
    - a path: that checkpoint (or the newest complete one of that checkpoints folder). A path that
      does not exist, or an incomplete checkpoint, is an error.

    Whatever is chosen, a ``checkpoints_dir`` holding a checkpoint newer than it is an error: the
    run's saves would overwrite or rotate it away. Every error says which checkpoint would load.
    Collective-free: rank 0 calls it and shares the outcome.
    """
    checkpoints_dir = Path(checkpoints_dir)
    found = list_checkpoints(checkpoints_dir)
    if resume == "never":
        if found:
            raise CheckpointError(
                f"train.resume=never, but {checkpoints_dir} already holds checkpoints "
                f"(newest: {found[-1].describe()}): "
                "a fresh run would overwrite their step tags and rotate them away. Continue them with "
                "train.resume=auto, or start fresh in another directory (train.run_dir=<new path>)."
            )
        return None
    if resume == "auto":
        choice = _newest_in(checkpoints_dir, found, "train.resume=auto")
    else:
        choice = _explicit(Path(resume).expanduser(), resume, checkpoints_dir)
    if choice is not None:
        _refuse_newer(checkpoints_dir, found, choice)
    return choice


def _newest_in(checkpoints_dir: Path, found: list[CheckpointInfo], setting: str) -> ResumeChoice | None:
    try:
        latest, latest_problem = read_latest(checkpoints_dir), None
    except CheckpointError as err:
        latest, latest_problem = None, str(err)
    if not found:
        if latest_problem is None and latest is None:
            return None
        # A pointer without checkpoints: they were removed by hand. Starting over would be a guess.
        raise CheckpointError(
            f"{setting}: {latest_problem or f'{checkpoints_dir / LATEST} names {latest}'}, and {checkpoints_dir} "
            "holds no checkpoint. To start from scratch, remove that file (or use a new train.run_dir)."
        )
    complete = [c for c in found if c.complete]
    if not complete:
        listing = "; ".join(c.describe() for c in found[-3:])
        raise CheckpointError(
            f"{setting}: {checkpoints_dir} holds checkpoints but none is complete ({listing}). "
            f"No checkpoint would load. Restore one, or start fresh in another directory (train.run_dir=<new path>)."
        )
    newest = complete[-1]
    if latest is not None and (checkpoints_dir / latest).resolve() == newest.path.resolve():
        reason = f"{checkpoints_dir / LATEST} names it"
    elif latest_problem is not None:
        reason = f"{latest_problem}; resuming from the newest complete checkpoint"
    elif latest is None:
        reason = (
            f"{checkpoints_dir / LATEST} is missing (a crash between a save and its pointer update, or a "
            "hand-cleaned directory); resuming from the newest complete checkpoint"
        )
    else:
        named = inspect_checkpoint(checkpoints_dir / latest)
        reason = (
            f"{checkpoints_dir / LATEST} names {latest}, which is incomplete ({named.problem}); resuming from "
            "the newest complete checkpoint"
            if not named.complete
            else f"{checkpoints_dir / LATEST} names {latest}, but this one is newer and complete"
        )
    return ResumeChoice(newest.path, newest.step, reason)


def _explicit(target: Path, resume: str, checkpoints_dir: Path) -> ResumeChoice | None:
    if not target.exists():
        raise CheckpointError(
            f"train.resume={resume}: {target.absolute()} does not exist (a typo?). It takes a checkpoint "
            f"directory, a checkpoints folder, 'auto' or 'never'. {earlier_checkpoint_hint(checkpoints_dir)}"
        )
    if (target / "manifest.json").exists() or _STEP_TAG.fullmatch(target.name):
        info = inspect_checkpoint(target)
        if not info.complete:
            raise CheckpointError(
                f"train.resume={resume}: {info.problem}. {earlier_checkpoint_hint(target.parent, info)}"
            )
        return ResumeChoice(target, info.step, f"train.resume={resume}")
    if target.is_dir():
        found = list_checkpoints(target)
        choice = _newest_in(target, found, f"train.resume={resume}")
        if choice is None:
            raise CheckpointError(
                f"train.resume={resume}: {target} holds no checkpoint. {earlier_checkpoint_hint(checkpoints_dir)}"
            )
        return choice
    raise CheckpointError(f"train.resume={resume}: {target} is not a checkpoint directory")


def _refuse_newer(checkpoints_dir: Path, found: list[CheckpointInfo], choice: ResumeChoice) -> None:
    newer = [
        c for c in found if c.step is not None and c.step > choice.step and c.path.resolve() != choice.path.resolve()
    ]
    if not newer:
        return
    newer_complete = [c for c in newer if c.complete]
    keep_going = (
        f"To continue from the newest complete one: train.resume={newer_complete[-1].path}. " if newer_complete else ""
    )
    aside = checkpoints_dir.parent / f"{checkpoints_dir.name}.set-aside"
    raise CheckpointError(
        f"resuming from {choice.path} (step {choice.step}) would overwrite or rotate away "
        f"{len(newer)} newer checkpoint{'s' if len(newer) > 1 else ''} in {checkpoints_dir}: "
        f"{'; '.join(c.describe() for c in newer)}. {keep_going}"
        f"To resume from step {choice.step} anyway, first move the newer ones out of {checkpoints_dir} "
        f"(e.g. mkdir -p {aside} && mv {' '.join(str(c.path) for c in newer)} {aside}/); nothing was changed."
    )


def check_resume_step(choice: ResumeChoice | None, steps: int) -> None:
    """``train.steps`` below the step of the checkpoint a run resumes from is an error naming both."""
    if choice is not None and steps < choice.step:
        raise CheckpointError(
            f"train.steps={steps} is below the step of the checkpoint this run resumes from "
            f"({choice.step}, {choice.path}): set train.steps above {choice.step} to train on from it, "
            "or use a new train.run_dir to start over"
        )


# ---------------------------------------------------------------- rotation


def rotate_checkpoints(checkpoints_dir: str | os.PathLike, keep: int, *, protect: Path | None = None) -> list[Path]:
    """Delete old ``step_<n>`` checkpoints and stale staging entries; returns what was removed.

    Kept: the newest ``keep`` complete ``step_<n>`` checkpoints; the newest *known-good* checkpoint
    (one that trained on without a fault: a later save was written with ``trained_cleanly``; see
    :func:`lineage`);
    and ``protect`` (the checkpoint the run resumed from) until a checkpoint newer than it is
    known-good. Never deleted: incomplete checkpoints (not ours to judge) and other tags. (Checkpoints
    newer than the one a run resumed from never reach rotation: :func:`select_resume` refuses such a
    run.) Call it on one rank, after a save has completed on every rank.
    """
    if keep < 1:
        raise ValueError(f"keep={keep}: rotation keeps at least one checkpoint")
    checkpoints_dir = Path(checkpoints_dir)
    found = list_checkpoints(checkpoints_dir)
    rotatable = [c for c in found if c.complete and _STEP_TAG.fullmatch(c.path.name)]
    kept = {c.path.resolve() for c in rotatable[-keep:]}
    good = known_good(found, checkpoints_dir)
    good_infos = [c for c in found if c.complete and c.path.resolve() in good]
    if good_infos:
        kept.add(good_infos[-1].path.resolve())
    if protect is not None:
        protect_info = next((c for c in found if c.path.resolve() == Path(protect).resolve()), None)
        if protect_info is not None:
            if not any(c.step > protect_info.step for c in good_infos):
                kept.add(protect_info.path.resolve())
    removed = [c.path for c in rotatable if c.path.resolve() not in kept]
    for path in removed:
        # Out of the listing first: a kill mid-delete leaves a staging-marked directory, never a
        # half-deleted checkpoint that reads as damaged.
        trash = path.with_name(f"{path.name}{DELETED_MARK}{uuid.uuid4().hex[:8]}")
        os.replace(path, trash)
        remove_tree(trash)
    sync_dir(checkpoints_dir)
    return removed + clear_interrupted(checkpoints_dir)


def clear_interrupted(checkpoints_dir: str | os.PathLike, *, saves: bool = True) -> list[Path]:
    """Remove what interrupted saves and rotations left in ``checkpoints_dir``; returns what went.

    Rotation's deleted checkpoints always go (they are out of the listing for good). ``saves``: also
    staging directories of saves and pointer updates; only for a caller that knows no save is in
    progress (the run directory's lock holder, or a save that has just completed).
    """
    checkpoints_dir = Path(checkpoints_dir)
    if not checkpoints_dir.is_dir():
        return []
    removed = []
    for stale in checkpoints_dir.glob(f"*{STAGING_MARK}*"):
        if saves or DELETED_MARK in stale.name:
            remove_tree(stale)
            removed.append(stale)
    return removed
