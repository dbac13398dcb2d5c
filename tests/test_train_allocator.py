"""`retain_freed_memory`: freed large tensors are reused instead of being faulted in afresh."""
import subprocess
import sys

import pytest

# a training step's pattern: large tensors of a few sizes allocated, touched and freed, over and over;
# the minor page faults of a second round of these allocations, after one round of warm-up
PROBE = """
import resource, sys, torch
from dsv32.train.allocator import retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory()
sizes = [64, 40, 48, 64, 40, 64, 48, 40]  # MB, above glibc's largest mmap threshold (32 MB)
for mb in sizes:
    torch.ones(mb * 2**18).sum()  # mb MB of fp32
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for mb in sizes:
    torch.ones(mb * 2**18).sum()  # mb MB of fp32
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_freed_tensors_are_reused_without_page_faults():
    default = _faults("default")
    if default < 20_000:  # 408 MB touched (~104K pages); fewer means huge pages or another allocator already reuse
        pytest.skip(f"this machine's allocator already reuses freed blocks ({default} faults)")
    retained = _faults("retain")
    assert retained < default // 5, (default, retained)  # measured here: 104K -> 10K


def test_the_training_loop_applies_it(monkeypatch):
    """`ResumableTrainer.run_steps` turns the setting on before its first step."""
    from dsv32.train import state

    calls = []
    monkeypatch.setattr(state, "retain_freed_memory", lambda: calls.append(1) or True)

    class Stub(state.ResumableTrainer):
        class cfg:
            steps, progress = 0, False

        step = 0

        def finish(self):
            return None

    Stub().run_steps("test", ())
    assert calls == [1]
