"""The terminal of every verb: vlmtax's own lines there, the libraries' logs, warnings and bars in a log file.

transformers, PEFT, TRL, accelerate, datasets and torch each print their own notices, tqdm bars and (the
Trainer) raw metric dicts; on a terminal they drown vlmtax's progress lines and tables. While a verb runs,
`library_output(LOG)` sends the libraries' log records and warnings to LOG (sft: `train.log` in the run dir)
and turns their progress bars off; vlmtax's own warnings stay on the terminal as one `warning:` line each,
once. `--verbose` (VLMTAX_VERBOSE=1, inherited by launched ranks) leaves everything as the libraries print it.
Warning *filters* are never changed here: a test suite that turns library deprecations into errors still does.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

TRAIN_LOG = "train.log"  # in the run dir: the libraries' output and every logged metric dict of a training run
LIBRARY_LOGGERS = ("transformers", "peft", "trl", "accelerate", "datasets", "torch", "huggingface_hub", "timm")
_PACKAGE_DIR = str(Path(__file__).resolve().parent)


def verbose() -> bool:
    return os.environ.get("VLMTAX_VERBOSE", "") not in ("", "0", "false")


def set_verbose(on: bool) -> None:
    """`--verbose`: an environment variable, so that ranks started by `accelerate launch` inherit it."""
    if on:
        os.environ["VLMTAX_VERBOSE"] = "1"


class _LazyLog:
    """The log file, opened (and its folder made) on the first line written: a run that logs nothing, or
    fails its input checks first, leaves no file behind."""

    def __init__(self, path: Path, mode: str):
        self.path, self.mode, self._file, self.lines = path, mode, None, 0

    def write(self, text: str) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, self.mode, encoding="utf-8")  # noqa: SIM115 - closed by close()
        self._file.write(text if text.endswith("\n") else text + "\n")
        self._file.flush()
        self.lines += 1

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class _Handler(logging.Handler):
    def __init__(self, log: _LazyLog):
        super().__init__(logging.DEBUG)
        self.log = log
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.log.write(self.format(record))
        except Exception:  # a log line must never end a run
            self.handleError(record)


def _own(filename: str) -> bool:
    return str(Path(filename).resolve()).startswith(_PACKAGE_DIR)


@contextlib.contextmanager
def library_output(log_path: str | Path, stream: TextIO | None = None, mode: str = "a") -> Iterator[_LazyLog | None]:
    """While inside: library log records and warnings go to `log_path` (appended, or `mode="w"`: this run's
    alone), library progress bars are off, and vlmtax's own warnings print once as `warning: ...` on `stream`
    (stderr). Everything is restored after; nested calls (the demo's sft) write their own file meanwhile."""
    if verbose():
        yield None
        return
    from transformers.utils import logging as hf_logging

    hf_logging.get_logger("transformers")  # transformers adds its stderr handler on first use: before ours, then
    log = _LazyLog(Path(log_path), mode)
    handler = _Handler(log)
    saved = []
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.handlers[:], logger.propagate))
        logger.handlers, logger.propagate = [handler], False
    bars = _library_bars(False)
    shown: set[str] = set()
    previous = warnings.showwarning

    def show(message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None,
             line: str | None = None) -> None:
        if _own(filename):
            text = str(message)
            if text not in shown:
                shown.add(text)
                print(f"warning: {text}", file=stream or sys.stderr)
            return
        log.write(f"{category.__name__} ({filename}:{lineno}): {message}")

    warnings.showwarning = show
    try:
        yield log
    finally:
        warnings.showwarning = previous
        _library_bars(bars)
        for logger, handlers, propagate in saved:
            logger.handlers, logger.propagate = handlers, propagate
        log.close()


def command_log(verb: str) -> Path:
    """Where a CLI verb's library output goes when it has no run dir: the user cache, one file per verb."""
    from vlmtax.fileio import cache_dir

    return cache_dir() / "logs" / f"{verb}.log"


def _library_bars(enable: bool) -> bool:
    """Turn the libraries' own progress bars on or off; returns whether transformers' were on before."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enable else hf_logging.disable_progress_bar)()
    try:
        import datasets

        (datasets.enable_progress_bars if enable else datasets.disable_progress_bars)()
    except ImportError:
        pass
    return before
