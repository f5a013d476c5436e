"""Bad input to scale/train.py and scale/evaluate.py: one line on stderr, a non-zero exit, no traceback, and
no training or evaluation started. A table of cases on the tiny preset, each run through the command's
main(argv) in process (the code `python scale/train.py ...` runs, minus the interpreter start-up, which two
cases at the end pay to show the scripts behave the same). Each case takes well under a few seconds."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")

from scale import evaluate as E  # noqa: E402
from scale import train as T  # noqa: E402
from scale.tiny import make_tiny_assets  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny run folder with a one-step checkpoint and its LoRA adapter export: what the cases copy and damage."""
    base = tmp_path_factory.mktemp("cli")
    run = base / "run"
    run.mkdir()
    make_tiny_assets(run / "tiny_assets")
    assert T.main(["--preset", "tiny", "--out", str(run), "--max-steps", "1", "--export"]) == 0
    return base


# -----------------------------------------------------------------------------
# Setting up a case: a copy of the run folder, a damaged file, the command line


def copy_run(tmp, base):
    shutil.copytree(base / "run", tmp / "run")
    return tmp / "run"


def write(path, text):
    Path(path).write_text(text)
    return str(path)


def truncate(path, keep=0.5):
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * keep)])


def train(tmp, base, *flags):
    """train.py on a fresh run folder holding the tiny assets (no checkpoint)."""
    run = tmp / "run"
    run.mkdir(exist_ok=True)
    if not (run / "tiny_assets").exists():
        shutil.copytree(base / "run" / "tiny_assets", run / "tiny_assets")
    return T.main, ["--preset", "tiny", "--out", str(run), *flags]


def resume(tmp, base, damage):
    """train.py --resume on a copy of the run whose step-1 checkpoint `damage` spoils."""
    run = copy_run(tmp, base)
    damage(run / "checkpoints" / "step_000001")
    return T.main, ["--preset", "tiny", "--out", str(run), "--resume", "--max-steps", "2"]


def evaluate(tmp, base, *flags):
    assets = base / "run" / "tiny_assets"
    return E.main, ["--preset", "tiny", "--tokenizer", str(assets / "tokenizer.json"), "--out", str(tmp / "eval"), *flags]


def bad_config(tmp, base, **fields):
    model = tmp / "model"
    shutil.copytree(base / "run" / "tiny_assets" / "model_text", model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | fields))
    return model


def truncated_shard(tmp, base):
    model = bad_config(tmp, base)
    truncate(model / "model-00001-of-00002.safetensors", 0.001)
    return model


def gsm8k_lines(*lines):
    return "\n".join(lines) + "\n"


GOOD = json.dumps({"question": "What is 1 plus 2 ?", "answer": "3 . #### 3"})
NO_MARK = json.dumps({"question": "What is 1 plus 2 ?", "answer": "3"})

