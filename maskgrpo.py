"""
MaskGRPO in one file: GRPO for masked discrete diffusion language / image models.

Paper: Ma, Zhang, Wang, Ye, "Consolidating Reinforcement Learning for Multimodal Discrete
Diffusion Models", arXiv 2510.02880 (ICLR 2026). Model: LLaDA (Nie et al., arXiv 2502.09992).
Read top to bottom; every other part of the project imports this file.

    model ──> masked diffusion (forward process, ELBO) ──> samplers (text, image)
          ──> importance estimator (mask ratios, Rev masks, masked log-probs)
          ──> GRPO loss ──> training step (rollout, rewards, advantages, mu updates)

Choices this implementation makes (and where it departs from the paper / official code):
 1. Inner update j trains the whole batch at ratio r_j, each ratio once (the official gradient
    accumulation trains each micro-batch on every other ratio, twice).
 2. Masks come from an explicit torch.Generator and are kept, so old, reference and current policy
    see identical masks and rho == 1 at j = 0 (the official code reseeds the global RNG).
    `shared_masks=False` (an ablation) draws one per policy; the loss covers tokens masked in all.
 3. A text completion ends at its first EOS: only tokens up to it are re-masked and scored; the rest of
    the canvas stays in the input, masked (official: the whole canvas, `score_whole_canvas=True`).
 4. Loss averaged over the batch's masked tokens ("token", official) or per sequence first
    ("sequence", the paper's 1/|o_i|); the paper's 1/t weight is off, as official (`inverse_ratio_weight`).
 5. Rollout Gumbel noise and confidences in float64 (LLaDA's intent; official RL: bf16); logits only for the block decoded.
 6. Images: rollouts may use CFG; loss log-probs are conditional without guidance (as official).
    "maskgit" is MMaDA's t2i_generate schedule (clamped counts, compounded Gumbel scale).
 7. The model takes a key-padding mask and honours it (the official LLaDA copy ignores it).
 8. LoRA is our own few lines; the reference policy is the model with adapters off (PEFT export: scale/).
 9. A group lives on one rank (no cross-rank gather); token counts are summed over ranks, so 1 process
    on 2B rows equals 2 on B rows. Distribution applies only when the world size is > 1.
10. Text candidates are ranked by LLaDA's full-vocabulary confidence, but [MASK] is never proposed,
    so a rollout ends fully unmasked. The ELBO draws t ~ U(1e-3, 1] (LLaDA's eps) to bound 1/t.
11. d1 masks the whole completion (t = 1) and each real prompt token w.p. p_mask_prompt, redrawn per
    inner iteration and shared by old and current policy.
12. KL is computed (and logged) only when beta > 0: with beta = 0 no reference model is needed.
13. Fast rollouts (Fast-dLLM, off by default): a per-block KV cache with stale keys, threshold decoding;
    both move the rollout law off the scored policy. Images get neither (one bidirectional block).
14. Missing rewards (NaN, +-inf, None) carry no loss and their groups' baselines use the finite
    rewards (TRL's nan-aware choice); an update with a non-finite gradient norm is skipped. Both counted.
15. Rev kinds beyond the paper: "trace" replays the recorded decoding order (TraceRL); "official" is
    the official code's ramp as it runs (see remask), which the published text results used.
"""

import math
import numbers
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# -----------------------------------------------------------------------------
# Configs: the model (LLaDA architecture) and MaskGRPO training


def _check_finite(config):
    """Every float (also inside tuples) of a config dataclass is finite: a NaN would surface as NaN weights."""
    for f in fields(config):
        value = getattr(config, f.name)
        for v in value if isinstance(value, tuple) else (value,):
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"{type(config).__name__}.{f.name} must be a finite number, got {value}")


@dataclass
class ModelConfig:
    vocab_size: int  # embedding rows (LLaDA 126464, MMaDA 134656 = 126464 + 8192 image codes)
    d_model: int  # hidden width
    n_layers: int  # transformer blocks
    n_heads: int  # attention heads (LLaDA has no GQA: kv heads == heads)
    mlp_hidden_size: int  # SwiGLU inner width
    mask_token_id: int  # the absorbing token m = [MASK]
    eos_token_id: int  # end of text; also the padding of a fixed completion canvas
    max_sequence_length: int = 4096  # longest input accepted
    rope_theta: float = 500000.0  # RoPE base
    rms_norm_eps: float = 1e-5  # RMSNorm epsilon

    def __post_init__(self):
        _check_finite(self)
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "mlp_hidden_size", "max_sequence_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(f"ModelConfig.d_model={self.d_model} must split into n_heads={self.n_heads} heads of even size")
        for name in ("rope_theta", "rms_norm_eps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be > 0, got {getattr(self, name)}")
        for name in ("mask_token_id", "eos_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)} is outside the vocabulary [0, {self.vocab_size})")
        if self.mask_token_id == self.eos_token_id:
            raise ValueError(f"ModelConfig.mask_token_id and eos_token_id must differ, both are {self.mask_token_id}")

    @classmethod
    def llada_8b(cls):
        """GSAI-ML/LLaDA-8B-Instruct (~8.016e9 parameters)."""
        return cls(vocab_size=126464, d_model=4096, n_layers=32, n_heads=32, mlp_hidden_size=12288,
                   mask_token_id=126336, eos_token_id=126081)

    @classmethod
    def mmada_8b(cls):
        """Gen-Verse/MMaDA-8B-Base: LLaDA blocks, vocabulary extended by 8192 MAGVIT-v2 codes."""
        return replace(cls.llada_8b(), vocab_size=134656)

    @classmethod
    def tiny(cls, vocab_size, mask_token_id, eos_token_id, **overrides):
        """A laptop-sized model of the same architecture (the toys use this). Short toy sequences learn
        positions far faster with a small RoPE base (the arithmetic toy passes rope_theta=100)."""
        sizes = dict(d_model=128, n_layers=4, n_heads=4, mlp_hidden_size=384, max_sequence_length=512)
        return cls(vocab_size=vocab_size, mask_token_id=mask_token_id, eos_token_id=eos_token_id, **(sizes | overrides))


REMASKING = ("arlike", "random", "trace", "official")  # Rev kinds of `remask`
CACHES = ("none", "prefix", "dual")  # KV cache modes of `generate_text`


