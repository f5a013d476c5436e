"""
Every on-disk format of scale/: HF checkpoint folders, DCP training checkpoints, the `latest` pointer, exports.

    read_hf_folder       validate a Hub folder (config.json, index, shard headers: names and shapes), no tensor read
    load_hf_weights      read an HF folder into a model, sharded or not (torch.distributed.checkpoint)
    save_hf_folder       config.json + N bf16 safetensors shards + index, like the Hub (tiny fixtures, export)
    save_checkpoint      DCP model + optimiser shards, per-rank generator states, trainer_state.json
    load_checkpoint      ... and back, into an already built model (DCP reshards: the world size may change)
    latest_checkpoint    the checkpoint that `latest` names
    export_hf            the trained model as an HF folder, or its LoRA adapters in PEFT's format
    read_peft_adapter    a PEFT LoRA adapter folder -> LoRA settings and parameters
    atomic_output        the one way anything above is written: all or nothing

A LLaDA / MMaDA folder on the Hub (GSAI-ML/LLaDA-8B-Instruct, Gen-Verse/MMaDA-8B-Base) holds config.json
(OLMo-style field names), model.safetensors.index.json and bf16 safetensors shards whose keys are exactly
our parameter names (model.transformer.wte.weight, ...blocks.{i}.q_proj.weight, ..., model.transformer.ff_out.weight;
no RoPE buffers). So loading is a key-for-key copy, no renaming: `dcp.HuggingFaceStorageReader` reads each rank's
slices with safetensors `get_slice` and copies (casting bf16 -> fp32) into the local shards in place. It checks
neither names nor config, hence `read_hf_folder` first.

A run folder:

    <out>/checkpoints/step_000050/   .metadata, __<rank>_0.distcp (trainable weights + AdamW state),
                                     rng_rank<r>.pt (torch.Generator states), trainer_state.json
    <out>/checkpoints/latest         "step_000050"
    <out>/export/                    HF folder, or adapter_model.safetensors + adapter_config.json (PEFT)

Every write goes to `<name>.tmp` and is renamed into place (a folder it replaces is moved to `<name>.old`
first): an interrupted save leaves only such leftovers, never a half-written checkpoint or pointer, and the
next save deletes them.
"""

import errno
import json
import logging
import os
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from maskgrpo import ModelConfig

CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
TRAINER_STATE = "trainer_state.json"
LATEST = "latest"
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"  # PEFT's file names
PEFT_PREFIX = "base_model.model."  # PEFT's key prefix before our module path (no adapter name in the keys)
LORA_MARKERS = (".lora_A.", ".lora_B.")  # maskgrpo.LoRALinear adapters: not part of an HF checkpoint
TMP, OLD = ".tmp", ".old"  # suffixes of an unfinished write and of the folder it is replacing

# config.json (LLaDA-8B-Instruct, OLMo field names) -> ModelConfig. Checked against the Hub file:
# d_model 4096, n_layers 32, n_heads 32, n_kv_heads 32, mlp_hidden_size 12288, embedding_size 126464,
# vocab_size 126464, rope_theta 500000.0, rms_norm_eps 1e-05, max_sequence_length 4096,
# mask_token_id 126336, eos_token_id 126081.
_REQUIRED_FIELDS = ("d_model", "n_layers", "n_heads", "rope_theta", "rms_norm_eps", "max_sequence_length")

# Architecture switches of the OLMo/LLaDA config that our module implements; any other value is a
# different model. Checked only when the field is present (None counts as "off" where noted).
_ARCHITECTURE = {
    "block_type": "llama",  # separate ff_proj / up_proj (SwiGLU), q/k/v projections
    "activation_type": "silu",
    "layer_norm_type": "rms",
    "layer_norm_with_affine": True,  # RMSNorm has a weight
    "bias_for_layer_norm": False,
    "include_bias": False,
    "include_qkv_bias": False,
    "weight_tying": False,  # untied output head model.transformer.ff_out
    "rope": True,
    "alibi": False,
    "scale_logits": False,
    "input_emb_norm": False,
    "attention_layer_norm": False,  # no q/k norms
    "multi_query_attention": None,  # None or False
    "block_group_size": 1,
}

