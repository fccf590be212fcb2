"""Stopping cleanly when a scheduler pre-empts the job.

SLURM and Kubernetes send SIGTERM some seconds before they kill a job (SLURM also sends SIGUSR1
when asked with ``--signal=USR1@SECONDS``). SLURM signals every process of the job, so a rank
usually gets SIGTERM twice: once from the scheduler and once more from DeepSpeed's per-node
launcher (``deepspeed.launcher.launch``), which passes it on to its ranks and kills them 30 s
later. :class:`StopSignals` turns such a signal into a request: the training loop
(``widenet_ds.jobs.loop.TrainingLoop``) finishes its optimizer step, every rank agrees at the
step boundary (the flag travels with the step's NaN check, ``widenet_ds.engine.guards``), the
job saves a checkpoint and exits 0, and ``--resume auto`` continues with the losses of an
uninterrupted run.

If the job is not done within ``grace_s`` seconds of the signal (a step or a save that takes
longer), it exits with status 1 rather than be killed in the middle of something; an unfinished
save has no ``complete.json`` and is never resumed from. Signals after the first are logged and
otherwise ignored: the repeat from the launcher must not cancel the checkpoint, and the grace
period already bounds the wait.

Note that the ``deepspeed`` command itself (DeepSpeed's runner, one level above the per-node
launcher) does not pass SIGTERM on in a single-node run: signal the process group, as SLURM does,
or run ``python -m deepspeed.launcher.launch`` (or ``torchrun``) as the container's main process.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
DEFAULT_GRACE_S = 25.0  # under the 30 s that SLURM (KillWait), Kubernetes and DeepSpeed's launcher allow


class StopSignals:
    """Records SIGTERM / SIGUSR1 while installed (``with StopSignals(grace_s): ...``)."""

    def __init__(self, grace_s: float = DEFAULT_GRACE_S):
        self.grace_s = grace_s
        self.received: int | None = None  # the first signal, once one came
        self._previous: dict[int, object] = {}
        self._deadline: threading.Timer | None = None

    @property
    def requested(self) -> bool:
        return self.received is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:
            log.warning("%s received again: still stopping after this step", signal.Signals(signum).name)
            return
        self.received = signum
        log.warning("%s received: stopping after this optimizer step with a checkpoint (at most %.0f s)",
                    signal.Signals(signum).name, self.grace_s)
        self._deadline = threading.Timer(self.grace_s, self._expire)
        self._deadline.daemon = True
        self._deadline.start()

    def _expire(self) -> None:
        log.error("%s: the checkpoint was not done within the grace period of %.0f s; exiting without it "
                  "(--resume auto takes the newest complete checkpoint)", self.name, self.grace_s)
        os._exit(1)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
        if self._deadline is not None:
            self._deadline.cancel()
