"""python -m idefics_jax.curate SUBCOMMAND — web pages → OBELICS-style interleaved documents.

    python -m idefics_jax.curate run --warc 'crawl/*.warc.gz' --images 'img2dataset/*.tar' --out DIR
        [--config FILE.json] [--executor local|slurm|ray] [--workers N] [--tasks N]
    python -m idefics_jax.curate extract --warc GLOB | --html GLOB --out DIR
    python -m idefics_jax.curate images --images GLOB --out DIR
    python -m idefics_jax.curate filter|dedup|write --out DIR
    python -m idefics_jax.curate report --out DIR          (table on stdout, DIR/report.png)
    python -m idefics_jax.curate config > thresholds.json  (every threshold, OBELICS's defaults)
    python -m idefics_jax.curate urls --out DIR > urls.txt (image URLs of DIR/extracted, for img2dataset)

`run` does extract → images → filter → dedup → write and leaves the result in DIR/documents/;
a rerun (after a kill, a node failure) redoes only the unfinished tasks. See docs/curation.md.
"""

from __future__ import annotations

import argparse
import sys

PROG = "python -m idefics_jax.curate"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def common(s, execution=True):
        s.add_argument("--out", required=True, help="curation directory (stages read and write under it)")
        s.add_argument("--debug", action="store_true", help="tracebacks for user errors")
        if not execution:
            return
        s.add_argument(
            "--config", default="", help="JSON file of thresholds to override (idefics_jax/curate/config.py)"
        )
        s.add_argument("--executor", default="local", choices=("local", "slurm", "ray"))
        s.add_argument(
            "--workers",
            type=int,
            default=0,
            help="tasks run at once (default: local: one per CPU core; slurm/ray: no limit)",
        )
        s.add_argument("--tasks", type=int, default=0, help="datatrove tasks per stage (0: one per input file)")
        s.add_argument("--no-progress", action="store_true", help="no progress bars")
        s.add_argument("--slurm-partition", default="")
        s.add_argument("--slurm-time", default="24:00:00")
        s.add_argument("--slurm-cpus-per-task", type=int, default=1)
        s.add_argument("--slurm-mem-per-cpu-gb", type=int, default=4)
        s.add_argument("--slurm-env-command", default="", help="e.g. 'source /path/venv/bin/activate'")

    for name, helptext in (
        ("run", "all stages"),
        ("extract", "WARC/HTML → web documents"),
        ("images", "resolve and filter images"),
        ("filter", "text filters"),
        ("dedup", "deduplication decisions"),
        ("write", "apply dedup, write DIR/documents"),
    ):
        s = sub.add_parser(name, help=helptext)
        common(s)
        if name in ("run", "extract"):
            s.add_argument("--warc", default="", help="glob of .warc/.warc.gz files")
            s.add_argument("--html", default="", help="glob of .html files (instead of --warc)")
        if name in ("run", "images"):
            s.add_argument(
                "--images", required=True, help="glob of the image store: img2dataset .tar/.parquet, or .tsv manifests"
            )
    sub.add_parser("config", help="print the default config (JSON) to edit and pass as --config")
    common(sub.add_parser("urls", help="print the image URLs of the extracted documents"), execution=False)
    s = sub.add_parser("report", help="what each filter kept and removed")
    common(s, execution=False)
    s.add_argument("--no-png", action="store_true", help="table only")
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "config":
        import json

        from idefics_jax.curate.config import CurateConfig

        print(json.dumps(CurateConfig().to_dict(), indent=1))
        return
    from idefics_jax.errors import cli_main, quiet_start

    quiet_start()

    cli_main(PROG, lambda: _body(args), args.debug)


def _body(args) -> None:
    from idefics_jax.curate import report

    if args.command == "urls":
        from idefics_jax.curate.docs import image_urls

        for url in image_urls(args.out):
            print(url)
        return
    if args.command == "report":
        report.main(args.out, png=not args.no_png)
        return
    from idefics_jax.curate import config, stages
    from idefics_jax.errors import UserError

    cfg = config.load(args.config or None)
    stages.check_config(args.out, cfg)
    ex = stages.Execution(
        executor=args.executor, tasks=args.tasks, workers=args.workers, progress=not args.no_progress,
        slurm_partition=args.slurm_partition, slurm_time=args.slurm_time, slurm_cpus_per_task=args.slurm_cpus_per_task,
        slurm_mem_per_cpu_gb=args.slurm_mem_per_cpu_gb, slurm_env_command=args.slurm_env_command,
    )  # fmt: skip
    pages = ""
    if args.command in ("run", "extract"):
        if bool(args.warc) == bool(args.html):
            raise UserError("give one of --warc GLOB or --html GLOB")
        pages = args.warc or args.html
    todo = list(stages.STAGES) if args.command == "run" else [args.command]
    executors = stages.build(todo, args.out, cfg, ex, pages=pages, images=getattr(args, "images", ""))
    executors[-1][1].run()  # datatrove runs (local) or submits (slurm) the dependencies first
    if args.executor == "local":
        print(report.summary(args.out), file=sys.stderr)


if __name__ == "__main__":
    main()
