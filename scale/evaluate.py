"""
The evaluation job: GSM8K / MATH500 accuracy and GenEval-layout image scores of a checkpoint, self-described.

    # LLaDA-8B-Instruct on GSM8K test with the official evaluation settings (scale/README.md cites each), 8 GPUs
    torchrun --standalone --nproc_per_node=8 scale/evaluate.py --task gsm8k --model /ckpt/LLaDA-8B-Instruct \\
        --data /data/gsm8k_test.jsonl --out runs/eval/llada_gsm8k_256
    # after training: exported LoRA adapters (--adapter runs/llada/export) or a DCP training checkpoint
    # (--checkpoint runs/llada/checkpoints/step_000500); MATH500: --task math500 --data /data/math500.jsonl
    # MMaDA: images in GenEval's folder layout, scored in process with CLIP
    torchrun --standalone --nproc_per_node=8 scale/evaluate.py --task geneval --model /ckpt/MMaDA-8B-Base \\
        --vq-model /ckpt/magvitv2 --data evaluation_metadata.jsonl --reward clip --reward-model /ckpt/clip --out runs/eval/g
    # CPU smoke test: the tiny preset's model and data, written under --out
    python scale/evaluate.py --preset tiny --task gsm8k --out runs/tiny_eval

How it runs. The rows are cut into global batches of --batch-size in file order; batch b runs on rank
b mod W with a generator seeded by (--seed, b), so no output depends on the world size. Each rank appends
its finished batches to <out>/partial/rank<r>.jsonl as it goes, and a rerun with the same --out skips every
batch found there (a killed evaluation resumes). Rank 0 then gathers the rows into <out>/examples.jsonl and
writes <out>/results.json: the task, the data file's sha256 and row count, the checkpoint and its step, every
decoding setting, torch / CUDA versions, device, world size, seed, wall time, and the score with its standard
error. The folder must be one every rank sees. train.py --eval-every runs the same `evaluate`.
"""

import argparse
import hashlib
import importlib.metadata
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `scale` and `maskgrpo` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import maskgrpo  # noqa: E402
from scale import checkpoints as C  # noqa: E402
from scale import (
    cli,  # noqa: E402
    text,  # noqa: E402
)
from scale import distributed as D  # noqa: E402
from scale.image import (  # noqa: E402
    ImageTask,
    MMaDATokens,
    PromptRewardScorer,
    make_reward,
    read_geneval_metadata,
    write_geneval_sample,
)
from scale.tiny import make_tiny_assets, tiny_paths  # noqa: E402

TEXT_TASKS, IMAGE_TASKS = ("gsm8k", "math500"), ("geneval",)

# -----------------------------------------------------------------------------
# Decoding settings (defaults: the official evaluation, cited in scale/README.md)


@dataclass(frozen=True)
class TextDecoding:
    gen_length: int = 256  # completion tokens (scripts/eval/GSM8K.sh GEN_LENGTH; the paper also reports 512)
    block_length: int = 16  # semi-autoregressive block (GSM8K.sh BLOCK_LEN)
    steps: int = 128  # denoising steps: gen_length // 2 (distributed_inference_t2t.py sets it so)
    temperature: float = 0.0  # greedy (distributed_inference_t2t.py's evaluate())
    cache: str = "none"  # Fast-dLLM KV cache: none (exact), prefix or dual (approximate)
    threshold: float | None = None  # confidence-threshold parallel decoding (None = exact)

    def __post_init__(self):
        for flag, value in (("--gen-length", self.gen_length), ("--block-length", self.block_length),
                            ("--steps", self.steps)):
            if value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        if self.gen_length % self.block_length:
            raise ValueError(f"--block-length {self.block_length} must divide --gen-length {self.gen_length}")
        blocks = self.gen_length // self.block_length
        if self.steps % blocks:
            raise ValueError(f"--steps {self.steps} must be a multiple of the number of blocks "
                             f"(--gen-length / --block-length = {blocks})")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"--temperature must be a finite number >= 0, got {self.temperature}")
        if self.cache not in maskgrpo.CACHES:
            raise ValueError(f"--cache must be one of {maskgrpo.CACHES}, got {self.cache!r}")
        if self.threshold is not None and not 0 < self.threshold <= 1:
            raise ValueError(f"--threshold must be in (0, 1], got {self.threshold}")


