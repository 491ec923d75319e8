"""Convert IDEFICS weights between HF transformers and our Orbax checkpoints, streaming.

    python tools/convert_weights.py hf-to-jax --hf HF_DIR --out CKPT_DIR [--dtype float32|bfloat16]
    python tools/convert_weights.py jax-to-hf --ckpt CKPT_DIR [--step N] --out HF_DIR \\
        [--tokenizer TOK_DIR] [--max-shard-size 5GB] [--dtype ...]
    python tools/convert_weights.py init --clip CLIP_DIR --llama LLAMA_DIR --config configs/80b.py \\
        --out CKPT_DIR [--seed N] [--dtype ...]

Every conversion goes through the one name table (`idefics_jax.hf`) one stacked parameter at a time:
HF tensors are read from memory-mapped safetensors, assembled into our scan-stacked array, and
written by `ckpt_format.ParamsWriter` (Orbax partial saves); the other way, `ckpt_format.iter_params`
restores one stacked array and `hf.SafetensorsWriter` writes its per-layer slices at their offsets
in pre-planned shards. Peak memory is about twice the largest stacked parameter, never the model.

Output is written into a temporary sibling of --out and renamed at the end; an existing --out is
refused unless --overwrite. Our checkpoints carry integrity manifests: the ones written here get one,
and a checkpoint read here is verified against its manifest first. Any bad input (a missing file,
wrong tensor names or shapes, a corrupt checkpoint) ends with exit status 1 and one line on stderr
naming the file, the tensor and what was expected (--debug: the traceback); nothing is left behind.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from idefics_jax.errors import UserError, cli_main, quiet_start

EXAMPLES = {
    "hf-to-jax": "example:\n  python tools/convert_weights.py hf-to-jax --hf ~/idefics-80b --out /ckpt/idefics-80b "
    "--dtype bfloat16\n  then: idefics_jax.load('/ckpt/idefics-80b'), or init_from it in training",
    "jax-to-hf": "example:\n  python tools/convert_weights.py jax-to-hf --ckpt /runs/exp1/checkpoints --step 20000 "
    "--out ~/idefics-exp1-hf --tokenizer ~/idefics-80b --max-shard-size 5GB\n"
    "  then: IdeficsForVisionText2Text.from_pretrained('~/idefics-exp1-hf')",
    "init": "example:\n  python tools/convert_weights.py init --clip ~/CLIP-ViT-H-14-laion2B-s32B-b79K "
    "--llama ~/llama-65b-hf --config configs/80b.py --out /ckpt/idefics-80b-init",
}


# Output directory handling ------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_output(out: str, overwrite: bool) -> Iterator[str]:
    """Yields a fresh temporary sibling of `out`; renames it to `out` on success, removes it on failure."""
    out = os.path.abspath(out)
    if os.path.lexists(out) and not overwrite:
        raise UserError(f"{out}: already exists; pass --overwrite to replace it")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.lexists(out):
        # Move the old output aside first, so `out` is never missing a complete version for long.
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=parent)
        os.rename(out, os.path.join(old, "x"))
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


def _progress(total: int, mode: str, desc: str):
    from tqdm import tqdm

    disable = {"auto": None, "always": False, "never": True}[mode]  # None: only on a terminal
    return tqdm(total=total, desc=desc, unit="tensor", disable=disable, file=sys.stderr, dynamic_ncols=True)


def _np_dtype(name: str) -> np.dtype:
    import jax.numpy as jnp

    return np.dtype(jnp.dtype(name))


def _group_budget(entries, dtype: np.dtype) -> int:
    """Bytes per Orbax partial save (and per jitted initialisation): up to the model's largest stacked
    parameter, at least 64 MiB (fewer, larger saves), so peak memory stays about twice the largest
    parameter whatever the model."""
    return max(max(e.nbytes(dtype) for e in entries), 64 * 2**20)


def _write_groups(writer, table, dtype: np.dtype, budget: int, build: Callable[[list], Iterator[tuple[Any, Any]]]):
    """Writes the parameters of `table` into the ParamsWriter `writer`, cut by `hf.group_by_bytes` into
    groups of `budget` bytes: `build(group of entries)` yields (path, numpy array) for the group, which
    is then written as one Orbax partial save."""
    from idefics_jax import hf

    for group in hf.group_by_bytes([(e, e.nbytes(dtype)) for e in table], budget):
        for path, value in build(group):
            writer.add(path, value)
        writer.flush()


def _read_from(reader, dtype: np.dtype, tick: Callable[[], Any], rename: Callable[[str], str] | None = None):
    """`build` for `_write_groups`: each parameter of a group read from the HF `reader` (its tensors
    named `rename(IDEFICS name)` there), shape-checked, cast to `dtype`; `tick()` after each tensor."""
    from idefics_jax import hf

    return lambda group: ((e.path, hf.read_stacked(e, reader, dtype, rename, tick)) for e in group)


# hf-to-jax ----------------------------------------------------------------------------------------


def hf_to_jax(args) -> None:
    """HF IDEFICS directory → our checkpoint (step 0: params + config)."""
    from idefics_jax import ckpt_format, hf
    from idefics_jax.config import IdeficsConfig

    config_path = os.path.join(args.hf, "config.json")
    config = _hf_config(config_path, lambda d: IdeficsConfig.from_hf(d, param_dtype=args.dtype))
    reader = hf.HFReader(args.hf)
    table = hf.entries(config)
    hf.check_keys(reader, hf.hf_shapes(table), hf.ignorable(config))
    dtype = _np_dtype(args.dtype)
    with atomic_output(args.out, args.overwrite) as tmp:
        writer = ckpt_format.ParamsWriter(tmp, 0)
        with _progress(len(hf.hf_shapes(table)), args.progress, "hf-to-jax") as bar:
            _write_groups(writer, table, dtype, _group_budget(table, dtype), _read_from(reader, dtype, bar.update))
        writer.finish({"model": config.to_dict(), "converted_from": {"hf": os.path.abspath(args.hf)}})


def _hf_config(path: str, build: Callable[[dict], Any]):
    """`build(config.json dict)`, turning every failure into a one-line error naming the file."""
    if not os.path.exists(path):
        raise UserError(f"{path}: missing; expected the model's config.json")
    try:
        with open(path) as f:
            d = json.load(f)
        return build(d)
    except (ValueError, TypeError) as e:  # JSON errors, model_type, field validation
        raise UserError(f"{path}: {e}") from e


# jax-to-hf ----------------------------------------------------------------------------------------

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
)


def jax_to_hf(args) -> None:
    """Our checkpoint (any step, converted or trained) → HF directory: config.json + safetensors shards."""
    from idefics_jax import ckpt_format, hf
    from idefics_jax.config import IdeficsConfig

    # Verified before anything is read (the files against the step's manifest): a corrupt checkpoint
    # is refused here rather than half-converted.
    step, cfg = ckpt_format.read_config(args.ckpt, args.step, verify=True)
    config = IdeficsConfig.from_dict(cfg["model"])
    entries = hf.entries(config)
    stored = ckpt_format.params_metadata(args.ckpt, step)
    where = f"{os.path.abspath(args.ckpt)} step {step} params"
    for e in entries:
        if e.path not in stored:
            raise UserError(f"{where}: parameter {'.'.join(e.path)!r} is missing; expected {list(e.shape)}")
        if stored[e.path][0] != e.shape:
            raise UserError(
                f"{where}: parameter {'.'.join(e.path)!r} has shape {list(stored[e.path][0])}; "
                f"expected {list(e.shape)} from its config"
            )
    extra = sorted(set(stored) - {e.path for e in entries})
    if extra:
        raise UserError(f"{where}: unexpected parameter {'.'.join(extra[0])!r}; not part of its config's model")
    out_dtype = {e.path: _np_dtype(args.dtype) if args.dtype else stored[e.path][1] for e in entries}
    if args.tokenizer:
        tok_files = [f for f in TOKENIZER_FILES if os.path.exists(os.path.join(args.tokenizer, f))]
        if not tok_files:
            raise UserError(f"{args.tokenizer}: no tokenizer files; expected one of {', '.join(TOKENIZER_FILES)}")
    plan = [(name, shape, out_dtype[e.path]) for e in entries for name, shape in hf.hf_shapes([e]).items()]
    by_path = {e.path: e for e in entries}
    with atomic_output(args.out, args.overwrite) as tmp:
        writer = hf.SafetensorsWriter(tmp, plan, hf.parse_size(args.max_shard_size))
        try:
            with _progress(len(plan), args.progress, "jax-to-hf") as bar:
                for path, value in ckpt_format.iter_params(args.ckpt, step, list(by_path), verify=False):
                    e = by_path[path]
                    for name, t in hf.iter_hf(e, value):
                        writer.write(name, t.astype(out_dtype[path], copy=False))
                        bar.update()
                    del value
            writer.finish()
        finally:
            writer.close()
        dtypes = {d.name for d in out_dtype.values()}
        hf_config = config.replace(param_dtype=dtypes.pop() if len(dtypes) == 1 else "float32").to_hf()
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2, sort_keys=True)
        for name in tok_files if args.tokenizer else ():
            shutil.copy2(os.path.join(args.tokenizer, name), os.path.join(tmp, name))


# init ---------------------------------------------------------------------------------------------

# Our model's parts with no counterpart in CLIP or LLaMA: initialised by `Idefics`'s own initialisers.
NEW_PARTS = (
    ("perceiver_resampler",),
    ("blocks", "gated_cross_attn_layer"),
    ("embed_tokens", "additional_embedding"),
    ("lm_head", "additional_fc"),
)


def is_new(path: tuple[str, ...]) -> bool:
    """True for parameters a fresh IDEFICS initialises (not taken from CLIP or LLaMA)."""
    return any(path[: len(p)] == p for p in NEW_PARTS)


def load_config_file(path: str):
    """`get_config()` of a config file given by path (as ml_collections' config_flags loads it)."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such config file; expected a Python file with get_config()")
    spec = importlib.util.spec_from_file_location(f"_config_{abs(hash(os.path.abspath(path)))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise UserError(f"{path}: defines no get_config()")
    return module.get_config()


def _expect(path: str, pairs: list[tuple[str, Any, Any, str]]) -> None:
    """Raises naming the first (field, got, expected, our field) that differs."""
    for field, got, want, ours in pairs:
        if got != want:
            raise UserError(f"{path}: {field}={got!r}; expected {want!r}, the IDEFICS config's {ours}")


def _transformers_config(path: str, classes: dict[str, str]):
    """(model_type, the transformers config class `classes[model_type]` loaded from config.json at
    `path`): defaults filled in, as transformers omits them when saving."""
    d = _hf_config(path, lambda d: d)
    kind = d.get("model_type")
    if kind not in classes:
        raise UserError(f"{path}: model_type={kind!r}; expected one of {tuple(classes)}")
    import transformers

    try:
        return kind, getattr(transformers, classes[kind]).from_pretrained(os.path.dirname(path))
    except (ValueError, TypeError, OSError) as e:
        raise UserError(f"{path}: {e}") from e


def check_clip(path: str, config) -> str:
    """Checks an HF CLIP config.json against `config.vision`; returns its layout ('clip' | 'clip_vision_model')."""
    kind, hf_cfg = _transformers_config(path, {"clip": "CLIPConfig", "clip_vision_model": "CLIPVisionConfig"})
    v = hf_cfg.vision_config if kind == "clip" else hf_cfg
    pre = "vision_config." if kind == "clip" else ""
    c = config.vision
    _expect(
        path,
        [
            (pre + k, getattr(v, k), getattr(c, ours), "vision." + ours)
            for k, ours in [
                ("hidden_size", "embed_dim"),
                ("intermediate_size", "intermediate_size"),
                ("num_hidden_layers", "num_hidden_layers"),
                ("num_attention_heads", "num_attention_heads"),
                ("image_size", "image_size"),
                ("patch_size", "patch_size"),
                ("num_channels", "num_channels"),
                ("hidden_act", "hidden_act"),
                ("layer_norm_eps", "layer_norm_eps"),
            ]
        ],
    )
    return kind


def check_llama(path: str, config) -> None:
    """Checks an HF LLaMA config.json against the language-model fields of `config`."""
    _, d = _transformers_config(path, {"llama": "LlamaConfig"})
    rope = getattr(d, "rope_parameters", None) or getattr(d, "rope_scaling", None) or {}
    theta = rope.get("rope_theta", getattr(d, "rope_theta", 10000.0))
    heads = d.num_attention_heads
    _expect(
        path,
        [
            ("vocab_size", d.vocab_size, config.vocab_size, "vocab_size"),
            ("hidden_size", d.hidden_size, config.hidden_size, "hidden_size"),
            ("intermediate_size", d.intermediate_size, config.intermediate_size, "intermediate_size"),
            ("num_hidden_layers", d.num_hidden_layers, config.num_hidden_layers, "num_hidden_layers"),
            ("num_attention_heads", heads, config.num_attention_heads, "num_attention_heads"),
            (
                "num_key_value_heads",
                getattr(d, "num_key_value_heads", None) or heads,
                config.num_attention_heads,
                "num_attention_heads (IDEFICS has no grouped-query attention)",
            ),
            (
                "head_dim",
                getattr(d, "head_dim", None) or config.head_dim,
                config.head_dim,
                "hidden_size / num_attention_heads",
            ),
            ("hidden_act", d.hidden_act, config.hidden_act, "hidden_act"),
            ("rms_norm_eps", d.rms_norm_eps, config.rms_norm_eps, "rms_norm_eps"),
            ("rope_theta", float(theta), config.rope_theta, "rope_theta"),
            (
                "rope_type",
                rope.get("rope_type", rope.get("type", "default")),
                "default",
                "RoPE (only default is supported)",
            ),
            ("attention_bias", getattr(d, "attention_bias", False), False, "bias-free attention"),
            ("mlp_bias", getattr(d, "mlp_bias", False), False, "bias-free MLP"),
            (
                "tie_word_embeddings",
                getattr(d, "tie_word_embeddings", False),
                config.tie_word_embeddings,
                "tie_word_embeddings",
            ),
        ],
    )


def new_params(config, seed: int, paths: list[tuple[str, ...]]) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    """(path, numpy array) for the given parameters, equal to `Idefics(config, rngs=nnx.Rngs(seed))`'s
    (same random stream; the last bit may differ where XLA fuses the scale-and-cast).

    The whole model's initialisation is traced under `jax.jit` but only these parameters are outputs,
    so XLA drops every other initialiser: memory is these parameters, not the (80B) model.
    """
    import jax
    from flax import nnx

    from idefics_jax.models import Idefics

    def init():
        state = nnx.state(Idefics(config, rngs=nnx.Rngs(seed)), nnx.Param)
        flat = {tuple(str(k) for k in p): v for p, v in nnx.to_flat_state(state)}
        return [flat[p].get_value() for p in paths]

    for path, value in zip(paths, jax.jit(init)()):
        yield path, np.asarray(value)


def init(args) -> None:
    """A fresh IDEFICS checkpoint: vision tower from CLIP, language model from LLaMA, the rest initialised."""
    from idefics_jax import ckpt_format, hf
    from idefics_jax.config import IdeficsConfig

    cfg = load_config_file(args.config)
    try:
        config = IdeficsConfig.from_dict(cfg.model)
        if args.dtype:
            config = config.replace(param_dtype=args.dtype)
    except (ValueError, TypeError, AttributeError) as e:
        raise UserError(f"{args.config}: {e}") from e
    clip_kind = check_clip(os.path.join(args.clip, "config.json"), config)
    check_llama(os.path.join(args.llama, "config.json"), config)
    clip, llama = hf.HFReader(args.clip), hf.HFReader(args.llama)
    entries = hf.entries(config)
    # CLIPModel and older CLIPVisionModel files name the tower `vision_model.…`; transformers 5 saves a
    # CLIPVisionModel without that prefix.
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in clip.keys()) else ""
    from_clip = lambda n: n.replace("model.vision_model.", prefix, 1)
    vision = [e for e in entries if e.path[0] == "vision_model"]
    text = [e for e in entries if e.path[0] != "vision_model" and not is_new(e.path)]
    new = [e for e in entries if is_new(e.path)]
    # A CLIPModel's text tower and projections: there, but not taken.
    clip_other = ("text_model.", "visual_projection.", "text_projection.", "logit_scale")
    hf.check_keys(
        clip,
        [from_clip(n) for n in hf.hf_shapes(vision)],
        lambda k: hf.is_buffer(k) or (clip_kind == "clip" and k.startswith(clip_other)),
    )
    hf.check_keys(llama, hf.hf_shapes(text))
    seed = args.seed if args.seed is not None else cfg.get("seed", 0)
    dtype = _np_dtype(config.param_dtype)
    with atomic_output(args.out, args.overwrite) as tmp:
        writer = ckpt_format.ParamsWriter(tmp, 0)
        with _progress(len(hf.hf_shapes(vision + text)) + len(new), args.progress, "init") as bar:
            budget = _group_budget(entries, dtype)
            _write_groups(writer, vision, dtype, budget, _read_from(clip, dtype, bar.update, from_clip))
            _write_groups(writer, text, dtype, budget, _read_from(llama, dtype, bar.update))

            def initialise(group):
                for path, value in new_params(config, seed, [e.path for e in group]):
                    yield path, value
                    bar.update()

            _write_groups(writer, new, dtype, budget, initialise)
        writer.finish(
            {
                "model": config.to_dict(),
                "converted_from": {
                    "clip": os.path.abspath(args.clip),
                    "llama": os.path.abspath(args.llama),
                    "config": os.path.abspath(args.config),
                    "seed": seed,
                },
            }
        )


# CLI ----------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    """The CLI: three subcommands, each with an example in its --help."""
    p = argparse.ArgumentParser(
        prog="convert_weights.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(EXAMPLES.values()),
    )
    sub = p.add_subparsers(dest="command", required=True)
    fmt = argparse.RawDescriptionHelpFormatter
    dtypes = ("float32", "bfloat16", "float16")

    def common(s):
        s.add_argument("--out", required=True, help="output directory (written atomically)")
        s.add_argument("--overwrite", action="store_true", help="replace an existing --out")
        s.add_argument(
            "--progress",
            choices=("auto", "always", "never"),
            default="auto",
            help="progress bar over tensors on stderr (auto: only on a terminal)",
        )
        s.add_argument("--debug", action="store_true", help="show the traceback of an input error")

    s = sub.add_parser(
        "hf-to-jax",
        help="HF IDEFICS directory → our Orbax checkpoint",
        epilog=EXAMPLES["hf-to-jax"],
        formatter_class=fmt,
        description=textwrap.fill(
            "Reads config.json + model.safetensors (or sharded safetensors with "
            "model.safetensors.index.json, or pytorch_model*.bin, tensors only) and writes "
            "step 0 of an Orbax checkpoint (scan-stacked params + config).",
            100,
        ),
    )
    s.add_argument("--hf", required=True, help="HF IDEFICS model directory")
    s.add_argument("--dtype", choices=dtypes, default="float32", help="stored parameter dtype (default float32)")
    common(s)
    s.set_defaults(run=hf_to_jax)

    s = sub.add_parser(
        "jax-to-hf",
        help="our checkpoint → HF IDEFICS directory",
        epilog=EXAMPLES["jax-to-hf"],
        formatter_class=fmt,
        description=textwrap.fill(
            "Writes config.json, safetensors shards (+ model.safetensors.index.json) loadable "
            "by IdeficsForVisionText2Text.from_pretrained, and the tokenizer files if given. "
            "Works on converted and training checkpoints.",
            100,
        ),
    )
    s.add_argument("--ckpt", required=True, help="our checkpoint directory (Orbax CheckpointManager root)")
    s.add_argument("--step", type=int, default=None, help="step to convert (default: the latest)")
    s.add_argument("--tokenizer", help="directory whose tokenizer/processor files are copied beside the weights")
    s.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB, 2GiB")
    s.add_argument("--dtype", choices=dtypes, default=None, help="tensor dtype (default: as stored)")
    common(s)
    s.set_defaults(run=jax_to_hf)

    s = sub.add_parser(
        "init",
        help="fresh IDEFICS from HF CLIP + LLaMA checkpoints",
        epilog=EXAMPLES["init"],
        formatter_class=fmt,
        description=textwrap.fill(
            "Vision tower from an HF CLIP checkpoint (CLIPVisionModel or CLIPModel layout), "
            "language model from an HF LlamaForCausalLM checkpoint, the new parts (perceiver, "
            "gated cross-attention layers, additional embedding rows and LM-head columns) "
            "initialised by the model's own initialisers as the config says (gates zero with "
            "alpha_initializer='zeros'). Any architecture mismatch is an error.",
            100,
        ),
    )
    s.add_argument("--clip", required=True, help="HF CLIP model directory")
    s.add_argument("--llama", required=True, help="HF LLaMA model directory")
    s.add_argument("--config", required=True, help="config file with get_config() and a `model` section")
    s.add_argument("--seed", type=int, default=None, help="init seed of the new parts (default: the config's seed)")
    s.add_argument("--dtype", choices=dtypes, default=None, help="stored parameter dtype (default: model.param_dtype)")
    common(s)
    s.set_defaults(run=init)
    return p


def _return_freed_memory() -> None:
    """Makes glibc serve every allocation ≥ 1 MiB by its own mmap, so freeing a tensor returns it.

    By default glibc raises its mmap threshold to the size of the last freed block (up to 32 MiB);
    tensors below that then come from the heap and stay in RSS after being freed, so a converter
    that frees each parameter would still grow by the sum of all parameters under 32 MiB.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 2**20)  # M_MMAP_THRESHOLD (fixing it also turns off the dynamic threshold)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI; returns 0, or exits with status 1 after one error line on stderr (a UserError:
    bad input files, tensors, shapes, a corrupt checkpoint; the traceback with --debug)."""
    args = parser().parse_args(argv)
    quiet_start()
    _return_freed_memory()
    # Orbax logs routine warnings (e.g. about read-only managers) to stderr; keep it for the progress
    # bar and errors.
    logging.getLogger().setLevel(logging.ERROR)
    cli_main(f"convert_weights.py {args.command}", lambda: args.run(args), debug=args.debug)
    return 0


if __name__ == "__main__":
    sys.exit(main())
