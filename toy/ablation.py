"""The paper's estimator ablation (arXiv 2510.02880, Table 4) in miniature, on the arithmetic toy.

    python toy/ablation.py                          # 5 arms x 3 seeds from one cached SFT model
    python toy/ablation.py --seeds=5 --grpo_steps=60 --arms=d1,maskgrpo
    python toy/ablation.py --arms=maskgrpo,random,trace,official,d1 --seeds=5 --answer_slip=0 \
        --sft_steps=350 --learning_rate=5e-5 --beta=0 --grpo_steps=100 --run_name=estimators   # issue 13's setting
    python toy/ablation.py -h                       # also takes every toy/arithmetic.py setting

Arms (everything else is the arithmetic default; each arm changes one thing from the row above,
except d1, which replaces the whole estimator):
    d1          diffu-GRPO one-step estimator: completion fully masked, prompt masked w.p. 0.15
    unigrpo     random Rev, rising schedule from gamma = 0 (UniGRPO-like)
    arlike_g0   AR-like Rev, gamma = 0
    maskgrpo    AR-like Rev, gamma = 0.6: full MaskGRPO
    unshared    full MaskGRPO, but old / reference / current policies scored on independent masks
    random      random Rev, gamma = 0.6 (MaskGRPO with the ramp removed)
    trace       Rev in the decoding order the sampler recorded (maskgrpo.remask, "trace"), gamma = 0.6
    official    the official code's ramp as it runs (maskgrpo.remask, "official"), gamma = 0.6

Every run starts from the same SFT checkpoint and differs only in the GRPO seed (prompts, rollouts,
masks). Two processes can share the 2 cores: give them different --arms, or split one arm's seeds with
--first_seed, then rerun with every arm and seed to write the table from the finished runs. Writes, in
runs/arithmetic/ablation/: table.md, ablation.png (held-out accuracy against step,
mean +- std over seeds) and summary.json; each run keeps its own folder, so a rerun skips finished
runs and resumes an interrupted one.

Table columns: final held-out greedy exact match (mean +- std over seeds), its gain over the SFT model,
rollout reward gain (mean rollout reward of the last 5 GRPO steps minus the first 5), GRPO wall time per run,
and mean KL to the SFT model (k3 estimator on the arm's own masked tokens, averaged over steps; d1 masks
the whole completion, so its KL is measured on different tokens). When "maskgrpo" is among the arms, a
second table gives each other arm's final accuracy minus maskgrpo's, paired by GRPO seed, with a 95%
t-interval over the seeds (the same seed draws the same prompts, so the pairing removes part of the
prompt-to-prompt noise).
"""

import dataclasses
import os
import statistics
from dataclasses import dataclass

from tqdm import tqdm

from toy import arithmetic
from toy.common import atomic_write, plot_curves, run_cli, set_threads, write_json

ARMS = {
    "d1": dict(estimator="d1"),
    "unigrpo": dict(remasking="random", min_mask_rate=0.0),
    "arlike_g0": dict(remasking="arlike", min_mask_rate=0.0),
    "maskgrpo": dict(remasking="arlike", min_mask_rate=0.6),
    "unshared": dict(remasking="arlike", min_mask_rate=0.6, shared_masks=False),
    "random": dict(remasking="random", min_mask_rate=0.6),
    "trace": dict(remasking="trace", min_mask_rate=0.6),
    "official": dict(remasking="official", min_mask_rate=0.6),
}
# two-sided 95% Student t quantiles t_{0.975, df}, df = 1..10 (beyond: the normal 1.96 is within 3%)
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


@dataclass
class AblationConfig(arithmetic.Config):
    # ablation
    arms: str = ",".join(ARMS)  # comma-separated subset of the arms
    seeds: int = 3  # GRPO seeds per arm (seed = first_seed .. first_seed + seeds - 1)
    first_seed: int = 0  # to split one arm's seeds over processes; a run with all seeds then reuses their runs
    grpo_steps: int = 50  # GRPO steps per run (half the main run)
    eval_every: int = 10  # GRPO steps between held-out evaluations
    show_mistakes: int = 0  # wrong held-out answers printed at each evaluation
    run_name: str = "ablation"  # folder of the table and plot inside out_root; runs go below it

    def __post_init__(self):
        super().__post_init__()
        unknown = [a for a in self.arms.split(",") if a not in ARMS]
        if unknown:
            raise ValueError(f"unknown arms {unknown}; choose from {list(ARMS)}")
        if self.seeds < 1 or self.first_seed < 0:
            raise ValueError(f"seeds must be >= 1 and first_seed >= 0, got seeds={self.seeds}, first_seed={self.first_seed}")


def mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def paired_interval(differences):
    """Mean of per-seed differences and its 95% t-interval half-width (nan with one seed)."""
    n = len(differences)
    if n < 2:
        return statistics.mean(differences), float("nan")
    t = T975[n - 2] if n - 1 <= len(T975) else 1.96
    return statistics.mean(differences), t * statistics.stdev(differences) / n ** 0.5


def final_accuracy(records):
    return [r for r in records if "heldout_acc" in r][-1]["heldout_acc"]


def paired_table(all_runs, baseline="maskgrpo"):
    """Each arm's final held-out accuracy minus the baseline's, paired by seed, with its 95% interval."""
    base = [final_accuracy(records) for records in all_runs[baseline]]
    lines = [f"| arm - {baseline} | final held-out difference (points) | 95% interval | seeds where the arm is ahead |",
             "|---|---|---|---|"]
    for arm, runs in all_runs.items():
        if arm == baseline:
            continue
        diffs = [100 * (final_accuracy(records) - b) for records, b in zip(runs, base, strict=True)]
        mean, half = paired_interval(diffs)
        ahead = sum(d > 0 for d in diffs)
        lines.append(f"| {arm} | {mean:+.1f} | [{mean - half:+.1f}, {mean + half:+.1f}] | {ahead} of {len(diffs)} |")
    return "\n".join(lines) + "\n"


