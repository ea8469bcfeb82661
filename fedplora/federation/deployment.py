"""Flower's Deployment Engine on loopback: one SuperLink, N SuperNodes, ``flwr run`` of this app, secured.

Secured as Flower documents it, with fresh credentials per run in ``<out>/deployment/``:

* TLS: a CA and a server certificate for 127.0.0.1/localhost (``credentials.make_tls``); the
  SuperLink serves its Fleet, Control and Runtime APIs over HTTPS with it, and every SuperNode and
  the ``flwr`` CLI verify it against the CA (``--root-certificates``, ``root-certificates``).
* SuperNode authentication (Flower's CLI-managed mode): the SuperLink runs with
  ``--enable-supernode-auth``, each SuperNode's public key is registered through the Control API
  (``flwr supernode register``) before it starts with ``--auth-supernode-private-key``; a
  SuperNode whose key is not registered, or that has none, is refused when it connects.

Each SuperNode declares its own budget (``max-rank``) and its own files (``data-dir``, ``model``,
...: ``client_app.DEVICE_LOCAL_SETTINGS``) in its node config, as a real device would. Every
process started here is stopped by its PID, also when the run fails. Across real machines, run the
same commands by hand (README, "Deployment"; docs/deployment.md).

A server that comes back: the SuperLink keeps its state (the registered keys, the node ids, the runs) in an
SQLite file, ``state.db``, not in memory. Killed with everything it started (``kill_superlink``: its SuperExec
and the ServerApp) and started again on the same port with the same file and certificates
(``start_superlink(restart=True)``), it is the same SuperLink to the SuperNodes: they retry their connection
until it answers (flower-supernode without ``--max-retries`` / ``--max-wait-time`` retries forever) and carry
on with their node ids. ``flwr_run(..., resume=True)`` then continues the run from its last checkpoint
(docs/deployment.md, "When the server goes down").
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from ..config import ConfigError, RunConfig
from .client_app import DEVICE_LOCAL_SETTINGS
from .credentials import make_node_key, make_tls
from .processes import PROJECT_ROOT, app_folder, die_with_parent, flower_env, flwr_bin, free_port, stop_tree, wait_for_port

CONNECTION = "loopback"  # the SuperLink connection's name in $FLWR_HOME/config.toml


def node_config(partition_id: int, num_partitions: int, max_rank: int, files: dict[str, str | None]) -> str:
    """A SuperNode's ``--node-config``: its partition, its budget and its own files (``files``: setting -> path)."""
    items = [f"partition-id={partition_id}", f"num-partitions={num_partitions}", f"max-rank={max_rank}"]
    for name in DEVICE_LOCAL_SETTINGS:
        value = files.get(name)
        if value is None:
            continue
        if "'" in str(value) or "\n" in str(value):
            raise ValueError(f"{name}: {value!r} cannot be passed in a node config (it holds a quote or a newline)")
        items.append(f"{name.replace('_', '-')}='{value}'")  # a TOML literal string
    return " ".join(items)


