"""A deterministic distributed sampler that resumes at the exact next example.

Each epoch has one global order of the example indices, a function of ``(seed, epoch)`` only.
The ranks consume it together, round-robin: rank ``r`` of ``W`` takes global positions
``r, r + W, r + 2W, ...``, so the shards are disjoint and every rank gets the same number of
examples (the order is cut, or padded by wrapping around, to a multiple of ``W``).

``position`` counts the global positions already consumed in the current epoch. The training
loop's side of the DataLoader advances it (:class:`~widenet_ds.data.loader.PretrainingLoader`
does this), not the sampler's iterator, which DataLoader prefetching runs ahead. Because the
position is global, a checkpoint can even be resumed on a different number of ranks.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch.distributed as dist
from torch.utils.data import Sampler


def _world() -> tuple[int, int]:
    """(world size, rank) of the default process group, or (1, 0) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class ResumableDistributedSampler(Sampler[tuple[int, int]]):
    """Yields ``(epoch, index)`` pairs of this rank's shard, from the current position on.

    The pair lets :class:`~widenet_ds.data.PretrainingDataset` pass the epoch to the masking RNG.

    Args:
        num_examples: size of the dataset.
        num_replicas: number of ranks (default: the process group's world size, else 1).
        rank: this rank (default: the process group's rank, else 0).
        shuffle: a new random order every epoch; False keeps ``0, 1, 2, ...``.
        seed: seeds the orders (with the epoch).
        drop_last: cut the order to a multiple of ``num_replicas`` instead of padding it with
            examples from its start.
    """

    def __init__(self, num_examples: int, *, num_replicas: int | None = None, rank: int | None = None,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False):
        world_size, world_rank = _world()
        self.num_replicas = world_size if num_replicas is None else num_replicas
        self.rank = world_rank if rank is None else rank
        if num_examples < 0 or self.num_replicas < 1 or not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"need num_examples >= 0, num_replicas >= 1 and 0 <= rank < num_replicas; got "
                             f"{num_examples}, {self.num_replicas} and {self.rank}")
        self.num_examples = num_examples
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.position = 0  # global positions of this epoch consumed by all ranks together

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Every example index, in the global order of ``epoch``."""
        if not self.shuffle:
            return np.arange(self.num_examples)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)

    def _per_rank(self, remaining: int) -> int:
        """Examples each rank gets out of ``remaining`` global ones."""
        if self.drop_last:
            return remaining // self.num_replicas
        return -(-remaining // self.num_replicas)

    def _remaining(self) -> np.ndarray:
        """This rank's indices from the current position to the end of the epoch."""
        order = self.epoch_order(self.epoch)
        rest = order[self.position:]
        total = self._per_rank(len(rest)) * self.num_replicas
        padded = np.concatenate([rest, np.resize(order, max(0, total - len(rest)))])[:total]
        return padded[self.rank::self.num_replicas]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, indices = self.epoch, self._remaining()
        return ((epoch, int(i)) for i in indices)

    def __len__(self) -> int:
        return self._per_rank(max(0, self.num_examples - self.position))

    def set_epoch(self, epoch: int) -> None:
        """Move to ``epoch`` (position 0). Setting the current epoch again keeps the position, so a
        training loop may call ``set_epoch(epoch)`` right after ``load_state_dict``."""
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def advance(self, examples_per_rank: int) -> None:
        """Record that the training loop of every rank received ``examples_per_rank`` more examples."""
        self.position += examples_per_rank * self.num_replicas

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_examples": self.num_examples, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; it must come from a sampler over the same data with the same order."""
        mismatched = [f"{name}: checkpoint {state[name]!r}, now {getattr(self, name)!r}"
                      for name in ("seed", "num_examples", "shuffle") if state[name] != getattr(self, name)]
        if mismatched:
            raise ValueError("cannot resume the sampler exactly, the data order would differ ("
                             + "; ".join(mismatched) + "); use the checkpoint's dataset and seed")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
