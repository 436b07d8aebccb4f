"""The ablation table of docs/RESULTS.md, rerunnable: every row is a plain ``main.py`` run.

    python launch/ablation.py --ratings ratings.dat --video Video.txt --out runs/ablation
    python launch/ablation.py --out runs/ablation --table          # table only, from finished runs
    python launch/ablation.py --grid recipes --ratings ratings.dat --video Video.txt --out runs/recipes

Rows: {SASRec, SASRec+mHC, TiSASRec, TiSASRec+mHC} × {post-LN, pre-LN} × two protocols —
``bce`` (the seed's: BCE with one negative, selected on sampled-100 NDCG@10) and ``ce``
(full softmax cross-entropy, selected on full-ranking NDCG@10) — on a MovieLens-1M
``ratings.dat`` (converted by data/convert_ml1m.py, SASRec's one-pass 5-count filter),
plus SASRec on the SASRec paper's Video Games file (maxlen 50 and, as in the paper for
sparse data, dropout 0.5) under the seed protocol.
``--grid recipes`` is the training-recipe comparison instead: BCE, gBCE (128 negatives,
t = 0.75), sampled softmax (256 shared negatives), full cross-entropy and eSASRec (LiGR
blocks with a 4x SwiGLU FFN + the same sampled softmax), for SASRec and TiSASRec+mHC on the
MovieLens file and for SASRec on Video; every row has the same architecture otherwise,
maxlen 50, the same epochs and seeds, and selects on full-ranking NDCG@10.
Each (row, seed) runs in OUT/ROW/seedS, and its peak RSS goes to OUT/ROW/seedS/peak_rss.json. A finished run (results.json) is never rerun and
an interrupted one resumes from its latest checkpoint, so the script can be stopped and
started again at will; ``--rows`` picks a subset by name prefix. Selection is on
validation only; the test numbers are those main.py reports once, at the best
validation checkpoint. The markdown table goes to OUT/table.md and stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from seqrec import provenance

REPO = Path(__file__).resolve().parent.parent
MODELS = {"sasrec": ["--no_time", "--no_mhc"], "sasrec+mhc": ["--no_time", "--mhc"],
          "tisasrec": ["--time", "--no_mhc"], "tisasrec+mhc": ["--time", "--mhc"]}
NORMS = {"post": ["--no_norm_first"], "pre": ["--norm_first"]}
PROTOCOLS = {
    "bce": (["--loss", "bce", "--select_metric", "sampled/NDCG@10"], "sampled", "HR@10"),
    "ce": (["--loss", "ce", "--select_metric", "full/NDCG@10"], "full", "Recall@10"),
}


RECIPES = {
    "bce": ["--loss", "bce"],
    "gbce": ["--loss", "gbce", "--num_negatives", "128", "--gbce_t", "0.75"],
    "sampled_softmax": ["--loss", "sampled_softmax", "--num_negatives", "256", "--shared_negatives"],
    "ce": ["--loss", "ce"],
    "esasrec": ["--block", "ligr", "--ffn_mult", "4", "--loss", "sampled_softmax", "--num_negatives", "256",
                "--shared_negatives"],
}
RECIPE_COMMON = ["--maxlen", "50", "--select_metric", "full/NDCG@10"]


@dataclass
class Row:
    name: str
    data: str  # "ml1m" or "video"
    protocol: str
    args: list[str] = field(default_factory=list)


def all_rows() -> list[Row]:
    rows = [Row(f"{model}-{norm}-{protocol}", "ml1m", protocol, margs + nargs + PROTOCOLS[protocol][0])
            for protocol in PROTOCOLS for model, margs in MODELS.items() for norm, nargs in NORMS.items()]
    # The SASRec paper's Games setting: maxlen 50 and dropout 0.5 (it uses 0.2 only on ML-1M).
    rows.append(Row("video-sasrec-post-bce", "video", "bce",
                    MODELS["sasrec"] + NORMS["post"] + PROTOCOLS["bce"][0] + ["--maxlen", "50", "--dropout_rate", "0.5"]))
    return rows


def recipe_rows() -> list[Row]:
    rows = [Row(f"{model}-{recipe}", "ml1m", "ce", MODELS[model] + RECIPE_COMMON + args)
            for model in ("sasrec", "tisasrec+mhc") for recipe, args in RECIPES.items()]
    rows += [Row(f"video-sasrec-{recipe}", "video", "ce", MODELS["sasrec"] + RECIPE_COMMON + args
                 + ["--dropout_rate", "0.5"]) for recipe, args in RECIPES.items()]
    return rows


GRIDS = {"seed": all_rows, "recipes": recipe_rows}


def command(row: Row, seed: int, data_path: Path, run_dir: Path, args: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, str(REPO / "main.py"), "--data_path", str(data_path), "--train_dir", str(run_dir),
           "--seed", str(seed), "--num_epochs", str(args.epochs), "--eval_every", str(args.eval_every), *row.args]
    if (run_dir / "latest.pt").exists():
        cmd.append("--resume")
    return cmd + args.extra


def run_all(jobs: list[tuple[list[str], Path]], parallel: int, threads: int) -> None:
    """Run the commands, `parallel` at a time, each pinned to `threads` threads; logs beside the run."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    pending, running = list(jobs), []
    while pending or running:
        while pending and len(running) < parallel:
            cmd, run_dir = pending.pop(0)
            run_dir.mkdir(parents=True, exist_ok=True)
            print("$", " ".join(cmd), flush=True)
            log = open(run_dir / "train.log", "a")
            running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO), run_dir, log))
        time.sleep(5)
        for job in list(running):
            proc, run_dir, log = job
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # the child's own rusage: its peak RSS
            if pid == 0:
                continue
            log.close()
            running.remove(job)
            code = os.waitstatus_to_exitcode(status)
            record_peak_rss(run_dir, usage.ru_maxrss / 2**20)
            print(f"{run_dir}: {'done' if code == 0 else f'FAILED (exit {code}, see train.log)'}", flush=True)


