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
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Optional

from . import config as C
from .util.outdirs import check_output_dir, prepare_output_dir
from .errors import UserError


def _env_defaults() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _overrides(ns: argparse.Namespace, cls) -> dict:
    names = {f for f in cls.__dataclass_fields__}
    return {k: v for k, v in vars(ns).items() if k in names and v is not None}


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
    from .features.options import FeatureOptions
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
        typ = float if f.type in ("float", "Optional[float]") else int
        fe.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=typ, default=None,
                        help=f"(default {f.default})")
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


def cmd_export(ns) -> int:
    if ns.export_kind == "neuronpedia":
        from .features.neuronpedia import export_neuronpedia
        man = export_neuronpedia(ns.store, Path(ns.out), saes=ns.saes, model_id=ns.model_id, source=ns.source,
                                 overwrite=ns.overwrite)
        for s in man["sources"]:
            print(f"{s['sae']}: {s['features']} latents in {len(s['files'])} file(s) under {Path(ns.out) / s['source']}"
                  f" (modelId {man['modelId']}, source {s['source']}; {len(s['left_out_never_fired'])} never-fired "
                  f"latents left out)")
        return 0
    from .evaluation.saebench import write_saebench
    files = write_saebench(Path(ns.eval_json), Path(ns.out), overwrite=ns.overwrite)
    print(f"Wrote {len(files)} SAEBench core result(s) to {Path(ns.out) / 'core'}")
    return 0


def _write_saebench_of_eval(out: Path) -> None:
    from .evaluation.saebench import write_saebench
    files = write_saebench(out / "eval.json", out / "saebench", overwrite=True)
    print(f"Wrote {len(files)} SAEBench core result(s) to {out / 'saebench' / 'core'}")


def cmd_cache(ns) -> int:
    from .activations.hook_cache import build_cache
    from .runs.single import load_lm
    cfg = C.build_config(C.DataConfig, config_file=ns.config, overrides=_overrides(ns, C.DataConfig))
    check_output_dir(Path(ns.out), "activation-cache", overwrite=ns.overwrite, option="--out")
    lm = load_lm(cfg)

    def progress(index: int, manifest: dict) -> None:
        print(f"shard {index}: {manifest['n_tokens']} tokens cached ({manifest['n_sequences']} sequences; "
              f"{ns.tokens} asked)", file=sys.stderr, flush=True)

    out = build_cache(lm, ns.hooks, cfg, Path(ns.out), ns.tokens, dtype=ns.dtype, shard_tokens=ns.shard_tokens,
                      overwrite=ns.overwrite, split=ns.split, on_shard=progress)
    use = "dsae train --activations {} --hook HOOK ..." if ns.split == "train" else \
        "dsae eval SAE_DIR --activations {} (or dsae features SAE_DIR --activations {} --out F)"
    print(f"Activation cache: {out}. Use it with: {use.format(out, out)}")
    return 0


def cmd_features(ns) -> int:
    from .evaluation import HeldoutData, SAESet
    from .features.build import build_feature_store
    from .features.options import FeatureOptions
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(FeatureOptions)
              if getattr(ns, f.name, None) is not None}
    data = HeldoutData.choose(ns.datasets, ns.caches)
    out = build_feature_store(SAESet.load(ns.saes), data, ns.out, n_tokens=ns.tokens,
                              cfg=C.EvalConfig(model=ns.model, hook=ns.hook), device=ns.device,
                              options=FeatureOptions(**values), overwrite=ns.overwrite)
    print(f"Feature store: {out}. View it with: dsae dashboard {out}")
    return 0


def cmd_dashboard(ns) -> int:
    from .dashboard import serve
    if ns.export:
        serve.export(ns.store, ns.export, ns.export_latents)
        return 0
    for flag, value in (("--ablation-latents", ns.ablation_latents), ("--ablation-batch", ns.ablation_batch)):
        if value < 1:
            raise C.ConfigError(f"{flag} must be at least 1 (got {value}).")
    serve.serve(ns.store, host=ns.host, port=ns.port, device=ns.device, load_model=not ns.no_model,
                max_candidates=ns.ablation_latents, ablation_batch=ns.ablation_batch)
    return 0


def cmd_train(ns) -> int:
    from .training import distributed
    try:
        return _train(ns)
    finally:
        distributed.shutdown()  # under torchrun: every rank leaves the process group together


def _train(ns) -> int:
    from .runs import many as multirun, single as pipeline
    if ns.resume:
        given = {k for k, v in _overrides(ns, C.TrainConfig).items()}
        if given or ns.config:
            raise C.ConfigError("--resume takes its options from the run directory; drop the other options "
                                f"({', '.join(sorted(given)) or '--config'}).")
        if (Path(ns.resume) / multirun.MULTI_FILE).is_file():
            return _print_many(multirun.resume_many(Path(ns.resume)))
        result = pipeline.resume(Path(ns.resume))
    else:
        values = C.load_config_file(ns.config) if ns.config else {}
        if "saes" in values:  # many SAEs from one model pass
            saes = values.pop("saes")
            values.update(_overrides(ns, C.TrainConfig))
            cfg = C.from_dict(C.TrainConfig, values, source=ns.config)
            return _print_many(multirun.train_many(cfg, saes))
        cfg = C.build_config(C.TrainConfig, config_file=ns.config, overrides=_overrides(ns, C.TrainConfig))
        result = pipeline.train(cfg)
    print(f"SAE saved to {result.sae_dir}")
    return 0