@dataclass
class GRPOConfig:
    # rollouts (official text setting: LLaDA-8B-Instruct on GSM8K)
    num_generations: int = 6  # G, completions per prompt (a group)
    max_completion_length: int = 256  # L, the text canvas
    block_length: int = 16  # semi-AR block size of the text sampler
    diffusion_steps: int = 128  # sampler steps per completion (an upper bound with confidence_threshold)
    temperature: float = 0.9  # rollout sampling temperature (evaluation uses 0 = greedy)
    cache_implementation: str = "none"  # rollout KV cache: "none" (exact), "prefix" or "dual" (Fast-dLLM, approximate)
    confidence_threshold: float | None = None  # rollout parallel decoding: commit every token above it (None = exact)
    # estimator
    num_iterations: int = 12  # mu, inner updates per rollout batch, one mask ratio each
    min_mask_rate: float = 0.6  # gamma, truncation of the rising ratio schedule (0.8 for images)
    remasking: str = "arlike"  # Rev: "arlike" (text), "random" (images, UniGRPO), "trace" or "official" (see remask)
    estimator: str = "maskgrpo"  # "maskgrpo", or "d1" (diffu-GRPO one-step baseline)
    p_mask_prompt: float = 0.15  # d1 only: prompt masking probability
    shared_masks: bool = True  # old/ref/current scored on the same mask (False: ablation)
    score_whole_canvas: bool = False  # True: score and attend EOS padding too (official behaviour)
    inverse_ratio_weight: bool = False  # weight the loss by 1/r_j (the paper's ELBO term; official: off)
    # loss
    epsilon: float = 0.2  # PPO clip range
    beta: float = 0.01  # KL weight (0 = no reference model needed)
    loss_type: str = "token"  # "token" or "sequence" normalisation
    scale_rewards: bool = True  # divide advantages by the group std
    # optimiser
    learning_rate: float = 3e-6  # AdamW lr (constant)
    adam_betas: tuple = (0.9, 0.99)  # AdamW (beta1, beta2)
    weight_decay: float = 0.1  # AdamW decoupled weight decay
    max_grad_norm: float = 0.2  # gradient clipping (0 = none); a non-finite norm skips the update
    micro_batch_size: int = 8  # rows per forward/backward (gradient accumulation inside one update)

    def __post_init__(self):
        _check_finite(self)
        choices = dict(remasking=REMASKING, estimator=("maskgrpo", "d1"), loss_type=("token", "sequence"),
                       cache_implementation=CACHES)
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"GRPOConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.num_generations < 2:
            raise ValueError(f"GRPOConfig.num_generations must be >= 2 (a group needs a baseline), got {self.num_generations}")
        for name in ("max_completion_length", "block_length", "diffusion_steps", "num_iterations",
                     "micro_batch_size", "epsilon", "learning_rate"):
            if getattr(self, name) <= 0:
                raise ValueError(f"GRPOConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.max_completion_length % self.block_length:
            raise ValueError(f"GRPOConfig.block_length={self.block_length} must divide "
                             f"max_completion_length={self.max_completion_length}")
        blocks = self.max_completion_length // self.block_length
        if self.diffusion_steps % blocks:
            raise ValueError(f"GRPOConfig.diffusion_steps={self.diffusion_steps} must be a multiple of "
                             f"the number of blocks ({blocks})")
        if not 0 <= self.min_mask_rate < 1:
            raise ValueError(f"GRPOConfig.min_mask_rate must be in [0, 1), got {self.min_mask_rate}")
        for name in ("temperature", "beta", "weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise ValueError(f"GRPOConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.p_mask_prompt < 1:
            raise ValueError(f"GRPOConfig.p_mask_prompt must be in [0, 1), got {self.p_mask_prompt}")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"GRPOConfig.adam_betas must be two numbers in [0, 1), got {self.adam_betas}")
        if self.confidence_threshold is not None and not 0 < self.confidence_threshold <= 1:
            raise ValueError(f"GRPOConfig.confidence_threshold must be None or in (0, 1], got {self.confidence_threshold}")


# -----------------------------------------------------------------------------
# Small helpers: argument checks and the distributed world (one process = world size 1)


def _check_positive(**values):
    for name, v in values.items():
        if v <= 0:
            raise ValueError(f"{name} must be > 0, got {v}")


def _config(model):
    return getattr(model, "module", model).config  # DDP wraps the model in .module


def world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def global_sum(x):
    """Sum of a tensor over ranks; itself when there is one process."""
    if world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x


# -----------------------------------------------------------------------------
# Model: the LLaDA transformer (bidirectional, pre-norm, RoPE, SwiGLU, untied head)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # y = x / sqrt(mean(x^2) + eps) * w, computed in fp32
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_tables(length, head_dim, theta, device):
    """cos, sin of shape (L, head_dim) in fp32; inv_freq_i = theta^(-2i/head_dim)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)  # (L, hd/2)
    angles = torch.cat([angles, angles], dim=-1)  # (L, hd)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    # x' = x*cos + rotate_half(x)*sin, rotate_half(x) = (-x2, x1)   (x: (B, H, L, hd))
    x1, x2 = x.float().chunk(2, dim=-1)
    return (x.float() * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, f = cfg.d_model, cfg.mlp_hidden_size
        self.n_heads = cfg.n_heads
        self.attn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.ff_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.ff_out = nn.Linear(f, d, bias=False)

    def forward(self, x, cos, sin, attn_mask, kv=None, span=None, return_kv=False):
        """x (B, S, D): the S positions computed (all T, or `span`); kv: this layer's cached (K, V), each
        (B, H, T, hd), whose span the fresh keys/values replace. Returns (x, (k, v) if return_kv else None)."""
        B, S, D = x.shape
        n = self.attn_norm(x)
        q, k, v = (p(n).view(B, S, self.n_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # (B, H, S, hd)
        keys, values = k, v
        if kv is not None:
            # Fast-dLLM cache: K = [K_cache[:a], k, K_cache[b:]] (same for V), span = [a, b)   (B, H, T, hd)
            keys = torch.cat([kv[0][:, :, : span.start], k, kv[0][:, :, span.stop :]], dim=2)
            values = torch.cat([kv[1][:, :, : span.start], v, kv[1][:, :, span.stop :]], dim=2)
        # bidirectional attention: no causal mask, only key padding
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=attn_mask)  # (B, H, S, hd)
        h = x + self.attn_out(y.transpose(1, 2).reshape(B, S, D))
        m = self.ff_norm(h)
        # SwiGLU: ff_out(silu(ff_proj(m)) * up_proj(m))
        return h + self.ff_out(F.silu(self.ff_proj(m)) * self.up_proj(m)), (k, v) if return_kv else None


class MaskedDiffusionLM(nn.Module):
    """The LLaDA architecture; parameter names equal the HF checkpoint keys, so real weights load 1:1."""

    def __init__(self, config: ModelConfig, generator=None):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False  # recompute each block in backward (saves activations)
        self.model = nn.Module()
        with torch.random.fork_rng(devices=[]):  # layer constructors' default init must not move the global RNG
            self.model.transformer = nn.ModuleDict(dict(
                wte=nn.Embedding(config.vocab_size, config.d_model),
                blocks=nn.ModuleList(Block(config) for _ in range(config.n_layers)),
                ln_f=RMSNorm(config.d_model, config.rms_norm_eps),
                ff_out=nn.Linear(config.d_model, config.vocab_size, bias=False),
            ))
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02, generator=generator)  # no-op on the meta device

    def forward(self, input_ids, attention_mask=None, *, positions=None, columns=None, kv=None, span=None,
                return_kv=False):
        """input_ids (B, T); attention_mask (B, T) bool, False = padding that no token attends to.
        positions: slice of sequence positions and columns: slice of vocabulary entries for which
        logits are computed (an 8B vocabulary makes full logits expensive). Returns fp32 logits (B, P, V').
        KV cache (Fast-dLLM, arXiv 2505.22618): return_kv=True also returns every layer's (K, V); a call with
        that `kv` and a `span` computes only the span, attending to cached keys outside it (exact while
        nothing outside the span has changed)."""
        B, T = input_ids.shape
        if T > self.config.max_sequence_length:
            raise ValueError(f"input length {T} exceeds max_sequence_length={self.config.max_sequence_length}")
        span = slice(*(span or slice(0, T)).indices(T)[:2])
        t = self.model.transformer
        x = t.wte(input_ids[:, span])  # (B, S, D)
        cos, sin = rope_tables(T, self.config.d_model // self.config.n_heads, self.config.rope_theta, x.device)
        cos, sin = cos[span], sin[span]  # the span's RoPE angles, at its absolute positions
        mask = None if attention_mask is None else attention_mask[:, None, None, :].bool()  # (B, 1, 1, T)
        new_kv = []
        for i, block in enumerate(t.blocks):
            args = (x, cos, sin, mask, None if kv is None else kv[i], span, return_kv)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x, layer_kv = checkpoint(block, *args, use_reentrant=False)
            else:
                x, layer_kv = block(*args)
            new_kv.append(layer_kv)
        if positions is not None:
            start, stop, _ = positions.indices(T)
            x = x[:, start - span.start : stop - span.start]  # (B, P, D), positions inside the span
        w = t.ff_out.weight if columns is None else t.ff_out.weight[columns]  # (V', D)
        logits = F.linear(t.ln_f(x), w).float()  # (B, P, V')
        return (logits, new_kv) if return_kv else logits


# -----------------------------------------------------------------------------
# LoRA (Hu et al. 2021): W x + (alpha / r) * B A x, with a switch to turn the adapters off


class LoRALinear(nn.Linear):
    """An nn.Linear (its weight keeps the checkpoint name) plus a low-rank update."""

    def __init__(self, base: nn.Linear, rank, alpha, generator=None):
        super().__init__(base.in_features, base.out_features, bias=False, device="meta")
        self.weight = base.weight
        kw = dict(bias=False, device=base.weight.device, dtype=base.weight.dtype)
        with torch.random.fork_rng(devices=[]):  # the default init is overwritten below, from `generator`
            self.lora_A, self.lora_B = nn.Linear(base.in_features, rank, **kw), nn.Linear(rank, base.out_features, **kw)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.lora_B.weight)  # starts as the identity update
        self.scaling = alpha / rank
        self.enabled = True

    def forward(self, x):
        y = F.linear(x, self.weight)
        return y + self.scaling * self.lora_B(self.lora_A(x)) if self.enabled else y


def add_lora(model, rank=128, alpha=64, targets=("q_proj", "k_proj", "v_proj", "up_proj"), generator=None):
    """Wrap the target projections of every block with LoRA; freeze everything else.
    Official MaskGRPO text setting: r 128, alpha 64 on q, k, v, up."""
    for block in model.model.transformer.blocks:
        for name in targets:
            setattr(block, name, LoRALinear(getattr(block, name), rank, alpha, generator))
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


def has_lora(model):
    return any(isinstance(m, LoRALinear) for m in model.modules())


@contextmanager
def lora_disabled(model):
    """The base model (the GRPO reference policy) while inside the block."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m in layers:
            m.enabled = True


# -----------------------------------------------------------------------------
# Masked diffusion: forward process and the ELBO (LLaDA / MDLM)


def cosine_masked_fraction(tau):
    # k(tau) = cos(pi * tau / 2): fraction still masked at sampling time tau in [0, 1] (images)
    return math.cos(math.pi * tau / 2)


def forward_mask(x0, t, maskable, generator):
    """q(x_t | x_0) with alpha_t = 1 - t: each maskable token becomes [MASK] with prob. t.
    x0 (B, L); t (B,); maskable (B, L) bool. Returns the mask (B, L) bool, True = masked."""
    u = torch.rand(x0.shape, generator=generator, device=x0.device)
    return (u < t[:, None]) & maskable


def apply_mask(x, mask, mask_id):
    return torch.where(mask, torch.full_like(x, mask_id), x)


def token_logps(logits, targets):
    """log pi(target) per position: logits (B, L, V), targets (B, L) -> (B, L)."""
    return torch.gather(logits.log_softmax(-1), -1, targets[..., None]).squeeze(-1)


def elbo_loss(model, input_ids, answer_mask, *, generator, attention_mask=None, columns=None, eps=1e-3):
    """SFT loss, the negative ELBO of LLaDA eq. (3) / MDLM:
    L = E_t [ (1/t) sum_{i masked} -log pi(x0_i | x_t) ] / |answer|, t ~ U(eps, 1].
    answer_mask (B, L) bool marks tokens that may be masked (the prompt never is).
    columns: a vocabulary slice (image codes); targets are then offset by columns.start."""
    B = input_ids.shape[0]
    # t ~ U(eps, 1]   (B,)
    t = eps + (1 - eps) * (1 - torch.rand(B, generator=generator, device=input_ids.device))
    mask = forward_mask(input_ids, t, answer_mask, generator)
    logits = model(apply_mask(input_ids, mask, model.config.mask_token_id), attention_mask, columns=columns)
    targets = input_ids - (columns.start if columns is not None else 0)
    nll = -token_logps(logits, targets.clamp(min=0)) * mask  # (B, L), zero where not masked
    return (nll.sum(1) / t / answer_mask.sum(1).clamp(min=1)).mean()


# -----------------------------------------------------------------------------
# Samplers


def gumbel_argmax(logits, temperature, generator):
    """argmax of exp(l) / (-log u)^tau, u ~ U(0,1) (LLaDA's form) = argmax(l + tau * g), g ~ Gumbel,
    i.e. a draw from softmax(l / tau); in float64. temperature 0 is greedy argmax."""
    if temperature == 0:
        return logits.argmax(-1)
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float64)
    return (logits.double() - temperature * torch.log(-torch.log(u.clamp_min(1e-300)))).argmax(-1)


def transfer_counts(num_masked, steps):
    """Split each row's masked count evenly over the steps, remainder to the early steps.
    num_masked (B,) -> (B, steps)."""
    base, rem = num_masked // steps, num_masked % steps
    return base[:, None] + (torch.arange(steps, device=num_masked.device)[None] < rem[:, None]).long()


def text_candidates(logits, temperature, mask_id, generator):
    """One low-confidence-remasking draw per position of a block: logits (B, Lb, V) float64 -> candidates
    x0 (B, Lb) ~ softmax(l / tau) by Gumbel-max, and confidences softmax(l)[x0] over the full vocabulary
    (as LLaDA's generate()). Unlike LLaDA, [MASK] is never a candidate (it would leave the canvas masked)."""
    candidates = logits.clone()
    candidates[..., mask_id] = -math.inf
    x0 = gumbel_argmax(candidates, temperature, generator)
    return x0, torch.gather(logits.softmax(-1), -1, x0[..., None]).squeeze(-1)


def top_k_commit(conf, masked, k):
    """The k (B,) most confident masked positions of each row: (B, Lb) bool. Ties (a measure-zero event
    at temperature > 0) go to the lower position, as a stable sort."""
    conf = torch.where(masked, conf, -math.inf)
    rank = conf.argsort(dim=1, descending=True, stable=True).argsort(dim=1)  # 0 = most confident
    return (rank < k[:, None]) & masked


def threshold_counts(conf, masked, threshold, scheduled):
    """How many tokens a confidence-threshold step commits (Fast-dLLM parallel decoding): every masked
    token with confidence > threshold, at least one, and at least the exact schedule's count, so that a
    block always ends within its steps (`steps` is an upper bound). conf, masked (B, Lb); scheduled (B,)."""
    above = ((conf > threshold) & masked).sum(1)
    return torch.maximum(above, scheduled).clamp(min=1)


def _check_token_ids(model, **tensors):
    vocab = _config(model).vocab_size
    for name, ids in tensors.items():
        if ids is not None and ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < vocab:
            bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
            raise ValueError(f"{name} holds token id {bad}, outside the model's vocabulary [0, {vocab})")


@torch.no_grad()
def generate_text(model, prompt_ids, *, gen_length, block_length, steps, temperature, mask_id,
                  generator=None, attention_mask=None, cache="none", threshold=None, return_trajectory=False,
                  on_step=None):
    """LLaDA generate (arXiv 2502.09992, Alg. 5, low-confidence remasking), vectorised over rows.
    Canvas = prompt + gen_length masks, decoded block by block left to right; each block gets
    steps * block_length / gen_length steps; each step samples a candidate for every masked
    position of the block and commits the k most confident (text_candidates, top_k_commit).
    Committed tokens never change. prompt_ids (B, P), left-padded with attention_mask (B, P).
    Returns (B, P + gen_length), and with return_trajectory=True also the decoding trajectory
    (B, gen_length): the step (1-based model forward) at which each completion token was committed.
    Fast-dLLM (arXiv 2505.22618): cache="prefix" caches keys/values at each block's first step and
    recomputes the block and what follows, "dual" only the block; threshold=float commits every masked
    token above it (at least the schedule's count; a filled block ends early). cache="none",
    threshold=None is the exact LLaDA sampler. on_step(step, x) sees every canvas."""
    _check_positive(gen_length=gen_length, block_length=block_length, steps=steps)
    if gen_length % block_length:
        raise ValueError(f"block_length={block_length} must divide gen_length={gen_length}")
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError(f"steps={steps} must be a multiple of the number of blocks ({num_blocks})")
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if cache not in CACHES:
        raise ValueError(f"cache must be one of {CACHES}, got {cache!r}")
    if threshold is not None and not 0 < threshold <= 1:
        raise ValueError(f"threshold must be None or in (0, 1], got {threshold}")
    _check_token_ids(model, prompt_ids=prompt_ids, mask_id=torch.tensor([mask_id]))
    B, P = prompt_ids.shape
    x = torch.cat([prompt_ids, prompt_ids.new_full((B, gen_length), mask_id)], dim=1)  # (B, T)
    T = x.shape[1]
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask.bool(), attention_mask.new_ones((B, gen_length), dtype=torch.bool)], 1)
    committed_at = torch.zeros((B, gen_length), dtype=torch.long, device=x.device)  # 0 = not yet
    steps_per_block, step = steps // num_blocks, 0
    for b in range(num_blocks):
        block = slice(P + b * block_length, P + (b + 1) * block_length)
        counts = transfer_counts((x[:, block] == mask_id).sum(1), steps_per_block)  # (B, S)
        kv = None
        for s in range(steps_per_block):
            masked = x[:, block] == mask_id  # (B, Lb)
            if threshold is not None and not masked.any():  # the block was filled early: skip its other steps
                break
            if cache == "none":
                logits = model(x, attention_mask, positions=block)
            elif kv is None:  # refresh at the block boundary: one full forward, cached
                logits, kv = model(x, attention_mask, positions=block, return_kv=True)
            else:
                span = slice(block.start, T) if cache == "prefix" else block
                logits = model(x, attention_mask, positions=block, kv=kv, span=span)
            x0, conf = text_candidates(logits.double(), temperature, mask_id, generator)  # (B, Lb) each
            k = counts[:, s] if threshold is None else threshold_counts(conf, masked, threshold, counts[:, s])
            commit = top_k_commit(conf, masked, k)
            x[:, block] = torch.where(commit, x0, x[:, block])
            step += 1
            committed_at[:, block.start - P : block.stop - P][commit] = step
            if on_step is not None:
                on_step(step, x)
    return (x, committed_at) if return_trajectory else x


