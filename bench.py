"""Speed figures for maskgrpo.py, printed as one JSON object. Nothing here is asserted about speed;
the only assertions are that the vectorised sampler and the slow per-row oracle agree before timing.
On the idle 2-core machine the whole run takes a few minutes (the first run also trains and caches the
fast-rollout model in runs/bench/, ~5 minutes).

    .venv/bin/python bench.py                # torch's default thread count
    .venv/bin/python bench.py --threads 1

1. generate_text: tokens/s of the vectorised LLaDA sampler vs the per-row loop oracle of oracles.py
   (the one the tests use), greedy, identical outputs checked first.
   Model d_model 128, 4 layers, vocab 64; batch 16, prompt 16, gen 64, block 16, steps 32.
2. fast_rollouts: the Fast-dLLM options of generate_text side by side on a canvas long enough to
   matter (prompt 64, completion 256, block 32, 128 steps, batch 8, greedy): exact, prefix cache, dual
   cache, threshold 0.9 without and with each cache. Per setting: tokens/s, speed-up over exact, model
   forwards per completion, and the fraction of completion tokens equal to the exact sampler's output.
   A random model is never confident, so threshold decoding would never fire: the model (d_model 128,
   4 layers) is first trained for 300 ELBO steps on sequences that repeat a random motif of 2 or 3
   tokens, so that, like an instruct model on an easy answer, it is confident where the answer is
   determined (with motifs of 2-6 tokens 300 steps left it unsure: threshold 0.9 saved almost no
   forwards).
3. grpo_step: wall time of one step (mu = 4 inner updates, plus the old / reference scoring) for the
   "maskgrpo" and the "d1" estimator on the same rollout batch.
4. Achieved GFLOP/s of the update's forward + backward (one masked_logps + grpo_loss + backward over
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
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

import maskgrpo as mg
from oracles import llada_generate_loop

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


LONG = dict(prompt=64, gen=256, block=32, steps=128, batch=8)
FAST_SETTINGS = (("exact", "none", None), ("prefix cache", "prefix", None), ("dual cache", "dual", None),
                 ("threshold 0.9", "none", 0.9), ("prefix cache + threshold 0.9", "prefix", 0.9),
                 ("dual cache + threshold 0.9", "dual", 0.9))


def periodic_sequences(n, length, generator):
    """(n, length) token ids repeating a random motif of 2 or 3 tokens (ids 2..62): every completion
    token is determined by the prompt once the period is found."""
    period = torch.randint(2, 4, (n, 1), generator=generator)
    motif = torch.randint(2, MASK, (n, 6), generator=generator)
    return motif.gather(1, torch.arange(length)[None] % period)


def periodic_model(path, steps=300, batch=16):
    """The fast-rollout bench model, trained with maskgrpo.elbo_loss on periodic_sequences (prompt never
    masked) and cached at `path` (written atomically)."""
    model = mg.MaskedDiffusionLM(mg.ModelConfig.tiny(VOCAB, MASK, EOS), generator=torch.Generator().manual_seed(5))
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    g = torch.Generator().manual_seed(6)
    T = LONG["prompt"] + LONG["gen"]
    answer = torch.arange(T)[None].expand(batch, T) >= LONG["prompt"]
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.99), weight_decay=0.0)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = 2e-3 * min(1.0, (step + 1) / 20)
        loss = mg.elbo_loss(model, periodic_sequences(batch, T, g), answer, generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
    return model.eval()


def bench_fast_rollouts(model):
    prompts = periodic_sequences(LONG["batch"], LONG["prompt"], torch.Generator().manual_seed(7))
    kw = dict(gen_length=LONG["gen"], block_length=LONG["block"], steps=LONG["steps"], temperature=0.0, mask_id=MASK,
              return_trajectory=True)
    mg.generate_text(model, prompts[:2], **(kw | dict(gen_length=LONG["block"], steps=LONG["steps"] // 8)))  # warm-up
    rows, exact, tokens = {}, None, LONG["batch"] * LONG["gen"]
    for name, cache, threshold in FAST_SETTINGS:
        t0 = time.perf_counter()
        x, trajectory = mg.generate_text(model, prompts, cache=cache, threshold=threshold, **kw)
        seconds = time.perf_counter() - t0
        completion = x[:, LONG["prompt"]:]
        exact = completion if exact is None else exact
        rows[name] = dict(tokens_per_s=round(tokens / seconds, 1), seconds=round(seconds, 3),
                          forwards_per_completion=int(trajectory.max()),
                          agreement_with_exact=round(float((completion == exact).float().mean()), 4))
    for row in rows.values():
        row["speedup"] = round(row["tokens_per_s"] / rows["exact"]["tokens_per_s"], 2)
    setting = (f"d_model 128, 4 layers, vocab {VOCAB}, batch {LONG['batch']}, prompt {LONG['prompt']}, gen {LONG['gen']}, "
               f"block {LONG['block']}, steps {LONG['steps']}, greedy; model trained 300 ELBO steps on periodic sequences")
    return dict(setting=setting, settings=rows)


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
    parser.add_argument("--cache-dir", default="runs/bench", help="where the trained fast-rollout model is cached")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    config = mg.ModelConfig.tiny(VOCAB, MASK, EOS)  # d_model 128, 4 layers, 4 heads, SwiGLU 384
    model = mg.MaskedDiffusionLM(config, generator=torch.Generator().manual_seed(0))
    prompts = torch.randint(2, MASK, (BATCH, PROMPT), generator=torch.Generator().manual_seed(3))
    generate = bench_generate(model, prompts)
    fast = bench_fast_rollouts(periodic_model(Path(args.cache_dir) / "periodic23-d128.pt"))
    grpo, update = bench_grpo(model, prompts)
    matmul = bench_matmul()
    update["fraction_of_matmul_peak"] = round(update["gflops_per_s"] / matmul["gflops_per_s"], 3)
    print(json.dumps(dict(torch=torch.__version__, threads=torch.get_num_threads(), generate_text=generate,
                          fast_rollouts=fast,
                          grpo_step=grpo, update_fwd_bwd=update, matmul_fp32=matmul,
                          total_s=round(time.perf_counter() - t0, 1)), indent=2))


if __name__ == "__main__":
    main()
