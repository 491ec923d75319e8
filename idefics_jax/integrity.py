"""Checkpoint integrity: a manifest of file hashes per step, written after the commit, verified
before anything is read back.

Orbax makes a step directory appear atomically, but nothing checks what is read back: a flipped bit,
a truncated file or a half-synced shared filesystem restores silently. So every committed step gets
`manifest.process_<i>.json` per writing process: {relative path: [size, sha256]} of the files that
process owns (OCDBT's `ocdbt.process_<i>` data files; process 0 owns the rest: metadata, JSON items,
commit markers), plus the number of processes. `verify` re-hashes every file and lists every
difference (missing, resized, altered, or unlisted files; a missing manifest). The trainer, the
converters, `idefics_jax.load` and `init_from` verify before they restore. `fingerprint` names a
finalised directory's content by its manifests alone (no re-read), so a checkpoint step can record
which frozen-weights store (idefics_jax.ckpt_format) it was saved with.

Hashing reads each file once more after the save (≈ 1 GB/s per process; at 80B each process hashes
only its own share).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator

MANIFEST_PREFIX = "manifest.process_"
_OWNER = re.compile(r"ocdbt\.process_(\d+)")
_CHUNK = 8 * 2**20


def _files(step_dir: str) -> Iterator[str]:
    """Relative paths of the step's files (manifests excluded), in a stable order."""
    for root, dirs, files in os.walk(step_dir):
        dirs.sort()
        for name in sorted(files):
            rel = os.path.relpath(os.path.join(root, name), step_dir)
            if not (rel.startswith(MANIFEST_PREFIX) and rel.endswith(".json")):
                yield rel


def _owner(rel: str) -> int:
    m = _OWNER.search(rel)
    return int(m.group(1)) if m else 0


def sha256(path: str) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(step_dir: str, process_index: int = 0, process_count: int = 1) -> int:
    """Hashes the files this process owns in a committed step directory and writes its manifest
    atomically (temporary name, then rename). Returns the bytes hashed."""
    entries = {}
    total = 0
    for rel in _files(step_dir):
        if _owner(rel) % process_count == process_index:
            path = os.path.join(step_dir, rel)
            size = os.path.getsize(path)
            entries[rel] = [size, sha256(path)]
            total += size
    final = os.path.join(step_dir, f"{MANIFEST_PREFIX}{process_index}.json")
    tmp = f"{final}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"process_count": process_count, "files": entries}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return total


def has_manifest(step_dir: str) -> bool:
    """Whether process 0's manifest is there (the step was finalised)."""
    return os.path.isfile(os.path.join(step_dir, f"{MANIFEST_PREFIX}0.json"))


def _listed(step_dir: str) -> dict[str, list]:
    """{relative path: [size, sha256]} over all of a step's manifests (OSError, ValueError or
    KeyError when one is missing or unreadable)."""
    with open(os.path.join(step_dir, f"{MANIFEST_PREFIX}0.json")) as f:
        count = json.load(f)["process_count"]
    listed: dict[str, list] = {}
    for i in range(count):
        with open(os.path.join(step_dir, f"{MANIFEST_PREFIX}{i}.json")) as f:
            listed.update(json.load(f)["files"])
    return listed


def fingerprint(step_dir: str) -> str:
    """Hex sha256 over the manifests' entries (every file's relative path, size and sha256) of a
    finalised directory: equal for equal content, computed without reading the data files.
    ValueError naming the directory when a manifest is missing or unreadable."""
    try:
        listed = _listed(step_dir)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{step_dir}: unreadable manifest ({e})") from e
    return hashlib.sha256(json.dumps(sorted(listed.items())).encode()).hexdigest()


def verify(step_dir: str, shard: tuple[int, int] = (0, 1)) -> list[str]:
    """Problems of a step directory against its manifests (empty: verified). `shard` = (index, count)
    re-hashes only every count-th file from index (processes split the reading; every process still
    checks that the manifests are complete)."""
    step_dir = os.fspath(step_dir)
    first = os.path.join(step_dir, f"{MANIFEST_PREFIX}0.json")
    if not os.path.isfile(first):
        return [f"{step_dir}: no manifest ({MANIFEST_PREFIX}0.json): the save never finished its verification step"]
    try:
        listed = _listed(step_dir)
    except (OSError, ValueError, KeyError) as e:
        return [f"{step_dir}: unreadable manifest ({e})"]
    problems = []
    present = set(_files(step_dir))
    problems += [f"{os.path.join(step_dir, rel)}: missing" for rel in sorted(set(listed) - present)]
    problems += [f"{os.path.join(step_dir, rel)}: not in the manifest" for rel in sorted(present - set(listed))]
    index, n = shard
    for k, rel in enumerate(sorted(set(listed) & present)):
        if k % n != index:
            continue
        path = os.path.join(step_dir, rel)
        size, digest = listed[rel]
        if os.path.getsize(path) != size:
            problems.append(f"{path}: {os.path.getsize(path)} bytes, the manifest says {size}")
        elif sha256(path) != digest:
            problems.append(f"{path}: content differs from the manifest (sha256)")
    return problems


def size(step_dir: str) -> int:
    """Bytes of a finalised step, from its manifests (0 when it has none)."""
    total, i = 0, 0
    while os.path.isfile(path := os.path.join(step_dir, f"{MANIFEST_PREFIX}{i}.json")):
        with open(path) as f:
            total += sum(s for s, _ in json.load(f)["files"].values())
        i += 1
    return total
