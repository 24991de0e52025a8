"""families: every supported family through sft (LoRA, vision and projector trained), merge and predict, each on
its own tiny model; the per-part wrapped-module report; a LoRA target list that wraps nothing refused."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from conftest import FAMILIES, TINY_RECIPE, tiny_overrides

from vlmtax.data.taxonomy import SLOT_COLUMNS, Taxonomy
from vlmtax.errors import VlmtaxError
from vlmtax.generate.merge import merge
from vlmtax.models.families import FAMILIES as TABLE
from vlmtax.predict import predict
from vlmtax.sft import sft

pytestmark = pytest.mark.usefixtures("single_thread")

# LoRA on language and vision blocks, lm_head and the projector trained whole: every part of the table is hit.
LORA = ("finetuning=lora", "train.max_steps=6", "train.batch_size=4", "log.every=1", "train.lr=1e-2",
        "train.save_steps=100")


def test_the_table_covers_the_tested_families():
    assert set(TABLE) == set(FAMILIES)
    assert [f.name for f in TABLE.values() if not f.tree_mask] == ["qwen3_5"]


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "qwen2_vl"])  # qwen2_vl: test_sft/merge/predict
def test_sft_merge_predict_on_each_family(family, family_model_dirs, prepared_dir, synth_dir, tmp_path, capsys):
    run = sft(TINY_RECIPE, tiny_overrides(family_model_dirs[family], prepared_dir, tmp_path / "run", *LORA))
    report = capsys.readouterr().out
    counts = dict(part.rsplit(" ", 1) for part in report.split("(whole: trained as modules_to_save): ")[1]
                  .splitlines()[0].split(", "))
    assert int(counts["language"]) > 0 and int(counts["vision"]) > 0 and int(counts["projector whole"]) >= 1
    if family == "qwen3_vl":  # the merger and the DeepStack merger
        assert int(counts["projector whole"]) == 2
    losses = [h["loss"] for h in json.loads((run / "vlmtax_meta.json").read_text())["history"] if "loss" in h]
    assert losses[-1] < losses[0]

    merged = merge(run, tmp_path / "merged")
    check = json.loads((merged / "vlmtax_meta.json").read_text())["verification"]
    assert check["merged_vs_adapter"] <= check["tolerance"] and check["reloaded_vs_adapter"] <= check["tolerance"]

    taxonomy = Taxonomy.load(merged / "taxonomy.json")
    for mode in ("constrained", "free"):  # Qwen3.5 decodes constrained through decoding_rows.py
        out = tmp_path / f"{mode}.csv"
        predict(model=merged, csv=synth_dir / "test.csv", images=synth_dir / "test_images", out=out,
                probs=tmp_path / "probs.jsonl" if mode == "constrained" else None, batch_size=8, mode=mode)
        sub = pd.read_csv(out, dtype=str, keep_default_na=False)
        assert sub["id"].tolist() == pd.read_csv(synth_dir / "test.csv", dtype=str)["id"].tolist()
        for _, row in sub.iterrows():
            cat = taxonomy.category(row["Category"])
            assert all(row[a.column] in a.values for a in cat.attributes)
            used = {a.column for a in cat.attributes}
            assert all(row[c] == taxonomy.filler for c in SLOT_COLUMNS if c not in used)
    probs = [json.loads(line) for line in (tmp_path / "probs.jsonl").read_text().splitlines()]
    for line in probs:
        for attr in line["attributes"].values():
            assert abs(sum(attr["probs"].values()) - 1) < 1e-4 and attr["value"] == max(attr["probs"],
                                                                                        key=attr["probs"].get)


def test_lora_targets_that_wrap_nothing_are_refused(family_model_dirs, prepared_dir, tmp_path):
    # q_proj exists in Qwen3.5 only in its full-attention layer; `conv1d` is not a linear layer in any family.
    with pytest.raises(VlmtaxError, match="matches no linear layer of the language model"):
        sft(TINY_RECIPE, tiny_overrides(family_model_dirs["qwen3_5"], prepared_dir, tmp_path / "r",
                                        "finetuning=lora", "lora.target=[conv1d]"))


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "qwen2_vl"])
def test_full_finetuning_with_a_frozen_tower_trains_the_language_model_only(family, family_model_dirs, prepared_dir,
                                                                            tmp_path, capsys):
    from transformers import AutoModelForImageTextToText

    base_dir = family_model_dirs[family]
    run = sft(TINY_RECIPE, tiny_overrides(base_dir, prepared_dir, tmp_path / "full", "finetuning=full",
                                          "freeze.vision=true", "freeze.projector=true", "train.max_steps=2",
                                          "train.batch_size=4"))
    assert "trainable tensors: language" in capsys.readouterr().out
    # Compared as loaded: Qwen2.5-VL saves its weights under the older checkpoint names.
    base, tuned = (dict(AutoModelForImageTextToText.from_pretrained(d).named_parameters()) for d in (base_dir, run))
    part = TABLE[family].part
    changed = {part(name) for name, w in tuned.items() if not torch.equal(w, base[name])}
    assert "language" in changed and not changed & {"vision", "projector"}


@pytest.mark.parametrize(("family", "setting", "message"), [
    ("qwen3_5", "train.packing=true", "train.packing is not supported for Qwen3.5: its recurrent layers"),
    ("qwen3_vl", "train.cache_vision=true", "train.cache_vision is not supported for model type 'qwen3_vl'"),
])
def test_training_levers_follow_the_family_table(family, setting, message, family_model_dirs, prepared_dir,
                                                 tmp_path):
    """Packing through a recurrence would leak state between records; Qwen3-VL's DeepStack features are not in
    the vision cache: both are refused with a one-line error, from the table rather than per-stage lists."""
    with pytest.raises(VlmtaxError, match=message):
        sft(TINY_RECIPE, tiny_overrides(family_model_dirs[family], prepared_dir, tmp_path / "r", "finetuning=lora",
                                        "freeze.vision=true", "freeze.projector=true", "train.max_steps=1", setting))
    assert [f.name for f in TABLE.values() if f.vision_cache] == [f.name for f in TABLE.values() if f.packing] == [
        "qwen2_vl", "qwen2_5_vl"]
