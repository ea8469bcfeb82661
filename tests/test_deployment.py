"""Deployment: TLS + SuperNode authentication on loopback, and devices that own their files.

The fast tests call the ClientApp's setup logic with a fake Context; the slow ones start real
Flower processes (a SuperLink, SuperNodes, ``flwr run``) over TLS with SuperNode authentication.
"""

import dataclasses
import json
import subprocess
import time

import pytest

from flwr.app import Context, RecordDict

from fedplora.config import RunConfig
from fedplora.errors import ConfigError
from fedplora.federation.client_app import DEVICE_LOCAL_SETTINGS, device_settings, on_device, runtime


def _context(**node_config):
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def _cfg(assets, tmp_path, **kw):
    base = dict(model=assets["model"], data_dir=assets["data_dir"], rounds=1, num_clients=3, clients_per_round=3,
                rank=4, alpha=8, ranks=[1, 2, 4], rank_shares=[1, 1, 1], local_steps=2, batch_size=8,
                eval_max_examples=40, max_seq_len=32, lr=5e-3, seed=11, out=str(tmp_path))
    base.update(kw)
    return RunConfig(**base).validate()


# ---------------------------------------------------------------- a device owns its files (fast)
def test_supernode_ignores_the_servers_paths(tmp_path):
    mine_data, mine_model = tmp_path / "my-data", tmp_path / "my-model"
    mine_data.mkdir(), mine_model.mkdir()
    server = RunConfig(task="tweets", data_dir="/srv/other/data", dataset="/srv/other/file.jsonl",
                       cache_dir="/srv/other/cache", model="/srv/other/model", rank=8)
    ctx = _context(**{"partition-id": 0, "num-partitions": 3, "max-rank": 4, "data-dir": str(mine_data),
                      "model": str(mine_model)})
    assert on_device(ctx)
    cfg = device_settings(server, ctx)
    # its own data folder and model; no dataset or cache of its own: the task's embedded default, not the server's
    assert (cfg.data_dir, cfg.model, cfg.dataset, cfg.cache_dir) == (str(mine_data), str(mine_model), None, None)
    assert cfg.rank == 8 and cfg.task == "tweets"  # everything else is the server's run
    # a device that declares no files at all uses the embedded defaults, never the server's paths
    bare = device_settings(server, _context(**{"partition-id": 1, "num-partitions": 3, "max-rank": 2}))
    assert all(getattr(bare, k) is None for k in DEVICE_LOCAL_SETTINGS)
    assert set(DEVICE_LOCAL_SETTINGS) == {"data_dir", "dataset", "cache_dir", "model"}


def test_simulation_uses_the_runs_settings(monkeypatch):
    server = RunConfig(task="tweets", data_dir="/srv/data", model="/srv/model", cache_dir="/srv/cache",
                       device="cuda", client_gpus=0.25)
    ctx = _context(**{"partition-id": 2, "num-partitions": 10})  # all the Simulation Engine puts there
    assert not on_device(ctx)
    assert device_settings(server, ctx) is server
    # a simulated client that Ray gave no GPU share trains on the CPU, not on a CUDA device it was not given
    # (this machine may have no CUDA: the rule is what is tested, so CUDA is declared present)
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    no_share = dataclasses.replace(server, client_gpus=0.0)
    assert device_settings(no_share, ctx) == dataclasses.replace(no_share, device="cpu")
    assert device_settings(dataclasses.replace(no_share, device="cpu"), ctx).device == "cpu"


def test_device_declares_its_own_accelerator_and_base(tmp_path):
    ctx = _context(**{"partition-id": 0, "num-partitions": 2, "max-rank": 4, "device": "cpu", "dtype": "bfloat16",
                      "quantization": "4bit", "gradient-checkpointing": "true"})
    local = device_settings(RunConfig(task="tweets", device="cuda", dtype="float32"), ctx)
    assert (local.device, local.dtype, local.quantization, local.gradient_checkpointing) == \
        ("cpu", "bfloat16", "4bit", True)
    with pytest.raises(ConfigError, match="quantization: must be 'none', '8bit' or '4bit'"):
        device_settings(RunConfig(task="tweets"), _context(**{"partition-id": 0, "num-partitions": 2,
                                                               "max-rank": 4, "quantization": "2bit"}))


