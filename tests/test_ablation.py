"""launch/ablation.py: runs the chosen rows, resumes instead of rerunning, tabulates mean ± spread."""
from __future__ import annotations

import importlib.util
import sys

import pytest

from conftest import REPO, write_interactions

spec = importlib.util.spec_from_file_location("ablation", REPO / "launch" / "ablation.py")
ablation = importlib.util.module_from_spec(spec)
sys.modules["ablation"] = ablation  # dataclasses look their module up
spec.loader.exec_module(ablation)

TINY = ["--", "--maxlen", "10", "--hidden_units", "8", "--num_heads", "1", "--batch_size", "32",
        "--eval_negatives", "10", "--device", "cpu", "--warmup_steps", "2"]


def test_rows_cover_the_issue_grid():
    names = [row.name for row in ablation.all_rows()]
    assert len(names) == len(set(names)) == 4 * 2 * 2 + 1
    assert "tisasrec+mhc-pre-ce" in names and "video-sasrec-post-bce" in names


def test_runs_resumes_and_tabulates(tmp_path, capsys):
    toy = write_interactions(tmp_path / "toy.txt", num_users=40, num_items=20, min_len=8)
    ratings = tmp_path / "ratings.dat"
    ratings.write_text("".join(f"{u}::{i}::5::{t}\n" for u, i, t in (line.split() for line in toy.read_text().split("\n") if line)))
    out = tmp_path / "ablation"
    args = ["--ratings", str(ratings), "--out", str(out), "--rows", "sasrec-post-bce,sasrec-post-ce,tisasrec+mhc-pre-ce",
            "--seeds", "1,2", "--epochs", "2", "--eval_every", "1", "--parallel", "2", "--threads", "1", *TINY]
    assert ablation.main(args) == 0
    first = capsys.readouterr().out
    assert first.count("done") == 6 and "FAILED" not in first
    lines = (out / "table.md").read_text().splitlines()
    sasrec = next(line for line in lines if line.startswith("| sasrec-post-bce "))
    cells = [c.strip() for c in sasrec.split("|")[1:-1]]
    assert cells[1:4] == ["ml1m", "sampled", "2"] and " ± " in cells[6]
    seeds = [ablation.summarise(out / "sasrec-post-bce" / f"seed{s}", "bce")["ndcg"] for s in (1, 2)]
    assert float(cells[6].split(" ± ")[0]) == pytest.approx(sum(seeds) / 2, abs=1e-4)
    assert any(line.startswith("| tisasrec+mhc-pre-ce | ml1m | full | 2 ") for line in lines)
    full = [line for line in lines if line.startswith("| sasrec | post |")]  # the only model with both losses
    assert len(full) == 1
    bce, ce = ([ablation.json.loads((out / row / f"seed{s}" / "results.json").read_text())["test"]["full/NDCG@10"]
                for s in (1, 2)] for row in ("sasrec-post-bce", "sasrec-post-ce"))
    assert full[0].endswith(f"| {sum(ce) / sum(bce):.2f}x |")

    assert ablation.main(args) == 0  # everything finished: nothing is rerun
    assert "$ " not in capsys.readouterr().out


def test_video_rows_need_the_file(tmp_path):
    with pytest.raises(SystemExit):
        ablation.main(["--out", str(tmp_path), "--rows", "video"])


def test_recipe_grid_runs_and_tabulates_both_protocols_with_memory(tmp_path, capsys):
    names = [row.name for row in ablation.recipe_rows()]
    assert len(names) == len(set(names)) == 3 * len(ablation.RECIPES)
    toy = write_interactions(tmp_path / "toy.txt", num_users=40, num_items=20, min_len=8)
    ratings = tmp_path / "ratings.dat"
    ratings.write_text("".join(f"{u}::{i}::5::{t}\n" for u, i, t in (line.split() for line in toy.read_text().split("\n") if line)))
    out = tmp_path / "recipes"
    args = ["--grid", "recipes", "--ratings", str(ratings), "--out", str(out), "--rows", "sasrec-esasrec,sasrec-gbce",
            "--seeds", "1", "--epochs", "1", "--eval_every", "1", "--threads", "1", *TINY,
            "--num_negatives", "8"]
    assert ablation.main(args) == 0
    assert "FAILED" not in capsys.readouterr().out
    lines = [line for line in (out / "table.md").read_text().splitlines() if line.startswith("| sasrec-")]
    assert [line.split("|")[1].strip() for line in lines] == ["sasrec-gbce", "sasrec-esasrec"]
    result = ablation.json.loads((out / "sasrec-esasrec" / "seed1" / "results.json").read_text())
    cells = [c.strip() for c in lines[1].split("|")[1:-1]]
    assert float(cells[5]) == pytest.approx(result["test"]["full/NDCG@10"], abs=1e-4)
    assert float(cells[8]) == pytest.approx(result["test"]["sampled/HR@10"], abs=1e-4)
    assert 0.05 < float(cells[10]) < 10  # the child's own peak RSS in GiB, not the parent's
    config = (out / "sasrec-esasrec" / "seed1" / "config.yaml").read_text()
    assert "block: ligr" in config and "loss: sampled_softmax" in config
