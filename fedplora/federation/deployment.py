"""Flower's Deployment Engine on loopback: one SuperLink, N SuperNodes, ``flwr run`` of this app.

Each SuperNode declares its own budget (``max-rank``) in its node config, as a
real device would. Every process started here is stopped by its PID, also when
the run fails. Across real machines, run the same three commands by hand
(README, "Deployment").
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from ..config import RunConfig

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the folder holding pyproject.toml's [tool.flwr.app]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}; see {log}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"{what} did not open port {port} within {timeout:.0f}s; see {log}")


class LoopbackDeployment:
    """Start, track and stop the Flower processes of one loopback federation."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.env = dict(os.environ, FLWR_HOME=str(workdir / "flwr_home"), FLWR_DISABLE_UPDATE_CHECK="1",
                        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", HF_HUB_OFFLINE="1",
                        HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                        PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "w")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.workdir,
                                start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def stop(self) -> None:
        """Stop every process we started and all their descendants (flwr-serverapp, flwr-clientapp), by PID."""
        import psutil

        procs = []
        for _, p in self.procs:
            try:
                parent = psutil.Process(p.pid)
                procs += [parent, *parent.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        for proc in reversed(procs):
            try:
                proc.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=10)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
        for _, p in self.procs:
            p.wait()

    @property
    def pids(self) -> list[int]:
        return [p.pid for _, p in self.procs]


def run_loopback(cfg: RunConfig, out: Path, max_ranks: list[int], timeout: float = 1800.0) -> Path:
    """Run ``cfg`` on a SuperLink + one SuperNode per entry of ``max_ranks``; returns the run's folder."""
    if not (PROJECT_ROOT / "pyproject.toml").is_file():
        raise FileNotFoundError(f"the Flower app's pyproject.toml is not at {PROJECT_ROOT}")
    n = len(max_ranks)
    if cfg.num_clients != n:
        cfg = cfg.with_overrides(num_clients=n, clients_per_round=min(cfg.clients_per_round, n),
                                 min_replies=min(cfg.min_replies, n))
    out = out.resolve()
    work = out / "deployment"
    (work / "flwr_home").mkdir(parents=True, exist_ok=True)
    cfg = cfg.with_overrides(out=str(out)).validate()
    (work / "run.toml").write_text(cfg.to_toml())
    port = free_port()
    (work / "flwr_home" / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')

    dep = LoopbackDeployment(work)
    try:
        link = dep.start("superlink", [_bin("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port",
                                       str(port), "--database", ":flwr-in-memory:",
                                       "--disable-runtime-dependency-installation"])
        _wait_for_port(port, link, 60, "flower-superlink", work / "superlink.log")
        for i, r in enumerate(max_ranks):
            node_port = free_port()
            node = dep.start(f"supernode-{i}", [
                _bin("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}", "--port", str(node_port),
                "--node-config", f"partition-id={i} num-partitions={n} max-rank={r}"])
            _wait_for_port(node_port, node, 60, f"flower-supernode {i}", work / f"supernode-{i}.log")
        run = dep.start("flwr-run", [_bin("flwr"), "run", str(PROJECT_ROOT), "loopback", "--stream",
                                     "--run-config", f"config-file='{work / 'run.toml'}' out='{out}'"])
        deadline = time.monotonic() + timeout
        summary = out / "summary.json"
        while not summary.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the deployment run did not finish within {timeout:.0f}s; logs in {work}")
            if run.poll() is not None and not summary.exists():
                time.sleep(1)  # flwr run may return while the ServerApp is finishing its outputs
                if not summary.exists() and run.returncode != 0:
                    raise RuntimeError(f"`flwr run` exited with code {run.returncode}; logs in {work}")
            time.sleep(0.5)
        return out
    finally:
        dep.stop()
