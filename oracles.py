"""Slow, obvious reference implementations that the tests (and bench.py) compare maskgrpo.py against.

Each oracle is written from the math (MaskGRPO arXiv 2510.02880 §3, LLaDA arXiv 2502.09992 Alg. 5),
one row / one token at a time with Python loops, so that it shares no vectorisation trick with the
code under test. Random draws are made with the caller's torch.Generator in the order the method
defines, so an oracle and the fast code can be compared on identical noise.
"""

import itertools
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


# -----------------------------------------------------------------------------
# The LLaDA forward pass, from the architecture's formulas (LLaDA arXiv 2502.09992 §2.1 / App. B:
# a LLaMA-style Transformer without the causal mask: pre-norm RMSNorm, RoPE, SwiGLU, untied output head)


def _rms_norm_loop(x, weight, eps):
    """y_t = x_t / sqrt(mean_d(x_td^2) + eps) * w, one position t at a time. x (T, D) float64."""
    return torch.stack([x[t] / math.sqrt(float((x[t] ** 2).mean()) + eps) * weight for t in range(x.shape[0])])


def _rope_loop(x, theta):
    """HF's rotate-half RoPE (transformers' apply_rotary_pos_emb), one position and frequency at a time:
    the pair (x_i, x_{i + hd/2}) at position t turns by the angle t * theta^(-2i / hd):
        x'_i = x_i cos - x_{i+hd/2} sin,   x'_{i+hd/2} = x_{i+hd/2} cos + x_i sin.   x (T, hd) float64."""
    T, hd = x.shape
    out = x.clone()
    for t in range(T):
        for i in range(hd // 2):
            angle = t * theta ** (-2 * i / hd)
            a, b = float(x[t, i]), float(x[t, i + hd // 2])
            out[t, i] = a * math.cos(angle) - b * math.sin(angle)
            out[t, i + hd // 2] = b * math.cos(angle) + a * math.sin(angle)
    return out


@torch.no_grad()
def llada_forward_loop(model, input_ids, attention_mask=None):
    """Logits (B, T, V) in float64 of a MaskedDiffusionLM, one row and one attention head at a time, read
    from its state dict by the HF checkpoint's key names (GSAI-ML/LLaDA-8B-Instruct). Per block:
        h = x + W_o concat_heads( softmax_s( RoPE(q_t) . RoPE(k_s) / sqrt(hd) ) v_s ),  q, k, v = W RMSNorm(x)
        x' = h + W_down( silu(W_gate m) * (W_up m) ),  m = RMSNorm(h)
    with bidirectional attention: query t attends to every key s that is not padding (attention_mask False).
    Then logits = W_head RMSNorm(x)."""
    cfg = model.config
    w = {k: v.double() for k, v in model.state_dict().items()}
    H, eps = cfg.n_heads, cfg.rms_norm_eps
    hd = cfg.d_model // H
    pre = "model.transformer."
    out = []
    for b in range(input_ids.shape[0]):
        T = input_ids.shape[1]
        keep = [True] * T if attention_mask is None else [bool(v) for v in attention_mask[b].tolist()]
        x = w[pre + "wte.weight"][input_ids[b]]  # (T, D)
        for layer in range(cfg.n_layers):
            p = f"{pre}blocks.{layer}."
            n = _rms_norm_loop(x, w[p + "attn_norm.weight"], eps)
            heads = []
            for h in range(H):
                rows = slice(h * hd, (h + 1) * hd)
                q = _rope_loop(n @ w[p + "q_proj.weight"][rows].T, cfg.rope_theta)  # (T, hd)
                k = _rope_loop(n @ w[p + "k_proj.weight"][rows].T, cfg.rope_theta)
                v = n @ w[p + "v_proj.weight"][rows].T
                y = torch.zeros((T, hd), dtype=torch.float64)
                for t in range(T):
                    scores = [float(q[t] @ k[s]) / math.sqrt(hd) if keep[s] else -math.inf for s in range(T)]
                    top = max(scores)
                    e = [math.exp(z - top) for z in scores]
                    for s in range(T):
                        y[t] += e[s] / sum(e) * v[s]
                heads.append(y)
            h_res = x + torch.cat(heads, 1) @ w[p + "attn_out.weight"].T
            m = _rms_norm_loop(h_res, w[p + "ff_norm.weight"], eps)
            gate, up = m @ w[p + "ff_proj.weight"].T, m @ w[p + "up_proj.weight"].T
            x = h_res + (gate * torch.sigmoid(gate) * up) @ w[p + "ff_out.weight"].T
        out.append(_rms_norm_loop(x, w[pre + "ln_f.weight"], eps) @ w[pre + "ff_out.weight"].T)
    return torch.stack(out)


# -----------------------------------------------------------------------------
# LLaDA's stochastic decoding step (generate(), low_confidence remasking, temperature > 0)


def _llada_confidence(logits_row, token):
    """LLaDA's confidence of a candidate: its probability under the softmax of the un-tempered logits over
    the full vocabulary ([MASK] included in the normaliser). logits_row (V,) float64."""
    top = float(logits_row.max())
    return math.exp(float(logits_row[token]) - top) / sum(math.exp(float(v) - top) for v in logits_row)


def llada_first_step_loop(logits, temperature, mask_id, generator):
    """The first committed (token, position) of each row when a step commits one token: logits (B, Lb, V)
    of the block. LLaDA's add_gumbel_noise draws u ~ U(0, 1) in float64 for the whole logits tensor; the
    candidate at a position is argmax_v exp(l_v) / (-log u_v)^tau over v != [MASK] (a draw from
    softmax(l / tau)); the committed position is the most confident one (ties: the lower position).
    Returns (tokens (B,), positions (B,))."""
    B, Lb, V = logits.shape
    u = torch.rand((B, Lb, V), generator=generator, dtype=torch.float64)
    tokens, positions = [], []
    for b in range(B):
        best = (-math.inf, None, None)
        for i in range(Lb):
            row = logits[b, i].double()
            keys = [float(row[v]) - temperature * math.log(-math.log(float(u[b, i, v]))) if v != mask_id else -math.inf
                    for v in range(V)]
            token = max(range(V), key=lambda v: keys[v])
            conf = _llada_confidence(row, token)
            if conf > best[0]:
                best = (conf, token, i)
        tokens.append(best[1])
        positions.append(best[2])
    return torch.tensor(tokens), torch.tensor(positions)


def llada_first_step_law(logits, temperature, mask_id):
    """The exact law of the first committed (token, position) of one row under LLaDA's rule (one token per
    step), by enumerating every joint draw of the block's candidates: logits (Lb, V) -> probs (V, Lb).
    The candidates are independent, x_i ~ softmax(l_i / tau) over v != [MASK]; the winner is the position
    of the largest un-tempered confidence softmax(l_i)[x_i] (ties: the lower position)."""
    Lb, V = logits.shape
    vocab = [v for v in range(V) if v != mask_id]
    draw = []  # draw[i][v] = P(candidate at i is v)
    for i in range(Lb):
        scaled = [float(logits[i, v]) / temperature for v in vocab]
        top = max(scaled)
        e = [math.exp(s - top) for s in scaled]
        draw.append({v: e[j] / sum(e) for j, v in enumerate(vocab)})
    law = torch.zeros((V, Lb), dtype=torch.float64)
    for combo in itertools.product(vocab, repeat=Lb):
        p = math.prod(draw[i][v] for i, v in enumerate(combo))
        conf = [_llada_confidence(logits[i].double(), v) for i, v in enumerate(combo)]
        winner = max(range(Lb), key=lambda i: (conf[i], -i))
        law[combo[winner], winner] += p
    return law