def guided_logits(model, x, uncond, guidance_scale, attention_mask, uncond_mask, positions, columns):
    """Classifier-free guidance: (1 + w) * cond - w * uncond; w = 0 is plain conditional logits."""
    if guidance_scale == 0:
        return model(x, attention_mask, positions=positions, columns=columns)
    masks = None
    if attention_mask is not None or uncond_mask is not None:
        ones = torch.ones_like(x, dtype=torch.bool)
        masks = torch.cat([ones if attention_mask is None else attention_mask.bool(),
                           ones if uncond_mask is None else uncond_mask.bool()])
    cond, unc = model(torch.cat([x, uncond]), masks, positions=positions, columns=columns).chunk(2)
    return (1 + guidance_scale) * cond - guidance_scale * unc


def emerge_reveal_prob(step, steps):
    # P(reveal at step s | still masked) = (k_t - k_s) / k_t, k_t = k(s/T), k_s = k((s+1)/T); the last step fills all
    if step == steps - 1:
        return 1.0
    k_t, k_s = cosine_masked_fraction(step / steps), cosine_masked_fraction((step + 1) / steps)
    return (k_t - k_s) / k_t


def maskgit_keep_masked(num_tokens, unknown, step, steps):
    """How many tokens MaskGIT leaves masked after step s of T (MMaDA's t2i_generate, modeling_mmada.py):
    max(1, min(unknown - 1, floor(N * cos(pi/2 * (s+1)/T)))): at least one revealed and one kept per
    step; after the last step MMaDA returns every sampled token, so nothing stays masked. unknown (B,)."""
    if step == steps - 1:
        return torch.zeros_like(unknown)
    scheduled = math.floor(num_tokens * cosine_masked_fraction((step + 1) / steps))
    return (unknown - 1).clamp(max=scheduled).clamp(min=1)


