"""vlmtax.train.console: one compact line per evaluation instead of the Trainer's dicts; dicts in train.log."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

from transformers.trainer_callback import PrinterCallback, ProgressCallback

from vlmtax.train import console as train_console
from vlmtax.train.steps import planned_max_steps


def _state(step: int, epoch: float) -> SimpleNamespace:
    return SimpleNamespace(is_world_process_zero=True, global_step=step, max_steps=40, epoch=epoch,
                           num_train_epochs=4)


def _started(tmp_path, monkeypatch, eval_strategy: str, every: float):
    """A LiveLine off a terminal, printing into a buffer, after on_train_begin: (line, args, buffer)."""
    monkeypatch.setenv("VLMTAX_PROGRESS", "0")
    out = io.StringIO()
    line = train_console.LiveLine(stream=out, every=every)
    args = SimpleNamespace(output_dir=str(tmp_path), eval_strategy=eval_strategy)
    line.on_train_begin(args, _state(0, 0.0), None)
    return line, args, out


def test_one_line_per_evaluation_and_every_dict_in_train_log(tmp_path, monkeypatch):
    line, args, out = _started(tmp_path, monkeypatch, "epoch", 0)
    line.on_log(args, _state(5, 0.5), None, logs={"loss": 0.372, "grad_norm": 2.4, "learning_rate": 0.0023})
    assert out.getvalue() == ""  # a training log step prints nothing
    line.on_log(args, _state(10, 1.0), None, logs={"eval_loss": 0.41, "eval_runtime": 0.2})
    line.on_log(args, _state(10, 1.0), None, logs={"eval_score": 0.66})
    printed = out.getvalue().splitlines()
    head = "sft: epoch 1/4 step 10/40  loss 0.372  lr 2.30e-03"
    assert len(printed) == 2 and all(p.startswith(head) for p in printed)
    assert "val loss 0.41" in printed[0] and "val score 0.66" in printed[1]
    assert "{" not in out.getvalue()
    logged = [json.loads(x) for x in (tmp_path / "train.log").read_text().splitlines()]
    assert logged[0] == {"step": 5, "loss": 0.372, "grad_norm": 2.4, "learning_rate": 0.0023}
    assert [x["step"] for x in logged] == [5, 10, 10]


def test_without_evaluation_a_line_per_epoch(tmp_path, monkeypatch):
    line, args, out = _started(tmp_path, monkeypatch, "no", 0)
    line.on_log(args, _state(10, 1.0), None, logs={"loss": 1.5})
    line.on_epoch_end(args, _state(10, 1.0), None)
    assert out.getvalue().startswith("sft: epoch 1/4 step 10/40  loss 1.5  ")


def test_off_a_terminal_lines_are_spaced_and_the_last_always_shows(tmp_path, monkeypatch):
    line, args, out = _started(tmp_path, monkeypatch, "epoch", 3600)
    for step in (10, 20, 30, 40):
        line.on_log(args, _state(step, step / 10), None, logs={"eval_loss": 1.0 / step})
    line.on_train_end(args, _state(40, 4.0), None)
    printed = out.getvalue().splitlines()
    assert [p.split("  ")[0] for p in printed] == ["sft: epoch 1/4 step 10/40", "sft: epoch 4/4 step 40/40"]


class _Trainer:
    def __init__(self):
        self.callbacks = [PrinterCallback(), ProgressCallback()]

    def remove_callback(self, kind):
        self.callbacks = [c for c in self.callbacks if not isinstance(c, kind)]

    def add_callback(self, cb):
        self.callbacks.append(cb)


def test_attach_swaps_the_trainers_printers_unless_verbose(monkeypatch):
    monkeypatch.delenv("VLMTAX_VERBOSE", raising=False)
    trainer = _Trainer()
    train_console.attach(trainer)
    assert [type(c) for c in trainer.callbacks] == [train_console.LiveLine]
    assert train_console.quiet_args() == {"disable_tqdm": True}
    monkeypatch.setenv("VLMTAX_VERBOSE", "1")
    trainer = _Trainer()
    train_console.attach(trainer)
    assert [type(c) for c in trainer.callbacks] == [PrinterCallback, ProgressCallback]
    assert train_console.quiet_args() == {}


def test_min_steps_raises_the_budget_on_a_small_catalogue(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    t = SimpleNamespace(max_steps=None, min_steps=300, epochs=8, batch_size=32, grad_accum=1)
    assert planned_max_steps(t, 540) == 300  # 17 steps an epoch x 8 = 136 < 300
    assert planned_max_steps(t, 3600) == -1  # 113 x 8 = 904: the epochs decide, as before
    assert planned_max_steps(t, 1200) == -1  # 38 x 8 = 304
    monkeypatch.setenv("WORLD_SIZE", "2")  # each of two ranks takes its share of every step's rows
    assert planned_max_steps(t, 1200) == 300  # 19 x 8 = 152
    assert planned_max_steps(SimpleNamespace(**{**vars(t), "max_steps": 50}), 540) == 50  # max_steps wins
    assert planned_max_steps(SimpleNamespace(**{**vars(t), "min_steps": None}), 540) == -1
