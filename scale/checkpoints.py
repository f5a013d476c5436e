"""
Hugging Face checkpoint folders <-> `maskgrpo.MaskedDiffusionLM`.

A LLaDA / MMaDA folder on the Hub (GSAI-ML/LLaDA-8B-Instruct, Gen-Verse/MMaDA-8B-Base) holds
config.json (OLMo-style field names), model.safetensors.index.json and bf16 safetensors shards whose
keys are exactly our parameter names (model.transformer.wte.weight, ...blocks.{i}.q_proj.weight, ...,
model.transformer.ff_out.weight; no RoPE buffers). So loading is a key-for-key copy, no renaming.

    read_hf_folder      validate a folder (config, index, shard headers: names and shapes) before any copy
    load_hf_state_dict  copy shard by shard into an existing model (plain tensors or FSDP2 DTensors)
    save_hf_folder      write config.json + N shards + index, atomically (tests write fixtures with it)

Distributed loading. Two routes work for a model whose parameters are FSDP2 DTensors:
 1. `load_hf_state_dict` here: every rank reads each tensor from the (mmap-ed) shard and keeps only its
    own slice (`distribute_tensor(..., src_data_rank=None)`, no communication). Simple; each rank reads
    the whole file once.
 2. torch.distributed.checkpoint (exists in torch 2.13 as `dcp.HuggingFaceStorageReader(path)`):
        dcp.load(model.state_dict(), storage_reader=dcp.HuggingFaceStorageReader(folder))
    It reads each rank's slices with safetensors `get_slice` and copies (casting bf16 -> fp32) into the
    DTensor shards in place. It does no name or config validation: call `read_hf_folder` first.
"""

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from maskgrpo import MaskedDiffusionLM, ModelConfig

CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
LORA_MARKERS = (".lora_A.", ".lora_B.")  # maskgrpo.LoRALinear adapters: not part of an HF checkpoint

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


def _dtensor_class():
    """torch.distributed.tensor.DTensor if that module is loaded, else None. A DTensor parameter cannot
    exist before the module is imported, and importing it costs seconds, so single-process use skips it."""
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def _is_lora_key(name):
    return any(marker in name for marker in LORA_MARKERS)


def model_config_from_hf(config_json, *, mask_token_id=None, eos_token_id=None):
    """ModelConfig from a LLaDA/MMaDA config.json (a dict or a path to the file).

    mask_token_id / eos_token_id: None takes the value from config.json (LLaDA has both); a given
    value must agree with config.json when the file has the field. Embedding rows follow OLMo:
    `embedding_size` if set, else `vocab_size` (MMaDA: 134656 = 126464 text + 8192 image codes).
    Raises ValueError naming the field and value for anything missing or unsupported."""
    if isinstance(config_json, (str, os.PathLike)):
        path = Path(config_json)
        if not path.is_file():
            raise FileNotFoundError(f"config.json not found: {path}")
        config_json = json.loads(path.read_text())
    if not isinstance(config_json, dict):
        raise ValueError(f"config_json must be a dict or a path, got {type(config_json).__name__}")
    c = config_json

    missing = [name for name in _REQUIRED_FIELDS if c.get(name) is None]
    if missing:
        raise ValueError(f"config.json lacks required field(s) {missing}")
    for name, expected in _ARCHITECTURE.items():
        if name not in c:
            continue
        value = c[name]
        ok = value in (None, False) if expected is None else value == expected
        if not ok:
            raise ValueError(f"config.json field {name}={value!r} is not supported (this model implements {name}={expected!r})")
    n_kv_heads = c.get("n_kv_heads")
    if n_kv_heads is not None and n_kv_heads != c["n_heads"]:
        raise ValueError(f"config.json field n_kv_heads={n_kv_heads} differs from n_heads={c['n_heads']}: "
                         "grouped-query attention is not implemented (LLaDA has none)")

    # SwiGLU width: mlp_hidden_size, else OLMo's mlp_ratio * d_model
    mlp_hidden_size = c.get("mlp_hidden_size")
    if mlp_hidden_size is None:
        if c.get("mlp_ratio") is None:
            raise ValueError("config.json has neither mlp_hidden_size nor mlp_ratio")
        mlp_hidden_size = int(c["mlp_ratio"] * c["d_model"])
    # embedding rows: OLMo allocates embedding_size rows when set (padding), else vocab_size
    vocab_size = c.get("embedding_size") or c.get("vocab_size")
    if vocab_size is None:
        raise ValueError("config.json has neither embedding_size nor vocab_size")

    special = {}
    for name, given in (("mask_token_id", mask_token_id), ("eos_token_id", eos_token_id)):
        in_file = c.get(name)
        if given is not None and in_file is not None and given != in_file:
            raise ValueError(f"{name}={given} was given but config.json has {name}={in_file}")
        value = given if given is not None else in_file
        if value is None:
            raise ValueError(f"{name} is neither in config.json nor given")
        special[name] = value

    return ModelConfig(vocab_size=int(vocab_size), d_model=int(c["d_model"]), n_layers=int(c["n_layers"]),
                       n_heads=int(c["n_heads"]), mlp_hidden_size=int(mlp_hidden_size),
                       max_sequence_length=int(c["max_sequence_length"]), rope_theta=float(c["rope_theta"]),
                       rms_norm_eps=float(c["rms_norm_eps"]), **special)


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


