"""Sharded = unsharded on 8 fake CPU devices, and parameters are laid out as the rules table says."""

import os
import subprocess
import sys
import textwrap

import pytest
from jax.sharding import PartitionSpec as P

from idefics_jax import sharding

WORKER = textwrap.dedent("""
    import jax, json, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    from flax import nnx
    from idefics_jax import sharding
    from idefics_jax.config import IdeficsConfig, PerceiverConfig, VisionConfig
    from idefics_jax.models import Idefics

    assert jax.device_count() == 8, jax.devices()
    cfg = IdeficsConfig(vocab_size=64, additional_vocab_size=2, hidden_size=32, intermediate_size=64,
        num_hidden_layers=4, num_attention_heads=4, cross_layer_interval=2, qk_layer_norms=True,
        use_resampler=True, alpha_initializer="normal", alphas_initializer_range=0.5, initializer_range=0.1,
        vision=VisionConfig(embed_dim=16, image_size=16, intermediate_size=32, patch_size=8,
                            num_hidden_layers=2, num_attention_heads=4),
        perceiver=PerceiverConfig(resampler_n_latents=4, resampler_depth=2, resampler_n_heads=4,
                                  resampler_head_dim=4, qk_layer_norms_perceiver=True))
    model = Idefics(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(0)
    B, T, N = 4, 24, 2
    batch = dict(input_ids=rng.integers(0, 66, (B, T)), attention_mask=np.ones((B, T), np.int32),
                 pixel_values=rng.standard_normal((B, N, 3, 16, 16)).astype(np.float32),
                 image_attention_mask=(rng.random((B, T, N)) < 0.5).astype(np.int32))
    batch["attention_mask"][1, :5] = 0

    def forward(state, batch):
        return nnx.merge(graphdef, state)(**batch)

    single = np.asarray(jax.jit(forward)(state, batch))

    mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    shardings = sharding.state_shardings(state, mesh)
    sharded_state = jax.device_put(state, shardings)
    batch_sharding = jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(("batch",)))
    sharded_batch = jax.device_put(batch, batch_sharding)
    with jax.set_mesh(mesh):
        hlo = jax.jit(forward).lower(sharded_state, sharded_batch).as_text()
        out = jax.jit(forward)(sharded_state, sharded_batch)
    specs = {".".join(map(str, p)): str(tuple(v.get_value().sharding.spec))
             for p, v in nnx.to_flat_state(sharded_state)}
    shard_shape = {".".join(map(str, p)): list(v.get_value().addressable_shards[0].data.shape)
                   for p, v in nnx.to_flat_state(sharded_state)}
    print("RESULT" + json.dumps(dict(diff=float(np.abs(np.asarray(out) - single).max()),
        scale=float(np.abs(single).max()), specs=specs, shard_shape=shard_shape,
        constraint="sharding_constraint" in hlo or "custom_call_target=\\"Sharding\\"" in hlo)))
""")


@pytest.fixture(scope="module")
def sharded_run():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", WORKER], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    import json

    line = [s for s in proc.stdout.splitlines() if s.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT") :])


def test_sharded_logits_equal_single_device(sharded_run):
    assert sharded_run["scale"] > 0.1
    assert sharded_run["diff"] <= 1e-5


def test_parameters_are_sharded_by_the_rules(sharded_run):
    specs, shapes = sharded_run["specs"], sharded_run["shard_shape"]
    # Megatron inside the node: q/k/v and gate/up column-parallel, o/down row-parallel; FSDP on width.
    assert specs["blocks.layers.self_attn.q_proj.kernel"] == "(None, None, 'fsdp', 'tensor')"
    assert specs["blocks.layers.self_attn.o_proj.kernel"] == "(None, None, 'tensor', 'fsdp')"
    assert specs["blocks.layers.mlp.up_proj.kernel"] == "(None, None, 'fsdp', 'tensor')"
    assert specs["blocks.layers.mlp.down_proj.kernel"] == "(None, None, 'tensor', 'fsdp')"
    assert specs["blocks.gated_cross_attn_layer.cross_attn.k_proj.kernel"] == "(None, 'fsdp', 'tensor')"
    # Vocab-parallel embedding rows and LM-head columns.
    assert specs["embed_tokens.weight"] == "('tensor', 'fsdp')"
    assert specs["lm_head.weight"] == "('fsdp', 'tensor')"
    assert specs["vision_model.layers.mlp.fc1.kernel"] == "(None, 'fsdp', 'tensor')"
    # The local shard really is 1/8 of the array.
    assert shapes["blocks.layers.self_attn.q_proj.kernel"] == [2, 2, 16, 8]
    assert shapes["embed_tokens.weight"] == [16, 16]
    # Norms and gates replicate.
    assert specs["norm.weight"] == "(None,)"


def test_activations_are_constrained(sharded_run):
    assert sharded_run["constraint"]


def test_rules_drop_axes_that_do_not_divide():
    class FakeMesh:
        shape = {"data": 1, "fsdp": 64, "tensor": 8}  # noqa: RUF012

    # 257 ViT positions cannot split 64 ways: replicate that dimension, keep the other.
    assert sharding.logical_to_spec((None, "vision_embed"), None, (257, 1280), FakeMesh()) == P(None, "fsdp")
    assert sharding.logical_to_spec(("vision_embed", None), None, (257, 1280), FakeMesh()) == P(None, None)
    assert sharding.logical_to_spec(("batch", "length")) == P(("data", "fsdp"), None)


def test_make_mesh_errors_name_the_problem():
    import jax

    with pytest.raises(ValueError, match="do not factor"):
        sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 3}, devices=jax.devices() * 1)
    with pytest.raises(ValueError, match="only one axis may be -1"):
        sharding.make_mesh({"data": -1, "fsdp": -1, "tensor": 1})
    with pytest.raises(ValueError, match="mesh.tensor=0"):
        sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 0})
    assert dict(sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}).shape) == {"data": 1, "fsdp": 1, "tensor": 1}
