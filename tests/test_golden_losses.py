"""The golden loss curve: the first STEPS losses of a seeded CPU pretraining run of the ``debug`` preset.

The run goes through the real pretraining job (``widenet_ds.jobs.pretrain.run``: a SentencePiece tokenizer
trained on a tiny corpus this test writes, ALBERT-style examples, the DeepSpeed engine on one process with
``ds_configs/pretrain_cpu_smoke.json``), and its per-step total, MLM, SOP and auxiliary losses are compared
with ``tests/golden/debug_pretrain_losses.json``. Any change to the maths (model, router, masking, loss,
optimizer, learning-rate schedule, the order of random draws) moves these numbers, so it shows here at once;
a change that keeps the maths keeps them to floating-point precision.

Tolerance: ``rtol=RTOL`` plus ``atol=ATOL`` on every value. The run is deterministic on one machine (one
thread, fixed seed); the tolerance leaves room only for the floating-point differences between CPUs and
library builds.

After an intended change to the maths, regenerate the file and commit it with the change that moved it:

    WIDENET_DS_UPDATE_GOLDEN=1 OMP_NUM_THREADS=1 python -m pytest -q tests/test_golden_losses.py
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from widenet_ds.jobs.pretrain import run

GOLDEN = Path(__file__).resolve().parent / "golden" / "debug_pretrain_losses.json"
UPDATE = os.environ.get("WIDENET_DS_UPDATE_GOLDEN") == "1"
STEPS = 24
KEYS = ("loss", "mlm_loss", "sop_loss", "aux_loss")
RTOL, ATOL = 1e-4, 1e-6
ARGS = ["--preset", "debug", "--vocab_size", "96", "--max_seq_length", "64", "--seed", "42",
        "--max_steps", str(STEPS), "--log_every", "1", "--eval_every", "0", "--save_every", "0",
        "--deepspeed_config", str(Path(__file__).resolve().parent.parent / "ds_configs" / "pretrain_cpu_smoke.json")]

_SUBJECTS = ["the miller", "a young clerk", "the harbour master", "an old teacher", "the baker", "a tired nurse",
             "the ferryman", "a quiet student", "the mayor", "a travelling painter"]
_VERBS = ["carried", "counted", "repaired", "painted", "watched", "described", "sold", "found", "cleaned", "measured"]
_OBJECTS = ["the wooden boats", "a basket of apples", "the broken clock", "two letters", "the stone bridge",
            "a bundle of nets", "the long fence", "a map of the coast", "the church bell", "three loaves of bread"]
_ENDINGS = ["before the rain came", "in the early morning", "after the market closed", "while the river rose",
            "for the whole village", "without a word", "at the end of the week", "by lamplight"]


def write_corpus(path: Path, documents: int = 80, sentences: int = 8) -> Path:
    """A fixed text of ``documents`` documents (two blank lines apart), one sentence per line.

    Made by a seeded ``random.Random`` from the word lists above, so the corpus depends on nothing but
    this file."""
    rng = random.Random(2022)
    blocks = []
    for _ in range(documents):
        lines = [f"{rng.choice(_SUBJECTS).capitalize()} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} "
                 f"{rng.choice(_ENDINGS)}." for _ in range(sentences)]
        blocks.append("\n".join(lines))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n\n".join(blocks) + "\n", encoding="utf-8")
    return path


def losses_of_a_seeded_run(tmp_path: Path) -> dict[str, list[float]]:
    """Each of KEYS at steps 1..STEPS of a fresh pretraining run in ``tmp_path``."""
    corpus = write_corpus(tmp_path / "corpus" / "text.txt")
    records = run(ARGS + ["--train_files", str(corpus), "--output_dir", str(tmp_path / "run")])
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    return {key: [float(r[key]) for r in train] for key in KEYS}


def write_golden(losses: dict[str, list[float]]) -> None:
    """The curve as JSON, one line per loss, with the arguments of the run that made it."""
    args = ARGS[:-1] + ["ds_configs/pretrain_cpu_smoke.json"]
    lines = [f'  "{key}": {json.dumps(values)}' for key, values in losses.items()]
    GOLDEN.write_text(f'{{"steps": {STEPS}, "args": {json.dumps(args)},\n "losses": {{\n'
                      + ",\n".join(lines) + "\n }\n}\n")


def test_the_first_losses_of_a_seeded_debug_run_match_the_golden_curve(tmp_path):
    losses = losses_of_a_seeded_run(tmp_path)
    if UPDATE:
        GOLDEN.parent.mkdir(exist_ok=True)
        write_golden(losses)
        pytest.skip(f"wrote {GOLDEN}")
    golden = json.loads(GOLDEN.read_text())
    assert golden["steps"] == STEPS and set(golden["losses"]) == set(KEYS), "regenerate: see the module docstring"
    for key in KEYS:
        got, want = losses[key], golden["losses"][key]
        bad = [(step, g, w) for step, (g, w) in enumerate(zip(got, want), 1) if abs(g - w) > ATOL + RTOL * abs(w)]
        assert not bad, (f"{key} left the golden curve at steps (step, now, golden): {bad[:5]}; if the change to "
                         "the maths is intended, regenerate with WIDENET_DS_UPDATE_GOLDEN=1 (module docstring)")
    first, last = sum(losses["loss"][:4]) / 4, sum(losses["loss"][-4:]) / 4
    assert last < first, f"the golden run no longer learns: {first:.3f} -> {last:.3f}"
