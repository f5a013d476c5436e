"""Exact likelihood of a masked diffusion LM on toys small enough to enumerate, under a random-order
sampler and under the samplers actually used (maskgrpo.generate_text / generate_image), and how the GRPO
importance-ratio estimators compare with the exact log-ratio.

Why this exists
---------------
GRPO needs rho = pi_theta(o) / pi_old(o) for a sampled completion o. For a masked diffusion model
pi(o) is a marginal over every unmasking trajectory, so MaskGRPO and d1 use per-token surrogates
scored on one re-masked copy of o (MaskGRPO, arXiv 2510.02880 §4; d1, arXiv 2504.12216 §3). On a real model the exact value is out
of reach; here the completion has L = 4 tokens from K = 4, so all L! = 24 unmasking orders (and all
2^L = 16 partially revealed states) can be enumerated and the surrogates compared with the truth.

The sampler whose likelihood is computed (`sample_random_order`)
---------------------------------------------------------------
Canvas = prompt p + L masks. Each of L steps picks one still-masked position uniformly at random and
fills it with a draw from pi(. | x_t) at that position (temperature 1). This is MDLM's ancestral
sampler (the "emerge" sampler of maskgrpo.generate_image) in the limit of many steps: there every
masked token has an iid reveal time, so the order is uniform and no two tokens are revealed in the
same step. It is not LLaDA's confidence-ranked sampler (maskgrpo.generate_text), whose order depends
on the model's own confidence and whose marginal has no such closed form.

Exact likelihood by dynamic programming over revealed sets (`exact_logprobs`)
----------------------------------------------------------------------------
    P(o | p) = sum over orders sigma of prod_k  1/(L-k) * pi(o_{sigma_k} | x_{sigma_1..sigma_{k-1}})
x_S is prompt + o with only the positions in S revealed (the others [MASK]). With P(S) the
probability that the sampler has revealed exactly the set S and written o there:
    P({}) = 1,    P(S u {i}) += P(S) * 1/(L - |S|) * pi(o_i | x_S)   for i not in S,    P(o) = P({1..L}).
pi(o_i | x_S) for all 2^L sets S and all L positions comes from ONE batched forward of 2^L rows
(maskgrpo.masked_logps with mask = complement of S); the recursion runs in float64 (the log-probs
themselves are the model's float32 output). Two other exact quantities come from the same table:
  - left to right: log P_LR(o) = sum_k log pi(o_k | x_{1..k-1}), the semi-autoregressive extreme
    (maskgrpo.generate_text with block_length 1 at temperature 1 samples this, over the full vocabulary);
  - the ELBO = E_sigma[ log P_sigma(o) ] = sum_S 1/C(L,|S|) * 1/(L-|S|) * sum_{i not in S} log pi(o_i | x_S)
    <= log P(o) (Jensen). It equals the MDLM/LLaDA continuous-time bound
    E_{t~U(0,1)} E_{M~Bern(t)} [ (1/t) sum_{i in M} log pi(o_i | x_M) ], because a mask with m of L
    positions has int_0^1 t^(m-1) (1-t)^(L-m) dt = (m-1)!(L-m)!/L! = 1/C(L,m) * 1/m (Ou et al. 2024,
    arXiv 2406.03736: absorbing diffusion is an any-order autoregressive model).

Estimators of  Delta = log pi_theta(o) - log pi_old(o)  (`ESTIMATORS`, `estimator_samples`)
-------------------------------------------------------------------------------------------
One mask draw M (N, T), the same for both policies (shared seeds, as MaskGRPO):
    Delta_hat(M) = w * sum_{k masked by M in o} [ log pi_theta(o_k | o masked by M) - log pi_old(o_k | o masked by M) ]
  - MaskGRPO: M = maskgrpo.draw_mask at inner iteration j, ratio r_j = min(gamma + (1-gamma)(j+1)/mu, 0.999),
    Rev "arlike" (text, the paper's choice) or "random" (images); w = 1 (official code) or 1/r_j (paper).
    Every inner iteration j = 0..mu-1 gets `draws` independent masks; statistics pool all of them
    (one inner update sees one mask at one ratio); per-ratio statistics are kept in row["per_ratio"].
    (In maskgrpo.grpo_step the 1/r_j weights update j's loss; rho itself is never weighted. At a fixed
    ratio the weight is a constant factor: it rescales Delta_hat without changing its sign.)
  - d1 (diffu-GRPO): M = maskgrpo.draw_mask with estimator "d1": the whole completion masked (t = 1),
    each prompt token masked w.p. p_mask_prompt = 0.15; w = 1.
  - ELBO: random mask at t ~ U(eps, 1] per draw (maskgrpo.forward_mask, as maskgrpo.elbo_loss), w = 1/t.
    Not a GRPO estimator: its mean is the exact ELBO difference (up to eps), a check on the table.
These are per-token surrogates: the sum over masked tokens of a log-ratio under one partial
context is not an unbiased estimate of the sequence log-ratio, and none of them claims to be. What a
GRPO update needs most is the direction: does Delta_hat rise and fall with Delta across completions?

Statistics (`summarise`), over N completions o_i sampled from pi_old and D mask draws each
------------------------------------------------------------------------------------------
    bias            mean_{i,d} (Delta_hat_{i,d} - Delta_i)
    slope           least-squares slope of mean_d Delta_hat_{i,d} on Delta_i over i (1 = the right scale)
    std completions std_i of mean_d Delta_hat_{i,d}   (compare with std_i Delta_i in the first row)
    std masks       sqrt(mean_i var_d Delta_hat_{i,d})   (the noise a single mask draw adds)
    RMSE            sqrt(mean_{i,d} (Delta_hat_{i,d} - Delta_i)^2)
    corr (1 mask)   Pearson correlation of Delta_hat_{i,d} with Delta_i over all pairs (i, d)
    corr (avg)      Pearson correlation of mean_d Delta_hat_{i,d} with Delta_i over i
    sign agree      fraction of pairs (i, d) with sign(Delta_hat_{i,d}) == sign(Delta_i)

Toy task (`toy_sequences`, `make_policies`)
------------------------------------------
Tokens 0..3 ("content"), EOS 4 (never generated here), MASK 5. Prompt (x, y); the completion repeats
x or y (a coin flip) L = 4 times, each token replaced by a uniform token w.p. 0.1; e.g. prompt (2, 0)
-> (2, 2, 2, 2) or (0, 0, 0, 0), sometimes (0, 3, 0, 0). The completion's tokens depend strongly on
each other (the first one revealed decides the rest), so a per-token view of o differs from the
sequence view. The policy is the softmax over the content columns 0..3 (maskgrpo's `columns`
slice), so a completion is one of 4^4 = 256 sequences. pi_old = a tiny MaskedDiffusionLM after
`pretrain_steps` of maskgrpo.elbo_loss; pi_theta = a copy after `shift_steps` more steps at
`shift_lr` (the size of the policy step) on data that always repeats x, the first prompt token, so
Delta > 0 for x-runs and < 0 for y-runs. Completions are sampled from pi_old by sample_random_order,
as GRPO samples its group from the old policy. Positions are exchangeable in this task: it has no
left-to-right structure for the AR-like Rev to exploit.

API
---
    sample_random_order(model, prompt_ids, length, generator, columns) -> (B, P + L) sequences
    exact_logprobs(model, batch) -> dict(any_order, left_to_right, elbo), each (N,) float64
    exact_logprob(model, prompt_ids, completion_ids, columns=None) -> float (any order, one sequence)
    completion_distribution(model, prompt_ids, length, columns) -> every completion and its exact P
    total_variation(sequences, tokens, probs) -> TV distance of sampled completions to the exact P
    mask_draws(new, old, batch, kind, remasking, ...) -> unweighted Delta_hat and t, each (N, J, D) float64
    estimator_samples(new, old, batch, estimator, ...) -> Delta_hat (N, J, D) float64, J = ratios
    estimator_table(new, old, batch, ...) -> (rows, markdown)      rows: list of dicts (see `summarise`)
    per_ratio_markdown(rows) -> markdown of the MaskGRPO rows split by ratio r_j
    plot_estimators(rows) -> matplotlib Figure: scatter per estimator + per-ratio panels
    make_policies(...) -> (pi_old, pi_theta);  toy_completions(...) -> maskgrpo.Completions

The CLI also samples one prompt's completions with sample_random_order and with
maskgrpo.generate_image(mode="emerge") at T steps and prints their TV distance to the exact P: the
former sits at the sampling-noise floor, the latter approaches it as T grows (T = 1 is the
mean-field product of pi(o_i | all masked)).

The samplers actually used: exact laws by a DP over canvases (`text_dp`, `image_dp`)
------------------------------------------------------------------------------------
generate_text (LLaDA's semi-AR low-confidence sampler: blocks, transfer_counts per step, Gumbel-max
candidates, confidence ranking; with cache="prefix"/"dual" and/or a confidence threshold) and
generate_image (emerge, MaskGIT) are Markov chains on canvases. The DP carries P(canvas) from one loop
step to the next, enumerating each step's own randomness (the joint candidate draw of the block's
masked positions) and applying maskgrpo's commit rules to each draw (see the section comment). The
result is exact, differentiable in the weights, and checked against >= 20,000 draws of each sampler
(tests/test_exact.py).

A task where order matters (`running_sums`) and the estimators under the semi-AR sampler
---------------------------------------------------------------------------------------
Prompt d_1..d_6 (digits mod 3), completion o_k = d_1 + ... + d_k mod 3: o_k is easy given o_{k-1}, hard
without it. pi_old = a tiny model after 200 SFT steps (cut short); pi_theta = pi_old after 2 MaskGRPO
steps (AR-like Rev, reward = fraction of correct tokens). Completions come from generate_text (2 blocks
of 3, one commit per step, temperature 1) with their decoding trajectory. `semi_ar_table` compares with
the exact Delta = log pi_theta(o) - log pi_old(o) under that sampler (text_dp) the Rev estimators
(AR-like, random, the official as-run ramp, trace-ordered), d1, coupled complementary masks
(`estimator_masks`), the ESPO sequence-level log-ratio (ELBO_new - ELBO_old) / L and the unbiased ELBO,
with the columns above plus the cosine between each estimator's gradient and the exact gradient of
log pi_theta(o) (autograd through text_dp; `gradient_cosines`). `gamma_mu_grid` repeats the Rev rows at
gamma in {0, 0.6, 0.8} x mu in {4, 12}; `sampler_distance_table` gives KL and TV between the exact
sampler's law and the Fast-dLLM rollouts' (prefix / dual cache, threshold 0.9 / 0.7), by enumeration.
The row "pi_old's commit decisions" is text_dp(pi_theta, rank_model=pi_old): the log-ratio with the
commit decisions frozen. Its gap to the truth is the part of Delta that comes from changed commit
decisions, a piecewise-constant function of the weights that no per-token surrogate sees and no
gradient reaches.

    text_dp(model, prompts, **generate_text options, targets=None) -> (rows, completions, probs)
    image_dp(model, input_ids, **generate_image options, targets=None) -> (rows, image tokens, probs)
    law_distance(support_p, p, support_q, q) -> dict(kl, tv)
    make_semi_ar_policies(seed) -> (pi_old, pi_theta);  semi_ar_completions(...) -> maskgrpo.Completions
    semi_ar_logprob(model, batch) -> exact log P(o) under the semi-AR sampler, (N,) differentiable
    semi_ar_table / gamma_mu_grid / sampler_distance_table -> (rows, markdown)
    plot_semi_ar(rows, grid_rows) -> Figure;  semi_ar_demo(seed=0) -> (rows, markdown, Figure), ~15 s

Run (options as --key=value, `-h` lists them; writes runs/exact/{table.md, estimators.png, semi_ar.md,
semi_ar.png}):
    .venv/bin/python toy/exact.py                       # both studies, 5 seeds of the semi-AR one
    .venv/bin/python toy/exact.py --semi_ar=false       # the random-order study only (~20 s)
"""

