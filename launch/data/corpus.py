"""The training text: :class:`DataConfig` (the ``data.*`` settings), the corpus files it names, their documents.

``data.files`` lists text files (one document each) and JSONL files (one document per line's ``"text"``),
globs allowed; unset, the corpus is the running interpreter's standard library sources, present on every
machine. :func:`resolve_corpus` expands the list into :class:`CorpusFile` records (path, kind, stat
signature) and :func:`read_documents` yields one file's documents.
"""

from __future__ import annotations

import glob
import json
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

TOKENIZER_TYPES = ("bpe", "unigram")
CorpusKind = Literal["text", "jsonl"]

_JSONL_SUFFIXES = (".jsonl", ".ndjson")
_SKIP_STDLIB_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
# Fixed: the tokenizer sample and the validation split depend on the corpus only, not on `seed`.
SAMPLE_SEED = 0
_MIN_VOCAB = 320  # 256 byte-fallback pieces + <unk>, <s>, </s>, "\n" + room for the corpus's characters


class DataConfigError(ValueError):
    """A data configuration value is out of range; the message names the field (``data.<field>``) and the fix."""


class DataError(ValueError):
    """The corpus, the cache or a saved data position is unusable; the message names the file or field."""


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
        """``cache_dir`` with ``~`` and environment variables expanded, absolute."""
        return Path(os.path.expandvars(os.path.expanduser(os.fspath(self.cache_dir)))).resolve()

    @property
    def threads(self) -> int:
        """Tokenizer training/encoding threads: ``num_threads``, or with 0 the CPUs this process may use (max 16)."""
        if self.num_threads:
            return self.num_threads
        try:
            cpus = len(os.sched_getaffinity(0))  # respects Slurm/cgroup CPU binding
        except AttributeError:
            cpus = os.cpu_count() or 1
        return max(1, min(cpus, 16))

    def to_dict(self) -> dict[str, Any]:
        """The settings as a plain dict."""
        return asdict(self)


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
