"""Shared toy infrastructure: command-line config, explicit generators, atomic checkpoints, metrics, plots.

Generic over the task: toy/arithmetic.py (text) and toy/shapes.py (text-to-image) both use it.

    parse_config(Config, argv)       --key=value overrides of a dataclass, -h lists every field
    make_generators(seed, names)     one explicit torch.Generator per source of randomness
    save_checkpoint / load_checkpoint  atomic torch.save (temp file in the same folder, then os.replace)
    Clock                            wall time that survives a resume
    train_elbo, grpo_loop            the SFT loop and the MaskGRPO loop both toys run
    write_json, plot_curves          metrics.json and a PNG of metrics against step and wall time
"""

import copy
import dataclasses
import hashlib
import inspect
import json
import math
import os
import re
import sys
import tempfile
import time
import typing

import torch
from tqdm import tqdm

import maskgrpo

# -----------------------------------------------------------------------------
# Config: a dataclass with commented defaults, overridden by --key=value


class ConfigError(ValueError):
    """Bad command-line input: an unknown key, a value of the wrong type, or a value the config rejects."""


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
    """Convert one command-line string to the field's type; ValueError when it does not fit."""
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError("expected a bool (true/false)")
    if kind in (int, float, str):
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
    """Parse argv into `cls` and call main(config); bad input ends the process with a one-line error."""
    argv = sys.argv[1:] if argv is None else argv
    prog = prog or os.path.basename(sys.argv[0])
    try:
        cfg = parse_config(cls, argv, prog, doc)
    except ConfigError as e:
        raise SystemExit(f"{prog}: error: {e}") from None
    return main(cfg)


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
# Checkpoints, metrics, clock


def save_checkpoint(obj, path):
    """torch.save, atomically: a crash mid-write leaves the previous file intact."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_checkpoint(path):
    return torch.load(path, map_location="cpu", weights_only=True)


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


def resume_run(path, cfg, resumable, model, optimizer, generators):
    """Restore a run saved by save_run into model, optimizer and generators, so that it continues exactly.
    A checkpoint written with other settings (fields outside `resumable`) is refused. Returns (records, step)."""
    state = load_checkpoint(path)
    diff = {k: (v, getattr(cfg, k)) for k, v in state["config"].items() if k not in resumable and getattr(cfg, k) != v}
    if diff:
        raise ConfigError(f"{path} was written with other settings {diff} (saved, now); "
                          "use another --run_name or --resume=false")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    restore_generators(generators, state["generators"])
    return state["records"], state["step"]


def write_json(obj, path):
    """json.dump, atomically."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


class Clock:
    """Seconds of wall time of a run, continued across resumes (`Clock(offset=saved_seconds)`)."""

    def __init__(self, offset=0.0):
        self.offset, self.start = offset, time.perf_counter()

    def __call__(self):
        return self.offset + time.perf_counter() - self.start


def plot_curves(records, path, keys, title=""):
    """One row per metric key, plotted against `step` (left) and `time` in seconds (right).
    records: a list of dicts; a record without a key is skipped for that key (eval vs train rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(keys), 2, figsize=(9, 2.6 * len(keys)), squeeze=False)
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
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def load_or_train(path, key, model, train, what, log=print):
    """`model` with the weights cached at `path`; when missing, train() -> (trained model, losses, seconds)
    runs and its result is cached (atomically) with `key`. Returns (model, dict(seconds, cached, path, losses))."""
    if os.path.exists(path):
        saved = load_checkpoint(path)
        model.load_state_dict(saved["model"])
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
