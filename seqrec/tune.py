"""Hyperparameter search: ``seqrec tune --config base.yaml --space space.yaml --trials N``.

An Optuna study over the options a space file names (their ``seqrec train`` flag names):

    lr: {low: 1e-4, high: 1e-2, log: true}   # float (log scale)
    num_blocks: [1, 2, 3]                    # categorical
    maxlen: {low: 50, high: 200, step: 50}   # int (both bounds ints)

Each trial trains the base config with the trial's values in its own run directory under
the study directory (``runs/tune-NAME/trial-NNNN``) and is scored by ``--select_metric`` on
the validation split; the test split is never evaluated while searching. Validations are
reported to the pruner, which can stop a trial early. A trial whose values do not fit
together (a ConfigError) or that diverges (a TrainingError) is recorded as failed with its
reason (user attr ``fail_reason``) and the search goes on.

``--trials N`` is the number of trials this process runs: several processes on one study add
up. The default storage is a SQLite file in the study directory (a stopped search resumes
where it was); ``--storage journal:PATH`` is Optuna's journal file, for several processes on
one machine; an RDB URL (``postgresql://...``, ``mysql://...``) serves several machines.

At its end each process writes, in the study directory: ``best.yaml`` (the base config plus
the best values, with its own train_dir: ``seqrec train --config best.yaml`` reproduces the
best trial), ``trials.csv`` (every trial) and, with matplotlib, ``history.png`` and
``importances.png``. ``seqrec tune --study NAME --storage URL --evaluate_best`` then
evaluates the best trial's checkpoint on the test split once and records the result as the
study's user attr ``best_test``.
"""
from __future__ import annotations

import argparse
import copy
import csv
import io
import math
import os
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import yaml

from . import checkpoint as ckpt
from . import tracking
from .callbacks import Callback
from .checkpoint import CheckpointError
from .config import (LEAVES, SECTIONS, Config, ConfigError, coerce, from_dict, parse_config, set_leaf,
                     to_dict, validate)
from .data import DataError
from .preemption import Preempted
from .trainer import TrainingError

INSTALL = "pip install 'seqrec[tune]'"
PRUNERS = ("median", "hyperband", "none")
# Options a trial may not set: where and how the run is kept, and what it is scored on.
NOT_SEARCHABLE = {"train_dir", "resume", "overwrite", "inference_only", "state_dict_path", "select_metric",
                  "tensorboard", "mlflow", "mlflow_experiment", "mlflow_log_model"}
FAILED_TRIAL_ERRORS = (ConfigError, TrainingError, CheckpointError)  # recorded; the search goes on
BEST_FILE, TRIALS_FILE, DB_FILE = "best.yaml", "trials.csv", "study.db"
PLOTS = {"history.png": "plot_optimization_history", "importances.png": "plot_param_importances"}


def say(msg: str) -> None:
    print(msg, flush=True)


def _optuna():
    try:
        import optuna
    except ImportError:
        raise ConfigError(f"seqrec tune needs optuna: {INSTALL}") from None
    return optuna


def _one_line(err: BaseException) -> str:
    text = (str(err).strip().splitlines() or [""])[0]
    return text or type(err).__name__


