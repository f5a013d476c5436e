"""The wiring between the numerical pieces: the model's forward pass against a loop oracle of the LLaDA
formulas, the stochastic text sampler against LLaDA's rule (same noise, and its exact law), and what
grpo_step / rollout_text actually feed each piece: which mask the reference is scored on, which tokens
carry loss, which rows form a group, the old policy's log-probs, gradient clipping and key padding.
Each test reads the quantity from the code path under test (a spy on the model or on a function that
grpo_step calls), not from a copy of its logic.
"""

import copy
import math

import pytest
import torch
from test_maskgrpo import EOS, MASK, Spy, gen, left_pad, params_of, small_cfg, text_batch, tiny_model, words

import maskgrpo as mg
from oracles import llada_first_step_law, llada_first_step_loop, llada_forward_loop

REWARDS = torch.tensor([0.0, 1.0, 0.5, 0.2, 1.0, 0.0, 0.6, 0.3])  # two groups of 4, every advantage non-zero

# -----------------------------------------------------------------------------
# The forward pass: RoPE (HF rotate-half), RMSNorm, SwiGLU, bidirectional attention with key padding


def random_weight_model(seed):
    """Weights at unit scale (embeddings N(0, 1), projections N(0, 1/fan_in), norm gains N(1, 0.3)) and a
    small RoPE base, so that every piece of the block changes the logits by O(1): at the init's std 0.02
    attention is nearly uniform and a wrong rotation would hide below the tolerance."""
    model = tiny_model(seed=seed, n_heads=4, rope_theta=10.0)
    g = gen(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.normal_(1.0, 0.3, generator=g)
            else:
                p.normal_(0.0, 1.0 if "wte" in name else 1 / math.sqrt(p.shape[1]), generator=g)
    return model


@torch.no_grad()
def test_forward_matches_the_llada_formula_oracle_with_and_without_padding():
    model = random_weight_model(0)
    ids, keep = left_pad(words((3, 9), 1), [9, 6, 3])
    for attention_mask in (None, keep):
        want = llada_forward_loop(model, ids, attention_mask)  # (3, 9, V) float64
        got = model(ids, attention_mask).double()
        assert want.abs().max() > 1.0  # the logits are O(1), so 1e-5 is float precision
        assert torch.allclose(got, want, rtol=0, atol=1e-5), float((got - want).abs().max())


# -----------------------------------------------------------------------------
# The stochastic text sampler (temperature > 0, the rollout path)

# A 7-token vocabulary (0 pad, 1 EOS, 2..5 words, 6 [MASK]) and a head scaled up 40x, so that positions
# differ in how peaked their distributions are. On this model and prompt, at tau = 2, the law of the first
# commit under LLaDA's rule and under the rule with tempered confidences are 0.72 apart in L1.
SAMPLER_VOCAB, SAMPLER_MASK, SAMPLER_PROMPT, TAU = 7, 6, [3, 5, 2], 2.0


def sampler_model():
    model = tiny_model(seed=1, vocab=SAMPLER_VOCAB, mask=SAMPLER_MASK)
    with torch.no_grad():
        model.model.transformer.ff_out.weight.mul_(40)
    return model


def first_commits(model, prompts, seed):
    """The (token, position) committed at the first step of generate_text on a 3-token canvas, one token
    per step, at temperature TAU."""
    x, order = mg.generate_text(model, prompts, gen_length=3, block_length=3, steps=3, temperature=TAU,
                                mask_id=SAMPLER_MASK, generator=gen(seed), return_trajectory=True)
    first = order == 1  # (B, 3), one True per row
    assert (first.sum(1) == 1).all()
    return x[:, prompts.shape[1]:][first], first.long().argmax(1)


@torch.no_grad()
def test_first_sampling_step_equals_llada_loop_on_the_same_noise():
    """Same generator, same draws: LLaDA's float64 Gumbel noise over the whole block's logits, candidates
    at temperature tau, positions ranked by the un-tempered full-vocabulary confidence."""
    model = sampler_model()
    prompts = torch.randint(2, 6, (300, 3), generator=gen(2))
    tokens, positions = first_commits(model, prompts, seed=3)
    canvas = torch.cat([prompts, torch.full((300, 3), SAMPLER_MASK)], 1)
    logits = model(canvas, positions=slice(3, 6)).double()  # (300, 3, V)
    want_tokens, want_positions = llada_first_step_loop(logits, TAU, SAMPLER_MASK, gen(3))
    assert torch.equal(positions, want_positions) and torch.equal(tokens, want_tokens)


@torch.no_grad()
def test_first_committed_token_and_position_follow_the_exact_llada_law():
    """Empirical law of the first commit over n draws against the oracle's exact law. Tolerance from the
    sample size alone (Bretagnolle-Huber-Carol): P(||p_hat - p||_1 >= e) <= 2^k exp(-n e^2 / 2) over k
    cells, so e = sqrt(2 (k ln 2 + ln(1 / delta)) / n) fails a correct sampler with probability <= delta."""
    model = sampler_model()
    n, delta = 10000, 1e-6
    prompt = torch.tensor([SAMPLER_PROMPT])
    tokens, positions = first_commits(model, prompt.repeat(n, 1), seed=4)
    freq = torch.zeros((SAMPLER_VOCAB, 3), dtype=torch.float64)
    freq.index_put_((tokens, positions), torch.ones(n, dtype=torch.float64), accumulate=True)
    freq /= n
    logits = model(torch.cat([prompt, torch.full((1, 3), SAMPLER_MASK)], 1), positions=slice(3, 6))[0].double()
    law = llada_first_step_law(logits, TAU, SAMPLER_MASK)  # (V, 3)
    k = (SAMPLER_VOCAB - 1) * 3  # cells: every token but [MASK], at each position
    e = math.sqrt(2 * (k * math.log(2) + math.log(1 / delta)) / n)
    assert float((freq - law).abs().sum()) < e
    # the test has power: the rule with tempered confidences has a law more than 2e away
    tempered = llada_first_step_law(logits / TAU, 1.0, SAMPLER_MASK)
    assert float((tempered - law).abs().sum()) > 2 * e


# -----------------------------------------------------------------------------
# grpo_step: masks, loss mask, old log-probs, clipping


def grad_calls(spy):
    """(fed input ids, logits) of the forward passes that carried gradient (the current policy)."""
    return [(x, logits) for x, logits in spy.calls if logits.requires_grad]


def test_reference_is_scored_on_the_same_mask_as_old_and_current_policy():
    """mu = 4 inner updates at ratios 0.4 .. 0.999, a frozen policy (lr 0) and a reference equal to it:
    on shared masks the k3 KL is exactly 0 at every ratio, and the reference sees exactly the input that
    the current policy sees at update j."""
    batch = text_batch(6)
    cfg = small_cfg(num_iterations=4, min_mask_rate=0.2, remasking="random", beta=0.1)
    policy = Spy(tiny_model(seed=3))
    reference = Spy(copy.deepcopy(policy.inner).requires_grad_(False))
    stats = mg.grpo_step(policy, torch.optim.SGD(policy.parameters(), lr=0.0), batch, REWARDS, cfg, gen(1), reference)
    assert stats["masked_tokens"] > 0 and stats["kl"] == 0.0
    current = grad_calls(policy)
    assert len(current) == len(reference.calls) == cfg.num_iterations
    inputs = [x for x, _ in current]
    assert len({tuple(x.flatten().tolist()) for x in inputs}) == cfg.num_iterations  # the masks differ across j
    for j, (x_ref, _) in enumerate(reference.calls):
        assert torch.equal(x_ref, inputs[j]), j
    # the KL sees a mask mismatch: with unshared masks (the ablation) it is not 0
    policy = tiny_model(seed=3)
    reference = copy.deepcopy(policy).requires_grad_(False)
    unshared = small_cfg(num_iterations=4, min_mask_rate=0.2, remasking="random", beta=0.1, shared_masks=False)
    stats = mg.grpo_step(policy, torch.optim.SGD(policy.parameters(), lr=0.0), batch, REWARDS, unshared, gen(1), reference)
    assert stats["kl"] > 0


def first_eos_prefix(completion):
    """(N, L) bool: positions up to and including the first EOS (all of a row without EOS), one by one."""
    out = torch.zeros_like(completion, dtype=torch.bool)
    for i, row in enumerate(completion.tolist()):
        for n, token in enumerate(row):
            out[i, n] = True
            if token == EOS:
                break
    return out


def test_grpo_step_puts_exactly_the_masked_completion_tokens_up_to_the_first_eos_in_the_loss():
    """The loss mask grpo_step uses, read from its own backward pass: the gradient reaching the policy's
    logits is non-zero exactly at masked completion tokens up to and including the first EOS, in rows
    with a reward. Every advantage is non-zero and the policy is frozen (rho = 1), so a token in the loss
    always gets gradient."""
    batch = text_batch(3)
    P = batch.positions.start
    rewards = REWARDS.clone()
    rewards[2] = math.nan  # a missing reward: row 2 carries no loss
    cfg = small_cfg(num_iterations=3, min_mask_rate=0.3, beta=0.0)
    policy = Spy(tiny_model(seed=2))
    stats = mg.grpo_step(policy, torch.optim.SGD(policy.parameters(), lr=0.0), batch, rewards, cfg, gen(2))
    upto_eos = first_eos_prefix(batch.completion)
    assert not upto_eos.all()  # some rows have text after their first EOS
    counts = []
    for fed, logits in grad_calls(policy):
        masked = fed[:, P:] == MASK  # (N, L)
        assert masked[~upto_eos].all()  # the text after the first EOS is always masked ...
        want = masked & upto_eos & torch.isfinite(rewards)[:, None]
        got = logits.grad.abs().sum(-1) > 0  # ... but only this carries loss
        assert torch.equal(got, want)
        assert want.any() and (masked & upto_eos & ~want).any()  # the NaN row had masked tokens
        counts.append(int(want.sum()))
    assert len(counts) == cfg.num_iterations
    assert stats["masked_tokens"] == sum(counts) / len(counts)


def test_old_log_probs_are_the_policy_before_the_step_at_every_inner_update(monkeypatch):
    """rho's denominator at update j is the rollout policy (before any of the mu updates) on mask M_j,
    not the policy as updated by updates 0..j-1."""
    batch = text_batch(4)
    cfg = small_cfg(num_iterations=3, beta=0.0, epsilon=10.0)
    policy = Spy(tiny_model(seed=4))
    before = copy.deepcopy(policy.inner)
    seen = []
    grpo_loss = mg.grpo_loss

    def spy_loss(logps, old_logps, *args, **kwargs):
        seen.append((logps.detach().clone(), old_logps.clone()))
        return grpo_loss(logps, old_logps, *args, **kwargs)

    monkeypatch.setattr(mg, "grpo_loss", spy_loss)
    mg.grpo_step(policy, torch.optim.SGD(policy.parameters(), lr=2.0), batch, REWARDS, cfg, gen(5))
    fed = [x for x, _ in grad_calls(policy)]
    assert len(seen) == len(fed) == cfg.num_iterations
    with torch.no_grad():
        for j, ((logps, old), x) in enumerate(zip(seen, fed, strict=True)):
            want = mg.token_logps(before(x, batch.attention_mask, positions=batch.positions), batch.completion)
            assert torch.allclose(old, want, rtol=0, atol=1e-6), j
            if j > 0:  # the policy has moved: rho is not 1
                assert (logps - old).abs().max() > 1e-3, j


def test_gradient_is_clipped_and_grad_norm_is_measured_before_clipping():
    batch = text_batch(5)
    # the unclipped gradient of one update (mu = 1), with the policy frozen
    model = tiny_model(seed=5)
    stats = mg.grpo_step(model, torch.optim.SGD(model.parameters(), lr=0.0), batch, REWARDS,
                         small_cfg(num_iterations=1, max_grad_norm=0.0), gen(6))
    grad = {n: p.grad.clone() for n, p in model.named_parameters()}
    norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grad.values()))
    assert stats["grad_norm"] > 0 and stats["grad_norm"] == pytest.approx(norm, rel=1e-5)
    # clipped to a tenth: SGD (lr 1) moves the parameters by exactly -g * max_norm / |g|
    model = tiny_model(seed=5)
    start = params_of(model)
    stats = mg.grpo_step(model, torch.optim.SGD(model.parameters(), lr=1.0), batch, REWARDS,
                         small_cfg(num_iterations=1, max_grad_norm=norm / 10), gen(6))
    assert stats["grad_norm"] == pytest.approx(norm, rel=1e-5)  # the norm before clipping
    for name, p in model.named_parameters():  # (float32 rounding of p - start: ~1e-9 at |p| ~ 0.05)
        assert torch.allclose(p.detach() - start[name], -grad[name] / 10, rtol=1e-4, atol=1e-7), name


