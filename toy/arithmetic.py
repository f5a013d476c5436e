"""Multi-step arithmetic: the CPU stand-in for GSM8K with LLaDA.

    python toy/arithmetic.py                      # SFT (cached) then MaskGRPO, ~6 min on 2 cores
    python toy/arithmetic.py -h                   # every setting, its default and what it means
    python toy/arithmetic.py --grpo_steps=20 --run_name=short

A tiny LLaDA-shaped MaskedDiffusionLM learns to add three single-digit numbers by writing a short
reasoning trace whose later steps depend on earlier ones, then MaskGRPO improves it against a
verifiable reward, as MaskGRPO does for LLaDA-8B on GSM8K:

    1. SFT with the ELBO loss (maskgrpo.elbo_loss) on a deliberately noisy teacher: in
       `answer_slip` (half) of the training traces the teacher works every step out right but then
       reports the running sum before the last step as the answer (7+5=12,12+9=21#12). The SFT
       model learns the steps, but which number to report is a coin flip it has no reason to
       resolve: greedy decoding reports the wrong one for many problems, while rollouts at
       temperature 0.9 report each often enough for GRPO to find out which is rewarded. Its
       arithmetic is imperfect too, and GRPO keeps improving it more slowly. The SFT checkpoint is
       cached. (A carry-forgetting teacher was too hard for this model: its traces come in two
       lengths, and with 80% of them carry-free the model stayed at 1% after 800 SFT steps.)
    2. MaskGRPO (maskgrpo.grpo_step): block semi-AR rollouts on a fixed completion canvas padded with
       EOS, G completions per prompt, mu inner updates on AR-like re-masks at the rising ratios
       r_j = gamma + (1 - gamma)(j + 1)/mu, reward = correct final answer + a small format bonus.
    3. Greedy (temperature 0) exact match of the final answer on held-out problems, before and during RL.

Encodings (vocabulary "0123456789+=,#", then EOS, PAD, MASK; one token per character):

    problem   prompt (6 tokens)   completion canvas (max_completion_length = 20 tokens)
    3+4+5     3+4+5=              3+4=7,7+5=12#12........      (. = EOS, pads the canvas)
    7+5+9     7+5+9=              7+5=12,12+9=21#21...         correct teacher
    7+5+9     7+5+9=              7+5=12,12+9=21#12...         noisy teacher: the answer slips
    0+0+0     0+0+0=              0+0=0,0+0=0#0........

    token ids: '0'..'9' -> 0..9, '+' 10, '=' 11, ',' 12, '#' 13, EOS 14, PAD 15, MASK 16
    "3+4+5=" -> [3, 10, 4, 10, 5, 11]

The model is LLaDA's architecture at 0.22 M parameters, with one departure: RoPE base 100 instead
of 500000 (with LLaDA's base, sequences of ~26 tokens are nearly position-blind and the model
struggles even to copy the operands). With more digits (--max_operand=99) prompts differ in length
and are left-padded with PAD (never attended). Data: all (max_operand + 1)^num_terms problems, shuffled by `data_seed`; the first
`heldout_size` are held out, the rest are the train split (SFT and RL prompts).

Reward of a completion (its text up to the first EOS):
    1.0  if the number after the final '#' equals the true sum (exact string match, no leading zeros)
  + format_reward (0.1) if the text is a well-formed trace: num_terms - 1 steps "x+y=z" joined by ','
       then "#answer" (arithmetic inside the steps is not checked).

Outputs in runs/arithmetic/<run_name>/: metrics.json, curves.png (held-out accuracy and mean reward
against step and wall time), ckpt.pt (model, optimiser, generator states, step, metrics; rerunning the
same command resumes it exactly, with the folder given by a relative or an absolute path), and .lock
while a run uses the folder (a second run on it is refused). The SFT model is cached in
runs/arithmetic/sft-<hash>.pt. Bad settings, a damaged checkpoint or cache, an unusable output folder
are one line on stderr before any training (toy/common.py, "Bad-input policy").
"""

import dataclasses
import os
import re
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

import maskgrpo
from toy.common import (
    check_finite,
    claim_run,
    config_hash,
    grpo_loop,
    load_or_train,
    make_generators,
    plot_curves,
    run_cli,
    set_threads,
    subconfig,
    train_elbo,
    write_json,
)

# -----------------------------------------------------------------------------
# Config

