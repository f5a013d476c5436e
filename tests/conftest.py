import subprocess
import sys

import pytest
import torch

# The test models are tiny (d_model 32): on a shared 2-core machine, intra-op threads only add
# synchronisation cost (measured: a 32-wide linear 7 ms with 2 busy threads, < 0.5 ms with 1).
torch.set_num_threads(1)


@pytest.fixture
def live_pid():
    """A process alive for the duration of a test (the holder of a lock, the writer of a temp file)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc.pid
    proc.kill()
    proc.wait()
