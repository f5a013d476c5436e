"""
One-GPU check of the 8B numbers in scale/README.md: peak memory and seconds of each piece of a
MaskGRPO step, on an LLaDA-8B-shaped model (ModelConfig.llada_8b()) with random bf16 weights.

    python scale/gpu_check.py                 # 37 s on an H200 after start-up; prints JSON
    OUT=/tmp/out python scale/gpu_check.py    # also writes $OUT/gpu_check.json
    python scale/gpu_check.py --steps 32      # a quicker rollout; seconds extrapolated to 128 steps
    python scale/gpu_check.py --tiny          # the same code on a tiny model on CPU (the test runs this)

Measured, each with peak memory (torch.cuda.max_memory_allocated) and seconds:
  rollout_text      G 6 completions of 256 tokens after a 256-token prompt, 128 steps, block 16
                    (maskgrpo.generate_text, no grad); with --steps < 128 the time is extrapolated
  rollout_text_prefix, rollout_text_dual, rollout_text_dual_threshold0.9
                    the same with Fast-dLLM's prefix / dual KV cache, and dual cache + confidence threshold
                    0.9 (approximate samplers; forwards and completion tokens/s reported)
  eval_text_greedy  scale/evaluate.py's decoding: --eval-batch prompts, greedy, same canvas
  score_logps       one old / reference log-prob pass over the 6 rows (maskgrpo.masked_logps, no grad),
                    repeated --mu times; a step needs 2 x mu of them (old + reference)
  update_lora_ac    one GRPO update (forward, loss, backward, clip, AdamW) of LoRA r128 on q,k,v,up:
  update_lora       frozen bf16 base, fp32 adapters + AdamW states, bf16 autocast; with and without
                    activation checkpointing
  fwd_bwd_full_ac   full fine-tuning forward + backward of all 8B bf16 parameters (no optimiser: the
  fwd_bwd_full      fp32 AdamW states of 8B need ~128 GB, which does not fit beside activations)
  rollout_t2i       MMaDA-shaped text-to-image rollout: 9 images x 1024 tokens (1283-token sequences),
                    12 emerge steps, CFG (18 rows per forward); logits over 8192 columns
Every measurement catches torch.cuda.OutOfMemoryError (and any other error), reports it and goes on;
measurements are skipped once --budget-s seconds have passed. Weights are random: the numbers are
speed and memory, not quality.
"""

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import maskgrpo  # noqa: E402
from maskgrpo import LoRALinear, MaskedDiffusionLM, ModelConfig, add_lora, lora_disabled  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny model on CPU (a smoke test of this script)")
    p.add_argument("--steps", type=int, default=128, help="text rollout steps measured (a multiple of 16)")
    p.add_argument("--mu", type=int, default=12, help="log-prob passes measured")
    p.add_argument("--num-generations", type=int, default=6)
    p.add_argument("--prompt-length", type=int, default=256)
    p.add_argument("--completion-length", type=int, default=256)
    p.add_argument("--lora-rank", type=int, default=128)
    p.add_argument("--eval-batch", type=int, default=8, help="prompts per batch of the evaluation measurement")
    p.add_argument("--skip", default="", help="comma-separated measurement names to skip")
    p.add_argument("--budget-s", type=float, default=330, help="skip measurements that would start after this")
    return p.parse_args(argv)


def tiny_sizes(args):
    """--tiny: the same measurements at toy sizes."""
    args.steps, args.mu, args.num_generations, args.eval_batch = 4, 2, 2, 2
    args.prompt_length, args.completion_length, args.lora_rank = 8, 16, 4
    return ModelConfig.tiny(vocab_size=256, mask_token_id=255, eos_token_id=254, d_model=32, n_layers=2, n_heads=2,
                            mlp_hidden_size=64)


# -----------------------------------------------------------------------------
# An 8B-shaped model with random bf16 weights, built in place on the GPU