def read_hf_folder(path, *, mask_token_id=None, eos_token_id=None):
    """Validate an HF checkpoint folder without reading any tensor data.

    Returns (ModelConfig, shard files (sorted list of Path), weight_map {key: shard file name}).
    Checks, in order: the folder exists; config.json parses into a ModelConfig; the index (or a single
    model.safetensors) exists and every shard it names exists; the keys equal the parameter names of
    MaskedDiffusionLM(config); each shard header holds its keys with the expected shapes."""
    from safetensors import safe_open  # lazy: only the scale/ extra needs safetensors

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {folder}")
    if not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{CONFIG_NAME} not found in {folder}")
    cfg = model_config_from_hf(folder / CONFIG_NAME, mask_token_id=mask_token_id, eos_token_id=eos_token_id)

    if (folder / INDEX_NAME).is_file():
        index = json.loads((folder / INDEX_NAME).read_text())
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{folder / INDEX_NAME} has no weight_map")
    elif (folder / SINGLE_NAME).is_file():
        with safe_open(folder / SINGLE_NAME, framework="pt") as f:
            weight_map = {key: SINGLE_NAME for key in f.keys()}
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
        raise ValueError(f"{len(unexpected)} checkpoint key(s) are not parameters of the model: {_shown(unexpected)}")
    if missing:
        raise ValueError(f"{len(missing)} model parameter(s) are missing from the checkpoint: {_shown(missing)}")

    for name in shard_names:
        with safe_open(folder / name, framework="pt") as f:
            present = set(f.keys())
            for key in (k for k, shard in weight_map.items() if shard == name):
                if key not in present:
                    raise ValueError(f"index maps {key} to {name}, but that file does not contain it")
                shape = tuple(f.get_slice(key).get_shape())
                if shape != shapes[key]:
                    raise ValueError(f"{key} has shape {shape} in {name}, the config implies {shapes[key]}")
    return cfg, [folder / name for name in shard_names], weight_map


def _target_tensors(model):
    """{name: parameter or persistent buffer} of the base model (LoRA adapters excluded)."""
    named = dict(model.named_parameters())
    named.update(dict(model.named_buffers()))
    keep = set(model.state_dict().keys())
    return {name: t for name, t in named.items() if name in keep and not _is_lora_key(name)}


# config fields that change parameter shapes or numerics; must agree between folder and model
_COMPARED_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "mlp_hidden_size", "rope_theta", "rms_norm_eps")


