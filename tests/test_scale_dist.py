"""Distributed tests of scale/: FSDP2 / DDP on CPU with gloo, 2 processes, no downloads.

  - the 8B presets parse and validate for 8 ranks; LoRA r128 on the meta device: count and PEFT key names
  - an HF folder (bf16, 2 shards + index) loads bit-exactly into FSDP2 shards (2 processes)
  - ranks that take different numbers of denoising steps finish under `rollout_params`, and do hang
    (gloo times out) without it: the negative control shows the test exercises the hazard
  - one GRPO step: 1 process on 2B rows == 2 FSDP2 processes on B rows each (fp32, token and sequence loss)
  - checkpoints: save / load round trip continues bit-exactly; an interrupted save leaves `latest` alone
  - torchrun scale/train.py --preset tiny: text (DDP + LoRA, PEFT export; a rank killed mid-run, torchrun
    restarts, --resume gives the numbers of an uninterrupted run) and t2i (FSDP2 full fine-tuning with a
    reference model, HF export)
  - bad input fails with a clear message before any work
  - scale/gpu_check.py --tiny runs on CPU
Multi-process runs have timeouts, so a hang fails the test instead of the suite."""

import datetime
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")

import maskgrpo  # noqa: E402
from maskgrpo import GRPOConfig, MaskedDiffusionLM, ModelConfig, add_lora  # noqa: E402
from scale import checkpoints as C  # noqa: E402
from scale import distributed as D  # noqa: E402
from scale import train as T  # noqa: E402
from scale.checkpoints import read_hf_folder  # noqa: E402
from scale.tiny import make_tiny_assets  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = Path(sys.executable).with_name("torchrun")
ENV = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """The tiny preset's assets (tokenizer, data, text and t2i models, MAGVIT decoder), made once."""
    return make_tiny_assets(tmp_path_factory.mktemp("tiny") / "tiny_assets")


# -----------------------------------------------------------------------------
# Spawning gloo process groups with a timeout


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, name, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        globals()[name](*args)
    finally:
        D.shutdown()


