"""sft: what trains and what stays frozen, LoRA+, resume, shipped recipes on the CPU, two processes, errors."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_RECIPE, cli_exit_code, sft_with_nan_on_rank1, tiny_overrides
from safetensors.torch import load_file

from vlmtax.errors import VlmtaxError
from vlmtax.generate.model import load_model, prepare_model
from vlmtax.generate.trainer import build_trainer, loraplus_optimizer
from vlmtax.models.loading import Hardware
from vlmtax.sft import sft
from vlmtax.train.recipe import load_recipe

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def _recipe(model: Path, data: Path, out: Path, *extra: str, path: Path = TINY_RECIPE):
    return load_recipe(path, tiny_overrides(model, data, out, *extra))


def test_trainable_parameters_change_and_frozen_ones_do_not(tiny_model_dir, prepared_dir, tmp_path):
    recipe = _recipe(tiny_model_dir, prepared_dir, tmp_path / "run", "finetuning=lora", "train.max_steps=3",
                     "train.eval=false", "freeze.vision=true", "freeze.projector=true")
    model, processor = load_model(recipe, "fp32")
    model = prepare_model(model, recipe, "fp32")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "lm_head" in n for n in trainable)
    assert not any(".visual." in n for n in trainable)
    build_trainer(recipe, model, processor, "fp32").train()
    after = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert {n for n in trainable if "lora_B" in n} <= changed
    assert changed <= trainable
    assert not any(".visual." in n for n in changed)


def test_attn_implementation_reaches_the_model_and_trains(tiny_model_dir, prepared_dir, tmp_path):
    """The recipe's kernel is the one the language model and the vision tower run with; sdpa by default."""
    recipe = _recipe(tiny_model_dir, prepared_dir, tmp_path / "run", "attn_implementation=eager",
                     "train.max_steps=1", "train.eval=false")
    model, processor = load_model(recipe, "fp32")
    assert model.config._attn_implementation == "eager" and model.model.visual.config._attn_implementation == "eager"
    assert build_trainer(recipe, prepare_model(model, recipe, "fp32"), processor, "fp32").train().training_loss > 0
    default, _ = load_model(_recipe(tiny_model_dir, prepared_dir, tmp_path / "run2"), "fp32")
    assert default.config._attn_implementation == "sdpa"


def _require_grad_hooks(module: torch.nn.Module) -> int:
    return sum(getattr(h, "__name__", "").startswith("make_inputs_require_grad")
               for m in module.modules() for h in m._forward_hooks.values())


def test_a_frozen_tower_stays_out_of_the_backward_pass(tiny_model_dir, prepared_dir, tmp_path):
    """Gradient checkpointing hooks the tower's patch embedding so that its output requires grad, and the
    backward pass then ran through the frozen tower for nothing. Training takes the hook off (the language
    model's stays); the trained weights' gradients, the projector's included, are the same without it."""
    from vlmtax.generate.trainer import drop_frozen_tower_input_grads
    from vlmtax.generate.vision_cache import vision_tower

    recipe = _recipe(tiny_model_dir, prepared_dir, tmp_path / "run", "finetuning=lora", "freeze.vision=true",
                     "freeze.projector=false", "train.cache_vision=false", "train.gradient_checkpointing=true",
                     "train.max_steps=1", "train.eval=false", "lora.dropout=0.0")
    model, processor = load_model(recipe, "fp32")
    trainer = build_trainer(recipe, prepare_model(model, recipe, "fp32"), processor, "fp32")
    trainer.train()
    net, tower = trainer.model, vision_tower(trainer.model)
    assert _require_grad_hooks(tower) == 0 and _require_grad_hooks(net) >= 1
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    seen = {}

    def grads() -> dict[str, torch.Tensor]:
        net.zero_grad()
        handle = tower.patch_embed.register_forward_hook(lambda m, i, o: seen.update(grad=o.requires_grad))
        trainer.compute_loss(net, dict(batch)).backward()
        handle.remove()
        return {n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad}

    without = grads()
    assert seen["grad"] is False
    net.enable_input_require_grads()  # what gradient checkpointing does: the tower hooked again
    hooked = grads()
    assert seen["grad"] is True
    assert without.keys() == hooked.keys() and any(".merger." in n for n in without)
    for name, grad in without.items():
        torch.testing.assert_close(grad, hooked[name], rtol=0, atol=1e-6, msg=name)
    assert drop_frozen_tower_input_grads(net) == 1
    trained_tower = _recipe(tiny_model_dir, prepared_dir, tmp_path / "run2", "finetuning=lora", "freeze.vision=false")
    lora_tower = prepare_model(load_model(trained_tower, "fp32")[0], trained_tower, "fp32")
    lora_tower.enable_input_require_grads()
    assert drop_frozen_tower_input_grads(lora_tower) == 0  # LoRA in the tower needs the gradient to flow


