"""vision_cache: cached features give the same step as the pixels, each image is encoded once, fallbacks."""

from __future__ import annotations

import contextlib
import math
import shutil
import types
import warnings
from pathlib import Path

import pytest
import torch
from conftest import TINY_RECIPE, tiny_overrides

from vlmtax.errors import VlmtaxError
from vlmtax.generate import vision_cache
from vlmtax.generate.model import load_model, prepare_model
from vlmtax.generate.trainer import build_trainer
from vlmtax.train.recipe import load_recipe

FROZEN = ("finetuning=lora", "freeze.vision=true", "freeze.projector=true", "train.eval=false")


@pytest.fixture(scope="module")
def cached_trainer(tiny_model_dir, prepared_dir, tmp_path_factory):
    recipe = load_recipe(TINY_RECIPE, tiny_overrides(tiny_model_dir, prepared_dir,
                                                     tmp_path_factory.mktemp("vc") / "run", *FROZEN))
    assert recipe.train.cache_vision is None  # the default: on because both are frozen
    model, processor = load_model(recipe, "fp32")
    trainer = build_trainer(recipe, prepare_model(model, recipe, "fp32"), processor, "fp32")
    return trainer, recipe, processor


def _step(trainer, cache, rows):
    trainer.data_collator.vision_cache = cache
    batch = trainer.data_collator(rows)
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return batch, loss.detach(), grads


def test_cached_step_equals_the_pixel_step(cached_trainer):
    trainer, _, _ = cached_trainer
    cache = trainer.data_collator.vision_cache
    assert cache is not None and cache.computed > 0
    rows = [{"index": i} for i in (0, 3, 5, 7)]
    cached, loss_c, grads_c = _step(trainer, cache, rows)
    plain, loss_p, grads_p = _step(trainer, None, rows)
    trainer.data_collator.vision_cache = cache
    assert "pixel_values" not in cached and "pixel_values" in plain
    assert torch.equal(cached["input_ids"], plain["input_ids"])
    assert torch.equal(cached["image_grid_thw"], plain["image_grid_thw"])
    assert abs(loss_c.item() - loss_p.item()) <= 1e-6
    assert grads_c.keys() == grads_p.keys() and any(g.abs().sum() > 0 for g in grads_p.values())
    for name in grads_p:
        assert torch.allclose(grads_c[name], grads_p[name], rtol=0, atol=1e-6), name
    collator = trainer.data_collator
    collator.packing, collator.pack_capacity = True, 2048  # packed rows reorder the cached features
    try:
        packed, loss_k, _ = _step(trainer, cache, rows)
    finally:
        collator.packing, collator.pack_capacity = False, None
    assert packed["input_ids"].shape[0] < plain["input_ids"].shape[0]
    assert abs(loss_k.item() - loss_p.item()) <= 1e-5


def test_ranks_and_resume_encode_each_image_once(cached_trainer, tmp_path):
    trainer, _, processor = cached_trainer
    images = [p for rec in trainer.data_collator.records[:12] for p in rec["images"]]
    key = vision_cache.weights_key(vision_cache.vision_tower(trainer.model), processor, "test")
    ranks = [vision_cache.VisionCache(tmp_path, key) for _ in range(2)]
    todo = [cache.missing(images) for cache in ranks]  # every rank lists before any rank writes
    assert todo[0] == todo[1] and len(todo[0]) == len(set(images))
    for rank, cache in enumerate(ranks):
        cache.fill(trainer.model, processor, todo[rank][rank::2], 4, contextlib.nullcontext, torch.device("cpu"))
    assert [c.computed for c in ranks] == [len(todo[0][0::2]), len(todo[0][1::2])]
    resumed = vision_cache.VisionCache(tmp_path, key)
    assert resumed.missing(images) == []  # a resumed run encodes nothing
    feats, per_image = resumed.batch(images[:2])
    assert feats["image_embeds"].shape[0] == sum(per_image) and feats["image_embeds"].dtype == torch.float32


def test_over_the_size_bound_trains_without_it_after_one_warning(cached_trainer):
    trainer, recipe, processor = cached_trainer
    small = recipe.model_copy(update={"train": recipe.train.model_copy(update={"cache_vision_max_gb": 1e-9})})
    with pytest.warns(UserWarning, match="train.cache_vision_max_gb") as caught:
        assert vision_cache.setup(trainer, small, processor, trainer.data_collator.records) is None
    own = [w for w in caught if "site-packages" not in Path(w.filename).parts]
    assert len(own) == 1  # vlmtax's own warnings: a library's are its own business (and the suite's filters)


def test_cache_needs_a_frozen_tower(tiny_model_dir, prepared_dir, tmp_path):
    recipe = load_recipe(TINY_RECIPE, tiny_overrides(tiny_model_dir, prepared_dir, tmp_path / "r",
                                                     "train.cache_vision=true", "freeze.vision=false"))
    with pytest.raises(VlmtaxError, match="needs a frozen vision tower"):
        vision_cache.wanted(recipe, "qwen2_vl")
    with warnings.catch_warnings():
        assert not vision_cache.wanted(load_recipe(TINY_RECIPE, tiny_overrides(
            tiny_model_dir, prepared_dir, tmp_path / "r")), "qwen2_vl")  # tiny_cpu trains the tower


