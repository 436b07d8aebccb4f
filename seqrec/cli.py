"""Command-line entry points.

``python main.py [flags]`` and ``seqrec train [flags]`` train (and, with
``--inference_only``, only evaluate); ``seqrec evaluate`` evaluates a checkpoint;
``seqrec recommend`` serves top-k items from a checkpoint; ``seqrec export`` writes its
top-k model as a torch.export .pt2 (or ONNX, TorchScript); ``seqrec tune`` searches
hyperparameters; ``seqrec envcheck`` checks the distributed environment; ``seqrec bench``
measures speed and memory. Expected failures (bad
config, bad data, unusable checkpoint, diverged run) end with one line on stderr
and a non-zero exit code instead of a traceback.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import yaml

from . import checkpoint as ckpt
from . import distributed as dist
from . import hostmem, provenance, tracking
from .callbacks import Callback, CompositeGain
from .checkpoint import CheckpointError
from .config import Config, ConfigError, DistConfig, TrainConfig, check_with_data, parse_config, to_dict
from .data import DataError, Sequences, SequenceTensors, load_sequences, resolve_path, sequences
from .devices import resolve_device
from .evaluate import evaluate, format_metrics
from .models import Popularity, build_model
from .preemption import Preempted
from .runlock import RunLock
from .trainer import Trainer, TrainingError, log

RUN_STATE_FILES = (ckpt.LATEST, ckpt.BEST, "metrics.jsonl", "results.json")
RUN_FILES = (*RUN_STATE_FILES, "config.yaml", sequences.FILE, provenance.FILE, tracking.RUN_ID_FILE)


def configure_backends(t: TrainConfig, device: torch.device) -> None:
    """Process-wide numerics switches, set once before any model or cuBLAS handle exists."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = t.tf32
        torch.backends.cudnn.allow_tf32 = t.tf32
    if t.deterministic:
        # cuBLAS reads its workspace setting when its first handle is made; without it,
        # deterministic mode refuses CUDA matmuls. Ops with no deterministic kernel warn.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def run_dir_of(cfg: Config) -> Path:
    return Path(cfg.train.train_dir or Path("runs") / Path(resolve_path(cfg.data)).stem)


def claim_run(cfg: Config, run_dir: Path, lock: RunLock | None = None) -> dict | None:
    """Decide, on rank 0, whether this run starts, resumes or is refused; every rank gets the
    decision and, on resume, the checkpoint's state (rank 0 reads it, so run directories
    need not be shared between nodes). Rank 0 first takes `lock` (see seqrec.runlock);
    apart from the lock file, nothing in run_dir changes here.

    A torchrun restart always resumes (and never overwrites): what the failed round saved
    is progress. A directory counts as holding a run when it has a checkpoint, metrics or
    results, not only latest.pt (a run killed between two saves leaves best.pt alone).
    """
    t = cfg.run
    if dist.elastic_restart():
        if not t.resume:
            log("torchrun restarted the workers: resuming from the latest checkpoint")
        t.resume, t.overwrite = True, False
    outcome: dict = {"state": None, "error": None}
    if dist.is_main():
        try:
            if lock is not None:
                lock.acquire()
            held = [name for name in RUN_STATE_FILES if (run_dir / name).exists()]
            if held and not (t.resume or t.overwrite):
                raise ConfigError(f"{run_dir} already holds a run ({', '.join(held)}); pass --resume to "
                                  f"continue it or --overwrite to replace it")
            if t.resume and (run_dir / ckpt.LATEST).exists():
                outcome["state"] = ckpt.load(run_dir / ckpt.LATEST)
            elif t.resume and held and not dist.elastic_restart():
                raise ConfigError(f"{run_dir} holds {', '.join(held)} but no {ckpt.LATEST} to resume from; "
                                  f"pass --overwrite to start afresh")
        except (ConfigError, CheckpointError) as err:
            outcome["error"] = (isinstance(err, ConfigError), str(err))
    outcome = dist.broadcast_object(outcome)
    if outcome["error"]:
        config_error, message = outcome["error"]
        raise (ConfigError if config_error else CheckpointError)(message)
    if t.resume and outcome["state"] is None:
        log(f"{run_dir}: no checkpoint to resume from; starting a new run")
    return outcome["state"]


