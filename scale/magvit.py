"""
The MAGVIT-v2 image decoder: image codes -> pixels, decoder-only, under the official key names.

MAGVIT-v2 (showlab/magvitv2, as in Show-o and MMaDA): a lookup-free quantiser, code c <-> 13 bits of
c written MSB first as +-1, feeds a convolutional decoder (ch 128, ch_mult [1,1,2,2,4], num_res_blocks
[4,4,3,4,3], z_channels 13; 16x upsampling, 32 x 32 codes -> 512 x 512 pixels). `MagvitDecoder` holds
only the decoder and quantiser under the official key names (decoder.*, quantize.*), so the official
weights load after dropping encoder.*. Pixels come out roughly in [-1, 1]; decode_code maps them to
[0, 1] with clamp((x + 1) / 2, 0, 1).
"""

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from scale.checkpoints import read_json

CONFIG_NAME = "magvit_config.json"  # this project's file of decoder widths (MagvitConfig fields), beside the weights

# -----------------------------------------------------------------------------
# Decoder widths and blocks (key names as showlab/magvitv2)


@dataclass(frozen=True)
class MagvitConfig:
    """Decoder widths. Defaults are the official MAGVIT-v2 decoder used by Show-o / MMaDA."""

    ch: int = 128
    ch_mult: tuple = (1, 1, 2, 2, 4)  # per resolution level, level 0 = full resolution
    num_res_blocks: tuple = (4, 4, 3, 4, 3)  # per level
    z_channels: int = 13  # latent channels = code bits (2 ** 13 = 8192 codes)
    out_ch: int = 3
    norm_groups: int = 32  # GroupNorm groups (official 32); tiny test decoders use fewer

    def __post_init__(self):
        if len(self.ch_mult) != len(self.num_res_blocks):
            raise ValueError(f"ch_mult={self.ch_mult} and num_res_blocks={self.num_res_blocks} must have one entry per level")
        widths = [self.ch * m for m in self.ch_mult]
        if any(w % self.norm_groups for w in widths):
            raise ValueError(f"every width ch*ch_mult={widths} must be divisible by norm_groups={self.norm_groups}")
        if not 1 <= self.z_channels <= 30:
            raise ValueError(f"z_channels={self.z_channels} must be in [1, 30] (2**z_channels codes)")

    @classmethod
    def from_json(cls, path):
        """The widths in a magvit_config.json (lists become the tuples the config holds)."""
        fields = read_json(path)
        try:
            return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
        except (TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"{path}: {e}") from None

    @property
    def upsampling(self):
        """Pixels per code along each side: 2 ** (levels - 1) (16 for the official decoder)."""
        return 2 ** (len(self.ch_mult) - 1)


def _norm(channels, groups):
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """h = conv2(silu(norm2(conv1(silu(norm1(x)))))); out = shortcut(x) + h (1x1 nin_shortcut if widths differ)."""

    def __init__(self, in_channels, out_channels, groups):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x):  # (B, C_in, H, W) -> (B, C_out, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions with 1x1-conv q, k, v, proj_out; residual."""

    def __init__(self, channels, groups):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x):  # (B, C, H, W)
        B, C, H, W = x.shape
        n = self.norm(x)
        q, k, v = (p(n).reshape(B, 1, C, H * W).transpose(-1, -2) for p in (self.q, self.k, self.v))  # (B, 1, HW, C)
        y = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v
        return x + self.proj_out(y.transpose(-1, -2).reshape(B, C, H, W))


