"""The package as a user installs it: a wheel built from this checkout, installed into a fresh
virtual environment, runs the quick start (train, recommend, export) from an empty directory,
so everything it reads at run time must ship inside the package. Plus the demo data and
preset that make that possible: generated in code, byte-identical to the published file."""
from __future__ import annotations

import ast
import re
import hashlib
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

import seqrec
from conftest import REPO
from seqrec.config import DEMO_PRESET, DataConfig, load_yaml
from seqrec.data import DataError, demo, resolve_path

SOURCES = ["pyproject.toml", "setup.py", "README.md", "seqrec"]  # everything the build reads
TIMEOUT = 600


# ------------------------------------------------------------------ demo data and preset


def test_demo_generator_reproduces_the_published_file():
    published = (REPO / "data" / "demo.txt").read_bytes()
    assert hashlib.sha256(published).hexdigest() == demo.SHA256, "data/demo.txt and demo.SHA256 disagree"
    text = demo.generate(demo.SEED, demo.USERS)
    assert text == demo.generate(demo.SEED, demo.USERS)
    # NumPy promises stable bit streams but not stable Generator methods across releases, so the
    # bytes are compared only under the NumPy that wrote the file (demo_path warns elsewhere).
    if np.__version__ == demo.NUMPY_VERSION:
        assert text.encode() == published, "the packaged generator no longer writes data/demo.txt"


def test_demo_data_is_generated_once_then_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("SEQREC_CACHE_DIR", str(tmp_path / "cache"))
    first = demo.demo_path()
    assert first.name == "demo.txt" and first.is_relative_to(tmp_path / "cache")  # runs/demo by default
    stamp = first.stat().st_mtime_ns
    assert demo.demo_path() == first and first.stat().st_mtime_ns == stamp
    if np.__version__ == demo.NUMPY_VERSION:
        assert first.read_bytes() == (REPO / "data" / "demo.txt").read_bytes()
    assert [p.name for p in first.parent.iterdir()] == ["demo.txt"]  # no temporary file left behind


def test_unwritable_cache_falls_back_to_the_temp_directory(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("SEQREC_CACHE_DIR", str(tmp_path / "file" / "cache"))  # under a file: mkdir fails
    monkeypatch.setattr(demo.tempfile, "tempdir", str(tmp_path / "tmp"))
    assert demo.demo_path().is_relative_to(tmp_path / "tmp")


def test_dataset_names_resolve_outside_a_checkout(tmp_path, monkeypatch):
    """From any directory of an installed package: 'demo' is the packaged data, other names are
    data/NAME.txt in the working directory, which also overrides the packaged demo."""
    monkeypatch.setenv("SEQREC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr("seqrec.data.checkout_data", lambda: None)
    monkeypatch.chdir(tmp_path)
    assert resolve_path(DataConfig(dataset="demo")) == demo.demo_path()
    with pytest.raises(DataError, match="data/mine.txt: dataset 'mine' not found"):
        resolve_path(DataConfig(dataset="mine"))
    (tmp_path / "data").mkdir()
    for name in ("mine", "demo"):
        (tmp_path / "data" / f"{name}.txt").write_text("1 2 3\n")
        assert resolve_path(DataConfig(dataset=name)) == Path("data") / f"{name}.txt"


def test_checkout_preset_mirrors_the_packaged_one():
    assert DEMO_PRESET.is_file()
    assert load_yaml(DEMO_PRESET) == yaml.safe_load((REPO / "launch" / "configs" / "demo.yaml").read_text())


def test_one_version_string():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "seqrec.__version__"}
    tree = ast.parse((REPO / "seqrec" / "__init__.py").read_text())
    assigned = [node.value.value for node in tree.body if isinstance(node, ast.Assign)
                and [t.id for t in node.targets if isinstance(t, ast.Name)] == ["__version__"]]
    assert assigned == [seqrec.__version__]  # a literal, so setuptools reads it without importing


def test_the_declared_torch_minimum_installs_on_the_gpu_machines():
    """The GPU machines this project is checked on run torch 2.11 with no network: a minimum
    above it would make `pip install` fail there."""
    tomllib = pytest.importorskip("tomllib")
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [d for d in deps if re.match(r"torch\b", d)]
    minimum = tuple(int(part) for part in re.fullmatch(r"torch>=(\d+)\.(\d+)", spec).groups())
    assert (2, 6) <= minimum <= (2, 11)  # 2.6: nn.utils.get_total_norm, used by the trainer


# ------------------------------------------------------------------ the wheel, installed


def run(cmd: list, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=TIMEOUT)
    assert result.returncode == 0, f"{' '.join(map(str, cmd))} exited {result.returncode}:\n" \
                                   f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv python, its bin dir, the wheel, env): the wheel built offline from a copy of the
    sources (so the build leaves nothing in the checkout and reads only what it declares), installed
    with --no-deps --no-index into a fresh venv that reuses this environment's torch."""
    pytest.importorskip("setuptools", minversion="70.1", reason="building the wheel offline needs setuptools>=70.1 "
                                                               "(the test extra: pip install -e '.[test]')")
    root = tmp_path_factory.mktemp("packaging")
    src = root / "src"
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(REPO / name, src / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["SEQREC_CACHE_DIR"] = str(root / "cache")  # a fresh user: demo data and kernels built from the wheel
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", root / "dist", src], root, env)
    wheel, = (root / "dist").glob("seqrec-*.whl")
    venv = root / "venv"
    run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], root, env)
    python = venv / "bin" / "python"
    purelib = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       root, env).stdout.strip())
    if sys.prefix != sys.base_prefix:
        # Run from a venv (.ci/run): --system-site-packages reaches the base interpreter's
        # packages, not this venv's torch and pip, so add those paths (after the new venv's own;
        # .pth files in them, such as an editable seqrec's finder, are not processed).
        outer = dict.fromkeys([*site.getsitepackages(), sysconfig.get_paths()["purelib"]])
        (purelib / "outer-env.pth").write_text("".join(f"{p}\n" for p in outer))
    # --ignore-installed: this environment may hold seqrec (editable, same version) already.
    run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", wheel], root, env)
    return python, venv / "bin", wheel, env, purelib


