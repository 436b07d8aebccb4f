"""Experiment tracking: TensorBoard and MLflow sinks fed by the trainer's callbacks.

metrics.jsonl stays the source of truth; a sink copies each row the trainer writes there
(seqrec.callbacks) to a tracker, on the main rank only. ``--tensorboard`` writes event
files into the run directory; ``--mlflow URI`` logs to an MLflow store or server. Both need
``pip install 'seqrec[track]'``.

Names: train and step rows go to ``train/loss``, ``train/lr``, ``train/seq_per_s``,
``train/seconds`` (per-rank lists as ``train/NAME/RANK``), validation rows under their
metrics.jsonl names (``sampled/NDCG@10``, ``full/Recall@20``, ``mhc/gain_row``), and at the
end the best checkpoint's scores as ``best/NAME`` and ``test/NAME`` with ``best_epoch``. The
x axis is the optimizer step. MLflow rejects ``@`` in metric names, so there it becomes
``_at_`` (``sampled/NDCG_at_10``); TensorBoard keeps the names as they are.

A tracker that is down or misconfigured is reported once, in one line, and its sink turns
itself off: training goes on and metrics.jsonl is complete.
"""
from __future__ import annotations

import atexit
import os
import re
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

from . import distributed as dist
from . import provenance
from .callbacks import Callback
from .config import Config, ConfigError, to_dict
from .trainer import log

RUN_ID_FILE = "mlflow_run_id"  # the MLflow run a resume continues (deleted by --overwrite)
INSTALL = "pip install 'seqrec[track]'"
# Run-control flags that differ between a start and its resume by design: not "changes".
RESUME_CONTROL = ("resume", "overwrite")
# Few, short retries: a tracker that is down must not hold training up (set only if unset).
MLFLOW_ENV_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}
_SKIPPED_KEYS = ("type", "epoch", "step")

_open: set[_Sink] = set()  # sinks with a live run, closed at exit if training never ended
_atexit_registered = False


def from_config(cfg: Config, run_dir: Path) -> list[Callback]:
    """The sinks `cfg.track` asks for; a missing library is a one-line ConfigError."""
    t = cfg.track
    sinks: list[Callback] = []
    if t.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise ConfigError(f"--tensorboard needs the tensorboard package: {INSTALL}") from None
        sinks.append(TensorBoardSink(run_dir))
    if t.mlflow:
        try:
            import mlflow  # noqa: F401
        except ImportError:
            raise ConfigError(f"--mlflow needs the mlflow package: {INSTALL}") from None
        sinks.append(MLflowSink(cfg, run_dir))
    elif t.mlflow_experiment or t.mlflow_log_model:
        raise ConfigError("--mlflow_experiment and --mlflow_log_model need --mlflow URI")
    return sinks


def close_open(status: str = "KILLED") -> None:
    """End every sink whose run did not reach on_train_end (a run that raised), marking
    MLflow runs `status` (KILLED, FAILED). The tuner calls it after a pruned or failed
    trial; at interpreter exit it runs with KILLED."""
    for sink in list(_open):
        sink.close(status)


def _register(sink: _Sink) -> None:
    global _atexit_registered
    _open.add(sink)
    if not _atexit_registered:
        atexit.register(close_open, "KILLED")
        _atexit_registered = True


def mlflow_name(name: str) -> str:
    """A metric name MLflow accepts: '@' -> '_at_', other characters it rejects -> '_'."""
    return re.sub(r"[^0-9A-Za-z_\-. :/]", "_", name.replace("@", "_at_"))


def scalars(row: dict, prefix: str = "") -> dict[str, float]:
    """The numeric fields of a metrics row (per-rank lists as NAME/RANK), bookkeeping keys left out."""
    out = {}
    for key, value in row.items():
        if key in _SKIPPED_KEYS or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out[prefix + key] = float(value)
        elif isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                      for v in value):
            out.update({f"{prefix}{key}/{i}": float(v) for i, v in enumerate(value)})
    return out


def row_scalars(row: dict) -> dict[str, float]:
    """Train and step rows under train/, validation rows under their own names."""
    return scalars(row, "train/" if row.get("type") in ("train", "step") else "")


def result_scalars(results: dict) -> dict[str, float]:
    """on_train_end's results: the best checkpoint's validation (best/) and test (test/) scores."""
    out = {"best_epoch": float(results.get("best_epoch", 0))}
    for split, prefix in (("valid", "best/"), ("test", "test/")):
        if isinstance(results.get(split), dict):
            out.update(scalars(results[split], prefix))
    return out


def variant(cfg: Config) -> str:
    return ("tisasrec" if cfg.model.time else "sasrec") + ("+mhc" if cfg.model.mhc else "")


def flat_params(cfg: Config) -> dict[str, str]:
    """The resolved config by flag name (leaf names are unique across sections), as strings."""
    return {name: str(value) for section in to_dict(cfg).values() for name, value in section.items()}


def _one_line(err: BaseException, limit: int = 300) -> str:
    text = (str(err).strip().splitlines() or [""])[0]
    text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


