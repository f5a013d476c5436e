"""
The command line of train.py and evaluate.py: typed flags, one-line errors, the run folder and its lock.

Bad-input policy. An expected error (a bad flag, a missing or malformed file, a damaged checkpoint, a
configuration that does not fit, a full disk) is raised as ValueError or OSError with a message that names
the flag, the file and line, or the field; `one_line_errors` prints it as ONE line on stderr and exits with
status 2, before any work where the input allows it. Any other exception is a bug and keeps its traceback.

Run folder. `claim_run_folder` checks that --out is (or can be made) a writable folder and takes its lock,
<out>/.lock, a JSON file naming the process (pid, host, torchrun run id). A second run on the same folder
is refused while the holder lives; a lock whose process is gone (killed, crashed) is stale and taken over,
and so is one left by an earlier attempt of the same torchrun run (a restart). Global rank 0 owns the lock.
"""

import argparse
import json
import math
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from scale.distributed import broadcast_object

LOCK_NAME = ".lock"

# -----------------------------------------------------------------------------
# Flags


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit status 2), not the usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def finite_float(text):
    """argparse type: a float that is neither NaN nor infinite (argparse names the flag in the error)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def flag_type(kind):
    """The argparse type for a config field of Python type `kind` (floats must be finite)."""
    return finite_float if kind is float else kind


# -----------------------------------------------------------------------------
# One-line errors


def _one_line(e):
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        text = f"{e.strerror}: {e.filename}"
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split())


@contextmanager
def one_line_errors(rank=None):
    """ValueError / OSError inside the block -> one line on stderr and exit status 2 (see the module doc)."""
    try:
        yield
    except (ValueError, OSError) as e:
        prefix = "" if rank is None else f"rank {rank}: "
        print(f"error: {prefix}{_one_line(e)}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


# -----------------------------------------------------------------------------
# The run folder and its lock


def check_out_folder(out, flag="--out"):
    """`out` is a folder we can write (created if absent); raises naming the flag otherwise."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{flag} {out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"{flag} {out}: a parent of it is a file, not a folder") from None
    except PermissionError:
        raise PermissionError(f"{flag} {out}: cannot create the folder (permission denied)") from None
    probe = out / f".write-test-{os.getpid()}"
    try:
        probe.write_text("")
        probe.unlink()
    except PermissionError:
        raise PermissionError(f"{flag} {out}: the folder is not writable") from None


def _holder():
    return dict(pid=os.getpid(), host=socket.gethostname(), run_id=os.environ.get("TORCHELASTIC_RUN_ID"),
                started=time.strftime("%Y-%m-%d %H:%M:%S"))


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _stale(held, me):
    """True if the lock `held` may be taken over by `me`: its process is gone, or it is an earlier attempt
    of the same torchrun run (a restart may also move rank 0 to another node). A held lock of another live
    run, or of another host, is not stale."""
    if held.get("run_id") is not None and held.get("run_id") == me["run_id"]:
        return True
    return held.get("host") == me["host"] and isinstance(held.get("pid"), int) and not _alive(held["pid"])


def acquire_lock(out, flag="--out"):
    """Take <out>/.lock or raise FileExistsError naming the run that holds it."""
    path, me = Path(out) / LOCK_NAME, _holder()
    while True:
        try:
            with open(path, "x") as f:  # O_CREAT | O_EXCL: one winner
                f.write(json.dumps(me))
            return path
        except FileExistsError:
            pass
        try:
            held = json.loads(path.read_text())
        except FileNotFoundError:
            continue  # released in between: try again
        except (ValueError, UnicodeDecodeError):
            held = {}  # a lock cut short by a crash while it was written
        if held and not _stale(held, me):
            raise FileExistsError(f"{flag} {out} is in use by another run (pid {held.get('pid')} on "
                                  f"{held.get('host')}, since {held.get('started')}): wait for it to end, choose "
                                  f"another {flag}, or delete {path} if that run is gone")
        path.unlink(missing_ok=True)  # stale: remove it and race for a fresh one


def release_lock(path):
    """Remove the lock if this process still holds it."""
    try:
        if json.loads(Path(path).read_text()).get("pid") == os.getpid():
            Path(path).unlink()
    except (FileNotFoundError, ValueError):
        pass


@contextmanager
def claim_run_folder(out, d, flag="--out"):
    """Check the output folder and hold its lock for the duration of the block. Rank 0 checks and owns the
    lock; its verdict goes to every rank, so all ranks fail together (with the same one-line message)."""
    problem, lock = None, None
    if d.is_main:
        try:
            check_out_folder(out, flag)
            lock = acquire_lock(out, flag)
        except (ValueError, OSError) as e:
            problem = _one_line(e)
    problem = broadcast_object(problem, d)
    if problem is not None:
        raise ValueError(problem)
    try:
        yield Path(out)
    finally:
        if lock is not None:
            release_lock(lock)
