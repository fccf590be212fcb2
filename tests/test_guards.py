"""A NaN/inf loss stops the run or skips the batch, as the DeepSpeed JSON's nonfinite_loss says."""

import pytest
import torch

from widenet_ds.config import ConfigError
from widenet_ds.ds_config import check_run_config
from widenet_ds.guards import NonFiniteGuard, NonFiniteLossError

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
