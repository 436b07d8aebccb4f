"""Defects of the CUDA path, each reproduced and checked on CPU.

Where the code under test asks CUDA something (device capability, RNG state, LOCAL_RANK's
GPU), torch.cuda is replaced by a small fake that answers as a GPU machine would; the logic
that runs on the answer is the real one.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.multiprocessing as mp

from conftest import assert_close_parameters, small_config, train_losses
from seqrec import checkpoint as ckpt
from seqrec import distributed as dist
from seqrec import trainer as trainer_module
from seqrec.cli import claim_run, configure_backends, load_data, run
from seqrec.devices import resolve_device
from seqrec.config import ConfigError, TrainConfig
from seqrec.distributed import become_local_rank, free_port
from seqrec.trainer import Trainer, TrainingError, resolve_amp


def test_resume_reads_the_checkpoint_on_cpu_whatever_the_device(data_file, tmp_path):
    """RNG states must reach torch.set_rng_state as CPU ByteTensors: a checkpoint mapped to the
    training device (here 'meta', standing in for CUDA) made every CUDA resume crash."""
    run(small_config(data_file, tmp_path / "r", train__num_epochs=1))
    cfg = small_config(data_file, tmp_path / "r", train__num_epochs=2, run__resume=True)
    state = claim_run(cfg, tmp_path / "r")
    assert all(t.device.type == "cpu" for r in state["rng"] for t in r.values())
    data, seqs = load_data(cfg, torch.device("cpu"))
    trainer = Trainer(cfg, data, torch.device("cpu"), tmp_path / "r", list(seqs.item_ids.astype(str)))
    trainer.device = torch.device("meta")  # what the RNG restore is asked to serve
    trainer.resume(state)
    assert trainer.step == 4


class FakeCuda:
    """The torch.cuda calls the RNG and AMP code make, answered as on a 2-GPU machine."""

    def __init__(self, capability=(8, 0)):
        self.states = {0: torch.tensor([0], dtype=torch.uint8), 1: torch.tensor([1], dtype=torch.uint8)}
        self.capability = capability

    def get_rng_state(self, device):
        return self.states[torch.device(device).index].clone()

    def set_rng_state(self, state, device):
        assert state.device.type == "cpu"
        self.states[torch.device(device).index] = state

    def get_rng_state_all(self):
        raise AssertionError("a rank must save its own GPU's state, not every visible GPU's")

    def set_rng_state_all(self, states):
        raise AssertionError("a rank must restore its own GPU's state only")

    def get_device_capability(self, device=None):
        return self.capability

    is_available = staticmethod(lambda: True)
    is_initialized = staticmethod(lambda: True)
    current_device = staticmethod(lambda: 0)


def test_each_rank_saves_and_restores_only_its_own_gpu_rng(monkeypatch):
    fake = FakeCuda()
    monkeypatch.setattr(ckpt.torch, "cuda", fake)
    state = ckpt.rng_state(torch.device("cuda", 1))
    assert torch.equal(state["cuda"], torch.tensor([1], dtype=torch.uint8))
    fake.states[1] = torch.tensor([9], dtype=torch.uint8)
    ckpt.set_rng_state(state, torch.device("cuda", 1))
    assert fake.states == {0: torch.tensor([0], dtype=torch.uint8), 1: torch.tensor([1], dtype=torch.uint8)}
    # A checkpoint of the older format (every visible GPU's state) gives this GPU its own entry.
    ckpt.set_rng_state({"torch": torch.get_rng_state(), "cuda": [torch.tensor([5], dtype=torch.uint8)] * 2},
                       torch.device("cuda", 1))
    assert fake.states[1].item() == 5
    assert "cuda" not in ckpt.rng_state(torch.device("cpu"))


def test_a_changed_world_size_is_said_in_one_line(data_file, tmp_path, capsys):
    run(small_config(data_file, tmp_path / "r", train__num_epochs=1))
    state = ckpt.load(tmp_path / "r" / "latest.pt")
    state["rng"] = state["rng"] * 2  # as written by two ranks
    state["epoch_loss"] = state["epoch_loss"] * 2
    cfg = small_config(data_file, tmp_path / "r", train__num_epochs=2, run__resume=True)
    data, seqs = load_data(cfg, torch.device("cpu"))
    Trainer(cfg, data, torch.device("cpu"), tmp_path / "r", list(seqs.item_ids.astype(str))).resume(state)
    lines = [line for line in capsys.readouterr().out.splitlines() if "rank(s)" in line]
    assert len(lines) == 1 and "written by 2 rank(s) and resumes on 1" in lines[0]


def test_a_torchrun_restart_resumes_even_with_overwrite(data_file, tmp_path, monkeypatch):
    """--overwrite is a request about the first start; a restart that deleted the run would
    throw away everything the failed round trained."""
    run(small_config(data_file, tmp_path / "r", train__num_epochs=1))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    run(small_config(data_file, tmp_path / "r", train__num_epochs=2, run__overwrite=True))
    rows = [json.loads(line) for line in (tmp_path / "r" / "runs.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 4]  # the restart continued at step 4
    assert [r["epoch"] for r in map(json.loads, (tmp_path / "r" / "metrics.jsonl").read_text().splitlines())
            if r["type"] == "train"] == [1, 2]


@pytest.mark.parametrize("first, then", [("off", "fp16"), ("bf16", "fp16"), ("fp16", "off"), ("fp16", "bf16")])
def test_amp_may_change_on_resume(data_file, tmp_path, capsys, first, then):
    """off/bf16 -> fp16 crashed in GradScaler.load_state_dict; fp16 -> off dropped the scale silently."""
    run(small_config(data_file, tmp_path / "r", train__num_epochs=1, train__amp=first))
    capsys.readouterr()
    run(small_config(data_file, tmp_path / "r", train__num_epochs=2, train__amp=then, run__resume=True))
    out = capsys.readouterr().out
    expected = "starting a fresh loss scaler" if then == "fp16" else "its loss scale is dropped"
    assert sum(expected in line for line in out.splitlines()) == 1
    assert (ckpt.load(tmp_path / "r" / "latest.pt")["scaler"] != {}) == (then == "fp16")


def test_explicit_gpu_under_torchrun_is_refused(monkeypatch):
    """--device cuda:0 put every rank of a node on GPU 0."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="would put all 2 local ranks on one GPU"):
        resolve_device("cuda:0")
    assert resolve_device("cuda") == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # one process per node may pick its GPU
    assert resolve_device("cuda:3") == torch.device("cuda", 3)