# -----------------------------------------------------------------------------
# Writing all or nothing, reading JSON with the file named


def _is_main():
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _remove(path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def remove_leftovers(folder):
    """Delete what interrupted writes left in `folder`: `<name>.tmp` and `<name>.old` entries (and the
    `<name>.tmp-<pid>` files of earlier versions). Only the owner of the run folder may call this."""
    for p in Path(folder).iterdir():
        if p.name.endswith((TMP, OLD)) or f"{TMP}-" in p.name:
            _remove(p)


@contextmanager
def atomic_output(path, *, folder=False, collective=False):
    """Write the file or folder `path` all or nothing. Yields the temporary sibling `<name>.tmp` (an empty
    folder if folder=True) to write into. When the block ends normally it replaces `path` by renames; when it
    raises, the temporary is deleted and `path` is untouched. collective=True: every rank of the process group
    enters; rank 0 creates and renames, every rank may write into the folder in between."""
    path = Path(path)
    tmp, old = path.with_name(path.name + TMP), path.with_name(path.name + OLD)
    lead = _is_main() or not collective
    if lead:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove(tmp)
        if folder:
            tmp.mkdir()
    if collective:
        _barrier()
    try:
        yield tmp
        if collective:
            _barrier()
        if lead:
            if path.is_dir():  # a folder cannot be renamed over a non-empty one: move it aside first
                _remove(old)
                os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        if collective:
            _barrier()
    finally:
        if lead:
            _remove(tmp)


def _causes(e):
    """`e` and the errors it wraps: DCP gathers each rank's failure into a CheckpointException (a BaseException
    whose `failures` map rank -> (exception, stack))."""
    return [e, *(pair[0] for pair in getattr(e, "failures", {}).values())]


def _disk_full(e):
    return any(isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT) for x in _causes(e))


@contextmanager
def disk_full_names(path):
    """Turn running out of space while writing under `path` into OSError(ENOSPC) naming `path`."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except (Exception, CheckpointException) as e:
        if _disk_full(e):
            raise OSError(errno.ENOSPC, "no space left on device", str(path)) from None
        raise


@contextmanager
def _dcp_quietly():
    """DCP warns on every single-process call that it assumes a single process (which is what we ask for), and
    logs a traceback on the root logger when .metadata is unreadable, before it raises (which load_checkpoint
    turns into one line). Silence both while it runs: the one-line error policy wants nothing else on stderr."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is .*single process")
            yield
    finally:
        logging.disable(previous)


