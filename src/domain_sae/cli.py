"""`dsae`: the command-line shell over the library (every command is a thin call into a library function).

    dsae train    [--config FILE] [--OPTION VALUE ...] [--resume RUN_DIR]
    dsae finetune --from SOURCE --data DOMAIN [--config FILE] [--OPTION VALUE ...]
    dsae eval     SAE_DIR [SAE_DIR ...] --data chat --data code [--tokens N] [--out DIR]
    dsae compare  STUDY_CONFIG [--out DIR]
    dsae demo     [--quick] [--out DIR]
    dsae options  [train|eval|study]        print the option reference (Markdown)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional

from . import config as C


def _env_defaults() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _overrides(ns: argparse.Namespace, cls) -> dict:
    names = {f for f in cls.__dataclass_fields__}
    return {k: v for k, v in vars(ns).items() if k in names and v is not None}


def _train_parser(sub, name: str, help_: str, *, finetune: bool):
    p = sub.add_parser(name, help=help_, description=help_,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter if False else argparse.HelpFormatter)
    p.add_argument("--config", help="YAML or TOML file of options (CLI flags override it).")
    if not finetune:
        p.add_argument("--resume", metavar="RUN_DIR", help="Continue a killed or interrupted run from its latest "
                                                           "checkpoint (all other options come from the run).")
    skip = () if finetune else ("from_sae", "keep_optimizer")
    C.add_arguments(p, C.TrainConfig, skip=skip)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsae", description="Train, fine-tune, evaluate and compare sparse "
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
    C.add_arguments(ev, C.EvalConfig, skip=("data", "model", "hook", "context_size", "prepend_bos"))
    ev.add_argument("--data", action="append", dest="datasets", metavar="DATA",
                    help="Dataset to evaluate on (repeatable): chat, code, a file or a hub id. Default: chat and code.")
    ev.add_argument("--model", default=None, help="Language model (default: the SAE's metadata model_name).")
    ev.add_argument("--hook", default=None, help="Hook point (default: the SAE's metadata hook_name).")
    ev.add_argument("--context-size", dest="context_size", default=None,
                    help="Tokens per sequence (default: the SAE's training context size).")
    ev.add_argument("--prepend-bos", dest="prepend_bos", default=None, metavar="BOOL")

    cmp_ = sub.add_parser("compare", help="Run the domain-adaptation study described by a config file.")
    cmp_.add_argument("study_config", help="Study config (YAML/TOML), e.g. configs/study_demo.yaml.")
    cmp_.add_argument("--out", default=None, help="Output directory (default: from the config).")

    demo = sub.add_parser("demo", help="The whole study, CPU-sized, on the offline default (SmolLM2 + chat + code).")
    demo.add_argument("--quick", action="store_true", help="Smoke-sized version (about 5 minutes).")
    demo.add_argument("--out", default=None, help="Output directory (default: demo_out).")

    opts = sub.add_parser("options", help="Print the option reference as Markdown.")
    opts.add_argument("which", nargs="?", default="train", choices=["train", "eval", "study"])
    return parser


def cmd_train(ns) -> int:
    from . import pipeline
    if ns.resume:
        given = {k for k, v in _overrides(ns, C.TrainConfig).items()}
        if given or ns.config:
            raise C.ConfigError("--resume takes its options from the run directory; drop the other options "
                                f"({', '.join(sorted(given)) or '--config'}).")
        result = pipeline.resume(Path(ns.resume))
    else:
        cfg = C.build_config(C.TrainConfig, config_file=ns.config, overrides=_overrides(ns, C.TrainConfig))
        result = pipeline.train(cfg)
    print(f"SAE saved to {result.sae_dir}")
    return 0


def cmd_finetune(ns) -> int:
    from . import pipeline
    cfg = C.build_config(C.TrainConfig, config_file=ns.config, overrides=_overrides(ns, C.TrainConfig))
    result = pipeline.finetune(cfg)
    print(f"Fine-tuned SAE saved to {result.sae_dir}")
    return 0


def cmd_eval(ns) -> int:
    from .evaluation.runner import eval_matrix
    from .sae.io import load_sae
    values = C.load_config_file(ns.config) if ns.config else {}
    values.update(_overrides(ns, C.EvalConfig))
    datasets = ns.datasets or values.pop("datasets", None) or ["chat", "code"]
    values.pop("data", None)
    given_hook = values.get("hook")
    first = load_sae(ns.saes[0]).cfg.metadata or {}
    # Defaults from the SAE's training run, so that "held-out" means the split that run set aside.
    for key, meta_key in [("model", "model_name"), ("hook", "hook_name"), ("context_size", "context_size"),
                          ("prepend_bos", "prepend_bos"), ("holdout_fraction", "holdout_fraction")]:
        if values.get(key) is None and first.get(meta_key) is not None:
            values[key] = first[meta_key]
    cfg = C.from_dict(C.EvalConfig, values, source=ns.config or "command line")
    out = Path(ns.out or "eval_out")
    # An explicit --hook is enforced (SAEs trained elsewhere are refused); otherwise each SAE uses its own hook.
    results = eval_matrix([Path(s) for s in ns.saes], datasets, cfg, out_dir=out, hook=given_hook)
    print(f"Wrote {out / 'eval.json'}, {out / 'eval.md'} and heatmaps in {out}")
    return 0 if results is not None else 1


def cmd_compare(ns) -> int:
    from .study.config import load_study_config
    from .study.full_config import is_full_config, load_full_config
    from .study.run import estimate_minutes, run_study
    if is_full_config(C.load_config_file(ns.study_config)):  # the rigorous study (configs/study_full.yaml)
        from .study.full import run_full_study
        results = run_full_study(load_full_config(ns.study_config), Path(ns.out) if ns.out else None)
        print(f"Report: {results['report_md']}")
        return 0
    cfg = load_study_config(ns.study_config)
    out = Path(ns.out) if ns.out else None
    print(f"Estimated time: about {estimate_minutes(cfg):.0f} minutes on this machine.", flush=True)
    results = run_study(cfg, out)
    print(f"Report: {results.get('report_html', out)}")
    return 0


def cmd_demo(ns) -> int:
    from .study.config import load_study_config
    from .study.run import estimate_minutes, run_study
    name = "study_quick.yaml" if ns.quick else "study_demo.yaml"
    path = _bundled_config(name)
    cfg = load_study_config(path)
    out = Path(ns.out or ("demo_out/quick" if ns.quick else "demo_out/full"))
    print(f"dsae demo{' --quick' if ns.quick else ''}: {path}; estimated time: about {estimate_minutes(cfg):.0f} "
          f"minutes on this machine.", flush=True)
    results = run_study(cfg, out)
    print(f"Report: {results.get('report_html', out)}")
    print("The rigorous version (matched L0, 3 seeds, prose+chat+code general corpus, two depths, gap-closed curve, "
          "baselines, sparse probing; resumable): dsae compare configs/study_full.yaml")
    return 0


def _bundled_config(name: str) -> Path:
    here = Path(__file__).resolve()
    for base in (here.parents[2] / "configs", here.parent / "configs"):
        if (base / name).is_file():
            return base / name
    raise C.ConfigError(f"Bundled config {name} not found next to the package.")


def cmd_options(ns) -> int:
    if ns.which == "study":
        from .study.config import StudyConfig
        print(C.config_reference_markdown(StudyConfig))
    else:
        print(C.config_reference_markdown(C.TrainConfig if ns.which == "train" else C.EvalConfig))
    return 0


COMMANDS = {"train": cmd_train, "finetune": cmd_finetune, "eval": cmd_eval, "compare": cmd_compare,
            "demo": cmd_demo, "options": cmd_options}


def main(argv: Optional[list[str]] = None) -> int:
    _env_defaults()
    ns = build_parser().parse_args(argv)
    from .errors import user_error_types
    try:
        return COMMANDS[ns.command](ns)
    except user_error_types() as e:
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
