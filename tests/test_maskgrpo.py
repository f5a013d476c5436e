"""Tests of maskgrpo.py: numerical pieces against the slow loop oracles of oracles.py, the method's
invariants, and a tiny end-to-end MaskGRPO run. Every random draw uses an explicit torch.Generator.

    .venv/bin/python -m pytest tests -q
"""

import copy
import math

import pytest
import torch

import maskgrpo as mg
from oracles import (
    arlike_mask_prob,
    elbo_loss_loop,
    group_advantages_loop,
    grpo_loss_loop,
    llada_generate_loop,
    num_transfer_tokens_loop,
)

# Text toy vocabulary: 0 pad, 1 EOS, 2..17 words, 19 [MASK] (18 unused).
VOCAB, PAD, EOS, MASK = 20, 0, 1, 19
# Image toy vocabulary: text words 2..15, image codes 16..27 (the logit columns), 29 [MASK].
IMG_VOCAB, IMG_MASK, CODES = 30, 29, slice(16, 28)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def tiny_model(seed=0, vocab=VOCAB, mask=MASK, **overrides):
    sizes = dict(d_model=32, n_layers=2, n_heads=2, mlp_hidden_size=64, max_sequence_length=128)
    cfg = mg.ModelConfig.tiny(vocab, mask, EOS, **(sizes | overrides))
    return mg.MaskedDiffusionLM(cfg, generator=gen(seed))


def image_model(seed=4):
    """Logits scaled up (std ~1.5 instead of ~0.08) so that the prompt and the guidance visibly matter."""
    model = tiny_model(seed=seed, vocab=IMG_VOCAB, mask=IMG_MASK)
    with torch.no_grad():
        model.model.transformer.ff_out.weight.mul_(20)
    return model


def words(shape, seed, low=2, high=18):
    return torch.randint(low, high, shape, generator=gen(seed))


def left_pad(ids, lengths, pad=PAD):
    """Keep the last lengths[i] tokens of row i; pad the rest. Returns (ids, attention_mask)."""
    P = ids.shape[1]
    keep = torch.arange(P)[None] >= P - torch.tensor(lengths)[:, None]
    return torch.where(keep, ids, pad), keep


def small_cfg(**overrides):
    base = dict(num_generations=4, max_completion_length=8, block_length=4, diffusion_steps=4, temperature=1.0,
                num_iterations=2, beta=0.0, learning_rate=1e-3, weight_decay=0.0, max_grad_norm=1.0, micro_batch_size=8)
    return mg.GRPOConfig(**(base | overrides))


def text_batch(seed, n_rows=8, P=5, L=8, eos_at=(None, 5, 2, None, 0, 7, 3, None), prompt_lengths=None):
    """Completions with a left-padded prompt and EOS padding after the first EOS at eos_at[i]."""
    prompt, prompt_mask = left_pad(words((n_rows, P), seed), prompt_lengths or [P - i % 3 for i in range(n_rows)])
    comp = words((n_rows, L), seed + 1)
    for i, e in enumerate(eos_at[:n_rows]):
        if e is not None:
            comp[i, e:] = EOS
    return mg.text_completions(torch.cat([prompt, comp], 1), prompt_mask, EOS)


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