def maskgit_choice_temperature(initial, step, steps):
    # Gumbel noise scale of step s, compounded as MMaDA: tau_s = tau_0 * prod_{i<=s} (1 - (i+1)/T)
    return initial * math.prod(1 - (i + 1) / steps for i in range(step + 1))


@torch.no_grad()
def generate_image(model, input_ids, *, positions, columns, steps, mask_id, mode="emerge",
                   guidance_scale=0.0, uncond_ids=None, temperature=1.0, generator=None,
                   attention_mask=None, uncond_attention_mask=None, choice_temperature=1.0, on_step=None):
    """Fill the [MASK] tokens at `positions` (a slice) with image codes; logits are restricted to the
    vocabulary `columns` (a slice: token id = columns.start + code). Cosine schedule k(tau).
    mode "emerge": the MDLM ancestral sampler; at step s each still-masked token reveals a draw
      from pi with prob. emerge_reveal_prob(s, T); reveal counts are random.
    mode "maskgit" (MMaDA's t2i_generate): sample every masked token, confidence = log p + tau_s * Gumbel
      noise (maskgit_choice_temperature), keep the maskgit_keep_masked(...) least confident masked.
    No Fast-dLLM cache or threshold (choice 13). uncond_ids: the layout with an empty prompt (for CFG)."""
    _check_positive(steps=steps)
    if mode not in ("emerge", "maskgit"):
        raise ValueError(f"mode must be 'emerge' or 'maskgit', got {mode!r}")
    if guidance_scale and (uncond_ids is None or uncond_ids.shape != input_ids.shape):
        raise ValueError("guidance_scale > 0 needs uncond_ids of the same shape as input_ids")
    _check_token_ids(model, input_ids=input_ids, uncond_ids=uncond_ids)
    x = input_ids.clone()
    uncond = None if uncond_ids is None else uncond_ids.clone()
    N = x[:, positions].shape[1]  # image tokens
    for s in range(steps):
        masked = x[:, positions] == mask_id  # (B, N)
        logits = guided_logits(model, x, uncond, guidance_scale, attention_mask, uncond_attention_mask,
                               positions, columns) / max(temperature, 1e-6)
        x0 = gumbel_argmax(logits, 1.0, generator)  # (B, N) a draw from softmax(logits / tau)
        if mode == "emerge":
            u = torch.rand(masked.shape, generator=generator, device=x.device)
            reveal = masked & (u < emerge_reveal_prob(s, steps))
        else:
            logp = torch.gather(logits.log_softmax(-1), -1, x0[..., None]).squeeze(-1).double()
            u = torch.rand(masked.shape, generator=generator, device=x.device, dtype=torch.float64)
            noise = maskgit_choice_temperature(choice_temperature, s, steps) * -torch.log(-torch.log(u.clamp_min(1e-300)))
            conf = torch.where(masked, logp + noise, math.inf)
            keep = maskgit_keep_masked(N, masked.sum(1), s, steps)  # (B,)
            rank = conf.argsort(dim=1, stable=True).argsort(dim=1)  # 0 = least confident
            reveal = masked & (rank >= keep[:, None])
        x[:, positions] = torch.where(reveal, x0 + columns.start, x[:, positions])
        if uncond is not None:
            uncond[:, positions] = x[:, positions]
        if on_step is not None:
            on_step(s + 1, x)
    return x