@torch.no_grad()
def load_hf_state_dict(model, folder, *, dtype=None):
    """Copy the weights of an HF folder into `model` in place, one shard at a time; returns the model.

    The model may have been built on the meta device and materialised with `model.to_empty(device=...)`
    (its values are then garbage until this call). Copies are bit-exact: a bf16 file loads into fp32
    parameters exactly (every bf16 value is an fp32 value). dtype: if given, the model is first cast
    with `model.to(dtype)` (e.g. torch.bfloat16 for a rollout copy). Parameters that are DTensors
    (FSDP2 `fully_shard`) receive only their local slice. LoRA adapters, if present, are left untouched.
    Raises before copying anything if names, shapes or config fields disagree."""
    from safetensors import safe_open

    if not isinstance(model, MaskedDiffusionLM):
        raise ValueError(f"model must be a maskgrpo.MaskedDiffusionLM, got {type(model).__name__}")
    cfg, shards, weight_map = read_hf_folder(folder, mask_token_id=model.config.mask_token_id,
                                             eos_token_id=model.config.eos_token_id)
    for name in _COMPARED_FIELDS:
        if getattr(cfg, name) != getattr(model.config, name):
            raise ValueError(f"config.json gives {name}={getattr(cfg, name)} "
                             f"but the model has {name}={getattr(model.config, name)}")
    targets = _target_tensors(model)
    if set(targets) != set(weight_map):
        diff = set(targets) ^ set(weight_map)
        raise ValueError(f"model parameter names and checkpoint keys differ: {_shown(diff)}")
    on_meta = [name for name, t in targets.items() if t.is_meta]
    if on_meta:
        raise ValueError(f"parameter(s) on the meta device ({_shown(on_meta)}): call model.to_empty(device=...) first")
    if dtype is not None:
        model.to(dtype)
        targets = _target_tensors(model)

    dtensor = _dtensor_class()
    for shard in shards:
        with safe_open(shard, framework="pt", device="cpu") as f:
            for key in (k for k, s in weight_map.items() if s == shard.name):
                source = f.get_tensor(key)
                target = targets[key]
                if dtensor is not None and isinstance(target, dtensor):
                    from torch.distributed.tensor import distribute_tensor

                    # keep this rank's slice only: no communication (src_data_rank=None)
                    local = distribute_tensor(source, target.device_mesh, target.placements, src_data_rank=None)
                    target.to_local().copy_(local.to_local())
                else:
                    target.copy_(source)
    return model


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
    dtype: storage dtype (bf16 as on the Hub; None keeps each tensor's dtype). The folder is written
    to a temporary sibling and renamed into place, so a crash never leaves a half-written checkpoint.
    DTensor values are gathered with .full_tensor() (a collective: every rank must call; with FSDP2
    prefer get_model_state_dict(full_state_dict=True, cpu_offload=True) and write on rank 0)."""
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

    dtensor = _dtensor_class()
    names = list(state)
    sizes = [state[n].numel() * (state[n].element_size() if dtype is None else torch.empty(0, dtype=dtype).element_size())
             for n in names]
    groups = _split_contiguous(names, sizes, shards)
    files = [SINGLE_NAME] if shards == 1 else [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        weight_map, total_size = {}, 0
        for file, group in zip(files, groups, strict=True):
            tensors = {}
            for name in group:
                t = state[name].detach()
                if dtensor is not None and isinstance(t, dtensor):
                    t = t.full_tensor()
                # clone: safetensors refuses views and shared storage
                tensors[name] = t.to(device="cpu", dtype=dtype or t.dtype).contiguous().clone()
                total_size += tensors[name].numel() * tensors[name].element_size()
                weight_map[name] = file
            save_file(tensors, tmp / file, metadata={"format": "pt"})
            del tensors
        (tmp / CONFIG_NAME).write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
        if shards > 1:
            index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        if folder.exists():  # overwrite: move the old folder aside, swap, then delete it
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
            os.replace(folder, old / folder.name)
            os.replace(tmp, folder)
            shutil.rmtree(old)
        else:
            os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return folder

