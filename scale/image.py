"""
The text-to-image task: MMaDA t2i prompts, image rewards, rollouts decoded by MAGVIT-v2, GenEval's files.

MMaDA-8B-Base (Gen-Verse/MMaDA) reuses reserved LLaDA ids: <|soi|> 126084, <|eoi|> 126085, <|t2i|> 126088,
[iPAD] 126093; image code c is token 126349 + c for c in [0, 8192). Its t2i prompt (UniversalPrompting
.t2i_gen_prompt; official RL uses max_text_len 256 + 1 = 257):

    [iPAD] * pad  <|t2i|> <bos> text <eos>  <|soi|>  [MASK] * 1024  <|eoi|>      (257 + 1 + 1024 + 1 = 1283)
    '------------- max_text_len -----------'

A longer text is cut to its first max_text_len - 1 tokens and <eos> appended. The unconditional prompt
(classifier-free guidance) is the same with empty text. Image logits use columns [126349, 134541).
Codes are decoded to pixels by scale.magvit.
"""

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

import maskgrpo
from scale.checkpoints import atomic_output, read_json
from scale.magvit import load_magvit_decoder
from scale.text import load_tokenizer, read_records

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

    @classmethod
    def load(cls, name_or_file):
        """"mmada-8b", or a JSON file of the fields (the tiny preset writes one)."""
        if name_or_file == "mmada-8b":
            return cls.mmada_8b()
        fields_ = read_json(name_or_file)
        try:
            return cls(**fields_)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name_or_file}: {e}") from None

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


def make_reward(name, model_path=None, *, device="cpu"):
    """The reward adapter a flag names: "clip" (a local CLIP folder) or "stub" (tests)."""
    if name == "clip":
        return ClipScoreReward(model_path, device=device)
    if name == "stub":
        return StubImageReward()
    raise ValueError(f"image reward {name!r} must be 'clip' or 'stub'")


# -----------------------------------------------------------------------------
# The training task: prompts -> MMaDA rollouts -> MAGVIT-v2 pixels -> rewards


