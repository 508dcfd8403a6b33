"""The domain-adaptation study: general vs domain-from-scratch vs fine-tuned SAEs (`dsae compare`, `dsae demo`), one
engine for the demo and the rigorous study (docs/study.md).

- :mod:`.config`    ``StudyConfig`` (one YAML/TOML file), ``load_study_config``, the schedule of every study SAE;
- :mod:`.runs`      runs as data (kind, domain, seed, sparsity, budget), the plan, the resumable SAE store;
- :mod:`.inputs`    multi-hook activation caches, held-out sets, probing sets (labels from the data), prompts;
- :mod:`.measure`   reconstruction and model-pass measurements of every run, cached per run;
- :mod:`.findings`  comparisons at matched sparsity, gap-closed curves, the answer in at most five sentences;
- :mod:`.analyses`  matrix, overlap, probing, directions, steering, feature store (each a function of the runs);
- :mod:`.plan`      the plan and time estimate printed first; :mod:`.engine` ``run_study(cfg, out)``;
- :mod:`.report`, :mod:`.sections`, :mod:`.figures`, :mod:`.document`: results.json, report.md/html, figures.
"""

from .config import StudyConfig, StudyError, load_study_config
from .engine import run_study
from .plan import estimate_minutes
from .report import render_from_json, write_report

__all__ = ["StudyConfig", "StudyError", "load_study_config", "run_study", "estimate_minutes", "write_report",
           "render_from_json"]
