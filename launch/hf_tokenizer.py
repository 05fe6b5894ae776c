"""A pretrained model's own tokenizer, for tokenizing the training corpus (``data.tokenizer``).

A Hugging Face model directory holds ``tokenizer.json`` (the ``tokenizers`` library) or
``tokenizer.model`` (SentencePiece); either is accepted, the directory or the file itself. Documents
are encoded without the tokenizer's own special-token template: ``[BOS] ids [EOS]`` per document,
where BOS is prepended only when ``tokenizer_config.json`` says ``add_bos_token: true`` (Llama and
Mixtral tokenizers) and EOS is the model's end-of-sequence token (``tokenizer_config.json``
``eos_token``, else ``config.json``/``generation_config.json`` ``eos_token_id``).

The cache key of a tokenized corpus covers the sha256 of the tokenizer file and the BOS/EOS ids (all
that decides the ids), so a changed tokenizer re-tokenizes and the same tokenizer in another
directory reuses the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
# Files beside the tokenizer that may decide BOS/EOS (the first two are copied along with it).
SPECIAL_TOKEN_FILES = ("tokenizer_config.json", "special_tokens_map.json", "config.json", "generation_config.json")
COPIED_FILES = SPECIAL_TOKEN_FILES[:2]


class TokenizerError(ValueError):
    """A pretrained tokenizer is missing or unusable; the message names the key and the fix."""


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise TokenizerError(f"{path} is not valid JSON ({err}): fix or re-download it") from None
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _first_id(value: Any) -> int | None:
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks (content hashes of data and tokenizers)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class PretrainedTokenizer:
    """One tokenizer file plus the special-token settings around it; ``encode`` many documents at once."""

    file: Path  # tokenizer.json or tokenizer.model
    kind: str  # "tokenizers" | "sentencepiece"
    vocab_size: int
    eos_id: int
    bos_id: int | None  # prepended to every document when not None
    extra_files: list[Path] = field(default_factory=list)  # tokenizer_config.json etc. found beside it
    _impl: Any = None

    @property
    def files(self) -> list[Path]:
        return [self.file, *self.extra_files]

    def key(self) -> dict[str, Any]:
        """What decides the ids (content hashes, not paths): part of the dataset cache key."""
        return {
            "kind": self.kind,
            "sha256": file_sha256(self.file),
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
        }

    def encode(self, documents: list[str], num_threads: int = 0) -> list[list[int]]:
        """Token ids per document, BOS prepended if configured, no EOS (the caller appends it)."""
        if self.kind == "tokenizers":
            ids = [e.ids for e in self._impl.encode_batch(documents, add_special_tokens=False)]
        else:
            ids = self._impl.encode(documents, num_threads=num_threads or -1)
        if self.bos_id is not None:
            ids = [[self.bos_id, *x] for x in ids]
        return [list(x) for x in ids]

    def copy_to(self, dest: Path) -> dict[str, dict[str, Any]]:
        """Copy the tokenizer files into ``dest`` (the dataset directory keeps what made its ids).

        Returns each copy's ``{"bytes", "sha256"}``, hashed from the bytes written (the cache's checksums).
        """
        dest.mkdir(parents=True, exist_ok=True)
        copied = {}
        for path in self.files:
            data = path.read_bytes()  # tokenizer files are small (tens of MB at most)
            (dest / path.name).write_bytes(data)
            copied[path.name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        return copied


def load_pretrained_tokenizer(location: str | os.PathLike[str], key: str = "data.tokenizer") -> PretrainedTokenizer:
    """The tokenizer in ``location``: a model directory, or its ``tokenizer.json`` / ``tokenizer.model``.

    ``key`` names the setting in errors (``data.tokenizer``, ``model.path``).
    """
    path = Path(os.path.expandvars(os.path.expanduser(os.fspath(location)))).resolve()
    if path.is_dir():
        found = [path / name for name in TOKENIZER_FILES if (path / name).is_file()]
        if not found:
            raise TokenizerError(
                f"{key}={os.fspath(location)!r}: the directory holds neither tokenizer.json nor tokenizer.model; "
                "copy the model's tokenizer files there, or point data.tokenizer at one of them"
            )
        file = found[0]  # tokenizer.json first: the fast tokenizer transformers itself prefers
    elif path.is_file():
        file = path
    else:
        raise TokenizerError(
            f"{key}={os.fspath(location)!r} does not exist: give a model directory or a tokenizer file"
        )
    folder = file.parent
    extra = [folder / name for name in COPIED_FILES if (folder / name).is_file()]
    tok_config = _read_json(folder / "tokenizer_config.json")
    special_map = _read_json(folder / "special_tokens_map.json")
    model_config = _read_json(folder / "config.json")
    generation = _read_json(folder / "generation_config.json")

    if file.suffix == ".json":
        from tokenizers import Tokenizer

        try:
            impl = Tokenizer.from_file(str(file))
        except Exception as err:  # the Rust error says what is wrong with the file
            raise TokenizerError(f"{key}: {file} is not a tokenizers file ({err})") from None
        kind, vocab = "tokenizers", impl.get_vocab_size(with_added_tokens=True)

        def token_id(text: str | None) -> int | None:
            return impl.token_to_id(text) if text else None

        spm_eos = spm_bos = None
    elif file.suffix == ".model":
        import sentencepiece as spm

        try:
            impl = spm.SentencePieceProcessor(model_file=str(file))
        except Exception as err:
            raise TokenizerError(f"{key}: {file} is not a SentencePiece model ({err})") from None
        kind, vocab = "sentencepiece", impl.vocab_size()

        def token_id(text: str | None) -> int | None:
            if not text:
                return None
            i = impl.piece_to_id(text)
            return i if i != impl.unk_id() or text == impl.id_to_piece(impl.unk_id()) else None

        spm_eos = impl.eos_id() if impl.eos_id() >= 0 else None
        spm_bos = impl.bos_id() if impl.bos_id() >= 0 else None
    else:
        raise TokenizerError(
            f"{key}={os.fspath(location)!r}: {file.name} is neither tokenizer.json nor a SentencePiece .model file"
        )

    eos_text = _token_text(tok_config.get("eos_token")) or _token_text(special_map.get("eos_token"))
    eos = token_id(eos_text)
    if eos is None:
        eos = _first_id(model_config.get("eos_token_id"))
    if eos is None:
        eos = _first_id(generation.get("eos_token_id"))
    if eos is None:
        eos = spm_eos
    if eos is None or not 0 <= eos < vocab:
        raise TokenizerError(
            f"{key}: {file} defines no end-of-sequence token inside its vocabulary ({vocab}) (looked at "
            "tokenizer_config.json eos_token, config.json and generation_config.json eos_token_id): set eos_token "
            "in tokenizer_config.json"
        )
    bos = None
    if tok_config.get("add_bos_token") is True:
        bos_text = _token_text(tok_config.get("bos_token")) or _token_text(special_map.get("bos_token"))
        bos = token_id(bos_text)
        if bos is None:
            bos = _first_id(model_config.get("bos_token_id"))
        if bos is None:
            bos = spm_bos
        if bos is None:
            raise TokenizerError(
                f"{key}: tokenizer_config.json says add_bos_token=true but names no bos_token in the vocabulary: "
                "set bos_token, or add_bos_token=false"
            )
    return PretrainedTokenizer(file, kind, int(vocab), int(eos), bos, extra, impl)


def tokenizer_stat(location: str | os.PathLike[str]) -> list[tuple[str, int, int]]:
    """Path, size and mtime of the tokenizer files at ``location``, without reading them: what the
    data index of ranks other than 0 is keyed by (a changed file gives another key)."""
    path = Path(os.path.expandvars(os.path.expanduser(os.fspath(location)))).resolve()
    folder = path if path.is_dir() else path.parent
    names = sorted({*TOKENIZER_FILES, *SPECIAL_TOKEN_FILES} | ({path.name} if path.is_file() else set()))
    out = []
    for name in names:
        file = folder / name
        if file.is_file():
            st = file.stat()
            out.append((str(file), st.st_size, st.st_mtime_ns))
    return out
