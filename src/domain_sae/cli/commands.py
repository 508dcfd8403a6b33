"""The commands of `dsae`: each a thin call into a library function (parsed options in, files and one line out)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from .. import config as C
from ..util.outdirs import check_output_dir, prepare_output_dir
from .parsers import build_parser


def _overrides(ns: argparse.Namespace, cls) -> dict:
    names = {f for f in cls.__dataclass_fields__}
    return {k: v for k, v in vars(ns).items() if k in names and v is not None}


def cmd_export(ns) -> int:
    if ns.export_kind == "neuronpedia":
        from ..features.neuronpedia import export_neuronpedia
        man = export_neuronpedia(ns.store, Path(ns.out), saes=ns.saes, model_id=ns.model_id, source=ns.source,
                                 overwrite=ns.overwrite)
        for s in man["sources"]:
            print(f"{s['sae']}: {s['features']} latents in {len(s['files'])} file(s) under {Path(ns.out) / s['source']}"
                  f" (modelId {man['modelId']}, source {s['source']}; {len(s['left_out_never_fired'])} never-fired "
                  f"latents left out)")
        return 0
    from ..evaluation.saebench import write_saebench
    files = write_saebench(Path(ns.eval_json), Path(ns.out), overwrite=ns.overwrite)
    print(f"Wrote {len(files)} SAEBench core result(s) to {Path(ns.out) / 'core'}")
    return 0


def _write_saebench_of_eval(out: Path) -> None:
    from ..evaluation.saebench import write_saebench
    files = write_saebench(out / "eval.json", out / "saebench", overwrite=True)
    print(f"Wrote {len(files)} SAEBench core result(s) to {out / 'saebench' / 'core'}")


def cmd_cache(ns) -> int:
    from ..activations.hook_cache import build_cache
    from ..runs.single import load_lm
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
    from ..evaluation import HeldoutData, SAESet
    from ..features.build import build_feature_store
    from ..features.options import FeatureOptions
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(FeatureOptions)
              if getattr(ns, f.name, None) is not None}
    data = HeldoutData.choose(ns.datasets, ns.caches)
    out = build_feature_store(SAESet.load(ns.saes), data, ns.out, n_tokens=ns.tokens,
                              cfg=C.EvalConfig(model=ns.model, hook=ns.hook), device=ns.device,
                              options=FeatureOptions(**values), overwrite=ns.overwrite)
    print(f"Feature store: {out}. View it with: dsae dashboard {out}")
    return 0


def cmd_dashboard(ns) -> int:
    from ..dashboard import serve
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
    from ..training import distributed
    try:
        return _train(ns)
    finally:
        distributed.shutdown()  # under torchrun: every rank leaves the process group together


def _train(ns) -> int:
    from ..runs import many as multirun, single as pipeline
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
    from ..runs import single as pipeline
    cfg = C.build_config(C.TrainConfig, config_file=ns.config, overrides=_overrides(ns, C.TrainConfig))
    result = pipeline.finetune(cfg)
    print(f"Fine-tuned SAE saved to {result.sae_dir}")
    return 0


def cmd_eval(ns) -> int:
    from ..evaluation import HeldoutData, SAESet, eval_matrix
    from ..runs.single import check_sae_source
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
    from ..study import load_study_config
    cfg = load_study_config(ns.study_config)
    return _study(cfg, Path(ns.out or cfg.output_dir), f"dsae compare {ns.study_config}")


def cmd_demo(ns) -> int:
    from ..study import load_study_config
    path = _bundled_config("study_quick.yaml" if ns.quick else "study_demo.yaml")
    cfg = load_study_config(path)
    rc = _study(cfg, Path(ns.out or cfg.output_dir), f"dsae demo{' --quick' if ns.quick else ''} ({path})")
    print("The rigorous version (matched L0, 3 seeds, prose+chat+code general corpus, two depths, gap-closed curve, "
          "baselines, sparse probing): dsae compare configs/study_full.yaml (docs/study.md)")
    return rc


def _study(cfg, out: Path, what: str) -> int:
    """Run (or, in its own output directory, resume) the study: the output rule first, then the engine."""
    from ..study import estimate_minutes, run_study
    out = prepare_output_dir(out, "study", option="--out")
    print(f"{what}: estimated time about {estimate_minutes(cfg):.0f} minutes on 2 CPU cores; output in {out} (run "
          f"the same command again after a kill: it continues).", flush=True)
    results = run_study(cfg, out)
    print(f"Report: {results['report_html']}")
    return 0


def _bundled_config(name: str) -> Path:
    here = Path(__file__).resolve()
    for base in (here.parents[3] / "configs", here.parents[1] / "configs"):  # the checkout, then the package
        if (base / name).is_file():
            return base / name
    raise C.ConfigError(f"Bundled config {name} not found next to the package.")


def _options_class(which: str):
    if which == "study":
        from ..study.config import StudyConfig
        return StudyConfig
    return C.TrainConfig if which == "train" else C.EvalConfig


def cmd_options(ns) -> int:
    if ns.all:  # docs/options.md (tests/test_options_reference.py keeps the committed copy equal to this)
        from ..config.reference import cli_reference_markdown
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
