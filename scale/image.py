"""
Image side of the scale recipe: MMaDA text-to-image prompts, the MAGVIT-v2 decoder, image rewards.

MMaDA-8B-Base (Gen-Verse/MMaDA) reuses reserved LLaDA ids: <|soi|> 126084, <|eoi|> 126085, <|t2i|> 126088,
[iPAD] 126093; image code c is token 126349 + c for c in [0, 8192). Its t2i prompt (UniversalPrompting
.t2i_gen_prompt; official RL uses max_text_len 256 + 1 = 257):

    [iPAD] * pad  <|t2i|> <bos> text <eos>  <|soi|>  [MASK] * 1024  <|eoi|>      (257 + 1 + 1024 + 1 = 1283)
    '------------- max_text_len -----------'

A longer text is cut to its first max_text_len - 1 tokens and <eos> appended. The unconditional prompt
(classifier-free guidance) is the same with empty text. Image logits use columns [126349, 134541).

MAGVIT-v2 (showlab/magvitv2, as in Show-o and MMaDA): a lookup-free quantiser, code c <-> 13 bits of
c written MSB first as +-1, feeds a convolutional decoder (ch 128, ch_mult [1,1,2,2,4], num_res_blocks
[4,4,3,4,3], z_channels 13; 16x upsampling, 32 x 32 codes -> 512 x 512 pixels). `MagvitDecoder` holds
only the decoder and quantiser under the official key names (decoder.*, quantize.*), so the official
weights load after dropping encoder.*. Pixels come out roughly in [-1, 1]; decode_code maps them to
[0, 1] with clamp((x + 1) / 2, 0, 1).
"""

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

# -----------------------------------------------------------------------------
# MMaDA t2i prompt layout


@dataclass(frozen=True)
class MMaDATokens:
    """Special ids of the MMaDA t2i layout and the image-code range."""

    bos: int  # <|startoftext|>
    eos: int  # <|endoftext|>
    mask: int  # <|mdm_mask|>
    soi: int  # <|soi|>  start of image
    eoi: int  # <|eoi|>  end of image
    t2i: int  # <|t2i|>  task token
    pad: int  # [iPAD]   left padding of the text part
    image_offset: int  # token id of image code 0
    codebook_size: int  # number of image codes (2 ** 13 for MAGVIT-v2)

    def __post_init__(self):
        specials = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("image_offset", "codebook_size")}
        if len(set(specials.values())) != len(specials):
            raise ValueError(f"MMaDATokens special ids must be distinct, got {specials}")
        if self.codebook_size < 1:
            raise ValueError(f"MMaDATokens.codebook_size must be >= 1, got {self.codebook_size}")
        inside = {k: v for k, v in specials.items() if self.image_offset <= v < self.image_offset + self.codebook_size}
        if inside:
            raise ValueError(f"special ids {inside} fall inside the image code range "
                             f"[{self.image_offset}, {self.image_offset + self.codebook_size})")

    @classmethod
    def mmada_8b(cls):
        """Gen-Verse/MMaDA-8B-Base (LLaDA tokenizer + reserved tokens + 8192 MAGVIT-v2 codes)."""
        return cls(bos=126080, eos=126081, mask=126336, soi=126084, eoi=126085, t2i=126088, pad=126093,
                   image_offset=126349, codebook_size=8192)

    @property
    def image_columns(self):
        """Vocabulary slice of the image codes (pass as `columns=` to the model)."""
        return slice(self.image_offset, self.image_offset + self.codebook_size)


