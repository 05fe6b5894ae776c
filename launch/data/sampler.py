"""Batches of token windows: :class:`PackedDataset` packs a token stream into fixed windows,
:class:`DistributedBatchIterator` deals them out as seeded, resumable micro-batches per data-parallel rank,
and :func:`iter_eval_batches` makes one in-order evaluation pass.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from launch.data.cache import TokenMemmap
from launch.data.corpus import DataConfigError, DataError


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
        """How many full passes over the windows the global stream position has made."""
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
