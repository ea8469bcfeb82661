"""Starting and stopping the Flower processes a run needs (SuperLink, SuperNodes, ``flwr run``) on this machine.

Everything started here is stopped by PID together with its descendants (``flwr-serverapp``,
``flwr-simulation``, Ray's workers), also when a run fails, so nothing outlives a run.
"""

from __future__ import annotations

import ctypes
import fnmatch
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the folder holding pyproject.toml's [tool.flwr.app]
# what the Flower app's FAB holds: the package's code and data (pyproject.toml's [tool.flwr.app] fab-include)
APP_FILES = ("*.py", "*.json")


def app_folder(work: Path) -> Path:
    """The Flower app for ``flwr run``: pyproject.toml, .gitignore and the fedplora package, copied afresh
    into ``work/app``.

    ``flwr run DIR`` walks every file under DIR before it applies the FAB's include patterns; from the project
    folder that is the virtual environment and every run's outputs (55,000 files, 4 s of a busy 2-core
    machine's CPU for each run), and without the patterns it packed docs/ too (4.4 MB). The copy holds what
    Flower would take from the project (symbolic links skipped and .gitignore applied, as Flower does), so
    the FAB is the same.
    """
    app = work / "app"
    shutil.rmtree(app, ignore_errors=True)  # a module deleted since an earlier run must not linger
    package = PROJECT_ROOT / "fedplora"
    for folder, dirs, files in os.walk(package):  # like Flower's walk: symbolic links to folders not entered
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            src = Path(folder) / name
            if src.is_symlink() or not any(fnmatch.fnmatch(name, pattern) for pattern in APP_FILES):
                continue
            dst = app / src.relative_to(PROJECT_ROOT)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
    for name in ("pyproject.toml", ".gitignore"):
        if (PROJECT_ROOT / name).is_file():
            shutil.copyfile(PROJECT_ROOT / name, app / name)
    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flwr_bin(name: str) -> str:
    """A Flower console script of this interpreter's environment (``flwr``, ``flower-superlink``, ...)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}; see {log}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"{what} did not open port {port} within {timeout:.0f}s; see {log}")


def die_with_parent() -> None:
    """``preexec_fn``: the child gets SIGTERM when the process that started it dies (Linux), even by SIGKILL."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def stop_tree(procs: list[subprocess.Popen], crash: bool = False) -> None:
    """Terminate ``procs`` and all their descendants (then kill what is left after 10 s), by PID; with ``crash``,
    SIGKILL them all at once, leaving them no chance to clean up (a crash, as fault-tolerance tests need)."""
    import psutil

    found = []
    for p in procs:
        try:
            parent = psutil.Process(p.pid)
            found += [parent, *parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    for proc in found if crash else reversed(found):  # a crash takes the root first, as a dying machine would
        try:
            (proc.kill if crash else proc.terminate)()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(found, timeout=30 if crash else 10)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)
    for p in procs:
        p.wait()


def flower_env(home: Path) -> dict[str, str]:
    """The environment of the Flower processes of one run: its own ``FLWR_HOME``, offline, quiet."""
    return dict(os.environ, FLWR_HOME=str(home), FLWR_DISABLE_UPDATE_CHECK="1",
                FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                TOKENIZERS_PARALLELISM="false", RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0", RAY_DEDUP_LOGS="0",
                PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
