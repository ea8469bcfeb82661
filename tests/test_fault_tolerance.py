"""Fault tolerance (docs/fault-tolerance.md): checkpoints and resume, failing and straggling clients, broken replies.

The in-process tests drive the real strategy and server round (``train_round``) against the real
ClientApp functions, called here instead of through Flower's transport; the slow ones run real
processes: a SIGKILLed ``fedplora run``, the Simulation Engine, and a loopback deployment.
"""

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from assets import flwr_run_user_path
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from safetensors.torch import load_file

from fedplora.cli import main
from fedplora.config import RunConfig
from fedplora.federation import client_app
from fedplora.federation.checkpoint import (
    CheckpointError,
    load_checkpoint,
    record_path,
    resume_config,
    restore_rng,
    rng_states,
    save_checkpoint,
    start_fresh,
)
from fedplora.federation.injection import injected_failure
from fedplora.methods import METHODS

# ---------------------------------------------------------------------------------------------- checkpoints


def _state(rank=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"l.plora_A": torch.randn(rank, 6, generator=g), "l.plora_B": torch.randn(5, rank, generator=g),
            "head.weight": torch.randn(3, 5, generator=g).to(torch.bfloat16),
            "l.flora_delta": torch.randn(5, 6, generator=g, dtype=torch.float64)}


HISTORY = [{"round": 0, "metrics": {"accuracy": 1 / 3}, "clients": []},
           {"round": 1, "metrics": {}, "train_loss": None, "clients": [{"cid": 2, "rank": 1}],
            "failures": [{"cid": 0, "stage": "train", "reason": "boom", "attempt": 0}]}]


def _saved(tmp_path, rnd=2, **cfg):
    cfg = RunConfig(rounds=3, rank=4, ranks=[1, 2, 4], **cfg)
    save_checkpoint(tmp_path, rnd, _state(), HISTORY, cfg, "tiny-bert", elapsed_s=12.5)
    return cfg


def _files(folder):
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_checkpoint_round_trip_is_bit_exact(tmp_path):
    cfg = _saved(tmp_path)
    ckpt = load_checkpoint(tmp_path, cfg, "tiny-bert", _state(seed=5))  # the reference only fixes the layout
    assert ckpt.round == 2 and ckpt.history == HISTORY and ckpt.elapsed_s == 12.5
    for k, v in _state().items():
        assert ckpt.state[k].dtype == v.dtype and torch.equal(ckpt.state[k], v), k
    # the global RNG states come back too
    saved = rng_states()
    expected = (torch.rand(3), np.random.rand(3), __import__("random").random())
    restore_rng(saved)
    again = (torch.rand(3), np.random.rand(3), __import__("random").random())
    assert torch.equal(expected[0], again[0]) and (expected[1] == again[1]).all() and expected[2] == again[2]


def test_checkpoint_of_non_contiguous_state(tmp_path):
    """FlexLoRA's SVD-based state holds transposed views; they must checkpoint like any tensor."""
    cfg = RunConfig(rounds=3, rank=4, ranks=[1, 2, 4])
    state = {k: (v.T.contiguous().T if v.dim() == 2 else v) for k, v in _state().items()}
    assert not state["l.plora_A"].is_contiguous()
    save_checkpoint(tmp_path, 1, state, HISTORY, cfg, "tiny-bert", elapsed_s=1.0)
    ckpt = load_checkpoint(tmp_path, cfg, "tiny-bert", _state(seed=5))
    for k, v in state.items():
        assert torch.equal(ckpt.state[k], v), k