def test_loraplus_groups_scale_the_b_matrices(tiny_model_dir, prepared_dir, tmp_path):
    recipe = _recipe(tiny_model_dir, prepared_dir, tmp_path / "run", "finetuning=lora", "lora.plus_ratio=16",
                     "train.lr=0.001")
    model, _ = load_model(recipe, "fp32")
    model = prepare_model(model, recipe, "fp32")
    optimizer = loraplus_optimizer(recipe)(model)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if "lora_B" in names[id(p)]:
                assert group["lr"] == pytest.approx(0.016)
            elif "lora_A" in names[id(p)]:
                assert group["lr"] == pytest.approx(0.001)
    assert any("lora_B" in names[id(p)] for g in optimizer.param_groups for p in g["params"])
    assert loraplus_optimizer(recipe.model_copy(update={"finetuning": "full"})) is None


# The GPU recipes differ from tiny_cpu only in values: slow-marked, so the inner loop trains once here.
@pytest.mark.parametrize("name", ["tiny_cpu.yaml", *(pytest.param(n, marks=pytest.mark.slow) for n in (
    "qwen2vl_2b.yaml", "qwen25vl_3b.yaml", "qwen3vl_4b.yaml", "qwen35_2b.yaml", "qwen2vl_7b_qlora.yaml"))])
def test_each_recipe_runs_two_steps_on_the_cpu(name, tiny_model_dir, prepared_dir, tmp_path):
    """Recipes for GPUs run here with their GPU-only features (liger, 4-bit) switched off."""
    extra = ["train.max_steps=2", "train.eval=false", "train.batch_size=2", "train.grad_accum=1",
             "train.liger=false", "quantization=null", "image.max_pixels=12544"]
    out = sft(RECIPES / name, tiny_overrides(tiny_model_dir, prepared_dir, tmp_path / "run", *extra))
    meta = json.loads((out / "vlmtax_meta.json").read_text())
    assert meta["global_step"] == 2 and meta["versions"]["transformers"]
    weights = ("model.safetensors",) if meta["finetuning"] == "full" else ("adapter_model.safetensors",
                                                                           "adapter_config.json")
    for f in (*weights, "taxonomy.json", "recipe.yaml", "chat_template.jinja", "processor_config.json",
              "tokenizer.json"):
        assert (out / f).is_file(), f


def test_full_finetuning_saves_weights(tiny_model_dir, prepared_dir, tmp_path):
    out = sft(TINY_RECIPE, tiny_overrides(tiny_model_dir, prepared_dir, tmp_path / "full", "finetuning=full",
                                          "train.max_steps=2", "train.eval=false", "train.lr=0.0001"))
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()


@pytest.mark.parametrize("finetuning", ["lora", "full"])
def test_resume_continues_at_the_saved_step_with_the_same_state(tiny_model_dir, prepared_dir, tmp_path, finetuning):
    """Also for full fine-tuning: Qwen2-VL's checkpoints use the legacy key names that transformers' resume
    loads non-strictly, so a resume that dropped the weights would train on from the base model."""
    common = [f"finetuning={finetuning}", "train.max_steps=4", "train.save_steps=2", "train.eval=false",
              "train.save_total_limit=3",
              "lora.dropout=0.0", "log.every=1"]
    straight = sft(TINY_RECIPE, tiny_overrides(tiny_model_dir, prepared_dir, tmp_path / "a", *common))
    interrupted = sft(TINY_RECIPE, tiny_overrides(tiny_model_dir, prepared_dir, tmp_path / "b", *common))
    # Simulate a crash after step 2: only checkpoint-2 survives.
    for p in list(interrupted.iterdir()):
        if p.name != "checkpoint-2":
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    with pytest.raises(VlmtaxError, match="resume=true"):
        sft(TINY_RECIPE, tiny_overrides(tiny_model_dir, prepared_dir, interrupted, *common))
    resumed = sft(TINY_RECIPE, tiny_overrides(tiny_model_dir, prepared_dir, interrupted, *common, "resume=true"))
    meta = json.loads((resumed / "vlmtax_meta.json").read_text())
    assert meta["global_step"] == 4
    assert meta["started_at_step"] == 2
    assert [h["step"] for h in meta["history"] if "loss" in h] == [1, 2, 3, 4]  # history restored, then continued
    weights = "adapter_model.safetensors" if finetuning == "lora" else "model.safetensors"
    a, b = load_file(straight / weights), load_file(resumed / weights)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_two_process_cpu_run(tiny_model_dir, prepared_dir, tmp_path):
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "vlmtax", "sft", str(TINY_RECIPE), "--num-processes", "2",
         *tiny_overrides(tiny_model_dir, prepared_dir, out, "finetuning=lora", "train.max_steps=2",
                         "train.eval=false", "freeze.vision=true", "freeze.projector=true")],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((out / "vlmtax_meta.json").read_text())
    assert meta["global_step"] == 2 and (out / "adapter_model.safetensors").is_file()
    # The vision cache (on: tower and projector frozen) is shared: each rank encodes its own half, once.
    found = re.findall(r"(\d+) encoded by process (\d)", proc.stderr)
    assert sorted(rank for _, rank in found) == ["0", "1"], proc.stderr[-3000:]
    encoded = [int(n) for n, _ in found]
    [folder] = (out / "vision_cache").iterdir()
    assert len(encoded) == 2 and all(encoded) and sum(encoded) == len(list(folder.glob("*.safetensors")))


