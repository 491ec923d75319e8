"""Generation: `generate` (greedy, sampling, beam search; equal to transformers' `generate`) over a
preallocated key/value cache (`decode`), and the command line (`cli`, run as
`python -m idefics_jax.generate`)."""

from idefics_jax.generation.search import generate

__all__ = ["generate"]
