"""Shared fixtures: a tiny Qwen2-VL, a synthetic catalogue, its prepared dataset, a short trained run.

All built at test time (no hub, no network), once per session.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
TINY_RECIPE = REPO / "recipes" / "tiny_cpu.yaml"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from vlmtax.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    from vlmtax.synth import synth

    return synth(tmp_path_factory.mktemp("synth") / "catalogue", rows=120, test_rows=30, seed=0, image_size=56)


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory, synth_dir: Path, tiny_model_dir: Path) -> Path:
    from vlmtax.prepare import prepare

    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare(csv=synth_dir / "train.csv", images=synth_dir / "train_images",
            attributes=synth_dir / "category_attributes.parquet", out=out, model=tiny_model_dir,
            remaps=["Sarees:attr_1<->attr_4"], val_fraction=0.1, workers=1)
    return out


def tiny_overrides(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """Overrides that point the tiny_cpu recipe at test folders."""
    return [f"model={model}", f"data={data}", f"output_dir={out}", *extra]


@pytest.fixture(scope="session")
def trained_run_dir(tmp_path_factory, tiny_model_dir: Path, prepared_dir: Path) -> Path:
    from vlmtax.sft import sft

    out = tmp_path_factory.mktemp("run") / "run"
    return sft(TINY_RECIPE, tiny_overrides(tiny_model_dir, prepared_dir, out, "train.max_steps=20", "train.eval=false"))
