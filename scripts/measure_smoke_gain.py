"""The seed spread behind the margin of tests/test_toy_arithmetic.py::test_smoke_run_learns_and_moves_every_parameter:
the paired gain in expected reward of its smoke run (20 GRPO steps by default) for seed = init_seed = sft_seed = 0..n-1.

    PYTHONPATH=. .venv/bin/python scripts/measure_smoke_gain.py [n_seeds] [grpo_steps]
"""

import contextlib
import io
import os
import pathlib
import statistics
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from test_toy_arithmetic import smoke_run  # noqa: E402

torch.set_num_threads(1)
gains, correct = [], []
n_seeds = int(sys.argv[1]) if len(sys.argv) > 1 else 10
grpo_steps = int(sys.argv[2]) if len(sys.argv) > 2 else 20
for seed in range(n_seeds):
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        *_, gain, gain_correct = smoke_run(pathlib.Path(tmp), grpo_steps, seed=seed, init_seed=seed, sft_seed=seed)
    gains.append(gain)
    correct.append(gain_correct)
    print(f"seed {seed}: paired gain in reward {gain:+.4f}, in exact match {gain_correct:+.4f}", flush=True)
for what, xs in (("reward", gains), ("exact match", correct)):
    mean, sd = statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0
    print(f"{grpo_steps} steps, gain in {what}: mean {mean:+.4f}, sd {sd:.4f}, min {min(xs):+.4f}, max {max(xs):+.4f}")