import copy
import itertools
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from maskgrpo import (
    CACHES,
    Completions,
    GRPOConfig,
    MaskedDiffusionLM,
    ModelConfig,
    draw_mask,
    elbo_loss,
    emerge_reveal_prob,
    forward_mask,
    generate_image,
    generate_text,
    grpo_step,
    gumbel_argmax,
    make_optimizer,
    mask_ratio,
    masked_logps,
    maskgit_choice_temperature,
    maskgit_keep_masked,
    rollout_text,
    text_completions,
    threshold_counts,
    top_k_commit,
    transfer_counts,
)
from toy.common import run_cli

# -----------------------------------------------------------------------------
# Toy world

NUM_TOKENS = 4  # K content tokens 0..K-1: the vocabulary a completion is drawn from
EOS_ID = 4
MASK_ID = 5
VOCAB_SIZE = 6
COLUMNS = slice(0, NUM_TOKENS)  # the policy's output vocabulary (EOS and MASK are never generated)
PROMPT_LEN = 2
COMPLETION_LEN = 4  # L: 4! = 24 orders, 2^4 = 16 revealed sets
NOISE = 0.1  # probability that a completion token is replaced by a uniform token
MAX_EXACT_LENGTH = 12  # 2^L forward rows per completion; beyond this enumerating is pointless


def toy_model_config():
    return ModelConfig.tiny(VOCAB_SIZE, MASK_ID, EOS_ID, d_model=32, n_layers=2, n_heads=2, mlp_hidden_size=64,
                            max_sequence_length=16)


def toy_sequences(n, generator, p_first=0.5):
    """n rows of prompt (x, y) + a completion that repeats x (w.p. p_first) or else y L times, each
    completion token replaced by a uniform token w.p. NOISE. Returns (n, PROMPT_LEN + L) long."""
    prompt = torch.randint(0, NUM_TOKENS, (n, PROMPT_LEN), generator=generator)
    second = (torch.rand(n, generator=generator) >= p_first).long()
    completion = prompt[torch.arange(n), second][:, None].expand(n, COMPLETION_LEN)  # (n, L)
    noisy = torch.rand((n, COMPLETION_LEN), generator=generator) < NOISE
    completion = torch.where(noisy, torch.randint(0, NUM_TOKENS, (n, COMPLETION_LEN), generator=generator), completion)
    return torch.cat([prompt, completion], 1)


def sft(model, steps, lr, generator, p_first=0.5, batch_size=64, make_batch=None, prompt_length=PROMPT_LEN,
        columns=COLUMNS):
    """`steps` AdamW steps of maskgrpo.elbo_loss (the prompt is never masked) on make_batch(n, generator)
    ((n, T) sequences whose first prompt_length tokens are the prompt), default toy_sequences(n, generator, p_first)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        seq = toy_sequences(batch_size, generator, p_first) if make_batch is None else make_batch(batch_size, generator)
        answer = torch.zeros_like(seq, dtype=torch.bool)
        answer[:, prompt_length:] = True
        loss = elbo_loss(model, seq, answer, generator=generator, columns=columns)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


def make_policies(seed=0, pretrain_steps=150, pretrain_lr=1e-2, shift_steps=10, shift_lr=1e-3):
    """pi_old: a tiny MaskedDiffusionLM after `pretrain_steps` of SFT on the toy task.
    pi_theta: a copy after `shift_steps` more SFT steps at `shift_lr` on data that always repeats the
    first prompt token (the size of the policy step grows with shift_steps x shift_lr).
    Returns (pi_old, pi_theta), frozen, in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    old = sft(MaskedDiffusionLM(toy_model_config(), generator=generator), pretrain_steps, pretrain_lr, generator)
    new = sft(copy.deepcopy(old).train(), shift_steps, shift_lr, generator, p_first=1.0)
    for p in (*old.parameters(), *new.parameters()):
        p.requires_grad_(False)
    return old, new


# -----------------------------------------------------------------------------
# The random-order sampler and its exact likelihood


@torch.no_grad()
def sample_random_order(model, prompt_ids, length, generator, columns=None):
    """Canvas = prompt + `length` masks; each step reveals ONE still-masked position, chosen uniformly,
    with a draw from pi(. | x_t) there (temperature 1). prompt_ids (B, P), no padding.
    columns: vocabulary slice the tokens are drawn from (token id = columns.start + index).
    Returns (B, P + length)."""
    B, P = prompt_ids.shape
    x = torch.cat([prompt_ids, prompt_ids.new_full((B, length), model.config.mask_token_id)], 1)  # (B, P+L)
    masked = torch.ones((B, length), dtype=torch.bool, device=x.device)
    rows, positions = torch.arange(B, device=x.device), slice(P, P + length)
    offset = columns.start if columns is not None else 0
    for _ in range(length):
        # i ~ uniform over the still-masked positions: argmax of iid uniforms restricted to them
        u = torch.rand((B, length), generator=generator, device=x.device)
        i = torch.where(masked, u, -1.0).argmax(1)  # (B,)
        logits = model(x, positions=positions, columns=columns)  # (B, L, V')
        x[rows, P + i] = gumbel_argmax(logits[rows, i], 1.0, generator) + offset  # a draw from softmax(logits)
        masked[rows, i] = False
    return x


def subset_masks(length, device=None):
    """All 2^L revealed sets as masks (2^L, L) bool: row s has position i revealed iff bit i of s is set
    (True = masked). Row 0 masks everything, row 2^L - 1 nothing; S u {i} always has a larger index than S."""
    s = torch.arange(2 ** length, device=device)[:, None]
    return (s >> torch.arange(length, device=device)) & 1 == 0


@torch.no_grad()
def subset_logps(model, batch):
    """log pi(o_i | x_S) for every row, every revealed set S and every position i: (N, 2^L, L) float64
    (meaningful where i is not in S). One batched forward of N * 2^L rows through maskgrpo.masked_logps."""
    N, L = batch.completion.shape
    if L > MAX_EXACT_LENGTH:
        raise ValueError(f"completion length {L} > {MAX_EXACT_LENGTH}: 2^L states per completion is too many")
    if not batch.scored.all():
        raise ValueError("exact likelihoods need fixed-length completions (every completion token scored)")
    states = subset_masks(L, batch.sequences.device)  # (2^L, L)
    rows = batch.rows(torch.arange(N, device=states.device).repeat_interleave(len(states)))
    mask = torch.zeros_like(rows.sequences, dtype=torch.bool)  # (N * 2^L, T), the prompt stays visible
    mask[:, batch.positions] = states.repeat(N, 1)
    return masked_logps(model, rows, mask).double().view(N, len(states), L)


def exact_from_table(lp):
    """The exact quantities from the table lp (N, 2^L, L) of subset_logps. Returns dict of (N,) float64:
    any_order (log P(o) under the random-order sampler), left_to_right (log P_LR(o)) and elbo."""
    N, num_states, L = lp.shape
    # P({}) = 1;  P(S u {i}) += P(S) * 1/(L - |S|) * pi(o_i | x_S), in log space, S in increasing index order
    log_p = lp.new_full((N, num_states), -math.inf)
    log_p[:, 0] = 0.0
    for s in range(num_states - 1):
        k = s.bit_count()  # |S|
        for i in range(L):
            if not s >> i & 1:
                log_p[:, s | 1 << i] = torch.logaddexp(log_p[:, s | 1 << i], log_p[:, s] + lp[:, s, i] - math.log(L - k))
    # left to right: S_k = {0, .., k-1} has index 2^k - 1
    left_to_right = sum(lp[:, 2 ** k - 1, k] for k in range(L))
    # ELBO = sum_S 1/C(L,|S|) * 1/(L-|S|) * sum_{i not in S} log pi(o_i | x_S)
    masked = subset_masks(L, lp.device)  # (2^L, L)
    revealed = L - masked.sum(1)  # |S|
    weight = torch.tensor([1 / (math.comb(L, k) * (L - k)) if k < L else 0.0 for k in revealed.tolist()],
                          dtype=lp.dtype, device=lp.device)
    elbo = ((lp * masked).sum(-1) * weight).sum(-1)
    return dict(any_order=log_p[:, -1], left_to_right=left_to_right, elbo=elbo)


def exact_logprobs(model, batch):
    """log P(o | p) of every completion of `batch` (maskgrpo.Completions) under the random-order
    sampler, plus left_to_right and elbo: dict of (N,) float64."""
    return exact_from_table(subset_logps(model, batch))


def single_completion(prompt_ids, completion_ids, columns=None):
    """A Completions of one row: prompt_ids (P,), completion_ids (L,), no padding."""
    seq = torch.cat([prompt_ids, completion_ids])[None]  # (1, P + L)
    P = prompt_ids.shape[0]
    return Completions(seq, torch.ones_like(seq, dtype=torch.bool), slice(P, seq.shape[1]),
                       torch.ones_like(completion_ids, dtype=torch.bool)[None], columns)


def exact_logprob(model, prompt_ids, completion_ids, columns=None):
    """log P(completion | prompt) under the random-order sampler, one sequence: a float (float64 DP)."""
    return float(exact_logprobs(model, single_completion(prompt_ids, completion_ids, columns))["any_order"][0])


def all_completions(num_tokens, length):
    """Every sequence of `length` tokens from 0..num_tokens-1, in lexicographic order: (num_tokens^length, length)."""
    return torch.tensor(list(itertools.product(range(num_tokens), repeat=length)), dtype=torch.long)


def completion_distribution(model, prompt_ids, length, columns):
    """The exact distribution of the random-order sampler over all completions of one prompt (P,):
    (tokens (C, L) token ids in lexicographic order, probabilities (C,) float64), C = |columns|^L."""
    tokens = all_completions(columns.stop - columns.start, length) + columns.start
    seq = torch.cat([prompt_ids.expand(len(tokens), -1), tokens], 1)  # (C, P + L)
    ones = torch.ones_like(seq, dtype=torch.bool)
    batch = Completions(seq, ones, slice(len(prompt_ids), seq.shape[1]), ones[:, len(prompt_ids):], columns)
    return tokens, exact_logprobs(model, batch)["any_order"].exp()


