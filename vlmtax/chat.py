"""Record -> token ids: the chat template around the prompt, the answer tokenised segment by segment.

Training (the collator), token counting (prepare --model) and constrained decoding all go through
these functions, so the tokens a value is scored with at prediction time are exactly the tokens it
was trained on.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from vlmtax.answer import IMAGE_PLACEHOLDER, Segment

END_OF_TURN = "<|im_end|>"


def user_messages(prompt: str) -> list[dict[str, Any]]:
    """Turn a prompt with `<image>` placeholders into chat-template content parts."""
    content: list[dict[str, Any]] = []
    for i, part in enumerate(prompt.split(IMAGE_PLACEHOLDER)):
        if i:
            content.append({"type": "image"})
        if part:
            content.append({"type": "text", "text": part})
    return [{"role": "user", "content": content}]


def prompt_text(processor: Any, prompt: str) -> str:
    """The templated user turn plus the assistant header, ready for the answer tokens."""
    return processor.apply_chat_template(user_messages(prompt), tokenize=False, add_generation_prompt=True)


class SegmentTokenizer:
    """Tokenises answer segments one at a time (cached: keys and values repeat across records)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._encode = lru_cache(maxsize=65536)(self._encode_uncached)
        self.end_ids = tuple(tokenizer.encode(END_OF_TURN, add_special_tokens=False))

    def _encode_uncached(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer.encode(text, add_special_tokens=False))

    def encode(self, text: str) -> tuple[int, ...]:
        return self._encode(text)

    def answer(self, segments: list[Segment]) -> tuple[list[int], list[str | None]]:
        """Answer ids followed by the end-of-turn token; each id tagged with its value's attribute."""
        ids: list[int] = []
        owners: list[str | None] = []
        for seg in segments:
            piece = self.encode(seg.text)
            ids.extend(piece)
            owners.extend([seg.attribute] * len(piece))
        ids.extend(self.end_ids)
        owners.extend([None] * len(self.end_ids))
        return ids, owners


def image_token_count(processor: Any, width: int, height: int, min_pixels: int, max_pixels: int) -> int:
    """How many <|image_pad|> tokens the processor expands one image of this size into."""
    ip = processor.image_processor
    patches = ip.get_number_of_image_patches(height, width, {"min_pixels": min_pixels, "max_pixels": max_pixels})
    return patches // (ip.merge_size**2)


class TokenCounter:
    """Tokens of a record exactly as the collator builds it: templated prompt, image pads, answer, end of turn."""

    def __init__(self, processor: Any, min_pixels: int, max_pixels: int):
        self.processor = processor
        self.segments = SegmentTokenizer(processor.tokenizer)
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self._prompt: dict[str, int] = {}
        self._image: dict[tuple[int, int], int] = {}

    def count(self, prompt: str, segments: list[Segment], width: int, height: int) -> int:
        if prompt not in self._prompt:
            # The template holds one <|image_pad|> that the processor expands; counted with the image below.
            self._prompt[prompt] = len(self.segments.encode(prompt_text(self.processor, prompt))) - prompt.count(
                IMAGE_PLACEHOLDER)
        if (width, height) not in self._image:
            self._image[(width, height)] = image_token_count(
                self.processor, width, height, self.min_pixels, self.max_pixels)
        n_images = prompt.count(IMAGE_PLACEHOLDER)
        return self._prompt[prompt] + n_images * self._image[(width, height)] + len(self.segments.answer(segments)[0])


def image_pad_id(processor: Any) -> int:
    tok = processor.tokenizer
    return tok.convert_tokens_to_ids(getattr(processor, "image_token", "<|image_pad|>"))
