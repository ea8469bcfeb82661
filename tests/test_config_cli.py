import subprocess
import sys

import pytest

from fedplora.cli import main
from fedplora.config import ConfigError, RunConfig
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
    from fedplora.cli import build_parser, config_from_args

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
