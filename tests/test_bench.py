"""The benchmark runs end to end (tiny sizes) and reports same-run ratios."""
import math

import pytest
import torch

from seqrec.models import native
from seqrec.tools import bench


def test_bench_runs_and_reports_ratios(tmp_path, monkeypatch):
    monkeypatch.setitem(bench.SIZES, "tiny", {"hidden_units": 8, "num_blocks": 1, "num_heads": 1, "maxlen": 12})
    monkeypatch.setattr(bench, "synthetic_sequences", lambda: bench_small())
    spec = {"variant": "tisasrec-literal", "size": "tiny", "time": True, "mhc": False, "mhc_native": True,
            "expansion_rate": None, "device": "cpu", "amp": "off", "batch_size": 8, "steps": 3, "length_buckets": 2,
            "threads": 0}
    row = bench.run_case(spec)
    # the derived figures follow from the step time: 20 users in batches of 8 are 3 steps an epoch
    assert row["seq_per_s"] == pytest.approx(8 / row["s_per_step"])
    assert row["s_per_epoch"] == pytest.approx(3 * row["s_per_step"])
    assert math.isnan(row["eval_sampled_s"])  # literal attention is never evaluated (tens of GB at eval sizes)
    later = bench.run_case({**spec, "variant": "tisasrec", "eval": False})
    assert math.isnan(later["eval_sampled_s"]) and math.isnan(later["eval_full_s"])
    mhc = bench.run_case({**spec, "variant": "tisasrec+mhc", "mhc": True, "expansion_rate": 2})
    assert mhc["eval_sampled_s"] > 0 and mhc["eval_full_s"] > 0  # evaluated: the first round, not literal
    rows = [row, {**row, "variant": "tisasrec", "s_per_step": row["s_per_step"] / 4},
            {**row, "variant": "tisasrec", "length_buckets": 1, "s_per_step": row["s_per_step"] / 2},
            {**mhc, "s_per_step": row["s_per_step"] / 2, "cpu_s_per_step": row["cpu_s_per_step"] / 2}]
    report = bench.ratios(rows)
    assert "tiny, buckets 2: tisasrec-literal / tisasrec = 4.00x step time (1.00x CPU time)" in report
    assert "tiny, buckets 2: tisasrec+mhc n=2 / tisasrec = 2.00x step time (0.50x CPU time)" in report
    assert "tiny: tisasrec step, buckets 1 / buckets 2 = 2.00x" in report
    threads = row["threads"]  # threads 0: the process's own setting (a test must not change it)
    assert f"| tisasrec | tiny | 8 | 1 | {threads} |" in bench.table(rows)
    assert f"| tisasrec+mhc n=2 | tiny | 8 | 2 | {threads} |" in bench.table(rows)


def test_several_rounds_give_medians_and_the_ratios_range():
    """Ratios pair the cases of one round; the report gives their median and range, and the
    table each case's median over the rounds."""
    base = {"size": "seed", "length_buckets": 4, "mhc": False, "peak_mem_gb": 1.0, "cpu_s_per_step": 1.0}
    rows = []
    for round_, (plain, mhc) in enumerate([(1.0, 1.2), (2.0, 3.0), (1.0, 1.6)]):
        rows += [{**base, "variant": "sasrec", "round": round_, "s_per_step": plain},
                 {**base, "variant": "sasrec+mhc", "mhc": True, "expansion_rate": 4, "round": round_,
                  "s_per_step": mhc}]
    report = bench.ratios(rows)
    # per round 1.2, 1.5, 1.6: median 1.5 (the medians' ratio, 1.6 / 1.0, would mix rounds)
    assert "sasrec+mhc n=4 / sasrec = 1.50x step time (1.00x CPU time), 1.00x peak memory " \
           "(step ratio 1.20-1.60 over 3 rounds)" in report
    for r, eval_s in zip(rows, [2.0, 3.0, math.nan, math.nan, math.nan, math.nan]):
        r["eval_full_s"] = eval_s  # timed in the first round only
    merged = {bench.label(r): r for r in bench.summarise(rows + [{**base, "variant": "tisasrec", "error": "x"}])}
    assert merged["sasrec"]["s_per_step"] == 1.0 and merged["sasrec+mhc n=4"]["s_per_step"] == 1.6
    assert merged["sasrec"]["eval_full_s"] == 2.0 and merged["sasrec+mhc n=4"]["eval_full_s"] == 3.0
    assert merged["tisasrec"]["error"] == "x"


