"""task: classify through sft and predict: modes, feature cache, kNN, recipes, resume, one-line errors."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import HEADS_FAST, HEADS_RECIPE, RECIPES, quiet_console, sft_with_nan_on_rank1, tiny_overrides
from safetensors.torch import load_file
from typer.testing import CliRunner

from vlmtax.cli import app
from vlmtax.data.taxonomy import Taxonomy
from vlmtax.errors import VlmtaxError
from vlmtax.predict import predict
from vlmtax.sft import sft


def _sft(model: Path, data: Path, out: Path, tmp: Path, *extra: str, recipe: Path = HEADS_RECIPE) -> Path:
    return sft(recipe, tiny_overrides(model, data, out, f"heads.cache_dir={tmp / 'cache'}", *HEADS_FAST, *extra))


@pytest.fixture(scope="module")
def frozen_run(tiny_clip_dir, prepared_dir, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("frozen")
    return _sft(tiny_clip_dir, prepared_dir, tmp / "run", tmp, "heads.mode=frozen", "train.max_steps=6")


def test_frozen_run_layout_and_feature_cache(frozen_run, tiny_clip_dir, prepared_dir):
    meta = json.loads((frozen_run / "vlmtax_meta.json").read_text())
    spec = json.loads((frozen_run / "classifier.json").read_text())
    assert meta["task"] == "classify" and meta["global_step"] == 6 and meta["features_extracted"] > 0
    assert spec["mode"] == "frozen" and not spec["trained_backbone"] and spec["backbone"] == str(tiny_clip_dir)
    for f in ("heads.safetensors", "preprocessor_config.json", "taxonomy.json", "recipe.yaml"):
        assert (frozen_run / f).is_file(), f
    assert not (frozen_run / "backbone.safetensors").exists()
    tax = Taxonomy.load(prepared_dir / "taxonomy.json")
    assert [(h["category"], h["attribute"]) for h in spec["layout"]] == [
        (c.name, a.name) for c in tax.categories.values() for a in c.attributes]
    # Same backbone and images, another head: every feature comes from the cache.
    again = _sft(tiny_clip_dir, prepared_dir, frozen_run.parent / "again", frozen_run.parent, "heads.mode=frozen",
                 "heads.kind=linear", "heads.loss=ldam")
    assert json.loads((again / "vlmtax_meta.json").read_text())["features_extracted"] == 0


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_trained_backbone_modes_change_backbone_and_heads(mode, tiny_clip_dir, prepared_dir, tmp_path):
    out = _sft(tiny_clip_dir, prepared_dir, tmp_path / "run", tmp_path, f"heads.mode={mode}", "heads.sampler=category",
               "heads.loss=cb_focal", "heads.augment.enabled=true", "heads.backbone_lr=0.01")
    base = load_file(str(tiny_clip_dir / "model.safetensors"))
    trained = load_file(str(out / "backbone.safetensors"))
    key = next(k for k in base if k.endswith("encoder.layers.0.self_attn.q_proj.weight"))
    assert set(trained) == {f"model.{k}" for k in base}  # LoRA folded in: a plain backbone state
    assert not torch.equal(base[key], trained[f"model.{key}"])


def test_predict_on_a_heads_run_writes_the_shared_layout(frozen_run, synth_dir, tmp_path):
    out, probs = tmp_path / "sub.csv", tmp_path / "probs.jsonl"
    report = predict(model=frozen_run, csv=synth_dir / "test.csv", images=synth_dir / "test_images", out=out,
                     probs=probs, batch_size=8)
    sub = pd.read_csv(out, dtype=str, keep_default_na=False)
    test = pd.read_csv(synth_dir / "test.csv", dtype=str)
    tax = Taxonomy.load(frozen_run / "taxonomy.json")
    assert list(sub["id"]) == list(test["id"]) and report["predicted"] == len(test)
    lines = [json.loads(x) for x in probs.read_text().splitlines()]
    for row, line in zip(sub.to_dict("records"), lines):
        cat = tax.categories[row["Category"]]
        assert line["id"] == row["id"] and set(line["attributes"]) == set(cat.attribute_names())
        for a in cat.attributes:
            entry = line["attributes"][a.name]
            assert entry["column"] == a.column and row[a.column] == entry["value"] in a.values
            assert list(entry["probs"]) == a.values and sum(entry["probs"].values()) == pytest.approx(1.0)
            assert entry["value"] == max(entry["probs"], key=entry["probs"].get)


def test_knn_votes_give_probabilities(tiny_clip_dir, prepared_dir, synth_dir, tmp_path):
    run = _sft(tiny_clip_dir, prepared_dir, tmp_path / "run", tmp_path, "heads.kind=knn", "heads.mode=frozen",
               "heads.k=3")
    assert (run / "knn.safetensors").is_file()
    assert json.loads((run / "vlmtax_meta.json").read_text())["global_step"] == 0
    predict(model=run, csv=synth_dir / "test.csv", images=synth_dir / "test_images", out=tmp_path / "s.csv",
            probs=tmp_path / "p.jsonl")
    for line in map(json.loads, (tmp_path / "p.jsonl").read_text().splitlines()):
        for entry in line["attributes"].values():
            p = list(entry["probs"].values())
            assert sum(p) == pytest.approx(1.0)
            # three voters: each share is a sum of at most three vote weights, so at most 3 values are non-zero
            assert sum(v > 0 for v in p) <= 3 or len(set(p)) > 1


def test_knn_vote_by_hand():
    from vlmtax.heads.knn import knn_probabilities
    from vlmtax.heads.model import HeadSpec

    layout = [HeadSpec("A", "color", 0, ("red", "blue"))]
    bank = {"features": torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]),
            "labels": torch.tensor([[0], [1], [-100]]), "categories": torch.tensor([0, 0, 0])}
    out = knn_probabilities(bank, layout, ["A"], 3, torch.tensor([[1.0, 0.0]]), torch.tensor([0]))
    w_red, w_blue = (1 + 1.0) / 2, (1 + 0.0) / 2  # the unlabelled neighbour does not vote
    assert out[0]["color"]["red"] == pytest.approx(w_red / (w_red + w_blue))


def test_every_classify_recipe_runs_two_steps(tiny_clip_dir, tiny_model_dir, prepared_dir, tmp_path):
    """GPU recipes on the tiny backbones: SigLIP2/CLIP ids swapped for the tiny CLIP, Qwen2-VL for the tiny one."""
    for name, model in (("tiny_heads_cpu.yaml", tiny_clip_dir), ("siglip2_heads.yaml", tiny_clip_dir),
                        ("clip_l14_knn.yaml", tiny_clip_dir), ("qwen2vl_2b_heads.yaml", tiny_model_dir)):
        out = _sft(model, prepared_dir, tmp_path / name, tmp_path, "train.num_workers=0", "image.max_pixels=12544",
                   recipe=RECIPES / name)
        meta = json.loads((out / "vlmtax_meta.json").read_text())
        assert meta["global_step"] == (0 if "knn" in name else 2), name
        assert (out / "classifier.json").is_file() and (out / "taxonomy.json").is_file()


def test_resume_continues_at_the_saved_step(tiny_clip_dir, prepared_dir, tmp_path):
    extra = ("heads.mode=frozen", "train.save_steps=2")
    _sft(tiny_clip_dir, prepared_dir, tmp_path / "run", tmp_path, *extra)
    (tmp_path / "run" / "vlmtax_meta.json").unlink()  # an interrupted run: checkpoints, no meta
    out = _sft(tiny_clip_dir, prepared_dir, tmp_path / "run", tmp_path, *extra, "train.max_steps=4", "resume=true")
    meta = json.loads((out / "vlmtax_meta.json").read_text())
    assert meta["started_at_step"] == 2 and meta["global_step"] == 4


def test_one_line_errors(tiny_clip_dir, tiny_model_dir, prepared_dir, frozen_run, synth_dir, tmp_path):
    no_proc = tmp_path / "no_processor"
    shutil.copytree(tiny_clip_dir, no_proc)
    (no_proc / "preprocessor_config.json").unlink()
    with pytest.raises(VlmtaxError, match="has no image processor"):
        _sft(no_proc, prepared_dir, tmp_path / "o1", tmp_path)
    no_tax = tmp_path / "gen_data"
    shutil.copytree(prepared_dir, no_tax)
    (no_tax / "taxonomy.json").unlink()
    with pytest.raises(VlmtaxError, match="no taxonomy.json"):
        _sft(tiny_clip_dir, no_tax, tmp_path / "o2", tmp_path)
    with pytest.raises(VlmtaxError, match="knn votes over frozen features"):
        _sft(tiny_clip_dir, prepared_dir, tmp_path / "o3", tmp_path, "heads.kind=knn", "heads.mode=full")
    with pytest.raises(VlmtaxError, match="attn_implementation=eager is for the generate route"):
        _sft(tiny_clip_dir, prepared_dir, tmp_path / "o5", tmp_path, "attn_implementation=eager")
    tax = json.loads((frozen_run / "taxonomy.json").read_text())
    cat = next(iter(tax["categories"].values()))
    cat["attributes"][0]["values"].append("chartreuse")
    other = tmp_path / "other_taxonomy.json"
    other.write_text(json.dumps(tax))
    with pytest.raises(VlmtaxError, match="does not match the heads"):
        predict(model=frozen_run, csv=synth_dir / "test.csv", images=synth_dir / "test_images",
                out=tmp_path / "s.csv", taxonomy=other)
    result = CliRunner().invoke(app, ["sft", str(HEADS_RECIPE), f"model={no_proc}", f"data={prepared_dir}",
                                      f"output_dir={tmp_path / 'o4'}"])
    assert result.exit_code != 0 and isinstance(result.exception, VlmtaxError)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_tiny_vision_cli(family, tmp_path):
    from transformers import AutoImageProcessor, AutoModel

    result = CliRunner().invoke(app, ["tiny-model", str(tmp_path / family), "--family", family])
    assert result.exit_code == 0, result.output
    model = AutoModel.from_pretrained(tmp_path / family)
    assert model.config.model_type == f"{family}_vision_model"
    assert AutoImageProcessor.from_pretrained(tmp_path / family).size


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_tiny_vision_sizes_can_be_overridden(family):
    """bench/visible.py builds bigger random encoders through the same builder: the sizes given change,
    every other size and the processor stay the tiny model's; the image and patch sizes cannot change."""
    import torch

    from vlmtax.models.tiny_vision import SIZES, _build

    model, processor = _build(family, num_hidden_layers=3, hidden_size=32, intermediate_size=64)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (3, 32, 64)
    assert (cfg.image_size, cfg.patch_size, cfg.num_attention_heads) == (SIZES["image_size"], SIZES["patch_size"],
                                                                         SIZES["num_attention_heads"])
    out = model(pixel_values=torch.zeros(1, 3, SIZES["image_size"], SIZES["image_size"]), output_hidden_states=True)
    assert len(out.hidden_states) == 3 + 1 and out.last_hidden_state.shape[-1] == 32
    tiny, tiny_processor = _build(family)
    assert tiny.config.num_hidden_layers == SIZES["num_hidden_layers"]
    assert processor.to_dict() == tiny_processor.to_dict()
    with pytest.raises(ValueError, match="image_size"):
        _build(family, image_size=128)