@dataclass(frozen=True)
class ImageDecoding:
    steps: int = 32  # scripts/eval/GenEval.sh --sample_steps
    guidance_scale: float = 3.5  # GenEval.sh --cfg
    sampler: str = "emerge"  # distributed_inference_t2i.py's t2i_generate_emerge
    temperature: float = 1.0  # its generation_temperature
    samples_per_prompt: int = 4  # GenEval.sh --sample_per_prompt (GenEval's own default: 4)

    def __post_init__(self):
        for flag, value in (("--steps", self.steps), ("--samples-per-prompt", self.samples_per_prompt)):
            if value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        if self.sampler not in ("emerge", "maskgit"):
            raise ValueError(f"--sampler must be 'emerge' or 'maskgit', got {self.sampler!r}")
        for flag, value in (("--guidance-scale", self.guidance_scale), ("--temperature", self.temperature)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{flag} must be a finite number >= 0, got {value}")


def standard_error(values):
    """Standard error of the mean, sqrt(var / n) with the sample variance (n - 1); 0 for one value."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


# -----------------------------------------------------------------------------
# Evaluators: rows -> records (generate and score one batch), records -> metrics


class TextEval:
    """GSM8K test or MATH500 with the official zero-shot prompt; the answer is extracted as the training
    reward does (last \\boxed{}, else <answer>) and checked with math-verify."""

    def __init__(self, task, tokenizer, data, decoding: TextDecoding, limit=None):
        self.decoding = decoding
        rows = text.EVAL_TASKS[task][0](data)
        self.rows_in_file, self.rows = len(rows), rows[:limit]
        self.tokenizer = text.load_tokenizer(tokenizer)
        self.tokens = text.ChatTokens.from_tokenizer(self.tokenizer)
        self.prompt_ids = text.eval_prompts(task, self.tokenizer, self.rows, self.tokens)
        self.special = dict(mask_token_id=self.tokens.mask, eos_token_id=self.tokens.eos)

    def __len__(self):
        return len(self.rows)

    def check_model(self, model_cfg):
        text.check_fits(self.tokenizer, self.prompt_ids, model_cfg, self.decoding.gen_length, "--gen-length")

    def run(self, model, idx, generator, device, out):
        t, dec = text, self.decoding
        ids, mask = t.left_pad([self.prompt_ids[i] for i in idx], self.tokens.eos, mask_id=self.tokens.mask)
        seq = maskgrpo.generate_text(model, ids.to(device), gen_length=dec.gen_length, block_length=dec.block_length,
                                     steps=dec.steps, temperature=dec.temperature, mask_id=self.tokens.mask,
                                     generator=generator, attention_mask=mask.to(device), cache=dec.cache,
                                     threshold=dec.threshold)
        records = []
        for i, row in zip(idx, seq[:, ids.shape[1]:].cpu(), strict=True):
            completion = t.completion_text(self.tokenizer, row, tokens=self.tokens)
            answer, correct = t.score_answer(completion, self.rows[i]["gold"])
            records.append(dict(index=i, question=self.rows[i]["question"],
                                prompt=self.tokenizer.decode(self.prompt_ids[i], skip_special_tokens=False),
                                completion=completion, answer=answer, gold=self.rows[i]["gold"], correct=correct))
        return records

    def metrics(self, records):
        correct = [float(r["correct"]) for r in records]
        return dict(accuracy=sum(correct) / len(correct), stderr=standard_error(correct), n=len(correct))

    def describe(self):
        checker = text.ANSWER_CHECKER
        version = importlib.metadata.version("math-verify") if checker == "math-verify" else None
        return dict(prompt="official zero-shot: one user turn '<instructions>\\n\\n<question>', '<reasoning>' prefilled",
                    answer_extraction="last \\boxed{...}, else the last <answer>...</answer> (scale.text.extract_answer)",
                    answer_checker=checker, answer_checker_version=version)


class ImageEval:
    """GenEval prompts: --samples-per-prompt images each, written in GenEval's folder layout (so that its
    detector-based scorer can be run on them) and scored in process by an ImageScorer (CLIP, or the stub)."""

    def __init__(self, task, metadata, decoding: ImageDecoding, scorer, limit=None):
        self.task, self.decoding, self.scorer = task, decoding, scorer
        self.rows_in_file, self.metadata = len(metadata), metadata[:limit]
        self.text_ids = [task.encode(m["prompt"]) for m in self.metadata]
        self.items = [(p, k) for p in range(len(self.metadata)) for k in range(decoding.samples_per_prompt)]
        self.special = task.special

    def __len__(self):
        return len(self.items)

    def check_model(self, model_cfg):
        self.task.check_model(model_cfg)

    def run(self, model, idx, generator, device, out):
        dec, items = self.decoding, [self.items[j] for j in idx]
        seq, _ = self.task.generate(model, [self.text_ids[p] for p, _ in items], steps=dec.steps,
                                    temperature=dec.temperature, generator=generator, device=device)
        pixels = self.task.pixels(seq)  # (B, 3, H, W) in [0, 1]
        rows = [self.metadata[p] for p, _ in items]
        scores = self.scorer(pixels, rows).float().cpu().tolist()
        records = []
        for j, (p, k), image, score in zip(idx, items, pixels, scores, strict=True):
            path = write_geneval_sample(Path(out) / "images", p, k, self.metadata[p], image)
            records.append(dict(index=j, prompt_index=p, sample=k, prompt=self.metadata[p]["prompt"],
                                tag=self.metadata[p]["tag"], file=str(path.relative_to(out)),
                                score=score))
        return records

    def metrics(self, records):
        scores = [r["score"] for r in records]
        by_tag = {}
        for r in records:
            by_tag.setdefault(r["tag"], []).append(r["score"])
        return dict(score=sum(scores) / len(scores), stderr=standard_error(scores), n=len(scores),
                    by_tag={t: sum(v) / len(v) for t, v in sorted(by_tag.items())})

    def describe(self):
        return dict(images="images/", layout="GenEval: <5-digit prompt index>/metadata.jsonl and samples/<5-digit>.png",
                    scorer=type(getattr(self.scorer, "reward", self.scorer)).__name__)


# -----------------------------------------------------------------------------
# The evaluation loop: batches over ranks, partial files, gather, results.json

PARTIAL, SETTINGS = "partial", "settings.json"


def _read_partial(folder):
    """{index: record} of every complete line under folder (a line cut short by a kill is skipped)."""
    done = {}
    for path in sorted(Path(folder).glob("rank*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[record["index"]] = record
    return done


def _claim_settings(folder, settings, d):
    """Record the settings of this evaluation in its partial folder; refuse to resume one made with others."""
    problem = None
    if d.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / SETTINGS
        if path.is_file():
            old = C.read_json(path)
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            if diff:
                problem = (f"{folder.parent} holds a partial evaluation made with other settings ({diff[0]}: "
                           f"{old.get(diff[0])!r} there, {settings.get(diff[0])!r} here): choose another --out, or "
                           f"delete {folder} to start over")
        else:
            with C.atomic_output(path) as tmp:
                tmp.write_text(json.dumps(settings, indent=2))
    problem = D.broadcast_object(problem, d)
    if problem is not None:
        raise ValueError(problem)


def evaluate(model, ev, out, d, *, batch_size, seed, describe, fail_after_batches=None, progress=True):
    """Run evaluator `ev` over its rows on every rank (batch b on rank b mod W, generator seeded by (seed, b)),
    resumably under out/partial; then rank 0 writes out/examples.jsonl and out/results.json. Every rank must
    call this (with the model ready for local forwards). Returns results.json's content on every rank."""
    from tqdm import tqdm

    out, t0 = Path(out), time.time()
    partial = out / PARTIAL
    _claim_settings(partial, dict(describe, batch_size=batch_size, seed=seed, rows=len(ev)), d)
    D.barrier()
    batches = [list(range(s, min(s + batch_size, len(ev)))) for s in range(0, len(ev), batch_size)]
    done = set(_read_partial(partial))
    mine = [b for b in range(len(batches)) if b % d.world == d.rank and not set(batches[b]) <= done]
    own = partial / f"rank{d.rank}.jsonl"
    if own.is_file() and not own.read_bytes().endswith(b"\n"):  # a line a kill cut short: end it, so it stays apart
        with open(own, "a") as f:
            f.write("\n")
    with torch.no_grad():
        for n, b in enumerate(tqdm(mine, desc=f"evaluate {len(ev)} rows", disable=not (progress and d.is_main))):
            g = torch.Generator(d.device).manual_seed(seed * 1_000_003 + b)
            lines = "".join(json.dumps(r) + "\n" for r in ev.run(model, batches[b], g, d.device, out))
            with C.disk_full_names(partial), open(own, "a") as f:
                f.write(lines)
                f.flush()
                os.fsync(f.fileno())
            if fail_after_batches is not None and n + 1 == fail_after_batches:
                print(f"rank {d.rank}: --fail-after-batches {n + 1}: exiting to test the resume", flush=True)
                os._exit(1)
    D.barrier()
    results = None
    if d.is_main:
        records = _read_partial(partial)
        missing = sorted(set(range(len(ev))) - set(records))
        if missing:
            raise RuntimeError(f"rows {missing[:5]} were not evaluated (is {out} on a file system every rank sees?)")
        records = [records[i] for i in range(len(ev))]
        results = dict(describe, metrics=ev.metrics(records), batch_size=batch_size, seed=seed, world_size=d.world,
                       rows_resumed=len(done), wall_time_s=round(time.time() - t0, 2), environment=environment(d),
                       evaluator=ev.describe(), finished=time.strftime("%Y-%m-%d %H:%M:%S"))
        with C.disk_full_names(out), C.atomic_output(out / "examples.jsonl") as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        with C.disk_full_names(out), C.atomic_output(out / "results.json") as tmp:
            tmp.write_text(json.dumps(results, indent=2) + "\n")
    return D.broadcast_object(results, d)


