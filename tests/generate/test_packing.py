"""packing: records packed into rows train exactly as apart (loss, per-record M-RoPE, no attention across)."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_RECIPE, tiny_overrides
from PIL import Image

from vlmtax.generate.model import load_model, prepare_model
from vlmtax.generate.packing import first_fit, positions, rope_model
from vlmtax.generate.trainer import build_trainer
from vlmtax.train.recipe import load_recipe


def test_first_fit_fills_rows_up_to_the_capacity():
    rows = first_fit([5, 3, 4, 2, 6], capacity=8)
    assert sorted(i for row in rows for i in row) == [0, 1, 2, 3, 4]
    assert all(sum([5, 3, 4, 2, 6][i] for i in row) <= 8 for row in rows)
    assert len(rows) == 3 and all(row == sorted(row) for row in rows)


@pytest.fixture(scope="module")
def trainer(tiny_model_dir, prepared_dir, tmp_path_factory):
    recipe = load_recipe(TINY_RECIPE, tiny_overrides(tiny_model_dir, prepared_dir, tmp_path_factory.mktemp("pk") / "r",
                                                     "finetuning=lora", "train.eval=false", "train.cache_vision=false",
                                                     "train.max_length=512"))
    model, processor = load_model(recipe, "fp32")
    return build_trainer(recipe, prepare_model(model, recipe, "fp32"), processor, "fp32")


def _loss_and_grads(trainer, rows):
    batch = trainer.data_collator(rows)
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()
    return batch, loss.item(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def test_packed_batch_equals_the_records_unpacked(trainer, tmp_path):
    collator = trainer.data_collator
    sizes = [(56, 112), (112, 84), (84, 84), (112, 112), (140, 56)]  # different image token counts
    for i, size in enumerate(sizes):
        path = tmp_path / f"{i}.png"
        Image.open(collator.records[i]["images"][0]).convert("RGB").resize(size).save(path)
        collator.records[i] = {**collator.records[i], "images": [str(path)]}
    rows = [{"index": i} for i in range(len(sizes))]
    collator.packing = False
    plain, loss_plain, grads_plain = _loss_and_grads(trainer, rows)
    collator.packing, collator.pack_capacity = True, 512  # train.max_length, as with flash-attention
    packed, loss_packed, grads_packed = _loss_and_grads(trainer, rows)
    collator.packing, collator.pack_capacity = False, None
    assert packed["input_ids"].shape[0] < plain["input_ids"].shape[0]  # several records share a row
    assert (packed["input_ids"] != collator.pad_id).sum() == plain["attention_mask"].sum()
    assert len(set(plain["image_grid_thw"][:, 1:].prod(-1).tolist())) > 2
    assert abs(loss_packed - loss_plain) <= 1e-5
    # Each record's M-RoPE positions in its packed row are the ones it gets alone; text positions restart.
    alone, _ = rope_model(trainer.model).get_rope_index(plain["input_ids"], plain["mm_token_type_ids"],
                                                        plain["image_grid_thw"], attention_mask=plain["attention_mask"])
    together = positions(trainer.model, packed, packed["packed_spans"])
    for row, start, n, _ in packed["packed_spans"].tolist():
        [rec] = [i for i in range(len(sizes)) if torch.equal(plain["input_ids"][i, :n],
                                                              packed["input_ids"][row, start:start + n])]
        assert torch.equal(together[1:, row, start:start + n], alone[:, rec, :n])
        assert torch.equal(together[0, row, start:start + n], torch.arange(n))
    for name, grad in grads_plain.items():
        assert torch.allclose(grads_packed[name], grad, rtol=0, atol=1e-5), name
