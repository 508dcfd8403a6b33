"""docs/options.md is the option reference generated from the real parser and option dataclasses (`dsae options
--all`): the committed copy must equal what the code generates now, and it must cover every flag of every command."""

import argparse
import difflib
from pathlib import Path

from domain_sae import cli
from domain_sae.config.reference import REGENERATE

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "docs" / "options.md"


def _generated(capsys) -> str:
    assert cli.main(["options", "--all"]) == 0
    return capsys.readouterr().out


def test_committed_reference_equals_the_generated_one(capsys):
    generated, committed = _generated(capsys), COMMITTED.read_text()
    if generated != committed:
        diff = "".join(list(difflib.unified_diff(committed.splitlines(True), generated.splitlines(True),
                                                 "docs/options.md (committed)", "dsae options --all (code)"))[:60])
        raise AssertionError(f"docs/options.md is out of date with the command-line parser / option dataclasses. "
                             f"Regenerate it with `{REGENERATE}` and commit it.\n{diff}")


def test_reference_lists_every_command_and_flag(capsys):
    text = _generated(capsys)
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(cli.COMMANDS) <= set(sub.choices)
    for name, p in sub.choices.items():
        assert f"## `dsae {name}`" in text
        section = text.split(f"## `dsae {name}`", 1)[1].split("\n## ", 1)[0]
        for action in p._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"`{flag}" in section, f"dsae {name}: {flag} missing from the reference"
    for key in ("training_tokens", "eval_tokens", "from_sae"):  # config-file tables of train / eval
        assert f"| `{key}` |" in text


def test_reference_does_not_depend_on_the_terminal(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")
    narrow = _generated(capsys)
    monkeypatch.setenv("COLUMNS", "300")
    assert _generated(capsys) == narrow


def test_single_config_tables_still_print(capsys):
    for which, key in (("train", "training_tokens"), ("eval", "n_bootstrap"), ("study", "model")):
        assert cli.main(["options", which]) == 0
        out = capsys.readouterr().out
        assert out.startswith("| option | type | default | meaning |") and f"| `{key}` |" in out