class Spy(torch.nn.Module):
    """Records what the wrapped model is fed and keeps the gradient of the logits it returns."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.config, self.calls = model, model.config, []

    def forward(self, input_ids, attention_mask=None, **kwargs):
        logits = self.inner(input_ids, attention_mask, **kwargs)
        if logits.requires_grad:
            logits.retain_grad()
        self.calls.append((input_ids.clone(), logits))
        return logits


# -----------------------------------------------------------------------------
# Oracles: ELBO, LLaDA generation, Rev frequencies, mask-ratio schedule, advantages, GRPO loss


@pytest.mark.parametrize("variant", ["plain", "left_padded", "columns"])
def test_elbo_loss_matches_per_row_loop(variant):
    model = tiny_model(seed=1)
    x = words((4, 10), 2)
    answer = torch.zeros_like(x, dtype=torch.bool)
    answer[:, 4:] = True
    answer[2, 8:] = False  # a shorter answer (its tail is ignored)
    attention, columns = None, None
    if variant == "left_padded":
        x[:, :4], attention = left_pad(x[:, :4], [4, 2, 3, 1])
        attention = torch.cat([attention, torch.ones(4, 6, dtype=torch.bool)], 1)
    if variant == "columns":  # answers are "image codes" 10..17, logits restricted to them
        columns = slice(10, 18)
        x[:, 4:] = words((4, 6), 3, 10, 18)
        x[:, :4] = words((4, 4), 4, 2, 10)
    fast = mg.elbo_loss(model, x, answer, generator=gen(5), attention_mask=attention, columns=columns)
    with torch.no_grad():
        slow = elbo_loss_loop(model, x, answer, generator=gen(5), attention_mask=attention, columns=columns)
    assert float(slow) > 0
    assert float(fast.detach()) == pytest.approx(float(slow), rel=1e-5)


def test_transfer_counts_match_llada_split():
    counts = torch.tensor([0, 1, 4, 5, 7, 16])
    for steps in (1, 3, 4):
        assert torch.equal(mg.transfer_counts(counts, steps), num_transfer_tokens_loop(counts.tolist(), steps))
    assert num_transfer_tokens_loop([7], 3).tolist() == [[3, 2, 2]]  # remainder to the early steps


@pytest.mark.parametrize("gen_length,block_length,steps", [(12, 4, 6), (12, 4, 9), (8, 8, 3), (6, 2, 6)])
def test_generate_text_greedy_matches_llada_loop(gen_length, block_length, steps):
    model = tiny_model(seed=1)
    prompts = words((3, 5), 2)
    kw = dict(gen_length=gen_length, block_length=block_length, steps=steps, mask_id=MASK)
    fast = mg.generate_text(model, prompts, temperature=0.0, **kw)
    slow = llada_generate_loop(model, prompts, **kw)
    assert torch.equal(fast, slow)


def test_generate_text_greedy_left_padded_matches_per_row_loop():
    model = tiny_model(seed=2)
    prompts, attention = left_pad(words((4, 6), 3), [6, 4, 1, 5])
    kw = dict(gen_length=8, block_length=4, steps=6, mask_id=MASK)
    fast = mg.generate_text(model, prompts, temperature=0.0, attention_mask=attention, **kw)
    slow = llada_generate_loop(model, prompts, attention_mask=attention, **kw)
    assert torch.equal(fast, slow)
    # what stands in the padding is invisible, even the mask id itself
    repadded = torch.where(attention, prompts, MASK)
    again = mg.generate_text(model, repadded, temperature=0.0, attention_mask=attention, **kw)
    assert torch.equal(again[:, 6:], fast[:, 6:])


def test_generate_text_invariants_at_temperature():
    model = tiny_model(seed=3)
    prompts, attention = left_pad(words((5, 4), 4), [4, 3, 2, 4, 1])
    canvases = []
    out = mg.generate_text(model, prompts, gen_length=12, block_length=4, steps=9, temperature=0.9, mask_id=MASK,
                           generator=gen(6), attention_mask=attention, on_step=lambda s, x: canvases.append(x.clone()))
    assert torch.equal(out[:, :4], prompts)  # the prompt never changes
    assert not (out == MASK).any()  # nothing left masked
    assert len(canvases) == 9
    expected_counts = num_transfer_tokens_loop([4] * 5, 3)  # per block: 4 masks over 3 steps -> 2, 1, 1
    prev = torch.cat([prompts, torch.full((5, 12), MASK)], 1)
    for s, x in enumerate(canvases):
        committed = (prev != MASK) & (x != prev)
        assert not committed.any()  # committed tokens never change
        block = slice(4 + 4 * (s // 3), 4 + 4 * (s // 3 + 1))
        newly = (prev == MASK) & (x != MASK)
        assert torch.equal(newly.sum(1), expected_counts[:, s % 3])
        assert newly[:, block].sum() == newly.sum()  # only the current block is decoded
        prev = x
    # explicit generators: the same seed gives the same text, another seed other text
    same = mg.generate_text(model, prompts, gen_length=12, block_length=4, steps=9, temperature=0.9, mask_id=MASK,
                            generator=gen(6), attention_mask=attention)
    other = mg.generate_text(model, prompts, gen_length=12, block_length=4, steps=9, temperature=0.9, mask_id=MASK,
                             generator=gen(7), attention_mask=attention)
    assert torch.equal(same, out) and not torch.equal(other, out)


class FavoursMask(torch.nn.Module):
    """The wrapped model with the [MASK] logit raised: its most likely "prediction" is [MASK]."""

    def __init__(self, model, boost=5.0):
        super().__init__()
        self.inner, self.config, self.boost = model, model.config, boost

    def forward(self, input_ids, attention_mask=None, **kwargs):
        logits = self.inner(input_ids, attention_mask, **kwargs).clone()
        logits[..., self.config.mask_token_id] += self.boost
        return logits


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generate_text_never_commits_the_mask_token(temperature):
    """A committed [MASK] would stay masked after sampling (and be scored as a target later)."""
    model = FavoursMask(tiny_model(seed=1))
    out = mg.generate_text(model, words((3, 4), 1), gen_length=8, block_length=4, steps=4, temperature=temperature,
                           mask_id=MASK, generator=gen(2))
    assert not (out == MASK).any()


def test_gumbel_argmax_samples_softmax_at_temperature():
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0, 0.5])
    n = 40000
    for tau in (0.5, 1.0, 2.0):
        draws = mg.gumbel_argmax(logits.expand(n, 5), tau, gen(int(tau * 10)))
        freq = torch.bincount(draws, minlength=5).double() / n
        p = torch.softmax(logits.double() / tau, 0)
        assert (freq - p).abs().le(5 * (p * (1 - p) / n).sqrt() + 1e-12).all(), (tau, freq, p)
    assert torch.equal(mg.gumbel_argmax(logits.expand(3, 5), 0.0, None), torch.full((3,), 3))


def _scored_rows(lengths, L, reps):
    lens = torch.tensor(lengths).repeat_interleave(reps)
    return torch.arange(L)[None] < lens[:, None]


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.633, 0.9, 0.999])
def test_arlike_remask_frequencies_follow_the_ramp(ratio):
    L, lengths, reps = 12, [12, 7, 3, 2], 5000
    scored = _scored_rows(lengths, L, reps)
    mask = mg.remask(words(scored.shape, 0), ratio, "arlike", gen(1), scored)
    assert not (mask & ~scored).any()
    for k, Lb in enumerate(lengths):
        rows = mask[k * reps : (k + 1) * reps].double()
        freq = rows.mean(0)
        for n in range(L):
            p = arlike_mask_prob(n, Lb, ratio)
            assert abs(float(freq[n]) - p) <= 5 * math.sqrt(p * (1 - p) / reps) + 1e-12, (Lb, n, float(freq[n]), p)
        if ratio >= 0.5:  # the expected masked fraction of each answer is exactly the ratio
            frac = rows[:, :Lb].mean()
            var = sum(arlike_mask_prob(n, Lb, ratio) * (1 - arlike_mask_prob(n, Lb, ratio)) for n in range(Lb))
            assert abs(float(frac) - ratio) <= 5 * math.sqrt(var / Lb**2 / reps) + 1e-12
        else:  # below 0.5 the front of the answer is always visible
            assert not rows[:, 0].any()


@pytest.mark.parametrize("ratio", [0.2, 0.7])
def test_random_remask_frequencies(ratio):
    L, lengths, reps = 10, [10, 4], 8000
    scored = _scored_rows(lengths, L, reps)
    mask = mg.remask(words(scored.shape, 0), ratio, "random", gen(2), scored)
    assert not (mask & ~scored).any()
    for k, Lb in enumerate(lengths):
        freq = mask[k * reps : (k + 1) * reps, :Lb].double().mean(0)
        assert (freq - ratio).abs().max() <= 5 * math.sqrt(ratio * (1 - ratio) / reps)


def test_mask_ratio_schedule():
    got = [mg.mask_ratio(j, 12, 0.6) for j in range(12)]
    expected = [0.63333, 0.66667, 0.7, 0.73333, 0.76667, 0.8, 0.83333, 0.86667, 0.9, 0.93333, 0.96667, 0.999]
    assert got == pytest.approx(expected, abs=1e-5)
    assert [mg.mask_ratio(j, 4, 0.8) for j in range(4)] == pytest.approx([0.85, 0.9, 0.95, 0.999])
    with pytest.raises(ValueError, match="iteration"):
        mg.mask_ratio(12, 12, 0.6)


@pytest.mark.parametrize("scale_rewards", [True, False])
def test_group_advantages_match_loop(scale_rewards):
    rewards = torch.tensor([0.0, 1.0, 0.5, 2.0,  0.3, 0.3, 0.3, 0.3,  1.0, 0.0, 0.0, 0.0,  10.0, -3.0, 7.5, 7.5])
    fast = mg.group_advantages(rewards, 4, scale_rewards)
    slow = group_advantages_loop(rewards, 4, scale_rewards)
    assert torch.allclose(fast.double(), slow, rtol=1e-5, atol=1e-6)
    assert torch.equal(fast[4:8], torch.zeros(4))  # a zero-std group: exactly no signal
    assert fast[:4].abs().sum() > 0
    # G = 6: the float32 mean of six 0.3s is one ulp off 0.3, still exactly no signal
    six = torch.tensor([0.3] * 6 + [0.9] * 6 + [0.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    fast6 = mg.group_advantages(six, 6, scale_rewards)
    assert torch.equal(fast6[:12], torch.zeros(12))
    assert torch.allclose(fast6.double(), group_advantages_loop(six, 6, scale_rewards), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="num_generations"):
        mg.group_advantages(rewards[:6], 4)


@pytest.mark.parametrize("loss_type", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_matches_per_token_loop(loss_type, beta):
    N, L, eps = 6, 7, 0.2
    g = gen(3)
    base = -torch.rand((N, L), generator=g, dtype=torch.float64) * 3
    old = base + 0.4 * torch.randn((N, L), generator=g, dtype=torch.float64)  # rho spans the clip range
    ref = base + 0.3 * torch.randn((N, L), generator=g, dtype=torch.float64)
    adv = torch.tensor([1.5, -0.7, 0.0, 0.9, -2.0, 0.4], dtype=torch.float64)
    mask = torch.rand((N, L), generator=g) < 0.6
    mask[3] = False  # a row without masked tokens
    fast_logps = base.clone().requires_grad_()
    loss, stats = mg.grpo_loss(fast_logps, old, ref, adv, mask, epsilon=eps, beta=beta, loss_type=loss_type)
    loss.backward()
    slow_logps = base.clone().requires_grad_()
    slow, slow_stats = grpo_loss_loop(slow_logps, old, ref, adv, mask, epsilon=eps, beta=beta, loss_type=loss_type)
    slow.backward()
    assert loss.item() == pytest.approx(slow.item(), rel=1e-9, abs=1e-12)
    assert torch.allclose(fast_logps.grad, slow_logps.grad, rtol=1e-9, atol=1e-12)
    assert slow_stats["clip_frac"] > 0  # the data exercises clipping
    for k, v in slow_stats.items():
        assert float(stats[k]) == pytest.approx(v, rel=1e-6, abs=1e-12), k  # stats are float32
    if beta == 0:
        assert float(stats["kl"]) == 0.0


# -----------------------------------------------------------------------------
# Invariants: samplers


def image_canvas(B, seed, P=4, N=16):
    prompt = words((B, P), seed, 2, 16)
    x = torch.cat([prompt, torch.full((B, N), IMG_MASK)], 1)
    uncond = torch.cat([torch.full((B, P), PAD), torch.full((B, N), IMG_MASK)], 1)
    uncond_mask = torch.cat([torch.zeros(B, P, dtype=torch.bool), torch.ones(B, N, dtype=torch.bool)], 1)
    return x, uncond, uncond_mask, slice(P, P + N)


@pytest.mark.parametrize("mode", ["emerge", "maskgit"])
@pytest.mark.parametrize("guidance", [0.0, 3.0])
def test_generate_image_fills_every_mask_with_codes_and_keeps_the_prompt(mode, guidance):
    model = image_model()
    x, uncond, uncond_mask, pos = image_canvas(6, 5)
    canvases = []
    out = mg.generate_image(model, x, positions=pos, columns=CODES, steps=6, mask_id=IMG_MASK, mode=mode,
                            guidance_scale=guidance, uncond_ids=uncond, uncond_attention_mask=uncond_mask,
                            generator=gen(6), on_step=lambda s, c: canvases.append(c.clone()))
    assert torch.equal(out[:, : pos.start], x[:, : pos.start])
    img = out[:, pos]
    assert not (img == IMG_MASK).any()
    assert ((img >= CODES.start) & (img < CODES.stop)).all()
    prev = x
    for c in canvases:  # revealed codes never change
        assert not ((prev != IMG_MASK) & (c != prev)).any()
        prev = c
    assert torch.equal(x[:, pos], torch.full_like(x[:, pos], IMG_MASK))  # the input is not modified in place


@pytest.mark.parametrize("steps", [7, 15])
def test_maskgit_masked_count_follows_mmada_rule(steps):
    """MMaDA's t2i_generate keeps mask_len = max(1, min(unknown - 1, floor(N cos(pi/2 (s+1)/T)))) tokens
    masked after step s and returns every sampled token after the last one; 15 steps on 16 tokens make
    the clamp act (the cosine count stalls). Its Gumbel scale is compounded: tau_s = tau_0 prod_{i<=s} (1 - (i+1)/T)."""
    model = image_model()
    x, _, _, pos = image_canvas(5, 6)
    N, still = 16, []
    mg.generate_image(model, x, positions=pos, columns=CODES, steps=steps, mask_id=IMG_MASK, mode="maskgit",
                      generator=gen(1), on_step=lambda s, c: still.append((c[:, pos] == IMG_MASK).sum(1)))
    unknown = N
    for s, count in enumerate(still):
        expected = 0 if s == steps - 1 else max(1, min(unknown - 1, math.floor(N * math.cos(math.pi / 2 * (s + 1) / steps))))
        assert (count == expected).all(), (s, count, expected)
        unknown = expected
    tau = 2.0
    for s in range(steps):
        tau *= 1 - (s + 1) / steps
        assert mg.maskgit_choice_temperature(2.0, s, steps) == pytest.approx(tau, rel=1e-12, abs=1e-15)


def test_emerge_masked_fraction_follows_the_cosine_schedule():
    model = image_model()
    x, _, _, pos = image_canvas(256, 7)
    T, frac = 5, []
    mg.generate_image(model, x, positions=pos, columns=CODES, steps=T, mask_id=IMG_MASK, mode="emerge",
                      generator=gen(2), on_step=lambda s, c: frac.append(float((c[:, pos] == IMG_MASK).double().mean())))
    n = 256 * 16
    for s, f in enumerate(frac):  # every token survives step s with prob. k_s / k_t: P(masked) = k((s+1)/T)
        k = math.cos(math.pi / 2 * (s + 1) / T) if s < T - 1 else 0.0
        assert abs(f - k) <= 5 * math.sqrt(k * (1 - k) / n) + 1e-12, (s, f, k)


@pytest.mark.parametrize("mode", ["emerge", "maskgit"])
def test_cfg_with_zero_guidance_equals_no_cfg(mode):
    model = image_model()
    x, uncond, uncond_mask, pos = image_canvas(4, 8)
    kw = dict(positions=pos, columns=CODES, steps=4, mask_id=IMG_MASK, mode=mode)
    plain = mg.generate_image(model, x, generator=gen(3), **kw)
    zero = mg.generate_image(model, x, guidance_scale=0.0, uncond_ids=uncond, uncond_attention_mask=uncond_mask,
                             generator=gen(3), **kw)
    guided = mg.generate_image(model, x, guidance_scale=3.0, uncond_ids=uncond, uncond_attention_mask=uncond_mask,
                               generator=gen(3), **kw)
    assert torch.equal(plain, zero)
    assert not torch.equal(plain, guided)


def test_cfg_unconditional_canvas_tracks_the_conditional_one():
    """Each guided forward sees [x; uncond]: the same image tokens, different prompts."""
    spy = Spy(image_model())
    x, uncond, uncond_mask, pos = image_canvas(3, 11)
    mg.generate_image(spy, x, positions=pos, columns=CODES, steps=4, mask_id=IMG_MASK, guidance_scale=2.0,
                      uncond_ids=uncond, uncond_attention_mask=uncond_mask, generator=gen(1))
    assert len(spy.calls) == 4
    for fed, _ in spy.calls:
        cond, unc = fed[:3], fed[3:]
        assert torch.equal(cond[:, pos], unc[:, pos])
        assert torch.equal(cond[:, : pos.start], x[:, : pos.start]) and torch.equal(unc[:, : pos.start], uncond[:, : pos.start])
    assert (spy.calls[-1][0][:, pos] != IMG_MASK).any()  # the image did fill in between calls


def test_guided_logits_is_the_cfg_combination_of_two_forwards():
    model = image_model()
    x, uncond, uncond_mask, pos = image_canvas(3, 9)
    x[:, pos.start : pos.start + 5] = words((3, 5), 10, 16, 28)  # partly decoded
    uncond[:, pos] = x[:, pos]
    cond_mask = torch.ones_like(x, dtype=torch.bool)
    cond_mask[0, 0] = False
    w = 2.5
    got = mg.guided_logits(model, x, uncond, w, cond_mask, uncond_mask, pos, CODES)
    c = model(x, cond_mask)[:, pos, CODES]
    u = model(uncond, uncond_mask)[:, pos, CODES]
    assert torch.allclose(got, (1 + w) * c - w * u, atol=1e-5)
    assert torch.allclose(mg.guided_logits(model, x, uncond, 0.0, cond_mask, uncond_mask, pos, CODES), c, atol=1e-6)


# -----------------------------------------------------------------------------
# Invariants: the estimator and the loss


def test_text_completions_end_at_the_first_eos():
    prompt_mask = torch.tensor([[False, True], [True, True]])
    seq = torch.tensor([[PAD, 5, 7, 3, EOS, EOS, 9], [4, 6, 8, 8, 8, 8, 8]])
    batch = mg.text_completions(seq, prompt_mask, EOS)
    assert batch.scored.tolist() == [[True, True, True, False, False], [True] * 5]
    assert batch.attention_mask.tolist() == [[False, True, True, True, True, True, True], [True] * 7]  # the whole canvas
    assert torch.equal(batch.completion, seq[:, 2:])
    whole = mg.text_completions(seq, prompt_mask, EOS, score_whole_canvas=True)
    assert whole.scored.all() and whole.attention_mask[:, 2:].all()


def test_only_masked_completion_tokens_carry_loss_and_gradient():
    batch = text_batch(0)
    P = batch.positions.start
    spy = Spy(tiny_model(seed=1))
    mask = torch.zeros_like(batch.sequences, dtype=torch.bool)
    mask[:, P:] = (torch.rand(batch.scored.shape, generator=gen(1)) < 0.5) & batch.scored
    logps = mg.masked_logps(spy, batch, mask)
    loss_mask = mask[:, P:] & batch.scored
    adv = torch.tensor([1.0, -1.0, 0.5, 2.0, -0.3, 1.2, -2.0, 0.7])
    loss, _ = mg.grpo_loss(logps, logps.detach() - 0.1, None, adv, loss_mask, epsilon=0.2, beta=0.0)
    loss.backward()
    fed, logits = spy.calls[0]
    # the model sees [MASK] exactly where M is set and the clean sequence elsewhere
    assert torch.equal(fed, torch.where(mask, MASK, batch.sequences))
    # logits exist only for completion columns: the prompt cannot carry loss
    assert logits.shape[1] == batch.scored.shape[1]
    grad_norm = logits.grad.abs().sum(-1)  # (N, L)
    assert (grad_norm[~loss_mask] == 0).all()
    assert (grad_norm[loss_mask] > 0).all()


def test_elbo_gradient_only_at_masked_answer_tokens():
    spy = Spy(tiny_model(seed=1))
    x = words((4, 9), 3)
    answer = torch.zeros_like(x, dtype=torch.bool)
    answer[:, 4:] = True
    mg.elbo_loss(spy, x, answer, generator=gen(2)).backward()
    fed, logits = spy.calls[0]
    masked = fed == MASK
    assert masked.any() and not (masked & ~answer).any()  # only answer tokens are masked
    assert torch.equal(fed[~masked], x[~masked])
    grad_norm = logits.grad.abs().sum(-1)
    assert (grad_norm[~masked] == 0).all() and (grad_norm[masked] > 0).all()


def test_text_after_the_first_eos_is_masked_and_cannot_change_the_loss():
    a = text_batch(2)
    P = a.positions.start
    model, cfg = tiny_model(seed=2), small_cfg(num_iterations=4, beta=0.04)
    assert not a.scored.all()  # some rows end early
    # whatever stands after the first EOS: the same masks, log-probs and loss
    seq2 = a.sequences.clone()
    seq2[:, P:][~a.scored] = 7
    b = mg.text_completions(seq2, a.attention_mask[:, :P], EOS)
    assert torch.equal(b.scored, a.scored)
    adv = torch.linspace(-1, 1, 8)
    for j in range(cfg.num_iterations):
        mask_a, mask_b = mg.draw_mask(a, cfg, j, gen(j)), mg.draw_mask(b, cfg, j, gen(j))
        assert torch.equal(mask_a, mask_b) and mask_a[:, P:][~a.scored].all()  # the tail is always masked
        la, lb = mg.masked_logps(model, a, mask_a), mg.masked_logps(model, b, mask_b)
        assert torch.allclose(la[a.scored], lb[a.scored], atol=1e-6)
        for loss_type in ("token", "sequence"):
            kw = dict(epsilon=0.2, beta=0.04, loss_type=loss_type)
            loss_mask = mask_a[:, P:] & a.scored
            loss_a, _ = mg.grpo_loss(la, la - 0.05, la + 0.1, adv, loss_mask, **kw)
            loss_b, _ = mg.grpo_loss(lb, lb - 0.05, lb + 0.1, adv, loss_mask, **kw)
            assert loss_a.item() == pytest.approx(loss_b.item(), abs=1e-6)
    # but the tail is attended: unmasking it would change the scored tokens' log-probs
    mask = mg.draw_mask(a, cfg, 0, gen(0))
    shown = mask.clone()
    shown[:, P:] &= a.scored
    assert not torch.allclose(mg.masked_logps(model, a, mask)[a.scored], mg.masked_logps(model, a, shown)[a.scored])


def test_maskgrpo_draw_mask_uses_ratio_j_on_the_scored_completion_only():
    n = 3000
    batch = text_batch(4, n_rows=n, eos_at=[None, 5, 2, 7] * (n // 4), prompt_lengths=[5, 3, 4, 2] * (n // 4))
    P = batch.positions.start
    for j, r in [(0, 0.7), (2, 0.9)]:
        cfg = small_cfg(num_iterations=4, min_mask_rate=0.6, remasking="random")
        mask = mg.draw_mask(batch, cfg, j, gen(j))
        assert not mask[:, :P].any()  # the prompt is never masked
        assert mask[:, P:][~batch.scored].all()  # text after the first EOS stays masked
        frac = mask[:, P:][batch.scored].double().mean()
        m = int(batch.scored.sum())
        assert abs(float(frac) - r) <= 5 * math.sqrt(r * (1 - r) / m)


def test_d1_mask_covers_the_scored_completion_and_only_real_prompt_tokens():
    n = 3000
    batch = text_batch(5, n_rows=n, eos_at=[None, 5, 2, 7] * (n // 4), prompt_lengths=[5, 3, 4, 2] * (n // 4))
    P = batch.positions.start
    cfg = small_cfg(estimator="d1", p_mask_prompt=0.15)
    mask = mg.draw_mask(batch, cfg, 0, gen(0))
    assert mask[:, P:].all()
    real = batch.attention_mask[:, :P]
    assert not (mask[:, :P] & ~real).any()
    frac = float(mask[:, :P][real].double().mean())
    m = int(real.sum())
    assert abs(frac - 0.15) <= 5 * math.sqrt(0.15 * 0.85 / m)


# -----------------------------------------------------------------------------
# Invariants: the training step


def test_rho_is_exactly_one_at_the_first_inner_iteration():
    batch = text_batch(6)
    rewards = torch.tensor([0.0, 1.0, 0.5, 0.2, 1.0, 0.0, 0.0, 0.3])
    for micro in (3, 8):
        model = tiny_model(seed=3)
        cfg = small_cfg(num_iterations=1, micro_batch_size=micro, learning_rate=1e-2)
        stats = mg.grpo_step(model, mg.make_optimizer(model, cfg), batch, rewards, cfg, gen(1))
        assert stats["masked_tokens"] > 0
        assert stats["ratio_mean"] == 1.0 and stats["ratio_max"] == 1.0 and stats["clip_frac"] == 0.0


@pytest.mark.parametrize("estimator", ["maskgrpo", "d1"])
def test_shared_masks_score_old_and_current_policy_on_the_same_mask_at_every_ratio(estimator):
    """With a frozen policy (SGD, lr 0) rho is exactly 1 at every inner iteration when the masks are
    shared, and not when each policy draws its own mask (the ablation)."""
    batch = text_batch(6)
    rewards = torch.tensor([0.0, 1.0, 0.5, 0.2, 1.0, 0.0, 0.0, 0.3])
    for shared in (True, False):
        model = tiny_model(seed=3)
        cfg = small_cfg(num_iterations=4, shared_masks=shared, remasking="random", estimator=estimator, p_mask_prompt=0.5)
        stats = mg.grpo_step(model, torch.optim.SGD(model.parameters(), lr=0.0), batch, rewards, cfg, gen(1))
        assert stats["masked_tokens"] > 0
        if shared:
            assert stats["ratio_mean"] == 1.0 and stats["ratio_max"] == 1.0 and stats["clip_frac"] == 0.0
        else:
            assert stats["ratio_mean"] != 1.0 and stats["ratio_max"] > 1.0


def test_inverse_ratio_weight_scales_the_gradient_by_one_over_r():
    batch = text_batch(10)
    rewards = torch.tensor([0.0, 1.0, 0.5, 0.2, 1.0, 0.0, 0.0, 0.3])
    grads = []
    for weighted in (False, True):
        model = tiny_model(seed=2)
        cfg = small_cfg(num_iterations=2, min_mask_rate=0.2, max_grad_norm=0.0, inverse_ratio_weight=weighted)
        mg.grpo_step(model, torch.optim.SGD(model.parameters(), lr=0.0), batch, rewards, cfg, gen(5))
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))  # of the last update, j = 1
    r_last = 0.999  # r_1 of gamma 0.2, mu 2 = min(0.2 + 0.8 * 2 / 2, 0.999)
    assert grads[0].abs().max() > 0
    assert torch.allclose(grads[1], grads[0] / r_last, rtol=1e-5, atol=1e-6 * float(grads[0].abs().max()))


def test_zero_std_groups_add_no_policy_gradient():
    batch = text_batch(7)
    model = tiny_model(seed=4)
    cfg = small_cfg(beta=0.0)
    stats = mg.grpo_step(model, mg.make_optimizer(model, cfg), batch, torch.tensor([1.0] * 4 + [0.5] * 4), cfg, gen(2))
    assert stats["zero_std_frac"] == 1.0 and stats["masked_tokens"] > 0
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and (g == 0).all() for g in grads)
    # mixed with an informative group, the zero-std group's rows get exactly zero gradient
    adv = mg.group_advantages(torch.tensor([0.0, 1.0, 0.0, 0.5] + [0.5] * 4), 4)
    mask = mg.draw_mask(batch, cfg, 1, gen(3))
    logps = mg.masked_logps(model, batch, mask).detach().requires_grad_()
    loss_mask = mask[:, batch.positions] & batch.scored
    loss, _ = mg.grpo_loss(logps, logps.detach() + 0.01, None, adv, loss_mask, epsilon=0.2, beta=0.0)
    loss.backward()
    assert (logps.grad[4:] == 0).all()
    assert (logps.grad[:4][loss_mask[:4]] != 0).any()


@pytest.mark.parametrize("loss_type,beta", [("token", 0.0), ("sequence", 0.04)])
def test_micro_batching_does_not_change_the_update(loss_type, beta):
    batch = text_batch(8)
    rewards = torch.tensor([0.0, 1.0, 0.5, 0.2, 1.0, 0.0, 0.0, 0.3])
    runs = []
    for micro in (2, 3, 8):
        model = tiny_model(seed=5)
        reference = copy.deepcopy(model).requires_grad_(False) if beta else None
        cfg = small_cfg(micro_batch_size=micro, loss_type=loss_type, beta=beta, num_iterations=3, max_grad_norm=0.5)
        # plain SGD: parameters move by lr * gradient, so a gradient difference is not magnified as by
        # Adam's first step (~lr * sign(g)); the gradient clip still acts on the accumulated gradient
        stats = mg.grpo_step(model, torch.optim.SGD(model.parameters(), lr=0.5), batch, rewards, cfg, gen(4),
                             reference=reference)
        runs.append((params_of(model), stats))
    start = params_of(tiny_model(seed=5))
    pn, sn = runs[-1]
    assert max(float((pn[k] - start[k]).abs().max()) for k in pn) > 1e-3  # the update is not negligible
    for pa, sa in runs[:-1]:
        for name in pa:
            assert torch.allclose(pa[name], pn[name], rtol=0, atol=1e-6), name
        assert sa["masked_tokens"] == sn["masked_tokens"]
        for k in ("loss", "ratio_mean", "kl", "grad_norm"):
            assert sa[k] == pytest.approx(sn[k], rel=1e-4, abs=1e-7), k


def test_same_seeds_give_identical_runs_and_leave_the_global_rng_alone():
    def run():
        model = tiny_model(seed=6)
        reference = copy.deepcopy(model).requires_grad_(False)
        torch.manual_seed(123)
        state = torch.get_rng_state()
        cfg = small_cfg(num_iterations=3, beta=0.04)
        prompts, prompt_mask = left_pad(words((2, 4), 7), [4, 2])
        batch = mg.rollout_text(model, prompts, prompt_mask, cfg, gen(8))
        rewards = (batch.completion == 7).float().mean(1)
        stats = mg.grpo_step(model, mg.make_optimizer(model, cfg), batch, rewards, cfg, gen(9), reference=reference)
        assert torch.equal(torch.get_rng_state(), state)  # rollout and update draw only from their generators
        return batch.sequences, stats, params_of(model)

    (sa, ta, pa), (sb, tb, pb) = run(), run()
    assert torch.equal(sa, sb) and ta == tb
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_model_and_lora_construction_leave_the_global_rng_alone():
    """Every random draw via an explicit generator: building the model (and its adapters) with a
    generator must not consume the global RNG (nn.Linear / nn.Embedding default inits do)."""
    torch.manual_seed(0)
    state = torch.get_rng_state()
    model = tiny_model(seed=1)
    assert torch.equal(torch.get_rng_state(), state), "MaskedDiffusionLM(cfg, generator) drew from the global RNG"
    mg.add_lora(model, rank=2, alpha=2, generator=gen(2))
    assert torch.equal(torch.get_rng_state(), state), "add_lora(..., generator) drew from the global RNG"


def test_lora_reference_is_the_base_model_and_only_adapters_train():
    base = tiny_model(seed=7)
    model = mg.add_lora(copy.deepcopy(base), rank=4, alpha=8, generator=gen(1))
    x = words((2, 9), 3)
    ref = base(x)
    assert torch.equal(model(x), ref)  # B = 0: the adapters start as the identity update
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.transformer.blocks.{i}.{proj}.lora_{ab}.weight"
                         for i in range(2) for proj in ("q_proj", "k_proj", "v_proj", "up_proj") for ab in "AB"}
    assert set(base.state_dict()) <= set(model.state_dict())  # checkpoint names survive the wrapping
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, mg.LoRALinear):
                m.lora_B.weight.normal_(generator=gen(2))
    assert not torch.allclose(model(x), ref, atol=1e-4)
    # y = W h + (alpha / r) B A h
    layer, h = model.model.transformer.blocks[1].up_proj, torch.randn(5, 32, generator=gen(3))
    expected = h @ layer.weight.T + (8 / 4) * (h @ layer.lora_A.weight.T) @ layer.lora_B.weight.T
    assert torch.allclose(layer(h), expected, atol=1e-6)
    with mg.lora_disabled(model):
        assert torch.equal(model(x), ref)
    assert not torch.allclose(model(x), ref, atol=1e-4)  # switched back on


def test_grpo_step_with_lora_uses_the_adapter_free_model_as_reference():
    base = tiny_model(seed=8)
    model = mg.add_lora(copy.deepcopy(base), rank=4, alpha=8, generator=gen(1))
    batch = text_batch(9)
    rewards = torch.tensor([0.0, 1.0, 0.5, 0.2, 1.0, 0.0, 0.0, 0.3])
    cfg = small_cfg(num_iterations=1, beta=0.04, learning_rate=1e-2)
    opt = mg.make_optimizer(model, cfg)
    first = mg.grpo_step(model, opt, batch, rewards, cfg, gen(2))
    assert first["kl"] == 0.0 and first["ratio_max"] == 1.0  # before any update policy == old == reference
    later = [mg.grpo_step(model, opt, batch, rewards, cfg, gen(3 + i)) for i in range(2)]
    assert later[-1]["kl"] > 0
    x = batch.sequences
    with mg.lora_disabled(model):
        assert torch.equal(model(x), base(x))  # base weights are frozen
    assert not torch.allclose(model(x), base(x), atol=1e-5)
    with pytest.raises(ValueError, match="reference"):
        plain = tiny_model()
        mg.grpo_step(plain, mg.make_optimizer(plain, cfg), batch, rewards, cfg, gen(0))


# -----------------------------------------------------------------------------
# Invariants: the model


def test_llada_8b_parameter_count_and_hf_key_names():
    with torch.device("meta"):
        model = mg.MaskedDiffusionLM(mg.ModelConfig.llada_8b())
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 8.016e9) <= 0.001e9, n
    names = ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out", "attn_norm", "ff_norm")
    expected = {"model.transformer.wte.weight", "model.transformer.ln_f.weight", "model.transformer.ff_out.weight"}
    expected |= {f"model.transformer.blocks.{i}.{name}.weight" for i in range(32) for name in names}
    state = model.state_dict()
    assert set(state) == expected
    assert state["model.transformer.wte.weight"].shape == (126464, 4096)
    assert state["model.transformer.blocks.0.ff_proj.weight"].shape == (12288, 4096)
    assert state["model.transformer.blocks.31.ff_out.weight"].shape == (4096, 12288)
    assert mg.ModelConfig.mmada_8b().vocab_size == 134656


def test_forward_slices_equal_slices_of_full_logits():
    model = tiny_model(seed=9)
    x = words((3, 11), 4)
    attention = torch.ones_like(x, dtype=torch.bool)
    attention[1, :3] = False
    full = model(x, attention)
    part = model(x, attention, positions=slice(4, 9), columns=slice(3, 12))
    assert torch.allclose(part, full[:, 4:9, 3:12], atol=1e-6)
    assert part.dtype == torch.float32


def test_key_padding_content_does_not_change_other_logits():
    model = tiny_model(seed=10)
    x = words((2, 10), 5)
    attention = torch.ones_like(x, dtype=torch.bool)
    attention[0, :3] = False
    attention[1, 8:] = False
    y = x.clone()
    y[~attention] = torch.tensor([MASK, 7, 3, EOS, 12])
    a, b = model(x, attention), model(y, attention)
    assert torch.allclose(a[attention], b[attention], atol=1e-6)
    assert not torch.allclose(model(x), model(y), atol=1e-4)  # without the mask the padding is seen


def test_gradient_checkpointing_gives_the_same_gradients():
    x = words((2, 9), 6)
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(seed=11)
        model.gradient_checkpointing = checkpointing
        mg.elbo_loss(model, x, torch.ones_like(x, dtype=torch.bool), generator=gen(1)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-7), name


@pytest.mark.parametrize("build,field", [
    (lambda: small_cfg(max_completion_length=8, block_length=3), "block_length"),
    (lambda: small_cfg(num_generations=1), "num_generations"),
    (lambda: small_cfg(remasking="fading"), "remasking"),
    (lambda: small_cfg(estimator="ppo"), "estimator"),
    (lambda: small_cfg(diffusion_steps=3), "diffusion_steps"),
    (lambda: small_cfg(min_mask_rate=1.0), "min_mask_rate"),
    (lambda: mg.ModelConfig.tiny(20, mask_token_id=20, eos_token_id=1), "mask_token_id"),
    (lambda: mg.ModelConfig.tiny(20, mask_token_id=5, eos_token_id=5), "eos_token_id"),
    (lambda: mg.ModelConfig.tiny(20, 19, 1, d_model=30, n_heads=4), "d_model"),
])
def test_bad_config_errors_name_the_field(build, field):
    with pytest.raises(ValueError, match=field):
        build()


def test_sampler_argument_errors():
    model = tiny_model()
    prompts = words((1, 3), 0)
    with pytest.raises(ValueError, match="block_length"):
        mg.generate_text(model, prompts, gen_length=8, block_length=3, steps=8, temperature=0, mask_id=MASK)
    with pytest.raises(ValueError, match="steps"):
        mg.generate_text(model, prompts, gen_length=8, block_length=4, steps=3, temperature=0, mask_id=MASK)
    with pytest.raises(ValueError, match="uncond_ids"):
        mg.generate_image(model, prompts, positions=slice(1, 3), columns=slice(2, 10), steps=2, mask_id=MASK,
                          guidance_scale=1.0)


# -----------------------------------------------------------------------------
# End to end


def test_maskgrpo_raises_a_toy_reward():
    """Reward = fraction of completion tokens equal to TARGET. A random tiny model emits it ~1/19 of
    the time; MaskGRPO (AR-like Rev, rising ratios) must make it clearly more frequent."""
    TARGET = 7
    g = gen(0)
    model = tiny_model(seed=12)
    cfg = small_cfg(num_generations=4, num_iterations=2, learning_rate=1e-2, micro_batch_size=16)
    opt = mg.make_optimizer(model, cfg)
    history = []
    for _ in range(12):
        prompts = torch.randint(2, 18, (4, 4), generator=g)
        batch = mg.rollout_text(model, prompts, torch.ones_like(prompts, dtype=torch.bool), cfg, g)
        rewards = (batch.completion == TARGET).float().mean(1)
        stats = mg.grpo_step(model, opt, batch, rewards, cfg, g)
        assert math.isfinite(stats["loss"])
        history.append(stats["reward_mean"])
    first, last = sum(history[:3]) / 3, sum(history[-3:]) / 3
    assert last > first + 0.4 and last > 0.6, history


def test_text_confidence_is_the_full_vocabulary_softmax_and_mask_is_never_a_candidate():
    """LLaDA's generate() ranks candidates by softmax over the full vocabulary, [MASK] included in the
    normaliser. Position 0 puts most mass on [MASK] (id 2): among real tokens its candidate is surer than
    position 1's (0.88 vs 0.82 without [MASK]), but under the full softmax it is far less sure (0.26)."""
    logits = torch.tensor([[[2.0, 0.0, 3.0], [1.5, 0.0, -10.0]]], dtype=torch.float64)  # (1, 2, V=3), [MASK] = 2
    x0, conf = mg.text_candidates(logits, 0.0, 2, None)
    assert x0.tolist() == [[0, 0]]
    full = logits.softmax(-1)
    assert torch.allclose(conf, full[..., 0])
    commit = mg.top_k_commit(conf, torch.ones(1, 2, dtype=torch.bool), torch.tensor([1]))
    assert commit.tolist() == [[False, True]]
    x0, _ = mg.text_candidates(logits.expand(4096, 2, 3), 5.0, 2, gen(0))
    assert (x0 != 2).all()  # even at a high temperature, never [MASK]


