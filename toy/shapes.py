"""Text-to-image on the shapes world: the CPU stand-in for MMaDA + MaskGRPO with GenEval-style rewards.

    python toy/shapes.py                          # tokenizer + SFT (cached), then MaskGRPO; see the summary line
    python toy/shapes.py -h                       # every setting, its default and what it means
    python toy/shapes.py --grpo_steps=20 --run_name=short
    python toy/shapes.py --rollout_mode=maskgit --run_name=maskgit
    python toy/shapes.py --reward=strict_scene --run_name=strict_scene   # extra objects cost reward

A tiny MMaDA-shaped MaskedDiffusionLM learns to draw coloured shapes (toy/shapes_world.py) as 8x8 grids of
FSQ codes (toy/fsq.py), then MaskGRPO improves it against a GenEval-like scorer, as MaskGRPO does for
MMaDA-8B on GenEval:

    1. Tokenizer: an FSQ autoencoder, 32x32 image <-> 64 codes of a 200-entry codebook, trained with the
       latent range penalty that keeps FSQ's tanh from saturating (toy/fsq.py; cached).
    2. SFT with the ELBO loss (maskgrpo.elbo_loss, logits restricted to the code columns) on renders of
       train prompts; with prob. `cond_dropout` the prompt is replaced by padding (the empty prompt), so
       classifier-free guidance works. 1500 steps leave the model at held-out overall ~0.2 (cached).
    3. MaskGRPO (maskgrpo.grpo_step): G images per prompt from the emerge sampler (12 cosine steps,
       CFG), Rev = uniform random re-masking at the rising ratios r_j = gamma + (1 - gamma)(j + 1)/mu,
       gamma = 0.8; reward = the graded scorer (fraction of the prompt's checks an image passes; with
       --reward=strict_scene, times the share of the detected objects the prompt asked for); no KL
       term by default (beta = 0: on seed 0 it reached a higher train reward than beta = 0.01, and no
       reference model has to be scored).
    4. Evaluation: `eval_samples` images for each of the 21 held-out prompts with the rollout sampler and
       a fixed generator; "overall" = GenEval's overall score (mean over the six categories of the
       strict per-image accuracy) +- its standard error over the images; "score" = the mean graded
       reward; "extra" = the fraction of images with an object the prompt did not ask for (which the
       GenEval-style checks, like GenEval's, never penalise). 48 images per prompt: with 16 the standard
       error of one score is ~0.04, as large as the differences the toy is meant to show.

One vocabulary, laid out like MMaDA's (text tokens, then special tokens, then image codes):

    ids 0..20     the 21 words of shapes_world.VOCAB (0 = <pad>)   "a red circle" -> [1, 4, 9, 0, 0, 0, 0, 0]
    ids 21..24    <soi>, <eoi>, <eos>, [MASK]
    ids 25..224   image codes 0..199 (token id = 25 + code)  -> columns = slice(25, 225)

    sequence (74 tokens):  prompt (8, padded)  <soi>  64 image tokens (row-major 8x8)  <eoi>
                           positions = slice(9, 73) is the image; padding is not attended
    unconditional (CFG):   the same with every prompt token <pad>

Outputs in runs/shapes/<run_name>/: metrics.json, curves.png (held-out overall, graded score and extra-object
fraction, mean reward, train accuracy and extra-object fraction, KL
against step and wall time), grid_sft.png and grid_rl.png (rows = held-out prompts, columns = samples,
same generator; each image titled with its graded score, and "+n" when it shows n objects not asked
for), ckpt.pt (model, optimiser, generator states, step, records; rerunning the same command
resumes it exactly). The tokenizer and the SFT model are cached in runs/shapes/fsq-<hash>.pt and
runs/shapes/sft-<hash>.pt.

Measured with the defaults from scratch on the idle 2-core machine (2 threads, 2026-12-03), full-pipeline
seeds 0 / 1 / 2 (--data_seed = --init_seed = --sft_seed = --seed): tokenizer 51-58 s, SFT 504-574 s, GRPO 80
steps 463-476 s with both evaluations (17-18.4 min in all; this machine's speed varies ~1.6x between
days); held-out overall SFT -> GRPO 0.223 -> 0.310 (+0.087), 0.135 -> 0.310 (+0.175), 0.240 -> 0.399
(+0.159), each +- 0.02: +0.140 +- 0.047, so the goal of +0.15 on every seed is not reached.
The README lists other seeds and the variants tried.
"""