# -----------------------------------------------------------------------------
# Importance estimation: which tokens are re-masked, and their log-probs under that mask


@dataclass
class Completions:
    """A finished rollout batch as the estimator sees it; N = prompts x G rows, completion length L."""

    sequences: torch.Tensor  # (N, T) prompt + completion, clean token ids
    attention_mask: torch.Tensor  # (N, T) bool: False for prompt padding
    positions: slice  # the completion's columns [start, start + L) of `sequences`
    scored: torch.Tensor  # (N, L) bool: completion tokens that may be masked and carry loss
    columns: slice | None = None  # vocabulary slice for the logits (image codes); None = all
    trajectory: torch.Tensor | None = None  # (N, L) step at which each token was committed (Rev "trace")

    @property
    def completion(self):
        return self.sequences[:, self.positions]  # (N, L)

    def rows(self, idx):
        return replace(self, sequences=self.sequences[idx], attention_mask=self.attention_mask[idx], scored=self.scored[idx],
                       trajectory=None if self.trajectory is None else self.trajectory[idx])


def text_completions(sequences, prompt_mask, eos_id, score_whole_canvas=False, trajectory=None):
    """Wrap generate_text output (and its decoding trajectory, when recorded). By default a completion
    ends at its first EOS (inclusive): later tokens carry no loss (draw_mask keeps them masked).
    score_whole_canvas=True scores the whole canvas (official)."""
    P = prompt_mask.shape[1]
    comp = sequences[:, P:]  # (N, L)
    is_eos = (comp == eos_id).long()
    scored = torch.ones_like(comp, dtype=torch.bool) if score_whole_canvas else (is_eos.cumsum(1) - is_eos) == 0
    attend = torch.ones_like(scored)  # the whole canvas, as the sampler saw it
    return Completions(sequences, torch.cat([prompt_mask.bool(), attend], 1), slice(P, sequences.shape[1]), scored,
                       trajectory=trajectory)