# -----------------------------------------------------------------------------
# rollout_text: groups; masked_logps: key padding


@torch.no_grad()
def test_rollout_text_rows_are_g_consecutive_completions_of_each_prompt():
    """Greedy rollouts (temperature 0), so each row's completion is a function of its own prompt: rows
    G i .. G i + G - 1 hold prompt i with its padding mask, completed exactly as that prompt alone."""
    model = random_weight_model(7)  # unit-scale weights: completions that depend on the prompt
    prompts, keep = left_pad(words((3, 5), 8), [5, 3, 2])
    cfg = small_cfg(num_generations=4, temperature=0.0)
    batch = mg.rollout_text(model, prompts, keep, cfg, gen(9))
    G, P = cfg.num_generations, prompts.shape[1]
    assert torch.equal(batch.sequences[:, :P], prompts.repeat_interleave(G, 0))
    assert torch.equal(batch.attention_mask[:, :P], keep.repeat_interleave(G, 0))
    completions = []
    for i in range(len(prompts)):
        alone = mg.generate_text(model, prompts[i:i + 1], gen_length=cfg.max_completion_length, block_length=cfg.block_length,
                                 steps=cfg.diffusion_steps, temperature=0.0, mask_id=MASK, attention_mask=keep[i:i + 1])
        completions.append(alone[0, P:])
        for r in range(G * i, G * (i + 1)):
            assert torch.equal(batch.completion[r], completions[i]), (i, r)
    assert len({tuple(c.tolist()) for c in completions}) == len(prompts)  # the prompts' completions differ


