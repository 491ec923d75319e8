"""The HF name table and `idefics_jax.from_hf` on saved tiny HF models (single and sharded files)."""

import numpy as np
import pytest
import torch
from hf_models import hf_config, hf_model, inputs, torch_logits

import idefics_jax
from idefics_jax import IdeficsConfig, hf


def test_table_covers_every_hf_tensor_exactly_once():
    for kw in (dict(), dict(resampler=False, interval=1, layers=3), dict(tie=True, alpha_type="vector")):
        model = hf_model(hf_config(**kw))
        config = IdeficsConfig.from_hf(model.config)
        names = hf.hf_names(config)
        sd = model.state_dict()
        expected = {
            k: tuple(v.shape) for k, v in sd.items() if not (config.tie_word_embeddings and k.startswith("lm_head."))
        }
        assert names == expected


def test_entry_transforms_invert():
    model = hf_model(hf_config())
    config = IdeficsConfig.from_hf(model.config)
    sd = model.state_dict()
    for entry in hf.entries(config):
        ours = hf.read_stacked(entry, hf.StateDictReader(sd), np.float32)
        for name, back in hf.iter_hf(entry, ours):
            np.testing.assert_array_equal(back, sd[name].numpy())


@pytest.mark.parametrize("shard", [None, "20KB"])
def test_from_hf_directory(tmp_path, shard):
    model = hf_model(hf_config(alpha_type="vector"))
    kwargs = {} if shard is None else {"max_shard_size": shard}
    model.save_pretrained(tmp_path, **kwargs)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert ("model.safetensors.index.json" in files) == (shard is not None)
    ours = idefics_jax.from_hf(tmp_path)
    batch = inputs(2, 64, 2, pad=(0, 6))
    np.testing.assert_allclose(np.asarray(ours(**batch)), torch_logits(model, batch), atol=1e-4, rtol=0)


def test_from_hf_bfloat16_params(tmp_path):
    model = hf_model(hf_config())
    model.save_pretrained(tmp_path)
    ours = idefics_jax.from_hf(tmp_path, param_dtype="bfloat16")
    assert ours.blocks.layers.mlp.up_proj.kernel.get_value().dtype == np.dtype("bfloat16")


def test_from_hf_errors_name_the_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    model = hf_model(hf_config())
    model.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    sd["model.norm.weight"] = torch.ones(7)
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(hf.CheckpointError, match=r"model.norm.weight.*shape \(7,\); expected \(32,\)"):
        idefics_jax.from_hf(tmp_path)
    del sd["model.norm.weight"]
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(hf.CheckpointError, match="'model.norm.weight' is missing"):
        idefics_jax.from_hf(tmp_path)
    with pytest.raises(hf.CheckpointError, match="no model.safetensors"):
        (tmp_path / "model.safetensors").unlink()
        idefics_jax.from_hf(tmp_path)
