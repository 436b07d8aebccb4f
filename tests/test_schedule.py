import pytest

from seqrec.schedule import lr_at


def mult(step, warmup=4, per_epoch=10, decay_step=2, rate=0.5):
    return lr_at(step, warmup_steps=warmup, steps_per_epoch=per_epoch, decay_step=decay_step, decay_rate=rate)


@pytest.mark.parametrize("step, expected", [
    (0, 0.25), (1, 0.5), (2, 0.75), (3, 1.0), (4, 1.0),  # linear warmup over 4 steps
    (19, 1.0),  # epochs 0-1: no decay yet
    (20, 0.5), (39, 0.5),  # epochs 2-3: one decay
    (40, 0.25), (65, 0.125),  # epochs 4-5, then 6
])
def test_warmup_then_step_decay(step, expected):
    assert mult(step) == pytest.approx(expected)


def test_no_warmup_starts_at_peak():
    assert mult(0, warmup=0) == 1.0


def test_warmup_longer_than_an_epoch_composes_with_decay():
    # step 25 is in epoch 2 (decayed once) and 26/30 of the way through warmup
    assert mult(25, warmup=30) == pytest.approx(26 / 30 * 0.5)
