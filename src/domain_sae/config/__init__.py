"""Options: every option a documented dataclass field (:mod:`.options`), file and command-line parsing and the
generated reference (:mod:`.parse`), architecture and fast-path options (:mod:`.architecture`), the field helper
(:mod:`.fields`)."""

from .options import (DEFAULT_MODEL, ConfigError, DataConfig, EvalConfig, SAEConfig, TrainConfig, add_arguments,
                      argparse_suppress, build_config, check_finite_floats, coerce, config_reference_markdown,
                      from_dict, load_config_file, opt, to_dict)

__all__ = ["ConfigError", "DataConfig", "SAEConfig", "TrainConfig", "EvalConfig", "DEFAULT_MODEL", "add_arguments",
           "argparse_suppress", "build_config", "check_finite_floats", "coerce", "config_reference_markdown",
           "from_dict", "load_config_file", "to_dict", "opt"]
