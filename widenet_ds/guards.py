"""What a NaN/inf loss does to a run: stop it, or skip the batch (every rank alike)."""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The run stopped on a NaN/inf loss; the message gives the step and the cause."""


class NonFiniteGuard:
    """Checks each micro-batch's loss before backward; all ranks take the same decision.

    ``action="stop"`` raises at the first non-finite loss (the last checkpoint stays the
    newest complete one); ``"skip"`` drops the batch without backward or optimizer step, and
    raises after ``max_consecutive`` bad batches in a row. Costs one all-reduce of a flag and
    one host sync per micro-batch.
    """

    def __init__(self, action: str = "stop", max_consecutive: int = 5):
        self.action = action
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.skipped = 0

    def should_skip(self, loss: torch.Tensor, step: int) -> bool:
        bad_ranks = (~torch.isfinite(loss.detach().float())).float().reshape(1)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(bad_ranks)
        if bad_ranks.item() == 0:
            self.consecutive = 0
            return False
        self.consecutive += 1
        cause = f"non-finite loss ({loss.item()} here) at step {step} on {int(bad_ranks.item())} rank(s)"
        if self.action == "stop":
            raise NonFiniteLossError(f"{cause}; stopping (nonfinite_loss.action is 'stop'). Lower the learning "
                                     "rate or check the data, then resume from the last checkpoint")
        if self.consecutive > self.max_consecutive:
            raise NonFiniteLossError(f"{cause}: {self.consecutive} bad batches in a row, more than "
                                     f"nonfinite_loss.max_consecutive ({self.max_consecutive}); stopping")
        self.skipped += 1
        log.warning("skipping a batch: %s", cause)
        return True
