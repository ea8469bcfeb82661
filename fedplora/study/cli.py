"""``fedplora study`` and ``python -m fedplora.study``: the command line over spec, runner and report.

One set of arguments serves both entry points (``fedplora``'s subcommand and the module's own parser),
so the two never drift apart. FedploraError lines are printed as one line, without a traceback.
"""

from __future__ import annotations

import argparse
import signal
import sys

from ..errors import ConfigError, FedploraError
from .cells import STATE_FILE, cell_status, check_conflicts, read_state, select_cells
from .report import write_report
from .runner import Stop, dry_run, raise_stop, run_study
from .spec import load_study, workers_problem


def _description() -> str:
    """The first paragraph of the package's docstring: what ``--help`` says the command is."""
    return sys.modules[__package__].__doc__.split("\n\n")[0]


def add_study_parser(subparsers) -> argparse.ArgumentParser:
    """``fedplora study``: wire it with ``add_study_parser(sub)`` and dispatch ``args.command == "study"`` to
    ``study_main(args)``."""
    p = subparsers.add_parser("study", help="a resumable grid of tasks x methods x partitions x seeds with one "
                                            "report (docs/study.md)", description=_description())
    _study_arguments(p)
    return p


def _patterns(value: str) -> list[str]:
    patterns = [x.strip() for x in value.split(",") if x.strip()]
    if not patterns:
        raise argparse.ArgumentTypeError("give one or more cell patterns, e.g. 'sst2/iid/*' or '*/seed0'")
    return patterns


def _study_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE.toml", help="the study file (docs/study.md)")
    p.add_argument("--out", help="output folder (default: [study] out, else runs/study-<name>)")
    p.add_argument("--report-only", action="store_true", help="run nothing: remake the report from the cell folders")
    p.add_argument("--dry-run", action="store_true", help="run nothing: list the cells, their state and cost")
    p.add_argument("--only-cells", type=int, metavar="N", help="run at most N cells, then write the report and stop")
    p.add_argument("--cells", metavar="GLOB[,GLOB]", type=_patterns,
                   help="run only the cells whose folder matches, e.g. 'sst2/iid/*' or '*/seed0' (the report "
                        "still covers every cell)")
    p.add_argument("--quiet", action="store_true", help="no per-round lines, only one line per cell")
    p.add_argument("--workers", metavar="N", help="run up to N cells at once, each in a process of its own with a "
                                                  "GPU each where there are GPUs, else a share of the CPUs "
                                                  "(default: [study] workers, else 1; docs/study.md)")


def _workers(text: str | None) -> int | None:
    """``--workers N``, checked here rather than by argparse: a bad value is one ``fedplora: error:`` line."""
    if text is None:
        return None
    try:
        value: object = int(text)
    except ValueError:
        value = text
    problem = workers_problem(value)
    if problem:
        raise ConfigError(f"--workers: {problem}")
    return int(text)


def study_main(args: argparse.Namespace) -> int:
    """The ``fedplora study`` command. FedploraError lines are for the caller to print (as cli.main does)."""
    workers = _workers(getattr(args, "workers", None))
    study = load_study(args.file, out=args.out)
    if args.only_cells is not None and args.only_cells < 1:
        raise ConfigError(f"--only-cells: must be >= 1, got {args.only_cells}")
    workers = workers or study.workers
    cells = getattr(args, "cells", None)
    if args.dry_run:
        dry_run(study, cells=cells, workers=workers)
        return 0
    select_cells(study, cells)  # a pattern that matches nothing: one line before anything runs
    check_conflicts(study)  # also for --report-only: a cell run with other settings is never reported as this study's
    if not args.report_only:
        previous = signal.signal(signal.SIGTERM, raise_stop)
        try:
            run_study(study, only_cells=args.only_cells, echo_rounds=not args.quiet, cells=cells, workers=workers)
        except (KeyboardInterrupt, Stop):
            done = sum(cell_status(c) == "done" for c in study.cells)
            running = "the running cells keep their checkpoints" if workers > 1 else \
                "the running cell keeps its checkpoint"
            print(f"study {study.name} stopped: {done} of {len(study.cells)} cells done; {running}. Continue with "
                  "the same command.", flush=True)
            return 130
        finally:
            signal.signal(signal.SIGTERM, previous)
    table = write_report(study)
    cells = table["cells"]
    print(f"report: {study.out / 'report.md'} ({cells['done']} of {cells['total']} cells done; table.json, plots/, "
          "times.md)")
    if not args.report_only:
        failed = [rel for rel, rec in read_state(study.out)["cells"].items()
                  if rec.get("status") == "failed" and rel in cells["missing"]]
        if failed:
            print(f"{len(failed)} cells failed (errors in {study.out / STATE_FILE}); run the same command to try "
                  "them again", file=sys.stderr)
            return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedplora.study", description=_description())
    _study_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return study_main(args)
    except FedploraError as e:
        print(f"fedplora: error: {e}", file=sys.stderr)
        return 2
