"""The environment check's verdicts: failures fail, missing hardware skips, GPU reports read NVML.

The 2-process runs (spawned alone and under torchrun) are in test_ddp.py; here the checks run
in this process as rank 0 of a one-process gloo group, so faults can be injected.
"""
from __future__ import annotations

import argparse
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from seqrec import distributed as dist
from seqrec import envcheck
from seqrec.groupcheck import FAIL, PASS, SKIP, Check, merge


@pytest.fixture
def one_rank_group(monkeypatch):
    """Make this process look like rank 0 of a 1-process torchrun launch (gloo on CPU)."""
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(dist.free_port())).items():
        monkeypatch.setenv(key, value)
    yield
    assert not dist.active()  # the check leaves the group it joined


def run_envcheck(capsys) -> tuple[int, str]:
    code = envcheck.main(["--cpu", "--sizes", "1K"])
    return code, capsys.readouterr().out


def test_passes_in_a_one_process_group(one_rank_group, capsys):
    code, out = run_envcheck(capsys)
    assert code == 0, out
    assert "PASS  process group init" in out and "gloo, 1 process on cpu" in out
    assert "PASS  DDP smoke TiSASRec+mHC" in out and "PASS  barrier" in out
    assert "environment OK" in out and ", 0 FAIL" in out


def test_a_wrong_all_reduce_fails_the_check(one_rank_group, capsys, monkeypatch):
    real = dist.all_reduce_sum
    monkeypatch.setattr(dist, "all_reduce_sum", lambda t: real(t).add_(1))  # every sum off by one
    code, out = run_envcheck(capsys)
    assert code == 1
    assert "FAIL  all_reduce float32" in out and "FAIL  all_reduce bfloat16" in out
    assert "FAIL  all_reduce bandwidth" in out and "wrong sum" in out
    assert "PASS  broadcast" in out  # a wrong value is not an exception: the other checks still run
    assert "environment check FAILED" in out


def test_a_dtype_the_backend_rejects_is_a_skip(one_rank_group, capsys, monkeypatch):
    real = dist.all_reduce_sum

    def no_bfloat16(t):
        if t.dtype == torch.bfloat16:
            raise RuntimeError("Invalid scalar type")  # what older gloo builds say
        return real(t)

    monkeypatch.setattr(dist, "all_reduce_sum", no_bfloat16)
    code, out = run_envcheck(capsys)
    assert code == 0, out
    assert "SKIP  all_reduce bfloat16" in out and "gloo cannot all_reduce torch.bfloat16" in out
    assert "PASS  all_reduce float16" in out


def test_a_raising_collective_fails_and_stops_the_rest(one_rank_group, capsys, monkeypatch):
    def broken(t, src=0):
        raise RuntimeError("Connection reset by peer")

    monkeypatch.setattr(dist, "broadcast", broken)
    code, out = run_envcheck(capsys)
    assert code == 1
    assert "FAIL  broadcast" in out and "RuntimeError: Connection reset by peer" in out
    assert "SKIP  barrier" in out and "not run: an earlier check raised" in out


def test_merge_takes_the_worst_status_over_ranks():
    rank0 = [Check("a", PASS, "fine"), Check("b", PASS, "fine"), Check("c", SKIP, "no bf16")]
    rank1 = [Check("a", PASS, "fine"), Check("b", FAIL, "wrong"), Check("c", SKIP, "no bf16")]
    assert merge([rank0, rank1]) == [Check("a", PASS, "fine"), Check("b", FAIL, "rank 1: wrong"),
                                     Check("c", SKIP, "no bf16")]


class FakeNVMLError(Exception):
    pass


