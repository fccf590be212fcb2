"""The pretraining DataLoader: sampler, dataset and collator put together, with exact resume."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader

from .dataset import PretrainingCollator, PretrainingDataset
from .sampler import ResumableDistributedSampler


class PretrainingLoader:
    """Iterates the batches of one rank and records each batch handed out in the sampler.

    ``sampler.state_dict()`` then describes exactly the batches the training loop has received,
    however far the DataLoader's workers have prefetched.
    """

    def __init__(self, dataloader: DataLoader, sampler: ResumableDistributedSampler):
        self.dataloader = dataloader
        self.sampler = sampler

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for batch in self.dataloader:
            self.sampler.advance(len(batch["sentence_order_label"]))
            yield batch

    def __len__(self) -> int:
        """Batches left in the current epoch."""
        return len(self.dataloader)


def make_pretraining_dataloader(
    dataset: PretrainingDataset,
    collator: PretrainingCollator,
    batch_size: int,
    *,
    seed: int = 0,
    shuffle: bool = True,
    drop_last: bool = False,
    num_replicas: int | None = None,
    rank: int | None = None,
    num_workers: int = 0,
) -> tuple[PretrainingLoader, ResumableDistributedSampler]:
    """Batches of this rank's shard, masked dynamically, resumable from ``sampler.state_dict()``.

    Typical loop::

        loader, sampler = make_pretraining_dataloader(cache.dataset(), collator, 32, seed=1)
        sampler.load_state_dict(checkpoint["sampler"])        # when resuming
        for epoch in range(sampler.epoch, num_epochs):
            sampler.set_epoch(epoch)
            for batch in loader:
                ...                                           # checkpoint["sampler"] = sampler.state_dict()

    Args:
        dataset: one split of a preprocessing cache.
        collator: assembles, masks and pads (its own seed drives the masking).
        batch_size: examples per batch on this rank.
        seed: seeds the example order.
        shuffle: new random order every epoch.
        drop_last: drop the examples that do not fill a batch on every rank (else pad the
            order and keep a last, smaller batch).
        num_replicas, rank: default to the process group's (1 and 0 without one).
        num_workers: DataLoader worker processes (the batches do not depend on it).

    Returns:
        ``(loader, sampler)``.
    """
    sampler = ResumableDistributedSampler(len(dataset), num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                                          seed=seed, drop_last=drop_last)
    # Its own generator: a DataLoader iterator otherwise draws its base seed from the global RNG,
    # so creating one after a resume would shift the router noise and dropout of the run.
    dataloader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collator,
                            num_workers=num_workers, drop_last=drop_last, persistent_workers=num_workers > 0,
                            pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(seed))
    return PretrainingLoader(dataloader, sampler), sampler