def record_peak_rss(run_dir: Path, gib: float) -> None:
    """The largest peak RSS of the run's processes (a resumed run has several), in GiB."""
    path = run_dir / "peak_rss.json"
    previous = json.loads(path.read_text())["peak_rss_gib"] if path.exists() else 0.0
    path.write_text(json.dumps({"peak_rss_gib": round(max(previous, gib), 3)}) + "\n")


def summarise(run_dir: Path, protocol: str) -> dict | None:
    """Best epoch, valid/test metrics of the protocol, and training seconds of one finished run."""
    try:
        result = json.loads((run_dir / "results.json").read_text())
    except FileNotFoundError:
        return None
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    prefix, hit = PROTOCOLS[protocol][1], PROTOCOLS[protocol][2]
    return {"best_epoch": result["best_epoch"],
            "epochs": max(r["epoch"] for r in records if r["type"] == "train"),
            "valid": result["valid"][f"{prefix}/NDCG@10"], "ndcg": result["test"][f"{prefix}/NDCG@10"],
            "hit": result["test"][f"{prefix}/{hit}"],
            "seconds": sum(r["seconds"] for r in records if r["type"] == "train"),
            "code": provenance.code_versions(run_dir)}


def _spread(values: list[float]) -> str:
    """Mean ± half the range (the range is all two or three seeds can honestly give)."""
    mean = statistics.fmean(values)
    return f"{mean:.4f}" if len(values) == 1 else f"{mean:.4f} ± {(max(values) - min(values)) / 2:.4f}"


