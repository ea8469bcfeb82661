"""``python -m fedplora.study.worker FILE --cell REL ...``: one cell of a parallel study, in a process of its own.

Started by the study's process (``parallel.run_cells``), never by hand. It reads the same study file, checks
that the cell's settings are those the study's process read (``--expect``), and makes the call a sequential
study makes for the cell: ``run_simulation(cell.cfg, cell.folder, ..., resume=...)``, with ``--cpus`` for its
Ray. It writes nothing the study reads but ``--result`` (its error line, when the cell fails): the study's
state file has one writer, the study's process.

Exit codes: 0 the cell is done, 1 it failed (the error line is in ``--result``), 130 it was stopped (SIGTERM
or Ctrl-C: its Flower processes are ended and its checkpoint stays for the next invocation).
"""

from __future__ import annotations

import argparse
import signal
import sys

from ..reports import write_json
from .runner import Stop, error_line, raise_stop


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedplora.study.worker", description=__doc__.split("\n\n")[0])
    p.add_argument("file")
    p.add_argument("--out", required=True)
    p.add_argument("--cell", required=True, help="the cell's folder under the study's out, cells/<task>/...")
    p.add_argument("--expect", required=True, help="the digest of the cell's settings the study read")
    p.add_argument("--result", required=True, help="where the cell's error line goes when it fails")
    p.add_argument("--resume", action="store_true", help="continue the cell from its checkpoint")
    p.add_argument("--cpus", type=int, help="CPUs the cell's Ray may schedule its clients on")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, raise_stop)
    from pathlib import Path

    try:
        from ..errors import ConfigError
        from ..federation.progress import Progress
        from ..federation.simulation import run_simulation
        from .parallel import cell_digest
        from .spec import load_study

        study = load_study(args.file, out=args.out)
        cell = next((c for c in study.cells if c.rel == args.cell), None)
        if cell is None:
            raise ConfigError(f"{args.file}: has no cell {args.cell} any more (the file changed while the study ran)")
        if cell_digest(cell) != args.expect:
            raise ConfigError(f"{args.file}: the settings of {args.cell} changed while the study ran; run the study "
                              "again")
        run_simulation(cell.cfg, cell.folder, Progress.console(), resume=args.resume, cpus=args.cpus)
    except (KeyboardInterrupt, Stop):
        return 130
    except Exception as e:  # noqa: BLE001 - a failed cell is the study's to record
        write_json(Path(args.result), {"error": error_line(e)})
        print(f"cell {args.cell} failed: {error_line(e)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
