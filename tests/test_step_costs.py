"""A training step's GPU costs, counted on CPU (seqrec.tools.stepcost), against their targets.

At d=50, L=200, B=128 a step is ~20 us of an H100's bf16 compute: eager kernel launches and
host syncs are what it costs, so their counts are the step's speed on a GPU. Counts depend on
the code alone.
"""
from __future__ import annotations

import pytest

from seqrec.tools.opcount import count_ops
from seqrec.tools.stepcost import make_trainer, step_costs, synthetic_data

# non-view aten ops per step (~ eager kernel launches), BCE, one length bucket (the GPU default)
OPS_TARGET = {"sasrec": 400, "tisasrec": 550, "tisasrec+mhc": 1200}


@pytest.fixture(scope="module")
def data():
    return synthetic_data(num_users=300)


@pytest.mark.parametrize("variant", OPS_TARGET)
def test_step_meets_its_launch_and_sync_targets(data, variant):
    costs = step_costs(make_trainer(variant, data))
    assert costs["ops_per_step"] <= OPS_TARGET[variant], costs
    assert costs["syncs_per_step"] == 0, costs  # nothing in a step waits for the device
    # the epoch's order, the loss and non-finite counters at its end, the checkpoint's check and loss shares
    assert costs["syncs_per_epoch"] <= 4, costs


@pytest.mark.parametrize("train", [
    {"loss": "gbce", "num_negatives": 16},
    {"loss": "sampled_softmax", "num_negatives": 16, "logq": True},
    {"loss": "sampled_softmax", "num_negatives": 16, "shared_negatives": True},
    {"loss": "ce"},
    {"grad_clip": 1.0, "l2_emb": 1e-4},
    {"amp": "fp16"},
    {"grad_accum_steps": 2, "length_buckets": 2},
], ids=["gbce", "logq", "shared", "ce", "clip+l2", "fp16", "accum+buckets"])
def test_no_option_adds_a_sync_to_the_step(data, train):
    costs = step_costs(make_trainer("sasrec", data, **train))
    assert costs["syncs_per_step"] == 0, costs


def test_a_log_boundary_reads_the_device_once(data):
    trainer = make_trainer("sasrec", data)
    order = data.epoch_order(0, 1).cpu().numpy()
    trainer.train_step(order[:128], 1)
    with count_ops() as boundary:
        trainer.read_counters()
    assert boundary.syncs == 1


def test_the_counter_sees_what_would_sync():
    """The counter is what the targets rest on: each kind of host read must register."""
    import torch
    x = torch.arange(6.0)
    for read in (lambda: x.sum().item(), lambda: bool(x.any()), lambda: x[x > 2], lambda: x.nonzero(),
                 lambda: x.cpu(), lambda: x.tolist(), lambda: x.unique(), lambda: x.repeat_interleave(x.long())):
        with count_ops() as c:
            read()
        assert c.syncs >= 1
    with count_ops() as c:
        (x * 2).add_(1).softmax(0)[1:]
    assert (c.ops, c.syncs) == (3, 0)  # mul, add_, softmax; the slice is a view
