"""Server optimizers on the pair space (fedplora/aggregation/server_opt.py): none and avgm(0, 1) are the plain
aggregate bit for bit, the updates are the definitions', a pair nobody trained is not stepped, and a killed run
resumes with its moments exactly."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from fedplora.aggregation import ServerOptimizer, aggregate
from fedplora.methods import ClientInfo, ClientTask, ClientUpdate, FedPLoRA, PLoRAConfig
from test_fault_tolerance import InProcessGrid, _small_cfg, in_process  # noqa: F401 (a fixture)

GOLDEN = Path(__file__).resolve().parent / "golden" / "aggregation"
F64 = torch.float64
CFG = PLoRAConfig(rank=4, alpha=4, target_modules=["query"], modules_to_save=["classifier"])


@pytest.mark.parametrize("name", ["fedplora", "fedplora-all", "hetlora", "fedit"])
def test_none_and_avgm_without_momentum_at_rate_one_are_the_plain_aggregate_bit_for_bit(name):
    import sys

    sys.path.insert(0, str(GOLDEN.parent))
    import record

    saved = torch.load(GOLDEN / f"{name}.pt", weights_only=True)
    cfg = record.run_config({}, saved["overrides"])
    method = record.method_for(cfg)
    tasks = [ClientTask(t["arrays"], json.loads(t["config"])) for t in saved["tasks"]]
    updates = [ClientUpdate(u["arrays"], json.loads(u["config"]), u["num_samples"]) for u in saved["updates"]]
    for opt in (ServerOptimizer("none"), ServerOptimizer("avgm", 1.0, momentum=0.0)):
        new = aggregate(method, saved["state"], tasks, updates, None, None, opt)
        assert all(torch.equal(new[k], saved["outputs"]["aggregate/mean"][k]) for k in new), opt.name


def _round(state, moves):
    """Fed-PLoRA clients at rank 4 with ``fixed`` selection of their first pairs: client c moves pair j by
    moves[c][j] (A's row and B's column), its head by 1; uniform weights."""
    method = FedPLoRA(CFG, selection="fixed")
    tasks, updates = [], []
    for cid, move in enumerate(moves):
        task = method.configure_client(state, ClientInfo(cid, len(move), 10), 1)
        idx = task.config["indices"]["L"]
        arrays = {"L.plora_A": state["L.plora_A"][idx] + torch.tensor(move, dtype=F64)[:, None],
                  "L.plora_B": state["L.plora_B"][:, idx] + torch.tensor(move, dtype=F64)[None, :],
                  "head.weight": state["head.weight"] + 1.0}
        tasks.append(task)
        updates.append(ClientUpdate(arrays, {"indices": task.config["indices"]}, 10))
    return method, tasks, updates


def test_the_updates_are_the_definitions_and_an_untrained_pair_is_not_stepped():
    state = {"L.plora_A": torch.zeros(4, 2, dtype=F64), "L.plora_B": torch.zeros(3, 4, dtype=F64),
             "head.weight": torch.zeros(2, dtype=F64)}
    # round 1: pairs 0, 1 trained (mean moves 1 and 2), pairs 2, 3 nobody; round 2: pair 0 moves 3, pair 2 moves 4
    rounds = [[[1.0, 2.0], [1.0, 2.0]], [[3.0, 0.0, 4.0], [3.0, 0.0, 4.0]]]
    for name, lr in (("avgm", 0.5), ("adam", 0.1), ("yogi", 0.01)):
        opt, x = ServerOptimizer(name, lr, momentum=0.9, beta1=0.9, beta2=0.99, tau=1e-3), state
        m, v, t = [0.0] * 4, [0.0] * 4, [0] * 4  # the hand-kept moments of A's first column, per pair
        expect = [0.0] * 4
        for moves in rounds:
            method, tasks, updates = _round(x, moves)
            x = aggregate(method, x, tasks, updates, None, None, opt)
            for j in range(4):
                if j >= len(moves[0]):
                    continue  # nobody trained it: no step, no moment update
                d = moves[0][j]
                t[j] += 1
                if name == "avgm":
                    m[j] = 0.9 * m[j] + d
                    expect[j] += lr * m[j]
                else:
                    m[j] = 0.9 * m[j] + 0.1 * d
                    if name == "adam":
                        v[j] = 0.99 * v[j] + 0.01 * d * d
                        rate = lr * math.sqrt(1 - 0.99 ** t[j]) / (1 - 0.9 ** t[j])
                    else:
                        v[j] = v[j] - 0.01 * d * d * math.copysign(1.0, v[j] - d * d) if v[j] != d * d else v[j]
                        rate = lr
                    expect[j] += rate * m[j] / (math.sqrt(v[j]) + 1e-3)
            assert x["L.plora_A"][:, 0].tolist() == pytest.approx(expect, rel=1e-12, abs=1e-15), name
            assert torch.equal(x["L.plora_A"][:, 0], x["L.plora_B"][0])  # A's rows and B's columns alike
        assert x["L.plora_A"][3].abs().sum() == 0  # pair 3 was never trained: never stepped
        assert opt.buffers["t/L"].tolist() == [2.0, 2.0, 1.0, 0.0]


def test_a_killed_run_with_adam_resumes_to_the_uninterrupted_result(tiny_assets, in_process, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from fedplora.federation import strategy as strategy_module
    from fedplora.federation.server_app import run_federation

    cfg = _small_cfg(tiny_assets, rounds=3, server_optimizer="adam", server_lr=0.05, checkpoint_every=1)
    whole = run_federation(InProcessGrid(cfg.num_clients), cfg, tmp_path / "whole")

    real = strategy_module.HeteroLoRAStrategy.aggregate_train

    def killed_in_round_3(self, server_round, replies):
        if server_round == 3:
            raise KeyboardInterrupt("killed")
        return real(self, server_round, replies)

    monkeypatch.setattr(strategy_module.HeteroLoRAStrategy, "aggregate_train", killed_in_round_3)
    with pytest.raises(KeyboardInterrupt):
        run_federation(InProcessGrid(cfg.num_clients), cfg, tmp_path / "resumed")
    monkeypatch.setattr(strategy_module.HeteroLoRAStrategy, "aggregate_train", real)
    shutil.copytree(tmp_path / "resumed", tmp_path / "forgetful")
    resumed = run_federation(InProcessGrid(cfg.num_clients), cfg, tmp_path / "resumed", resume=True)
    assert resumed["final"] == whole["final"]
    adapter = lambda run: load_file(str(tmp_path / run / "adapter" / "adapter_model.safetensors"))
    a, b = adapter("whole"), adapter("resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the moments are what made it exact: resumed without them, round 3 steps elsewhere
    monkeypatch.setattr(strategy_module.ServerOptimizer, "load_state_dict", lambda self, buffers: None)
    run_federation(InProcessGrid(cfg.num_clients), cfg, tmp_path / "forgetful", resume=True)
    c = adapter("forgetful")
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_a_robust_rule_does_not_step_a_pair_that_clients_only_hold_with_a_zero_change():
    """Under aggregate_over="all" (and FSLoRA) every client holds every pair, most with a zero change: the robust
    rule sees them, but a pair nobody trained is still not stepped by the optimizer."""
    state = {"L.plora_A": torch.zeros(4, 2, dtype=F64), "L.plora_B": torch.zeros(3, 4, dtype=F64),
             "head.weight": torch.zeros(2, dtype=F64)}
    everyone = FedPLoRA(CFG, selection="fixed", aggregate_over="all")
    opt, x = ServerOptimizer("adam", 0.1), state
    for moves in ([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0]], [[3.0], [3.0], [3.0]]):
        _, tasks, updates = _round(x, moves)
        tasks = [everyone.configure_client(x, ClientInfo(c, len(m), 10), 1) for c, m in enumerate(moves)]
        x = aggregate(everyone, x, tasks, updates, "median", None, opt)
    assert opt.buffers["t/L"].tolist() == [2.0, 1.0, 0.0, 0.0]


def test_the_server_drops_a_client_whose_budget_answer_it_cannot_serve():
    """A budget query answered with a budget of 0 (or a count that is not a positive integer), or a budget the
    method cannot serve, drops that client with its reason; the round goes on with the others."""
    import types

    from fedplora.config import RunConfig
    from fedplora.federation.strategy import HeteroLoRAStrategy, RoundRecord
    from fedplora.methods import FedIT

    class Answer:
        def __init__(self, node, info):
            self.metadata, self.content = types.SimpleNamespace(src_node_id=node), {"info": info}

        def has_error(self):
            return False

    answers = {0: {"cid": 0, "budget": 0, "num_examples": 5}, 1: {"cid": 1, "budget": 2, "num_examples": 5.5},
               2: {"cid": 2, "budget": 1, "num_examples": 5}, 3: {"cid": 3, "budget": 4, "num_examples": 5}}
    grid = types.SimpleNamespace(send_and_receive=lambda messages, timeout=None: [Answer(100 + c, a)
                                                                                  for c, a in answers.items()],
                                 get_node_ids=lambda: [100 + c for c in answers])
    cfg = RunConfig(rank=4, ranks=[2, 4], rank_shares=[1.0, 1.0], num_clients=4, clients_per_round=4).validate()
    method = FedIT(CFG, variant="feasible", min_rank=2)
    strategy = HeteroLoRAStrategy(method, cfg)
    strategy.record = RoundRecord(round=1)
    strategy._query = lambda *args: None
    state = {"L.plora_A": torch.zeros(4, 2), "L.plora_B": torch.zeros(3, 4), "head.weight": torch.zeros(2)}
    from fedplora.federation.strategy import state_to_arrays

    pairs = strategy.round_tasks(1, state_to_arrays(state), 0, grid)
    assert [info.cid for info, _ in pairs] == [3]
    reasons = {f["cid"]: (f["stage"], f["reason"]) for f in strategy.record.failures}
    assert reasons[0][0] == reasons[1][0] == "query" and "integers >= 1" in reasons[0][1]
    assert reasons[2] == ("configure", "client 2 has budget 1 < min_rank 2: min_rank must be the smallest budget "
                                       "in the federation")
