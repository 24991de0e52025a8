"""The sft verb: a recipe -> a run dir, by its task: `generate` (a VLM, generate/train.py) or `classify` (a
backbone with heads, heads/train.py). Several processes: the same command under `accelerate launch`."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

from vlmtax.data.records import check_data_dir
from vlmtax.errors import VlmtaxError
from vlmtax.fileio import disk_full, remove_new_entries
from vlmtax.models.loading import Hardware
from vlmtax.runlog import TRAIN_LOG, library_output
from vlmtax.train.recipe import load_recipe
from vlmtax.train.run import check_logging, output_dir_state
from vlmtax.train.schema import Recipe


def _relaunch(recipe_path: Path, overrides: list[str], num_processes: int) -> None:
    """Data-parallel run: `accelerate launch` this same command (gloo on the CPU, NCCL on GPUs).

    `--multi_gpu` is accelerate's torchrun launcher on the CPU too: its `--cpu` launcher starts ONE process
    whatever --num_processes says. The ranks then find no GPU and join over gloo (training_args: use_cpu)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu"]
    cmd += ["-m", "vlmtax", "sft", str(recipe_path), *overrides]
    proc = subprocess.run(cmd, env={**os.environ, "VLMTAX_LAUNCHED": "1"})
    if proc.returncode != 0:
        raise VlmtaxError(f"distributed training exited with code {proc.returncode}", "see the log above")


def sft(recipe_path: str | Path, overrides: list[str] | None = None, num_processes: int = 1) -> Path:
    """Fine-tune as the recipe says; returns the run dir."""
    recipe = load_recipe(recipe_path, overrides)
    launched = "VLMTAX_LAUNCHED" in os.environ or "LOCAL_RANK" in os.environ
    if not launched:
        from vlmtax.data.records import load_records
        from vlmtax.models.loading import useful_processes

        if num_processes > 1:
            check_data_dir(recipe.data)  # before counting its rows
        rows = len(load_records(recipe.data, "train.json")) if num_processes > 1 else 1
        num_processes = useful_processes(num_processes, math.ceil(rows / recipe.train.batch_size), "batch", "sft")
    if num_processes > 1 and not launched:
        _check_before_launch(recipe)
        _relaunch(Path(recipe_path), list(overrides or []), num_processes)
        return recipe.output_dir
    return train(recipe)


def _check_before_launch(recipe: Recipe) -> None:
    """Every check that needs no weights, before spawning: each rank would otherwise print the same error."""
    output_dir_state(recipe)  # refuse a finished or interrupted run before spawning processes
    check_logging(recipe)
    if recipe.task == "classify":
        from vlmtax.heads.train import check_classify_recipe

        check_classify_recipe(recipe)
    else:
        from vlmtax.generate.model import check_lora_targets

        check_lora_targets(recipe)


def train(recipe: Recipe, hw: Hardware | None = None) -> Path:
    """Train either route in this process (one rank of a launched run, or the only process). The libraries'
    logs, warnings and bars go to the run dir's train.log (vlmtax.runlog), not to the terminal."""
    out = recipe.output_dir
    before = {p.name for p in out.iterdir()} if out.is_dir() else None
    try:
        with library_output(out / TRAIN_LOG):
            return _train(recipe, hw or Hardware.detect())
    except BaseException as exc:
        failed = disk_full(exc, out)
        if failed is not None and os.environ.get("RANK", "0") == "0":  # no half-written weights or checkpoint left
            remove_new_entries(out, before)
        if failed is not None:
            raise VlmtaxError(f"{failed.problem}; {out} is left as it was before this run", failed.fix) from None
        # a run refused before it began leaves no run dir behind, not even the log of its refusal
        if before is None and out.is_dir() and [p.name for p in out.iterdir()] == [TRAIN_LOG]:
            shutil.rmtree(out)
        raise
    finally:
        close_process_group()


def close_process_group() -> None:
    """Tear down torch.distributed before the interpreter exits: a gloo group left to the exit-time destructors
    aborted a rank ("terminate called without an active exception", exit -6) after a finished run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _train(recipe: Recipe, hw: Hardware) -> Path:
    if recipe.task == "classify":
        from vlmtax.heads.train import train_classify

        return train_classify(recipe, hw)
    from vlmtax.generate.train import train_generate

    return train_generate(recipe, hw)
