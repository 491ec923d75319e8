"""Processor parity with transformers' IdeficsProcessor (built from the tiny tokenizer)."""

import numpy as np
import pytest
from data_conftest_helpers import tiny_dir  # noqa: F401  (fixture)
from PIL import Image

from idefics_jax.data import Processor
from idefics_jax.data.processor import BadExample, decode_image, image_array, to_rgb


def _img(seed, size, mode="RGB"):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(a).convert(mode)


def _hf(tokenizer_path, image_size):
    from transformers import AutoTokenizer, IdeficsImageProcessor, IdeficsProcessor

    return IdeficsProcessor(IdeficsImageProcessor(image_size=image_size), AutoTokenizer.from_pretrained(tokenizer_path))


def _compare(ours, theirs):
    assert set(ours) == {"input_ids", "attention_mask", "pixel_values", "image_attention_mask"}
    for k in ("input_ids", "attention_mask", "image_attention_mask"):
        np.testing.assert_array_equal(ours[k], theirs[k].numpy().astype(np.int64), err_msg=k)
    assert ours["pixel_values"].dtype == np.float32
    np.testing.assert_allclose(ours["pixel_values"], theirs["pixel_values"].numpy(), rtol=0, atol=1e-6)


def test_parity_mixed_batch(tiny_dir):
    prompts = [
        ["User: what is shown?", _img(0, (40, 31)), "A red circle.\nAssistant:"],  # one image
        ["Only text, no image at all, a longer prompt so that others are padded on the left."],
        [_img(1, (23, 50)), _img(2, (30, 30), "L"), "two consecutive images", _img(3, (64, 20), "RGBA"), "end"],
        ["a", _img(4, (33, 33)), "b", _img(5, (31, 45), "P"), "c"],  # several, not consecutive
    ]
    ours = Processor(tiny_dir["tokenizer"], image_size=30)(prompts)
    theirs = _hf(tiny_dir["tokenizer"], 30)(text=prompts, return_tensors="pt")
    _compare(ours, theirs)
    assert ours["pixel_values"].shape == (4, 3, 3, 30, 30)
    assert (ours["attention_mask"] == 0).any(), "the batch must exercise padding"
    assert ours["attention_mask"][0, 0] == 0, "padding is on the left"


def test_parity_text_only_and_eos(tiny_dir):
    prompts = [["hello there"], ["a somewhat longer text prompt"]]
    ours = Processor(tiny_dir["tokenizer"], image_size=30)(prompts, add_eos_token=True)
    theirs = _hf(tiny_dir["tokenizer"], 30)(text=prompts, add_eos_token=True, return_tensors="pt")
    _compare(ours, theirs)
    assert ours["image_attention_mask"].shape == (2, ours["input_ids"].shape[1], 1)
    assert ours["image_attention_mask"].sum() == 0


def test_parity_images_after_eos(tiny_dir):
    # An EOS inside a prompt hides earlier images from the tokens after it (m4's packed semantics).
    prompts = [["doc one", _img(6, (30, 30)), "caption</s>then text", _img(7, (30, 30)), "more"]]
    ours = Processor(tiny_dir["tokenizer"], image_size=30)(prompts)
    theirs = _hf(tiny_dir["tokenizer"], 30)(text=prompts, return_tensors="pt")
    _compare(ours, theirs)
    eos = ours["input_ids"][0] == 2
    after = np.flatnonzero(eos)[0] + 1
    assert ours["image_attention_mask"][0, after].sum() == 0


def test_adds_image_tokens_after_base_vocab(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3, "b": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"
    ).save_pretrained(tmp_path)
    p = Processor(str(tmp_path), image_size=30)
    assert (p.fake_token_id, p.image_token_id) == (5, 6)
    out = p([["a", _img(0, (30, 30)), "b"]])
    np.testing.assert_array_equal(out["input_ids"][0], [1, 3, 5, 6, 5, 4])


def test_exif_orientation_applied():
    # A 40x20 image stored sideways with EXIF orientation 6 ("rotate 90° CW to display").
    upright = _img(8, (20, 40))
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    from data_conftest_helpers import encode

    decoded = decode_image(encode(stored, "PNG", exif=exif), max_pixels=10**6, min_side=1)
    assert decoded.size == upright.size
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(upright))


def test_image_array_layout_and_normalisation():
    white = image_array(Image.new("RGB", (50, 20), (255, 255, 255)), 30)
    assert white.shape == (3, 30, 30) and white.dtype == np.float32
    np.testing.assert_allclose(
        white[:, 0, 0],
        (1 - np.array([0.48145466, 0.4578275, 0.40821073])) / np.array([0.26862954, 0.26130258, 0.27577711]),
        rtol=1e-6,
    )


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA"])
def test_transparency_composited_on_white(mode):
    img = Image.new("RGBA", (12, 12), (255, 0, 0, 0)).convert(mode)
    assert np.asarray(to_rgb(img)).min() == 255


def test_decode_rejects_with_reason():
    with pytest.raises(BadExample) as e:
        decode_image(b"not an image", max_pixels=10**6, min_side=1)
    assert e.value.reason == "image_undecodable"
