"""Command-line entry points.

``python main.py [flags]`` and ``seqrec train [flags]`` train (and, with
``--inference_only``, only evaluate); ``seqrec evaluate`` evaluates a checkpoint;
``seqrec recommend`` serves top-k items from a checkpoint; ``seqrec export`` writes its
scoring model to TorchScript or ONNX; ``seqrec envcheck``
checks the distributed environment; ``seqrec bench`` measures speed and memory. Expected failures (bad
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
from . import hostmem, provenance
from .checkpoint import CheckpointError
from .config import Config, ConfigError, DistConfig, from_dict, parse_config, to_dict
from .data import DataError, SequenceTensors, load_sequences, resolve_path
from .evaluate import evaluate, format_metrics
from .models import Popularity, build_model
from .trainer import Trainer, TrainingError, log

RUN_FILES = (ckpt.LATEST, ckpt.BEST, "metrics.jsonl", "results.json", "config.yaml", provenance.FILE)


def resolve_device(requested: str | None) -> torch.device:
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {requested}: CUDA is not available on this machine")
        if dist.launched() and device.index is None:
            device = torch.device("cuda", dist.local_rank())
    return device


def prepare_run_dir(cfg: Config) -> Path:
    """Create train_dir; refuse to silently mix a new run into an old one."""
    t = cfg.train
    if dist.elastic_restart() and not t.resume:
        log("torchrun restarted the workers: resuming from the latest checkpoint")
        t.resume = True
    run_dir = Path(t.train_dir or Path("runs") / Path(resolve_path(cfg.data)).stem)
    has_checkpoint = (run_dir / ckpt.LATEST).exists()
    if has_checkpoint and not (t.resume or t.overwrite):
        raise ConfigError(f"{run_dir} already holds a run; pass --resume to continue it or --overwrite to replace it")
    with dist.main_first():
        if dist.is_main():
            run_dir.mkdir(parents=True, exist_ok=True)
            if t.overwrite:
                for name in RUN_FILES:
                    (run_dir / name).unlink(missing_ok=True)
            (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return run_dir


def load_data(cfg: Config, device: torch.device) -> tuple[SequenceTensors, list[str]]:
    seqs = load_sequences(cfg.data)
    if cfg.model.time and seqs.times is None:
        raise DataError(f"{resolve_path(cfg.data)}: TiSASRec needs timestamps and this file has none; use --no_time")
    log(f"data {resolve_path(cfg.data)}: {seqs.num_users:,} users, {seqs.num_items:,} items, "
        f"{len(seqs.items):,} interactions")
    data = SequenceTensors(seqs, cfg.model.maxlen, device, cfg.eval.eval_negatives, cfg.eval.eval_seed)
    return data, [str(i) for i in seqs.item_ids]


def report_popularity(cfg: Config, data: SequenceTensors) -> None:
    metrics = evaluate(Popularity(data.item_counts), data.splits["test"], cfg.eval, data.num_items)
    log(f"popularity baseline  test {format_metrics(metrics)}")


def run_inference(cfg: Config, device: torch.device) -> dict:
    """Evaluate a saved model on this data, with the model config stored in the checkpoint."""
    state = ckpt.load(cfg.train.state_dict_path, device)
    cfg.model = from_dict({"model": state["config"]["model"]}).model
    data, _ = load_data(cfg, device)
    model = build_model(cfg.model, data.num_items).to(device)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError:
        raise CheckpointError(f"{cfg.train.state_dict_path}: weights do not fit this dataset "
                              f"({data.num_items} items); was it trained on other data?") from None
    results = {}
    for split in ("valid", "test"):
        results[split] = evaluate(model, data.splits[split], cfg.eval, data.num_items)
        log(f"{split:5s} {format_metrics(results[split])}")
    return results


def run(cfg: Config) -> dict:
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
        if cfg.train.inference_only:
            return run_inference(cfg, device)
        run_dir = prepare_run_dir(cfg)
        data, item_ids = load_data(cfg, device)
        trainer = Trainer(cfg, data, device, run_dir, item_ids)
        if cfg.train.resume and (run_dir / ckpt.LATEST).exists():
            trainer.resume()
        elif cfg.train.resume:
            log(f"{run_dir}: no checkpoint to resume from; starting a new run")
        results = trainer.fit()
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
    except KeyboardInterrupt:
        print("interrupted; rerun with --resume to continue from the last checkpoint", file=sys.stderr)
        return 130
    return 0


def console(argv: list[str] | None = None) -> int:
    """`seqrec COMMAND [flags]`: train | evaluate | recommend | export | envcheck | bench."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "train": lambda rest: main(rest, "seqrec train"),
        "evaluate": lambda rest: main(["--inference_only", *rest], "seqrec evaluate"),
        "envcheck": _envcheck,
        "bench": _bench,
        "recommend": _recommend,
        "export": _export,
    }
    if not argv or argv[0] not in commands:
        print(f"usage: seqrec {{{','.join(commands)}}} [flags]   (seqrec COMMAND --help for its flags)",
              file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    return commands[argv[0]](argv[1:])


def _recommend(argv: list[str]) -> int:
    from .serve import main as recommend_main
    return recommend_main(argv)


def _export(argv: list[str]) -> int:
    from .export import main as export_main
    return export_main(argv)


def _bench(argv: list[str]) -> int:
    from .bench import main as bench_main
    return bench_main(argv)


def _envcheck(argv: list[str]) -> int:
    from .envcheck import main as envcheck_main
    return envcheck_main(argv)


if __name__ == "__main__":
    sys.exit(console())
