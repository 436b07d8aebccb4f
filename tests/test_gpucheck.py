"""The GPU check on a CPU machine: its arguments, its one JSON file with every check
"skipped: no CUDA", how it survives failing, hanging and crashing checks; and the benchmark's
CUDA timing, which must record on the device it is given (defect 9), with torch.cuda faked."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from seqrec.tools import bench
from seqrec.tools import gpucheck as gc

REPO = Path(__file__).resolve().parents[1]


def strict_json(path: Path):
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_without_cuda_every_check_is_skipped_and_the_report_is_valid_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gc, "cuda_available", lambda: False)
    out = tmp_path / "sub" / "gpu_check.json"
    started = time.monotonic()
    assert gc.main(["--out", str(out), "--optional"]) == 0
    assert time.monotonic() - started < 30  # nothing ran
    report = strict_json(out)
    names = [c["name"] for c in report["checks"]]
    assert len(names) == len(set(names)) > 30
    assert {c["group"] for c in report["checks"]} == set(gc.GROUPS)  # --optional: compile too
    assert all(c["status"] == "skipped" and c["error"].startswith("skipped: no CUDA") for c in report["checks"])
    assert report["counts"] == {"pass": 0, "fail": 0, "skipped": len(names)}
    assert report["environment"]["cuda_available"] is False and report["environment"]["torch"] == torch.__version__
    printed = capsys.readouterr().out
    assert f"0 pass, 0 fail, {len(names)} skipped" in printed and str(out) in printed


def test_only_selects_groups_and_single_checks(tmp_path, monkeypatch):
    monkeypatch.setattr(gc, "cuda_available", lambda: False)
    out = tmp_path / "r.json"
    assert gc.main(["--out", str(out), "--only", "resume,sync/sasrec/bf16"]) == 0
    assert [c["name"] for c in strict_json(out)["checks"]] == ["resume/tisasrec+mhc", "sync/sasrec/bf16"]
    with pytest.raises(SystemExit, match="unknown check"):
        gc.main(["--out", str(out), "--only", "nonsense"])
    assert "compile" not in {c["group"] for c in strict_json(out)["checks"]}


def test_list_names_every_check(capsys):
    assert gc.main(["--list", "--optional"]) == 0
    printed = capsys.readouterr().out
    for grp in gc.GROUPS.values():
        assert grp.name in printed
    assert "sync/tisasrec+mhc/fp16" in printed and "compile/sasrec/default" in printed


def test_report_writer_keeps_json_strict(tmp_path):
    out = tmp_path / "r.json"
    gc.write_report(out, {"nan": math.nan, "inf": [math.inf, 1.5], "path": tmp_path, "dtype": torch.bfloat16,
                          "nested": {"t": (1, 2)}})
    assert strict_json(out) == {"nan": None, "inf": [None, 1.5], "path": str(tmp_path), "dtype": "torch.bfloat16",
                                "nested": {"t": [1, 2]}}
    assert not list(tmp_path.glob(".*.tmp"))


def test_each_check_gets_a_record_whatever_it_does():
    def broken():
        raise ValueError("bad value\nsecond line")

    def failed():
        raise gc.CheckFailed("differs", max_rel_diff=0.5)

    def skipped():
        raise gc.Skipped("bf16 needs compute capability 8.0+")

    def slow():
        time.sleep(30)

    def passing():
        return {"loss": 1.25, "summary": "loss 1.25"}

    records = [gc.run_item(gc.Item(f.__name__, f, 0.5)) for f in (broken, failed, skipped, slow, passing)]
    by = {r["name"]: r for r in records}
    assert by["broken"]["status"] == "fail" and by["broken"]["error"].startswith("ValueError: bad value")
    assert by["failed"]["status"] == "fail" and by["failed"]["figures"] == {"max_rel_diff": 0.5}
    assert by["skipped"] == {**by["skipped"], "status": "skipped", "error": "bf16 needs compute capability 8.0+"}
    assert by["slow"]["status"] == "fail" and by["slow"]["error"].startswith("timeout") and by["slow"]["seconds"] < 5
    assert by["passing"] == {**by["passing"], "status": "pass", "summary": "loss 1.25", "figures": {"loss": 1.25}}


FAKE_WORKER = textwrap.dedent("""
    import json, sys, time
    results, first, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    def emit(row):
        with open(results, "a") as f:
            f.write(json.dumps(row) + "\\n")
    for i in range(first, 3):
        emit({"event": "start", "index": i, "name": f"c{i}"})
        if i == 1 and mode == "crash":
            print("Segmentation fault (core dumped)", flush=True)
            sys.exit(139)
        if i == 1 and mode == "hang":
            time.sleep(60)
        emit({"event": "end", "index": i, "name": f"c{i}", "status": "pass", "error": None, "summary": "ok",
              "seconds": 0.1, "figures": {"i": i}})
