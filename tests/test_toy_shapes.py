"""The shapes text-to-image toy: its MMaDA-like layout, sampler invariants on that layout, a seconds-long
RL run that raises the reward, the CLI end to end, and exact resume.

Generic sampler invariants (mask filled, codes only, maskgit reveal counts, CFG algebra) are tested on
the core in tests/test_maskgrpo.py; here they are checked on the toy's own token layout and helpers."""

import dataclasses
import json
import math
import os

import pytest
import torch

import maskgrpo
from toy import shapes
from toy import shapes_world as sw
from toy.common import ConfigError, load_checkpoint, parse_config

CODEBOOK = 200  # FSQ levels 8,5,5
LAYOUT = shapes.Layout(CODEBOOK)

# A config that runs end to end in seconds: a barely trained tokenizer, a very small model, 2 GRPO steps.
TINY = dict(fsq_steps=10, fsq_batch_size=8, fsq_images=32, fsq_width=8, sft_images=64, d_model=32, n_layers=1,
            n_heads=2, mlp_hidden_size=64, sft_steps=4, sft_batch_size=8, sft_warmup=1, diffusion_steps=4,
            grpo_steps=2, prompts_per_step=2, num_generations=4, num_iterations=2, micro_batch_size=8,
            eval_samples=2, eval_every=1, ckpt_every=1, grid_prompts=2, grid_samples=2, progress=False, threads=1)


def tiny(tmp_path, **overrides):
    return shapes.Config(**TINY | dict(out_root=str(tmp_path)) | overrides)


def draw(objects):
    """(1, 3, 32, 32) image of hand-placed 8x8 objects [(shape, colour, x0, y0), ...]."""
    image = torch.zeros(1, 3, 32, 32)
    for shape, colour, x0, y0 in objects:
        mask = sw.shape_masks(*(torch.tensor([v]) for v in (sw.SHAPES.index(shape), x0, y0, 8)))[0]
        image[0] += torch.tensor(sw.PALETTE[colour]).view(3, 1, 1) * mask
    return image


def small_model(seed=0):
    cfg = shapes.Config(d_model=32, n_layers=1, n_heads=2, mlp_hidden_size=64)
    return shapes.build_model(cfg, LAYOUT, torch.Generator().manual_seed(seed)).eval()


# -----------------------------------------------------------------------------
# Layout


def test_layout_matches_the_docstring():
    n = len(sw.VOCAB)  # 21 words, <pad> = 0
    assert sw.PAD_ID == 0
    assert (LAYOUT.soi_id, LAYOUT.eoi_id, LAYOUT.eos_id, LAYOUT.mask_id) == (n, n + 1, n + 2, n + 3)
    assert LAYOUT.columns == slice(n + 4, n + 4 + CODEBOOK) and LAYOUT.vocab_size == n + 4 + CODEBOOK
    assert LAYOUT.positions == slice(9, 73) and LAYOUT.length == 74
    spec = sw.parse_prompt("a red circle")
    prompt = sw.encode_prompts([spec])
    assert prompt.tolist() == [[1, 4, 9, 0, 0, 0, 0, 0]]
    codes = torch.arange(64)[None]
    x, attention = LAYOUT.sequences(prompt, codes)
    assert x.shape == (1, 74) and x[0, 8] == LAYOUT.soi_id and x[0, 73] == LAYOUT.eoi_id
    assert torch.equal(LAYOUT.codes(x), codes) and x[0, 9] == n + 4
    assert attention[0].tolist() == [True] * 3 + [False] * 5 + [True] * 66  # prompt padding is not attended
    blank, _ = LAYOUT.sequences(prompt)
    assert (blank[:, LAYOUT.positions] == LAYOUT.mask_id).all()
    uncond, uncond_attention = LAYOUT.unconditional(x)
    assert (uncond[:, :8] == sw.PAD_ID).all() and torch.equal(uncond[:, 8:], x[:, 8:])
    assert not uncond_attention[:, :8].any() and uncond_attention[:, 8:].all()


