"""Data pipeline: tokenizer and token caches, corpus reading, the split, packing, sharded resumable batches."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import sysconfig
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from launch.data import (
    DataConfig,
    DataConfigError,
    DataError,
    DistributedBatchIterator,
    PackedDataset,
    iter_eval_batches,
    load_tokenizer,
    prepare_data,
    read_documents,
    resolve_corpus,
    token_cache,
    token_dtype,
    tokenizer,
    train_tokenizer,
)
from tests.dist_utils import run_distributed

SMALL = dict(max_corpus_bytes=200_000, vocab_size=400, val_fraction=0.05, seq_len=32)


def small_cfg(cache: Path, **kw) -> DataConfig:
    return DataConfig(cache_dir=str(cache), **{**SMALL, **kw})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    cfg = small_cfg(tmp_path_factory.mktemp("cache"))
    return cfg, prepare_data(cfg)


@pytest.fixture
def text_files(tmp_path) -> list[Path]:
    """Three plain-text documents copied from stdlib sources (real words, a few KB each)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for i, name in enumerate(["abc.py", "bisect.py", "colorsys.py"]):
        path = tmp_path / "corpus" / f"doc{i}.txt"
        path.parent.mkdir(exist_ok=True)
        path.write_text((stdlib / name).read_text())
        out.append(path)
    return out


def count_calls(monkeypatch, module, name: str) -> list[int]:
    calls: list[int] = []
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


# ------------------------------------------------------------------------------------------ config, corpus


def test_config_errors_name_the_field():
    for field, value in [
        ("vocab_size", 100),
        ("tokenizer_type", "wordpiece"),
        ("val_fraction", 1.0),
        ("seq_len", 0),
        ("max_corpus_bytes", 0),
        ("files", []),
        ("seed", -1),
    ]:
        with pytest.raises(DataConfigError, match=rf"data\.{field}="):
            DataConfig(**{field: value})
    assert DataConfig(files="a.txt").files == ["a.txt"]  # a single path from the command line


def test_default_corpus_is_sorted_capped_stdlib():
    cfg = DataConfig(max_corpus_bytes=150_000)
    files = resolve_corpus(cfg)
    root = Path(sysconfig.get_paths()["stdlib"]).resolve()
    rel = [f.path.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel) and all(r.endswith(".py") for r in rel)
    assert not any(part in ("test", "tests", "site-packages") for r in rel for part in r.split("/"))
    assert 100_000 < sum(f.size for f in files) <= 150_000
    assert [f.path for f in resolve_corpus(cfg)] == [f.path for f in files]


def test_txt_files_and_globs(text_files, tmp_path):
    docs = list(read_documents(text_files[0]))
    assert docs == [text_files[0].read_text()]  # one plain-text file = one document
    cfg = DataConfig(files=[str(tmp_path / "corpus" / "*.txt")])
    assert [f.path for f in resolve_corpus(cfg)] == [p.resolve() for p in text_files]
    with pytest.raises(DataError, match="data.files.*missing.txt"):
        resolve_corpus(DataConfig(files=[str(tmp_path / "missing.txt")]))


