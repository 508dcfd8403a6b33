"""Where training metrics go: a JSONL file (the record of the run), a live console line, Weights & Biases.

Every logger has ``log(step, metrics)``, ``resume(step, tokens)`` (called when a run continues from a checkpoint taken
after ``step`` optimizer steps) and ``close()``. ``step`` is the number of optimizer steps completed.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Optional

from ..errors import UserError
from ..util.atomic import atomic_write_text
from ..util.jsonsafe import jsonable

__all__ = ["Logger", "JSONLLogger", "ConsoleProgress", "WandbLogger", "MultiLogger", "WandbNotInstalledError",
           "read_jsonl", "default_loggers", "METRICS_FILE"]

METRICS_FILE = "metrics.jsonl"


class WandbNotInstalledError(UserError):
    """wandb logging was asked for but the package is missing."""


class Logger:
    """Base class: all hooks are no-ops."""

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        pass

    def resume(self, step: int, tokens: int = 0) -> None:
        pass

    def close(self) -> None:
        pass


def read_jsonl(path: str | Path) -> list[dict]:
    """All records of a JSONL log (a torn last line from a crash is ignored)."""
    out = []
    p = Path(path)
    if not p.is_file():
        return out
    for line in p.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break  # only the last line can be torn (written by a killed process)
    return out


class JSONLLogger(Logger):
    """One JSON object per ``log`` call: ``{"step": step, <metric>: value, ...}`` with the SPEC 3 key names;
    flushed (and fsync'ed) each time so that a killed run loses nothing it logged."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = None

    def _file(self):
        if self._f is None:
            self._f = open(self.path, "a")
        return self._f

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        rec = {"step": int(step), **{k: jsonable(v, clamp_inf=True) for k, v in metrics.items()}}
        f = self._file()
        f.write(json.dumps(rec) + "\n")
        f.flush()
        os.fsync(f.fileno())

    def truncate_after(self, step: int) -> None:
        """Drop records with ``step`` greater than ``step`` (atomically), so that a resumed run's log equals an
        uninterrupted one. ``truncate_after(0)`` empties the log for a fresh start."""
        self.close()
        keep = [r for r in read_jsonl(self.path) if int(r.get("step", 0)) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))

    def resume(self, step: int, tokens: int = 0) -> None:
        self.truncate_after(step)

    def records(self) -> list[dict]:
        return read_jsonl(self.path)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


class ConsoleProgress(Logger):
    """A live progress line (tqdm): tokens, tokens/s, ETA, and the latest mse, L0 and explained variance."""

    def __init__(self, total_tokens: int, *, disable: Optional[bool] = None, file=None, desc: str = "training",
                 plain_every_s: float = 15.0):
        from tqdm.auto import tqdm
        self._file = file or sys.stderr
        self._bar = tqdm(total=int(total_tokens), unit="tok", unit_scale=True, dynamic_ncols=True, desc=desc,
                         disable=disable, file=self._file, smoothing=0.1)
        self._tokens = 0
        self._total = int(total_tokens)
        self._desc = desc
        # Not a terminal (CI, nohup, a pipe): tqdm stays silent, so print a plain line every ``plain_every_s``.
        is_tty = getattr(self._file, "isatty", lambda: False)()
        self._plain = disable is None and not is_tty
        self._plain_every = plain_every_s
        self._t0 = self._last_plain = time.monotonic()
        self._tokens0 = 0

    def _plain_line(self, step: int, post: dict) -> None:
        now = time.monotonic()
        if now - self._last_plain < self._plain_every and self._tokens < self._total:
            return
        self._last_plain = now
        rate = (self._tokens - self._tokens0) / max(now - self._t0, 1e-9)
        eta = (self._total - self._tokens) / rate if rate > 0 else float("nan")
        extra = " ".join(f"{k}={v}" for k, v in post.items() if k != "step")
        print(f"[{self._desc}] step {step} {self._tokens:,}/{self._total:,} tok "
              f"({100 * self._tokens / max(self._total, 1):.0f}%) {rate:,.0f} tok/s ETA {eta:,.0f}s {extra}",
              file=self._file, flush=True)

    def _advance(self, tokens: int) -> None:
        if tokens > self._tokens:
            self._bar.update(tokens - self._tokens)
            self._tokens = tokens

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self._advance(int(metrics.get("details/n_training_tokens", self._tokens)))
        post = {}
        for key, short, fmt in [("losses/kl_loss", "kl", "{:.4g}"), ("losses/mse_loss", "mse", "{:.4g}"),
                                ("metrics/l0", "L0", "{:.1f}"),
                                ("metrics/explained_variance", "EV", "{:.3f}"),
                                ("sparsity/dead_features", "dead", "{}")]:
            if key in metrics and metrics[key] is not None:
                post[short] = fmt.format(metrics[key])
        post["step"] = step
        self._bar.set_postfix(post, refresh=True)
        if self._plain:
            self._plain_line(step, post)

    def resume(self, step: int, tokens: int = 0) -> None:
        """Start the bar at the restored token count (tokens/s and ETA then count only this session)."""
        self._bar.reset(total=self._bar.total)
        self._bar.initial = self._bar.n = self._tokens = self._tokens0 = int(tokens)
        self._t0 = time.monotonic()
        self._bar.refresh()

    def close(self) -> None:
        self._bar.close()


