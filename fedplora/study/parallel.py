"""Several cells at once (``fedplora study --workers N``): a process per cell, each with its share of the machine.

Why processes and not threads: a cell is a whole Flower federation (a SuperLink, ``flwr run``, a Simulation
Engine with its own Ray) that ``run_simulation`` starts and, on a stop, ends by PID; a process per cell keeps
each federation's processes, CUDA devices and signals apart. Each cell process (``python -m
fedplora.study.worker``) runs the very call a sequential study makes, ``run_simulation(cell.cfg, cell.folder,
..., resume=...)``, on the same settings read from the same study file, so its folder holds what a sequential
study's would (wall times aside).

Its share of the machine:

* where CUDA GPUs are visible, one GPU index each (``CUDA_VISIBLE_DEVICES``; with more workers than GPUs the
  indices are dealt round-robin, so two cells share a GPU);
* a share of the CPUs: ``cpus // workers`` for the cell's own Ray, which runs at most that many clients at once
  (``client_cpus`` each, a setting of the run, unchanged: changing a client's torch threads could change its
  float sums, and the cell's numbers would no longer be a sequential study's);
* attached to an existing Ray cluster (``RAY_ADDRESS``), no share at all: the cluster's scheduler places every
  cell's clients on its CPUs and GPUs.

Only this process (the study's) writes ``study-state.json``, after each cell's process has ended, so the file
has one writer. A cell process's console goes to ``<out>/logs/<task>/<partition>/<method>/seed<k>.log``,
beside the cells, never into a cell's folder. On Ctrl-C or SIGTERM every cell process gets SIGTERM, stops its
Flower processes and keeps its checkpoint, as a sequential study's running cell does.
"""

from __future__ import annotations

import hashlib
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import ConfigError
from .spec import Cell, Study

LOGS = "logs"  # <out>/logs/<task>/<partition>/<method>/seed<k>.log: each cell process's console
POLL_SECONDS = 0.5
STOP_GRACE_SECONDS = 90  # a stopped cell ends its Flower processes (10 s each at most) and exits


@dataclass(frozen=True)
class Share:
    """What one cell process may use: ``cpus`` for its Ray (None: the attached cluster decides) and ``gpu``,
    its ``CUDA_VISIBLE_DEVICES`` (None: as this process has it)."""
    cpus: int | None
    gpu: str | None

    def describe(self) -> str:
        parts = ([f"GPU {self.gpu}"] if self.gpu is not None else []) + (
            [f"{self.cpus} CPU{'s' if self.cpus != 1 else ''}"] if self.cpus is not None else [])
        return ", ".join(parts) or "the Ray cluster's resources"