# ---------------------------------------------------------------- the space
def load_space(path: str | Path) -> dict[str, Any]:
    """Option name -> optuna distribution, checked against the config tree (one-line errors)."""
    _optuna()
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as err:
        raise ConfigError(f"{path}: cannot read space file ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{path}: expected a mapping of option names to distributions")
    flat: dict[str, Any] = {}
    for key, value in raw.items():  # flat, or grouped by config section like a config file
        if key in SECTIONS and key not in LEAVES and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    space = {}
    for name, spec in flat.items():
        where = f"{path}: {name}"
        if name not in LEAVES:
            raise ConfigError(f"{path}: unknown option '{name}' (not a seqrec train flag)")
        if name in NOT_SEARCHABLE:
            raise ConfigError(f"{where}: this option cannot be searched")
        _, _, typ = LEAVES[name]
        base = next((a for a in getattr(typ, "__args__", ()) if a is not type(None)), typ)
        if isinstance(spec, list):
            if not spec:
                raise ConfigError(f"{where}: empty list of choices")
            for choice in spec:
                if isinstance(choice, (list, dict)):
                    raise ConfigError(f"{where}: choices must be single values, got {choice!r}")
                coerce(name, choice, typ, where)
            space[name] = CategoricalDistribution(spec)
        elif isinstance(spec, dict):
            unknown = set(spec) - {"low", "high", "log", "step"}
            if unknown or not {"low", "high"} <= set(spec):
                raise ConfigError(f"{where}: a range is {{low, high[, step][, log]}}, got keys {sorted(spec)}")
            if base not in (int, float):
                raise ConfigError(f"{where}: a range needs a numeric option ({getattr(base, '__name__', base)} here)")
            bounds = {k: _number(spec[k], f"{where}.{k}") for k in ("low", "high", "step") if spec.get(k) is not None}
            log = coerce("log", spec.get("log", False), bool, f"{where}.log")
            try:
                if base is int:
                    if not all(float(v).is_integer() for v in bounds.values()):
                        raise ConfigError(f"{where}: '{name}' is an integer option; bounds and step must be integers")
                    space[name] = IntDistribution(int(bounds["low"]), int(bounds["high"]), log=log,
                                                  step=int(bounds.get("step", 1)))
                else:
                    step = bounds.get("step")
                    space[name] = FloatDistribution(float(bounds["low"]), float(bounds["high"]), log=log,
                                                    step=None if step is None else float(step))
            except ValueError as err:
                raise ConfigError(f"{where}: {_one_line(err)}") from None
        else:
            raise ConfigError(f"{where}: expected a list of choices or {{low, high}}, got {spec!r}")
    return space


def _number(value: Any, where: str) -> float | int:
    """YAML reads 1e-4 (no dot) as a string; accept it as a number."""
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if isinstance(value, (int, float)):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected a number, got {value!r}") from None


def suggest(trial, space: dict[str, Any]) -> dict[str, Any]:
    from optuna.distributions import CategoricalDistribution, IntDistribution
    params = {}
    for name, d in space.items():
        if isinstance(d, CategoricalDistribution):
            params[name] = trial.suggest_categorical(name, list(d.choices))
        elif isinstance(d, IntDistribution):
            params[name] = trial.suggest_int(name, d.low, d.high, step=d.step, log=d.log)
        else:
            params[name] = trial.suggest_float(name, d.low, d.high, step=d.step, log=d.log)
    return params


def trial_config(base: Config, params: dict[str, Any], train_dir: str | Path) -> Config:
    """The base config with a trial's values, in its own run directory (validated)."""
    cfg = copy.deepcopy(base)
    for name, value in params.items():
        set_leaf(cfg, name, value, f"trial value {name}")
    cfg.train.train_dir = str(train_dir)
    cfg.run.resume = False
    cfg.run.overwrite = False
    return validate(cfg)


# ---------------------------------------------------------------- the study
def open_storage(url: str):
    """A storage URL: ``journal:PATH`` (Optuna's journal file) or an RDB URL (sqlite, postgresql, mysql)."""
    optuna = _optuna()
    if url.startswith("journal:"):
        path = Path(url[len("journal:"):])
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            from optuna.storages.journal import JournalFileBackend
        except ImportError:  # optuna < 4.0
            from optuna.storages import JournalFileStorage as JournalFileBackend
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    except Exception as err:  # bad URL, missing driver, unreachable server
        raise ConfigError(f"--storage {url}: {_one_line(err)}") from None


def make_pruner(name: str, base: Config):
    optuna = _optuna()
    if name == "median":
        return optuna.pruners.MedianPruner()
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=base.train.eval_every,
                                              max_resource=max(base.train.num_epochs, base.train.eval_every))
    return optuna.pruners.NopPruner()


def open_study(name: str, storage, pruner=None, sampler=None, select_metric: str | None = None):
    """Create or load the study (maximised); safe when several workers start at once."""
    optuna = _optuna()
    for attempt in range(2):
        try:
            study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner,
                                        direction="maximize", load_if_exists=True)
            break
        except optuna.exceptions.DuplicatedStudyError:  # a race between two workers' create calls
            if attempt:
                raise
            time.sleep(0.2 + random.random())
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise ConfigError(f"study '{name}' minimises its objective; seqrec tune maximises --select_metric")
    if select_metric is not None:
        recorded = study.user_attrs.get("select_metric")
        if recorded is None:
            study.set_user_attr("select_metric", select_metric)
        elif recorded != select_metric:
            raise ConfigError(f"study '{name}' selects on {recorded}, not {select_metric}; pass "
                              f"--select_metric {recorded} or use another --study")
    return study


