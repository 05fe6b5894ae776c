"""Which seed orders the training batches: ``data.seed``, independently of ``train.seed``."""

from types import SimpleNamespace

import numpy as np
import pytest

from launch import config as app_config
from launch.build import build_data


def first_batches(*overrides: str, steps: int = 3) -> list[np.ndarray]:
    cfg = app_config.compose("data.seq_len=8", "train.micro_batch_size=2", *overrides)
    tokens = np.arange(4096, dtype=np.int32)
    data = SimpleNamespace(train_tokens=tokens, val_tokens=tokens[:512])
    state = SimpleNamespace(layout=SimpleNamespace(data_parallel_size=1), dp_rank=0)
    train_iter, _ = build_data(cfg, data, state)
    batches = iter(train_iter)
    return [next(batches)[0].numpy() for _ in range(steps)]


@pytest.mark.parametrize("seed", [0, 7, 2**31])
def test_data_seed_orders_the_batches_and_train_seed_does_not(seed: int) -> None:
    base = first_batches(f"data.seed={seed}", "train.seed=0")
    assert all(np.array_equal(a, b) for a, b in zip(base, first_batches(f"data.seed={seed}", "train.seed=99")))
    other = first_batches(f"data.seed={seed + 1}", "train.seed=0")
    assert not all(np.array_equal(a, b) for a, b in zip(base, other))