class LoopbackDeployment:
    """Start, track and stop the Flower processes of one secured loopback federation in ``workdir``.

    ``start_superlink``, then ``add_supernode`` for each device, then ``flwr_run`` and ``wait_for``;
    ``stop`` in a ``finally``. ``kill_superlink`` and ``start_superlink(restart=True)`` crash and bring back the
    server while the SuperNodes keep running.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir.resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.port: int | None = None
        self.env = flower_env(self.workdir / "flwr_home")
        self.tls = make_tls(self.workdir / "certs")

    def log(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    @property
    def database(self) -> Path:
        """The SuperLink's state (registered keys, node ids, runs): a file, so that a restarted SuperLink knows
        the SuperNodes that were connected before it went down."""
        return self.workdir / "state.db"

    def start(self, name: str, args: list[str], append: bool = False) -> subprocess.Popen:
        with open(self.log(name), "a" if append else "w") as log:
            proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.workdir,
                                    start_new_session=True, preexec_fn=die_with_parent)
        self.procs.append((name, proc))
        return proc

    def start_superlink(self, restart: bool = False) -> int:
        """The SuperLink with TLS and SuperNode authentication; writes the ``flwr`` connection; returns its port.

        ``restart``: the same SuperLink again after ``kill_superlink``: its port, certificates and ``state.db``,
        so the SuperNodes that keep retrying reconnect with their node ids and registered keys. Without it, a
        fresh one: a new port and an empty ``state.db``.
        """
        if restart:
            if self.port is None:
                raise RuntimeError("restart: no SuperLink was started before")
            if self.running("superlink"):
                raise RuntimeError("restart: the SuperLink is still running; kill_superlink() first")
        else:
            self.port = free_port()
            for old in self.workdir.glob(self.database.name + "*"):  # a fresh federation: no keys from a former one
                old.unlink()
            home = self.workdir / "flwr_home"
            home.mkdir(parents=True, exist_ok=True)
            (home / "config.toml").write_text(
                f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "127.0.0.1:{self.port}"\n'
                f'root-certificates = {json.dumps(str(self.tls["ca"]))}\n')
        port = self.port
        link = self.start("superlink", [
            flwr_bin("flower-superlink"), "--ssl-ca-certfile", str(self.tls["ca"]), "--ssl-certfile",
            str(self.tls["cert"]), "--ssl-keyfile", str(self.tls["key"]), "--enable-supernode-auth",
            "--host", "127.0.0.1", "--port", str(port), "--database", str(self.database),
            "--disable-runtime-dependency-installation"], append=restart)
        wait_for_port(port, link, 60, "flower-superlink", self.log("superlink"))
        return port

    def running(self, name: str) -> subprocess.Popen | None:
        """The last process started as ``name`` when it still runs, else None."""
        found = [p for n, p in self.procs if n == name]
        return found[-1] if found and found[-1].poll() is None else None

    def kill_superlink(self) -> None:
        """A crash of the server: SIGKILL the SuperLink and everything it started (its SuperExec and the
        ServerApp process), with no chance to clean up. The SuperNodes and ``flwr run`` keep running."""
        link = self.running("superlink")
        if link is None:
            raise RuntimeError("kill_superlink: the SuperLink is not running")
        stop_tree([link], crash=True)

    def register(self, public_key: Path) -> int:
        """Register a SuperNode's public key through the Control API (``flwr supernode register``); its node id."""
        res = subprocess.run([flwr_bin("flwr"), "supernode", "register", str(public_key), CONNECTION,
                              "--format", "json"], capture_output=True, text=True, env=self.env, cwd=self.workdir,
                             timeout=120)
        try:
            reply = json.loads(res.stdout[res.stdout.index("{"):])
        except ValueError:
            reply = {}
        if res.returncode != 0 or not reply.get("success"):
            raise RuntimeError(f"`flwr supernode register {public_key}` failed (code {res.returncode}): "
                               f"{(res.stdout + res.stderr).strip()[-2000:]}")
        return int(reply["node-id"])

    def add_supernode(self, name: str, config: str, *, key: bool = True, register: bool = True,
                      wait: bool = True) -> subprocess.Popen:
        """A SuperNode with ``--node-config config``, trusting the CA. ``key``: it gets its own key pair
        (``keys/<name>``), registered first unless ``register`` is False; ``key=False``: it has none."""
        args = [flwr_bin("flower-supernode"), "--root-certificates", str(self.tls["ca"]),
                "--superlink", f"127.0.0.1:{self.port}"]
        if key:
            private, public = make_node_key(self.workdir / "keys" / name)
            if register:
                self.register(public)
            args += ["--auth-supernode-private-key", str(private)]
        node_port = free_port()  # the SuperNode's own Runtime API for its ClientApp processes (127.0.0.1 only)
        node = self.start(name, [*args, "--port", str(node_port), "--node-config", config])
        if wait:
            wait_for_port(node_port, node, 60, f"flower-supernode {name}", self.log(name))
        return node

    def flwr_run(self, config_file: Path | None, out: Path, resume: bool = False) -> subprocess.Popen:
        """``flwr run`` of the app with the settings in ``config_file`` and the outputs in ``out``; ``resume``:
        continue the stopped run in ``out`` from its last checkpoint, with its own settings (no config file)."""
        keys = f"out='{out}' resume=true" if resume else f"config-file='{config_file}' out='{out}'"
        return self.start("flwr-run-resumed" if resume else "flwr-run",
                          [flwr_bin("flwr"), "run", str(app_folder(self.workdir)), CONNECTION, "--stream",
                           "--run-config", f"{keys} error-file='{self.workdir / 'error.txt'}'"])

    def wait_for(self, run: subprocess.Popen, out: Path, timeout: float, grace: float = 10.0) -> Path:
        """Wait until the ServerApp wrote ``out/summary.json`` (its last output).

        ``flwr run --stream`` returns when the run has ended, also when the ServerApp failed (code 0 then too):
        no summary ``grace`` seconds after it returned means the run failed; the error names the ServerApp's
        last exception (e.g. a device's refusal) from its log.
        """
        deadline = time.monotonic() + timeout
        summary = out / "summary.json"
        ended: float | None = None
        while not summary.exists():
            now = time.monotonic()
            if now > deadline:
                raise TimeoutError(f"the deployment run did not finish within {timeout:.0f}s; logs in {self.workdir}")
            if run.poll() is not None:
                ended = ended or now
                if run.returncode != 0 or now - ended > grace:
                    name = next((n for n, p in self.procs if p is run), "flwr-run")
                    raise RuntimeError(f"`flwr run` ended (code {run.returncode}) without the run's outputs: "
                                       f"{self.last_error(name)}; logs in {self.workdir}")
            time.sleep(0.5)
        return out

    def last_error(self, name: str) -> str:
        """The ServerApp's one-line error (``error-file``), else the last exception line in a process's log."""
        if name.startswith("flwr-run") and (self.workdir / "error.txt").is_file():
            return (self.workdir / "error.txt").read_text().strip()
        lines = self.log(name).read_text(errors="replace").splitlines() if self.log(name).exists() else []
        errors = [l.strip() for l in lines if l and not l[0].isspace() and ("Error: " in l or "Exception: " in l)]
        return errors[-1] if errors else "no error in its log"

    def stop(self) -> None:
        """Stop every process we started and all their descendants (flwr-serverapp, flwr-clientapp), by PID."""
        stop_tree([p for _, p in self.procs])


