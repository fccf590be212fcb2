"""How an entry point reports a user's mistake: the table of user-error types names real exception
classes, and ``main`` turns one into a single ``error:`` line and exit status 1."""

from __future__ import annotations

import importlib

import pytest

from widenet_ds.config import ConfigError
from widenet_ds.jobs import cli


def test_every_user_error_in_the_table_is_an_exception_class_of_its_module():
    """A misspelt module or class would silently drop its errors from the one-line report."""
    for module, name in cli.USER_ERRORS:
        error = getattr(importlib.import_module(f"widenet_ds.{module}"), name)
        assert isinstance(error, type) and issubclass(error, Exception), (module, name)
    assert len(cli.user_errors()) == len(cli.USER_ERRORS)  # every module imported now: all of them count


def test_a_user_error_is_one_line_and_exit_1_and_another_error_propagates(capsys, monkeypatch):
    monkeypatch.delenv(cli.DEBUG_VARIABLE, raising=False)

    def refuse():
        raise ConfigError("command line", ["--max_steps must be positive"])

    with pytest.raises(SystemExit) as stopped:
        cli.main(refuse)
    assert stopped.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--max_steps must be positive" in err and "Traceback" not in err

    def crash():
        raise KeyError("a bug, not a user's mistake")

    with pytest.raises(KeyError):
        cli.main(crash)
