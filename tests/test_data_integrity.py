"""Cache integrity: damaged token caches and tokenizers are rebuilt or stop the job with the file named,
and nothing is ever read from a damaged chunk.

The caches here are built from a tiny corpus with small checksum chunks (many chunks per token file), so
a damaged byte's chunk is always one that some window reads.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import sysconfig
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from launch.data import (
    FORMAT_VERSION,
    DataConfig,
    DataError,
    DistributedBatchIterator,
    PackedDataset,
    cache,
    iter_eval_batches,
    open_prepared,
    prepare_data,
    token_cache,
    train_tokenizer,
)
from launch.data import tokenizer as tokenizer_module
from tests.test_data import count_calls

CHUNK = 1024  # bytes per checksummed chunk in these builds (the default is sized for terabyte caches)
SEQ = 32
EOS = "<|endoftext|>"


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(token_cache, "CHUNK_BYTES", CHUNK)


def write_corpus(folder: Path) -> list[str]:
    """Three plain-text documents copied from stdlib sources (real words, a few KB each)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, name in enumerate(["abc.py", "bisect.py", "colorsys.py"]):
        path = folder / f"doc{i}.txt"
        path.write_text((stdlib / name).read_text())
        out.append(str(path))
    return out


def tiny_cfg(tmp_path: Path, cache: str = "cache", **kw) -> DataConfig:
    files = write_corpus(tmp_path / "corpus")
    settings = dict(vocab_size=400, val_fraction=0.3, seq_len=SEQ, cache_dir=str(tmp_path / cache))
    return DataConfig(files=files, **{**settings, **kw})


def pretrained_json_tokenizer(folder: Path) -> Path:
    """A byte-level BPE tokenizer.json with tokenizer_config.json and special_tokens_map.json beside it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator([(stdlib / "textwrap.py").read_text()], trainer)
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS, "model_max_length": 128}))
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": EOS}))
    return folder


def pretrained_spm_tokenizer(folder: Path) -> Path:
    """A SentencePiece tokenizer.model with a tokenizer_config.json that asks for BOS."""
    import io

    import sentencepiece as spm

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    buf = io.BytesIO()
    lines = [line for line in (stdlib / "textwrap.py").read_text().splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=400, byte_fallback=True, minloglevel=2
    )
    folder.mkdir(parents=True)
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>"})
    )
    return folder


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` (relative path -> bytes)."""
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def flip_bit(path: Path, offset: int, bit: int = 0) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << bit)]))


def chunk_range(offset: int, size: int) -> tuple[int, int]:
    lo = offset // CHUNK * CHUNK
    return lo, min(lo + CHUNK, size)


def window_touches(i: int, itemsize: int, lo: int, hi: int) -> bool:
    """Whether window ``i`` (tokens [i*SEQ, i*SEQ + SEQ + 1)) reads any byte of [lo, hi)."""
    return i * SEQ * itemsize < hi and (i * SEQ + SEQ + 1) * itemsize > lo


def noop() -> None:
    return None


def first_rank_entry(cfg: DataConfig) -> Path:
    """The dataset directory rank 0 prepared (the only one under the cache)."""
    (found,) = [p for p in (cfg.cache_path / "datasets").iterdir() if p.is_dir() and not p.name.startswith(".")]
    return found


# ----------------------------------------------------------------------------------------- token files


@pytest.mark.parametrize("split", ["train", "val"])
def test_bit_flip_is_caught_when_its_chunk_is_first_read(tmp_path, split):
    cfg = tiny_cfg(tmp_path)
    data = prepare_data(cfg)
    pristine = np.array(data.tokens(split))
    path = data.directory / f"{split}.bin"
    size = path.stat().st_size
    rng = np.random.default_rng(7 if split == "train" else 8)
    offset = int(rng.integers(CHUNK, size - CHUNK))  # not in the first chunk: reads before it must succeed
    flip_bit(path, offset, int(rng.integers(8)))
    lo, hi = chunk_range(offset, size)

    again = prepare_data(cfg)  # opening reads no token chunk: the damage shows where a window reads it
    ds = PackedDataset(again.tokens(split), SEQ, split)  # the way launch/train.py builds its datasets
    touched = [i for i in range(len(ds)) if window_touches(i, pristine.itemsize, lo, hi)]
    assert touched and touched[0] > 0
    for i in range(len(ds)):
        if i in touched:
            with pytest.raises(DataError, match=rf"{re.escape(str(path))} bytes \[{lo}, {hi}\)"):
                ds.get_batch([0, i])  # a batch with one damaged window is refused whole
        else:
            x_BS, y_BS = ds.get_batch([i])
            want = torch.from_numpy(pristine[i * SEQ : i * SEQ + SEQ + 1].astype(np.int64))
            assert torch.equal(x_BS[0], want[:-1]) and torch.equal(y_BS[0], want[1:])


