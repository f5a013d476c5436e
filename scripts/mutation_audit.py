"""Mutation audit of the wiring tests: make each one-line bug below in a copy of the repository, run a
test file there, and print which tests fail. The checkout itself is never modified.

    .venv/bin/python scripts/mutation_audit.py [--tests tests/test_wiring.py] [bug name ...]
"""

import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent

# (name, text in maskgrpo.py (must occur once), its replacement)
BUGS = [
    ("reference scored on independent masks",
     "    masks_ref = masks if cfg.shared_masks else [draw_mask(batch, cfg, j, generator) for j in range(mu)]",
     "    masks_ref = [draw_mask(batch, cfg, j, generator) for j in range(mu)]"),
    ("reference scored on the masks in reverse order", "for m in masks_ref]", "for m in masks_ref[::-1]]"),
    ("loss mask keeps the text after the first EOS", "masks_old[j][:, P] & batch.scored & finite[:, None]",
     "masks_old[j][:, P] & finite[:, None]"),
    ("loss mask keeps rows without a reward", "masks_old[j][:, P] & batch.scored & finite[:, None]",
     "masks_old[j][:, P] & batch.scored"),
    ("loss mask = every scored token, masked or not", "loss_mask = masks[j][:, P] & masks_old[j][:, P] & batch.scored",
     "loss_mask = masks_old[j][:, P] | batch.scored"),
    ("rollout prompts tiled, not interleaved", "prompt_ids.repeat_interleave(G, 0)", "prompt_ids.repeat(G, 1)"),
    ("rollout prompt mask tiled", "    prompt_mask = prompt_mask.repeat_interleave(G, 0)",
     "    prompt_mask = prompt_mask.repeat(G, 1)"),
    ("old log-probs rescored at every update", "batch, masks[j], old[j], ref[j]",
     "batch, masks[j], _score_all(policy, batch, masks_old[j], cfg.micro_batch_size), ref[j]"),
    ("no gradient clipping", "clip_grad_norm_(params, cfg.max_grad_norm or math.inf)", "clip_grad_norm_(params, math.inf)"),
    ("grad_norm measured after clipping", '    grad_norm = float(getattr(grad_norm, "full_tensor", lambda: grad_norm)())',
     "    grad_norm = float(torch.cat([p.grad.flatten() for p in params]).norm())"),
    ("masked_logps ignores key padding", "logits = model(x_t, batch.attention_mask, positions",
     "logits = model(x_t, None, positions"),
    ("tempered confidence", "return x0, torch.gather(logits.softmax(-1)",
     "return x0, torch.gather((logits / (temperature or 1)).softmax(-1)"),
    ("float32 Gumbel draw", "generator=generator, device=logits.device, dtype=torch.float64)",
     "generator=generator, device=logits.device, dtype=torch.float32)"),
    ("[MASK] may be a candidate", "    candidates[..., mask_id] = -math.inf\n",
     "    candidates[..., mask_id] = candidates[..., mask_id]\n"),
    ("RoPE sign flip", "torch.cat([-x2, x1], dim=-1)", "torch.cat([x2, -x1], dim=-1)"),
    ("RMSNorm without its gain", "return self.weight * h.to(x.dtype)", "return h.to(x.dtype)"),
    ("RMSNorm eps outside the root", "h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)",
     "h * (torch.rsqrt(h.pow(2).mean(-1, keepdim=True)) + self.eps)"),
    ("forward ignores key padding", "mask = None if attention_mask is None else attention_mask[:, None, None, :].bool()",
     "mask = None"),
    # outside the wiring: caught by the toy smoke test (--tests tests/test_toy_arithmetic.py) and test_maskgrpo's oracle
    ("advantages with the wrong sign", "adv = torch.where(ok, r - mean, 0)", "adv = torch.where(ok, mean - r, 0)"),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tests", default="tests/test_wiring.py", help="pytest target run under each bug")
    parser.add_argument("bugs", nargs="*", help="bug names to try (default: all)")
    args = parser.parse_args()
    unknown = set(args.bugs) - {name for name, _, _ in BUGS}
    if unknown:
        parser.error(f"unknown bug names {sorted(unknown)}")
    work = pathlib.Path(tempfile.mkdtemp(prefix="mutation-audit-"))
    try:
        shutil.copytree(ROOT, work, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns(".venv", "runs", ".git", "__pycache__", "docs", "*.ipynb"))
        source = (work / "maskgrpo.py").read_text()
        env = dict(os.environ, PYTHONPATH=str(work))
        for name, text, bug in BUGS:
            if args.bugs and name not in args.bugs:
                continue
            if source.count(text) != 1:
                raise SystemExit(f"bug {name!r}: its text occurs {source.count(text)} times in maskgrpo.py, not once")
            (work / "maskgrpo.py").write_text(source.replace(text, bug))
            run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", args.tests],
                                 capture_output=True, text=True, cwd=work, env=env)
            failed = [line.split("::")[1].split(" ")[0] for line in run.stdout.splitlines() if line.startswith("FAILED")]
            print(f"{name}: {', '.join(failed) if failed else 'NOT CAUGHT'}", flush=True)
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
