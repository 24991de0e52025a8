"""The sft stage for `task: classify`: prepared records -> backbone + heads -> transformers.Trainer -> run dir.

Modes: `frozen` (features extracted once through the on-disk cache, then only the heads train),
`lora` (PEFT LoRA on the backbone, heads trained fully), `full` (everything, the backbone at its own
learning rate). `heads.kind: knn` trains nothing: the training features become the vote bank.

Run dir: heads.safetensors (+ backbone.safetensors for lora/full, LoRA folded in; knn.safetensors for
knn), classifier.json (the head layout and how to rebuild the model), the image processor,
taxonomy.json, recipe.yaml, vlmtax_meta.json (written last) and Trainer checkpoint-N folders.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from vlmtax.errors import VlmtaxError
from vlmtax.fileio import save_safetensors, write_json
from vlmtax.heads.data import ClassifyData, load_classify_data
from vlmtax.heads.model import BACKBONE_WEIGHTS, CLASSIFIER_FILE, HEADS_WEIGHTS, KNN_BANK, Classifier, Heads
from vlmtax.meta import META_FILE, files_hash, run_meta
from vlmtax.models.backbone import (
    feature_dim,
    load_encoder,
    load_image_processor,
    resize_timm,
    save_processor,
    set_qwen_pixels,
)
from vlmtax.models.loading import DTYPES
from vlmtax.train.recipe import dump_recipe
from vlmtax.train.run import output_dir_state, resolve_precision, train_runtime
from vlmtax.train.schema import Recipe


def check_classify_recipe(recipe: Recipe) -> None:
    h = recipe.heads
    if h.kind == "knn" and h.mode != "frozen":
        raise VlmtaxError(f"heads.kind=knn votes over frozen features, but heads.mode={h.mode}",
                          "set heads.mode=frozen for knn, or heads.kind=mlp|linear to fine-tune")
    if recipe.quantization:
        raise VlmtaxError("quantization is for the generate route's language model", "set quantization=null")
    if recipe.attn_implementation != "sdpa":
        raise VlmtaxError(f"attn_implementation={recipe.attn_implementation} is for the generate route's model",
                          "leave it out with task: classify (the backbone loads with transformers' own attention)")


def check_attribute_weights(recipe: Recipe, taxonomy: Any) -> None:
    """heads.attribute_weights keys name an attribute (`color`) or one category's (`Sarees/color`) of the data:
    a misspelt key would otherwise leave every weight at 1 without a word."""
    pairs = {f"{c.name}/{a.name}" for c in taxonomy.categories.values() for a in c.attributes}
    names = {p.split("/", 1)[1] for p in pairs}
    unknown = [k for k in recipe.heads.attribute_weights if k not in pairs and k not in names]
    if unknown:
        import difflib

        near = difflib.get_close_matches(unknown[0], sorted(names | pairs), n=1, cutoff=0.5)
        raise VlmtaxError(f"heads.attribute_weights names {unknown[0]!r}, which is no attribute of {recipe.data}"
                          + (f" (did you mean {near[0]!r}?)" if near else ""),
                          f"use attribute names ({', '.join(sorted(names))}) or Category/attribute")


def encoder_dtype(recipe: Recipe, precision: str) -> torch.dtype:
    """Frozen features are extracted in the run's precision; trained weights stay fp32 under autocast."""
    return DTYPES[precision] if recipe.heads.mode == "frozen" else torch.float32


def linear_modules(encoder: torch.nn.Module) -> list[str]:
    """Full names of the backbone's linear maps, as its kind defines them (backbone.KINDS): nn.Linear, and for
    timm also 1x1 ungrouped convolutions (a convnet's pointwise layers). Full names: a leaf name such as
    `proj` can also be a ViT's patch-embedding convolution."""
    types = encoder.kind.lora_types
    return [n for n, m in encoder.model.named_modules() if isinstance(m, types)
            and (not isinstance(m, torch.nn.Conv2d) or (m.kernel_size == (1, 1) and m.groups == 1))]


def lora_encoder(encoder: torch.nn.Module, recipe: Recipe) -> torch.nn.Module:
    """LoRA on the backbone's linear layers (`lora.target: all-linear`) or the named ones."""
    import sys

    from peft import LoraConfig, get_peft_model

    target = recipe.lora.target
    names = sorted({n.rsplit(".", 1)[-1] for n in linear_modules(encoder)})
    if target == "all-linear":  # full names: leaf names such as a Sequential's "0" also hit `blocks.0`
        target = linear_modules(encoder)
        if not target:
            raise VlmtaxError("lora.target=all-linear wraps nothing: the backbone has no linear layers",
                              "use heads.mode=full or frozen, or name modules in lora.target")
    config = LoraConfig(r=recipe.lora.rank, lora_alpha=recipe.lora.alpha, lora_dropout=recipe.lora.dropout,
                        target_modules=target)
    try:
        encoder.model = get_peft_model(encoder.model, config)
    except ValueError as exc:
        if "not found" not in str(exc) and "not supported" not in str(exc):
            raise
        raise VlmtaxError(f"lora.target={recipe.lora.target} wraps nothing LoRA supports in the backbone",
                          f"name some of its linear layers: {', '.join(names[:12]) or '(none: use heads.mode=full)'}"
                          ) from None
    wrapped = [n.rsplit(".", 1)[-1] for n, m in encoder.model.named_modules() if hasattr(m, "lora_A")]
    sys.stderr.write(f"LoRA on the backbone: {len(wrapped)} modules named {', '.join(sorted(set(wrapped)))}\n")
    return encoder


