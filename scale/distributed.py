"""
Distribution for scale/: one code path from one CPU process to 8 GPUs.

    init_distributed   torchrun's environment -> Dist(rank, world, device, mesh); backend from the device
                       (nccl on GPU, gloo on CPU); world 1 needs no process group at all
    build_model        HF folder -> MaskedDiffusionLM: built on the meta device, sharded (FSDP2) or not,
                       materialised with to_empty, weights read straight into the local shards by
                       torch.distributed.checkpoint (HuggingFaceStorageReader reads each rank's slices
                       only: no full copy on any rank), LoRA initialised, wrapped (DDP) last
    parallelize        world 1: the model unchanged; else FSDP2 (fully_shard per block, then the root;
                       MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)) or DDP (LoRA runs)
    rollout_params     unshard all FSDP2 groups for generation, so ranks may take different numbers of
                       denoising steps (a sharded forward is a collective; an extra one on one rank hangs)
    save_checkpoint    DCP save of model + optimiser, per-rank torch.Generator states, trainer state;
    load_checkpoint    written to step_N.tmp, renamed to step_N, then the `latest` file is replaced:
                       an interrupted save never replaces the last good one
    export_hf          the full model as an HF safetensors folder, or LoRA adapters in PEFT's format

Precision: FSDP2 keeps fp32 master weights and computes in bf16 through its MixedPrecisionPolicy.
Unsharded models (world 1, DDP) keep trainable weights in fp32, frozen weights in bf16, and compute
under torch.autocast (`compute_context`). A reference model (full fine-tuning with beta > 0) is stored
in bf16 throughout. precision="fp32" turns all of that off (the equivalence tests use it).

How a batch is split: prompts are strided over ranks (rank r takes prompts r, r + W, ...); the G
completions of a prompt stay on the rank that generated them, so group advantages need no gather;
maskgrpo.grpo_step normalises the loss by global token counts times W, because FSDP/DDP average
gradients over ranks: one process on 2B rows takes the same step as two processes on B rows each.
"""

import json
import math
import os
import shutil
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from maskgrpo import LoRALinear, MaskedDiffusionLM, ModelConfig, add_lora

# -----------------------------------------------------------------------------
# Process group and device


@dataclass
class Dist:
    rank: int  # global rank
    world: int  # number of processes
    local_rank: int  # GPU index on this node
    device: torch.device
    mesh: object = None  # DeviceMesh over all ranks (None when world == 1)

    @property
    def is_main(self):
        return self.rank == 0


def init_distributed(device=None):
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK (absent: one process) and start the process group.
    device: "cuda", "cpu" or None (cuda when available). Backend: nccl on GPU, gloo on CPU."""
    from torch.distributed.device_mesh import init_device_mesh

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was asked for but torch.cuda.is_available() is False")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    elif kind == "cpu":
        dev = torch.device("cpu")
    else:
        raise ValueError(f"device must be 'cuda', 'cpu' or None, got {device!r}")
    mesh = None
    if world > 1:
        if not dist.is_initialized():
            backend, device_id = ("nccl", dev) if dev.type == "cuda" else ("gloo", None)
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
            if attempt is None:
                dist.init_process_group(backend, device_id=device_id)
            else:
                # torchrun shares its rendezvous TCPStore with the workers, and after a restart the keys of
                # the previous attempt are still there: a rank can read a dead peer's address and fail to
                # connect (pytorch/pytorch#135712). Namespace the process group's keys by the attempt.
                store, _, _ = next(dist.rendezvous("env://"))
                store = dist.PrefixStore(f"maskgrpo/attempt_{attempt}", store)
                dist.init_process_group(backend, store=store, rank=rank, world_size=world, device_id=device_id)
        # an explicit mesh of the device type: on CPU, FSDP2 would otherwise look for a GPU
        mesh = init_device_mesh(dev.type, (world,))
    return Dist(rank, world, local_rank, dev, mesh)


def shutdown():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rank_slice(items, rank, world):
    """Rank r's share of a global list: items r, r + W, r + 2W, ... (prompts, before the G copies)."""
    return items[rank::world]


