"""The domain-adaptation study: general vs domain-from-scratch vs fine-tuned SAEs (`dsae compare`, `dsae demo`).

- :mod:`.config`    ``StudyConfig`` (one YAML/TOML file; shared options inherited from TrainConfig/EvalConfig),
                    ``load_study_config`` and the schedule of every study SAE (``study_schedule``);
- :mod:`.plan`      stages, token counts and the time estimate printed before the study starts;
- :mod:`.inputs`    held-out activation sets (and their general mix), the two prompt sets;
- :mod:`.prepare`   stage 1: model, activation caches, held-out sets (``StudyInputs``), the stage timer;
- :mod:`.saes`      stages 2 and 4: training the SAEs from the caches, the token-efficiency ladder;
- :mod:`.measures`  stages 3, 5-7: matrix, overlap, directions, steering (each returns a typed result);
- :mod:`.run`       ``run_study(cfg, out_dir) -> results`` (every stage, results.json assembled);
- :mod:`.findings`, :mod:`.figures`, :mod:`.sections`, :mod:`.document`, :mod:`.report`: the report (numbers and
  answer, plots, the document and its Markdown/HTML renderers, writing the files).
"""

from .config import StudyConfig, load_study_config
from .plan import estimate_minutes, study_plan
from .report import write_report
from .run import run_study

__all__ = ["StudyConfig", "load_study_config", "estimate_minutes", "study_plan", "run_study", "write_report"]