# -----------------------------------------------------------------------------
# Rev kinds "trace" (the sampler's decoding order) and "official" (the official code's as-run ramp)


def test_trace_remask_follows_the_ramp_over_the_decoding_order():
    """Rank 0 = committed first. Rows: a permutation order, an order with ties (two tokens per step:
    ties go by position), and a 5-token answer (the canvas after it unscored, never masked)."""
    L, ratio, n = 8, 0.7, 40000
    order = torch.tensor([[3, 1, 8, 2, 7, 4, 6, 5], [1, 1, 2, 2, 3, 3, 4, 4], [5, 4, 3, 2, 1, 6, 7, 8]])
    scored = torch.ones(3, L, dtype=torch.bool)
    scored[2, 5:] = False
    ranks = [[2, 0, 7, 1, 6, 3, 5, 4], [0, 1, 2, 3, 4, 5, 6, 7], [4, 3, 2, 1, 0, None, None, None]]
    rows = torch.arange(3).repeat(n)
    masks = mg.remask(torch.zeros(3 * n, L, dtype=torch.long), ratio, "trace", gen(0), scored[rows], order=order[rows])
    freq = masks.view(n, 3, L).float().mean(0)
    for r, row in enumerate(ranks):
        length = sum(k is not None for k in row)
        for i, k in enumerate(row):
            expected = 0.0 if k is None else arlike_mask_prob(k, length, ratio)
            assert abs(float(freq[r, i]) - expected) < 0.012, (r, i, float(freq[r, i]), expected)


