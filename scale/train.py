"""
The training launcher: command line and presets, the run folder, logging, and the MaskGRPO step loop.

    # GSM8K, LoRA r128 (DDP), 8 GPUs
    torchrun --standalone --nproc_per_node=8 scale/train.py --preset llada-8b \\
        --model /ckpt/LLaDA-8B-Instruct --data /data/gsm8k/train.jsonl --out runs/llada
    # text-to-image, full fine-tuning (FSDP2), 8 GPUs
    torchrun --standalone --nproc_per_node=8 scale/train.py --preset mmada-8b \\
        --model /ckpt/MMaDA-8B-Base --vq-model /ckpt/magvitv2 --data prompts.txt --reward clip \\
        --reward-model /ckpt/clip-vit-large-patch14 --out runs/mmada
    # two nodes of 8 GPUs, sharded within a node, replicated across nodes (HSDP); run on every node
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=$HEAD:29500 --rdzv-id=job1 \\
        scale/train.py --preset mmada-8b --parallel hsdp ... --out /nfs/runs/mmada
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
import dataclasses
import json
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `scale` and `maskgrpo` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from maskgrpo import GRPOConfig, grpo_step, make_optimizer  # noqa: E402
from scale import checkpoints as C  # noqa: E402
from scale import cli  # noqa: E402
from scale import distributed as D  # noqa: E402
from scale import evaluate as E  # noqa: E402
from scale.image import ImageTask, MMaDATokens, PromptRewardScorer, make_reward, read_geneval_metadata  # noqa: E402
from scale.text import TextTask  # noqa: E402
from scale.tiny import TINY_DATA, make_tiny_assets, tiny_paths  # noqa: E402

# -----------------------------------------------------------------------------
# Presets (argparse defaults; a flag on the command line overrides them)

PRESETS = {
    # the official MaskGRPO text run (martian422/MaskGRPO: scripts/train/t2t_grpo_train.sh with configs/rl.yaml):
    # LLaDA-8B-Instruct on GSM8K, G 6 x 8 GPUs x accumulation 2 = 96 completions, LoRA r128/alpha64 on q,k,v,up
    "llada-8b": dict(task="text", num_generations=6, batch_size=96, max_completion_length=256, block_length=16,
                     diffusion_steps=128, temperature=0.9, num_iterations=12, min_mask_rate=0.6,
                     epsilon=0.2, beta=0.01, learning_rate=3e-6, weight_decay=0.1, max_grad_norm=0.2,
                     micro_batch_size=6, lora_rank=128, lora_alpha=64, max_steps=1000, save_every=50),
    # MMaDA text-to-image, the paper's setting (arXiv 2510.02880, experiments): G 9, 72 images per step, emerge
    # sampler 12 steps, CFG 3.5, gamma 0.8, mu 8 (the official scripts/train/t2i_grpo_train.sh: G 9, mu 6, CFG 3.0).
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

# The flags of maskgrpo.GRPOConfig's fields: type and default come from the dataclass (floats must be finite).
GRPO_FLAGS = {  # field: help
    "num_generations": "G, completions per prompt",
    "max_completion_length": "text canvas L",
    "block_length": "text: semi-AR block size",
    "diffusion_steps": "sampler steps per completion / image",
    "temperature": None,
    "num_iterations": "mu, inner updates per rollout batch",
    "min_mask_rate": "gamma, truncation of the mask-ratio schedule",
    "remasking": "Rev; default: arlike (text), random (t2i)",
    "epsilon": None,
    "beta": "KL weight; the reference is the policy with adapters off (LoRA) or a frozen copy",
    "loss_type": None,
    "learning_rate": None,
    "weight_decay": None,
    "max_grad_norm": None,
    "micro_batch_size": "rows per forward/backward on one rank",
}
GRPO_CHOICES = dict(remasking=("arlike", "random"), loss_type=("token", "sequence"))
TASK_DEFAULTS = dict(remasking=None)  # derived from --task in parse_args, not GRPOConfig's default


def build_parser():
    p = cli.Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
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
    fields = {f.name: f for f in dataclasses.fields(GRPOConfig)}
    for name, help_text in GRPO_FLAGS.items():
        f = fields[name]
        g.add_argument("--" + name.replace("_", "-"), type=cli.flag_type(f.type), choices=GRPO_CHOICES.get(name),
                       default=TASK_DEFAULTS.get(name, f.default), help=help_text)
    g.add_argument("--batch-size", type=int, help="completions per step over all ranks (prompts x G)")
    g = p.add_argument_group("text-to-image")
    g.add_argument("--sampler", choices=("emerge", "maskgit"), default="emerge")
    g.add_argument("--guidance-scale", type=cli.finite_float, default=0.0, help="CFG w for rollouts (log-probs are unguided)")
    g.add_argument("--max-text-len", type=int, default=257)
    g.add_argument("--num-image-tokens", type=int, default=1024)
    g = p.add_argument_group("model and distribution")
    g.add_argument("--lora-rank", type=int, default=0, help="0 = full fine-tuning")
    g.add_argument("--lora-alpha", type=cli.finite_float, default=64)
    g.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,up_proj")
    g.add_argument("--parallel", choices=("auto", "fsdp", "hsdp", "ddp"), default="auto",
                   help="auto: ddp with LoRA, else fsdp; hsdp: shard within a node, replicate across nodes")
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
    g.add_argument("--eval-every", type=int, help="every N steps, evaluate on --eval-data (scale/evaluate.py's evaluation)")
    g.add_argument("--eval-data", help="text: GSM8K test layout (question, answer); t2i: GenEval metadata .jsonl "
                                       "(scored with --reward); 'tiny': the tiny preset's")
    g.add_argument("--eval-limit", type=int, help="evaluate the first K rows (prompts) of --eval-data only")
    g.add_argument("--fail-at-step", type=int,
                   help="test hook: in a run that started fresh, on torchrun's first attempt, the last rank exits at this step")
    g.add_argument("--fail-kills-agent", action="store_true",
                   help="test hook: ... after killing its torchrun agent (a node failure)")
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
    given = {name: getattr(args, name) for name in GRPO_FLAGS}
    return GRPOConfig(**given | dict(max_completion_length=length, block_length=block))


def lora_spec(args):
    if args.lora_rank <= 0:
        return None
    return D.LoRASpec(args.lora_rank, args.lora_alpha, tuple(t for t in args.lora_targets.split(",") if t))


def parallel_mode(args):
    return args.parallel if args.parallel != "auto" else ("ddp" if args.lora_rank > 0 else "fsdp")


def check_args(args, world, per_node=None):
    """Everything that can be checked from the flags alone, before any process group or file I/O.
    Raises ValueError naming the flag. per_node: processes per node (torchrun's LOCAL_WORLD_SIZE)."""
    cfg = grpo_config(args)  # GRPOConfig validates its own fields
    lora_spec(args)  # LoRASpec validates rank, alpha and target names
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
    mode = parallel_mode(args)
    if mode == "ddp" and args.lora_rank == 0 and world > 1:
        raise ValueError("--parallel ddp needs --lora-rank > 0 (full fine-tuning replicated on every GPU does not fit; "
                         "use fsdp)")
    per_node = world if per_node is None else per_node
    if mode == "hsdp" and world > 1 and (world % per_node or world == per_node):
        raise ValueError(f"--parallel hsdp shards within a node and replicates across nodes: it needs 2 or more nodes "
                         f"of equal size, this run has {world} processes, {per_node} per node (use --parallel fsdp)")
    if (args.task == "text") != (args.reward == "gsm8k"):
        raise ValueError(f"--reward {args.reward} does not fit --task {args.task}")
    if args.reward == "clip" and not args.reward_model:
        raise ValueError("--reward clip needs --reward-model (a local CLIP folder)")
    for flag in ("eval_every", "eval_limit"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.eval_every and args.eval_data is None and args.preset != "tiny":
        raise ValueError("--eval-every needs --eval-data (a held-out file)")
    if args.preset != "tiny":
        for flag in ("model", "data") + (("vq_model",) if args.task == "t2i" else ()):
            if getattr(args, flag) is None:
                raise ValueError(f"--preset {args.preset} needs --{flag.replace('_', '-')}")
    return cfg


def check_paths(args):
    """Every input path exists (FileNotFoundError naming the flag), before anything is read."""
    need = dict(model=args.model, data=args.data, tokenizer=args.tokenizer, eval_data=args.eval_data)
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


def fill_tiny_paths(args, folder):
    """Point every path flag the user did not give at the tiny assets."""
    for name, value in tiny_paths(folder, args.task).items():
        if getattr(args, name) in (None, "tiny"):
            setattr(args, name, str(value))
    if args.eval_every and args.eval_data in (None, "tiny"):
        args.eval_data = str(Path(folder) / TINY_DATA["gsm8k" if args.task == "text" else "geneval"])


# -----------------------------------------------------------------------------
# Tasks and the data order


def make_task(args, device):
    """The task the flags name (scale.text.TextTask or scale.image.ImageTask): prompts, rollouts, rewards."""
    if args.task == "text":
        return TextTask(args.tokenizer or args.model, args.data, args.max_completion_length)
    return ImageTask(tokenizer=args.tokenizer or args.model, image_tokens=MMaDATokens.load(args.image_tokens),
                     prompts=args.data, vq_model=args.vq_model,
                     reward=make_reward(args.reward, args.reward_model, device=device), max_text_len=args.max_text_len,
                     num_image_tokens=args.num_image_tokens, sampler=args.sampler, guidance_scale=args.guidance_scale,
                     device=device)


def make_evaluator(args, task, cfg):
    """The held-out evaluation of --eval-data with the rollout's canvas and steps, greedy for text (one image
    per prompt, the rollout sampler and guidance for t2i): scale/evaluate.py's evaluators."""
    if args.task == "text":
        decoding = E.TextDecoding(cfg.max_completion_length, cfg.block_length, cfg.diffusion_steps, temperature=0.0)
        return E.TextEval("gsm8k", args.tokenizer or args.model, args.eval_data, decoding, args.eval_limit)
    decoding = E.ImageDecoding(cfg.diffusion_steps, args.guidance_scale, args.sampler, cfg.temperature, 1)
    return E.ImageEval(task, read_geneval_metadata(args.eval_data), decoding, PromptRewardScorer(task.reward),
                       args.eval_limit)


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
    """Rank 0 appends one JSON object per record to <out>/log.jsonl and prints the progress line."""

    def __init__(self, out, d):
        self.d, self.path = d, Path(out) / "log.jsonl"

    def __call__(self, record, line=None):
        if not self.d.is_main:
            return
        with C.disk_full_names(self.path), open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if line:
            print(line, flush=True)


# -----------------------------------------------------------------------------
# Main


def held_out_eval(evaluator, model, step, args, d, out, log):
    """--eval-every: scale/evaluate.py's evaluate() on the held-out slice into <out>/eval/step_N, logged."""
    folder = out / "eval" / C.step_dir_name(step)
    describe = dict(task="gsm8k" if args.task == "text" else "geneval", decoding=asdict(evaluator.decoding),
                    data=E.data_description(args.eval_data, evaluator, args.eval_limit), limit=args.eval_limit,
                    checkpoint=dict(model=str(Path(args.model).resolve()), adapter=None, checkpoint=None, step=step,
                                    label=f"{out.resolve()} at step {step}"),
                    precision=args.precision)
    results = E.evaluate(model, evaluator, folder, d, batch_size=args.micro_batch_size, seed=args.seed,
                         describe=describe, progress=False)
    m = results["metrics"]
    score = "accuracy" if "accuracy" in m else "score"
    log(dict(event="eval", step=step, **m, results=str(folder / "results.json")),
        f"eval at step {step}: {score} {m[score]:.4f} +- {m['stderr']:.4f} (n={m['n']})")


def seed_generators(generators, seed, rank, step):
    """Different streams per rank (different prompts must not share noise). Reseeded from the step
    only when a checkpoint's generator states cannot be restored (it was made with another world size)."""
    for i, g in enumerate(generators.values()):
        g.manual_seed(seed + 1_000_003 * (rank + 1) + 7919 * step + i)


def main(argv=None):
    args = parse_args(argv)
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    with cli.one_line_errors(rank if world > 1 else None):
        # the flags alone: before any process group, file or model is touched
        check_args(args, world, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
        d = D.init_distributed(args.device, hsdp=parallel_mode(args) == "hsdp" and world > 1)
    try:
        with cli.one_line_errors(rank if world > 1 else None), cli.claim_run_folder(args.out, d) as out:
            if args.preset == "tiny":
                if d.is_main and not (out / "tiny_assets").exists():
                    make_tiny_assets(out / "tiny_assets", args.seed)
                D.barrier()
                fill_tiny_paths(args, out / "tiny_assets")
            check_paths(args)
            train(args, d, out)
            D.barrier()  # every rank finished: no peer is still talking to one that tears its group down
        return 0
    finally:
        D.shutdown()


def train(args, d, out):
    # 1. validate every input (files are read only as far as headers) before any model is built
    task = make_task(args, d.device)
    model_cfg, _, _ = C.read_hf_folder(args.model, **task.special)  # config, names, shapes
    task.check_model(model_cfg)
    cfg, lora, mode = grpo_config(args), lora_spec(args), parallel_mode(args)
    evaluator = make_evaluator(args, task, cfg) if args.eval_every else None
    if evaluator is not None:
        evaluator.check_model(model_cfg)
    ckpt_root = out / "checkpoints"
    trainer_state = dict(model_config=asdict(model_cfg), lora=None if lora is None else asdict(lora), task=args.task)
    resume = C.latest_checkpoint(ckpt_root) if args.resume == "latest" else args.resume
    if resume is not None:
        saved = C.read_trainer_state(resume)
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
        saved, rng_ok = C.load_checkpoint(resume, policy, optimizer, generators, d)
        start = saved["step"]
        if not rng_ok:
            seed_generators(generators, args.seed, d.rank, start)
        log(dict(event="resume", step=start, checkpoint=str(resume), rng_restored=rng_ok),
            f"resumed from {resume} at step {start}")
    else:
        log(dict(event="start", args=vars(args), world_size=d.world, model_config=asdict(model_cfg), grpo=asdict(cfg),
                 parallel=mode if d.world > 1 else "none", mesh=None if d.mesh is None else list(d.mesh.shape)),
            f"training --preset {args.preset} --task {args.task} on {d.world} x {d.device.type}")

    # 3. steps
    G = cfg.num_generations
    ctx = lambda: D.compute_context(policy, d.device, args.precision)  # noqa: E731
    for step in range(start, args.max_steps):
        if (args.fail_at_step == step + 1 and start == 0 and d.rank == d.world - 1
                and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"):
            print(f"rank {d.rank}: --fail-at-step {step + 1}: exiting to test the restart", flush=True)
            if args.fail_kills_agent:
                os.kill(os.getppid(), signal.SIGKILL)
            os._exit(1)
        t0 = time.time()
        idx = D.rank_slice(step_prompts(len(task), step, args.batch_size // G, args.seed), d.rank, d.world)
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
        if evaluator is not None and (step + 1) % args.eval_every == 0:
            with D.rollout_params(policy), ctx():
                held_out_eval(evaluator, D.unwrap(policy), step + 1, args, d, out, log)
        if (args.save_every and (step + 1) % args.save_every == 0) or step + 1 == args.max_steps:
            C.save_checkpoint(ckpt_root, step + 1, policy, optimizer, generators, trainer_state, d, keep=args.keep)
    if args.export:
        C.export_hf(policy, out / "export", d, lora=lora, base_model=args.model)
    # equal on every rank iff the replicas agree (DDP) / the gathered shards agree (FSDP2)
    checksums = D.all_gather_tensor(torch.tensor([D.param_checksum(policy)], dtype=torch.float64, device=d.device))
    log(dict(event="done", step=args.max_steps, param_checksums=checksums.cpu().tolist()), "done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