def test_a_crash_while_saving_leaves_the_previous_checkpoint_in_force(tmp_path, monkeypatch):
    from fedplora.federation import checkpoint

    cfg = _saved(tmp_path, rnd=1)
    real_replace = os.replace

    def crash_on_commit(src, dst):
        if Path(dst).name == "checkpoint.json":
            raise OSError("killed")
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", crash_on_commit)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 2, _state(seed=9), HISTORY, cfg, "tiny-bert", 1.0)
    monkeypatch.undo()
    ckpt = load_checkpoint(tmp_path, cfg, "tiny-bert", _state())
    assert ckpt.round == 1 and torch.equal(ckpt.state["l.plora_A"], _state()["l.plora_A"])
    save_checkpoint(tmp_path, 2, _state(seed=9), HISTORY, cfg, "tiny-bert", 1.0)  # the next save cleans up
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == ["checkpoint.json", "state-r00002.safetensors"]


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage,load,match", [
    ("record", {}, r"checkpoint\.json: corrupt checkpoint record \(truncated"),
    ("state", {}, r"state-r00002\.safetensors: corrupt"),
    ("delete-state", {}, r"state-r00002\.safetensors: missing"),
    (None, {"cfg": {"rank": 8}}, r"checkpoint\.json: made by a run with rank=4, this run has rank=8"),
    (None, {"cfg": {"model": "/other/model"}}, r"checkpoint\.json: made by a run with model=None"),
    (None, {"model_id": "other-bert"}, r"checkpoint\.json: made for model 'tiny-bert', this run has 'other-bert'"),
    (None, {"reference": {"l.plora_A": torch.zeros(4, 7)}}, r"'l\.plora_A' is \[\[4, 6\], 'float32'\].*needs "
                                                            r"\[\[4, 7\], 'float32'\]; was the model changed"),
])
def test_a_corrupt_or_foreign_checkpoint_is_refused_naming_file_and_mismatch(tmp_path, damage, load, match):
    cfg = _saved(tmp_path)
    folder = tmp_path / "checkpoint"
    if damage == "record":
        _truncate(folder / "checkpoint.json")
    elif damage == "state":
        _truncate(folder / "state-r00002.safetensors")
    elif damage == "delete-state":
        (folder / "state-r00002.safetensors").unlink()
    before = _files(tmp_path)
    reference = _state() | load.get("reference", {})
    with pytest.raises(CheckpointError, match=match) as e:
        load_checkpoint(tmp_path, cfg.with_overrides(**load.get("cfg", {})), load.get("model_id", "tiny-bert"), reference)
    assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)
    assert _files(tmp_path) == before  # nothing written, renamed or removed


def test_a_checkpoint_older_than_a_setting_resumes_with_its_default_and_only_then(tmp_path):
    """A setting added after a run was stopped is absent from its record: the stopped run ran with the default,
    so resuming with the default continues it, and anything else is the one-line mismatch."""
    cfg = _saved(tmp_path)
    record = json.loads(record_path(tmp_path).read_text())
    del record["config"]["simulation_nodes"]
    record_path(tmp_path).write_text(json.dumps(record))
    assert load_checkpoint(tmp_path, cfg, "tiny-bert", _state()).round == 2
    with pytest.raises(CheckpointError, match=r"made by a run with simulation_nodes=0, this run has simulation_nodes=2"):
        load_checkpoint(tmp_path, cfg.with_overrides(simulation_nodes=2), "tiny-bert", _state())


def test_a_new_run_never_overwrites_an_unfinished_one(tmp_path):
    _saved(tmp_path, rnd=2)
    with pytest.raises(CheckpointError, match="unfinished run: continue it with `fedplora run --resume"):
        start_fresh(tmp_path)
    assert record_path(tmp_path).is_file()
    _saved(tmp_path, rnd=3)  # finished (rounds=3): a new run may replace it
    start_fresh(tmp_path)
    assert not (tmp_path / "checkpoint").exists()


