"""seqrec.hostmem: freed activations stay in the process instead of being faulted in again."""
import os
import subprocess
import sys

import pytest

from conftest import small_config
from seqrec import hostmem
from seqrec.cli import run

# Ten steps' activations in small, as length bucketing orders them: micro-batches of growing
# width, each allocating, touching and freeing six tensors. Prints the minor page faults.
# By default every new largest block is mmapped and unmapped on free, and the heap's top is
# trimmed once the free space there passes twice the largest: each step faults much in again.
CHURN = """
import resource, torch
from seqrec import hostmem
assert not {retain} or hostmem.retain_freed_memory()
def step():
    for width in range(1, 9):
        [torch.empty(width << 17).fill_(1) for _ in range(6)]
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(retain: bool) -> int:
    env = {name: value for name, value in os.environ.items() if name not in hostmem.OWN_SETTINGS}
    run = subprocess.run([sys.executable, "-c", CHURN.format(retain=retain)], capture_output=True, text=True,
                         check=True, env=env)
    return int(run.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_freed_blocks_are_reused_without_page_faults():
    default, retained = faults(False), faults(True)
    assert default > 10_000  # measured: 52,577 (of 276,480 pages touched)
    assert retained < default / 5  # measured: 4,352


def test_the_environment_setting_wins(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert not hostmem.retain_freed_memory()


def test_training_on_cpu_sets_them(data_file, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(hostmem, "retain_freed_memory", lambda: calls.append(1) or True)
    run(small_config(data_file, tmp_path, train__num_epochs=1))
    assert calls == [1]
