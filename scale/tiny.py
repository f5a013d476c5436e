"""
The tiny preset's assets: a word-level tokenizer, GSM8K-style data, image prompts, random checkpoints.

Everything is written under <out>/tiny_assets, deterministic from the seed, so the whole pipeline (torchrun,
FSDP2 / DDP, checkpoints, export) runs on CPU with no downloads:
  - a word-level tokenizer with the LLaDA / MMaDA special tokens
  - 40 GSM8K-style questions ("What is 3 plus 4 ?", gold 7) and 8 image prompts; held-out evaluation
    files: 12 GSM8K-test-style questions, 8 MATH500-style problems, 3 GenEval metadata rows
  - a random 2-layer model per task (bf16, 2 shards + index, like the Hub); a unigram prior makes it write
    <reasoning>, \\boxed{ and digits, so GSM8K rewards differ within a group (non-zero advantages)
  - a random MAGVIT-v2 decoder with 16 codes (2x upsampling)
"""

import json
from pathlib import Path

import torch

import maskgrpo
from maskgrpo import ModelConfig
from scale.checkpoints import atomic_output, save_hf_folder
from scale.magvit import CONFIG_NAME as MAGVIT_CONFIG
from scale.magvit import MagvitConfig, MagvitDecoder

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
    MAGVIT-v2 decoder (16 codes, 2x upsampling). Written all or nothing (atomic_output)."""
    with atomic_output(folder, folder=True) as tmp:
        _write_assets(tmp, seed)
    return Path(folder)


def _write_assets(tmp, seed):
    """Every asset into the folder `tmp`; all random draws come from one generator seeded by `seed`."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

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
    (tmp / "magvit" / MAGVIT_CONFIG).write_text(json.dumps(TINY_MAGVIT))
    decoder = MagvitDecoder(MagvitConfig.from_json(tmp / "magvit" / MAGVIT_CONFIG))
    with torch.no_grad():
        for p in decoder.decoder.parameters():
            p.normal_(0, 0.2, generator=g)
    save_file({k: v.contiguous() for k, v in decoder.state_dict().items()}, tmp / "magvit" / "magvit.safetensors")
    _write_eval_data(tmp, torch.Generator().manual_seed(seed + 1))


def _write_eval_data(tmp, g):
    """Held-out evaluation files in the real layouts: GSM8K test (openai/gsm8k), MATH500 (problem, answer)
    and GenEval's evaluation_metadata.jsonl (tag, include, prompt). Their own generator: the training
    assets above are the same with or without them."""
    with open(tmp / "gsm8k_test.jsonl", "w") as f:
        for _ in range(12):
            a, b = torch.randint(0, 5, (2,), generator=g).tolist()
            f.write(json.dumps({"question": f"What is {a} plus {b} ?", "answer": f"{a} plus {b} is {a + b} . #### {a + b}"})
                    + "\n")
    with open(tmp / "math500.jsonl", "w") as f:
        for _ in range(8):
            a, b = torch.randint(0, 5, (2,), generator=g).tolist()
            f.write(json.dumps({"problem": f"What is {a} plus {b} ?", "answer": str(a + b)}) + "\n")
    with open(tmp / "geneval_metadata.jsonl", "w") as f:
        for color, shape in (("red", "circle"), ("green", "square"), ("blue", "circle")):
            include = [{"class": shape, "count": 1, "color": color}]
            f.write(json.dumps({"tag": "colors", "include": include, "prompt": f"a {color} {shape}"}) + "\n")


# the data file of each task: training (text, t2i) and evaluation (gsm8k, math500, geneval)
TINY_DATA = dict(text="gsm8k.jsonl", t2i="prompts.txt", gsm8k="gsm8k_test.jsonl", math500="math500.jsonl",
                 geneval="geneval_metadata.jsonl")


def tiny_paths(folder, task):
    """The path of every input flag, pointing into the tiny assets."""
    folder = Path(folder)
    model = "model_t2i" if task in ("t2i", "geneval") else "model_text"
    return dict(model=folder / model, tokenizer=folder / "tokenizer.json", data=folder / TINY_DATA[task],
                vq_model=folder / "magvit", image_tokens=folder / "image_tokens.json")