def mask_ratio(iteration, num_iterations, min_mask_rate):
    # r_j = min(gamma + (1 - gamma) * (j + 1) / mu, 0.999), j = 0..mu-1 (MaskGRPO's rising, truncated schedule)
    if not 0 <= iteration < num_iterations:
        raise ValueError(f"iteration={iteration} must be in [0, num_iterations={num_iterations})")
    return min(min_mask_rate + (1 - min_mask_rate) * (iteration + 1) / num_iterations, 0.999)


def remask(completion_ids, ratio, kind, generator, scored=None, *, order=None, prompt_length=0):
    """Rev: re-mask a finished completion to mask level `ratio`. Returns (N, L) bool, True = masked.
    Only `scored` tokens ((N, L) bool, a prefix of each row; default all) are ever masked. "random": iid
    with prob. ratio (UniGRPO; MaskGRPO's image Rev).
    The other kinds mask late tokens more (MaskGRPO's "fading-out" ramp, paper §4.2):
        P(mask) = clamp(1 - 2 (1 - ratio) (1 - f), 0, 1),  f in [0, 1] = how late the token comes,
    so the expected masked fraction is `ratio` for ratio >= 0.5. They differ in what "late" means:
    "arlike": f = n / (L - 1), n = position in the scored answer of L tokens (a proxy for decoding order).
    "trace": f = the token's rank in the sampler's decoding order `order` (N, L) (the commit steps of
      generate_text(return_trajectory=True); ties by position; TraceRL / d2 replay this order).
    "official": the official ramp as it runs (grpo/mask_grpo_train.py, `remask_ar`): prompt_len =
      prompt_index[0].sum() of a 1-D index is 1, so f = (prompt_length - 1 + n) / (prompt_length + L - 2)
      over prompt + canvas; at r = 0.633 it masks ~0.78 of the completion, not 0.63."""
    N, L = completion_ids.shape
    device = completion_ids.device
    if scored is None:
        scored = torch.ones_like(completion_ids, dtype=torch.bool)
    n = torch.arange(L, device=device).float()[None]  # (1, L)
    last = scored.sum(1, keepdim=True).float() - 1  # (N, 1)  L_b - 1
    if kind == "random":
        p = torch.full((N, L), ratio, device=device)
    elif kind in ("arlike", "trace"):
        if kind == "trace":
            if order is None:
                raise ValueError("remask kind 'trace' needs the decoding order: generate_text(..., return_trajectory=True)")
            # n = rank in commit order among the scored tokens (unscored ones sort last; ties by position)
            key = order.masked_fill(~scored, int(order.max()) + 1)
            n = key.argsort(dim=1, stable=True).argsort(dim=1).float()  # (N, L)
        frac = torch.where(last > 0, n / last.clamp(min=1), 0.5)  # n / (L - 1); a 1-token answer sits mid-ramp (p = r)
        p = (1 - 2 * (1 - ratio) * (1 - frac)).clamp(0, 1)
    elif kind == "official":
        frac = (prompt_length - 1 + n) / max(prompt_length + L - 2, 1)  # (1, L)
        p = (1 - 2 * (1 - ratio) * (1 - frac)).clamp(0, 1).expand(N, L)
    else:
        raise ValueError(f"remask kind must be one of {REMASKING}, got {kind!r}")
    return (torch.rand((N, L), generator=generator, device=device) < p) & scored


def draw_mask(batch, cfg, iteration, generator):
    """The mask M_j over whole sequences (N, T) for inner iteration j.
    maskgrpo: Rev of the scored completion at ratio r_j; text after the first EOS always masked,
      the prompt never.
    d1 (diffu-GRPO one-step): the whole completion masked (t = 1), prompt tokens masked w.p. p_mask_prompt."""
    N, T = batch.sequences.shape
    mask = torch.zeros((N, T), dtype=torch.bool, device=batch.sequences.device)
    if cfg.estimator == "d1":
        start = batch.positions.start
        u = torch.rand((N, start), generator=generator, device=mask.device)
        mask[:, :start] = (u < cfg.p_mask_prompt) & batch.attention_mask[:, :start]
        mask[:, batch.positions] = True
    else:
        ratio = mask_ratio(iteration, cfg.num_iterations, cfg.min_mask_rate)
        rev = remask(batch.completion, ratio, cfg.remasking, generator, batch.scored, order=batch.trajectory,
                     prompt_length=batch.positions.start)
        mask[:, batch.positions] = rev | ~batch.scored
    return mask


