"""Cache entries shared by the tokenizer and token caches: keys, locks, atomic directories, checksums.

An entry is a directory ``<root>/<key>`` whose ``key`` (:func:`cache_key`) is a sha256 over everything that
decides its contents. It is built under a temporary name beside it and renamed into place with
``os.replace`` (:func:`building`), so a directory that exists is complete. Building happens under an
``fcntl.flock`` on ``<root>/<key>.lock`` (:func:`file_lock`), so jobs sharing a cache directory never build
the same entry twice at once (NFSv4 maps flock to POSIX locks; Lustre needs the ``flock`` mount option).

Integrity. An entry's metadata file lists every other file of the directory with its size and a content
checksum computed from the bytes as they were written: SHA-256 for small files, and for a token file the
name of its CRC-32 table (one little-endian uint32 per chunk, written by :class:`ChunkedWriter`). The
metadata carries the SHA-256 of its own canonical text (``checksum``) and must be exactly that text, so any
changed byte of it shows. :func:`check_entry` checks the metadata, every size and the small files in full
(milliseconds, whatever the size of the tokens); :class:`TokenMemmap` checks a token file chunk by chunk
where it is read. A mismatch raises :class:`DamagedCacheError` naming the file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import uuid
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np

from launch.data.corpus import DataError
from launch.hf_tokenizer import file_sha256

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # bump when the on-disk layout or the tokenization rules change
Split = Literal["train", "val"]  # the token files of a dataset entry: <split>.bin and <split>.crc32


class DamagedCacheError(DataError):
    """A cache file does not match what its entry recorded when it was built.

    ``path`` is the file, ``entry`` the cache directory it belongs to, ``problem`` what is wrong; the
    message says all three and the fix (delete the entry; the next run rebuilds it).
    """

    path: Path
    entry: Path
    problem: str


def damaged(path: Path, entry: Path, problem: str) -> DamagedCacheError:
    """The :class:`DamagedCacheError` for ``path`` of the cache entry ``entry``, with the fix in its message."""
    err = DamagedCacheError(
        f"{path} {problem}; the cache entry {entry} is damaged (a disk or copy error, or an edit): delete it and "
        "run again, the next run rebuilds it"
    )
    err.path, err.entry, err.problem = path, entry, problem
    return err


def cache_key(*parts: Any) -> str:
    """A 24-hex-digit sha256 of ``parts`` (JSON with sorted keys; other objects by ``str``)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing; never deleted, deleting races)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process that holds %s", path)
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def building(final_dir: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``final_dir``; on success rename it to ``final_dir``.

    Call with the key's lock held: then leftovers of crashed builds of the same key can be removed.
    """
    parent = final_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    for stale in parent.glob(f".tmp-{final_dir.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = parent / f".tmp-{final_dir.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if final_dir.exists():  # damaged or incomplete (callers discard damaged ones first): manual edits
            discard(final_dir)
        os.replace(tmp, final_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def discard(directory: Path) -> None:
    """Delete a cache entry: renamed aside first, so no process ever opens it half deleted (a process
    that has its files open keeps reading them). The name is one ``building`` clears if we die here."""
    aside = directory.parent / f".tmp-{directory.name}-discarded-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.replace(directory, aside)
    shutil.rmtree(aside, ignore_errors=True)


def open_or_discard(directory: Path, open_entry: Callable[[Path], Any]) -> Any:
    """``open_entry(directory)``, or None if the entry is missing or damaged. Call with the entry's lock
    held: a damaged entry is deleted, with a warning naming the file, so the caller rebuilds it."""
    if not directory.exists():
        return None
    try:
        return open_entry(directory)
    except DamagedCacheError as err:
        log.warning("%s %s: deleting the cache entry %s and building it again", err.path, err.problem, directory)
        discard(directory)
        return None


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` through a temporary file renamed over it, so readers see the old or the new bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: Any) -> None:
    """:func:`write_bytes_atomic` of ``obj`` as indented JSON."""
    write_bytes_atomic(path, json.dumps(obj, indent=1, default=str).encode())


def _crc32(data: Any, value: int = 0) -> int:
    """CRC-32 (zlib's) of a bytes-like object, continuing from ``value``."""
    return zlib.crc32(data, value)


def bytes_record(data: bytes) -> dict[str, Any]:
    """What an entry records of a small file: its size and SHA-256."""
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _canonical_json(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def write_checked_json(path: Path, body: dict[str, Any]) -> None:
    """Write an entry's metadata with ``checksum``: the SHA-256 of the canonical text of the rest."""
    checksum = hashlib.sha256(_canonical_json(body)).hexdigest()
    write_bytes_atomic(path, _canonical_json({**body, "checksum": checksum}))


def read_checked_json(path: Path, entry: Path) -> dict[str, Any]:
    """The metadata ``write_checked_json`` wrote; :class:`DamagedCacheError` unless every byte is as written."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise damaged(path, entry, "is missing") from None
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as err:  # invalid UTF-8 or JSON
        raise damaged(path, entry, f"is not valid JSON ({type(err).__name__})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("checksum"), str):
        raise damaged(path, entry, "holds no checksum (written by an older version, or damaged)")
    body = {k: v for k, v in obj.items() if k != "checksum"}
    if raw != _canonical_json(obj) or hashlib.sha256(_canonical_json(body)).hexdigest() != obj["checksum"]:
        raise damaged(path, entry, "does not match its checksum")
    if body.get("format") != FORMAT_VERSION:
        raise damaged(path, entry, f"is of cache format {body.get('format')!r}; this version reads {FORMAT_VERSION}")
    return body


def check_entry(entry: Path, meta_name: str) -> dict[str, Any]:
    """Check a cache entry's metadata, every file's size and the small files' SHA-256; returns the metadata.

    Token files (recorded with a ``crc32`` table) are checked chunk by chunk where they are read.
    """
    meta_path = entry / meta_name
    meta = read_checked_json(meta_path, entry)
    files = meta.get("files")
    if not isinstance(files, dict) or not files:
        raise damaged(meta_path, entry, "lists no files")
    for name, record in files.items():
        path = entry / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise damaged(path, entry, f"is missing ({meta_name} lists it)") from None
        if size != record["bytes"]:
            raise damaged(path, entry, f"holds {size} bytes, {meta_name} records {record['bytes']}")
        if "sha256" in record and file_sha256(path) != record["sha256"]:
            raise damaged(path, entry, f"does not match the SHA-256 that {meta_name} records")
    return meta


class TokenChunks:
    """The CRC-32 of each ``chunk_bytes`` chunk of one token file, recorded when it was built; each chunk
    is checked the first time this process reads it (a per-process record of chunks found good).

    ``raw`` is the file's bytes (a read-only memory map), ``table`` its ``<split>.crc32`` file.
    """

    def __init__(self, path: Path, table: Path, entry: Path, raw: np.ndarray, chunk_bytes: int) -> None:
        self.path, self.table_path, self.entry = path, table, entry
        self.raw = raw
        self.chunk_bytes = chunk_bytes
        num_chunks = -(-len(raw) // chunk_bytes)
        self.table = np.memmap(table, dtype="<u4", mode="r", shape=(num_chunks,)) if num_chunks else np.zeros(0)
        self.good = np.zeros(num_chunks, dtype=bool)

    def check_range(self, start_B: np.ndarray, length: int) -> None:
        """Check the chunks under bytes ``[start, start + length)`` for each start in ``start_B`` (all of
        them before returning): :class:`DamagedCacheError` names the file and the first damaged chunk."""
        if not len(start_B):
            return
        first_B = start_B // self.chunk_bytes
        last_B = (start_B + length - 1) // self.chunk_bytes
        if int((last_B - first_B).max()) <= 1:
            chunks = np.union1d(first_B, last_B)
        else:  # ranges longer than a chunk
            chunks = np.unique(np.concatenate([np.arange(a, b + 1) for a, b in zip(first_B, last_B)]))
        for chunk in chunks[~self.good[chunks]]:
            self._check_chunk(int(chunk))

    def check_all(self) -> None:
        """Check every chunk not yet found good (reads the whole file)."""
        for chunk in np.flatnonzero(~self.good):
            self._check_chunk(int(chunk))

    def _check_chunk(self, chunk: int) -> None:
        lo = chunk * self.chunk_bytes
        hi = min(lo + self.chunk_bytes, len(self.raw))
        if _crc32(self.raw[lo:hi]) != int(self.table[chunk]):
            raise damaged(
                self.path,
                self.entry,
                f"bytes [{lo}, {hi}) (chunk {chunk}) do not match their CRC-32 recorded in {self.table_path} "
                "(one of the two files changed since the build)",
            )
        self.good[chunk] = True


class TokenMemmap(np.memmap):
    """A cache's token file, memory-mapped read-only; ``chunks`` checks its bytes before they are used.

    :class:`PackedDataset` checks the chunks under every window it reads. Slices, views and copies carry
    no ``chunks`` (their indices are not the file's): hand the whole array to :class:`PackedDataset`.
    """

    chunks: TokenChunks | None = None

    def __reduce__(self) -> Any:
        # A process it is sent to (a spawned DataLoader worker) maps the file again and checks what it
        # reads itself, instead of receiving a copy of every token read unchecked here.
        if self.chunks is None:
            return super().__reduce__()
        c = self.chunks
        return map_tokens, (Path(self.filename), self.dtype.str, len(self), c.table_path, c.entry, c.chunk_bytes)

    def check(self, start_B: np.ndarray, count: int) -> None:
        """Check the tokens ``[start, start + count)`` of each start in ``start_B`` against the file's
        CRC-32 table (each chunk once per process); raises :class:`DamagedCacheError` on a mismatch."""
        if self.chunks is not None:
            self.chunks.check_range(np.asarray(start_B, dtype=np.int64) * self.itemsize, count * self.itemsize)


def map_tokens(path: Path, dtype: str, count: int, table: Path, entry: Path, chunk_bytes: int) -> TokenMemmap:
    """Map ``count`` tokens of ``dtype`` from ``path`` read-only, checked against the CRC-32 table ``table``."""
    tokens = TokenMemmap(path, dtype=np.dtype(dtype), mode="r", shape=(count,))
    tokens.chunks = TokenChunks(path, table, entry, np.asarray(tokens).view(np.uint8), chunk_bytes)
    return tokens


class ChunkedWriter:
    """Writes ``<split>.bin`` and, from the same bytes, ``<split>.crc32``: the CRC-32 of each ``chunk_bytes``
    chunk (the last one may be shorter), one little-endian uint32 each."""

    def __init__(self, out: Path, split: Split, chunk_bytes: int) -> None:
        self.path, self.table_path = out / f"{split}.bin", out / f"{split}.crc32"
        self.chunk_bytes = chunk_bytes
        self.bytes = self.chunks = 0
        self._crc = self._fill = 0
        self._data = open(self.path, "wb")
        self._table = open(self.table_path, "wb")

    def write(self, data: bytes) -> None:
        """Append ``data`` to the token file and fold it into the running chunk CRC."""
        view = memoryview(data)
        self._data.write(view)
        self.bytes += len(view)
        while view:
            take = min(len(view), self.chunk_bytes - self._fill)
            self._crc = _crc32(view[:take], self._crc)
            self._fill += take
            view = view[take:]
            if self._fill == self.chunk_bytes:
                self._end_chunk()

    def _end_chunk(self) -> None:
        self._table.write(self._crc.to_bytes(4, "little"))
        self.chunks += 1
        self._crc = self._fill = 0

    def records(self) -> dict[str, dict[str, Any]]:
        """What meta.json records of the two files."""
        data = {"bytes": self.bytes, "chunk_bytes": self.chunk_bytes, "crc32": self.table_path.name}
        return {self.path.name: data, self.table_path.name: {"bytes": 4 * self.chunks}}

    def __enter__(self) -> ChunkedWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fill:
            self._end_chunk()
        self._data.close()
        self._table.close()