def total_variation(completions, tokens, probs):
    """0.5 * sum_o |empirical(o) - P(o)| for sampled completions (n, L) against completion_distribution's
    (tokens, probs). Expects tokens in lexicographic order over a contiguous id range."""
    K, L = int(tokens.max() - tokens.min() + 1), tokens.shape[1]
    code = ((completions - tokens.min()) * K ** torch.arange(L - 1, -1, -1)).sum(1)  # row index in tokens
    freq = torch.bincount(code, minlength=len(tokens)).double() / len(completions)
    return float(0.5 * (freq - probs).abs().sum())


def toy_completions(model, num_prompts, group_size, generator):
    """num_prompts toy prompts x group_size completions each, sampled from `model` with the
    random-order sampler, as maskgrpo.Completions over the content columns."""
    prompts = toy_sequences(num_prompts, generator)[:, :PROMPT_LEN].repeat_interleave(group_size, 0)
    seq = sample_random_order(model, prompts, COMPLETION_LEN, generator, COLUMNS)
    batch = text_completions(seq, torch.ones_like(prompts, dtype=torch.bool), EOS_ID)
    return replace(batch, columns=COLUMNS)


# -----------------------------------------------------------------------------
# Exact completion distributions of the samplers actually used (maskgrpo.generate_text / generate_image)
#
# A sampler is a Markov chain on canvases: at loop step s the next canvas depends only on the current one
# (and, with a KV cache, on the canvas at the block's start, which the current canvas determines: earlier
# blocks filled, this block and later ones masked). So P(final canvas) is a forward DP over the set of
# reachable canvases, one loop step at a time:
#     P_{s+1}(x') = sum_x P_s(x) * T_s(x -> x'),
# with T_s computed from one batched forward of every reachable x. T_s is written out by enumerating the
# step's own randomness, the candidate token of every masked position of the block (K'^m joint draws,
# m <= block length), and applying maskgrpo's commit rules (top_k_commit, threshold_counts) to each joint
# draw: the rules are imported, never restated, so ties are broken exactly as the sampler breaks them
# (the lower position first, top_k_commit's stable sort). Ties need equal float64 confidences at two
# positions: RoPE makes the positions' logits differ, so on a real model they do not occur, but the DP
# would count them correctly if they did. With `targets` only the canvases consistent with each target
# completion are kept (2^L at most), which gives log P(o) cheaply. Probabilities are torch tensors
# built from softmaxes of the logits, so log P(o) is differentiable in the logits (and the weights);
# the commit decisions are piecewise constant and carry no gradient.


def _merge(rows, x, prob):
    """Sum the probabilities of identical (row, canvas) states. rows (n,), x (n, T), prob (n,)."""
    keys, inverse = torch.unique(torch.cat([rows[:, None], x], 1), dim=0, return_inverse=True)
    return keys[:, 0], keys[:, 1:], prob.new_zeros(len(keys)).index_add(0, inverse, prob)


def _joint_draws(num_values, width, device=None):
    """Every joint draw of `width` independent categoricals with `num_values` outcomes: (num_values^width, width)."""
    if width == 0:
        return torch.zeros((1, 0), dtype=torch.long, device=device)
    return torch.tensor(list(itertools.product(range(num_values), repeat=width)), dtype=torch.long, device=device)


def _block_logits(model, x, block, first_step, cache, mask_id):
    """The logits generate_text computes for `block` of the canvases x (n, T): a plain forward, or with a
    cache (after the block's first step) a forward of the span against keys/values cached at the block's
    start (the canvas with this block and every later one masked). Returns (n, Lb, V) float64."""
    if cache == "none" or first_step:
        return model(x, positions=block).double()
    start = x.clone()
    start[:, block.start:] = mask_id
    _, kv = model(start, positions=block, return_kv=True)
    span = slice(block.start, x.shape[1]) if cache == "prefix" else block
    return model(x, positions=block, kv=kv, span=span).double()


def _text_step(model, rows, x, prob, block, first_step, scheduled, *, temperature, mask_id, cache, threshold, targets,
               rank_model):
    """One loop step of generate_text on every state (rows, x, prob) whose block still has a [MASK]."""
    masked = x[:, block] == mask_id  # (n, Lb)
    done = ~masked.any(1)
    out = [(rows[done], x[done], prob[done])]  # a filled block: nothing to do (threshold mode skips the step)
    live = (~done).nonzero().squeeze(1)
    if len(live):
        logits = _block_logits(model, x[live], block, first_step, cache, mask_id)  # (n, Lb, V)
        V = logits.shape[-1]
        vocab = torch.tensor([v for v in range(V) if v != mask_id], device=x.device)  # K' candidate ids
        # text_candidates: x0 ~ softmax(l / tau) with [MASK] excluded; confidence = softmax(l)[x0], full vocabulary
        q = (logits / temperature).index_select(-1, vocab).softmax(-1)  # (n, Lb, K')
        if rank_model is not None:  # commit decisions taken by another model (see text_dp)
            logits = _block_logits(rank_model, x[live], block, first_step, cache, mask_id)
        conf = logits.softmax(-1).index_select(-1, vocab).detach()  # (n, Lb, K')
        for pattern in masked[live].unique(dim=0):
            group = live[(masked[live] == pattern).all(1)]
            g = (masked[live] == pattern).all(1).nonzero().squeeze(1)  # indices into `live`
            where = pattern.nonzero().squeeze(1)  # the m masked positions of the block
            draws = _joint_draws(len(vocab), len(where), x.device)  # (C, m) candidate indices
            C, n = len(draws), len(group)
            # P(joint draw) = prod over masked positions of q_i(v_i): (n, C)
            q_draw = torch.stack([q[g][:, i].index_select(1, draws[:, t]) for t, i in enumerate(where.tolist())]).prod(0)
            conf_block = torch.zeros((n, C, len(pattern)), dtype=torch.float64, device=x.device)
            cand = x[group][:, block][:, None].expand(n, C, -1).clone()  # (n, C, Lb)
            for t, i in enumerate(where.tolist()):
                conf_block[:, :, i] = conf[g][:, i].index_select(1, draws[:, t])
                cand[:, :, i] = vocab[draws[:, t]]
            conf_flat, masked_flat = conf_block.view(n * C, -1), pattern.expand(n * C, -1)
            k = torch.full((n * C,), int(scheduled), dtype=torch.long, device=x.device)
            if threshold is not None:
                k = threshold_counts(conf_flat, masked_flat, threshold, k)
            commit = top_k_commit(conf_flat, masked_flat, k).view(n, C, -1)  # the sampler's own rule
            child = x[group][:, None].expand(n, C, -1).clone()  # (n, C, T)
            child[:, :, block] = torch.where(commit, cand, child[:, :, block])
            child_rows = rows[group][:, None].expand(n, C)
            child_prob = prob[group][:, None] * q_draw  # (n, C)
            out.append((child_rows.reshape(-1), child.view(n * C, -1), child_prob.reshape(-1)))
    rows, x, prob = (torch.cat(t) for t in zip(*out, strict=True))
    if targets is not None:
        span = x[:, -targets.shape[1]:]
        keep = ((span == targets[rows]) | (span == mask_id)).all(1)
        rows, x, prob = rows[keep], x[keep], prob[keep]
    return _merge(rows, x, prob)