def test_bf16_on_a_pre_ampere_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(trainer_module.torch, "cuda", FakeCuda(capability=(7, 0)))
    with pytest.raises(TrainingError, match="compute capability 8.0 or newer"):
        resolve_amp("bf16", torch.device("cuda", 0))
    assert resolve_amp("auto", torch.device("cuda", 0)) == torch.float16
    monkeypatch.setattr(trainer_module.torch, "cuda", FakeCuda(capability=(9, 0)))
    assert resolve_amp("bf16", torch.device("cuda", 0)) == torch.bfloat16


def test_tf32_and_deterministic_switches(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        configure_backends(TrainConfig(), torch.device("cuda", 0))
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        configure_backends(TrainConfig(tf32=False, deterministic=True), torch.device("cuda", 0))
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _rank_with_own_dir(rank, world, port, cfg):
    """A rank of a 'node' whose run directory no other rank can see."""
    become_local_rank(rank, world, port)
    torch.set_num_threads(1)
    cfg.train.train_dir = f"{cfg.train.train_dir}/rank{rank}"
    run(cfg)


def test_ranks_without_a_shared_filesystem_resume_and_test_from_rank_0(data_file, tmp_path):
    """Rank 1 never sees rank 0's run directory. It used to start from step 0 while rank 0
    resumed, and its share of the final test ran its last weights instead of the best ones."""
    kw = dict(model__dropout_rate=0.0, train__eval_every=1, dist__multi_gpu=True)
    shared = small_config(data_file, tmp_path / "shared", train__num_epochs=3, **kw)
    mp.start_processes(_rank_with_own_dir, args=(2, free_port(), shared), nprocs=2, start_method="spawn")
    for epochs, resume in ((2, False), (3, True)):
        cfg = small_config(data_file, tmp_path / "split", train__num_epochs=epochs, run__resume=resume, **kw)
        mp.start_processes(_rank_with_own_dir, args=(2, free_port(), cfg), nprocs=2, start_method="spawn")
    straight, split = tmp_path / "shared" / "rank0", tmp_path / "split" / "rank0"
    a, b = ckpt.load(straight / "latest.pt"), ckpt.load(split / "latest.pt")
    assert a["step"] == b["step"]
    assert_close_parameters(a["model"], b["model"], 1e-6)
    assert train_losses(split) == pytest.approx(train_losses(straight), rel=1e-6)
    results = [json.loads((d / "results.json").read_text()) for d in (straight, split)]
    assert results[0]["test"] == pytest.approx(results[1]["test"], abs=1e-6)
    assert not list((tmp_path / "split" / "rank1").glob("*"))  # rank 1 wrote nothing of its own


def test_ddp_gradients_are_views_of_its_buckets(data_file, tmp_path, monkeypatch):
    """gradient_as_bucket_view: each gradient lives in DDP's all-reduce bucket instead of being
    copied in and out of it (one gradient-sized copy and buffer less per step)."""
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1").items():
        monkeypatch.setenv(key, value)
    cfg = small_config(data_file, tmp_path / "r", train__num_epochs=1)
    data, seqs = load_data(cfg, torch.device("cpu"))
    dist.init(torch.device("cpu"), "gloo", free_port())
    try:
        trainer = Trainer(cfg, data, torch.device("cpu"), tmp_path / "r", list(seqs.item_ids.astype(str)))
        assert trainer.ddp is not None and trainer.ddp.gradient_as_bucket_view
        trainer.train_epoch(1)
        grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
        assert grads and all(g._base is not None for g in grads)  # views into a bucket, not tensors of their own
    finally:
        dist.shutdown()
