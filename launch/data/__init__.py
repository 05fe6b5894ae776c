"""Training data: a SentencePiece tokenizer (or a pretrained model's own), memory-mapped token files, packed
windows, resumable batches.

The way from text to a micro-batch:

```
files (or the stdlib's *.py) ─▶ documents ─▶ tokenizer (trained on a bounded sample, cached by content)
   ─▶ one tokenization pass, EOS after each document ─▶ train.bin / val.bin (split at document boundaries)
   ─▶ PackedDataset: windows of seq_len+1 tokens ─▶ DistributedBatchIterator: seeded epochs, DP shards
```

One module per step: ``corpus`` (``DataConfig``, the files and their documents), ``tokenizer`` (training
and caching the SentencePiece model), ``token_cache`` (the token files and ``prepare_data``), ``sampler``
(windows and batches), and ``cache`` (keys, locks, atomic entries and checksums, shared by the two caches).
"""

from launch.data.cache import FORMAT_VERSION, DamagedCacheError, TokenChunks, TokenMemmap
from launch.data.corpus import (
    TOKENIZER_TYPES,
    CorpusFile,
    DataConfig,
    DataConfigError,
    DataError,
    default_corpus_files,
    read_documents,
    resolve_corpus,
)
from launch.data.sampler import DistributedBatchIterator, PackedDataset, iter_eval_batches
from launch.data.token_cache import PreparedData, open_prepared, prepare_data, token_dtype
from launch.data.tokenizer import load_tokenizer, train_tokenizer

__all__ = [
    "FORMAT_VERSION",
    "TOKENIZER_TYPES",
    "CorpusFile",
    "DamagedCacheError",
    "DataConfig",
    "DataConfigError",
    "DataError",
    "DistributedBatchIterator",
    "PackedDataset",
    "PreparedData",
    "TokenChunks",
    "TokenMemmap",
    "default_corpus_files",
    "iter_eval_batches",
    "load_tokenizer",
    "open_prepared",
    "prepare_data",
    "read_documents",
    "resolve_corpus",
    "token_dtype",
    "train_tokenizer",
]