def read_json(path, *, damaged=""):
    """A JSON file's content. A missing file or invalid JSON raises an error naming the file (and the line);
    `damaged` is appended to say what to do about it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found{damaged}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f", line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        raise ValueError(f"{path}: not valid JSON ({getattr(e, 'msg', e)}{where}){damaged}") from None


# -----------------------------------------------------------------------------
# HF folders: config.json <-> ModelConfig, validation, reading into shards, writing


def _is_lora_key(name):
    return any(marker in name for marker in LORA_MARKERS)


def model_config_from_hf(config_json, *, mask_token_id=None, eos_token_id=None):
    """ModelConfig from a LLaDA/MMaDA config.json (a dict or a path to the file).

    mask_token_id / eos_token_id: None takes the value from config.json (LLaDA has both); a given
    value must agree with config.json when the file has the field. Embedding rows follow OLMo:
    `embedding_size` if set, else `vocab_size` (MMaDA: 134656 = 126464 text + 8192 image codes).
    Raises ValueError naming the file, the field and the value for anything missing or unsupported."""
    where = "config.json"
    if isinstance(config_json, (str, os.PathLike)):
        where = str(config_json)
        config_json = read_json(config_json)
    if not isinstance(config_json, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(config_json).__name__}")
    c = config_json

    def number(name, kind):
        try:
            return kind(c[name])
        except (TypeError, ValueError):
            raise ValueError(f"{where}: field {name}={c[name]!r} is not a number") from None

    missing = [name for name in _REQUIRED_FIELDS if c.get(name) is None]
    if missing:
        raise ValueError(f"{where}: lacks required field(s) {missing}")
    for name, expected in _ARCHITECTURE.items():
        if name not in c:
            continue
        value = c[name]
        ok = value in (None, False) if expected is None else value == expected
        if not ok:
            raise ValueError(f"{where}: field {name}={value!r} is not supported (this model implements {name}={expected!r})")
    n_kv_heads = c.get("n_kv_heads")
    if n_kv_heads is not None and n_kv_heads != c["n_heads"]:
        raise ValueError(f"{where}: field n_kv_heads={n_kv_heads} differs from n_heads={c['n_heads']}: "
                         "grouped-query attention is not implemented (LLaDA has none)")

    # SwiGLU width: mlp_hidden_size, else OLMo's mlp_ratio * d_model
    mlp_hidden_size = c.get("mlp_hidden_size")
    if mlp_hidden_size is None:
        if c.get("mlp_ratio") is None:
            raise ValueError(f"{where}: has neither mlp_hidden_size nor mlp_ratio")
        mlp_hidden_size = int(number("mlp_ratio", float) * number("d_model", int))
    # embedding rows: OLMo allocates embedding_size rows when set (padding), else vocab_size
    vocab_size = c.get("embedding_size") or c.get("vocab_size")
    if vocab_size is None:
        raise ValueError(f"{where}: has neither embedding_size nor vocab_size")

    special = {}
    for name, given in (("mask_token_id", mask_token_id), ("eos_token_id", eos_token_id)):
        in_file = c.get(name)
        if given is not None and in_file is not None and given != in_file:
            raise ValueError(f"{name}={given} was given but {where} has {name}={in_file}")
        value = given if given is not None else in_file
        if value is None:
            raise ValueError(f"{name} is neither in {where} nor given")
        special[name] = value

    c = c | {"vocab_size": vocab_size, "mlp_hidden_size": mlp_hidden_size}
    sizes = {name: number(name, int) for name in ("vocab_size", "d_model", "n_layers", "n_heads", "mlp_hidden_size",
                                                  "max_sequence_length")}
    try:
        return ModelConfig(**sizes, rope_theta=number("rope_theta", float), rms_norm_eps=number("rms_norm_eps", float),
                           **special)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def hf_config_from_model_config(cfg: ModelConfig):
    """A LLaDA-style config.json dict for `cfg` (the inverse of `model_config_from_hf`)."""
    return {
        "architectures": ["LLaDAModelLM"], "model_type": "llada",
        "d_model": cfg.d_model, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_heads,
        "mlp_hidden_size": cfg.mlp_hidden_size, "vocab_size": cfg.vocab_size, "embedding_size": cfg.vocab_size,
        "max_sequence_length": cfg.max_sequence_length, "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.rms_norm_eps,
        "mask_token_id": cfg.mask_token_id, "eos_token_id": cfg.eos_token_id,
        **{k: v for k, v in _ARCHITECTURE.items()},
    }


def expected_shapes(cfg: ModelConfig):
    """{checkpoint key: shape} of a LLaDA checkpoint for `cfg` (= the state dict of MaskedDiffusionLM(cfg),
    which a test checks). Written out rather than read off a meta-device model: instant for 8B shapes."""
    V, d, f = cfg.vocab_size, cfg.d_model, cfg.mlp_hidden_size
    shapes = {"model.transformer.wte.weight": (V, d)}
    for i in range(cfg.n_layers):
        block = f"model.transformer.blocks.{i}."
        shapes |= {block + name: (d, d) for name in ("q_proj.weight", "k_proj.weight", "v_proj.weight", "attn_out.weight")}
        shapes |= {block + "ff_proj.weight": (f, d), block + "up_proj.weight": (f, d), block + "ff_out.weight": (d, f)}
        shapes |= {block + "attn_norm.weight": (d,), block + "ff_norm.weight": (d,)}
    return shapes | {"model.transformer.ln_f.weight": (d,), "model.transformer.ff_out.weight": (V, d)}


def _shown(names, limit=5):
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _safetensors_keys(path):
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return list(f.keys())
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e}); download it again") from None


def read_hf_folder(path, *, mask_token_id=None, eos_token_id=None):
    """Validate an HF checkpoint folder without reading any tensor data.

    Returns (ModelConfig, shard files (sorted list of Path), weight_map {key: shard file name}).
    Checks, in order: the folder exists; config.json parses into a ModelConfig; the index (or a single
    model.safetensors) exists and every shard it names exists; the keys equal the parameter names of
    MaskedDiffusionLM(config); each shard header holds its keys with the expected shapes."""
    from safetensors import SafetensorError, safe_open  # lazy: only the scale/ extra needs safetensors

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {folder}")
    if not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{CONFIG_NAME} not found in {folder}")
    cfg = model_config_from_hf(folder / CONFIG_NAME, mask_token_id=mask_token_id, eos_token_id=eos_token_id)

    if (folder / INDEX_NAME).is_file():
        index = read_json(folder / INDEX_NAME)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{folder / INDEX_NAME} has no weight_map")
    elif (folder / SINGLE_NAME).is_file():
        weight_map = {key: SINGLE_NAME for key in _safetensors_keys(folder / SINGLE_NAME)}
    else:
        raise FileNotFoundError(f"neither {INDEX_NAME} nor {SINGLE_NAME} found in {folder}")
    shard_names = sorted(set(weight_map.values()))
    absent = [name for name in shard_names if not (folder / name).is_file()]
    if absent:
        raise FileNotFoundError(f"shard file(s) named by the index are missing in {folder}: {_shown(absent)}")

    shapes = expected_shapes(cfg)
    unexpected = set(weight_map) - set(shapes)
    missing = set(shapes) - set(weight_map)
    if unexpected:
        raise ValueError(f"{folder}: {len(unexpected)} checkpoint key(s) are not parameters of the model: "
                         f"{_shown(unexpected)}")
    if missing:
        raise ValueError(f"{folder}: {len(missing)} model parameter(s) are missing from the checkpoint: {_shown(missing)}")

    for name in shard_names:
        try:
            with safe_open(folder / name, framework="pt") as f:
                present = set(f.keys())
                for key in (k for k, shard in weight_map.items() if shard == name):
                    if key not in present:
                        raise ValueError(f"{folder}: index maps {key} to {name}, but that file does not contain it")
                    shape = tuple(f.get_slice(key).get_shape())
                    if shape != shapes[key]:
                        raise ValueError(f"{folder}: {key} has shape {shape} in {name}, the config implies {shapes[key]}")
        except SafetensorError as e:
            raise ValueError(f"{folder / name}: not a readable safetensors file ({e}); download it again") from None
    return cfg, [folder / name for name in shard_names], weight_map


def load_hf_weights(model, folder):
    """Read an HF safetensors folder into `model` in place with torch.distributed.checkpoint:
    HuggingFaceStorageReader reads only this rank's slice of each tensor (safetensors get_slice) and
    copies it, cast to the parameter dtype, into the local shard: no rank holds a full copy. LoRA
    adapters are not in the folder and are left alone. Validate the folder first (read_hf_folder)."""
    import torch.distributed.checkpoint as dcp

    state = {k: v for k, v in model.state_dict().items() if not _is_lora_key(k)}
    with _dcp_quietly():
        dcp.load(state, storage_reader=dcp.HuggingFaceStorageReader(str(folder)),
                 no_dist=not (dist.is_available() and dist.is_initialized()))


def _as_state_dict(model_or_state_dict):
    if isinstance(model_or_state_dict, nn.Module):
        state = model_or_state_dict.state_dict()
        adapters = [name for name in state if _is_lora_key(name)]
        if adapters:
            raise ValueError(f"the model has LoRA adapters ({_shown(adapters, 2)}): merge them first or export them "
                             "separately; an HF folder holds base weights only")
        return state
    if isinstance(model_or_state_dict, dict):
        bad = [k for k, v in model_or_state_dict.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise ValueError(f"state dict values must be tensors; not so for {_shown(bad)}")
        return model_or_state_dict
    raise ValueError(f"expected an nn.Module or a state dict, got {type(model_or_state_dict).__name__}")


def _split_contiguous(names, sizes, shards):
    """Split names (in order) into `shards` non-empty contiguous groups of roughly equal byte size."""
    total = sum(sizes)
    groups, current, filled = [], [], 0
    for i, (name, size) in enumerate(zip(names, sizes, strict=True)):
        current.append(name)
        filled += size
        left_names, left_groups = len(names) - i - 1, shards - len(groups) - 1
        target = total * (len(groups) + 1) / shards
        if left_groups > 0 and (filled >= target or left_names == left_groups):
            groups.append(current)
            current = []
    groups.append(current)
    return groups


@torch.no_grad()
def save_hf_folder(model_or_state_dict, folder, *, config_json, shards=1, dtype=torch.bfloat16, overwrite=False):
    """Write an HF checkpoint folder: config.json, `shards` safetensors files and (for shards > 1)
    model.safetensors.index.json, like the Hub's LLaDA folders. Returns the folder Path.

    config_json: a config.json dict, or a ModelConfig (converted with `hf_config_from_model_config`).
    dtype: storage dtype (bf16 as on the Hub; None keeps each tensor's dtype). Written all or nothing
    (atomic_output). Values must be plain tensors: gather FSDP2 shards first (full_state_dict)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    if isinstance(config_json, ModelConfig):
        config_json = hf_config_from_model_config(config_json)
    if not isinstance(config_json, dict):
        raise ValueError(f"config_json must be a dict or a ModelConfig, got {type(config_json).__name__}")
    state = _as_state_dict(model_or_state_dict)
    if not isinstance(shards, int) or not 1 <= shards <= max(len(state), 1):
        raise ValueError(f"shards={shards!r} must be an int in [1, {len(state)}] (the number of tensors)")
    if not state:
        raise ValueError("nothing to save: the state dict is empty")
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} exists (pass overwrite=True to replace it)")

    names = list(state)
    sizes = [state[n].numel() * (state[n].element_size() if dtype is None else torch.empty(0, dtype=dtype).element_size())
             for n in names]
    groups = _split_contiguous(names, sizes, shards)
    files = [SINGLE_NAME] if shards == 1 else [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    with disk_full_names(folder), atomic_output(folder, folder=True) as tmp:
        weight_map, total_size = {}, 0
        for file, group in zip(files, groups, strict=True):
            # clone: safetensors refuses views and shared storage
            tensors = {name: state[name].detach().to(device="cpu", dtype=dtype or state[name].dtype).contiguous().clone()
                       for name in group}
            total_size += sum(t.numel() * t.element_size() for t in tensors.values())
            weight_map |= {name: file for name in group}
            save_file(tensors, tmp / file, metadata={"format": "pt"})
            del tensors
        (tmp / CONFIG_NAME).write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
        if shards > 1:
            index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return folder


# -----------------------------------------------------------------------------
# Training checkpoints (DCP) and the `latest` pointer


def _state_dict_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kw)


