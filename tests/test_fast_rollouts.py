"""Fast rollouts (Fast-dLLM, arXiv 2505.22618) in maskgrpo.generate_text: the approximate KV cache of
the model, confidence-threshold parallel decoding, and the decoding trajectory the sampler records.
The exact sampler itself is checked against the LLaDA loop oracle in test_maskgrpo.py."""

import pytest
import torch
from test_maskgrpo import EOS, MASK, PAD, VOCAB, gen, left_pad, tiny_model, words

import maskgrpo as mg


def canvas(seed, B=3, P=6, L=12, lengths=(6, 4, 5)):
    """A left-padded prompt plus a half-filled completion canvas, and its attention mask (B, P + L)."""
    prompt, prompt_mask = left_pad(words((B, P), seed), list(lengths))
    comp = torch.where(torch.rand((B, L), generator=gen(seed + 1)) < 0.5, words((B, L), seed + 2), MASK)
    return torch.cat([prompt, comp], 1), torch.cat([prompt_mask, torch.ones((B, L), dtype=torch.bool)], 1)


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_cached_forward_equals_the_full_forward_while_nothing_changed(mode):
    model = tiny_model(3)
    x, am = canvas(0)
    block, T = slice(10, 14), x.shape[1]
    full, kv = model(x, am, positions=block, return_kv=True)
    span = slice(block.start, T) if mode == "prefix" else block
    cached = model(x, am, positions=block, kv=kv, span=span)
    assert torch.allclose(cached, full, atol=1e-5), (cached - full).abs().max()
    assert torch.allclose(full, model(x, am, positions=block), atol=0)  # return_kv changes nothing


def test_cache_is_exact_for_one_layer_and_approximate_for_two():
    """A layer-0 key depends only on its token and position, so with one layer the cached keys outside
    the span stay right after the block changes; with two layers they are stale (Fast-dLLM's approximation)."""
    x, am = canvas(1)
    block = slice(10, 14)
    changed = x.clone()
    changed[:, block] = words((3, 4), 9)
    for n_layers, exact in ((1, True), (2, False)):
        model = tiny_model(5, n_layers=n_layers)
        with torch.no_grad():
            model.model.transformer.ff_out.weight.mul_(20)  # logits large enough to see the difference
        _, kv = model(x, am, positions=block, return_kv=True)
        cached = model(changed, am, positions=block, kv=kv, span=block)
        diff = (cached - model(changed, am, positions=block)).abs().max()
        assert (diff < 1e-4) == exact, (n_layers, diff)


def sample(model, prompt, mask, seed, **kw):
    return mg.generate_text(model, prompt, gen_length=12, block_length=4, steps=12, temperature=kw.pop("temperature", 0.9),
                            mask_id=MASK, generator=gen(seed), attention_mask=mask, **kw)


def prompts(seed=0, B=6):
    return left_pad(words((B, 5), seed), [5, 3, 4, 5, 2, 4][:B])


def test_defaults_are_the_exact_sampler_and_threshold_one_changes_nothing():
    """cache="none", threshold=None is the default; threshold=1.0 never fires (confidences are <= 1), so
    every step commits the schedule's count and the output equals the exact sampler's, draw for draw."""
    model = tiny_model(7)
    prompt, mask = prompts()
    exact = sample(model, prompt, mask, 11)
    assert torch.equal(exact, sample(model, prompt, mask, 11, cache="none", threshold=None))
    assert torch.equal(exact, sample(model, prompt, mask, 11, threshold=1.0))


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
@pytest.mark.parametrize("threshold", [None, 0.05, 1e-9])
def test_every_option_fills_the_canvas_and_records_a_consistent_trajectory(cache, threshold):
    model = tiny_model(8)
    prompt, mask = prompts(2)
    canvases = {}
    x, trajectory = sample(model, prompt, mask, 3, cache=cache, threshold=threshold, return_trajectory=True,
                           on_step=lambda s, c: canvases.__setitem__(s, c[:, 5:].clone()))
    assert torch.equal(x[:, :5], prompt) and not (x == MASK).any()
    steps = sorted(canvases)
    assert steps == list(range(1, len(steps) + 1)) and len(steps) <= 12  # `steps` is an upper bound
    assert trajectory.min() >= 1 and trajectory.max() == steps[-1]
    for s in steps:  # the tokens revealed after step s are exactly those committed at steps <= s
        assert torch.equal(canvases[s] != MASK, trajectory <= s), s
    # blocks are decoded left to right: every token of block b is committed before any of block b + 1
    per_block = trajectory.view(6, 3, 4)
    assert (per_block[:, :-1].amax(-1) < per_block[:, 1:].amin(-1)).all()
    # at least one token per step of every row still decoding, and at most one block's worth
    for s in steps:
        n = (trajectory == s).sum(1)
        assert (n <= 4).all()
    if threshold == 1e-9:  # every candidate clears the threshold: one forward per block
        assert steps[-1] == 3 and (trajectory.view(6, 3, 4) == torch.tensor([1, 2, 3])[None, :, None]).all()
    if threshold is None:  # exact schedule, one token per step: a permutation of 1..12 per row
        assert torch.equal(trajectory.sort(1).values, torch.arange(1, 13).expand(6, 12))


