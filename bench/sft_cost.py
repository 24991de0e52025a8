"""Cost model of one training step of the shipped recipes on the real checkpoints, without their weights.

Qwen2-VL-2B, Qwen2-VL-7B, Qwen2.5-VL-3B, Qwen3-VL-4B and Qwen3.5-2B are built on the meta device from
their published `config.json` (copies in bench/configs/, sources in bench/configs/README.md), LoRA is
attached with the same targets `vlmtax sft` uses (vlmtax.models.families), and one training step (vision
forward, language forward, loss, backward) runs on shape-only tensors. For each recipe it reports:

- FLOPs per step, counted by `torch.utils.flop_counter`, split into the vision tower, the language model
  and `lm_head` (+ loss), with gradient checkpointing on and off (its recompute shows in the backward);
- bytes of weights (16-bit, or NF4 with double quantisation for QLoRA's language-model linears),
  of the trainable weights, their gradients and AdamW state (fp32);
- activation memory: every tensor autograd saves for the backward, counted once per storage, with
  checkpointing off; with it on, the layer inputs plus one layer's saved tensors (the recompute);
- what each lever saves: answer-only logits (vlmtax's loss) vs logits on every position, the vision
  cache (the tower never runs and need not sit on the GPU), and packing (removes `--padding` of the tokens).
  A lever the family table refuses (vlmtax/models/families.py: both, for Qwen3-VL and Qwen3.5) is reported as
  not applicable, with no saving.

    python bench/sft_cost.py [--recipe recipes/qwen2vl_2b.yaml ...] [--prompt-tokens 80] [--answer-tokens 48]
                             [--photo 512x683] [--padding 0.1] [--json FILE] [train.batch_size=N ...]

Assumptions (all arguments): one 512 x 683 product photo per record (the Meesho catalogue's size, as in
bench/prepare.py), resized into the recipe's pixel budget as the processor does; 80 prompt tokens (chat
template + instruction) and 48 answer tokens. Estimated peak = weights + trainable states + saved
activations + the largest backward transient (the fp32 logit gradient); compared with
`torch.cuda.max_memory_allocated` it leaves out the CUDA context and allocator slack, so "fits" keeps
1 GiB of the card free. QLoRA FLOPs are counted as 16-bit matmuls (dequantisation excluded). Qwen3-VL's
DeepStack features are computed (their mergers are in the vision FLOPs) but not added into the first
language layers: the addition has no matmul and saves no tensor for the backward. Qwen3.5's gated-delta-net
layers run transformers' PyTorch reference path (flash-linear-attention's Triton kernels cannot run on the
meta device), so their FLOPs and saved tensors are that path's, an approximation of the fused GPU kernel's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = Path(__file__).resolve().parent / "configs"
RECIPES = [ROOT / "recipes" / n for n in ("qwen2vl_2b.yaml", "qwen25vl_3b.yaml", "qwen2vl_7b_qlora.yaml",
                                          "qwen3vl_4b.yaml", "qwen35_2b.yaml")]
GIB = 1024**3
# Usable memory as nvidia-smi reports it (15360 MiB on a 16 GB T4, 23034 MiB on a 24 GB L4), minus 1 GiB
# for the CUDA context and allocator slack that max_memory_allocated does not see.
CARDS = {"T4-16GB": 15360 / 1024 - 1, "L4-24GB": 23034 / 1024 - 1}
# bitsandbytes NF4 with double quantisation: 4 bits a weight, an 8-bit absmax per 64 weights and an fp32
# constant per 256 absmax blocks.
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
LM_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def load_config(path: Path) -> Any:
    from transformers import AutoConfig

    data = json.loads(path.read_text())
    return AutoConfig.for_model(data.pop("model_type"), **data)


def config_for(model: str) -> Path:
    """bench/configs/<last part of the hub id>.json, or a local model folder's config.json."""
    local = Path(model) / "config.json"
    if local.is_file():
        return local
    path = CONFIGS / f"{model.rstrip('/').split('/')[-1]}.json"
    if not path.is_file():
        sys.exit(f"error: no config for {model} in {CONFIGS} (fix: add its published config.json there)")
    return path


