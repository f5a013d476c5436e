"""
Distribution for scale/: the process group, FSDP2 / HSDP / DDP wrapping, model building, rollouts.

    init_distributed   torchrun's environment -> Dist(rank, world, device, mesh); backend from the device
                       (nccl on GPU, gloo on CPU); world 1 needs no process group at all
    build_model        HF folder -> MaskedDiffusionLM: built on the meta device, sharded (FSDP2 / HSDP) or not,
                       materialised with to_empty, weights read straight into the local shards
                       (checkpoints.load_hf_weights: no full copy on any rank), LoRA initialised, wrapped (DDP) last
    parallelize        world 1: the model unchanged; else FSDP2 (fully_shard per block, then the root;
                       MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)) over a 1-D mesh (fsdp) or a
                       2-D (replicate, shard) mesh (hsdp), DDP (LoRA runs), or nothing (local: evaluation)
    rollout_params     unshard all FSDP2 groups for generation, so ranks may take different numbers of
                       denoising steps (a sharded forward is a collective; an extra one on one rank hangs)

Precision: FSDP2 keeps fp32 master weights and computes in bf16 through its MixedPrecisionPolicy.
Unsharded models (world 1, DDP) keep trainable weights in fp32, frozen weights in bf16, and compute
under torch.autocast (`compute_context`). A reference model (full fine-tuning with beta > 0) is stored
in bf16 throughout. precision="fp32" turns all of that off (the equivalence tests use it).

How a batch is split: prompts are strided over ranks (rank r takes prompts r, r + W, ...); the G
completions of a prompt stay on the rank that generated them, so group advantages need no gather;
maskgrpo.grpo_step normalises the loss by global token counts times W, because FSDP/DDP average
gradients over ranks: one process on 2B rows takes the same step as two processes on B rows each.

HSDP (several nodes): the mesh is (nodes, processes per node); parameters are sharded within a node and
replicated across nodes, so the large all-gathers stay on the fast intra-node links and only gradient
all-reduces cross nodes (the layout torchtitan calls data_parallel_replicate x data_parallel_shard).
"""

import math
import os
import secrets
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from maskgrpo import Block, LoRALinear, MaskedDiffusionLM, ModelConfig, add_lora
from scale.checkpoints import load_hf_weights

PARALLEL_MODES = ("fsdp", "hsdp", "ddp", "local")


def _block_projections():
    """Names of the nn.Linear layers of a maskgrpo.Block (which LoRA may wrap), read off a meta-device block."""
    with torch.device("meta"):
        block = Block(ModelConfig.tiny(vocab_size=4, mask_token_id=3, eos_token_id=2, d_model=2, n_heads=1,
                                       mlp_hidden_size=2))
    return tuple(name for name, m in block.named_children() if isinstance(m, nn.Linear))


BLOCK_PROJECTIONS = _block_projections()

# -----------------------------------------------------------------------------
# Process group and device


@dataclass
class Dist:
    rank: int  # global rank
    world: int  # number of processes
    local_rank: int  # GPU index on this node
    device: torch.device
    mesh: object = None  # DeviceMesh for FSDP2: (world,), or (nodes, per node) for HSDP; None when world == 1

    @property
    def is_main(self):
        return self.rank == 0


def _agreed_prefix(store, rank, world, timeout_s=600):
    """A store key prefix that every rank of this launch agrees on and no earlier launch used.

    torchrun shares its rendezvous TCPStore with the workers, and the keys of an earlier attempt survive a
    restart: a rank can read a dead peer's address and fail to connect (pytorch/pytorch#135712). Namespacing
    by TORCHELASTIC_RESTART_COUNT is not enough on several nodes: the counter is per agent, and an agent that
    replaces a dead node (or only saw its peers restart) counts differently. So rank 0 draws a random id and
    hands it out in a handshake that stale keys cannot fool: rank r posts a fresh nonce, rank 0 answers
    "<nonce>:<id>", rank r accepts only an answer carrying its own nonce and confirms with "<id>", for
    which rank 0 waits."""
    store = dist.PrefixStore("maskgrpo/handshake", store)
    mine, deadline = secrets.token_hex(8), time.monotonic() + timeout_s
    pending = set(range(1, world)) if rank == 0 else {rank}
    if rank > 0:
        store.set(f"hello/{rank}", mine)
    while pending:
        if time.monotonic() > deadline:
            raise RuntimeError(f"rank {rank}: the process-group handshake did not complete in {timeout_s}s "
                               f"(waiting for ranks {sorted(pending)})")
        for r in sorted(pending):
            if rank == 0:
                if store.check([f"hello/{r}"]):
                    store.set(f"answer/{r}", f"{store.get(f'hello/{r}').decode()}:{mine}")
                if store.check([f"ack/{r}"]) and store.get(f"ack/{r}").decode() == mine:
                    pending.discard(r)
            elif store.check([f"answer/{r}"]):
                nonce, _, agreed = store.get(f"answer/{r}").decode().partition(":")
                if nonce == mine:
                    store.set(f"ack/{r}", agreed)
                    return f"maskgrpo/{agreed}"
        time.sleep(0.01)
    return f"maskgrpo/{mine}"


