"""`generate`: greedy, sampling and beam search over the cached decoder, equal to transformers'
`IdeficsForVisionText2Text.generate` (transformers/generation/utils.py `_sample`, `_beam_search`).

One jitted program per (model structure, shapes, options): the vision tower, the perceiver and the
cross-attention keys/values run once, the prompt is prefilled in one forward, then every new token
is one decode step inside a `lax.while_loop` that stops when every row (every beam search) is done.

What transformers does and we therefore do too:
- new tokens see the images the last prompt token sees;
- `bad_words_ids` bans a sequence's last token wherever the tokens before it end the running
  sequence (prompt included), and `[eos]` alone is never banned; processors act on the logits
  (greedy, sampling) or on the log-softmax (beam search), then sampling applies temperature, top-k
  (ties kept), top-p (the smallest set above `top_p`, at least one token);
- beam search keeps max(2, 1 + number of EOS ids) × num_beams candidates per step, scores a
  finished beam sum(log p) / (new tokens incl. EOS) ** length_penalty, stops a row with
  `early_stopping=False`'s heuristic, and returns the best finished sequence;
- finished greedy/sampled rows continue with `pad_token_id`; beam search fills with
  `pad_token_id or eos_token_id[0]` (its `output_fill_value`: with pad 0 that is the EOS id).
Unlike transformers, the result always has T + max_new_tokens columns: the columns transformers
would not return (every row finished early) hold that same fill value.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from idefics_jax.errors import UserError
from idefics_jax.generation import decode
from idefics_jax.models.idefics import Idefics, image_mask_of

NEG = -1.0e9  # transformers' "impossible" beam score


@dataclasses.dataclass(frozen=True)
class Options:
    """A generation request's settings. All but temperature / top_k / top_p are static (one
    compiled program per distinct value); those three are the program's arguments (`warp_args`),
    so changing them does not recompile."""

    max_new_tokens: int
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = dataclasses.field(default=1.0, compare=False)
    top_k: int = dataclasses.field(default=0, compare=False)
    top_p: float = dataclasses.field(default=1.0, compare=False)
    length_penalty: float = 1.0
    bad_words: tuple[tuple[int, ...], ...] = ()
    eos: tuple[int, ...] = ()
    pad: int = 0

    def warp_args(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """temperature float32, top_k int32, top_p float32 scalars, the dynamic arguments of `_warp`."""
        return np.float32(self.temperature), np.int32(self.top_k), np.float32(self.top_p)

    @property
    def fill(self) -> int:
        """What follows a finished sequence (see the module docstring)."""
        if self.num_beams == 1:
            return self.pad
        return (self.pad or self.eos[0]) if self.eos else -1


def options(
    config,
    *,
    max_new_tokens: int,
    num_beams: int = 1,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    length_penalty: float = 1.0,
    bad_words_ids: Sequence[Sequence[int]] | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
) -> Options:
    """Validated `Options` for a model with IdeficsConfig `config`; eos/pad default to the config's
    (as transformers' generation config does), pad then to the first EOS id. UserError on bad values."""
    vocab = config.total_vocab_size

    def token(x, what):
        if not isinstance(x, (int, np.integer)) or not 0 <= x < vocab:
            raise UserError(f"{what} contains {x!r}; expected token ids in [0, {vocab})")
        return int(x)

    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise UserError(f"max_new_tokens={max_new_tokens!r}; expected an int >= 1")
    if not isinstance(num_beams, int) or num_beams < 1:
        raise UserError(f"num_beams={num_beams!r}; expected an int >= 1")
    if do_sample and num_beams > 1:
        raise UserError("do_sample with num_beams > 1 (beam sampling) is not supported; use one or the other")
    if not temperature > 0:
        raise UserError(f"temperature={temperature!r}; expected > 0")
    if not isinstance(top_k, int) or top_k < 0:
        raise UserError(f"top_k={top_k!r}; expected an int >= 0 (0 = off)")
    if not 0 < top_p <= 1:
        raise UserError(f"top_p={top_p!r}; expected a value in (0, 1]")
    eos = config.eos_token_id if eos_token_id is None else eos_token_id
    eos = () if eos is None else (eos,) if isinstance(eos, (int, np.integer)) else tuple(eos)
    eos = tuple(token(e, "eos_token_id") for e in eos)
    pad = config.pad_token_id if pad_token_id is None else pad_token_id
    pad = (eos[0] if eos else 0) if pad is None else token(pad, "pad_token_id")
    bad = []
    for seq in bad_words_ids or ():
        if isinstance(seq, (str, bytes)) or not isinstance(seq, Sequence) or not seq:
            raise UserError(f"bad_words_ids entry {seq!r}; expected a non-empty list of token ids")
        seq = tuple(token(x, "bad_words_ids") for x in seq)
        if not (len(seq) == 1 and seq[0] in eos):  # transformers never bans EOS alone
            bad.append(seq)
    return Options(
        max_new_tokens,
        num_beams,
        bool(do_sample),
        float(temperature),
        top_k,
        float(top_p),
        float(length_penalty),
        tuple(bad),
        eos,
        pad,
    )


def generate(
    model: Idefics,
    input_ids: Any,
    pixel_values: Any = None,
    image_attention_mask: Any = None,
    attention_mask: Any = None,
    **kwargs,
) -> np.ndarray:
    """The prompt followed by `max_new_tokens` generated tokens, as transformers' `generate`.

    Inputs in HF's layouts (`data.Processor`'s output; left padding), numpy or jax:
    input_ids int [B, T]; pixel_values float [B, N, C, H, W] or None (text only); image_attention_mask
    int/bool [B, T, N] (required with pixel_values); attention_mask int/bool [B, T] (default all 1).
    Keyword arguments (`options`): max_new_tokens (required); greedy by default; num_beams > 1 beam
    search (length_penalty, early_stopping=False); do_sample samples after temperature / top_k
    (0 = off) / top_p, reproducibly from `seed` (default 0); eos_token_id an int or a list;
    bad_words_ids a list of token-id lists; pad_token_id. With a model placed on a mesh, the
    program (caches included) runs sharded on that mesh.
    Returns int32 numpy [B, T + max_new_tokens] (see the module docstring for the fill after EOS).
    """
    return prepare(model, input_ids, pixel_values, image_attention_mask, attention_mask, **kwargs)()


def prepare(
    model: Idefics,
    input_ids: Any,
    pixel_values: Any = None,
    image_attention_mask: Any = None,
    attention_mask: Any = None,
    *,
    seed: int = 0,
    **kwargs,
):
    """`generate`'s arguments checked and its program compiled (ahead of time, or found in jit's
    cache); returns a function of no arguments that runs it and returns `generate`'s result, so
    callers can time compilation and generation apart. UserError on bad arguments."""
    cfg = model.config
    opts = options(cfg, **kwargs)
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise UserError(f"input_ids has shape {ids.shape} and dtype {ids.dtype}; expected int [batch, seq_len]")
    b, t = ids.shape
    if t + opts.max_new_tokens > cfg.max_position_embeddings:
        raise UserError(
            f"prompt of {t} tokens + max_new_tokens={opts.max_new_tokens} exceeds the model's "
            f"max_position_embeddings={cfg.max_position_embeddings}"
        )
    am = np.ones((b, t), bool) if attention_mask is None else _shaped(attention_mask, (b, t), "attention_mask")
    if not am[:, -1].all():
        raise UserError("attention_mask is 0 on the last prompt token of some row; expected left padding")
    pixels = iam = None
    if pixel_values is not None:
        pixels = np.asarray(pixel_values)
        if pixels.ndim != 5 or pixels.shape[0] != b:
            raise UserError(f"pixel_values has shape {pixels.shape}; expected [{b}, num_images, C, H, W]")
        if image_attention_mask is None:
            raise UserError("image_attention_mask [batch, seq_len, num_images] is required with pixel_values")
        iam = _shaped(image_attention_mask, (b, t, pixels.shape[1]), "image_attention_mask")
    elif image_attention_mask is not None:
        raise UserError("image_attention_mask given without pixel_values")
    graphdef, state = nnx.split(model)
    args = (state, ids.astype(np.int32), am, pixels, iam, jax.random.key(seed), opts.warp_args())
    signature = (graphdef, opts, jax.tree.structure(args), tuple(_aval(x) for x in jax.tree.leaves(args)))
    compiled = _compiled.get(signature)
    if compiled is None:
        with _mesh_of(state):
            compiled = _compiled[signature] = _program.lower(graphdef, opts, *args).compile()
    return lambda: np.asarray(compiled(*args))


# Compiled programs by (structure, options, argument shapes/dtypes/shardings): `lower().compile()`
# bypasses jit's own cache, and a request must not recompile what an earlier one compiled.
_compiled: dict = {}


def _aval(x: Any) -> tuple:
    return (np.shape(x), str(x.dtype), getattr(x, "sharding", None))


def _shaped(x: Any, shape: tuple[int, ...], name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.shape != shape:
        raise UserError(f"{name} has shape {x.shape}; expected {shape}")
    return x.astype(bool)


def _mesh_of(state: nnx.State):
    """The mesh the model's parameters live on, in force while tracing (so the caches and
    activations are constrained by the logical-axis rules), or a null context."""
    import contextlib

    for leaf in jax.tree.leaves(state):
        s = getattr(leaf, "sharding", None)
        if isinstance(s, jax.sharding.NamedSharding) and s.mesh.size > 1:
            return jax.set_mesh(s.mesh)
    return contextlib.nullcontext()


# The program -----------------------------------------------------------------------------------


def _ban_bad_words(scores: jax.Array, seqs: jax.Array, cur: jax.Array, opts: Options) -> jax.Array:
    """scores float32 [R, V] for the token after seqs[:, :cur] (int [R, L]) → banned ids set to -inf."""
    if not opts.bad_words:
        return scores
    banned = jnp.zeros(scores.shape, bool)
    for seq in opts.bad_words:
        n = len(seq) - 1
        if n == 0:
            hit = jnp.ones(scores.shape[:1], bool)
        else:
            # The prefix must fit in the context (cur ≥ n); the slice start is clamped, so check it.
            prev = jax.lax.dynamic_slice_in_dim(seqs, jnp.maximum(cur - n, 0), n, axis=1)
            hit = (prev == jnp.asarray(seq[:-1], seqs.dtype)).all(-1) & (cur >= n)
        banned = banned.at[:, seq[-1]].max(hit)
    return jnp.where(banned, -jnp.inf, scores)


def _warp(scores: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Temperature, then top-k (0 = off; ties with the k-th kept), then top-p (1 = off) on float32
    scores [R, V], as transformers' warpers; the settings are traced scalars."""
    scores = scores / temperature  # x / 1.0 is x: transformers skipping T = 1 changes nothing
    vocab = scores.shape[-1]
    ascending = jnp.sort(scores, axis=-1)
    kth = jnp.take(ascending, vocab - jnp.clip(top_k, 1, vocab), axis=-1)[:, None]
    scores = jnp.where((top_k > 0) & (scores < kth), -jnp.inf, scores)
    order = jnp.argsort(scores, axis=-1)  # ascending, as transformers sorts
    cum = jnp.cumsum(jax.nn.softmax(jnp.take_along_axis(scores, order, axis=-1), axis=-1), axis=-1)
    drop = (cum <= 1 - top_p).at[:, -1].set(False)
    drop = jnp.zeros_like(drop).at[jnp.arange(drop.shape[0])[:, None], order].set(drop)
    return jnp.where((top_p < 1) & drop, -jnp.inf, scores)


def _run(graphdef, opts: Options, state, ids, am, pixels, iam, key, warp) -> jax.Array:
    """The whole request as one program: int32 [B, T + max_new_tokens] (see `generate`)."""
    model = nnx.merge(graphdef, state)
    t = ids.shape[1]
    nb, m = opts.num_beams, opts.max_new_tokens
    length = t + m
    # Beam search runs B·nb rows, row b·nb + k being beam k of prompt b (transformers' expansion);
    # the images go through the vision tower once per prompt and their keys/values are repeated.
    rows = lambda x: x if nb == 1 else jnp.repeat(x, nb, axis=0)
    ids, am = rows(ids), rows(am)
    pos = decode.positions(am, length)
    key_valid = jnp.concatenate([am, jnp.ones((am.shape[0], m), bool)], axis=1)
    cross = prompt_mask = step_mask = None
    if pixels is not None:
        states = model.image_states(pixels)
        per_image = states.shape[1] // pixels.shape[1]
        cross = tuple(x if nb == 1 else jnp.repeat(x, nb, axis=1) for x in decode.cross_keys_values(model, states))
        iam = rows(iam)
        prompt_mask = image_mask_of(iam, per_image)
        step_mask = image_mask_of(iam[:, -1:], per_image)  # new tokens see what the last prompt token sees
    cache = decode.empty_cache(model, ids.shape[0], length, cross)
    logits, cache = decode.forward(model, ids, pos[:, :t], 0, key_valid, cache, prompt_mask)

    def step(cache, seqs, slot):
        """Feeds seqs[:, slot] (slot = the last filled one) → logits for slot + 1, cache."""
        token = jax.lax.dynamic_slice_in_dim(seqs, slot, 1, axis=1)
        p = jax.lax.dynamic_slice_in_dim(pos, slot, 1, axis=1)
        return decode.forward(model, token, p, slot, key_valid, cache, step_mask)

    seqs = jnp.full((ids.shape[0], length), opts.fill, jnp.int32).at[:, :t].set(ids)
    search = _beam_search if nb > 1 else _greedy_or_sample
    return search(opts, logits, cache, seqs, t, step, key, warp)


def _greedy_or_sample(opts: Options, logits, cache, seqs, t, step, key, warp) -> jax.Array:
    eos = jnp.asarray(opts.eos or (-1,), jnp.int32)

    def choose(logits, seqs, unfinished, i):
        cur = t + i
        scores = _ban_bad_words(logits, seqs, cur, opts)
        if opts.do_sample:
            nxt = jax.random.categorical(jax.random.fold_in(key, i), _warp(scores, *warp), axis=-1)
        else:
            nxt = jnp.argmax(scores, axis=-1)
        nxt = jnp.where(unfinished, nxt.astype(jnp.int32), opts.pad)
        seqs = jax.lax.dynamic_update_slice_in_dim(seqs, nxt[:, None], cur, axis=1)
        return seqs, unfinished & ~jnp.isin(nxt, eos)

    seqs, unfinished = choose(logits, seqs, jnp.ones(seqs.shape[:1], bool), 0)

    def body(carry):
        i, seqs, unfinished, cache = carry
        logits, cache = step(cache, seqs, t + i - 1)
        seqs, unfinished = choose(logits, seqs, unfinished, i)
        return i + 1, seqs, unfinished, cache

    carry = (jnp.int32(1), seqs, unfinished, cache)
    _, seqs, _, _ = jax.lax.while_loop(lambda c: (c[0] < opts.max_new_tokens) & c[2].any(), body, carry)
    return seqs


def _beam_search(opts: Options, logits, cache, seqs, t, step, key, warp) -> jax.Array:
    del key, warp  # beam search is deterministic (`options` refuses beam sampling)
    nb, m = opts.num_beams, opts.max_new_tokens
    r, length = seqs.shape
    b = r // nb
    vocab = logits.shape[-1]
    keep = max(2, 1 + len(opts.eos)) * nb
    eos = jnp.asarray(opts.eos or (-1,), jnp.int32)
    top_beams = jnp.arange(keep) < nb
    # (new tokens) ** length_penalty for 1..m new tokens, in float64 then float32 as transformers
    # computes it (a Python float dividing a float32 tensor).
    penalty = jnp.asarray(np.arange(1, m + 1, dtype=np.float64) ** opts.length_penalty, jnp.float32)
    gather = lambda x, idx: jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)

    def choose(logits, state, i):
        """One step of transformers' `_beam_search` (c. to g.), new tokens at slot t + i."""
        running, running_scores, seqs, scores, finished, unsatisfied = state
        cur = t + i
        logp = jax.nn.log_softmax(logits, axis=-1)
        logp = _ban_bad_words(logp, running.reshape(r, length), cur, opts)
        acc = (logp.reshape(b, nb, vocab) + running_scores[:, :, None]).reshape(b, nb * vocab)
        top_lp, top_idx = jax.lax.top_k(acc, keep)
        src = top_idx // vocab
        top_seqs = gather(running, src).at[:, :, cur].set(top_idx % vocab)
        hits = jnp.isin(top_idx % vocab, eos) | (cur + 1 >= length)
        # e. the best `nb` unfinished continuations run on
        run_lp = top_lp + hits.astype(jnp.float32) * NEG
        nxt = jax.lax.top_k(run_lp, nb)[1]
        running, running_scores, src = gather(top_seqs, nxt), gather(run_lp, nxt), gather(src, nxt)
        # f. finished candidates among the top `nb` compete with the kept hypotheses
        just = hits & top_beams[None, :]
        fin = top_lp / penalty[i]
        fin = fin + (~unsatisfied).astype(jnp.float32) * NEG
        fin = fin + (~just).astype(jnp.float32) * NEG
        merged = jnp.concatenate([scores, fin], axis=1)
        best = jax.lax.top_k(merged, nb)[1]
        seqs = gather(jnp.concatenate([seqs, top_seqs], axis=1), best)
        scores = gather(merged, best)
        finished = gather(jnp.concatenate([finished, just], axis=1), best)
        # g. can a running beam still beat the worst kept hypothesis? (early_stopping=False heuristic)
        worst = jnp.where(finished, scores.min(axis=1, keepdims=True), NEG)
        unsatisfied = unsatisfied & (running_scores[:, :1] / penalty[i] > worst).any(-1, keepdims=True)
        go_on = unsatisfied.any() & ~hits.all()
        rows = (src + jnp.arange(b)[:, None] * nb).reshape(r)
        return (running, running_scores, seqs, scores, finished, unsatisfied), rows, go_on

    seqs = seqs.reshape(b, nb, length)
    state = (
        seqs,
        jnp.zeros((b, nb), jnp.float32).at[:, 1:].set(NEG),
        seqs,
        jnp.full((b, nb), NEG, jnp.float32),
        jnp.zeros((b, nb), bool),
        jnp.ones((b, 1), bool),
    )
    state, rows, go_on = choose(logits, state, 0)

    def body(carry):
        i, state, rows, _, cache = carry
        cache = cache.take(rows)
        logits, cache = step(cache, state[0].reshape(r, length), t + i - 1)
        state, rows, go_on = choose(logits, state, i)
        return i + 1, state, rows, go_on, cache

    carry = (jnp.int32(1), state, rows, go_on, cache)
    _, state, _, _, _ = jax.lax.while_loop(lambda c: (c[0] < m) & c[3], body, carry)
    return state[2][:, 0]


_program = jax.jit(_run, static_argnums=(0, 1))
