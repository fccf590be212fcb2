"""``--help`` of the entry points: every option explained with its default, none of DeepSpeed's
deprecated ``--deepscale*`` options, each job's own ``--compile`` text, and the columns each GLUE
task's own data files need."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest

from widenet_ds.glue.tasks import TASKS
from widenet_ds.jobs import finetune, finetune_squad, glue_grid, pretrain

ROOT = Path(__file__).resolve().parent.parent
PARSERS = {"pretrain": pretrain.build_parser, "finetune_glue": finetune.build_parser,
           "finetune_squad": finetune_squad.build_parser, "glue_table": glue_grid.build_parser}


def _launcher_help(capsys, script: str, entry: str) -> str:
    """``launch/<script> --help`` in this process (the launchers that build their own parser)."""
    spec = importlib.util.spec_from_file_location(f"launch_{entry}", ROOT / "launch" / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as stop:
        getattr(module, entry)(["--help"])
    assert stop.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.help != argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)]


def _shown_help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The option's help as ``--help`` prints it (defaults filled in), on one line."""
    return " ".join(parser._get_formatter()._expand_help(action).split())


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_every_option_has_help_and_shows_its_default(name):
    parser = PARSERS[name]()
    for action in _options(parser):
        label = action.option_strings[0] if action.option_strings else action.dest
        shown = _shown_help(parser, action)
        assert shown, f"{name} {label}: no help"
        if action.required or action.default is False:
            continue  # a required option or a flag has no default to show
        if action.default in (None, []):
            if action.default is None:
                assert "default" in shown, f"{name} {label}: its help does not say what happens without it"
            continue
        assert f"(default: {action.default})" in shown, f"{name} {label}: default {action.default!r} not shown"


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_no_deprecated_deepscale_option(name):
    parser = PARSERS[name]()
    assert not any(s.startswith("--deepscale") for a in parser._actions for s in a.option_strings)
    assert "deepscale" not in parser.format_help()


def test_the_entry_points_print_that_help(capsys):
    with pytest.raises(SystemExit) as stop:
        pretrain.run(["--help"])
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--max_seq_length MAX_SEQ_LENGTH tokens per sequence" in text and "(default: 512)" in text
    assert "(default: widenet-small)" in text and "(default: runs/pretrain)" in text
    assert "(default: ds_configs/pretrain_cpu_smoke.json)" in text
    export = _launcher_help(capsys, "export.py", "export")
    assert "--tokenizer" in export and "out_dir" in export
    assert "(default: Run report)" in _launcher_help(capsys, "report.py", "report")


def test_a_zero_default_is_shown():
    parser = finetune_squad.build_parser()
    action = next(a for a in parser._actions if "--null_score_diff_threshold" in a.option_strings)
    assert "(default: 0.0)" in _shown_help(parser, action)


def test_each_job_explains_compile_with_its_own_padding():
    def compile_help(parser):
        return _shown_help(parser, next(a for a in parser._actions if "--compile" in a.option_strings))

    pretraining, fine_tuning = compile_help(pretrain.build_parser()), compile_help(finetune.build_parser())
    assert "pads every batch to --max_seq_length" in pretraining
    assert f"pads each batch to a multiple of {finetune.COMPILED_PAD_MULTIPLE} tokens" in fine_tuning
    assert "--max_seq_length (one shape)" not in fine_tuning


@pytest.mark.parametrize("name", ["finetune_glue", "glue_table"])
def test_the_epilog_names_the_columns_of_each_glue_task(name):
    lines = [line.strip() for line in PARSERS[name]().format_help().splitlines()]
    for task in TASKS.values():
        line = next((line for line in lines if line.split(" ", 1)[0] == task.name), None)
        assert line is not None, f"{name} --help: no line for {task.name}"
        assert f"train/dev: {', '.join(task.file_columns(True))};" in line
        assert f"test: {', '.join(task.file_columns(False))};" in line