def all_gather_tensor(x):
    """Concatenate an equal-shaped tensor from every rank along dim 0 (itself on one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


# -----------------------------------------------------------------------------
# Wrapping: FSDP2 or DDP, only when the world size is > 1


def mixed_precision(precision):
    """FSDP2 policy: bf16 parameters for compute, fp32 gradient reduction; fp32 = no policy."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "fp32":
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def parallelize(model, d: Dist, mode, precision="bf16"):
    """World 1: the model unchanged. Else mode "fsdp": fully_shard every block (its parameters are
    all-gathered just before its forward, freed after), then the root (embedding, ln_f, head); the
    model may still be on the meta device. mode "ddp": replicate a materialised model (LoRA runs:
    every GPU holds the frozen bf16 base, only adapter gradients are all-reduced)."""
    if d.world == 1:
        return model
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        policy = mixed_precision(precision)
        for block in model.model.transformer.blocks:
            fully_shard(block, mesh=d.mesh, mp_policy=policy, reshard_after_forward=True)
        fully_shard(model, mesh=d.mesh, mp_policy=policy, reshard_after_forward=False)
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # init_sync=False: every rank loaded the same files and drew the same seeded LoRA init, so the
        # 16 GB broadcast of the frozen base from rank 0 is skipped (param_checksum verifies the replicas)
        return DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None,
                                       init_sync=False)
    raise ValueError(f"parallel mode must be 'fsdp' or 'ddp', got {mode!r}")


def unwrap(model):
    """The MaskedDiffusionLM inside a DDP wrapper (FSDP2 keeps the module itself)."""
    return getattr(model, "module", model)


def is_sharded(model):
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def compute_context(model, device, precision):
    """torch.autocast(bf16) for an unsharded model; FSDP2's policy already computes in bf16."""
    if precision == "fp32" or is_sharded(model):
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


@contextmanager
def rollout_params(model):
    """Hold every FSDP2 group unsharded (all-gathered once, in the policy's bf16) for generation.
    With reshard_after_forward every block forward all-gathers, so a rank that runs one more denoising
    step than another hangs (NCCL) or aborts (gloo). Inside this block forwards are local, so ranks may
    take different numbers of steps. Costs one unsharded bf16 copy (16 GB for 8B). No-op otherwise."""
    from torch.distributed.fsdp import FSDPModule

    groups = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in groups:
        m.set_reshard_after_forward(False, recurse=False)
    for m in groups:
        m.unshard()
    try:
        yield model
    finally:
        for m in groups:
            m.reshard()
            # the values `parallelize` set: blocks reshard after forward, the root does not
            m.set_reshard_after_forward(m is not model, recurse=False)


# -----------------------------------------------------------------------------
# Building and loading: HF folder -> (sharded) MaskedDiffusionLM without a full copy on one rank


@dataclass
class LoRASpec:
    rank: int = 128  # r
    alpha: float = 64  # scaling alpha / r
    targets: tuple = ("q_proj", "k_proj", "v_proj", "up_proj")


def load_hf_weights(model, folder):
    """Read an HF safetensors folder into `model` in place with torch.distributed.checkpoint:
    HuggingFaceStorageReader reads only this rank's slice of each tensor (safetensors get_slice)
    and copies it, cast to the parameter dtype, into the local shard. LoRA adapters are not in
    the folder and are left alone. Validate the folder first (scale.checkpoints.read_hf_folder)."""
    import torch.distributed.checkpoint as dcp

    state = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
    dcp.load(state, storage_reader=dcp.HuggingFaceStorageReader(str(folder)),
             no_dist=not (dist.is_available() and dist.is_initialized()))


def local_slice(full, param):
    """This rank's part of a full tensor for `param`: the whole tensor, or for an FSDP2 DTensor the
    slice its placements give this rank (computed locally, no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    full = full.to(device=param.device, dtype=param.dtype)
    if isinstance(param, DTensor):
        return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
    return full


def _copy_full(param, full):
    """Copy a full tensor (the same on every rank) into a parameter that may be an FSDP2 DTensor."""
    (param.to_local() if hasattr(param, "to_local") else param).copy_(local_slice(full, param))


@torch.no_grad()
def init_lora(model, seed):
    """LoRA's init after materialisation: A ~ kaiming-uniform (as nn.Linear), B = 0 (identity update).
    Full tensors are drawn on every rank from one seeded generator, so every rank agrees."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            a = torch.empty(m.lora_A.weight.shape)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=g)
            _copy_full(m.lora_A.weight, a)
            _copy_full(m.lora_B.weight, torch.zeros(m.lora_B.weight.shape))


