"""merge: verified fold of the adapter, the tied lm_head kept, corrupted merges and bad inputs refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, Qwen2VLForConditionalGeneration

import vlmtax.generate.merge as merge_module
from vlmtax.errors import VlmtaxError
from vlmtax.generate.merge import merge
from vlmtax.predict import predict

MERGED_FILES = ("model.safetensors", "config.json", "generation_config.json", "chat_template.jinja", "tokenizer.json",
                "processor_config.json", "taxonomy.json", "vlmtax_meta.json", "recipe.yaml")


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def merged_dir(trained_run_dir, tmp_path_factory):
    return merge(trained_run_dir, tmp_path_factory.mktemp("merge") / "merged")


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_merge_writes_a_verified_plain_model(merged_dir, trained_run_dir, capsys):
    assert all((merged_dir / f).is_file() for f in MERGED_FILES)
    meta = json.loads((merged_dir / "vlmtax_meta.json").read_text())
    check = meta["verification"]
    assert meta["stage"] == "merge" and meta["source_run"] == str(trained_run_dir.resolve())
    assert check["merged_vs_adapter"] <= check["tolerance"] and check["reloaded_vs_adapter"] <= check["tolerance"]
    assert check["base_vs_adapter"] > 100 * check["tolerance"]
    # The recipe trains lm_head (modules_to_save) on a tied model: it must come back as its own weight.
    model = AutoModelForImageTextToText.from_pretrained(merged_dir)
    assert model.config.tie_word_embeddings is False
    assert not torch.equal(model.lm_head.weight, model.model.language_model.embed_tokens.weight)
    assert _leftovers(merged_dir.parent) == []
    # Merging the same run into the same folder again replaces it.
    assert merge(trained_run_dir, merged_dir) == merged_dir
    assert "merged vs adapter" in capsys.readouterr().out


def test_merged_dir_predicts_the_same_as_the_run_dir(merged_dir, trained_run_dir, synth_dir, tmp_path):
    subs = {}
    for name, model in (("run", trained_run_dir), ("merged", merged_dir)):
        subs[name] = tmp_path / f"{name}.csv"
        predict(model=model, csv=synth_dir / "test.csv", images=synth_dir / "test_images", out=subs[name],
                probs=tmp_path / f"{name}.jsonl", batch_size=8)
    assert subs["run"].read_bytes() == subs["merged"].read_bytes()
    for a, b in zip(*((tmp_path / f"{n}.jsonl").read_text().splitlines() for n in ("run", "merged"))):
        pa, pb = json.loads(a)["attributes"], json.loads(b)["attributes"]
        for name in pa:
            for value, p in pa[name]["probs"].items():
                assert p == pytest.approx(pb[name]["probs"][value], abs=1e-4)


def test_a_corrupted_merge_fails_verification_and_writes_nothing(trained_run_dir, tmp_path, monkeypatch):
    real = merge_module.fold_adapter

    def corrupted(peft_model):
        model = real(peft_model)
        with torch.no_grad():
            model.model.language_model.layers[0].mlp.down_proj.weight.add_(0.05)
        return model

    monkeypatch.setattr(merge_module, "fold_adapter", corrupted)
    with pytest.raises(VlmtaxError, match="merged model does not reproduce"):
        merge(trained_run_dir, tmp_path / "bad")
    assert not (tmp_path / "bad").exists() and _leftovers(tmp_path) == []


def test_a_dropped_lm_head_is_caught_on_reload(trained_run_dir, tmp_path, monkeypatch):
    """A save that keeps the config tied and drops lm_head (what older transformers and naive exports do when
    a trained head sits on tied embeddings): the merged model in memory is right, the folder is not."""
    real = merge_module.save_merged

    def lossy(model, processor, taxonomy, model_dir, folder, meta):
        real(model, processor, taxonomy, model_dir, folder, meta)
        weights = load_file(folder / "model.safetensors")
        del weights["lm_head.weight"]
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))

    monkeypatch.setattr(merge_module, "save_merged", lossy)
    with pytest.raises(VlmtaxError, match="reloaded"):
        merge(trained_run_dir, tmp_path / "lossy")
    assert not (tmp_path / "lossy").exists() and _leftovers(tmp_path) == []


def _copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("checkpoint-*"))
    return dest


def test_an_adapter_that_changes_nothing_is_an_error(trained_run_dir, tiny_model_dir, tmp_path):
    run = _copy_run(trained_run_dir, tmp_path / "noop")
    base = AutoModelForImageTextToText.from_pretrained(tiny_model_dir).state_dict()
    weights = load_file(run / "adapter_model.safetensors")
    for key, value in weights.items():
        if "lora_B" in key:
            weights[key] = torch.zeros_like(value)
        elif "lora_" not in key:  # modules_to_save copies: put the base weights back
            weights[key] = base[key.removeprefix("base_model.model.")].clone()
    save_file(weights, run / "adapter_model.safetensors")
    with pytest.raises(VlmtaxError, match="changes nothing"):
        merge(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_adapter_for_another_base_is_refused(trained_run_dir, tiny_model_dir, tmp_path):
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.text_config.intermediate_size = 96
    other = tmp_path / "other_base"
    Qwen2VLForConditionalGeneration(config).save_pretrained(other)
    AutoProcessor.from_pretrained(tiny_model_dir).save_pretrained(other)
    run = _copy_run(trained_run_dir, tmp_path / "run")
    meta = json.loads((run / "vlmtax_meta.json").read_text())
    (run / "vlmtax_meta.json").write_text(json.dumps({**meta, "base_model": str(other)}))
    with pytest.raises(VlmtaxError, match="does not match base model"):
        merge(run, tmp_path / "out")


def test_bad_run_dirs_and_outputs(trained_run_dir, tiny_model_dir, tmp_path, capsys):
    full = shutil.copytree(tiny_model_dir, tmp_path / "full_run")
    (full / "vlmtax_meta.json").write_text(json.dumps({"stage": "sft", "finetuning": "full"}))
    assert merge(full, tmp_path / "out") is None
    assert "needs no merge" in capsys.readouterr().out and not (tmp_path / "out").exists()

    empty = tmp_path / "no_adapter"
    empty.mkdir()
    (empty / "vlmtax_meta.json").write_text(json.dumps({"stage": "sft", "finetuning": "lora"}))
    with pytest.raises(VlmtaxError, match="neither an adapter"):
        merge(empty, tmp_path / "out")

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    with pytest.raises(VlmtaxError, match="already holds something else"):
        merge(trained_run_dir, busy)
    with pytest.raises(VlmtaxError, match="contains the input the run dir"):
        merge(trained_run_dir, trained_run_dir.parent)
    assert (busy / "notes.txt").read_text() == "keep me"


def test_cli_errors_are_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vlmtax", "merge", str(tmp_path / "missing"), "--out",
                           str(tmp_path / "o")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr
