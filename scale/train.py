"""
MaskGRPO at scale: LLaDA-8B-Instruct on GSM8K, MMaDA-8B-Base text-to-image; 1 CPU process to N GPUs.

    # GSM8K, LoRA r128 (DDP), 8 GPUs
    torchrun --standalone --nproc_per_node=8 scale/train.py --preset llada-8b \\
        --model /ckpt/LLaDA-8B-Instruct --data /data/gsm8k/train.jsonl --out runs/llada
    # text-to-image, full fine-tuning (FSDP2), 8 GPUs
    torchrun --standalone --nproc_per_node=8 scale/train.py --preset mmada-8b \\
        --model /ckpt/MMaDA-8B-Base --vq-model /ckpt/magvitv2 --data prompts.txt --reward clip \\
        --reward-model /ckpt/clip-vit-large-patch14 --out runs/mmada
    # CPU smoke test: a random tiny model, tokenizer and data written under --out, no downloads
    torchrun --standalone --nproc_per_node=2 scale/train.py --preset tiny --out runs/tiny
    torchrun --standalone --nproc_per_node=2 scale/train.py --preset tiny --task t2i --lora-rank 0 --out runs/tiny_t2i

Add --resume to continue from <out>/checkpoints/latest (or start fresh if there is none): with
`torchrun --max-restarts=3 ... --resume`, a rank that dies makes torchrun restart every rank, and
training continues from the last complete checkpoint with the same numbers as an uninterrupted run.

One step on each rank (the algorithm is maskgrpo.py's; this file adds only distribution and I/O):
  1. prompts: the step's global prompts (a seeded permutation per epoch), rank r takes r, r+W, ...
  2. rollout: G completions per prompt with the parameters unsharded (distributed.rollout_params)
  3. rewards: GSM8K (scale.text) or an image reward on MAGVIT-v2 decodes (scale.image); the G
     completions of a prompt stay on this rank, so group advantages are local
  4. maskgrpo.grpo_step: mu updates, one mask ratio each, loss normalised over all ranks
  5. rank 0 logs global statistics (JSONL + one progress line); every --save-every steps a checkpoint
Presets fill the defaults; any flag given on the command line wins.
"""

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `scale` and `maskgrpo` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import maskgrpo  # noqa: E402
from maskgrpo import Completions, GRPOConfig, ModelConfig, grpo_step, make_optimizer  # noqa: E402
from scale import distributed as D  # noqa: E402

# -----------------------------------------------------------------------------
# Presets (argparse defaults; a flag on the command line overrides them)

PRESETS = {
    # official MaskGRPO text setting (method.md §5): LLaDA-8B-Instruct, GSM8K, LoRA r128/alpha64 on q,k,v,up
    "llada-8b": dict(task="text", num_generations=6, batch_size=96, max_completion_length=256, block_length=16,
                     diffusion_steps=128, temperature=0.9, num_iterations=12, min_mask_rate=0.6,
                     epsilon=0.2, beta=0.01, learning_rate=3e-6, weight_decay=0.1, max_grad_norm=0.2,
                     micro_batch_size=6, lora_rank=128, lora_alpha=64, max_steps=1000, save_every=50),
    # MMaDA text-to-image (method.md §5): G 9, 72 images per step, emerge 12 steps, CFG 3.5, gamma 0.8, mu 8.
    # Full fine-tuning with FSDP2, lr 3e-6 and the CLIP reward are this project's choices (the paper used
    # UnifiedReward + HPSv3 + CLIP; scale/image.py implements only CLIP as an adapter).
    "mmada-8b": dict(task="t2i", num_generations=9, batch_size=72, diffusion_steps=12, temperature=1.0,
                     sampler="emerge", guidance_scale=3.5, num_iterations=8, min_mask_rate=0.8,
                     epsilon=0.2, beta=0.01, learning_rate=3e-6, weight_decay=0.1, max_grad_norm=0.2,
                     micro_batch_size=9, lora_rank=0, max_text_len=257, num_image_tokens=1024, max_steps=1000,
                     save_every=50, reward="clip"),
    # a random tiny model, tokenizer, data and MAGVIT decoder written under --out: the whole pipeline on CPU
    "tiny": dict(task="text", num_generations=4, batch_size=8, max_completion_length=16, block_length=8,
                 diffusion_steps=4, temperature=1.0, num_iterations=2, min_mask_rate=0.6, epsilon=0.2, beta=0.04,
                 learning_rate=1e-3, weight_decay=0.0, max_grad_norm=1.0, micro_batch_size=4, lora_rank=4,
                 lora_alpha=8, max_text_len=8, num_image_tokens=16, guidance_scale=1.0, max_steps=3, save_every=1,
                 device="cpu", image_tokens="tiny"),
}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), required=True)
    g = p.add_argument_group("task and data")
    g.add_argument("--task", choices=("text", "t2i"), help="GSM8K text or MMaDA text-to-image")
    g.add_argument("--model", help="HF checkpoint folder (config.json + safetensors)")
    g.add_argument("--tokenizer", help="folder or tokenizer.json (default: the model folder)")
    g.add_argument("--data", help="text: GSM8K .jsonl/.json/.parquet; t2i: prompts, .txt (one per line) or .jsonl ('prompt')")
    g.add_argument("--vq-model", help="t2i: MAGVIT-v2 weights (file or folder; magvit_config.json beside them sets widths)")
    g.add_argument("--image-tokens", default="mmada-8b",
                   help="t2i special ids: 'mmada-8b', or a JSON file of scale.image.MMaDATokens fields "
                        "('tiny': the tiny preset's)")
    g.add_argument("--reward", choices=("gsm8k", "stub", "clip"),
                   help="gsm8k (text); clip or stub (t2i; stub = mean redness, a test stand-in). Default: gsm8k / stub")
    g.add_argument("--reward-model", help="clip: local CLIP folder (transformers)")
    g = p.add_argument_group("GRPO (maskgrpo.GRPOConfig)")
    g.add_argument("--num-generations", type=int, help="G, completions per prompt")
    g.add_argument("--batch-size", type=int, help="completions per step over all ranks (prompts x G)")
    g.add_argument("--max-completion-length", type=int, default=256, help="text canvas L")
    g.add_argument("--block-length", type=int, default=16, help="text: semi-AR block size")
    g.add_argument("--diffusion-steps", type=int, help="sampler steps per completion / image")
    g.add_argument("--temperature", type=float)
    g.add_argument("--num-iterations", type=int, help="mu, inner updates per rollout batch")
    g.add_argument("--min-mask-rate", type=float, help="gamma, truncation of the mask-ratio schedule")
    g.add_argument("--remasking", choices=("arlike", "random"), help="Rev; default: arlike (text), random (t2i)")
    g.add_argument("--epsilon", type=float)
    g.add_argument("--beta", type=float, help="KL weight; the reference is the policy with adapters off (LoRA) or a frozen copy")
    g.add_argument("--loss-type", choices=("token", "sequence"), default="token")
    g.add_argument("--learning-rate", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--max-grad-norm", type=float)
    g.add_argument("--micro-batch-size", type=int, help="rows per forward/backward on one rank")
    g = p.add_argument_group("text-to-image")
    g.add_argument("--sampler", choices=("emerge", "maskgit"), default="emerge")
    g.add_argument("--guidance-scale", type=float, default=0.0, help="CFG w for rollouts (log-probs are unguided)")
    g.add_argument("--max-text-len", type=int, default=257)
    g.add_argument("--num-image-tokens", type=int, default=1024)
    g = p.add_argument_group("model and distribution")
    g.add_argument("--lora-rank", type=int, default=0, help="0 = full fine-tuning")
    g.add_argument("--lora-alpha", type=float, default=64)
    g.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,up_proj")
    g.add_argument("--parallel", choices=("auto", "fsdp", "ddp"), default="auto", help="auto: ddp with LoRA, else fsdp")
    g.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    g.add_argument("--no-activation-checkpointing", action="store_true")
    g.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda if available")
    g = p.add_argument_group("run")
    g.add_argument("--out", required=True, help="run folder: log.jsonl, checkpoints/, export/")
    g.add_argument("--max-steps", type=int)
    g.add_argument("--save-every", type=int, default=50, help="checkpoint period in steps (0 = only at the end)")
    g.add_argument("--keep", type=int, default=2, help="checkpoints kept")
    g.add_argument("--resume", nargs="?", const="latest", help="a checkpoint folder, or 'latest' (start fresh if none)")
    g.add_argument("--export", action="store_true", help="at the end write <out>/export (HF folder or PEFT adapters)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--fail-at-step", type=int, help="test hook: the last rank exits at this step on torchrun's first attempt")
    return p


def parse_args(argv=None):
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    if known.preset is not None:
        parser.set_defaults(**PRESETS[known.preset])
    args = parser.parse_args(argv)
    # derived defaults, documented in --help
    if args.reward is None:
        args.reward = "gsm8k" if args.task == "text" else "stub"
    if args.remasking is None:
        args.remasking = "arlike" if args.task == "text" else "random"
    return args


def grpo_config(args):
    """GRPOConfig from the flags. An image is one block of num_image_tokens (the text fields are unused)."""
    length = args.max_completion_length if args.task == "text" else args.num_image_tokens
    block = args.block_length if args.task == "text" else args.num_image_tokens
    return GRPOConfig(num_generations=args.num_generations, max_completion_length=length, block_length=block,
                      diffusion_steps=args.diffusion_steps, temperature=args.temperature,
                      num_iterations=args.num_iterations, min_mask_rate=args.min_mask_rate, remasking=args.remasking,
                      epsilon=args.epsilon, beta=args.beta, loss_type=args.loss_type, learning_rate=args.learning_rate,
                      weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
                      micro_batch_size=args.micro_batch_size)


def lora_spec(args):
    if args.lora_rank <= 0:
        return None
    return D.LoRASpec(args.lora_rank, args.lora_alpha, tuple(t for t in args.lora_targets.split(",") if t))


def parallel_mode(args):
    return args.parallel if args.parallel != "auto" else ("ddp" if args.lora_rank > 0 else "fsdp")


def check_args(args, world):
    """Everything that can be checked from the flags alone, before any process group or file I/O.
    Raises ValueError naming the flag."""
    cfg = grpo_config(args)  # GRPOConfig validates its own fields
    G, N = args.num_generations, args.batch_size
    if N is None or N < 1:
        raise ValueError(f"--batch-size must be >= 1, got {N}")
    if N % G:
        raise ValueError(f"--num-generations={G} must divide --batch-size={N} (a group of G completions per prompt)")
    prompts = N // G
    if prompts % world:
        raise ValueError(f"--batch-size={N} is {prompts} prompts of G={G}, which do not split over {world} ranks "
                         f"(the prompts per step must be a multiple of the world size)")
    if args.max_steps is None or args.max_steps < 1:
        raise ValueError(f"--max-steps must be >= 1, got {args.max_steps}")
    if args.save_every < 0:
        raise ValueError(f"--save-every must be >= 0, got {args.save_every}")
    if args.lora_rank < 0:
        raise ValueError(f"--lora-rank must be >= 0 (0 = full fine-tuning), got {args.lora_rank}")
    if parallel_mode(args) == "ddp" and args.lora_rank == 0 and world > 1:
        raise ValueError("--parallel ddp needs --lora-rank > 0 (full fine-tuning replicated on every GPU does not fit; use fsdp)")
    if args.task == "t2i" and math.isqrt(args.num_image_tokens) ** 2 != args.num_image_tokens:
        raise ValueError(f"--num-image-tokens={args.num_image_tokens} must be a square (a side x side grid)")
    if (args.task == "text") != (args.reward == "gsm8k"):
        raise ValueError(f"--reward {args.reward} does not fit --task {args.task}")
    if args.reward == "clip" and not args.reward_model:
        raise ValueError("--reward clip needs --reward-model (a local CLIP folder)")
    if args.preset != "tiny":
        for flag in ("model", "data") + (("vq_model",) if args.task == "t2i" else ()):
            if getattr(args, flag) is None:
                raise ValueError(f"--preset {args.preset} needs --{flag.replace('_', '-')}")
    return cfg


def check_paths(args):
    """Every input path exists (FileNotFoundError naming the flag), before anything is read."""
    need = dict(model=args.model, data=args.data, tokenizer=args.tokenizer)
    if args.task == "t2i":
        need.update(vq_model=args.vq_model, reward_model=args.reward_model if args.reward == "clip" else None)
        if args.image_tokens != "mmada-8b":
            need["image_tokens"] = args.image_tokens
    for flag, path in need.items():
        if path is not None and not Path(path).exists():
            what = "checkpoint folder" if flag == "model" else "path"
            raise FileNotFoundError(f"--{flag.replace('_', '-')}: {what} not found: {path}")
    if args.model is not None and not Path(args.model).is_dir():
        raise FileNotFoundError(f"--model must be an HF checkpoint folder (config.json + safetensors), got a file: {args.model}")


# -----------------------------------------------------------------------------
# Tasks: prompts, rollouts and rewards


def epoch_order(n, epoch, seed):
    """A permutation of n prompts, fixed by (seed, epoch): the data order survives a resume."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def step_prompts(n, step, per_step, seed):
    """Global prompt indices of a step: consecutive slices of per-epoch permutations."""
    out, start = [], step * per_step
    for i in range(start, start + per_step):
        epoch, k = divmod(i, n)
        out.append(epoch_order(n, epoch, seed)[k])
    return out


class TextTask:
    """GSM8K with the LLaDA chat template (scale.text); reward = format + integer + correct (max 3)."""

    def __init__(self, args):
        from scale import text

        self.text = text
        self.tokenizer = text.load_tokenizer(args.tokenizer or args.model)
        self.tokens = text.ChatTokens.from_tokenizer(self.tokenizer)
        self.rows = text.load_gsm8k(args.data)
        if not self.rows:
            raise ValueError(f"no GSM8K rows in {args.data}")
        self.prompt_ids = [text.chat_prompt(self.tokenizer, text.gsm8k_user_message(r["question"]), tokens=self.tokens)
                           for r in self.rows]
        self.special = dict(mask_token_id=self.tokens.mask, eos_token_id=self.tokens.eos)

    def check_model(self, cfg: ModelConfig):
        top = max(max(ids) for ids in self.prompt_ids)
        if top >= cfg.vocab_size or self.tokenizer.get_vocab_size() > cfg.vocab_size:
            raise ValueError(f"the tokenizer ({self.tokenizer.get_vocab_size()} tokens) does not fit the model's "
                             f"vocab_size={cfg.vocab_size}")

    def rollout(self, model, idx, cfg, generator, device):
        ids, mask = self.text.left_pad([self.prompt_ids[i] for i in idx], self.tokens.eos, mask_id=self.tokens.mask)
        return maskgrpo.rollout_text(model, ids.to(device), mask.to(device), cfg, generator)

    def rewards(self, batch, idx, G):
        texts = [self.text.completion_text(self.tokenizer, row, tokens=self.tokens) for row in batch.completion.cpu()]
        golds = [self.rows[i]["gold"] for i in idx for _ in range(G)]
        return torch.tensor(self.text.total_reward(texts, golds), dtype=torch.float32), texts


def magvit_config(fields):
    """scale.image.MagvitConfig from a JSON dict (lists become the tuples the config holds)."""
    from scale.image import MagvitConfig

    return MagvitConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def read_prompts(path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    if path.suffix == ".jsonl":
        return [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


class ImageTask:
    """MMaDA text-to-image (scale.image): t2i layout, emerge/MaskGIT sampling with CFG, MAGVIT-v2 decode,
    an image reward on the decoded pixels."""

    def __init__(self, args, device):
        from scale import image, text

        self.image, self.args = image, args
        self.tokenizer = text.load_tokenizer(args.tokenizer or args.model)
        if args.image_tokens == "mmada-8b":
            self.ids = image.MMaDATokens.mmada_8b()
        else:
            self.ids = image.MMaDATokens(**json.loads(Path(args.image_tokens).read_text()))
        self.prompts = read_prompts(args.data)
        if not self.prompts:
            raise ValueError(f"no prompts in {args.data}")
        self.text_ids = [self.tokenizer.encode(p, add_special_tokens=False).ids for p in self.prompts]
        self.special = dict(mask_token_id=self.ids.mask, eos_token_id=self.ids.eos)
        self.positions = image.image_positions(max_text_len=args.max_text_len, num_image_tokens=args.num_image_tokens)
        vq = Path(args.vq_model)
        cfg_file = (vq if vq.is_dir() else vq.parent) / "magvit_config.json"  # absent: the official widths
        vq_cfg = magvit_config(json.loads(cfg_file.read_text())) if cfg_file.is_file() else None
        self.decoder = image.load_magvit_decoder(vq, vq_cfg, device=device)
        if self.decoder.codebook_size != self.ids.codebook_size:
            raise ValueError(f"the MAGVIT decoder has {self.decoder.codebook_size} codes, the token layout "
                             f"{self.ids.codebook_size}")
        if args.reward == "clip":
            self.reward = image.ClipScoreReward(args.reward_model, device=device)
        else:
            self.reward = image.StubImageReward()

    def check_model(self, cfg: ModelConfig):
        end = self.ids.image_offset + self.ids.codebook_size
        if cfg.vocab_size < end:
            raise ValueError(f"the model's vocab_size={cfg.vocab_size} has no room for image codes "
                             f"[{self.ids.image_offset}, {end}): is this a text-only checkpoint?")
        length = self.positions.stop + 1
        if length > cfg.max_sequence_length:
            raise ValueError(f"t2i sequences of {length} tokens exceed max_sequence_length={cfg.max_sequence_length}")

    def rollout(self, model, idx, cfg, generator, device):
        image, a, G = self.image, self.args, cfg.num_generations
        ids, mask = image.t2i_batch([self.text_ids[i] for i in idx for _ in range(G)], max_text_len=a.max_text_len,
                                    ids=self.ids, num_image_tokens=a.num_image_tokens)
        uncond, uncond_mask = image.t2i_batch([[]] * len(ids), max_text_len=a.max_text_len, ids=self.ids,
                                              num_image_tokens=a.num_image_tokens)
        ids, mask = ids.to(device), mask.to(device)
        seq = maskgrpo.generate_image(model, ids, positions=self.positions, columns=self.ids.image_columns,
                                      steps=cfg.diffusion_steps, mask_id=self.ids.mask, mode=a.sampler,
                                      guidance_scale=a.guidance_scale, uncond_ids=uncond.to(device),
                                      temperature=cfg.temperature, generator=generator, attention_mask=mask,
                                      uncond_attention_mask=uncond_mask.to(device))
        scored = torch.ones(len(seq), a.num_image_tokens, dtype=torch.bool, device=device)
        return Completions(seq, mask, self.positions, scored, columns=self.ids.image_columns)

    @torch.no_grad()
    def rewards(self, batch, idx, G):
        codes = self.image.ids_to_codes(batch.completion, self.ids)
        pixels = self.decoder.decode_code(codes.to(next(self.decoder.parameters()).device))  # (N, 3, H, W) in [0, 1]
        prompts = [self.prompts[i] for i in idx for _ in range(G)]
        return self.reward(pixels, prompts).float().cpu(), prompts


# -----------------------------------------------------------------------------
# The tiny preset: every asset written under <out>/tiny_assets, deterministic from the seed

TINY_WORDS = ("user assistant system What is plus ? . a red green blue circle square "
              "<reasoning> </reasoning> \\boxed{ } 0 1 2 3 4 5 6 7 8 9").split()
TINY_SPECIALS = ("[UNK]", "<|startoftext|>", "<|endoftext|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                 "<|mdm_mask|>", "<|soi|>", "<|eoi|>", "<|t2i|>", "[iPAD]")
TINY_PRIOR = {"<reasoning>": 2.5, "</reasoning>": 2.5, "\\boxed{": 2.5, "}": 2.5, "<|eot_id|>": 0.5, "<|endoftext|>": 0.5,
              **{str(i): 1.5 for i in range(10)}, **{t: -8.0 for t in TINY_SPECIALS if t not in ("<|eot_id|>", "<|endoftext|>")}}
TINY_MODEL = dict(d_model=32, n_layers=2, n_heads=2, mlp_hidden_size=64, max_sequence_length=256)
TINY_MAGVIT = dict(ch=8, ch_mult=[1, 2], num_res_blocks=[1, 1], z_channels=4, norm_groups=4)


def make_tiny_assets(folder, seed=0):
    """Word-level tokenizer with the LLaDA / MMaDA special tokens, 40 GSM8K-style questions, 8 image
    prompts, a random tiny model per task (bf16, 2 shards + index, like the Hub) and a random tiny
    MAGVIT-v2 decoder (16 codes, 2x upsampling). Written to a temporary sibling, then renamed."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    from scale.checkpoints import save_hf_folder
    from scale.image import MagvitDecoder

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    vocab = {w: i for i, w in enumerate(TINY_SPECIALS + tuple(TINY_WORDS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([t for t in TINY_SPECIALS if t != "[UNK]"])
    tok.save(str(tmp / "tokenizer.json"))
    g = torch.Generator().manual_seed(seed)
    with open(tmp / "gsm8k.jsonl", "w") as f:
        for _ in range(40):
            a, b = torch.randint(0, 5, (2,), generator=g).tolist()
            row = {"question": f"What is {a} plus {b} ?", "answer": f"{a} plus {b} is {a + b} . #### {a + b}"}
            f.write(json.dumps(row) + "\n")
    prompts = [f"a {c} {s}" for c in ("red", "green", "blue", "red") for s in ("circle", "square")]
    (tmp / "prompts.txt").write_text("\n".join(prompts) + "\n")
    n_text, codebook = len(vocab), 2 ** TINY_MAGVIT["z_channels"]
    image_tokens = dict(bos=vocab["<|startoftext|>"], eos=vocab["<|endoftext|>"], mask=vocab["<|mdm_mask|>"],
                        soi=vocab["<|soi|>"], eoi=vocab["<|eoi|>"], t2i=vocab["<|t2i|>"], pad=vocab["[iPAD]"],
                        image_offset=n_text, codebook_size=codebook)
    (tmp / "image_tokens.json").write_text(json.dumps(image_tokens, indent=2))
    for task, vocab_size in (("text", n_text), ("t2i", n_text + codebook)):
        cfg = ModelConfig.tiny(vocab_size, vocab["<|mdm_mask|>"], vocab["<|endoftext|>"], **TINY_MODEL)
        model = maskgrpo.MaskedDiffusionLM(cfg, generator=g)
        with torch.no_grad():
            # a unigram prior: channel 0 of every embedding is a constant that survives the norms, and head
            # column 0 turns it into per-token logits. So the random model writes <reasoning>, \boxed{ and
            # digits often enough that GSM8K rewards differ within a group (non-zero advantages).
            prior = torch.zeros(vocab_size)
            for word, logit in TINY_PRIOR.items():
                prior[vocab[word]] = logit
            t = model.model.transformer
            t.wte.weight[:, 0] = 0.5
            t.ff_out.weight[:, 0] = prior / 5.0
        save_hf_folder(model, tmp / f"model_{task}", config_json=cfg, shards=2)
    (tmp / "magvit").mkdir()
    decoder = MagvitDecoder(magvit_config(TINY_MAGVIT))
    with torch.no_grad():
        for p in decoder.decoder.parameters():
            p.normal_(0, 0.2, generator=g)
    save_file({k: v.contiguous() for k, v in decoder.state_dict().items()}, tmp / "magvit" / "magvit.safetensors")
    (tmp / "magvit" / "magvit_config.json").write_text(json.dumps(TINY_MAGVIT))
    os.replace(tmp, folder)
    return folder


def fill_tiny_paths(args, folder):
    """Point every path flag the user did not give at the tiny assets."""
    folder = Path(folder)
    defaults = dict(model=folder / f"model_{args.task}", tokenizer=folder / "tokenizer.json",
                    data=folder / ("gsm8k.jsonl" if args.task == "text" else "prompts.txt"),
                    vq_model=folder / "magvit", image_tokens=folder / "image_tokens.json")
    for name, value in defaults.items():
        if getattr(args, name) in (None, "tiny"):
            setattr(args, name, str(value))


# -----------------------------------------------------------------------------
# Logging (rank 0)


def global_stats(stats, rewards, G, d):
    """Statistics over all ranks: rewards gathered; loss summed (each rank holds its share of the
    global loss); token-weighted means for kl / clip / ratio; max for ratio_max."""
    r = D.all_gather_tensor(rewards.to(d.device).float()).cpu()
    tokens = stats["masked_tokens"]
    v = torch.tensor([stats["loss"], tokens, *(stats[k] * tokens for k in ("kl", "clip_frac", "ratio_mean"))],
                     dtype=torch.float64, device=d.device)
    m = torch.tensor([stats["ratio_max"]], dtype=torch.float64, device=d.device)
    if d.world > 1:
        torch.distributed.all_reduce(v)
        torch.distributed.all_reduce(m, op=torch.distributed.ReduceOp.MAX)
    v, n = v.cpu().tolist(), max(float(v[1]), 1.0)
    return dict(loss=v[0], kl=v[2] / n, clip_frac=v[3] / n, ratio_mean=v[4] / n, ratio_max=float(m[0]),
                grad_norm=stats["grad_norm"], masked_tokens=v[1], reward_mean=float(r.mean()),
                reward_std=float(r.std()) if len(r) > 1 else 0.0,
                zero_std_frac=float((r.view(-1, G).std(1) == 0).float().mean()))


class Logger:
    def __init__(self, out, d):
        self.d, self.path = d, Path(out) / "log.jsonl"

    def __call__(self, record, line=None):
        if not self.d.is_main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if line:
            print(line, flush=True)


# -----------------------------------------------------------------------------
# Main


def seed_generators(generators, seed, rank, step):
    """Different streams per rank (different prompts must not share noise). Reseeded from the step
    only when a checkpoint's generator states cannot be restored (it was made with another world size)."""
    for i, g in enumerate(generators.values()):
        g.manual_seed(seed + 1_000_003 * (rank + 1) + 7919 * step + i)


def main(argv=None):
    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", 1))
    check_args(args, world)  # flags only: fails before any process group or file is touched
    d = D.init_distributed(args.device)
    out = Path(args.out)
    try:
        if d.is_main:
            out.mkdir(parents=True, exist_ok=True)
            if args.preset == "tiny" and not (out / "tiny_assets").exists():
                make_tiny_assets(out / "tiny_assets", args.seed)
        D.barrier()
        if args.preset == "tiny":
            fill_tiny_paths(args, out / "tiny_assets")
        check_paths(args)
        result = train(args, d, out)
        D.barrier()  # every rank finished: no peer is still talking to one that tears its group down
        return result
    finally:
        D.shutdown()


def train(args, d, out):
    from scale.checkpoints import read_hf_folder

    # 1. validate every input (files are read only as far as headers) before any model is built
    task = TextTask(args) if args.task == "text" else ImageTask(args, d.device)
    model_cfg, _, _ = read_hf_folder(args.model, **task.special)  # config, names, shapes
    task.check_model(model_cfg)
    cfg, lora, mode = grpo_config(args), lora_spec(args), parallel_mode(args)
    ckpt_root = out / "checkpoints"
    trainer_state = dict(model_config=asdict(model_cfg), lora=None if lora is None else asdict(lora), task=args.task)
    resume = D.latest_checkpoint(ckpt_root) if args.resume == "latest" else args.resume
    if resume is not None:
        saved = D.read_trainer_state(resume)
        for key, value in trainer_state.items():
            if json.loads(json.dumps(value)) != saved.get(key):
                raise ValueError(f"checkpoint {resume} was made with {key}={saved.get(key)}, this run has {key}={value}")

    # 2. models (meta -> shards -> weights), optimiser, generators
    common = dict(mode=mode, precision=args.precision, gradient_checkpointing=not args.no_activation_checkpointing)
    policy = D.build_model(args.model, model_cfg, d, lora=lora, seed=args.seed, **common)
    reference = None
    if cfg.beta > 0 and lora is None:  # full fine-tuning: a frozen copy is the reference policy
        reference = D.build_model(args.model, model_cfg, d, trainable=False, **common)
    optimizer = make_optimizer(policy, cfg)
    generators = {"rollout": torch.Generator(d.device), "masks": torch.Generator(d.device)}
    seed_generators(generators, args.seed, d.rank, 0)
    log, start = Logger(out, d), 0
    if resume is not None:
        saved, rng_ok = D.load_checkpoint(resume, policy, optimizer, generators, d)
        start = saved["step"]
        if not rng_ok:
            seed_generators(generators, args.seed, d.rank, start)
        log(dict(event="resume", step=start, checkpoint=str(resume), rng_restored=rng_ok),
            f"resumed from {resume} at step {start}")
    else:
        log(dict(event="start", args=vars(args), world_size=d.world, model_config=asdict(model_cfg), grpo=asdict(cfg),
                 parallel=mode if d.world > 1 else "none"),
            f"training --preset {args.preset} --task {args.task} on {d.world} x {d.device.type}")

    # 3. steps
    G = cfg.num_generations
    n_prompts = len(task.prompt_ids) if args.task == "text" else len(task.prompts)
    ctx = lambda: D.compute_context(policy, d.device, args.precision)  # noqa: E731
    for step in range(start, args.max_steps):
        if (args.fail_at_step == step + 1 and d.rank == d.world - 1
                and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"):
            print(f"rank {d.rank}: --fail-at-step {step + 1}: exiting to test the restart", flush=True)
            os._exit(1)
        t0 = time.time()
        idx = D.rank_slice(step_prompts(n_prompts, step, args.batch_size // G, args.seed), d.rank, d.world)
        with D.rollout_params(policy), ctx():
            batch = task.rollout(policy, idx, cfg, generators["rollout"], d.device)
        rewards, texts = task.rewards(batch, idx, G)
        t1 = time.time()
        with ctx():
            stats = grpo_step(policy, optimizer, batch, rewards.to(d.device), cfg, generators["masks"], reference)
        t2 = time.time()
        g = global_stats(stats, rewards, G, d)
        log(dict(step=step + 1, **g, rollout_s=t1 - t0, update_s=t2 - t1, sample=texts[0]),
            f"step {step + 1}/{args.max_steps} | reward {g['reward_mean']:.3f} +- {g['reward_std']:.3f} | "
            f"loss {g['loss']:+.4f} | kl {g['kl']:.4f} | clip {g['clip_frac']:.3f} | grad {g['grad_norm']:.3f} | "
            f"{t1 - t0:.1f}s rollout, {t2 - t1:.1f}s update")
        if (args.save_every and (step + 1) % args.save_every == 0) or step + 1 == args.max_steps:
            D.save_checkpoint(ckpt_root, step + 1, policy, optimizer, generators, trainer_state, d, keep=args.keep)
    if args.export:
        D.export_hf(policy, out / "export", d, lora=lora, base_model=args.model)
    # equal on every rank iff the replicas agree (DDP) / the gathered shards agree (FSDP2)
    checksums = D.all_gather_tensor(torch.tensor([D.param_checksum(policy)], dtype=torch.float64, device=d.device))
    log(dict(event="done", step=args.max_steps, param_checksums=checksums.cpu().tolist()), "done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