""")


@pytest.mark.parametrize("mode", ["crash", "hang"])
def test_a_dead_or_hung_worker_fails_its_check_and_a_fresh_one_runs_the_rest(tmp_path, mode):
    grp = gc.Group("fake", "three checks", False, lambda opts: [gc.Item(f"c{i}", lambda: {}, 1.0) for i in range(3)])
    opts = gc.Options("cpu", True, tmp_path)
    starts = []

    def command(first: int) -> list[str]:
        starts.append(first)
        return [sys.executable, "-c", FAKE_WORKER, str(tmp_path / "fake.jsonl"), str(first), mode]

    deadline = time.monotonic() + (6.0 if mode == "hang" else 60.0)
    records = gc.run_group(grp, opts, deadline, tmp_path, worker_cmd=command)
    assert [r["name"] for r in records] == ["c0", "c1", "c2"]
    assert records[0]["status"] == "pass" and records[0]["figures"] == {"i": 0}
    assert records[1]["status"] == "fail"
    if mode == "crash":
        assert records[1]["error"].startswith("the check's worker exited with code 139")
        assert "Segmentation fault" in records[1]["error"]
        assert starts == [0, 2] and records[2]["status"] == "pass"
    else:  # the budget ran out with the hung check: the one after it is skipped, not failed
        assert records[1]["error"].startswith("timeout: the check's worker was stopped")
        assert records[2]["status"] == "skipped" and "time budget" in records[2]["error"]


def test_the_gpu_folder_skips_without_cuda_and_keeps_conftest_importable():
    """tests/gpu has its own conftest.py; collected before a test file that does
    `from conftest import ...`, it must not hide tests/conftest.py's helpers."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: tests/gpu would run")
    users = next(p for p in sorted((REPO / "tests").glob("test_*.py")) if "from conftest import" in p.read_text())
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/gpu",
                           str(users.relative_to(REPO)), "-k", "test_gpu_paths"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " skipped" in proc.stdout and "error" not in proc.stdout.lower()


# ---------------------------------------------------------------------------- bench: defect 9
class FakeCuda:
    """The parts of torch.cuda the bench's timing uses, recording which device each call names."""

    def __init__(self):
        self.current = 0
        self.calls = []

    def index(self, device) -> int:
        if device is None:
            return self.current
        device = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
        return self.current if device.index is None else device.index

    def install(self, monkeypatch):
        fake = self

        class Stream:
            def __init__(self, index):
                self.index = index

        class Event:
            def __init__(self, enable_timing=False):
                self.stream = None

            def record(self, stream=None):
                self.stream = stream if stream is not None else Stream(fake.current)
                fake.calls.append(("record", self.stream.index))

            def elapsed_time(self, end):
                assert end.stream.index == self.stream.index
                return 250.0

        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream(fake.index(device)))
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: fake.calls.append(("sync", fake.index(device))))
        monkeypatch.setattr(torch.cuda, "current_device", lambda: fake.current)
        monkeypatch.setattr(torch.cuda, "set_device", lambda device: setattr(fake, "current", fake.index(device)))


def test_bench_times_cuda_events_on_the_stream_of_its_device(monkeypatch):
    fake = FakeCuda()
    fake.install(monkeypatch)
    ran = []
    seconds, _ = bench._timed_cpu(lambda: ran.append(1), torch.device("cuda", 1))  # current device still 0
    assert ran == [1] and seconds == 0.25
    assert fake.calls == [("record", 1), ("record", 1), ("sync", 1)]


def test_bench_worker_makes_its_device_current(monkeypatch):
    fake = FakeCuda()
    fake.install(monkeypatch)
    device = bench._start({"device": "cuda:1"})
    assert device == torch.device("cuda", 1) and fake.current == 1
    fake.current = 0
    assert bench._start({"device": "cuda"}) == torch.device("cuda", 0)  # "cuda" = the current device, made explicit