def build_classifier(recipe: Recipe, data: ClassifyData, precision: str, device: torch.device | None = None):
    """(classifier, image processor, feature dim); the encoder is left out of a frozen classifier."""
    processor = load_image_processor(recipe.model, recipe.trust_remote_code)
    set_qwen_pixels(processor, recipe.image.min_pixels, recipe.image.max_pixels)
    processor = resize_timm(processor, recipe.image.size, recipe.image.crop_pct)
    encoder = load_encoder(recipe.model, encoder_dtype(recipe, precision), recipe.trust_remote_code)
    if device is not None:
        encoder.to(device)
    dim = feature_dim(encoder, processor)
    h = recipe.heads
    heads = Heads(data.layout, dim, kind="linear" if h.kind == "knn" else h.kind, width=h.width,
                  dropout=h.dropout, trunk=h.trunk)
    if h.mode == "frozen":
        encoder.requires_grad_(False)
        return Classifier(heads), processor, dim, encoder
    if h.mode == "lora":
        encoder = lora_encoder(encoder, recipe)
    return Classifier(heads, encoder), processor, dim, encoder


def train_classify(recipe: Recipe, hw: Any) -> Path:
    from transformers import set_seed

    from vlmtax.heads.trainer import build_heads_trainer
    from vlmtax.models.loading import training_device

    check_classify_recipe(recipe)
    precision = resolve_precision(recipe, hw)
    resume_from = output_dir_state(recipe)
    data = load_classify_data(recipe.data)
    check_attribute_weights(recipe, data.taxonomy)
    set_seed(recipe.train.seed)
    model, processor, dim, encoder = build_classifier(recipe, data, precision, training_device(hw))
    if recipe.heads.kind == "knn":
        from vlmtax.heads.knn import fit_knn

        bank = fit_knn(recipe, data, encoder, processor)
        save_classify_run(recipe, processor, dim, precision, model, knn_bank=bank, step=0, history=[])
        return recipe.output_dir
    trainer = build_heads_trainer(recipe, model, data, encoder, processor, precision)
    if recipe.heads.mode == "frozen":
        del encoder  # the features are extracted: training steps never touch the backbone again
    threads = torch.get_num_threads()
    # Heads alone are a few small matmuls per step: CPU threads spend longer synchronising than
    # computing (measured 10x faster on one thread on the 2-core machine), so frozen mode takes one.
    want = recipe.heads.cpu_threads or (1 if recipe.heads.mode == "frozen" else None)
    if want and not hw.cuda:
        torch.set_num_threads(want)
    try:
        trainer.train(resume_from_checkpoint=resume_from)
    finally:
        torch.set_num_threads(threads)
    if trainer.is_world_process_zero():
        history = [x for x in trainer.state.log_history if "loss" in x or "eval_loss" in x]
        save_classify_run(recipe, processor, dim, precision, trainer.accelerator.unwrap_model(trainer.model),
                          step=trainer.state.global_step, history=history, start=trainer.start_step.step,
                          cached=getattr(trainer, "features_extracted", None),
                          runtime=train_runtime(trainer.state.log_history),
                          eval_metric=trainer.metric_callback.summary() if trainer.metric_callback else None)
    return recipe.output_dir


def classifier_spec(recipe: Recipe, dim: int, layout: list) -> dict[str, Any]:
    base = str(Path(recipe.model).resolve()) if Path(recipe.model).exists() else recipe.model
    h = recipe.heads
    return {"task": "classify", "backbone": base, "mode": h.mode, "kind": h.kind, "dim": dim, "width": h.width,
            "dropout": h.dropout, "trunk": h.trunk, "k": h.k, "trust_remote_code": recipe.trust_remote_code,
            "trained_backbone": h.mode != "frozen" and h.kind != "knn",
            "layout": [{"category": s.category, "attribute": s.attribute, "slot": s.slot, "values": list(s.values)}
                       for s in layout]}


def save_classify_run(recipe: Recipe, processor: Any, dim: int, precision: str, model: Classifier,
                      step: int, history: list, start: int | None = 0, knn_bank: dict | None = None,
                      cached: int | None = None, runtime: float | None = None,
                      eval_metric: dict[str, Any] | None = None) -> None:
    out = recipe.output_dir
    out.mkdir(parents=True, exist_ok=True)
    spec = classifier_spec(recipe, dim, model.heads.layout)

    def save(name: str, tensors: dict[str, torch.Tensor]) -> None:
        save_safetensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, out / name)

    if knn_bank is not None:
        save(KNN_BANK, knn_bank)
    else:
        save(HEADS_WEIGHTS, model.heads.state_dict())
    if spec["trained_backbone"]:
        encoder = model.encoder
        if recipe.heads.mode == "lora":
            encoder.model = encoder.model.merge_and_unload()  # a plain backbone: predict needs no PEFT
        save(BACKBONE_WEIGHTS, encoder.state_dict())
    save_processor(processor, out)
    write_json(out / CLASSIFIER_FILE, spec, indent=1)
    shutil.copyfile(recipe.data / "taxonomy.json", out / "taxonomy.json")
    (out / "recipe.yaml").write_text(dump_recipe(recipe))
    data_files = [recipe.data / n for n in ("train.json", "val.json", "taxonomy.json") if (recipe.data / n).exists()]
    write_json(out / META_FILE, run_meta(
        stage="sft", task="classify", base_model=spec["backbone"], finetuning=recipe.heads.mode,
        heads_kind=recipe.heads.kind, precision=precision, trust_remote_code=recipe.trust_remote_code,
        quantization=None, data=str(recipe.data.resolve()), data_sha256=files_hash(data_files),
        global_step=step, started_at_step=start, features_extracted=cached, train_runtime_s=runtime,
        eval_metric=eval_metric,
        final_loss=next((x["loss"] for x in reversed(history) if "loss" in x), None), history=history))