CASES = {
    # flags: finite floats, cross-field checks before any model is built
    "nan temperature": (lambda t, b: train(t, b, "--temperature", "nan"),
                        r"argument --temperature: must be a finite number, got 'nan'"),
    "inf learning rate": (lambda t, b: train(t, b, "--learning-rate", "inf"),
                          r"argument --learning-rate: must be a finite number, got 'inf'"),
    "misspelt flag": (lambda t, b: train(t, b, "--temprature", "1"), r"unrecognized arguments: --temprature 1"),
    "batch does not split into groups": (lambda t, b: train(t, b, "--batch-size", "6"),
                                         r"--num-generations=4 must divide --batch-size=6"),
    "prompt + completion longer than the model": (
        lambda t, b: train(t, b, "--max-completion-length", "512", "--diffusion-steps", "64"),
        r"--max-completion-length 512: the longest prompt \(\d+ tokens\) \+ 512 completion tokens exceed the model's "
        r"max_sequence_length=256"),
    "LoRA target not in the model": (lambda t, b: train(t, b, "--lora-targets", "q_prj,v_proj"),
                                     r"--lora-targets q_prj,v_proj: \['q_prj'\] not among the projections of a block"),
    # files
    "missing data file": (lambda t, b: train(t, b, "--data", str(t / "nowhere.jsonl")),
                          r"--data: path not found: .*nowhere.jsonl"),
    "malformed JSON line": (
        lambda t, b: train(t, b, "--data", write(t / "bad.jsonl", gsm8k_lines(GOOD, '{"question": "x", ', GOOD))),
        r"bad.jsonl, line 2: not valid JSON"),
    "GSM8K answer without ####": (
        lambda t, b: train(t, b, "--data", write(t / "nomark.jsonl", gsm8k_lines(GOOD, NO_MARK))),
        r"nomark.jsonl, line 2: the answer has no '####' marker"),
    "config.json field": (lambda t, b: train(t, b, "--model", str(bad_config(t, b, d_model="big"))),
                          r"model/config.json: field d_model='big' is not a number"),
    "unsupported config.json field": (lambda t, b: train(t, b, "--model", str(bad_config(t, b, rope=False))),
                                      r"model/config.json: field rope=False is not supported"),
    "truncated safetensors shard": (lambda t, b: train(t, b, "--model", str(truncated_shard(t, b))),
                                    r"model-00001-of-00002.safetensors: not a readable safetensors file .*download it again"),
    # checkpoints: the file, and what to do
    "truncated .distcp": (lambda t, b: resume(t, b, lambda c: truncate(c / "__0_0.distcp")),
                          r"step_000001: cannot read the DCP shards .*damaged: resume from an earlier one"),
    "truncated .metadata": (lambda t, b: resume(t, b, lambda c: truncate(c / ".metadata")),
                            r"step_000001: cannot read the DCP shards .*damaged"),
    "truncated trainer_state.json": (lambda t, b: resume(t, b, lambda c: truncate(c / "trainer_state.json")),
                                     r"trainer_state.json: not valid JSON \(.*line \d+.*\); the checkpoint .* is damaged"),
    "truncated rng state": (lambda t, b: resume(t, b, lambda c: truncate(c / "rng_rank0.pt")),
                            r"rng_rank0.pt: unreadable generator state .*delete it to reseed"),
    "checkpoint of another configuration": (
        lambda t, b: (lambda m, a: (m, [*a, "--lora-rank", "8"]))(*resume(t, b, lambda c: None)),
        r"checkpoint .*step_000001 was made with lora="),
    "resume from a folder that is no checkpoint": (lambda t, b: train(t, b, "--resume", str(t / "elsewhere")),
                                                   r"not a checkpoint \(no trainer_state.json\): .*elsewhere"),
    # the run folder
    "--out is a file": (lambda t, b: (T.main, ["--preset", "tiny", "--out", write(t / "file", "x")]),
                        r"--out .*file: exists and is not a folder"),
    "--out below a file": (lambda t, b: (T.main, ["--preset", "tiny", "--out", str(Path(write(t / "f", "x")) / "run")]),
                           r"--out .*f/run: a parent of it is a file, not a folder"),
    # evaluate.py
    "evaluate: missing data file": (lambda t, b: evaluate(t, b, "--task", "gsm8k", "--data", str(t / "nowhere.jsonl")),
                                    r"--data: not found: .*nowhere.jsonl"),
    "evaluate: malformed GenEval line": (
        lambda t, b: evaluate(t, b, "--task", "geneval", "--data", write(t / "meta.jsonl", '{"tag": "colors", "prompt"\n')),
        r"meta.jsonl, line 1: not valid JSON"),
    "evaluate: MATH500 row without answer": (
        lambda t, b: evaluate(t, b, "--task", "math500", "--data", write(t / "m.jsonl", json.dumps({"problem": "1 + 1"}) + "\n")),
        r"m.jsonl, line 1: lacks text field\(s\) \['answer'\]"),
    "evaluate: block does not divide": (lambda t, b: evaluate(t, b, "--task", "gsm8k", "--block-length", "5"),
                                        r"--block-length 5 must divide --gen-length 16"),
    "evaluate: steps do not fit the blocks": (lambda t, b: evaluate(t, b, "--task", "gsm8k", "--steps", "3"),
                                              r"--steps 3 must be a multiple of the number of blocks"),
    "evaluate: nan threshold": (lambda t, b: evaluate(t, b, "--task", "gsm8k", "--threshold", "nan"),
                                r"argument --threshold: must be a finite number, got 'nan'"),
    "evaluate: checkpoint of another model": (
        lambda t, b: evaluate(t, b, "--task", "gsm8k", "--model", str(b / "run" / "tiny_assets" / "model_t2i"),
                              "--checkpoint", str(b / "run" / "checkpoints" / "step_000001")),
        r"step_000001/trainer_state.json: the checkpoint was trained on a model with config"),
    "evaluate: adapter of another kind": (
        lambda t, b: evaluate(t, b, "--task", "gsm8k", "--adapter", str(_peft(t, b, peft_type="IA3"))),
        r"adapter/adapter_config.json: field peft_type='IA3' must be 'LORA'"),
    "evaluate: adapter and checkpoint": (
        lambda t, b: evaluate(t, b, "--task", "gsm8k", "--adapter", "a", "--checkpoint", "c"),
        r"--adapter and --checkpoint exclude each other"),
}


def _peft(tmp, base, **fields):
    adapter = tmp / "adapter"
    shutil.copytree(base / "run" / "export", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(config | fields))
    return adapter