def _print_many(results) -> int:
    for r in results:
        print(f"SAE saved to {r.sae_dir}")
    return 0


def cmd_finetune(ns) -> int:
    from .runs import single as pipeline
    cfg = C.build_config(C.TrainConfig, config_file=ns.config, overrides=_overrides(ns, C.TrainConfig))
    result = pipeline.finetune(cfg)
    print(f"Fine-tuned SAE saved to {result.sae_dir}")
    return 0


def cmd_eval(ns) -> int:
    from .evaluation import HeldoutData, SAESet, eval_matrix
    from .runs.single import check_sae_source
    values = C.load_config_file(ns.config) if ns.config else {}
    values.update(_overrides(ns, C.EvalConfig))
    file_datasets = values.pop("datasets", None)
    values.pop("data", None)
    out = Path(ns.out or "eval_out")
    check_output_dir(out, "eval", option="--out")  # before any SAE or model is loaded
    for s in ns.saes:
        check_sae_source(s)
    # Null held-out options (model, context size, holdout_fraction, ...) are filled from the SAEs' metadata by the
    # evaluation API itself; an explicit --hook refuses SAEs trained at another hook.
    cfg = C.from_dict(C.EvalConfig, values, source=ns.config or "command line")
    C.check_finite_floats(cfg)
    data = HeldoutData.choose(ns.datasets or (None if ns.caches else file_datasets), ns.caches)
    eval_matrix(SAESet.load(ns.saes), data, cfg, out_dir=out)
    print(f"Wrote {out / 'eval.json'}, {out / 'eval.md'} and heatmaps in {out}"
          + (" (reconstruction metrics only)" if data.from_cache else ""))
    if ns.output_format == "saebench":
        _write_saebench_of_eval(out)
    return 0


def cmd_compare(ns) -> int:
    from .study import load_study_config
    cfg = load_study_config(ns.study_config)
    return _study(cfg, Path(ns.out or cfg.output_dir), f"dsae compare {ns.study_config}")


def cmd_demo(ns) -> int:
    from .study import load_study_config
    path = _bundled_config("study_quick.yaml" if ns.quick else "study_demo.yaml")
    cfg = load_study_config(path)
    rc = _study(cfg, Path(ns.out or cfg.output_dir), f"dsae demo{' --quick' if ns.quick else ''} ({path})")
    print("The rigorous version (matched L0, 3 seeds, prose+chat+code general corpus, two depths, gap-closed curve, "
          "baselines, sparse probing): dsae compare configs/study_full.yaml (docs/study.md)")
    return rc


def _study(cfg, out: Path, what: str) -> int:
    """Run (or, in its own output directory, resume) the study: the output rule first, then the engine."""
    from .study import estimate_minutes, run_study
    out = prepare_output_dir(out, "study", option="--out")
    print(f"{what}: estimated time about {estimate_minutes(cfg):.0f} minutes on 2 CPU cores; output in {out} (run "
          f"the same command again after a kill: it continues).", flush=True)
    results = run_study(cfg, out)
    print(f"Report: {results['report_html']}")
    return 0


def _bundled_config(name: str) -> Path:
    here = Path(__file__).resolve()
    for base in (here.parents[2] / "configs", here.parent / "configs"):
        if (base / name).is_file():
            return base / name
    raise C.ConfigError(f"Bundled config {name} not found next to the package.")


def _options_class(which: str):
    if which == "study":
        from .study.config import StudyConfig
        return StudyConfig
    return C.TrainConfig if which == "train" else C.EvalConfig


def cmd_options(ns) -> int:
    if ns.all:  # docs/options.md (tests/test_options_reference.py keeps the committed copy equal to this)
        from .config.reference import cli_reference_markdown
        tables = [("`dsae train` and `dsae finetune` (`dsae options train`)", _options_class("train")),
                  ("`dsae eval` (`dsae options eval`)", _options_class("eval")),
                  ("`dsae compare` and `dsae demo`: the study config (`dsae options study`)", _options_class("study"))]
        print(cli_reference_markdown(build_parser(), tables), end="")
        return 0
    print(C.config_reference_markdown(_options_class(ns.which)))
    return 0


COMMANDS = {"train": cmd_train, "finetune": cmd_finetune, "eval": cmd_eval, "compare": cmd_compare,
            "demo": cmd_demo, "options": cmd_options, "features": cmd_features, "dashboard": cmd_dashboard,
            "cache": cmd_cache, "export": cmd_export}


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


if __name__ == "__main__":
    sys.exit(main())