def gpu_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any,
                  dropout: float = 0.0, scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Causal attention through the memory-efficient SDPA kernel a GPU runs (T4 and up): on the meta device
    plain SDPA takes the math path, which saves the (tokens x tokens) probabilities no GPU kernel keeps."""
    from transformers.integrations.sdpa_attention import repeat_kv

    groups = query.shape[1] // key.shape[1]
    out = torch.ops.aten._scaled_dot_product_efficient_attention(
        query, repeat_kv(key, groups), repeat_kv(value, groups), None, True, dropout, True, scale=scaling)[0]
    return out.transpose(1, 2), None


def build(config: Any, recipe: Any, dtype: torch.dtype) -> Any:
    """The model on the meta device with the recipe's LoRA adapters (vlmtax's own target regex), all in the
    16-bit compute dtype: under autocast the fp32 adapters compute in 16 bits too, so activations are 16-bit."""
    from peft import get_peft_model
    from transformers import AttentionInterface, AutoModelForImageTextToText

    from vlmtax.generate.model import lora_config

    AttentionInterface.register("vlmtax_gpu_sdpa", gpu_attention)
    config.text_config._attn_implementation = "vlmtax_gpu_sdpa"
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    model = get_peft_model(model, lora_config(recipe, model)).to(dtype)
    model.train()
    return model


def image_grid(config: Any, photo: tuple[int, int], min_pixels: int, max_pixels: int) -> torch.Tensor:
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    v = config.vision_config
    factor = v.patch_size * v.spatial_merge_size
    height, width = smart_resize(photo[1], photo[0], factor, min_pixels, max_pixels)
    return torch.tensor([[1, height // v.patch_size, width // v.patch_size]])


def vision_forward(model: Any, grid: torch.Tensor, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """The frozen tower on `batch` images; precomputed index tensors stand in for its data-dependent ones."""
    from transformers import vision_utils as vu

    vis = model.base_model.model.model.visual
    grid = grid.repeat(batch, 1)
    v = vis.config
    patches = int(grid.prod(-1).sum())
    pixels = torch.empty(patches, v.in_channels * v.temporal_patch_size * v.patch_size**2, device="meta", dtype=dtype)
    kwargs: dict[str, Any] = {"position_ids": vu.get_vision_position_ids(grid, vis.spatial_merge_size).to("meta")}
    if hasattr(vis, "window_size"):  # Qwen2.5-VL's windowed attention
        index, cu_window = vu.get_vision_window_index(grid, vis.spatial_merge_size, vis.window_size, vis.patch_size)
        kwargs.update(window_index=index.to("meta"), cu_window_seqlens=cu_window)
    if hasattr(vis, "num_grid_per_side"):  # Qwen3-VL / Qwen3.5: learned position table resampled to the grid
        index, weight = vu.get_vision_interpolation_indices_and_weights(
            grid, vis.num_grid_per_side, vis.interpolation_mode, vis.interpolation_align_corners,
            vis.spatial_merge_size)
        kwargs.update(interp_indices=index.to("meta"), interp_weights=weight.to("meta"))
    with torch.no_grad():
        merged = vis(pixels, grid_thw=grid, **kwargs).pooler_output
    return merged, patches


class SavedBytes:
    """Bytes autograd saves for the backward, once per storage, parameters excluded; split by decoder layer."""

    def __init__(self, model: Any, layers: Any):
        self.params = {p.untyped_storage()._cdata for p in model.parameters()}
        self.seen: dict[int, torch.Tensor] = {}
        self.by_layer = [0] * len(layers)
        self.outside = 0
        self.layer: int | None = None
        self.handles = []
        for i, layer in enumerate(layers):
            self.handles.append(layer.register_forward_pre_hook(lambda *_, i=i: setattr(self, "layer", i)))
            self.handles.append(layer.register_forward_hook(lambda *_: setattr(self, "layer", None)))

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        if key not in self.params and key not in self.seen:
            self.seen[key] = t
            if self.layer is None:
                self.outside += t.untyped_storage().nbytes()
            else:
                self.by_layer[self.layer] += t.untyped_storage().nbytes()
        return t

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _count(fn) -> tuple[Any, int]:
    with FlopCounterMode(display=False) as counter:
        out = fn()
    return out, counter.get_total_flops()


def head_step(head: Any, hidden: torch.Tensor, positions: int, model: Any) -> tuple[dict[str, int], torch.Tensor]:
    """lm_head + fp32 cross-entropy on the last `positions` positions, forward and backward."""
    h = hidden.detach().requires_grad_()
    saved = SavedBytes(model, [])
    targets = torch.zeros(h.shape[0] * positions, dtype=torch.long, device="meta")

    def step() -> torch.Tensor:
        logits = head(h[:, h.shape[1] - positions - 1:-1]).float()
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets).backward()
        return logits

    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        logits, flops = _count(step)
    saved.close()
    # The backward's largest transient: the fp32 gradient of the logits, next to the saved fp32 logits.
    return {"flops": flops, "saved": saved.outside, "transient": logits.numel() * 4}, h.grad


def language_step(model: Any, batch: int, seq: int, answer: int, checkpointing: bool) -> dict[str, Any]:
    """Language model forward, both loss heads, language backward; FLOPs of each part and saved bytes."""
    inner = model.base_model.model
    lm = inner.model.language_model
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.activation_checkpointing_disable()
    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    positions = torch.zeros(3, batch, seq, dtype=torch.long, device="meta")
    saved = SavedBytes(model, lm.layers)
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        hidden, forward = _count(lambda: lm(inputs_embeds=lm.embed_tokens(ids), position_ids=positions,
                                            use_cache=False).last_hidden_state)
    saved.close()
    heads = {}
    for name, n in (("answer", answer), ("all", seq - 1)):
        heads[name], grad = head_step(inner.lm_head, hidden, n, model)
    _, backward = _count(lambda: hidden.backward(grad))
    return {"forward": forward, "backward": backward, "heads": heads, "outside": saved.outside,
            "by_layer": saved.by_layer, "layer_input": batch * seq * lm.config.hidden_size * hidden.element_size(),
            "layers": len(lm.layers)}


def weight_bytes(model: Any, quantization: str | None) -> dict[str, float]:
    """Frozen weights by part (4-bit: the language model's linear weights in NF4), trainable weights."""
    out = {"vision": 0.0, "language": 0.0, "trainable": 0.0}
    for name, p in model.named_parameters():
        if p.requires_grad:
            out["trainable"] += p.numel() * 4
            continue
        quantised = (quantization and ".language_model." in name and name.endswith("base_layer.weight")
                     and name.split(".")[-3] in LM_LINEAR)
        per = (NF4_BYTES if quantization == "4bit" else 1.0) if quantised else p.element_size()
        out["vision" if ".visual." in name else "language"] += p.numel() * per
    return out


def estimate(recipe: Any, args: argparse.Namespace, dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """Every figure of one recipe (see the module docstring)."""
    from vlmtax.models.families import family_of

    config = load_config(config_for(recipe.model))
    model = build(config, recipe, dtype)
    b = recipe.train.batch_size
    grid = image_grid(config, args.photo, recipe.image.min_pixels, recipe.image.max_pixels)
    merge = config.vision_config.spatial_merge_size ** 2
    image_tokens = int(grid.prod()) // merge
    seq = args.prompt_tokens + image_tokens + args.answer_tokens
    _, vision = _count(lambda: vision_forward(model, grid, b, dtype))
    runs = {gc: language_step(model, b, seq, args.answer_tokens, gc) for gc in (False, True)}
    weights = weight_bytes(model, recipe.quantization)
    return summarise(recipe, args, weights, vision, runs, image_tokens, seq, int(grid.prod()), family_of(config))


def activations(run: dict[str, Any], head: dict[str, int], checkpointing: bool) -> int:
    """Saved tensors at the end of the forward: every layer's, or (checkpointing) the layer inputs plus one
    layer's during its recompute; plus what lies outside the layers and the loss head's."""
    layers = run["layer_input"] * run["layers"] + max(run["by_layer"]) if checkpointing else sum(run["by_layer"])
    return run["outside"] + layers + head["saved"]


def summarise(recipe: Any, args: argparse.Namespace, weights: dict[str, float], vision: int,
              runs: dict[bool, dict[str, Any]], image_tokens: int, seq: int, patches: int,
              family: Any) -> dict[str, Any]:
    gc = recipe.train.gradient_checkpointing
    run, b = runs[gc], recipe.train.batch_size
    answer, full = run["heads"]["answer"], run["heads"]["all"]
    language = run["forward"] + run["backward"]
    static = weights["vision"] + weights["language"] + 4 * weights["trainable"]  # + grad + 2 AdamW moments

    def peak(head: dict[str, int], checkpointing: bool) -> float:
        return static + activations(runs[False], head, checkpointing) + head["transient"]

    est = peak(answer, gc)
    padded = args.padding / (1 - args.padding)  # extra tokens per real token when rows are padded
    return {
        "recipe": recipe_name(recipe), "model": recipe.model, "family": family.label, "batch_size": b,
        "max_pixels": recipe.image.max_pixels,
        "quantization": recipe.quantization, "gradient_checkpointing": gc, "vision_patches_per_image": patches,
        "image_tokens": image_tokens, "tokens_per_record": seq,
        "flops": {"vision": vision, "language": language, "lm_head": answer["flops"],
                  "language_checkpointing_off": runs[False]["forward"] + runs[False]["backward"],
                  "language_checkpointing_on": runs[True]["forward"] + runs[True]["backward"]},
        "bytes": {"weights_vision": weights["vision"], "weights_language": weights["language"],
                  "trainable": weights["trainable"], "gradients": weights["trainable"],
                  "optimizer": 2 * weights["trainable"],
                  "activations_checkpointing_on": activations(runs[False], answer, True),
                  "activations_checkpointing_off": activations(runs[False], answer, False)},
        "peak_bytes": est, "peak_bytes_checkpointing_off": peak(answer, False) if gc else est,
        "fits": {card: est / GIB <= cap for card, cap in CARDS.items()},
        "levers": {
            "answer_only_logits": {"flops": full["flops"] - answer["flops"], "bytes": peak(full, gc) - est},
            "vision_cache": lever(family.vision_cache, {"flops": vision, "bytes": weights["vision"]}),
            "packing": {"padding": args.padding, **lever(family.packing, {
                "flops": round(padded * (language + answer["flops"])),
                "bytes": round(padded * (est - static - answer["transient"]))})},
        },
    }


def lever(applicable: bool, saving: dict[str, float]) -> dict[str, Any]:
    """A lever's saving, or None figures where the family table refuses it (vlmtax/models/families.py: the vision
    cache misses Qwen3-VL's DeepStack features, packing would carry Qwen3.5's recurrent state across records)."""
    return {"applicable": applicable, **(saving if applicable else dict.fromkeys(saving))}


def recipe_name(recipe: Any) -> str:
    return Path(recipe.output_dir).name


def report(r: dict[str, Any]) -> str:
    f, by, lv = r["flops"], r["bytes"], r["levers"]
    total = f["vision"] + f["language"] + f["lm_head"]
    gb, tf = (lambda x: f"{x / GIB:.2f} GiB"), (lambda x: f"{x / 1e12:.2f} TFLOP")
    fits = ", ".join(f"{card} {'yes' if ok else 'no'}" for card, ok in r["fits"].items())
    return "\n".join([
        f"{r['recipe']}: {r['model']}, batch {r['batch_size']}, max_pixels {r['max_pixels']} "
        f"({r['image_tokens']} image tokens, {r['tokens_per_record']} tokens a record), "
        f"quantization {r['quantization']}, checkpointing {'on' if r['gradient_checkpointing'] else 'off'}",
        f"  FLOPs per step {tf(total)}: vision {tf(f['vision'])} ({f['vision'] / total:.1%}), language "
        f"{tf(f['language'])} ({f['language'] / total:.1%}), lm_head+loss {tf(f['lm_head'])} "
        f"({f['lm_head'] / total:.1%}); language with checkpointing off/on {tf(f['language_checkpointing_off'])}"
        f" / {tf(f['language_checkpointing_on'])}",
        f"  weights: vision {gb(by['weights_vision'])}, language {gb(by['weights_language'])}; trainable "
        f"{gb(by['trainable'])} + gradients {gb(by['gradients'])} + AdamW {gb(by['optimizer'])}",
        f"  activations: checkpointing on {gb(by['activations_checkpointing_on'])}, off "
        f"{gb(by['activations_checkpointing_off'])}",
        f"  estimated peak {gb(r['peak_bytes'])} (checkpointing off: {gb(r['peak_bytes_checkpointing_off'])}); "
        f"fits: {fits}",
        f"  levers: answer-only logits save {tf(lv['answer_only_logits']['flops'])} and "
        f"{gb(lv['answer_only_logits']['bytes'])}; " + (
            f"the vision cache saves {tf(lv['vision_cache']['flops'])} (and {gb(lv['vision_cache']['bytes'])} "
            "if the tower stays off the GPU)" if lv["vision_cache"]["applicable"] else
            f"the vision cache: not applicable to {r['family']}") + "; " + (
            f"packing at {lv['packing']['padding']:.0%} padding saves {tf(lv['packing']['flops'])} and "
            f"{gb(lv['packing']['bytes'])}" if lv["packing"]["applicable"] else
            f"packing: not applicable to {r['family']}"),
    ])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", action="append", type=Path, help="recipe YAML (repeatable; default: the "
                        "shipped Qwen recipes)")
    parser.add_argument("--prompt-tokens", type=int, default=80)
    parser.add_argument("--answer-tokens", type=int, default=48)
    parser.add_argument("--photo", default="512x683", help="original photo size WxH, resized to the budget")
    parser.add_argument("--padding", type=float, default=0.1, help="padding share of the tokens packing removes")
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    parser.add_argument("overrides", nargs="*", help="recipe overrides applied to every recipe (train.batch_size=1)")
    args = parser.parse_args(argv)
    try:
        w, h = (int(x) for x in args.photo.lower().split("x"))
    except ValueError:
        parser.error(f"--photo {args.photo!r} is not WxH (fix: e.g. --photo 512x683)")
    args.photo = (w, h)
    if not 0 <= args.padding < 1:
        parser.error("--padding must be in [0, 1)")
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    from vlmtax.errors import VlmtaxError
    from vlmtax.train.recipe import load_recipe

    args = parse_args(argv)
    results = []
    for path in args.recipe or RECIPES:
        try:
            recipe = load_recipe(path, args.overrides)
        except VlmtaxError as exc:
            sys.exit(f"error: {exc}")
        try:
            results.append(estimate(recipe, args))
        except VlmtaxError as exc:
            sys.exit(f"error: {path}: {exc}")
        print(report(results[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