MAX_SEQUENCE_LENGTH = 256  # the model's longest input (prompt + completion canvas)
MAX_PROBLEMS = 10**6  # the toy lists every problem of the task


@dataclass
class Config:
    # task
    num_terms: int = 3  # numbers added per problem (the trace has num_terms - 1 steps)
    max_operand: int = 9  # operands are 0..max_operand
    heldout_size: int = 200  # problems held out for evaluation (the rest are train)
    answer_slip: float = 0.5  # noisy SFT teacher: fraction of traces reporting the sum before the last step
    format_reward: float = 0.1  # reward bonus for a well-formed trace (a correct answer gives 1.0)
    data_seed: int = 0  # shuffles the train / held-out split
    # model (LLaDA architecture, maskgrpo.ModelConfig)
    d_model: int = 64  # hidden width
    n_layers: int = 4  # transformer blocks
    n_heads: int = 4  # attention heads
    mlp_hidden_size: int = 192  # SwiGLU inner width
    rope_theta: float = 100.0  # RoPE base (LLaDA's 500000 leaves ~26-token sequences almost position-blind)
    init_seed: int = 0  # parameter initialisation
    # SFT (ELBO loss; the result is cached by a hash of the task, model and SFT settings)
    sft_steps: int = 800  # optimiser steps
    sft_batch_size: int = 128  # sequences per step
    sft_learning_rate: float = 3e-3  # AdamW peak lr (linear warm-up, cosine decay to 10%)
    sft_warmup: int = 50  # warm-up steps
    sft_seed: int = 0  # SFT batches and ELBO masks
    # GRPO (names as maskgrpo.GRPOConfig)
    grpo_steps: int = 100  # rollout batches (each followed by num_iterations updates)
    prompts_per_step: int = 16  # prompts per rollout batch
    num_generations: int = 8  # G, completions per prompt
    num_iterations: int = 4  # mu, inner updates per rollout batch, one mask ratio each
    min_mask_rate: float = 0.6  # gamma, truncation of the rising mask-ratio schedule
    remasking: str = "arlike"  # Rev: "arlike" (fading-out) or "random"
    estimator: str = "maskgrpo"  # "maskgrpo" or "d1" (diffu-GRPO one-step baseline)
    shared_masks: bool = True  # old / reference / current policy scored on the same mask
    epsilon: float = 0.2  # PPO clip range
    beta: float = 0.01  # k3 KL weight against the SFT model
    learning_rate: float = 3e-5  # AdamW lr (constant)
    weight_decay: float = 0.1  # AdamW weight decay
    max_grad_norm: float = 0.2  # gradient clipping
    loss_type: str = "token"  # "token" or "sequence" normalisation
    scale_rewards: bool = True  # divide advantages by the group std
    temperature: float = 0.9  # rollout temperature (evaluation is greedy)
    cache_implementation: str = "none"  # rollout KV cache: "none" (exact), "prefix" or "dual" (Fast-dLLM, approximate)
    confidence_threshold: float | None = None  # rollout parallel decoding: commit every token above it (none = exact)
    eval_fast_sampler: bool = False  # evaluate with the rollout's cache / threshold too (default: the exact sampler)
    max_completion_length: int = 20  # L, the completion canvas, padded with EOS
    block_length: int = 5  # semi-AR block size
    diffusion_steps: int = 20  # sampler steps per completion (rollouts and evaluation)
    micro_batch_size: int = 128  # rows per forward / backward
    seed: int = 0  # prompt sampling, rollouts and GRPO masks
    # run
    eval_every: int = 10  # GRPO steps between held-out evaluations
    show_mistakes: int = 3  # wrong held-out answers printed at each evaluation
    ckpt_every: int = 10  # GRPO steps between checkpoints
    out_root: str = "runs/arithmetic"  # SFT cache and run folders
    run_name: str = "maskgrpo"  # this run's folder inside out_root
    resume: bool = True  # continue from out_root/run_name/ckpt.pt when it exists
    threads: int = 2  # torch intra-op threads (capped at the cores available)
    device: str = "cpu"  # torch device; the toy targets "cpu" ("cuda" works, for quick sweeps)
    progress: bool = True  # tqdm bars

    def __post_init__(self):
        """Every check of the settings, single and cross-field, before any work starts."""
        check_finite(self)
        for name in ("num_terms", "max_operand", "heldout_size", "sft_batch_size", "prompts_per_step",
                     "eval_every", "ckpt_every", "threads", "d_model"):
            if getattr(self, name) < (2 if name == "num_terms" else 1):
                raise ValueError(f"{name} must be >= {2 if name == 'num_terms' else 1}, got {getattr(self, name)}")
        for name in ("sft_steps", "grpo_steps", "sft_warmup", "show_mistakes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.answer_slip <= 1:
            raise ValueError(f"answer_slip must be in [0, 1], got {self.answer_slip}")
        if self.sft_learning_rate <= 0:
            raise ValueError(f"sft_learning_rate must be > 0, got {self.sft_learning_rate}")
        problems = (self.max_operand + 1) ** self.num_terms
        if problems > MAX_PROBLEMS:
            raise ValueError(f"num_terms={self.num_terms} and max_operand={self.max_operand} make {problems} problems; "
                             f"the toy lists them all, at most {MAX_PROBLEMS}")
        if self.heldout_size >= problems:
            raise ValueError(f"heldout_size={self.heldout_size} leaves no train problems (there are {problems})")
        longest = len(write_trace([self.max_operand] * self.num_terms)) + 1  # + at least one EOS
        if self.max_completion_length < longest:
            raise ValueError(f"max_completion_length={self.max_completion_length} is shorter than the longest "
                             f"trace plus EOS ({longest})")
        prompt_length = len(prompt_text([self.max_operand] * self.num_terms))
        if prompt_length + self.max_completion_length > MAX_SEQUENCE_LENGTH:
            raise ValueError(f"prompt ({prompt_length}) + max_completion_length ({self.max_completion_length}) exceeds "
                             f"the model's max_sequence_length ({MAX_SEQUENCE_LENGTH})")
        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda', got {self.device!r}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={self.device!r} but torch finds no CUDA device")
        subconfig(maskgrpo.GRPOConfig, self)  # validates the GRPO fields
        maskgrpo.ModelConfig.tiny(VOCAB.size, VOCAB.mask_id, VOCAB.eos_id, **self.model_sizes(),
                                  max_sequence_length=MAX_SEQUENCE_LENGTH)

    def model_sizes(self):
        return dict(d_model=self.d_model, n_layers=self.n_layers, n_heads=self.n_heads, mlp_hidden_size=self.mlp_hidden_size,
                    rope_theta=self.rope_theta)

    def grpo(self):
        return subconfig(maskgrpo.GRPOConfig, self)


# -----------------------------------------------------------------------------
# Task: vocabulary, traces, data, reward


class Vocab:
    """One token per character of `symbols`, then the special tokens EOS, PAD and MASK."""

    def __init__(self, symbols="0123456789+=,#"):
        self.symbols = symbols
        self.eos_id, self.pad_id, self.mask_id = len(symbols), len(symbols) + 1, len(symbols) + 2
        self.size = len(symbols) + 3
        self.shown = dict(enumerate(symbols)) | {self.eos_id: ".", self.pad_id: "", self.mask_id: "_"}

    def encode(self, text):
        return [self.symbols.index(c) for c in text]

    def decode(self, ids):
        """Text up to the first EOS (what the reward reads)."""
        ids = [int(i) for i in ids]
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return "".join(self.shown[i] for i in ids)


VOCAB = Vocab()


def write_trace(terms, slip=False):
    """[17, 25, 8] -> "17+25=42,42+8=50#50": a running sum, one step per remaining term, then the answer.
    slip=True (the noisy teacher) reports the sum before the last step instead: "...#42"."""
    steps, total = [], terms[0]
    for t in terms[1:]:
        steps.append(f"{total}+{t}={total + t}")
        total += t
    return ",".join(steps) + f"#{total - terms[-1] if slip else total}"


def prompt_text(terms):
    return "+".join(map(str, terms)) + "="


@dataclass
class Split:
    """Problems of one split, encoded. N problems, prompt length P, completion canvas L."""

    terms: list  # N lists of operands
    answers: list  # N strings, the true sums
    prompt_ids: torch.Tensor  # (N, P) left-padded with PAD
    prompt_mask: torch.Tensor  # (N, P) bool, False on padding
    clean: torch.Tensor  # (N, L) correct trace + EOS padding
    noisy: torch.Tensor  # (N, L) slipped trace (wrong final answer) + EOS padding

    def to(self, device):
        return dataclasses.replace(self, **{k: v.to(device) for k, v in vars(self).items() if torch.is_tensor(v)})


def encode_split(problems, prompt_length, canvas, vocab=VOCAB):
    def canvas_ids(text):
        return vocab.encode(text) + [vocab.eos_id] * (canvas - len(text))

    prompts = [vocab.encode(prompt_text(t)) for t in problems]
    return Split(
        terms=problems,
        answers=[str(sum(t)) for t in problems],
        prompt_ids=torch.tensor([[vocab.pad_id] * (prompt_length - len(p)) + p for p in prompts]),
        prompt_mask=torch.tensor([[False] * (prompt_length - len(p)) + [True] * len(p) for p in prompts]),
        clean=torch.tensor([canvas_ids(write_trace(t)) for t in problems]),
        noisy=torch.tensor([canvas_ids(write_trace(t, slip=True)) for t in problems]),
    )


def make_data(cfg, vocab=VOCAB):
    """All (max_operand + 1)^num_terms problems, shuffled by data_seed: (train, heldout)."""
    base, n = cfg.max_operand + 1, cfg.num_terms
    order = torch.randperm(base**n, generator=make_generators(cfg.data_seed, ["data"])["data"]).tolist()
    problems = [[i // base ** (n - 1 - k) % base for k in range(n)] for i in order]
    prompt_length = len(prompt_text([cfg.max_operand] * n))
    heldout = encode_split(problems[: cfg.heldout_size], prompt_length, cfg.max_completion_length, vocab)
    train = encode_split(problems[cfg.heldout_size:], prompt_length, cfg.max_completion_length, vocab)
    return train.to(cfg.device), heldout.to(cfg.device)


def trace_pattern(num_terms):
    step = r"\d+\+\d+=\d+"
    return re.compile(step + ("," + step) * (num_terms - 2) + r"#\d+")


def score(texts, answers, num_terms, format_reward):
    """Rewards (N,) and exact-match flags (N,) of decoded completions against the true answers."""
    pattern = trace_pattern(num_terms)
    correct = [(m := re.search(r"#(\d+)$", t)) is not None and m[1] == a for t, a in zip(texts, answers, strict=True)]
    formed = [pattern.fullmatch(t) is not None for t in texts]
    rewards = [float(c) + format_reward * f for c, f in zip(correct, formed, strict=True)]
    return torch.tensor(rewards), torch.tensor(correct, dtype=torch.float)


def slipped(texts, terms, num_terms):
    """Flags (N,) of completions answering the noisy teacher's slipped sum (when that differs from the true one)."""
    _, slip = score(texts, [str(sum(t[:-1])) for t in terms], num_terms, 0.0)
    _, correct = score(texts, [str(sum(t)) for t in terms], num_terms, 0.0)
    return slip * (1 - correct)


# -----------------------------------------------------------------------------
# Model and SFT


def build_model(cfg, generator, vocab=VOCAB):
    mc = maskgrpo.ModelConfig.tiny(vocab.size, vocab.mask_id, vocab.eos_id, **cfg.model_sizes(),
                                   max_sequence_length=MAX_SEQUENCE_LENGTH)
    return maskgrpo.MaskedDiffusionLM(mc, generator=generator).to(cfg.device)  # initialised on the CPU


SFT_KEYS = ("num_terms", "max_operand", "heldout_size", "answer_slip", "data_seed", "d_model", "n_layers", "n_heads",
            "mlp_hidden_size", "rope_theta", "init_seed", "sft_steps", "sft_batch_size", "sft_learning_rate", "sft_warmup",
            "sft_seed", "max_completion_length", "device")


def sft(cfg, train, progress=True):
    """ELBO training on noisy-teacher traces (a trace's answer slips with prob. answer_slip, drawn
    afresh each time a problem is sampled). Returns (model, list of losses, seconds)."""
    model = build_model(cfg, make_generators(cfg.init_seed, ["init"])["init"])
    gen = make_generators(cfg.sft_seed, ["sft"], cfg.device)["sft"]  # batches, teacher noise, ELBO masks
    N, P = train.prompt_ids.shape
    answer_mask = torch.zeros((cfg.sft_batch_size, P + cfg.max_completion_length), dtype=torch.bool, device=cfg.device)
    answer_mask[:, P:] = True
    attention = torch.cat([train.prompt_mask, torch.ones_like(train.clean, dtype=torch.bool)], 1)

    def batch_loss():
        idx = torch.randint(N, (cfg.sft_batch_size,), generator=gen, device=cfg.device)
        slip = torch.rand(cfg.sft_batch_size, generator=gen, device=cfg.device) < cfg.answer_slip
        completion = torch.where(slip[:, None], train.noisy[idx], train.clean[idx])
        x = torch.cat([train.prompt_ids[idx], completion], 1)  # (B, P + L)
        return maskgrpo.elbo_loss(model, x, answer_mask, generator=gen, attention_mask=attention[idx])

    losses, seconds = train_elbo(model, batch_loss, steps=cfg.sft_steps, learning_rate=cfg.sft_learning_rate,
                                 warmup=cfg.sft_warmup, progress=progress)
    return model, losses, seconds


def load_or_train_sft(cfg, train):
    """The SFT model from the cache out_root/sft-<hash>.pt, training (and caching) it when missing."""
    key = {k: getattr(cfg, k) for k in SFT_KEYS}
    path = os.path.join(cfg.out_root, f"sft-{config_hash(key)}.pt")
    return load_or_train(path, key, build_model(cfg, None), lambda: sft(cfg, train, cfg.progress), "SFT model")


# -----------------------------------------------------------------------------
# Evaluation: greedy decoding, exact match of the final answer


@torch.no_grad()
def evaluate(model, split, cfg, batch_size=256, vocab=VOCAB):
    """Greedy (temperature 0) completions of every problem of the split. Returns dict(acc, reward,
    slip = fraction answering the noisy teacher's slipped sum) and the list of mistakes as
    (problem text, completion text, truth)."""
    g = cfg.grpo()
    fast = dict(cache=g.cache_implementation, threshold=g.confidence_threshold) if cfg.eval_fast_sampler else {}
    texts = []
    for i in range(0, len(split.answers), batch_size):
        seq = maskgrpo.generate_text(model, split.prompt_ids[i:i + batch_size], gen_length=g.max_completion_length,
                                     block_length=g.block_length, steps=g.diffusion_steps, temperature=0.0,
                                     mask_id=vocab.mask_id, attention_mask=split.prompt_mask[i:i + batch_size], **fast)
        texts += [vocab.decode(row) for row in seq[:, split.prompt_ids.shape[1]:].tolist()]
    rewards, correct = score(texts, split.answers, cfg.num_terms, cfg.format_reward)
    slip = slipped(texts, split.terms, cfg.num_terms)
    mistakes = [(prompt_text(t), s, a) for t, s, a, c in zip(split.terms, texts, split.answers, correct, strict=True) if not c]
    return dict(acc=correct.mean().item(), reward=rewards.mean().item(), slip=slip.mean().item()), mistakes


# -----------------------------------------------------------------------------
# MaskGRPO


@torch.no_grad()
def decoding_stats(model, batch):
    """How a rollout batch was decoded, from its trajectory: model forwards, and committed tokens per step
    (a row's canvas over the steps at which it committed anything); and the policy's mean entropy (nats) at
    the completion positions with the whole completion masked, a gauge of overconfidence (one forward)."""
    order = batch.trajectory.sort(1).values  # (N, L) commit steps, ascending
    steps_used = 1 + (order.diff(dim=1) != 0).sum(1).float()  # distinct steps per row
    masked = torch.zeros_like(batch.sequences, dtype=torch.bool)
    masked[:, batch.positions] = True
    logp = model(maskgrpo.apply_mask(batch.sequences, masked, VOCAB.mask_id), batch.attention_mask,
                 positions=batch.positions).log_softmax(-1)  # (N, L, V)
    entropy = -(logp.exp() * logp).sum(-1).mean()
    return dict(rollout_forwards=int(batch.trajectory.max()), rollout_entropy=float(entropy),
                tokens_per_step=float((batch.trajectory.shape[1] / steps_used).mean()))


RESUMABLE_CHANGES = ("grpo_steps", "resume", "show_mistakes", "ckpt_every", "progress")


def grpo(cfg, policy, train, heldout, run_dir, log=print):
    """MaskGRPO from the SFT model (toy.common.grpo_loop). Resumes from run_dir/ckpt.pt when cfg.resume
    and it exists. Returns the list of metric records (train rows every step, eval rows every eval_every)."""
    g = cfg.grpo()
    N = train.prompt_ids.shape[0]

    def rollout(gens):
        # 1. generate: G rollouts per prompt, block semi-AR at temperature tau
        idx = torch.randint(N, (cfg.prompts_per_step,), generator=gens["prompts"], device=cfg.device)
        start = time.perf_counter()
        batch = maskgrpo.rollout_text(policy, train.prompt_ids[idx], train.prompt_mask[idx], g, gens["rollout"])
        seconds = time.perf_counter() - start
        # 2. reward: correct final answer + format bonus
        answers = [train.answers[k] for k in idx.repeat_interleave(g.num_generations).tolist()]
        rewards, correct = score([VOCAB.decode(row) for row in batch.completion.tolist()], answers, cfg.num_terms,
                                 cfg.format_reward)
        acc = correct.mean().item()
        record = dict(train_acc=acc, rollout_seconds=seconds, **decoding_stats(policy, batch))
        return batch, rewards.to(cfg.device), record, dict(acc=f"{acc:.2f}", tok_per_step=f"{record['tokens_per_step']:.1f}")

    def held_out():
        stats, mistakes = evaluate(policy, heldout, cfg)
        record = dict(heldout_acc=stats["acc"], heldout_reward=stats["reward"], heldout_slip=stats["slip"])
        summary = (f"held-out exact match {stats['acc']:.1%}, slipped answers {stats['slip']:.1%}, "
                   f"mean reward {stats['reward']:.3f}")
        return record, summary, [f"  model says {p} -> {said}, truth {truth}" for p, said, truth in mistakes[: cfg.show_mistakes]]

    return grpo_loop(cfg, policy, run_dir, RESUMABLE_CHANGES, rollout, held_out, "heldout_acc", log)


# -----------------------------------------------------------------------------
# Main


def summarize(records, sft_info):
    evals = [r for r in records if "heldout_acc" in r]
    grpo_seconds = records[-1]["time"]
    sft_seconds = sft_info["seconds"]
    return dict(sft_acc=evals[0]["heldout_acc"], final_acc=evals[-1]["heldout_acc"],
                gain=evals[-1]["heldout_acc"] - evals[0]["heldout_acc"], best_acc=max(r["heldout_acc"] for r in evals),
                sft_seconds=sft_seconds, sft_cached=sft_info["cached"], grpo_seconds=grpo_seconds,
                total_seconds=grpo_seconds + sft_seconds, steps=records[-1]["step"])


def main(cfg):
    run_dir = os.path.join(cfg.out_root, cfg.run_name)
    with claim_run(cfg, run_dir, RESUMABLE_CHANGES):  # output folders, the run's lock, its checkpoint: before any work
        threads = set_threads(cfg.threads)
        train, heldout = make_data(cfg)
        print(f"{len(train.answers)} train / {len(heldout.answers)} held-out problems, e.g. "
              f"{prompt_text(train.terms[0])} -> {write_trace(train.terms[0])}; {threads} threads")
        policy, sft_info = load_or_train_sft(cfg, train)
        print(f"model: {sum(p.numel() for p in policy.parameters()) / 1e6:.2f} M parameters")
        records = grpo(cfg, policy, train, heldout, run_dir, log=tqdm.write)
        summary = summarize(records, sft_info)
        write_json(dict(config=dataclasses.asdict(cfg), summary=summary, sft=dict(seconds=sft_info["seconds"],
                   cached=sft_info["cached"], path=sft_info["path"], losses=sft_info["losses"]), records=records),
                   os.path.join(run_dir, "metrics.json"))
        plot_curves(records, os.path.join(run_dir, "curves.png"), ["heldout_acc", "heldout_slip", "reward_mean", "kl"],
                    title=f"arithmetic MaskGRPO ({cfg.run_name})")
    print(f"held-out exact match: SFT {summary['sft_acc']:.1%} -> GRPO {summary['final_acc']:.1%} "
          f"({summary['gain'] * 100:+.1f} points) in {summary['steps']} steps; wall time SFT {summary['sft_seconds']:.0f} s"
          f"{' (cached)' if summary['sft_cached'] else ''} + GRPO {summary['grpo_seconds']:.0f} s; outputs in {run_dir}")
    return summary


if __name__ == "__main__":
    run_cli(main, Config, doc=__doc__.split("\n\n")[0])