def text_dp(model, prompts, *, gen_length, block_length, steps, temperature, mask_id, cache="none", threshold=None,
            targets=None, rank_model=None):
    """The exact distribution of maskgrpo.generate_text(model, prompts, ...) (same arguments; no padding),
    by a DP over canvases. prompts (N, P). targets: None (every completion of every prompt) or (N, L)
    (only the canvases consistent with row i's target). Returns (rows (n,), completions (n, L), probs (n,)),
    probs float64 and differentiable in the model's weights; with targets, at most one state per row.
    rank_model: if given, the confidences that decide which candidates commit come from it, the candidate
    draws from `model` (a diagnostic: the part of a log-ratio that moves with the commit decisions)."""
    if not temperature > 0:
        raise ValueError(f"text_dp needs temperature > 0 (a greedy sampler is deterministic), got {temperature}")
    if cache not in CACHES:
        raise ValueError(f"cache must be one of {CACHES}, got {cache!r}")
    if gen_length % block_length or steps % (gen_length // block_length):
        raise ValueError(f"block_length={block_length} must divide gen_length={gen_length} and steps={steps} must be "
                         f"a multiple of the number of blocks")
    N, P = prompts.shape
    x = torch.cat([prompts, prompts.new_full((N, gen_length), mask_id)], 1)  # (N, T)
    rows = torch.arange(N, device=x.device)
    prob = torch.ones(N, dtype=torch.float64, device=x.device)
    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    counts = transfer_counts(torch.tensor([block_length]), steps_per_block)[0]  # every block starts fully masked
    for b in range(num_blocks):
        block = slice(P + b * block_length, P + (b + 1) * block_length)
        for s in range(steps_per_block):
            rows, x, prob = _text_step(model, rows, x, prob, block, s == 0, counts[s], temperature=temperature,
                                       mask_id=mask_id, cache=cache, threshold=threshold, targets=targets,
                                       rank_model=rank_model)
    return rows, x[:, P:], prob


def _plackett_luce_top(log_w, size):
    """P(the `size` largest of log_w_i + Gumbel_i are exactly the set S) for every S, by the
    Plackett-Luce form of Gumbel-max (Yellott 1977): sum over orderings s_1..s_n of S of
    prod_t w_{s_t} / sum_{j not in s_1..s_{t-1}} w_j. log_w (n, m) -> (sets (S_count, m) bool, probs (n, S_count))."""
    n, m = log_w.shape
    sets = {}
    for order in itertools.permutations(range(m), size):
        logp = log_w.new_zeros(n)
        left = torch.ones(m, dtype=torch.bool)
        for i in order:
            logp = logp + log_w[:, i] - log_w[:, left].logsumexp(1)
            left[i] = False
        key = tuple(sorted(order))
        sets[key] = sets[key] + logp.exp() if key in sets else logp.exp()
    keys = list(sets)
    members = torch.zeros((len(keys), m), dtype=torch.bool)
    for r, key in enumerate(keys):
        members[r, list(key)] = True
    return members, torch.stack([sets[k] for k in keys], 1)


def _image_step(model, rows, x, prob, s, *, positions, columns, steps, mask_id, mode, temperature, choice_temperature,
                targets):
    """One step of generate_image (guidance 0) on every state (rows, x, prob)."""
    N = x[:, positions].shape[1]  # image tokens
    masked = x[:, positions] == mask_id  # (n, N)
    out = []
    logits = model(x, positions=positions, columns=columns) / max(temperature, 1e-6)  # as generate_image
    logq = logits.double().log_softmax(-1)  # (n, N, K): x0 ~ softmax(logits / tau) (gumbel_argmax at 1.0)
    K = logq.shape[-1]
    for pattern in masked.unique(dim=0):
        g = (masked == pattern).all(1).nonzero().squeeze(1)
        where = pattern.nonzero().squeeze(1).tolist()
        n, m = len(g), len(where)
        if m == 0:
            out.append((rows[g], x[g], prob[g]))
            continue
        lq = logq[g][:, where]  # (n, m, K)
        if mode == "emerge":
            # each masked token independently: stays masked w.p. 1 - p_s, else reveals v w.p. p_s q(v)
            p = emerge_reveal_prob(s, steps)
            draws = _joint_draws(K + 1, m, x.device) - 1  # (C, m), -1 = stays masked
            reveal = draws >= 0
            terms = []
            for t in range(m):
                v = draws[:, t]
                lp_v = lq[:, t].index_select(1, v.clamp(min=0))  # (n, C)
                terms.append(torch.where(v >= 0, math.log(p) + lp_v if p > 0 else -math.inf,
                                         math.log1p(-p) if p < 1 else -math.inf))
            logp_draw = torch.stack(terms).sum(0)  # (n, C)
            written = reveal
        else:
            # MaskGIT: every masked token draws v ~ q; the m - keep most confident (log q(v) + tau_s Gumbel) are written
            keep = int(maskgit_keep_masked(N, torch.tensor([m]), s, steps)[0])
            tau = maskgit_choice_temperature(choice_temperature, s, steps)
            tokens = _joint_draws(K, m, x.device)  # (C, m)
            lp_tok = torch.stack([lq[:, t].index_select(1, tokens[:, t]) for t in range(m)], 2)  # (n, C, m)
            if keep == 0:
                sets, p_set = torch.ones((1, m), dtype=torch.bool), lp_tok.new_ones((n, len(tokens), 1))
            else:
                sets, p_set = _plackett_luce_top((lp_tok / tau).view(n * len(tokens), m), m - keep)
                p_set = p_set.view(n, len(tokens), -1)  # (n, C, S)
            # one child per (token draw, written set): log P = sum log q + log P(set | confidences)
            logp_draw = (lp_tok.sum(2)[:, :, None] + p_set.clamp_min(1e-300).log()).flatten(1)  # (n, C * S)
            written = sets[None].expand(len(tokens), -1, -1).reshape(-1, m)  # (C * S, m)
            draws = tokens.repeat_interleave(len(sets), 0)  # (C * S, m)
        C = len(draws)
        child = x[g][:, None].expand(n, C, -1).clone()  # (n, C, T)
        span = child[:, :, positions]
        cols = torch.tensor(where, device=x.device)
        new_tokens = torch.where(written, draws.clamp(min=0) + columns.start, mask_id)  # (C, m)
        span[:, :, cols] = new_tokens[None].expand(n, -1, -1)
        child[:, :, positions] = span
        out.append((rows[g][:, None].expand(n, C).reshape(-1), child.view(n * C, -1),
                    (prob[g][:, None] * logp_draw.exp()).reshape(-1)))
    rows, x, prob = (torch.cat(t) for t in zip(*out, strict=True))
    keep = prob.detach() > 0
    if targets is not None:
        span = x[:, positions]
        keep &= ((span == targets[rows]) | (span == mask_id)).all(1)
    return _merge(rows[keep], x[keep], prob[keep])


def image_dp(model, input_ids, *, positions, columns, steps, mask_id, mode="emerge", temperature=1.0,
             choice_temperature=1.0, targets=None):
    """The exact distribution of maskgrpo.generate_image(model, input_ids, ...) without guidance (same
    arguments): every position of `positions` in input_ids (N, T) is [MASK]. targets: None or (N, n_pos)
    token ids. Returns (rows (n,), image tokens (n, n_pos), probs (n,)), probs float64 and differentiable.
    MaskGIT's confidence noise is continuous, so its ranking is the Plackett-Luce law of Gumbel-perturbed
    log q (no ties); it needs choice_temperature > 0."""
    if mode not in ("emerge", "maskgit"):
        raise ValueError(f"mode must be 'emerge' or 'maskgit', got {mode!r}")
    if mode == "maskgit" and not choice_temperature > 0:
        raise ValueError(f"image_dp needs choice_temperature > 0 for maskgit, got {choice_temperature}")
    x = input_ids.clone()
    rows = torch.arange(len(x), device=x.device)
    prob = torch.ones(len(x), dtype=torch.float64, device=x.device)
    for s in range(steps):
        rows, x, prob = _image_step(model, rows, x, prob, s, positions=positions, columns=columns, steps=steps,
                                    mask_id=mask_id, mode=mode, temperature=temperature,
                                    choice_temperature=choice_temperature, targets=targets)
    return rows, x[:, positions], prob


def law_distance(support_p, p, support_q, q):
    """KL(P || Q) and total variation between two laws over completions, each given as (support (C, L),
    probs (C,)) (e.g. text_dp of one prompt). Returns dict(kl, tv) in nats. KL is inf where Q misses P's support."""
    union, inverse = torch.unique(torch.cat([support_p, support_q]), dim=0, return_inverse=True)
    dense_p = p.detach().new_zeros(len(union)).index_add(0, inverse[:len(p)], p.detach())
    dense_q = q.detach().new_zeros(len(union)).index_add(0, inverse[len(p):], q.detach())
    on = dense_p > 0
    kl = float((dense_p[on] * (dense_p[on].log() - dense_q[on].log())).sum())
    return dict(kl=kl, tv=float(0.5 * (dense_p - dense_q).abs().sum()))


# -----------------------------------------------------------------------------
# Estimators of Delta = log pi_theta(o) - log pi_old(o)


@dataclass(frozen=True)
class Estimator:
    name: str
    kind: str  # "maskgrpo" (draw_mask on the ratio schedule), "d1" (draw_mask, t = 1) or "elbo" (t ~ U(eps, 1])
    remasking: str = "arlike"  # Rev for kind "maskgrpo": "arlike" or "random"
    inverse_ratio_weight: bool = False  # multiply by 1/t


ESTIMATORS = (
    Estimator("MaskGRPO AR-like Rev (official code)", "maskgrpo", "arlike"),
    Estimator("MaskGRPO AR-like Rev x 1/t (paper)", "maskgrpo", "arlike", True),
    Estimator("MaskGRPO random Rev", "maskgrpo", "random"),
    Estimator("MaskGRPO random Rev x 1/t", "maskgrpo", "random", True),
    Estimator("d1 one-step (t = 1, prompt masked w.p. 0.15)", "d1"),
    Estimator("ELBO check: random, t ~ U(0,1], x 1/t", "elbo", "random", True),
)


@torch.no_grad()
def log_ratio_estimate(new, old, batch, mask, weight=1.0):
    """Delta_hat = weight * sum over completion tokens masked by M of [log pi_new(o_k | o masked by M)
    - log pi_old(o_k | o masked by M)], both policies on the same mask (N, T). weight: float or (N,).
    Returns (N,) float64."""
    m = mask[:, batch.positions] & batch.scored  # (N, L)
    diff = masked_logps(new, batch, mask).double() - masked_logps(old, batch, mask).double()  # (N, L)
    return (diff * m).sum(1) * weight


@torch.no_grad()
def mask_draws(new, old, batch, kind, remasking, *, draws, num_iterations, min_mask_rate, p_mask_prompt, generator,
               eps=1e-3):
    """Unweighted Delta_hat (w = 1) for `draws` independent masks per completion and inner iteration, and
    the mask level t of each draw: two (N, J, D) float64 tensors. J = num_iterations ratios r_j for
    kind "maskgrpo"; J = 1 for "d1" (t = 1) and "elbo" (t ~ U(eps, 1] per draw)."""
    N = batch.sequences.shape[0]
    rows = batch.rows(torch.arange(N, device=batch.sequences.device).repeat_interleave(draws))  # row i*D + d
    cfg = GRPOConfig(num_iterations=num_iterations, min_mask_rate=min_mask_rate, p_mask_prompt=p_mask_prompt,
                     remasking=remasking, estimator="d1" if kind == "d1" else "maskgrpo")
    raw, levels = [], []
    for j in range(num_iterations if kind == "maskgrpo" else 1):
        if kind == "elbo":
            # t ~ U(eps, 1] per draw, each completion token masked w.p. t (maskgrpo.elbo_loss's masking)
            t = eps + (1 - eps) * (1 - torch.rand(N * draws, generator=generator, dtype=torch.float64))
            mask = torch.zeros_like(rows.sequences, dtype=torch.bool)
            mask[:, batch.positions] = forward_mask(rows.completion, t, rows.scored, generator)
        else:
            t = torch.full((N * draws,), mask_ratio(j, num_iterations, min_mask_rate) if kind == "maskgrpo" else 1.0,
                           dtype=torch.float64)
            mask = draw_mask(rows, cfg, j, generator)  # (N * D, T)
        raw.append(log_ratio_estimate(new, old, rows, mask).view(N, draws))
        levels.append(t.view(N, draws))
    return torch.stack(raw, 1), torch.stack(levels, 1)


def estimator_samples(new, old, batch, estimator, *, draws, num_iterations=4, min_mask_rate=0.6, p_mask_prompt=0.15,
                      generator):
    """Delta_hat of `estimator` for `draws` masks per completion (and per ratio r_j): (N, J, D) float64."""
    raw, t = mask_draws(new, old, batch, estimator.kind, estimator.remasking, draws=draws, num_iterations=num_iterations,
                        min_mask_rate=min_mask_rate, p_mask_prompt=p_mask_prompt, generator=generator)
    return raw / t if estimator.inverse_ratio_weight else raw


def _corr(a, b):
    a, b = a - a.mean(), b - b.mean()
    denom = (a.pow(2).sum() * b.pow(2).sum()).sqrt()
    return float((a * b).sum() / denom) if denom > 0 else math.nan


def summarise(exact_delta, samples):
    """Statistics of the estimates samples (N, D) against the exact Delta (N,) (see the module docstring)."""
    err = samples - exact_delta[:, None]
    avg = samples.mean(1)
    dev = exact_delta - exact_delta.mean()
    slope = float((avg - avg.mean()) @ dev / (dev @ dev)) if float(dev @ dev) > 0 else math.nan
    return dict(mean=float(samples.mean()), bias=float(err.mean()), slope=slope,
                std_completions=float(avg.std()) if len(avg) > 1 else 0.0,
                std_masks=float(samples.var(1, correction=0).mean().sqrt()), rmse=float(err.pow(2).mean().sqrt()),
                corr_1mask=_corr(samples.flatten(), exact_delta[:, None].expand_as(samples).flatten()),
                corr_avg=_corr(avg, exact_delta),
                sign_agree=float((torch.sign(samples) == torch.sign(exact_delta)[:, None]).double().mean()))


COLUMN_TITLES = dict(name="estimator", t="t", mean="mean", bias="bias", slope="slope", std_completions="std over completions",
                     std_masks="std over masks", rmse="RMSE", corr_1mask="corr (1 mask)", corr_avg="corr (mask avg)",
                     sign_agree="sign agree")


def to_markdown(rows, columns=COLUMN_TITLES):
    head = "| " + " | ".join(columns.values()) + " |"
    lines = [head, "|" + "---|" * len(columns)]
    for row in rows:
        cells = [row["name"], row["t"]] + ["-" if math.isnan(row.get(k, math.nan)) else
                                           f"{row[k]:+.3f}" if k in ("mean", "bias") else f"{row[k]:.3f}"
                                           for k in list(columns)[2:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_ratio_markdown(rows):
    """The per-ratio statistics of the MaskGRPO rows: one line per (estimator, r_j)."""
    keys = ("bias", "slope", "std_masks", "corr_1mask", "sign_agree")
    lines = ["| estimator | r_j | " + " | ".join(COLUMN_TITLES[k] for k in keys) + " |", "|" + "---|" * (len(keys) + 2)]
    for row in rows:
        for p in row.get("per_ratio", []):
            cells = [f"{p[k]:+.3f}" if k == "bias" else f"{p[k]:.3f}" for k in keys]
            lines.append(f"| {row['name']} | {p['ratio']:.3g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def estimator_table(new, old, batch, *, generator, draws=32, num_iterations=4, min_mask_rate=0.6,
                    p_mask_prompt=0.15, estimators=ESTIMATORS):
    """Compare every estimator with the exact Delta_i = log pi_new(o_i) - log pi_old(o_i) on the
    completions of `batch`. Returns (rows, markdown). Each row: name, t (mask levels, text), the
    statistics of `summarise`, exact (N,) and samples (N, J*D) numpy arrays for plotting, and for
    "maskgrpo" estimators per_ratio: [dict(ratio, **summarise)] for each r_j."""
    exact_new, exact_old = exact_logprobs(new, batch), exact_logprobs(old, batch)
    delta = exact_new["any_order"] - exact_old["any_order"]  # (N,)
    rows = []
    for name, key in (("exact log P, any order (the truth)", "any_order"),
                      ("exact ELBO = E_order log P_order", "elbo"),
                      ("exact left-to-right log P", "left_to_right")):
        d = (exact_new[key] - exact_old[key])[:, None]  # (N, 1): no mask to draw
        rows.append(dict(name=name, t="-", exact=delta.numpy(), samples=d.numpy()) | summarise(delta, d))
    draws_of = {}  # the weighted and unweighted variants share their masks (a paired comparison)
    for est in estimators:
        key = (est.kind, est.remasking)
        if key not in draws_of:
            draws_of[key] = mask_draws(new, old, batch, est.kind, est.remasking, draws=draws,
                                       num_iterations=num_iterations, min_mask_rate=min_mask_rate,
                                       p_mask_prompt=p_mask_prompt, generator=generator)
        raw, t = draws_of[key]
        s = raw / t if est.inverse_ratio_weight else raw  # (N, J, D)
        ratios = t[0, :, 0].tolist()
        levels = {"maskgrpo": f"{ratios[0]:.2f}-{ratios[-1]:.3g}", "d1": "1", "elbo": "U(0,1]"}[est.kind]
        row = dict(name=est.name, t=levels, exact=delta.numpy(), samples=s.flatten(1).numpy()) | summarise(delta, s.flatten(1))
        if est.kind == "maskgrpo":
            row["per_ratio"] = [dict(ratio=r) | summarise(delta, s[:, j]) for j, r in enumerate(ratios)]
        rows.append(row)
    return rows, to_markdown(rows)


def plot_estimators(rows):
    """One scatter panel per estimator (single draws light, mask averages dark, the line y = x) and,
    for the MaskGRPO rows, slope, std over masks and corr (1 mask) against the ratio r_j: a matplotlib Figure."""
    from matplotlib.figure import Figure

    est_rows = [r for r in rows if r["t"] != "-"]
    ratio_rows = [r for r in rows if "per_ratio" in r]
    per_ratio_panels = (("slope", "slope of the mask average on the exact log-ratio"),
                        ("std_masks", "std over masks"), ("corr_1mask", "corr (1 mask) with the exact log-ratio"))
    ncols = 3
    nrows = math.ceil((len(est_rows) + len(per_ratio_panels)) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.6 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    axes = axes.flatten()
    gen = np.random.default_rng(0)
    for ax, row in zip(axes, est_rows, strict=False):
        x, s = row["exact"], row["samples"]
        keep = gen.permutation(s.shape[1])[:16]  # at most 16 single draws per completion
        ax.scatter(np.repeat(x, len(keep)), s[:, keep].flatten(), s=4, alpha=0.15, color="tab:blue", label="1 mask")
        ax.scatter(x, s.mean(1), s=14, color="tab:red", label="mask average")
        lo, hi = x.min(), x.max()
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
        ax.set_title(f"{row['name']}\nslope {row['slope']:.2f}, corr {row['corr_1mask']:.2f} (1 mask), "
                     f"{row['corr_avg']:.2f} (avg)", fontsize=8)
        ax.set_xlabel("exact log-ratio", fontsize=8)
        ax.set_ylabel("estimate", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=7)
    for ax, (key, title) in zip(axes[len(est_rows):], per_ratio_panels, strict=False):
        for row in ratio_rows:
            ax.plot([p["ratio"] for p in row["per_ratio"]], [p[key] for p in row["per_ratio"]], marker="o", label=row["name"])
        ax.set_title(f"per ratio r_j: {title}", fontsize=8)
        ax.set_xlabel("mask ratio r_j", fontsize=8)
        ax.tick_params(labelsize=7)
    if ratio_rows:
        axes[len(est_rows)].legend(fontsize=6)
    for ax in axes[len(est_rows) + len(per_ratio_panels):]:
        ax.axis("off")
    fig.tight_layout()
    return fig


# -----------------------------------------------------------------------------
# A task where order matters: running sums under the semi-AR sampler


SUM_DIGITS = 3  # V: digits 0..V-1
SUM_EOS, SUM_MASK, SUM_VOCAB = 3, 4, 5
SUM_LENGTH = 6  # prompt digits = completion tokens = L
SUM_NOISE = 0.1  # probability that a completion token of the SFT data is replaced by a random digit


def running_sum_config():
    return ModelConfig.tiny(SUM_VOCAB, SUM_MASK, SUM_EOS, d_model=32, n_layers=2, n_heads=2, mlp_hidden_size=64,
                            max_sequence_length=2 * SUM_LENGTH, rope_theta=100.0)


def running_sums(n, generator, noise=SUM_NOISE):
    """n rows of prompt d_1..d_L (digits) + completion o_k = (d_1 + ... + d_k) mod V, each completion token
    replaced by a random digit w.p. `noise`: o_k depends on o_{k-1}, so the decoding order matters.
    Returns (n, 2L) long."""
    digits = torch.randint(0, SUM_DIGITS, (n, SUM_LENGTH), generator=generator)
    sums = digits.cumsum(1) % SUM_DIGITS
    noisy = torch.rand((n, SUM_LENGTH), generator=generator) < noise
    sums = torch.where(noisy, torch.randint(0, SUM_DIGITS, (n, SUM_LENGTH), generator=generator), sums)
    return torch.cat([digits, sums], 1)


def running_sum_reward(sequences):
    """Fraction of completion tokens equal to the running sum of the prompt digits: (N,) float."""
    digits, completion = sequences[:, :SUM_LENGTH], sequences[:, SUM_LENGTH:]
    return (completion == digits.cumsum(1) % SUM_DIGITS).float().mean(1)


@dataclass(frozen=True)
class Sampler:
    """generate_text's settings for the semi-AR study: 2 blocks of 3, one commit per step."""

    gen_length: int = SUM_LENGTH
    block_length: int = 3
    steps: int = SUM_LENGTH
    temperature: float = 1.0
    cache: str = "none"
    threshold: float | None = None

    def kwargs(self):
        return dict(gen_length=self.gen_length, block_length=self.block_length, steps=self.steps,
                    temperature=self.temperature, mask_id=SUM_MASK, cache=self.cache, threshold=self.threshold)


def make_semi_ar_policies(seed=0, pretrain_steps=200, pretrain_lr=3e-3, rl_steps=2, rl_lr=5e-4, num_iterations=4,
                          prompts_per_step=16, group=8, sampler=Sampler()):
    """pi_old: the tiny model after `pretrain_steps` of maskgrpo.elbo_loss on running_sums (cut short, so
    it is unsure and its sampler's order matters). pi_theta: a copy after `rl_steps` maskgrpo.grpo_step
    (AR-like Rev, beta = 0) with rollouts of the semi-AR sampler and running_sum_reward: two nearby policies.
    Returns (pi_old, pi_theta), frozen, in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    old = MaskedDiffusionLM(running_sum_config(), generator=generator)
    old = sft(old, pretrain_steps, pretrain_lr, generator, batch_size=128, make_batch=running_sums,
              prompt_length=SUM_LENGTH, columns=None)
    new = copy.deepcopy(old).train()
    cfg = GRPOConfig(num_generations=group, max_completion_length=sampler.gen_length, block_length=sampler.block_length,
                     diffusion_steps=sampler.steps, temperature=sampler.temperature, num_iterations=num_iterations,
                     beta=0.0, learning_rate=rl_lr, weight_decay=0.0, max_grad_norm=1.0, micro_batch_size=256)
    optimizer = make_optimizer(new, cfg)
    for _ in range(rl_steps):
        prompts = running_sums(prompts_per_step, generator)[:, :SUM_LENGTH]
        batch = rollout_text(new.eval(), prompts, torch.ones_like(prompts, dtype=torch.bool), cfg, generator)
        grpo_step(new.train(), optimizer, batch, running_sum_reward(batch.sequences), cfg, generator)
    for p in (*old.parameters(), *new.parameters()):
        p.requires_grad_(False)
    return old, new.eval()


@torch.no_grad()
def semi_ar_completions(model, num_prompts, group, generator, sampler=Sampler()):
    """num_prompts prompts x group completions from generate_text (the semi-AR sampler), with the decoding
    trajectory (Rev "trace"); the whole canvas is scored (this task has no EOS)."""
    prompts = running_sums(num_prompts, generator)[:, :SUM_LENGTH].repeat_interleave(group, 0)
    seq, trajectory = generate_text(model, prompts, generator=generator, return_trajectory=True, **sampler.kwargs())
    return text_completions(seq, torch.ones_like(prompts, dtype=torch.bool), SUM_EOS, score_whole_canvas=True,
                            trajectory=trajectory)


def semi_ar_logprob(model, batch, sampler=Sampler(), rank_model=None):
    """Exact log P(o | p) of every completion of `batch` under generate_text(sampler): (N,) float64,
    differentiable in the model's weights (text_dp restricted to each row's completion)."""
    P = batch.positions.start
    rows, _, probs = text_dp(model, batch.sequences[:, :P], targets=batch.completion, rank_model=rank_model,
                             **sampler.kwargs())
    if not torch.equal(rows, torch.arange(len(batch.sequences))):
        raise ValueError("a completion of the batch has probability 0 under this sampler")
    return probs.log()


# -----------------------------------------------------------------------------
# Estimators against the exact semi-AR log-ratio, and their gradients against the exact gradient


SEMI_AR_ESTIMATORS = (
    Estimator("MaskGRPO AR-like Rev", "maskgrpo", "arlike"),
    Estimator("MaskGRPO random Rev", "maskgrpo", "random"),
    Estimator("MaskGRPO official as-run ramp", "maskgrpo", "official"),
    Estimator("MaskGRPO trace-ordered Rev", "maskgrpo", "trace"),
    Estimator("d1 one-step (t = 1, prompt masked w.p. 0.15)", "d1"),
    Estimator("coupled complementary masks (M, not M)", "coupled"),
    Estimator("ESPO sequence ratio: (ELBO_new - ELBO_old) / L", "espo", "random", True),
    Estimator("unbiased ELBO: t ~ U(0,1], x 1/t", "elbo", "random", True),
)


def estimator_masks(batch, est, iteration, *, num_iterations, min_mask_rate, p_mask_prompt, generator, eps=1e-3):
    """One draw of `est`'s masks for every row of `batch`: ([(mask (N, T), weight (N,) float64), ...], t (N,)).
    Delta_hat = sum over the pairs of weight * sum over completion tokens masked by `mask` of the log-ratio.
    maskgrpo: draw_mask at ratio r_j (Rev est.remasking, the batch's trajectory for "trace"), w = 1 (x 1/r_j);
    d1: draw_mask with estimator "d1"; elbo: t ~ U(eps, 1], each token masked w.p. t, w = 1/t;
    espo: the same ELBO draw, w = 1/(t L) (ESPO's length-normalised sequence log-ratio);
    coupled: t ~ U(eps, 1], M ~ Bern(t) and its complement, w = 1 each: every token is scored once, under
    the mask that hides it (DiffuCoder's coupled sampling, arXiv 2506.20639; unweighted here)."""
    N, T = batch.sequences.shape
    if est.kind in ("maskgrpo", "d1"):
        cfg = GRPOConfig(num_iterations=num_iterations, min_mask_rate=min_mask_rate, p_mask_prompt=p_mask_prompt,
                         remasking=est.remasking, estimator=est.kind)
        t = mask_ratio(iteration, num_iterations, min_mask_rate) if est.kind == "maskgrpo" else 1.0
        t = torch.full((N,), t, dtype=torch.float64)
        weight = 1 / t if est.inverse_ratio_weight else torch.ones_like(t)
        return [(draw_mask(batch, cfg, iteration, generator), weight)], t
    t = eps + (1 - eps) * (1 - torch.rand(N, generator=generator, dtype=torch.float64))
    mask = torch.zeros((N, T), dtype=torch.bool)
    mask[:, batch.positions] = forward_mask(batch.completion, t, batch.scored, generator)
    if est.kind == "coupled":
        complement = torch.zeros_like(mask)
        complement[:, batch.positions] = ~mask[:, batch.positions] & batch.scored
        return [(mask, torch.ones_like(t)), (complement, torch.ones_like(t))], t
    length = batch.scored.sum(1).double()
    return [(mask, 1 / (t * length) if est.kind == "espo" else 1 / t)], t


def _surrogate(model, batch, pairs):
    """sum over (mask, weight) of weight * sum_{k masked} log pi(o_k | o masked by M): (N,) (with gradients)."""
    total = 0.0
    for mask, weight in pairs:
        m = mask[:, batch.positions] & batch.scored
        total = total + (masked_logps(model, batch, mask).double() * m).sum(1) * weight
    return total


def semi_ar_draws(new, old, batch, est, *, draws, num_iterations, min_mask_rate, p_mask_prompt=0.15, generator):
    """Delta_hat for `draws` independent draws per completion and ratio: (N, J, D) float64, J = mu for
    "maskgrpo" estimators, else 1."""
    N = len(batch.sequences)
    rows = batch.rows(torch.arange(N).repeat_interleave(draws))  # row i * D + d
    out = []
    for j in range(num_iterations if est.kind == "maskgrpo" else 1):
        pairs, _ = estimator_masks(rows, est, j, num_iterations=num_iterations, min_mask_rate=min_mask_rate,
                                   p_mask_prompt=p_mask_prompt, generator=generator)
        with torch.no_grad():
            out.append((_surrogate(new, rows, pairs) - _surrogate(old, rows, pairs)).view(N, draws))
    return torch.stack(out, 1)


def _flat_grad(value, params):
    return torch.cat([g.flatten() for g in torch.autograd.grad(value, params)])


def _cos(a, b):
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-30))


def gradient_cosines(new, batch, estimators, *, draws, num_iterations, min_mask_rate, p_mask_prompt=0.15, generator,
                     sampler=Sampler()):
    """Cosine between each estimator's gradient (in pi_theta's weights) and the exact gradient of
    log pi_theta(o) under `sampler` (autograd through text_dp), per completion of `batch`: for single draws
    (the ratio r_j of each draw cycles through the schedule) and for their average. Returns
    {name: dict(cos_1mask, cos_avg)} averaged over completions."""
    params = list(new.parameters())
    for p in params:
        p.requires_grad_(True)
    out = {est.name: dict(cos_1mask=[], cos_avg=[]) for est in estimators}
    try:
        for i in range(len(batch.sequences)):
            row = batch.rows(torch.tensor([i]))
            exact = _flat_grad(semi_ar_logprob(new, row, sampler).sum(), params)
            for est in estimators:
                grads = []
                for d in range(draws):
                    j = d % num_iterations if est.kind == "maskgrpo" else 0
                    pairs, _ = estimator_masks(row, est, j, num_iterations=num_iterations, min_mask_rate=min_mask_rate,
                                               p_mask_prompt=p_mask_prompt, generator=generator)
                    grads.append(_flat_grad(_surrogate(new, row, pairs).sum(), params))
                out[est.name]["cos_1mask"].append(sum(_cos(g, exact) for g in grads) / draws)
                out[est.name]["cos_avg"].append(_cos(torch.stack(grads).mean(0), exact))
    finally:
        for p in params:
            p.requires_grad_(False)
    return {name: {k: float(np.mean(v)) for k, v in d.items()} for name, d in out.items()}


SEMI_AR_COLUMNS = COLUMN_TITLES | dict(cos_1mask="grad cos (1 mask)", cos_avg="grad cos (mask avg)")


def semi_ar_table(new, old, batch, *, generator, draws=32, num_iterations=12, min_mask_rate=0.6, grad_completions=8,
                  grad_draws=4, estimators=SEMI_AR_ESTIMATORS, sampler=Sampler()):
    """Every estimator against the exact Delta_i = log pi_new(o_i) - log pi_old(o_i) under the semi-AR
    sampler, on the completions of `batch`. Exact reference rows: the random-order sampler's log P
    (exact_logprobs), its ELBO, and the left-to-right log P. Gradient cosines on the first
    `grad_completions` completions (0 skips them). Returns (rows, markdown), rows as estimator_table's."""
    with torch.no_grad():
        delta = semi_ar_logprob(new, batch, sampler) - semi_ar_logprob(old, batch, sampler)  # (N,)
        exact_new, exact_old = exact_logprobs(new, batch), exact_logprobs(old, batch)
        frozen = semi_ar_logprob(new, batch, sampler, rank_model=old) - semi_ar_logprob(old, batch, sampler)
    rows = [dict(name="exact log P, semi-AR sampler (the truth)", t="-", exact=delta.numpy(), samples=delta[:, None].numpy())
            | summarise(delta, delta[:, None]) | dict(cos_1mask=1.0, cos_avg=1.0)]
    rows.append(dict(name="exact, pi_old's commit decisions (smooth part)", t="-", exact=delta.numpy(),
                     samples=frozen[:, None].numpy()) | summarise(delta, frozen[:, None]))
    for name, key in (("exact log P, random-order sampler", "any_order"), ("exact ELBO = E_order log P_order", "elbo"),
                      ("exact left-to-right log P", "left_to_right")):
        d = (exact_new[key] - exact_old[key])[:, None]
        rows.append(dict(name=name, t="-", exact=delta.numpy(), samples=d.numpy()) | summarise(delta, d))
    cosines = {}
    if grad_completions:
        cosines = gradient_cosines(new, batch.rows(torch.arange(min(grad_completions, len(batch.sequences)))),
                                   estimators, draws=grad_draws, num_iterations=num_iterations,
                                   min_mask_rate=min_mask_rate, generator=generator, sampler=sampler)
    for est in estimators:
        s = semi_ar_draws(new, old, batch, est, draws=draws, num_iterations=num_iterations,
                          min_mask_rate=min_mask_rate, generator=generator)  # (N, J, D)
        ratios = [mask_ratio(j, num_iterations, min_mask_rate) for j in range(num_iterations)]
        levels = dict(maskgrpo=f"{ratios[0]:.2f}-{ratios[-1]:.3g}", d1="1").get(est.kind, "U(0,1]")
        row = dict(name=est.name, t=levels, exact=delta.numpy(), samples=s.flatten(1).numpy()) | summarise(delta, s.flatten(1))
        row |= cosines.get(est.name, dict(cos_1mask=math.nan, cos_avg=math.nan))
        if est.kind == "maskgrpo":
            row["per_ratio"] = [dict(ratio=r) | summarise(delta, s[:, j]) for j, r in enumerate(ratios)]
        rows.append(row)
    return rows, to_markdown(rows, SEMI_AR_COLUMNS)


GRID_KEYS = ("bias", "slope", "std_masks", "rmse", "corr_1mask", "sign_agree", "cos_1mask")


def gamma_mu_grid(new, old, batch, *, generator, gammas=(0.0, 0.6, 0.8), mus=(4, 12), draws_per_completion=96,
                  grad_completions=8, grad_draws=4, sampler=Sampler()):
    """The Rev estimators at every (gamma, mu): each completion gets about draws_per_completion masks
    spread over the mu ratios. Returns (rows, markdown), one row per (Rev, gamma, mu)."""
    revs = [e for e in SEMI_AR_ESTIMATORS if e.kind == "maskgrpo"]
    with torch.no_grad():
        delta = semi_ar_logprob(new, batch, sampler) - semi_ar_logprob(old, batch, sampler)
    rows = []
    for gamma in gammas:
        for mu in mus:
            cosines = {}
            if grad_completions:
                cosines = gradient_cosines(new, batch.rows(torch.arange(min(grad_completions, len(batch.sequences)))),
                                           revs, draws=grad_draws, num_iterations=mu, min_mask_rate=gamma,
                                           generator=generator, sampler=sampler)
            for est in revs:
                s = semi_ar_draws(new, old, batch, est, draws=math.ceil(draws_per_completion / mu), num_iterations=mu,
                                  min_mask_rate=gamma, generator=generator).flatten(1)
                rows.append(dict(name=est.name, gamma=gamma, mu=mu) | summarise(delta, s)
                            | cosines.get(est.name, dict(cos_1mask=math.nan, cos_avg=math.nan)))
    head = "| Rev | gamma | mu | " + " | ".join(SEMI_AR_COLUMNS[k] for k in GRID_KEYS) + " |"
    lines = [head, "|" + "---|" * (len(GRID_KEYS) + 3)]
    for r in rows:
        cells = [f"{r[k]:+.3f}" if k == "bias" else f"{r[k]:.3f}" for k in GRID_KEYS]
        lines.append(f"| {r['name'].replace('MaskGRPO ', '')} | {r['gamma']:g} | {r['mu']} | " + " | ".join(cells) + " |")
    return rows, "\n".join(lines)


FAST_SAMPLERS = (("prefix cache", "prefix", None), ("dual cache", "dual", None), ("threshold 0.9", "none", 0.9),
                 ("threshold 0.7", "none", 0.7), ("prefix cache + threshold 0.9", "prefix", 0.9),
                 ("dual cache + threshold 0.9", "dual", 0.9), ("dual cache + threshold 0.7", "dual", 0.7))


@torch.no_grad()
def sampler_distance_table(model, prompts, sampler=Sampler(), fast=FAST_SAMPLERS):
    """How far each Fast-dLLM rollout's law over completions is from the exact sampler's, by enumeration
    (text_dp of every prompt of `prompts` (n, P)): KL(exact || fast) and TV, mean and max over prompts.
    Returns (rows, markdown)."""
    def laws(s):
        rows, comps, probs = text_dp(model, prompts, **s.kwargs())
        return [(comps[rows == i], probs[rows == i]) for i in range(len(prompts))]

    exact = laws(sampler)
    rows = []
    for name, cache, threshold in fast:
        other = laws(replace(sampler, cache=cache, threshold=threshold))
        d = [law_distance(*e, *o) for e, o in zip(exact, other, strict=True)]
        rows.append(dict(name=name, kl_mean=float(np.mean([x["kl"] for x in d])), kl_max=max(x["kl"] for x in d),
                         tv_mean=float(np.mean([x["tv"] for x in d])), tv_max=max(x["tv"] for x in d)))
    lines = ["| rollout sampler | KL(exact \\|\\| it), mean | KL, max | TV, mean | TV, max |", "|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['kl_mean']:.4f} | {r['kl_max']:.4f} | {r['tv_mean']:.3f} | {r['tv_max']:.3f} |"
              for r in rows]
    return rows, "\n".join(lines)


def commit_decision_table(seed=0, learning_rates=(5e-4, 1e-4, 2e-5), *, num_prompts=16, group=8, pretrain_steps=200,
                          rl_steps=2, sampler=Sampler()):
    """How much of the exact semi-AR log-ratio comes from changed commit decisions, against the policy step:
    for each MaskGRPO learning rate, Delta (text_dp), its smooth part (text_dp with pi_old's commit decisions),
    the jump Delta - smooth, and the random-order sampler's Delta, on the same completions of pi_old.
    Returns (rows, markdown)."""
    rows = []
    for lr in learning_rates:
        old, new = make_semi_ar_policies(seed, pretrain_steps, rl_steps=rl_steps, rl_lr=lr, sampler=sampler)
        batch = semi_ar_completions(old, num_prompts, group, torch.Generator().manual_seed(1000 + seed), sampler)
        with torch.no_grad():
            delta = semi_ar_logprob(new, batch, sampler) - semi_ar_logprob(old, batch, sampler)
            smooth = semi_ar_logprob(new, batch, sampler, rank_model=old) - semi_ar_logprob(old, batch, sampler)
            any_order = exact_logprobs(new, batch)["any_order"] - exact_logprobs(old, batch)["any_order"]
        jump = delta - smooth
        rows.append(dict(lr=lr, delta=float(delta.std()), smooth=float(smooth.std()), jump=float(jump.std()),
                         any_order=float(any_order.std()), jump_frac=float((jump.abs() > 0.05).double().mean()),
                         jump_median=float(jump.abs().median()), smooth_median=float(smooth.abs().median())))
    lines = ["| MaskGRPO lr | std Delta (exact) | std smooth part | std jump part | share of completions with jump > 0.05 "
             "| median abs jump | median abs smooth | std Delta, random-order sampler |", "|" + "---|" * 8]
    lines += [f"| {r['lr']:g} | {r['delta']:.3f} | {r['smooth']:.3f} | {r['jump']:.3f} | {r['jump_frac']:.2f} | "
              f"{r['jump_median']:.4f} | {r['smooth_median']:.4f} | {r['any_order']:.3f} |" for r in rows]
    return rows, "\n".join(lines)


def paired_difference(deltas, samples_a, samples_b, stat, *, boots=2000, seed=0):
    """Mean over seeds of stat(delta, samples_a) - stat(delta, samples_b) and a 95% percentile-bootstrap
    interval, resampling completions within each seed (the two estimators share the completions).
    deltas: list of (N_s,) arrays; samples_*: lists of (N_s, D) arrays; stat(delta, samples) -> float."""
    gen = np.random.default_rng(seed)

    def diff(index):
        return float(np.mean([stat(d[i], a[i]) - stat(d[i], b[i])
                              for d, a, b, i in zip(deltas, samples_a, samples_b, index, strict=True)]))

    point = diff([np.arange(len(d)) for d in deltas])
    boot = [diff([gen.integers(0, len(d), len(d)) for d in deltas]) for _ in range(boots)]
    return point, float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))


def corr_1mask(delta, samples):
    """Pearson correlation of single-draw estimates with the exact log-ratio, over all (completion, draw) pairs."""
    return float(np.corrcoef(samples.flatten(), np.repeat(delta, samples.shape[1]))[0, 1])


def rmse(delta, samples):
    return float(np.sqrt(((samples - delta[:, None]) ** 2).mean()))


def plot_semi_ar(rows, grid_rows=()):
    """A matplotlib Figure of the semi-AR study: one scatter per estimator (single draws light, mask
    averages dark, y = x), the Rev estimators' corr (1 mask) against the ratio r_j, and (with grid_rows)
    corr (1 mask) and std over masks against gamma, one line per Rev and mu."""
    from matplotlib.figure import Figure

    scatter = [r for r in rows if r["t"] != "-" or r["name"].startswith("exact, pi_old")]
    revs = [r for r in rows if "per_ratio" in r]
    extra = 1 + 2 * bool(grid_rows)
    ncols = 4
    nrows = math.ceil((len(scatter) + extra) / ncols)
    fig = Figure(figsize=(4.0 * ncols, 3.4 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False).flatten()
    gen = np.random.default_rng(0)
    for ax, row in zip(axes, scatter, strict=False):
        x, s = row["exact"], row["samples"]
        keep = gen.permutation(s.shape[1])[:16]
        ax.scatter(np.repeat(x, len(keep)), s[:, keep].flatten(), s=4, alpha=0.15, color="tab:blue", label="1 mask")
        ax.scatter(x, s.mean(1), s=12, color="tab:red", label="mask average")
        ax.plot([x.min(), x.max()], [x.min(), x.max()], "k--", lw=1, label="y = x")
        ax.set_title(f"{row['name']}\ncorr {row['corr_1mask']:.2f} (1 mask), {row['corr_avg']:.2f} (avg)", fontsize=8)
        ax.set_xlabel("exact log-ratio, semi-AR sampler", fontsize=7)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=6)
    ax = axes[len(scatter)]
    for row in revs:
        ax.plot([p["ratio"] for p in row["per_ratio"]], [p["corr_1mask"] for p in row["per_ratio"]], marker="o", ms=3,
                label=row["name"].replace("MaskGRPO ", ""))
    ax.set_title("corr (1 mask) against the ratio r_j", fontsize=8)
    ax.set_xlabel("mask ratio r_j", fontsize=7)
    ax.legend(fontsize=6)
    if grid_rows:
        for ax, key in zip(axes[len(scatter) + 1:], ("corr_1mask", "std_masks"), strict=False):
            names = dict.fromkeys(r["name"] for r in grid_rows)
            mus = sorted({r["mu"] for r in grid_rows})
            for color, name in enumerate(names):
                for mu in mus:
                    pts = [(r["gamma"], r[key]) for r in grid_rows if r["name"] == name and r["mu"] == mu]
                    ax.plot(*zip(*pts, strict=True), marker="o", ms=3, color=f"C{color}", ls="-" if mu == mus[-1] else ":",
                            label=f"{name.replace('MaskGRPO ', '')}, mu {mu}")
            ax.set_title(f"{SEMI_AR_COLUMNS[key]} against gamma", fontsize=8)
            ax.set_xlabel("gamma (min_mask_rate)", fontsize=7)
        axes[len(scatter) + 1].legend(fontsize=5)
    for ax in axes[len(scatter) + extra:]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def semi_ar_demo(seed=0):
    """The semi-AR study at notebook size (about 15 s on one core): returns (rows, markdown table, Figure);
    rows are semi_ar_table's (one dict per estimator, keyed by its column names)."""
    old, new = make_semi_ar_policies(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    batch = semi_ar_completions(old, 8, 4, generator)
    rows, markdown = semi_ar_table(new, old, batch, generator=generator, draws=4, num_iterations=12, grad_completions=4,
                                   grad_draws=2)
    return rows, markdown, plot_semi_ar(rows)


# -----------------------------------------------------------------------------
# CLI


@dataclass
class Config:
    # random-order study (toy_sequences: positions interchangeable)
    seed: int = 0  # policies, completions and masks
    pretrain_steps: int = 150  # SFT steps that make pi_old
    shift_steps: int = 10  # extra SFT steps that make pi_theta
    shift_lr: float = 1e-3  # learning rate of those steps (the step size)
    prompts: int = 8  # prompts (completions = prompts x group)
    group: int = 4  # completions per prompt
    draws: int = 32  # mask draws per completion (per ratio)
    mu: int = 4  # num_iterations: ratios r_0..r_{mu-1}
    gamma: float = 0.6  # min_mask_rate
    sampler_samples: int = 2000  # samples per sampler for the TV check
    # semi-AR study (running sums; generate_text's sampler, 2 blocks of 3, one commit per step, temperature 1)
    semi_ar: bool = True  # run it
    semi_ar_seeds: int = 5  # independent pairs of policies (seeds 0..n-1), completions and masks
    semi_ar_pretrain_steps: int = 200  # SFT steps of pi_old (cut short: its sampler's order matters)
    semi_ar_rl_steps: int = 2  # MaskGRPO steps from pi_old to pi_theta
    semi_ar_rl_lr: float = 5e-4  # their learning rate
    semi_ar_prompts: int = 16  # prompts per seed
    semi_ar_group: int = 8  # completions per prompt
    semi_ar_draws: int = 32  # mask draws per completion (per ratio)
    semi_ar_mu: int = 12  # num_iterations of the main table
    semi_ar_gamma: float = 0.6  # min_mask_rate of the main table
    grad_completions: int = 16  # completions per seed whose gradient cosines are computed (0 = none)
    grad_draws: int = 4  # mask draws per completion for the gradient cosines
    grid_draws: int = 96  # masks per completion at each (gamma, mu), spread over the mu ratios
    distance_prompts: int = 8  # prompts of the sampler-distance table (seed 0's pi_old)
    jump_learning_rates: tuple = (5e-4, 1e-4, 2e-5)  # MaskGRPO step sizes of the commit-decision table (seed 0)
    out: str = "runs/exact"  # where table.md, estimators.png, semi_ar.md and semi_ar.png go

    def __post_init__(self):
        for name in ("pretrain_steps", "prompts", "group", "draws", "mu", "sampler_samples", "semi_ar_seeds",
                     "semi_ar_prompts", "semi_ar_group", "semi_ar_draws", "semi_ar_mu", "grad_draws", "grid_draws",
                     "distance_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"Config.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("gamma", "semi_ar_gamma"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"Config.{name} must be in [0, 1), got {getattr(self, name)}")


def random_order_study(cfg, out):
    old, new = make_policies(cfg.seed, cfg.pretrain_steps, shift_steps=cfg.shift_steps, shift_lr=cfg.shift_lr)
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    batch = toy_completions(old, cfg.prompts, cfg.group, generator)
    rows, markdown = estimator_table(new, old, batch, generator=generator, draws=cfg.draws, num_iterations=cfg.mu,
                                     min_mask_rate=cfg.gamma)
    exact_old = exact_logprobs(old, batch)
    delta = rows[0]["exact"]
    print(f"Random-order study: {len(delta)} completions ({cfg.prompts} prompts x {cfg.group}) sampled from pi_old by "
          f"the random-order sampler, L = {COMPLETION_LEN}, K = {NUM_TOKENS}; pi_theta = pi_old + {cfg.shift_steps} SFT "
          f"steps at lr {cfg.shift_lr:g}.")
    print(f"log pi_old(o): mean {float(exact_old['any_order'].mean()):.3f}; exact log-ratio: mean {delta.mean():+.3f}, "
          f"std {delta.std(ddof=1):.3f}, range [{delta.min():+.3f}, {delta.max():+.3f}]; "
          f"{cfg.draws} masks per completion per ratio, mu = {cfg.mu}, gamma = {cfg.gamma}.\n")
    print(markdown)
    ratios_markdown = per_ratio_markdown(rows)
    print("\nPer ratio (the MaskGRPO rows above, split by inner iteration j):\n\n" + ratios_markdown)
    # the exact P is the random-order sampler's marginal, and MDLM's ancestral ("emerge") sampler approaches it
    prompt = batch.sequences[0, :PROMPT_LEN]
    tokens, probs = completion_distribution(old, prompt, COMPLETION_LEN, COLUMNS)
    canvas = torch.cat([prompt, prompt.new_full((COMPLETION_LEN,), MASK_ID)]).expand(cfg.sampler_samples, -1)
    sampled = sample_random_order(old, canvas[:, :PROMPT_LEN], COMPLETION_LEN, generator, COLUMNS)[:, PROMPT_LEN:]
    tv = [f"one per step (random order) {total_variation(sampled, tokens, probs):.3f}"]
    positions = slice(PROMPT_LEN, PROMPT_LEN + COMPLETION_LEN)
    for steps in (1, 4, 16, 64):
        emerge = generate_image(old, canvas.clone(), positions=positions, columns=COLUMNS, steps=steps, mask_id=MASK_ID,
                                generator=generator)[:, positions]
        tv.append(f"emerge T={steps} {total_variation(emerge, tokens, probs):.3f}")
    print(f"\nTV distance to the exact P of prompt {prompt.tolist()}, {cfg.sampler_samples} samples each: " + ", ".join(tv))
    (out / "table.md").write_text(markdown + "\n\n" + ratios_markdown + "\n")
    fig = plot_estimators(rows)
    fig.savefig(out / "estimators.png", dpi=120)
    print(f"\nwrote {out / 'table.md'} and {out / 'estimators.png'}\n")


def _mean_rows(per_seed, keys):
    """Mean and std over seeds of `keys` of rows matched by position: list of dicts name -> (mean, std)."""
    out = []
    for group in zip(*per_seed, strict=True):
        out.append({k: (float(np.mean([r[k] for r in group])), float(np.std([r[k] for r in group])))
                    for k in keys if k in group[0]} | {n: group[0][n] for n in ("name", "gamma", "mu", "t") if n in group[0]})
    return out


def semi_ar_study(cfg, out):
    sampler = Sampler()
    tables, grids, first = [], [], None
    for seed in range(cfg.semi_ar_seeds):
        old, new = make_semi_ar_policies(seed, cfg.semi_ar_pretrain_steps, rl_steps=cfg.semi_ar_rl_steps,
                                         rl_lr=cfg.semi_ar_rl_lr, sampler=sampler)
        generator = torch.Generator().manual_seed(1000 + seed)
        batch = semi_ar_completions(old, cfg.semi_ar_prompts, cfg.semi_ar_group, generator, sampler)
        rows, markdown = semi_ar_table(new, old, batch, generator=generator, draws=cfg.semi_ar_draws,
                                       num_iterations=cfg.semi_ar_mu, min_mask_rate=cfg.semi_ar_gamma,
                                       grad_completions=cfg.grad_completions, grad_draws=cfg.grad_draws, sampler=sampler)
        grid, _ = gamma_mu_grid(new, old, batch, generator=generator, draws_per_completion=cfg.grid_draws,
                                grad_completions=cfg.grad_completions, grad_draws=cfg.grad_draws, sampler=sampler)
        reward = float(running_sum_reward(batch.sequences).mean())
        print(f"seed {seed}: pi_old reward {reward:.3f}; exact log-ratio std {rows[0]['std_completions']:.3f}")
        tables.append(rows)
        grids.append(grid)
        if first is None:
            first = (old, batch, markdown)
    old, batch, markdown = first
    keys = [k for k in SEMI_AR_COLUMNS if k not in ("name", "t")]
    mean_rows = _mean_rows(tables, keys)
    summary_keys = ("bias", "slope", "std_completions", "std_masks", "rmse", "corr_1mask", "corr_avg", "sign_agree", "cos_1mask",
                    "cos_avg")
    lines = ["| estimator | t | " + " | ".join(SEMI_AR_COLUMNS[k] for k in summary_keys) + " |",
             "|" + "---|" * (len(summary_keys) + 2)]
    for r in mean_rows:
        cells = ["-" if math.isnan(r.get(k, (math.nan,))[0]) else f"{r[k][0]:.3f} ± {r[k][1]:.3f}" for k in summary_keys]
        lines.append(f"| {r['name']} | {r['t']} | " + " | ".join(cells) + " |")
    summary = "\n".join(lines)
    names = [r["name"] for r in tables[0]]
    arlike, random_rev, trace = (names.index(f"MaskGRPO {n}") for n in ("AR-like Rev", "random Rev", "trace-ordered Rev"))
    deltas = [t[0]["exact"] for t in tables]
    contrasts = []
    for a, b, label in ((arlike, random_rev, "AR-like Rev - random Rev"), (trace, arlike, "trace-ordered Rev - AR-like Rev")):
        for stat, stat_name in ((corr_1mask, "corr (1 mask)"), (rmse, "RMSE")):
            point, lo, hi = paired_difference(deltas, [t[a]["samples"] for t in tables], [t[b]["samples"] for t in tables],
                                              stat)
            contrasts.append(f"| {label} | {stat_name} | {point:+.3f} | [{lo:+.3f}, {hi:+.3f}] |")
    contrast_md = "\n".join(["| difference | statistic | mean over seeds | 95% bootstrap interval |", "|---|---|---|---|",
                             *contrasts])
    grid_mean = _mean_rows(grids, GRID_KEYS)
    head = "| Rev | gamma | mu | " + " | ".join(SEMI_AR_COLUMNS[k] for k in GRID_KEYS) + " |"
    glines = [head, "|" + "---|" * (len(GRID_KEYS) + 3)]
    for r in grid_mean:
        cells = [f"{r[k][0]:+.3f}" if k == "bias" else f"{r[k][0]:.3f}" for k in GRID_KEYS]
        glines.append(f"| {r['name'].replace('MaskGRPO ', '')} | {r['gamma']:g} | {r['mu']} | " + " | ".join(cells) + " |")
    grid_md = "\n".join(glines)
    generator = torch.Generator().manual_seed(2000)
    prompts = running_sums(cfg.distance_prompts, generator)[:, :SUM_LENGTH]
    _, distance_md = sampler_distance_table(old, prompts, sampler)
    _, jump_md = commit_decision_table(0, cfg.jump_learning_rates, num_prompts=cfg.semi_ar_prompts, group=cfg.semi_ar_group,
                                       pretrain_steps=cfg.semi_ar_pretrain_steps, rl_steps=cfg.semi_ar_rl_steps,
                                       sampler=sampler)
    text = (f"Seed 0 ({len(batch.sequences)} completions, mu = {cfg.semi_ar_mu}, gamma = {cfg.semi_ar_gamma}):\n\n{markdown}\n\n"
            f"Mean ± std over {cfg.semi_ar_seeds} seeds:\n\n{summary}\n\nPaired differences (completions resampled "
            f"within each seed):\n\n{contrast_md}\n\nRev estimators at each (gamma, mu), mean over seeds:\n\n{grid_md}\n\n"
            f"Distance of the Fast-dLLM rollouts' laws to the exact sampler's (seed 0's pi_old, "
            f"{cfg.distance_prompts} prompts, by enumeration):\n\n{distance_md}\n\nThe part of the exact log-ratio that "
            f"comes from changed commit decisions, against the policy step (seed 0, {cfg.semi_ar_rl_steps} MaskGRPO "
            f"steps at each lr):\n\n{jump_md}\n")
    print(text)
    (out / "semi_ar.md").write_text(text)
    fig = plot_semi_ar(tables[0], [r | {k: r[k][0] for k in GRID_KEYS} for r in grid_mean])
    fig.savefig(out / "semi_ar.png", dpi=110)
    print(f"wrote {out / 'semi_ar.md'} and {out / 'semi_ar.png'}")


def main(cfg):
    torch.set_num_threads(1)  # the model is tiny: more threads only add overhead (and fight other processes)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    random_order_study(cfg, out)
    if cfg.semi_ar:
        semi_ar_study(cfg, out)


if __name__ == "__main__":
    run_cli(main, Config, doc=__doc__.split("\n\n")[0])
