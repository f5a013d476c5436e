"""Slow, obvious reference implementations that the tests (and bench.py) compare maskgrpo.py against.

Each oracle is written from the math (MaskGRPO arXiv 2510.02880 §3, LLaDA arXiv 2502.09992 Alg. 5),
one row / one token at a time with Python loops, so that it shares no vectorisation trick with the
code under test. Random draws are made with the caller's torch.Generator in the order the method
defines, so an oracle and the fast code can be compared on identical noise.
"""

import math

import torch

# -----------------------------------------------------------------------------
# Masked diffusion ELBO (LLaDA eq. 3 / MDLM)


def elbo_loss_loop(model, input_ids, answer_mask, *, generator, attention_mask=None, columns=None, eps=1e-3):
    """-(1/t) sum_{i masked} log pi(x0_i | x_t) / |answer|, averaged over rows.
    Draws: t for every row first (t = eps + (1 - eps) * (1 - u), u ~ U[0, 1)), then one uniform per
    position; position i of row b is masked iff it is an answer token and u_bi < t_b.
    Each row goes through the model on its own (batch size 1)."""
    B, L = input_ids.shape
    mask_id = model.config.mask_token_id
    t = eps + (1 - eps) * (1 - torch.rand(B, generator=generator))
    u = torch.rand((B, L), generator=generator)
    offset = 0 if columns is None else columns.start
    total = 0.0
    for b in range(B):
        row = input_ids[b].tolist()
        masked = [bool(answer_mask[b, i]) and bool(u[b, i] < t[b]) for i in range(L)]
        x_t = [mask_id if masked[i] else row[i] for i in range(L)]
        am = None if attention_mask is None else attention_mask[b : b + 1]
        logits = model(torch.tensor([x_t]), am)[0].double()  # (L, V)
        if columns is not None:
            logits = logits[:, columns]
        nll = 0.0
        for i in range(L):
            if masked[i]:
                logp = logits[i] - torch.logsumexp(logits[i], 0)
                nll = nll - logp[row[i] - offset]
        n_answer = max(sum(bool(v) for v in answer_mask[b]), 1)
        total = total + nll / float(t[b]) / n_answer
    return total / B


# -----------------------------------------------------------------------------
# LLaDA text generation (Alg. 5 of arXiv 2502.09992, low-confidence remasking)


