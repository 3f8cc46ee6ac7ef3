"""A serving process's torch thread counts: the owner thread keeps its pool while other threads run serial."""

from __future__ import annotations

import json
import subprocess
import sys

# In a child process: set_num_threads also changes the default of threads that touch torch later, which
# must not leak into this test process.
SCRIPT = r"""
import json, threading, torch
from firetitan.torch_threads import own_pool, run_serial, serial

serial()
counts = {"main": torch.get_num_threads()}
owned, helped = threading.Event(), threading.Event()

def owner():
    own_pool(2)
    torch.ones(1 << 22).mul(2).sum()  # a parallel op: this thread's team exists from here on
    counts["owner_before"] = torch.get_num_threads()
    owned.set()
    helped.wait(30)
    counts["owner_after"] = torch.get_num_threads()

def helper():
    owned.wait(30)
    counts["helper"] = run_serial(lambda: (torch.ones(1 << 22).mul(2).sum(), torch.get_num_threads())[1])
    helped.set()

threads = [threading.Thread(target=owner), threading.Thread(target=helper)]
for t in threads:
    t.start()
for t in threads:
    t.join(60)
counts["main_after"] = torch.get_num_threads()
print(json.dumps(counts))
"""


def test_serial_threads_leave_the_owner_its_pool() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120,
                          env={"OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    assert counts == {"main": 1, "owner_before": 2, "helper": 1, "owner_after": 2, "main_after": 1}