class Upsample(nn.Module):
    """Nearest-neighbour 2x, then a 3x3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):  # (B, C, H, W) -> (B, C, 2H, 2W)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Decoder(nn.Module):
    """post_quant_conv -> conv_in -> mid (block_1, attn_1, block_2) -> up levels from coarse to fine
    (up[i].block[j], up[i].upsample for i > 0) -> norm_out -> silu -> conv_out."""

    def __init__(self, cfg: MagvitConfig):
        super().__init__()
        g = cfg.norm_groups
        width = cfg.ch * cfg.ch_mult[-1]
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, width, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(width, width, g)
        self.mid.attn_1 = AttnBlock(width, g)
        self.mid.block_2 = ResnetBlock(width, width, g)
        # official attn_resolutions [5] never matches a 16..256 grid: the up levels have no attention
        levels = []
        for i in reversed(range(len(cfg.ch_mult))):
            level = nn.Module()
            out = cfg.ch * cfg.ch_mult[i]
            level.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks[i]):
                level.block.append(ResnetBlock(width, out, g))
                width = out
            if i != 0:
                level.upsample = Upsample(width)
            levels.insert(0, level)  # self.up[i] is level i (0 = full resolution)
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(width, g)
        self.conv_out = nn.Conv2d(width, cfg.out_ch, 3, padding=1)

    def forward(self, z):  # (B, z_channels, h, w) -> (B, out_ch, h * 2**(levels-1), w * 2**(levels-1))
        h = self.conv_in(self.post_quant_conv(z))
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i in reversed(range(len(self.up))):
            for block in self.up[i].block:
                h = block(h)
            if i != 0:
                h = self.up[i].upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# -----------------------------------------------------------------------------
# Quantiser and the decoder-only model


class LookupFreeQuantizer(nn.Module):
    """MAGVIT-v2 LFQ codebook: code c <-> its `bits` binary digits, MSB first, as -1/+1.
    Buffers as the official module: embedding (2**bits, bits) and power_vals (bits,)."""

    def __init__(self, bits):
        super().__init__()
        powers = 2 ** torch.arange(bits - 1, -1, -1)  # (bits,)  MSB first
        codes = torch.arange(2**bits)
        self.register_buffer("embedding", ((codes[:, None] // powers) % 2).float() * 2 - 1)  # (2**bits, bits)
        self.register_buffer("power_vals", powers)

    def code_to_bits(self, codes):  # (...) long -> (..., bits) in {-1, +1}
        return self.embedding[codes]

    def bits_to_code(self, bits):  # (..., bits) -> (...) long; a bit is 1 where the latent is > 0
        return ((bits > 0).long() * self.power_vals).sum(-1)


class MagvitDecoder(nn.Module):
    """Decoder-only MAGVIT-v2: codes (B, N) -> pixels. Keys: decoder.*, quantize.* (official names)."""

    def __init__(self, cfg: MagvitConfig | None = None):
        super().__init__()
        self.config = cfg or MagvitConfig()
        self.decoder = Decoder(self.config)
        self.quantize = LookupFreeQuantizer(self.config.z_channels)

    @property
    def codebook_size(self):
        return 2**self.config.z_channels

    def decode_latent(self, z):
        """(B, z_channels, h, w) latent -> (B, 3, H, W) raw decoder output (roughly [-1, 1])."""
        return self.decoder(z)

    @torch.no_grad()
    def decode_code(self, codes):
        """codes (B, N), N = side**2 in row-major order -> pixels (B, 3, side*f, side*f) in [0, 1],
        f = config.upsampling. Codes are clamped to [0, codebook_size - 1] first (as MMaDA)."""
        if codes.dim() != 2:
            raise ValueError(f"codes must be (B, N), got shape {tuple(codes.shape)}")
        B, N = codes.shape
        side = math.isqrt(N)
        if side * side != N:
            raise ValueError(f"number of codes N={N} is not a square grid")
        codes = codes.long().clamp(0, self.codebook_size - 1)
        z = self.quantize.code_to_bits(codes).view(B, side, side, -1).permute(0, 3, 1, 2)  # (B, bits, side, side)
        x = self.decode_latent(z.to(self.quantize.embedding.dtype))
        return ((x.float() + 1) / 2).clamp(0, 1)  # (B, 3, H, W)


def load_magvit_decoder(path, cfg: MagvitConfig | None = None, *, device="cpu"):
    """MagvitDecoder with weights from a MAGVIT-v2 checkpoint: a .safetensors or .bin/.pt file, or a
    folder holding one. cfg None: the widths of a magvit_config.json beside the weights, else the
    official ones. encoder.* (and quant_conv) keys are ignored; every decoder.* key must match.
    If the file has the quantiser buffers, they must equal ours (checks the MSB-first bit order)."""
    path = Path(path)
    if path.is_dir():
        candidates = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")) + sorted(path.glob("*.pt"))
        if not candidates:
            raise FileNotFoundError(f"no .safetensors, .bin or .pt weights in {path}")
        path = candidates[0]
    if not path.is_file():
        raise FileNotFoundError(f"MAGVIT-v2 weights not found: {path}")
    if cfg is None and (path.parent / CONFIG_NAME).is_file():
        cfg = MagvitConfig.from_json(path.parent / CONFIG_NAME)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    model = MagvitDecoder(cfg).to(device)
    own = model.state_dict()
    wanted = {k: v for k, v in state.items() if k.startswith(("decoder.", "quantize."))}
    missing = [k for k in own if k.startswith("decoder.") and k not in wanted]
    unexpected = [k for k in wanted if k not in own]
    if missing or unexpected:
        raise ValueError(f"MAGVIT-v2 checkpoint {path.name} does not fit MagvitDecoder({model.config}): "
                         f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    for k, v in wanted.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(f"{k} has shape {tuple(v.shape)} in {path.name}, the decoder expects {tuple(own[k].shape)}")
        if k.startswith("quantize.") and not torch.equal(v.to(own[k].dtype), own[k]):
            raise ValueError(f"{k} in {path.name} differs from the MSB-first bit table this decoder uses")
    model.load_state_dict({**own, **wanted})
    return model.eval().requires_grad_(False)
