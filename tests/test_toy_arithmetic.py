"""The arithmetic toy: task encodings and reward, a seconds-long run that learns, exact resume, CLI errors."""

import copy
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

import maskgrpo
from toy import arithmetic
from toy.arithmetic import VOCAB, Config, score, slipped, write_trace
from toy.common import ConfigError, load_checkpoint, parse_config, run_cli

# A config that runs in seconds: 2-term problems over 0..4, a very small model, short SFT and GRPO.
TINY = dict(num_terms=2, max_operand=4, heldout_size=5, answer_slip=0.5, d_model=32, n_layers=2, n_heads=2,
            mlp_hidden_size=64, sft_steps=120, sft_batch_size=32, sft_learning_rate=3e-3, sft_warmup=5,
            prompts_per_step=8, num_generations=8, num_iterations=2, max_completion_length=8, block_length=4,
            diffusion_steps=4, learning_rate=5e-4, weight_decay=0.0, max_grad_norm=1.0, eval_every=2, ckpt_every=2,
            show_mistakes=1, progress=False, threads=1)


def tiny(tmp_path, **overrides):
    return Config(**TINY | dict(out_root=str(tmp_path)) | overrides)


# -----------------------------------------------------------------------------
# Task


def test_traces_match_the_docstring():
    assert write_trace([17, 25, 8]) == "17+25=42,42+8=50#50"
    assert write_trace([3, 4, 5]) == "3+4=7,7+5=12#12"
    assert write_trace([7, 5, 9], slip=True) == "7+5=12,12+9=21#12"  # the noisy teacher's answer slips
    assert write_trace([17, 25, 8], slip=True) == "17+25=42,42+8=50#42" and write_trace([3, 4], slip=True) == "3+4=7#3"
    assert VOCAB.encode("3+4+5=") == [3, 10, 4, 10, 5, 11]
    assert (VOCAB.eos_id, VOCAB.pad_id, VOCAB.mask_id, VOCAB.size) == (14, 15, 16, 17)
    assert VOCAB.decode(VOCAB.encode("3+4=7#7") + [VOCAB.eos_id, 3]) == "3+4=7#7"


def test_reward_is_answer_plus_format():
    texts = ["3+4=7,7+5=12#12", "3+4=7,7+5=11#11", "#12", "3+4=7,7+5=12#012", "3+4=7#12", ""]
    rewards, correct = score(texts, ["12"] * 6, num_terms=3, format_reward=0.1)
    assert rewards.tolist() == pytest.approx([1.1, 0.1, 1.0, 0.1, 1.0, 0.0])
    assert correct.tolist() == [1, 0, 1, 0, 1, 0]


def test_slipped_answers_are_the_sum_before_the_last_step():
    texts = ["3+4=7,7+5=12#7", "3+4=7,7+5=12#12", "3+4=7,7+0=7#7", "3+4=7,7+5=12#8", "#7"]
    terms = [[3, 4, 5], [3, 4, 5], [3, 4, 0], [3, 4, 5], [3, 4, 5]]
    assert slipped(texts, terms, num_terms=3).tolist() == [1, 0, 0, 0, 1]  # a slip that is also right is not one


def test_data_split_is_seeded_and_disjoint():
    cfg = Config(heldout_size=200)
    train, heldout = arithmetic.make_data(cfg)
    again, _ = arithmetic.make_data(cfg)
    assert train.terms == again.terms and len(train.terms) + len(heldout.terms) == 1000
    assert not {tuple(t) for t in train.terms} & {tuple(t) for t in heldout.terms}
    assert train.prompt_ids.shape == (800, 6) and train.clean.shape == (800, cfg.max_completion_length)
    assert (train.clean[:, -1] == VOCAB.eos_id).all() and train.prompt_mask.all()  # canvas ends in EOS; no padding
    other, _ = arithmetic.make_data(dataclasses.replace(cfg, data_seed=1))
    assert other.terms != train.terms
    # two-digit operands: prompts of different lengths are left-padded with PAD, which is not MASK
    train2, _ = arithmetic.make_data(Config(max_operand=12, heldout_size=10, max_completion_length=30, block_length=5,
                                            diffusion_steps=30))
    assert (~train2.prompt_mask).any() and (train2.prompt_ids[~train2.prompt_mask] == VOCAB.pad_id).all()


# -----------------------------------------------------------------------------
# Training