def test_image_completions_score_every_image_token_over_the_code_columns():
    x, _ = LAYOUT.sequences(sw.encode_prompts([sw.parse_prompt("three triangles")] * 3), torch.randint(CODEBOOK, (3, 64)))
    batch = shapes.image_completions(LAYOUT, x)
    assert batch.scored.shape == (3, 64) and batch.scored.all()
    assert batch.positions == LAYOUT.positions and batch.columns == LAYOUT.columns
    assert torch.equal(batch.completion, x[:, 9:73]) and not batch.attention_mask[:, 3:8].any()


# -----------------------------------------------------------------------------
# Sampler invariants on the toy layout


@pytest.mark.parametrize("mode", ["emerge", "maskgit"])
@pytest.mark.parametrize("guidance", [0.0, 3.0])
def test_sampler_fills_the_image_with_codes_and_keeps_prompt_and_markers(mode, guidance):
    cfg = shapes.Config(rollout_mode=mode, guidance_scale=guidance, diffusion_steps=5)
    prompts = sw.encode_prompts([sw.parse_prompt(t) for t in ("a circle", "two squares", "a red circle and a blue square")])
    x = shapes.sample(small_model(), LAYOUT, prompts, cfg, torch.Generator().manual_seed(0))
    image = x[:, LAYOUT.positions]
    assert not (x == LAYOUT.mask_id).any()  # no mask left anywhere
    assert ((image >= LAYOUT.code_start) & (image < LAYOUT.vocab_size)).all()  # only code ids in the image
    assert torch.equal(x[:, :8], prompts) and (x[:, 8] == LAYOUT.soi_id).all() and (x[:, 73] == LAYOUT.eoi_id).all()


@pytest.mark.parametrize("mode", ["emerge", "maskgit"])
def test_cfg_scale_zero_equals_no_cfg_on_the_toy_layout(mode):
    model, prompts = small_model(1), sw.encode_prompts([sw.parse_prompt("a yellow square")] * 4)
    cfg = shapes.Config(rollout_mode=mode, guidance_scale=0.0, diffusion_steps=6)
    with_uncond = shapes.sample(model, LAYOUT, prompts, cfg, torch.Generator().manual_seed(3))  # passes uncond_ids
    x, attention = LAYOUT.sequences(prompts)
    plain = maskgrpo.generate_image(model, x, positions=LAYOUT.positions, columns=LAYOUT.columns, steps=6,
                                    mask_id=LAYOUT.mask_id, mode=mode, generator=torch.Generator().manual_seed(3),
                                    attention_mask=attention)
    assert torch.equal(with_uncond, plain)


def test_empty_prompt_changes_the_guided_sample():
    """CFG actually uses the unconditional branch: with w > 0 the samples differ from w = 0."""
    model, prompts = small_model(2), sw.encode_prompts([sw.parse_prompt("a circle")] * 4)
    a, b = (shapes.sample(model, LAYOUT, prompts, shapes.Config(guidance_scale=w, diffusion_steps=4),
                          torch.Generator().manual_seed(0)) for w in (0.0, 3.0))
    assert not torch.equal(a, b)


def test_group_diversity_counts_distinct_scenes_and_within_group_std():
    keys = [(1, 2), (1, 2), (3, 4), (5, 6)]
    distinct, std = shapes.group_diversity(keys, torch.tensor([1.0, 1.0, 0.0, 1.0]), num_generations=2)
    assert distinct == 1.5 and std == pytest.approx(0.5 * torch.tensor([0.0, 1.0]).std().item())