def test_zeroed_train_bin_stops_the_first_batch(tmp_path):
    cfg = tiny_cfg(tmp_path)
    data = prepare_data(cfg)
    path = data.directory / "train.bin"
    path.write_bytes(bytes(path.stat().st_size))  # the right size: the old size check passes
    again = prepare_data(cfg)
    it = DistributedBatchIterator(PackedDataset(again.train_tokens, SEQ, "train"), 4, seed=1)
    with pytest.raises(DataError, match=rf"{re.escape(str(path))} bytes \[\d+, \d+\).*delete"):
        next(it)


def test_random_bytes_never_reach_a_batch(tmp_path):
    cfg = tiny_cfg(tmp_path)
    data = prepare_data(cfg)
    for split in ("train", "val"):
        path = data.directory / f"{split}.bin"
        path.write_bytes(np.random.default_rng(3).bytes(path.stat().st_size))
    again = prepare_data(cfg)
    with pytest.raises(DataError, match=re.escape(str(data.directory / "val.bin"))):
        next(iter_eval_batches(PackedDataset(again.val_tokens, SEQ, "validation"), 2))
    with pytest.raises(DataError, match=re.escape(str(data.directory / "train.bin"))):
        PackedDataset(again.train_tokens, SEQ)[5]


def test_training_data_path_refuses_damaged_chunks(tmp_path):
    """The training app's own ``build_data`` (launch/build.py) hands out no batch from a damaged chunk."""
    from launch.build import build_data

    cfg = tiny_cfg(tmp_path)
    data = prepare_data(cfg)
    path = data.directory / "train.bin"
    path.write_bytes(bytes(path.stat().st_size))
    app = OmegaConf.create({"train": {"micro_batch_size": 2, "grad_accum": 1}, "data": {"seq_len": SEQ, "seed": 0}})
    state = SimpleNamespace(layout=SimpleNamespace(data_parallel_size=1), dp_rank=0)
    train_iter, _ = build_data(app, prepare_data(cfg), state)
    with pytest.raises(DataError, match=re.escape(str(path))):
        next(train_iter)