def num_transfer_tokens_loop(num_masked, steps):
    """LLaDA's get_num_transfer_tokens for one block: an even split, remainder to the early steps."""
    out = []
    for n in num_masked:
        n = int(n)
        out.append([n // steps + (1 if s < n % steps else 0) for s in range(steps)])
    return torch.tensor(out, dtype=torch.long)


@torch.no_grad()
def llada_generate_loop(model, prompt_ids, *, gen_length, block_length, steps, mask_id, attention_mask=None):
    """Greedy (temperature 0) LLaDA generate, one row at a time (batch size 1), full-canvas logits,
    torch.topk over the whole canvas with every position outside the current block's masked set at
    -inf confidence. A left-padded row is run padded, with its own attention mask, so RoPE positions
    are those the batched sampler sees. As LLaDA's generate(), the confidence of a candidate is its
    probability under the softmax over the full vocabulary ([MASK] included in the normaliser); unlike
    LLaDA, the [MASK] token itself is never a candidate (a committed [MASK] would leave the canvas
    masked; LLaDA's trained model never predicts it, a random toy model does)."""
    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    outputs = []
    for b in range(prompt_ids.shape[0]):
        prompt = prompt_ids[b].tolist()
        P = len(prompt)
        x = torch.tensor([prompt + [mask_id] * gen_length])  # (1, T)
        am = None
        if attention_mask is not None:
            am = torch.tensor([[bool(v) for v in attention_mask[b].tolist()] + [True] * gen_length])
        T = x.shape[1]
        for blk in range(num_blocks):
            start, end = P + blk * block_length, P + (blk + 1) * block_length
            n_masked = sum(1 for i in range(start, end) if int(x[0, i]) == mask_id)
            counts = num_transfer_tokens_loop([n_masked], steps_per_block)[0].tolist()
            for s in range(steps_per_block):
                logits = model(x, am)[0].double()  # (T, V)
                confidence = [-math.inf] * T
                candidate = [None] * T
                for i in range(start, end):
                    if int(x[0, i]) != mask_id:
                        continue
                    probs = torch.softmax(logits[i], 0)  # the full vocabulary, [MASK] included
                    c = max((v for v in range(len(probs)) if v != mask_id), key=lambda v: float(probs[v]))
                    candidate[i], confidence[i] = c, float(probs[c])
                for i in torch.topk(torch.tensor(confidence, dtype=torch.float64), counts[s]).indices.tolist():
                    x[0, i] = candidate[i]
        outputs.append(x[0])
    return torch.stack(outputs)


# -----------------------------------------------------------------------------
# Rev: the AR-like (fading-out) re-masking probability


def arlike_mask_prob(n, length, ratio):
    """P(position n of a scored answer of `length` tokens is masked) = clamp(1 - 2(1-r)(1 - n/(L-1)), 0, 1)."""
    if n >= length:
        return 0.0
    p = 1 - 2 * (1 - ratio) * (1 - n / (length - 1))
    return min(max(p, 0.0), 1.0)


# -----------------------------------------------------------------------------
# GRPO


def group_advantages_loop(rewards, num_generations, scale_rewards=True, eps=1e-4):
    """A_i = (r_i - mean) / (std + eps) per group of consecutive rows, unbiased std; equal rewards -> 0."""
    r = [float(v) for v in rewards]
    out = []
    for g in range(0, len(r), num_generations):
        group = r[g : g + num_generations]
        mean = sum(group) / len(group)
        std = math.sqrt(sum((v - mean) ** 2 for v in group) / (len(group) - 1))
        for v in group:
            if all(w == group[0] for w in group):
                out.append(0.0)
            elif scale_rewards:
                out.append((v - mean) / (std + eps))
            else:
                out.append(v - mean)
    return torch.tensor(out, dtype=torch.float64)


def grpo_loss_loop(logps, old_logps, ref_logps, advantages, loss_mask, *, epsilon, beta, loss_type):
    """The clipped surrogate with the k3 KL penalty, one token at a time (autograd flows to logps).
    l_ik = -min(rho A_i, clip(rho, 1-eps, 1+eps) A_i) + beta * (exp(ref - logp) - (ref - logp) - 1).
    "token": sum over all masked tokens / their count; "sequence": each row's masked-token mean, then
    the mean over all rows (a row without masked tokens contributes 0, as (1/G) sum_i of the paper).
    Stats: clip_frac = share of masked tokens whose clipped term is strictly the smaller one
    (no gradient), kl / ratio_mean = masked-token means, ratio_max = largest masked rho."""
    N, L = logps.shape
    total, count, row_means = 0.0, 0, []
    clipped, kl_sum, ratio_sum, ratio_max = 0, 0.0, 0.0, None
    for i in range(N):
        A = float(advantages[i])
        row_sum, row_count = 0.0, 0
        for k in range(L):
            if not bool(loss_mask[i, k]):
                continue
            rho = torch.exp(logps[i, k] - old_logps[i, k])
            unclipped_term = rho * A
            clipped_term = torch.clamp(rho, 1 - epsilon, 1 + epsilon) * A
            u, c = float(unclipped_term.detach()), float(clipped_term.detach())
            loss = -(unclipped_term if u <= c else clipped_term)
            kl = 0.0
            if beta > 0:
                d = ref_logps[i, k] - logps[i, k]
                kl = torch.exp(d) - d - 1
                loss = loss + beta * kl
            row_sum, row_count = row_sum + loss, row_count + 1
            clipped += int(c < u)
            kl_sum += float(kl.detach()) if beta > 0 else 0.0
            rho = float(rho.detach())
            ratio_sum += rho
            ratio_max = rho if ratio_max is None else max(ratio_max, rho)
        total, count = total + row_sum, count + row_count
        row_means.append(row_sum / row_count if row_count else 0.0)
    if loss_type == "token":
        loss = total / max(count, 1)
    else:
        loss = sum(row_means) / N
    n = max(count, 1)
    stats = dict(clip_frac=clipped / n, kl=kl_sum / n, ratio_mean=ratio_sum / n,
                 ratio_max=1.0 if ratio_max is None else ratio_max)
    return loss, stats