class _Sink(Callback):
    """A callback that reports its first failure in one line and then does nothing."""
    label = "tracker"

    def __init__(self) -> None:
        self.disabled = False

    def _guard(self, fn, *args) -> bool:
        if self.disabled or not dist.is_main():
            return False
        try:
            fn(*args)
            return True
        except Exception as err:  # a tracker must never stop training
            self.disabled = True
            _open.discard(self)
            log(f"warning: {self.label}: {_one_line(err)}; {self.label} logging is off for this run "
                f"(metrics.jsonl is complete)")
            return False

    def close(self, status: str = "KILLED") -> None:
        _open.discard(self)


class TensorBoardSink(_Sink):
    """Event files in the run directory (`tensorboard --logdir runs/` shows one line per run).

    A fresh run removes the old run's event files; a resumed one purges the events past its
    checkpoint (SummaryWriter's purge_step), which the resumed run logs again.
    """
    label = "tensorboard"

    def __init__(self, run_dir: Path):
        super().__init__()
        self.run_dir = Path(run_dir)
        self.writer = None

    def on_train_start(self, trainer, row: dict) -> None:
        self._guard(self._start, trainer, row)

    def _start(self, trainer, row: dict) -> None:
        from torch.utils.tensorboard import SummaryWriter
        if not row.get("resumed"):
            for old in self.run_dir.glob("events.out.tfevents.*"):
                old.unlink()
        self.writer = SummaryWriter(str(self.run_dir), purge_step=trainer.step + 1 if row.get("resumed") else None)
        if not row.get("resumed"):
            import yaml
            self.writer.add_text("config", "```\n" + yaml.safe_dump(to_dict(trainer.cfg), sort_keys=False) + "```", 0)
        _register(self)

    def _write(self, values: dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def on_step_logged(self, trainer, row: dict) -> None:
        self._guard(self._write, row_scalars(row), row.get("step", trainer.step))

    def on_validation(self, trainer, row: dict) -> None:
        self._guard(self._write, row_scalars(row), trainer.step)

    def on_train_end(self, trainer, row: dict) -> None:
        self._guard(self._write, result_scalars(row), trainer.step)
        self.close()

    def close(self, status: str = "KILLED") -> None:
        super().close(status)
        if self.writer is not None:
            writer, self.writer = self.writer, None
            try:
                writer.close()
            except Exception:
                pass


def artifact_location(uri: str, run_dir: Path, experiment: str) -> str | None:
    """Where a new experiment keeps its files: beside a SQLite store, under the run
    directory's parent for other databases, and the store's or server's own choice
    otherwise (MLflow's default for databases is ./mlruns in the current directory)."""
    scheme = urlparse(uri).scheme.split("+")[0].lower()
    folder = re.sub(r"[^0-9A-Za-z_.-]", "_", experiment) or "experiment"
    if scheme == "sqlite":
        db = uri.split(":///", 1)[1] if ":///" in uri else ""
        if not db or db.startswith(":memory:"):
            root = Path(run_dir).resolve().parent
        else:
            root = Path(db).resolve().parent
        return (root / "mlartifacts" / folder).as_uri()
    if scheme in ("postgresql", "postgres", "mysql", "mssql", "oracle"):
        return (Path(run_dir).resolve().parent / "mlartifacts" / folder).as_uri()
    return None


def _is_file_store(uri: str) -> bool:
    scheme = urlparse(uri).scheme
    return scheme == "file" or scheme == "" or (len(scheme) == 1 and os.name == "nt")


class MLflowSink(_Sink):
    """One MLflow run per seqrec run: params once (the flattened config), metrics per row,
    tags, and at the end config.yaml, results.json, metrics.jsonl, curves.png (with
    matplotlib) and, with --mlflow_log_model, best.pt. A resume continues the run whose id
    is in RUN_DIR/mlflow_run_id; settings changed since it was created become tags
    ``changed.NAME`` (params cannot change)."""
    label = "mlflow"

    def __init__(self, cfg: Config, run_dir: Path):
        super().__init__()
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.uri = cfg.track.mlflow
        self.experiment = cfg.track.mlflow_experiment or self.run_dir.resolve().name
        self.client = None
        self.run_id: str | None = None

    # ------------------------------------------------------------ run
    def on_train_start(self, trainer, row: dict) -> None:
        self._guard(self._start, trainer, row)

    def _start(self, trainer, row: dict) -> None:
        for key, value in MLFLOW_ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)
        if _is_file_store(self.uri):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses file stores otherwise
        from mlflow.tracking import MlflowClient
        self.client = MlflowClient(tracking_uri=self.uri)
        params = flat_params(self.cfg)
        run = self._previous_run() if row.get("resumed") else None
        tags = self._tags(trainer)
        if run is None:
            experiment_id = self._experiment_id()
            run = self.client.create_run(experiment_id, run_name=self.run_dir.resolve().name, tags=tags)
            self.run_id = run.info.run_id
            from mlflow.entities import Param
            items = [Param(k, v) for k, v in params.items()]
            for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.run_id, params=items[i:i + 100])
            from .checkpoint import write_text_atomic
            write_text_atomic(self.run_dir / RUN_ID_FILE, self.run_id + "\n")
        else:
            self.run_id = run.info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            logged = run.data.params
            changed = {f"changed.{name}": f"{logged.get(name)} -> {value} (resumed at step {trainer.step})"
                       for name, value in params.items()
                       if name not in RESUME_CONTROL and logged.get(name) != value}
            self._set_tags({**tags, **changed, "resumed_at_step": str(trainer.step)})
        _register(self)

    def _previous_run(self):
        path = self.run_dir / RUN_ID_FILE
        if not path.exists():
            return None
        run_id = path.read_text().strip()
        try:
            run = self.client.get_run(run_id)
        except Exception as err:
            log(f"note: mlflow: run {run_id} of {path} is not in {self.uri} ({_one_line(err, 120)}); "
                f"starting a new MLflow run")
            return None
        if run.info.lifecycle_stage == "deleted":
            log(f"note: mlflow: run {run_id} was deleted; starting a new MLflow run")
            return None
        return run

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException
        experiment = self.client.get_experiment_by_name(self.experiment)
        if experiment is None:
            try:
                return self.client.create_experiment(
                    self.experiment, artifact_location=artifact_location(self.uri, self.run_dir, self.experiment))
            except MlflowException:  # another process created it first
                experiment = self.client.get_experiment_by_name(self.experiment)
                if experiment is None:
                    raise
        if experiment.lifecycle_stage == "deleted":
            raise ConfigError(f"experiment '{self.experiment}' is deleted in {self.uri}: restore it or pass "
                              f"another --mlflow_experiment")
        return experiment.experiment_id

    def _tags(self, trainer) -> dict[str, str]:
        amp = getattr(trainer, "amp_dtype", None)
        tags = {"variant": variant(self.cfg), "world_size": str(dist.world_size()),
                "device": str(trainer.device), "device_name": provenance.device_name(trainer.device),
                "amp": {"torch.bfloat16": "bf16", "torch.float16": "fp16"}.get(str(amp), "off"),
                "run_dir": str(self.run_dir.resolve()), "mlflow.source.name": "seqrec"}
        try:
            import torch
            tags["torch"] = torch.__version__
        except ImportError:  # pragma: no cover
            pass
        versions = [v for v in provenance.code_versions(self.run_dir) if v != "?"]
        if versions:
            tags["git_commit"] = versions[-1]
            tags["mlflow.source.git.commit"] = versions[-1].removesuffix("-dirty")
            if len(versions) > 1:
                tags["git_commits"] = ",".join(versions)
        return tags

    def _set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag
        items = [RunTag(k, v) for k, v in tags.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, tags=items[i:i + 100])

    # ------------------------------------------------------------ metrics
    def _log(self, values: dict[str, float], step: int) -> None:
        if self.run_id is None or not values:
            return
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        metrics = [Metric(mlflow_name(k), v, now, int(step)) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def on_step_logged(self, trainer, row: dict) -> None:
        values = row_scalars(row)
        if row.get("type") == "train":
            values["epoch"] = float(row["epoch"])
        self._guard(self._log, values, row.get("step", trainer.step))

    def on_validation(self, trainer, row: dict) -> None:
        self._guard(self._log, row_scalars(row), trainer.step)

    def on_train_end(self, trainer, row: dict) -> None:
        if self._guard(self._log, result_scalars(row), trainer.step):
            try:
                self._artifacts()
            except Exception as err:  # the run's metrics are in; only files are missing
                log(f"warning: mlflow: artifacts not stored ({_one_line(err)})")
            self._guard(self._finish)
        _open.discard(self)

    def _finish(self) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, "FINISHED")

    def _artifacts(self) -> None:
        names = ["config.yaml", "results.json", "metrics.jsonl"]
        if self.cfg.track.mlflow_log_model:
            names.append("best.pt")
        for name in names:
            if (self.run_dir / name).exists():
                self.client.log_artifact(self.run_id, str(self.run_dir / name))
        with tempfile.TemporaryDirectory() as tmp:
            png = self._curves(Path(tmp))
            if png is not None:
                self.client.log_artifact(self.run_id, str(png))

    def _curves(self, folder: Path) -> Path | None:
        """curves.png from metrics.jsonl (seqrec.plot); None without matplotlib."""
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return None
        from . import plot
        rows = plot.read_rows(self.run_dir)
        present = {k for r in rows if r.get("type") == "valid" for k in r}
        wanted = (self.cfg.eval.select_metric, *plot.DEFAULT_METRICS, "mhc/gain_row")
        metrics = tuple(m for m in dict.fromkeys(wanted) if m in present)
        out = plot.plot([self.run_dir], folder / "curves.png", metrics)
        import matplotlib.pyplot as plt
        plt.close("all")
        return out

    def close(self, status: str = "KILLED") -> None:
        """End a run that raised (pruned, failed, interrupted) with `status`."""
        super().close(status)
        if self.run_id is not None and not self.disabled and self.client is not None:
            try:
                self.client.set_terminated(self.run_id, status)
            except Exception:
                pass