def test_tiny_vision_with_sizes_is_kept_only_for_the_same_sizes(tmp_path):
    from vlmtax.models.tiny_vision import build_tiny_vision

    bigger = dict(num_hidden_layers=3, hidden_size=32, intermediate_size=64)
    out = build_tiny_vision(tmp_path / "m", "clip", seed=0, **bigger)
    assert build_tiny_vision(out, "clip", seed=0, **bigger) == out  # kept
    for other in ({}, {**bigger, "num_hidden_layers": 4}):
        with pytest.raises(VlmtaxError, match="already exists"):
            build_tiny_vision(out, "clip", seed=0, **other)
    default = build_tiny_vision(tmp_path / "d", "clip", seed=0)
    with pytest.raises(VlmtaxError, match="already exists"):
        build_tiny_vision(default, "clip", seed=0, **bigger)


@pytest.mark.parametrize("mode", ["full", "frozen"])
def test_eval_metric_scores_the_heads_as_predict_does(mode, tiny_clip_dir, prepared_dir, synth_dir, tmp_path):
    """train.eval_metric on a classify run: the logged score is `vlmtax score` of the step's predictions, the
    best step's weights end the run, and `vlmtax predict` on the finished run writes the best step's table."""
    from vlmtax.evaluate.score import score

    out = _sft(tiny_clip_dir, prepared_dir, tmp_path / "run", tmp_path, f"heads.mode={mode}", "train.max_steps=6",
               "train.save_steps=2", "train.eval_metric=true", "train.best_by=score", "train.lr=0.05")
    meta = json.loads((out / "vlmtax_meta.json").read_text())
    state = json.loads(sorted(out.glob("checkpoint-*"))[-1].joinpath("trainer_state.json").read_text())
    logged = [h for h in state["log_history"] if "eval_score" in h]
    assert [h["step"] for h in logged] == [2, 4, 6]
    for h in logged:
        report = score(out / "eval" / "truth.csv", out / "eval" / f"predictions-step{h['step']}.csv",
                       taxonomy=out / "taxonomy.json", console=quiet_console())
        assert h["eval_score"] == pytest.approx(report["final"], abs=1e-12)
    best = max(logged, key=lambda h: h["eval_score"])
    assert meta["eval_metric"]["best_step"] == best["step"]
    assert state["best_model_checkpoint"].endswith(f"checkpoint-{best['step']}")
    again = tmp_path / "again.csv"
    predict(model=out, csv=out / "eval" / "truth.csv", images=synth_dir / "train_images", out=again, batch_size=8)
    assert again.read_text() == (out / "eval" / f"predictions-step{best['step']}.csv").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["frozen", "full"])
