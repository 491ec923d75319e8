"""Token-level packing: several examples → one fixed-length row, with m4's image-mask semantics.

A packed row is a sequence of segments, each `<s> … </s>` (a pair, a whole document, or — for
the first segment only — a window cut from a long document, which has no `</s>`), followed by
padding. The model sees each segment as the processor would build it at inference (starting with
`<s>`, its own images), and with segment ids on, self-attention and positions restart per segment.

Image indices follow m4's `image_attention_mask_for_packed_input_ids` (in transformers'
processing_idefics.py): a token looks at the most recent `<image>` at or before it, counted over
the whole row (so index n is the row's n-th image, `pixel_values[n]`), except that after an EOS
tokens look at no image (-1) until the next `<image>`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# m4's window sampling (m4/training/packing.py): a start position gets weight 1, plus this bonus
# when it lies shortly before an image, so that windows tend to begin just before an image.
IMAGE_BONUS = 2
# ... "shortly before" meaning within this fraction of seq_len before the image, so that at least
# a quarter of the window's text comes after the image.
BONUS_SPAN = 0.75


@dataclasses.dataclass(frozen=True)
class TokenIds:
    """The special token ids packing needs."""

    bos: int
    eos: int
    pad: int
    image: int
    fake: int


def image_index(input_ids: np.ndarray, image_token_id: int, eos_token_id: int) -> np.ndarray:
    """m4's packed image index, vectorised.

    Args:
      input_ids: int [..., T].
    Returns:
      int32 [..., T]: for each token the count of `<image>` tokens at or before it minus one, or
      -1 when an EOS lies strictly before it and after the last `<image>` (the EOS token itself
      keeps its index, as in m4).
    """
    ids = np.asarray(input_ids)
    pos = np.arange(ids.shape[-1])
    is_image = ids == image_token_id
    count = np.cumsum(is_image, axis=-1) - 1
    last_image = np.maximum.accumulate(np.where(is_image, pos, -1), axis=-1)
    last_eos = np.maximum.accumulate(np.where(ids == eos_token_id, pos, -1), axis=-1)
    eos_before = np.concatenate([np.full(ids.shape[:-1] + (1,), -1), last_eos[..., :-1]], axis=-1)
    return np.where(eos_before > last_image, -1, count).astype(np.int32)


def image_attention_mask(index: np.ndarray, num_images: int) -> np.ndarray:
    """int [..., T] image index → int32 one-hot [..., T, num_images]; indices -1 or ≥ num_images
    give all-zero rows (as transformers' `incremental_to_binary_attention_mask`)."""
    return (np.asarray(index)[..., None] == np.arange(num_images)).astype(np.int32)


def image_block_starts(tokens: np.ndarray, ids: TokenIds) -> np.ndarray:
    """Positions p with tokens[p] == <fake> and tokens[p+1] == <image>: where an image's tokens
    begin (for consecutive images sharing a <fake>, the shared one)."""
    t = np.asarray(tokens)
    return np.flatnonzero((t[:-1] == ids.fake) & (t[1:] == ids.image))


def _trim_partial_image(t: np.ndarray, ids: TokenIds) -> np.ndarray:
    """Drops a trailing incomplete image (`<fake>` or `<fake><image>` cut before its closing
    `<fake>`), so every image in a window has its three tokens."""
    while len(t) and (t[-1] == ids.image or (t[-1] == ids.fake and (len(t) < 2 or t[-2] != ids.image))):
        t = t[:-1]
    return t


def window(
    tokens: np.ndarray, room: int, max_images: int, seq_len: int, ids: TokenIds, rng: np.random.Generator
) -> tuple[np.ndarray, int, int]:
    """Cuts one window out of a document too long for `room` tokens or `max_images` images.

    Args:
      tokens: int [L], `<s> document </s>`.
      room: most tokens the window may have; seq_len: the row length (sets the bonus span).
    Returns:
      (int32 window tokens starting with `<s>`, index of its first image in the document, number
      of images in it ≥ 1). The start is drawn as m4 did: weight 1 per position plus IMAGE_BONUS
      for positions up to BONUS_SPAN·seq_len before an image, never inside an image's tokens.
    """
    t = np.asarray(tokens, np.int32)
    starts = image_block_starts(t, ids)
    if len(starts) == 0:
        raise ValueError("window(): the document has no image")
    scores = np.ones(len(t))
    for p in starts:
        scores[max(0, p - int(BONUS_SPAN * seq_len)) : p + 1] += IMAGE_BONUS
    for p in starts:  # after all bonuses: a bonus span may cover an earlier image's tokens
        scores[p + 1] = 0  # the <image> token
        if p + 2 < len(t) and not (p + 3 < len(t) and t[p + 3] == ids.image):
            scores[p + 2] = 0  # a closing <fake> (unless it opens the next image)
    scores[-1] = 0  # never start on the final </s>
    # A start that leaves no image in the window is redrawn; the last fallback is the first image.
    for start in list(rng.choice(len(t), size=4, p=scores / scores.sum())) + [int(starts[0])]:
        s0 = max(int(start), 1)  # the window gets its own <s>; never copy the document's
        w = _trim_partial_image(np.concatenate([[ids.bos], t[s0:]])[:room], ids)
        blocks = image_block_starts(w, ids)
        if len(blocks) > max_images:
            # Stop before the first image that does not fit, keeping a <fake> it shares with the
            # previous image (that image's closing token).
            cut = blocks[max_images]
            w = w[: cut + 1] if w[cut - 1] == ids.image else w[:cut]
            blocks = blocks[:max_images]
        if len(blocks):
            # w[b] is document position s0 + b - 1.
            return w.astype(np.int32), int(np.searchsorted(starts, s0 + blocks[0] - 1)), len(blocks)
    raise ValueError("window(): room too small for one image")


def pack(
    segments: list[np.ndarray],
    seq_len: int,
    num_images: int,
    ids: TokenIds,
    image_tokens_are_targets: bool,
    use_segment_ids: bool,
) -> dict[str, np.ndarray]:
    """Lays segments (int token arrays, each starting with `<s>`) end to end and pads to seq_len.

    Returns int32 arrays input_ids, attention_mask, segment_ids (1, 2, … per segment, 0 on
    padding; all real tokens 1 when use_segment_ids is off), position_ids (restarting per segment
    when use_segment_ids, else 0…n-1; 0 on padding), image_attention_mask [T, num_images], and
    float32 loss_mask: 1 where the token is a prediction target — real, not the first token of a
    segment, and not `<image>`/`<fake>` unless image_tokens_are_targets.
    """
    n = sum(len(s) for s in segments)
    if n > seq_len:
        raise ValueError(f"pack(): {n} tokens do not fit seq_len={seq_len}")
    input_ids = np.full(seq_len, ids.pad, np.int32)
    seg = np.zeros(seq_len, np.int32)
    pos = np.zeros(seq_len, np.int32)
    o = 0
    for k, s in enumerate(segments):
        input_ids[o : o + len(s)] = s
        seg[o : o + len(s)] = k + 1
        pos[o : o + len(s)] = np.arange(len(s))
        o += len(s)
    real = seg > 0
    starts = real & (pos == 0)
    if not use_segment_ids:
        seg = real.astype(np.int32)
        pos = np.where(real, np.arange(seq_len), 0).astype(np.int32)
    target = real & ~starts
    if not image_tokens_are_targets:
        target &= (input_ids != ids.image) & (input_ids != ids.fake)
    # Padding ids are ordinary tokens (<unk>): they never move the image index.
    index = np.where(real, image_index(input_ids, ids.image, ids.eos), -1)
    return {
        "input_ids": input_ids,
        "attention_mask": real.astype(np.int32),
        "segment_ids": seg,
        "position_ids": pos,
        "image_attention_mask": image_attention_mask(index, num_images),
        "loss_mask": target.astype(np.float32),
    }
