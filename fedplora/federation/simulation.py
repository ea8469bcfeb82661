"""``fedplora run`` on one machine: ``flwr run`` of this app on a local simulation SuperLink.

This is Flower's supported local-simulation path (1.42: a SuperLink started with
``--simulation`` runs the ServerApp and the ClientApps of a ``flwr run`` in the Simulation
Engine). Nothing here runs the federation itself, so ``fedplora run`` and ``flwr run .`` are the
same app with the same outputs. What this adds for one command: a private ``FLWR_HOME`` and
free port per run (runs and tests never meet a user's SuperLink, nor each other), absolute
paths in the settings (the ServerApp does not run in the caller's folder), the federation's
size and client resources from the settings, the run's one-line error carried back, and every
process stopped afterwards.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .. import errors
from ..config import RunConfig
from ..errors import ConfigError
from .processes import PROJECT_ROOT, app_folder, die_with_parent, flower_env, flwr_bin, free_port, stop_tree, wait_for_port
from .progress import Progress

CONNECTION = "fedplora-local"  # the SuperLink connection's name in the run's own $FLWR_HOME/config.toml
PATH_SETTINGS = ("model", "data_dir", "dataset", "cache_dir")  # read from the disk: made absolute when they exist
# Flower's own chatter in the streamed log, dropped from the console (kept in simulation.log)
NOISE = ("INFO :", "\x1b[92mINFO", "Successfully started run", "Successfully installed", "simulated SuperNodes",
         "To change federation size", "flwr federation simulation-config", "FutureWarning", "warnings.warn(",
         "Since flwr 1.32", "torch.jit.script_method")


def absolute_paths(cfg: RunConfig) -> RunConfig:
    """Settings that name existing local files, made absolute (hub names stay as they are)."""
    fixed = {}
    for name in PATH_SETTINGS:
        value = getattr(cfg, name)
        if value is not None and Path(value).expanduser().exists():
            fixed[name] = str(Path(value).expanduser().resolve())
    return cfg.with_overrides(**fixed) if fixed else cfg


def attached_ray() -> str | None:
    """The Ray cluster this run's clients go to, when ``RAY_ADDRESS`` names one (else None: a Ray of its own).

    Flower 1.42's federation config has no Ray address (its init-args are num-cpus, num-gpus, logging-level
    and log-to-driver), but its Ray backend calls ``ray.init()`` with no address, and Ray then attaches to the
    cluster ``RAY_ADDRESS`` names. The variable reaches flwr-simulation through the environment of every
    process this module starts (``flower_env`` copies ours).
    """
    return os.environ.get("RAY_ADDRESS") or None


def federation_config(cfg: RunConfig, cpus: int | None = None) -> str:
    """The simulated federation for ``flwr run --federation-config``: one SuperNode per client, or the pool's
    ``simulation_nodes`` (each serves whichever client the server asks it to: ``roster.py``).

    Flower 1.42 takes whole CPUs per client here, so ``client_cpus`` is rounded up. ``cpus``: the CPUs the
    run's own Ray may schedule clients on (default: all of this machine's), so that several runs at once
    (``fedplora study --workers``) each keep to a share. Attached to an existing cluster (``attached_ray``)
    the cluster's resources decide, and Ray refuses a CPU count there, so none is given.
    """
    ray_cpus = "" if attached_ray() else f"init-args-num-cpus={cpus or os.cpu_count() or 2} "
    nodes = cfg.simulation_nodes or cfg.num_clients
    return (f"num-supernodes={nodes} client-resources-num-cpus={math.ceil(cfg.client_cpus)} "
            f"client-resources-num-gpus={float(cfg.client_gpus or 0.0)} {ray_cpus}init-args-log-to-driver=false")


def with_gpu_share(cfg: RunConfig) -> RunConfig:
    """``client_gpus`` made explicit for the run, so every process reads the same share.

    Unset: 0 when ``device`` resolves to the CPU, else 1/clients_per_round (a round's clients share one GPU).
    A share on a machine without CUDA is refused: Ray would wait forever for a GPU to schedule clients on.
    """
    import torch

    from ..hardware import resolve_device

    device = resolve_device(cfg.device)
    share = cfg.client_gpus
    if share is None:
        share = 0.0 if device.type != "cuda" else 1.0 / cfg.clients_per_round
    if share > 0 and not torch.cuda.is_available():
        raise ConfigError(f"client_gpus: {share:g} of a GPU per client asked for, but this machine has no CUDA GPU; "
                          "use --client-gpus 0")
    return cfg.with_overrides(client_gpus=share)


def run_simulation(cfg: RunConfig, out: Path, progress: Progress | None = None, *,
                   resume: bool = False, cpus: int | None = None) -> dict[str, Any]:
    """Run ``cfg`` with its outputs in ``out`` and return its summary; ``resume``: continue the stopped run there.

    ``progress``: the ServerApp's lines are echoed to its console (None: quiet). A run that fails
    with a fedplora error raises that error here, with the ServerApp's one-line message. ``cpus``: how many
    of this machine's CPUs the run's clients may use at once (``federation_config``); it changes how many
    clients train at the same time, never a setting or a number.
    """
    if not (PROJECT_ROOT / "pyproject.toml").is_file():
        raise ConfigError(f"fedplora run needs the project's pyproject.toml (the Flower app) at {PROJECT_ROOT}; "
                          "install fedplora from its source folder (pip install -e .)")
    cfg = with_gpu_share(cfg)
    from ..tasks import check_partitions, check_source

    check_source(cfg)  # where the data comes from: one line in a second, not after the federation's start-up
    check_partitions(cfg)  # a split that leaves a client without data, likewise
    out = Path(out).expanduser().resolve()
    echo = progress is not None and progress.console is not None
    with tempfile.TemporaryDirectory(prefix="fedplora-run-") as tmp:
        work = Path(tmp)
        home = work / "flwr_home"
        home.mkdir()
        port = free_port()
        (home / "config.toml").write_text(f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                                          f'address = "127.0.0.1:{port}"\ninsecure = true\n')
        keys: dict[str, Any] = {"out": str(out), "error-file": str(work / "error.txt")}
        if resume:
            keys["resume"] = True
        else:
            (work / "run.toml").write_text(absolute_paths(cfg).with_overrides(out=str(out)).to_toml())
            keys["config-file"] = str(work / "run.toml")
        # a TOML file of run-config overrides: any path is quoted correctly (json strings are TOML strings)
        (work / "run-config.toml").write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items()))

        env, log_path = flower_env(home), work / "superlink.log"
        procs: list[subprocess.Popen] = []
        lines: list[str] = []
        t0 = time.time()
        try:
            # Flower's own local-simulation SuperLink command, on this run's port, in memory. Its SuperExec
            # (which starts flwr-simulation, which starts Ray) is started here rather than by the SuperLink
            # (``--isolation process``): the SuperLink would detach it into a session of its own, and then
            # a kill of this command's process group would leave Ray's processes running.
            link = subprocess.Popen(
                [flwr_bin("flower-superlink"), "--insecure", "--simulation", "--isolation", "process",
                 "--host", "127.0.0.1", "--port", str(port), "--database", ":flwr-in-memory:",
                 "--disable-runtime-dependency-installation"],
                stdout=log_path.open("w"), stderr=subprocess.STDOUT, env=env, cwd=work, preexec_fn=die_with_parent)
            procs.append(link)
            wait_for_port(port, link, 60, "flower-superlink", log_path)
            procs.append(subprocess.Popen(
                [flwr_bin("flower-superexec"), "--insecure", "--runtime-api-address", f"127.0.0.1:{port}",
                 "--parent-pid", str(link.pid)],
                stdout=(work / "superexec.log").open("w"), stderr=subprocess.STDOUT, env=env, cwd=work,
                preexec_fn=die_with_parent))
            run = subprocess.Popen(
                [flwr_bin("flwr"), "run", str(app_folder(work)), CONNECTION, "--stream",
                 "--federation-config", federation_config(cfg, cpus), "--run-config", str(work / "run-config.toml")],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=work,
                preexec_fn=die_with_parent)
            procs.append(run)
            for line in run.stdout:
                lines.append(line)
                if echo and not any(n in line for n in NOISE) and line.strip():
                    sys.stderr.write(line)
                    sys.stderr.flush()
            run.wait()
        finally:
            stop_tree(procs)
        error = work / "error.txt"
        if error.is_file():
            name, _, message = error.read_text().partition(": ")
            raise getattr(errors, name, errors.FedploraError)(message)
        if out.is_dir():
            (out / "simulation.log").write_text("".join(lines))
        summary = out / "summary.json"
        if summary.is_file() and summary.stat().st_mtime >= t0:
            return json.loads(summary.read_text())
        tail = "".join(lines[-40:]) + (log_path.read_text()[-2000:] if log_path.exists() else "")
        raise RuntimeError(f"the run ended without a summary (flwr run exited with {run.returncode}); "
                           f"last lines of its log:\n{tail}")
