"""The SentencePiece tokenizer trained on the corpus, cached under ``<cache_dir>/tokenizers/<tok_key>/``.

It is trained on a bounded, seeded sample of the corpus's lines, so it depends on the corpus only. The entry
holds ``tokenizer.model`` and ``tokenizer.json`` (the checked metadata, see :mod:`launch.data.cache`);
``tok_key`` covers the sha256 of every corpus file, the vocabulary size and all trainer options, so the same
inputs reuse the cached model and a changed file retrains. With ``data.tokenizer`` set a pretrained
tokenizer (``launch/hf_tokenizer.py``) is used instead and nothing is trained.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm

from launch.data.cache import (
    FORMAT_VERSION,
    DamagedCacheError,
    building,
    bytes_record,
    cache_key,
    check_entry,
    file_lock,
    open_or_discard,
    write_checked_json,
)
from launch.data.corpus import SAMPLE_SEED, CorpusFile, DataConfig, DataError, read_documents, resolve_corpus
from launch.hf_tokenizer import file_sha256

log = logging.getLogger(__name__)

_MAX_SENTENCE_CHARS = 2048  # longer lines are left out of the tokenizer sample (minified data, tables)


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


def tokenizer_key(cfg: DataConfig, sources: Sequence[CorpusFile], digests: Sequence[str]) -> str:
    """The cache key of the tokenizer trained on ``sources`` (whose sha256 are ``digests``) with ``cfg``."""
    corpus = [(s.kind, d) for s, d in zip(sources, digests)]
    return cache_key(
        "tokenizer", FORMAT_VERSION, spm.__version__, corpus, _trainer_options(cfg), cfg.tokenizer_sample_sentences
    )


def _sample_sentences(sources: Sequence[CorpusFile], k: int) -> tuple[list[str], int]:
    """A uniform sample (reservoir, fixed seed) of at most ``k`` non-empty lines; also the line count."""
    rng = random.Random(SAMPLE_SEED)
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
    spm.set_random_generator_seed(SAMPLE_SEED)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            num_threads=cfg.threads,
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


def ensure_tokenizer(cfg: DataConfig, sources: Sequence[CorpusFile], digests: Sequence[str], tok_key: str) -> Path:
    """Path of the cached tokenizer for ``tok_key``, training it (under its lock) on a miss.

    A hit is checked first (its ``tokenizer.json`` and the model's SHA-256); a damaged one is trained again.
    """
    root = cfg.cache_path / "tokenizers"
    final = root / tok_key
    model_path = final / "tokenizer.model"
    with contextlib.suppress(DamagedCacheError, FileNotFoundError):  # both: (re)built below, under the lock
        check_entry(final, "tokenizer.json")
        return model_path
    with file_lock(root / f"{tok_key}.lock"):
        if open_or_discard(final, lambda entry: check_entry(entry, "tokenizer.json")) is not None:
            return model_path  # built by another process while we waited
        t0 = time.perf_counter()
        sentences, n_lines = _sample_sentences(sources, cfg.tokenizer_sample_sentences)
        if not sentences:
            raise DataError(f"data.files: the corpus ({len(sources)} file(s)) holds no text to train a tokenizer on")
        model = _train_sentencepiece(sentences, cfg)
        with building(final) as tmp:
            (tmp / "tokenizer.model").write_bytes(model)
            write_checked_json(
                tmp / "tokenizer.json",
                {
                    "format": FORMAT_VERSION,
                    "key": tok_key,
                    "options": _trainer_options(cfg),
                    "sentencepiece": spm.__version__,
                    "sample_sentences": len(sentences),
                    "corpus_lines": n_lines,
                    "sources": [{"path": str(s.path), "sha256": d} for s, d in zip(sources, digests)],
                    "files": {"tokenizer.model": bytes_record(model)},
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
    return ensure_tokenizer(cfg, sources, digests, tokenizer_key(cfg, sources, digests))


def load_tokenizer(path: str | os.PathLike[str]) -> spm.SentencePieceProcessor:
    """Load a SentencePiece model file."""
    return spm.SentencePieceProcessor(model_file=os.fspath(path))


class TrainedTokenizer:
    """The SentencePiece model trained here, behind the interface a pretrained tokenizer also has."""

    def __init__(self, model_path: Path) -> None:
        self.model = model_path.read_bytes()  # read once: the copy in the dataset is what encoded it
        self.sp = spm.SentencePieceProcessor(model_proto=self.model)
        self.vocab_size, self.eos_id = self.sp.vocab_size(), self.sp.eos_id()

    def encode(self, documents: list[str], num_threads: int) -> list[list[int]]:
        """Token ids of each document."""
        return self.sp.encode(documents, num_threads=num_threads)

    def copy_to(self, out: Path) -> dict[str, dict[str, Any]]:
        """Write the model into the dataset directory ``out``; returns its size and SHA-256 by file name."""
        (out / "tokenizer.model").write_bytes(self.model)
        return {"tokenizer.model": bytes_record(self.model)}
