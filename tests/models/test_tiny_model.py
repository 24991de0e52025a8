import os

os.environ["HF_HUB_OFFLINE"] = "1"

import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlmtax.errors import VlmtaxError
from vlmtax.models.tiny_model import SPECIAL_TOKENS, build_tiny_model


@pytest.fixture(scope="session")
def tiny_dir(tiny_model_dir):
    """The session's tiny model (conftest, seed 0): these tests only read it, so it is built once per run."""
    return tiny_model_dir


@pytest.fixture(scope="session")
def model(tiny_dir):
    return AutoModelForImageTextToText.from_pretrained(tiny_dir).eval()


@pytest.fixture(scope="session")
def processor(tiny_dir):
    return AutoProcessor.from_pretrained(tiny_dir)


def _image_prompt(processor, text="What colour is it?"):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def test_loads_as_qwen2_vl_with_tiny_sizes(model, processor):
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    assert type(processor).__name__ == "Qwen2VLProcessor"
    assert type(processor.tokenizer).__name__ == "Qwen2Tokenizer"
    text, vision = model.config.text_config, model.config.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (
        64, 2, 4, 2)
    assert sum(text.rope_parameters["mrope_section"]) * 2 == text.hidden_size // text.num_attention_heads
    assert (vision.depth, vision.embed_dim, vision.hidden_size, vision.patch_size) == (2, 32, 64, 14)
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    # Like the real checkpoint, the embedding is padded past the tokenizer.
    assert len(processor.tokenizer) < text.vocab_size
    assert 2000 <= len(processor.tokenizer) <= 4100
    assert processor.image_processor.merge_size == 2 and processor.image_processor.temporal_patch_size == 2


def test_token_ids_agree_between_tokenizer_and_configs(model, processor):
    tok = processor.tokenizer
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert ids == list(range(ids[0], ids[0] + len(SPECIAL_TOKENS)))  # right after the BPE vocabulary
    eot, im_end = ids[0], ids[2]
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|im_end|>", "<|endoftext|>", None)
    cfg = model.config
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>") == processor.image_token_id
    assert cfg.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert cfg.vision_end_token_id == tok.convert_tokens_to_ids("<|vision_end|>")
    assert (cfg.text_config.bos_token_id, cfg.text_config.eos_token_id) == (eot, im_end)
    gen = model.generation_config
    assert gen.eos_token_id == [im_end, eot] and gen.pad_token_id == eot and gen.do_sample is False


def test_chat_template_is_qwen2_vl(processor):
    text = _image_prompt(processor)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>What colour is it?<|im_end|>\n<|im_start|>assistant\n"
    )
    plain = processor.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "color: red"}], tokenize=False)
    assert plain.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\ncolor: red<|im_end|>\n")


def test_image_pads_expand_and_forward_gives_finite_logits(model, processor):
    image = Image.new("RGB", (112, 112), (200, 30, 40))
    inputs = processor(text=[_image_prompt(processor)], images=[image], return_tensors="pt")
    n_pads = (inputs["input_ids"] == model.config.image_token_id).sum().item()
    assert n_pads == inputs["image_grid_thw"].prod().item() // 4 == 16
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()


def test_generate_returns_new_tokens(model, processor):
    image = Image.new("RGB", (84, 140), (10, 120, 40))
    inputs = processor(text=[_image_prompt(processor)], images=[image], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=5)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    assert out.shape[1] <= inputs["input_ids"].shape[1] + 5


def test_tokenizer_round_trips_and_keeps_answer_boundaries(processor):
    tok = processor.tokenizer

    def encode(s):
        return tok(s, add_special_tokens=False)["input_ids"]

    for text in ["sleeve_length: three-quarter sleeves\ncolor: navy blue", "Women Tops & Tunics",
                 "ocassion: party\nprint_or_pattern_type: ethnic motif", "naïve 你好 😀\r\n\t 42.5%"]:
        assert tok.decode(encode(text)) == text
    assert encode("color:") + encode(" navy blue") == encode("color: navy blue")
    assert encode("\nsleeve_length:") + encode(" three-quarter sleeves") == encode(
        "\nsleeve_length: three-quarter sleeves")
    assert len(encode("sleeve_length: three-quarter sleeves")) <= 8  # the product vocabulary was learned


