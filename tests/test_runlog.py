"""vlmtax.runlog: the libraries' logs and warnings go to the log file, vlmtax's own warnings stay one line each."""

from __future__ import annotations

import logging
import warnings

import pytest

from vlmtax import runlog


def _own_warning(message: str) -> None:
    # warn_explicit with a filename inside the package: what warnings.warn from a vlmtax module produces
    warnings.warn_explicit(message, UserWarning, runlog.__file__, 1)


def test_library_logs_and_warnings_go_to_the_file_not_the_terminal(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("VLMTAX_VERBOSE", raising=False)
    log = tmp_path / "run" / "train.log"
    with runlog.library_output(log):
        logging.getLogger("transformers.tokenization_utils_base").warning("The tokenizer has new PAD tokens")
        logging.getLogger("accelerate").warning("accelerate says hi")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn_explicit("a library warning", UserWarning, "/site-packages/peft/x.py", 3)
    err = capsys.readouterr().err
    assert "PAD" not in err and "hi" not in err and "library warning" not in err
    text = log.read_text()
    assert "The tokenizer has new PAD tokens" in text and "accelerate says hi" in text
    assert "UserWarning (/site-packages/peft/x.py:3): a library warning" in text


def test_own_warnings_print_once_as_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("VLMTAX_VERBOSE", raising=False)
    with runlog.library_output(tmp_path / "x.log"), warnings.catch_warnings():
        warnings.simplefilter("always")
        for _ in range(3):
            _own_warning("the vision cache would need 9 GB")
    err = capsys.readouterr().err
    assert err == "warning: the vision cache would need 9 GB\n"
    assert not (tmp_path / "x.log").exists()  # nothing logged: no file written


def test_everything_is_restored_after(tmp_path, monkeypatch):
    monkeypatch.delenv("VLMTAX_VERBOSE", raising=False)
    from transformers.utils import logging as hf_logging

    logger = logging.getLogger("transformers")
    before = (logger.handlers[:], logger.propagate, warnings.showwarning, hf_logging.is_progress_bar_enabled())
    with runlog.library_output(tmp_path / "x.log"):
        assert not hf_logging.is_progress_bar_enabled()
        with runlog.library_output(tmp_path / "inner.log"):  # the demo's sft inside the demo's own log
            logging.getLogger("transformers").warning("inner")
        logging.getLogger("transformers").warning("outer")
    assert (logger.handlers[:], logger.propagate, warnings.showwarning,
            hf_logging.is_progress_bar_enabled()) == before
    assert "inner" in (tmp_path / "inner.log").read_text() and "inner" not in (tmp_path / "x.log").read_text()
    assert "outer" in (tmp_path / "x.log").read_text()


def test_warning_filters_still_apply(tmp_path, monkeypatch):
    """The suite turns library deprecations into errors: redirecting their display must not hide them."""
    monkeypatch.delenv("VLMTAX_VERBOSE", raising=False)
    with runlog.library_output(tmp_path / "x.log"), warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        with pytest.raises(FutureWarning):
            warnings.warn("deprecated", FutureWarning, stacklevel=1)


def test_verbose_leaves_the_libraries_alone(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VLMTAX_VERBOSE", "1")
    handlers = logging.getLogger("transformers").handlers[:]
    with runlog.library_output(tmp_path / "x.log") as log:
        assert log is None and logging.getLogger("transformers").handlers == handlers
    assert not (tmp_path / "x.log").exists()