def t2i_prompt(text_ids, *, max_text_len, ids: MMaDATokens, num_image_tokens=1024):
    """MMaDA t2i prompt ids (a list of max_text_len + num_image_tokens + 2 ints):
    [pad]*k <t2i> <bos> text <eos> <soi> [mask]*num_image_tokens <eoi>.

    text_ids: the prompt's token ids (a leading <bos> is kept, not doubled); [] gives the
    unconditional prompt. Over-long text keeps its first max_text_len - 1 tokens, then <eos>."""
    if max_text_len < 3:
        raise ValueError(f"max_text_len={max_text_len} must be >= 3 (<t2i> <bos> <eos>)")
    if num_image_tokens < 1:
        raise ValueError(f"num_image_tokens={num_image_tokens} must be >= 1")
    text_ids = [int(t) for t in text_ids]
    forbidden = {ids.mask: "mask", ids.pad: "pad", ids.soi: "soi", ids.eoi: "eoi"}
    bad = sorted({forbidden[t] for t in text_ids if t in forbidden})
    if bad:
        raise ValueError(f"text_ids contain special id(s) of {bad}: the text must not hold layout tokens")
    if not text_ids or text_ids[0] != ids.bos:
        text_ids = [ids.bos] + text_ids
    head = [ids.t2i] + text_ids + [ids.eos]
    if len(head) <= max_text_len:
        head = [ids.pad] * (max_text_len - len(head)) + head
    else:
        head = head[: max_text_len - 1] + [ids.eos]
    return head + [ids.soi] + [ids.mask] * num_image_tokens + [ids.eoi]


def t2i_uncond_prompt(*, max_text_len, ids: MMaDATokens, num_image_tokens=1024):
    """The unconditional prompt for classifier-free guidance: t2i_prompt with empty text."""
    return t2i_prompt([], max_text_len=max_text_len, ids=ids, num_image_tokens=num_image_tokens)


def t2i_batch(texts, *, max_text_len, ids: MMaDATokens, num_image_tokens=1024):
    """Prompts for a batch of tokenised texts: input_ids (B, L) long and attention_mask (B, L) bool,
    False on the [iPAD] padding (as the official t2i_gen_prompt mask), L = max_text_len + N + 2."""
    rows = [t2i_prompt(t, max_text_len=max_text_len, ids=ids, num_image_tokens=num_image_tokens) for t in texts]
    input_ids = torch.tensor(rows, dtype=torch.long)  # (B, L)
    return input_ids, input_ids != ids.pad


def image_positions(*, max_text_len, num_image_tokens=1024):
    """Sequence slice of the image tokens in a t2i prompt (pass as `positions=` to the model)."""
    return slice(max_text_len + 1, max_text_len + 1 + num_image_tokens)


def codes_to_ids(codes, ids: MMaDATokens):
    """Image codes (any shape) -> token ids: offset + code."""
    if (codes < 0).any() or (codes >= ids.codebook_size).any():
        raise ValueError(f"image codes must lie in [0, {ids.codebook_size}), got range [{codes.min()}, {codes.max()}]")
    return codes + ids.image_offset


def ids_to_codes(token_ids, ids: MMaDATokens):
    """Token ids -> image codes, clamped to [0, codebook_size - 1] (as MMaDA does before decoding)."""
    return (token_ids - ids.image_offset).clamp(0, ids.codebook_size - 1)


