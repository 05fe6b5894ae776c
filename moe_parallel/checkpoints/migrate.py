"""Convert checkpoints of earlier formats, once, into files that load with ``weights_only=True``.

In formats 1 and 2, every rank's RNG file holds NumPy's state as NumPy objects, which the restricted
unpickler refuses, and so loads refuse such files; :func:`migrate_checkpoint` reads them once more with
the restricted unpickler plus exactly the globals those files hold (NumPy's ``ndarray``, ``dtype``
and array reconstructor), converts them to tensors and plain data and rewrites them. A file that asks
for anything else is refused, not converted: migrating runs no code from a file either. ``trust=True``
is the caller's word that the checkpoints are theirs, or from someone they trust.

A migration never leaves a checkpoint that loads wrongly. Converted files are written beside the
originals (``<file>.migrated``), then the new manifest as ``manifest.migrating.json`` (the
journal); only then are the files renamed over the originals and the journal over ``manifest.json``.
A migration cut short before the journal exists is undone by the next run of it, one cut short after
is finished by it; meanwhile :func:`.checkpoint_store.read_manifest` refuses the checkpoint, naming
the command that completes it.
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import numpy_rng_state
from .safe_files import UnsafeFileError, load_plain
from .store import (
    CHECKSUM,
    DIGEST,
    FORMAT_VERSION,
    MIGRATION_JOURNAL,
    CheckpointError,
    check_file,
    file_entry,
    lineage,
    list_checkpoints,
    read_manifest,
    remove_tree,
    signing_key,
    sync_dir,
    write_file,
    write_manifest,
)

CONVERTED_SUFFIX = ".migrated"


@dataclass(frozen=True)
class Migration:
    """What migrating one checkpoint did."""

    path: Path
    converted: list[str]  # files rewritten as plain data
    from_version: int
    resumed: bool  # an interrupted migration was finished


def migrate_checkpoint(path: str | os.PathLike, *, trust: bool) -> Migration:
    """Rewrite one checkpoint so that every file loads with ``weights_only=True``; format 3 after.

    ``trust`` must be True (the checkpoints come from a source the caller trusts). Every file is
    checked against its checksum first; a damaged checkpoint is refused, not converted.
    """
    if not trust:
        raise CheckpointError(
            "migrate rewrites the files of checkpoints written by earlier versions: pass --trust to confirm "
            "that they are yours or come from someone you trust"
        )
    path = Path(path)
    if (path / MIGRATION_JOURNAL).exists():
        return _finish(path)
    for leftover in path.rglob(f"*{CONVERTED_SUFFIX}"):  # a run cut short before its journal: undo it
        remove_tree(leftover)
    manifest = read_manifest(path)
    version = manifest["format_version"]
    if version >= 3:
        return Migration(path, [], version, False)
    for rel, entry in manifest["files"].items():  # all of them before anything is written
        check_file(path, rel, entry)
    files, converted = {}, []
    for rel, entry in manifest["files"].items():
        try:
            load_plain(path / rel, mmap=True)
            # Format 1 recorded sizes only: the caller's trust stands in for the checksum it lacked
            # (and, signing, for the SHA-256 that the signature will cover).
            complete = CHECKSUM in entry and (signing_key() is None or DIGEST in entry)
            files[rel] = entry if complete else file_entry(path / rel)
            continue
        except UnsafeFileError:
            pass
        value = _plain_state(rel, _load_earlier_format(path / rel))
        target = path / f"{rel}{CONVERTED_SUFFIX}"
        files[rel] = write_file(value, target)
        load_plain(target)  # proof that the rewritten file loads without the full unpickler
        converted.append(rel)
    journal = {**manifest, "format_version": FORMAT_VERSION, "migrated_from": version, "files": files}
    if version < 2:  # format 2 added the lineage fields; a format-1 checkpoint has no known parent
        journal = {**lineage(path.parent, None, None), **journal}
    write_manifest(path, journal, name=f"{MIGRATION_JOURNAL}.tmp")
    os.replace(path / f"{MIGRATION_JOURNAL}.tmp", path / MIGRATION_JOURNAL)
    sync_dir(path)
    return _finish(path, converted)


def migrate_folder(directory: str | os.PathLike, *, trust: bool) -> list[Migration]:
    """Migrate one checkpoint, or every checkpoint of a checkpoints folder (incomplete ones included:
    an interrupted migration makes a checkpoint read as incomplete until it is finished)."""
    directory = Path(directory)
    if not directory.exists():
        raise CheckpointError(f"{directory} does not exist")
    if (directory / "manifest.json").exists() or (directory / MIGRATION_JOURNAL).exists():
        return [migrate_checkpoint(directory, trust=trust)]
    found = [c.path for c in list_checkpoints(directory)]
    if not found:
        raise CheckpointError(f"{directory} holds no checkpoint")
    return [migrate_checkpoint(p, trust=trust) for p in found]


def _earlier_format_globals() -> list:
    """The globals of NumPy arrays, as earlier formats pickled them (NumPy 1 and 2 module names)."""
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    reconstruct = multiarray._reconstruct
    numeric = {type(np.dtype(code)) for code in "?bBhHiIlLqQefd"}  # NumPy 2 gives each dtype its class
    return [np.ndarray, np.dtype, *numeric, reconstruct, (reconstruct, "numpy.core.multiarray._reconstruct")]


def _load_earlier_format(file: Path) -> Any:
    """A file of an earlier format: the restricted unpickler with NumPy's array globals allowed."""
    try:
        with torch.serialization.safe_globals(_earlier_format_globals()):
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(file)
        raise CheckpointError(
            f"{file} asks for {sorted(names)[:6]}, beyond the NumPy arrays that earlier moe_parallel versions "
            "stored: it is not converted (loading it could run code); restore the checkpoint from a copy you trust"
        ) from None


def _plain_state(rel: str, value: Any) -> Any:
    """A file's content in the format-3 form: RNG files get NumPy's state as plain data."""
    if rel.startswith("rng/") and isinstance(value, dict) and isinstance(value.get("numpy"), tuple):
        value = {**value, "numpy": numpy_rng_state(value["numpy"])}
    return value


def _finish(path: Path, converted: list[str] | None = None) -> Migration:
    """Roll a journaled migration forward: converted files over the originals, then the manifest.
    ``converted``: the files this run converted (None: finishing a run that was cut short)."""
    journal = path / MIGRATION_JOURNAL
    try:
        manifest = json.loads(journal.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{journal} is damaged ({err}): restore {path} from a copy") from None
    names = list(converted or [])
    for rel in files:
        staged = path / f"{rel}{CONVERTED_SUFFIX}"
        if staged.exists():
            os.replace(staged, path / rel)
            if converted is None:
                names.append(rel)
    for rel in names:
        check_file(path, rel, files[rel])
    write_manifest(path, manifest)
    journal.unlink()
    sync_dir(path)
    return Migration(path, sorted(names), int(manifest.get("migrated_from", 2)), converted is None)
