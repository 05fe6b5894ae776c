"""The token cache: the corpus tokenized once into memory-mapped ``train.bin`` / ``val.bin``, shared by jobs.

:func:`prepare_data` is the entry point: rank 0 builds (or reuses) the dataset entry while the other ranks
wait, then every rank opens it as a :class:`PreparedData`. Layout under ``DataConfig.cache_dir`` (every key
is a sha256 over everything that decides the result):

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
``tokenizer.model``. Each document is followed by EOS, and the validation split is whole documents.

Entries are built and checked as :mod:`launch.data.cache` describes. A damaged entry found when opening it
on a preparing rank (rank 0, or a rank that prepares for itself) is moved aside, deleted and rebuilt under
its lock, with a warning that names the file. Anywhere else (a rank that waits for rank 0, a chunk found
damaged while training) :class:`DamagedCacheError` stops the job naming the file, the damaged byte range
and the fix: delete the entry; the next run rebuilds it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm

from launch.data.cache import (
    FORMAT_VERSION,
    ChunkedWriter,
    DamagedCacheError,
    Split,
    building,
    cache_key,
    check_entry,
    damaged,
    file_lock,
    map_tokens,
    open_or_discard,
    write_checked_json,
    write_json_atomic,
)
from launch.data.corpus import SAMPLE_SEED, CorpusFile, DataConfig, DataError, read_documents, resolve_corpus
from launch.data.sampler import PackedDataset
from launch.data.tokenizer import TrainedTokenizer, ensure_tokenizer, load_tokenizer, tokenizer_key
from launch.hf_tokenizer import file_sha256, load_pretrained_tokenizer, tokenizer_stat

log = logging.getLogger(__name__)

_ENCODE_BATCH_CHARS = 4_000_000
_COPY_CHUNK_TOKENS = 1 << 24
# Bytes per CRC-32 of a token file. The first read of a window checks every chunk under it (at most two
# for windows up to this size), so the chunk bounds the extra bytes a first touch reads: 128 KiB is about
# what the kernel reads around one page fault of a memory map anyway, costs ~40 us of CRC at ~3.5 GB/s,
# and keeps the tables at 1/32768 of the tokens (32 MiB per TiB, memory-mapped: only the entries of
# chunks read are loaded). Recorded per file in meta.json, so a cache keeps the size it was built with.
CHUNK_BYTES = 1 << 17


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


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
        """The trained SentencePiece model's copy in the dataset directory."""
        return self.directory / "tokenizer.model"

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size."""
        return int(self.meta["vocab_size"])

    @property
    def eos_id(self) -> int:
        """The token that ends each document."""
        return int(self.meta["eos_id"])

    def tokenizer(self) -> spm.SentencePieceProcessor:
        """The tokenizer these tokens were made with (a copy lives in the dataset directory)."""
        return load_tokenizer(self.tokenizer_path)

    def tokens(self, split: Split) -> np.ndarray:
        """The token stream of ``split`` (``"train"`` or ``"val"``)."""
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
        raise damaged(entry / "meta.json", entry, f"records no checksums of {count} tokens of {dtype} for {path.name}")
    if count == 0:
        return np.zeros(0, dtype=dtype)  # numpy cannot map an empty file
    return map_tokens(path, dtype.str, count, entry / record["crc32"], entry, int(record["chunk_bytes"]))


def open_prepared(directory: str | os.PathLike[str]) -> PreparedData:
    """Open a complete dataset directory (one ``prepare_data`` made), checking it first.

    Checks ``meta.json`` (every byte), each file's size and the tokenizer files' SHA-256; the token files
    are checked chunk by chunk as they are read. Raises :class:`DamagedCacheError` naming the file.
    """
    directory = Path(directory)
    meta = check_entry(directory, "meta.json")
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
    order = np.random.default_rng(SAMPLE_SEED).permutation(n_docs)
    cum = np.cumsum(doc_lengths[order])
    n_val = int(np.searchsorted(cum, val_fraction * cum[-1], side="left")) + 1
    is_val[order[: min(max(n_val, 1), n_docs - 1)]] = True
    return is_val


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

    # Pass 1: every document in corpus order into one stream; remember each document's length.
    doc_lengths: list[int] = []
    docs_per_source = [0] * len(sources)
    all_path = out / "all.tmp"
    with open(all_path, "wb") as f:
        for i, batch in _encode_batches(sources, sp, cfg.threads):
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
    with ChunkedWriter(out, "train", CHUNK_BYTES) as ftrain, ChunkedWriter(out, "val", CHUNK_BYTES) as fval:
        for a, b in zip(bounds[:-1], bounds[1:]):
            split = "val" if is_val[a] else "train"
            dst = fval if split == "val" else ftrain
            for start in range(int(offsets[a]), int(offsets[b]), _COPY_CHUNK_TOKENS):
                chunk = stream[start : min(start + _COPY_CHUNK_TOKENS, int(offsets[b]))]
                dst.write(chunk.tobytes())
                counts[split] += len(chunk)
    del stream
    all_path.unlink()

    write_checked_json(
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
    return cache_key("stat", FORMAT_VERSION, spm.__version__, settings, files, tokenizer)


def _prepare_here(cfg: DataConfig) -> PreparedData:
    """Hash the corpus, reuse or build tokenizer and tokens, record the index entry, open the memmaps."""
    sources = resolve_corpus(cfg)
    digests = [file_sha256(s.path) for s in sources]
    pretrained = load_pretrained_tokenizer(cfg.tokenizer) if cfg.tokenizer is not None else None
    if pretrained is None:
        tok_key = tokenizer_key(cfg, sources, digests)
    else:
        tok_key = cache_key("pretrained", FORMAT_VERSION, pretrained.key())
    data_key = cache_key(
        "data", FORMAT_VERSION, tok_key, [(s.kind, d) for s, d in zip(sources, digests)], float(cfg.val_fraction)
    )
    root = cfg.cache_path / "datasets"
    final = root / data_key
    data = None
    with contextlib.suppress(DamagedCacheError, FileNotFoundError):  # both: (re)built below, under the lock
        data = open_prepared(final)
    if data is None:
        with file_lock(root / f"{data_key}.lock"):
            data = open_or_discard(final, open_prepared)  # another process may have built it while we waited
            if data is None:
                if pretrained is None:
                    tokenizer = TrainedTokenizer(ensure_tokenizer(cfg, sources, digests, tok_key))
                else:
                    tokenizer = pretrained
                with building(final) as tmp:
                    _build_dataset(cfg, sources, digests, tokenizer, data_key, tmp)
                data = open_prepared(final)
    write_json_atomic(cfg.cache_path / "index" / f"{_stat_key(cfg, sources)}.json", {"data_key": data_key})
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

    Every rank checks what it opens (:mod:`launch.data.cache`, "Integrity"): a preparing rank rebuilds a damaged
    entry; a waiting rank raises :class:`DamagedCacheError` naming the file.

    Returns a :class:`PreparedData` (tokenizer, ``train_tokens``/``val_tokens`` memmaps, ``meta``).
    """
    if rank == 0:
        try:
            data = _prepare_here(cfg)
        except Exception as exc:
            with contextlib.suppress(Exception):  # tell the waiting ranks why, if we got as far as the files
                sources = resolve_corpus(cfg)
                write_json_atomic(
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