def prepare_run_dir(cfg: Config, run_dir: Path, fresh: bool, seqs: Sequences) -> None:
    """Create run_dir and write the run's config and the users' sequences (what recommending
    and evaluating from the run dir read); `fresh` first removes an old run's files.

    Called only once the data, the model and any checkpoint have been checked, so a refused
    start leaves the old run as it was.
    """
    if dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        if fresh:
            for name in RUN_FILES:
                (run_dir / name).unlink(missing_ok=True)
        ckpt.write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
        ckpt.write_bytes_atomic(run_dir / sequences.FILE, seqs.to_bytes())


def load_data(cfg: Config, device: torch.device, given: tuple[Sequences, str] | None = None
              ) -> tuple[SequenceTensors, Sequences]:
    """The run's data on `device`: read as cfg.data says, or `given` as (sequences, a name for
    messages) by the Python API."""
    seqs, source = given or (load_sequences(cfg.data), str(resolve_path(cfg.data)))
    check_with_data(cfg, seqs.num_items, source)
    if cfg.model.time and seqs.times is None:
        raise DataError(f"{source}: TiSASRec needs timestamps and this data has none; use --no_time")
    log(f"data {source}: {seqs.num_users:,} users, {seqs.num_items:,} items, {len(seqs.items):,} interactions")
    data = SequenceTensors(seqs, cfg.model.maxlen, device, cfg.eval.eval_negatives, cfg.eval.eval_seed)
    return data, seqs


def report_popularity(cfg: Config, data: SequenceTensors) -> None:
    metrics = evaluate(Popularity(data.item_counts), data.splits["test"], cfg.eval, data.num_items)
    log(f"popularity baseline  test {format_metrics(metrics)}")


def run_inference(cfg: Config, device: torch.device, given: tuple[Sequences, str] | None = None) -> dict:
    """Evaluate a saved model on this data, with the model config stored in the checkpoint."""
    from .serve import load_weights, model_config  # the checkpoint checks `seqrec recommend` makes
    path = cfg.run.state_dict_path
    state = ckpt.load(path)
    cfg.model = model_config(state, path)
    data, _ = load_data(cfg, device, given)
    source = given[1] if given else resolve_path(cfg.data)
    model = build_model(cfg.model, data.num_items)
    load_weights(model, state, path, f"its model config and the {data.num_items} items of "
                                     f"{source}; was it trained on other data?")
    model.to(device)
    results = {}
    for split in ("valid", "test"):
        results[split] = evaluate(model, data.splits[split], cfg.eval, data.num_items)
        log(f"{split:5s} {format_metrics(results[split])}")
    return results