# -----------------------------------------------------------------------------
# MAGVIT-v2 decoder (decoder-only; key names as showlab/magvitv2)


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
    folder holding one. encoder.* (and quant_conv) keys are ignored; every decoder.* key must match.
    If the file has the quantiser buffers, they must equal ours (checks the MSB-first bit order)."""
    path = Path(path)
    if path.is_dir():
        candidates = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")) + sorted(path.glob("*.pt"))
        if not candidates:
            raise FileNotFoundError(f"no .safetensors, .bin or .pt weights in {path}")
        path = candidates[0]
    if not path.is_file():
        raise FileNotFoundError(f"MAGVIT-v2 weights not found: {path}")
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


# -----------------------------------------------------------------------------
# Image rewards: adapters callable(images (B, 3, H, W) in [0, 1], prompts) -> (B,)
#
# Every real image reward needs weights; these are loaded from local paths, imports are lazy:
#   CLIP score    transformers (CLIPModel, CLIPTokenizer) or open_clip_torch; e.g. openai/clip-vit-large-patch14
#   HPSv2 / v3    hpsv2 package + open_clip ViT-H-14 + HPS_v2.1_compressed.pt; hpsv3 package (Qwen2-VL based)
#   ImageReward   image-reward package + ImageReward.pt + med_config.json (BLIP)
#   GenEval       mmdet + Mask2Former weights + CLIP ViT-L-14 (object detector rules)
#   UnifiedReward a Qwen2.5-VL judge, usually served over HTTP (the official MaskGRPO image reward)
# Only CLIP is implemented here; the others fit the same protocol.


@runtime_checkable
class RewardAdapter(Protocol):
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor: ...


def _check_images(images, prompts):
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts")


class StubImageReward:
    """Deterministic stand-in for tests: the mean "redness" R - (G + B) / 2 of each image, in [-1, 1].
    The prompts are ignored. A policy can learn it from pixels alone, and it needs no weights."""

    def __call__(self, images, prompts):
        _check_images(images, prompts)
        r, g, b = images.float().unbind(1)  # (B, H, W) each
        return (r - (g + b) / 2).mean(dim=(1, 2))  # (B,)


# CLIP image normalisation (OpenAI CLIP preprocessing constants)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipScoreReward:
    """Cosine similarity between CLIP image and text embeddings (the CLIP part of the paper's reward).

    model_path: a local folder of a transformers CLIP checkpoint (backend "transformers"), or the
    local weights file of an open_clip model (backend "open_clip", with `arch`, e.g. "ViT-L-14").
    Images are resized (bicubic, antialiased) to image_size and normalised in torch, no PIL."""

    def __init__(self, model_path, *, backend="transformers", arch=None, image_size=224, device="cpu"):
        model_path = Path(model_path)
        if not model_path.exists():
            raise FileNotFoundError(f"CLIP weights not found: {model_path}")
        if backend not in ("transformers", "open_clip"):
            raise ValueError(f"backend={backend!r} must be 'transformers' or 'open_clip'")
        if backend == "open_clip" and arch is None:
            raise ValueError("backend='open_clip' needs arch (e.g. 'ViT-L-14')")
        self.backend, self.image_size, self.device = backend, image_size, device
        if backend == "transformers":
            try:
                from transformers import CLIPModel, CLIPTokenizer
            except ImportError as e:
                raise ImportError("ClipScoreReward(backend='transformers') needs `transformers`") from e
            self.model = CLIPModel.from_pretrained(str(model_path), local_files_only=True).to(device).eval()
            self.tokenizer = CLIPTokenizer.from_pretrained(str(model_path), local_files_only=True)
        else:
            try:
                import open_clip
            except ImportError as e:
                raise ImportError("ClipScoreReward(backend='open_clip') needs `open_clip_torch`") from e
            self.model = open_clip.create_model(arch, pretrained=str(model_path)).to(device).eval()
            self.tokenizer = open_clip.get_tokenizer(arch)
        self.model.requires_grad_(False)

    def _pixels(self, images):  # (B, 3, H, W) in [0, 1] -> (B, 3, S, S) normalised
        x = F.interpolate(images.float(), size=(self.image_size, self.image_size), mode="bicubic", antialias=True)
        mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
        return (x.clamp(0, 1) - mean) / std

    @torch.no_grad()
    def __call__(self, images, prompts):
        _check_images(images, prompts)
        pixels = self._pixels(images.to(self.device))
        if self.backend == "transformers":
            text = self.tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt").to(self.device)
            image_emb = self.model.get_image_features(pixel_values=pixels)
            text_emb = self.model.get_text_features(**text)
        else:
            image_emb = self.model.encode_image(pixels)
            text_emb = self.model.encode_text(self.tokenizer(prompts).to(self.device))
        return F.cosine_similarity(image_emb.float(), text_emb.float(), dim=-1).to(images.device)  # (B,)
