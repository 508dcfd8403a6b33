"""The argument parser of `dsae`: one sub-parser per command, options generated from the option dataclasses
(:func:`domain_sae.config.add_arguments`), no prefix matching and "did you mean" for unknown options."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Optional

from .. import config as C


class _Parser(argparse.ArgumentParser):
    """argparse without prefix matching (``--training-tok`` is not ``--training-tokens``) and with "did you
    mean" suggestions for unknown options."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_args(self, args=None, namespace=None):
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            sub = self._command_parser(getattr(ns, "command", None))
            self.error(_unknown_message(extras, sub or self, getattr(ns, "command", None)))
        return ns

    def _command_parser(self, command):
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction) and command in action.choices:
                return action.choices[command]
        return None


def _unknown_message(extras: list[str], parser: argparse.ArgumentParser, command: Optional[str]) -> str:
    import difflib
    known = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
    flags = [e.split("=", 1)[0] for e in extras if e.startswith("-")]
    parts = []
    for flag in flags or extras[:1]:
        close = difflib.get_close_matches(flag, known, n=3, cutoff=0.6)
        parts.append(f"{flag!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    return (f"unrecognized argument{'s' if len(parts) > 1 else ''} {', '.join(parts)}. Options must be spelled out "
            f"in full; run `dsae {command or ''} --help`".replace("  ", " ") + " for the list.")


def _train_parser(sub, name: str, help_: str, *, finetune: bool):
    p = sub.add_parser(name, help=help_, description=help_)
    p.add_argument("--config", help="YAML or TOML file of options (CLI flags override it).")
    if not finetune:
        p.add_argument("--resume", metavar="RUN_DIR", help="Continue a killed or interrupted run from its latest "
                                                           "checkpoint (all other options come from the run).")
    skip = () if finetune else ("from_sae", "keep_optimizer")
    C.add_arguments(p, C.TrainConfig, skip=skip)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dsae", description="Train, fine-tune, evaluate and compare sparse "
                                     "autoencoders on domain-specific language-model activations.")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub, "train", "Train an SAE on a hook point of a language model.", finetune=False)
    _train_parser(sub, "finetune", "Continue training a pre-trained SAE on domain data.", finetune=True)

    ev = sub.add_parser("eval", help="Evaluate SAEs on held-out data of one or more datasets.",
                        description="Evaluate every SAE on every dataset's held-out split; writes eval.json, eval.md "
                                    "and heatmaps. Model and hook default to those in the SAE's metadata.")
    ev.add_argument("saes", nargs="+", metavar="SAE_DIR", help="SAE directories (ours or SAELens's).")
    ev.add_argument("--config", help="YAML or TOML file of options.")
    ev.add_argument("--out", default=None, help="Output directory (default: eval_out).")
    C.add_arguments(ev, C.EvalConfig, skip=("data",))
    ev.add_argument("--data", action="append", dest="datasets", metavar="DATA",
                    help="Dataset to evaluate on (repeatable): chat, code, a file or a hub id. Default: chat and code.")
    ev.add_argument("--activations", action="append", dest="caches", metavar="CACHE", default=None,
                    help="Held-out activation cache (repeatable; one dataset each; dsae cache --split heldout): "
                         "reconstruction metrics without running the model (no CE/KL).")
    ev.add_argument("--format", dest="output_format", choices=["dsae", "saebench"], default="dsae",
                    help="saebench: after eval.json, also write SAEBench core-eval JSON files to OUT/saebench/core "
                         "(docs/exports.md). Default dsae (eval.json, eval.md and plots only).")

    cmp_ = sub.add_parser("compare", help="Run the domain-adaptation study described by a config file.")
    cmp_.add_argument("study_config", help="Study config (YAML/TOML), e.g. configs/study_demo.yaml.")
    cmp_.add_argument("--out", default=None, help="Output directory (default: from the config).")

    demo = sub.add_parser("demo", help="The whole study, CPU-sized, on the offline default (SmolLM2 + chat + code).")
    demo.add_argument("--quick", action="store_true", help="Smoke-sized version (about 5 minutes).")
    demo.add_argument("--out", default=None, help="Output directory (default: demo_out).")

    _feature_parsers(sub)
    _cache_parser(sub)
    _export_parsers(sub)

    opts = sub.add_parser("options", help="Print the option reference as Markdown.",
                          description="Print the options of a config file (train, eval or study) as a Markdown "
                                      "table, or with --all every command's flags and every config table "
                                      "(docs/options.md).")
    opts.add_argument("which", nargs="?", default="train", choices=["train", "eval", "study"],
                      help="Which config's options (default train).")
    opts.add_argument("--all", action="store_true", help="The whole reference: every command and config file.")
    return parser


