"""Shared toy infrastructure: command-line config, explicit generators, atomic checkpoints, metrics, plots.

Generic over the task: toy/arithmetic.py (text) and toy/shapes.py (text-to-image) both use it.

    parse_config(Config, argv)       --key=value overrides of a dataclass, -h lists every field
    run_cli(main, Config)            parse, then main(config); an expected error is ONE line on stderr
    claim_run(cfg, run_dir, ...)     before any work: usable output folders, the run folder's lock, a
                                     readable checkpoint written with the same settings
    make_generators(seed, names)     one explicit torch.Generator per source of randomness
    atomic_write                     the one writer of files: temp file beside the target, then os.replace
    save_checkpoint / load_checkpoint  torch.save through atomic_write / torch.load naming a damaged file
    Clock                            wall time that survives a resume
    train_elbo, grpo_loop            the SFT loop and the MaskGRPO loop both toys run
    write_json, plot_curves          metrics.json and a PNG of metrics against step and wall time

Bad-input policy. An expected error is a ConfigError (a bad flag or value, a setting that does not fit,
a checkpoint written with other settings) or a RunError (an output folder that is a file or not
writable, a run folder in use, a damaged checkpoint or cache, a full disk); its message names the field
or the file and what to do, and run_cli prints it as one line and exits with status 1, before any
training where the input allows it. Any other exception is a bug and keeps its traceback.
"""

import contextlib
import copy
import dataclasses
import errno
import hashlib
import inspect
import json
import math
import os
import pickle
import re
import secrets
import socket
import sys
import time
import types
import typing

import torch
from tqdm import tqdm

import maskgrpo

# -----------------------------------------------------------------------------
# Config: a dataclass with commented defaults, overridden by --key=value


class ConfigError(ValueError):
    """Bad command-line input: an unknown key, a value of the wrong type, or a value the config rejects."""


class RunError(RuntimeError):
    """An expected failure the user can fix: an output folder that is a file or not writable, a run folder
    in use, a damaged checkpoint or cache, a full disk. The message names the file and what to do."""


def check_finite(config):
    """Every float field of a config dataclass is finite: a NaN or inf setting is refused by name here,
    rather than surfacing (if at all) as NaN weights many steps later."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{f.name} must be a finite number, got {value}")


def field_comments(cls):
    """{field name: its trailing comment} and [(field index, section title)] read from the class source
    (base classes first). A field line looks like `name: type = default  # comment`; a line holding only
    `# ...` titles the fields after it. Reading stops at the first method."""
    order = [f.name for f in dataclasses.fields(cls)]
    comments, sections = {}, []
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        pending = []
        for line in inspect.getsource(klass).splitlines()[1:]:
            if re.match(r"\s+(def |@)", line):
                break
            if (m := re.match(r"\s+(\w+)\s*:[^#]*?#\s*(.*)$", line)) and m[1] in order:
                comments[m[1]] = m[2]
                sections += [(order.index(m[1]), title) for title in pending]
                pending = []
            elif m := re.match(r"\s+#\s*(.*)$", line):
                pending.append(m[1])
    return comments, sections


def _parse_value(text, kind, default):
    """Convert one command-line string to the field's type; ValueError when it does not fit. Floats must be
    finite; an optional field (`float | None`) takes `none`."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        options = [k for k in typing.get_args(kind) if k is not type(None)]
        if len(options) != 1:
            raise ValueError(f"fields of type {kind} cannot be set from the command line")
        if type(None) in typing.get_args(kind) and text.lower() == "none":
            return None
        try:
            return _parse_value(text, options[0], default)
        except ValueError as e:
            raise ValueError(f"{e} or none") from None
    if kind is float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError("expected float") from None
        if not math.isfinite(value):
            raise ValueError("expected a finite float (NaN and inf are refused)")
        return value
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError("expected a bool (true/false)")
    if kind in (int, str):
        try:
            return kind(text)
        except ValueError:
            raise ValueError(f"expected {kind.__name__}") from None
    if typing.get_origin(kind) is tuple or kind is tuple:
        parts = [p for p in text.split(",") if p]
        if len(parts) != len(default):
            raise ValueError(f"expected {len(default)} comma-separated values")
        return tuple(_parse_value(p, type(d), d) for p, d in zip(parts, default, strict=True))
    raise ValueError(f"fields of type {kind} cannot be set from the command line")


