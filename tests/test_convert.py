"""tools/convert_weights.py on tiny random HF models saved in the tests (single and sharded files).

Conversions run in-process through `main(argv)` (no interpreter start-up per call); the CLI itself,
its --help and the memory bound run in subprocesses.
"""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from flax import nnx
from hf_models import hf_config, hf_model, inputs, torch_logits
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import idefics_jax
from idefics_jax import IdeficsConfig, ckpt_format, hf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "convert_weights.py")
_spec = importlib.util.spec_from_file_location("convert_weights", TOOL)
cw = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cw)


def convert(*argv):
    assert cw.main([str(a) for a in argv]) == 0


def status(*argv) -> int:
    """Exit status of the CLI run in-process (an input error exits through errors.cli_main)."""
    try:
        return cw.main([str(a) for a in argv])
    except SystemExit as e:
        return e.code


def hf_tensors(directory) -> dict[str, np.ndarray]:
    """Every tensor of a saved HF directory, read with safetensors itself (dtype as stored)."""
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(directory, name), framework="pt") as f:
                for k in f.keys():
                    t = f.get_tensor(k)
                    out[k] = t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
    return out


def leftovers(parent, name):
    """Entries of `parent` belonging to output `name` (the output itself or its temporary siblings)."""
    return [p for p in os.listdir(parent) if p == name or p.startswith(f".{name}.")]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny random HF IDEFICS (vector gates, non-zero) saved twice: one file, and 20 KB shards."""
    model = hf_model(hf_config(alpha_type="vector"))
    root = tmp_path_factory.mktemp("hf")
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="20KB")
    return model, root


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_hf_to_jax_logits_and_back(saved, tmp_path, layout):
    model, root = saved
    src = root / layout
    assert ("model.safetensors.index.json" in os.listdir(src)) == (layout == "sharded")
    convert("hf-to-jax", "--hf", src, "--out", tmp_path / "ckpt")
    ours = idefics_jax.load(tmp_path / "ckpt")
    batch = inputs(2, 520, 3, pad=(0, 9))  # ≥ 512 tokens, 1-3 images per row, left padding
    ref = torch_logits(model, batch)
    logits = np.asarray(ours(**batch))
    np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=0)

    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer_config.json").write_text('{"model_max_length": 1024}')
    convert(
        "jax-to-hf",
        "--ckpt",
        tmp_path / "ckpt",
        "--out",
        tmp_path / "back",
        "--max-shard-size",
        "30KB",
        "--tokenizer",
        tok,
    )
    files = os.listdir(tmp_path / "back")
    assert "model.safetensors.index.json" in files and "tokenizer_config.json" in files
    from transformers import IdeficsForVisionText2Text

    back, info = IdeficsForVisionText2Text.from_pretrained(tmp_path / "back", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    np.testing.assert_allclose(torch_logits(back.eval(), batch), logits, atol=1e-5, rtol=0)
    original, roundtrip = hf_tensors(src), hf_tensors(tmp_path / "back")
    assert sorted(original) == sorted(roundtrip)
    for k, v in original.items():
        assert roundtrip[k].dtype == v.dtype and roundtrip[k].tobytes() == v.tobytes(), k


def test_bfloat16_and_bin_roundtrip_is_byte_identical(tmp_path):
    model = hf_model(hf_config(interval=1, layers=3, resampler=False)).to(torch.bfloat16)
    (tmp_path / "bin").mkdir()
    model.config.save_pretrained(tmp_path / "bin")
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    torch.save(sd, tmp_path / "bin" / "pytorch_model.bin")
    convert("hf-to-jax", "--hf", tmp_path / "bin", "--out", tmp_path / "ckpt", "--dtype", "bfloat16")
    assert ckpt_format.params_metadata(tmp_path / "ckpt", 0)[("norm", "weight")][1] == np.dtype("bfloat16")
    # Training starts from it the way the trainer restores: fp32 params, placed by the sharding rules.
    import jax

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    ours = idefics_jax.load(tmp_path / "ckpt", param_dtype="float32", mesh=mesh)
    kernel = ours.blocks.layers.mlp.up_proj.kernel.get_value()
    assert kernel.dtype == np.float32 and isinstance(kernel.sharding, jax.sharding.NamedSharding)
    np.testing.assert_array_equal(np.asarray(kernel[0, 0]), sd["model.layers.0.mlp.up_proj.weight"].float().numpy().T)
    convert("jax-to-hf", "--ckpt", tmp_path / "ckpt", "--out", tmp_path / "back")
    back = hf_tensors(tmp_path / "back")
    assert sorted(back) == sorted(sd)
    for k, v in sd.items():
        assert back[k].tobytes() == v.view(torch.int16).numpy().tobytes(), k
    assert json.loads((tmp_path / "back" / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("frozen", [False, True], ids=["all-trainable", "frozen-store"])
def test_jax_to_hf_from_training_checkpoint_any_step(tmp_path, frozen):
    """A checkpoint as the trainer writes it (train/checkpointer.py): params (jax arrays) + opt_state +
    config + train_state per step, each step finalised with its integrity manifest. With frozen
    parameters (the same at every step, as in training), the steps hold only the trainable ones and
    reference the frozen store written at the first save; the export and `load` join both."""
    import jax
    import ml_collections

    from idefics_jax.models import abstract_state
    from idefics_jax.train.checkpointer import Checkpointer

    config = IdeficsConfig.from_hf(hf_config())
    abstract = abstract_state(config)[1]
    is_new = lambda path: path[0] == "perceiver_resampler" or path[:2] == ("blocks", "gated_cross_attn_layer")
    pick = lambda params, want: nnx.from_flat_state([(p, v) for p, v in nnx.to_flat_state(params) if want(p)])
    random = lambda tree, rng: jax.tree.map(lambda a: jax.numpy.asarray(rng.standard_normal(a.shape, np.float32)), tree)
    fixed = random(pick(abstract, lambda p: not is_new(p)), np.random.default_rng(0)) if frozen else nnx.State({})
    train_cfg = ml_collections.ConfigDict(dict(keep_checkpoints=5, keep_period=0, async_checkpointing=False))
    ckpt = Checkpointer(str(tmp_path / "run"), train_cfg)
    run_config = ml_collections.ConfigDict({"model": config.to_dict(), "train": {"lr": 1e-4}})
    states = {}
    for step in (3, 7):
        params = random(pick(abstract, is_new) if frozen else abstract, np.random.default_rng(step))
        states[step] = nnx.to_pure_dict(nnx.merge_state(params, fixed))
        state = {"params": params, "frozen": fixed, "opt_state": jax.tree.map(jax.numpy.zeros_like, params)}
        ckpt.save(step, state, {"step": step}, run_config)
    ckpt.close()
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(os.listdir(ckpts)) == ["3", "7", *(["frozen"] if frozen else [])]
    for step, argv in ((3, ["--step", "3"]), (7, [])):
        out = tmp_path / f"hf{step}"
        convert("jax-to-hf", "--ckpt", ckpts, "--out", out, *argv)
        tensors = hf_tensors(out)
        for e in hf.entries(config):
            value = states[step]
            for k in e.path:
                value = value[k]
            for name, t in hf.iter_hf(e, np.asarray(value)):
                np.testing.assert_array_equal(tensors[name], t, err_msg=f"step {step} {name}")
    if frozen:  # the step's own params item: only the trainable leaves
        own = ckpt_format._item_metadata(str(ckpts), 7)
        assert set(own) == {tuple(map(str, p)) for p, _ in nnx.to_flat_state(pick(abstract, is_new))}
        model_params = nnx.to_pure_dict(nnx.state(idefics_jax.load(ckpts, step=3), nnx.Param))
        for path, _ in nnx.to_flat_state(abstract):
            got, want = model_params, states[3]
            for k in path:
                got, want = got[k], want[k]
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=str(path))


def _flip_bytes(path, n=400):
    """Flips `n` bytes in the middle of a file (bit rot)."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + n] = bytes(b ^ 0xFF for b in data[mid : mid + n])
    path.write_bytes(bytes(data))


