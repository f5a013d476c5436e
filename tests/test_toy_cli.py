"""Bad input to the toys (toy/arithmetic.py, toy/shapes.py): one line on stderr, a non-zero exit, no traceback,
and nothing trained or written. A table of cases, each run as the user runs it (`python toy/<name>.py ...`, a
subprocess: most of its second or two is importing torch), with tiny settings so that a check that came too
late would show up as training output, new files or a zero exit rather than a long wait.
Then the leftovers: temp files of interrupted saves, the run folder's lock, a full disk, and resume through
a relative or an absolute path to the same folder."""

import dataclasses
import errno
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from toy import arithmetic, shapes
from toy.common import (
    ConfigError,
    RunError,
    acquire_lock,
    atomic_write,
    load_checkpoint,
    parse_config,
    release_lock,
    run_cli,
    save_checkpoint,
)

ROOT = Path(__file__).resolve().parent.parent

# Settings that run in seconds (arithmetic: 2-term sums over 0..4, one GRPO step; shapes: a barely trained
# tokenizer and model). The CLI cases must fail before any of it runs.
TINY_A = dict(num_terms=2, max_operand=4, heldout_size=5, d_model=32, n_layers=1, n_heads=2, mlp_hidden_size=64,
              sft_steps=2, sft_batch_size=8, sft_warmup=1, prompts_per_step=2, num_generations=2, num_iterations=1,
              max_completion_length=8, block_length=4, diffusion_steps=4, micro_batch_size=8, eval_every=1,
              ckpt_every=1, show_mistakes=0, grpo_steps=1, progress=False, threads=1)
TINY_S = dict(fsq_steps=2, fsq_batch_size=4, fsq_images=8, fsq_width=8, sft_images=16, d_model=32, n_layers=1,
              n_heads=2, mlp_hidden_size=64, sft_steps=2, sft_batch_size=4, sft_warmup=1, diffusion_steps=4,
              grpo_steps=1, prompts_per_step=2, num_generations=2, num_iterations=1, micro_batch_size=8,
              eval_samples=1, eval_every=1, ckpt_every=1, grid_prompts=1, grid_samples=1, progress=False, threads=1)


def flags(settings):
    return [f"--{k}={v}" for k, v in settings.items()]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """out/: a finished one-step arithmetic run (its SFT cache and run folder), what the cases copy and damage."""
    base = tmp_path_factory.mktemp("toy_cli")
    arithmetic.main(arithmetic.Config(**TINY_A, out_root=str(base / "out")))
    assert (base / "out" / "maskgrpo" / "ckpt.pt").exists() and list((base / "out").glob("sft-*.pt"))
    return base


def dead_pid():
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# -----------------------------------------------------------------------------
# The table: (script, setup(tmp, base, pid of a live process) -> argv after the tiny settings, words the one
# line must contain; "{pid}" stands for that pid)


def copy_out(tmp, base):
    shutil.copytree(base / "out", tmp / "out")
    return tmp / "out"


def truncate(path, keep=0.5):
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * keep)])
    return path


def a_file(tmp):
    (tmp / "out").write_text("I am a file")
    return tmp / "out"


def damaged_ckpt(tmp, base, damage):
    damage(copy_out(tmp, base) / "maskgrpo" / "ckpt.pt")
    return [f"--out_root={tmp / 'out'}", "--grpo_steps=2"]


def damaged_sft_cache(tmp, base):
    out = copy_out(tmp, base)
    shutil.rmtree(out / "maskgrpo")  # a fresh run, which would train SFT if the cache were not there
    truncate(next(out.glob("sft-*.pt")), 0.3)
    return [f"--out_root={out}"]


def damaged_fsq_cache(tmp):
    cfg = shapes.Config(**TINY_S, out_root=str(tmp / "out"))
    path = Path(shapes.cache_path(cfg, "fsq", shapes.FSQ_KEYS)[0])
    path.parent.mkdir(parents=True)
    path.write_bytes(b"PK\x03\x04 the first bytes of a zip, then nothing")
    return [f"--out_root={tmp / 'out'}"]


def locked(tmp, run, pid):
    (tmp / "out" / run).mkdir(parents=True)
    (tmp / "out" / run / ".lock").write_text(json.dumps(dict(pid=pid, host=socket.gethostname(), started="then")))
    return [f"--out_root={tmp / 'out'}", f"--run_name={run}"]


