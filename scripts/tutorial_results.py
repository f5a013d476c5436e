"""d1 against MaskGRPO on the arithmetic toy, for tutorial.ipynb (section 7): docs/tutorial_d1_vs_maskgrpo.json.

    python scripts/tutorial_results.py                      # 3 arms x 5 seeds x 30 GRPO steps, resumable
    python scripts/tutorial_results.py --seeds=3 --grpo_steps=20 --out=runs/tutorial_quick.json

Every arm starts from the SFT model of `make toy` (cached in runs/arithmetic/, trained here when missing) with
the toy's default settings and changes one thing:
    maskgrpo    the default: AR-like Rev, r_j rising from gamma = 0.6
    d1          diffu-GRPO's one-step estimator: the completion fully masked (t = 1), the prompt masked w.p. 0.15
    r1          MaskGRPO with r_j ~ 1 for every update (gamma = 0.99): d1's mask ratio without its prompt masking
Seed s is shared by every arm, so their first prompts and rollout streams are the same. Each run keeps its
folder in runs/arithmetic/tutorial/<arm>-seed<s>/ (a rerun skips finished runs and resumes an interrupted one);
the JSON keeps, per run, the held-out greedy exact match at every evaluation and the mean rollout reward per step.
"""

import dataclasses
import os
import platform
import sys
import time
from dataclasses import dataclass

import torch

from toy import ablation, arithmetic
from toy.common import run_cli, set_threads, write_json

COMMAND = "python scripts/tutorial_results.py"
ARMS = dict(maskgrpo=ablation.ARMS["maskgrpo"], d1=ablation.ARMS["d1"], r1=dict(remasking="arlike", min_mask_rate=0.99))


@dataclass
class TutorialConfig(arithmetic.Config):
    # tutorial comparison
    arms: str = ",".join(ARMS)  # comma-separated subset of the arms
    seeds: int = 5  # GRPO seeds per arm (seed = 0..seeds-1)
    grpo_steps: int = 30  # GRPO steps per run
    eval_every: int = 5  # GRPO steps between held-out evaluations
    show_mistakes: int = 0  # wrong held-out answers printed at each evaluation
    run_name: str = "tutorial"  # the runs go below out_root/run_name
    out: str = "docs/tutorial_d1_vs_maskgrpo.json"  # the compact results file the notebook reads

    def __post_init__(self):
        super().__post_init__()
        unknown = [a for a in self.arms.split(",") if a not in ARMS]
        if unknown:
            raise ValueError(f"arms: unknown {unknown}; choose from {list(ARMS)}")
        if self.seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {self.seeds}")


def compact(records):
    """The curves the notebook plots, from one run's metric records."""
    evals = [r for r in records if "heldout_acc" in r]
    train = [r for r in records if "reward_mean" in r]
    return dict(steps=[r["step"] for r in evals], heldout_acc=[r["heldout_acc"] for r in evals],
                reward_mean=[r["reward_mean"] for r in train], seconds=records[-1]["time"])


def main(cfg):
    threads = set_threads(cfg.threads)
    start = time.perf_counter()
    train, heldout = arithmetic.make_data(cfg)
    sft_model, _ = arithmetic.load_or_train_sft(cfg, train)
    sft_state = sft_model.state_dict()
    arms = {}
    for arm in cfg.arms.split(","):
        runs = []
        for seed in range(cfg.seeds):
            run_cfg = dataclasses.replace(cfg, seed=seed, **ARMS[arm])
            print(f"== {arm}, seed {seed}", flush=True)
            policy = arithmetic.build_model(run_cfg, None)
            policy.load_state_dict(sft_state)
            run_dir = os.path.join(cfg.out_root, cfg.run_name, f"{arm}-seed{seed}")
            runs.append(dict(seed=seed) | compact(arithmetic.grpo(run_cfg, policy, train, heldout, run_dir)))
        arms[arm] = dict(overrides=ARMS[arm], runs=runs)
    argv = " ".join(sys.argv[1:])
    note = (f"{len(arms)} arms x {cfg.seeds} seeds x {cfg.grpo_steps} steps; {time.perf_counter() - start:.0f} s here on "
            f"{threads} CPU threads ({platform.machine()}, torch {torch.__version__})")
    write_json(dict(command=f"{COMMAND} {argv}".strip(), note=note, config=dataclasses.asdict(cfg), arms=arms), cfg.out)
    print(f"wrote {cfg.out}: {note}")


if __name__ == "__main__":
    run_cli(main, TutorialConfig, doc=__doc__.split("\n\n")[0])
