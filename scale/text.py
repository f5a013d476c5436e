"""
The text task: LLaDA chat prompts, GSM8K / MATH500 files, answer checking, rewards, GSM8K training rollouts.

LLaDA-8B-Instruct (tokenizer_config.json on the Hub): bos <|startoftext|> 126080, eos <|endoftext|>
126081, mask <|mdm_mask|> 126336, <|start_header_id|> 126346, <|end_header_id|> 126347, <|eot_id|>
126348. Its chat template (Llama-3 style, each content `| trim`-med):

    <|startoftext|><|start_header_id|>user<|end_header_id|>\\n\\n{question}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n

GSM8K rewards, as the official MaskGRPO text run (the official grpo/mask_grpo_train.py uses exactly these
three): 2.0 if the last \\boxed{...} answer equals the gold, 0.5 if that answer is an integer, 0.5 if the
completion has a <reasoning>...</reasoning> block. Each reward is a function
(completions: list[str], golds: list[str]) -> list[float].
"""

import importlib.util
import json
import logging
import re
import threading
from dataclasses import dataclass, fields
from pathlib import Path

import torch

import maskgrpo
from scale.checkpoints import read_json

# -----------------------------------------------------------------------------
# Tokenizer and chat template

# Token strings of the LLaDA tokenizer (the ids are read from the tokenizer, never written here).
LLADA_TOKEN_STRINGS = {
    "bos": "<|startoftext|>",
    "eos": "<|endoftext|>",
    "start_header": "<|start_header_id|>",
    "end_header": "<|end_header_id|>",
    "eot": "<|eot_id|>",
    "mask": "<|mdm_mask|>",
}