def step_dir_name(step):
    return f"step_{step:06d}"


def _step_dirs(root):
    """Complete step_N folders under root, oldest first (leftovers and half-written ones excluded)."""
    return sorted(p for p in Path(root).glob("step_*") if p.is_dir() and p.name[5:].isdigit()
                  and (p / TRAINER_STATE).is_file())


def latest_checkpoint(root):
    """Path of the last complete checkpoint under root (the one `latest` names), or None. Should the
    named folder be gone, the newest complete step_N folder is taken instead."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        path = root / pointer.read_text().strip()
        if (path / TRAINER_STATE).is_file():
            return path
    complete = _step_dirs(root) if root.is_dir() else []
    return complete[-1] if complete else None


def save_checkpoint(root, step, model, optimizer, generators, trainer_state, d, keep=2):
    """Save model + optimiser (DCP, each rank writes its shards; frozen weights are skipped, they come
    back from the HF folder), this rank's generator states and a JSON trainer state as root/step_N, then
    point `latest` at it, all or nothing (atomic_output). Rank 0 first deletes what interrupted saves left
    and afterwards keeps only the last `keep` checkpoints. Every rank must call this."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = Path(root)
    final = root / step_dir_name(step)
    if d.is_main:
        root.mkdir(parents=True, exist_ok=True)
        remove_leftovers(root)
    with disk_full_names(final), atomic_output(final, folder=True, collective=True) as tmp:
        model_sd, optim_sd = get_state_dict(model, optimizer, options=_state_dict_options(ignore_frozen_params=True))
        with _dcp_quietly():
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp), no_dist=d.world == 1)
        torch.save({name: g.get_state() for name, g in generators.items()}, tmp / f"rng_rank{d.rank}.pt")
        if d.is_main:
            (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state | {"step": step, "world_size": d.world}, indent=2))
    if d.is_main:
        with disk_full_names(root / LATEST), atomic_output(root / LATEST) as tmp:
            tmp.write_text(final.name)
        for stale in _step_dirs(root)[:-keep] if keep > 0 else []:
            if stale != final:
                shutil.rmtree(stale)
    _barrier()
    return final