def test_resume_on_the_command_line(tmp_path, capsys):
    def fails(argv, text):
        assert main(["run", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and text in err, err

    run = tmp_path / "run"
    fails(["--resume", str(run)], "config.toml: missing")
    run.mkdir()
    cfg = RunConfig(rounds=3, rank=4, ranks=[1, 2, 4], out=str(run))
    (run / "config.toml").write_text(cfg.to_toml())
    fails(["--resume", str(run)], "no checkpoint")
    save_checkpoint(run, 1, _state(), HISTORY, cfg, "m", 1.0)
    fails(["--resume", str(run), "--rank", "8", "--seed", "3"], "keeps the settings in")
    fails(["--resume", str(run), "--out", str(tmp_path / "elsewhere")], "drop --out")
    moved = tmp_path / "moved"
    run.rename(moved)  # a run folder may move: ``out`` follows it
    assert resume_config(moved) == cfg.with_overrides(out=str(moved))
    _truncate(moved / "checkpoint" / "state-r00001.safetensors")
    before = _files(moved)
    fails(["--resume", str(moved)], "state-r00001.safetensors: corrupt")
    assert _files(moved) == before


def test_failure_injection_is_seeded_and_takes_the_fraction_of_all_clients():
    cfg = RunConfig(num_clients=10, fail_fraction=0.3, seed=4)
    down = {r: [c for c in range(10) if injected_failure(cfg, r, 0, c)] for r in range(1, 30)}
    assert all(len(d) == 3 for d in down.values()) and len({tuple(d) for d in down.values()}) > 10
    assert down[1] == [c for c in range(10) if injected_failure(cfg, 1, 0, c)]
    assert any(down[r] != [c for c in range(10) if injected_failure(cfg, r, 1, c)] for r in down)  # retries differ
    assert not any(injected_failure(RunConfig(num_clients=10), 1, 0, c) for c in range(10))


# ------------------------------------------------------------------------------- the round, in one process

class InProcessGrid:
    """Flower's Grid answered in this process by the real ClientApp functions (query, train).

    ``tamper(cid, message, reply)`` returns the replies that really arrive for one message;
    ``silent`` clients fail every train message without training.
    """

    def __init__(self, num_clients, tamper=None, silent=()):
        config = {"num-partitions": num_clients, "cpus": torch.get_num_threads()}  # keep this process's threads
        self.contexts = {100 + c: Context(run_id=1, node_id=100 + c, state=RecordDict(), run_config={},
                                          node_config={"partition-id": c, **config}) for c in range(num_clients)}
        self.tamper = tamper or (lambda cid, msg, reply: [reply])
        self.silent = set(silent)
        self.sent = 0

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            self.sent += 1
            msg.metadata.__dict__["_message_id"] = f"m{self.sent}"  # what the SuperLink does on push
            context = self.contexts[msg.metadata.dst_node_id]
            cid, training = int(context.node_config["partition-id"]), msg.metadata.message_type == "train"
            try:
                if training and cid in self.silent:
                    raise ConnectionError("gone")
                reply = (client_app.train if training else client_app.query)(msg, context)
            except Exception as e:  # what Flower sends back when a ClientApp raises
                reply = Message(Error(code=0, reason=f"{type(e).__name__}: {e}"), reply_to=msg)
            replies += self.tamper(cid, msg, reply) if training else [reply]
        return replies


@contextlib.contextmanager
def flower_process(monkeypatch):
    """Messages made outside a Flower process need a run/node/task identity; clients train on one thread,
    as in the Simulation Engine (two threads on a busy 2-core machine are several times slower)."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def in_process(monkeypatch):
    with flower_process(monkeypatch):
        yield


def _small_cfg(assets, **kw):
    base = dict(model=assets["model"], data_dir=assets["data_dir"], rounds=2, num_clients=4, clients_per_round=4,
                rank=4, alpha=8, ranks=[1, 2, 4], rank_shares=[1, 1, 1], local_steps=2, batch_size=8,
                eval_max_examples=20, max_seq_len=32, lr=5e-3, seed=3)
    base.update(kw)
    return RunConfig(**base).validate()


def _strategy(cfg, grid):
    """The server's strategy on an in-process grid, with the method's initial state as an ArrayRecord."""
    from fedplora.adapters import get_plora_model
    from fedplora.federation.client_app import method_options, plora_config
    from fedplora.federation.strategy import HeteroLoRAStrategy, state_to_arrays
    from fedplora.methods import make_method
    from fedplora.tasks import make_task

    model = get_plora_model(make_task(cfg).build_model(), plora_config(cfg))
    method = make_method(cfg.method, plora_config(cfg), **method_options(cfg))
    from fedplora.federation import attacks

    strategy = HeteroLoRAStrategy(method, cfg, attackers=attacks.attackers(cfg))  # as server_app builds it
    strategy.wait_for_nodes(grid, timeout=60)
    return strategy, state_to_arrays(method.init_state(model))


def _rounds(cfg, grid):
    """Flower's loop (``Strategy.start``) for ``cfg.rounds`` rounds: the final state and the round entries."""
    from fedplora.federation.strategy import arrays_to_state

    strategy, arrays = _strategy(cfg, grid)
    result = strategy.start(grid, arrays, num_rounds=cfg.rounds, timeout=cfg.round_timeout)
    from fedplora.federation.strategy import untimed

    return arrays_to_state(result.arrays), [untimed(h) for h in strategy.history[1:]]


def _content(arrays, config, metrics):
    return RecordDict({"arrays": ArrayRecord(torch_state_dict=arrays),
                       "config": ConfigRecord({"update": config if isinstance(config, str) else json.dumps(config)}),
                       "metrics": MetricRecord(metrics)})


def _pick(arrays, rng):
    return sorted(arrays)[rng.integers(len(arrays))]


def _poke(arrays, rng, value):
    key = _pick(arrays, rng)
    t = arrays[key].clone()
    t.view(-1)[rng.integers(t.numel())] = value
    return {**arrays, key: t}


def _drop(arrays, rng):
    gone = _pick(arrays, rng)
    return {k: v for k, v in arrays.items() if k != gone}


def _reshape(arrays, rng):
    key = _pick(arrays, rng)
    t = arrays[key]
    bad = [t[:-1], torch.cat([t, t[:1]]), t.unsqueeze(0), t.reshape(-1) if t.dim() > 1 else t.unsqueeze(1)]
    return {**arrays, key: bad[rng.integers(len(bad))]}


def _indices(a, c, rank, rng):
    layers = sorted(k[: -len(".plora_A")] for k in a if k.endswith(".plora_A"))
    return {layer: [int(rng.integers(rank, 3 * rank))] for layer in layers}


# each: (arrays, config, metrics, R, rng) -> the reply's content; all derived from the client's honest reply
MUTATIONS = {
    "wrong shape": lambda a, c, m, R, g: _content(_reshape(a, g), c, m),
    "NaN": lambda a, c, m, R, g: _content(_poke(a, g, float("nan")), c, m),
    "Inf": lambda a, c, m, R, g: _content(_poke(a, g, float(g.choice([-1, 1])) * math.inf), c, m),
    "huge norm": lambda a, c, m, R, g: _content({k: v * 1e6 for k, v in a.items()}, c, m),
    "one huge value": lambda a, c, m, R, g: _content(_poke(a, g, 3e38), c, m),
    "missing key": lambda a, c, m, R, g: _content(_drop(a, g), c, m),
    "extra key": lambda a, c, m, R, g: _content({**a, "bert.pooler.dense.weight": torch.zeros(32, 32)}, c, m),
    "float64": lambda a, c, m, R, g: _content({k: v.double() for k, v in a.items()}, c, m),
    "integer array": lambda a, c, m, R, g: _content({**a, (k := _pick(a, g)): a[k].round().to(torch.int32)}, c, m),
    "indices out of range": lambda a, c, m, R, g: _content(a, {**c, "indices": _indices(a, c, R, g)}, m),
    "indices repeated": lambda a, c, m, R, g: _content(a, {**c, "indices": {k: [0, 0] for k in _indices(a, c, R, g)}}, m),
    "other rank declared": lambda a, c, m, R, g: _content(a, {**c, "rank": R + 1}, m),
    "negative count": lambda a, c, m, R, g: _content(a, c, {**m, "num-examples": -int(g.integers(1, 50))}),
    "zero count": lambda a, c, m, R, g: _content(a, c, {**m, "num-examples": 0}),
    "fractional count": lambda a, c, m, R, g: _content(a, c, {**m, "num-examples": 2.5}),
    "missing count": lambda a, c, m, R, g: _content(a, c, {k: v for k, v in m.items() if k != "num-examples"}),
    "infinite metric": lambda a, c, m, R, g: _content(a, c, {**m, "budget": math.inf}),
    "config not JSON": lambda a, c, m, R, g: _content(a, "{'indices': [", m),
    "no arrays record": lambda a, c, m, R, g: RecordDict({"config": ConfigRecord({"update": json.dumps(c)}),
                                                          "metrics": MetricRecord(m)}),
    "empty reply": lambda a, c, m, R, g: RecordDict(),
}
HONEST, BROKEN = 3, 10  # clients 0..2 are honest; the next 10 send a broken reply (2 rounds: every kind once)


def _fuzzer(rank, rounds_seen):
    def tamper(cid, msg, reply):
        if cid < HONEST:
            assert not reply.has_error(), reply.error.reason
            # a forged second reply from an honest node, and one from a node nobody asked: both ignored
            forged = Message(_content({}, {}, {"num-examples": 10**9}), reply_to=msg)
            stranger = Message(RecordDict(), reply_to=msg)
            stranger.metadata.__dict__["_src_node_id"] = 999
            return [reply, forged, stranger]
        rnd = int(msg.content["config"]["round"])
        kind = sorted(MUTATIONS)[(cid - HONEST + BROKEN * (rnd - 1)) % len(MUTATIONS)]
        rounds_seen.setdefault(rnd, {})[cid] = kind
        a = {k: torch.as_tensor(v) for k, v in reply.content["arrays"].to_torch_state_dict().items()}
        c = json.loads(reply.content["config"]["update"])
        m = dict(reply.content["metrics"])
        return [Message(MUTATIONS[kind](a, c, m, rank, np.random.default_rng([cid, rnd])), reply_to=msg)]
    return tamper


@pytest.mark.parametrize("method", sorted(METHODS))
def test_fuzzed_replies_are_all_rejected_and_leave_the_state_bit_identical(tiny_assets, in_process, method):
    n = HONEST + BROKEN
    cfg = _small_cfg(tiny_assets, method=method, num_clients=n, clients_per_round=n, max_update_norm=1e3,
                     local_steps=1)
    kinds: dict[int, dict[int, str]] = {}
    fuzzed, entries = _rounds(cfg, InProcessGrid(n, _fuzzer(cfg.rank, kinds)))
    without, reference = _rounds(cfg, InProcessGrid(n, silent=range(HONEST, n)))

    assert fuzzed.keys() == without.keys()
    for key in fuzzed:
        assert fuzzed[key].dtype == without[key].dtype and torch.equal(fuzzed[key], without[key]), key
    for entry, ref in zip(entries, reference):
        assert entry["aggregated"] and [c["cid"] for c in entry["clients"]] == list(range(HONEST))
        assert entry["clients"] == ref["clients"]
        rejected = {f["cid"]: f["reason"] for f in entry["failures"]}
        assert all(f["stage"] == "validate" for f in entry["failures"])
        assert sorted(rejected) == sorted(kinds[entry["round"]]), entry["failures"]  # every broken reply, no other
        assert all(rejected.values())
    assert sorted(set(k for r in kinds.values() for k in r.values())) == sorted(MUTATIONS)


def test_too_few_replies_skip_keeps_the_state_and_retry_redoes_the_round(tiny_assets, in_process):
    def flaky(cid, msg, reply):  # client 1 fails the first attempt of every round (a transient fault)
        if cid == 1 and int(msg.content["config"].get("attempt", 0)) == 0:
            return [Message(Error(code=0, reason="connection reset"), reply_to=msg)]
        return [reply]

    cfg = _small_cfg(tiny_assets, rounds=1, num_clients=3, clients_per_round=3, min_replies=3, local_steps=1)
    grid = InProcessGrid(3, flaky)
    from fedplora.federation.strategy import arrays_to_state

    before = arrays_to_state(_strategy(cfg, grid)[1])
    state, (skipped,) = _rounds(cfg, grid)
    assert not skipped["aggregated"] and skipped["attempts"] == 1
    assert [c["cid"] for c in skipped["clients"]] == [0, 2]  # valid, but too few: not aggregated
    assert [(f["cid"], f["stage"]) for f in skipped["failures"]] == [(1, "train"), (None, "round")]
    assert all(torch.equal(state[k], before[k]) for k in before)  # never half-updated

    retry = cfg.with_overrides(on_too_few_replies="retry", max_round_retries=1)
    _, (done,) = _rounds(retry, grid)
    assert done["aggregated"] and done["attempts"] == 2 and [c["cid"] for c in done["clients"]] == [0, 1, 2]
    assert [(f["cid"], f["stage"], f["attempt"]) for f in done["failures"]] == [(1, "train", 0), (None, "round", 0)]


# -------------------------------------------------------------------------------------- real processes

def _strip(history):
    from fedplora.federation.strategy import untimed

    return [{k: v for k, v in untimed(h).items() if not k.endswith("agg_noise")} for h in history]


def _same_outputs(a: Path, b: Path):
    """Metrics, clients, traffic and the adapter bit for bit; the float64 noise diagnostic to 1e-12 (its sum
    over layers may round differently in the last bit between processes)."""
    sa, sb = (json.loads((p / "summary.json").read_text()) for p in (a, b))
    assert sa["final"] == sb["final"] and _strip(sa["history"]) == _strip(sb["history"])
    for key in ("agg_noise", "fn_agg_noise", "paper_agg_noise"):  # both noise families (docs/method.md)
        assert [h[key] for h in sb["history"]] == pytest.approx([h[key] for h in sa["history"]], rel=1e-12)
    ta, tb = (load_file(str(p / "adapter" / "adapter_model.safetensors")) for p in (a, b))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def _fedplora_run(*args, log: Path):
    return subprocess.Popen([sys.executable, "-m", "fedplora.cli", "run", *args], stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _kill_group(proc):
    """SIGKILL a process started with start_new_session and everything in its group; returns the processes
    of the run (its group and every descendant, also the detached ones Flower starts) still alive 30 s later."""
    members = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == proc.pid:
                members.append(p)
        except (ProcessLookupError, psutil.Error):
            pass
    try:
        members += psutil.Process(proc.pid).children(recursive=True)  # flower-superexec runs in its own session
    except psutil.Error:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    _, alive = psutil.wait_procs(members, timeout=30)
    alive = [p for p in alive if _running(p)]  # a zombie has exited; only its reaping is left (PID 1's job)
    for p in alive:  # keep the machine clean even when the test fails
        p.kill()
    return alive


def _running(p):
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.slow
def test_sigkill_mid_round_then_resume_equals_the_uninterrupted_run(tiny_assets, tmp_path):
    cfg = _small_cfg(tiny_assets, rounds=3, clients_per_round=3, local_steps=30)
    (tmp_path / "run.toml").write_text(cfg.to_toml())
    ref = _fedplora_run("--config", str(tmp_path / "run.toml"), "--out", str(tmp_path / "ref"), log=tmp_path / "ref.log")
    victim_log = tmp_path / "victim.log"
    victim = _fedplora_run("--config", str(tmp_path / "run.toml"), "--out", str(tmp_path / "run"), log=victim_log)
    try:
        deadline = time.monotonic() + 240
        while "round 2/3: training" not in victim_log.read_text():
            assert victim.poll() is None and time.monotonic() < deadline, victim_log.read_text()[-2000:]
            time.sleep(0.05)
        assert _kill_group(victim) == []  # the group and every descendant (Ray, the SuperExec): none outlives it
        assert victim.returncode == -signal.SIGKILL
        record = json.loads(record_path(tmp_path / "run").read_text())
        # Killed inside round 2, or inside round 3 when round 2 ended between the log line and the kill (a round of
        # this tiny model can take less than the kill's process scan on a loaded machine): mid-round either way.
        assert record["round"] in (1, 2) and not (tmp_path / "run" / "summary.json").exists()

        shutil.copytree(tmp_path / "run", tmp_path / "run-flwr")  # the same stopped run, resumed by `flwr run`
        resumed = subprocess.run([sys.executable, "-m", "fedplora.cli", "run", "--resume", str(tmp_path / "run")],
                                 capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert f"resuming after round {record['round']}" in resumed.stderr
        flwr_run_user_path({"out": str(tmp_path / "run-flwr"), "resume": True}, cfg.num_clients, tmp_path / "flwr")
        assert ref.wait(timeout=300) == 0, (tmp_path / "ref.log").read_text()[-2000:]
    finally:
        for proc in (victim, ref):
            if proc.poll() is None:
                _kill_group(proc)
    _same_outputs(tmp_path / "ref", tmp_path / "run")
    _same_outputs(tmp_path / "ref", tmp_path / "run-flwr")


@pytest.mark.slow
def test_simulation_with_30_percent_of_clients_failing_each_round(tiny_assets, tmp_path):
    from fedplora.federation.simulation import run_simulation

    cfg = _small_cfg(tiny_assets, num_clients=10, clients_per_round=10, fail_fraction=0.3,
                     out=str(tmp_path))
    summary = run_simulation(cfg, tmp_path)
    for h in summary["history"][1:]:
        down = [c for c in range(10) if injected_failure(cfg, h["round"], 0, c)]
        assert len(down) == 3 and h["aggregated"]
        assert [(f["cid"], f["stage"]) for f in h["failures"]] == [(c, "train") for c in down]
        assert all("injected failure" in f["reason"] for f in h["failures"])
        assert [c["cid"] for c in h["clients"]] == [c for c in range(10) if c not in down]
    assert summary["failures_total"] == 6 and (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_a_straggler_is_dropped_at_the_round_timeout(tiny_assets, tmp_path):
    from fedplora.federation.simulation import run_simulation

    cfg = _small_cfg(tiny_assets, rounds=1, fail_fraction=0.25, fail_mode="straggle", round_timeout=10.0,
                     out=str(tmp_path))
    (entry,) = run_simulation(cfg, tmp_path)["history"][1:]
    (late,) = [c for c in range(4) if injected_failure(cfg, 1, 0, c)]
    assert entry["failures"] == [{"cid": late, "stage": "train", "reason": "no reply within the timeout", "attempt": 0}]
    assert [c["cid"] for c in entry["clients"]] == [c for c in range(4) if c != late] and entry["aggregated"]
    assert entry["wall_s"] >= cfg.round_timeout


def _supernode(partition_id):
    """The flower-supernode process this test process started for ``partition_id``."""
    for p in psutil.Process().children():
        try:
            args = p.cmdline()
        except psutil.Error:
            continue
        if any("flower-supernode" in a for a in args) and f"partition-id={partition_id} " in " ".join(args):
            return p
    raise LookupError(f"no SuperNode for partition {partition_id}")


@pytest.mark.slow
def test_loopback_deployment_survives_a_killed_supernode(tiny_assets, tmp_path):
    from fedplora.federation.deployment import run_loopback

    cfg = _small_cfg(tiny_assets, rounds=1, num_clients=3, clients_per_round=3, round_timeout=30.0)
    result = {}
    thread = threading.Thread(target=lambda: result.update(out=run_loopback(cfg, tmp_path / "dep", [1, 2, 4], 400)))
    thread.start()
    try:
        deadline = time.monotonic() + 240
        while not record_path(tmp_path / "dep").exists():  # round 0 is checkpointed just before round 1 starts
            assert thread.is_alive() and time.monotonic() < deadline
            time.sleep(0.1)
        os.killpg(_supernode(2).pid, signal.SIGKILL)  # the device dies, with any ClientApp it is running
    finally:
        thread.join(timeout=600)
    (entry,) = json.loads((result["out"] / "summary.json").read_text())["history"][1:]
    assert entry["aggregated"] and [c["cid"] for c in entry["clients"]] == [0, 1]
    # it died before answering its first query (round 1's): left out of sampling, named by its node id; the
    # SuperLink answers for it once its heartbeat is 2 intervals late (60 s, within connect_timeout)
    (failure,) = entry["failures"]
    assert failure["cid"] is None and failure["stage"] == "query"
    assert failure["reason"].startswith(f"node {failure['node']} left out of sampling: refused its first query: ")
    assert "Node Unavailable" in failure["reason"]