def arm_summary(runs):
    """Table numbers of one arm from its runs' metric records."""
    finals, gains, reward_gains, seconds, kls = [], [], [], [], []
    for records in runs:
        evals = [r for r in records if "heldout_acc" in r]
        train = [r for r in records if "reward_mean" in r]
        finals.append(evals[-1]["heldout_acc"])
        gains.append(evals[-1]["heldout_acc"] - evals[0]["heldout_acc"])
        k = max(1, min(5, len(train) // 2))
        reward_gains.append(statistics.mean(r["reward_mean"] for r in train[-k:]) -
                            statistics.mean(r["reward_mean"] for r in train[:k]))
        seconds.append(records[-1]["time"])
        kls.append(statistics.mean(r["kl"] for r in train))
    return dict(final_acc=mean_std(finals), acc_gain=mean_std(gains), reward_gain=mean_std(reward_gains),
                seconds=statistics.mean(seconds), kl=statistics.mean(kls), sft_acc=runs[0][0]["heldout_acc"])


def table(summaries, cfg):
    lines = [f"Arithmetic toy, {cfg.seeds} seeds x {cfg.grpo_steps} GRPO steps per arm "
             f"(G={cfg.num_generations}, {cfg.prompts_per_step} prompts/step, mu={cfg.num_iterations}, "
             f"lr={cfg.learning_rate}, beta={cfg.beta}); SFT held-out exact match "
             f"{next(iter(summaries.values()))['sft_acc']:.1%}.", "",
             "| arm | held-out exact match | gain (points) | rollout reward gain | GRPO wall time / run | mean KL |",
             "|---|---|---|---|---|---|"]
    for arm, s in summaries.items():
        (acc, acc_sd), (gain, gain_sd), (rg, rg_sd) = s["final_acc"], s["acc_gain"], s["reward_gain"]
        lines.append(f"| {arm} | {acc:.1%} +- {acc_sd:.1%} | {gain * 100:+.1f} +- {gain_sd * 100:.1f} | "
                     f"{rg:+.3f} +- {rg_sd:.3f} | {s['seconds']:.0f} s | {s['kl']:.4f} |")
    return "\n".join(lines) + "\n"


def plot(all_runs, path):
    """Held-out accuracy against step, mean and +- std over seeds, one line per arm."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for arm, runs in all_runs.items():
        steps = [r["step"] for r in runs[0] if "heldout_acc" in r]
        accs = [[r["heldout_acc"] for r in records if "heldout_acc" in r] for records in runs]
        stats = [mean_std(column) for column in zip(*accs, strict=True)]
        mean = [m for m, _ in stats]
        ax.plot(steps, mean, marker="o", ms=3, label=arm)
        ax.fill_between(steps, [m - s for m, s in stats], [m + s for m, s in stats], alpha=0.15)
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("held-out exact match (greedy)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))


def main(cfg):
    set_threads(cfg.threads)
    out = os.path.join(cfg.out_root, cfg.run_name)
    train, heldout = arithmetic.make_data(cfg)
    sft_model, sft_info = arithmetic.load_or_train_sft(cfg, train)
    sft_state = sft_model.state_dict()
    # a run's settings are the arithmetic toy's alone, so a run is reused whatever arms / seeds selected it
    task = arithmetic.Config(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(arithmetic.Config)})
    all_runs, summaries = {}, {}
    for arm in cfg.arms.split(","):
        all_runs[arm] = []
        for seed in range(cfg.first_seed, cfg.first_seed + cfg.seeds):
            run_cfg = dataclasses.replace(task, seed=seed, **ARMS[arm])
            run_dir = os.path.join(out, f"{arm}-seed{seed}")
            tqdm.write(f"== {arm}, seed {seed}: {ARMS[arm]}")
            policy = arithmetic.build_model(run_cfg, None)
            policy.load_state_dict(sft_state)
            all_runs[arm].append(arithmetic.grpo(run_cfg, policy, train, heldout, run_dir, log=tqdm.write))
        summaries[arm] = arm_summary(all_runs[arm])
        text = table(summaries, cfg)  # rewritten after each arm: partial results survive
        atomic_write(os.path.join(out, "table.md"), lambda f, text=text: f.write(text), mode="w")
    write_json(dict(config=dataclasses.asdict(cfg), arms=ARMS, summaries=summaries, sft_seconds=sft_info["seconds"],
                    runs=all_runs), os.path.join(out, "summary.json"))
    plot(all_runs, os.path.join(out, "ablation.png"))
    text = table(summaries, cfg)
    if "maskgrpo" in all_runs and len(all_runs) > 1:
        text += "\n" + paired_table(all_runs)
        atomic_write(os.path.join(out, "table.md"), lambda f: f.write(text), mode="w")
    print(text)
    for arm, runs in all_runs.items():
        plot_curves([r for records in runs[:1] for r in records], os.path.join(out, f"{arm}-seed0", "curves.png"),
                    ["heldout_acc", "reward_mean", "kl"], title=f"{arm}, seed 0")
    return summaries


if __name__ == "__main__":
    run_cli(main, AblationConfig, doc=__doc__.split("\n\n")[0])