def test_trace_in_position_order_is_arlike_and_trace_needs_an_order():
    comp = words((64, 10), 0)
    scored = torch.arange(10)[None] < torch.randint(1, 11, (64, 1), generator=gen(1))
    order = torch.arange(1, 11).expand(64, 10)
    trace = mg.remask(comp, 0.75, "trace", gen(2), scored, order=order)
    assert torch.equal(trace, mg.remask(comp, 0.75, "arlike", gen(2), scored))
    with pytest.raises(ValueError, match="needs the decoding order"):
        mg.remask(comp, 0.75, "trace", gen(2), scored)


def test_official_ramp_masks_what_the_official_code_masks():
    """The official remask_ar's prompt_len is 1, so its ramp runs over prompt + canvas: P(mask at canvas
    position n) = clamp(1 - 2(1 - r)(1 - (P - 1 + n) / (P + L - 2))). At r = 0.633, P = 20, L = 30 that
    masks 0.779 of the canvas on average (as measured by running the official function), not 0.633."""
    P, L, ratio, n = 20, 30, 0.633, 20000
    masks = mg.remask(torch.zeros(n, L, dtype=torch.long), ratio, "official", gen(3), prompt_length=P)
    expected = [min(max(1 - 2 * (1 - ratio) * (1 - (P - 1 + i) / (P + L - 2)), 0.0), 1.0) for i in range(L)]
    assert torch.allclose(masks.float().mean(0), torch.tensor(expected), atol=0.012)
    assert abs(sum(expected) / L - 0.779) < 0.001 and abs(float(masks.float().mean()) - 0.779) < 0.003