# --- storage formats and the disk budget (vision_cache_storage.py) ---------------------------------------------


def _with_train(recipe, **train):
    return recipe.model_copy(update={"train": recipe.train.model_copy(update=train)})


def _disk(monkeypatch, free_gb: float) -> None:
    """Every folder reports `free_gb` GB free (vision_cache_storage reads shutil.disk_usage)."""
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(4e12, 4e12 - free_gb * 1e9,
                                                                                     free_gb * 1e9))


def _at_scale(monkeypatch, trainer, exact_gb: float) -> None:
    """Image token counts scaled so the cache needs `exact_gb` GB stored exactly (fp32 here): a catalogue at the
    user's scale without encoding it. 70,000 Meesho photos at Qwen2-VL-2B's shipped budget need 67.7 GB."""
    hidden = trainer.model.config.get_text_config().hidden_size
    images = sorted({p for rec in trainer.data_collator.records for p in rec["images"]})
    per_image = math.ceil(exact_gb * 1e9 / (len(images) * hidden * 4))
    monkeypatch.setattr(vision_cache, "image_tokens", lambda processor, paths, recipe: dict.fromkeys(paths, per_image))


def _choose(trainer, recipe, processor, via=None):
    """choose_cache for the trainer's images, through `via` (a stand-in trainer) when given."""
    images = [p for rec in trainer.data_collator.records for p in rec["images"]]
    return vision_cache.choose_cache(via or trainer, recipe, processor, images)


def test_the_budget_comes_from_free_disk_not_a_fixed_cap(cached_trainer, monkeypatch, tmp_path):
    """68 GB was over the old fixed 50 GB cap, so the cache never turned on at the user's scale."""
    trainer, recipe, processor = cached_trainer
    recipe = _with_train(recipe, cache_vision_dir=tmp_path / "not" / "yet")  # a folder that does not exist yet
    _at_scale(monkeypatch, trainer, 68)
    _disk(monkeypatch, 200)
    cache = _choose(trainer, recipe, processor)
    assert cache is not None and cache.storage.name == "exact" and cache.storage.dtype == torch.float32
    _disk(monkeypatch, 40)  # 35 GB usable after the headroom: only fp8 (about a quarter of fp32 here) fits
    assert _choose(trainer, recipe, processor).storage.name == "fp8"
    _disk(monkeypatch, 200)  # an explicit cap still bounds the whole cache
    assert _choose(trainer, _with_train(recipe, cache_vision_max_gb=60), processor).storage.name == "fp8"


def test_no_room_trains_without_it_after_one_line_naming_sizes_and_fix(cached_trainer, monkeypatch, tmp_path):
    trainer, recipe, processor = cached_trainer
    _at_scale(monkeypatch, trainer, 68)
    _disk(monkeypatch, 30)
    exact_only = _with_train(recipe, cache_vision_dir=tmp_path, cache_vision_storage="exact")
    with pytest.warns(UserWarning) as caught:
        assert vision_cache.setup(trainer, exact_only, processor, trainer.data_collator.records) is None
    (line,) = [str(w.message) for w in caught if "site-packages" not in Path(w.filename).parts]
    assert "\n" not in line
    assert "68.0 GB float32" in line and "25.0 GB usable" in line and str(tmp_path) in line
    assert "train.cache_vision_dir" in line and "train.cache_vision_storage=fp8" in line
    _disk(monkeypatch, 10)  # auto: neither format fits, both sizes are named
    with pytest.warns(UserWarning, match=r"68.0 GB float32, 18.1 GB fp8, more than the 5.0 GB usable"):
        assert _choose(trainer, _with_train(recipe, cache_vision_dir=tmp_path), processor) is None


def test_every_process_takes_the_most_cautious_decision(cached_trainer, monkeypatch, tmp_path):
    """Free disk differs between processes (nodes); one that skips the cache must not leave others at a barrier."""
    trainer, recipe, processor = cached_trainer
    acc = types.SimpleNamespace(num_processes=2, mixed_precision="no")
    two = types.SimpleNamespace(model=trainer.model, accelerator=acc)
    _disk(monkeypatch, 200)
    monkeypatch.setattr("accelerate.utils.gather_object", lambda picks: [*picks, 1])  # the other process: fp8
    assert _choose(trainer, _with_train(recipe, cache_vision_dir=tmp_path), processor, two).storage.name == "fp8"
    monkeypatch.setattr("accelerate.utils.gather_object", lambda picks: [*picks, 2])  # the other: no room
    with pytest.warns(UserWarning, match="training without it"):
        assert _choose(trainer, _with_train(recipe, cache_vision_dir=tmp_path), processor, two) is None


