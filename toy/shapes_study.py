"""Sampler study on the shapes toy: the paper's emerge-vs-MaskGIT claim, and the truncation (gamma) sweep.

    python toy/shapes_study.py                                  # 2 samplers x 3 seeds + gamma {0.0, 0.6} x 3 seeds
    python toy/shapes_study.py --grpo_steps=30 --seeds=0,1      # a shorter study
    python toy/shapes_study.py -h

Arms can run in separate processes (e.g. `--gammas=0.8` and `--samplers= --gammas=0.0,0.6`); a last call
with every arm reuses their finished runs and writes the whole table.

Claim under test (arXiv 2510.02880, Sec. 4 and its GenEval ablation): rollouts from the "emerge" sampler
(MDLM ancestral: random reveal counts, no confidence ranking) score lower than MaskGIT rollouts before RL
but are more diverse, so GRPO groups carry more signal (more distinct scenes per group, larger
within-group reward std, fewer zero-std groups) and RL from them ends higher. Also: small truncation
gamma destabilises image RL, gamma = 0.8 is the image default.

Every arm starts from the same cached SFT checkpoint (toy/shapes.py defaults) and runs toy/shapes.py's
MaskGRPO for `grpo_steps` steps with its own rollout sampler; scores are measured with the arm's sampler
on the 21 held-out prompts ("overall" = GenEval-style strict overall, "score" = graded mean). Each run is
an ordinary toy/shapes.py run in out_root/study/<arm>-s<seed>, so an interrupted study resumes and
finished runs are reused. Writes out_root/study/table.md and results.json.
"""

import dataclasses
import os
import statistics
import time
from dataclasses import dataclass

from toy import shapes
from toy.common import atomic_write, run_cli, write_json


@dataclass
class StudyConfig:
    # arms
    seeds: str = "0,1,2"  # GRPO seeds (prompt order, rollouts, masks) of every arm, comma-separated
    samplers: str = "emerge,maskgit"  # rollout samplers compared at the image default gamma = 0.8
    gammas: str = "0.0,0.6,0.8"  # truncation sweep, with emerge rollouts (0.8 reuses the sampler arm)
    grpo_steps: int = 40  # GRPO steps per run (shorter than the default toy run)
    eval_every: int = 20  # GRPO steps between held-out evaluations
    eval_samples: int = 16  # images per held-out prompt (21 prompts) in each evaluation
    # run
    out_root: str = "runs/shapes"  # where toy/shapes.py keeps its caches; runs go to out_root/study
    threads: int = 2  # torch intra-op threads
    progress: bool = True  # tqdm bars

    def __post_init__(self):
        self.seed_list(), self.gamma_list()
        for s in self.sampler_list():
            if s not in ("emerge", "maskgit"):
                raise ValueError(f"samplers must be emerge and/or maskgit, got {s!r}")
        if self.grpo_steps < 1:
            raise ValueError(f"grpo_steps must be >= 1, got {self.grpo_steps}")

    def seed_list(self):
        return [int(s) for s in self.seeds.split(",") if s]

    def sampler_list(self):
        return [s for s in self.samplers.split(",") if s]

    def gamma_list(self):
        return [float(g) for g in self.gammas.split(",") if g]


METRICS = (("sft_overall", "overall before RL"), ("final_overall", "overall after RL"), ("gain", "gain"),
           ("sft_score", "graded before"), ("final_score", "graded after"),
           ("distinct_per_group", "distinct scenes / group"), ("group_reward_std", "within-group reward std"),
           ("zero_std_frac", "zero-std groups"))


def arms(study):
    """[(arm name, sampler, gamma)]: the sampler comparison at gamma 0.8, then the gamma sweep with emerge."""
    out = [(f"{s}-g0.8", s, 0.8) for s in study.sampler_list()]
    out += [(f"emerge-g{g}", "emerge", g) for g in study.gamma_list() if (f"emerge-g{g}", "emerge", g) not in out]
    return out


def run_arm(study, sampler, gamma, seed, name):
    cfg = shapes.Config(rollout_mode=sampler, min_mask_rate=gamma, seed=seed, grpo_steps=study.grpo_steps,
                        eval_every=study.eval_every, eval_samples=study.eval_samples,
                        out_root=study.out_root, run_name=os.path.join("study", f"{name}-s{seed}"),
                        threads=study.threads, progress=study.progress)
    return shapes.main(cfg)


def fmt(values):
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(results, study, command):
    lines = [f"Shapes toy sampler study: {study.grpo_steps} MaskGRPO steps per run, seeds {study.seeds}, "
             "mean ± std over seeds. Scores measured with each arm's own sampler on the held-out prompts.", "",
             f"Command: `{command}`", "",
             "| arm | " + " | ".join(label for _, label in METRICS) + " |",
             "|---|" + "---|" * len(METRICS)]
    for name, runs in results.items():
        lines.append(f"| {name} | " + " | ".join(fmt([r[key] for r in runs]) for key, _ in METRICS) + " |")
    lines += ["", "distinct scenes / group (images that differ in the shape, colour or grid cell of a detected "
              "object), within-group reward std and zero-std groups are averaged over every rollout batch of the "
              "run (G = 8 images per prompt)."]
    return "\n".join(lines) + "\n"


def main(study):
    command = "python toy/shapes_study.py " + " ".join(
        f"--{f.name}={getattr(study, f.name)}" for f in dataclasses.fields(study)
        if getattr(study, f.name) != f.default)
    start, results = time.perf_counter(), {}
    for name, sampler, gamma in arms(study):
        results[name] = [run_arm(study, sampler, gamma, seed, name) for seed in study.seed_list()]
    out = os.path.join(study.out_root, "study")
    text = table(results, study, command.strip())
    atomic_write(os.path.join(out, "table.md"), lambda f: f.write(text), mode="w")
    write_json(dict(config=dataclasses.asdict(study), command=command.strip(), seconds=time.perf_counter() - start,
                    results=results), os.path.join(out, "results.json"))
    print(text)
    return results


if __name__ == "__main__":
    run_cli(main, StudyConfig, doc=__doc__.split("\n\n")[0])
