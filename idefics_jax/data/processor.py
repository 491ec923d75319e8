"""Prompts → model inputs, equal to transformers' `IdeficsProcessor`; robust image decoding.

`Processor(tokenizer_path, image_size)(prompts)` builds exactly what
`transformers.IdeficsProcessor(IdeficsImageProcessor(image_size=...), tokenizer)(prompts)` builds
(see transformers/models/idefics/processing_idefics.py): `<s>` first, each image written as
`<fake_token_around_image><image><fake_token_around_image>` with consecutive images sharing the
middle fake token, padding on the tokenizer's side (left for IDEFICS), images converted to RGB
(transparency composited on white), bicubic-resized to image_size², scaled to [0, 1] and
normalised with OpenAI CLIP's mean/std.

Deliberate differences from transformers, all on inputs transformers does not handle well:
  * EXIF orientation is applied to every image (transformers applies it only to images it loads
    from a path or URL itself);
  * 16-bit / 32-bit greyscale images are scaled to 8 bits instead of clipped;
  * strings are always text: URLs are not fetched (this package never downloads).

The training pipeline decodes its images with `decode_image` (which also rejects bad bytes with a
reason, see `BadExample`) and transforms them with the same `image_array`, so what the model is
trained on is what the processor feeds it at inference.
"""

from __future__ import annotations

import io
import threading
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps

from idefics_jax.data.packing import image_attention_mask, image_index

FAKE_TOKEN = "<fake_token_around_image>"
IMAGE_TOKEN = "<image>"
END_OF_UTTERANCE_TOKEN = "<end_of_utterance>"
# OpenAI CLIP statistics, as transformers' IDEFICS_STANDARD_MEAN / _STD.
IMAGE_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
IMAGE_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


