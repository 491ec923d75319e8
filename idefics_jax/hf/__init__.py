"""HF IDEFICS checkpoints ⇄ our state, by concern:

- `names`: the one table between HF tensor names and our (scan-stacked) state paths (`entries`,
  `Entry`, `hf_shapes`, `iter_hf`);
- `reading`: HF checkpoints read one tensor at a time (`HFReader`, `StateDictReader`), with the key
  and shape checks (`check_keys`, `read_stacked`) and `load_state` for `idefics_jax.from_hf`;
- `writing`: streamed safetensors shards (`SafetensorsWriter`) and `group_by_bytes`.

Everything public is re-exported here (`from idefics_jax import hf; hf.entries(...)`).
"""

from idefics_jax.hf.names import Entry, entries, hf_names, hf_shapes, iter_hf
from idefics_jax.hf.reading import (
    BUFFER_SUFFIXES,
    CheckpointError,
    HFReader,
    StateDictReader,
    check_keys,
    ignorable,
    is_buffer,
    load_state,
    read_stacked,
)
from idefics_jax.hf.writing import SafetensorsWriter, group_by_bytes, parse_size

__all__ = [
    "BUFFER_SUFFIXES",
    "CheckpointError",
    "Entry",
    "HFReader",
    "SafetensorsWriter",
    "StateDictReader",
    "check_keys",
    "entries",
    "group_by_bytes",
    "hf_names",
    "hf_shapes",
    "ignorable",
    "is_buffer",
    "iter_hf",
    "load_state",
    "parse_size",
    "read_stacked",
]
