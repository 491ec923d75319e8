"""Depth by scan: compile time does not grow with depth, and remat policies and unrolling keep the function."""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from idefics_jax.config import IdeficsConfig, PerceiverConfig, VisionConfig
from idefics_jax.models import Idefics, abstract_state


def _config(layers: int, vision_layers: int | None = None, depth: int = 6, **kw) -> IdeficsConfig:
    return IdeficsConfig(
        vocab_size=128,
        additional_vocab_size=2,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        cross_layer_interval=4,
        qk_layer_norms=True,
        use_resampler=True,
        vision=VisionConfig(
            embed_dim=32,
            image_size=16,
            intermediate_size=64,
            patch_size=8,
            num_hidden_layers=vision_layers or layers,
            num_attention_heads=4,
        ),
        perceiver=PerceiverConfig(
            resampler_n_latents=4, resampler_depth=depth, resampler_n_heads=4, resampler_head_dim=8
        ),
        **kw,
    )


def _lowered_forward(config: IdeficsConfig):
    """The jitted forward of `config` on abstract params and a 2 × 64-token batch with 2 images, lowered."""
    graphdef, state = abstract_state(config)
    b, t, n = 2, 64, 2
    args = (
        jax.ShapeDtypeStruct((b, t), jnp.int32),
        jax.ShapeDtypeStruct((b, n, 3, 16, 16), jnp.float32),
        jax.ShapeDtypeStruct((b, t, n), jnp.int32),
    )

    def forward(state, ids, pixels, iam):
        return nnx.merge(graphdef, state)(ids, pixels, iam)

    return jax.jit(forward).lower(state, *args)


def _compile_seconds(config: IdeficsConfig) -> float:
    start = time.perf_counter()
    _lowered_forward(config).compile()
    return time.perf_counter() - start


def test_80_layers_compile_about_as_fast_as_8():
    # Best of two, so one scheduler hiccup on a 2-core machine does not decide the test.
    shallow = min(_compile_seconds(_config(8)) for _ in range(2))
    deep = min(_compile_seconds(_config(80)) for _ in range(2))
    assert deep <= 1.5 * shallow, (deep, shallow)


@functools.cache
def _grads(remat: str, unroll: int = 1):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 130, (2, 16))
    pixels = rng.standard_normal((2, 1, 3, 16, 16)).astype(np.float32)
    iam = np.ones((2, 16, 1), np.int32)
    model = Idefics(
        _config(8, vision_layers=2, depth=2, remat=remat, alpha_initializer="ones", scan_unroll=unroll),
        rngs=nnx.Rngs(0),
    )
    graphdef, state = nnx.split(model)
    loss = lambda s: jnp.mean(nnx.merge(graphdef, s)(ids, pixels, iam) ** 2)
    return jax.jit(jax.grad(loss))(state)


@pytest.mark.parametrize("policy", ["full", "dots", "minimal"])
def test_remat_policies_give_the_same_gradients(policy):
    for a, b in zip(jax.tree.leaves(_grads("none")), jax.tree.leaves(_grads(policy))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("unroll", [2, 8])
def test_scan_unroll_gives_the_same_gradients(unroll):
    for a, b in zip(jax.tree.leaves(_grads("none")), jax.tree.leaves(_grads("none", unroll))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_scan_unroll_at_full_depth_leaves_no_loop():
    # 8 layers = 2 blocks of 4, 8 ViT layers, 6 perceiver blocks (images in the batch, so all three
    # stacks are traced): every stack is at most 8 deep.
    def loops(unroll: int) -> int:
        return _lowered_forward(_config(8, scan_unroll=unroll)).as_text().count("stablehlo.while")

    assert loops(1) > 0
    assert loops(8) == 0