def test_threshold_commits_at_least_one_token_per_step_per_row_until_its_block_is_full():
    model = tiny_model(9)
    prompt, mask = prompts(4)
    x, trajectory = sample(model, prompt, mask, 5, threshold=0.08, return_trajectory=True)
    for row in trajectory.view(6, 3, 4):
        for blk in row:  # within a block, the row's commits take consecutive steps with >= 1 token each
            used = blk.unique()
            assert torch.equal(used, torch.arange(int(used.min()), int(used.max()) + 1))


def test_rollout_text_passes_the_sampler_options_and_keeps_the_trajectory():
    model = tiny_model(10)
    prompt, mask = prompts(6, B=3)
    cfg = mg.GRPOConfig(num_generations=2, max_completion_length=12, block_length=4, diffusion_steps=12, temperature=0.9,
                        cache_implementation="dual", confidence_threshold=0.05, beta=0.0)
    batch = mg.rollout_text(model, prompt, mask, cfg, gen(1))
    x, trajectory = mg.generate_text(model, prompt.repeat_interleave(2, 0), gen_length=12, block_length=4, steps=12,
                                     temperature=0.9, mask_id=MASK, generator=gen(1), attention_mask=mask.repeat_interleave(2, 0),
                                     cache="dual", threshold=0.05, return_trajectory=True)
    assert torch.equal(batch.sequences, x) and torch.equal(batch.trajectory, trajectory)
    assert torch.equal(batch.rows(torch.tensor([1, 4])).trajectory, trajectory[[1, 4]])


@pytest.mark.parametrize("kwargs, message", [
    (dict(cache="full"), "cache must be one of"),
    (dict(threshold=0.0), "threshold must be None or in (0, 1]"),
    (dict(threshold=1.5), "threshold must be None or in (0, 1]"),
    (dict(temperature=float("nan")), "temperature must be a finite number"),
])
def test_bad_sampler_options_are_refused(kwargs, message):
    prompt, mask = prompts()
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        sample(tiny_model(), prompt, mask, 0, **kwargs)


def test_token_ids_outside_the_vocabulary_are_refused_before_sampling():
    prompt, mask = prompts()
    prompt[1, 3] = VOCAB + 2
    with pytest.raises(ValueError, match=f"prompt_ids holds token id {VOCAB + 2}, outside the model's vocabulary"):
        sample(tiny_model(), prompt, mask, 0)
    with pytest.raises(ValueError, match="mask_id holds token id -1"):
        mg.generate_text(tiny_model(), prompts()[0], gen_length=4, block_length=4, steps=4, temperature=0.0, mask_id=-1)


def test_grpo_config_validates_the_rollout_options():
    with pytest.raises(ValueError, match="cache_implementation must be one of"):
        mg.GRPOConfig(cache_implementation="kv")
    with pytest.raises(ValueError, match="confidence_threshold must be None or in"):
        mg.GRPOConfig(confidence_threshold=2.0)
    with pytest.raises(ValueError, match="confidence_threshold must be a finite number"):
        mg.GRPOConfig(confidence_threshold=float("nan"))
    assert mg.GRPOConfig(cache_implementation="prefix", confidence_threshold=0.9).confidence_threshold == 0.9


def test_pad_and_eos_ids_in_prompts_are_fine():
    prompt, mask = prompts()
    prompt[0, 0], prompt[1, 0] = PAD, EOS
    assert not (sample(tiny_model(), prompt, mask, 0) == MASK).any()