@torch.no_grad()
def random_model(cfg, device, lora_rank, seed=0):
    """meta -> LoRA wrappers -> to_empty(device) -> normal_(0, 0.02) in place: seconds for 8B.
    Base weights bf16 (frozen), LoRA adapters fp32 (trained under bf16 autocast), norms = 1."""
    with torch.device("meta"):
        model = MaskedDiffusionLM(cfg)
    add_lora(model, rank=lora_rank, alpha=lora_rank / 2)
    model.to(torch.bfloat16)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.lora_A.float()
            m.lora_B.float()
    model.to_empty(device=device)
    g = torch.Generator(device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
            p.fill_(1.0)
        elif "lora_B" in name:
            p.normal_(0, 1e-3, generator=g)  # not zero, so adapters change the output as after training
        else:
            p.normal_(0, 0.02, generator=g)
    return model


# -----------------------------------------------------------------------------
# Measurement harness


class Harness:
    def __init__(self, device, budget_s, skip):
        self.device, self.budget_s, self.skip = device, budget_s, skip
        self.t_start, self.results = time.time(), {}

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def memory_gib(self):
        return torch.cuda.max_memory_allocated() / 2**30 if self.device.type == "cuda" else None

    def __call__(self, name, fn, note=""):
        if name in self.skip:
            self.results[name] = dict(skipped="--skip")
            return None
        if time.time() - self.t_start > self.budget_s:
            self.results[name] = dict(skipped=f"time budget {self.budget_s:.0f}s spent")
            return None
        out = None
        base = torch.cuda.memory_allocated() / 2**30 if self.device.type == "cuda" else None
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self.sync()
        t0 = time.time()
        try:
            out, extra = fn()
            self.sync()
            r = dict(seconds=round(time.time() - t0, 3), peak_memory_gib=self.memory_gib(),
                     memory_before_gib=base, **(extra or {}))
        except torch.cuda.OutOfMemoryError as e:
            r = dict(error="OutOfMemoryError", message=str(e).splitlines()[0][:300], peak_memory_gib=self.memory_gib())
        except Exception as e:  # report and continue: one broken measurement must not lose the others
            r = dict(error=type(e).__name__, message=str(e)[:300], traceback=traceback.format_exc(limit=3)[-1200:])
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if note:
            r["note"] = note
        for k in ("peak_memory_gib", "memory_before_gib"):
            if isinstance(r.get(k), float):
                r[k] = round(r[k], 2)
        self.results[name] = r
        print(f"{name}: {json.dumps(r)}", flush=True)
        return out


def autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    cfg = tiny_sizes(args) if args.tiny else ModelConfig.llada_8b()
    block = 16 if not args.tiny else 8
    if args.steps % (args.completion_length // block):
        raise ValueError(f"--steps={args.steps} must be a multiple of {args.completion_length // block} (the number of blocks)")
    h = Harness(device, args.budget_s, set(s for s in args.skip.split(",") if s))
    summary = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", torch=torch.__version__,
                   model="tiny" if args.tiny else "llada-8b shape, random bf16 weights",
                   settings=dict(num_generations=args.num_generations, prompt_length=args.prompt_length,
                                 completion_length=args.completion_length, steps_measured=args.steps, mu=args.mu,
                                 lora_rank=args.lora_rank, block_length=block),
                   results=h.results)

    model = h("build_model", lambda: (random_model(cfg, device, args.lora_rank), None),
              note="meta -> to_empty -> normal_ in place; bf16 base + fp32 LoRA")
    if model is None:
        return finish(summary)
    n_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    n_lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    summary.update(base_parameters=n_params, lora_parameters=n_lora)
    G, P, L = args.num_generations, args.prompt_length, args.completion_length
    gen = torch.Generator(device).manual_seed(0)
    prompt = torch.randint(0, cfg.mask_token_id, (1, P), generator=gen, device=device)

    # --- text rollouts: the exact sampler, then Fast-dLLM's cache and threshold (approximations of it)
    def rollout(rows, temperature, cache="none", threshold=None):
        def run():
            with torch.no_grad(), autocast(device):
                model(prompt.repeat(rows, 1)[:, :8])  # warm-up (kernels, allocator)
                h.sync()
                t0 = time.time()
                seq, trajectory = maskgrpo.generate_text(
                    model, prompt.repeat(rows, 1), gen_length=L, block_length=block, steps=args.steps,
                    temperature=temperature, mask_id=cfg.mask_token_id, generator=gen, cache=cache, threshold=threshold,
                    return_trajectory=True)
                h.sync()
            s = time.time() - t0
            forwards = int(trajectory.max())  # the step at which the last token was committed
            full = 128 if not args.tiny else args.steps
            return seq, dict(rollout_seconds=round(s, 3), forwards=forwards, seconds_per_forward=round(s / forwards, 4),
                             completion_tokens_per_s=round(rows * L / s, 1),
                             extrapolated_seconds_128_steps=round(s / args.steps * full, 2) if threshold is None else None,
                             extrapolated=args.steps != full and threshold is None)
        return run

    shape = f"{P} prompt + {L}) tokens, block {block}; rollout_seconds excludes a warm-up forward"
    seq = h("rollout_text", rollout(G, 0.9), note=f"G {G} x ({shape}")
    for cache, threshold in (("prefix", None), ("dual", None), ("dual", 0.9)):
        name = f"rollout_text_{cache}" + ("" if threshold is None else f"_threshold{threshold}")
        h(name, rollout(G, 0.9, cache, threshold),
          note=f"G {G} x ({shape}; Fast-dLLM {cache} cache" + ("" if threshold is None else f", threshold {threshold}")
               + ("" if threshold is None else "; random weights give near-uniform confidences, so the threshold is "
                  "expected to commit only the schedule's minimum: the time is the cache's, not a trained model's"))
    h("eval_text_greedy", rollout(args.eval_batch, 0.0),
      note=f"evaluation: {args.eval_batch} prompts x ({shape}, greedy (scale/evaluate.py's default decoding)")
    if seq is None:
        seq = torch.cat([prompt.repeat(G, 1), torch.randint(0, cfg.mask_token_id, (G, L), generator=gen, device=device)], 1)
    batch = maskgrpo.text_completions(seq, torch.ones(G, P, dtype=torch.bool, device=device), cfg.eos_token_id,
                                      score_whole_canvas=True)
    gcfg = maskgrpo.GRPOConfig(num_generations=G, max_completion_length=L, block_length=block, diffusion_steps=args.steps,
                               num_iterations=args.mu, micro_batch_size=G)
    masks = [maskgrpo.draw_mask(batch, gcfg, j, gen) for j in range(args.mu)]

    # --- old / reference log-probs
    def score():
        with torch.no_grad(), autocast(device):
            t0 = time.time()
            old = [maskgrpo.masked_logps(model, batch, m) for m in masks]
            h.sync()
        return old, dict(passes=args.mu, seconds_per_pass=round((time.time() - t0) / args.mu, 4))

    old = h("score_logps", score, note=f"{args.mu} passes over {G} rows; a step needs 2 x mu (old + reference)")
    if old is None:
        old = [torch.zeros(G, L, device=device) for _ in masks]
    with torch.no_grad(), autocast(device), lora_disabled(model):
        ref = maskgrpo.masked_logps(model, batch, masks[-1])  # the reference policy = adapters off
    adv = torch.linspace(-1, 1, G, device=device)

    # --- one GRPO update, LoRA, with / without activation checkpointing
    lora_params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(lora_params, lr=1e-6)

    def update(trainable, step_optimizer):
        def one_step():
            with autocast(device):
                logps = maskgrpo.masked_logps(model, batch, masks[-1])
                loss, _ = maskgrpo.grpo_loss(logps, old[-1], ref, adv, masks[-1][:, batch.positions] & batch.scored,
                                             epsilon=0.2, beta=0.01)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(trainable, 0.2)
            if step_optimizer:
                opt.step()
            for p in trainable:
                p.grad = None
            return dict(loss=float(loss.detach()), grad_norm=float(norm))

        def run():
            one_step()  # warm-up: first-call kernel selection and allocator growth
            h.sync()
            t0 = time.time()
            out = one_step()
            h.sync()
            return None, dict(steady_seconds=round(time.time() - t0, 3), **out)
        return run

    for ac in (True, False):
        model.gradient_checkpointing = ac
        h(f"update_lora{'_ac' if ac else ''}", update(lora_params, True),
          note=f"LoRA r{args.lora_rank} q,k,v,up; {G} rows x {P + L} tokens; AdamW; AC {'on' if ac else 'off'}")

    # --- full fine-tuning: forward + backward of every base weight (bf16 grads), no optimiser
    opt.state.clear()
    base = [p for n, p in model.named_parameters() if "lora_" not in n]
    for p in lora_params:
        p.requires_grad_(False)
    for p in base:
        p.requires_grad_(True)
    for ac in (True, False):
        model.gradient_checkpointing = ac
        with lora_disabled(model):
            h(f"fwd_bwd_full{'_ac' if ac else ''}", update(base, False),
              note=f"all {n_params / 1e9:.2f}e9 bf16 weights trainable, bf16 grads, no optimiser; AC {'on' if ac else 'off'}")
    for p in base:
        p.requires_grad_(False)

    # --- MMaDA-shaped text-to-image rollout (same blocks; image columns taken from the top of the vocabulary)
    def rollout_t2i():
        n_img = 1024 if not args.tiny else 16
        text_len = 257 if not args.tiny else 8
        rows, steps = (9, 12) if not args.tiny else (2, 2)
        codebook = min(8192, cfg.vocab_size // 2)
        columns = slice(cfg.vocab_size - codebook, cfg.vocab_size)
        x = torch.randint(0, columns.start, (rows, text_len + n_img + 2), generator=gen, device=device)
        positions = slice(text_len + 1, text_len + 1 + n_img)
        x[:, positions] = cfg.mask_token_id
        uncond = x.clone()
        uncond[:, :text_len] = 0
        with torch.no_grad(), autocast(device):
            out = maskgrpo.generate_image(model, x, positions=positions, columns=columns, steps=steps,
                                          mask_id=cfg.mask_token_id, guidance_scale=3.5, uncond_ids=uncond, generator=gen)
        return out, dict(images=rows, sequence_length=x.shape[1], steps=steps, rows_per_forward=2 * rows)

    h("rollout_t2i", rollout_t2i, note="9 images, 1283-token sequences, 12 emerge steps, CFG 3.5")
    return finish(summary)


def derived_step_estimate(results, mu=12, rows_per_gpu=12, G=6):
    """The llada-8b preset on 8 GPUs puts 16 prompts x G 6 = 96 rows on 8 GPUs: 12 rows per GPU. Per step:
    rollout of 12 rows (<= 2 x the measured G-6 rollout), 2 x mu scoring passes (old + reference) and
    mu LoRA updates over 12 rows (micro-batches of 6, activation checkpointing). Derived, not measured."""
    try:
        k = rows_per_gpu / G
        rollout = k * results["rollout_text"]["extrapolated_seconds_128_steps"]
        scoring = 2 * mu * k * results["score_logps"]["seconds_per_pass"]
        updates = mu * k * results["update_lora_ac"]["steady_seconds"]
    except (KeyError, TypeError):
        return None
    return dict(rollout_s=round(rollout, 1), scoring_s=round(scoring, 1), updates_s=round(updates, 1),
                total_s=round(rollout + scoring + updates, 1), rollout_fraction=round(rollout / (rollout + scoring + updates), 2),
                note="12 rows per GPU (16 prompts x G 6 on 8 GPUs): rollout, 2 x mu scoring passes, mu LoRA updates "
                     "(AC on); derived from the measurements above, not measured")


def finish(summary):
    if summary["model"] != "tiny":
        summary["llada_8b_step_estimate_per_gpu"] = derived_step_estimate(summary["results"])
    summary["total_seconds"] = round(time.time() - START, 1)
    text = json.dumps(summary, indent=2)
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
        (Path(os.environ["OUT"]) / "gpu_check.json").write_text(text + "\n")
    return summary


START = time.time()

if __name__ == "__main__":
    main()
