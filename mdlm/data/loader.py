"""A resumable, world-size-independent stream of micro-batches of block indices.

The stream is a pure function of (seed, n_blocks, batch_size, global micro-batch index g):

    M = n_blocks // batch_size                        micro-batches per epoch (the tail is dropped)
    e, j = g // M, g % M                              epoch and position within it
    perm_e = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(epoch_seed(seed, e)))
             (torch.arange(n_blocks) when shuffle=False)
    batch(g) = perm_e[j * B:(j + 1) * B]

Rank r of W takes g = k * W + r on its k-th call, so the W ranks together consume exactly the single-process
stream, in the same order, whatever W is; a checkpoint only needs ``consumed`` (micro-batches taken by all
ranks) to resume, even on a different number of processes.
"""
from __future__ import annotations

import torch

__all__ = ["ResumableBatchSampler", "epoch_seed"]

_M64 = (1 << 64) - 1


def epoch_seed(seed: int, epoch: int) -> int:
    """The generator seed for one epoch's permutation: a SplitMix64 mix of (seed, epoch), in [0, 2**63).

    A plain ``seed + epoch`` would make run seed=1 replay run seed=0 shifted by one epoch; mixing keeps runs
    with different seeds unrelated while staying a pure, platform-independent function.
    """
    z = ((int(seed) & _M64) * 0x9E3779B97F4A7C15 + (int(epoch) & _M64) + 0x632BE59BD9B4E019) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


class ResumableBatchSampler:
    """Infinite micro-batches of ``batch_size`` block indices for rank ``rank`` of ``world_size``.

    ``next() -> LongTensor (batch_size,)``; ``global_index``: the g the next call returns; ``state_dict()`` /
    ``load_state_dict(d)`` to resume (possibly with another world size). Iterating (``for idx in sampler``)
    calls ``next()`` forever.
    """

    def __init__(self, n_blocks: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True):
        self.n_blocks, self.batch_size, self.seed = int(n_blocks), int(batch_size), int(seed)
        self.rank, self.world_size, self.shuffle = int(rank), int(world_size), bool(shuffle)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {rank} is not in 0..world_size-1 (world_size {world_size})")
        self.batches_per_epoch = self.n_blocks // self.batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(f"{self.n_blocks} blocks are fewer than one micro-batch of {self.batch_size}")
        self._k = 0                        # calls to next() made by this rank
        self._cache: tuple[int, torch.Tensor] | None = None    # (epoch, permutation)

    @property
    def global_index(self) -> int:
        """The global micro-batch index g that the next call to ``next()`` returns."""
        return self._k * self.world_size + self.rank

    @property
    def epoch(self) -> int:
        return self.global_index // self.batches_per_epoch

    def permutation(self, epoch: int) -> torch.Tensor:
        """perm_e (n_blocks,) int64; the current epoch's one is cached."""
        if self._cache is None or self._cache[0] != epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
                perm = torch.randperm(self.n_blocks, generator=g)
            else:
                perm = torch.arange(self.n_blocks)
            self._cache = (epoch, perm)
        return self._cache[1]

    def batch_indices(self, g: int) -> torch.Tensor:
        """Micro-batch g (a pure function of g): LongTensor (batch_size,)."""
        if g < 0:
            raise ValueError(f"micro-batch index must be >= 0, got {g}")
        e, j = divmod(int(g), self.batches_per_epoch)
        B = self.batch_size
        return self.permutation(e)[j * B:(j + 1) * B].clone()

    def next(self) -> torch.Tensor:
        idx = self.batch_indices(self.global_index)
        self._k += 1
        return idx

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        return self.next()

    def state_dict(self) -> dict:
        """{"seed", "n_blocks", "batch_size", "shuffle", "consumed" (global micro-batches taken by all ranks,
        = k * world_size), "world_size"} (world_size is informational: any world size dividing consumed resumes)."""
        return {"seed": self.seed, "n_blocks": self.n_blocks, "batch_size": self.batch_size,
                "shuffle": self.shuffle, "consumed": self._k * self.world_size, "world_size": self.world_size}

    def load_state_dict(self, d: dict) -> None:
        missing = [f for f in ("seed", "n_blocks", "batch_size", "consumed") if f not in d]
        if missing:
            raise ValueError(f"sampler state lacks {missing} (keys: {sorted(d)})")
        for field in ("seed", "n_blocks", "batch_size", "shuffle"):
            if field not in d:           # only "shuffle" may be absent (optional)
                continue
            if type(getattr(self, field))(d[field]) != getattr(self, field):
                raise ValueError(f"sampler state {field}={d[field]!r} does not match this sampler's "
                                 f"{field}={getattr(self, field)!r}: resuming would change the data order")
        consumed = int(d["consumed"])
        if consumed < 0 or consumed % self.world_size:
            raise ValueError(f"sampler state consumed={consumed} micro-batches is not a multiple of world_size "
                             f"{self.world_size}: resume with a world size that divides it")
        self._k = consumed // self.world_size
