"""loading: remote code stays off unless the training recipe turned it on."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vlmtax.models import loading


def test_trust_remote_code_follows_the_run_metadata(tmp_path: Path, monkeypatch):
    seen = []

    def fake_from_pretrained(source, **kwargs):
        seen.append(kwargs["trust_remote_code"])
        return object()

    monkeypatch.setattr("transformers.AutoModelForImageTextToText.from_pretrained", fake_from_pretrained)
    for flag in (False, True):
        run = tmp_path / f"run-{flag}"
        run.mkdir()
        (run / "vlmtax_meta.json").write_text(json.dumps({"finetuning": "full", "trust_remote_code": flag}))
        (run / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
        model_dir = loading.inspect_model_dir(run)
        assert model_dir.trust_remote_code is flag
        loading.load_weights(run, torch.float32, trust_remote_code=model_dir.trust_remote_code)
    assert seen == [False, True]
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text("{}")
    assert loading.inspect_model_dir(legacy).trust_remote_code is False