def load_tokenizer(path):
    """A `tokenizers.Tokenizer` from a tokenizer.json file or a folder that contains one."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer.json not found: {path}")
    from tokenizers import Tokenizer  # lazy: only the scale/ extra needs `tokenizers`

    return Tokenizer.from_file(str(path))


@dataclass(frozen=True)
class ChatTokens:
    """Special token ids of the chat template, read from a tokenizer by token string."""

    bos: int
    eos: int
    start_header: int
    end_header: int
    eot: int
    mask: int

    def __post_init__(self):
        ids = {f.name: getattr(self, f.name) for f in fields(self)}
        if len(set(ids.values())) != len(ids):
            raise ValueError(f"ChatTokens ids must be distinct, got {ids}")

    @classmethod
    def from_tokenizer(cls, tokenizer, strings=None):
        """Look every token string up with tokenizer.token_to_id (tokenizers.Tokenizer API)."""
        strings = LLADA_TOKEN_STRINGS if strings is None else strings
        ids = {}
        for name, token in strings.items():
            token_id = tokenizer.token_to_id(token)
            if token_id is None:
                raise ValueError(f"tokenizer has no token {token!r} (needed for ChatTokens.{name})")
            ids[name] = token_id
        return cls(**ids)


def _messages(question, system):
    if isinstance(question, str):
        messages = [{"role": "user", "content": question}]
    else:
        messages = list(question)
    if system is not None:
        messages = [{"role": "system", "content": system}] + messages
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not {"role", "content"} <= set(m):
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
    return messages


def chat_template_text(question, *, system=None, strings=None):
    """The LLaDA chat template rendered as a string (reference for `chat_prompt`).

    question: the user text, or a list of {"role", "content"} messages."""
    s = LLADA_TOKEN_STRINGS if strings is None else strings
    text = s["bos"]
    for m in _messages(question, system):
        text += f"{s['start_header']}{m['role']}{s['end_header']}\n\n{m['content'].strip()}{s['eot']}"
    return text + f"{s['start_header']}assistant{s['end_header']}\n\n"


def _encoder(tokenizer):
    """str -> list[int] without special tokens, for a tokenizers.Tokenizer (encode(...).ids),
    a transformers tokenizer (encode(...) -> list) or a plain callable."""
    if hasattr(tokenizer, "encode"):
        def encode(text):
            out = tokenizer.encode(text, add_special_tokens=False)
            return list(out.ids) if hasattr(out, "ids") else list(out)
        return encode
    if callable(tokenizer):
        return lambda text: list(tokenizer(text))
    raise ValueError(f"tokenizer must have .encode or be callable, got {type(tokenizer).__name__}")


def chat_prompt(tokenizer, question, *, tokens: ChatTokens, system=None, prefill=""):
    """Prompt ids of the LLaDA chat template, ending with the assistant header for generation:

        bos, then per message  <|start_header_id|> role <|end_header_id|> "\\n\\n" content <|eot_id|>,
        then <|start_header_id|> assistant <|end_header_id|> "\\n\\n" prefill

    tokenizer: a tokenizers.Tokenizer, or any callable str -> list[int] (text without special tokens).
    Special ids come from `tokens`; the text pieces are encoded separately, which is what encoding the
    rendered string does too (added tokens split the text first). prefill: the start of the answer, already
    written (the official evaluation writes "<reasoning>")."""
    encode = _encoder(tokenizer)
    ids = [tokens.bos]
    for m in _messages(question, system):
        ids += [tokens.start_header, *encode(m["role"]), tokens.end_header, *encode("\n\n" + m["content"].strip()), tokens.eot]
    return ids + [tokens.start_header, *encode("assistant"), tokens.end_header, *encode("\n\n" + prefill)]


def completion_text(tokenizer, ids, *, tokens: ChatTokens):
    """Decode a completion up to (not including) its first <|eot_id|> or <|endoftext|>, special
    tokens skipped. ids: a list or 1-D tensor of token ids."""
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    stops = [i for i, t in enumerate(ids) if t in (tokens.eot, tokens.eos)]
    return tokenizer.decode(ids[: stops[0]] if stops else ids, skip_special_tokens=True)


def left_pad(sequences, pad_id, *, mask_id):
    """Left-pad id lists to one length. Returns ids (B, L) long and attention_mask (B, L) bool
    (False on padding). pad_id must differ from mask_id: a pad that reads as [MASK] would be a
    position the model is asked to predict (LLaDA's official RL code pads with eos)."""
    if pad_id == mask_id:
        raise ValueError(f"pad_id={pad_id} equals mask_id={mask_id}: padding must never be the mask token")
    if not sequences:
        raise ValueError("left_pad needs at least one sequence, got none")
    empty = [i for i, s in enumerate(sequences) if len(s) == 0]
    if empty:
        raise ValueError(f"sequence(s) {empty} are empty")
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)  # (B, L)
    attention_mask = torch.zeros(len(sequences), length, dtype=torch.bool)  # (B, L)
    for i, s in enumerate(sequences):
        ids[i, length - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
        attention_mask[i, length - len(s):] = True
    return ids, attention_mask


# -----------------------------------------------------------------------------
# Data files: GSM8K (train and test, openai/gsm8k's layout) and MATH500 (problem, answer)

# The official MaskGRPO LLaDA prompt (grpo/data_utils.py): reasoning block, then the boxed answer.
GSM8K_SYSTEM_PROMPT = (
    "You are a math expert. You will be given a question to solve. Solve it step by step. "
    "Wrap the final answer in a \\boxed{}. \nRespond in the following format:\n<reasoning>\n"
    "Your reasoning here\n</reasoning>\n\\boxed{...}"
)
# The official evaluation's MATH500 instructions (dataset/math500.py): the same, without the space before "\n"
MATH500_SYSTEM_PROMPT = GSM8K_SYSTEM_PROMPT.replace("\\boxed{}. \n", "\\boxed{}.\n")


def gsm8k_user_message(question):
    """The user turn of the official LLaDA GSM8K training prompt: instructions, then the question."""
    return f"{GSM8K_SYSTEM_PROMPT}\n\nQuestion:{question}\n"


def gsm8k_gold(answer):
    """Gold answer of a GSM8K solution: the text after "####", stripped, thousands commas removed.
    "... so she has 1,200 left.\\n#### 1,200" -> "1200"."""
    if "####" not in answer:
        raise ValueError(f"GSM8K answer has no '####' marker: {answer[-80:]!r}")
    return answer.split("####")[-1].strip().replace(",", "")


def read_records(path):
    """[(where, record)] of a .jsonl (one JSON object per line), .json (a list of objects) or .parquet file;
    `where` names the file and line (or record) for error messages. Malformed input raises ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: data file not found")
    if path.suffix == ".jsonl":
        out = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    out.append((f"{path}, line {n}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}, line {n}: not valid JSON ({e.msg}, column {e.colno})") from None
    elif path.suffix == ".json":
        records = read_json(path)
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
        out = [(f"{path}, record {i}", r) for i, r in enumerate(records)]
    elif path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ImportError("reading .parquet needs the `pyarrow` package (pip install pyarrow)") from e
        out = [(f"{path}, record {i}", r) for i, r in enumerate(pq.read_table(path).to_pylist())]
    else:
        raise ValueError(f"{path}: suffix {path.suffix!r} is not one of .jsonl, .json, .parquet")
    if not out:
        raise ValueError(f"{path}: no records")
    for where, r in out:
        if not isinstance(r, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(r).__name__}")
    return out


def _fields(where, record, names):
    missing = [n for n in names if not isinstance(record.get(n), str)]
    if missing:
        raise ValueError(f"{where}: lacks text field(s) {missing} (has {sorted(record)})")
    return [record[n] for n in names]


def load_gsm8k(path):
    """GSM8K as a list of {"question", "answer", "gold"} dicts, from a local .jsonl / .json / .parquet file
    with fields question and answer (the layout of openai/gsm8k; its train and test splits alike)."""
    rows = []
    for where, r in read_records(path):
        question, answer = _fields(where, r, ("question", "answer"))
        if "####" not in answer:
            raise ValueError(f"{where}: the answer has no '####' marker before the gold number: {answer[-60:]!r}")
        rows.append({"question": question, "answer": answer, "gold": gsm8k_gold(answer)})
    return rows


def load_math500(path):
    """MATH500 (HuggingFaceH4/MATH-500's layout) as {"question", "gold"} dicts, from a file of records with
    fields problem and answer."""
    return [dict(zip(("question", "gold"), _fields(where, r, ("problem", "answer")), strict=True))
            for where, r in read_records(path)]


# -----------------------------------------------------------------------------
# Answer extraction and checking

# Which checker `answers_match` uses: math-verify (symbolic, handles LaTeX) when installed, else a
# numeric comparison. Found without importing math_verify (its import is slow).
ANSWER_CHECKER = "math-verify" if importlib.util.find_spec("math_verify") else "numeric"


def extract_boxed(text):
    """Content of the last \\boxed{...} (balanced braces), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None  # unbalanced: the completion was cut off inside the box


_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extract_answer(completion):
    """The final answer of a completion: the last \\boxed{...}; else the last <answer>...</answer>
    (math-verify cannot parse the tags themselves, so they are stripped first); else None."""
    boxed = extract_boxed(completion)
    if boxed is not None:
        return boxed
    tagged = _ANSWER_TAG.findall(completion)
    if tagged:
        inner = tagged[-1].strip()
        return extract_boxed(inner) or inner
    return None


def _normalise_number(text):
    text = text.strip().replace(",", "").replace("$", "").replace("\\%", "").replace("%", "").strip()
    return text[:-1] if text.endswith(".") else text


def _numeric_match(prediction, gold):
    p, g = _normalise_number(prediction), _normalise_number(gold)
    try:
        return abs(float(p) - float(g)) <= 1e-6 * max(1.0, abs(float(g)))
    except ValueError:
        return p == g


class _DropTimeoutNotice(logging.Filter):
    def filter(self, record):
        return "Timeout is disabled" not in record.getMessage()


_quiet_installed = False


def _math_verify_match(prediction, gold):
    """math-verify: parse both, then verify(gold, prediction). Its timeouts use SIGALRM, which only
    works in the main thread, so they are disabled elsewhere (and the notice about it silenced)."""
    global _quiet_installed
    from math_verify import parse, verify

    if not _quiet_installed:
        for name in ("math_verify.parser", "math_verify.grader"):
            logging.getLogger(name).addFilter(_DropTimeoutNotice())
        _quiet_installed = True
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    parsed_gold = parse(gold, parsing_timeout=timeout)
    parsed_prediction = parse(prediction, parsing_timeout=timeout)
    if not parsed_gold or not parsed_prediction:
        return _numeric_match(prediction, gold)
    return bool(verify(parsed_gold, parsed_prediction, timeout_seconds=timeout))


def answers_match(prediction, gold, *, checker=None):
    """True if the extracted answer equals the gold. checker: "math-verify", "numeric" or None
    (= ANSWER_CHECKER). The numeric checker drops commas, $ and % and compares as floats."""
    checker = ANSWER_CHECKER if checker is None else checker
    if checker not in ("math-verify", "numeric"):
        raise ValueError(f"checker={checker!r} must be 'math-verify' or 'numeric'")
    if prediction is None:
        return False
    return _math_verify_match(prediction, gold) if checker == "math-verify" else _numeric_match(prediction, gold)


# -----------------------------------------------------------------------------
# Rewards: each (completions: list[str], golds: list[str]) -> list[float]

CORRECT_REWARD = 2.0
INTEGER_REWARD = 0.5
FORMAT_REWARD = 0.5
_REASONING = re.compile(r"<reasoning>.*?</reasoning>", re.DOTALL)
_REASONING_ANSWER = re.compile(r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>", re.DOTALL)


def _check_lengths(completions, golds):
    if len(completions) != len(golds):
        raise ValueError(f"got {len(completions)} completions but {len(golds)} golds")


def correctness_reward(completions, golds):
    """2.0 if the extracted answer equals the gold answer (checker: ANSWER_CHECKER), else 0."""
    _check_lengths(completions, golds)
    return [CORRECT_REWARD if answers_match(extract_answer(c), g) else 0.0 for c, g in zip(completions, golds, strict=True)]


def integer_reward(completions, golds):
    """0.5 if the extracted answer is an integer (thousands commas allowed, sign allowed; the
    official code's str.isdigit() also rejects negative numbers), else 0."""
    _check_lengths(completions, golds)
    answers = [extract_answer(c) for c in completions]
    return [INTEGER_REWARD if a is not None and re.fullmatch(r"-?\d+", a.replace(",", "")) else 0.0 for a in answers]


def format_reward(completions, golds):
    """0.5 if the completion contains a <reasoning>...</reasoning> block (the official soft format
    reward, matching the official prompt: reasoning, then \\boxed{})."""
    _check_lengths(completions, golds)
    return [FORMAT_REWARD if _REASONING.search(c) else 0.0 for c in completions]


def strict_format_reward(completions, golds):
    """0.5 if a <reasoning>...</reasoning> block is followed by an <answer>...</answer> block
    (d1's XML format; use with a prompt that asks for the answer tags)."""
    _check_lengths(completions, golds)
    return [FORMAT_REWARD if _REASONING_ANSWER.search(c) else 0.0 for c in completions]


# The official MaskGRPO GSM8K reward set; the total reward is their sum (max 3.0).
GSM8K_REWARDS = (format_reward, integer_reward, correctness_reward)


def total_reward(completions, golds, rewards=GSM8K_REWARDS):
    """Sum of the reward functions, one float per completion."""
    parts = [reward(completions, golds) for reward in rewards]
    return [sum(values) for values in zip(*parts, strict=True)]


# -----------------------------------------------------------------------------
# The training task, and the evaluation prompts


class TextTask:
    """GSM8K training with the LLaDA chat template: the official prompt, G rollouts per prompt
    (maskgrpo.rollout_text), reward = format + integer + correct (max 3)."""

    def __init__(self, tokenizer, data, max_completion_length):
        self.completion_length = max_completion_length
        self.tokenizer = load_tokenizer(tokenizer)
        self.tokens = ChatTokens.from_tokenizer(self.tokenizer)
        self.rows = load_gsm8k(data)
        self.prompt_ids = [chat_prompt(self.tokenizer, gsm8k_user_message(r["question"]), tokens=self.tokens)
                           for r in self.rows]
        self.special = dict(mask_token_id=self.tokens.mask, eos_token_id=self.tokens.eos)

    def __len__(self):
        return len(self.rows)

    def check_model(self, model_cfg):
        check_fits(self.tokenizer, self.prompt_ids, model_cfg, self.completion_length, "--max-completion-length")

    def rollout(self, model, idx, cfg, generator, device):
        ids, mask = left_pad([self.prompt_ids[i] for i in idx], self.tokens.eos, mask_id=self.tokens.mask)
        return maskgrpo.rollout_text(model, ids.to(device), mask.to(device), cfg, generator)

    def rewards(self, batch, idx, G):
        texts = [completion_text(self.tokenizer, row, tokens=self.tokens) for row in batch.completion.cpu()]
        golds = [self.rows[i]["gold"] for i in idx for _ in range(G)]
        return torch.tensor(total_reward(texts, golds), dtype=torch.float32), texts


def check_fits(tokenizer, prompt_ids, model_cfg, completion_length, flag):
    """The tokenizer fits the model's vocabulary, and the longest prompt plus `completion_length` fits its
    max_sequence_length (checked before any model is built; `flag` names the setting in the error)."""
    if tokenizer.get_vocab_size() > model_cfg.vocab_size:
        raise ValueError(f"the tokenizer ({tokenizer.get_vocab_size()} tokens) does not fit the model's "
                         f"vocab_size={model_cfg.vocab_size}")
    longest = max(len(ids) for ids in prompt_ids)
    if longest + completion_length > model_cfg.max_sequence_length:
        raise ValueError(f"{flag} {completion_length}: the longest prompt ({longest} tokens) + {completion_length} "
                         f"completion tokens exceed the model's max_sequence_length={model_cfg.max_sequence_length}")


# The official evaluation (scripts/eval/GSM8K.sh, MATH500.sh -> distributed_inference_t2t.py, zero-shot): one user
# turn "<instructions>\n\n<question>", the assistant header, and "<reasoning>" already written.
EVAL_TASKS = {"gsm8k": (load_gsm8k, GSM8K_SYSTEM_PROMPT), "math500": (load_math500, MATH500_SYSTEM_PROMPT)}


def eval_prompts(task, tokenizer, rows, tokens: ChatTokens):
    """Prompt ids of the official zero-shot evaluation prompt for each row of GSM8K test or MATH500."""
    system = EVAL_TASKS[task][1]
    return [chat_prompt(tokenizer, f"{system}\n\n{r['question']}", tokens=tokens, prefill="<reasoning>") for r in rows]


def score_answer(completion, gold):
    """(parsed answer, correct) with the training reward's extraction (last \\boxed{}, else <answer>) and
    its checker (math-verify when installed)."""
    answer = extract_answer(completion)
    return answer, answers_match(answer, gold)