def _damaged(path):
    return (f"; the checkpoint {path} is damaged: resume from an earlier one (--resume {Path(path).parent}/step_N) "
            f"or delete it")


def read_trainer_state(path):
    path = Path(path)
    if not (path / TRAINER_STATE).is_file():
        raise FileNotFoundError(f"not a checkpoint (no {TRAINER_STATE}): {path}")
    state = read_json(path / TRAINER_STATE, damaged=_damaged(path))
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ValueError(f"{path / TRAINER_STATE}: has no integer 'step'{_damaged(path)}")
    return state


def load_checkpoint(path, model, optimizer=None, generators=None, d=None):
    """Restore a save_checkpoint folder into an already built model (and optimiser, generators). DCP
    reshards, so the world size may differ; the generator states are per rank and are restored only when
    it does not (else the caller reseeds). Returns (trainer_state, generators_restored). A damaged file
    raises ValueError naming it and saying what to do."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(path)
    state = read_trainer_state(path)
    # strict=False: frozen weights are not in the checkpoint; every trainable one is (dcp.load fails otherwise)
    options = _state_dict_options(ignore_frozen_params=True, strict=False)
    model_sd, optim_sd = get_state_dict(model, optimizer or [], options=options)
    wanted = {"model": model_sd} | ({"optim": optim_sd} if optimizer is not None else {})
    world = 1 if d is None else d.world
    try:
        with _dcp_quietly():
            dcp.load(wanted, checkpoint_id=str(path), no_dist=world == 1)
    except (Exception, CheckpointException) as e:  # a truncated file: unpickling, zip or read errors, per rank
        inner = _causes(e)[-1]
        first = (str(inner).strip().splitlines() or [""])[0][:160]
        raise ValueError(f"{path}: cannot read the DCP shards (.metadata, __<rank>_0.distcp): {type(inner).__name__}: "
                         f"{first}{_damaged(path)}") from None
    set_state_dict(model, optimizer or [], model_state_dict=model_sd,
                   optim_state_dict=optim_sd if optimizer is not None else {}, options=options)
    if generators is None:
        return state, False
    rng_file = path / f"rng_rank{d.rank}.pt"
    same_world = state.get("world_size") == d.world and rng_file.is_file()
    if same_world:
        try:
            saved = torch.load(rng_file, weights_only=True)
        except Exception as e:  # a truncated file: EOFError, RuntimeError or an unpickling error
            raise ValueError(f"{rng_file}: unreadable generator state ({type(e).__name__}); delete it to reseed the "
                             f"generators from the step (the numbers then differ from an uninterrupted run), or resume "
                             f"from an earlier checkpoint") from None
        if not isinstance(saved, dict) or set(saved) != set(generators):
            raise ValueError(f"{rng_file} holds generators {sorted(saved) if isinstance(saved, dict) else saved!r}, "
                             f"the trainer has {sorted(generators)}")
        for name, g in generators.items():
            g.set_state(saved[name])
    return state, same_world


# -----------------------------------------------------------------------------
# Export: HF safetensors folder (full model) or PEFT LoRA adapters


def full_state_dict(model, trainable_only=False):
    """The full (gathered) state dict on CPU at rank 0, {} elsewhere. A collective under FSDP2."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    options = _state_dict_options(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    state = get_model_state_dict(model, options=options)
    if not _is_main():
        return {}
    return {k: v.detach().cpu() for k, v in state.items()}