def test_each_chunk_is_checked_once_per_process(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path)
    data = prepare_data(cfg)
    ds = data.dataset("train", SEQ)
    checked = count_calls(monkeypatch, cache, "_crc32")
    ds.get_batch([0, 1])
    first = len(checked)
    assert first == 1  # windows 0 and 1 lie in the first 1 KiB chunk
    ds.get_batch([1, 0])
    assert len(checked) == first  # known good: not read twice
    ds.get_batch(np.arange(len(ds)))
    last_byte_read = (len(ds) * SEQ + 1) * data.train_tokens.itemsize
    assert len(checked) == -(-last_byte_read // CHUNK)  # every chunk a window reads, once


def test_truncated_token_file_is_rebuilt_on_the_preparing_rank(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path)
    directory = prepare_data(cfg).directory
    pristine = snapshot(directory)
    with open(directory / "train.bin", "r+b") as f:
        f.truncate(CHUNK)
    builds = count_calls(monkeypatch, token_cache, "_build_dataset")
    again = prepare_data(cfg)
    assert builds == [1] and snapshot(again.directory) == pristine


# ------------------------------------------------------------------------------------------- meta.json


def _flip_digit(field: str):
    def damage(text: str) -> str:
        m = re.search(rf'"{field}":\s*(\d)', text)
        assert m, field
        digit = str((int(m.group(1)) + 1) % 10)
        return text[: m.start(1)] + digit + text[m.end(1) :]

    return damage


META_DAMAGE = {
    "truncated": lambda text: text[: len(text) // 2],
    "empty": lambda text: "",
    "random": lambda text: np.random.default_rng(5).bytes(len(text)).decode("latin-1"),
    "not_an_object": lambda text: "[1, 2, 3]\n",
    "train_tokens_digit": _flip_digit("train_tokens"),
    "vocab_size_digit": _flip_digit("vocab_size"),
    "eos_id_digit": _flip_digit("eos_id"),
}


def damage_meta(path: Path, how: str) -> None:
    text = path.read_bytes().decode("latin-1")
    path.write_bytes(META_DAMAGE[how](text).encode("latin-1"))


@pytest.mark.parametrize("how", sorted(META_DAMAGE))
def test_damaged_meta_json_is_rebuilt_on_the_preparing_rank(tmp_path, monkeypatch, caplog, how):
    cfg = tiny_cfg(tmp_path)
    directory = prepare_data(cfg).directory
    pristine = snapshot(directory)
    damage_meta(directory / "meta.json", how)
    builds = count_calls(monkeypatch, token_cache, "_build_dataset")
    with caplog.at_level(logging.WARNING, logger="launch.data"):
        again = prepare_data(cfg)
    assert builds == [1]
    assert snapshot(again.directory) == pristine  # bit-identical to the fresh build
    assert any(str(directory / "meta.json") in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert not [p for p in (cfg.cache_path / "datasets").iterdir() if p.name.startswith(".")]  # nothing left aside


@pytest.mark.parametrize("how", sorted(META_DAMAGE))
def test_damaged_meta_json_stops_a_waiting_rank_with_the_file_named(tmp_path, how):
    cfg = tiny_cfg(tmp_path)
    directory = prepare_data(cfg).directory
    damage_meta(directory / "meta.json", how)
    with pytest.raises(DataError, match=rf"{re.escape(str(directory / 'meta.json'))}.*delete"):
        prepare_data(cfg, rank=1, barrier=noop)


# ------------------------------------------------------------------------------------------- tokenizers


def test_damaged_tokenizer_in_the_dataset_directory(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path)
    directory = prepare_data(cfg).directory
    pristine = snapshot(directory)
    flip_bit(directory / "tokenizer.model", (directory / "tokenizer.model").stat().st_size // 2, 3)
    with pytest.raises(DataError, match=re.escape(str(directory / "tokenizer.model"))):
        prepare_data(cfg, rank=1, barrier=noop)
    builds = count_calls(monkeypatch, token_cache, "_build_dataset")
    again = prepare_data(cfg)
    assert builds == [1] and snapshot(again.directory) == pristine


@pytest.mark.parametrize("damaged", ["tokenizer.model", "tokenizer.json"])
def test_damaged_tokenizer_cache_is_retrained(tmp_path, monkeypatch, damaged):
    cfg = tiny_cfg(tmp_path)
    model = train_tokenizer(cfg)
    pristine = snapshot(model.parent)
    flip_bit(model.parent / damaged, 40, 1)
    trainings = count_calls(monkeypatch, tokenizer_module, "_train_sentencepiece")
    assert train_tokenizer(cfg) == model
    assert trainings == [1] and snapshot(model.parent) == pristine

    # The same through prepare_data: a new split reuses the tokenizer cache, which is checked first.
    flip_bit(model.parent / damaged, 40, 1)
    data = prepare_data(tiny_cfg(tmp_path, val_fraction=0.4))
    assert trainings == [1, 1] and snapshot(model.parent) == pristine
    assert (data.directory / "tokenizer.model").read_bytes() == pristine["tokenizer.model"]


@pytest.mark.parametrize("kind", ["json", "sentencepiece"])
def test_damaged_pretrained_tokenizer_copies(tmp_path, monkeypatch, kind):
    make = pretrained_json_tokenizer if kind == "json" else pretrained_spm_tokenizer
    tokenizer = make(tmp_path / "tok")
    cfg = tiny_cfg(tmp_path, tokenizer=str(tokenizer))
    directory = prepare_data(cfg).directory
    pristine = snapshot(directory)
    copies = sorted(p.name for p in tokenizer.iterdir())
    assert set(copies) <= set(pristine)
    builds = count_calls(monkeypatch, token_cache, "_build_dataset")
    for name in copies:
        flip_bit(directory / name, 1, 2)
        with pytest.raises(DataError, match=re.escape(str(directory / name))):
            prepare_data(cfg, rank=1, barrier=noop)
        again = prepare_data(cfg)
        assert snapshot(again.directory) == pristine, name
    assert len(builds) == len(copies)


# ------------------------------------------------------------------------------------------- the sweep


def damage_in_place(path: Path, rng: np.random.Generator) -> tuple[int, int, str]:
    """Change the file's bytes at a random offset without changing its size; returns (start, end, how)
    of the bytes written (some of them may be unchanged, at least one is changed)."""
    raw = bytearray(path.read_bytes())
    offset = int(rng.integers(len(raw)))
    how = str(rng.choice(["bit", "byte", "zeros", "random"]))
    end = offset + 1
    if how == "bit":
        raw[offset] ^= 1 << int(rng.integers(8))
    elif how == "byte":
        raw[offset] = (raw[offset] + int(rng.integers(1, 256))) % 256
    else:
        end = min(len(raw), offset + int(rng.integers(1, 64)))
        new = bytes(end - offset) if how == "zeros" else rng.bytes(end - offset)
        if new == bytes(raw[offset:end]):  # already zeros: damage it another way
            new = bytes(b ^ 0xFF for b in new)
        raw[offset:end] = new
    path.write_bytes(bytes(raw))
    return offset, end, how


def read_everything(data, pristine: dict[str, np.ndarray], damaged: Path, start: int, end: int) -> None:
    """Read every window of both splits through PackedDataset: each batch returned equals the pristine
    one; a batch over a damaged chunk raises a DataError naming the file (and only such a batch)."""
    bin_name = damaged.with_suffix(".bin").name
    for split in ("train", "val"):
        ds = PackedDataset(data.tokens(split), SEQ, split)
        ref = pristine[split]
        bad: list[tuple[int, int]] = []
        if damaged.parent == data.directory and bin_name == f"{split}.bin":
            per_chunk = 4 if damaged.suffix == ".crc32" else CHUNK  # a table holds one uint32 per chunk
            bad = [(c * CHUNK, (c + 1) * CHUNK) for c in range(start // per_chunk, (end - 1) // per_chunk + 1)]
        for i in range(len(ds)):
            if any(window_touches(i, ref.itemsize, *chunk) for chunk in bad):
                with pytest.raises(DataError, match=re.escape(str(damaged))):
                    ds.get_batch([i])
                continue
            x_BS, y_BS = ds.get_batch([i])
            assert torch.equal(x_BS[0], torch.from_numpy(ref[i * SEQ : i * SEQ + SEQ].astype(np.int64))), (split, i)


def sweep(tmp_path: Path, kind: str, draws: int, seed: int) -> None:
    tokenizer = {"trained": None, "json": pretrained_json_tokenizer, "sentencepiece": pretrained_spm_tokenizer}[kind]
    cfg = tiny_cfg(tmp_path, tokenizer=str(tokenizer(tmp_path / "tok")) if tokenizer else None)
    data = prepare_data(cfg)
    if kind == "trained":
        train_tokenizer(cfg)
    pristine_tokens = {split: np.array(data.tokens(split)) for split in ("train", "val")}
    root = cfg.cache_path
    pristine = snapshot(root)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.stat().st_size > 0)  # the .lock files are empty
    assert {p.relative_to(root).parts[0] for p in files} >= {"datasets", "index"}
    rng = np.random.default_rng(seed)
    for path in files:
        for _ in range(draws):
            start, end, how = damage_in_place(path, rng)
            where = f"{path.relative_to(root)} bytes [{start}, {end}) ({how})"
            # A waiting rank: opens through rank 0's index entry, repairs nothing.
            try:
                waiting = prepare_data(cfg, rank=1, barrier=noop)
            except DataError as err:
                assert str(path) in str(err), (where, err)
                assert path.parent == data.directory, where
            else:
                read_everything(waiting, pristine_tokens, path, start, end)
            # The preparing rank: rebuilds what opening finds damaged; the rest is found where it is read.
            again = prepare_data(cfg)
            read_everything(again, pristine_tokens, path, start, end)
            if kind == "trained":
                train_tokenizer(cfg)
            now = snapshot(root)
            if path.suffix not in (".bin", ".crc32"):
                assert now == pristine, where  # rebuilt bit for bit (or, for the index, rewritten)
            else:
                assert {k: v for k, v in now.items() if k != path.relative_to(root).as_posix()} == {
                    k: v for k, v in pristine.items() if k != path.relative_to(root).as_posix()
                }, where
            path.write_bytes(pristine[path.relative_to(root).as_posix()])
            assert not [p for p in root.rglob(".tmp-*")], where


@pytest.mark.parametrize("kind", ["trained", "json", "sentencepiece"])
def test_every_cache_file_damaged_in_place_sample(tmp_path, kind):
    sweep(tmp_path, kind, draws=2, seed=11)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["trained", "json", "sentencepiece"])
def test_every_cache_file_damaged_in_place_full(tmp_path, kind):
    sweep(tmp_path, kind, draws=40, seed=1234)


def test_rank_without_the_index_repairs_for_itself(tmp_path, monkeypatch):
    """A rank whose cache_dir is not rank 0's prepares for itself, so it may rebuild a damaged entry."""
    cfg = tiny_cfg(tmp_path)
    directory = prepare_data(cfg).directory
    pristine = snapshot(directory)
    shutil.rmtree(cfg.cache_path / "index")
    damage_meta(directory / "meta.json", "truncated")
    builds = count_calls(monkeypatch, token_cache, "_build_dataset")
    assert snapshot(prepare_data(cfg, rank=1, barrier=noop).directory) == pristine and builds == [1]


def test_verify_and_a_pickled_dataset_check_too(tmp_path):
    """``PreparedData.verify`` reads every chunk now; a dataset sent to another process (a spawned
    DataLoader worker) maps the file again and checks what it reads there."""
    import pickle

    data = prepare_data(tiny_cfg(tmp_path))
    data.verify()
    sent = pickle.dumps(data.dataset("train", SEQ))
    path = data.directory / "train.bin"
    flip_bit(path, 0)
    with pytest.raises(DataError, match=re.escape(str(path))):
        prepare_data(tiny_cfg(tmp_path)).verify()
    received = pickle.loads(sent)
    with pytest.raises(DataError, match=re.escape(str(path))):
        received.get_batch([0])


def test_every_file_of_an_entry_is_checksummed(tmp_path):
    cfg = tiny_cfg(tmp_path)
    data = prepare_data(cfg)
    model = train_tokenizer(cfg)
    for entry, meta_name in ((data.directory, "meta.json"), (model.parent, "tokenizer.json")):
        meta = json.loads((entry / meta_name).read_text())
        assert set(meta["files"]) | {meta_name} == {p.name for p in entry.iterdir()}, entry
        assert meta["format"] == FORMAT_VERSION and len(meta["checksum"]) == 64
    for split in ("train", "val"):
        record = data.meta["files"][f"{split}.bin"]
        assert record["chunk_bytes"] == CHUNK and record["crc32"] == f"{split}.crc32"
        assert data.meta["files"][f"{split}.crc32"]["bytes"] == 4 * -(-record["bytes"] // CHUNK)


def test_a_cache_without_checksums_is_refused(tmp_path):
    """A directory in the format before checksums (its meta.json has none) is never trusted."""
    data = prepare_data(tiny_cfg(tmp_path))
    old = tmp_path / "old"
    shutil.copytree(data.directory, old)
    meta = {k: v for k, v in data.meta.items() if k not in ("files", "checksum")}
    (old / "meta.json").write_text(json.dumps({**meta, "format": 1}, indent=1))
    with pytest.raises(DataError, match=rf"{re.escape(str(old / 'meta.json'))} holds no checksum"):
        open_prepared(old)