def help_text(cls, prog, doc=""):
    comments, sections = field_comments(cls)
    hints = typing.get_type_hints(cls)
    lines = ([doc.strip(), ""] if doc else []) + [f"usage: python {prog} [--key=value ...]", ""]
    for i, f in enumerate(dataclasses.fields(cls)):
        lines += [f"  {title}" for at, title in sections if at == i]
        kind = getattr(hints[f.name], "__name__", str(hints[f.name]))
        lines.append(f"    {f'--{f.name}={_default(f)}':<34} {kind:<6} {comments.get(f.name, '')}")
    return "\n".join(lines)


def _default(f):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def parse_config(cls, argv, prog="script", doc=""):
    """Build `cls` from its defaults and `--key=value` arguments. `-h` / `--help` prints every field with
    its default and comment and exits. Raises ConfigError naming the key and value on bad input."""
    if any(a in ("-h", "--help") for a in argv):
        print(help_text(cls, prog, doc))
        raise SystemExit(0)
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for arg in argv:
        m = re.fullmatch(r"--([A-Za-z_]\w*)=(.*)", arg, flags=re.S)
        if not m:
            raise ConfigError(f"argument {arg!r} is not of the form --key=value (see -h)")
        key, text = m[1], m[2]
        if key not in known:
            raise ConfigError(f"unknown config key {key!r} (in {arg!r}); valid keys: {', '.join(known)}")
        try:
            values[key] = _parse_value(text, hints[key], _default(known[key]))
        except ValueError as e:
            raise ConfigError(f"bad value {text!r} for --{key}: {e}") from None
    try:
        return cls(**values)
    except ValueError as e:  # the config's own validation (__post_init__)
        raise ConfigError(f"invalid config ({', '.join(f'--{k}={v}' for k, v in values.items()) or 'defaults'}): {e}") from None


def run_cli(main, cls, argv=None, prog=None, doc=""):
    """Parse argv into `cls` and call main(config). An expected error (ConfigError, RunError), from parsing
    or from main, ends the process with ONE line on stderr and exit status 1; any other keeps its traceback."""
    argv = sys.argv[1:] if argv is None else argv
    prog = prog or os.path.basename(sys.argv[0])
    try:
        return main(parse_config(cls, argv, prog, doc))
    except (ConfigError, RunError) as e:
        raise SystemExit(f"{prog}: error: {' '.join(str(e).split())}") from None


def subconfig(cls, cfg, **overrides):
    """An instance of dataclass `cls` from the same-named fields of `cfg` (e.g. maskgrpo.GRPOConfig)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in dataclasses.asdict(cfg).items() if k in names} | overrides)


def config_hash(values):
    """A short, stable hash of a JSON-able dict (keys of a cached checkpoint)."""
    return hashlib.sha1(json.dumps(values, sort_keys=True).encode()).hexdigest()[:10]


# -----------------------------------------------------------------------------
# Threads and randomness


def set_threads(requested):
    """Use at most `requested` intra-op threads and never more than the cores this process may run on."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, min(requested, cores)))
    return torch.get_num_threads()


def make_generators(seed, names, device="cpu"):
    """One torch.Generator per named source of randomness, each seeded from (seed, name).
    No global RNG is used, so a run is reproduced from its seed and resumed from the generators' states."""
    return {name: torch.Generator(device).manual_seed(int(config_hash(dict(seed=seed, name=name)), 16)) for name in names}


def generator_states(generators):
    return {name: g.get_state() for name, g in generators.items()}


def restore_generators(generators, states):
    for name, g in generators.items():
        g.set_state(states[name])


# -----------------------------------------------------------------------------
# Files: one atomic writer, checkpoints that name a damaged file


def _alive(pid):
    """True while process `pid` exists on this machine (a zombie counts; someone else's process too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _disk_full(e):
    """True if `e`, or an exception it wraps (torch.save reports a failed write as a RuntimeError whose
    context is the OSError), is running out of space."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def remove_stale_temps(folder, name):
    """Delete the temp files `.<name>.tmp-<pid>-*` that saves of `name` left in `folder` when their process
    was killed mid-write. A temp of a live process (a concurrent save) is kept. Returns the removed paths."""
    removed = []
    for entry in os.listdir(folder):
        m = re.fullmatch(re.escape(f".{name}.tmp-") + r"(\d+)-\w+", entry)
        if m and int(m[1]) != os.getpid() and not _alive(int(m[1])):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(folder, entry))
                removed.append(os.path.join(folder, entry))
    return removed


