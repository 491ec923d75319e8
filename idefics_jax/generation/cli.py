"""python -m idefics_jax.generate (--ckpt DIR [--step N] | --hf DIR) --tokenizer DIR
    [--image PATH | --prompt TEXT] ... [--max-new-tokens 30] [--num-beams 1]
    [--do-sample --temperature T --top-k K --top-p P --seed S] [--debug]

The prompt is the `--image` and `--prompt` arguments in the order given, built as
`data.Processor` builds a prompt: `--image cat.png --prompt "A picture of"` puts the image first,
`--prompt "Left:" --image a.png --prompt "Right:" --image b.png --prompt "Same colour?"`
interleaves them. The image tokens are forbidden in the answer (as transformers' IDEFICS docs
recommend); generation stops at `</s>` and at `<end_of_utterance>` when the tokenizer has it.

The answer is printed at the end (one jitted program generates all tokens), on stdout; compile
time and time per new token go to stderr. Bad input (a missing or undecodable image, an unknown
checkpoint or tokenizer, a prompt longer than the model's positions) ends with one line, exit 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from idefics_jax.errors import UserError, cli_main, quiet_start

PROG = "python -m idefics_jax.generate"


class _Part(argparse.Action):
    """Appends (kind, value) to one ordered list, so --image and --prompt keep their interleaving."""

    def __call__(self, parser, namespace, value, option_string=None):
        parts = getattr(namespace, "parts", None) or []
        parts.append(("image" if option_string == "--image" else "text", value))
        namespace.parts = parts


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="one of our checkpoint directories (idefics_jax.load)")
    src.add_argument("--hf", help="an HF IDEFICS model directory (idefics_jax.from_hf)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest); with --ckpt")
    p.add_argument("--tokenizer", required=True, help="HF tokenizer directory")
    p.add_argument("--image", action=_Part, dest="parts", help="an image file (repeatable, ordered with --prompt)")
    p.add_argument("--prompt", action=_Part, dest="parts", help="a text part (repeatable, ordered with --image)")
    p.add_argument("--max-new-tokens", type=int, default=30)
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--length-penalty", type=float, default=1.0)
    p.add_argument("--do-sample", action="store_true")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--debug", action="store_true", help="show the traceback of input errors too")
    return p


def _read_prompt(parts: list[tuple[str, str]]) -> list:
    """(kind, value) parts → the processor's prompt (str and PIL images), images decoded now so a bad
    file is reported before any model is loaded."""
    from idefics_jax.data.processor import BadExample, decode_image

    prompt = []
    for kind, value in parts:
        if kind == "text":
            prompt.append(value)
            continue
        if not os.path.isfile(value):
            raise UserError(f"--image {value}: no such file")
        with open(value, "rb") as f:
            data = f.read()
        try:
            prompt.append(decode_image(data, max_pixels=2**31, min_side=1))
        except BadExample as e:
            raise UserError(f"--image {value}: cannot be read as an image ({e.detail or e.reason})") from None
    return prompt


def _load_model(args):
    import idefics_jax

    if args.hf is not None:
        if not os.path.isfile(os.path.join(args.hf, "config.json")):
            raise UserError(f"--hf {args.hf}: no config.json there; expected an HF IDEFICS model directory")
        return idefics_jax.from_hf(args.hf)
    if not os.path.isdir(args.ckpt):
        raise UserError(f"--ckpt {args.ckpt}: no such directory")
    return idefics_jax.load(args.ckpt, args.step)


def run(argv: list[str] | None = None) -> str:
    """The CLI's body: parses `argv`, generates, prints and returns the answer."""
    args = parser().parse_args(argv)
    return cli_main("generate", lambda: _answer(args), args.debug)


def _answer(args) -> str:
    if not args.parts:
        raise UserError("nothing to answer: give at least one --prompt or --image")
    if args.step is not None and args.ckpt is None:
        raise UserError("--step applies to --ckpt only")
    if not os.path.isdir(args.tokenizer):
        raise UserError(f"--tokenizer {args.tokenizer}: no such directory")
    prompt = _read_prompt(args.parts)
    quiet_start()
    from idefics_jax.data.processor import END_OF_UTTERANCE_TOKEN, Processor
    from idefics_jax.generation.search import prepare

    model = _load_model(args)
    processor = Processor(args.tokenizer, image_size=model.config.vision.image_size)
    tok = processor.tokenizer
    batch = processor([prompt])
    has_images = any(kind == "image" for kind, _ in args.parts)
    eos = [tok.eos_token_id]
    if END_OF_UTTERANCE_TOKEN in tok.get_vocab():
        eos.append(tok.convert_tokens_to_ids(END_OF_UTTERANCE_TOKEN))
    t0 = time.perf_counter()
    run_program = prepare(
        model,
        batch["input_ids"],
        batch["pixel_values"] if has_images else None,
        batch["image_attention_mask"] if has_images else None,
        batch["attention_mask"],
        max_new_tokens=args.max_new_tokens,
        num_beams=args.num_beams,
        length_penalty=args.length_penalty,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        bad_words_ids=[[processor.image_token_id], [processor.fake_token_id]],
        eos_token_id=eos,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    )
    t1 = time.perf_counter()
    out = run_program()[0, batch["input_ids"].shape[1] :]
    t2 = time.perf_counter()
    ends = [i for i, x in enumerate(out) if x in eos]
    new = out[: ends[0] + 1] if ends else out
    answer = tok.decode(new, skip_special_tokens=True).strip()
    print(answer, flush=True)
    print(
        f"{len(new)} new tokens in {t2 - t1:.3f} s ({1e3 * (t2 - t1) / len(new):.1f} ms/token, prefill included); "
        f"compiled in {t1 - t0:.1f} s",
        file=sys.stderr,
        flush=True,
    )
    return answer


if __name__ == "__main__":
    run()