def build_model(folder, config: ModelConfig, d: Dist, *, mode="fsdp", lora: LoRASpec | None = None, precision="bf16",
                trainable=True, gradient_checkpointing=True, seed=0):
    """A MaskedDiffusionLM with the weights of an HF folder, ready for training on this rank:
        meta device -> LoRA (optional) -> FSDP2 shard -> to_empty(device) -> DCP read of the local
        slices -> LoRA init -> DDP wrap.
    trainable=False builds a frozen reference model (stored in the compute dtype).
    Unsharded: frozen weights are stored in bf16 (precision "bf16"), trainable ones in fp32."""
    if lora is not None and not trainable:
        raise ValueError("a frozen model takes no LoRA adapters")
    if mode == "ddp" and lora is None and d.world > 1:
        raise ValueError("DDP replicates the fp32 weights and Adam states on every GPU: use it for LoRA runs; "
                         "full fine-tuning needs mode 'fsdp'")
    compute = torch.bfloat16 if precision == "bf16" else torch.float32
    with torch.device("meta"):
        model = MaskedDiffusionLM(config)
    model.gradient_checkpointing = gradient_checkpointing
    if lora is not None:
        add_lora(model, lora.rank, lora.alpha, lora.targets)  # on meta: initialised below
    if not trainable:
        model.requires_grad_(False)
        model.to(compute)
    elif mode != "fsdp" or d.world == 1:
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(compute)  # frozen base of a LoRA run: bf16
    sharded = mode == "fsdp" and d.world > 1
    if sharded:
        parallelize(model, d, "fsdp", precision)
    model.to_empty(device=d.device)
    load_hf_weights(model, folder)
    if lora is not None:
        init_lora(model, seed)
    if not trainable:
        return model.eval()
    return model if sharded else parallelize(model, d, "ddp", precision)  # world 1: unchanged


@torch.no_grad()
def param_checksum(model):
    """sum over parameters of sum(p) in float64, from the full (gathered) values: a collective
    under FSDP2. Equal on every rank iff the replicas agree (DDP) / the gathers agree (FSDP2)."""
    from torch.distributed.tensor import DTensor

    total = 0.0
    for p in unwrap(model).parameters():
        full = p.full_tensor() if isinstance(p, DTensor) else p
        total += float(full.double().sum())
    return total


# -----------------------------------------------------------------------------
# Training checkpoints (DCP) and atomic directory layout
#
#   <dir>/step_000002/          .metadata, __<rank>_0.distcp (model + optimiser shards),
#                               rng_rank<r>.pt (torch.Generator states), trainer_state.json
#   <dir>/step_000003.tmp/      a save in progress (or interrupted: ignored, deleted by the next save)
#   <dir>/latest                "step_000002": replaced atomically (os.replace) after the rename

LATEST = "latest"


def _state_dict_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kw)


def step_dir_name(step):
    return f"step_{step:06d}"