def test_jsonl_documents_and_bad_lines(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "first doc", "id": 1}\n\n{"meta": {"x": 2}, "text": "second doc"}\n')
    assert list(read_documents(good)) == ["first doc", "second doc"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: invalid JSON"):
        list(read_documents(bad))
    bad.write_text('{"text": "ok"}\n{"content": "no text"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: no 'text' field \(found \['content'\]\)"):
        list(read_documents(bad))
    bad.write_text('{"text": 5}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1: 'text' must be a string"):
        list(read_documents(bad))


# -------------------------------------------------------------------------------------------- caching


def test_tokenizer_cache_hit_and_content_change(text_files, tmp_path, monkeypatch):
    trainings = count_calls(monkeypatch, tokenizer, "_train_sentencepiece")
    cfg = small_cfg(tmp_path / "cache", files=[str(p) for p in text_files])
    first = train_tokenizer(cfg)
    mtime = first.stat().st_mtime_ns
    assert train_tokenizer(cfg) == first and len(trainings) == 1 and first.stat().st_mtime_ns == mtime

    # Same size and mtime, different bytes: only a content hash notices.
    stat = text_files[1].stat()
    text = text_files[1].read_text()
    text_files[1].write_text(text.replace("def ", "fed ", 1))
    os.utime(text_files[1], ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second = train_tokenizer(cfg)
    assert second != first and len(trainings) == 2

    train_tokenizer(small_cfg(tmp_path / "cache", files=cfg.files, vocab_size=450))  # vocab is in the key
    assert len(trainings) == 3


def test_unigram_on_a_bounded_sample(tmp_path):
    cfg = small_cfg(tmp_path / "cache", tokenizer_type="unigram", tokenizer_sample_sentences=1000)
    path = train_tokenizer(cfg)
    info = json.loads((path.parent / "tokenizer.json").read_text())
    assert info["sample_sentences"] == 1000 < info["corpus_lines"]
    assert info["options"]["model_type"] == "unigram" and info["options"]["byte_fallback"]
    sp = load_tokenizer(path)
    text = "def f(x):\n    return x + 1  # ünïcode 世界\n"
    assert sp.decode(sp.encode(text)) == text  # byte fallback: any text encodes, whitespace kept


def test_prepared_tokens_round_trip(prepared):
    cfg, data = prepared
    meta = data.meta
    assert meta["dtype"] == "uint16" and data.train_tokens.dtype == np.uint16
    assert isinstance(data.train_tokens, np.memmap) and not data.train_tokens.flags.writeable
    assert (len(data.train_tokens), len(data.val_tokens)) == (meta["train_tokens"], meta["val_tokens"])
    assert meta["vocab_size"] == 400 and len(meta["sources"]) == len(resolve_corpus(cfg))
    assert int(data.train_tokens.max()) < 400

    sp = data.tokenizer()
    text = sp.decode(data.dataset("val", cfg.seq_len).windows([0])[0].tolist())
    assert any(word in text for word in ("def ", "import ", "return ", "class ", "self"))


def test_split_at_document_boundaries(prepared):
    cfg, data = prepared
    sp = data.tokenizer()
    docs = [doc for f in resolve_corpus(cfg) for doc in read_documents(f)]
    decoded: list[str] = []
    for split in ("train", "val"):
        tokens = np.asarray(data.tokens(split))
        assert tokens[-1] == data.eos_id
        ends = np.flatnonzero(tokens == data.eos_id)
        assert len(ends) == data.meta[f"{split}_documents"] >= 1
        starts = np.concatenate([[0], ends[:-1] + 1])
        decoded += [sp.decode(tokens[s:e].tolist()) for s, e in zip(starts, ends)]
    assert sorted(decoded) == sorted(docs)  # every EOS-delimited piece is a whole document, each exactly once
    frac = data.meta["val_tokens"] / (data.meta["val_tokens"] + data.meta["train_tokens"])
    assert frac >= cfg.val_fraction


def test_prepare_is_deterministic_and_seed_independent(prepared, tmp_path, monkeypatch):
    cfg, data = prepared
    other = prepare_data(small_cfg(tmp_path / "other", seed=cfg.seed + 1, seq_len=64))
    assert other.directory.name == data.directory.name  # seed/seq_len don't change the prepared data
    assert digest(other.train_tokens) == digest(data.train_tokens)
    assert digest(other.val_tokens) == digest(data.val_tokens)
    builds = count_calls(monkeypatch, token_cache, "_build_dataset")
    again = prepare_data(cfg)
    assert builds == [] and again.directory == data.directory
    assert token_dtype(400) == np.uint16 and token_dtype(70_000) == np.uint32


def _prepare_in_child(cfg: DataConfig, start, results) -> None:
    start.wait()
    data = prepare_data(cfg)
    results.put((data.directory.name, digest(data.train_tokens), digest(data.val_tokens)))


def test_two_processes_prepare_same_cache_concurrently(text_files, tmp_path):
    cfg = small_cfg(tmp_path / "shared", files=[str(p) for p in text_files], val_fraction=0.3)
    ctx = mp.get_context("fork")  # the children inherit the imports (spawn would re-import torch: seconds)
    start, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_prepare_in_child, args=(cfg, start, results)) for _ in range(2)]
    for p in procs:
        p.start()
    start.set()
    got = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert got[0] == got[1]
    leftovers = [p.name for p in (tmp_path / "shared").rglob(".tmp*")]
    assert leftovers == []


def test_lock_serialises_builds(text_files, tmp_path, monkeypatch):
    active, peak, builds = [0], [0], []
    original = token_cache._build_dataset

    def slow_build(*args, **kwargs):
        active[0] += 1
        peak[0] = max(peak[0], active[0])
        builds.append(1)
        time.sleep(0.3)  # long enough for the other thread to arrive while we build
        try:
            return original(*args, **kwargs)
        finally:
            active[0] -= 1

    monkeypatch.setattr(token_cache, "_build_dataset", slow_build)
    cfg = small_cfg(tmp_path / "cache", files=[str(p) for p in text_files], val_fraction=0.3)
    out: list = []
    threads = [threading.Thread(target=lambda: out.append(prepare_data(cfg).directory)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(out) == 2 and out[0] == out[1] and builds == [1] and peak == [1]


# ------------------------------------------------------------------------------------------ distributed


def _prepare_on_rank(rank: int, world: int, cfg: DataConfig) -> dict:
    """``prepare_data`` on one of ``world`` processes with the process group's barrier: what it saw.

    ``prepares``: how often this rank tokenized itself; ``events``: ``(what, data ready)`` around the
    barrier; ``error``: the ``DataError`` message, if it raised one.
    """
    import torch.distributed as dist

    events: list[tuple[str, bool]] = []

    def barrier() -> None:
        events.append(("enter", False))
        dist.barrier()
        events.append(("leave", any((cfg.cache_path / "datasets").glob("*/meta.json"))))

    with pytest.MonkeyPatch.context() as monkeypatch:
        prepares = count_calls(monkeypatch, token_cache, "_prepare_here")
        try:
            data = prepare_data(cfg, rank=rank, barrier=barrier)
        except DataError as err:
            return {"error": str(err), "events": events}
    return {"directory": str(data.directory), "digest": digest(data.train_tokens), "prepares": len(prepares),
            "events": events}  # fmt: skip


def test_waiting_ranks_call_the_barrier_then_open(text_files, tmp_path):
    cfg = small_cfg(tmp_path / "cache", files=[str(p) for p in text_files], val_fraction=0.3)
    results = run_distributed(_prepare_on_rank, 3, cfg)
    assert all("error" not in r for r in results), results
    assert len({r["directory"] for r in results}) == 1
    assert [r["prepares"] for r in results] == [1, 0, 0]  # ranks 1 and 2 found rank 0's data through the index
    for r in results:
        assert [what for what, _ in r["events"]] == ["enter", "leave"]
        assert r["events"][1][1]  # the data is there when the barrier opens
    assert len({r["digest"] for r in results}) == 1


def test_rank0_failure_releases_waiting_ranks(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "fine too"}\nnot json\n')
    cfg = small_cfg(tmp_path / "cache", files=[str(bad)])
    results = run_distributed(_prepare_on_rank, 2, cfg)
    assert all("error" in r for r in results), results
    assert "bad.jsonl:3" in results[0]["error"] and "rank 0 failed" in results[1]["error"]
    assert [what for what, _ in results[1]["events"]] == ["enter", "leave"]


def test_rank_without_shared_cache_prepares_itself(text_files, tmp_path):
    cfg = small_cfg(tmp_path / "node_local", files=[str(p) for p in text_files], val_fraction=0.3)
    calls: list[int] = []
    data = prepare_data(cfg, rank=1, barrier=lambda: calls.append(1))
    assert calls == [1] and data.meta["train_tokens"] > 0


# ------------------------------------------------------------------------------------ packing, batches


def test_packing_shapes_and_shifted_targets():
    tokens = np.arange(100, dtype=np.uint16)
    ds = PackedDataset(tokens, seq_len=8)
    assert len(ds) == 12  # (100 - 1) // 8
    x_S, y_S = ds[3]
    assert x_S.dtype == torch.int64 and x_S.shape == (8,)
    assert torch.equal(x_S, torch.arange(24, 32)) and torch.equal(y_S, torch.arange(25, 33))
    x_BS, y_BS = ds.get_batch([0, 11])
    assert x_BS.shape == y_BS.shape == (2, 8)
    assert torch.equal(x_BS[:, 1:], y_BS[:, :-1])
    assert int(y_BS[1, -1]) == 96  # last full window
    with pytest.raises(DataError, match=r"data\.seq_len\+1"):
        PackedDataset(tokens[:8], seq_len=8, name="val")


def make_ds(n: int = 50, seq_len: int = 4) -> PackedDataset:
    return PackedDataset(np.arange(n * seq_len + 1, dtype=np.uint32), seq_len)


def take(it: DistributedBatchIterator, steps: int) -> list[np.ndarray]:
    return [it.next_indices() for _ in range(steps)]


def test_sampler_is_deterministic_and_reshuffles_per_epoch():
    ds = make_ds()
    a = np.concatenate(take(DistributedBatchIterator(ds, 5, seed=7), 20))
    b = np.concatenate(take(DistributedBatchIterator(ds, 5, seed=7), 20))
    c = np.concatenate(take(DistributedBatchIterator(ds, 5, seed=8), 20))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert sorted(a[:50]) == list(range(50)) and sorted(a[50:]) == list(range(50))  # each epoch: all once
    assert not np.array_equal(a[:50], a[50:])
    it = DistributedBatchIterator(ds, 5, seed=7)
    x_BS, y_BS = next(it)
    assert torch.equal(x_BS, ds.get_batch(a[:5])[0]) and torch.equal(y_BS, ds.get_batch(a[:5])[1])


def test_dp_shards_are_disjoint_and_cover_the_global_batch():
    ds = make_ds(n=37)  # global batches straddle epoch ends
    mb, ga, dp = 2, 3, 4
    ranks = [DistributedBatchIterator(ds, mb, dp_rank=r, dp_size=dp, grad_accum_steps=ga, seed=3) for r in range(dp)]
    ref = DistributedBatchIterator(ds, mb, seed=3)
    G = ranks[0].global_batch_size
    assert G == mb * ga * dp
    for step in range(5):
        per_rank = [np.concatenate(take(it, ga)) for it in ranks]
        positions = [
            set(range(step * G + r * mb + m * mb * dp, step * G + (r + 1) * mb + m * mb * dp))
            for r in range(dp)
            for m in range(ga)
        ]
        assert len(set().union(*positions)) == G  # disjoint stream positions
        glob_idx = np.sort(np.concatenate(per_rank))
        assert np.array_equal(glob_idx, np.sort(ref.stream_indices(step * G, G)))
    assert all(it.consumed_samples == 5 * G for it in ranks)


def test_state_dict_resumes_with_the_exact_next_batch():
    ds = make_ds()
    it = DistributedBatchIterator(ds, 4, dp_rank=1, dp_size=2, grad_accum_steps=2, seed=11)
    take(it, 13)  # past an epoch end
    state = json.loads(json.dumps(it.state_dict()))  # survives a checkpoint file
    assert state["consumed_samples"] == 13 * 8 and (state["epoch"], state["index"]) == divmod(104, 50)
    expected = next(it)
    resumed = DistributedBatchIterator(ds, 4, dp_rank=1, dp_size=2, grad_accum_steps=2, seed=11)
    resumed.load_state_dict(state)
    got = next(resumed)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_resume_at_another_dp_size_continues_the_global_stream():
    ds = make_ds()
    old = [DistributedBatchIterator(ds, 3, dp_rank=r, dp_size=2, grad_accum_steps=2, seed=5) for r in range(2)]
    for it in old:
        take(it, 6)
    state = old[0].state_dict()
    assert state == old[1].state_dict()
    new = [DistributedBatchIterator(ds, 3, dp_rank=r, dp_size=4, grad_accum_steps=1, seed=5) for r in range(4)]
    for it in new:
        it.load_state_dict(state)
    nxt = np.concatenate([it.next_indices() for it in new])
    assert np.array_equal(nxt, old[0].stream_indices(36, 12))  # same global samples, in rank order

    with pytest.raises(DataError, match="data.seed=5"):
        DistributedBatchIterator(ds, 3, seed=6).load_state_dict(state)
    with pytest.raises(DataError, match="50 samples"):
        DistributedBatchIterator(make_ds(n=40), 3, seed=5).load_state_dict(state)


def test_eval_batches_are_equal_per_rank_and_disjoint():
    ds = make_ds(n=23)
    per_rank = [list(iter_eval_batches(ds, 2, dp_rank=r, dp_size=3)) for r in range(3)]
    assert [len(b) for b in per_rank] == [3, 3, 3]
    firsts = torch.cat([x_BS[:, 0] for batches in per_rank for x_BS, _ in batches])
    assert len(set(firsts.tolist())) == 18
