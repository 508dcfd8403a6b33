"""The docs are true to the code.

- Every `dsae ...` command in a fenced shell block of README.md and docs/*.md (also `torchrun ... -m domain_sae.cli`)
  parses with the real parser, so a renamed or removed flag fails here; a `configs/` file it names exists and holds
  only known options.
- The commands that can run offline run, in document order, in a scratch directory per page (so a page's commands
  can use what its earlier commands wrote), on a tiny model at tiny sizes: the flags below are appended, and later
  flags win in argparse. A command is skipped when it needs the network, serves forever, is minutes long by design
  (`demo`, `compare`), or names an input (SAE, cache, config) that does not exist there; the test says which ran.
- Python blocks' imports resolve; relative links and their anchors resolve; every module of the package is named in
  docs/architecture.md; no page speaks of a "session".
"""

from __future__ import annotations

import ast
import contextlib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import make_tiny_model
from domain_sae import cli
from domain_sae import config as C

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = {"bash", "sh", "shell", "console", ""}
FENCE = re.compile(r"^```([\w+-]*)\s*$")

# Appended to a command before it runs (argparse: the last value of an option wins).
TRAIN = ["--model", "{model}", "--training-tokens", "1024", "--train-batch-size-tokens", "256", "--buffer-size-tokens",
         "1024", "--context-size", "32", "--max-rows", "60", "--eval-every", "0", "--n-checkpoints", "0",
         "--lr-warm-up-steps", "0", "--lr-decay-steps", "0", "--l1-warm-up-steps", "0", "--overwrite"]
TINY = {
    "options": [],
    "train": TRAIN + ["--d-sae", "2304"],  # wide enough for any --matryoshka-widths shown in the docs
    "finetune": TRAIN,
    "eval": ["--tokens", "64", "--n-bootstrap", "10", "--max-rows", "200"],
    "cache": ["--model", "{model}", "--tokens", "2048", "--context-size", "32", "--max-rows", "60"],
    "features": ["--tokens", "64"],
    "dashboard": ["--export-latents", "4"],
}
NOT_RUN = {"demo": "runs the whole study (minutes)", "compare": "runs a whole study (minutes)"}


@dataclass
class Command:
    page: Path
    line: int
    argv: list[str]

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def fenced_blocks(page: Path):
    """(language, first line number, text) of every fenced code block."""
    lang, start, lines = None, 0, []
    for n, line in enumerate(page.read_text().splitlines(), 1):
        m = FENCE.match(line.strip())
        if lang is None and m:
            lang, start, lines = m.group(1), n + 1, []
        elif lang is not None and line.strip() == "```":
            yield lang, start, "\n".join(lines)
            lang = None
        elif lang is not None:
            lines.append(line)


def dsae_argv(tokens: list[str]) -> list[str] | None:
    """The dsae arguments of one shell command, or None when it does not run dsae."""
    while tokens and re.match(r"^\w+=", tokens[0]):  # VAR=value prefixes
        tokens = tokens[1:]
    if not tokens:
        return None
    if tokens[0].endswith("dsae"):  # dsae, .venv/bin/dsae
        return tokens[1:]
    if "domain_sae.cli" in tokens and tokens[tokens.index("domain_sae.cli") - 1] == "-m":
        return tokens[tokens.index("domain_sae.cli") + 1:]
    return None


def commands(page: Path) -> list[Command]:
    out = []
    for lang, start, text in fenced_blocks(page):
        if lang not in SHELL:
            continue
        logical, first = "", None
        for n, line in enumerate(text.splitlines(), start):
            first = n if not logical else first
            if line.rstrip().endswith("\\"):
                logical += line.rstrip()[:-1] + " "
                continue
            logical += line
            tokens = shlex.split(logical, comments=True)
            logical = ""
            segment: list[str] = []
            redirect = re.compile(r"^\d?>>?$|^<$")  # `> FILE`, `2>> FILE`, `< FILE`; `2>&1` alone
            tokens = [t for i, t in enumerate(tokens) if not redirect.match(t) and not re.match(r"^\d>&\d$", t)
                      and not (i and redirect.match(tokens[i - 1]))]
            for tok in tokens + [";"]:
                if tok in ("&&", ";", "||", "|"):
                    argv = dsae_argv(segment)
                    if argv is not None:
                        out.append(Command(page, first, argv))
                    segment = []
                else:
                    segment.append(tok)
    return out


