"""Stage: the tiny model. Builds a randomly initialised, few-MB checkpoint of a supported VLM family (Qwen2-VL by
default; Qwen2.5-VL, Qwen3-VL, Qwen3.5: `tiny_families.py`) for tests and the demo.

The folder it writes loads through `AutoModelForImageTextToText` / `AutoProcessor` exactly like
`Qwen/Qwen2-VL-2B-Instruct`: same classes, same special tokens in the same order after the BPE
vocabulary, the same pre-tokenizer and chat template, a vocabulary padded past the tokenizer the way
the real one is, tied embeddings. Only the sizes are small, so any code that works here meets the same
code paths on the real checkpoint. The tokenizer does not depend on the seed; the weights do.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from vlmtax.errors import VlmtaxError
from vlmtax.fileio import atomic_dir, write_json
from vlmtax.models.tiny_families import TINY_FAMILIES, TinyFamily

MARKER = "vlmtax_tiny.json"
# Bump when the build changes, so an old folder is not silently taken for a fresh one.
BUILD_VERSION = 1

# In the real order: they take the ids right after the BPE vocabulary, as 151643.. do in Qwen2-VL.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
# Qwen3's reasoning markers, added tokens of the Qwen3-VL and Qwen3.5 vocabularies (after the tool-call ones).
THINK_TOKENS = ["<think>", "</think>"]
# Meesho categories, attributes and values (from the public label statistics), so product text tokenises
# into few, stable pieces as it would with a real vocabulary.
CATEGORIES = ["Men Tshirts", "Sarees", "Kurtis", "Women Tshirts", "Women Tops & Tunics"]
ATTRIBUTES = (
    "blouse_pattern border border_width color fit_shape length neck neck_collar ocassion occasion ornamentation "
    "pallu_details pattern print_or_pattern_type sleeve_length sleeve_styling surface_styling transparency"
).split()
VALUES = (
    "a-line|applique|big border|black|blue|botanical|boxy|calf length|casual|checked|cream|crop|cuffed sleeves|"
    "daily|default|elephant|ethnic motif|fitted|floral|funky print|graphic|green|grey|high|jacquard|knee length|"
    "knitted|long|long sleeves|loose|maroon|multicolor|navy blue|net|no|no border|orange|party|peach|peacock|pink|"
    "polo|printed|puff sleeves|purple|quirky|red|regular|regular sleeves|round|round neck|ruffles|same as border|"
    "same as saree|short sleeves|sleeveless|small border|solid|square neck|straight|stylised|sweetheart neck|"
    "tassels and latkans|temple border|three-quarter sleeves|tie-ups|traditional|typography|v-neck|waist tie-ups|"
    "wedding|white|woven design|yellow|yes|zari|zari woven|dummy|brown|beige|gold|silver|mustard|olive|lavender"
).split("|")
FILLER = """You are a helpful assistant. This is a product image from the category shown. Fill in its attributes.
Answer with one line per attribute, formatted as `attribute: value`. Describe this image, please.
It's a model that reads labels off images; they've trained it, we'll test it, I'm sure you'd agree it's done.
Sorry, I cannot tell from the picture. The image is unclear, blurry, dark, cropped or missing entirely."""
# Common English words plus garment terms: the filler that prompts, free text and failures are made of.
WORDS = """
about above abstract across act action active actually add address admit adult affect after again against
age agency agent ago agree ahead air allow almost alone along already also although always among amount
analysis animal another answer any anyone anything appear apply approach area argue arm around arrive art
article artist ask assume attack attention audience author authority available avoid away baby back bad bag
ball banarasi bank bar base beat beautiful because become bed before begin behaviour behind believe benefit
best better between beyond big bill bit blood blouse board body book born both box boy break bring brother
budget build building business button buy call camera campaign cancer candidate capital car card care career
carry case catch cause cell center central century certain chair challenge chance chanderi change character
charge check chiffon child choice choose church citizen city civil claim class clear close coach cold collar
collection college come commercial common community company compare computer concern condition conference
consider consumer contain continue control cost cotton could country couple course court cover create crepe
crime cuff cultural culture cup current customer cut dark data daughter day dead deal death debate decade
decide decision deep defense degree democratic denim describe design despite detail determine develop
development difference different difficult dinner direction director discover discuss disease doctor door
dots down draw dream dress drive drop drug dupatta during each early east easy eat economic economy edge
education effect effort eight either election else embroidered employee end energy enjoy enough enter entire
environment especially establish even evening event ever every everybody everyone everything evidence
exactly example executive exist expect experience expert explain eye fabric face fact factor fail fall
family far fast father fear federal feel feeling few field fight figure fill film final finally financial
find fine finger finish fire firm fish floor fly focus follow food foot force foreign forget form former
forward free friend from front full fund future game garden gas general generation geometric georgette girl
give glass goal good government great ground group grow growth guess gun guy hair half hand handloom hang
happen happy hard have head health hear heart heat heavy help hem here herself high himself history hit hold
home hood hope hospital hot hotel hour house however huge human hundred husband idea identify image imagine
impact important improve include including increase indeed indicate individual industry information inside
instead institution interest interesting international interview into investment involve issue item itself
jeans job join just kanjivaram keep key kid kill kind kitchen know knowledge kurta kurti land language large
last late later laugh law lawyer lay lead leader leaf learn least leave left leg legal less letter letters
level lie life light like likely line linen list listen little live local long look lose loss lot love low
machine magazine main maintain major majority make man manage management manager many market marriage
material matter maybe mean measure media medical meet meeting member memory mention message method middle
might military million mind minute mirror miss mission modern moment money month more morning most mother
mouth move movement movie much music must myself name nation national natural nature near nearly necessary
need network never news newspaper next nice night none nor north not note nothing notice now number occur
offer office officer official often oil old once only onto open operation opportunity option order
organization organza other others our out outside over own owner page pain painting paisley paper parent
part participant particular particularly partner pass past patient pay peace people per perform performance
perhaps period person personal phone photo physical pick picture piece place plan plant play player pleat
pocket point police policy political politics polka polyester poor popular population position positive
possible power practice prepare present president pressure pretty prevent price private probably problem
process produce product production professional professor program project property protect prove provide
public pull purpose push put quality question quickly quite race radio raise range rate rather rayon reach
read ready real reality realize really reason receive recent recently recognize record reduce reflect region
relate relationship religious remain remember remove report represent republican require research resource
respond response rest result return reveal rich right rise risk road rock role room rule run safe same saree
save say scene school science scientist sea season seat second section security see seek seem sell send
senior sense sequin series serious serve service set seven several sex shake share she shirt shoot short
shot should shoulder show side sign significant silk similar simple simply since sing single sister sit site
situation skill skin skirt sleeve slogan smile social society soldier some somebody someone something
sometimes son song soon sort sound source south southern space speak special specific speech spend sport
spring staff stage stand standard star start state statement station stay step still stock stop store story
strategy street stripes strong structure student study stuff style subject success successful such suddenly
suffer suggest summer support sure surface system table take talk task tax teach teacher team technology
television tell tend term test text than thank that their them themselves then theory there these they thing
think third this those though thought through throughout throw thus today together tonight too top total
tough toward town trade trial tribal trip trouble trousers truth try tshirt tunic turn tussar under
understand unit until upon use usually various very victim view violence viscose visit voice vote wait walk
wall want war watch water way weapon wear week weight well west western whatever whether which while whole
whom whose wide wife will win wind window wish with within without woman wonder wool word work worker world
worry would write writer wrong yard yeah year yet young your yourself zip
""".split()
PUNCTUATION = "0 1 2 3 4 5 6 7 8 9 10 25 100 2024 3.5 ; : , . ! ? ' \" ( ) [ ] { } < > / \\ | - _ + = * & ^ % $ # @ ~ `"


def _corpus() -> list[str]:
    """Fixed training text: answer-shaped lines, prompts, filler. Seeded separately so every build agrees."""
    rng = random.Random(1234)
    lines = FILLER.splitlines() + [PUNCTUATION] * 3
    for _ in range(400):
        attrs = rng.sample(ATTRIBUTES, 5)
        lines.append(f"This is a product image from the category {rng.choice(CATEGORIES)}. "
                     f"Fill in its attributes: {', '.join(attrs)}.")
        lines.append("\n".join(f"{a}: {rng.choice(VALUES)}" for a in attrs))
    lines += [" ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + "." for _ in range(1000)]
    return lines


def _build_tokenizer(family: TinyFamily):
    import transformers
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(family.split_regex), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    # The full byte alphabet keeps every string encodable, as with the real 151k vocabulary.
    trainer = trainers.BpeTrainer(vocab_size=3000, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(_corpus(), trainer)
    backend.add_special_tokens(SPECIAL_TOKENS)
    if family.name in ("qwen3_vl", "qwen3_5"):
        backend.add_tokens(THINK_TOKENS)
    # Qwen2-VL-2B-Instruct's tokenizer_config: no bos/unk, eos = <|im_end|>, pad = <|endoftext|>.
    tokenizer = getattr(transformers, family.tokenizer_class)(
        tokenizer_object=backend, bos_token=None, unk_token=None, eos_token="<|im_end|>",
        pad_token="<|endoftext|>", extra_special_tokens=SPECIAL_TOKENS[1:], errors="replace",
        model_max_length=32768, clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = family.chat_template
    return tokenizer


def tiny_config(tokenizer, vocab_size: int | None = None, family: str = "qwen2_vl"):
    """The family's smallest checkpoint's architecture at toy sizes; token ids come from `tokenizer`.
    `vocab_size` pads the embedding and output layer to a real model's row count (151936 for Qwen2-VL) for
    memory measurements."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    # The real embedding (151936 rows) is padded past the tokenizer (151657 ids); keep such a gap
    # (2866 -> 2944) so code that confuses len(tokenizer) with config.vocab_size fails here too.
    vocab_size = vocab_size or (len(tokenizer) // 128 + 1) * 128
    return TINY_FAMILIES[family].config(ids, vocab_size)


def _existing(out: Path, seed: int, vocab_size: int | None, family: str) -> bool:
    """True when `out` already holds this very build; raise when it holds anything else."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise VlmtaxError(f"{out} already exists and is not a folder", "choose another folder or delete it")
    if not any(out.iterdir()):
        return False
    try:
        meta = json.loads((out / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        meta = None
    if isinstance(meta, dict) and meta.get("seed") == seed and meta.get("build") == BUILD_VERSION \
            and meta.get("vocab_size") == vocab_size and meta.get("family", "qwen2_vl") == family:
        return True
    what = f"a tiny model with another seed, family or build ({meta})" if isinstance(meta, dict) else "other files"
    raise VlmtaxError(f"{out} already exists and holds {what}", "choose another folder or delete it")


def build_tiny_model(out_dir: str | Path, seed: int = 0, vocab_size: int | None = None,
                     family: str = "qwen2_vl") -> Path:
    """Write a tiny random model of `family` (weights, config, generation config, processor) to `out_dir`.

    Same seed, same bytes. Returns `out_dir` untouched when it already holds the build for `seed` and `family`.
    `vocab_size` (default: the tokenizer's size rounded up past it) pads the embedding, e.g. to 151936.
    """
    if family not in TINY_FAMILIES:
        raise VlmtaxError(f"unknown tiny-model family {family!r}", f"use one of: {', '.join(TINY_FAMILIES)}")
    out = Path(out_dir)
    if _existing(out, seed, vocab_size, family):
        return out

    import tokenizers
    import torch
    import transformers
    from transformers import AutoModelForImageTextToText, GenerationConfig

    import vlmtax

    tokenizer = _build_tokenizer(TINY_FAMILIES[family])
    processor = TINY_FAMILIES[family].processor(tokenizer)
    if vocab_size is not None and vocab_size < len(tokenizer):
        raise VlmtaxError(f"--vocab-size {vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens)",
                          f"use {len(tokenizer)} or more (Qwen2-VL's is 151936)")
    config = tiny_config(tokenizer, vocab_size, family)
    # fork_rng: seed the init without disturbing the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # fp32 rather than the real bf16: the tiny model trains on CPUs, where fp32 is the fast, exact choice.
        model = AutoModelForImageTextToText.from_config(config).to(torch.float32)
    eot, im_end = config.text_config.bos_token_id, config.text_config.eos_token_id
    # As Qwen2-VL-2B-Instruct's generation_config, but greedy so tests and demos are reproducible.
    model.generation_config = GenerationConfig(bos_token_id=eot, eos_token_id=[im_end, eot], pad_token_id=eot,
                                               do_sample=False)
    meta = {"build": BUILD_VERSION, "seed": seed, "vocab_size": vocab_size, "vlmtax": vlmtax.__version__,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__}
    if family != "qwen2_vl":  # a qwen2_vl folder's marker stays as it was before families existed
        meta["family"] = family
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        write_json(tmp / MARKER, meta)
    return out