def _feature_parsers(sub) -> None:
    from ..features.options import FeatureOptions
    fe = sub.add_parser("features", help="Build a feature store (SQLite) of per-latent statistics and examples.",
                        description="One streaming pass per dataset over held-out tokens: densities, histograms, "
                                    "top and quantile examples, logit effects, neighbours, domain AUROC.")
    fe.add_argument("saes", nargs="+", metavar="SAE_DIR", help="SAE directories (ours or SAELens's).")
    fe.add_argument("--data", action="append", dest="datasets", metavar="DATA",
                    help="Dataset (repeatable): chat, code, a file or a hub id. Default: chat and code.")
    fe.add_argument("--tokens", type=int, default=16384, help="Held-out tokens per dataset (default 16384).")
    fe.add_argument("--activations", action="append", dest="caches", metavar="CACHE", default=None,
                    help="Held-out activation cache (repeatable, one dataset each; dsae cache --split heldout) to "
                         "read instead of running the model; replaces --data and --tokens.")
    fe.add_argument("--out", required=True, help="Store file to write, e.g. features.sqlite.")
    fe.add_argument("--overwrite", action="store_true", help="Replace an existing store at --out.")
    fe.add_argument("--model", default=None, help="Language model (default: the first SAE's metadata model).")
    fe.add_argument("--hook", default=None, help="Hook point for every SAE (default: each SAE's metadata hook).")
    fe.add_argument("--device", default="cpu", help="Device for the model and SAEs (default cpu).")
    for f in dataclasses.fields(FeatureOptions):
        if f.name in ("exclude_special",):
            continue
        typ = float if "float" in str(f.type) else int
        fe.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=typ, default=None,
                        help=f"{f.metadata['help']} (default {f.default})".replace("%", "%%"))
    da = sub.add_parser("dashboard", help="Serve the feature dashboard for a store (or export it as static files).")
    da.add_argument("store", help="Feature store made by `dsae features`.")
    da.add_argument("--port", type=int, default=8000, help="Port (default 8000).")
    da.add_argument("--host", default="127.0.0.1", help="Address to bind (default 127.0.0.1; others warn).")
    da.add_argument("--export", metavar="DIR", default=None, help="Write static pages to DIR instead of serving.")
    da.add_argument("--export-latents", type=int, default=None, help="Export only the first N latents per SAE.")
    da.add_argument("--no-model", action="store_true",
                    help="Do not load the model (the prompt page, steering and live tests are disabled).")
    da.add_argument("--ablation-latents", type=int, default=128, metavar="N",
                    help="Prompt page: latents whose exact ablation loss change is computed (one batched forward "
                         "each; the best-ranked candidates first). Default 128.")
    da.add_argument("--ablation-batch", type=int, default=16, metavar="N",
                    help="Prompt page: latents ablated per batched forward; a newer prompt, a steering request or a "
                         "live test waits for at most one such batch. Default 16.")
    da.add_argument("--device", default="cpu", help="Device of the model and SAEs (default cpu).")


def _cache_parser(sub) -> None:
    ca = sub.add_parser("cache", help="Cache a model's activations at one or more hooks over a dataset.",
                        description="One model pass (stopped at the deepest hook) over the training split "
                                    "(or, with --split heldout, the evaluation's held-out sample); resumable "
                                    "shards with token ids, positions, segments, the sequences and sha256 "
                                    "checksums. Train from it with dsae train --activations OUT; evaluate or "
                                    "build a feature store from a held-out one with --activations OUT.")
    ca.add_argument("--config", help="YAML or TOML file of data options (CLI flags override it).")
    ca.add_argument("--hook", action="append", dest="hooks", metavar="HOOK", required=True,
                    help="Hook point to cache (repeatable, e.g. --hook blocks.3.hook_resid_post --hook ...).")
    ca.add_argument("--tokens", type=int, required=True, help="Kept token positions to cache.")
    ca.add_argument("--out", required=True, help="Cache directory (an unfinished build there is continued).")
    ca.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="Storage dtype of the activations (default float32).")
    ca.add_argument("--shard-tokens", type=int, default=None, help="Tokens per shard (default: about 256 MiB).")
    ca.add_argument("--overwrite", action="store_true", help="Replace an existing cache at --out.")
    ca.add_argument("--split", default="train", choices=["train", "heldout"],
                    help="train (default: for dsae train --activations) or heldout (the evaluation's held-out "
                         "sample of --tokens tokens, for dsae eval / dsae features --activations).")
    C.add_arguments(ca, C.DataConfig, skip=("hook",))


def _export_parsers(sub) -> None:
    ex = sub.add_parser("export", help="Write a feature store or an eval.json in the format Neuronpedia or SAEBench "
                                       "reads.", description="Exports for other tools (docs/exports.md).")
    kinds = ex.add_subparsers(dest="export_kind", required=True, help="neuronpedia: a feature store's latents; "
                                                                      "saebench: an eval.json's core metrics.")
    npd = kinds.add_parser("neuronpedia", help="Neuronpedia upload files (feature upload-batch bodies) of a store.",
                           description="One JSON request body of Neuronpedia's POST /api/feature/upload-batch per "
                                       "128 latents, per SAE of the store, and a manifest.")
    npd.add_argument("store", metavar="STORE", help="Feature store made by `dsae features`.")
    npd.add_argument("out", metavar="OUT", help="Directory to write (must not exist, or be an earlier export "
                                                "with --overwrite).")
    npd.add_argument("--sae", action="append", dest="saes", metavar="LABEL", default=None,
                     help="SAE of the store to export (label or id; repeatable). Default: all.")
    npd.add_argument("--model-id", default=None, help="Neuronpedia's model id (default: the store's model name).")
    npd.add_argument("--source", default=None, help="Neuronpedia source id, LAYER-SET (one SAE only; default: "
                                                    "layer of the hook and the SAE label).")
    npd.add_argument("--overwrite", action="store_true", help="Replace an earlier Neuronpedia export at OUT.")
    sb = kinds.add_parser("saebench", help="SAEBench core-eval JSON files of an eval.json.",
                          description="One SAEBench core-eval result per (SAE, dataset) of eval.json, in OUT/core/.")
    sb.add_argument("eval_json", metavar="EVAL_JSON", help="eval.json written by `dsae eval` (or its directory).")
    sb.add_argument("out", metavar="OUT", help="Directory to write (must not exist, or be an earlier export with "
                                               "--overwrite).")
    sb.add_argument("--overwrite", action="store_true", help="Replace an earlier SAEBench export at OUT.")