def test_wheel_holds_the_run_time_resources(installed):
    _, _, wheel, _, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    for resource in ("seqrec/py.typed", "seqrec/presets/demo.yaml", "seqrec/models/mhc_kernels.c",
                     "seqrec/data/demo.py", "seqrec/cli.py"):
        assert resource in names, f"{resource} missing from {wheel.name}"
    assert not any(n.startswith(("tests/", "launch/", "data/")) for n in names)
    entry_points = zipfile.ZipFile(wheel).read(f"seqrec-{seqrec.__version__}.dist-info/entry_points.txt").decode()
    assert "seqrec = seqrec.cli:console" in entry_points


def test_installed_package_reports_its_version(installed, tmp_path):
    python, _, wheel, env, purelib = installed
    out = run([python, "-c", "import seqrec, importlib.metadata as m; "
                             "print(seqrec.__version__, m.version('seqrec'), seqrec.__file__)"], tmp_path, env)
    version, metadata_version, location = out.stdout.split()
    assert version == metadata_version == seqrec.__version__ and wheel.name.startswith(f"seqrec-{version}-")
    assert Path(location).is_relative_to(purelib), f"imported {location}, not the installed copy"


def test_quick_start_runs_from_an_empty_directory(installed, tmp_path):
    """The README's first run, with the installed console script: train on the demo, then
    recommend and export from its checkpoint."""
    python, bin_dir, _, env, _ = installed
    work = tmp_path / "empty"
    work.mkdir()
    seqrec_cli = bin_dir / "seqrec"
    train = run([seqrec_cli, "train", "--num_epochs", "1", "--train_dir", "run"], work, env)
    run_dir = work / "run"
    assert (run_dir / "best.pt").is_file() and (run_dir / "results.json").is_file(), train.stdout
    cache = Path(env["SEQREC_CACHE_DIR"])
    assert f"data {cache}" in train.stdout + train.stderr  # the packaged demo data, not a checkout's
    if shutil.which(env.get("CC", "cc")):  # the demo is TiSASRec + mHC: its C kernel compiled from the wheel
        assert list(cache.glob("mhc_kernels_*.so")), "mhc_kernels.c did not compile from the installed package"
    rec = run([seqrec_cli, "recommend", "--checkpoint", run_dir / "best.pt", "--user", "1", "-k", "5"], work, env)
    user, items = rec.stdout.strip().split("\t")
    assert user == "1" and len(items.split()) == 5
    run([seqrec_cli, "export", "--checkpoint", run_dir / "best.pt", "--out", "model.pt"], work, env)
    assert (work / "model.pt").stat().st_size > 0 and (work / "model.pt.json").is_file()
    assert sorted(p.name for p in work.iterdir()) == ["model.pt", "model.pt.json", "run"]
