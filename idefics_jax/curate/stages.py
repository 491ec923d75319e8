"""The stages as datatrove executors, and the layout of a curation directory.

    DIR/config.json           the config every stage of DIR runs with (a rerun must match it)
    DIR/run.json              input file lists and task counts, hashed (a rerun must match them)
    DIR/extracted/*.parquet   web documents (docs.py layout), one shard per input file
    DIR/image_index.sqlite    url → image in the store (images.build_index)
    DIR/images/*.parquet      … with image bytes, failing images removed
    DIR/filtered/*.parquet    … after the text filters; DIR/filtered/_removed/ examples for the report
    DIR/dedup/                buckets/<kind>/<p>/*.parquet (keys by partition), partitions/<p>/*.parquet
                          (duplicates found in each), decisions.parquet, frequent_image_urls.json
    DIR/documents/*.parquet   the result: OBELICS-layout parquet for data.pipeline
    DIR/logs/<stage>/         datatrove's logs, per-task stats and completion markers

Each stage is one datatrove pipeline run by `LocalPipelineExecutor`, `SlurmPipelineExecutor` or
`RayPipelineExecutor`; a task handles input files rank::tasks and writes one output shard per
input file, atomically, so output does not depend on tasks or workers, and a rerun skips the tasks
datatrove marked complete and redoes the rest. Stages chain with datatrove's `depends`, so on
SLURM the whole run is one submission of dependent job arrays.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

from idefics_jax.curate.config import CurateConfig
from idefics_jax.errors import UserError

STAGES = ("extract", "images", "filter", "dedup", "write")


@dataclasses.dataclass
class Execution:
    """How stages run. `tasks`: datatrove tasks per parallel stage (0 = one per input file);
    `workers`: tasks run at once (0 = local: one per CPU core, SLURM/Ray: no limit); slurm_* only
    for executor "slurm"."""

    executor: str = "local"
    tasks: int = 0
    workers: int = 0
    progress: bool = True
    slurm_partition: str = ""
    slurm_time: str = "24:00:00"
    slurm_cpus_per_task: int = 1
    slurm_mem_per_cpu_gb: int = 4
    slurm_env_command: str = ""


def check_config(out: str, cfg: CurateConfig) -> None:
    """Records `cfg` in DIR/config.json, or checks that it equals the recorded one (completed
    tasks are skipped on a rerun, so mixing configs in one DIR would mix outputs silently)."""
    path = os.path.join(out, "config.json")
    current = json.loads(json.dumps(cfg.to_dict()))
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        diff = [
            f"{s}.{k}" for s in current for k in current[s] if saved.get(s, {}).get(k, current[s][k]) != current[s][k]
        ]
        if diff:
            raise UserError(
                f"{out} was curated with another config ({', '.join(diff)} differ): use a new --out, or remove {out}"
            )
        return
    os.makedirs(out, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(current, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)


def _recorded(out: str) -> dict:
    path = os.path.join(out, "run.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _same_as_before(out: str, what: str, value) -> None:
    """Records `value` (input files, a task count) in DIR/run.json, or checks it equals the
    recorded one: datatrove skips the tasks a previous run completed, which is only right when
    each task has the same input as then."""
    path = os.path.join(out, "run.json")
    record = _recorded(out)
    digest = value if isinstance(value, int) else hashlib.sha256(json.dumps(value).encode()).hexdigest()[:16]
    if what in record:
        if record[what] != digest:
            change = f"{record[what]}, now {value}" if isinstance(value, int) else "another file list"
            raise UserError(
                f"{out} was started with other {what} (was {change}): rerun with the same inputs and --tasks, "
                "or use a new --out"
            )
        return
    record[what] = digest
    os.makedirs(out, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)


def _executor(ex: Execution, name: str, pipeline: list, tasks: int, out: str, depends):
    logging_dir = os.path.join(out, "logs", name)
    workers = ex.workers if ex.workers > 0 else (os.cpu_count() or 1) if ex.executor == "local" else -1
    if ex.executor == "local":
        from datatrove.executor import LocalPipelineExecutor

        # fork: the steps are plain Python (no JAX, no threads of ours) and fork starts in milliseconds.
        return LocalPipelineExecutor(
            pipeline, tasks=tasks, workers=min(workers, tasks), logging_dir=logging_dir,
            depends=depends, start_method="fork",
        )  # fmt: skip
    if ex.executor == "slurm":
        from datatrove.executor import SlurmPipelineExecutor

        if not ex.slurm_partition:
            raise UserError("--executor slurm needs --slurm-partition")
        return SlurmPipelineExecutor(
            pipeline, tasks=tasks, workers=workers, time=ex.slurm_time, partition=ex.slurm_partition,
            cpus_per_task=ex.slurm_cpus_per_task, mem_per_cpu_gb=ex.slurm_mem_per_cpu_gb,
            job_name=f"curate-{name}", logging_dir=logging_dir, depends=depends,
            env_command=ex.slurm_env_command or None,
        )  # fmt: skip
    if ex.executor == "ray":
        import importlib.util

        from datatrove.executor import RayPipelineExecutor

        if importlib.util.find_spec("ray") is None:  # datatrove would only find out when the run starts
            raise UserError("--executor ray needs ray installed (pip install 'datatrove[ray]')")
        return RayPipelineExecutor(pipeline, tasks=tasks, workers=workers, logging_dir=logging_dir, depends=depends)
    raise UserError(f"--executor {ex.executor!r}: expected local, slurm or ray")


def build(
    stages: list[str], out: str, cfg: CurateConfig, ex: Execution, pages: str = "", images: str = ""
) -> list[tuple[str, object]]:
    """Executors for `stages` (in STAGES order), each depending on the previous one.
    `pages`: WARC/.html glob (extract); `images`: image store glob (images)."""
    from idefics_jax.curate.dedup import ApplyDedup, DedupBuckets, DedupDecide, DedupImageSets, DedupSignatures
    from idefics_jax.curate.docs import DocReader, DocWriter, list_files
    from idefics_jax.curate.extract import ExtractWebDocument, WebPageReader
    from idefics_jax.curate.filters import TextFilters
    from idefics_jax.curate.images import BuildImageIndex, ResolveImages

    def folder(name):
        return os.path.join(out, name)

    def docs_in(name):
        return DocReader(os.path.join(folder(name), "*.parquet"), progress=ex.progress)

    if "extract" in stages:
        files = list_files(pages, "--warc/--html")
        tasks = ex.tasks or len(files)
        _same_as_before(out, "extract inputs", files)
    else:
        prev = STAGES[STAGES.index(stages[0]) - 1]
        prev_folder = {"images": "extracted", "filter": "images", "dedup": "filtered", "write": "filtered"}[stages[0]]
        done = list_files(os.path.join(folder(prev_folder), "*.parquet"), f"output of stage {prev!r}")
        first = "dedup_signatures" if stages[0] == "dedup" else stages[0]
        # a stage rerun on its own keeps the task count it had (a shard may have had no output)
        tasks = ex.tasks or _recorded(out).get(f"tasks of {first}") or len(done)
    plan = {
        "extract": lambda: [
            ("extract", [WebPageReader(pages, progress=ex.progress), ExtractWebDocument(cfg.extract), DocWriter(folder("extracted"))], tasks)
        ],
        "images": lambda: [
            ("image_index", [BuildImageIndex(list_files(images, "--images"), folder("image_index.sqlite"))], 1),
            ("images", [docs_in("extracted"), ResolveImages(folder("image_index.sqlite"), cfg.images), DocWriter(folder("images"))], tasks),
        ],
        "filter": lambda: [
            ("filter", [docs_in("images"), TextFilters(cfg.filter, os.path.join(folder("filtered"), "_removed")), DocWriter(folder("filtered"))], tasks)
        ],
        "dedup": lambda: [
            ("dedup_signatures", [docs_in("filtered"), DedupSignatures(folder("dedup"), cfg.dedup)], tasks),
            ("dedup_buckets", [DedupBuckets(folder("dedup"), cfg.dedup)], cfg.dedup.partitions),
            ("dedup_image_sets", [DedupImageSets(folder("dedup"), cfg.dedup)], cfg.dedup.partitions),
            ("dedup_decide", [DedupDecide(folder("dedup"), cfg.dedup)], 1),
        ],
        "write": lambda: [
            ("write", [docs_in("filtered"), ApplyDedup(folder("dedup")), DocWriter(folder("documents"), cfg.write.row_group_size)], tasks)
        ],
    }  # fmt: skip
    if "images" in stages:
        _same_as_before(out, "image store", list_files(images, "--images"))
    executors, depends = [], None
    for stage in stages:
        for name, pipeline, n in plan[stage]():
            _same_as_before(out, f"tasks of {name}", n)
            depends = _executor(ex, name, pipeline, n, out, depends)
            executors.append((name, depends))
    return executors