import dataclasses
import math
import os
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

import maskgrpo
from toy import fsq
from toy import shapes_world as sw
from toy.common import (
    atomic_write,
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

REWARDS = ("graded", "strict_scene")  # see reward()


@dataclass
class Config:
    # tokenizer (toy/fsq.py; cached by a hash of these settings and the world's)
    fsq_levels: str = "8,5,5"  # FSQ levels per latent channel (codebook = their product)
    fsq_width: int = 48  # conv channels of the autoencoder
    fsq_steps: int = 800  # optimiser steps (99.95% scorer agreement on reconstructions; toy/fsq.py)
    fsq_batch_size: int = 32  # images per step
    fsq_images: int = 8000  # train-split renders the tokenizer is trained on
    # data
    sft_images: int = 20000  # train-split renders (encoded once) that SFT batches are drawn from
    data_seed: int = 0  # renders of the tokenizer and SFT pools
    # model (LLaDA architecture, maskgrpo.ModelConfig)
    d_model: int = 96  # hidden width
    n_layers: int = 3  # transformer blocks
    n_heads: int = 4  # attention heads
    mlp_hidden_size: int = 256  # SwiGLU inner width
    rope_theta: float = 1000.0  # RoPE base (74-token sequences)
    init_seed: int = 0  # parameter initialisation
    # SFT (ELBO loss on the image tokens; cached by a hash of the settings above and these)
    sft_steps: int = 1500  # optimiser steps (held-out overall ~0.2 after them: room left for RL)
    sft_batch_size: int = 64  # sequences per step
    sft_learning_rate: float = 3e-3  # AdamW peak lr (linear warm-up, cosine decay to 10%)
    sft_warmup: int = 30  # warm-up steps
    cond_dropout: float = 0.1  # prob. that a training prompt is replaced by the empty prompt (CFG)
    sft_seed: int = 0  # SFT batches, condition dropout and ELBO masks
    # sampler (rollouts and evaluation)
    rollout_mode: str = "emerge"  # "emerge" (MDLM ancestral) or "maskgit" (confidence ranking)
    diffusion_steps: int = 12  # sampler steps per image
    guidance_scale: float = 3.0  # CFG weight w: (1 + w) cond - w uncond
    temperature: float = 1.0  # sampling temperature of the code logits
    # GRPO (names as maskgrpo.GRPOConfig)
    grpo_steps: int = 80  # rollout batches (each followed by num_iterations updates)
    prompts_per_step: int = 8  # prompts per rollout batch
    num_generations: int = 8  # G, images per prompt
    num_iterations: int = 4  # mu, inner updates per rollout batch, one mask ratio each
    min_mask_rate: float = 0.8  # gamma, truncation of the rising mask-ratio schedule (images: 0.8)
    remasking: str = "random"  # Rev: "random" (uniform, images) or "arlike"
    reward: str = "graded"  # "graded" (GenEval-style checks passed) or "strict_scene" (graded x share of objects asked for)
    epsilon: float = 0.2  # PPO clip range
    beta: float = 0.0  # k3 KL weight against the SFT model (0: no reference model, no KL term)
    learning_rate: float = 1e-4  # AdamW lr (constant)
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping
    loss_type: str = "token"  # "token" or "sequence" normalisation
    scale_rewards: bool = True  # divide advantages by the group std
    micro_batch_size: int = 64  # rows per forward / backward
    seed: int = 0  # prompt sampling, rollouts and GRPO masks
    # evaluation
    eval_samples: int = 48  # images per held-out prompt (21 prompts; ~45 s; standard error of overall ~0.02)
    eval_seed: int = 1234  # the evaluation generator (the same noise before and after RL)
    eval_every: int = 80  # GRPO steps between held-out evaluations (also one before RL and one at the end)
    grid_prompts: int = 6  # held-out prompts in the image grids (one per category)
    grid_samples: int = 8  # samples per prompt in the grids
    # run
    ckpt_every: int = 10  # GRPO steps between checkpoints
    out_root: str = "runs/shapes"  # tokenizer / SFT cache and run folders
    run_name: str = "maskgrpo"  # this run's folder inside out_root
    resume: bool = True  # continue from out_root/run_name/ckpt.pt when it exists
    threads: int = 2  # torch intra-op threads (capped at the cores available)
    progress: bool = True  # tqdm bars

    def __post_init__(self):
        """Every check of the settings, single and cross-field, before any work (the tokenizer) starts."""
        check_finite(self)
        for name in ("fsq_steps", "fsq_batch_size", "fsq_images", "sft_images", "sft_batch_size", "prompts_per_step",
                     "eval_samples", "eval_every", "ckpt_every", "threads", "grid_prompts", "grid_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("sft_steps", "grpo_steps", "sft_warmup", "guidance_scale"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.cond_dropout < 1:
            raise ValueError(f"cond_dropout must be in [0, 1), got {self.cond_dropout}")
        if self.rollout_mode not in ("emerge", "maskgit"):
            raise ValueError(f"rollout_mode must be 'emerge' or 'maskgit', got {self.rollout_mode!r}")
        if self.reward not in REWARDS:
            raise ValueError(f"reward must be one of {', '.join(REWARDS)}, got {self.reward!r}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.sft_learning_rate <= 0:
            raise ValueError(f"sft_learning_rate must be > 0, got {self.sft_learning_rate}")
        if any(level < 2 for level in self.levels()):
            raise ValueError(f"fsq_levels must be integers >= 2, got {self.fsq_levels!r}")
        self.grpo()  # validates the GRPO fields
        layout = Layout(math.prod(self.levels()))  # the model sizes, checked before the tokenizer trains
        maskgrpo.ModelConfig.tiny(layout.vocab_size, layout.mask_id, layout.eos_id, **self.model_sizes(),
                                  max_sequence_length=layout.length)

    def levels(self):
        try:
            return [int(x) for x in self.fsq_levels.split(",")]
        except ValueError:
            raise ValueError(f"fsq_levels must be comma-separated integers, got {self.fsq_levels!r}") from None

    def model_sizes(self):
        return dict(d_model=self.d_model, n_layers=self.n_layers, n_heads=self.n_heads,
                    mlp_hidden_size=self.mlp_hidden_size, rope_theta=self.rope_theta)

    def grpo(self):
        # the text-canvas fields of GRPOConfig are unused by images; keep them consistent with each other
        return subconfig(maskgrpo.GRPOConfig, self, max_completion_length=Layout.image_tokens,
                         block_length=Layout.image_tokens, diffusion_steps=self.diffusion_steps)


# -----------------------------------------------------------------------------
# Layout: one vocabulary of words, special tokens and image codes (MMaDA's order)


class Layout:
    """Token ids and sequence positions. codebook_size = the tokenizer's number of codes."""

    prompt_len = sw.MAX_PROMPT_LEN  # 8 word tokens, padded with <pad>
    image_tokens = 64  # 8x8 codes

    def __init__(self, codebook_size):
        n_words = len(sw.VOCAB)
        self.pad_id = sw.PAD_ID
        self.soi_id, self.eoi_id, self.eos_id, self.mask_id = n_words, n_words + 1, n_words + 2, n_words + 3
        self.code_start = n_words + 4
        self.vocab_size = self.code_start + codebook_size
        self.columns = slice(self.code_start, self.vocab_size)  # logits of image positions: codes only
        self.positions = slice(self.prompt_len + 1, self.prompt_len + 1 + self.image_tokens)
        self.length = self.prompt_len + self.image_tokens + 2

    def sequences(self, prompt_ids, codes=None):
        """(B, 8) prompt ids and (B, 64) codes (None: all [MASK]) -> (B, 74) ids and (B, 74) attention mask."""
        B = prompt_ids.shape[0]
        image = prompt_ids.new_full((B, self.image_tokens), self.mask_id) if codes is None else codes + self.code_start
        x = torch.cat([prompt_ids, prompt_ids.new_full((B, 1), self.soi_id), image, prompt_ids.new_full((B, 1), self.eoi_id)], 1)
        return x, x != self.pad_id

    def unconditional(self, x):
        """The same sequences with the empty prompt (every prompt token <pad>)."""
        u = x.clone()
        u[:, : self.prompt_len] = self.pad_id
        return u, u != self.pad_id

    def codes(self, x):
        return x[:, self.positions] - self.code_start  # (B, 64)


# -----------------------------------------------------------------------------
# Tokenizer and data


def cache_path(cfg, kind, keys):
    """out_root/<kind>-<hash>.pt for the settings `keys`, the world's rendering constants and the tokenizer's
    loss (a cache made for other renders, or from a tokenizer trained without the latent range penalty of
    toy/fsq.py, is never loaded)."""
    world = dict(grid=sw.GRID, sizes=sw.SIZES, gap=sw.GAP)
    key = {k: getattr(cfg, k) for k in keys} | dict(world=world, tokenizer_loss="bce + latent range penalty")
    return os.path.join(cfg.out_root, f"{kind}-{config_hash(key)}.pt"), key


FSQ_KEYS = ("fsq_levels", "fsq_width", "fsq_steps", "fsq_batch_size", "fsq_images", "data_seed")


def load_or_train_tokenizer(cfg, log=print):
    """The FSQ autoencoder from out_root/fsq-<hash>.pt, trained (and cached) on train-split renders when missing."""
    path, key = cache_path(cfg, "fsq", FSQ_KEYS)
    # initialisation seeded by data_seed too (data_seed 0 gives the initialisation cached by earlier versions)
    model = fsq.FSQAutoencoder(cfg.levels(), cfg.fsq_width, generator=torch.Generator().manual_seed(cfg.data_seed))

    def train():
        gens = make_generators(cfg.data_seed, ["fsq_data", "fsq_batches"])
        start = time.perf_counter()
        images = sw.render(sw.sample_specs(cfg.fsq_images, gens["fsq_data"], "train"), gens["fsq_data"])
        losses = fsq.train_tokenizer(model, images, cfg.fsq_steps, gens["fsq_batches"], batch_size=cfg.fsq_batch_size,
                                     progress=cfg.progress)
        return model, losses, time.perf_counter() - start

    tokenizer, info = load_or_train(path, key, model, train, "tokenizer", log)
    return tokenizer.eval(), info


def make_sft_data(cfg, tokenizer, layout):
    """sft_images renders of random train prompts, encoded: (prompt ids (N, 8), codes (N, 64))."""
    g = make_generators(cfg.data_seed, ["sft_data"])["sft_data"]
    specs = sw.sample_specs(cfg.sft_images, g, "train")
    images = sw.render(specs, g)
    codes = torch.cat([tokenizer.encode(x) for x in images.split(1000)])
    return sw.encode_prompts(specs), codes


def decode_images(tokenizer, layout, x):
    """(B, 74) sequences -> (B, 3, 32, 32) images."""
    return torch.cat([tokenizer.decode(c) for c in layout.codes(x).split(1000)])


# -----------------------------------------------------------------------------
# Model and SFT


def build_model(cfg, layout, generator):
    mc = maskgrpo.ModelConfig.tiny(layout.vocab_size, layout.mask_id, layout.eos_id, **cfg.model_sizes(),
                                   max_sequence_length=layout.length)
    return maskgrpo.MaskedDiffusionLM(mc, generator=generator)


SFT_KEYS = FSQ_KEYS + ("sft_images", "d_model", "n_layers", "n_heads", "mlp_hidden_size", "rope_theta", "init_seed",
                       "sft_steps", "sft_batch_size", "sft_learning_rate", "sft_warmup", "cond_dropout", "sft_seed")


def sft(cfg, layout, prompts, codes, progress=True):
    """ELBO training of the image tokens given the prompt (dropped to the empty prompt with prob.
    cond_dropout). Returns (model, list of losses, seconds)."""
    model = build_model(cfg, layout, make_generators(cfg.init_seed, ["init"])["init"])
    gen = make_generators(cfg.sft_seed, ["sft"])["sft"]  # batches, condition dropout, ELBO masks
    answer_mask = torch.zeros((cfg.sft_batch_size, layout.length), dtype=torch.bool)
    answer_mask[:, layout.positions] = True  # only image tokens are ever masked

    def batch_loss():
        idx = torch.randint(len(codes), (cfg.sft_batch_size,), generator=gen)
        drop = torch.rand(cfg.sft_batch_size, generator=gen) < cfg.cond_dropout
        prompt = torch.where(drop[:, None], torch.full_like(prompts[idx], layout.pad_id), prompts[idx])
        x, attention = layout.sequences(prompt, codes[idx])
        return maskgrpo.elbo_loss(model, x, answer_mask, generator=gen, attention_mask=attention, columns=layout.columns)

    losses, seconds = train_elbo(model, batch_loss, steps=cfg.sft_steps, learning_rate=cfg.sft_learning_rate,
                                 warmup=cfg.sft_warmup, progress=progress)
    return model, losses, seconds


def load_or_train_sft(cfg, layout, tokenizer, log=print):
    """The SFT model from out_root/sft-<hash>.pt, training (and caching) it when missing."""
    path, key = cache_path(cfg, "sft", SFT_KEYS)

    def train():
        start = time.perf_counter()
        prompts, codes = make_sft_data(cfg, tokenizer, layout)
        data_seconds = time.perf_counter() - start
        model, losses, seconds = sft(cfg, layout, prompts, codes, cfg.progress)
        return model, losses, data_seconds + seconds

    return load_or_train(path, key, build_model(cfg, layout, None), train, "SFT model", log)


# -----------------------------------------------------------------------------
# Sampling, evaluation, grids


@torch.no_grad()
def sample(model, layout, prompt_ids, cfg, generator, mode=None):
    """Images for (B, 8) prompts with the configured sampler and CFG: (B, 74) sequences."""
    x, attention = layout.sequences(prompt_ids)
    uncond, uncond_attention = layout.unconditional(x)
    return maskgrpo.generate_image(
        model, x, positions=layout.positions, columns=layout.columns, steps=cfg.diffusion_steps,
        mask_id=layout.mask_id, mode=mode or cfg.rollout_mode, guidance_scale=cfg.guidance_scale,
        uncond_ids=uncond, temperature=cfg.temperature, generator=generator, attention_mask=attention,
        uncond_attention_mask=uncond_attention)


def image_completions(layout, x):
    """The rollout batch as maskgrpo's estimator sees it: every image token is scored."""
    N = x.shape[0]
    return maskgrpo.Completions(sequences=x, attention_mask=x != layout.pad_id, positions=layout.positions,
                                scored=torch.ones((N, layout.image_tokens), dtype=torch.bool), columns=layout.columns)


def reward(scored, kind):
    """(B,) RL rewards from sw.score_images's result. "graded": the fraction of the prompt's checks an image
    passes (GenEval-style: extra objects cost nothing). "strict_scene": the same times the share of the
    detected objects the prompt asked for, so "a triangle" drawn beside three squares earns 1/4."""
    if kind == "graded":
        return scored["score"]
    # r = score * (1 - extra / objects), objects >= 1 (an empty image scores 0 anyway)
    return scored["score"] * (1 - scored["extra"] / scored["objects"].clamp(min=1))


def extra_stats(scored):
    """Extra objects on held-out images, averaged over the GenEval categories as the overall score is:
    extra_frac = mean over categories of the fraction of images with an object the prompt did not ask for,
    +- its standard error (as sw.score_images's geneval_se); extra_<category> = that fraction per category;
    clean = mean over categories of the fraction of images that pass every check and show nothing else
    (the overall score with one more check)."""
    has_extra = (scored["extra"] > 0).double()
    clean = scored["strict"].double() * (1 - has_extra)
    rows = {c: [i for i, k in enumerate(scored["categories"]) if k == c] for c in sw.CATEGORIES}
    rows = {c: r for c, r in rows.items() if r}
    extra = {c: has_extra[r] for c, r in rows.items()}
    # SE = sqrt(sum_c s_c^2 / n_c) / K over the K categories present
    var = sum(x.var().item() / len(x) if len(x) > 1 else math.nan for x in extra.values())
    return dict(extra_frac=sum(x.mean().item() for x in extra.values()) / len(extra),
                extra_frac_se=math.sqrt(var) / len(extra),
                clean=sum(clean[r].mean().item() for r in rows.values()) / len(rows)) | {
                    f"extra_{c}": x.mean().item() for c, x in extra.items()}


@torch.no_grad()
def evaluate(model, tokenizer, layout, cfg, mode=None, batch_size=168):
    """eval_samples images for every held-out prompt, from a generator seeded eval_seed.
    Returns dict(overall = GenEval overall (strict), overall_se = its standard error over the images,
    score = mean graded reward, strict = mean strict, extra_stats, per-category accuracy)."""
    specs = [s for s in sw.prompt_set("heldout") for _ in range(cfg.eval_samples)]
    g = torch.Generator().manual_seed(cfg.eval_seed)
    prompts = sw.encode_prompts(specs)
    images = torch.cat([decode_images(tokenizer, layout, sample(model, layout, p, cfg, g, mode))
                        for p in prompts.split(batch_size)])
    result = sw.score_images(images, specs)
    return dict(overall=result["geneval"], overall_se=result["geneval_se"], score=result["score"].mean().item(),
                strict=result["strict"].mean().item()) | extra_stats(result) | {
                    f"acc_{k}": v for k, v in result["category_accuracy"].items()}


def grid_specs(cfg):
    """The first held-out prompt of each category (cycling), grid_prompts of them."""
    by_cat = [sw.prompt_set("heldout", [c]) for c in sw.CATEGORIES]
    return [by_cat[i % len(by_cat)][i // len(by_cat) % len(by_cat[i % len(by_cat)])] for i in range(cfg.grid_prompts)]


@torch.no_grad()
def save_grid(model, tokenizer, layout, cfg, path, title):
    """PNG: rows = held-out prompts, columns = samples; the same generator seed for every call."""
    from matplotlib.figure import Figure

    specs = grid_specs(cfg)
    g = torch.Generator().manual_seed(cfg.eval_seed + 1)
    prompts = sw.encode_prompts([s for s in specs for _ in range(cfg.grid_samples)])
    images = decode_images(tokenizer, layout, sample(model, layout, prompts, cfg, g))
    scored = sw.score_images(images, [s for s in specs for _ in range(cfg.grid_samples)])
    scores, extra = scored["score"], scored["extra"].long()
    rows, cols = len(specs), cfg.grid_samples
    fig = Figure(figsize=(1.1 * cols + 2.2, 1.15 * rows + 0.4))
    axes = fig.subplots(rows, cols, squeeze=False)
    for i in range(rows):
        for j in range(cols):
            ax = axes[i][j]
            ax.imshow(images[i * cols + j].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            k = i * cols + j  # title: graded score, "+n" when n objects were not asked for
            ax.set_title(f"{scores[k]:.2f}" + (f" +{extra[k]}" if extra[k] else ""), fontsize=7, pad=2)
            if j == 0:
                ax.set_ylabel(sw.prompt_text(specs[i]).replace(" and ", "\nand "), fontsize=7, rotation=0,
                              ha="right", va="center")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=90))


# -----------------------------------------------------------------------------
# MaskGRPO


RESUMABLE_CHANGES = ("grpo_steps", "resume", "ckpt_every", "progress", "threads")


def group_diversity(keys, rewards, num_generations):
    """Mean number of distinct keys per group (groups = consecutive runs of num_generations images; a key
    says what an image shows, see shapes_world.scenes) and mean within-group reward std (unbiased)."""
    groups = [keys[i : i + num_generations] for i in range(0, len(keys), num_generations)]
    distinct = sum(len(set(group)) for group in groups) / len(groups)
    return distinct, rewards.view(-1, num_generations).std(1).mean().item()


def grpo(cfg, policy, tokenizer, layout, run_dir, log=print):
    """MaskGRPO from the SFT model (toy.common.grpo_loop). Resumes from run_dir/ckpt.pt when cfg.resume
    and it exists. Returns the list of metric records (train rows every step, eval rows every eval_every)."""
    g = cfg.grpo()

    def rollout(gens):
        # 1. generate: G images per train prompt, emerge (or MaskGIT) sampler with CFG
        specs = sw.sample_specs(cfg.prompts_per_step, gens["prompts"], "train")
        specs = [s for s in specs for _ in range(g.num_generations)]  # groups are consecutive rows
        x = sample(policy, layout, sw.encode_prompts(specs), cfg, gens["rollout"])
        # 2. reward: the graded scorer on the decoded images
        images = decode_images(tokenizer, layout, x)
        scored = sw.score_images(images, specs)
        rewards = reward(scored, cfg.reward)
        distinct, group_std = group_diversity(sw.scenes(images), rewards, g.num_generations)
        record = dict(train_strict=scored["strict"].mean().item(), train_score=scored["score"].mean().item(),
                      train_extra_frac=(scored["extra"] > 0).float().mean().item(), distinct_per_group=distinct,
                      group_reward_std=group_std)
        return image_completions(layout, x), rewards, record, dict(distinct=f"{distinct:.1f}")

    def held_out():
        stats = evaluate(policy, tokenizer, layout, cfg)
        record = dict(heldout_overall=stats["overall"], heldout_overall_se=stats["overall_se"],
                      heldout_score=stats["score"]) | {
                          f"heldout_{k}": v for k, v in stats.items() if k.startswith(("acc_", "extra_")) or k == "clean"}
        summary = (f"held-out overall {stats['overall']:.3f} +- {stats['overall_se']:.3f}, graded score {stats['score']:.3f}, "
                   f"images with extra objects {stats['extra_frac']:.3f}")
        return record, summary, []

    return grpo_loop(cfg, policy, run_dir, RESUMABLE_CHANGES, rollout, held_out, "heldout_overall", log)


# -----------------------------------------------------------------------------
# Main


def summarize(records, setup_seconds):
    evals = [r for r in records if "heldout_overall" in r]
    train = [r for r in records if "reward_mean" in r]
    tail = train[-max(1, len(train) // 5):] if train else []
    mean = lambda key, rows: sum(r[key] for r in rows) / len(rows) if rows else float("nan")
    return dict(sft_overall=evals[0]["heldout_overall"], final_overall=evals[-1]["heldout_overall"],
                gain=evals[-1]["heldout_overall"] - evals[0]["heldout_overall"],
                sft_overall_se=evals[0].get("heldout_overall_se", math.nan),  # absent in runs of older versions
                final_overall_se=evals[-1].get("heldout_overall_se", math.nan),
                sft_score=evals[0]["heldout_score"], final_score=evals[-1]["heldout_score"],
                sft_extra_frac=evals[0].get("heldout_extra_frac", math.nan),  # absent in runs of older versions
                final_extra_frac=evals[-1].get("heldout_extra_frac", math.nan),
                sft_clean=evals[0].get("heldout_clean", math.nan), final_clean=evals[-1].get("heldout_clean", math.nan),
                first_reward=mean("reward_mean", train[: max(1, len(train) // 5)]), last_reward=mean("reward_mean", tail),
                distinct_per_group=mean("distinct_per_group", train), group_reward_std=mean("group_reward_std", train),
                zero_std_frac=mean("zero_std_frac", train), grpo_seconds=records[-1]["time"],
                setup_seconds=setup_seconds, steps=records[-1]["step"])


def main(cfg):
    run_dir = os.path.join(cfg.out_root, cfg.run_name)
    log = tqdm.write
    with claim_run(cfg, run_dir, RESUMABLE_CHANGES):  # output folders, the run's lock, its checkpoint: before any work
        threads = set_threads(cfg.threads)
        start = time.perf_counter()
        tokenizer, fsq_info = load_or_train_tokenizer(cfg, log)
        layout = Layout(tokenizer.codebook_size)
        policy, sft_info = load_or_train_sft(cfg, layout, tokenizer, log)
        setup_seconds = time.perf_counter() - start
        log(f"{threads} threads; vocabulary {layout.vocab_size} ({len(sw.VOCAB)} words, 4 special, "
            f"{tokenizer.codebook_size} codes); model {sum(p.numel() for p in policy.parameters()) / 1e6:.2f} M parameters; "
            f"tokenizer {fsq_info['seconds']:.0f} s{' (cached)' if fsq_info['cached'] else ''}, "
            f"SFT {sft_info['seconds']:.0f} s{' (cached)' if sft_info['cached'] else ''}")
        if not os.path.exists(os.path.join(run_dir, "grid_sft.png")):
            save_grid(policy, tokenizer, layout, cfg, os.path.join(run_dir, "grid_sft.png"), "SFT model (held-out prompts)")
        records = grpo(cfg, policy, tokenizer, layout, run_dir, log=log)
        save_grid(policy, tokenizer, layout, cfg, os.path.join(run_dir, "grid_rl.png"),
                  f"after {records[-1]['step']} MaskGRPO steps ({cfg.rollout_mode} rollouts)")
        summary = summarize(records, setup_seconds)
        write_json(dict(config=dataclasses.asdict(cfg), summary=summary, tokenizer=fsq_info, sft=sft_info, records=records),
                   os.path.join(run_dir, "metrics.json"))
        keys = ["heldout_overall", "heldout_score", "heldout_extra_frac", "reward_mean", "train_strict", "train_extra_frac"]
        keys += ["kl"] if cfg.beta > 0 else []
        plot_curves(records, os.path.join(run_dir, "curves.png"), keys,
                    title=f"shapes MaskGRPO ({cfg.run_name})")
    print(f"held-out overall (GenEval-style): SFT {summary['sft_overall']:.3f} +- {summary['sft_overall_se']:.3f} -> "
          f"GRPO {summary['final_overall']:.3f} +- {summary['final_overall_se']:.3f} ({summary['gain']:+.3f}); "
          f"graded score {summary['sft_score']:.3f} -> {summary['final_score']:.3f}; "
          f"images with extra objects {summary['sft_extra_frac']:.3f} -> {summary['final_extra_frac']:.3f}; "
          f"{summary['steps']} steps; wall time setup {setup_seconds:.0f} s + GRPO {summary['grpo_seconds']:.0f} s; "
          f"outputs in {run_dir}")
    return summary


if __name__ == "__main__":
    run_cli(main, Config, doc=__doc__.split("\n\n")[0])