def _state(tmp):
    """What a case may not have produced: step records, checkpoints, evaluation results."""
    log = tmp / "run" / "log.jsonl"
    steps = [line for line in log.read_text().splitlines() if '"event"' not in line] if log.is_file() else []
    checkpoints = sorted(p.name for p in (tmp / "run" / "checkpoints").glob("step_*")) if (tmp / "run").is_dir() else []
    return steps, checkpoints, (tmp / "eval" / "results.json").exists(), list((tmp / "eval" / "partial").glob("rank*"))


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_before_any_work(name, base, tmp_path, capfd):
    setup, expected = CASES[name]
    main, argv = setup(tmp_path, base)
    before = _state(tmp_path)
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capfd.readouterr().err
    lines = err.strip().splitlines()
    assert exit_.value.code not in (0, None), err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.search(expected, lines[0]), lines[0]
    steps, checkpoints, results, partial = _state(tmp_path)
    assert (steps, checkpoints) == before[:2] and not results and not partial, "work was done before the error"


def test_the_scripts_print_the_same_one_line(base, tmp_path):
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    for script, flags, expected in (("scale/train.py", ["--preset", "tiny", "--out", str(tmp_path / "t"), "--beta", "nan"],
                                     "argument --beta: must be a finite number"),
                                    ("scale/evaluate.py", ["--preset", "tiny", "--task", "gsm8k", "--out", str(tmp_path / "e"),
                                                           "--block-length", "5"], "--block-length 5 must divide")):
        proc = subprocess.run([sys.executable, script, *flags], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and expected in lines[0], proc.stderr


# -----------------------------------------------------------------------------
# The run folder: the lock refuses a live second run, stale locks are taken over; a full disk is named


def test_a_live_lock_refuses_a_second_run_and_a_stale_one_is_taken_over(base, tmp_path, capfd, live_pid):
    main, argv = train(tmp_path, base, "--max-steps", "1")
    lock = tmp_path / "run" / ".lock"
    lock.write_text(json.dumps(dict(pid=live_pid, host=socket.gethostname(), run_id=None, started="then")))
    capfd.readouterr()
    with pytest.raises(SystemExit):
        main(argv)
    line = capfd.readouterr().err.strip()
    assert re.fullmatch(rf"error: --out .*run is in use by another run \(pid {live_pid} on .*\): wait for it to end, "
                        rf"choose another --out, or delete .*\.lock if that run is gone", line), line
    assert not (tmp_path / "run" / "log.jsonl").exists()
    # the holder is gone (killed, say): its lock is stale, the next run takes it and releases it at the end
    os.kill(live_pid, 9)
    os.waitpid(live_pid, 0)
    assert main(argv) == 0 and not lock.exists()
    # a lock of another host is never taken over (its process cannot be checked from here)
    lock.write_text(json.dumps(dict(pid=live_pid, host="elsewhere", run_id=None, started="then")))
    with pytest.raises(SystemExit):
        main(argv)
    assert "in use by another run" in capfd.readouterr().err


def test_a_running_training_holds_its_folder(base, tmp_path, capfd):
    """A real second launch while the first runs: refused; once the first is killed, a resume takes over."""
    run = copy_run(tmp_path, base)
    first = subprocess.Popen([sys.executable, "scale/train.py", "--preset", "tiny", "--out", str(run), "--max-steps",
                              "500", "--save-every", "0", "--resume"], cwd=ROOT, env=os.environ | {"OMP_NUM_THREADS": "1"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import time

        deadline = time.time() + 120
        while not (run / ".lock").exists() or json.loads((run / ".lock").read_text() or "{}").get("pid") != first.pid:
            assert first.poll() is None and time.time() < deadline, "the first run did not take the lock"
            time.sleep(0.1)
        capfd.readouterr()
        with pytest.raises(SystemExit):
            T.main(["--preset", "tiny", "--out", str(run), "--resume", "--max-steps", "2"])
        assert f"in use by another run (pid {first.pid}" in capfd.readouterr().err
    finally:
        first.kill()
        first.wait()
    assert T.main(["--preset", "tiny", "--out", str(run), "--resume", "--max-steps", "2"]) == 0  # stale lock: taken


def test_a_full_disk_is_one_line_naming_the_path(base, tmp_path, capfd, monkeypatch):
    import errno

    import torch

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    main, argv = train(tmp_path, base, "--max-steps", "1")
    monkeypatch.setattr(torch, "save", no_space)  # the generator states are the checkpoint's torch.save
    capfd.readouterr()
    with pytest.raises(SystemExit):
        main(argv)
    line = capfd.readouterr().err.strip()
    assert re.fullmatch(r"error: no space left on device: .*checkpoints/step_000001", line), line
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == []  # nothing half-written kept


def test_resume_accepts_the_folder_relative_or_absolute(base, tmp_path, monkeypatch):
    main, _ = train(tmp_path, base)
    monkeypatch.chdir(tmp_path)
    assert main(["--preset", "tiny", "--out", "run", "--max-steps", "1"]) == 0
    assert main(["--preset", "tiny", "--out", str(tmp_path / "run"), "--max-steps", "2", "--resume"]) == 0
    events = [json.loads(line).get("event") for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert events == ["start", None, "done", "resume", None, "done"]