def atomic_write(path, write, mode="wb"):
    """The toys' one writer of files: write(f) fills a temp file beside `path` (named after it and this
    process), which then replaces `path` (os.replace), so a kill mid-write leaves the previous file intact.
    Temps of earlier interrupted saves of `path` are removed first, this save's own temp when it fails.
    Running out of space raises RunError naming `path`."""
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        os.makedirs(folder, exist_ok=True)
        remove_stale_temps(folder, name)
        with open(tmp, mode) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if _disk_full(e):
            raise RunError(f"no space left on device while writing {path}: free some space, then rerun the same "
                           "command (the previous version of the file is intact)") from None
        raise


def save_checkpoint(obj, path):
    """torch.save through atomic_write."""
    atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path, keys=(), remedy="delete it and run again"):
    """torch.load of a file written by save_checkpoint. A file that is truncated, damaged, not a checkpoint,
    or lacks one of `keys` raises RunError naming the file and what to do (`remedy`)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError:
        raise RunError(f"{path} cannot be read (permission denied); {remedy}") from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError, pickle.UnpicklingError) as e:  # the type depends on the cut
        raise RunError(f"{path} is truncated or damaged ({type(e).__name__}: {str(e)[:80]}); {remedy}") from None
    missing = [k for k in keys if not isinstance(state, dict) or k not in state]
    if missing:
        raise RunError(f"{path} is not a checkpoint of this toy (no {', '.join(missing)}); {remedy}")
    return state


def write_json(obj, path):
    """json.dump through atomic_write."""
    atomic_write(path, lambda f: json.dump(obj, f, indent=1), mode="w")


def plot_curves(records, path, keys, title=""):
    """One row per metric key, plotted against `step` (left) and `time` in seconds (right), on a Figure of
    its own (no pyplot state, no backend switch). records: a list of dicts; a record without a key is
    skipped for that key (eval vs train rows)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 2.6 * len(keys)))
    axes = fig.subplots(len(keys), 2, squeeze=False)
    for row, key in enumerate(keys):
        rows = [r for r in records if key in r]
        for col, x in enumerate(("step", "time")):
            ax = axes[row][col]
            ax.plot([r[x] for r in rows], [r[key] for r in rows], marker="o" if len(rows) < 30 else None, ms=3)
            ax.set_xlabel("GRPO step" if x == "step" else "wall time (s)")
            ax.set_ylabel(key)
            ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))


# -----------------------------------------------------------------------------
# The run folder: checked before any work, locked while a run uses it

LOCK_NAME = ".lock"
RUN_KEYS = ("config", "model", "optimizer", "generators", "records", "step")  # what save_run writes
LOCATION = ("out_root", "run_name")  # where a run lives, not how it trains: a resume may name it differently