def load_study(name: str, storage):
    optuna = _optuna()
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise ConfigError(f"no study '{name}' in this storage") from None


class PruningReporter(Callback):
    """Reports each validation's select metric to the trial; prunes when the pruner says so."""

    def __init__(self, trial, metric: str):
        self.trial, self.metric = trial, metric

    def on_validation(self, trainer, row: dict) -> None:
        value = row.get(self.metric)
        if value is None or not math.isfinite(value):
            return
        self.trial.report(float(value), step=int(row["epoch"]))
        if self.trial.should_prune():
            import optuna
            raise optuna.TrialPruned(f"pruned at epoch {row['epoch']} ({self.metric} {value:.4f})")


def search(study, base: Config, space: dict[str, Any], study_dir: Path, trials: int,
           timeout: float | None = None) -> dict[str, int]:
    """Run `trials` trials (fewer if `timeout` seconds pass first: no trial starts after it)."""
    from optuna.trial import TrialState
    from .cli import run
    metric = base.eval.select_metric
    counts = {"complete": 0, "pruned": 0, "failed": 0}
    start = time.monotonic()
    for _ in range(trials):
        if timeout is not None and time.monotonic() - start >= timeout:
            say(f"tune: --timeout {timeout:g}s reached; no new trial")
            break
        trial = study.ask()
        run_dir = (study_dir / f"trial-{trial.number:04d}").resolve()
        trial.set_user_attr("run_dir", str(run_dir))
        began = time.monotonic()
        try:
            params = suggest(trial, space)
        except ValueError as err:  # e.g. a distribution other than the one the study has for this option
            study.tell(trial, state=TrialState.FAIL)
            raise ConfigError(f"the space does not fit study '{study.study_name}': {_one_line(err)}") from None
        say(f"tune: trial {trial.number} {_describe(params)}")
        try:
            cfg = trial_config(base, params, run_dir)
            if cfg.track.mlflow and not cfg.track.mlflow_experiment:
                cfg.track.mlflow_experiment = study_dir.resolve().name  # one experiment per study
            results = run(cfg, [PruningReporter(trial, metric)], test=False)
            value = results["valid"][metric]
            if not math.isfinite(value):
                raise TrainingError(f"{metric} is {value}")
        except FAILED_TRIAL_ERRORS as err:
            tracking.close_open("FAILED")
            trial.set_user_attr("fail_reason", _one_line(err))
            study.tell(trial, state=TrialState.FAIL)
            counts["failed"] += 1
            say(f"tune: trial {trial.number} failed: {_one_line(err)}")
            continue
        except BaseException as err:
            import optuna
            if isinstance(err, optuna.TrialPruned):
                tracking.close_open("KILLED")
                study.tell(trial, state=TrialState.PRUNED)
                counts["pruned"] += 1
                say(f"tune: trial {trial.number} {_one_line(err)}")
                continue
            # Bad data, a stop signal, Ctrl-C or a bug: the search itself stops.
            stopped = isinstance(err, (KeyboardInterrupt, Preempted))
            tracking.close_open("KILLED" if stopped else "FAILED")
            trial.set_user_attr("fail_reason", "interrupted" if isinstance(err, KeyboardInterrupt) else _one_line(err))
            study.tell(trial, state=TrialState.FAIL)
            raise
        trial.set_user_attr("best_epoch", results.get("best_epoch"))
        trial.set_user_attr("epochs", results.get("epochs"))
        study.tell(trial, value)
        counts["complete"] += 1
        say(f"tune: trial {trial.number} {metric} {value:.4f} (best epoch {results.get('best_epoch')}, "
            f"{time.monotonic() - began:.0f}s)")
    return counts