def test_rewards_and_extra_object_stats_on_hand_built_scenes():
    """Three images for "a triangle": clean, the same triangle beside three other shapes (the GenEval-style
    reward hack), and a square only; two for "a circle and a square": clean, and with a red circle too.
    The graded reward pays the hack in full; strict_scene pays 1/4 of it. Stats average over categories."""
    triangle, pair = [("triangle", "red", 0, 0)], [("circle", "blue", 0, 0), ("square", "blue", 16, 16)]
    images = torch.cat([draw(triangle), draw(triangle + [("square", "blue", 16, 0), ("circle", "green", 0, 16),
                                                         ("square", "yellow", 16, 16)]), draw([("square", "red", 0, 0)]),
                        draw(pair), draw(pair + [("circle", "red", 16, 0)])])
    specs = [sw.parse_prompt("a triangle")] * 3 + [sw.parse_prompt("a circle and a square")] * 2
    scored = sw.score_images(images, specs)
    assert shapes.reward(scored, "graded").tolist() == [1.0, 1.0, 0.0, 1.0, 1.0]
    assert shapes.reward(scored, "strict_scene").tolist() == pytest.approx([1.0, 0.25, 0.0, 1.0, 2 / 3])
    stats = shapes.extra_stats(scored)
    assert (stats["extra_single_object"], stats["extra_two_object"]) == pytest.approx((2 / 3, 1 / 2))
    assert stats["extra_frac"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert stats["clean"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    # sqrt(s^2_single / 3 + s^2_two / 2) / 2, unbiased s^2 of [0, 1, 1] and [0, 1]
    assert stats["extra_frac_se"] == pytest.approx(math.sqrt((1 / 3) / 3 + (1 / 2) / 2) / 2)
    blank = sw.score_images(torch.zeros(1, 3, 32, 32), [sw.parse_prompt("a triangle")])
    assert shapes.reward(blank, "strict_scene").tolist() == [0.0]


# -----------------------------------------------------------------------------
# RL on the toy layout


def test_rl_smoke_raises_the_reward():
    """A few seconds of MaskGRPO on the toy layout (emerge rollouts with CFG, uniform random re-masks at
    gamma 0.8) with a code-level reward (fraction of image tokens in the lower half of the codebook) raise
    the mean reward of a random-init model."""
    torch.manual_seed(0)
    model = small_model(4).train()
    cfg = shapes.Config(diffusion_steps=4, guidance_scale=1.0, num_generations=8, num_iterations=2, beta=0.0,
                        learning_rate=3e-3, micro_batch_size=64)
    g = cfg.grpo()
    assert (g.remasking, g.min_mask_rate) == ("random", 0.8)
    optimizer = maskgrpo.make_optimizer(model, g)
    gens = {k: torch.Generator().manual_seed(i) for i, k in enumerate(("rollout", "masks"))}
    prompts = sw.encode_prompts(sw.sample_specs(4, torch.Generator().manual_seed(0)) * 1).repeat_interleave(8, 0)
    rewards_seen = []
    for _ in range(12):
        x = shapes.sample(model, LAYOUT, prompts, cfg, gens["rollout"])
        rewards = (LAYOUT.codes(x) < CODEBOOK // 2).float().mean(1)
        rewards_seen.append(rewards.mean().item())
        maskgrpo.grpo_step(model, optimizer, shapes.image_completions(LAYOUT, x), rewards, g, gens["masks"])
    assert sum(rewards_seen[-3:]) / 3 > sum(rewards_seen[:3]) / 3 + 0.1, rewards_seen


# -----------------------------------------------------------------------------
# End to end, resume, CLI


def test_main_writes_outputs_and_resume_equals_uninterrupted(tmp_path):
    full = tiny(tmp_path, run_name="full")
    summary = shapes.main(full)
    run_dir = tmp_path / "full"
    for name in ("metrics.json", "curves.png", "grid_sft.png", "grid_rl.png", "ckpt.pt"):
        assert (run_dir / name).exists(), name
    assert list(tmp_path.glob("fsq-*.pt")) and list(tmp_path.glob("sft-*.pt"))  # cached by config hash
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["summary"]["steps"] == 2 and "heldout_overall" in metrics["records"][0]
    assert {"distinct_per_group", "group_reward_std", "zero_std_frac", "reward_mean"} <= set(metrics["records"][1])
    assert summary["sft_overall"] == metrics["records"][0]["heldout_overall"]
    assert summary["sft_extra_frac"] == metrics["records"][0]["heldout_extra_frac"]
    assert 0 <= summary["final_extra_frac"] <= 1 and 0 <= summary["final_clean"] <= 1
    train = [r for r in metrics["records"] if "reward_mean" in r]
    assert all(r["reward_mean"] == pytest.approx(r["train_score"]) for r in train)  # graded: the reward is the score

    # interrupted after step 1, then the same command again (grpo_steps may grow): identical result
    shapes.main(tiny(tmp_path, run_name="split", grpo_steps=1))
    assert load_checkpoint(tmp_path / "split" / "ckpt.pt")["step"] == 1
    shapes.main(tiny(tmp_path, run_name="split"))
    a, b = load_checkpoint(run_dir / "ckpt.pt"), load_checkpoint(tmp_path / "split" / "ckpt.pt")
    assert a["step"] == b["step"] == 2
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    drop_time = lambda recs: [{k: v for k, v in r.items() if k != "time"} for r in recs]
    assert drop_time(a["records"]) == drop_time(b["records"])
    for name in a["generators"]:
        assert torch.equal(a["generators"][name], b["generators"][name])


@pytest.mark.parametrize(("kind", "expected"), [("graded", 1.0), ("strict_scene", 0.75)])
def test_the_configured_reward_is_the_rollout_reward(tmp_path, monkeypatch, kind, expected):
    """Every rollout image scored 1 with 2 objects, every second one of them not asked for: the graded
    reward is 1, strict_scene's is 1 x 1/2 on half of the images."""
    real = sw.score_images

    def rigged(images, specs):
        out, n = real(images, specs), len(specs)
        return out | dict(score=torch.ones(n), objects=torch.full((n,), 2.0), extra=(torch.arange(n) % 2).float())

    monkeypatch.setattr(sw, "score_images", rigged)
    shapes.main(tiny(tmp_path, grpo_steps=1, reward=kind))
    (record,) = [r for r in json.loads((tmp_path / "maskgrpo" / "metrics.json").read_text())["records"] if "reward_mean" in r]
    assert record["reward_mean"] == pytest.approx(expected)
    assert (record["train_score"], record["train_extra_frac"]) == (1.0, 0.5)


def test_tokenizer_initialisation_follows_the_data_seed(tmp_path, monkeypatch):
    """Training skipped, so the cached tokenizer is its initialisation: the same for the same data_seed,
    another for another (a full-pipeline seed changes the tokenizer, not only its data)."""
    monkeypatch.setattr(shapes.fsq, "train_tokenizer", lambda *args, **kwargs: [])
    weights = [shapes.load_or_train_tokenizer(tiny(tmp_path / name, data_seed=seed), log=lambda _: None)[0].state_dict()
               for name, seed in (("a", 0), ("b", 0), ("c", 1))]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])


def test_resume_refuses_other_settings(tmp_path):
    shapes.main(tiny(tmp_path, grpo_steps=1))
    with pytest.raises(ConfigError, match="other settings"):
        shapes.main(tiny(tmp_path, grpo_steps=1, learning_rate=1e-3))


def test_cli_parses_and_validates():
    cfg = parse_config(shapes.Config, ["--rollout_mode=maskgit", "--min_mask_rate=0.6", "--grpo_steps=3"])
    assert (cfg.rollout_mode, cfg.min_mask_rate, cfg.grpo_steps) == ("maskgit", 0.6, 3)
    assert dataclasses.asdict(cfg)["remasking"] == "random"
    with pytest.raises(ConfigError, match="rollout_mode"):
        parse_config(shapes.Config, ["--rollout_mode=greedy"])
    with pytest.raises(ConfigError, match="min_mask_rate"):
        parse_config(shapes.Config, ["--min_mask_rate=1.0"])
    assert parse_config(shapes.Config, ["--reward=strict_scene"]).reward == "strict_scene"
    assert shapes.Config().reward == "graded"
    with pytest.raises(ConfigError, match="reward must be one of graded, strict_scene, got 'strict'"):
        parse_config(shapes.Config, ["--reward=strict"])
    assert os.path.basename(shapes.__file__) == "shapes.py"