@pytest.mark.slow
def test_nan_on_one_rank_stops_every_rank_with_the_same_error(tiny_model_dir, prepared_dir, tmp_path):
    """Rank 1 alone sees a NaN loss; both ranks must stop with one same error instead of rank 0 hanging."""
    errors = sft_with_nan_on_rank1(TINY_RECIPE, tiny_overrides(tiny_model_dir, prepared_dir, tmp_path / "nan",
                                                               "finetuning=lora", "train.max_steps=2",
                                                               "train.eval=false"))
    assert len(set(errors)) == 1, errors
    assert "non-finite loss at step 0 on 1 of 2 processes" in errors[0]


def _cli_sft(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlmtax", "sft", str(TINY_RECIPE), *args],
                          capture_output=True, text=True, timeout=300)


def test_one_line_errors(tiny_model_dir, prepared_dir, tmp_path, capsys):
    """One case through `python -m vlmtax` (the real entry point, a fresh interpreter), the others through the
    console script's own function in this process (the same code, without a torch import per case)."""
    def one_error_line(stderr: str, needle: str) -> None:
        lines = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in stderr, stderr

    proc = _cli_sft(*tiny_overrides(tiny_model_dir, tmp_path / "nodata", tmp_path / "o1"))
    assert proc.returncode == 2, proc.stderr
    one_error_line(proc.stderr, "data dir")
    cases = {
        "does not exist": tiny_overrides(tmp_path / "nomodel", prepared_dir, tmp_path / "o2"),
        "unknown recipe key": tiny_overrides(tiny_model_dir, prepared_dir, tmp_path / "o3", "train.lrate=1"),
    }
    for needle, args in cases.items():
        capsys.readouterr()
        assert cli_exit_code(["sft", str(TINY_RECIPE), *args]) == 2
        one_error_line(capsys.readouterr().err, needle)
        assert not (tmp_path / f"o{2 + list(cases).index(needle)}").exists()


def test_cpu_hardware_detected():
    assert Hardware.detect().cuda == torch.cuda.is_available()


def test_batches_mix_categories_unless_grouped_by_length(tiny_model_dir, prepared_dir, tmp_path):
    """A record's length follows its category, so length-grouped batches hold one category each (on the demo
    catalogue the model then learned the priors and nothing from the images); the default draws at random."""
    records = json.loads((prepared_dir / "train.json").read_text())

    def batches(*extra: str) -> list[set[str]]:
        recipe = _recipe(tiny_model_dir, prepared_dir, tmp_path / "run", "train.batch_size=8", *extra)
        model, processor = load_model(recipe, "fp32")
        trainer = build_trainer(recipe, model, processor, "fp32")
        order = list(trainer._get_train_sampler())
        return [{records[i]["category"] for i in order[s:s + 8]} for s in range(0, len(order) - 7, 8)]

    assert _recipe(tiny_model_dir, prepared_dir, tmp_path).train.group_by_length is False
    mixed, grouped = batches(), batches("train.group_by_length=true")
    assert sum(len(cats) > 1 for cats in mixed) >= len(mixed) - 1
    assert sum(map(len, grouped)) < sum(map(len, mixed))