A, S = "arithmetic", "shapes"
CASES = {
    # flags and values: finite floats, optional fields, the field named
    "nan learning rate": (A, lambda t, b, p: ["--learning_rate=nan"], ["--learning_rate", "'nan'", "finite"]),
    "inf temperature": (A, lambda t, b, p: ["--temperature=inf"], ["--temperature", "'inf'", "finite"]),
    "misspelt key": (A, lambda t, b, p: ["--temprature=1"], ["'temprature'", "valid keys"]),
    "not --key=value": (A, lambda t, b, p: ["grpo_steps=3"], ["'grpo_steps=3'", "--key=value"]),
    "optional field, bad value": (A, lambda t, b, p: ["--confidence_threshold=high"],
                                  ["--confidence_threshold", "'high'", "or none"]),
    "optional field out of range": (A, lambda t, b, p: ["--confidence_threshold=1.5"], ["confidence_threshold", "1.5"]),
    "unknown device": (A, lambda t, b, p: ["--device=gpu"], ["device", "'gpu'"]),
    # cross-field checks
    "heads do not split the width": (A, lambda t, b, p: ["--n_heads=3"], ["n_heads=3", "d_model=32"]),
    "canvas shorter than a trace": (A, lambda t, b, p: ["--max_completion_length=4", "--block_length=2"],
                                    ["max_completion_length=4", "longest trace"]),
    # the output folder
    "out_root is a file": (A, lambda t, b, p: [f"--out_root={a_file(t)}"], ["--out_root", "is a file"]),
    "out_root under a file": (A, lambda t, b, p: [f"--out_root={a_file(t) / 'sub'}"], ["--out_root", "is a file"]),
    "run folder in use": (A, lambda t, b, p: locked(t, "maskgrpo", p), ["in use", "pid {pid}", ".lock"]),
    # checkpoints and caches: the file, and what to do
    "truncated checkpoint": (A, lambda t, b, p: damaged_ckpt(t, b, truncate), ["ckpt.pt", "truncated", "delete it"]),
    "not a checkpoint": (A, lambda t, b, p: damaged_ckpt(t, b, lambda c: torch.save([1, 2], c)),
                         ["ckpt.pt", "not a checkpoint", "delete it"]),
    "checkpoint of other settings": (A, lambda t, b, p: damaged_ckpt(t, b, lambda c: None) + ["--learning_rate=0.001"],
                                     ["ckpt.pt", "other settings", "learning_rate"]),
    "truncated SFT cache": (A, lambda t, b, p: damaged_sft_cache(t, b), ["sft-", "truncated", "trained again"]),
    # the shapes toy: model sizes and tokenizer levels before the tokenizer trains
    "shapes: heads do not split the width": (S, lambda t, b, p: ["--n_heads=5"], ["n_heads=5"]),
    "shapes: nan guidance": (S, lambda t, b, p: ["--guidance_scale=nan"], ["--guidance_scale", "finite"]),
    "shapes: one-level FSQ channel": (S, lambda t, b, p: ["--fsq_levels=8,1"], ["fsq_levels", "'8,1'"]),
    "shapes: damaged tokenizer cache": (S, lambda t, b, p: damaged_fsq_cache(t), ["fsq-", "truncated", "trained again"]),
    "shapes: out_root is a file": (S, lambda t, b, p: [f"--out_root={a_file(t)}"], ["--out_root", "is a file"]),
    "shapes: run folder in use": (S, lambda t, b, p: locked(t, "maskgrpo", p), ["in use", "pid {pid}"]),
}


