"""Several nodes on one machine: two torchrun agents as two "nodes" (--nnodes=2, c10d rendezvous on localhost,
one process each) train the tiny preset with --parallel hsdp (a (2 nodes, 1 process) mesh: replicated across
nodes, sharded within one). One test, kept cheap for CI:
  - steps before the failure give the numbers of one node with the same world size (--parallel fsdp);
  - at step 2 the last rank kills its own torchrun agent (a node failure) and exits; the other agent's
    worker fails, that agent waits in the rendezvous, a relaunched agent joins, and both resume from the
    step-1 checkpoint: every step's numbers again equal the one-node run's.
On a cluster the agent on the rendezvous endpoint's host hosts the c10d store; here the test process hosts
it, so that whichever agent the hook kills, the store survives (see scale/README.md, "Several nodes")."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")

import torch.distributed as dist  # noqa: E402

from scale.tiny import make_tiny_assets  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = Path(sys.executable).with_name("torchrun")
# a fresh worker store every rendezvous round: torchrun's shared store does not survive losing its host node
ENV = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                    "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
TRAIN = ["scale/train.py", "--preset", "tiny", "--max-steps", "3", "--resume"]
METRICS = ("loss", "kl", "clip_frac", "ratio_mean", "ratio_max", "grad_norm", "masked_tokens", "reward_mean", "reward_std")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _steps(out):
    """The last record of every step in <out>/log.jsonl (a resumed step is logged again), and the events."""
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in log if "event" not in r}, [r for r in log if "event" in r]


def _run_folder(tmp_path, name, assets):
    out = tmp_path / name
    out.mkdir()
    shutil.copytree(assets, out / "tiny_assets")
    return out


def test_two_nodes_hsdp_match_one_node_and_resume_after_a_killed_agent(tmp_path):
    assets = make_tiny_assets(tmp_path / "assets")
    one = _run_folder(tmp_path, "one_node", assets)
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node=2", *TRAIN, "--parallel", "fsdp", "--out", str(one)]
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]

    two = _run_folder(tmp_path, "two_nodes", assets)
    port = _free_port()
    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)  # the rendezvous store
    agent = [str(TORCHRUN), "--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
             "--rdzv-id=two_nodes", "--rdzv-conf=is_host=0,join_timeout=120", "--max-restarts=1",
             *TRAIN, "--parallel", "hsdp", "--out", str(two), "--fail-at-step", "2", "--fail-kills-agent"]
    logs = [open(tmp_path / f"agent{i}.log", "w") for i in range(3)]
    agents = [subprocess.Popen(agent, cwd=ROOT, env=ENV, stdout=logs[i], stderr=subprocess.STDOUT) for i in range(2)]
    killed, deadline = None, time.time() + 400
    try:
        while any(a.poll() is None for a in agents):
            assert time.time() < deadline, "the two-node run did not finish in 400 s (a hang?)"
            for i, a in enumerate(agents):
                if a.poll() == -9 and killed is None:  # the hook killed this agent: a new node takes its place
                    killed = i
                    agents[i] = subprocess.Popen(agent, cwd=ROOT, env=ENV, stdout=logs[2], stderr=subprocess.STDOUT)
            time.sleep(0.2)
    finally:
        for a in agents:
            if a.poll() is None:
                a.kill()
        for f in logs:
            f.close()
        del store
    output = "\n".join((tmp_path / f"agent{i}.log").read_text()[-2000:] for i in range(3))
    assert killed is not None, f"no agent was killed:\n{output}"
    assert [a.returncode for a in agents] == [0, 0], output

    reference, _ = _steps(one)
    steps, events = _steps(two)
    # torch elastic may restart a finished worker group once more when a late node is still registered as
    # waiting (a membership change); such a restart resumes at the last step and has nothing left to do
    assert [e["event"] for e in events][:3] == ["start", "resume", "done"]
    late = events[3:]
    assert [e["event"] for e in late] == ["resume", "done"] * (len(late) // 2)
    assert all(e["step"] == 3 for e in late if e["event"] == "resume")
    assert events[0]["parallel"] == "hsdp" and events[0]["mesh"] == [2, 1]  # (nodes, processes per node)
    assert events[1]["step"] == 1 and events[1]["rng_restored"]
    assert sorted(steps) == sorted(reference) == [1, 2, 3]
    for step, r in steps.items():
        for k in METRICS:
            # FSDP over (2,) and HSDP over (2, 1) sum the gradient norm's squares in another order: last bits only
            assert r[k] == pytest.approx(reference[step][k], rel=1e-6, abs=1e-12), (step, k)
        assert r["sample"] == reference[step]["sample"]
