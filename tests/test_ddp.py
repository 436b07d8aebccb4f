"""Two gloo ranks on CPU train and evaluate exactly like one process."""
from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from conftest import small_config
from seqrec import checkpoint as ckpt
from seqrec.cli import run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, cfg):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    run(cfg)


@pytest.mark.parametrize("batch_size", [16, 13])  # 13: the last global batch splits unevenly
def test_two_ranks_equal_one_process(data_file, tmp_path, batch_size):
    kw = dict(train__num_epochs=2, train__batch_size=batch_size, model__dropout_rate=0.0, train__eval_every=1)
    single = run(small_config(data_file, tmp_path / "one", **kw))
    cfg = small_config(data_file, tmp_path / "two", dist__multi_gpu=True, **kw)
    mp.start_processes(_rank_main, args=(2, _free_port(), cfg), nprocs=2, start_method="spawn")
    a, b = ckpt.load(tmp_path / "one" / "latest.pt"), ckpt.load(tmp_path / "two" / "latest.pt")
    assert a["step"] == b["step"]
    for name, value in a["model"].items():
        other = b["model"][name]
        if name.endswith("qkv.bias"):
            # The key bias shifts every score of a query equally, so its true gradient is 0
            # and Adam turns float-rounding noise (order of the rank sum) into full-size steps.
            d = value.numel() // 3
            value, other = torch.cat([value[:d], value[2 * d:]]), torch.cat([other[:d], other[2 * d:]])
        assert torch.allclose(value, other, atol=1e-6, rtol=0), name
    multi = json.loads((tmp_path / "two" / "results.json").read_text())
    for split in ("valid", "test"):
        for metric, value in single[split].items():
            assert multi[split][metric] == pytest.approx(value, abs=1e-4), (split, metric)