@torch.no_grad()
def test_masked_logps_honour_key_padding_on_left_padded_rows():
    """A left-padded row scores as the same row without its padding (RoPE is relative, so the shift
    of absolute positions changes nothing but rounding), whatever the padding tokens are."""
    model = random_weight_model(9)
    batch = text_batch(9, prompt_lengths=[5, 2, 3, 4, 5, 1, 2, 3])
    P, L = batch.positions.start, batch.completion.shape[1]
    mask = torch.zeros_like(batch.sequences, dtype=torch.bool)
    mask[:, P:] = torch.rand((8, L), generator=gen(10)) < 0.6
    got = mg.masked_logps(model, batch, mask)  # (8, L)
    noisy = batch.sequences.clone()
    noisy[~batch.attention_mask] = 7  # other padding content
    other = mg.masked_logps(model, mg.Completions(noisy, batch.attention_mask, batch.positions, batch.scored), mask)
    assert torch.allclose(got, other, rtol=0, atol=1e-5)
    assert (~batch.attention_mask).sum(1).tolist() == [0, 3, 2, 1, 0, 4, 3, 2]  # rows with and without padding
    for i in range(8):
        n = int(batch.attention_mask[i].sum()) - L  # real prompt tokens
        row = mg.Completions(batch.sequences[i:i + 1, P - n:], torch.ones((1, n + L), dtype=torch.bool), slice(n, n + L),
                             batch.scored[i:i + 1])
        alone = mg.masked_logps(model, row, mask[i:i + 1, P - n:])
        assert torch.allclose(got[i], alone[0], rtol=0, atol=1e-4), i