def prepare(cfg: RunConfig, out: Path, n: int) -> tuple[RunConfig, Path]:
    """The run's settings for ``n`` SuperNodes, written to ``out/deployment/run.toml``; returns them and the file."""
    if not (PROJECT_ROOT / "pyproject.toml").is_file():
        raise FileNotFoundError(f"the Flower app's pyproject.toml is not at {PROJECT_ROOT}")
    if cfg.simulation_nodes:  # a device serves only its own client: devices cannot stand in for each other
        raise ConfigError(f"simulation_nodes: {cfg.simulation_nodes} is a simulation setting (a pool of simulated "
                          "nodes); a deployment has one SuperNode per client: drop --simulation-nodes")
    if cfg.num_clients != n:
        cfg = cfg.with_overrides(num_clients=n, clients_per_round=min(cfg.clients_per_round, n),
                                 min_replies=min(cfg.min_replies, n))
    cfg = cfg.with_overrides(out=str(out)).validate()
    # the Flower processes run in out/deployment: local paths become absolute (hub names stay as they are)
    cfg = cfg.with_overrides(**{k: str(Path(v).expanduser().resolve()) for k in DEVICE_LOCAL_SETTINGS
                                if (v := getattr(cfg, k)) is not None and Path(v).expanduser().exists()})
    (out / "deployment").mkdir(parents=True, exist_ok=True)
    path = out / "deployment" / "run.toml"
    path.write_text(cfg.to_toml())
    return cfg, path


def run_loopback(cfg: RunConfig, out: Path, max_ranks: list[int], timeout: float = 1800.0,
                 device_files: dict[str, str | None] | None = None) -> Path:
    """Run ``cfg`` on a SuperLink + one SuperNode per entry of ``max_ranks``; returns the run's folder.

    ``device_files``: what every SuperNode declares for ``DEVICE_LOCAL_SETTINGS`` (its data folder, model, ...)
    in its node config; default: the run's own values (on loopback, the devices share this machine's disk).
    """
    out = out.resolve()
    n = len(max_ranks)
    cfg, config_file = prepare(cfg, out, n)
    files = device_files if device_files is not None else {k: getattr(cfg, k) for k in DEVICE_LOCAL_SETTINGS}
    dep = LoopbackDeployment(out / "deployment")
    try:
        dep.start_superlink()
        for i, r in enumerate(max_ranks):
            dep.add_supernode(f"supernode-{i}", node_config(i, n, r, files))
        return dep.wait_for(dep.flwr_run(config_file, out), out, timeout)
    finally:
        dep.stop()
