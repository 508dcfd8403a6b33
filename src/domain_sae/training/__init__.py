"""SAE training: schedules, sparsity statistics, atomic checkpoints, loggers, plots and the Trainer loop."""

from .checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from .loggers import ConsoleProgress, JSONLLogger, MultiLogger, WandbLogger, default_loggers, read_jsonl
from .plots import plot_training_curves, summary_table
from .schedules import l1_at, lr_at
from .sparsity import SparsityTracker
from .trainer import Trainer, TrainingInterrupted

__all__ = [
    "Trainer", "TrainingInterrupted", "lr_at", "l1_at", "SparsityTracker", "save_checkpoint", "load_checkpoint",
    "latest_checkpoint", "CheckpointError", "JSONLLogger", "ConsoleProgress", "WandbLogger", "MultiLogger",
    "default_loggers", "read_jsonl", "plot_training_curves", "summary_table",
]