def fake_pynvml(gpus: list[dict]) -> types.ModuleType:
    """Enough of pynvml for the report: GPUs given as dicts; missing fields raise NVMLError."""
    def field(key):
        def get(handle, *args):
            if handle.get(key) is None:
                raise FakeNVMLError("Not Supported")
            return handle[key]
        return get

    def nvlink_state(handle, link):
        if link >= handle["links"]:
            raise FakeNVMLError("Not Supported")
        return 1

    return SimpleNamespace(
        NVMLError=FakeNVMLError, NVML_TEMPERATURE_GPU=0, NVML_NVLINK_MAX_LINKS=18, NVML_FEATURE_ENABLED=1,
        nvmlInit=lambda: None, nvmlShutdown=lambda: None, nvmlSystemGetDriverVersion=lambda: b"550.54.15",
        nvmlDeviceGetCount=lambda: len(gpus), nvmlDeviceGetHandleByIndex=lambda i: gpus[i],
        nvmlDeviceGetName=field("name"), nvmlDeviceGetTemperature=field("temp"),
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(used=2 * 2**30, total=80 * 2**30),
        nvmlDeviceGetUtilizationRates=lambda h: SimpleNamespace(gpu=h["util"]),
        nvmlDeviceGetNvLinkState=nvlink_state)


GPUS = [{"name": b"NVIDIA H100 80GB HBM3", "util": 37, "temp": 41, "links": 18},
        {"name": "Tesla T4", "util": 0, "temp": None, "links": 0}]


def test_nvml_report_lists_each_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(GPUS))
    lines, note = envcheck.nvml_gpus()
    assert note is None
    assert lines == ["GPU 0: NVIDIA H100 80GB HBM3, 2.0/80.0 GiB used, util 37%, 41 C, driver 550.54.15, "
                     "NVLink 18 links active",
                     "GPU 1: Tesla T4, 2.0/80.0 GiB used, util 0%, ? C, driver 550.54.15, NVLink not supported"]


def test_nvml_absent_or_without_driver_is_a_skip_with_the_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` fail
    assert envcheck.nvml_gpus() == ([], "pynvml is not installed (pip install 'seqrec[gpu]')")
    no_driver = fake_pynvml([])
    no_driver.nvmlInit = lambda: (_ for _ in ()).throw(FakeNVMLError("NVML Shared Library Not Found"))
    monkeypatch.setitem(sys.modules, "pynvml", no_driver)
    why = "NVML unavailable (NVML Shared Library Not Found): no NVIDIA driver on this machine"
    assert envcheck.nvml_gpus() == ([], why)
    lines, checks = envcheck.environment(use_cuda=False)
    assert checks[0] == Check("NVML", SKIP, why)
    assert any("torch sees no GPU" in line for line in lines)


def test_torch_gpu_lines_and_peer_access(monkeypatch):
    """The CUDA branch with torch.cuda faked: 2 GPUs, peer access one way only."""
    props = SimpleNamespace(name="NVIDIA A100-SXM4-40GB", major=8, minor=0, total_memory=40 * 2**30)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    monkeypatch.setattr(torch.cuda, "can_device_access_peer", lambda i, j: (i, j) == (0, 1))
    assert envcheck.torch_gpus() == ["cuda:0: NVIDIA A100-SXM4-40GB, compute capability 8.0, 40.0 GiB",
                                     "cuda:1: NVIDIA A100-SXM4-40GB, compute capability 8.0, 40.0 GiB",
                                     "P2P access: 1/2 GPU pairs (none for 1->0)"]
    monkeypatch.setattr(dist, "available_backends", lambda: {"gloo": True, "nccl": False})
    checks = {c.name: c for c in envcheck.environment(use_cuda=True)[1]}
    assert checks["CUDA"] == Check("CUDA", PASS, "2 GPU(s) usable")
    assert checks["NCCL"] == Check("NCCL", FAIL, "this torch build has no NCCL")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where torch has no CUDA")
def test_gpus_that_torch_cannot_use_fail_unless_hidden(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(GPUS))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    cuda = {c.name: c for c in envcheck.environment(use_cuda=False)[1]}["CUDA"]
    assert cuda.status == FAIL and "NVML sees 2 GPU(s)" in cuda.detail
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # hidden on purpose
    assert {c.name: c for c in envcheck.environment(use_cuda=False)[1]}["CUDA"].status == SKIP


def test_message_sizes_parse():
    assert envcheck.parse_sizes("1K,1M,64M") == [1024, 1 << 20, 64 << 20]
    assert envcheck.parse_sizes("512, 2kb") == [512, 2048]
    for bad in ("0", "1X", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            envcheck.parse_sizes(bad)