def read_prompts(path):
    """Prompts of a .txt file (one per line) or of a .jsonl file with a "prompt" field (GenEval's metadata)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        prompts = []
        for where, r in read_records(path):
            if not isinstance(r.get("prompt"), str):
                raise ValueError(f"{where}: lacks text field 'prompt' (has {sorted(r)})")
            prompts.append(r["prompt"])
        return prompts
    if not path.is_file():
        raise FileNotFoundError(f"{path}: prompt file not found")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


class ImageTask:
    """MMaDA text-to-image training: t2i prompts, emerge / MaskGIT rollouts with classifier-free guidance,
    MAGVIT-v2 decodes, an image reward on the pixels."""

    def __init__(self, *, tokenizer, image_tokens: MMaDATokens, prompts, vq_model, reward, max_text_len,
                 num_image_tokens, sampler, guidance_scale, device):
        if math.isqrt(num_image_tokens) ** 2 != num_image_tokens:
            raise ValueError(f"--num-image-tokens={num_image_tokens} must be a square (a side x side grid)")
        self.tokenizer = load_tokenizer(tokenizer)
        self.ids, self.reward = image_tokens, reward
        self.prompts = read_prompts(prompts)
        self.text_ids = [self.encode(p) for p in self.prompts]
        self.special = dict(mask_token_id=self.ids.mask, eos_token_id=self.ids.eos)
        self.layout = dict(max_text_len=max_text_len, ids=self.ids, num_image_tokens=num_image_tokens)
        self.positions = image_positions(max_text_len=max_text_len, num_image_tokens=num_image_tokens)
        self.sampler, self.guidance_scale = sampler, guidance_scale
        self.decoder = load_magvit_decoder(vq_model, device=device)
        if self.decoder.codebook_size != self.ids.codebook_size:
            raise ValueError(f"the MAGVIT decoder has {self.decoder.codebook_size} codes, the token layout "
                             f"{self.ids.codebook_size}")

    def __len__(self):
        return len(self.prompts)

    def check_model(self, cfg):
        end = self.ids.image_offset + self.ids.codebook_size
        if cfg.vocab_size < end:
            raise ValueError(f"the model's vocab_size={cfg.vocab_size} has no room for image codes "
                             f"[{self.ids.image_offset}, {end}): is this a text-only checkpoint?")
        length = self.positions.stop + 1
        if length > cfg.max_sequence_length:
            raise ValueError(f"--max-text-len + --num-image-tokens: t2i sequences of {length} tokens exceed the "
                             f"model's max_sequence_length={cfg.max_sequence_length}")

    def encode(self, prompt):
        return self.tokenizer.encode(prompt, add_special_tokens=False).ids

    def generate(self, model, text_ids, *, steps, temperature, generator, device):
        """One image per tokenised prompt in `text_ids`: (B, T) sequences and their attention mask."""
        ids, mask = t2i_batch(text_ids, **self.layout)
        uncond, uncond_mask = t2i_batch([[]] * len(text_ids), **self.layout)
        return maskgrpo.generate_image(model, ids.to(device), positions=self.positions, columns=self.ids.image_columns,
                                       steps=steps, mask_id=self.ids.mask, mode=self.sampler,
                                       guidance_scale=self.guidance_scale, uncond_ids=uncond.to(device),
                                       temperature=temperature, generator=generator, attention_mask=mask.to(device),
                                       uncond_attention_mask=uncond_mask.to(device)), mask.to(device)

    @torch.no_grad()
    def pixels(self, sequences):
        """(B, T) generated sequences -> (B, 3, H, W) images in [0, 1]."""
        codes = ids_to_codes(sequences[:, self.positions], self.ids)
        return self.decoder.decode_code(codes.to(next(self.decoder.parameters()).device))

    def rollout(self, model, idx, cfg, generator, device):
        rows = [self.text_ids[i] for i in idx for _ in range(cfg.num_generations)]
        seq, mask = self.generate(model, rows, steps=cfg.diffusion_steps, temperature=cfg.temperature,
                                  generator=generator, device=device)
        scored = torch.ones(len(seq), self.positions.stop - self.positions.start, dtype=torch.bool, device=device)
        return maskgrpo.Completions(seq, mask, self.positions, scored, columns=self.ids.image_columns)

    @torch.no_grad()
    def rewards(self, batch, idx, G):
        prompts = [self.prompts[i] for i in idx for _ in range(G)]
        return self.reward(self.pixels(batch.sequences), prompts).float().cpu(), prompts


# -----------------------------------------------------------------------------
# GenEval (djghosh13/geneval): its prompt metadata, its image folder layout, an in-process scorer interface
#
# evaluation_metadata.jsonl: one JSON object per prompt, {"tag", "include": [{"class", "count", "color"?,
# "position"?: [relation, index]}], "exclude"?: [{"class", "count"}], "prompt"}. GenEval's own generation script
# (generation/diffusers_generate.py) writes, and its scorer (evaluation/evaluate_images.py) reads:
#     <folder>/<prompt index, 5 digits>/metadata.jsonl      that prompt's metadata line, one JSON object
#     <folder>/<prompt index, 5 digits>/samples/<k, 5 digits>.png
# The scorer needs an object detector (mmdet, Mask2Former) and CLIP, which do not ship here: run it on the
# folder. In process, images are scored by an ImageScorer (a CLIP similarity, or the stub in tests).

GENEVAL_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def read_geneval_metadata(path):
    """GenEval's evaluation_metadata.jsonl -> list of dicts; each row is checked (file and line named)."""
    rows = []
    for where, r in read_records(path):
        if not isinstance(r.get("prompt"), str) or not isinstance(r.get("tag"), str):
            raise ValueError(f"{where}: a GenEval row needs text fields 'tag' and 'prompt' (has {sorted(r)})")
        for key in ("include", "exclude"):
            clauses = r.get(key, [])
            if not isinstance(clauses, list) or not all(isinstance(c, dict) and isinstance(c.get("class"), str)
                                                        and isinstance(c.get("count"), int) for c in clauses):
                raise ValueError(f"{where}: '{key}' must be a list of {{'class': str, 'count': int, ...}}")
        if not r.get("include"):
            raise ValueError(f"{where}: 'include' must name at least one object")
        rows.append(r)
    return rows


def geneval_sample_path(folder, index, sample):
    """Where GenEval's scorer looks for sample `sample` of prompt `index`."""
    return Path(folder) / f"{index:05d}" / "samples" / f"{sample:05d}.png"


def write_geneval_sample(folder, index, sample, metadata, pixels):
    """Write one image (3, H, W) in [0, 1] as a PNG, and its prompt's metadata.jsonl, in GenEval's layout."""
    from PIL import Image

    path = geneval_sample_path(folder, index, sample)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = path.parent.parent / "metadata.jsonl"
    if not meta.is_file():
        with atomic_output(meta) as tmp:
            tmp.write_text(json.dumps(metadata))
    array = (pixels.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()  # (H, W, 3)
    with atomic_output(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
    return path


@runtime_checkable
class ImageScorer(Protocol):
    """In-process image scoring for evaluation: images (B, 3, H, W) in [0, 1] and their GenEval metadata rows
    -> (B,) scores. A GenEval detector adapter would return 1.0 where an image satisfies every include
    clause and no exclude clause, else 0.0 (what evaluation/evaluate_images.py decides per image)."""

    def __call__(self, images: torch.Tensor, metadata: list[dict]) -> torch.Tensor: ...


class PromptRewardScorer:
    """An ImageScorer from a prompt reward (CLIP similarity, the stub): reward(images, [row["prompt"], ...])."""

    def __init__(self, reward: RewardAdapter):
        self.reward = reward

    def __call__(self, images, metadata):
        return self.reward(images, [m["prompt"] for m in metadata])
