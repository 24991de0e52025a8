"""`--num-processes` for predict and sft: capped at what can help (cores or GPUs, batches) with one line,
and 0 refused with one line, before anything starts."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_RECIPE, cli_exit_code, tiny_overrides

from vlmtax.errors import VlmtaxError
from vlmtax.models.loading import useful_processes


@pytest.fixture
def two_cores(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_capped_at_cores_and_batches_with_one_line(two_cores, capsys):
    assert useful_processes(8, 100, "batch", "predict") == 2
    assert capsys.readouterr().err == "predict: --num-processes 8 capped at 2 (2 CPU cores)\n"
    assert useful_processes(2, 1, "batch", "sft") == 1
    assert capsys.readouterr().err == "sft: --num-processes 2 capped at 1 (1 batch)\n"
    assert useful_processes(2, 50, "batch", "predict") == 2 and capsys.readouterr().err == ""


def test_capped_at_gpus(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert useful_processes(8, 1000, "batch", "predict") == 4
    assert "(4 GPUs)" in capsys.readouterr().err
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0})
    assert useful_processes(8, 1000, "batch", "predict", device="cpu") == 1  # --device cpu: cores count


def test_zero_processes_is_one_line(tiny_model_dir, prepared_dir, synth_dir, tmp_path, capsys):
    with pytest.raises(VlmtaxError, match=r"--num-processes 0 is not positive"):
        useful_processes(0, 10, "batch", "predict")
    code = cli_exit_code(["sft", str(TINY_RECIPE), "--num-processes", "0",
                          *tiny_overrides(tiny_model_dir, prepared_dir, tmp_path / "run")])
    err = capsys.readouterr().err
    assert code != 0 and err.strip().splitlines() == [
        "error: --num-processes 0 is not positive (fix: use 1 or more)"], err
    assert not (tmp_path / "run").exists()
    out = tmp_path / "sub.csv"
    code = cli_exit_code(["predict", "--model", str(tiny_model_dir), "--csv", str(synth_dir / "test.csv"),
                          "--images", str(synth_dir / "test_images"), "--out", str(out), "--num-processes", "0"])
    err = capsys.readouterr().err
    assert code != 0 and err.strip().splitlines() == [
        "error: --num-processes 0 is not positive (fix: use 1 or more)"], err
    assert not out.exists()


def test_predict_caps_a_small_csv_before_launching(two_cores, tiny_model_dir, synth_dir, tmp_path, capsys,
                                                   monkeypatch):
    """24 test rows in batches of 16 are 2 batches: 8 processes would leave 6 idle (and 2 cores serve 2)."""
    from vlmtax.predict import predict

    class Launching(Exception):
        pass

    launched = []

    def launch(n, argv):
        launched.append(n)
        raise Launching

    monkeypatch.setattr("vlmtax.predict.Launched", launch)
    with pytest.raises(Launching):
        predict(tiny_model_dir, synth_dir / "test.csv", synth_dir / "test_images", tmp_path / "s.csv",
                batch_size=16, num_processes=8)
    assert launched == [2]
    assert "predict: --num-processes 8 capped at 2 (2 CPU cores, 2 batches)" in capsys.readouterr().err
