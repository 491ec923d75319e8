"""Our `generate` vs transformers' `IdeficsForVisionText2Text.generate` (use_cache=True), side by side.

    python benchmarks/generate.py [--new 64] [--prompt 64] [--batches 1,8] [--beams 1,3] [--hidden 256] [--layers 8]

Same weights (an HF model with random weights, copied into ours), same prompts (every row: 2
images, `--prompt` tokens), fp32 on this CPU, one process, the two measured alternately. For each
batch size and search (greedy, beam search with 3 beams): time to first token (a request for one new
token: vision tower, perceiver, prefill and one choice), the time for `--new` new tokens, tokens/s
(rows × new tokens / time) and the decode rate after the first token, for each side, and our ratio.
Ours is timed after compilation (compile time printed apart); transformers' after one warm-up call.
Whether both produced the same tokens is printed too. Prints only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
import torch
from train_step import model_config
from transformers import IdeficsConfig as HFConfig
from transformers import IdeficsForVisionText2Text

from idefics_jax import hf
from idefics_jax.generation.search import prepare


def prompts(cfg, b: int, t: int) -> dict[str, np.ndarray]:
    """b rows of t random tokens with 2 images, the first seen from token 1, the second from t/2."""
    rng = np.random.default_rng(0)
    iam = np.zeros((b, t, 2), np.int64)
    iam[:, 1 : t // 2, 0] = 1
    iam[:, t // 2 :, 1] = 1
    s = cfg.vision.image_size
    return dict(
        input_ids=rng.integers(3, cfg.total_vocab_size, (b, t)).astype(np.int64),
        attention_mask=np.ones((b, t), np.int64),
        pixel_values=rng.standard_normal((b, 2, 3, s, s)).astype(np.float32),
        image_attention_mask=iam,
    )


def best_of(fn, repeats: int) -> tuple[float, object]:
    """(fastest wall time, last result) of `repeats` calls."""
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--new", type=int, default=64, help="new tokens per row")
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens per row")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--beams", default="1,3")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2, help="timed calls per measurement (the fastest counts)")
    a = p.parse_args()
    jax.config.update("jax_default_matmul_precision", "highest")  # fp32 matmuls, as torch's
    cfg = model_config(a.hidden, a.layers)
    torch.manual_seed(0)
    model = IdeficsForVisionText2Text(HFConfig(**cfg.to_hf())).eval()
    with torch.no_grad():  # live gates, or the cross-attention would be skipped work on both sides
        for name, param in model.named_parameters():
            if "alpha" in name:
                param.copy_(0.5 * torch.randn_like(param))
    from flax import nnx

    graphdef, state = hf.load_state(cfg, hf.StateDictReader(model.state_dict()))
    ours = nnx.merge(graphdef, state)
    print(
        f"model: hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, vocab {cfg.total_vocab_size}; "
        f"prompt {a.prompt} tokens + 2 images of {cfg.vision.image_size}px per row; {a.new} new tokens; fp32 CPU; "
        f"torch threads {torch.get_num_threads()}"
    )
    header = (
        f"{'batch':>5} {'search':>8} | {'TTFT ms':>16} | {'total s':>14} | {'tokens/s':>16} | "
        f"{'decode tok/s':>16} | {'ratio tok/s':>11} {'decode':>7} | same"
    )
    print(header + "\n" + "-" * len(header))
    for b in [int(x) for x in a.batches.split(",")]:
        batch = prompts(cfg, b, a.prompt)
        tb = {k: torch.from_numpy(v) for k, v in batch.items()}
        for beams in [int(x) for x in a.beams.split(",")]:

            def theirs(n, tb=tb, beams=beams):
                with torch.no_grad():
                    return model.generate(**tb, max_new_tokens=n, num_beams=beams, do_sample=False, use_cache=True)

            theirs(2)  # warm-up
            t_first_hf, _ = best_of(lambda: theirs(1), a.repeats)
            t_hf, ref = best_of(lambda: theirs(a.new), a.repeats)
            runs = {}
            compile_s = time.perf_counter()
            for n in (1, a.new):
                runs[n] = prepare(ours, **batch, max_new_tokens=n, num_beams=beams)
            compile_s = time.perf_counter() - compile_s
            t_first, _ = best_of(runs[1], a.repeats)
            t_ours, got = best_of(runs[a.new], a.repeats)
            ref = ref.numpy()
            made_hf = b * (ref.shape[1] - a.prompt)  # transformers stops when every row hit EOS
            same = np.array_equal(got[:, : ref.shape[1]], ref)
            rate_hf, rate = made_hf / t_hf, b * a.new / t_ours
            dec_hf = b * (ref.shape[1] - a.prompt - 1) / max(t_hf - t_first_hf, 1e-9)
            dec = b * (a.new - 1) / max(t_ours - t_first, 1e-9)
            search = "greedy" if beams == 1 else f"beams{beams}"
            print(
                f"{b:>5} {search:>8} | {1e3 * t_first:7.1f} {1e3 * t_first_hf:8.1f} | {t_ours:6.3f} {t_hf:7.3f} | "
                f"{rate:7.1f} {rate_hf:8.1f} | {dec:7.1f} {dec_hf:8.1f} | {rate / rate_hf:10.1f}× "
                f"{dec / dec_hf:6.1f}× | {'yes' if same else 'NO'}   (ours compiled in {compile_s:.0f} s)",
                flush=True,
            )
    print("columns: ours, then transformers'; ratio = ours / transformers'")


if __name__ == "__main__":
    main()
