"""Running untrusted generated code (HumanEval completions) in a locked-down child process.

Never in the caller's process: each program runs in a fresh ``python -I -B`` child
(``sandbox_child.py``) that, before the program's first line,

* moves into a new, empty network namespace (root, or where user namespaces are allowed);
* sets resource limits: address space, CPU seconds, file size, open files, no core dumps,
  no new processes or threads;
* restricts itself with Landlock (Linux >= 5.13): writes only under its own fresh temporary
  directory; reads only of that directory and of the interpreter's own files (below); executes
  nothing; no TCP bind/connect (ABI >= 4), no signals to processes outside the sandbox (ABI >= 6);
* drops root to ``nobody``;
* installs a Python audit hook that refuses sockets, subprocesses, ``ctypes``, signals, writes
  outside the directory and reads (``open`` for reading, ``os.listdir``, ``os.scandir``) outside
  what Landlock allows (the only layer left on a kernel without Landlock or namespaces).

What may be read, in both layers (``sandbox_child.read_roots``; all else is "permission denied"):
the working directory; every entry of the standard library's folder but ``site-packages``
(that folder itself may be listed: Landlock then also lets a program list, not read, the base
interpreter's ``site-packages``); ``lib-dynload`` and other ``sys.path`` entries inside the base
interpreter's prefix that are not site-packages; the system's shared-library folders (``/lib``,
``/usr/lib``, ``/lib64``, ... as they exist, which on some distributions also hold a system
Python's packages); the shared libraries directly in ``<base prefix>/lib``; ``/etc/ld.so.cache``,
``/dev/null`` (also writable), ``/dev/zero``, ``/dev/urandom``, ``/dev/random``. Not the virtual
environment, not any site-packages, not the project; ``sys.path`` is cut to what may be read.
Neither layer hides file names and metadata (``os.stat``, ``os.path.exists``, ``os.readlink``) or
descriptors that were already open.

The parent kills the child's whole process group after ``timeout`` seconds of wall time, keeps
only the tails of its output (written to files, never to pipes that could fill memory) and
removes the directory. ``result.isolation`` says which layers were actually in force; its
``reads`` names the layers confining reads (``"landlock + python_guard"``, ``"landlock"``,
``"python_guard"`` or ``"unrestricted"``) and ``readable`` lists what they allow.
What this does not guarantee is written down in docs/tasks.md ("The code sandbox").
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

CHILD = Path(__file__).with_name("sandbox_child.py")
TAIL = 2000


@dataclass
class SandboxResult:
    status: str  # "passed", "failed" (non-zero exit), "timeout", "refused" (isolation unavailable)
    returncode: int | None
    stdout: str
    stderr: str
    duration_s: float
    isolation: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _tail(path: Path) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - TAIL))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def run_python(source: str, *, timeout: float = 10.0, memory_mb: int = 1024, file_mb: int = 16,
               open_files: int = 64, python_guard: bool = True, require_isolation: bool = False,
               network_namespace: bool = True, landlock: bool = True) -> SandboxResult:
    """Run ``source`` as ``program.py`` in a sandboxed child; ``passed`` iff it exits with status 0.

    ``python_guard=False`` leaves only the kernel's layers (tests use it to show that those hold
    on their own); ``require_isolation=True`` refuses to run when the network namespace or Landlock
    cannot be had.
    """
    base = Path(tempfile.mkdtemp(prefix="fedplora-sandbox-"))
    work, logs = base / "work", base / "logs"
    work.mkdir()
    logs.mkdir(mode=0o700)
    (work / "program.py").write_text(source, encoding="utf-8")
    os.chmod(base, 0o755)
    read_fd, write_fd = os.pipe()
    limits = {"memory_mb": memory_mb, "cpu_s": max(1, math.ceil(timeout)), "file_mb": file_mb,
              "open_files": open_files, "python_guard": python_guard, "require_isolation": require_isolation,
              "network_namespace": network_namespace, "landlock": landlock, "report_fd": write_fd}
    env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8",
           "PYTHONHASHSEED": "0", "PYTHONIOENCODING": "utf-8"}
    t0 = time.perf_counter()
    status, code = "failed", None
    try:
        with (logs / "stdout").open("wb") as out, (logs / "stderr").open("wb") as err:
            proc = subprocess.Popen([sys.executable, "-I", "-B", str(CHILD), json.dumps(limits)], cwd=work,
                                    env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    pass_fds=(write_fd,), start_new_session=True)
            os.close(write_fd)
            write_fd = -1
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                status = "timeout"
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the child and anything it managed to start
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
        with os.fdopen(read_fd, "rb") as f:
            read_fd = -1
            report = f.read(65536).decode("utf-8", "replace").strip()
        isolation = json.loads(report) if report.startswith("{") else {}
        if status != "timeout":
            if code == 0:
                status = "passed"
            elif code == 97 and require_isolation:
                status = "refused"
            elif code in (-signal.SIGXCPU, -signal.SIGKILL):
                status = "timeout"  # the CPU-time limit
        return SandboxResult(status, code, _tail(logs / "stdout"), _tail(logs / "stderr"),
                             time.perf_counter() - t0, isolation)
    finally:
        for fd in (read_fd, write_fd):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(base, ignore_errors=True)
