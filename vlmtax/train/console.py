"""What training shows on the terminal, for both routes: one compact live line instead of the Trainer's output.

The Trainer prints a tqdm bar and a raw Python dict per log step and per evaluation (`{'loss': '0.372', ...}`).
`attach(trainer)` takes its printer and progress callbacks off and puts `LiveLine` in their place: on a terminal
one rich bar with step, loss, learning rate, validation loss/score and time left; elsewhere (CI, a pipe) one
plain line per evaluation or epoch, at most one every `every` seconds, and the last. Every log dict still
lands, as one JSON line, in the run dir's `train.log`.
`--verbose` keeps the Trainer's own output instead.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from vlmtax.progress import make_progress, progress_enabled
from vlmtax.runlog import TRAIN_LOG, verbose


def _fmt(value: Any) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return str(value)
    if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e4):
        return f"{value:.2e}"
    return f"{value:.4g}"


def summary(latest: dict[str, Any]) -> str:
    """`loss 0.372  lr 2.30e-03  val loss 0.41  val score 0.66`: the figures a user watches, where logged."""
    names = (("loss", "loss"), ("learning_rate", "lr"), ("eval_loss", "val loss"), ("eval_score", "val score"))
    return "  ".join(f"{label} {_fmt(latest[key])}" for key, label in names if key in latest)


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 60}:{seconds % 60:02d}"


class LiveLine(TrainerCallback):
    """The run's one line on the terminal (main process only) and its log dicts in `train.log`."""

    def __init__(self, stream: Any = None, every: float = 10.0):
        self.stream, self.every = stream, every
        self.latest: dict[str, Any] = {}
        self.bar, self.task, self.started, self.first_step = None, None, 0.0, 0
        self.printed_at, self.printed_step = float("-inf"), -1

    def _main(self, state: Any) -> bool:
        return bool(state.is_world_process_zero)

    def on_train_begin(self, args, state, control, **kwargs):
        if not self._main(state):
            return
        self.started, self.first_step = time.perf_counter(), state.global_step
        if progress_enabled():
            self.bar = make_progress()
            self.bar.start()
            self.task = self.bar.add_task("sft", total=state.max_steps, completed=state.global_step, rate="")

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(self.task, completed=state.global_step, rate=summary(self.latest))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self._main(state) or not logs:
            return
        self.latest.update({k: v for k, v in logs.items() if isinstance(v, (int, float)) and math.isfinite(v)})
        with open(Path(args.output_dir) / TRAIN_LOG, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": state.global_step, **logs}, default=str) + "\n")
        if self.bar is not None:
            self.bar.update(self.task, completed=state.global_step, rate=summary(self.latest))
        elif "eval_loss" in logs or "eval_score" in logs:
            self._line(state)

    def on_epoch_end(self, args, state, control, **kwargs):
        if self._main(state) and self.bar is None and str(args.eval_strategy) in ("no", "IntervalStrategy.NO"):
            self._line(state)

    def _line(self, state: Any, last: bool = False) -> None:
        now = time.perf_counter()
        if (not last and now - self.printed_at < self.every) or (last and self.printed_step == state.global_step):
            return
        self.printed_at, self.printed_step = now, state.global_step
        done = state.global_step - self.first_step
        elapsed = time.perf_counter() - self.started
        left = elapsed / done * (state.max_steps - state.global_step) if done else 0.0
        epoch = f"epoch {state.epoch:.0f}/{state.num_train_epochs}" if state.epoch is not None else ""
        print(f"sft: {epoch} step {state.global_step}/{state.max_steps}  {summary(self.latest)}  "
              f"{_clock(elapsed)} elapsed, {_clock(left)} left", file=self.stream or sys.stderr, flush=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self._main(state) and self.bar is None and self.started:
            self._line(state, last=True)
        if self.bar is not None:
            self.bar.update(self.task, completed=state.global_step, rate=summary(self.latest))
            self.bar.stop()
            self.bar = None


def attach(trainer: Any) -> None:
    """Swap the Trainer's printed dicts and tqdm bar for `LiveLine` (unless --verbose)."""
    if verbose():
        return
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(LiveLine())


def quiet_args() -> dict[str, Any]:
    """TrainingArguments that keep the Trainer's tqdm bars off (unless --verbose)."""
    return {} if verbose() else {"disable_tqdm": True}