ALL = [c for page in PAGES for c in commands(page)]


def test_the_docs_show_commands():
    names = {c.argv[0] for c in ALL if c.argv}
    assert {"train", "finetune", "eval", "cache", "options"} <= names, names


def _parse(argv: list[str]):
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return cli.build_parser().parse_args(argv)
    except SystemExit:
        return err.getvalue().strip() or "exited"


def _check_config_file(ns, path: str) -> None:
    file = ROOT / path
    assert file.is_file(), f"{path} does not exist"
    values = C.load_config_file(file)
    values.pop("saes", None)  # many SAEs per model pass: entries are checked by runs.many
    cls = {"train": C.TrainConfig, "finetune": C.TrainConfig, "eval": C.EvalConfig, "cache": C.DataConfig}
    if ns.command in cls:
        C.from_dict(cls[ns.command], values, source=path)


@pytest.mark.parametrize("command", ALL, ids=lambda c: c.id)
def test_command_parses_with_the_real_parser(command):
    ns = _parse(command.argv)
    assert not isinstance(ns, str), f"{command.id}: `dsae {shlex.join(command.argv)}` does not parse: {ns}"
    for path in (getattr(ns, "config", None), getattr(ns, "study_config", None)):
        if path and path.startswith("configs/"):
            _check_config_file(ns, path)


def test_a_renamed_flag_fails_to_parse():
    assert isinstance(_parse(["train", "--training-tokenz", "1000"]), str)
    assert not isinstance(_parse(["train", "--training-tokens", "1000"]), str)


# --------------------------------------------------------------------------------------------------------------------
# Running the offline commands


def _skip_reason(ns, argv: list[str]) -> str | None:
    if ns.command in NOT_RUN:
        return NOT_RUN[ns.command]
    if ns.command not in TINY:
        return "no tiny form"
    if ns.command == "dashboard" and not ns.export:
        return "serves until stopped"
    inputs = [*(getattr(ns, "saes", None) or []), getattr(ns, "store", None), getattr(ns, "from_sae", None),
              getattr(ns, "resume", None), getattr(ns, "config", None), getattr(ns, "activations", None),
              *(getattr(ns, "caches", None) or [])]
    for path in filter(None, inputs):
        if not Path(path).exists():
            return f"needs {path}"
    data = [*(getattr(ns, "datasets", None) or []), getattr(ns, "data", None)]
    if getattr(ns, "config", None):
        data.append(str(C.load_config_file(ns.config).get("data", "")))
    for spec in filter(None, data):
        if "/" in spec and not Path(spec).exists() and not spec.startswith("mix:"):
            return f"hub dataset {spec}"
    return None


@pytest.fixture(scope="module")
def deep_tiny_model(tmp_path_factory, smol_tokenizer):
    """A 16-layer tiny Llama (the docs use hooks down to blocks.15) with the real SmolLM2 tokenizer, saved."""
    d = tmp_path_factory.mktemp("docs-model") / "tiny-llama-16"
    make_tiny_model("llama", n_layers=16).save_pretrained(d)
    smol_tokenizer.save_pretrained(d)
    return d


# Pages whose commands must run (at least this many): a docs change that made them unrunnable here fails. The
# default suite runs the README's quick start, scale.md's cache chain (about 10 s each) and architecture.md's
# `dsae options`; the other pages are slow.
MUST_RUN = {"README.md": 3, "docs/scale.md": 3, "docs/architecture.md": 1, "docs/training.md": 2,
            "docs/architectures.md": 4}
DEFAULT_SUITE = ("README.md", "docs/scale.md", "docs/architecture.md")
RUN_PAGES = [pytest.param(p, marks=() if str(p.relative_to(ROOT)) in DEFAULT_SUITE else pytest.mark.slow,
                          id=str(p.relative_to(ROOT)))
             for p in PAGES if any(not isinstance(_parse(c.argv), str) and c.argv[0] in TINY for c in commands(p))]


