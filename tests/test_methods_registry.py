"""A method is one file plus one registry line: the registry builds it from a RunConfig, its class declares what it
supports, and the library's defaults are the CLI's."""

import inspect

import pytest
import torch

from fedplora import methods
from fedplora.aggregation import Mean, Robust, reducer_for
from fedplora.config import BY_NAME, ConfigError, RunConfig
from fedplora.methods import METHODS, FedPLoRA, build_method, plora_config
from fedplora.methods.base import ClientTask, ClientUpdate
from fedplora.privacy import CentralDP


@pytest.mark.parametrize("name", sorted(METHODS))
def test_constructor_defaults_are_the_run_settings_defaults(name):
    params = inspect.signature(METHODS[name].__init__).parameters
    for setting in ("weighting", "selection", "aggregate_over", "unselected"):
        if setting in params:
            assert params[setting].default == BY_NAME[setting].default, (name, setting)
    # and the registry builds from a config exactly what the constructor builds with those settings
    cfg = RunConfig(method=name).validate()
    built, direct = build_method(cfg), METHODS[name](plora_config(cfg), **METHODS[name].config_options(cfg))
    assert built.describe() == direct.describe() and built.weighting == direct.weighting


def test_a_new_method_needs_one_class_and_one_registry_line(monkeypatch):
    """The settings, the config's checks and the reducers read the capabilities a class declares: nothing outside
    methods/ names the method."""

    class EveryPair(FedPLoRA):
        """Every sampled client counts for every pair (the "all" reading), with the median refused."""

        name = "everypair"
        aggregators = ("mean", "norm_clip", "krum")
        aggregator_refusal = "an illustration"
        secure_refusal = "an illustration too"

        def counts_everyone(self) -> bool:
            return True

    monkeypatch.setitem(METHODS, "everypair", EveryPair)
    cfg = RunConfig(method="everypair", rank=4, ranks=[1, 2, 4]).validate()
    method = build_method(cfg)
    assert isinstance(method, EveryPair) and method.selection == "per_layer"
    with pytest.raises(ConfigError, match="aggregator: median is not defined for everypair: an illustration"):
        RunConfig(method="everypair", aggregator="median").validate()
    with pytest.raises(ConfigError, match="secure_aggregation: not defined for everypair: an illustration too"):
        RunConfig(method="everypair", clients_per_round=3, secure_aggregation=True).validate()
    assert isinstance(reducer_for(method, "krum"), Robust) and isinstance(reducer_for(method), Mean)
    dp = CentralDP(clip=1.0, noise_multiplier=0.0, clients_per_round=2, budgets=(1, 2, 4))
    assert torch.equal(reducer_for(method, dp).pair_counts, torch.full((4,), 2.0, dtype=torch.float64))


def test_the_registry_is_the_only_list_of_methods():
    from fedplora.cli import build_parser

    assert sorted(BY_NAME["method"].allowed()) == sorted(METHODS)
    assert build_parser().parse_args(["compare"]).methods == list(METHODS)  # compare's default: every method
    assert methods.__all__ and all(cls.name == name for name, cls in METHODS.items())


def test_the_library_aggregate_is_the_pipeline():
    """``method.aggregate(state, tasks, updates, how)`` and ``aggregation.aggregate(method, ...)`` are one path."""
    from fedplora.aggregation import aggregate
    from fedplora.methods import ClientInfo

    cfg = RunConfig(rank=4, ranks=[1, 2, 4]).validate()
    method = build_method(cfg)
    g = torch.Generator().manual_seed(0)
    state = {"L.plora_A": torch.randn(4, 6, generator=g, dtype=torch.float64),
             "L.plora_B": torch.randn(5, 4, generator=g, dtype=torch.float64)}
    tasks = [method.configure_client(state, ClientInfo(c, b, 10), 1) for c, b in enumerate([1, 2, 4])]
    updates = []
    for t in tasks:
        idx = t.config["indices"]["L"]
        updates.append(ClientUpdate({"L.plora_A": state["L.plora_A"][idx] + 1.0,
                                     "L.plora_B": state["L.plora_B"][:, idx] - 1.0}, {"indices": t.config["indices"]},
                                    10))
    for how in (None, "median", "norm_clip"):
        one, other = method.aggregate(state, tasks, updates, how), aggregate(method, state, tasks, updates, how)
        assert all(torch.equal(one[k], other[k]) for k in state)
    assert isinstance(tasks[0], ClientTask)
