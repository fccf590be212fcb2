"""A NaN/inf loss stops the run or skips the batch, as the DeepSpeed JSON's nonfinite_loss says."""

import pytest
import torch

from widenet_ds.config import ConfigError
from widenet_ds.engine.ds_config import check_run_config
from widenet_ds.engine.guards import NonFiniteGuard, NonFiniteLossError

FINITE, NAN, INF = torch.tensor(2.5), torch.tensor(float("nan")), torch.tensor(float("inf"))


def test_stop_raises_with_the_step_and_the_cause():
    guard = NonFiniteGuard("stop")
    assert guard.should_skip(FINITE, 1) is False
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan here\) at step 7 on 1 rank\(s\)"):
        guard.should_skip(NAN, 7)


def test_skip_drops_bad_batches_until_too_many_in_a_row():
    guard = NonFiniteGuard("skip", max_consecutive=2)
    assert [guard.should_skip(x, 3) for x in (NAN, INF, FINITE, NAN, NAN)] == [True, True, False, True, True]
    assert guard.skipped == 4
    with pytest.raises(NonFiniteLossError, match="3 bad batches in a row, more than nonfinite_loss.max_consecutive"):
        guard.should_skip(NAN, 4)


def test_the_setting_lives_in_the_deepspeed_json_and_is_checked():
    base = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    assert check_run_config(base, "x").nonfinite_loss == {"action": "stop", "max_consecutive": 5}
    run = check_run_config({**base, "nonfinite_loss": {"action": "skip", "max_consecutive": 3}}, "x")
    assert run.nonfinite_loss == {"action": "skip", "max_consecutive": 3}
    assert run.to_dict()["nonfinite_loss"]["action"] == "skip"
    with pytest.raises(ConfigError, match="nonfinite_loss: action must be one of"):
        check_run_config({**base, "nonfinite_loss": {"action": "ignore"}}, "x")


def test_stop_reads_the_losses_of_a_whole_step_at_once():
    guard = NonFiniteGuard("stop")
    assert not guard.checks_each_batch and NonFiniteGuard("skip").checks_each_batch
    guard.check_step([FINITE, FINITE.clone()], 3)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(inf here\) at step 4 on 1 rank\(s\); stopping"):
        guard.check_step([FINITE, INF], 4)
    with pytest.raises(NonFiniteLossError, match=r"\(nan here\) at step 5"):
        guard.check_step([NAN, FINITE], 5)


@pytest.mark.distributed
def test_a_bad_loss_on_one_rank_stops_every_rank(tmp_path):
    """Both actions agree across ranks: rank 1's NaN stops rank 0 too (a rank that went on would hang in
    the next collective)."""
    import os
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    from widenet_ds.distributed import free_port

    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent("""
        import torch
        from widenet_ds.distributed import close_distributed, init_distributed
        from widenet_ds.engine.guards import NonFiniteGuard, NonFiniteLossError
        init_distributed()
        rank = torch.distributed.get_rank()
        outcomes = []
        for action in ("stop", "skip"):
            guard = NonFiniteGuard(action)
            losses = [torch.tensor(1.0), torch.tensor(float("nan") if rank == 1 else 2.0)]
            try:
                if action == "stop":
                    guard.check_step(losses, 9)
                else:
                    outcomes.append(f"skip {[guard.should_skip(x, 9) for x in losses]}")
            except NonFiniteLossError as err:
                outcomes.append(str(err).split(";")[0])
        print(f"rank {rank}: {outcomes}", flush=True)
        close_distributed()
    """))
    launcher = Path(sys.executable).parent / "deepspeed"
    result = subprocess.run([str(launcher), "--num_gpus", "2", "--master_port", str(free_port()), str(script)],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert ("rank 0: ['non-finite loss (finite here) at step 9 on 1 rank(s)', 'skip [False, True]']"
            in result.stdout), result.stdout[-2000:]
    assert "rank 1: ['non-finite loss (nan here) at step 9 on 1 rank(s)', 'skip [False, True]']" in result.stdout