def check_folder(path, flag):
    """`path` is a folder this process can write (created when absent); RunError naming `flag` otherwise."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise RunError(f"{flag}: {path} is a file, not a folder; choose another {flag}")
    try:
        os.makedirs(path, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise RunError(f"{flag}: cannot create {path}, a part of the path is a file; choose another {flag}") from None
    except PermissionError:
        raise RunError(f"{flag}: cannot create {path} (permission denied); choose another {flag}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise RunError(f"{flag}: {path} is not writable; choose another {flag}")


def acquire_lock(run_dir):
    """Create run_dir/.lock holding this process's pid and host, or raise RunError naming the run that holds
    it. A lock whose process is gone on this host (killed, crashed) is stale: it is taken over."""
    path = os.path.join(run_dir, LOCK_NAME)
    me = dict(pid=os.getpid(), host=socket.gethostname(), started=time.strftime("%Y-%m-%d %H:%M:%S"))
    while True:
        try:
            with open(path, "x") as f:  # O_CREAT | O_EXCL: one winner
                json.dump(me, f)
            return path
        except FileExistsError:
            pass
        try:
            with open(path) as f:
                held = json.load(f)
        except FileNotFoundError:
            continue  # released in between: try again
        except (ValueError, UnicodeDecodeError):
            held = {}  # a lock cut short by a kill while it was written
        stale = not held or not isinstance(held, dict) or (
            held.get("host") == me["host"] and isinstance(held.get("pid"), int) and not _alive(held["pid"]))
        if not stale:
            raise RunError(f"run folder {run_dir} is in use by another run (pid {held.get('pid')} on "
                           f"{held.get('host')}, since {held.get('started')}): wait for it to end, choose another "
                           f"--run_name, or delete {path} if that run is gone")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # stale: remove it and race for a fresh one


def release_lock(path):
    """Remove the lock if this process still holds it."""
    with contextlib.suppress(FileNotFoundError, ValueError, OSError):
        with open(path) as f:
            held = json.load(f)
        if held.get("pid") == os.getpid():
            os.unlink(path)


@contextlib.contextmanager
def claim_run(cfg, run_dir, resumable):
    """Everything a run needs that can be checked before any work (tokenizer or SFT training), held for the
    block: cfg.out_root and run_dir are writable folders, run_dir/.lock is ours, and when resuming, the
    checkpoint run_dir/ckpt.pt is readable and was written with the same settings (read_run)."""
    try:
        check_folder(cfg.out_root, "--out_root")
        check_folder(run_dir, "--run_name")
        lock = acquire_lock(run_dir)
    except OSError as e:
        if _disk_full(e):
            raise RunError(f"no space left on device in {run_dir}: free some space, then rerun the same command") from None
        raise
    try:
        ckpt_path = os.path.join(run_dir, "ckpt.pt")
        if cfg.resume and os.path.exists(ckpt_path):
            read_run(ckpt_path, cfg, resumable)
        yield
    finally:
        release_lock(lock)


# -----------------------------------------------------------------------------
# Training loops, run state, clock

def train_elbo(model, batch_loss, *, steps, learning_rate, warmup, progress=True):
    """The toys' SFT loop: AdamW (0.9, 0.99), lr warmed up linearly then cosine-decayed to 10% of the peak,
    gradients clipped at 1. batch_loss() draws a batch and returns its ELBO loss. Returns (losses, seconds)."""
    opt = torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=(0.9, 0.99), weight_decay=0.0)
    losses, start = [], time.perf_counter()
    bar = tqdm(range(steps), desc="SFT", disable=not progress, dynamic_ncols=True)
    for step in bar:
        # lr = peak * min((step + 1) / warmup, 0.1 + 0.45 (1 + cos(pi * frac))), frac = progress after warm-up
        frac = max(0.0, (step - warmup) / max(steps - warmup, 1))
        for group in opt.param_groups:
            group["lr"] = learning_rate * min((step + 1) / max(warmup, 1), 0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
        loss = batch_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    return losses, time.perf_counter() - start


def save_run(path, cfg, model, optimizer, generators, records, step):
    """The whole state of a training run (settings, weights, optimiser, generator states, metrics, step), atomically."""
    save_checkpoint(dict(config=dataclasses.asdict(cfg), model=model.state_dict(), optimizer=optimizer.state_dict(),
                         generators=generator_states(generators), records=records, step=step), path)


def read_run(path, cfg, resumable):
    """The state save_run wrote at `path`, checked: a readable checkpoint of a run, written with the same
    settings as `cfg` except the fields in `resumable` and the run's location (out_root and run_name: the
    same folder may be given by a relative or an absolute path, or moved). ConfigError or RunError otherwise."""
    state = load_checkpoint(path, RUN_KEYS, remedy="delete it to start this run over, or choose another --run_name")
    diff = {k: (v, getattr(cfg, k)) for k, v in state["config"].items()
            if k not in resumable and k not in LOCATION and hasattr(cfg, k) and getattr(cfg, k) != v}
    if diff:
        raise ConfigError(f"{path} was written with other settings {diff} (saved, now); "
                          "rerun with the saved values to resume it, or choose another --run_name")
    return state


def resume_run(path, cfg, resumable, model, optimizer, generators):
    """Restore a run saved by save_run into model, optimizer and generators, so that it continues exactly.
    A checkpoint written with other settings is refused (read_run). Returns (records, step)."""
    state = read_run(path, cfg, resumable)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    restore_generators(generators, state["generators"])
    return state["records"], state["step"]


class Clock:
    """Seconds of wall time of a run, continued across resumes (`Clock(offset=saved_seconds)`)."""

    def __init__(self, offset=0.0):
        self.offset, self.start = offset, time.perf_counter()

    def __call__(self):
        return self.offset + time.perf_counter() - self.start


def load_or_train(path, key, model, train, what, log=print):
    """`model` with the weights cached at `path`; when missing, train() -> (trained model, losses, seconds)
    runs and its result is cached (atomically) with `key`. A damaged cache raises RunError naming it.
    Returns (model, dict(seconds, cached, path, losses))."""
    if os.path.exists(path):
        remedy = f"delete it and rerun: the {what} is trained again"
        saved = load_checkpoint(path, ("model", "seconds", "losses"), remedy)
        try:
            model.load_state_dict(saved["model"])
        except RuntimeError as e:
            raise RunError(f"{path} does not fit this {what} ({str(e).splitlines()[0][:80]}); {remedy}") from None
        log(f"{what} loaded from {path} (trained in {saved['seconds']:.0f} s)")
        return model, dict(seconds=saved["seconds"], cached=True, path=path, losses=saved["losses"])
    model, losses, seconds = train()
    save_checkpoint(dict(model=model.state_dict(), losses=losses, seconds=seconds, key=key), path)
    return model, dict(seconds=seconds, cached=False, path=path, losses=losses)


def grpo_loop(cfg, policy, run_dir, resumable, rollout, evaluate, heldout_key, log=print):
    """MaskGRPO from the SFT model `policy`, the loop both toys share: per step, a rollout batch, then
    maskgrpo.grpo_step; a held-out evaluation every eval_every steps, a checkpoint every ckpt_every.
    Resumes exactly from run_dir/ckpt.pt when cfg.resume and it exists (settings outside `resumable`
    must match). The task supplies
      rollout(gens) -> (batch: maskgrpo.Completions, rewards (N,), record: task metrics, postfix: bar extras),
        drawing prompts from gens["prompts"] and samples from gens["rollout"];
      evaluate() -> (record: held-out metrics incl. `heldout_key`, summary: str, extra lines to log).
    Returns the list of metric records (train rows every step, eval rows every eval_every steps)."""
    g = cfg.grpo()
    reference = copy.deepcopy(policy).requires_grad_(False) if g.beta > 0 else None  # the frozen SFT model
    optimizer = maskgrpo.make_optimizer(policy, g)
    gens = make_generators(cfg.seed, ["prompts", "rollout", "masks"], getattr(cfg, "device", "cpu"))
    records, step, ckpt_path = [], 0, os.path.join(run_dir, "ckpt.pt")
    if cfg.resume and os.path.exists(ckpt_path):
        records, step = resume_run(ckpt_path, cfg, resumable, policy, optimizer, gens)
        log(f"resumed {ckpt_path} at GRPO step {step}")
    clock = Clock(records[-1]["time"] if records else 0.0)

    def run_eval(at):
        record, summary, lines = evaluate()
        records.append(dict(step=at, time=clock()) | record)
        log(f"step {at}: {summary} ({clock():.0f} s)")
        for line in lines:
            log(line)
        write_json(dict(config=dataclasses.asdict(cfg), records=records), os.path.join(run_dir, "metrics.json"))

    if step == 0 and not records:
        run_eval(0)
    bar = tqdm(range(step + 1, cfg.grpo_steps + 1), desc="GRPO", initial=step, total=cfg.grpo_steps,
               disable=not cfg.progress, dynamic_ncols=True)
    for step in bar:
        batch, rewards, record, postfix = rollout(gens)  # 1-2. generate, reward
        # 3-4. advantages, old / reference log-probs on shared masks, mu clipped updates
        stats = maskgrpo.grpo_step(policy, optimizer, batch, rewards, g, gens["masks"], reference)
        records.append(dict(step=step, time=clock()) | record | stats)
        heldout = next(r[heldout_key] for r in reversed(records) if heldout_key in r)
        bar.set_postfix(reward=f"{stats['reward_mean']:.2f}", kl=f"{stats['kl']:.4f}", clip=f"{stats['clip_frac']:.3f}",
                        **postfix, heldout=f"{heldout:.2f}")
        if step % cfg.eval_every == 0 or step == cfg.grpo_steps:
            run_eval(step)
        if step % cfg.ckpt_every == 0 or step == cfg.grpo_steps:
            save_run(ckpt_path, cfg, policy, optimizer, gens, records, step)
    bar.close()
    return records