class WandbLogger(Logger):
    """Weights & Biases logging (optional dependency). ``mode="offline"`` needs no account: sync later with
    ``wandb sync``. W&B cannot drop logged points, so a resumed run continues the same W&B run id."""

    def __init__(self, project: str, *, name: Optional[str] = None, config: Optional[dict] = None,
                 mode: str = "offline", dir: Optional[str | Path] = None, run_id: Optional[str] = None):
        try:
            import wandb
        except ImportError:
            raise WandbNotInstalledError(
                "Logging to Weights & Biases needs the wandb package: pip install 'domain-sae[wandb]' (or turn "
                "off --wandb).") from None
        self._wandb = wandb
        self._run = wandb.init(project=project, name=name, config=config, mode=mode,
                               dir=str(dir) if dir else None, id=run_id, resume="allow" if run_id else None)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self._run.log({k: jsonable(v, clamp_inf=True) for k, v in metrics.items()}, step=int(step))

    def close(self) -> None:
        self._run.finish()


class MultiLogger(Logger):
    """Sends every call to each of ``loggers``."""

    def __init__(self, loggers: Iterable[Logger] = ()):
        self.loggers = [lg for lg in loggers if lg is not None]

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        for lg in self.loggers:
            lg.log(step, metrics)

    def resume(self, step: int, tokens: int = 0) -> None:
        for lg in self.loggers:
            lg.resume(step, tokens)

    def close(self) -> None:
        for lg in self.loggers:
            lg.close()

    def find(self, cls: type) -> Optional[Logger]:
        for lg in self.loggers:
            if isinstance(lg, cls):
                return lg
            if isinstance(lg, MultiLogger):
                found = lg.find(cls)
                if found is not None:
                    return found
        return None


def default_loggers(run_dir: str | Path, cfg, *, console: Optional[bool] = None) -> MultiLogger:
    """metrics.jsonl in the run directory, the console line, and W&B when ``cfg.wandb``."""
    run_dir = Path(run_dir)
    loggers: list[Logger] = [JSONLLogger(run_dir / METRICS_FILE)]
    loggers.append(ConsoleProgress(cfg.training_tokens, disable=None if console is None else not console))
    if getattr(cfg, "wandb", False):
        from ..config import to_dict
        id_file = run_dir / "wandb_run_id.txt"
        run_id = id_file.read_text().strip() if id_file.is_file() else None
        if run_id is None:
            run_id = f"{run_dir.name[:40]}-{int(time.time())}"
            run_dir.mkdir(parents=True, exist_ok=True)
            id_file.write_text(run_id)
        run_id = "".join(c if c.isalnum() or c in "-_" else "-" for c in run_id)
        loggers.append(WandbLogger(cfg.wandb_project, name=cfg.run_name or run_dir.name, config=to_dict(cfg),
                                   mode=cfg.wandb_mode, dir=run_dir, run_id=run_id))
    return MultiLogger(loggers)