def test_draw_mask_passes_the_trajectory_and_the_prompt_width():
    batch = text_batch(4)
    L = batch.completion.shape[1]
    batch = mg.replace(batch, trajectory=torch.arange(L, 0, -1).expand(8, L).clone())  # decoded right to left
    cfg = small_cfg(remasking="trace", num_iterations=4)
    mask = mg.draw_mask(batch, cfg, 0, gen(5))[:, batch.positions]
    expected = mg.remask(batch.completion, mg.mask_ratio(0, 4, cfg.min_mask_rate), "trace", gen(5), batch.scored,
                         order=batch.trajectory)
    assert torch.equal(mask, expected | ~batch.scored)
    cfg = small_cfg(remasking="official", num_iterations=4)
    mask = mg.draw_mask(batch, cfg, 1, gen(6))[:, batch.positions]
    expected = mg.remask(batch.completion, mg.mask_ratio(1, 4, cfg.min_mask_rate), "official", gen(6), batch.scored,
                         prompt_length=batch.positions.start)
    assert torch.equal(mask, expected | ~batch.scored)


# -----------------------------------------------------------------------------
# Bad input never reaches the weights: missing rewards, non-finite gradients, NaN configs


def group_advantages_nan_loop(rewards, G, scale_rewards=True, eps=1e-4):
    """Per group: mean and unbiased std over the finite rewards; A = 0 for a missing reward and for every
    row of a group with < 2 finite rewards or all of them equal."""
    out = []
    for g in range(0, len(rewards), G):
        group = [float(v) for v in rewards[g : g + G]]
        good = [v for v in group if math.isfinite(v)]
        signal = len(good) >= 2 and max(good) > min(good)
        mean = sum(good) / len(good) if good else 0.0
        std = math.sqrt(sum((v - mean) ** 2 for v in good) / (len(good) - 1)) if len(good) > 1 else 0.0
        for v in group:
            if not (signal and math.isfinite(v)):
                out.append(0.0)
            else:
                out.append((v - mean) / (std + eps) if scale_rewards else v - mean)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("scale_rewards", [True, False])
