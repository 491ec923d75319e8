"""Input data for IDEFICS: the processor (inference inputs) and the Grain training pipeline.

Processor(tokenizer_path, image_size)(prompts) → input_ids, attention_mask, pixel_values,
    image_attention_mask, equal to transformers' IdeficsProcessor (processor.py)
default_config() → the `data` config section; pipeline(cfg, process_index, process_count) →
    step-indexed packed batches (pipeline.py), from the formats read by formats.py, packed by
    packing.py
schema.BATCH → the training batch's keys, dtypes and shapes; batch_spec(cfg, mesh) → its
    ShapeDtypeStructs (schema.py)
tiny.ensure(dir) → the bundled tiny dataset and tokenizer (tiny.py)
"""

from idefics_jax.data.pipeline import COUNTERS, REASONS, Pipeline, default_config, pipeline
from idefics_jax.data.processor import Processor
from idefics_jax.data.schema import BATCH_KEYS, MODEL_INPUTS, batch_spec

__all__ = [
    "BATCH_KEYS",
    "COUNTERS",
    "MODEL_INPUTS",
    "REASONS",
    "Pipeline",
    "Processor",
    "batch_spec",
    "default_config",
    "pipeline",
]
