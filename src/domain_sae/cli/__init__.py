"""`dsae`: the command-line shell over the library (every command is a thin call into a library function).

    dsae train    [--config FILE] [--OPTION VALUE ...] [--resume RUN_DIR]
    dsae finetune --from SOURCE --data DOMAIN [--config FILE] [--OPTION VALUE ...]
    dsae eval     SAE_DIR [SAE_DIR ...] --data chat --data code [--tokens N] [--out DIR]
    dsae compare  STUDY_CONFIG [--out DIR]
    dsae demo     [--quick] [--out DIR]
    dsae options  [train|eval|study] [--all] print the option reference (Markdown)
    dsae features SAE_DIR [SAE_DIR ...] --data chat --data code [--tokens N] --out STORE
    dsae dashboard STORE [--port 8000] [--host 127.0.0.1] [--export DIR]
    dsae cache    --model M --hook H [--hook H2] --data chat --tokens N --out DIR [--dtype float32|bfloat16]
    dsae export   neuronpedia STORE OUT | saebench EVAL_JSON OUT     (docs/exports.md)

The parser is :mod:`.parsers`, the commands :mod:`.commands`; :func:`main` runs one and turns every
:class:`~domain_sae.errors.UserError` into one paragraph on stderr (exit 2), never a traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

from ..errors import UserError
from .commands import COMMANDS
from .parsers import build_parser

__all__ = ["main", "build_parser", "COMMANDS"]


def _env_defaults() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main(argv: Optional[list[str]] = None) -> int:
    _env_defaults()
    try:
        ns = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2), already printed by argparse
        return e.code if isinstance(e.code, int) else 2
    try:
        return COMMANDS[ns.command](ns)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `dsae options | head`
        sys.stderr.close()
        return 0