@torch.no_grad()
def expected_reward(model, cfg, split, samples=128, seed=1234):
    """Mean reward of `samples` rollouts (temperature cfg.temperature) of every problem of the split: a
    prompt-dependent reward (the answer is right for this prompt's terms). The same seed for two models
    gives paired draws, so their difference has far less noise than two independent estimates. Rows are
    laid out here (not by rollout_text), so that a grouping bug in training cannot also hide in the measure."""
    g = cfg.grpo()
    seq = maskgrpo.generate_text(model, split.prompt_ids.repeat_interleave(samples, 0), gen_length=g.max_completion_length,
                                 block_length=g.block_length, steps=g.diffusion_steps, temperature=g.temperature,
                                 mask_id=VOCAB.mask_id, generator=torch.Generator().manual_seed(seed),
                                 attention_mask=split.prompt_mask.repeat_interleave(samples, 0))
    texts = [VOCAB.decode(row) for row in seq[:, split.prompt_ids.shape[1]:].tolist()]
    rewards, correct = score(texts, [a for a in split.answers for _ in range(samples)], cfg.num_terms, cfg.format_reward)
    return float(rewards.mean()), float(correct.mean())


def smoke_run(tmp_path, grpo_steps, **overrides):
    """grpo_steps GRPO steps of the TINY config. Returns (config, SFT model, final state dict, paired gain in
    expected reward on the training problems)."""
    cfg = tiny(tmp_path, grpo_steps=grpo_steps, **overrides)
    arithmetic.main(cfg)
    train, _ = arithmetic.make_data(cfg)
    sft_model, info = arithmetic.load_or_train_sft(cfg, train)
    assert info["cached"]
    final = load_checkpoint(os.path.join(tmp_path, "maskgrpo", "ckpt.pt"))["model"]
    policy = copy.deepcopy(sft_model)
    policy.load_state_dict(final)
    (reward, correct), (sft_reward, sft_correct) = expected_reward(policy, cfg, train), expected_reward(sft_model, cfg, train)
    return cfg, sft_model, final, reward - sft_reward, correct - sft_correct


# The paired gain of the 20-step smoke run over 10 seeds (seed = init_seed = sft_seed = 0..9, so the SFT
# model varies too; scripts/measure_smoke_gain.py 10 20): mean +0.117, sd 0.023, min +0.077. The test
# asks seed 0 for more than mean - 4 sd = +0.025; no learning gives 0 up to the evaluation's noise, and
# advantages of the wrong sign give -0.098. A grouping bug does not show here (rollout rows tiled instead
# of interleaved still gain +0.123): what GRPO teaches this toy, to report the trace's sum rather than the
# noisy teacher's slipped first operand, is one rule for every prompt, so mismatched answers still reward
# it. tests/test_wiring.py checks the grouping directly.
GAIN_MEAN, GAIN_SD = 0.117, 0.023


def test_smoke_run_learns_and_moves_every_parameter(tmp_path):
    _, sft_model, final, gain, _ = smoke_run(tmp_path, grpo_steps=20)
    assert gain > GAIN_MEAN - 4 * GAIN_SD, gain
    assert os.path.exists(os.path.join(tmp_path, "maskgrpo", "curves.png"))
    # every trainable parameter moved away from the SFT model during GRPO
    unchanged = [name for name, p in sft_model.named_parameters() if torch.equal(p, final[name])]
    assert not unchanged


WALL_CLOCK_KEYS = ("time", "rollout_seconds", "load1")  # differ between any two runs


def test_resume_equals_uninterrupted(tmp_path):
    straight = arithmetic.main(tiny(tmp_path, grpo_steps=4, run_name="straight"))
    arithmetic.main(tiny(tmp_path, grpo_steps=2, run_name="resumed"))
    resumed = arithmetic.main(tiny(tmp_path, grpo_steps=4, run_name="resumed"))
    a, b = (load_checkpoint(os.path.join(tmp_path, name, "ckpt.pt")) for name in ("straight", "resumed"))

    def numbers(records):
        return [{k: v for k, v in r.items() if k not in WALL_CLOCK_KEYS} for r in records]

    assert numbers(a["records"]) == numbers(b["records"]) and len(a["records"]) == 4 + 3  # 4 steps, evals at 0, 2, 4
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["generators"][k], b["generators"][k]) for k in a["generators"])
    assert straight["final_acc"] == resumed["final_acc"]
    # a checkpoint written with other settings is refused rather than silently mixed
    with pytest.raises(ConfigError, match="learning_rate"):
        arithmetic.main(tiny(tmp_path, grpo_steps=6, run_name="resumed", learning_rate=1e-4))