def masked_logps(model, batch, mask):
    """log pi(o_k | o masked by M) at every completion position in one forward: (N, L).
    Only positions where M is True are meaningful (the caller's loss mask selects them)."""
    x_t = apply_mask(batch.sequences, mask, _config(model).mask_token_id)
    logits = model(x_t, batch.attention_mask, positions=batch.positions, columns=batch.columns)
    offset = batch.columns.start if batch.columns is not None else 0
    return token_logps(logits, batch.completion - offset)


# -----------------------------------------------------------------------------
# GRPO: group advantages and the clipped surrogate with a k3 KL penalty


def group_advantages(rewards, num_generations, scale_rewards=True):
    """A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-4), unbiased std; groups are consecutive rows.
    A non-finite reward (NaN from a failed verifier, +-inf) counts as missing, as TRL's nan-aware means:
    the group's mean and std use its finite rewards, and the missing row gets A = 0. A group with fewer
    than 2 finite rewards, or with all of them equal, has no signal: A = 0 for every row."""
    if rewards.ndim != 1 or rewards.numel() % num_generations:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of num_generations={num_generations}")
    r = rewards.float().view(-1, num_generations)  # (groups, G)
    ok = torch.isfinite(r)
    n = ok.sum(1, keepdim=True)  # finite rewards per group
    mean = torch.where(ok, r, 0).sum(1, keepdim=True) / n.clamp(min=1)
    adv = torch.where(ok, r - mean, 0)
    if scale_rewards:
        adv = adv / ((adv.pow(2).sum(1, keepdim=True) / (n - 1).clamp(min=1)).sqrt() + 1e-4)
    spread = torch.where(ok, r, -math.inf).amax(1, keepdim=True) - torch.where(ok, r, math.inf).amin(1, keepdim=True)
    signal = ok & (n >= 2) & (spread > 0)  # all-equal groups give exactly 0, not rounding noise
    return torch.where(signal, adv, 0).view(-1)


def grpo_loss(logps, old_logps, ref_logps, advantages, loss_mask, *, epsilon, beta, loss_type="token"):
    """Per masked token k of row i:
        rho = exp(logp - logp_old)
        l = -min(rho * A_i, clip(rho, 1 - eps, 1 + eps) * A_i) + beta * k3,
        k3 = exp(ref - logp) - (ref - logp) - 1   (Schulman's unbiased, non-negative KL estimator).
    "token": mean over all masked tokens; "sequence": mean over rows of each row's masked-token mean.
    logps, old_logps, ref_logps, loss_mask: (N, L); advantages (N,). Returns (loss, stats)."""
    if loss_type not in ("token", "sequence"):
        raise ValueError(f"loss_type must be 'token' or 'sequence', got {loss_type!r}")
    if beta > 0 and ref_logps is None:
        raise ValueError("beta > 0 needs ref_logps")
    m = loss_mask.float()
    A = advantages[:, None]  # (N, 1)
    rho = torch.exp(logps - old_logps)  # (N, L)
    per_token = -torch.min(rho * A, rho.clamp(1 - epsilon, 1 + epsilon) * A)
    kl = torch.zeros_like(logps)
    if beta > 0:
        kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        per_token = per_token + beta * kl
    if loss_type == "token":
        loss = (per_token * m).sum() / m.sum().clamp(min=1)
    else:
        loss = ((per_token * m).sum(1) / m.sum(1).clamp(min=1)).mean()
    with torch.no_grad():
        n = m.sum().clamp(min=1)
        clipped = ((rho < 1 - epsilon) & (A < 0)) | ((rho > 1 + epsilon) & (A > 0))
        stats = dict(clip_frac=(clipped * m).sum() / n, kl=(kl * m).sum() / n, ratio_mean=(rho * m).sum() / n,
                     ratio_max=torch.where(loss_mask, rho, 0).max() if loss_mask.any() else rho.new_tensor(1.0))
    return loss, stats


# -----------------------------------------------------------------------------
# Training step: rollout -> rewards -> advantages -> old/ref log-probs -> mu updates


def make_optimizer(model, cfg):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.learning_rate, betas=cfg.adam_betas, weight_decay=cfg.weight_decay)


@torch.no_grad()
def rollout_text(model, prompt_ids, prompt_mask, cfg, generator):
    """G completions per prompt (rows of a group are consecutive) -> Completions, with the decoding
    trajectory. The sampler options come from cfg (cache_implementation, confidence_threshold)."""
    mc, G = _config(model), cfg.num_generations
    prompt_mask = prompt_mask.repeat_interleave(G, 0)
    seq, trajectory = generate_text(
        model, prompt_ids.repeat_interleave(G, 0), gen_length=cfg.max_completion_length, block_length=cfg.block_length,
        steps=cfg.diffusion_steps, temperature=cfg.temperature, mask_id=mc.mask_token_id, generator=generator,
        attention_mask=prompt_mask, cache=cfg.cache_implementation, threshold=cfg.confidence_threshold,
        return_trajectory=True)
    return text_completions(seq, prompt_mask, mc.eos_token_id, cfg.score_whole_canvas, trajectory)


@torch.no_grad()
def _score_all(model, batch, mask, micro_batch_size):
    """masked_logps over the whole batch in micro-batches, without gradients: (N, L)."""
    return torch.cat([masked_logps(model, batch.rows(i), mask[i])
                      for i in torch.arange(len(mask)).split(micro_batch_size)])


def _units(loss_mask, loss_type):
    """What the loss is averaged over: masked tokens ("token") or rows ("sequence")."""
    return loss_mask.sum().float() if loss_type == "token" else loss_mask.new_tensor(loss_mask.shape[0], dtype=torch.float)


