"""A tiny image tokenizer: conv autoencoder + finite scalar quantisation (FSQ).

MMaDA generates images as discrete tokens of a MAGVIT-v2 tokenizer; this is the 32x32 stand-in. The
encoder maps a (3, 32, 32) image to an 8x8 grid of D = len(levels) channels; FSQ (Mentzer et al. 2023,
arXiv 2309.15505, Sec. 3) quantises each channel to a few levels and the level tuple, read as a
mixed-radix number, is the token id. 32x32 image -> 64 tokens from a codebook of prod(levels) ids.

FSQ, per channel i with L_i levels (paper Sec. 3 and its reference code):

    bound:     z_i -> (1 - eps)(L_i - 1)/2 * tanh(z_i + shift_i) - offset_i   (offset 0.5 for even L_i, so
               the integer grid is {-L_i/2, ..., L_i/2 - 1}; shift = atanh(offset / half-range) maps 0 to 0)
    quantise:  zhat_i = round(bound(z_i)), with the straight-through estimator round(x) = x + sg(round(x) - x)
    normalise: zhat_i / (L_i // 2), in [-1, 1]
    code id:   sum_i digit_i * prod_{j<i} L_j,  with digit_i = zhat_i + L_i // 2 in {0, ..., L_i - 1}

There is no codebook to learn and no commitment loss, but FSQ can still collapse: the bound is a tanh of
the unconstrained encoder output z, and once an encoder drifts to |z| of tens to hundreds its tanh
saturates, the straight-through gradient through it vanishes and the codes freeze. With reconstruction
as the only loss this happened to 2 of 8 data seeds of the shapes toy's settings (all 64 tokens of every
image one code, the loss stuck at the all-background value ~0.14), and a third stalled for 150 steps. So
training adds a latent range penalty, lambda * mean(relu(|z| - c)^2) with lambda = 0.1 and c = 2: it is
zero while tanh still moves (every level of an L <= 16 channel is reached at |z| < 2) and pulls
saturated latents back. With it the same 8 seeds all train (reconstruction loss after 300 steps
0.004-0.023 instead of 0.019-0.142), and faster. (The 8-seed figures are from a scratch sweep, not
committed, calling train_tokenizer as toy/shapes.py does; the collapse itself shows in the progress bar
of `python toy/shapes.py --data_seed=2` on the code before the penalty, commit 70f621e.) train_tokenizer shows the fraction of codes used in
recent batches.

Train and measure agreement of the shapes-world scorer on reconstructions of held-out renders:

    .venv/bin/python -m toy.fsq                      # defaults: 800 steps x 32 images, 2 threads
    .venv/bin/python -m toy.fsq --threads=1 --out=runs/fsq.pt

Measured on the grid-aligned world (toy/shapes_world.py: 8x8-pixel objects on a 4-pixel grid) with the
shapes toy's settings (`--steps=800 --train_images=8000 --threads=1`, 99 s on one core beside another
job): on 2000 held-out renders the scorer's strict verdict on the reconstruction equals its verdict on
the ground truth for 99.95% of images (checks: shape 1.000, colour 1.000, count 0.997, position 1.000);
104 of the 200 codes in use. Without the latent range penalty, 1500 steps gave 99.15% and 600 steps
97.25%. On a busy machine use --threads=1: two threads sharing one free core ran 4-15x slower per step.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

# ----------------------------------------------------------------------------- FSQ


class FSQ(nn.Module):
    """Finite scalar quantisation over the last dimension (Mentzer et al. 2023, Sec. 3)."""

    def __init__(self, levels: Sequence[int]):
        super().__init__()
        if len(levels) == 0 or any(int(L) < 2 for L in levels):
            raise ValueError(f"levels: expected a non-empty sequence of integers >= 2, got {tuple(levels)!r}")
        L = torch.tensor([int(x) for x in levels], dtype=torch.long)
        self.register_buffer("levels", L, persistent=False)  # (D,)
        self.register_buffer("basis", torch.cumprod(torch.cat([L.new_ones(1), L[:-1]]), 0), persistent=False)  # (D,)
        self.register_buffer("half_width", L // 2, persistent=False)  # (D,)
        self.dim = len(levels)
        self.codebook_size = int(L.prod())

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., D) in the open interval whose rounding gives exactly L_i integer levels."""
        eps = 1e-3
        L = self.levels.to(z.dtype)
        half_l = (L - 1) * (1 - eps) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0).to(z.dtype)
        shift = torch.atanh(offset / half_l)
        return torch.tanh(z + shift) * half_l - offset

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Quantise with a straight-through gradient: (..., D) -> (..., D) values on the normalised grid."""
        b = self.bound(z)
        # round(x) = x + sg(round(x) - x): forward rounds, backward is the identity
        zhat = b + (b.round() - b).detach()
        return zhat / self.half_width.to(z.dtype)

    def codes_from_levels(self, zhat: torch.Tensor) -> torch.Tensor:
        """(..., D) normalised grid values -> (...,) long code ids in [0, codebook_size)."""
        digits = (zhat * self.half_width + self.half_width).round().long()  # (..., D) in [0, L_i)
        return (digits * self.basis).sum(-1)

    def levels_from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """(...,) long code ids -> (..., D) float normalised grid values; inverse of codes_from_levels."""
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            got = f"[{int(codes.min())}, {int(codes.max())}]"
            raise ValueError(f"codes: expected ids in [0, {self.codebook_size}), got range {got}")
        digits = (codes.long()[..., None] // self.basis) % self.levels  # (..., D)
        return (digits - self.half_width).float() / self.half_width


# ----------------------------------------------------------------------------- autoencoder


class ResBlock(nn.Module):
    """x + conv3x3(silu(conv3x3(silu(x)))), width channels in and out."""

    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


class FSQAutoencoder(nn.Module):
    """32x32 RGB image <-> 8x8 grid of FSQ codes (64 tokens, codebook_size = prod(levels)).

    Encoder: 4x4 patches (pixel unshuffle, (B, 48, 8, 8)) -> 1x1 conv -> res block -> 1x1 conv to D channels
    -> FSQ, so each token is one 4x4 patch, seen with its neighbours. Decoder: 3x3 conv -> two res blocks at
    8x8, then two x2 pixel-shuffle upsamplings with a 3x3 conv at 16x16 and at 32x32 -> RGB logits.
    Nearly all compute is at 8x8 (about 10M multiply-adds per image). Weights are initialised from
    `generator` (default: a fresh generator seeded 0), never from the global RNG.
    """

    def __init__(
        self,
        levels: Sequence[int] = (8, 5, 5),
        width: int = 48,
        image_size: int = 32,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"image_size: expected a multiple of 4, got {image_size}")
        if width < 1:
            raise ValueError(f"width: expected a positive channel count, got {width}")
        self.fsq = FSQ(levels)
        self.codebook_size = self.fsq.codebook_size
        self.image_size = image_size
        self.grid = image_size // 4
        D, w, w16, w32 = self.fsq.dim, width, max(1, width // 2), max(1, width // 6)
        self.encoder = nn.Sequential(
            nn.PixelUnshuffle(4),  # (B, 3, 32, 32) -> (B, 48, 8, 8)
            nn.Conv2d(48, w, 1),
            ResBlock(w),
            nn.SiLU(),
            nn.Conv2d(w, D, 1),  # (B, D, 8, 8)
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(D, w, 3, padding=1),  # (B, w, 8, 8)
            ResBlock(w),
            ResBlock(w),
            nn.SiLU(),
            nn.Conv2d(w, 4 * w16, 1),
            nn.PixelShuffle(2),  # (B, w16, 16, 16)
            nn.SiLU(),
            nn.Conv2d(w16, w16, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(w16, 4 * w32, 1),
            nn.PixelShuffle(2),  # (B, w32, 32, 32)
            nn.SiLU(),
            nn.Conv2d(w32, 3, 3, padding=1),  # (B, 3, 32, 32) logits
        )
        self._init_weights(generator if generator is not None else torch.Generator().manual_seed(0))

    @torch.no_grad()
    def _init_weights(self, generator: torch.Generator) -> None:
        """PyTorch's default conv init (kaiming-uniform a=sqrt(5), bias U(+-1/sqrt(fan_in))), from `generator`."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
                nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=generator)
                fan_in = m.weight.shape[1] * m.weight[0, 0].numel()
                bound = 1 / math.sqrt(fan_in)
                m.bias.copy_((torch.rand(m.bias.shape, generator=generator) * 2 - 1) * bound)

    def _check_images(self, images: torch.Tensor) -> None:
        want = (3, self.image_size, self.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != want:
            raise ValueError(f"images: expected shape (B, {', '.join(map(str, want))}), got {tuple(images.shape)}")

    def latents(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, g, g, D) encoder outputs z, before FSQ's bound."""
        self._check_images(images)
        return self.encoder(images * 2 - 1).permute(0, 2, 3, 1)

    def decode_latents(self, zhat: torch.Tensor) -> torch.Tensor:
        """(B, g, g, D) grid values -> (B, 3, H, W) logits."""
        return self.decoder(zhat.permute(0, 3, 1, 2))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> (reconstruction logits (B, 3, H, W), codes (B, g*g), latents z (B, g, g, D))."""
        z = self.latents(images)  # (B, g, g, D)
        zhat = self.fsq(z)  # (B, g, g, D), straight-through gradient
        codes = self.fsq.codes_from_levels(zhat.detach()).flatten(1)  # (B, g*g)
        return self.decode_latents(zhat), codes, z

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images in [0, 1] -> (B, g*g) long codes, row-major over the grid."""
        return self.fsq.codes_from_levels(self.fsq(self.latents(images))).flatten(1)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, g*g) long codes -> (B, 3, H, W) images in [0, 1]."""
        if codes.dim() != 2 or codes.shape[1] != self.grid**2:
            raise ValueError(f"codes: expected shape (B, {self.grid**2}), got {tuple(codes.shape)}")
        zhat = self.fsq.levels_from_codes(codes).view(codes.shape[0], self.grid, self.grid, self.fsq.dim)
        return torch.sigmoid(self.decode_latents(zhat))


# ----------------------------------------------------------------------------- training


def train_tokenizer(
    model: FSQAutoencoder,
    data: torch.Tensor | Callable[[int, torch.Generator], torch.Tensor],
    steps: int,
    generator: torch.Generator,
    *,
    batch_size: int = 32,
    lr: float = 5e-3,
    warmup: int = 50,
    grad_clip: float = 1.0,
    latent_penalty: float = 0.1,
    latent_limit: float = 2.0,
    usage_window: int = 20,
    progress: bool = True,
) -> list[float]:
    """Train `model` to reconstruct images; returns the per-step reconstruction losses and leaves the model
    in eval mode.

    data: an (N, 3, H, W) tensor in [0, 1] to draw batches from, or a function (batch_size, generator) ->
    (batch_size, 3, H, W) images. Batches are drawn with `generator`. Loss: per-pixel binary cross-entropy
    of the decoder's logits against the image (targets are mostly exact 0/1, so BCE keeps edges sharp),
    plus the latent range penalty (module docstring). AdamW; lr: linear warm-up over `warmup` steps, then
    cosine decay to 10%; gradient norm clipped to `grad_clip`. The bar shows the loss and the fraction of
    the codebook used by the last `usage_window` batches.
    """
    if steps < 1:
        raise ValueError(f"steps: expected a positive number of steps, got {steps}")
    if batch_size < 1:
        raise ValueError(f"batch_size: expected a positive batch size, got {batch_size}")
    if latent_penalty < 0 or latent_limit <= 0:
        raise ValueError(f"latent_penalty, latent_limit: expected >= 0 and > 0, got {latent_penalty}, {latent_limit}")
    if isinstance(data, torch.Tensor):
        model._check_images(data)
        pool = data
        draw = lambda n, g: pool[torch.randint(len(pool), (n,), generator=g)]
    elif callable(data):
        draw = data
    else:
        raise ValueError(f"data: expected an image tensor or a callable, got {type(data).__name__}")

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    lr_at = lambda s: lr * min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps)))
    recent_codes: deque[torch.Tensor] = deque(maxlen=usage_window)
    losses: list[float] = []
    model.train()
    bar = tqdm(range(steps), desc="tokenizer", disable=not progress, leave=False)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        images = draw(batch_size, generator)  # (B, 3, H, W)
        logits, codes, z = model(images)  # (B, 3, H, W), (B, g*g), (B, g, g, D)
        reconstruction = F.binary_cross_entropy_with_logits(logits, images)
        # latent range penalty: lambda * mean(relu(|z| - c)^2), zero while tanh(z) still moves
        out_of_range = F.relu(z.abs() - latent_limit).pow(2).mean()
        loss = reconstruction + latent_penalty * out_of_range
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        losses.append(reconstruction.item())
        recent_codes.append(codes.flatten())
        if step % 10 == 0 or step == steps - 1:
            usage = torch.unique(torch.cat(list(recent_codes))).numel() / model.codebook_size
            bar.set_postfix(loss=f"{reconstruction.item():.4f}", usage=f"{usage:.2f}")
    model.eval()
    return losses


def load_tokenizer(path: str) -> FSQAutoencoder:
    """An eval-mode FSQAutoencoder from a checkpoint written by `python -m toy.fsq --out=PATH`."""
    from toy.common import load_checkpoint

    ckpt = load_checkpoint(path)
    model = FSQAutoencoder(ckpt["levels"], ckpt["width"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


@torch.no_grad()
def reconstruct(model: FSQAutoencoder, images: torch.Tensor, chunk: int = 500) -> torch.Tensor:
    """decode(encode(images)) in chunks: (B, 3, H, W) -> (B, 3, H, W)."""
    return torch.cat([model.decode(model.encode(x)) for x in images.split(chunk)])


# ----------------------------------------------------------------------------- measurement


@dataclass
class Config:
    # tokenizer
    levels: str = "8,5,5"  # FSQ levels per latent channel, comma-separated (codebook = their product)
    width: int = 48  # conv channels at the 8x8 grid
    init_seed: int = 0  # weight initialisation
    # training
    steps: int = 800  # optimiser steps
    batch_size: int = 32  # images per step
    learning_rate: float = 5e-3  # AdamW peak lr (linear warm-up, cosine decay to 10%)
    train_images: int = 20000  # train-split renders that batches are drawn from
    seed: int = 0  # renders and batches
    threads: int = 2  # torch intra-op threads
    # evaluation
    eval_images: int = 2000  # held-out renders whose reconstructions are scored
    out: str = ""  # save {"state_dict", "levels", "width"} here if set


def main(cfg: Config) -> dict:
    """Train on train-split renders, then score reconstructions of held-out renders with the shapes-world
    scorer; agreement = fraction of images whose strict verdict is the same on the reconstruction as on the
    ground truth (which scores 1.0)."""
    from toy import shapes_world as sw
    from toy.common import make_generators, save_checkpoint, set_threads

    threads = set_threads(cfg.threads)
    levels = [int(x) for x in cfg.levels.split(",")]
    gens = make_generators(cfg.seed, ["data", "batches", "eval"])
    model = FSQAutoencoder(levels, cfg.width, generator=torch.Generator().manual_seed(cfg.init_seed))
    t0 = time.perf_counter()
    train = sw.render(sw.sample_specs(cfg.train_images, gens["data"], "train"), gens["data"])
    t_render = time.perf_counter() - t0
    losses = train_tokenizer(model, train, cfg.steps, gens["batches"], batch_size=cfg.batch_size, lr=cfg.learning_rate)
    t_train = time.perf_counter() - t0 - t_render

    specs = sw.sample_specs(cfg.eval_images, gens["eval"], "heldout")
    truth = sw.render(specs, gens["eval"])
    recon = reconstruct(model, truth)
    s_true, s_recon = sw.score_images(truth, specs), sw.score_images(recon, specs)
    result = {
        "codebook_size": model.codebook_size,
        "train_seconds": t_train,
        "render_seconds": t_render,
        "threads": threads,
        "final_loss": sum(losses[-50:]) / len(losses[-50:]),
        "recon_mse": F.mse_loss(recon, truth).item(),
        "codes_used": model.encode(truth).unique().numel(),
        "truth_strict": s_true["strict"].mean().item(),
        "recon_strict": s_recon["strict"].mean().item(),
        "agreement": (s_true["strict"] == s_recon["strict"]).float().mean().item(),
        "recon_checks": {k: v[~v.isnan()].mean().item() for k, v in s_recon["checks"].items()},
        "recon_category_accuracy": s_recon["category_accuracy"],
    }
    print(f"FSQ levels {tuple(levels)}: {model.codebook_size} codes, {cfg.steps} steps x {cfg.batch_size} images")
    print(f"time: render {t_render:.1f}s, train {t_train:.1f}s on {threads} threads")
    print(f"held-out: recon MSE {result['recon_mse']:.5f}, codes used {result['codes_used']}")
    print(f"scorer strict accuracy: truth {result['truth_strict']:.4f}, reconstructions {result['recon_strict']:.4f}")
    print(f"agreement (strict verdict on reconstruction == on truth): {result['agreement']:.4f}")
    print("reconstruction check pass rates: " + ", ".join(f"{k} {v:.3f}" for k, v in result["recon_checks"].items()))
    print("reconstruction accuracy by category: " + ", ".join(f"{k} {v:.3f}" for k, v in s_recon["category_accuracy"].items()))
    if cfg.out:
        save_checkpoint({"state_dict": model.state_dict(), "levels": levels, "width": cfg.width}, cfg.out)
        print(f"saved {cfg.out}")
    return result


if __name__ == "__main__":
    from toy.common import run_cli

    run_cli(main, Config, doc=__doc__.split("\n\n")[0])
