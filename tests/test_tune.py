"""seqrec tune on real Optuna storages: tiny trials of 1-2 epochs on generated data."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, write_interactions
from seqrec import tune
from seqrec.cli import console
from seqrec.config import ConfigError, parse_config, to_dict

optuna = pytest.importorskip("optuna")
from optuna.trial import TrialState  # noqa: E402

BASE = {"maxlen": 20, "hidden_units": 16, "num_blocks": 1, "num_heads": 2, "time": False, "mhc": False,
        "batch_size": 16, "num_epochs": 2, "eval_every": 1, "warmup_steps": 2, "device": "cpu",
        "eval_negatives": 20, "eval_batch_size": 32}


@pytest.fixture
def setup(tmp_path, monkeypatch):
    """A data file, a base config and a space file in a fresh working directory."""
    monkeypatch.chdir(tmp_path)
    data = write_interactions(tmp_path / "toy.txt", num_users=40)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"data_path": str(data), **BASE}))
    (tmp_path / "space.yaml").write_text("lr: {low: 1e-4, high: 1e-2, log: true}\nnum_blocks: [1, 2]\n")
    return tmp_path


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def trials_of(url: str, name: str):
    return optuna.load_study(study_name=name, storage=tune.open_storage(url)).get_trials()


def test_space_file_forms_and_errors(tmp_path):
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
    space = tune.load_space(write(tmp_path / "s.yaml", (
        "lr: {low: 1e-4, high: 1e-2, log: true}\n"      # YAML reads 1e-4 as a string
        "num_blocks: [1, 2, 3]\n"
        "maxlen: {low: 50, high: 200, step: 50}\n"
        "dropout_rate: {low: 0, high: 0.5}\n"
        "model: {norm_first: [true, false]}\n")))
    assert space["lr"] == FloatDistribution(1e-4, 1e-2, log=True)
    assert space["num_blocks"] == CategoricalDistribution([1, 2, 3])
    assert space["maxlen"] == IntDistribution(50, 200, step=50)
    assert space["dropout_rate"] == FloatDistribution(0.0, 0.5)
    assert space["norm_first"] == CategoricalDistribution([True, False])
    bad = {
        "hidden_unit: [16, 32]\n": "unknown option 'hidden_unit'",
        "train_dir: [a, b]\n": "cannot be searched",
        "num_blocks: {low: 1.5, high: 3}\n": "integer option",
        "loss: {low: 1, high: 2}\n": "numeric option",
        "lr: {low: 1e-2, high: 1e-4}\n": "lr",
        "num_blocks: [1, two]\n": "expects int",
        "lr: 0.1\n": "list of choices",
        "lr: {low: 0.1}\n": "a range is",
    }
    for text, message in bad.items():
        with pytest.raises(ConfigError, match=message) as err:
            tune.load_space(write(tmp_path / "bad.yaml", text))
        assert "\n" not in str(err.value)


def test_unknown_option_is_a_one_line_error(setup, capsys):
    write(setup / "bad.yaml", "learning_rate: [0.1]\n")
    assert console(["tune", "--config", "base.yaml", "--space", "bad.yaml", "--trials", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown option 'learning_rate'" in err[0]
    assert console(["tune"]) == 2  # nothing to do


def test_search_failed_trials_best_yaml_csv_and_test_split_once(setup, capsys):
    url = f"sqlite:///{setup / 'runs' / 'tune-base' / 'study.db'}"
    (setup / "runs" / "tune-base").mkdir(parents=True)
    write(setup / "space.yaml", "num_heads: [2, 3]\nlr: {low: 1e-3, high: 1e-2, log: true}\n")
    study = tune.open_study("base", tune.open_storage(url), select_metric="sampled/NDCG@10")
    study.enqueue_trial({"num_heads": 3, "lr": 0.005})  # 16 is not divisible by 3: a ConfigError
    study.enqueue_trial({"num_heads": 2, "lr": 0.005})
    study.enqueue_trial({"num_heads": 2, "lr": 0.002})
    assert console(["tune", "--config", "base.yaml", "--space", "space.yaml", "--trials", "3",
                    "--pruner", "none"]) == 0
    study_dir = setup / "runs" / "tune-base"
    trials = trials_of(url, "base")
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert "divisible by num_heads" in trials[0].user_attrs["fail_reason"]
    for t in trials[1:]:
        run_dir = Path(t.user_attrs["run_dir"])
        assert run_dir.parent == study_dir.resolve() and run_dir.name == f"trial-{t.number:04d}"
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert not [r for r in metrics if r["type"] == "test"], "the search never evaluates the test split"
        results = json.loads((run_dir / "results.json").read_text())
        assert "test" not in results and results["valid"]["sampled/NDCG@10"] == pytest.approx(t.value)
        assert [r["epoch"] for r in metrics if r["type"] == "valid"] == list(t.intermediate_values)

    best = max(trials[1:], key=lambda t: t.value)
    best_cfg = parse_config(["--config", str(study_dir / "best.yaml")])
    trial_cfg = parse_config(["--config", str(Path(best.user_attrs["run_dir"]) / "config.yaml")])
    assert best_cfg.train.train_dir == str(Path("runs") / "tune-base" / "best")
    assert not best_cfg.run.overwrite and not best_cfg.run.resume
    for cfg in (best_cfg, trial_cfg):
        cfg.train.train_dir, cfg.run.overwrite = None, False
    assert to_dict(best_cfg) == to_dict(trial_cfg)
    assert best_cfg.train.lr == best.params["lr"] and best_cfg.model.num_heads == 2

    csv_lines = (study_dir / "trials.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 4 and "params_lr" in csv_lines[0] and "FAIL" in csv_lines[1]
    assert (study_dir / "history.png").exists() and (study_dir / "importances.png").exists()
    assert "failed: hidden_units (16) must be divisible by num_heads (3)" in capsys.readouterr().out

    # The test split, once, from the best trial's checkpoint; recorded on the study.
    assert console(["tune", "--study", "base", "--storage", url, "--evaluate_best"]) == 0
    record = optuna.load_study(study_name="base", storage=url).user_attrs["best_test"]
    assert record["trial"] == best.number and "sampled/NDCG@10" in record["test"]
    assert record["valid"]["sampled/NDCG@10"] == pytest.approx(best.value)
    assert console(["tune", "--study", "base", "--storage", url, "--evaluate_best"]) == 0
    assert "evaluated on the test split already" in capsys.readouterr().out


def test_stopped_search_resumes_from_sqlite_and_numbering_continues(setup, monkeypatch, capsys):
    args = ["tune", "--config", "base.yaml", "--space", "space.yaml", "--pruner", "none"]
    assert console([*args, "--trials", "1"]) == 0
    from seqrec import cli
    real_run = cli.run

    def interrupted(cfg, callbacks=(), test=True):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "run", interrupted)
    assert console([*args, "--trials", "2"]) == 130  # Ctrl-C during the second trial
    monkeypatch.setattr(cli, "run", real_run)
    assert console([*args, "--trials", "1"]) == 0
    trials = trials_of(f"sqlite:///{setup / 'runs' / 'tune-base' / 'study.db'}", "base")
    assert [t.number for t in trials] == [0, 1, 2]
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].user_attrs["fail_reason"] == "interrupted"
    assert (setup / "runs" / "tune-base" / "best.yaml").exists()


def test_pruned_trial_stops_at_its_first_validation(setup):
    base = parse_config(["--config", "base.yaml", "--num_epochs", "3"])
    space = tune.load_space("space.yaml")
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=2.0))
    counts = tune.search(study, base, space, setup / "study", trials=1)
    (trial,) = study.get_trials()
    assert counts["pruned"] == 1 and trial.state == TrialState.PRUNED
    assert list(trial.intermediate_values) == [1]
    rows = [json.loads(line) for line in (Path(trial.user_attrs["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert [r["type"] for r in rows if r["type"] in ("valid", "test")] == ["valid"]


def test_two_workers_share_a_journal_study(setup):
    journal = setup / "journal.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "seqrec.cli", "tune", "--config", "base.yaml", "--space", "space.yaml",
           "--storage", f"journal:{journal}", "--study", "shared", "--study_dir", "study", "--num_epochs", "1"]
    workers = [subprocess.Popen([*cmd, "--trials", str(n), "--sampler_seed", str(n)], env=env, cwd=setup,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for n in (2, 3)]
    outputs = [w.communicate(timeout=240)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    trials = trials_of(f"journal:{journal}", "shared")
    numbers = [t.number for t in trials]
    assert sorted(numbers) == list(range(5)) and len(set(numbers)) == 5
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert len({t.user_attrs["run_dir"] for t in trials}) == 5
    assert (setup / "study" / "best.yaml").exists()


def test_trials_csv_without_pandas(monkeypatch):
    study = optuna.create_study(direction="maximize")
    study.optimize(lambda t: t.suggest_float("lr", 1e-3, 1e-2), n_trials=2)
    study.tell(study.ask(), state=TrialState.FAIL)
    with_pandas = tune.trials_csv(study).splitlines()
    monkeypatch.setitem(sys.modules, "pandas", None)
    plain = tune.trials_csv(study).splitlines()
    assert len(plain) == len(with_pandas) == 4
    assert plain[0].split(",") == with_pandas[0].split(",")
    assert plain[3].endswith("FAIL")
