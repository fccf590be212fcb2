"""Config, presets and validation: the paper's parameter counts and errors a user can cause."""

import json

import pytest

from widenet_ds import PRESETS, ConfigError, MoESettings, WideNetConfig, WideNetModel

# Trainable parameters in the paper (Table: NLP, base size), counted for the encoder + pooler.
PAPER_PARAMS = {
    "albert-base": 12e6,
    "bert-base": 89e6,
    "widenet-base-e4": 26e6,
    "widenet-base-e8": 45e6,
    "widenet-base-e16": 83e6,
    "albert-large": 18e6,  # ALBERT paper, Table 1
}


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_preset_parameter_counts_match_the_papers(name):
    model = WideNetModel(WideNetConfig.from_preset(name))
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - PAPER_PARAMS[name]) / PAPER_PARAMS[name] < 0.03, f"{name}: {count / 1e6:.2f}M"


def test_every_preset_named_in_the_brief_exists_and_builds_a_valid_config():
    expected = {"debug", "widenet-small"} | {f"{f}-{s}" for f in ("albert", "bert") for s in ("base", "large")} | {
        f"widenet-{s}-e{e}" for s in ("base", "large") for e in (4, 8, 16)}
    assert set(PRESETS) == expected
    for name in PRESETS:
        WideNetConfig.from_preset(name).check()


def test_preset_families_differ_only_where_the_paper_says():
    albert, bert, widenet = (WideNetConfig.from_preset(n) for n in ("albert-base", "bert-base", "widenet-base-e4"))
    assert (albert.share_attention, albert.share_ffn, albert.share_layer_norm) == (True, True, True)
    assert (bert.share_attention, bert.share_ffn, bert.share_layer_norm) == (False, False, False)
    assert (widenet.share_attention, widenet.share_ffn, widenet.share_layer_norm) == (True, True, False)
    assert albert.num_experts == bert.num_experts == 1 and widenet.num_experts == 4 and widenet.top_k == 2
    assert widenet.pre_layer_norm and not albert.pre_layer_norm
    assert widenet.noise_std == pytest.approx(1 / 4)


def test_invalid_config_lists_every_problem_at_once():
    with pytest.raises(ConfigError) as err:
        WideNetConfig.from_preset("debug", hidden_size=30, num_attention_heads=4, num_experts=6, top_k=2,
                                  hidden_act="swish", router_noise="loud",
                                  moe={"ep_size": 4, "capacity_factor": -1.0})
    problems = "\n".join(err.value.problems)
    for needle in ("num_attention_heads (4) must divide hidden_size (30)", "hidden_act", "router_noise",
                   "capacity_factor must be a number > 0", "ep_size (4) must divide num_experts (6)"):
        assert needle in problems
    assert len(err.value.problems) == 5


def test_top_k_larger_than_num_experts_is_refused():
    with pytest.raises(ConfigError, match=r"top_k \(3\) must be <= num_experts \(2\)"):
        WideNetConfig.from_preset("debug", num_experts=2, top_k=3)


def test_unknown_preset_and_unknown_override_name_what_to_fix():
    with pytest.raises(ConfigError, match="unknown preset 'widenet-huge'.*known: debug"):
        WideNetConfig.from_preset("widenet-huge")
    with pytest.raises(ConfigError, match="unknown field 'num_expert'"):
        WideNetConfig.from_preset("debug", num_expert=8)


def test_moe_block_refuses_unknown_keys_and_bad_types():
    with pytest.raises(ConfigError) as err:
        MoESettings.from_dict({"capacity": 1.2, "drop_tokens": "yes", "min_capacity": 2.5}, "ds_config.json moe")
    text = str(err.value)
    assert "ds_config.json moe: unknown key 'capacity'" in text
    assert "drop_tokens must be true or false" in text and "min_capacity must be an integer" in text


def test_moe_settings_travel_with_the_config_json(tmp_path):
    config = WideNetConfig.from_preset("debug")
    config.with_moe_settings(MoESettings(capacity_factor=2.0, aux_loss_coef=0.0, drop_tokens=False))
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["moe"]["capacity_factor"] == 2.0 and saved["moe"]["drop_tokens"] is False
    loaded = WideNetConfig.from_pretrained(tmp_path)
    assert loaded.moe_settings == MoESettings(capacity_factor=2.0, aux_loss_coef=0.0, drop_tokens=False)
    assert loaded.num_experts == 4 and loaded.hidden_size == 32