def test_the_key_names_format_and_dtype_so_old_caches_are_not_misread(cached_trainer, tmp_path):
    trainer, recipe, processor = cached_trainer
    caches = {s: _choose(trainer, _with_train(recipe, cache_vision_dir=tmp_path, cache_vision_storage=s), processor)
              for s in ("exact", "fp8")}
    tower = vision_cache.vision_tower(trainer.model)
    before = vision_cache.weights_key(tower, processor, "torch.float32/no")  # the key before storage formats
    names = {s: c.dir.name for s, c in caches.items()}
    assert names["exact"].endswith("-exact-float32") and names["fp8"].endswith("-fp8-float32")
    assert len(set(names.values())) == 2 and before not in names.values()


def test_exact_dtype_is_what_the_model_consumes_or_the_narrower_autocast_output():
    from vlmtax.generate.vision_cache_storage import exact_dtype

    def model(dtype):
        return types.SimpleNamespace(get_input_embeddings=lambda: torch.nn.Embedding(2, 2, dtype=dtype))

    assert exact_dtype(model(torch.float32), torch.float32, "no") == torch.float32
    assert exact_dtype(model(torch.float32), torch.float32, "bf16") == torch.bfloat16  # full FT under autocast
    assert exact_dtype(model(torch.float16), torch.float16, "fp16") == torch.float16
    assert exact_dtype(model(torch.bfloat16), torch.float32, "no") == torch.bfloat16  # the model casts down


def test_fp8_round_trip_through_a_file(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from vlmtax.generate.vision_cache_storage import FP8, Storage

    torch.manual_seed(0)
    x = torch.randn(40, 96) * torch.logspace(-3, 3, 40).unsqueeze(1)  # rows six decades apart
    x[7] = 0
    x[9, 5] = 500.0  # an outlier token
    fp8, bf16 = Storage("fp8", torch.bfloat16), Storage("exact", torch.bfloat16)
    for storage, name in ((fp8, "a.safetensors"), (bf16, "b.safetensors")):
        save_file(storage.encode(x), str(tmp_path / name))
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    assert stored["features"].dtype == FP8 and stored["scale"].shape == (40, 1)
    back = fp8.decode(stored)
    assert back.dtype == torch.bfloat16 and torch.equal(back[7], torch.zeros(96, dtype=torch.bfloat16))
    # e4m3 keeps 3 mantissa bits: within 2^-4 of each value, plus the bf16 read's own rounding, and each row's
    # subnormal step (2^-9 of its scale) near zero.
    bound = x.abs() * (2**-4 + 2**-8) + stored["scale"] * 2**-9
    assert ((back.float() - x).abs() <= bound).all()
    rel = (back.float() - x).norm(dim=1) / x.norm(dim=1).clamp_min(1e-30)
    assert rel.max() < 0.05
    sizes = [(tmp_path / n).stat().st_size for n in ("a.safetensors", "b.safetensors")]
    assert sizes[0] < 0.55 * sizes[1]
    assert fp8.bytes_for(40, 96) == stored["features"].numel() + 4 * stored["scale"].numel()


def test_fp8_cache_trains_close_to_the_pixel_step(cached_trainer, tmp_path):
    trainer, recipe, processor = cached_trainer
    fp8 = vision_cache.setup(trainer, _with_train(recipe, cache_vision_dir=tmp_path, cache_vision_storage="fp8"),
                             processor, trainer.data_collator.records)
    exact = trainer.data_collator.vision_cache
    assert fp8 is not None and fp8.dir != exact.dir and fp8.computed > 0
    rows = [{"index": i} for i in (0, 3, 5, 7)]
    try:
        _, loss_8, grads_8 = _step(trainer, fp8, rows)
        _, loss_p, grads_p = _step(trainer, None, rows)
    finally:
        trainer.data_collator.vision_cache = exact
    assert loss_8.item() != loss_p.item()  # rounded features, yet the same step within fp8's rounding
    assert abs(loss_8.item() - loss_p.item()) <= 1e-3 * abs(loss_p.item())
    flat_8, flat_p = (torch.cat([g.flatten() for g in grads.values()]) for grads in (grads_8, grads_p))
    assert (flat_8 - flat_p).norm() <= 0.05 * flat_p.norm()


def test_the_user_scale_figures_in_the_docs_follow_the_processor():
    """70,000 photos of 512 x 683 at Qwen2-VL-2B's shipped budget (hidden size 1536), in bf16 and in fp8."""
    import yaml
    from transformers import Qwen2VLImageProcessor

    from vlmtax.data.chat import image_token_count
    from vlmtax.generate.vision_cache_storage import Storage

    shipped = yaml.safe_load((Path(__file__).resolve().parents[2] / "recipes" / "qwen2vl_2b.yaml").read_text())
    processor = types.SimpleNamespace(image_processor=Qwen2VLImageProcessor())
    tokens = image_token_count(processor, 512, 683, shipped["image"]["min_pixels"], shipped["image"]["max_pixels"])
    text = " ".join((Path(__file__).resolve().parents[2] / "docs" / "recipes.md").read_text(encoding="utf-8").split())
    for storage in (Storage("exact", torch.bfloat16), Storage("fp8", torch.bfloat16)):
        figure = f"{storage.bytes_for(70_000 * tokens, 1536) / 1e9:.1f} GB"
        assert figure in text, figure
    assert f"{tokens} image tokens" in text