def test_group_advantages_treat_non_finite_rewards_as_missing(scale_rewards):
    nan, inf = math.nan, math.inf
    r = torch.tensor([1.0, nan, 0.0, 2.0, inf, 0.5, 0.5, nan, nan, nan, nan, 3.0, -inf, 1.0, 1.0, nan, 0.2, 0.9, 0.4, 0.1])
    got = mg.group_advantages(r, 4, scale_rewards).double()
    assert torch.allclose(got, group_advantages_nan_loop(r, 4, scale_rewards), atol=1e-5)
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("bad", ["one_nan", "inf", "all_nan"])
def test_non_finite_rewards_never_reach_the_weights(bad):
    """A missing reward's row carries no loss; with all rewards missing no update is applied."""
    model = tiny_model(1)
    cfg = small_cfg(num_iterations=3)
    batch = text_batch(7)
    rewards = torch.linspace(0, 1, 8)
    rewards[{"one_nan": [2], "inf": [0, 5], "all_nan": list(range(8))}[bad]] = math.nan if bad != "inf" else math.inf
    before = params_of(model)
    opt = mg.make_optimizer(model, cfg)
    stats = mg.grpo_step(model, opt, batch, rewards, cfg, gen(0))
    after = params_of(model)
    assert all(torch.isfinite(p).all() for p in after.values())
    assert stats["nonfinite_rewards"] == {"one_nan": 1, "inf": 2, "all_nan": 8}[bad]
    moved = any(not torch.equal(before[k], after[k]) for k in before)
    assert moved == (bad != "all_nan")
    assert stats["skipped_updates"] == (3 if bad == "all_nan" else 0)
    if bad == "one_nan":  # the row with the missing reward gets no gradient at all (no policy term, no KL)
        spy = Spy(tiny_model(1))
        mg.grpo_step(spy, mg.make_optimizer(spy, cfg), batch, rewards, cfg, gen(0))
        graded = [logits.grad for _, logits in spy.calls if logits.requires_grad]
        assert len(graded) == 3 and all(torch.all(g[2] == 0) and g.abs().sum() > 0 for g in graded)


