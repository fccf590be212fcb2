"""Every DeepSpeed JSON in ds_configs/ is valid, and mistakes in one are named before any compute."""

import json
from pathlib import Path

import pytest

from widenet_ds.config import ConfigError, MoESettings
from widenet_ds.engine.ds_config import check_run_config, load_run_config

DS_CONFIGS = sorted((Path(__file__).parent.parent / "ds_configs").glob("*.json"))


def _world_for(raw):
    """The smallest world each config is meant for (a multiple of its ep_size)."""
    return raw.get("moe", {}).get("ep_size", 1)


def test_ds_configs_folder_has_the_promised_configs():
    names = {p.name for p in DS_CONFIGS}
    assert {"pretrain_cpu_smoke.json", "pretrain_cpu_ep2.json", "pretrain_1gpu.json", "pretrain_multigpu_ep.json",
            "pretrain_multinode.json"} <= names


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.name)
def test_every_ds_config_is_valid_for_its_world(path):
    raw = json.loads(path.read_text())
    world = _world_for(raw)
    fixed = raw.get("scheduler", {}).get("params", {}).get("total_num_steps", "auto")  # the fine-tuning JSONs fix it
    run = load_run_config(path, world_size=world, cuda=True, max_steps=1000 if fixed == "auto" else fixed)
    assert run.global_batch_size == run.deepspeed["train_batch_size"]
    assert sum(k in raw for k in ("train_batch_size", "train_micro_batch_size_per_gpu",
                                  "gradient_accumulation_steps")) == 2, "two of the three batch keys"
    assert run.moe == MoESettings.from_dict(raw["moe"])
    assert "moe" not in run.deepspeed and "optimizer" not in run.deepspeed
    if run.zero_stage == 2:
        assert raw["zero_optimization"]["contiguous_gradients"] and raw["zero_optimization"]["reduce_scatter"]
    sched = run.deepspeed.get("scheduler", {}).get("params", {})
    assert sched.get("total_num_steps", 1000) == (1000 if fixed == "auto" else fixed)


def _base():
    return {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "moe": {"ep_size": 1}}


def _problems(raw, **kw):
    with pytest.raises(ConfigError) as err:
        check_run_config(raw, "test.json", **kw)
    return "\n".join(err.value.problems)


def test_batch_keys_resolve_to_the_third_one():
    run = check_run_config(_base(), "x", world_size=2)
    assert (run.micro_batch_size, run.grad_accum, run.global_batch_size) == (4, 2, 16)
    raw = {**_base(), "train_batch_size": 64}
    del raw["gradient_accumulation_steps"]
    assert check_run_config(raw, "x", world_size=4).grad_accum == 4


def test_unknown_and_misspelled_keys_are_refused_with_a_hint():
    text = _problems({**_base(), "gradient_cliping": 1.0, "zero_optimisation": {"stage": 1}})
    assert "unknown key 'gradient_cliping'" in text and "did you mean 'gradient_clipping'" in text
    assert "did you mean 'zero_optimization'" in text


def test_conflicting_and_indivisible_batch_sizes_are_refused():
    assert "give exactly two of" in _problems({**_base(), "train_batch_size": 16})
    raw = {**_base(), "train_batch_size": 30}
    del raw["gradient_accumulation_steps"]
    assert "train_batch_size 30 is not divisible by train_micro_batch_size_per_gpu 4 x 2 rank(s)" in _problems(
        raw, world_size=2)


def test_engine_mistakes_are_all_reported_together():
    raw = {**_base(), "fp16": {"enabled": True}, "zero_optimization": {"stage": 3},
           "optimizer": {"type": "SGD"}, "moe": {"ep_size": 4, "capacity_factor": "high"}}
    text = _problems(raw, world_size=2)
    for needle in ("fp16 needs a GPU", "stage 3 does not support", "optimizer must be",
                   "moe.ep_size 4 does not divide the 2 rank(s)", "moe.capacity_factor must be a number"):
        assert needle in text


def test_lamb_under_zero_needs_the_untested_optimizer_flag():
    raw = {**_base(), "optimizer": {"type": "Lamb", "params": {"lr": 1e-3}}, "zero_optimization": {"stage": 1}}
    assert "zero_allow_untested_optimizer" in _problems(raw)
    check_run_config({**raw, "zero_allow_untested_optimizer": True}, "x")


def test_zero2_requires_the_moe_settings_deepspeed_needs():
    raw = {**_base(), "zero_optimization": {"stage": 2, "reduce_scatter": False}}
    assert "zero_optimization.reduce_scatter must be true" in _problems(raw)


def test_auto_total_steps_needs_max_steps():
    raw = {**_base(), "scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": "auto"}}}
    assert "no --max_steps" in _problems(raw)
    assert check_run_config(raw, "x", max_steps=77).deepspeed["scheduler"]["params"]["total_num_steps"] == 77


def test_missing_or_broken_file_names_the_path(tmp_path):
    with pytest.raises(ConfigError, match="nope.json: no such file"):
        load_run_config(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{\"train_batch_size\": 8,}")
    with pytest.raises(ConfigError, match="bad.json: not valid JSON"):
        load_run_config(bad)
