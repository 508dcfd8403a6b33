"""The domain-adaptation study: general vs domain-from-scratch vs fine-tuned SAEs (`dsae compare`, `dsae demo`).

- :mod:`.config`  ``StudyConfig`` (one YAML/TOML file) and ``load_study_config``;
- :mod:`.plan`    stages, token counts and the time estimate printed before the study starts;
- :mod:`.inputs`  the general mixture source, held-out activation sets, the two prompt sets;
- :mod:`.run`     ``run_study(cfg, out_dir) -> results`` (every stage);
- :mod:`.report`  results.json, report.md, report.html (the answer first, plots embedded).

Heavy imports (torch, matplotlib) happen inside the functions that need them.
"""

from .config import StudyConfig, load_study_config
from .plan import estimate_minutes, study_plan

__all__ = ["StudyConfig", "load_study_config", "estimate_minutes", "study_plan", "run_study", "write_report"]


def run_study(cfg, out_dir=None, **kwargs):
    """See :func:`domain_sae.study.run.run_study`."""
    from .run import run_study as _run
    return _run(cfg, out_dir, **kwargs)


def write_report(results, out):
    """See :func:`domain_sae.study.report.write_report`."""
    from .report import write_report as _write
    return _write(results, out)