def as_rewards(rewards, n, device=None):
    """Rewards as a float tensor (n,): a tensor, or a list of numbers in which None marks a missing
    reward (a verifier that failed). Anything else is refused here, before any work."""
    if not torch.is_tensor(rewards):
        rewards = list(rewards)
        for i, r in enumerate(rewards):
            if r is not None and (isinstance(r, bool) or not isinstance(r, numbers.Real)):
                raise TypeError(f"rewards[{i}] = {r!r} is not a number (None marks a missing reward)")
        rewards = torch.tensor([math.nan if r is None else float(r) for r in rewards])
    if rewards.shape != (n,):
        raise ValueError(f"rewards must have shape ({n},), one per completion, got {tuple(rewards.shape)}")
    if rewards.dtype == torch.bool or rewards.is_complex():
        raise TypeError(f"rewards must be real numbers, got a {rewards.dtype} tensor")
    return rewards.to(device=device, dtype=torch.float32)


def _update(policy, optimizer, batch, mask, old, ref, adv, loss_mask, cfg, weight):
    """One optimiser update on one mask: micro-batched forward/backward, clip, step. Returns stats.
    Skipped (nothing applied, skipped_updates = 1) when no token carries loss on any rank, or when the
    gradient norm is not finite: a NaN never reaches the weights."""
    stats = dict(loss=0.0, clip_frac=0.0, kl=0.0, ratio_mean=0.0, ratio_max=0.0, masked_tokens=0, grad_norm=0.0,
                 skipped_updates=1)
    if int(global_sum(loss_mask.sum())) == 0:  # the same decision on every rank: no collective is left unmatched
        return stats
    # every micro-batch is normalised by the global count, x world because FSDP/DDP average gradients
    n_total = global_sum(_units(loss_mask, cfg.loss_type)).clamp(min=1)
    optimizer.zero_grad(set_to_none=True)
    sums, tokens, ratio_max = dict(loss=0.0, clip_frac=0.0, kl=0.0, ratio_mean=0.0), 0, 0.0
    for i in torch.arange(len(mask)).split(cfg.micro_batch_size):
        logps = masked_logps(policy, batch.rows(i), mask[i])
        loss, step_stats = grpo_loss(logps, old[i], None if ref is None else ref[i], adv[i], loss_mask[i],
                                     epsilon=cfg.epsilon, beta=cfg.beta, loss_type=cfg.loss_type)
        share = _units(loss_mask[i], cfg.loss_type) / n_total
        (loss * share * world_size() * weight).backward()
        n = int(loss_mask[i].sum())
        sums["loss"] += float(loss.detach() * share)
        for k in ("clip_frac", "kl", "ratio_mean"):
            sums[k] += float(step_stats[k]) * n
        tokens, ratio_max = tokens + n, max(ratio_max, float(step_stats["ratio_max"]))
    params = [p for p in policy.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or math.inf)
    grad_norm = float(getattr(grad_norm, "full_tensor", lambda: grad_norm)())  # the global norm, as every rank sees it
    skipped = not math.isfinite(grad_norm)
    if skipped:
        optimizer.zero_grad(set_to_none=True)
    else:
        optimizer.step()
    out = {k: v / max(tokens, 1) for k, v in sums.items() if k != "loss"}
    return out | dict(loss=sums["loss"], ratio_max=ratio_max, masked_tokens=tokens, grad_norm=grad_norm,
                      skipped_updates=int(skipped))


def grpo_step(policy, optimizer, batch, rewards, cfg, generator, reference=None):
    """One MaskGRPO step on a finished rollout batch: mu optimiser updates, update j on mask M_j
    at ratio r_j for the whole batch. rewards: (N,) tensor or list; a non-finite or None reward is missing
    (no loss for its row; its group's baseline uses the others: group_advantages).
    reference: a frozen copy of the initial policy; None uses the policy with LoRA adapters off (or nothing
    when beta = 0). Returns a dict of float stats averaged over the mu updates (ratio_max: the maximum;
    skipped_updates, nonfinite_rewards: counts); with several ranks `loss` is this rank's share."""
    N = batch.sequences.shape[0]
    rewards = as_rewards(rewards, N, batch.sequences.device)
    if cfg.beta > 0 and reference is None and not has_lora(policy):
        raise ValueError("beta > 0 needs a reference model (a frozen copy) or LoRA adapters on the policy")
    finite = torch.isfinite(rewards)  # (N,)
    adv = group_advantages(rewards, cfg.num_generations, cfg.scale_rewards)  # (N,)
    mu, P = cfg.num_iterations, batch.positions
    masks = [draw_mask(batch, cfg, j, generator) for j in range(mu)]  # M_j, (N, T) each
    masks_old = masks if cfg.shared_masks else [draw_mask(batch, cfg, j, generator) for j in range(mu)]
    masks_ref = masks if cfg.shared_masks else [draw_mask(batch, cfg, j, generator) for j in range(mu)]
    old = [_score_all(policy, batch, m, cfg.micro_batch_size) for m in masks_old]  # (N, L) each
    ref = [None] * mu
    if cfg.beta > 0:
        with lora_disabled(policy) if reference is None else nullcontext(reference) as ref_model:
            ref = [_score_all(ref_model, batch, m, cfg.micro_batch_size) for m in masks_ref]
    history = []
    for j in range(mu):
        # tokens carrying loss: masked by M_j (by every policy's mask when masks are not shared), in rows with a reward
        loss_mask = masks[j][:, P] & masks_old[j][:, P] & batch.scored & finite[:, None]
        if cfg.beta > 0:
            loss_mask &= masks_ref[j][:, P]
        # the paper's ELBO weight 1/t, t = r_j (the d1 estimator masks everything: t = 1)
        weight = 1.0
        if cfg.inverse_ratio_weight and cfg.estimator == "maskgrpo":
            weight = 1 / mask_ratio(j, mu, cfg.min_mask_rate)
        history.append(_update(policy, optimizer, batch, masks[j], old[j], ref[j], adv, loss_mask, cfg, weight))
    out = {k: sum(h[k] for h in history) / mu for k in history[0]}
    r = rewards[finite]
    return out | dict(ratio_max=max(h["ratio_max"] for h in history), skipped_updates=sum(h["skipped_updates"] for h in history),
                      reward_mean=float(r.mean()) if len(r) else math.nan, reward_std=float(r.std()) if len(r) > 1 else 0.0,
                      zero_std_frac=float((adv.view(-1, cfg.num_generations) == 0).all(1).float().mean()),
                      nonfinite_rewards=int((~finite).sum()))