@pytest.mark.parametrize("page", RUN_PAGES)
def test_offline_commands_run_at_tiny_sizes(page, deep_tiny_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    ran, skipped = [], []
    for command in commands(page):
        ns = _parse(command.argv)
        reason = _skip_reason(ns, command.argv)
        if reason:
            skipped.append(f"{command.id} {command.argv[0]}: {reason}")
            continue
        tiny = [a.format(model=deep_tiny_model) for a in TINY[ns.command]]
        if ns.command == "eval" and ns.caches:
            tiny = tiny[2:]  # no --tokens: a held-out cache fixes the tokens
        if ns.command == "features" and ns.caches:
            tiny = []
        argv = command.argv + tiny
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = cli.main(argv)
        assert code == 0, f"{command.id}: `dsae {shlex.join(argv)}` exited {code}:\n{err.getvalue()[-2000:]}"
        ran.append(command.id)
    print(f"{page.name}: ran {ran}; skipped {skipped}")
    least = MUST_RUN.get(str(page.relative_to(ROOT)), 0)
    assert len(ran) >= least, f"{page.name}: {len(ran)} commands ran, {least} expected; skipped: {skipped}"


def test_the_quick_start_and_the_cache_chain_are_in_the_runs():
    """The README's quick start (train -> finetune -> eval) and scale.md's cache -> train chain are the first
    commands of their pages, so the default suite runs them."""
    readme = [c.argv[0] for c in commands(ROOT / "README.md")]
    assert readme[:3] == ["train", "finetune", "eval"]
    scale = [c.argv for c in commands(ROOT / "docs" / "scale.md")]
    assert scale[0][0] == "cache" and scale[1][0] == "train" and "--activations" in scale[1]


# --------------------------------------------------------------------------------------------------------------------
# Python blocks, links, the architecture map, wording


def test_python_blocks_import_what_they_use():
    for page in PAGES:
        for lang, line, text in fenced_blocks(page):
            if lang != "python":
                continue
            tree = ast.parse(text)
            imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
            assert imports, f"{page.name}:{line}: a Python block without imports"
            exec(compile(ast.Module(body=imports, type_ignores=[]), f"{page.name}:{line}", "exec"), {})


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation other than - and _ dropped, spaces -> -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    in_code, out = False, set()
    for line in page.read_text().splitlines():
        if line.strip().startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            out.add(slug(line.lstrip("#")))
    return out


def test_slug_matches_github():
    assert slug(" The rigorous study: `configs/study_full.yaml`") == "the-rigorous-study-configsstudy_fullyaml"
    assert slug(" `dsae eval`: three TopK SAEs") == "dsae-eval-three-topk-saes"


def test_relative_links_and_anchors_resolve():
    link = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in link.findall(text):
            if re.match(r"^[a-z]+://", target) or target.startswith("mailto:"):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            assert file.exists(), f"{page.name}: link to {target}: no such file"
            if anchor and file.suffix == ".md":
                assert anchor in anchors(file), f"{page.name}: link to {target}: no such heading in {file.name}"


def test_every_module_is_in_the_architecture_map():
    """docs/architecture.md has a section per package (a heading naming `pkg/`) that names each of its modules."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    sections = dict(re.findall(r"^### `(\w+)/`.*?\n(.*?)(?=^### |^## |\Z)", text, flags=re.S | re.M))
    src = ROOT / "src" / "domain_sae"
    missing = []
    for module in sorted(src.rglob("*.py")):
        rel = module.relative_to(src)
        if rel.name == "__init__.py":
            continue
        pkg = str(rel.parent) if len(rel.parts) > 1 else "."
        if pkg == ".":
            if f"`{rel.name}`" not in text:
                missing.append(str(rel))
        elif f"`{rel.name}`" not in sections.get(pkg, ""):
            missing.append(str(rel))
    assert not missing, (f"docs/architecture.md does not describe {', '.join(missing)}: add each module to its "
                         f"package's section (### `pkg/`)")


def test_no_page_speaks_of_a_session():
    for page in PAGES:
        for n, line in enumerate(page.read_text().splitlines(), 1):
            assert "session" not in line.lower(), f"{page.name}:{n}: say the date and the machine, not the session"