def test_corrupt_checkpoint_is_refused_in_one_line(saved, tmp_path):
    """The real CLI on one of our checkpoints with bytes flipped in its largest params data file: exit
    status 1, one line naming the step and the file, no traceback, no output left; `load` refuses it."""
    convert("hf-to-jax", "--hf", saved[1] / "single", "--out", tmp_path / "ckpt")
    files = [p for p in (tmp_path / "ckpt" / "0" / "params").rglob("*") if p.is_file()]
    largest = max(files, key=lambda p: p.stat().st_size)
    _flip_bytes(largest)
    r = subprocess.run(
        [sys.executable, TOOL, "jax-to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "step 0 failed verification" in lines[0] and largest.name in lines[0], lines[0]
    assert leftovers(tmp_path, "out") == []
    with pytest.raises(ckpt_format.CheckpointCorrupt, match=largest.name):  # idefics_jax.load verifies too
        idefics_jax.load(tmp_path / "ckpt")


def test_out_is_refused_unless_overwrite_and_replaced_atomically(saved, tmp_path):
    _, root = saved
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "old").write_text("x")
    assert status("hf-to-jax", "--hf", root / "single", "--out", out) == 1
    assert os.listdir(out) == ["old"]
    convert("hf-to-jax", "--hf", root / "single", "--out", out, "--overwrite")
    assert os.listdir(out) == ["0"] and leftovers(tmp_path, "ckpt") == ["ckpt"]


# init ---------------------------------------------------------------------------------------------

INIT_CONFIG = """
import ml_collections
from idefics_jax.config import IdeficsConfig, PerceiverConfig, VisionConfig

def get_config():
    c = ml_collections.ConfigDict()
    c.model = IdeficsConfig(
        vocab_size=96, additional_vocab_size=2, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
        num_attention_heads=4, rms_norm_eps=1e-5, max_position_embeddings=1024, cross_layer_interval=2,
        qk_layer_norms=True, alpha_type="float", alpha_initializer="zeros", use_resampler=True,
        vision=VisionConfig(embed_dim=24, image_size=28, intermediate_size=40, patch_size=14, num_hidden_layers=2,
                            num_attention_heads=2, hidden_act="gelu", layer_norm_eps=1e-5),
        perceiver=PerceiverConfig(resampler_n_latents=3, resampler_depth=2, resampler_n_heads=2, resampler_head_dim=8,
                                  qk_layer_norms_perceiver=True)).to_dict()
    c.seed = 5
    return c
"""


def make_clip(directory, layout: str):
    """A random CLIP (vision tower sized as INIT_CONFIG) saved in `layout`; returns its vision tower."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(1)
    vision = dict(
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
    )
    if layout == "CLIPVisionModel":
        model = CLIPVisionModel(CLIPVisionConfig(**vision)).eval()
        tower = model
    else:
        text = dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
        model = CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=8)).eval()
        tower = model.vision_model
    with torch.no_grad():  # non-trivial norms and biases
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    return tower


def make_llama(directory, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(2)
    cfg = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        rms_norm_eps=1e-5,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        initializer_range=0.1,
    )
    cfg.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
    model.save_pretrained(directory, max_shard_size="40KB")
    return model


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("init")
    (root / "tiny_idefics.py").write_text(INIT_CONFIG)
    llama = make_llama(root / "llama")
    towers = {layout: make_clip(root / layout, layout) for layout in ("CLIPVisionModel", "CLIPModel")}
    return root, llama, towers


@pytest.mark.parametrize("layout", ["CLIPVisionModel", "CLIPModel"])
def test_init_from_clip_and_llama(sources, tmp_path, layout):
    root, llama, towers = sources
    convert(
        "init",
        "--clip",
        root / layout,
        "--llama",
        root / "llama",
        "--config",
        root / "tiny_idefics.py",
        "--out",
        tmp_path / "ckpt",
    )
    ours = idefics_jax.load(tmp_path / "ckpt")
    config = ours.config
    assert float(np.abs(np.asarray(ours.blocks.gated_cross_attn_layer.alpha_cross_attn.get_value())).max()) == 0

    batch = inputs(2, 40, 2, pad=(0, 5))
    with torch.no_grad():
        ids = torch.from_numpy(np.minimum(batch["input_ids"], 95))
        am = torch.from_numpy(batch["attention_mask"])
        ref = llama(input_ids=ids, attention_mask=am).logits.numpy()
    # Zero gates: images change nothing, and the base-vocab logits are LLaMA's.
    for kw in ({}, {k: batch[k] for k in ("pixel_values", "image_attention_mask")}):
        logits = np.asarray(ours(ids.numpy(), attention_mask=batch["attention_mask"], **kw))
        assert logits.shape[-1] == 98
        real = batch["attention_mask"].astype(bool)
        np.testing.assert_allclose(logits[..., :96][real], ref[real], atol=1e-4, rtol=0)

    pixels = batch["pixel_values"][0]
    with torch.no_grad():
        vision_ref = towers[layout](pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
    np.testing.assert_allclose(np.asarray(ours.vision_model(pixels)), vision_ref, atol=1e-4, rtol=0)

    # The new parts are what our model's own initialisers give with the config's seed (same random
    # stream; XLA fuses the jitted scale-and-cast, so the last bit may differ).
    from idefics_jax.models import Idefics

    fresh = dict(nnx.to_flat_state(nnx.state(Idefics(config, rngs=nnx.Rngs(5)), nnx.Param)))
    loaded = dict(nnx.to_flat_state(nnx.state(ours, nnx.Param)))
    new = [p for p in fresh if cw.is_new(tuple(str(k) for k in p))]
    assert len(new) > 20
    for p in new:
        np.testing.assert_allclose(
            np.asarray(loaded[p].get_value()), np.asarray(fresh[p].get_value()), rtol=1e-6, atol=1e-9, err_msg=str(p)
        )


def test_new_params_equal_eager_init_in_groups():
    """Initialising the new parts a few at a time under jit gives the eager model's values (to the last bit
    or two: XLA fuses the scale-and-cast)."""
    from idefics_jax.models import Idefics

    config = IdeficsConfig.from_hf(hf_config())
    fresh = {
        tuple(str(k) for k in p): v.get_value()
        for p, v in nnx.to_flat_state(nnx.state(Idefics(config, rngs=nnx.Rngs(9)), nnx.Param))
    }
    new = [p for p in fresh if cw.is_new(p)]
    groups = [new[:3], new[3:4], new[4:]]
    got = {path: value for group in groups for path, value in cw.new_params(config, 9, group)}
    assert sorted(got) == sorted(new)
    for p in new:
        np.testing.assert_allclose(got[p], np.asarray(fresh[p]), rtol=1e-6, atol=1e-9, err_msg=str(p))


# Bad input ----------------------------------------------------------------------------------------


def _edit_single(directory, edit):
    sd = load_file(directory / "model.safetensors")
    edit(sd)
    save_file(sd, directory / "model.safetensors", metadata={"format": "pt"})


def _truncate_shard(directory):
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    shard = directory / sorted(set(index["weight_map"].values()))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    return shard.name


def _corrupt_single(directory):
    path = directory / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"\xff" * 32  # inside the JSON header
    path.write_bytes(bytes(data))


def _config_edit(directory, **fields):
    cfg = json.loads((directory / "config.json").read_text())
    cfg.update(fields)
    (directory / "config.json").write_text(json.dumps(cfg))


class _NotATensor:
    pass


def _bin_with(directory, extra):
    sd = load_file(directory / "model.safetensors")
    os.remove(directory / "model.safetensors")
    sd.update(extra)
    torch.save(sd, directory / "pytorch_model.bin")


BAD_HF = {
    "missing tensor": (
        "single",
        lambda d: _edit_single(d, lambda sd: sd.pop("model.norm.weight")),
        r"model\.safetensors: tensor 'model\.norm\.weight' is missing",
    ),
    "unexpected tensor": (
        "single",
        lambda d: _edit_single(d, lambda sd: sd.update(extra=torch.ones(2))),
        r"model\.safetensors: unexpected tensor 'extra'",
    ),
    "shape vs config.json": (
        "single",
        lambda d: _config_edit(d, intermediate_size=40),
        r"model\.safetensors: tensor 'model\.(gated_cross_attn_)?layers\.0\.mlp\."
        r"(gate|up|down)_proj\.weight' has "
        r"shape \((48, 32|32, 48)\); expected \((40, 32|32, 40)\)",
    ),
    "truncated shard": ("sharded", _truncate_shard, r"model-\d+-of-\d+\.safetensors: not a readable safetensors file"),
    "corrupt file": ("single", _corrupt_single, r"model\.safetensors: not a readable safetensors file"),
    "other model type": (
        "single",
        lambda d: _config_edit(d, model_type="llama"),
        r"config\.json: config model_type='llama'; expected 'idefics'",
    ),
    "bin with an object": (
        "single",
        lambda d: _bin_with(d, {"obj": _NotATensor()}),
        r"pytorch_model\.bin: not a tensor-only PyTorch checkpoint",
    ),
    "bin with a non-tensor": (
        "single",
        lambda d: _bin_with(d, {"step": 3}),
        r"pytorch_model\.bin: entry 'step' is not a tensor; expected only tensors",
    ),
}


@pytest.mark.parametrize("case", list(BAD_HF))
def test_bad_hf_input(saved, tmp_path, capsys, case):
    import re
    import shutil

    layout, edit, message = BAD_HF[case]
    src = tmp_path / "src"
    shutil.copytree(saved[1] / layout, src)
    edit(src)
    capsys.readouterr()
    assert status("hf-to-jax", "--hf", src, "--out", tmp_path / "out") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]), err
    assert leftovers(tmp_path, "out") == []


def test_bad_input_from_the_command_line(saved, tmp_path):
    """The real CLI: exit status 1, exactly one line on stderr, no output left (failure mid-stream)."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(saved[1] / "sharded", src)
    shard = _truncate_shard(src)
    r = subprocess.run(
        [sys.executable, TOOL, "hf-to-jax", "--hf", str(src), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and shard in lines[0] and "tensor" in lines[0], r.stderr
    assert leftovers(tmp_path, "out") == []


@pytest.mark.parametrize("case", ["llama layers", "llama gqa", "clip width", "clip type"])
def test_init_architecture_mismatch(sources, tmp_path, capsys, case):
    import re
    import shutil

    root = sources[0]
    llama, clip = tmp_path / "llama", tmp_path / "clip"
    shutil.copytree(root / "llama", llama)
    shutil.copytree(root / "CLIPVisionModel", clip)
    if case == "llama layers":
        _config_edit(llama, num_hidden_layers=6)
        message = r"llama/config\.json: num_hidden_layers=6; expected 4"
    elif case == "llama gqa":
        _config_edit(llama, num_key_value_heads=2)
        message = r"llama/config\.json: num_key_value_heads=2; expected 4"
    elif case == "clip width":
        _config_edit(clip, hidden_size=32)
        message = r"clip/config\.json: hidden_size=32; expected 24, the IDEFICS config's vision\.embed_dim"
    else:
        _config_edit(clip, model_type="siglip_vision_model")
        message = r"clip/config\.json: model_type='siglip_vision_model'; expected one of"
    capsys.readouterr()
    assert (
        status(
            "init", "--clip", clip, "--llama", llama, "--config", root / "tiny_idefics.py", "--out", tmp_path / "out"
        )
        == 1
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]), err
    assert leftovers(tmp_path, "out") == []


def test_help_has_an_example_per_subcommand():
    for command in ("hf-to-jax", "jax-to-hf", "init"):
        r = subprocess.run([sys.executable, TOOL, command, "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "example:" in r.stdout and f"convert_weights.py {command}" in r.stdout


def test_progress_bar_counts_tensors(saved, tmp_path, capsys):
    capsys.readouterr()
    convert("hf-to-jax", "--hf", saved[1] / "single", "--out", tmp_path / "ckpt", "--progress", "always")
    n = len(hf.hf_names(IdeficsConfig.from_hf(saved[0].config)))
    assert f"{n}/{n}" in capsys.readouterr().err


# Memory -------------------------------------------------------------------------------------------


def _measured(argv) -> tuple[float, float]:
    """(peak RSS in bytes, wall seconds) of the tool run in the only child of a fresh process."""
    code = (
        "import resource, subprocess, sys, time; t = time.time(); r = subprocess.run(sys.argv[1:]); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, time.time() - t); "
        "sys.exit(r.returncode)"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, sys.executable, TOOL, *map(str, argv)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr[-2000:]
    peak, seconds = r.stdout.split()[-2:]
    return float(peak), float(seconds)


@pytest.mark.slow
def test_memory_stays_below_half_a_1gb_checkpoint(tmp_path):
    """A 1.36 GiB fp32 model (largest stacked parameter 144 MiB) both ways: peak RSS < half its size.

    Peak ≈ 200 MiB (Python, JAX, Orbax) + ≤ 100 MiB (Orbax's OCDBT cache) + 2 × the largest parameter.
    """
    from idefics_jax import PerceiverConfig, VisionConfig

    config = IdeficsConfig(
        vocab_size=40000,
        additional_vocab_size=2,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=48,
        num_attention_heads=8,
        cross_layer_interval=4,
        qk_layer_norms=True,
        use_resampler=True,
        max_position_embeddings=256,
        vision=VisionConfig(
            embed_dim=512,
            image_size=224,
            intermediate_size=2048,
            patch_size=14,
            num_hidden_layers=32,
            num_attention_heads=8,
        ),
        perceiver=PerceiverConfig(
            resampler_n_latents=64, resampler_depth=6, resampler_n_heads=8, resampler_head_dim=64
        ),
    )
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(config.to_hf()))
    rng = np.random.default_rng(0)
    shard, shards, index = {}, 0, {}

    def flush():
        nonlocal shard, shards
        name = f"model-{shards:05d}.safetensors"
        save_file({k: torch.from_numpy(v) for k, v in shard.items()}, src / name, metadata={"format": "pt"})
        index.update({k: name for k in shard})
        shard, shards = {}, shards + 1

    for name, shape in hf.hf_names(config).items():
        shard[name] = rng.random(shape, dtype=np.float32)
        if sum(v.nbytes for v in shard.values()) > 256 * 2**20:
            flush()
    flush()
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    size = sum(p.stat().st_size for p in src.iterdir())
    assert size >= 2**30

    peak_in, s_in = _measured(["hf-to-jax", "--hf", src, "--out", tmp_path / "ckpt"])
    peak_out, s_out = _measured(
        ["jax-to-hf", "--ckpt", tmp_path / "ckpt", "--out", tmp_path / "back", "--max-shard-size", "300MB"]
    )
    print(
        f"checkpoint {size / 2**30:.2f} GiB; hf-to-jax peak RSS {peak_in / 2**20:.0f} MiB, {s_in:.1f} s; "
        f"jax-to-hf peak RSS {peak_out / 2**20:.0f} MiB, {s_out:.1f} s"
    )
    assert peak_in < size / 2 and peak_out < size / 2
    with open(src / "model.safetensors.index.json") as f:
        names = json.load(f)["weight_map"]
    back = tmp_path / "back"
    with open(back / "model.safetensors.index.json") as f:
        back_map = json.load(f)["weight_map"]
    assert sorted(back_map) == sorted(names)
    for name, file in names.items():  # byte-identical, one tensor at a time (memory-mapped)
        with safe_open(src / file, "np") as a, safe_open(back / back_map[name], "np") as b:
            assert a.get_tensor(name).tobytes() == b.get_tensor(name).tobytes(), name
