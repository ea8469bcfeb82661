"""Run the app on one machine with Flower's Simulation Engine (Ray), in this process."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ..config import RunConfig
from .progress import Progress


def run_simulation(cfg: RunConfig, out: Path, progress: Progress | None = None, *,
                   resume: bool = False) -> dict[str, Any]:
    """Run ``cfg`` with its outputs in ``out``; ``resume``: continue the stopped run there (its checkpoint)."""
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation as flwr_run_simulation

    from .client_app import app as client_app
    from .server_app import run_federation

    result: dict[str, Any] = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            result["summary"] = run_federation(grid, cfg, out, progress, resume=resume)
        except BaseException as e:  # carried out of Flower's thread and raised below
            result["error"] = e

    cpus = os.cpu_count() or 2
    backend_config = {
        "client_resources": {"num_cpus": cfg.client_cpus, "num_gpus": 0.0},
        "init_args": {"num_cpus": cpus, "include_dashboard": False, "log_to_driver": False,
                      "logging_level": logging.ERROR},
    }
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    flwr_logger.setLevel(logging.ERROR)  # run_simulation's deprecation notice is expected
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    try:
        flwr_run_simulation(server_app=server_app, client_app=client_app, num_supernodes=cfg.num_clients,
                            backend_config=backend_config)
    finally:
        flwr_logger.setLevel(level)
    if "error" in result:
        raise result["error"]
    if "summary" not in result:
        raise RuntimeError("the simulation ended without a result (see the Flower log above)")
    return result["summary"]