def test_paired_ratio_is_the_median_of_each_pairs_ratio():
    got = bench.paired_ratio([1.0, 1.0, 2.0, 1.0], [1.2, 1.5, 3.2, 2.0])  # ratios 1.2, 1.5, 1.6, 2.0
    assert got["ratio"] == 1.55 and got["pairs"] == 4
    assert math.isclose(got["ratio_q1"], 1.275) and math.isclose(got["ratio_q3"], 1.9)  # (n+1)p-th values
    assert got["s_per_step"] == 1.75 and got["baseline_s_per_step"] == 1.0


def test_paired_steps_alternate_in_one_process(monkeypatch):
    """run_pair times the variant against its baseline, the two models' steps alternating on
    the same batches with the first of each pair swapping: base, mhc, mhc, base, base, ..."""
    monkeypatch.setitem(bench.SIZES, "tiny", {"hidden_units": 8, "num_blocks": 1, "num_heads": 1, "maxlen": 12})
    monkeypatch.setattr(bench, "synthetic_sequences", lambda: bench_small())
    calls = []
    make_trainer = bench.make_trainer

    def recording(spec, variant, data, device):
        trainer = make_trainer(spec, variant, data, device)
        step = trainer.train_step
        trainer.train_step = lambda users, epoch: (calls.append((variant, users.tolist())), step(users, epoch))[1]
        return trainer

    monkeypatch.setattr(bench, "make_trainer", recording)
    spec = {"variant": "sasrec+mhc", "size": "tiny", "time": False, "mhc": True, "mhc_native": True,
            "expansion_rate": 2, "device": "cpu", "amp": "off",
            "batch_size": 4, "steps": 4, "length_buckets": 1, "threads": 0, "paired": True}
    row = bench.run_pair(spec)
    assert [variant for variant, _ in calls] == ["sasrec", "sasrec+mhc", "sasrec+mhc", "sasrec"] * 2
    assert all(calls[i][1] == calls[i + 1][1] for i in range(0, 8, 2))  # each pair on one batch
    assert row["pairs"] == 3  # 4 steps, the first third (1) a warm-up
    assert "tiny, buckets 1" in bench.paired_line(row) and "sasrec+mhc n=2 / sasrec" in bench.paired_line(row)


def test_paired_needs_a_variant_with_a_baseline(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--paired", "--variants", "sasrec,tisasrec"])
    assert "--paired times variants against a baseline" in capsys.readouterr().err


def test_rounds_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--rounds", "0"])
    assert "--rounds must be at least 1" in capsys.readouterr().err


def bench_small():
    import numpy as np

    from seqrec.data.sequences import Sequences
    lengths = np.full(20, 15)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    rng = np.random.default_rng(0)
    return Sequences(np.arange(20).astype(str), np.arange(1, 31).astype(str), offsets,
                     rng.integers(1, 31, offsets[-1]), np.arange(offsets[-1]) * 60)


def test_mhc_parts_times_every_part():
    parts = bench.mhc_parts(tokens=64, n=2, dim=8, repeats=1)
    kernel = {"kernel: projection..mixing", "kernel: update + LayerNorm"} if native.library(torch.float32, 2) else set()
    assert set(parts) == {"projection + RMS norm", "Sinkhorn", "mixing product", "H_post update",
                          "n-stream LayerNorm", "plain LayerNorm"} | kernel
