"""Sharded = unsharded on 8 fake CPU devices, and parameters are laid out as the rules table says."""

import jax
import numpy as np
import pytest
from flax import nnx

from idefics_jax import sharding
from idefics_jax.config import IdeficsConfig, PerceiverConfig, VisionConfig
from idefics_jax.models import Idefics

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="module")
def sharded_run():
    cfg = IdeficsConfig(
        vocab_size=64,
        additional_vocab_size=2,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        cross_layer_interval=2,
        qk_layer_norms=True,
        use_resampler=True,
        alpha_initializer="normal",
        alphas_initializer_range=0.5,
        initializer_range=0.1,
        vision=VisionConfig(
            embed_dim=16, image_size=16, intermediate_size=32, patch_size=8, num_hidden_layers=2, num_attention_heads=4
        ),
        perceiver=PerceiverConfig(
            resampler_n_latents=4,
            resampler_depth=2,
            resampler_n_heads=4,
            resampler_head_dim=4,
            qk_layer_norms_perceiver=True,
        ),
    )
    graphdef, state = nnx.split(Idefics(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    B, T, N = 4, 24, 2
    batch = dict(
        input_ids=rng.integers(0, 66, (B, T)),
        attention_mask=np.ones((B, T), np.int32),
        pixel_values=rng.standard_normal((B, N, 3, 16, 16)).astype(np.float32),
        image_attention_mask=(rng.random((B, T, N)) < 0.5).astype(np.int32),
    )
    batch["attention_mask"][1, :5] = 0

    def forward(state, batch):
        return nnx.merge(graphdef, state)(**batch)

    single = np.asarray(jax.jit(forward)(state, batch))
    mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    sharded_state = jax.device_put(state, sharding.state_shardings(state, mesh))
    sharded_batch = jax.device_put(batch, jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(("batch",))))
    with jax.set_mesh(mesh):
        hlo = jax.jit(forward).lower(sharded_state, sharded_batch).as_text()
        out = np.asarray(jax.jit(forward)(sharded_state, sharded_batch))
    flat = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(sharded_state)}
    return {
        "single": single,
        "sharded": out,
        "specs": {k: tuple(v.sharding.spec) for k, v in flat.items()},
        "shard_shape": {k: list(v.addressable_shards[0].data.shape) for k, v in flat.items()},
        "hlo": hlo,
    }


def test_sharded_logits_equal_single_device(sharded_run):
    assert np.abs(sharded_run["single"]).max() > 0.1
    np.testing.assert_allclose(sharded_run["sharded"], sharded_run["single"], rtol=0, atol=1e-5)


def test_parameters_are_sharded_by_the_rules(sharded_run):
    specs, shapes = sharded_run["specs"], sharded_run["shard_shape"]
    # Megatron inside the node: q/k/v and gate/up column-parallel, o/down row-parallel; FSDP on width.
    assert specs["blocks.layers.self_attn.q_proj.kernel"] == (None, None, "fsdp", "tensor")
    assert specs["blocks.layers.self_attn.o_proj.kernel"] == (None, None, "tensor", "fsdp")
    assert specs["blocks.layers.mlp.up_proj.kernel"] == (None, None, "fsdp", "tensor")
    assert specs["blocks.layers.mlp.down_proj.kernel"] == (None, None, "tensor", "fsdp")
    assert specs["blocks.gated_cross_attn_layer.cross_attn.k_proj.kernel"] == (None, "fsdp", "tensor")
    # Vocab-parallel embedding rows and LM-head columns.
    assert specs["embed_tokens.weight"] == ("tensor", "fsdp")
    assert specs["lm_head.weight"] == ("fsdp", "tensor")
    assert specs["vision_model.layers.mlp.fc1.kernel"] == (None, "fsdp", "tensor")
    # The local shard really is 1/8 of the array.
    assert shapes["blocks.layers.self_attn.q_proj.kernel"] == [2, 2, 16, 8]
    assert shapes["embed_tokens.weight"] == [16, 16]
    # Norms and gates replicate.
    assert specs["norm.weight"] == (None,)


def test_activations_are_constrained(sharded_run):
    hlo = sharded_run["hlo"]
    assert "sharding_constraint" in hlo or 'custom_call_target="Sharding"' in hlo