def environment(d):
    device = torch.cuda.get_device_name(d.device) if d.device.type == "cuda" else "cpu"
    return dict(torch=torch.__version__, cuda=torch.version.cuda, device=device, device_type=d.device.type)


def summary_line(results):
    m, task = results["metrics"], results["task"]
    what = (f"accuracy {100 * m['accuracy']:.2f} +- {100 * m['stderr']:.2f}" if "accuracy" in m
            else f"score {m['score']:.4f} +- {m['stderr']:.4f}")
    return (f"{task}: {what} (n={m['n']}) | {results['checkpoint']['label']} | "
            f"{json.dumps(results['decoding'], separators=(',', ':'))} | {results['world_size']} x "
            f"{results['environment']['device']} | {results['wall_time_s']:.0f} s")


# -----------------------------------------------------------------------------
# Command line


def build_parser():
    p = cli.Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=TEXT_TASKS + IMAGE_TASKS, required=True)
    p.add_argument("--preset", choices=("tiny",), help="tiny: the tiny preset's model and data, written under --out")
    g = p.add_argument_group("what is evaluated")
    g.add_argument("--model", help="HF checkpoint folder (config.json + safetensors)")
    g.add_argument("--adapter", help="a PEFT LoRA adapter folder (train.py --export with LoRA) applied to --model")
    g.add_argument("--checkpoint", help="a training checkpoint folder (<out>/checkpoints/step_N) of a run on --model")
    g.add_argument("--tokenizer", help="folder or tokenizer.json (default: the model folder)")
    g.add_argument("--data", help="gsm8k: openai/gsm8k layout (question, answer); math500: problem, answer; "
                                  "geneval: evaluation_metadata.jsonl")
    g.add_argument("--limit", type=int, help="evaluate the first K rows (prompts for geneval) only")
    g = p.add_argument_group("text decoding (maskgrpo.generate_text)")
    text_defaults = TextDecoding()
    g.add_argument("--gen-length", type=int, default=text_defaults.gen_length)
    g.add_argument("--block-length", type=int, default=text_defaults.block_length)
    g.add_argument("--steps", type=int, help="denoising steps (default: --gen-length / 2 for text, 32 for images)")
    g.add_argument("--temperature", type=cli.finite_float, help="default: 0 (greedy) for text, 1 for images")
    g.add_argument("--cache", choices=maskgrpo.CACHES, default=text_defaults.cache,
                   help="Fast-dLLM KV cache (approximate); none = the exact sampler")
    g.add_argument("--threshold", type=cli.finite_float, help="confidence-threshold parallel decoding (default: exact)")
    g = p.add_argument_group("image decoding (maskgrpo.generate_image) and scoring")
    image_defaults = ImageDecoding()
    g.add_argument("--guidance-scale", type=cli.finite_float, default=image_defaults.guidance_scale)
    g.add_argument("--sampler", choices=("emerge", "maskgit"), default=image_defaults.sampler)
    g.add_argument("--samples-per-prompt", type=int, default=image_defaults.samples_per_prompt)
    g.add_argument("--max-text-len", type=int, default=257)
    g.add_argument("--num-image-tokens", type=int, default=1024)
    g.add_argument("--vq-model", help="MAGVIT-v2 weights (file or folder)")
    g.add_argument("--image-tokens", default="mmada-8b", help="'mmada-8b' or a JSON file of scale.image.MMaDATokens fields")
    g.add_argument("--reward", choices=("clip", "stub"), default="clip", help="in-process image score")
    g.add_argument("--reward-model", help="clip: local CLIP folder (transformers)")
    g = p.add_argument_group("run")
    g.add_argument("--out", required=True, help="results.json, examples.jsonl, partial/ (and images/ for geneval)")
    g.add_argument("--batch-size", type=int, default=8, help="rows per forward (distributed_inference_t2t.py: 8)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    g.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda if available")
    g.add_argument("--fail-after-batches", type=int, help="test hook: rank 0 exits after this many batches")
    return p