def test_rewards_may_be_a_list_with_none_for_missing_and_anything_else_is_refused():
    cfg = small_cfg(num_iterations=1)
    batch = text_batch(8)
    model = tiny_model(2)
    stats = mg.grpo_step(model, mg.make_optimizer(model, cfg), batch, [0.0, 1.0, None, 0.5, 1, 0, 0.25, 0.75], cfg, gen(0))
    assert stats["nonfinite_rewards"] == 1 and math.isfinite(stats["reward_mean"])
    with pytest.raises(TypeError, match=r"rewards\[3\] = 'high' is not a number"):
        mg.grpo_step(model, mg.make_optimizer(model, cfg), batch, [0.0, 1.0, 0.2, "high", 1, 0, 0.25, 0.75], cfg, gen(0))
    with pytest.raises(ValueError, match=r"rewards must have shape \(8,\), one per completion, got \(7,\)"):
        mg.grpo_step(model, mg.make_optimizer(model, cfg), batch, [0.0] * 7, cfg, gen(0))


def test_an_update_with_a_non_finite_gradient_norm_is_skipped_and_counted():
    model = tiny_model(3)
    cfg = small_cfg(num_iterations=2)
    opt = mg.make_optimizer(model, cfg)
    weight = model.model.transformer.blocks[0].q_proj.weight
    handle = weight.register_hook(lambda g: g * math.nan)
    before = params_of(model)
    stats = mg.grpo_step(model, opt, text_batch(9), torch.linspace(0, 1, 8), cfg, gen(0))
    handle.remove()
    assert stats["skipped_updates"] == 2 and math.isnan(stats["grad_norm"])
    assert all(torch.equal(before[k], p) for k, p in params_of(model).items())
    assert not opt.state  # AdamW never stepped: no moments were written either


