"""What a NaN/inf loss does to a run: stop it, or skip the batch (every rank alike)."""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The run stopped on a NaN/inf loss; the message gives the step and the cause."""


class NonFiniteGuard:
    """Checks the losses of a run; all ranks take the same decision.

    ``action="stop"`` raises at the first non-finite loss, before the optimizer step of its step
    (the weights and the last checkpoint stay as they were): ``check_step`` reads the losses of all
    micro-batches of the step at once, one host sync per optimizer step, at the point where the
    optimizer reads its gradient norm anyway. ``"skip"`` drops a bad batch before its backward
    (``should_skip``, one host sync per micro-batch), and raises after ``max_consecutive`` bad
    batches in a row. Each check costs one all-reduce of a flag in a distributed run.
    """

    def __init__(self, action: str = "stop", max_consecutive: int = 5):
        self.action = action
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.skipped = 0

    @property
    def checks_each_batch(self) -> bool:
        """Whether each micro-batch is checked before its backward (``should_skip``)."""
        return self.action == "skip"

    def check_step(self, losses: list[torch.Tensor], step: int, stop_requested: bool = False) -> bool:
        """'stop': raise if a loss of this step's micro-batches is NaN/inf on any rank (one host read).

        Also returns whether any rank was asked to stop (``stop_requested``, a pre-emption signal): the
        flag shares the NaN check's all-reduce, so every rank learns it at the same step."""
        losses_M = torch.stack([loss.detach().float().reshape(()) for loss in losses])
        bad_M = ~torch.isfinite(losses_M)
        flags = torch.stack([bad_M.any().float(), losses_M.new_tensor(float(stop_requested))])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags)
        bad_ranks, stops = flags.tolist()
        if bad_ranks == 0:
            return stops > 0
        here = losses_M[bad_M][0].item() if bad_M.any() else "finite"
        raise NonFiniteLossError(f"non-finite loss ({here} here) at step {step} on {int(bad_ranks)} rank(s); "
                                 "stopping (nonfinite_loss.action is 'stop'). Lower the learning rate or check the "
                                 "data, then resume from the last checkpoint")

    @staticmethod
    def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
        """Whether ``flag`` is set on any rank (an all-reduce in a distributed run)."""
        value = torch.tensor([float(flag)], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(value)
        return value.item() > 0

    def should_skip(self, loss: torch.Tensor, step: int) -> bool:
        """'skip': whether to drop this batch (on every rank alike); 'stop': ``check_step`` of this loss alone."""
        if self.action == "stop":
            self.check_step([loss], step)
            return False
        bad_ranks = (~torch.isfinite(loss.detach().float())).float().reshape(1)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(bad_ranks)
        if bad_ranks.item() == 0:
            self.consecutive = 0
            return False
        self.consecutive += 1
        cause = f"non-finite loss ({loss.item()} here) at step {step} on {int(bad_ranks.item())} rank(s)"
        if self.consecutive > self.max_consecutive:
            raise NonFiniteLossError(f"{cause}: {self.consecutive} bad batches in a row, more than "
                                     f"nonfinite_loss.max_consecutive ({self.max_consecutive}); stopping")
        self.skipped += 1
        log.warning("skipping a batch: %s", cause)
        return True
