"""Speed figures for maskgrpo.py, printed as one JSON object. Nothing here is asserted about speed;
the only assertion is that the vectorised sampler and the slow per-row oracle agree before timing.
On a shared 2-core machine the whole run takes about 1-2 minutes.

    .venv/bin/python bench.py                # torch's default thread count
    .venv/bin/python bench.py --threads 1

1. generate_text: tokens/s of the vectorised LLaDA sampler vs the per-row loop oracle of
   tests/oracles.py (the one the tests use), greedy, identical outputs checked first.
   Model d_model 128, 4 layers, vocab 64; batch 16, prompt 16, gen 64, block 16, steps 32.
2. grpo_step: wall time of one step (mu = 4 inner updates, plus the old / reference scoring) for the
   "maskgrpo" and the "d1" estimator on the same rollout batch.
3. Achieved GFLOP/s of the update's forward + backward (one masked_logps + grpo_loss + backward over
   the whole batch), FLOPs counted analytically, next to a float32 1024^3 matmul measured in this run:
       forward  = 2 * P_block * N * T          (matmuls of the blocks, P_block = n_layers (4 d^2 + 3 d f))
                + 2 * d * V * N * L            (the head, only for the L completion columns)
                + 4 * n_layers * N * T^2 * d   (attention: Q K^T and P V)
       fwd+bwd  = 3 * forward                  (backward: input and weight gradients, 2x the forward)
   i.e. 6 P_block N T + 6 d V N L + 12 n_layers N T^2 d. Norms, softmax, RoPE, embedding lookup and
   the optimiser are not counted. Times are medians of 2-3 repeats after a warm-up (the slow loop: one run).
"""

import argparse
import copy
import json
import statistics
import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "tests"))
from oracles import llada_generate_loop  # noqa: E402

import maskgrpo as mg  # noqa: E402

VOCAB, EOS, MASK = 64, 1, 63
BATCH, PROMPT, GEN, BLOCK, STEPS = 16, 16, 64, 16, 32
G, MU = 4, 4


def median_seconds(fn, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_generate(model, prompts):
    kw = dict(gen_length=GEN, block_length=BLOCK, steps=STEPS, mask_id=MASK)
    fast = mg.generate_text(model, prompts, temperature=0.0, **kw)  # also the warm-up
    t0 = time.perf_counter()
    slow = llada_generate_loop(model, prompts, **kw)  # the slow loop is timed once, on this run
    t_slow = time.perf_counter() - t0
    assert torch.equal(fast, slow), "vectorised generate_text and the per-row oracle disagree"
    t_fast = median_seconds(lambda: mg.generate_text(model, prompts, temperature=0.0, **kw), repeats=3, warmup=0)
    tokens = BATCH * GEN
    return dict(setting=f"d_model {model.config.d_model}, {model.config.n_layers} layers, vocab {VOCAB}, batch {BATCH}, "
                        f"prompt {PROMPT}, gen {GEN}, block {BLOCK}, steps {STEPS}, greedy",
                identical_output=True, vectorised_tokens_per_s=round(tokens / t_fast, 1),
                per_row_loop_tokens_per_s=round(tokens / t_slow, 1), speedup=round(t_slow / t_fast, 2),
                vectorised_s=round(t_fast, 4), per_row_loop_s=round(t_slow, 4))


def update_flops(cfg, N, T, L):
    d, f, n, V = cfg.d_model, cfg.mlp_hidden_size, cfg.n_layers, cfg.vocab_size
    p_block = n * (4 * d * d + 3 * d * f)
    return 6 * p_block * N * T + 6 * d * V * N * L + 12 * n * N * T * T * d


def bench_grpo(model, prompts):
    cfg = mg.GRPOConfig(num_generations=G, max_completion_length=GEN, block_length=BLOCK, diffusion_steps=STEPS,
                        temperature=0.9, num_iterations=MU, beta=0.01, learning_rate=1e-4, micro_batch_size=BATCH)
    g = torch.Generator().manual_seed(1)
    batch = mg.rollout_text(model, prompts[: BATCH // G], torch.ones(BATCH // G, PROMPT, dtype=torch.bool), cfg, g)
    rewards = torch.rand(BATCH, generator=g)
    steps, times = {}, {}
    for estimator in ("maskgrpo", "d1"):
        policy = copy.deepcopy(model)
        reference = copy.deepcopy(policy).requires_grad_(False)
        ecfg = replace(cfg, estimator=estimator)
        steps[estimator] = partial(mg.grpo_step, policy, mg.make_optimizer(policy, ecfg), batch, rewards, ecfg, g,
                                   reference=reference)
        steps[estimator]()  # warm-up
    for _ in range(3):  # interleaved, so that a change in machine load hits both alike
        for estimator, step in steps.items():
            times.setdefault(estimator, []).append(median_seconds(step, repeats=1, warmup=0))
    out = {f"{k}_s": round(statistics.median(v), 4) for k, v in times.items()}
    out["d1_over_maskgrpo"] = round(out["d1_s"] / out["maskgrpo_s"], 3)
    T = batch.sequences.shape[1]
    out["setting"] = f"N {BATCH} rows (G {G}), T {T}, mu {MU}, beta 0.01 (frozen copy), micro-batch {BATCH}"

    # the update's forward + backward on one mask, the whole batch in one micro-batch
    policy = copy.deepcopy(model)
    mask = mg.draw_mask(batch, cfg, 0, g)
    loss_mask = mask[:, batch.positions] & batch.scored
    old = mg.masked_logps(policy, batch, mask).detach()
    adv = mg.group_advantages(rewards, G)

    def fwd_bwd():
        loss, _ = mg.grpo_loss(mg.masked_logps(policy, batch, mask), old, None, adv, loss_mask, epsilon=0.2, beta=0.0)
        loss.backward()

    t = median_seconds(fwd_bwd, repeats=3)
    N, T = batch.sequences.shape
    flops = update_flops(model.config, N, T, GEN)
    return out, dict(flops_per_update=flops, seconds=round(t, 4), gflops_per_s=round(flops / t / 1e9, 2),
                     formula="6*P_block*N*T + 6*d*V*N*L + 12*n_layers*N*T^2*d, P_block = n_layers*(4d^2 + 3df)")


def bench_matmul(n=1024, repeats=10):
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    t = median_seconds(lambda: a @ b, repeats=repeats, warmup=2)
    return dict(size=n, seconds=round(t, 5), gflops_per_s=round(2 * n**3 / t / 1e9, 2))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    config = mg.ModelConfig.tiny(VOCAB, MASK, EOS)  # d_model 128, 4 layers, 4 heads, SwiGLU 384
    model = mg.MaskedDiffusionLM(config, generator=torch.Generator().manual_seed(0))
    prompts = torch.randint(2, MASK, (BATCH, PROMPT), generator=torch.Generator().manual_seed(3))
    generate = bench_generate(model, prompts)
    grpo, update = bench_grpo(model, prompts)
    matmul = bench_matmul()
    update["fraction_of_matmul_peak"] = round(update["gflops_per_s"] / matmul["gflops_per_s"], 3)
    print(json.dumps(dict(torch=torch.__version__, threads=torch.get_num_threads(), generate_text=generate,
                          grpo_step=grpo, update_fwd_bwd=update, matmul_fp32=matmul,
                          total_s=round(time.perf_counter() - t0, 1)), indent=2))


if __name__ == "__main__":
    main()