@pytest.mark.parametrize("build, field", [
    (lambda: mg.GRPOConfig(temperature=math.nan), "GRPOConfig.temperature"),
    (lambda: mg.GRPOConfig(learning_rate=math.inf), "GRPOConfig.learning_rate"),
    (lambda: mg.GRPOConfig(beta=math.nan), "GRPOConfig.beta"),
    (lambda: mg.GRPOConfig(epsilon=math.nan), "GRPOConfig.epsilon"),
    (lambda: mg.GRPOConfig(min_mask_rate=math.nan), "GRPOConfig.min_mask_rate"),
    (lambda: mg.GRPOConfig(adam_betas=(0.9, math.nan)), "GRPOConfig.adam_betas"),
    (lambda: mg.GRPOConfig(max_grad_norm=math.inf), "GRPOConfig.max_grad_norm"),
    (lambda: mg.ModelConfig.tiny(VOCAB, MASK, EOS, rope_theta=math.nan), "ModelConfig.rope_theta"),
    (lambda: mg.ModelConfig.tiny(VOCAB, MASK, EOS, rms_norm_eps=math.inf), "ModelConfig.rms_norm_eps"),
])
def test_non_finite_config_fields_are_refused_by_name(build, field):
    with pytest.raises(ValueError, match=f"{field} must be a finite number"):
        build()