class BadExample(Exception):
    """An input that must be skipped. `reason` is a short stable key (it names a counter);
    `detail` says what was wrong, for the log line."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def load_tokenizer(path: str):
    """Loads an HF tokenizer directory and makes sure it has the two image tokens.

    `<fake_token_around_image>` and `<image>` are added as special tokens when missing, so they take
    the ids right after the base vocabulary (32000 and 32001 on LLaMA's), as in IDEFICS.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    vocab = tok.get_vocab()
    missing = [t for t in (FAKE_TOKEN, IMAGE_TOKEN) if t not in vocab]
    if missing:
        # add_tokens(special_tokens=True) behaves the same in transformers 4 and 5 (add_special_tokens'
        # keyword for keeping existing extra tokens was renamed between them).
        tok.add_tokens(missing, special_tokens=True)
    if tok.bos_token_id is None or tok.eos_token_id is None:
        raise ValueError(f"tokenizer {path}: needs bos_token and eos_token (got {tok.bos_token!r}, {tok.eos_token!r})")
    return tok


_tokenizers: dict = {}
_tokenizers_lock = threading.Lock()


def cached_tokenizer(path: str):
    """`load_tokenizer(path)`, loaded once per process. Grain workers call this lazily from several
    threads at once, and transformers' lazy imports are not safe to race, hence the lock."""
    tok = _tokenizers.get(path)
    if tok is None:
        with _tokenizers_lock:
            tok = _tokenizers.get(path)
            if tok is None:
                tok = _tokenizers[path] = load_tokenizer(path)
    return tok


def _to_8bit(img: Image.Image) -> Image.Image:
    """16/32-bit integer and float greyscale → 8-bit 'L', keeping the dynamic range."""
    a = np.asarray(img)
    if img.mode == "F":
        a = np.clip(a, 0, 255)
    else:  # I;16*, I: 16-bit sensor data in practice
        a = np.clip(a.astype(np.float32) / 257.0, 0, 255)
    return Image.fromarray(np.rint(a).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image → 'RGB': first frame of animations, EXIF orientation applied, high bit depth
    scaled to 8 bits, transparency composited on white (as transformers' `convert_to_rgb`)."""
    if getattr(img, "is_animated", False):
        img.seek(0)
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = _to_8bit(img)
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def image_array(img: Image.Image, image_size: int) -> np.ndarray:
    """RGB PIL image → float32 [3, image_size, image_size], as `IdeficsImageProcessor`:
    bicubic resize (PIL), ×1/255 computed in float64 then cast, (x - mean) / std in float32."""
    resized = img.resize((image_size, image_size), resample=Image.BICUBIC)
    x = (np.asarray(resized).astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - IMAGE_MEAN) / IMAGE_STD
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def decode_image(data: bytes, max_pixels: int, min_side: int) -> Image.Image:
    """Encoded image bytes → RGB PIL image, or `BadExample` with one of the reasons
    image_empty, image_undecodable (corrupt or truncated), image_too_large (width × height over
    `max_pixels`, checked from the header before decoding: decompression bombs), image_too_small
    (a side under `min_side` pixels)."""
    if not data:
        raise BadExample("image_empty", "zero bytes")
    try:
        with warnings.catch_warnings():
            # We enforce our own (configured) pixel limit below; PIL's warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise BadExample("image_too_large", str(e)) from None
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError…)
        raise BadExample("image_undecodable", f"{type(e).__name__}: {e}") from None
    w, h = img.size
    if w * h > max_pixels:
        raise BadExample("image_too_large", f"{w}x{h} > max_image_pixels={max_pixels}")
    if min(w, h) < min_side:
        raise BadExample("image_too_small", f"{w}x{h} < min_image_side={min_side}")
    try:
        img.load()
        return to_rgb(img)
    except Exception as e:
        raise BadExample("image_undecodable", f"{type(e).__name__}: {e}") from None


class Processor:
    """Prompts (lists of `str` and `PIL.Image`) → IDEFICS model inputs, as numpy arrays.

    Args:
      tokenizer_path: HF tokenizer directory (the image tokens are added if missing).
      image_size: side of the square images fed to the vision encoder (224 for IDEFICS).
    """

    def __init__(self, tokenizer_path: str, image_size: int = 224):
        self.tokenizer = load_tokenizer(tokenizer_path)
        self.image_size = image_size
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.fake_token_id = self.tokenizer.convert_tokens_to_ids(FAKE_TOKEN)
        # As transformers: only a tokenizer trained with <end_of_utterance> (the instruct models')
        # gets it written between consecutive texts.
        extra = self.tokenizer.special_tokens_map.get("additional_special_tokens", []) or []
        self.add_end_of_utterance_token = END_OF_UTTERANCE_TOKEN in extra

    def prompt_text(self, prompt: Sequence[str | Image.Image], add_eos_token: bool = False) -> tuple[str, list]:
        """One prompt → (the text transformers tokenizes, the prompt's images in order)."""
        text = self.tokenizer.bos_token
        images = []
        last_was_image = False
        for i, item in enumerate(prompt):
            last_was_text = i > 0 and not last_was_image
            if isinstance(item, str):
                if self.add_end_of_utterance_token and last_was_text:
                    text += END_OF_UTTERANCE_TOKEN
                text += item.strip(" ")
                last_was_image = False
            elif isinstance(item, Image.Image):
                text += (IMAGE_TOKEN + FAKE_TOKEN) if last_was_image else (FAKE_TOKEN + IMAGE_TOKEN + FAKE_TOKEN)
                images.append(item)
                last_was_image = True
            else:
                raise TypeError(f"prompt item {i}: expected str or PIL.Image.Image, got {type(item).__name__}")
        if add_eos_token:
            text += self.tokenizer.eos_token
        return text, images

    def __call__(self, prompts, add_eos_token: bool = False) -> dict[str, np.ndarray]:
        """Builds a padded batch.

        Args:
          prompts: a list of prompts, each a list of `str` and `PIL.Image`; a single flat prompt is
            accepted too (as transformers does).
          add_eos_token: append `</s>` to every prompt.
        Returns:
          input_ids int32 [B, T]; attention_mask int32 [B, T] (0 on padding);
          pixel_values float32 [B, N, 3, S, S] with N = max(1, most images in one prompt), zeros in
          unused slots; image_attention_mask int32 [B, T, N]: one-hot of the most recent image at or
          before each token (m4's packed semantics), all zeros before the first image and after an
          EOS, and all zeros with N = 1 when no prompt has an image.
        """
        if not any(isinstance(p, (list, tuple)) for p in prompts):
            prompts = [prompts]
        texts, images = zip(*(self.prompt_text(p, add_eos_token) for p in prompts))
        enc = self.tokenizer(list(texts), add_special_tokens=False, padding="longest")
        input_ids = np.asarray(enc["input_ids"], np.int32)
        attention_mask = np.asarray(enc["attention_mask"], np.int32)
        n = max(1, max(len(x) for x in images))
        s = self.image_size
        pixel_values = np.zeros((len(texts), n, 3, s, s), np.float32)
        for b, imgs in enumerate(images):
            # transformers keeps only as many images as the (possibly truncated) text has <image>s.
            keep = min(int((input_ids[b] == self.image_token_id).sum()), n)
            for k, img in enumerate(imgs[:keep]):
                pixel_values[b, k] = image_array(to_rgb(img), s)
        if any(images):
            index = image_index(input_ids, self.image_token_id, self.tokenizer.eos_token_id)
            mask = image_attention_mask(index, n)
        else:
            mask = np.zeros(input_ids.shape + (1,), np.int32)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": pixel_values,
            "image_attention_mask": mask,
        }
