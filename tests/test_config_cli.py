import argparse
import dataclasses
import subprocess
import sys

import pytest

from fedplora import config as config_module
from fedplora import config_schema
from fedplora.cli import add_setting_flags, build_parser, config_from_args, main
from fedplora.config import SETTINGS, ConfigError, RunConfig, setting
from fedplora.errors import CheckpointError, DataError, FedploraError, UpdateRejected
from fedplora.federation.heterogeneity import assign_budgets, group_sizes, round_budget


@pytest.mark.parametrize("argv,setting", [
    (["--clients", "3", "--clients-per-round", "5"], "clients_per_round"),
    (["--rank", "4", "--ranks", "2,8"], "ranks"),
    (["--method", "nope"], "method"),
    (["--task", "nope"], "task"),
    (["--rounds", "0"], "rounds"),
    (["--lr", "-1"], "lr"),
    (["--partitioner", "zipf"], "partitioner"),
    (["--ranks", "2,4", "--rank-shares", "1"], "rank_shares"),
    (["--model", "no_such_model_dir"], "model"),
    (["--data-dir", "/no/such/dir"], "data_dir"),
    (["--config", "/no/such.toml"], "--config"),
])
def test_bad_settings_fail_fast_naming_the_setting(argv, setting, capsys):
    assert main(["run", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and setting in err, err


def test_unknown_key_in_config_file(tmp_path, capsys):
    (tmp_path / "c.toml").write_text("rounds = 2\nlearning_rate = 0.1\n")
    assert main(["run", "--config", str(tmp_path / "c.toml")]) == 2
    assert "learning_rate" in capsys.readouterr().err


def test_flags_override_the_config_file(tmp_path):
    (tmp_path / "c.toml").write_text("rounds = 5\nseed = 3\nranks = [1, 2]\nrank_shares = [3, 1]\n")
    args = build_parser().parse_args(["run", "--config", str(tmp_path / "c.toml"), "--rounds", "2"])
    cfg = config_from_args(args)
    assert (cfg.rounds, cfg.seed, cfg.ranks, cfg.rank_shares) == (2, 3, [1, 2], [3.0, 1.0])
    again = RunConfig.from_toml(_write(tmp_path / "round.toml", cfg.to_toml()))
    assert again == cfg  # config.toml written to a run folder reads back identically


def _write(path, text):
    path.write_text(text)
    return path


def test_real_console_script_reports_one_line():
    exe = [sys.executable, "-m", "fedplora.cli", "run", "--clients", "2", "--clients-per-round", "3"]
    proc = subprocess.run(exe, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("fedplora: error: clients_per_round")


def test_heterogeneity_profile():
    assert group_sizes(10, [1, 1, 1]) == [4, 3, 3] or sorted(group_sizes(10, [1, 1, 1])) == [3, 3, 4]
    assert group_sizes(10, [6, 3, 1]) == [6, 3, 1]
    budgets = assign_budgets(10, [2, 4, 8], [6, 3, 1], seed=0)
    assert sorted(budgets) == [2] * 6 + [4] * 3 + [8]
    assert budgets == assign_budgets(10, [2, 4, 8], [6, 3, 1], seed=0)
    assert budgets != assign_budgets(10, [2, 4, 8], [6, 3, 1], seed=1)
    drops = [round_budget(8, [2, 4, 8], 0.5, 0, r, 3) for r in range(40)]
    assert set(drops) == {4, 8}
    assert round_budget(2, [2, 4, 8], 1.0, 0, 1, 0) == 1
    with pytest.raises(ConfigError, match="rank_shares"):
        RunConfig(ranks=[2, 4], rank_shares=[1.0]).validate()


# ------------------------------------------------------------ one declaration per setting
AWKWARD = ['say "hi"', "back\\slash\\", "two\nlines\r\n", "tab\there", "ünïcødé ✓ 😀",
           "del\x7f nul\x00 bell\x07", "'single' \"double\" '''triple'''", "#not a comment", "a = b",
           "[table]", "\\u0041 \\n literal", ""]


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_field_is_declared_once():
    names = [f.name for f in dataclasses.fields(RunConfig)]
    assert [s.name for s in SETTINGS] == names
    for f in dataclasses.fields(RunConfig):
        assert f.metadata["rule"].help, f"{f.name}: declare it with setting(default, help=...)"


@pytest.mark.parametrize("command", ["run", "compare", "deploy-local"])
def test_every_setting_has_a_cli_flag(command):
    parser = _subparsers()[command]
    by_dest = {a.dest: a for a in parser._actions}
    for f in dataclasses.fields(RunConfig):  # from the dataclass, so a new field without a flag fails here
        assert f.name in by_dest, f"{f.name}: no flag in `fedplora {command}`"
        spec = config_module.BY_NAME[f.name]
        assert set(spec.flags) <= set(by_dest[f.name].option_strings)
        assert all(flag.startswith("--") and flag == flag.lower() and "_" not in flag for flag in spec.flags)
        assert by_dest[f.name].help


def test_historic_flag_names_still_work():
    args = build_parser().parse_args(["run", "--clients", "6", "--ranks", "2,4", "--rank-shares", "3:1",
                                      "--targets", "query,value", "--clients-per-round", "3"])
    cfg = config_from_args(args)
    assert (cfg.num_clients, cfg.ranks, cfg.rank_shares, cfg.targets) == (6, [2, 4], [3.0, 1.0], ["query", "value"])
    assert config_from_args(build_parser().parse_args(["run", "--num-clients", "7"])).num_clients == 7
    assert config_from_args(build_parser().parse_args(["run", "--ranks", "2,4"])).rank_shares == [1.0, 1.0]


def _non_default(s):
    """A valid value different from the setting's default, as (CLI text, parsed value)."""
    samples = {"method": ("flora", "flora"), "task": ("bbc", "bbc"), "model": None, "data_dir": None,
               "dataset": ("org/name", "org/name"), "cache_dir": ("/tmp/c c", "/tmp/c c"),
               "rounds": ("3", 3), "num_clients": ("12", 12), "clients_per_round": ("3", 3), "seed": ("-4", -4),
               "rank": ("16", 16), "ranks": ("1,16", [1, 16]), "rank_shares": ("6:3", [6.0, 3.0]),
               "targets": ("q_proj,v_proj", ["q_proj", "v_proj"]), "min_replies": ("2", 2), "min_nodes": ("5", 5),
               "partition_column": ("category", "category"), "out": ("runs/x", "runs/x"),
               "max_update_norm": ("2.5", 2.5), "device": ("cpu", "cpu"), "client_gpus": ("0.25", 0.25),
               "gradient_checkpointing": ("", True),
               # a fraction the sampled aggregator (norm_clip) tolerates; local DP, which every method allows
               "byzantine_fraction": ("0.1", 0.1), "dp_mode": ("local", "local"),
               # an epoch count instead of steps; a schedule's floor below the (halved) lr
               "local_epochs": ("2", 2), "lr_min": ("0.0001", 1e-4),
               # a pool between clients_per_round (3) and num_clients (12), and at least min_nodes (5)
               "simulation_nodes": ("6", 6)}
    if s.name in samples:
        return samples[s.name]
    if s.rule.choices:
        value = next(c for c in s.allowed() if c != s.default)
        return value, value
    if s.type is int:
        return str(s.default + 2), s.default + 2
    if s.type is float:
        value = s.default / 2 if s.default else 0.5
        return repr(value), value
    raise AssertionError(f"{s.name}: add a sample value to this test")


def test_every_flag_sets_its_setting(tmp_path):
    argv, expected = ["run"], {}
    # a quantized base refuses fold=merge, target_epsilon chooses dp_noise_multiplier, secure aggregation refuses
    # flora and max_update_norm: checked on their own below
    apart = {"quantization", "target_epsilon", "secure_aggregation", "secure_shares", "secure_threshold",
             "secure_clip", "secure_quantization", "server_optimizer", "server_lr"}  # a server optimizer refuses flora
    for s in SETTINGS:
        if s.name in apart:
            continue
        sample = _non_default(s)
        if sample is None:  # a path that must exist
            sample = (str(tmp_path), str(tmp_path))
        argv += [s.flags[0]] + ([sample[0]] if s.type is not bool else [])
        expected[s.name] = sample[1]
    cfg = config_from_args(build_parser().parse_args(argv))
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert all(getattr(cfg, s.name) != s.default for s in SETTINGS if s.name not in apart)
    assert RunConfig.from_toml(_write(tmp_path / "all.toml", cfg.to_toml())) == cfg
    quantized = config_from_args(build_parser().parse_args(["run", "--quantization", "4bit"]))
    assert quantized.quantization == "4bit" and quantized.fold == "branch"
    with pytest.raises(ConfigError, match="fold: 'merge' adds pairs into the base weight"):
        config_from_args(build_parser().parse_args(["run", "--quantization", "8bit", "--fold", "merge"]))
    dp = ["run", "--dp-mode", "central", "--dp-clip", "1.5"]
    assert config_from_args(build_parser().parse_args(dp + ["--target-epsilon", "2.5"])).target_epsilon == 2.5
    with pytest.raises(ConfigError, match="not both"):
        config_from_args(build_parser().parse_args(dp + ["--target-epsilon", "2.5", "--dp-noise-multiplier", "1"]))
    secure = config_from_args(build_parser().parse_args(
        ["run", "--secure-aggregation", "--clients-per-round", "3", "--secure-shares", "0.5", "--secure-threshold",
         "0.9", "--secure-clip", "4", "--secure-quantization", "4096"]))
    assert (secure.secure_aggregation, secure.secure_shares, secure.secure_threshold, secure.secure_clip,
            secure.secure_quantization) == (True, 0.5, 0.9, 4.0, 4096)
    assert RunConfig.from_toml(_write(tmp_path / "secure.toml", secure.to_toml())) == secure
    adam = config_from_args(build_parser().parse_args(["run", "--server-optimizer", "adam", "--server-lr", "0.05"]))
    assert (adam.server_optimizer, adam.server_lr) == ("adam", 0.05)
    assert RunConfig.from_toml(_write(tmp_path / "adam.toml", adam.to_toml())) == adam
    with pytest.raises(ConfigError, match="server_optimizer: adam is not defined for flora: its clients train fresh"):
        config_from_args(build_parser().parse_args(["run", "--method", "flora", "--server-optimizer", "adam"]))
    with pytest.raises(ConfigError, match="server_lr: is set but server_optimizer is none"):
        config_from_args(build_parser().parse_args(["run", "--server-lr", "0.1"]))


def test_toml_round_trip_with_awkward_strings(tmp_path):
    import tomllib

    for text in AWKWARD:
        cfg = RunConfig(model=text, data_dir=text, dataset=text, cache_dir=text, partition_column=text, out=text,
                        targets=[text, "x"], method=text)
        toml = cfg.to_toml()
        assert tomllib.loads(toml)["model"] == text
        again = RunConfig.from_toml(_write(tmp_path / "awkward.toml", toml))
        assert again == cfg, text


def test_toml_round_trip_numbers(tmp_path):
    for value in (1e-05, 1e20, 0.1 + 0.2, 3.0, float("inf")):
        cfg = RunConfig(lr=value, alpha=value, max_update_norm=value)
        assert RunConfig.from_toml(_write(tmp_path / "n.toml", cfg.to_toml())) == cfg
    (tmp_path / "ints.toml").write_text("alpha = 16\nrank_shares = [3, 1]\n")
    cfg = RunConfig.from_toml(tmp_path / "ints.toml")
    assert isinstance(cfg.alpha, float) and all(isinstance(s, float) for s in cfg.rank_shares)
    assert RunConfig.from_toml(_write(tmp_path / "again.toml", cfg.to_toml())) == cfg


@pytest.mark.parametrize("s", [s for s in SETTINGS if s.rule.choices], ids=lambda s: s.name)
def test_each_allowed_values_setting_rejects_a_bad_value(s, capsys):
    assert main(["run", s.flags[0], "no-such-value"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert err.startswith(f"fedplora: error: {s.name}: must be ") and repr(s.allowed()[0]) in err, err
    assert s.flags[0] in err  # how to fix it


def _out_of_bounds(s):
    r = s.rule
    if r.ge is not None:
        return r.ge - 1
    if r.gt is not None:
        return r.gt
    if r.le is not None:
        return r.le + 1
    return r.lt


@pytest.mark.parametrize("s", [s for s in SETTINGS if s.type in (int, float) and _out_of_bounds(s) is not None],
                         ids=lambda s: s.name)
def test_each_bounded_setting_rejects_an_out_of_bounds_value(s):
    bad = _out_of_bounds(s)
    bad = s.type(bad) if not s.is_list else [s.type(bad)]
    with pytest.raises(ConfigError, match=f"^{s.name}: must be .*got") as e:
        RunConfig(**{s.name: bad}).validate()
    assert "\n" not in str(e.value)


def test_wrong_types_are_rejected_naming_the_setting(tmp_path):
    for line, name in [('rounds = "3"', "rounds"), ("rounds = 2.0", "rounds"), ("lr = true", "lr"),
                       ('ranks = "2,4"', "ranks"), ("ranks = [2, 4.5]", "ranks"), ("model = 3", "model"),
                       ("targets = []", "targets"), ('weighting = ["samples"]', "weighting")]:
        with pytest.raises(ConfigError, match=f"^{name}: "):
            RunConfig.from_toml(_write(tmp_path / "t.toml", line + "\n")).validate()


def test_adding_a_setting_is_one_declaration(tmp_path):
    """What a later `device` / `dtype` / boolean setting gets from its declaration alone."""

    @dataclasses.dataclass
    class Extra:
        device: str = setting("cpu", "where to train", choices=("cpu", "cuda"))
        compile: bool = setting(False, "torch.compile the model")
        scale: float | None = setting(None, "a bound", gt=0)

    specs = config_schema.settings_of(Extra)
    parser = argparse.ArgumentParser()
    add_setting_flags(parser, specs)
    args = parser.parse_args(["--device", "cuda", "--compile", "--scale", "2"])
    assert (args.device, args.compile, args.scale) == ("cuda", True, 2.0)
    assert parser.parse_args(["--no-compile"]).compile is False and parser.parse_args([]).compile is None
    device, flag, scale = specs
    assert device.problem("tpu") == "must be 'cpu' or 'cuda', got 'tpu' (--device)"
    assert flag.problem(1) and flag.problem(True) is None and scale.problem(None) is None
    assert config_schema.toml_value(True) == "true"

    @dataclasses.dataclass
    class Undeclared:
        x: int = 3

    with pytest.raises(TypeError, match="setting"):
        config_schema.settings_of(Undeclared)

    @dataclasses.dataclass
    class OptionalWithDefault:
        x: int | None = setting(3, "x")

    with pytest.raises(TypeError, match="defaults to None"):
        config_schema.settings_of(OptionalWithDefault)


# ------------------------------------------------------------ local path or hub name
def test_one_rule_for_local_path_or_hub_name(tmp_path, monkeypatch):
    from fedplora.paths import ref_kind
    from fedplora.tasks.models import check_model_ref

    (tmp_path / "file.json").write_text("[]")
    (tmp_path / "org" / "name").mkdir(parents=True)
    (tmp_path / "org" / "name" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    cases = {"file.json": "local", str(tmp_path): "local", "org/name": "local",  # an existing path wins
             "other/name": "hub", "nyu-mll/glue/sst2": "hub", "Org-1/model_v2.5": "hub",
             "bert": "missing", "./x/y": "missing", "../x/y": "missing", "/no/such": "missing",
             "~/no/such": "missing", "a/b/c/d": "missing", "nope/": "missing", "/org": "missing"}
    for ref, kind in cases.items():
        assert ref_kind(ref) == kind, ref
        # config validation and the model loader apply the same rule
        refused = kind == "missing"
        try:
            RunConfig(model=ref).validate()
            assert not refused, ref
        except ConfigError as e:
            assert refused and str(e).startswith("model: ")
            assert "neither an existing local path nor a hub name" in str(e)
        if refused:
            with pytest.raises(DataError, match="neither an existing local path nor a hub name"):
                check_model_ref(ref)
        elif kind == "hub":
            assert check_model_ref(ref) == ref
    assert check_model_ref("org/name") == "org/name"  # the local folder (cwd-relative), read from disk
    with pytest.raises(DataError, match="no config.json"):
        check_model_ref(str(tmp_path))
    with pytest.raises(ConfigError, match="^dataset: './x/y' is neither an existing file or folder"):
        RunConfig(dataset="./x/y").validate()


# ------------------------------------------------------------ one error base class
def test_errors_share_one_base_and_old_import_paths():
    import fedplora.federation.checkpoint as checkpoint
    import fedplora.methods as methods
    import fedplora.methods.base as methods_base
    import fedplora.tasks as tasks
    import fedplora.tasks.base as tasks_base

    assert config_module.ConfigError is ConfigError
    assert tasks.DataError is tasks_base.DataError is DataError
    assert checkpoint.CheckpointError is CheckpointError
    assert methods.UpdateRejected is methods_base.UpdateRejected is UpdateRejected
    for cls in (ConfigError, DataError, CheckpointError, UpdateRejected):
        assert issubclass(cls, FedploraError) and issubclass(cls, ValueError)


@pytest.mark.parametrize("cls", [FedploraError, ConfigError, DataError, CheckpointError, UpdateRejected])
@pytest.mark.parametrize("command", ["run", "compare"])
def test_cli_prints_one_line_for_each_error_class(cls, command, monkeypatch, capsys):
    import fedplora.cli as cli

    def fail(args):
        raise cls(f"{cls.__name__}: what is wrong; how to fix it")

    monkeypatch.setattr(cli, f"cmd_{command}", fail)
    assert main([command]) == 2
    assert capsys.readouterr().err == f"fedplora: error: {cls.__name__}: what is wrong; how to fix it\n"


def test_cli_keeps_the_traceback_of_a_bug(monkeypatch):
    import fedplora.cli as cli

    def bug(args):
        raise ValueError("a bug, not a user error")

    monkeypatch.setattr(cli, "cmd_run", bug)
    with pytest.raises(ValueError, match="a bug"):
        main(["run"])


def test_tasks_do_not_import_each_other_in_a_cycle():
    import ast
    from pathlib import Path

    source = Path(config_module.__file__).parent / "tasks" / "models.py"
    imported = {node.module for node in ast.walk(ast.parse(source.read_text()))
                if isinstance(node, ast.ImportFrom) and node.level == 1}
    assert "base" not in imported  # tasks.base imports tasks.models, never the other way round


def test_the_staged_flower_app_builds_the_same_fab_as_the_project_folder(tmp_path):
    """`fedplora run` hands `flwr run` a copy of the app (processes.app_folder) so that Flower does not walk
    the virtual environment and the runs; the FAB must be the one `flwr run .` builds from the project."""
    import io
    import tomllib
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    from fedplora.federation.processes import APP_FILES, PROJECT_ROOT, app_folder

    pyproject = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["flwr"]["app"]["fab-include"] == [f"fedplora/**/{p}" for p in APP_FILES]
    staged = build_fab_from_disk(app_folder(tmp_path))
    assert staged == build_fab_from_disk(PROJECT_ROOT)
    names = zipfile.ZipFile(io.BytesIO(staged)).namelist()
    assert {"pyproject.toml", "fedplora/federation/server_app.py", "fedplora/memory_model.json"} <= set(names)
    assert not [n for n in names if n.split("/")[0] not in ("fedplora", "pyproject.toml", ".info")]