def spawn(fn, *args, world=2, timeout=150):
    """Run fn(*args) on `world` gloo ranks; fail (and kill them) if they do not finish in time."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(_entry, args=(world, _free_port(), fn.__name__, args), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.time() + timeout
    while not ctx.join(timeout=max(1.0, deadline - time.time())):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{fn.__name__} on {world} processes did not finish within {timeout}s (a hang?)")


# -----------------------------------------------------------------------------
# Presets on the meta device


def test_presets_validate_for_8_ranks_and_lora_r128_on_meta():
    for preset, extra in (("llada-8b", []), ("mmada-8b", ["--vq-model", "v", "--reward-model", "r"])):
        args = T.parse_args(["--preset", preset, "--out", "o", "--model", "m", "--data", "d", *extra])
        cfg = T.check_args(args, world=8)
        assert args.batch_size // cfg.num_generations % 8 == 0
    args = T.parse_args(["--preset", "llada-8b", "--out", "o", "--model", "m", "--data", "d", "--beta", "0"])
    assert args.beta == 0 and args.lora_rank == 128  # a flag beats the preset, the rest stays
    with torch.device("meta"):
        model = add_lora(MaskedDiffusionLM(ModelConfig.llada_8b()), rank=128, alpha=64)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # per layer: 3 x (128 x 4096 + 4096 x 128) + (128 x 4096 + 12288 x 128) = 5.24e6; x 32 layers
    assert trainable == 32 * (3 * 2 * 128 * 4096 + 128 * 4096 + 12288 * 128) == 167_772_160
    peft = C.lora_adapter_state({k: v for k, v in model.state_dict().items()})
    assert len(peft) == 32 * 4 * 2
    assert "base_model.model.model.transformer.blocks.31.up_proj.lora_B.weight" in peft
    assert peft["base_model.model.model.transformer.blocks.0.q_proj.lora_A.weight"].shape == (128, 4096)
    config = C.peft_adapter_config(D.LoRASpec(128, 64))
    assert config["peft_type"] == "LORA" and config["r"] == 128 and config["lora_alpha"] == 64
    assert config["target_modules"] == ["q_proj", "k_proj", "v_proj", "up_proj"]


# -----------------------------------------------------------------------------
# One spawned FSDP2 session: loading, uneven rollouts, the GRPO step on B rows per rank


def _row_seeded_draw_mask(batch, cfg, iteration, generator):
    """maskgrpo.draw_mask with a generator per row, seeded by the row's content: a row gets the same
    mask whichever rank (and row index) it lands on, so 1 and 2 processes can be compared exactly."""
    rows = []
    weights = torch.arange(1, batch.sequences.shape[1] + 1)
    for i in range(batch.sequences.shape[0]):
        seed = int((batch.sequences[i] * weights).sum()) * 131 + iteration
        rows.append(_REAL_DRAW_MASK(batch.rows([i]), cfg, iteration, torch.Generator().manual_seed(seed)))
    return torch.cat(rows)


_REAL_DRAW_MASK = maskgrpo.draw_mask
EQ_G, EQ_GROUPS, EQ_P, EQ_L = 2, 4, 5, 8  # 4 groups of 2 completions; prompt 5, completion 8 tokens


def equivalence_batch(cfg, rank, world):
    """4 groups (8 rows) of fixed random completions with EOS cut-offs; rank r holds groups r, r + W, ..."""
    g = torch.Generator().manual_seed(0)
    N = EQ_G * EQ_GROUPS
    seq = torch.randint(0, cfg.vocab_size - 2, (N, EQ_P + EQ_L), generator=g)
    seq[1, EQ_P + 5] = seq[4, EQ_P + 2] = cfg.eos_token_id  # completions that end early
    prompt_mask = torch.ones(N, EQ_P, dtype=torch.bool)
    prompt_mask[2:4, :2] = False  # left padding
    rewards = torch.tensor([0.0, 1.0, 2.0, 0.5, 1.0, 1.0, 3.0, 0.0])  # one zero-std group
    groups = list(range(EQ_GROUPS))[rank::world]
    rows = [gi * EQ_G + k for gi in groups for k in range(EQ_G)]
    batch = maskgrpo.text_completions(seq[rows], prompt_mask[rows], cfg.eos_token_id)
    return batch, rewards[rows]


def grpo_step_params(model, reference, batch, rewards, loss_type):
    """One grpo_step (mu 2, micro-batches of 2, KL to a frozen reference, clipping on) with SGD, so
    the update is linear in the gradient; returns the full parameters (rank 0; {} elsewhere)."""
    cfg = GRPOConfig(num_generations=EQ_G, max_completion_length=EQ_L, block_length=EQ_L, diffusion_steps=1,
                     num_iterations=2, micro_batch_size=2, beta=0.05, epsilon=0.2, max_grad_norm=0.5, loss_type=loss_type)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    stats = maskgrpo.grpo_step(model, optimizer, batch, rewards, cfg, torch.Generator().manual_seed(1), reference)
    state = C.full_state_dict(model)
    return state, stats


def _fsdp_session(folder, out):
    d = D.init_distributed("cpu")
    results = {}
    # 1. an HF folder (bf16, 2 shards) straight into FSDP2 shards: every local slice bit-exact
    from safetensors.torch import load_file

    model_dir = Path(folder) / "model_text"
    cfg, shards, _ = read_hf_folder(model_dir)
    model = D.build_model(model_dir, cfg, d, mode="fsdp", lora=D.LoRASpec(4, 8), precision="bf16")
    files = {}
    for shard in shards:
        files.update(load_file(shard))
    exact, halves = True, True
    for name, p in model.named_parameters():
        if ".lora_" in name:
            continue
        local = p.to_local()
        expected = D.local_slice(files[name].float(), p)
        exact &= local.dtype == torch.float32 and torch.equal(local, expected)
        halves &= local.shape[0] == math.ceil(p.shape[0] / 2) or d.rank == 1
    results["load_exact"], results["sharded"] = bool(exact), bool(halves)
    results["lora_B_zero"] = all(float(p.full_tensor().abs().sum()) == 0 for n, p in model.named_parameters() if "lora_B" in n)

    # 2. ranks take different numbers of denoising steps (4 vs 8) with the parameters held unsharded
    prompt = torch.randint(0, cfg.vocab_size - 2, (2, 6), generator=torch.Generator().manual_seed(d.rank))
    forwards = []
    hook = model.register_forward_hook(lambda *_: forwards.append(1))
    with D.rollout_params(model), D.compute_context(model, d.device, "bf16"):
        seq = maskgrpo.generate_text(model, prompt, gen_length=8, block_length=4, steps=4 * (d.rank + 1), temperature=1.0,
                                     mask_id=cfg.mask_token_id, generator=torch.Generator().manual_seed(2))
    hook.remove()
    results["rollout_forwards"] = len(forwards)  # 4 on rank 0, 8 on rank 1
    results["resharded_after"] = all(p.to_local().shape[0] < p.shape[0] for n, p in model.named_parameters()
                                     if n.endswith("ff_proj.weight"))
    model.gradient_checkpointing = True
    loss = model(seq).logsumexp(-1).mean()  # training forward/backward still works afterwards
    loss.backward()
    results["backward_after_rollout"] = bool(torch.isfinite(loss))

    # 3. GRPO step on B rows per rank, fp32 (compared with 1 process on 2B rows by the test)
    maskgrpo.draw_mask = _row_seeded_draw_mask
    for loss_type in ("token", "sequence"):
        policy = D.build_model(model_dir, cfg, d, mode="fsdp", precision="fp32")
        reference = D.build_model(model_dir, cfg, d, mode="fsdp", precision="fp32", trainable=False)
        batch, rewards = equivalence_batch(cfg, d.rank, d.world)
        state, stats = grpo_step_params(policy, reference, batch, rewards, loss_type)
        loss = torch.tensor([stats["loss"]], dtype=torch.float64)
        torch.distributed.all_reduce(loss)  # each rank holds its share of the global loss
        if d.is_main:
            torch.save(dict(state=state, loss=float(loss), grad_norm=stats["grad_norm"]), Path(out) / f"grpo_{loss_type}.pt")
    maskgrpo.draw_mask = _REAL_DRAW_MASK

    # 4. negative control: without rollout_params the uneven rollout hangs; a 4 s gloo timeout ends it
    from torch.distributed.device_mesh import DeviceMesh

    group = torch.distributed.new_group(timeout=datetime.timedelta(seconds=4))
    short = D.Dist(d.rank, d.world, d.local_rank, d.device, DeviceMesh.from_group(group, "cpu"))
    plain = D.build_model(model_dir, cfg, short, mode="fsdp", precision="fp32")
    try:
        maskgrpo.generate_text(plain, prompt, gen_length=8, block_length=4, steps=4 * (d.rank + 1), temperature=1.0,
                               mask_id=cfg.mask_token_id, generator=torch.Generator().manual_seed(2))
        torch.distributed.barrier(group=group)
        results["unwrapped_uneven_failed"] = False
    except RuntimeError:
        results["unwrapped_uneven_failed"] = True
    (Path(out) / f"results_rank{d.rank}.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def fsdp_session(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    spawn(_fsdp_session, str(assets), str(out), timeout=240)
    return out, [json.loads((out / f"results_rank{r}.json").read_text()) for r in range(2)]


def test_hf_folder_loads_bit_exactly_into_fsdp2_shards(fsdp_session):
    _, results = fsdp_session
    for r in results:
        assert r["load_exact"], "a local shard differs from the bf16 file's slice"
        assert r["sharded"], "rank 0 should hold half of the rows of every parameter"
        assert r["lora_B_zero"]


def test_uneven_denoising_steps_finish_with_rollout_params(fsdp_session):
    _, results = fsdp_session
    assert [r["rollout_forwards"] for r in results] == [4, 8]
    for r in results:
        assert r["resharded_after"] and r["backward_after_rollout"]
        # negative control: the same rollout without rollout_params is stuck in an all-gather
        assert r["unwrapped_uneven_failed"]


@pytest.mark.parametrize("loss_type", ["token", "sequence"])
def test_grpo_step_one_process_2B_rows_equals_two_processes_B_rows(fsdp_session, assets, loss_type, monkeypatch):
    out, _ = fsdp_session
    two = torch.load(out / f"grpo_{loss_type}.pt", weights_only=True)
    monkeypatch.setattr(maskgrpo, "draw_mask", _row_seeded_draw_mask)
    model_dir = assets / "model_text"
    cfg, _, _ = read_hf_folder(model_dir)
    d = D.Dist(0, 1, 0, torch.device("cpu"))
    policy = D.build_model(model_dir, cfg, d, precision="fp32")
    reference = D.build_model(model_dir, cfg, d, precision="fp32", trainable=False)
    batch, rewards = equivalence_batch(cfg, 0, 1)
    state, stats = grpo_step_params(policy, reference, batch, rewards, loss_type)
    assert stats["loss"] == pytest.approx(two["loss"], abs=1e-6)
    assert stats["grad_norm"] == pytest.approx(two["grad_norm"], rel=1e-5)
    initial, moved = C.full_state_dict(reference), 0.0
    for name, p in state.items():
        torch.testing.assert_close(two["state"][name], p, rtol=0, atol=1e-5, msg=name)
        moved = max(moved, float((p - initial[name]).abs().max()))
    assert moved > 1e-3, "the step should change the parameters visibly"


# -----------------------------------------------------------------------------
# Checkpoints in one process: exact round trip, atomicity


def _tiny_trainer(assets, init_seed=0):
    """A one-process trainer of the tiny text task; init_seed changes the LoRA init and the generators
    (what a checkpoint must overwrite), not the data order."""
    args = T.parse_args(["--preset", "tiny", "--out", "unused", "--precision", "fp32"])
    T.fill_tiny_paths(args, assets)
    task = T.make_task(args, torch.device("cpu"))
    cfg, _, _ = read_hf_folder(args.model)
    d = D.Dist(0, 1, 0, torch.device("cpu"))
    policy = D.build_model(args.model, cfg, d, lora=T.lora_spec(args), precision="fp32", seed=init_seed)
    gcfg = T.grpo_config(args)
    optimizer = maskgrpo.make_optimizer(policy, gcfg)
    generators = {"rollout": torch.Generator(), "masks": torch.Generator()}
    T.seed_generators(generators, init_seed, 0, 0)

    def step(i):
        idx = T.step_prompts(len(task), i, 2, 0)
        batch = task.rollout(policy, idx, gcfg, generators["rollout"], d.device)
        rewards, _ = task.rewards(batch, idx, gcfg.num_generations)
        return maskgrpo.grpo_step(policy, optimizer, batch, rewards, gcfg, generators["masks"])

    return policy, optimizer, generators, step, d


def test_checkpoint_round_trip_and_atomic_latest(assets, tmp_path):
    policy, optimizer, generators, step, d = _tiny_trainer(assets)
    step(0)
    C.save_checkpoint(tmp_path, 1, policy, optimizer, generators, {"note": "x"}, d)
    stats = step(1)
    after = {k: v.clone() for k, v in policy.state_dict().items()}
    # an interrupted save of step 2: a half-written folder, `latest` untouched
    (tmp_path / "step_000002.tmp").mkdir()
    (tmp_path / "step_000002.tmp" / "__0_0.distcp").write_bytes(b"partial")
    assert C.latest_checkpoint(tmp_path).name == "step_000001"

    policy2, optimizer2, generators2, step2, _ = _tiny_trainer(assets, init_seed=1)  # other init and RNG streams
    state, rng_ok = C.load_checkpoint(C.latest_checkpoint(tmp_path), policy2, optimizer2, generators2, d)
    assert state["step"] == 1 and state["note"] == "x" and rng_ok
    stats2 = step2(1)
    assert stats2 == stats
    for k, v in policy2.state_dict().items():
        assert torch.equal(v, after[k]), k
    C.save_checkpoint(tmp_path, 2, policy2, optimizer2, generators2, {}, d, keep=1)
    assert C.latest_checkpoint(tmp_path).name == "step_000002"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000002"]  # tmp replaced, step 1 pruned


def test_leftovers_of_interrupted_saves_are_removed_by_the_next_save(assets, tmp_path):
    policy, optimizer, generators, step, d = _tiny_trainer(assets)
    step(0)
    C.save_checkpoint(tmp_path, 1, policy, optimizer, generators, {}, d)
    # what kills leave behind: a half-written step folder, a half-written pointer (this and an earlier version's
    # name), and a full step folder moved aside to be replaced by a re-save of the same step
    (tmp_path / "step_000002.tmp").mkdir()
    (tmp_path / "step_000002.tmp" / "__0_0.distcp").write_bytes(b"partial")
    (tmp_path / "latest.tmp").write_text("step_0000")
    (tmp_path / "latest.tmp-4242").write_text("step_000")
    shutil.copytree(tmp_path / "step_000001", tmp_path / "step_000001.old")
    assert C.latest_checkpoint(tmp_path).name == "step_000001"  # leftovers are never taken for checkpoints
    step(1)
    C.save_checkpoint(tmp_path, 2, policy, optimizer, generators, {}, d, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000001", "step_000002"]
    assert (tmp_path / "latest").read_text() == "step_000002"


def test_atomic_output_is_all_or_nothing(tmp_path):
    target = tmp_path / "file.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), C.atomic_output(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["file.json"]
    folder = tmp_path / "folder"
    for content in ("first", "second"):  # a folder replaces a folder (the old one moved aside, then deleted)
        with C.atomic_output(folder, folder=True) as tmp:
            (tmp / "x").write_text(content)
    assert (folder / "x").read_text() == "second" and sorted(p.name for p in tmp_path.iterdir()) == ["file.json", "folder"]


# -----------------------------------------------------------------------------
# torchrun scale/train.py --preset tiny


def torchrun(out, assets, *flags, restarts=0, timeout=240):
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(assets, out / "tiny_assets")
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node=2", f"--max-restarts={restarts}", "scale/train.py",
           "--preset", "tiny", "--out", str(out), *flags]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{' '.join(cmd)} did not finish within {timeout}s:\n{(e.stdout or b'')[-3000:]}")
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()], proc


METRICS = ("loss", "kl", "clip_frac", "ratio_mean", "ratio_max", "grad_norm", "masked_tokens", "reward_mean", "reward_std")


def check_run(log, out, steps=2):
    records = {r["step"]: r for r in log if "event" not in r}
    assert sorted(records) == list(range(1, steps + 1))
    for r in records.values():
        assert all(math.isfinite(r[k]) for k in METRICS), r
    done = [r for r in log if r.get("event") == "done"][-1]
    assert len(done["param_checksums"]) == 2 and done["param_checksums"][0] == done["param_checksums"][1]
    latest = C.latest_checkpoint(out / "checkpoints")
    assert latest.name == f"step_{steps:06d}" and (latest / ".metadata").is_file()
    assert {p.name for p in latest.glob("rng_rank*.pt")} == {"rng_rank0.pt", "rng_rank1.pt"}
    return records, done


def test_torchrun_text_lora_ddp_restart_resumes_like_an_uninterrupted_run(assets, tmp_path):
    log, _ = torchrun(tmp_path / "a", assets, "--max-steps", "2", "--export")
    records, done = check_run(log, tmp_path / "a")
    assert any(records[s]["reward_std"] > 0 for s in records), "tiny rewards should vary (non-zero advantages)"
    assert any(abs(records[s]["loss"]) > 0 for s in records)
    # PEFT adapter export
    from safetensors.torch import load_file

    adapters = load_file(tmp_path / "a" / "export" / "adapter_model.safetensors")
    assert "base_model.model.model.transformer.blocks.0.q_proj.lora_A.weight" in adapters
    assert all(k.startswith("base_model.model.") and ".lora_" in k for k in adapters)
    config = json.loads((tmp_path / "a" / "export" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8

    # the last rank dies at the start of step 2 on torchrun's first attempt; torchrun restarts both
    # ranks, which resume from the step-1 checkpoint (--resume = latest) and must reproduce run a
    log_b, proc = torchrun(tmp_path / "b", assets, "--max-steps", "2", "--resume", "--fail-at-step", "2", restarts=1)
    assert "exiting to test the restart" in proc.stdout + proc.stderr
    resumed = [r for r in log_b if r.get("event") == "resume"]
    assert len(resumed) == 1 and resumed[0]["step"] == 1 and resumed[0]["rng_restored"]
    records_b, done_b = check_run(log_b, tmp_path / "b")
    for k in METRICS:
        assert records_b[2][k] == records[2][k], k
    assert records_b[2]["sample"] == records[2]["sample"]
    assert done_b["param_checksums"] == done["param_checksums"]


def test_torchrun_t2i_fsdp_full_finetune_with_reference(assets, tmp_path):
    log, _ = torchrun(tmp_path, assets, "--task", "t2i", "--lora-rank", "0", "--max-steps", "2", "--save-every", "0",
                      "--export")
    records, _ = check_run(log, tmp_path)
    start = log[0]
    assert start["event"] == "start" and start["parallel"] == "fsdp" and start["world_size"] == 2
    assert records[2]["kl"] > 0  # a frozen reference copy: the policy has moved away from it
    cfg, _, _ = read_hf_folder(tmp_path / "export")  # a valid HF folder: config, index, shards
    assert cfg.vocab_size == read_hf_folder(assets / "model_t2i")[0].vocab_size


# -----------------------------------------------------------------------------
# Bad input: one clear line before any work (tests/test_scale_cli_errors.py has the full table)


def run_main(capsys, tmp_path, assets, *flags):
    """scale/train.py's main on the tiny preset; returns its one stderr line (it must fail with status 2)."""
    out = tmp_path / "run"
    out.mkdir(exist_ok=True)
    if not (out / "tiny_assets").exists():
        shutil.copytree(assets, out / "tiny_assets")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        T.main(["--preset", "tiny", "--out", str(out), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1, err
    return err[0]


def assert_no_work(tmp_path):
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "log.jsonl").exists()


def test_missing_checkpoint_folder(tmp_path, assets, capsys):
    assert "--model: checkpoint folder not found" in run_main(capsys, tmp_path, assets, "--model", str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="--preset llada-8b needs --model"):
        T.check_args(T.parse_args(["--preset", "llada-8b", "--out", str(tmp_path / "run"), "--data", "x"]), world=1)
    assert_no_work(tmp_path)


def test_mismatched_config(tmp_path, assets, capsys):
    bad = tmp_path / "bad_model"
    shutil.copytree(assets / "model_text", bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(config | {"mlp_hidden_size": 48}))
    line = run_main(capsys, tmp_path, assets, "--model", str(bad))
    assert re.search(r"has shape \(32, 64\) in .*the config implies \(32, 48\)", line), line
    # a text checkpoint for text-to-image
    line = run_main(capsys, tmp_path, assets, "--task", "t2i", "--model", str(assets / "model_text"))
    assert "no room for image codes" in line
    assert_no_work(tmp_path)


def test_group_size_and_batch_errors(tmp_path, assets, capsys):
    assert "--num-generations=4 must divide --batch-size=6" in run_main(capsys, tmp_path, assets, "--batch-size", "6")
    args = T.parse_args(["--preset", "tiny", "--out", "o"])
    with pytest.raises(ValueError, match="do not split over 4 ranks"):
        T.check_args(args, world=4)
    with pytest.raises(ValueError, match="--parallel ddp needs --lora-rank > 0"):
        T.check_args(T.parse_args(["--preset", "tiny", "--out", "o", "--parallel", "ddp", "--lora-rank", "0"]), world=2)
    hsdp = T.parse_args(["--preset", "tiny", "--out", "o", "--parallel", "hsdp", "--batch-size", "48"])
    T.check_args(hsdp, world=4, per_node=2)  # 2 nodes x 2 processes
    for world, per_node in ((2, 2), (6, 4)):  # one node; nodes of unequal size
        with pytest.raises(ValueError, match="--parallel hsdp shards within a node and replicates across nodes"):
            T.check_args(hsdp, world=world, per_node=per_node)
    assert "block_length=5 must divide" in run_main(capsys, tmp_path, assets, "--block-length", "5")
    assert_no_work(tmp_path)


def test_resume_from_a_checkpoint_of_another_configuration(tmp_path, assets, capsys):
    ckpt = tmp_path / "run" / "checkpoints"
    (ckpt / "step_000001").mkdir(parents=True)
    (ckpt / "step_000001" / "trainer_state.json").write_text(json.dumps({"step": 1, "lora": None}))
    (ckpt / "latest").write_text("step_000001")
    assert "was made with" in run_main(capsys, tmp_path, assets, "--resume")
    assert "not a checkpoint" in run_main(capsys, tmp_path, assets, "--resume", str(tmp_path / "elsewhere"))
    assert not (tmp_path / "run" / "log.jsonl").exists()


# -----------------------------------------------------------------------------
# The GPU check script, on a tiny model on CPU


def test_gpu_check_tiny_on_cpu(tmp_path, monkeypatch):
    from scale import gpu_check

    monkeypatch.setenv("OUT", str(tmp_path))
    summary = gpu_check.main(["--tiny"])
    expected = {"build_model", "rollout_text", "rollout_text_prefix", "rollout_text_dual", "rollout_text_dual_threshold0.9",
                "eval_text_greedy", "score_logps", "update_lora_ac", "update_lora", "fwd_bwd_full_ac", "fwd_bwd_full",
                "rollout_t2i"}
    assert set(summary["results"]) == expected
    for name, r in summary["results"].items():
        assert "error" not in r and r["seconds"] >= 0, (name, r)
    assert json.loads((tmp_path / "gpu_check.json").read_text())["results"].keys() == expected
    text = summary["results"]
    assert all(text[k]["forwards"] == 4 for k in ("rollout_text", "rollout_text_prefix", "rollout_text_dual"))
    assert 1 <= text["rollout_text_dual_threshold0.9"]["forwards"] <= 4  # threshold: steps is an upper bound
