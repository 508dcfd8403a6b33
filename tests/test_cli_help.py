"""Every command's and subcommand's ``--help`` exits 0 and prints usage, never a traceback (a ``%`` in an option's
help once crashed ``dsae train --help``)."""

import argparse
import contextlib
import io

import pytest

from domain_sae import cli


def _commands(parser: argparse.ArgumentParser, prefix=()):
    yield prefix
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, prefix + (name,))


COMMANDS = list(_commands(cli.build_parser()))


def test_every_command_is_listed():
    names = {c[0] for c in COMMANDS if c}
    assert set(cli.COMMANDS) <= names and len(COMMANDS) >= len(cli.COMMANDS) + 1


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "dsae")
def test_help_exits_zero_without_traceback(command):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([*command, "--help"])
    assert code == 0, err.getvalue()
    assert "usage: dsae" in out.getvalue()
    assert "Traceback" not in out.getvalue() + err.getvalue()
