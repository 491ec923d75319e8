"""Packing: m4's image index, row layout, masks, document windows."""

import numpy as np
import pytest
import torch

from idefics_jax.data.packing import (
    TokenIds,
    image_attention_mask,
    image_block_starts,
    image_index,
    pack,
    window,
)

IDS = TokenIds(bos=1, eos=2, pad=0, image=101, fake=100)


class _Tok:  # what m4's function reads from a tokenizer
    eos_token_id = IDS.eos

    def convert_tokens_to_ids(self, token):
        assert token == "<image>"
        return IDS.image


def _doc(rng, n_images, n_text=4, eos=True):
    """<s> text (<fake><image><fake> text)* </s> with random text ids in [10, 60)."""
    out = [IDS.bos] + list(rng.integers(10, 60, n_text))
    for _ in range(n_images):
        out += [IDS.fake, IDS.image, IDS.fake] + list(rng.integers(10, 60, rng.integers(1, n_text + 2)))
    return out + ([IDS.eos] if eos else [])


def test_image_index_equals_m4_on_packed_documents():
    from transformers.models.idefics.processing_idefics import (
        image_attention_mask_for_packed_input_ids,
        incremental_to_binary_attention_mask,
    )

    rng = np.random.default_rng(0)
    rows = []
    for _ in range(16):
        row = []
        for _ in range(rng.integers(2, 5)):  # several documents per row, with EOS tokens
            row += _doc(rng, n_images=int(rng.integers(0, 3)), eos=rng.random() < 0.9)
        rows.append(row)
    T = max(map(len, rows)) + 3
    ids = np.array([r + [IDS.pad] * (T - len(r)) for r in rows])
    theirs, _ = image_attention_mask_for_packed_input_ids(torch.tensor(ids), _Tok(), "pt")
    ours = image_index(ids, IDS.image, IDS.eos)
    assert (ours == -1).any() and (ours >= 2).any()
    np.testing.assert_array_equal(ours, theirs.numpy())
    n = 3
    np.testing.assert_array_equal(
        image_attention_mask(ours, n), incremental_to_binary_attention_mask(theirs.clone(), "pt", num_classes=n).numpy()
    )


def test_pack_layout_and_masks():
    a = np.array([1, 10, 100, 101, 100, 11, 2])  # <s> x <fake><image><fake> y </s>
    b = np.array([1, 100, 101, 100, 12, 2])
    r = pack([a, b], 16, 3, IDS, image_tokens_are_targets=False, use_segment_ids=True)
    np.testing.assert_array_equal(r["input_ids"], np.r_[a, b, [0] * 3])
    np.testing.assert_array_equal(r["segment_ids"], [1] * 7 + [2] * 6 + [0] * 3)
    np.testing.assert_array_equal(r["position_ids"], list(range(7)) + list(range(6)) + [0] * 3)
    np.testing.assert_array_equal(r["attention_mask"], [1] * 13 + [0] * 3)
    # targets: not segment starts, not padding, not image tokens
    np.testing.assert_array_equal(r["loss_mask"], [0, 1, 0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0, 0])
    index = np.argmax(r["image_attention_mask"], -1) - (r["image_attention_mask"].sum(-1) == 0) * 99
    # image 0 seen from its <image> to a's EOS; b's <s> and <fake> see nothing; then image 1
    np.testing.assert_array_equal(index[:13], [-99, -99, -99, 0, 0, 0, 0, -99, -99, 1, 1, 1, 1])
    assert r["image_attention_mask"][13:].sum() == 0
    assert {k: v.dtype for k, v in r.items()} == {
        "input_ids": np.int32, "attention_mask": np.int32, "segment_ids": np.int32, "position_ids": np.int32,
        "image_attention_mask": np.int32, "loss_mask": np.float32,
    }  # fmt: skip


def test_pack_switches():
    a = np.array([1, 10, 100, 101, 100, 11, 2])
    r = pack([a, a], 16, 2, IDS, image_tokens_are_targets=True, use_segment_ids=False)
    np.testing.assert_array_equal(r["segment_ids"], [1] * 14 + [0] * 2)
    np.testing.assert_array_equal(r["position_ids"], list(range(14)) + [0, 0])
    np.testing.assert_array_equal(r["loss_mask"], [0] + [1] * 6 + [0] + [1] * 6 + [0, 0])
    with pytest.raises(ValueError, match="do not fit"):
        pack([a, a, a], 16, 2, IDS, True, True)


@pytest.mark.parametrize("seed", range(20))
def test_window_is_well_formed(seed):
    rng = np.random.default_rng(seed)
    doc = np.array(_doc(rng, n_images=8, n_text=6))
    room, max_images = 24, 2
    w, first, n = window(doc, room, max_images, 32, IDS, rng)
    assert w[0] == IDS.bos and len(w) <= room and 1 <= n <= max_images
    assert (w == IDS.image).sum() == n
    # every image keeps its three tokens
    for p in np.flatnonzero(w == IDS.image):
        assert w[p - 1] == IDS.fake and p + 1 < len(w) and w[p + 1] == IDS.fake
    # the window is a contiguous piece of the document, and `first` names its first image
    body = w[1:]
    starts = [s for s in range(len(doc)) if np.array_equal(doc[s : s + len(body)], body)]
    assert starts, "window is not a slice of the document"
    assert image_block_starts(doc, IDS)[first] >= starts[0] - 1


def test_window_keeps_shared_fake_when_cutting_images():
    # three consecutive images, two allowed: a cut after the second keeps its closing (shared) <fake>
    doc = np.array([1, 10, 100, 101, 100, 101, 100, 101, 100, 11, 2])
    cut = 0
    for seed in range(20):
        w, first, n = window(doc, 64, 2, 64, IDS, np.random.default_rng(seed))
        assert n == (w == IDS.image).sum() <= 2
        if n == 2 and first == 0:
            np.testing.assert_array_equal(w[-3:], [100, 101, 100])
            cut += 1
    assert cut, "no draw started before the first image"


def test_window_starts_biased_towards_images():
    # One image in the middle of a long text: m4's bonus makes starts shortly before it likelier.
    rng = np.random.default_rng(0)
    doc = np.array([1] + [10] * 200 + [100, 101, 100] + [11] * 200 + [2])
    seen = []
    for _ in range(200):
        w, _, _ = window(doc, 64, 1, 64, IDS, rng)
        seen.append(int(np.flatnonzero(w == IDS.fake)[0]))
    # With uniform starts over valid windows the image would be at any offset in [1, 61]; with
    # the bonus most windows put it in the first three quarters.
    assert np.mean(np.array(seen) < 48) > 0.9