def _describe(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


# ---------------------------------------------------------------- outputs
def write_outputs(study, base: Config, study_dir: Path) -> None:
    """best.yaml, trials.csv and the plots of what this process sees of the study."""
    from optuna.trial import TrialState
    study_dir.mkdir(parents=True, exist_ok=True)
    ckpt.write_text_atomic(study_dir / TRIALS_FILE, trials_csv(study))
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if not complete:
        say(f"tune: no trial has completed: {BEST_FILE} not written")
        return
    best = study.best_trial
    cfg = copy.deepcopy(base)
    for name, value in best.params.items():
        set_leaf(cfg, name, value, f"trial {best.number}")
    cfg.train.train_dir = str(study_dir / "best")
    cfg.run.resume = cfg.run.overwrite = False
    header = (f"# seqrec tune: study '{study.study_name}', best of {len(complete)} completed trial(s): trial "
              f"{best.number}, {base.eval.select_metric} {best.value:.6g} (validation)\n"
              f"# {_describe(best.params)}\n# reproduce: seqrec train --config {study_dir / BEST_FILE}\n")
    ckpt.write_text_atomic(study_dir / BEST_FILE, header + yaml.safe_dump(to_dict(cfg), sort_keys=False))
    say(f"tune: best trial {best.number}: {base.eval.select_metric} {best.value:.4f} ({_describe(best.params)}); "
        f"wrote {study_dir / BEST_FILE}")
    write_plots(study, study_dir)


def trials_csv(study) -> str:
    """study.trials_dataframe() as CSV; the same columns without pandas."""
    try:
        import pandas  # noqa: F401
    except ImportError:
        return _trials_csv_plain(study)
    return study.trials_dataframe().to_csv(index=False)


def _trials_csv_plain(study) -> str:
    trials = study.get_trials(deepcopy=False)
    params = sorted({k for t in trials for k in t.params})
    attrs = sorted({k for t in trials for k in t.user_attrs})
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["number", "value", "datetime_start", "datetime_complete", "duration",
                     *(f"params_{k}" for k in params), *(f"user_attrs_{k}" for k in attrs), "state"])
    for t in trials:
        duration = t.datetime_complete - t.datetime_start if t.datetime_complete and t.datetime_start else ""
        writer.writerow([t.number, "" if t.value is None else t.value, t.datetime_start or "",
                         t.datetime_complete or "", duration, *(t.params.get(k, "") for k in params),
                         *(t.user_attrs.get(k, "") for k in attrs), t.state.name])
    return out.getvalue()


