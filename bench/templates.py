"""Measurement: what constrained decoding adds over free generation on a model vlmtax did not train.

    python bench/templates.py [--rows 600] [--epochs 8] [--workdir DIR]

Builds a synthetic catalogue and the tiny random Qwen2-VL, prepares it with data_templates/json.yaml,
fine-tunes it (recipes/tiny_cpu.yaml, full fine-tuning), then copies the weights into a plain model folder
with no vlmtax files: a stand-in for a LLaMA-Factory export trained on JSON answers. That folder, and the
untrained base model (zero-shot, json_with_values.yaml), are decoded on the validation rows with
`predict --taxonomy --template` in both modes. Printed per model and mode: the share of answers that are a
JSON object following the layout with an allowed value in every slot (valid outputs), the share of slots
holding an allowed value before snapping (as free mode's lenient parser reads them), and the metric score.
Constrained decoding's shares are 1 by construction (every value is scored from the allowed list; the
tests check it), so only free generation is measured for them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLMTAX_PROGRESS", "0")

import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402

from vlmtax.data.answer import parse_answer, with_template  # noqa: E402
from vlmtax.data.prepare import prepare  # noqa: E402
from vlmtax.data.synth import synth  # noqa: E402
from vlmtax.data.taxonomy import Taxonomy  # noqa: E402
from vlmtax.evaluate.score import score  # noqa: E402
from vlmtax.generate.decoding import AnswerPlans, generate_answers  # noqa: E402
from vlmtax.models.loading import load_for_inference  # noqa: E402
from vlmtax.models.tiny_model import build_tiny_model  # noqa: E402
from vlmtax.predict import predict  # noqa: E402
from vlmtax.sft import sft  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = REPO / "data_templates"


def valid_shares(model_dir: Path, taxonomy: Taxonomy, val: pd.DataFrame, images: Path) -> tuple[float, float]:
    """(share of rows whose free answer is exactly a layout-following JSON object of allowed values, share of
    slots whose value, as free mode's lenient parser reads it, is allowed before snapping)."""
    model, processor, _ = load_for_inference(model_dir)
    plans = AnswerPlans(processor.tokenizer, taxonomy.template)
    rows_ok = slots_ok = slots = 0
    for start in range(0, len(val), 16):
        chunk = val.iloc[start:start + 16]
        cats = [taxonomy.category(c) for c in chunk["Category"]]
        pics = [Image.open(images / f"{int(i):06d}.jpg").convert("RGB") for i in chunk["id"]]
        for text, cat in zip(generate_answers(model, processor, pics, cats, plans), cats):
            try:
                obj = json.loads(text)
            except json.JSONDecodeError:
                obj = None
            exact = isinstance(obj, dict) and list(obj) == cat.attribute_names()
            rows_ok += exact and all(obj[a.name] in a.values for a in cat.attributes)
            parsed = parse_answer(text, cat, taxonomy.template)
            slots_ok += sum(parsed[a.name] in a.values for a in cat.attributes)
            slots += len(cat.attributes)
    return rows_ok / len(val), slots_ok / slots


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=600)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="vlmtax_templates_"))
    cat = synth(work / "catalogue", rows=args.rows, test_rows=8, seed=0, image_size=112)
    base = build_tiny_model(work / "tiny-model", seed=0)
    data = work / "data"
    prepare(csv=cat / "train.csv", images=cat / "train_images", attributes=cat / "category_attributes.parquet",
            out=data, template=TEMPLATES / "json.yaml", val_fraction=0.2, workers=1)
    run = sft(REPO / "recipes" / "tiny_cpu.yaml", overrides=[f"model={base}", f"data={data}",
                                                              f"output_dir={work / 'run'}",
                                                              f"train.epochs={args.epochs}"])
    plain = work / "elsewhere"  # the weights without any vlmtax file: "trained elsewhere"
    shutil.copytree(run, plain, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
        "taxonomy.json", "vlmtax_meta.json", "recipe.yaml", "checkpoint-*", "training_args.bin"))
    bare = Taxonomy.load(data / "taxonomy.json")
    Taxonomy(filler=bare.filler, remaps=bare.remaps, categories=bare.categories).save(work / "taxonomy.json")
    val = pd.read_csv(data / "val.csv", dtype=str)
    print(f"{len(val)} validation rows; model | template | mode | valid answers | allowed slots | score")
    for name, model, template in (("json fine-tuned elsewhere", plain, "json"),
                                  ("base, zero-shot", base, "json_with_values")):
        tpl = TEMPLATES / f"{template}.yaml"
        for mode in ("constrained", "free"):
            out = work / f"{template}-{mode}.csv"
            predict(model=model, csv=data / "val.csv", images=cat / "train_images", out=out, mode=mode,
                    taxonomy=work / "taxonomy.json", template=tpl, batch_size=16)
            final = score(truth=data / "val.csv", pred=out, json_out=work / f"{template}-{mode}.json")["final"]
            shares = (1.0, 1.0) if mode == "constrained" else valid_shares(
                model, with_template(bare, tpl), val, cat / "train_images")
            print(f"RESULT | {name} | {template} | {mode} | {shares[0]:.3f} | {shares[1]:.3f} | {final:.4f}")


if __name__ == "__main__":
    main()