def machine_cpus() -> int:
    """The CPUs this process may run on (its affinity: a container's or a batch job's share, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def visible_gpus() -> list[str]:
    """The CUDA devices this process sees, as the ids a child's ``CUDA_VISIBLE_DEVICES`` takes: the entries of
    ours when it is set (so a study told to use GPUs 2,3 deals out 2 and 3), else 0..n-1."""
    import torch

    n = torch.cuda.device_count()
    if n == 0:
        return []
    ours = [x.strip() for x in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if x.strip()]
    return ours[:n] if ours else [str(i) for i in range(n)]


def machine_shares(workers: int) -> list[Share]:
    """One share per worker slot (see the module's docstring)."""
    from ..federation.simulation import attached_ray

    if attached_ray():
        return [Share(None, None)] * workers
    cpus = max(1, machine_cpus() // workers)
    gpus = visible_gpus()
    return [Share(cpus, gpus[k % len(gpus)] if gpus else None) for k in range(workers)]


def check_shares(cells: list[Cell], shares: list[Share], workers: int) -> None:
    """A cell whose clients each need more CPUs than its share holds would wait forever for Ray to place
    them: refused before anything runs, with one line."""
    cpus = min((s.cpus for s in shares if s.cpus is not None), default=None)
    if cpus is None:
        return
    for cell in cells:
        need = math.ceil(cell.cfg.client_cpus)
        if need > cpus:
            raise ConfigError(f"--workers {workers}: each cell gets {cpus} of this machine's {machine_cpus()} CPUs, "
                              f"but cell {cell.rel} gives each client client_cpus={cell.cfg.client_cpus:g} (Ray "
                              f"would never place one); use --workers {max(1, machine_cpus() // need)} or fewer")


def cell_digest(cell: Cell) -> str:
    """The cell's settings as the study process read them: the cell process checks it read the same ones."""
    return hashlib.sha256(cell.cfg.to_toml().encode()).hexdigest()[:16]


def log_path(study: Study, cell: Cell) -> Path:
    """Where a cell process's console goes: beside the cells, never in the cell's folder (which must hold what
    a sequential study's holds)."""
    return study.out / LOGS / (cell.rel.removeprefix("cells/") + ".log")


@dataclass
class Running:
    cell: Cell
    proc: subprocess.Popen
    share: Share
    result: Path
    started: float


def _launch(study: Study, cell: Cell, share: Share, resume: bool, results: Path) -> Running:
    from ..federation.processes import die_with_parent

    result = results / f"{cell.index}.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "fedplora.study.worker", str(study.path), "--out", str(study.out), "--cell",
           cell.rel, "--expect", cell_digest(cell), "--result", str(result)]
    if resume:
        cmd.append("--resume")
    if share.cpus is not None:
        cmd += ["--cpus", str(share.cpus)]
    env = dict(os.environ)
    if share.gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = share.gpu
    log = log_path(study, cell)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:  # a continued cell's lines follow those of its earlier invocations
        f.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S%z')}: the cell {'continues' if resume else 'starts'} "
                f"({share.describe()})\n")
        f.flush()
        # a session of its own: Ctrl-C reaches only the study, which stops each cell with SIGTERM; and the cell
        # gets SIGTERM too when the study's process dies, however it dies (die_with_parent)
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                preexec_fn=die_with_parent)
    return Running(cell, proc, share, result, time.monotonic())


def _outcome(run: Running) -> str | None:
    """None when the cell's process finished it, else its error line."""
    import json

    code = run.proc.returncode
    if code == 0:
        if (run.cell.folder / "summary.json").is_file():
            return None
        return "its process ended without the cell's summary.json"
    try:
        return json.loads(run.result.read_text())["error"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if code == 130 or code < 0:
        return f"its process was stopped (exit code {code}); it continues from its checkpoint next time"
    return f"its process exited with code {code} without a result"


def stop_all(running: list[Running]) -> None:
    """SIGTERM to every cell process (each stops its Flower processes and keeps its checkpoint); what is still
    there after STOP_GRACE_SECONDS is ended with its descendants."""
    from ..federation.processes import stop_tree

    for run in running:
        if run.proc.poll() is None:
            try:
                run.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for run in running:
        try:
            run.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            stop_tree([run.proc])


def run_cells(study: Study, cells: list[Cell], resumes: set[str], workers: int, *,
              on_start: Callable[[Cell, bool, str], None],
              on_end: Callable[[Cell, float, str | None, list[Cell]], None]) -> None:
    """Run ``cells`` in the study's order, at most ``workers`` at once, each in a process of its own.

    ``resumes``: the cells (by ``rel``) to continue from their checkpoint. ``on_start(cell, resume, share)``
    and ``on_end(cell, seconds, error or None, the cells still running or not started)`` are called in this
    process, one at a time: the caller records and reports there, so the state file has one writer.
    KeyboardInterrupt (Ctrl-C, or SIGTERM turned into ``Stop``) stops every running cell (``stop_all``) and
    propagates.
    """
    shares = machine_shares(workers)
    check_shares(cells, shares, workers)
    pending = list(cells)
    slots: dict[int, Running] = {}
    with tempfile.TemporaryDirectory(prefix="fedplora-study-") as tmp:
        try:
            while pending or slots:
                for slot in range(workers):
                    if slot not in slots and pending:
                        cell = pending.pop(0)
                        resume = cell.rel in resumes
                        on_start(cell, resume, shares[slot].describe())
                        slots[slot] = _launch(study, cell, shares[slot], resume, Path(tmp))
                time.sleep(POLL_SECONDS)
                for slot, run in sorted(slots.items()):
                    if run.proc.poll() is None:
                        continue
                    del slots[slot]
                    left = [r.cell for r in slots.values()] + pending
                    on_end(run.cell, time.monotonic() - run.started, _outcome(run), left)
        except BaseException:
            stop_all(list(slots.values()))
            raise