def test_same_seed_same_bytes_other_seed_other_weights(tiny_dir, tmp_path):
    again = build_tiny_model(tmp_path / "again", seed=0)
    other = build_tiny_model(tmp_path / "other", seed=1)
    for name in ["model.safetensors", "tokenizer.json", "config.json", "processor_config.json"]:
        assert (again / name).read_bytes() == (tiny_dir / name).read_bytes(), name
    assert (other / "tokenizer.json").read_bytes() == (tiny_dir / "tokenizer.json").read_bytes()
    a, b = load_file(tiny_dir / "model.safetensors"), load_file(other / "model.safetensors")
    assert a.keys() == b.keys()
    assert not all(torch.equal(a[k], b[k]) for k in a)


def test_existing_folder_is_reused_or_refused(tiny_dir, tmp_path):
    before = (tiny_dir / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_model(tiny_dir, seed=0) == tiny_dir
    assert (tiny_dir / "model.safetensors").stat().st_mtime_ns == before
    with pytest.raises(VlmtaxError, match="already exists"):
        build_tiny_model(tiny_dir, seed=1)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(VlmtaxError, match="already exists"):
        build_tiny_model(busy, seed=0)
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (build_tiny_model(empty) / "model.safetensors").is_file()


def test_cli_builds_and_refuses_overwrite(tmp_path):
    out = tmp_path / "cli_model"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "vlmtax", "tiny-model", str(out)], capture_output=True,
                         text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert (out / "model.safetensors").is_file() and (out / "vlmtax_tiny.json").is_file()
    clash = subprocess.run([sys.executable, "-m", "vlmtax", "tiny-model", str(out), "--seed", "3"],
                           capture_output=True, text=True, env=env)
    assert clash.returncode == 2 and "already exists" in clash.stderr


def test_vocab_size_pads_the_embedding(tmp_path):
    out = build_tiny_model(tmp_path / "wide", seed=0, vocab_size=4096)
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert model.config.text_config.vocab_size == 4096
    assert model.get_input_embeddings().weight.shape[0] == model.get_output_embeddings().weight.shape[0] == 4096
    with pytest.raises(VlmtaxError, match="smaller than the tokenizer"):
        build_tiny_model(tmp_path / "narrow", vocab_size=100)
    with pytest.raises(VlmtaxError, match="another seed, family or build"):
        build_tiny_model(out, seed=0)  # the default width is another build


@pytest.mark.parametrize(("family", "model_class", "processor_class", "tokenizer_class"), [
    ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor", "Qwen2Tokenizer"),
    ("qwen3_vl", "Qwen3VLForConditionalGeneration", "Qwen3VLProcessor", "Qwen2Tokenizer"),
    ("qwen3_5", "Qwen3_5ForConditionalGeneration", "Qwen3VLProcessor", "Qwen3_5Tokenizer"),
])
def test_each_family_reloads_with_its_classes_layout_and_template(family, model_class, processor_class,
                                                                   tokenizer_class, family_model_dirs):
    from vlmtax.data.chat import prompt_text
    from vlmtax.models.families import family_of

    folder = family_model_dirs[family]
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    assert (type(model).__name__, type(processor).__name__, type(processor.tokenizer).__name__) == (
        model_class, processor_class, tokenizer_class)
    assert family_of(model).name == model.config.model_type == family
    names = {n for n, _ in model.named_modules()}
    if family == "qwen3_vl":
        assert "model.visual.deepstack_merger_list.0" in names
    if family == "qwen3_5":  # the hybrid: gated-delta-net layers with one full-attention layer
        assert model.config.text_config.layer_types.count("full_attention") == 1
        assert "model.language_model.layers.0.linear_attn.in_proj_qkv" in names
    if family == "qwen2_5_vl":
        assert "model.visual.blocks.0.mlp.gate_proj" in names
    text = prompt_text(processor, "<image>What colour is it?")
    assert text.startswith("<|im_start|>") and "<|vision_start|><|image_pad|><|vision_end|>" in text
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n" if family == "qwen3_5"
                         else "<|im_start|>assistant\n")
    enc = processor(text=[text], images=[Image.new("RGB", (112, 112), "red")], return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(model(**enc).logits).all()
    # The tokenizer reloaded from its files tokenises exactly as the one that was trained.
    answer = "color: navy blue\nsleeve_length: three-quarter sleeves"
    assert processor.tokenizer.decode(processor.tokenizer.encode(answer, add_special_tokens=False)) == answer
    assert build_tiny_model(folder, seed=0, family=family) == folder
    with pytest.raises(VlmtaxError, match="another seed, family or build"):
        build_tiny_model(folder, seed=0)


def test_unknown_family_is_refused(tmp_path):
    with pytest.raises(VlmtaxError, match="unknown tiny-model family 'llava'"):
        build_tiny_model(tmp_path / "x", family="llava")