def files(folder):
    """{relative path: bytes} of every file under `folder` (what a case must leave untouched)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_before_any_work(name, base, tmp_path, live_pid):
    toy, setup, words = CASES[name]
    settings = flags(TINY_A if toy == A else TINY_S) + [f"--out_root={tmp_path / 'out'}"]
    argv = settings + setup(tmp_path, base, live_pid)
    before = files(tmp_path)
    proc = subprocess.run([sys.executable, str(ROOT / "toy" / f"{toy}.py"), *argv], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env=os.environ | {"PYTHONPATH": str(ROOT)})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode not in (0, None), proc.stdout + proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"{toy}.py: error: "), lines[0]
    assert all(w.format(pid=live_pid) in lines[0] for w in words), lines[0]
    assert "SFT" not in proc.stdout and "tokenizer" not in proc.stdout, proc.stdout  # nothing trained or loaded
    assert files(tmp_path) == before, "files were written or changed before the error"


def test_an_unexpected_error_keeps_its_traceback(tmp_path):
    def bug(cfg):
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        run_cli(bug, arithmetic.Config, flags(TINY_A), prog="arithmetic.py")


def test_every_float_field_refuses_nan_and_inf_by_name():
    for cls, tiny in ((arithmetic.Config, TINY_A), (shapes.Config, TINY_S)):
        floats = [f.name for f in dataclasses.fields(cls) if f.type in (float, "float")]
        assert len(floats) >= 8, floats
        for name in floats:
            for bad in (float("nan"), float("inf"), float("-inf")):
                with pytest.raises(ValueError, match=rf"^{name} must be a finite number"):
                    cls(**tiny | {name: bad})
            with pytest.raises(ConfigError, match=f"--{name}"):
                parse_config(cls, [f"--{name}=nan"])


def test_optional_fields_take_none():
    cfg = parse_config(arithmetic.Config, ["--confidence_threshold=0.9", "--cache_implementation=prefix"])
    assert cfg.confidence_threshold == 0.9
    assert parse_config(arithmetic.Config, ["--confidence_threshold=none"]).confidence_threshold is None
    with pytest.raises(ConfigError, match="--grpo_steps"):
        parse_config(arithmetic.Config, ["--grpo_steps=none"])  # not an optional field


# -----------------------------------------------------------------------------
# Leftovers: temp files of interrupted saves, a failed save, a full disk


def test_the_next_save_removes_temp_files_of_interrupted_saves(tmp_path, live_pid):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"step": 1}, path)
    killed = tmp_path / f".ckpt.pt.tmp-{dead_pid()}-0123abcd"  # what a kill -9 mid-save leaves
    running = tmp_path / f".ckpt.pt.tmp-{live_pid}-4567beef"  # a save in progress in another process
    other = tmp_path / f".metrics.json.tmp-{dead_pid()}-89abcdef"  # another file's: its own next save removes it
    for p in (killed, running, other):
        p.write_bytes(b"half a checkpoint")
    save_checkpoint({"step": 2}, path)
    assert load_checkpoint(path) == {"step": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ckpt.pt", running.name, other.name])
    atomic_write(tmp_path / "metrics.json", lambda f: f.write("{}"), mode="w")
    assert not other.exists() and running.exists()


def test_a_failed_save_keeps_the_previous_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"step": 1}, path)

    def killed_mid_write(f):
        f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, killed_mid_write)
    assert load_checkpoint(path) == {"step": 1} and [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_a_full_disk_is_one_line_naming_the_path(tmp_path, monkeypatch, capsys):
    def full_disk(obj, f):
        """torch.save on a full disk: its writer fails with a RuntimeError whose context is ENOSPC."""
        f.write(b"partial")
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc] file write failed") from None

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(RunError, match=r"^no space left on device while writing .*ckpt\.pt"):
        save_checkpoint({"step": 1}, tmp_path / "ckpt.pt")
    assert list(tmp_path.iterdir()) == []
    # end to end: the SFT cache is the first torch.save of a run
    with pytest.raises(SystemExit) as exit_:
        run_cli(arithmetic.main, arithmetic.Config, flags(TINY_A) + [f"--out_root={tmp_path / 'out'}"],
                prog="arithmetic.py")
    line = str(exit_.value)
    assert "\n" not in line and line.startswith("arithmetic.py: error: no space left on device while writing ")
    assert "sft-" in line and not list((tmp_path / "out").glob("*.pt")) and not list((tmp_path / "out").glob(".*tmp*"))
    assert not (tmp_path / "out" / "maskgrpo" / ".lock").exists()  # released on the way out


# -----------------------------------------------------------------------------
# The run folder's lock


def test_a_live_lock_refuses_and_a_stale_one_is_taken_over(base, tmp_path, live_pid):
    out = copy_out(tmp_path, base)
    lock = out / "maskgrpo" / ".lock"
    cfg = arithmetic.Config(**TINY_A | dict(grpo_steps=2), out_root=str(out))
    lock.write_text(json.dumps(dict(pid=live_pid, host=socket.gethostname(), started="then")))
    with pytest.raises(RunError, match=f"in use by another run \\(pid {live_pid} on "):
        arithmetic.main(cfg)
    lock.write_text(json.dumps(dict(pid=live_pid, host="elsewhere", started="then")))  # cannot be checked: refused
    with pytest.raises(RunError, match="in use by another run"):
        arithmetic.main(cfg)
    # the holder was killed: its lock is stale; the run takes it over, resumes, and releases it at the end
    lock.write_text(json.dumps(dict(pid=dead_pid(), host=socket.gethostname(), started="then")))
    assert arithmetic.main(cfg)["steps"] == 2 and not lock.exists()
    lock.write_text('{"pid": 12')  # a lock cut short by a kill while it was written: stale too
    assert acquire_lock(out / "maskgrpo") == str(lock) and json.loads(lock.read_text())["pid"] == os.getpid()
    release_lock(lock)
    assert not lock.exists()


# -----------------------------------------------------------------------------
# Resume: the same folder by a relative or an absolute path


def test_resume_accepts_the_folder_relative_or_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    arithmetic.main(arithmetic.Config(**TINY_A, out_root="out"))
    first = load_checkpoint(tmp_path / "out" / "maskgrpo" / "ckpt.pt")
    arithmetic.main(arithmetic.Config(**TINY_A | dict(grpo_steps=2), out_root=str(tmp_path / "out")))
    resumed = load_checkpoint(tmp_path / "out" / "maskgrpo" / "ckpt.pt")
    assert first["step"] == 1 and resumed["step"] == 2
    assert resumed["records"][: len(first["records"])] == first["records"]  # continued, times included: not restarted
    assert not any("load1" in r for r in resumed["records"])  # records carry no machine load readings