def test_device_refuses_a_task_or_model_it_does_not_hold(tmp_path):
    base = {"partition-id": 0, "num-partitions": 2, "max-rank": 4}
    cfg = RunConfig(task="tweets")
    with pytest.raises(ValueError, match=r"does not hold task 'tweets' \(node config tasks='sst2,bbc'\)"):
        device_settings(cfg, _context(**base, tasks="sst2, bbc"))
    with pytest.raises(ValueError, match="does not hold task 'tweets'"):
        device_settings(cfg, _context(**base, tasks=["sst2"]))
    assert device_settings(cfg, _context(**base, tasks="sst2,tweets")).task == "tweets"
    with pytest.raises(ValueError, match=r"does not hold the model: node config model='/nonexistent/m'"):
        device_settings(cfg, _context(**base, model="/nonexistent/m"))
    with pytest.raises(ValueError, match=r"does not hold the data: node config data-dir='/nonexistent/d'"):
        device_settings(cfg, _context(**base, **{"data-dir": "/nonexistent/d"}))


def test_device_that_cannot_load_the_task_says_so(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    ctx = _context(**{"partition-id": 0, "num-partitions": 2, "max-rank": 4, "data-dir": str(empty)})
    with pytest.raises(RuntimeError, match=r"this device cannot load task 'tweets' from its own files \(data-dir="):
        runtime(RunConfig(task="tweets", num_clients=2, clients_per_round=2), ctx)


def test_credentials_verify(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.cli.supernode.register import try_load_public_key

    from fedplora.federation.credentials import make_node_key, make_tls

    tls = make_tls(tmp_path / "certs", ["127.0.0.1", "localhost", "superlink.example.org"])
    assert (tls["key"].stat().st_mode & 0o777) == 0o600 and (tmp_path / "certs" / "ca.key").stat().st_mode & 0o077 == 0
    res = subprocess.run(["openssl", "verify", "-CAfile", str(tls["ca"]), "-verify_ip", "127.0.0.1",
                          str(tls["cert"])], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    cert = x509.load_pem_x509_certificate(tls["cert"].read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "superlink.example.org" in san.get_values_for_type(x509.DNSName)
    private, public = make_node_key(tmp_path / "keys" / "node-0")
    # read as flower-supernode and `flwr supernode register` read them
    assert isinstance(load_ssh_private_key(private.read_bytes(), None), ec.EllipticCurvePrivateKey)
    assert try_load_public_key(public)
    assert (private.stat().st_mode & 0o777) == 0o600


# ---------------------------------------------------------------- real processes (slow)
def _left_running(root):
    """Processes still running in a folder under ``root`` (every Flower process started here runs in one)."""
    import psutil

    left = []
    for p in psutil.process_iter(["pid", "cwd", "cmdline"]):
        if p.info["cwd"] and p.info["cwd"].startswith(str(root)):
            left.append(p.info)
    return left


def _wait_exit(proc, timeout=90):
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.3)
    return proc.poll()


@pytest.mark.slow
def test_loopback_deployment_with_declared_budgets(tiny_assets, tmp_path):
    """Over TLS with SuperNode authentication; the server's data folder is not the devices' one. Under secure
    aggregation (Flower's SecAgg+ over the same secured connections): the plain ServerApp path is the one every
    simulation test runs, so this run covers what only a deployment adds, with what only SecAgg+ adds."""
    from assets import make_tweets_slice

    from fedplora.federation.deployment import run_loopback
    from fedplora.tasks import make_task
    from fedplora.tasks.partition import partition_for

    server_data = make_tweets_slice(tmp_path / "server-tweets", per_label=40)  # the devices hold 60 per label
    cfg = _cfg(tiny_assets, tmp_path, data_dir=str(server_data), secure_aggregation=True)
    out = run_loopback(cfg, tmp_path / "dep", max_ranks=[1, 2, 4], timeout=600,
                       device_files={"data_dir": tiny_assets["data_dir"], "model": tiny_assets["model"]})
    summary = json.loads((out / "summary.json").read_text())
    entry = summary["history"][1]
    assert entry["secure"] and entry["aggregated"] and entry["survivors"] == 3 and entry["fn_agg_noise"] is None
    clients = entry["clients"]
    assert sorted((c["cid"], c["budget"], c["trained_pairs"]) for c in clients) == [(0, 1, 1), (1, 2, 2), (2, 4, 4)]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    # the devices trained on their own folder, not on the one the server's settings named
    device_cfg = cfg.with_overrides(data_dir=tiny_assets["data_dir"])
    task = make_task(device_cfg)
    own = [len(p) for p in partition_for(task, task.load_splits()[0], device_cfg)]
    server_sizes = json.loads((out / "partitions.json").read_text())["sizes"]
    assert sorted((c["cid"], c["num_samples"]) for c in clients) == list(enumerate(own))
    assert own != server_sizes
    work = out / "deployment"
    assert "https://127.0.0.1" in (work / "superlink.log").read_text()
    flwr_config = (work / "flwr_home" / "config.toml").read_text()
    assert "root-certificates" in flwr_config and "insecure" not in flwr_config
    assert _left_running(tmp_path) == []  # every process it started is gone


@pytest.mark.slow
def test_unauthenticated_supernodes_are_refused(tiny_assets, tmp_path):
    from fedplora.federation.deployment import LoopbackDeployment, node_config, prepare

    out = (tmp_path / "dep").resolve()
    cfg, config_file = prepare(_cfg(tiny_assets, tmp_path), out, 2)
    files = {"data_dir": cfg.data_dir, "model": cfg.model}
    dep = LoopbackDeployment(out / "deployment")
    try:
        dep.start_superlink()
        for i, r in enumerate([2, 4]):
            dep.add_supernode(f"supernode-{i}", node_config(i, 2, r, files))
        # impostors for partition 0: a key the SuperLink never registered, and no key at all
        unregistered = dep.add_supernode("unregistered", node_config(0, 2, 4, files), register=False, wait=False)
        keyless = dep.add_supernode("keyless", node_config(0, 2, 4, files), key=False, wait=False)
        assert _wait_exit(unregistered) not in (None, 0) and _wait_exit(keyless) not in (None, 0)
        assert "Failed to activate SuperNode" in dep.log("unregistered").read_text()
        assert "All SuperNodes must be registered" in dep.log("keyless").read_text()
        dep.wait_for(dep.flwr_run(config_file, out), out, 600)
    finally:
        dep.stop()
    (entry,) = json.loads((out / "summary.json").read_text())["history"][1:]
    assert entry["aggregated"] and sorted(c["cid"] for c in entry["clients"]) == [0, 1]
    assert _left_running(tmp_path) == []


@pytest.mark.slow
def test_device_refusal_reaches_the_server(tiny_assets, tmp_path):
    """A SuperNode that does not hold the run's task refuses it at its first query: the server leaves it out of
    sampling with the device's reason in the history, and the run completes with the other device."""
    from fedplora.federation.deployment import LoopbackDeployment, node_config, prepare

    out = (tmp_path / "dep").resolve()
    cfg, config_file = prepare(_cfg(tiny_assets, tmp_path, connect_timeout=120.0), out, 2)
    files = {"data_dir": cfg.data_dir, "model": cfg.model}
    dep = LoopbackDeployment(out / "deployment")
    try:
        dep.start_superlink()
        dep.add_supernode("supernode-0", node_config(0, 2, 4, files))
        dep.add_supernode("supernode-1", node_config(1, 2, 4, files) + " tasks='sst2,bbc'")
        dep.wait_for(dep.flwr_run(config_file, out), out, 300)
    finally:
        dep.stop()
    reason = "this device does not hold task 'tweets' (node config tasks='sst2,bbc'); it refuses the run"
    summary = json.loads((out / "summary.json").read_text())
    (entry,) = summary["history"][1:]
    assert entry["aggregated"] and [c["cid"] for c in entry["clients"]] == [0]
    (failure,) = entry["failures"]  # its client id is unknown (it never answered one): named by its node id
    assert failure["cid"] is None and failure["stage"] == "query" and isinstance(failure["node"], int)
    assert failure["reason"].startswith(f"node {failure['node']} left out of sampling: refused its first query: ")
    assert reason in failure["reason"] and summary["failures_total"] == 1
    assert _left_running(tmp_path) == []


def _cmdline(proc) -> list[str]:
    """A child's command line, or nothing for one that exited (or is a zombie) while the children were listed."""
    import psutil

    try:
        return proc.cmdline()
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return []


def _count(path, text):
    return path.read_text(errors="replace").count(text) if path.exists() else 0


@pytest.mark.slow
def test_a_superlink_killed_mid_round_comes_back_and_the_run_resumes_to_the_uninterrupted_result(tiny_assets, tmp_path):
    """The server crashes: the SuperLink and its ServerApp are SIGKILLed while the SuperNodes train round 2. The
    SuperLink is started again (same port, certificates and state.db), the SuperNodes, never restarted,
    reconnect by themselves, and ``flwr run ... resume=true`` continues from the round-1 checkpoint. Its final
    adapter and history equal those of an uninterrupted run of the same settings on the same federation (run
    first, on the same processes, which saves starting a second federation)."""
    import psutil
    import torch
    from safetensors.torch import load_file

    from fedplora.federation.checkpoint import record_path
    from fedplora.federation.deployment import LoopbackDeployment, node_config, prepare
    from fedplora.federation.history import untimed

    work = (tmp_path / "federation").resolve()
    ref, run = (tmp_path / "ref").resolve(), (tmp_path / "run").resolve()
    # two devices (each message starts a ClientApp process on each: a third would cost a third more)
    cfg = _cfg(tiny_assets, tmp_path, rounds=2, num_clients=2, clients_per_round=2, ranks=[2, 4], rank_shares=[1, 1],
               local_steps=4, connect_timeout=300.0)
    ref_cfg, ref_file = prepare(cfg, ref, 2)
    _, run_file = prepare(cfg, run, 2)
    files = {"data_dir": ref_cfg.data_dir, "model": ref_cfg.model}
    dep = LoopbackDeployment(work)
    try:
        dep.start_superlink()
        nodes = [dep.add_supernode(f"supernode-{i}", node_config(i, 2, r, files)) for i, r in enumerate([2, 4])]
        dep.wait_for(dep.flwr_run(ref_file, ref), ref, 600)
        trains = [_count(dep.log(f"supernode-{i}"), "Receiving: train message") for i in range(2)]
        dep.flwr_run(run_file, run)
        deadline = time.monotonic() + 600
        # mid-round: round 1 is checkpointed and a SuperNode has taken its round-2 training message
        while not (record_path(run).exists() and json.loads(record_path(run).read_text())["round"] == 1
                   and any(_count(dep.log(f"supernode-{i}"), "Receiving: train message") >= trains[i] + 2
                           for i in range(2))):
            assert time.monotonic() < deadline, "round 2 of the run never started"
            time.sleep(0.1)
        serverapp = [p for p in psutil.Process(dep.running("superlink").pid).children(recursive=True)
                     if "flwr-serverapp" in " ".join(_cmdline(p))]
        assert serverapp, "the ServerApp runs under the SuperLink"
        dep.kill_superlink()
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in serverapp)
        assert not (run / "summary.json").exists()
        dep.start_superlink(restart=True)
        dep.wait_for(dep.flwr_run(None, run, resume=True), run, 600)
        assert all(node.poll() is None for node in nodes)  # the same SuperNode processes all along
    finally:
        dep.stop()
    assert "resuming after round 1" in dep.log("flwr-run-resumed").read_text()
    for i in range(2):
        assert "Connection successful after" in dep.log(f"supernode-{i}").read_text()  # they came back by themselves
    sa, sb = (json.loads((p / "summary.json").read_text()) for p in (ref, run))
    # metrics, clients, ranks and traffic exactly; the float64 noise diagnostic to 1e-12 (its sum over layers
    # may round differently in the last bit between processes, as in test_fault_tolerance)
    strip = lambda h: [{k: v for k, v in untimed(e).items() if not k.endswith("agg_noise")} for e in h]  # noqa: E731
    assert sa["final"] == sb["final"] and strip(sa["history"]) == strip(sb["history"])
    for key in ("agg_noise", "fn_agg_noise", "paper_agg_noise"):
        assert [h[key] for h in sb["history"]] == pytest.approx([h[key] for h in sa["history"]], rel=1e-12)
    assert [sorted(c["cid"] for c in e["clients"]) for e in sb["history"][1:]] == [[0, 1], [0, 1]]
    ta, tb = (load_file(str(p / "adapter" / "adapter_model.safetensors")) for p in (ref, run))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert _left_running(tmp_path) == []
