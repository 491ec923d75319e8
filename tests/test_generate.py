"""idefics_jax.generate gives transformers' `generate` tokens (greedy, beam search), its cache gives
the uncached forward's logits, sampling is reproducible and draws from softmax(warped logits)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_models import hf_config, hf_model, inputs, ours_from_torch

import idefics_jax
from idefics_jax.errors import UserError
from idefics_jax.generation import decode, search

NEW = 12
# Two models covering the grid: (alpha type, interval, resampler, tied head).
MODELS = {
    "vector-interval1-resampler-tied": dict(alpha_type="vector", interval=1, layers=2, resampler=True, tie=True),
    "float-interval2-noresampler-untied": dict(alpha_type="float", interval=2, layers=4, resampler=False, tie=False),
}


@functools.cache
def _model(name):
    model = hf_model(hf_config(**MODELS[name]), seed=3)
    return model, ours_from_torch(model)


def _batch():
    # Row 0 sees 1 image, row 1 two, row 2 none; left padding on rows 1 and 2.
    return inputs(4, 14, 2, pad=(0, 5, 2, 0), no_image_rows=(2,), seed=7)


def _hf_generate(model, batch, **kw):
    with torch.no_grad():
        out = model.generate(**{k: torch.from_numpy(v) for k, v in batch.items()}, max_new_tokens=NEW, **kw)
    return out.numpy()


def _assert_same(got, ref, fill):
    """Ours has T + NEW columns; transformers stops when every row is done: the rest must be fill."""
    assert got.shape == (ref.shape[0], 14 + NEW) and ref.shape[1] <= got.shape[1]
    np.testing.assert_array_equal(got[:, : ref.shape[1]], ref)
    assert (got[:, ref.shape[1] :] == fill).all()


@pytest.mark.parametrize("num_beams", [1, 3], ids=["greedy", "beams3"])
@pytest.mark.parametrize("name", list(MODELS))
def test_equals_transformers(name, num_beams):
    model, ours = _model(name)
    batch = _batch()
    plain = _hf_generate(model, batch, num_beams=num_beams, do_sample=False, eos_token_id=None)[:, 14:]
    # A bad word of one token and one of two, and a second EOS id, all taken from what the model
    # says unconstrained, so that they change the output and some rows stop early.
    bad = [[int(plain[1, 1])], [int(plain[3, 2]), int(plain[3, 3])]]
    eos = [2, int(plain[0, 4])]
    kw = dict(num_beams=num_beams, bad_words_ids=bad, eos_token_id=eos, pad_token_id=0, length_penalty=0.7)
    ref = _hf_generate(model, batch, do_sample=False, **kw)
    got = idefics_jax.generate(ours, **batch, max_new_tokens=NEW, **kw)
    fill = search.options(ours.config, max_new_tokens=NEW, **kw).fill
    _assert_same(got, ref, fill)
    new = got[:, 14:]
    assert not (new == bad[0][0]).any()
    assert np.isin(new, eos).any(axis=1).sum() >= 1, "no row stopped early: the EOS path is untested"
    assert not np.array_equal(got[:, 14:], plain[:, : got.shape[1] - 14]), "constraints changed nothing"


def test_comparison_can_fail():
    """A perturbed gate changes the generated tokens (the equality above is not vacuous)."""
    model, ours = _model("float-interval2-noresampler-untied")
    alpha = ours.blocks.gated_cross_attn_layer.alpha_cross_attn
    saved = alpha[...]
    alpha.set_value(saved + 1.0)
    try:
        got = idefics_jax.generate(ours, **_batch(), max_new_tokens=NEW, eos_token_id=None)
    finally:
        alpha.set_value(saved)
    ref = _hf_generate(model, _batch(), eos_token_id=None)
    assert not np.array_equal(got[:, : ref.shape[1]], ref)


def test_cached_logits_equal_uncached_forward():
    """Prefill + decode steps give, at every step, the logits of the plain forward on the sequence
    so far (by causality: one forward over the final sequence, image mask extended as transformers)."""
    _, ours = _model("vector-interval1-resampler-tied")
    batch = _batch()
    am, iam = batch["attention_mask"].astype(bool), batch["image_attention_mask"].astype(bool)
    b, t, steps = am.shape[0], am.shape[1], 5
    length = t + steps
    graphdef, state = nnx.split(ours)
    pos = decode.positions(jnp.asarray(am), length)
    key_valid = jnp.concatenate([am, np.ones((b, steps), bool)], axis=1)

    @functools.partial(jax.jit, static_argnums=(0,))
    def run(prefill, state, ids, start, cache):
        model = nnx.merge(graphdef, state)
        states = model.image_states(batch["pixel_values"])
        per_image = states.shape[1] // 2
        if cache is None:
            cache = decode.empty_cache(model, b, length, decode.cross_keys_values(model, states))
        m = iam if prefill else iam[:, -1:]
        p = jax.lax.dynamic_slice_in_dim(pos, start, ids.shape[1], axis=1)
        return decode.forward(model, ids, p, start, key_valid, cache, np.repeat(m, per_image, -1)[:, None], m.any(-1))

    logits, cache = run(True, state, batch["input_ids"], 0, None)
    seq, cached = batch["input_ids"], [logits]
    for i in range(steps - 1):
        nxt = np.asarray(jnp.argmax(logits, -1))[:, None]
        seq = np.concatenate([seq, nxt], axis=1)
        logits, cache = run(False, state, nxt, t + i, cache)
        cached.append(logits)
    full = ours(
        seq,
        batch["pixel_values"],
        np.concatenate([iam, np.repeat(iam[:, -1:], steps - 1, axis=1)], axis=1),
        np.concatenate([am, np.ones((b, steps - 1), bool)], axis=1),
    )
    ref = np.asarray(full)[:, t - 1 :]
    got = np.stack([np.asarray(x) for x in cached], axis=1)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_sampling_reproducible_and_top_k_1_is_greedy():
    _, ours = _model("float-interval2-noresampler-untied")
    batch = _batch()
    kw = dict(max_new_tokens=NEW, eos_token_id=None, do_sample=True, temperature=1.3)
    a = idefics_jax.generate(ours, **batch, **kw, seed=1)
    np.testing.assert_array_equal(a, idefics_jax.generate(ours, **batch, **kw, seed=1))
    assert not np.array_equal(a, idefics_jax.generate(ours, **batch, **kw, seed=2))
    greedy = idefics_jax.generate(ours, **batch, max_new_tokens=NEW, eos_token_id=None)
    np.testing.assert_array_equal(idefics_jax.generate(ours, **batch, **kw, top_k=1, seed=3), greedy)


def test_warpers_equal_transformers():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    scores = np.random.default_rng(0).standard_normal((6, 40)).astype(np.float32) * 3
    scores[:, 5] = scores[:, 6]  # a tie, kept by top-k on both sides
    for temperature, top_k, top_p in [(0.7, 5, 1.0), (1.0, 0, 0.8), (1.5, 7, 0.6), (1.0, 1, 1.0)]:
        ref = torch.from_numpy(scores)
        if temperature != 1.0:
            ref = TemperatureLogitsWarper(temperature)(None, ref)
        if top_k:
            ref = TopKLogitsWarper(top_k)(None, ref)
        if top_p < 1.0:
            ref = TopPLogitsWarper(top_p)(None, ref)
        args = search.Options(1, temperature=temperature, top_k=top_k, top_p=top_p).warp_args()
        np.testing.assert_allclose(np.asarray(search._warp(jnp.asarray(scores), *args)), ref.numpy(), rtol=1e-6)


def test_sampled_distribution_matches_softmax():
    """8 tokens, one prompt repeated 4000 times, one new token: the counts fit softmax(warped logits)
    (Pearson χ², p > 1e-4), and clearly do not fit the unwarped softmax."""
    model = hf_model(hf_config(vocab_size=6, additional_vocab_size=2, layers=2, interval=1), seed=1)
    ours = ours_from_torch(model)
    n, temperature, top_k, top_p = 4000, 0.8, 6, 0.95
    prompt = np.array([[1, 3, 4, 5, 2, 3]])
    logits = np.asarray(ours(prompt))[0, -1]
    out = idefics_jax.generate(
        ours,
        np.repeat(prompt, n, axis=0),
        max_new_tokens=1,
        do_sample=True,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_token_id=None,
        seed=0,
    )
    counts = np.bincount(out[:, -1], minlength=8)

    def chi2(p):
        keep = p > 0
        assert counts[~keep].sum() == 0, "sampled a token the warpers removed"
        e = n * p[keep]
        return ((counts[keep] - e) ** 2 / e).sum(), keep.sum() - 1

    warped = np.asarray(search._warp(jnp.asarray(logits[None]), np.float32(temperature), top_k, np.float32(top_p)))[0]
    p = np.exp(warped - warped.max())
    stat, dof = chi2(p / p.sum())
    assert 2 <= dof < 7, "the warpers should leave a few tokens, not one or all"
    from scipy.stats import chi2 as chi2_dist

    assert stat < chi2_dist.isf(1e-4, dof), (stat, counts)
    plain = np.exp(logits - logits.max())
    plain = np.where(p > 0, plain, 0)
    assert chi2(plain / plain.sum())[0] > chi2_dist.isf(1e-4, dof), "the test cannot tell temperature apart"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_new_tokens=0), "max_new_tokens=0"),
        (dict(max_new_tokens=2, num_beams=2, do_sample=True), "beam sampling"),
        (dict(max_new_tokens=2, top_p=0.0), "top_p=0.0"),
        (dict(max_new_tokens=2, bad_words_ids=[[500]]), "bad_words_ids contains 500"),
        (dict(max_new_tokens=2, eos_token_id=[2, -1]), "eos_token_id contains -1"),
        (dict(max_new_tokens=2000), "max_position_embeddings=1024"),
    ],
)
def test_bad_arguments_are_user_errors(kwargs, message):
    _, ours = _model("float-interval2-noresampler-untied")
    with pytest.raises(UserError, match=message):
        idefics_jax.generate(ours, np.ones((1, 4), np.int32), **kwargs)


# The command line (in-process: the process boundary is not what is tested) ---------------------


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    """An HF model directory whose vocabulary is the bundled tiny tokenizer's, the tokenizer, a
    bundled-style image (a coloured shape) and a file that is no image."""
    import random

    from idefics_jax.data import tiny

    root = tmp_path_factory.mktemp("cli")
    model = hf_model(hf_config(vocab_size=tiny.TINY_VOCAB_SIZE, additional_vocab_size=2), seed=4)
    model.save_pretrained(root / "hf")
    image, _ = tiny.draw(random.Random(0))
    image.save(root / "shape.png")
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    return dict(model=model, hf=str(root / "hf"), tokenizer=tiny.ensure()["tokenizer"], root=root)


def _cli(argv, capsys):
    from idefics_jax.generation import cli

    try:
        answer = cli.run(argv)
        code = 0
    except SystemExit as e:
        answer, code = None, e.code
    out, err = capsys.readouterr()
    return answer, code, out, err


def test_cli_answer_equals_transformers(cli_files, capsys):
    from idefics_jax.data import Processor

    f = cli_files
    argv = ["--hf", f["hf"], "--tokenizer", f["tokenizer"], "--image", str(f["root"] / "shape.png")]
    argv += ["--prompt", "a picture of", "--max-new-tokens", "8"]
    answer, code, out, err = _cli(argv, capsys)
    assert code == 0 and out.strip() == answer and "ms/token" in err
    processor = Processor(f["tokenizer"], image_size=28)
    from PIL import Image

    batch = processor([[Image.open(f["root"] / "shape.png"), "a picture of"]])
    tok = processor.tokenizer
    with torch.no_grad():
        ref = f["model"].generate(
            **{k: torch.from_numpy(v.astype(np.int64) if v.dtype == np.int32 else v) for k, v in batch.items()},
            max_new_tokens=8,
            bad_words_ids=[[processor.image_token_id], [processor.fake_token_id]],
            eos_token_id=[tok.eos_token_id],
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        )
    expected = tok.decode(ref[0, batch["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    assert answer == expected


@pytest.mark.parametrize(
    "change, message",
    [
        (["--image", "missing.png"], "--image missing.png: no such file"),
        (["--image", "{root}/broken.png"], "cannot be read as an image"),
        (["--ckpt", "{root}/no-such-ckpt"], "--ckpt {root}/no-such-ckpt: no such directory"),
        (["--max-new-tokens", "5000"], "exceeds the model's max_position_embeddings=1024"),
    ],
    ids=["missing-image", "undecodable-image", "unknown-checkpoint", "too-long"],
)
def test_cli_bad_input_is_one_line(cli_files, capsys, change, message):
    f = cli_files
    change = [c.format(root=f["root"]) for c in change]
    src = [] if "--ckpt" in change else ["--hf", f["hf"]]
    argv = [*src, "--tokenizer", f["tokenizer"], "--prompt", "a picture of", *change]
    _, code, _, err = _cli(argv, capsys)
    assert code == 1 and err.count("\n") == 1 and message.format(root=f["root"]) in err, err


def test_generate_stays_callable_after_importing_the_cli_module():
    """`import idefics_jax.generate` (the `python -m` entry) rebinds the package attribute to the
    module; calling it must still be the function."""
    import importlib

    importlib.import_module("idefics_jax.generate")
    _, ours = _model("float-interval2-noresampler-untied")
    with pytest.raises(UserError, match="max_new_tokens=0"):
        idefics_jax.generate(ours, np.ones((1, 4), np.int32), max_new_tokens=0)