def table(rows: list[Row], out: Path, seeds: list[int]) -> str:
    hardware = provenance.device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    lines = ["| row | data | metrics | seeds | epochs (best) | valid NDCG@10 | test NDCG@10 | test HR@10 / Recall@10 "
             "| train time / run | code |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        runs = [s for s in (summarise(out / row.name / f"seed{seed}", row.protocol) for seed in seeds) if s]
        if not runs:
            continue
        epochs = ", ".join(f"{r['epochs']} ({r['best_epoch']})" for r in runs)
        minutes = statistics.fmean(r["seconds"] for r in runs) / 60
        lines.append(f"| {row.name} | {row.data} | {PROTOCOLS[row.protocol][1]} | {len(runs)} | {epochs} "
                     f"| {_spread([r['valid'] for r in runs])} | {_spread([r['ndcg'] for r in runs])} "
                     f"| {_spread([r['hit'] for r in runs])} | {minutes:.0f} min "
                     f"| {', '.join(dict.fromkeys(v for r in runs for v in r['code'] or ['–']))} |")
    lines.append(f"\nHardware: {hardware}, torch {torch.__version__}. Spread = half the range over seeds. "
                 "Code: the commits each row's runs were trained with (runs.jsonl; – = not recorded).")
    return "\n".join(lines) + "\n"


def full_ranking_table(out: Path, seeds: list[int]) -> str:
    """Test full-ranking NDCG@10 of each model and LayerNorm order under BCE (its checkpoint
    selected on sampled NDCG@10) and under CE (selected on full NDCG@10), where both ran."""
    def test_ndcg(row: str) -> list[float]:
        paths = [out / row / f"seed{seed}" / "results.json" for seed in seeds]
        return [json.loads(p.read_text())["test"]["full/NDCG@10"] for p in paths if p.exists()]

    lines = ["| model | LN | BCE: test full NDCG@10 | CE: test full NDCG@10 | CE / BCE |", "|---|---|---|---|---|"]
    for model in MODELS:
        for norm in NORMS:
            bce, ce = test_ndcg(f"{model}-{norm}-bce"), test_ndcg(f"{model}-{norm}-ce")
            if bce and ce:
                lines.append(f"| {model} | {norm} | {_spread(bce)} | {_spread(ce)} "
                             f"| {statistics.fmean(ce) / statistics.fmean(bce):.2f}x |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


def recipe_table(rows: list[Row], out: Path, seeds: list[int]) -> str:
    """Both protocols per recipe row: validation and test full-ranking NDCG@10, test Recall@10,
    test sampled NDCG@10 / HR@10, the median seconds per training epoch (robust to a shared machine) and
    the run's peak RSS."""
    hardware = provenance.device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    lines = ["| row | data | seeds | best epoch | valid full NDCG@10 | test full NDCG@10 | test full Recall@10 "
             "| test sampled NDCG@10 | test sampled HR@10 | s / epoch | peak RSS (GiB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        dirs = [out / row.name / f"seed{seed}" for seed in seeds]
        dirs = [d for d in dirs if (d / "results.json").exists()]
        if not dirs:
            continue
        results = [json.loads((d / "results.json").read_text()) for d in dirs]
        epochs = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in dirs]
        per_epoch = statistics.median(r["seconds"] for rows_ in epochs for r in rows_ if r["type"] == "train")
        rss = [json.loads((d / "peak_rss.json").read_text())["peak_rss_gib"] for d in dirs
               if (d / "peak_rss.json").exists()]
        cells = [_spread([r[split][metric] for r in results]) for split, metric in
                 (("valid", "full/NDCG@10"), ("test", "full/NDCG@10"), ("test", "full/Recall@10"),
                  ("test", "sampled/NDCG@10"), ("test", "sampled/HR@10"))]
        best = ", ".join(str(r["best_epoch"]) for r in results)
        lines.append(f"| {row.name} | {row.data} | {len(dirs)} | {best} | {' | '.join(cells)} | {per_epoch:.1f} "
                     f"| {f'{max(rss):.2f}' if rss else '–'} |")
    lines.append(f"\nHardware: {hardware}, torch {torch.__version__}. Spread = half the range over seeds.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="Arguments after `--` go to every main.py run.")
    parser.add_argument("--ratings", type=Path, help="MovieLens-1M ratings.dat (or a part of it)")
    parser.add_argument("--video", type=Path, help="the SASRec paper's Video.txt ('user item' lines)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "ablation")
    parser.add_argument("--grid", choices=sorted(GRIDS), default="seed",
                        help="seed: the seed's model x LayerNorm x loss ablation; recipes: the training recipes")
    parser.add_argument("--rows", default="", help="comma-separated row-name prefixes (default: all rows)")
    parser.add_argument("--seeds", default="42,43", help="comma-separated training seeds")
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--eval_every", type=int, default=20)
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="OMP threads per run")
    parser.add_argument("--table", action="store_true", help="only write the table from finished runs")
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.extra = argv[split + 1:]
    prefixes = [p for p in args.rows.split(",") if p]
    rows = [r for r in GRIDS[args.grid]() if not prefixes or any(r.name.startswith(p) for p in prefixes)]
    seeds = [int(s) for s in args.seeds.split(",")]
    if not args.table:
        sources = {"ml1m": args.out / "ml-1m.txt", "video": args.video}
        if any(r.data == "ml1m" for r in rows) and not sources["ml1m"].exists():
            if args.ratings is None:
                parser.error("--ratings is needed to build the MovieLens rows")
            subprocess.run([sys.executable, str(REPO / "data" / "convert_ml1m.py"), "--ratings", str(args.ratings),
                            "--out", str(sources["ml1m"])], check=True)
        if any(r.data == "video" for r in rows) and args.video is None:
            parser.error("--video is needed for the Video rows (or leave them out with --rows)")
        jobs = [(command(row, seed, sources[row.data], args.out / row.name / f"seed{seed}", args),
                 args.out / row.name / f"seed{seed}")
                for seed in seeds for row in rows if not (args.out / row.name / f"seed{seed}" / "results.json").exists()]
        run_all(jobs, args.parallel, args.threads)
    if args.grid == "recipes":
        text = recipe_table(rows, args.out, seeds)
    else:
        text = table(rows, args.out, seeds)
        full = full_ranking_table(args.out, seeds)
        if full:
            text += "\nFull ranking, BCE vs CE:\n\n" + full
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
