import sys

import pytest

from conftest import small_config
from seqrec.cli import run
from seqrec.plot import main


def test_plot_writes_a_png(data_file, tmp_path):
    pytest.importorskip("matplotlib")
    run(small_config(data_file, tmp_path / "a", train__num_epochs=2))
    out = tmp_path / "curves.png"
    assert main([str(tmp_path / "a"), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    assert main([str(tmp_path)]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err


def test_plot_names_a_missing_run(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert main([str(tmp_path / "nope")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_labels_tell_ablation_seeds_apart():
    from pathlib import Path

    from seqrec.plot import label
    assert label(Path("runs/sasrec_h2")) == "sasrec_h2"
    assert label(Path("runs/ablation/sasrec-post-ce/seed42")) == "sasrec-post-ce/seed42"