def write_plots(study, study_dir: Path) -> None:
    """Best effort: the optimisation history and parameter importances as PNGs."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from optuna.visualization import matplotlib as views
    except ImportError as err:
        say(f"tune: plots skipped ({_one_line(err)}; pip install matplotlib)")
        return
    for file, name in PLOTS.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # optuna marks these views experimental
                ax = getattr(views, name)(study)
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            fd, tmp = tempfile.mkstemp(dir=study_dir, prefix=f".{file}.", suffix=".tmp")
            os.close(fd)
            try:
                fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
                os.replace(tmp, study_dir / file)
            finally:
                Path(tmp).unlink(missing_ok=True)
                plt.close(fig)
        except Exception as err:  # e.g. importances need two completed trials
            say(f"tune: {file} skipped ({_one_line(err)})")


# ---------------------------------------------------------------- the test split, once
def evaluate_best(study) -> dict:
    """Evaluate the best trial's best.pt on the test split and record it as the study's user
    attr ``best_test``; a best trial already evaluated is reported, not evaluated again."""
    from .cli import run
    from optuna.trial import TrialState
    if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        raise ConfigError(f"study '{study.study_name}' has no completed trial to evaluate")
    best = study.best_trial
    recorded = study.user_attrs.get("best_test")
    if recorded and recorded.get("trial") == best.number:
        say(f"tune: trial {best.number} was evaluated on the test split already: {_metrics(recorded['test'])}")
        return recorded
    path = Path(best.user_attrs.get("run_dir", "")) / ckpt.BEST
    state = ckpt.load(path)
    cfg = from_dict(state["config"], str(path))
    cfg.run.inference_only, cfg.run.state_dict_path = True, str(path)
    cfg.run.resume = cfg.run.overwrite = False
    say(f"tune: evaluating trial {best.number} ({path}) on the test split")
    results = run(validate(cfg))
    record = {"trial": best.number, "checkpoint": str(path), "select_metric": cfg.eval.select_metric,
              "valid": results["valid"], "test": results["test"]}
    study.set_user_attr("best_test", record)
    say(f"tune: trial {best.number} test {_metrics(results['test'])} (recorded as study user attr best_test)")
    return record


def _metrics(metrics: dict) -> str:
    from .evaluate import format_metrics
    return format_metrics(metrics)


# ---------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seqrec tune", allow_abbrev=False, description="Hyperparameter search with Optuna over seqrec train options.",
        epilog="Other flags are seqrec train flags applied to the base config (e.g. --num_epochs 20 "
               "--select_metric full/NDCG@10). See docs/TUNING.md.")
    parser.add_argument("--config", help="base config YAML (seqrec train --config); trial values override it")
    parser.add_argument("--space", help="YAML: option name -> [choices] or {low, high[, step][, log]}")
    parser.add_argument("--trials", type=int, default=0, help="trials this process runs (processes add up)")
    parser.add_argument("--study", help="study name (default: the --config file's stem, else the --space file's)")
    parser.add_argument("--study_dir", help="trial run directories and outputs (default: runs/tune-STUDY)")
    parser.add_argument("--storage", help=f"Optuna storage: an RDB URL (sqlite:///..., postgresql://...) or "
                                          f"journal:PATH (default: sqlite in the study dir, {DB_FILE})")
    parser.add_argument("--timeout", type=float, help="start no trial after this many seconds")
    parser.add_argument("--pruner", choices=PRUNERS, default="median", help="stop unpromising trials early")
    parser.add_argument("--sampler_seed", type=int, help="seed of the TPE sampler (give each worker its own)")
    parser.add_argument("--evaluate_best", action="store_true",
                        help="evaluate the best trial's checkpoint on the test split once and record it")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (CheckpointError, TrainingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except Preempted as err:
        print(f"stopped: {err}; rerun the same command to continue the study", file=sys.stderr)
        return 128 + err.signum
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to continue the study", file=sys.stderr)
        return 130


def _main(argv: list[str]) -> int:
    args, rest = build_parser().parse_known_args(argv)
    if args.trials < 0:
        raise ConfigError(f"--trials must be >= 0, got {args.trials}")
    if not args.trials and not args.evaluate_best:
        raise ConfigError("nothing to do: give --trials N (with --config/--space) and/or --evaluate_best")
    optuna = _optuna()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = args.study or next((Path(p).stem for p in (args.config, args.space) if p), None)
    if not name:
        raise ConfigError("name the study: --study NAME (or give --config)")
    study_dir = Path(args.study_dir or Path("runs") / f"tune-{name}")
    if args.storage is None:
        if not args.trials and not (study_dir / DB_FILE).exists():
            raise ConfigError(f"no study database {study_dir / DB_FILE}; pass --storage URL (and --study NAME)")
        study_dir.mkdir(parents=True, exist_ok=True)
    url = args.storage or f"sqlite:///{(study_dir / DB_FILE).resolve()}"
    storage = open_storage(url)
    if args.trials:
        if not args.space:
            raise ConfigError("--trials needs --space FILE")
        space = load_space(args.space)
        base = parse_config((["--config", args.config] if args.config else []) + rest, prog="seqrec tune")
        study_dir.mkdir(parents=True, exist_ok=True)
        sampler = optuna.samplers.TPESampler(seed=args.sampler_seed)
        study = open_study(name, storage, make_pruner(args.pruner, base), sampler, base.eval.select_metric)
        say(f"tune: study '{name}' ({url}): {len(study.trials)} trial(s) so far; running {args.trials} "
            f"in {study_dir}")
        try:
            counts = search(study, base, space, study_dir, args.trials, args.timeout)
            say(f"tune: this process ran {counts['complete']} completed, {counts['pruned']} pruned and "
                f"{counts['failed']} failed trial(s)")
        finally:
            try:
                write_outputs(study, base, study_dir)
            except Exception as err:  # never hide why the search stopped
                say(f"tune: outputs not written ({_one_line(err)})")
    elif rest:
        raise ConfigError(f"unrecognized arguments: {' '.join(rest)}")
    if args.evaluate_best:
        evaluate_best(load_study(name, storage))
    return 0


if __name__ == "__main__":
    sys.exit(main())