def latest_checkpoint(root):
    """Path of the last complete checkpoint under root (the one `latest` names), or None. Should the
    named folder be gone, the newest complete step_N folder is taken instead."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        path = root / pointer.read_text().strip()
        if (path / "trainer_state.json").is_file():
            return path
    complete = sorted(p for p in root.glob("step_*") if p.is_dir() and (p / "trainer_state.json").is_file()
                      and not p.name.endswith(".tmp"))
    return complete[-1] if complete else None


def _write_atomic(path, text):
    tmp = Path(f"{path}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(root, step, model, optimizer, generators, trainer_state, d: Dist, keep=2):
    """Save model + optimiser (DCP, each rank writes its shards; frozen weights are skipped, they
    come back from the HF folder), this rank's generator states and a JSON trainer state, into
    root/step_N.tmp; then rank 0 renames it to step_N and points `latest` at it. Keeps the last
    `keep` checkpoints. Every rank must call this."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = Path(root)
    final, tmp = root / step_dir_name(step), root / f"{step_dir_name(step)}.tmp"
    if d.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # left by an interrupted save
        tmp.mkdir()
    barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_state_dict_options(ignore_frozen_params=True))
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp), no_dist=d.world == 1)
    torch.save({name: g.get_state() for name, g in generators.items()}, tmp / f"rng_rank{d.rank}.pt")
    if d.is_main:
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state | {"step": step, "world_size": d.world}, indent=2))
    barrier()
    if d.is_main:
        old = None
        if final.exists():  # the same step saved again (after resuming from an earlier checkpoint)
            old = final.with_name(final.name + ".old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(tmp, final)
        _write_atomic(root / LATEST, final.name)
        if old is not None:
            shutil.rmtree(old)
        done = sorted(p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit())
        for stale in done[:-keep] if keep > 0 else []:
            if stale != final:
                shutil.rmtree(stale)
    barrier()
    return final


def read_trainer_state(path):
    path = Path(path)
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"not a checkpoint (no trainer_state.json): {path}")
    return json.loads((path / "trainer_state.json").read_text())


def load_checkpoint(path, model, optimizer, generators, d: Dist):
    """Restore a save_checkpoint folder into an already built model and optimiser (DCP reshards, so
    the world size may differ; the generator states are per rank and are restored only when it does
    not, else False is returned and the caller reseeds). Returns (trainer_state, rng_restored)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(path)
    state = read_trainer_state(path)
    # strict=False: frozen weights are not in the checkpoint; every trainable one is (dcp.load fails otherwise)
    options = _state_dict_options(ignore_frozen_params=True, strict=False)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path), no_dist=d.world == 1)
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=options)
    rng_file = path / f"rng_rank{d.rank}.pt"
    same_world = state.get("world_size") == d.world and rng_file.is_file()
    if same_world:
        saved = torch.load(rng_file, weights_only=True)
        if set(saved) != set(generators):
            raise ValueError(f"{rng_file} holds generators {sorted(saved)}, the trainer has {sorted(generators)}")
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
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return {}
    return {k: v.detach().cpu() for k, v in state.items()}


def lora_adapter_state(state_dict):
    """PEFT's key layout: base_model.model.<module path>.lora_A.weight (no adapter name)."""
    return {f"base_model.model.{k}": v.contiguous() for k, v in state_dict.items() if ".lora_" in k}


def peft_adapter_config(lora: LoRASpec, base_model_name_or_path=None):
    """adapter_config.json of a PEFT LoRA adapter matching maskgrpo.add_lora (no dropout, no bias)."""
    return {"peft_type": "LORA", "task_type": None, "r": lora.rank, "lora_alpha": lora.alpha,
            "target_modules": list(lora.targets), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
            "inference_mode": True, "base_model_name_or_path": base_model_name_or_path}


def export_hf(model, folder, d: Dist, *, lora: LoRASpec | None = None, base_model=None, shards=2):
    """Write rank 0's export: the full model as an HF folder (bf16 safetensors + index + config.json,
    loadable by scale.checkpoints / this module), or with LoRA only the adapters
    (adapter_model.safetensors + adapter_config.json, PEFT's format). Every rank must call this."""
    from safetensors.torch import save_file

    from scale.checkpoints import hf_config_from_model_config, save_hf_folder

    folder = Path(folder)
    state = full_state_dict(model, trainable_only=lora is not None)
    if d.is_main:
        if lora is not None:
            tmp = folder.with_name(folder.name + ".tmp")
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            save_file(lora_adapter_state(state), tmp / "adapter_model.safetensors", metadata={"format": "pt"})
            (tmp / "adapter_config.json").write_text(json.dumps(peft_adapter_config(lora, base_model), indent=2))
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(tmp, folder)
        else:
            config = unwrap(model).config
            save_hf_folder(state, folder, config_json=hf_config_from_model_config(config),
                           shards=min(shards, len(state)), overwrite=True)
    barrier()
    return folder
