"""Checkpoints that are incomplete, truncated or corrupt are never resumed from; pruning
keeps the newest complete ones."""

import pytest

from widenet_ds.engine.checkpointing import (
    CheckpointError,
    complete_checkpoints,
    prune_checkpoints,
    read_marker,
    resolve_resume,
    tag_for,
    write_marker,
)


def _fake_checkpoint(root, step, complete=True):
    path = root / tag_for(step)
    path.mkdir(parents=True)
    (path / "mp_rank_00_model_states.pt").write_bytes(b"w" * (100 + step))
    (path / "layer_0_expert_0_mp_rank_00_model_states.pt").write_bytes(b"e" * 50)
    if complete:
        write_marker(path, step, {"step": step})
    return path


def test_auto_resume_takes_the_newest_complete_checkpoint(tmp_path):
    for step in (10, 20):
        _fake_checkpoint(tmp_path, step)
    _fake_checkpoint(tmp_path, 30, complete=False)  # the process died while saving
    assert resolve_resume("auto", tmp_path).name == "step_00000020"
    assert resolve_resume(None, tmp_path) is None
    assert resolve_resume("auto", tmp_path / "nothing_yet") is None
    with pytest.raises(CheckpointError, match="incomplete: no complete.json"):
        resolve_resume(str(tmp_path / "step_00000030"), tmp_path)


def test_a_truncated_file_is_detected_and_skipped(tmp_path):
    _fake_checkpoint(tmp_path, 10)
    newest = _fake_checkpoint(tmp_path, 20)
    expert = newest / "layer_0_expert_0_mp_rank_00_model_states.pt"
    expert.write_bytes(expert.read_bytes()[:20])
    with pytest.raises(CheckpointError, match="is 20 bytes, 50 when saved"):
        read_marker(newest)
    assert resolve_resume("auto", tmp_path).name == "step_00000010"
    expert.unlink()
    with pytest.raises(CheckpointError, match="listed in complete.json is missing"):
        resolve_resume(str(newest), tmp_path)


def test_a_corrupt_marker_is_refused(tmp_path):
    path = _fake_checkpoint(tmp_path, 10)
    (path / "complete.json").write_text("{\"step\": 10, \"files\"")
    with pytest.raises(CheckpointError, match="corrupt"):
        read_marker(path)
    assert complete_checkpoints(tmp_path) == []


def test_pruning_keeps_the_last_k_complete_and_never_a_newer_partial_save(tmp_path):
    for step in (1, 2, 3, 4):
        _fake_checkpoint(tmp_path, step)
    _fake_checkpoint(tmp_path, 5, complete=False)
    prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003", "step_00000004", "step_00000005"]