def test_paired_interval_against_the_t_formula():
    from toy import ablation

    diffs = [3.0, -1.0, 4.0, 1.0, 5.0]
    mean = sum(diffs) / 5
    sd = (sum((d - mean) ** 2 for d in diffs) / 4) ** 0.5
    assert ablation.paired_interval(diffs) == pytest.approx((mean, 2.776 * sd / 5 ** 0.5))


def test_ablation_writes_table_and_plot(tmp_path):
    from toy import ablation

    cfg = ablation.AblationConfig(**TINY | dict(out_root=str(tmp_path), arms="maskgrpo,d1,trace,official", seeds=2,
                                                grpo_steps=2))
    summaries = ablation.main(cfg)
    assert list(summaries) == ["maskgrpo", "d1", "trace", "official"]
    table = (tmp_path / "ablation" / "table.md").read_text()
    assert all(f"| {arm} |" in table for arm in summaries)
    runs = json.loads((tmp_path / "ablation" / "summary.json").read_text())["runs"]
    for arm in ("d1", "trace", "official"):  # the paired rows: per-seed differences against maskgrpo
        diffs = [100 * (ablation.final_accuracy(a) - ablation.final_accuracy(b))
                 for a, b in zip(runs[arm], runs["maskgrpo"], strict=True)]
        mean, half = ablation.paired_interval(diffs)
        assert f"| {arm} | {mean:+.1f} | [{mean - half:+.1f}, {mean + half:+.1f}] |" in table
    assert (tmp_path / "ablation" / "ablation.png").exists()
    with pytest.raises(ValueError, match="unknown arms"):
        ablation.AblationConfig(arms="d1,nope")
    with pytest.raises(ValueError, match="first_seed"):
        ablation.AblationConfig(first_seed=-1)
    # one arm's seeds split over two calls, then one call over all seeds reuses the finished runs
    split = ablation.AblationConfig(**TINY | dict(out_root=str(tmp_path / "split"), arms="d1", seeds=1, grpo_steps=2))
    ablation.main(dataclasses.replace(split, first_seed=1))
    ablation.main(split)
    together = ablation.main(dataclasses.replace(split, seeds=2))
    assert together["d1"] == summaries["d1"] | dict(seconds=together["d1"]["seconds"])


# -----------------------------------------------------------------------------
# Command line


@pytest.mark.parametrize("argv, words", [
    (["--no_such_key=3"], ["no_such_key", "3"]),
    (["--sft_steps=abc"], ["sft_steps", "abc", "int"]),
    (["--shared_masks=maybe"], ["shared_masks", "maybe", "bool"]),
    (["--answer_slip=2"], ["answer_slip", "2"]),
    (["--estimator=d2"], ["estimator", "d2"]),
    (["sft_steps=3"], ["sft_steps=3", "--key=value"]),
])
def test_bad_cli_input_names_key_and_value(argv, words):
    with pytest.raises(ConfigError) as info:
        parse_config(Config, argv)
    assert all(w in str(info.value) for w in words), str(info.value)
    with pytest.raises(SystemExit) as info:
        run_cli(lambda cfg: pytest.fail("main must not run"), Config, argv, prog="arithmetic.py")
    assert str(info.value).startswith("arithmetic.py: error:")


def test_cli_parses_types_and_prints_help(capsys):
    cfg = parse_config(Config, ["--sft_steps=7", "--beta=0", "--shared_masks=false", "--remasking=random"])
    assert (cfg.sft_steps, cfg.beta, cfg.shared_masks, cfg.remasking) == (7, 0.0, False, "random")
    with pytest.raises(SystemExit) as info:
        parse_config(Config, ["-h"], prog="arithmetic.py")
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "--min_mask_rate=0.6" in text and "gamma, truncation" in text and "  GRPO" in text


def test_cli_process_exits_cleanly_on_bad_input():
    script = os.path.join(os.path.dirname(arithmetic.__file__), "arithmetic.py")
    proc = subprocess.run([sys.executable, script, "--learning_rate=fast"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "learning_rate" in proc.stderr and "fast" in proc.stderr