def run(cfg: Config, callbacks: list[Callback] = (), test: bool = True,
        data: tuple[Sequences, str] | None = None) -> dict:
    """Train (or only evaluate) as `cfg` says; `callbacks` watch the run (main rank),
    `test=False` never evaluates the test split (what the tuner runs), and `data` (sequences,
    a name for messages) replaces reading cfg.data (the Python API's data frames)."""
    device = resolve_device(cfg.train.device)
    if device.type == "cpu":
        hostmem.retain_freed_memory()
    if cfg.dist.multi_gpu and not dist.launched():
        raise ConfigError("--multi_gpu needs a distributed launch: torchrun --nproc_per_node=N main.py ...")
    dist.init(device, cfg.dist.backend, cfg.dist.master_port)
    default_port = DistConfig().master_port
    if dist.active() and cfg.dist.master_port != default_port and os.environ.get("MASTER_PORT") != str(cfg.dist.master_port):
        log(f"note: --master_port {cfg.dist.master_port} is ignored: the launcher set MASTER_PORT={os.environ.get('MASTER_PORT')}")
    try:
        configure_backends(cfg.train, device)
        if cfg.run.inference_only:
            return run_inference(cfg, device, data)
        if cfg.train.compile and cfg.train.compile_mode == "reduce-overhead" and dist.active():
            raise ConfigError("--compile_mode reduce-overhead (CUDA graphs) cannot capture DDP's gradient "
                              "all-reduce; use --compile_mode default under torchrun")
        run_dir = run_dir_of(cfg)
        callbacks = [*tracking.from_config(cfg, run_dir), *callbacks, *dist.fault_from_env()]  # trackers first: they see every row
        callbacks += [CompositeGain()] if cfg.model.mhc else []  # mHC's gain in every valid row
        lock, started = RunLock(run_dir), False
        try:
            state = claim_run(cfg, run_dir, lock)
            data, seqs = load_data(cfg, device, data)
            trainer = Trainer(cfg, data, device, run_dir, [str(i) for i in seqs.item_ids], callbacks)
            if state is not None:
                trainer.resume(state)
            prepare_run_dir(cfg, run_dir, fresh=state is None, seqs=seqs)
            started = True
            if state is not None:
                trainer.truncate_metrics()
            results = trainer.fit(test)
        finally:
            lock.release(started)
        if test:
            report_popularity(cfg, data)
        log(f"run directory: {run_dir}")
        return results
    finally:
        dist.shutdown()


def main(argv: list[str] | None = None, prog: str = "main.py") -> int:
    """Train (or evaluate with --inference_only); the entry behind main.py."""
    try:
        run(parse_config(argv, prog))
    except (ConfigError, DataError, CheckpointError, TrainingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2 if isinstance(err, (ConfigError, DataError)) else 1
    except Preempted as err:
        print(f"stopped: {err}", file=sys.stderr)
        return 128 + err.signum
    except OSError as err:  # writing the run directory: read-only, disk full, over a quota or RLIMIT_FSIZE
        # Reading fails as ConfigError/DataError/CheckpointError, so what is left is a write. A
        # failed write() carries no file name, only the open() or rename before it; os.replace
        # names its target second.
        name, reason = err.filename2 or err.filename, err.strerror or str(err)
        print(f"error: cannot write {name}: {reason}" if name else f"error: cannot write the run's files: {reason}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; rerun with --resume to continue from the last checkpoint", file=sys.stderr)
        return 130
    return 0


def console(argv: list[str] | None = None) -> int:
    """`seqrec COMMAND [flags]`: train | evaluate | recommend | export | envcheck | bench | tune."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "train": lambda rest: main(rest, "seqrec train"),
        "evaluate": lambda rest: main(["--inference_only", *rest], "seqrec evaluate"),
        "envcheck": _envcheck,
        "bench": _bench,
        "recommend": _recommend,
        "export": _export,
        "tune": _tune,
    }
    if not argv or argv[0] not in commands:
        print(f"usage: seqrec {{{','.join(commands)}}} [flags]   (seqrec COMMAND --help for its flags)",
              file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    return commands[argv[0]](argv[1:])


def _tune(argv: list[str]) -> int:
    from .tune import main as tune_main
    return tune_main(argv)


def _recommend(argv: list[str]) -> int:
    from .recommend import main as recommend_main
    return recommend_main(argv)


def _export(argv: list[str]) -> int:
    from .export import main as export_main
    return export_main(argv)


def _bench(argv: list[str]) -> int:
    from .tools.bench import main as bench_main  # imported here: training never loads seqrec.tools
    return bench_main(argv)


def _envcheck(argv: list[str]) -> int:
    from .envcheck import main as envcheck_main
    return envcheck_main(argv)


if __name__ == "__main__":
    sys.exit(console())
