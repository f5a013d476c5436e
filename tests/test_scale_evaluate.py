"""scale/evaluate.py on the tiny preset (CPU, no downloads):
  - 1 process and 2 gloo processes (torchrun) give identical per-example outputs and scores, text and images;
  - an evaluation killed after its first batch resumes to the same results, redoing only what was missing;
  - results.json describes itself (every field issue 15 lists);
  - a training checkpoint (DCP) and its PEFT adapter export evaluate to the same outputs, and train.py
    --eval-every logs exactly what evaluate.py finds for that step's checkpoint;
  - the GenEval files are GenEval's layout, and the decoding settings are validated.
Bad input (missing file, malformed line, checkpoint that does not fit, decoding that does not divide) is in
tests/test_scale_cli_errors.py."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")

from scale import evaluate as E  # noqa: E402
from scale import train as T  # noqa: E402
from scale.tiny import make_tiny_assets  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = Path(sys.executable).with_name("torchrun")
ENV = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
# sampled text (temperature 1) so that rows differ; batches of 5 over 12 rows: 3 batches, uneven over 2 ranks
TEXT = ["--task", "gsm8k", "--temperature", "1", "--batch-size", "5", "--precision", "fp32"]
IMAGE = ["--task", "geneval", "--batch-size", "5", "--samples-per-prompt", "3", "--precision", "fp32"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_tiny_assets(tmp_path_factory.mktemp("tiny") / "tiny_assets")


def folder(tmp_path, name, assets):
    out = tmp_path / name
    out.mkdir()
    shutil.copytree(assets, out / "tiny_assets")
    return out


def run_cli(out, flags, nproc=1, expect=0):
    """scale/evaluate.py --preset tiny as a command (torchrun for nproc > 1); returns its output."""
    launch = [str(TORCHRUN), "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable]
    cmd = [*launch, "scale/evaluate.py", "--preset", "tiny", *flags, "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == expect, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def examples(out):
    return [json.loads(line) for line in (out / "examples.jsonl").read_text().splitlines()]


def results(out):
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def one_process(assets, tmp_path_factory):
    """Text and image evaluations in one process (in-process main: the same code as the command)."""
    base = tmp_path_factory.mktemp("one")
    outs = {}
    for name, flags in (("text", TEXT), ("image", IMAGE)):
        outs[name] = folder(base, name, assets)
        assert E.main(["--preset", "tiny", *flags, "--out", str(outs[name])]) == 0
    return outs


def test_one_and_two_processes_give_identical_examples_and_scores(one_process, assets, tmp_path):
    for name, flags in (("text", TEXT), ("image", IMAGE)):
        two = folder(tmp_path, name, assets)
        run_cli(two, flags, nproc=2)
        assert examples(two) == examples(one_process[name]), name
        assert results(two)["metrics"] == results(one_process[name])["metrics"], name
        assert results(two)["world_size"] == 2 and results(one_process[name])["world_size"] == 1
        assert sorted(p.name for p in (two / "partial").glob("rank*.jsonl")) == ["rank0.jsonl", "rank1.jsonl"]
    texts = examples(one_process["text"])
    assert len(texts) == 12 and len({r["completion"] for r in texts}) > 6  # sampled rows differ
    # images: GenEval's layout, one PNG per (prompt, sample), scored in process
    images = examples(one_process["image"])
    assert len(images) == 3 * 3 and all((one_process["image"] / r["file"]).is_file() for r in images)


def test_resume_after_a_kill_gives_the_same_results(one_process, assets, tmp_path):
    out = folder(tmp_path, "killed", assets)
    said = run_cli(out, [*TEXT, "--fail-after-batches", "1"], expect=1)
    assert "exiting to test the resume" in said and not (out / "results.json").exists()
    assert len((out / "partial" / "rank0.jsonl").read_text().splitlines()) == 5  # the first batch only
    with open(out / "partial" / "rank0.jsonl", "a") as f:
        f.write('{"index": 5, "question": "cut sho')  # a line a kill cut short: ignored, its batch redone
    run_cli(out, TEXT)
    assert examples(out) == examples(one_process["text"])
    assert results(out)["metrics"] == results(one_process["text"])["metrics"]
    assert results(out)["rows_resumed"] == 5


def test_results_json_describes_the_evaluation(one_process, assets):
    r = results(one_process["text"])
    data = assets / "gsm8k_test.jsonl"
    import hashlib

    assert r["task"] == "gsm8k"
    assert r["data"]["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert r["data"]["rows_in_file"] == r["data"]["rows_evaluated"] == 12
    assert r["checkpoint"]["model"].endswith("model_text") and r["checkpoint"]["step"] is None
    assert r["decoding"] == dict(gen_length=16, block_length=8, steps=8, temperature=1.0, cache="none", threshold=None)
    env = r["environment"]
    assert env["torch"] == torch.__version__ and "cuda" in env and env["device"] == "cpu"
    assert r["world_size"] == 1 and r["seed"] == 0 and r["wall_time_s"] > 0 and r["batch_size"] == 5
    m = r["metrics"]
    assert set(m) == {"accuracy", "stderr", "n"} and m["n"] == 12
    correct = [float(x["correct"]) for x in examples(one_process["text"])]
    assert m["accuracy"] == sum(correct) / 12
    assert r["evaluator"]["answer_checker"] in ("math-verify", "numeric")
    image = results(one_process["image"])
    assert set(image["metrics"]) == {"score", "stderr", "n", "by_tag"} and image["decoding"]["samples_per_prompt"] == 3


def test_standard_error_against_the_formula():
    values = [1.0, 0.0, 0.0, 1.0, 1.0]
    mean = sum(values) / 5
    assert E.standard_error(values) == pytest.approx((sum((v - mean) ** 2 for v in values) / 4 / 5) ** 0.5)
    assert E.standard_error([3.0]) == 0.0


def test_checkpoint_and_adapter_evaluate_alike_and_eval_every_matches_evaluate(assets, tmp_path):
    run = folder(tmp_path, "train", assets)
    flags = ["--preset", "tiny", "--out", str(run), "--max-steps", "2", "--precision", "fp32", "--export",
             "--eval-every", "2", "--eval-limit", "5"]
    assert T.main(flags) == 0
    logged = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    evals = [r for r in logged if r.get("event") == "eval"]
    assert len(evals) == 1 and evals[0]["step"] == 2 and evals[0]["n"] == 5
    in_training = run / "eval" / "step_000002"
    # the same decoding as the in-training evaluation: the rollout canvas and steps, greedy, micro-batches of 4
    same = ["--task", "gsm8k", "--model", str(run / "tiny_assets" / "model_text"), "--gen-length", "16",
            "--block-length", "8", "--steps", "4", "--temperature", "0", "--batch-size", "4", "--limit", "5",
            "--precision", "fp32", "--data", str(run / "tiny_assets" / "gsm8k_test.jsonl"),
            "--tokenizer", str(run / "tiny_assets" / "tokenizer.json")]
    outs = {}
    for name, extra in (("checkpoint", ["--checkpoint", str(run / "checkpoints" / "step_000002")]),
                        ("adapter", ["--adapter", str(run / "export")])):
        outs[name] = tmp_path / name
        assert E.main([*same, *extra, "--out", str(outs[name])]) == 0
    assert examples(outs["checkpoint"]) == examples(outs["adapter"]) == examples(in_training)
    assert results(outs["checkpoint"])["checkpoint"]["step"] == 2
    assert results(outs["checkpoint"])["metrics"] == results(in_training)["metrics"]


def test_full_fine_tuning_checkpoint_evaluates_like_eval_every(assets, tmp_path):
    run = folder(tmp_path, "train", assets)
    assert T.main(["--preset", "tiny", "--out", str(run), "--max-steps", "1", "--precision", "fp32", "--lora-rank", "0",
                   "--learning-rate", "0.05", "--eval-every", "1", "--eval-limit", "4"]) == 0
    out = tmp_path / "eval"
    assert E.main(["--task", "gsm8k", "--model", str(run / "tiny_assets" / "model_text"), "--gen-length", "16",
                   "--block-length", "8", "--steps", "4", "--batch-size", "4", "--limit", "4", "--precision", "fp32",
                   "--data", str(run / "tiny_assets" / "gsm8k_test.jsonl"), "--tokenizer",
                   str(run / "tiny_assets" / "tokenizer.json"), "--checkpoint", str(run / "checkpoints" / "step_000001"),
                   "--out", str(out)]) == 0
    assert examples(out) == examples(run / "eval" / "step_000001")
    base = tmp_path / "base"  # and the checkpoint's weights were loaded: the base model writes otherwise
    assert E.main(["--task", "gsm8k", "--model", str(run / "tiny_assets" / "model_text"), "--gen-length", "16",
                   "--block-length", "8", "--steps", "4", "--batch-size", "4", "--limit", "4", "--precision", "fp32",
                   "--data", str(run / "tiny_assets" / "gsm8k_test.jsonl"), "--tokenizer",
                   str(run / "tiny_assets" / "tokenizer.json"), "--out", str(base)]) == 0
    assert [r["completion"] for r in examples(base)] != [r["completion"] for r in examples(out)]


def test_geneval_files_are_geneval_layout(tmp_path):
    from PIL import Image

    from scale.image import ImageScorer, PromptRewardScorer, StubImageReward, read_geneval_metadata, write_geneval_sample

    meta = {"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}],
            "prompt": "a photo of a cat and a dog"}
    (tmp_path / "meta.jsonl").write_text(json.dumps(meta) + "\n")
    assert read_geneval_metadata(tmp_path / "meta.jsonl") == [meta]
    pixels = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    path = write_geneval_sample(tmp_path / "images", 12, 3, meta, pixels)
    assert path == tmp_path / "images" / "00012" / "samples" / "00003.png"
    assert json.loads((tmp_path / "images" / "00012" / "metadata.jsonl").read_text()) == meta  # json.load-able
    saved = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float()  # (3, 8, 8)
    assert torch.equal(saved, (pixels * 255).round())
    assert sorted(p.name for p in (tmp_path / "images" / "00012").rglob("*")) == ["00003.png", "metadata.jsonl",
                                                                                   "samples"]
    scorer = PromptRewardScorer(StubImageReward())
    assert isinstance(scorer, ImageScorer) and scorer(pixels[None], [meta]).shape == (1,)


@pytest.mark.parametrize("fields, message", [
    (dict(gen_length=16, block_length=5), "--block-length 5 must divide --gen-length 16"),
    (dict(gen_length=16, block_length=8, steps=3), "--steps 3 must be a multiple of the number of blocks"),
    (dict(cache="full"), "--cache must be one of"),
    (dict(threshold=1.5), r"--threshold must be in \(0, 1\]"),
    (dict(temperature=-1.0), "--temperature must be a finite number >= 0"),
])
def test_text_decoding_is_validated(fields, message):
    with pytest.raises(ValueError, match=message):
        E.TextDecoding(**fields)
