"""Training data: a SentencePiece tokenizer (or a pretrained model's own), memory-mapped token files, packed
windows, resumable batches.

The way from text to a micro-batch:

```
files (or the stdlib's *.py) ─▶ documents ─▶ tokenizer (trained on a bounded sample, cached by content)
   ─▶ one tokenization pass, EOS after each document ─▶ train.bin / val.bin (split at document boundaries)
   ─▶ PackedDataset: windows of seq_len+1 tokens ─▶ DistributedBatchIterator: seeded epochs, DP shards
```

Cache layout under ``DataConfig.cache_dir`` (every key is a sha256 over everything that decides the result):

```
tokenizers/<tok_key>/tokenizer.model, tokenizer.json     tok_key: corpus contents, vocab, trainer options
tokenizers/<tok_key>.lock
datasets/<data_key>/tokenizer.model, train.bin, train.crc32, val.bin, val.crc32, meta.json
                                                         data_key: tok_key + corpus contents + split settings
datasets/<data_key>.lock
index/<stat_key>.json   {"data_key": ...} for ranks != 0: path+size+mtime of the files -> data_key (no reading)
```

With ``data.tokenizer`` set (a pretrained model's tokenizer, see ``launch/hf_tokenizer.py``) nothing is
trained: ``tok_key`` is the sha256 of its files and the dataset directory holds copies of them instead of
``tokenizer.model``.

Each ``<key>`` directory is built under a temporary name in the same parent and renamed into place with
``os.replace``, so a directory that exists is complete. Building happens under an ``fcntl.flock`` on the
``.lock`` file beside it, so jobs sharing a cache directory never build the same thing twice at once
(NFSv4 maps flock to POSIX locks; Lustre needs the ``flock`` mount option).

Integrity. An entry's metadata file (``meta.json``; ``tokenizer.json`` for a trained tokenizer) lists every
other file of the directory with its size and a content checksum computed from the bytes as they were
written: SHA-256 for the small files (tokenizers), and for a token file the name of its CRC-32 table
(``<split>.crc32``: one little-endian uint32 per :data:`CHUNK_BYTES` chunk). The metadata file carries the
SHA-256 of its own canonical text (``checksum``) and must be exactly that text, so any changed byte of it
shows. Opening an entry checks the metadata, every size and the small files in full: milliseconds, whatever
the size of the tokens. The token files are checked where they are read: :class:`PackedDataset` checks
each chunk under a window the first time this process reads that chunk, before returning the batch.

A damaged entry found when opening it on a preparing rank (rank 0, or a rank that prepares for itself) is
moved aside, deleted and rebuilt under its lock, with a warning that names the file. Anywhere else (a rank
that waits for rank 0, a chunk found damaged while training) :class:`DamagedCacheError` stops the job
naming the file, the damaged byte range and the fix: delete the entry; the next run rebuilds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import io
import json
import logging
import os
import random
import shutil
import sysconfig
import time
import uuid
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import sentencepiece as spm
import torch

from launch.hf_tokenizer import file_sha256, load_pretrained_tokenizer, tokenizer_stat

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # bump when the on-disk layout or the tokenization rules change
TOKENIZER_TYPES = ("bpe", "unigram")
Split = Literal["train", "val"]
CorpusKind = Literal["text", "jsonl"]

_JSONL_SUFFIXES = (".jsonl", ".ndjson")
_SKIP_STDLIB_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
_MIN_VOCAB = 320  # 256 byte-fallback pieces + <unk>, <s>, </s>, "\n" + room for the corpus's characters
_MAX_SENTENCE_CHARS = 2048  # longer lines are left out of the tokenizer sample (minified data, tables)
_SAMPLE_SEED = 0  # fixed: the tokenizer and the validation split depend on the corpus only, not on `seed`
_ENCODE_BATCH_CHARS = 4_000_000
_COPY_CHUNK_TOKENS = 1 << 24
# Bytes per CRC-32 of a token file. The first read of a window checks every chunk under it (at most two
# for windows up to this size), so the chunk bounds the extra bytes a first touch reads: 128 KiB is about
# what the kernel reads around one page fault of a memory map anyway, costs ~40 us of CRC at ~3.5 GB/s,
# and keeps the tables at 1/32768 of the tokens (32 MiB per TiB, memory-mapped: only the entries of
# chunks read are loaded). Recorded per file in meta.json, so a cache keeps the size it was built with.
CHUNK_BYTES = 1 << 17


class DataConfigError(ValueError):
    """A data configuration value is out of range; the message names the field (``data.<field>``) and the fix."""


class DataError(ValueError):
    """The corpus, the cache or a saved data position is unusable; the message names the file or field."""


class DamagedCacheError(DataError):
    """A cache file does not match what its entry recorded when it was built.

    ``path`` is the file, ``entry`` the cache directory it belongs to, ``problem`` what is wrong; the
    message says all three and the fix (delete the entry; the next run rebuilds it).
    """

    path: Path
    entry: Path
    problem: str


def _damaged(path: Path, entry: Path, problem: str) -> DamagedCacheError:
    err = DamagedCacheError(
        f"{path} {problem}; the cache entry {entry} is damaged (a disk or copy error, or an edit): delete it and "
        "run again, the next run rebuilds it"
    )
    err.path, err.entry, err.problem = path, entry, problem
    return err


@dataclass
class DataConfig:
    """Where the training text comes from and how it becomes token windows.

    ``files=None`` uses the running interpreter's standard library sources (present on every machine).
    ``seed`` sets only the sample order; the tokenizer sample and the validation split are fixed by the
    corpus, so runs with different seeds share the cache and are evaluated on the same documents.
    """

    files: list[str] | None = None  # .txt/any text (one document per file) or .jsonl ("text" per line); globs ok
    max_corpus_bytes: int = 8_000_000  # cap on the default stdlib corpus (whole files, in sorted order)
    vocab_size: int = 8192
    tokenizer_type: str = "bpe"  # "bpe" or "unigram"
    character_coverage: float = 0.9995  # rarer characters are spelled as bytes (byte_fallback)
    tokenizer_sample_sentences: int = 200_000  # lines sampled from the corpus to train the tokenizer
    seq_len: int = 512
    val_fraction: float = 0.01  # fraction of tokens, rounded up to whole documents
    seed: int = 1234
    cache_dir: str = "~/.cache/moe_parallel/data"
    tokenizer: str | None = None  # a pretrained tokenizer (model dir, tokenizer.json/.model); None: train one
    num_threads: int = 0  # tokenizer training/encoding threads; 0 = the CPUs this process may use (max 16)

    def __post_init__(self) -> None:
        if isinstance(self.files, (str, os.PathLike)):
            self.files = [os.fspath(self.files)]
        elif self.files is not None:
            self.files = list(self.files)  # Hydra hands over a ListConfig
        self.validate()

    def validate(self) -> None:
        """Raise :class:`DataConfigError` naming the first invalid field and what is allowed."""

        def fail(name: str, allowed: str) -> None:
            raise DataConfigError(f"data.{name}={getattr(self, name)!r} is invalid: {allowed}")

        def is_int(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        if self.files is not None:
            if not self.files:
                fail("files", "give at least one path, or leave it unset (null) for the stdlib corpus")
            if not all(isinstance(f, str) and f for f in self.files):
                fail("files", "must be a list of non-empty path strings, e.g. data.files=[/data/a.jsonl]")
        if not is_int(self.max_corpus_bytes) or self.max_corpus_bytes < 1:
            fail("max_corpus_bytes", "must be a positive integer number of bytes, e.g. 8000000")
        if not is_int(self.vocab_size) or not _MIN_VOCAB <= self.vocab_size < 2**31:
            fail(
                "vocab_size", f"must be an integer >= {_MIN_VOCAB} (256 byte pieces + specials + characters), e.g. 8192"
            )
        if self.tokenizer_type not in TOKENIZER_TYPES:
            fail("tokenizer_type", f"choose one of {TOKENIZER_TYPES}")
        if not isinstance(self.character_coverage, (int, float)) or not 0 < self.character_coverage <= 1:
            fail("character_coverage", "must be in (0, 1], e.g. 0.9995")
        if not is_int(self.tokenizer_sample_sentences) or self.tokenizer_sample_sentences < 1:
            fail("tokenizer_sample_sentences", "must be a positive integer, e.g. 200000")
        if not is_int(self.seq_len) or self.seq_len < 1:
            fail("seq_len", "must be a positive integer, e.g. 512")
        if not isinstance(self.val_fraction, (int, float)) or not 0 <= self.val_fraction < 1:
            fail("val_fraction", "must be in [0, 1) (0 = no validation split), e.g. 0.01")
        if not is_int(self.seed) or self.seed < 0:
            fail("seed", "must be an integer >= 0")
        if not isinstance(self.cache_dir, (str, os.PathLike)) or not os.fspath(self.cache_dir):
            fail("cache_dir", "must be a directory path; on a cluster use one on the shared filesystem")
        if self.tokenizer is not None and not (isinstance(self.tokenizer, str) and self.tokenizer):
            fail("tokenizer", "give a model directory or a tokenizer.json/tokenizer.model path, or null to train one")
        if not is_int(self.num_threads) or self.num_threads < 0:
            fail("num_threads", "must be an integer >= 0 (0 = all CPUs this process may use)")

    @property
    def cache_path(self) -> Path:
        return Path(os.path.expandvars(os.path.expanduser(os.fspath(self.cache_dir)))).resolve()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------- corpus


@dataclass(frozen=True)
class CorpusFile:
    """One source file: absolute path, how it is read, and its stat signature."""

    path: Path
    kind: CorpusKind
    size: int
    mtime_ns: int

    @classmethod
    def at(cls, path: Path) -> CorpusFile:
        st = path.stat()
        kind: CorpusKind = "jsonl" if path.suffix.lower() in _JSONL_SUFFIXES else "text"
        return cls(path=path, kind=kind, size=st.st_size, mtime_ns=st.st_mtime_ns)


def default_corpus_files(max_bytes: int) -> list[Path]:
    """The interpreter's stdlib ``*.py`` files in sorted order, skipping tests and site-packages.

    Files are taken in sorted order, skipping any that would push the total over ``max_bytes`` (but at least
    one is taken), so the corpus is the same on every machine with the same Python version.
    """
    root = Path(sysconfig.get_paths()["stdlib"]).resolve()
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_STDLIB_DIRS and not d.startswith(".")]
        found.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    found.sort(key=lambda p: p.relative_to(root).as_posix())
    chosen: list[Path] = []
    total = 0
    for path in found:
        size = path.stat().st_size
        if chosen and total + size > max_bytes:
            continue  # a big file near the cap must not end the corpus far below it
        chosen.append(path)
        total += size
    if not chosen:
        raise DataError(f"no *.py files found under the stdlib directory {root}; set data.files to your text files")
    return chosen


def resolve_corpus(cfg: DataConfig) -> list[CorpusFile]:
    """The corpus files ``cfg`` names (globs expanded, in the given order), or the stdlib default."""
    if cfg.files is None:
        return [CorpusFile.at(p) for p in default_corpus_files(cfg.max_corpus_bytes)]
    out: list[CorpusFile] = []
    for entry in cfg.files:
        pattern = os.path.expandvars(os.path.expanduser(entry))
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        hint = f"(relative paths are resolved against {os.getcwd()}; Hydra may change it, so prefer absolute paths)"
        if not matches:
            raise DataError(f"data.files: the pattern {entry!r} matches no file {hint}")
        for match in matches:
            path = Path(match).resolve()
            if not path.exists():
                raise DataError(f"data.files: {entry!r} does not exist {hint}")
            if path.is_dir():
                raise DataError(f"data.files: {entry!r} is a directory; name its files, e.g. '{entry}/*.jsonl'")
            out.append(CorpusFile.at(path))
    return out


def read_documents(source: CorpusFile | str | os.PathLike[str]) -> Iterator[str]:
    """Yield the documents of one file: a text file is one document; a JSONL file one per line's ``text``.

    Blank JSONL lines and empty documents are skipped; a bad line raises :class:`DataError` naming the
    file and line.
    """
    if not isinstance(source, CorpusFile):
        source = CorpusFile.at(Path(source).resolve())
    if source.kind == "text":
        text = source.path.read_bytes().decode("utf-8", errors="replace")
        if text.strip():
            yield text
        return
    with open(source.path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{source.path}:{lineno}"
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise DataError(
                    f"{where}: invalid JSON ({exc}); each line must be one JSON object with a string 'text' field"
                ) from None
            if not isinstance(record, dict) or "text" not in record:
                found = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise DataError(f'{where}: no \'text\' field (found {found}); each line needs {{"text": "..."}}')
            text = record["text"]
            if not isinstance(text, str):
                raise DataError(f"{where}: 'text' must be a string, got {type(text).__name__}")
            if text:
                yield text


def _key(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


# ------------------------------------------------------------------------------------------- caching


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
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
def _building(final_dir: Path) -> Iterator[Path]:
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
            _discard(final_dir)
        os.replace(tmp, final_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _discard(directory: Path) -> None:
    """Delete a cache entry: renamed aside first, so no process ever opens it half deleted (a process
    that has its files open keeps reading them). The name is one ``_building`` clears if we die here."""
    aside = directory.parent / f".tmp-{directory.name}-discarded-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.replace(directory, aside)
    shutil.rmtree(aside, ignore_errors=True)


def _open_or_discard(directory: Path, open_entry: Callable[[Path], Any]) -> Any:
    """``open_entry(directory)``, or None if the entry is missing or damaged. Call with the entry's lock
    held: a damaged entry is deleted, with a warning naming the file, so the caller rebuilds it."""
    if not directory.exists():
        return None
    try:
        return open_entry(directory)
    except DamagedCacheError as err:
        log.warning("%s %s: deleting the cache entry %s and building it again", err.path, err.problem, directory)
        _discard(directory)
        return None


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_json_atomic(path: Path, obj: Any) -> None:
    _write_bytes_atomic(path, json.dumps(obj, indent=1, default=str).encode())


# ------------------------------------------------------------------------------------------ checksums


def _crc32(data: Any, value: int = 0) -> int:
    """CRC-32 (zlib's) of a bytes-like object, continuing from ``value``."""
    return zlib.crc32(data, value)


def _bytes_record(data: bytes) -> dict[str, Any]:
    """What an entry records of a small file: its size and SHA-256."""
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _canonical_json(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def _write_checked_json(path: Path, body: dict[str, Any]) -> None:
    """Write an entry's metadata with ``checksum``: the SHA-256 of the canonical text of the rest."""
    checksum = hashlib.sha256(_canonical_json(body)).hexdigest()
    _write_bytes_atomic(path, _canonical_json({**body, "checksum": checksum}))


def _read_checked_json(path: Path, entry: Path) -> dict[str, Any]:
    """The metadata ``_write_checked_json`` wrote; :class:`DamagedCacheError` unless every byte is as written."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise _damaged(path, entry, "is missing") from None
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as err:  # invalid UTF-8 or JSON
        raise _damaged(path, entry, f"is not valid JSON ({type(err).__name__})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("checksum"), str):
        raise _damaged(path, entry, "holds no checksum (written by an older version, or damaged)")
    body = {k: v for k, v in obj.items() if k != "checksum"}
    if raw != _canonical_json(obj) or hashlib.sha256(_canonical_json(body)).hexdigest() != obj["checksum"]:
        raise _damaged(path, entry, "does not match its checksum")
    if body.get("format") != FORMAT_VERSION:
        raise _damaged(path, entry, f"is of cache format {body.get('format')!r}; this version reads {FORMAT_VERSION}")
    return body


def _check_entry(entry: Path, meta_name: str) -> dict[str, Any]:
    """Check a cache entry's metadata, every file's size and the small files' SHA-256; returns the metadata.

    Token files (recorded with a ``crc32`` table) are checked chunk by chunk where they are read.
    """
    meta_path = entry / meta_name
    meta = _read_checked_json(meta_path, entry)
    files = meta.get("files")
    if not isinstance(files, dict) or not files:
        raise _damaged(meta_path, entry, "lists no files")
    for name, record in files.items():
        path = entry / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise _damaged(path, entry, f"is missing ({meta_name} lists it)") from None
        if size != record["bytes"]:
            raise _damaged(path, entry, f"holds {size} bytes, {meta_name} records {record['bytes']}")
        if "sha256" in record and file_sha256(path) != record["sha256"]:
            raise _damaged(path, entry, f"does not match the SHA-256 that {meta_name} records")
    return meta


def _num_threads(cfg: DataConfig) -> int:
    if cfg.num_threads:
        return cfg.num_threads
    try:
        cpus = len(os.sched_getaffinity(0))  # respects Slurm/cgroup CPU binding
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 16))


# ----------------------------------------------------------------------------------------- tokenizer


def _trainer_options(cfg: DataConfig) -> dict[str, Any]:
    # identity normalization and kept whitespace: decode(encode(text)) == text, indentation included.
    # "\n" is its own piece and no dummy "▁" is prepended, so lines train and encode the same way.
    return dict(
        vocab_size=cfg.vocab_size,
        model_type=cfg.tokenizer_type,
        character_coverage=float(cfg.character_coverage),
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        user_defined_symbols=["\n"],
        allow_whitespace_only_pieces=True,
        split_digits=True,
        max_sentence_length=4 * _MAX_SENTENCE_CHARS,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
    )


def _tokenizer_key(cfg: DataConfig, sources: Sequence[CorpusFile], digests: Sequence[str]) -> str:
    corpus = [(s.kind, d) for s, d in zip(sources, digests)]
    return _key(
        "tokenizer", FORMAT_VERSION, spm.__version__, corpus, _trainer_options(cfg), cfg.tokenizer_sample_sentences
    )


def _sample_sentences(sources: Sequence[CorpusFile], k: int) -> tuple[list[str], int]:
    """A uniform sample (reservoir, fixed seed) of at most ``k`` non-empty lines; also the line count."""
    rng = random.Random(_SAMPLE_SEED)
    sample: list[str] = []
    seen = 0
    for source in sources:
        for doc in read_documents(source):
            for line in doc.split("\n"):
                line = line.rstrip()
                if not line or len(line) > _MAX_SENTENCE_CHARS:
                    continue
                if seen < k:
                    sample.append(line)
                else:
                    j = rng.randrange(seen + 1)
                    if j < k:
                        sample[j] = line
                seen += 1
    rng.shuffle(sample)
    return sample, seen


def _train_sentencepiece(sentences: list[str], cfg: DataConfig) -> bytes:
    """Train a SentencePiece model on ``sentences``; returns the serialized model."""
    model = io.BytesIO()
    spm.set_random_generator_seed(_SAMPLE_SEED)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            num_threads=_num_threads(cfg),
            minloglevel=2,
            **_trainer_options(cfg),
        )
    except RuntimeError as exc:
        raise DataError(
            f"SentencePiece training failed: {str(exc).rstrip('.')}. If the vocabulary is smaller than the "
            "corpus's characters, raise data.vocab_size or lower data.character_coverage; if it is too large for "
            "this corpus, lower data.vocab_size or add text"
        ) from None
    return model.getvalue()


def _ensure_tokenizer(cfg: DataConfig, sources: Sequence[CorpusFile], digests: Sequence[str], tok_key: str) -> Path:
    """Path of the cached tokenizer for ``tok_key``, training it (under its lock) on a miss.

    A hit is checked first (its ``tokenizer.json`` and the model's SHA-256); a damaged one is trained again.
    """
    root = cfg.cache_path / "tokenizers"
    final = root / tok_key
    model_path = final / "tokenizer.model"
    with contextlib.suppress(DamagedCacheError, FileNotFoundError):  # both: (re)built below, under the lock
        _check_entry(final, "tokenizer.json")
        return model_path
    with _file_lock(root / f"{tok_key}.lock"):
        if _open_or_discard(final, lambda entry: _check_entry(entry, "tokenizer.json")) is not None:
            return model_path  # built by another process while we waited
        t0 = time.perf_counter()
        sentences, n_lines = _sample_sentences(sources, cfg.tokenizer_sample_sentences)
        if not sentences:
            raise DataError(f"data.files: the corpus ({len(sources)} file(s)) holds no text to train a tokenizer on")
        model = _train_sentencepiece(sentences, cfg)
        with _building(final) as tmp:
            (tmp / "tokenizer.model").write_bytes(model)
            _write_checked_json(
                tmp / "tokenizer.json",
                {
                    "format": FORMAT_VERSION,
                    "key": tok_key,
                    "options": _trainer_options(cfg),
                    "sentencepiece": spm.__version__,
                    "sample_sentences": len(sentences),
                    "corpus_lines": n_lines,
                    "sources": [{"path": str(s.path), "sha256": d} for s, d in zip(sources, digests)],
                    "files": {"tokenizer.model": _bytes_record(model)},
                },
            )
        log.info(
            "trained a %s tokenizer (vocab %d) on %d of %d lines in %.1fs -> %s",
            cfg.tokenizer_type,
            cfg.vocab_size,
            len(sentences),
            n_lines,
            time.perf_counter() - t0,
            model_path,
        )
    return model_path


def train_tokenizer(cfg: DataConfig) -> Path:
    """Train (or reuse from the cache) the tokenizer for ``cfg``'s corpus; returns its ``.model`` path.

    The cache key covers the sha256 of every corpus file, the vocabulary size and all trainer options, so
    a second call with the same inputs loads the cached model and a changed file retrains.
    """
    sources = resolve_corpus(cfg)
    digests = [file_sha256(s.path) for s in sources]
    return _ensure_tokenizer(cfg, sources, digests, _tokenizer_key(cfg, sources, digests))


def load_tokenizer(path: str | os.PathLike[str]) -> spm.SentencePieceProcessor:
    """Load a SentencePiece model file."""
    return spm.SentencePieceProcessor(model_file=os.fspath(path))


class _TrainedTokenizer:
    """The SentencePiece model trained here, behind the interface a pretrained tokenizer also has."""

    def __init__(self, model_path: Path) -> None:
        self.model = model_path.read_bytes()  # read once: the copy in the dataset is what encoded it
        self.sp = spm.SentencePieceProcessor(model_proto=self.model)
        self.vocab_size, self.eos_id = self.sp.vocab_size(), self.sp.eos_id()

    def encode(self, documents: list[str], num_threads: int) -> list[list[int]]:
        return self.sp.encode(documents, num_threads=num_threads)

    def copy_to(self, out: Path) -> dict[str, dict[str, Any]]:
        (out / "tokenizer.model").write_bytes(self.model)
        return {"tokenizer.model": _bytes_record(self.model)}


# -------------------------------------------------------------------------------------------- tokens


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


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
            raise _damaged(
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
        return _map_tokens, (Path(self.filename), self.dtype.str, len(self), c.table_path, c.entry, c.chunk_bytes)

    def check(self, start_B: np.ndarray, count: int) -> None:
        """Check the tokens ``[start, start + count)`` of each start in ``start_B`` against the file's
        CRC-32 table (each chunk once per process); raises :class:`DamagedCacheError` on a mismatch."""
        if self.chunks is not None:
            self.chunks.check_range(np.asarray(start_B, dtype=np.int64) * self.itemsize, count * self.itemsize)


@dataclass
class PreparedData:
    """A prepared dataset directory: its tokenizer, read-only token memmaps and metadata.

    ``meta`` holds token and document counts per split, dtype, vocab size, EOS id, the source files and
    the checksums of the directory's files. ``train_tokens``/``val_tokens`` are :class:`TokenMemmap`s:
    their chunks are checked as :class:`PackedDataset` reads them.
    """

    directory: Path
    meta: dict[str, Any]
    train_tokens: np.ndarray
    val_tokens: np.ndarray

    @property
    def tokenizer_path(self) -> Path:
        return self.directory / "tokenizer.model"

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def eos_id(self) -> int:
        return int(self.meta["eos_id"])

    def tokenizer(self) -> spm.SentencePieceProcessor:
        """The tokenizer these tokens were made with (a copy lives in the dataset directory)."""
        return load_tokenizer(self.tokenizer_path)

    def tokens(self, split: Split) -> np.ndarray:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        return self.train_tokens if split == "train" else self.val_tokens

    def dataset(self, split: Split, seq_len: int) -> PackedDataset:
        """Packed windows of ``seq_len + 1`` tokens over one split."""
        return PackedDataset(self.tokens(split), seq_len, name=split)

    def verify(self) -> None:
        """Check every chunk of both token files now (reads them in full; training checks as it reads)."""
        for tokens in (self.train_tokens, self.val_tokens):
            chunks = getattr(tokens, "chunks", None)
            if chunks is not None:
                chunks.check_all()


def _open_tokens(entry: Path, meta: dict[str, Any], split: Split) -> np.ndarray:
    dtype = np.dtype(meta["dtype"])
    count = int(meta[f"{split}_tokens"])
    path = entry / f"{split}.bin"
    record = meta["files"].get(path.name)
    if record is None or record["bytes"] != count * dtype.itemsize or "crc32" not in record:
        raise _damaged(entry / "meta.json", entry, f"records no checksums of {count} tokens of {dtype} for {path.name}")
    if count == 0:
        return np.zeros(0, dtype=dtype)  # numpy cannot map an empty file
    return _map_tokens(path, dtype.str, count, entry / record["crc32"], entry, int(record["chunk_bytes"]))


def _map_tokens(path: Path, dtype: str, count: int, table: Path, entry: Path, chunk_bytes: int) -> TokenMemmap:
    tokens = TokenMemmap(path, dtype=np.dtype(dtype), mode="r", shape=(count,))
    tokens.chunks = TokenChunks(path, table, entry, np.asarray(tokens).view(np.uint8), chunk_bytes)
    return tokens


def open_prepared(directory: str | os.PathLike[str]) -> PreparedData:
    """Open a complete dataset directory (one ``prepare_data`` made), checking it first.

    Checks ``meta.json`` (every byte), each file's size and the tokenizer files' SHA-256; the token files
    are checked chunk by chunk as they are read. Raises :class:`DamagedCacheError` naming the file.
    """
    directory = Path(directory)
    meta = _check_entry(directory, "meta.json")
    return PreparedData(
        directory=directory,
        meta=meta,
        train_tokens=_open_tokens(directory, meta, "train"),
        val_tokens=_open_tokens(directory, meta, "val"),
    )


def _encode_batches(sources: Sequence[CorpusFile], sp: Any, threads: int) -> Iterator[tuple[int, list[list[int]]]]:
    """Yield (source index, token ids per document) in corpus order, encoding a few MB at a time."""
    for i, source in enumerate(sources):
        batch: list[str] = []
        chars = 0
        for doc in read_documents(source):
            batch.append(doc)
            chars += len(doc)
            if chars >= _ENCODE_BATCH_CHARS:
                yield i, sp.encode(batch, num_threads=threads)
                batch, chars = [], 0
        if batch:
            yield i, sp.encode(batch, num_threads=threads)


def _choose_val_docs(doc_lengths: np.ndarray, val_fraction: float) -> np.ndarray:
    """Boolean mask of validation documents: seeded-random documents until ``val_fraction`` of the tokens."""
    n_docs = len(doc_lengths)
    is_val = np.zeros(n_docs, dtype=bool)
    if val_fraction == 0:
        return is_val
    if n_docs < 2:
        raise DataError(
            f"data.val_fraction={val_fraction}: the corpus holds {n_docs} document(s) and the split is at document "
            "boundaries, so it needs at least 2; add documents (a JSONL file holds one per line) or set "
            "data.val_fraction=0"
        )
    order = np.random.default_rng(_SAMPLE_SEED).permutation(n_docs)
    cum = np.cumsum(doc_lengths[order])
    n_val = int(np.searchsorted(cum, val_fraction * cum[-1], side="left")) + 1
    is_val[order[: min(max(n_val, 1), n_docs - 1)]] = True
    return is_val


class _ChunkedWriter:
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

    def __enter__(self) -> _ChunkedWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fill:
            self._end_chunk()
        self._data.close()
        self._table.close()


def _build_dataset(
    cfg: DataConfig, sources: Sequence[CorpusFile], digests: Sequence[str], sp: Any, data_key: str, out: Path
) -> None:
    """Tokenize the corpus once into ``out``/{train,val}.bin (EOS after each document) and write meta.json.

    ``sp`` is the tokenizer (trained here or pretrained): ``encode``, ``vocab_size``, ``eos_id``, and
    ``copy_to`` (which returns the size and SHA-256 of each file it copied). Every file's checksum is
    computed from the bytes as they are written, and meta.json records them all.
    """
    t0 = time.perf_counter()
    tokenizer_files = sp.copy_to(out)
    vocab, eos = sp.vocab_size, sp.eos_id
    dtype = token_dtype(vocab)
    threads = _num_threads(cfg)

    # Pass 1: every document in corpus order into one stream; remember each document's length.
    doc_lengths: list[int] = []
    docs_per_source = [0] * len(sources)
    all_path = out / "all.tmp"
    with open(all_path, "wb") as f:
        for i, batch in _encode_batches(sources, sp, threads):
            for ids in batch:
                ids.append(eos)
                f.write(np.asarray(ids, dtype=dtype).tobytes())
                doc_lengths.append(len(ids))
            docs_per_source[i] += len(batch)
    lengths = np.asarray(doc_lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        raise DataError(f"data.files: the corpus ({len(sources)} file(s)) holds no text")

    # Pass 2: copy runs of consecutive same-split documents; each split keeps corpus order.
    is_val = _choose_val_docs(lengths, float(cfg.val_fraction))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(is_val.astype(np.int8))) + 1, [len(lengths)]])
    stream = np.memmap(all_path, dtype=dtype, mode="r", shape=(total,))
    counts = {"train": 0, "val": 0}
    with _ChunkedWriter(out, "train", CHUNK_BYTES) as ftrain, _ChunkedWriter(out, "val", CHUNK_BYTES) as fval:
        for a, b in zip(bounds[:-1], bounds[1:]):
            split = "val" if is_val[a] else "train"
            dst = fval if split == "val" else ftrain
            for start in range(int(offsets[a]), int(offsets[b]), _COPY_CHUNK_TOKENS):
                chunk = stream[start : min(start + _COPY_CHUNK_TOKENS, int(offsets[b]))]
                dst.write(chunk.tobytes())
                counts[split] += len(chunk)
    del stream
    all_path.unlink()

    _write_checked_json(
        out / "meta.json",
        {
            "format": FORMAT_VERSION,
            "key": data_key,
            "dtype": dtype.name,
            "vocab_size": vocab,
            "eos_id": eos,
            "tokenizer_type": cfg.tokenizer_type if cfg.tokenizer is None else f"pretrained:{sp.kind}",
            "tokenizer": cfg.tokenizer,
            "train_tokens": counts["train"],
            "val_tokens": counts["val"],
            "train_documents": int((~is_val).sum()),
            "val_documents": int(is_val.sum()),
            "val_fraction": cfg.val_fraction,
            "sources": [
                {"path": str(s.path), "kind": s.kind, "bytes": s.size, "sha256": d, "documents": n}
                for s, d, n in zip(sources, digests, docs_per_source)
            ],
            "files": {**tokenizer_files, **ftrain.records(), **fval.records()},
        },
    )
    log.info(
        "tokenized %d documents into %d train + %d val tokens in %.1fs (dataset %s)",
        len(lengths),
        counts["train"],
        counts["val"],
        time.perf_counter() - t0,
        data_key,
    )


def _stat_key(cfg: DataConfig, sources: Sequence[CorpusFile]) -> str:
    # Everything that decides data_key, with stat signatures standing in for the contents.
    settings = {k: v for k, v in cfg.to_dict().items() if k not in ("seed", "seq_len", "cache_dir", "num_threads")}
    files = [(str(s.path), s.kind, s.size, s.mtime_ns) for s in sources]
    tokenizer = tokenizer_stat(cfg.tokenizer) if cfg.tokenizer is not None else None
    return _key("stat", FORMAT_VERSION, spm.__version__, settings, files, tokenizer)


def _prepare_here(cfg: DataConfig) -> PreparedData:
    """Hash the corpus, reuse or build tokenizer and tokens, record the index entry, open the memmaps."""
    sources = resolve_corpus(cfg)
    digests = [file_sha256(s.path) for s in sources]
    pretrained = load_pretrained_tokenizer(cfg.tokenizer) if cfg.tokenizer is not None else None
    if pretrained is None:
        tok_key = _tokenizer_key(cfg, sources, digests)
    else:
        tok_key = _key("pretrained", FORMAT_VERSION, pretrained.key())
    data_key = _key(
        "data", FORMAT_VERSION, tok_key, [(s.kind, d) for s, d in zip(sources, digests)], float(cfg.val_fraction)
    )
    root = cfg.cache_path / "datasets"
    final = root / data_key
    data = None
    with contextlib.suppress(DamagedCacheError, FileNotFoundError):  # both: (re)built below, under the lock
        data = open_prepared(final)
    if data is None:
        with _file_lock(root / f"{data_key}.lock"):
            data = _open_or_discard(final, open_prepared)  # another process may have built it while we waited
            if data is None:
                if pretrained is None:
                    tokenizer = _TrainedTokenizer(_ensure_tokenizer(cfg, sources, digests, tok_key))
                else:
                    tokenizer = pretrained
                with _building(final) as tmp:
                    _build_dataset(cfg, sources, digests, tokenizer, data_key, tmp)
                data = open_prepared(final)
    _write_json_atomic(cfg.cache_path / "index" / f"{_stat_key(cfg, sources)}.json", {"data_key": data_key})
    return data


def _read_index_entry(path: Path) -> dict[str, str] | None:
    """Rank 0's index entry: ``{"data_key": ...}`` or ``{"error": ...}``; None if missing or unreadable
    (a damaged entry only costs this rank a content hash of the corpus, in ``_prepare_here``)."""
    try:
        entry = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(entry, dict):
        return None
    if isinstance(entry.get("error"), str):
        return {"error": entry["error"]}
    key = entry.get("data_key")
    if isinstance(key, str) and len(key) == 24 and all(c in "0123456789abcdef" for c in key):
        return {"data_key": key}
    return None


def prepare_data(cfg: DataConfig, rank: int = 0, barrier: Callable[[], Any] | None = None) -> PreparedData:
    """Prepare tokenizer and token files on rank 0 while the other ranks wait; every rank opens the memmaps.

    ``barrier`` is called exactly once on every rank (e.g. ``torch.distributed.barrier``; ``None`` without
    distribution): rank 0 calls it after preparing, the others before opening. Pass the global rank when
    ``cache_dir`` is on a shared filesystem; with a node-local ``cache_dir`` pass the local rank (a rank
    that finds nothing after the barrier prepares for itself, under the same lock, so it is correct
    either way). If rank 0 fails, it still calls the barrier, and the waiting ranks raise too.

    Every rank checks what it opens (module docstring, "Integrity"): a preparing rank rebuilds a damaged
    entry; a waiting rank raises :class:`DamagedCacheError` naming the file.

    Returns a :class:`PreparedData` (tokenizer, ``train_tokens``/``val_tokens`` memmaps, ``meta``).
    """
    if rank == 0:
        try:
            data = _prepare_here(cfg)
        except Exception as exc:
            with contextlib.suppress(Exception):  # tell the waiting ranks why, if we got as far as the files
                sources = resolve_corpus(cfg)
                _write_json_atomic(
                    cfg.cache_path / "index" / f"{_stat_key(cfg, sources)}.json",
                    {"error": f"{type(exc).__name__}: {exc}"},
                )
            if barrier is not None:
                barrier()  # release the waiting ranks instead of leaving them in the barrier until a timeout
            raise
        if barrier is not None:
            barrier()
        return data

    if barrier is not None:
        barrier()
    sources = resolve_corpus(cfg)  # stat only: the index maps path+size+mtime to rank 0's content-hashed key
    entry = _read_index_entry(cfg.cache_path / "index" / f"{_stat_key(cfg, sources)}.json")
    if entry is not None and "error" in entry:
        raise DataError(f"rank 0 failed to prepare the data: {entry['error']}")
    if entry is not None and (cfg.cache_path / "datasets" / entry["data_key"]).exists():
        # Rank 0 checked this entry and the job's ranks read it now: damage found here stops the job
        # (DamagedCacheError names the file) rather than rebuilding it under the others.
        return open_prepared(cfg.cache_path / "datasets" / entry["data_key"])
    return _prepare_here(cfg)  # cache_dir not shared with rank 0: prepare here (locked, so once per directory)


# ------------------------------------------------------------------------------------------- batches


class PackedDataset(torch.utils.data.Dataset):
    """Fixed windows of ``seq_len + 1`` tokens over a token stream (documents already joined by EOS).

    Window ``i`` starts at token ``i * seq_len``: inputs never overlap, and consecutive windows share one
    boundary token so every token after the first is a target exactly once. Item ``i`` is
    ``(inputs_S, targets_S)`` with ``targets_S = window[1:]``, ``inputs_S = window[:-1]`` (int64).
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, name: str = "tokens") -> None:
        if seq_len < 1:
            raise DataConfigError(f"data.seq_len={seq_len!r} is invalid: must be a positive integer")
        self.tokens = tokens
        self.seq_len = seq_len
        self.num_windows = max(0, (len(tokens) - 1) // seq_len)
        if self.num_windows == 0:
            raise DataError(
                f"the {name} split holds {len(tokens)} tokens, fewer than data.seq_len+1={seq_len + 1}; lower "
                "data.seq_len, raise data.val_fraction (for val) or add text"
            )

    def __len__(self) -> int:
        return self.num_windows

    def windows(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Token windows ``[B, seq_len + 1]`` (stream dtype) for window indices ``[B]``.

        Over a cache's :class:`TokenMemmap`, the chunks under all ``B`` windows are checked first (once per
        chunk and process): a damaged one raises :class:`DamagedCacheError` and no window is returned.
        """
        idx_B = np.asarray(indices, dtype=np.int64)
        if idx_B.size and (idx_B.min() < 0 or idx_B.max() >= self.num_windows):
            raise IndexError(f"window index out of range [0, {self.num_windows})")
        start_B = idx_B * self.seq_len
        if isinstance(self.tokens, TokenMemmap):
            self.tokens.check(start_B, self.seq_len + 1)
        pos_BW = start_B[:, None] + np.arange(self.seq_len + 1)
        return np.asarray(self.tokens[pos_BW])

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs_BS, targets_BS)`` int64 tensors for window indices ``[B]``."""
        win_BW = torch.from_numpy(self.windows(indices).astype(np.int64))
        return win_BW[:, :-1], win_BW[:, 1:]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        inputs_BS, targets_BS = self.get_batch([index])
        return inputs_BS[0], targets_BS[0]


class DistributedBatchIterator:
    """Endless, resumable micro-batches of a :class:`PackedDataset` for one data-parallel rank.

    The global sample stream is epoch after epoch of a permutation seeded by ``(seed, epoch)``; its
    position is ``consumed_samples`` (global). Each micro-step takes the next ``micro_batch_size * dp_size``
    stream positions and rank ``r`` gets the ``r``-th block of ``micro_batch_size``, so the ranks' shards
    are disjoint and a global batch (``grad_accum_steps`` micro-steps) is the next
    ``global_batch_size`` samples of the stream, whatever ``dp_size`` is. A saved position can therefore
    be loaded at another DP size and continues with the same global sample.
    """

    def __init__(
        self,
        dataset: PackedDataset,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        grad_accum_steps: int = 1,
        seed: int = 0,
    ) -> None:
        for name, value, low in (
            ("micro_batch_size", micro_batch_size, 1),
            ("dp_size", dp_size, 1),
            ("grad_accum_steps", grad_accum_steps, 1),
            ("seed", seed, 0),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise DataConfigError(f"{name}={value!r} is invalid: must be an integer >= {low}")
        if not isinstance(dp_rank, int) or not 0 <= dp_rank < dp_size:
            raise DataConfigError(f"dp_rank={dp_rank!r} is invalid: must be in [0, dp_size={dp_size})")
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.grad_accum_steps = grad_accum_steps
        self.seed = seed
        self.num_samples = len(dataset)
        self.consumed_samples = 0
        self._perms: dict[int, np.ndarray] = {}

    @property
    def global_batch_size(self) -> int:
        """Samples per optimizer step over all DP ranks: micro_batch_size × grad_accum_steps × dp_size."""
        return self.micro_batch_size * self.grad_accum_steps * self.dp_size

    @property
    def epoch(self) -> int:
        return self.consumed_samples // self.num_samples

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:  # a micro-step rarely spans more than two epochs; keep memory bounded
                self._perms.pop(min(self._perms))
            rng = np.random.default_rng([self.seed, epoch])
            self._perms[epoch] = rng.permutation(self.num_samples)
        return self._perms[epoch]

    def stream_indices(self, start: int, count: int) -> np.ndarray:
        """Window indices at global stream positions ``[start, start + count)``."""
        out = np.empty(count, dtype=np.int64)
        filled = 0
        while filled < count:
            pos = start + filled
            epoch, offset = divmod(pos, self.num_samples)
            take = min(count - filled, self.num_samples - offset)
            out[filled : filled + take] = self._permutation(epoch)[offset : offset + take]
            filled += take
        return out

    def next_indices(self) -> np.ndarray:
        """This rank's window indices for the next micro-batch ``[micro_batch_size]``; advances the position."""
        idx_B = self.stream_indices(self.consumed_samples + self.dp_rank * self.micro_batch_size, self.micro_batch_size)
        self.consumed_samples += self.micro_batch_size * self.dp_size
        return idx_B

    def __iter__(self) -> DistributedBatchIterator:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next micro-batch ``(inputs_BS, targets_BS)`` of this rank."""
        return self.dataset.get_batch(self.next_indices())

    def state_dict(self) -> dict[str, int]:
        """The position to save in a checkpoint (``consumed_samples`` is global, so DP size may change)."""
        epoch, index = divmod(self.consumed_samples, self.num_samples)
        return {
            "consumed_samples": self.consumed_samples,
            "epoch": epoch,
            "index": index,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "global_batch_size": self.global_batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; the next micro-step starts at its ``consumed_samples``."""
        consumed = state.get("consumed_samples")
        if not isinstance(consumed, int) or consumed < 0:
            raise DataError(f"data position: consumed_samples={consumed!r} must be an integer >= 0")
        if state.get("num_samples") != self.num_samples:
            raise DataError(
                f"data position was saved for {state.get('num_samples')} samples but this dataset has "
                f"{self.num_samples} (data.files, data.seq_len or the split changed), so it cannot be continued; "
                "restore the data settings of the saved run or start the data from the beginning"
            )
        if state.get("seed") != self.seed:
            raise DataError(
                f"data position was saved with data.seed={state.get('seed')}, this run has "
                f"data.seed={self.seed}; set data.seed={state.get('seed')} to continue it"
            )
        self.consumed_samples = consumed


def iter_eval_batches(
    dataset: PackedDataset, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1, max_batches: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One in-order pass for evaluation: ``(inputs_BS, targets_BS)`` micro-batches of this DP rank.

    Every rank yields the same number of batches (only full rounds of ``micro_batch_size * dp_size``
    windows), so collectives in the eval loop stay matched.
    """
    step = micro_batch_size * dp_size
    rounds = len(dataset) // step
    if max_batches is not None:
        rounds = min(rounds, max_batches)
    for r in range(rounds):
        start = r * step + dp_rank * micro_batch_size
        yield dataset.get_batch(np.arange(start, start + micro_batch_size))