def init_distributed(device=None, *, hsdp=False):
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE (absent: one process) and start the
    process group. device: "cuda", "cpu" or None (cuda when available). Backend: nccl on GPU, gloo on CPU.
    hsdp: the FSDP2 mesh is (nodes, processes per node) instead of (world,)."""
    from torch.distributed.device_mesh import init_device_mesh

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but torch.cuda.is_available() is False")
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
            if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":  # torchrun's shared store: see _agreed_prefix
                store, _, _ = next(dist.rendezvous("env://"))
                store = dist.PrefixStore(_agreed_prefix(store, rank, world), store)
                dist.init_process_group(backend, store=store, rank=rank, world_size=world, device_id=device_id)
            else:
                dist.init_process_group(backend, device_id=device_id)
        # an explicit mesh of the device type: on CPU, FSDP2 would otherwise look for a GPU
        if hsdp:
            mesh = init_device_mesh(dev.type, (world // per_node, per_node), mesh_dim_names=("replicate", "shard"))
        else:
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


def broadcast_object(obj, d: Dist):
    """Rank 0's `obj` on every rank (itself on one process)."""
    if d.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# -----------------------------------------------------------------------------
# Wrapping: FSDP2 or DDP, only when the world size is > 1


def mixed_precision(precision):
    """FSDP2 policy: bf16 parameters for compute, fp32 gradient reduction; fp32 = no policy."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "fp32":
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def parallelize(model, d: Dist, mode, precision="bf16"):
    """World 1 or mode "local": the model unchanged. Else mode "fsdp" / "hsdp": fully_shard every block
    over d.mesh (its parameters are all-gathered just before its forward, freed after), then the root
    (embedding, ln_f, head); the model may still be on the meta device. mode "ddp": replicate a
    materialised model (LoRA runs: every GPU holds the frozen bf16 base, only adapter gradients are
    all-reduced)."""
    if mode not in PARALLEL_MODES:
        raise ValueError(f"parallel mode must be one of {PARALLEL_MODES}, got {mode!r}")
    if d.world == 1 or mode == "local":
        return model
    if mode in ("fsdp", "hsdp"):
        from torch.distributed.fsdp import fully_shard

        policy = mixed_precision(precision)
        for block in model.model.transformer.blocks:
            fully_shard(block, mesh=d.mesh, mp_policy=policy, reshard_after_forward=True)
        fully_shard(model, mesh=d.mesh, mp_policy=policy, reshard_after_forward=False)
        return model
    from torch.nn.parallel import DistributedDataParallel

    # init_sync=False: every rank loaded the same files and drew the same seeded LoRA init, so the
    # 16 GB broadcast of the frozen base from rank 0 is skipped (param_checksum verifies the replicas)
    return DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None,
                                   init_sync=False)


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
# Building: HF folder -> (sharded) MaskedDiffusionLM without a full copy on one rank


@dataclass
class LoRASpec:
    rank: int = 128  # r
    alpha: float = 64  # scaling alpha / r
    targets: tuple = ("q_proj", "k_proj", "v_proj", "up_proj")  # projections of every block

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"--lora-rank={self.rank} must be >= 1 for LoRA")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"--lora-alpha={self.alpha} must be a finite number > 0")
        unknown = [t for t in self.targets if t not in BLOCK_PROJECTIONS]
        if unknown or not self.targets:
            raise ValueError(f"--lora-targets {','.join(self.targets)}: {unknown or 'none given'} not among the "
                             f"projections of a block ({','.join(BLOCK_PROJECTIONS)})")


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
    trainable=False builds a frozen reference model (stored in the compute dtype). mode "local" gives
    every rank its own unwrapped copy (evaluation). Unsharded: frozen weights are stored in bf16
    (precision "bf16"), trainable ones in fp32."""
    if lora is not None and not trainable:
        raise ValueError("a frozen model takes no LoRA adapters")
    if mode == "ddp" and lora is None and d.world > 1:
        raise ValueError("DDP replicates the fp32 weights and Adam states on every GPU: use it for LoRA runs; "
                         "full fine-tuning needs mode 'fsdp' or 'hsdp'")
    compute = torch.bfloat16 if precision == "bf16" else torch.float32
    sharded = mode in ("fsdp", "hsdp") and d.world > 1
    with torch.device("meta"):
        model = MaskedDiffusionLM(config)
    model.gradient_checkpointing = gradient_checkpointing
    if lora is not None:
        add_lora(model, lora.rank, lora.alpha, lora.targets)  # on meta: initialised below
    if not trainable:
        model.requires_grad_(False)
        model.to(compute)
    elif not sharded:
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(compute)  # frozen base of a LoRA run: bf16
    if sharded:
        parallelize(model, d, mode, precision)
    model.to_empty(device=d.device)
    load_hf_weights(model, folder)
    if lora is not None:
        init_lora(model, seed)
    if not trainable:
        return model.eval()
    return model if sharded else parallelize(model, d, mode if mode == "local" else "ddp", precision)


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