# --preset tiny: defaults that fit the tiny preset's model (a flag on the command line wins)
TINY = dict(device="cpu", gen_length=16, block_length=8, max_text_len=8, num_image_tokens=16, reward="stub")


def parse_args(argv=None):
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    if known.preset == "tiny":
        parser.set_defaults(**TINY, steps=4 if known.task in IMAGE_TASKS else None)
    return parser.parse_args(argv)


def decoding_from(args):
    """The decoding settings the flags give (validated: errors name the flag)."""
    if args.task in TEXT_TASKS:
        steps = args.steps if args.steps is not None else args.gen_length // 2
        temperature = 0.0 if args.temperature is None else args.temperature
        return TextDecoding(args.gen_length, args.block_length, steps, temperature, args.cache, args.threshold)
    defaults = ImageDecoding()
    return ImageDecoding(args.steps or defaults.steps, args.guidance_scale, args.sampler,
                         defaults.temperature if args.temperature is None else args.temperature, args.samples_per_prompt)


def check_args(args):
    """Cross-flag checks, before any process group or file is touched (ValueError naming the flags)."""
    decoding = decoding_from(args)
    if args.adapter and args.checkpoint:
        raise ValueError("--adapter and --checkpoint exclude each other (an adapter folder, or a training checkpoint)")
    if args.preset is None and not (args.model and args.data):
        raise ValueError("--model and --data are needed (or --preset tiny)")
    if args.task in IMAGE_TASKS and args.preset is None and not args.vq_model:
        raise ValueError(f"--task {args.task} needs --vq-model (MAGVIT-v2 weights)")
    if args.task in IMAGE_TASKS and args.reward == "clip" and args.preset is None and not args.reward_model:
        raise ValueError("--reward clip needs --reward-model (a local CLIP folder)")
    for flag in ("limit", "batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    return decoding


def make_evaluator(args, decoding, device):
    if args.task in TEXT_TASKS:
        return TextEval(args.task, args.tokenizer or args.model, args.data, decoding, args.limit)
    metadata = read_geneval_metadata(args.data)
    task = ImageTask(tokenizer=args.tokenizer or args.model, image_tokens=MMaDATokens.load(args.image_tokens),
                     prompts=args.data, vq_model=args.vq_model, reward=None, max_text_len=args.max_text_len,
                     num_image_tokens=args.num_image_tokens, sampler=decoding.sampler,
                     guidance_scale=decoding.guidance_scale, device=device)
    scorer = PromptRewardScorer(make_reward(args.reward, args.reward_model, device=device))
    return ImageEval(task, metadata, decoding, scorer, args.limit)


def load_model(args, model_cfg, d):
    """The model to evaluate on every rank (no sharding: each rank generates its own batches): the HF folder,
    plus a PEFT adapter or a training checkpoint's trained weights. Returns (model, label, step)."""
    spec, adapter, step = None, None, None
    if args.adapter:
        fields, adapter = C.read_peft_adapter(args.adapter)
        try:
            spec = D.LoRASpec(**fields)
        except ValueError as e:
            raise ValueError(f"{Path(args.adapter) / C.ADAPTER_CONFIG}: {e}") from None
    if args.checkpoint:
        state = C.read_trainer_state(args.checkpoint)
        if state.get("model_config") != json.loads(json.dumps(asdict(model_cfg))):
            raise ValueError(f"{Path(args.checkpoint) / C.TRAINER_STATE}: the checkpoint was trained on a model with "
                             f"config {state.get('model_config')}, --model {args.model} has {asdict(model_cfg)}")
        spec = None if state.get("lora") is None else D.LoRASpec(**{**state["lora"], "targets": tuple(state["lora"]["targets"])})
    # trainable: the layout training saved from (LoRA adapters, or every weight in fp32 for full fine-tuning)
    model = D.build_model(args.model, model_cfg, d, mode="local", lora=spec, precision=args.precision,
                          trainable=spec is not None or args.checkpoint is not None, gradient_checkpointing=False)
    if adapter is not None:
        own = {k: v for k, v in model.state_dict().items() if ".lora_" in k}
        wrong = sorted(set(own) ^ set(adapter)) or [k for k in own if own[k].shape != adapter[k].shape]
        if wrong:
            raise ValueError(f"{Path(args.adapter) / C.ADAPTER_WEIGHTS} does not fit --model {args.model}: "
                             f"{wrong[0]} differs (missing, extra or of another shape)")
        model.load_state_dict(adapter, strict=False)
    if args.checkpoint:
        step = C.load_checkpoint(args.checkpoint, model, d=d)[0]["step"]
    resolved = {k: None if v is None else str(Path(v).resolve()) for k, v in
                (("model", args.model), ("adapter", args.adapter), ("checkpoint", args.checkpoint))}
    r = resolved
    label = r["checkpoint"] or (f"{r['model']} + {r['adapter']}" if r["adapter"] else r["model"])
    return model.eval().requires_grad_(False), dict(resolved, step=step, label=label)


def data_description(path, ev, limit):
    """The data file named by its content: path, sha256, rows in the file and rows evaluated."""
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    evaluated = ev.rows_in_file if limit is None else min(limit, ev.rows_in_file)
    return dict(path=str(Path(path).resolve()), sha256=digest, rows_in_file=ev.rows_in_file, rows_evaluated=evaluated)


def main(argv=None):
    args = parse_args(argv)
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    where = rank if world > 1 else None
    with cli.one_line_errors(where):
        decoding = check_args(args)
        d = D.init_distributed(args.device)
    try:
        with cli.one_line_errors(where), cli.claim_run_folder(args.out, d) as out:
            if args.preset == "tiny":
                if d.is_main and not (out / "tiny_assets").exists():
                    make_tiny_assets(out / "tiny_assets", args.seed)
                D.barrier()
                for name, value in tiny_paths(out / "tiny_assets", args.task).items():
                    if getattr(args, name) is None or (name == "image_tokens" and args.image_tokens == "mmada-8b"):
                        setattr(args, name, str(value))
            for flag in ("model", "adapter", "checkpoint", "tokenizer", "data", "vq_model", "reward_model"):
                path = getattr(args, flag)
                if path is not None and not Path(path).exists() and not (flag == "reward_model" and args.reward == "stub"):
                    raise FileNotFoundError(f"--{flag.replace('_', '-')}: not found: {path}")
            ev = make_evaluator(args, decoding, d.device)
            model_cfg, _, _ = C.read_hf_folder(args.model, **ev.special)
            ev.check_model(model_cfg)  # prompt + generation fit the model, before it is built
            model, checkpoint = load_model(args, model_cfg, d)
            describe = dict(task=args.task, data=data_description(args.data, ev, args.limit), checkpoint=checkpoint,
                            decoding=asdict(decoding), limit=args.limit, precision=args.precision)
            with D.compute_context(model, d.device, args.precision):
                results = evaluate(model, ev, out, d, batch_size=args.batch_size, seed=args.seed, describe=describe,
                                   fail_after_batches=args.fail_after_batches if d.rank == 0 else None)
            if d.is_main:
                print(summary_line(results), flush=True)
            D.barrier()
        return 0
    finally:
        D.shutdown()


if __name__ == "__main__":
    sys.exit(main())