def lora_adapter_state(state_dict):
    """PEFT's key layout: base_model.model.<module path>.lora_A.weight (no adapter name)."""
    return {PEFT_PREFIX + k: v.contiguous() for k, v in state_dict.items() if _is_lora_key(k)}


def peft_adapter_config(lora, base_model_name_or_path=None):
    """adapter_config.json of a PEFT LoRA adapter matching maskgrpo.add_lora (no dropout, no bias).
    lora: anything with rank, alpha and targets (scale.distributed.LoRASpec)."""
    return {"peft_type": "LORA", "task_type": None, "r": lora.rank, "lora_alpha": lora.alpha,
            "target_modules": list(lora.targets), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
            "inference_mode": True, "base_model_name_or_path": base_model_name_or_path}


def export_hf(model, folder, d, *, lora=None, base_model=None, shards=2):
    """Write rank 0's export: the full model as an HF folder (bf16 safetensors + index + config.json,
    loadable by read_hf_folder / load_hf_weights), or with LoRA only the adapters (adapter_model.safetensors +
    adapter_config.json, PEFT's format). Every rank must call this."""
    from safetensors.torch import save_file

    folder = Path(folder)
    state = full_state_dict(model, trainable_only=lora is not None)
    if d.is_main:
        if lora is not None:
            with disk_full_names(folder), atomic_output(folder, folder=True) as tmp:
                save_file(lora_adapter_state(state), tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
                (tmp / ADAPTER_CONFIG).write_text(json.dumps(peft_adapter_config(lora, base_model), indent=2))
        else:
            config = getattr(model, "module", model).config
            save_hf_folder(state, folder, config_json=hf_config_from_model_config(config),
                           shards=min(shards, len(state)), overwrite=True)
    _barrier()
    return folder


def read_peft_adapter(folder):
    """A PEFT LoRA adapter folder (export_hf's, or any with the same targets) -> (dict(rank, alpha,
    targets), {our parameter name: tensor}). Raises naming the file for anything this project cannot apply."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = read_json(folder / ADAPTER_CONFIG)
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise ValueError(f"{folder / ADAPTER_CONFIG}: field peft_type={config.get('peft_type')!r} must be 'LORA'")
    for name in ("r", "lora_alpha", "target_modules"):
        if name not in config:
            raise ValueError(f"{folder / ADAPTER_CONFIG}: lacks field {name!r}")
    if (config.get("bias") or "none") != "none":
        raise ValueError(f"{folder / ADAPTER_CONFIG}: field bias={config['bias']!r} is not supported (only 'none')")
    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(f"{folder / ADAPTER_WEIGHTS}: file not found")
    try:
        tensors = load_file(folder / ADAPTER_WEIGHTS)
    except Exception as e:  # safetensors raises its own SafetensorError for a damaged file
        raise ValueError(f"{folder / ADAPTER_WEIGHTS}: not a readable safetensors file ({e})") from None
    foreign = [k for k in tensors if not k.startswith(PEFT_PREFIX) or not _is_lora_key(k)]
    if foreign:
        raise ValueError(f"{folder / ADAPTER_WEIGHTS}: keys not of the form {PEFT_PREFIX}<module>.lora_A/B.weight: "
                         f"{_shown(foreign)}")
    targets = config["target_modules"]
    spec = dict(rank=int(config["r"]), alpha=float(config["lora_alpha"]),
                targets=tuple(targets) if isinstance(targets, list) else (targets,))
    return spec, {k[len(PEFT_PREFIX):]: v for k, v in tensors.items()}