def test_two_process_cpu_run(mode, tiny_clip_dir, prepared_dir, tmp_path):
    """`sft --num-processes 2` on the classify route is data-parallel: one epoch takes half the steps of one
    process (each rank a share of every batch), the run is complete, and frozen mode shares its feature cache."""
    out = tmp_path / "ddp"
    overrides = tiny_overrides(tiny_clip_dir, prepared_dir, out, f"heads.cache_dir={tmp_path / 'cache'}",
                               "train.batch_size=8", "train.eval=false", "train.epochs=1",
                               "heads.extract_batch_size=16", f"heads.mode={mode}")
    proc = subprocess.run([sys.executable, "-m", "vlmtax", "sft", str(HEADS_RECIPE), "--num-processes", "2",
                           *overrides],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((out / "vlmtax_meta.json").read_text())
    rows = len(json.loads((prepared_dir / "train.json").read_text()))
    assert meta["global_step"] == math.ceil(rows / (8 * 2)), (meta["global_step"], rows)
    assert (out / "classifier.json").is_file() and Taxonomy.load(out / "taxonomy.json").categories
    if mode == "frozen":
        [folder] = (tmp_path / "cache").iterdir()
        assert any(folder.iterdir())


@pytest.mark.slow
def test_nan_on_one_rank_stops_every_rank_with_the_same_error(tiny_clip_dir, prepared_dir, tmp_path):
    """A NaN loss on rank 1 only: both ranks stop with the same one-line error instead of rank 0 hanging."""
    overrides = tiny_overrides(tiny_clip_dir, prepared_dir, tmp_path / "nan", *HEADS_FAST, "heads.mode=frozen",
                               f"heads.cache_dir={tmp_path / 'cache'}")
    errors = sft_with_nan_on_rank1(HEADS_RECIPE, overrides)
    assert len(set(errors)) == 1, errors
    assert "non-finite loss at step 0 on 1 of 2 processes" in errors[0]
