"""Fast tests of the non-distributed scale/ pieces: HF folders, tokenizer and chat template, padding,
GSM8K and its rewards, the MMaDA t2i layout, the MAGVIT-v2 decoder and the image reward adapters.
Everything runs on tiny fixtures written here; no weights are downloaded."""

import json
import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("safetensors")

from maskgrpo import MaskedDiffusionLM, ModelConfig  # noqa: E402
from scale.checkpoints import (  # noqa: E402
    CONFIG_NAME,
    INDEX_NAME,
    SINGLE_NAME,
    expected_shapes,
    hf_config_from_model_config,
    model_config_from_hf,
    read_hf_folder,
    save_hf_folder,
)
from scale.image import (  # noqa: E402
    MMaDATokens,
    RewardAdapter,
    StubImageReward,
    codes_to_ids,
    ids_to_codes,
    image_positions,
    t2i_batch,
    t2i_prompt,
    t2i_uncond_prompt,
)
from scale.magvit import AttnBlock, MagvitConfig, MagvitDecoder, load_magvit_decoder  # noqa: E402
from scale.text import (  # noqa: E402
    LLADA_TOKEN_STRINGS,
    ChatTokens,
    answers_match,
    chat_prompt,
    chat_template_text,
    correctness_reward,
    extract_answer,
    format_reward,
    gsm8k_gold,
    integer_reward,
    left_pad,
    load_gsm8k,
    strict_format_reward,
    total_reward,
)

# -----------------------------------------------------------------------------
# HF checkpoint folders

# config fields that change parameter shapes or numerics; must agree between folder and model
COMPARED_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "mlp_hidden_size", "rope_theta", "rms_norm_eps")


@torch.no_grad()
def load_hf_state_dict(model, folder, *, dtype=None):
    """The obvious loader the folders are checked against: validate with read_hf_folder, then copy every
    tensor of every shard into the (plain, materialised) model. scale/ itself loads with DCP
    (checkpoints.load_hf_weights), straight into FSDP2 shards; a test below holds the two equal."""
    from safetensors import safe_open

    cfg, shards, weight_map = read_hf_folder(folder, mask_token_id=model.config.mask_token_id,
                                             eos_token_id=model.config.eos_token_id)
    for name in COMPARED_FIELDS:
        if getattr(cfg, name) != getattr(model.config, name):
            raise ValueError(f"config.json gives {name}={getattr(cfg, name)} but the model has "
                             f"{name}={getattr(model.config, name)}")
    targets = {k: v for k, v in model.state_dict(keep_vars=True).items() if ".lora_" not in k}
    assert set(targets) == set(weight_map)
    if any(t.is_meta for t in targets.values()):
        raise ValueError("parameters on the meta device: call model.to_empty(device=...) first")
    if dtype is not None:
        model.to(dtype)
        targets = {k: v for k, v in model.state_dict(keep_vars=True).items() if ".lora_" not in k}
    for shard in shards:
        with safe_open(shard, framework="pt", device="cpu") as f:
            for key in (k for k, s in weight_map.items() if s == shard.name):
                targets[key].copy_(f.get_tensor(key))
    return model


def tiny_config(**overrides):
    sizes = dict(d_model=32, n_layers=2, n_heads=2, mlp_hidden_size=48, max_sequence_length=64)
    return ModelConfig.tiny(vocab_size=61, mask_token_id=60, eos_token_id=59, **(sizes | overrides))


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return MaskedDiffusionLM(tiny_config(**overrides))


def bf16_round_trip(model):
    """The same model with every weight rounded to bf16 and back: what a bf16 checkpoint holds."""
    copy = MaskedDiffusionLM(model.config)
    copy.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()})
    return copy


# config.json of GSAI-ML/LLaDA-8B-Instruct (the fields we read, values as on the Hub)
LLADA_CONFIG_JSON = {
    "activation_type": "silu", "alibi": False, "block_type": "llama", "d_model": 4096, "embedding_size": 126464,
    "eos_token_id": 126081, "include_bias": False, "include_qkv_bias": False, "layer_norm_type": "rms",
    "mask_token_id": 126336, "max_sequence_length": 4096, "mlp_hidden_size": 12288, "mlp_ratio": 4,
    "multi_query_attention": None, "n_heads": 32, "n_kv_heads": 32, "n_layers": 32, "pad_token_id": 126081,
    "rms_norm_eps": 1e-05, "rope": True, "rope_theta": 500000.0, "vocab_size": 126464, "weight_tying": False,
}


def test_config_from_real_llada_and_mmada_fields():
    assert model_config_from_hf(LLADA_CONFIG_JSON) == ModelConfig.llada_8b()
    mmada = LLADA_CONFIG_JSON | {"embedding_size": 134656, "vocab_size": 134656}
    assert model_config_from_hf(mmada) == ModelConfig.mmada_8b()
    cfg = tiny_config()
    assert model_config_from_hf(hf_config_from_model_config(cfg)) == cfg


def test_expected_shapes_are_the_model_state_dict():
    model = tiny_model(n_layers=3)
    assert expected_shapes(model.config) == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # the Hub's LLaDA-8B-Instruct index says total_size 16031162368 bytes of bf16
    assert 2 * sum(math.prod(s) for s in expected_shapes(ModelConfig.llada_8b()).values()) == 16_031_162_368


@pytest.mark.parametrize("change, message", [
    ({"n_kv_heads": 8}, "n_kv_heads=8"),
    ({"weight_tying": True}, "weight_tying=True"),
    ({"block_type": "sequential"}, "block_type='sequential'"),
    ({"d_model": None}, "d_model"),
    ({"embedding_size": None, "vocab_size": None}, "embedding_size nor vocab_size"),
])
def test_config_errors_name_field_and_value(change, message):
    with pytest.raises(ValueError, match=message):
        model_config_from_hf(LLADA_CONFIG_JSON | change)


def test_config_special_ids_must_agree():
    with pytest.raises(ValueError, match="mask_token_id=5"):
        model_config_from_hf(LLADA_CONFIG_JSON, mask_token_id=5)
    without = {k: v for k, v in LLADA_CONFIG_JSON.items() if k != "mask_token_id"}
    with pytest.raises(ValueError, match="mask_token_id is neither"):
        model_config_from_hf(without)
    assert model_config_from_hf(without, mask_token_id=126336) == ModelConfig.llada_8b()


def test_sharded_bf16_folder_loads_back_bit_exactly(tmp_path):
    model = tiny_model()
    folder = save_hf_folder(model, tmp_path / "ckpt", config_json=hf_config_from_model_config(model.config), shards=2)
    names = sorted(p.name for p in folder.iterdir())
    assert names == [CONFIG_NAME, "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", INDEX_NAME]
    index = json.loads((folder / INDEX_NAME).read_text())
    assert set(index["weight_map"]) == set(model.state_dict())
    assert set(index["weight_map"].values()) == {names[1], names[2]}  # both shards used
    assert index["metadata"]["total_size"] == 2 * sum(v.numel() for v in model.state_dict().values())  # bf16

    # build on the meta device, materialise, load: equals the model cast to bf16 and back, bit for bit
    with torch.device("meta"):
        loaded = MaskedDiffusionLM(model.config)
    loaded.to_empty(device="cpu")
    load_hf_state_dict(loaded, folder)
    expected = bf16_round_trip(model)
    for (name, a), b in zip(loaded.state_dict().items(), expected.state_dict().values(), strict=True):
        assert a.dtype == torch.float32 and torch.equal(a, b), name
    x = torch.randint(0, 59, (2, 9))
    assert torch.equal(loaded(x), expected(x))

    # dtype=bf16 gives a bf16 model with the same values
    bf16 = load_hf_state_dict(MaskedDiffusionLM(model.config), folder, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    assert all(torch.equal(p.float(), q) for p, q in zip(bf16.parameters(), expected.parameters(), strict=True))


def test_dcp_loader_equals_the_reference_loader(tmp_path):
    from scale.checkpoints import load_hf_weights

    model = tiny_model()
    folder = save_hf_folder(model, tmp_path / "ckpt", config_json=model.config, shards=3)
    with torch.device("meta"):
        dcp_loaded = MaskedDiffusionLM(model.config)
    dcp_loaded.to_empty(device="cpu")
    load_hf_weights(dcp_loaded, folder)
    reference = load_hf_state_dict(tiny_model(seed=5), folder)
    for (name, a), b in zip(dcp_loaded.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_single_file_folder(tmp_path):
    model = tiny_model()
    folder = save_hf_folder(model, tmp_path / "one", config_json=model.config, shards=1, dtype=None)
    assert not (folder / INDEX_NAME).exists() and (folder / SINGLE_NAME).exists()
    cfg, shards, weight_map = read_hf_folder(folder)
    assert cfg == model.config and [s.name for s in shards] == [SINGLE_NAME]
    assert set(weight_map) == set(model.state_dict())
    loaded = load_hf_state_dict(tiny_model(seed=1), folder)
    assert all(torch.equal(a, b) for a, b in zip(loaded.parameters(), model.parameters(), strict=True))  # fp32 kept


def test_save_refuses_existing_folder_and_overwrites_on_request(tmp_path):
    model = tiny_model()
    save_hf_folder(model, tmp_path / "ckpt", config_json=model.config, shards=2)
    with pytest.raises(FileExistsError):
        save_hf_folder(model, tmp_path / "ckpt", config_json=model.config)
    save_hf_folder(tiny_model(seed=3), tmp_path / "ckpt", config_json=model.config, shards=3, overwrite=True)
    assert len(read_hf_folder(tmp_path / "ckpt")[1]) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary folders left behind
    with pytest.raises(ValueError, match="shards=0"):
        save_hf_folder(model, tmp_path / "other", config_json=model.config, shards=0)


def test_bad_folders_fail_with_clear_errors(tmp_path):
    model = tiny_model()
    with pytest.raises(FileNotFoundError, match="checkpoint folder not found"):
        read_hf_folder(tmp_path / "nowhere")

    folder = save_hf_folder(model, tmp_path / "ckpt", config_json=model.config, shards=2)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002"):
        read_hf_folder(folder)
    (folder / INDEX_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="neither"):
        read_hf_folder(folder)
    (folder / CONFIG_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        read_hf_folder(folder)


def test_unknown_missing_and_misshapen_keys(tmp_path):
    model = tiny_model()
    state = dict(model.state_dict())
    extra = save_hf_folder(state | {"model.transformer.blocks.0.o_proj.weight": torch.zeros(2, 2)},
                           tmp_path / "extra", config_json=model.config, shards=2)
    with pytest.raises(ValueError, match="not parameters of the model: model.transformer.blocks.0.o_proj.weight"):
        read_hf_folder(extra)
    state.pop("model.transformer.ln_f.weight")
    missing = save_hf_folder(state, tmp_path / "missing", config_json=model.config, shards=2)
    with pytest.raises(ValueError, match="missing from the checkpoint: model.transformer.ln_f.weight"):
        read_hf_folder(missing)
    # config says a different mlp width than the stored tensors
    wrong = save_hf_folder(model, tmp_path / "wrong", config_json=hf_config_from_model_config(model.config)
                           | {"mlp_hidden_size": 64}, shards=2)
    with pytest.raises(ValueError, match=r"has shape \(\d+, \d+\) in model-0000\d-of-00002.safetensors, the config implies"):
        read_hf_folder(wrong)


def test_load_checks_model_config(tmp_path):
    model = tiny_model()
    folder = save_hf_folder(model, tmp_path / "ckpt", config_json=model.config, shards=2)
    with pytest.raises(ValueError, match="rope_theta=500000.0 but the model has rope_theta=10000.0"):
        load_hf_state_dict(tiny_model(rope_theta=10000.0), folder)
    with torch.device("meta"):
        on_meta = MaskedDiffusionLM(model.config)
    with pytest.raises(ValueError, match="to_empty"):
        load_hf_state_dict(on_meta, folder)


# -----------------------------------------------------------------------------
# Tokenizer, chat template, padding


@pytest.fixture(scope="module")
def tokenizer():
    """A tiny byte-level BPE tokenizer with the LLaDA special tokens (trained in milliseconds)."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=list(LLADA_TOKEN_STRINGS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = ["user assistant system: Natalia sold 48 clips in April and half as many in May. "
              "How many did she sell? <reasoning> 48 + 24 = 72 </reasoning> \\boxed{72}\n\n"] * 20
    tok.train_from_iterator(corpus, trainer)
    return tok


def test_chat_prompt_matches_template(tokenizer, tmp_path):
    from scale.text import load_tokenizer

    tokenizer.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)  # the folder form
    tokens = ChatTokens.from_tokenizer(tok)
    question = "  How many clips did Natalia sell?\n"
    # LLaDA-8B-Instruct's tokenizer_config.json chat_template: {bos}<|start_header_id|>{role}<|end_header_id|>\n\n
    # {content}<|eot_id|> per message, then the assistant header
    expected = ("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nHow many clips did Natalia sell?<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert chat_template_text(question) == expected
    ids = chat_prompt(tok, question, tokens=tokens)
    assert ids == tok.encode(expected, add_special_tokens=False).ids
    assert tok.decode(ids, skip_special_tokens=False) == expected
    assert ids[0] == tokens.bos and ids[1] == tokens.start_header and ids.count(tokens.eot) == 1
    with_system = chat_prompt(tok, question, tokens=tokens, system="Be brief.")
    assert tok.decode(with_system, skip_special_tokens=False) == chat_template_text(question, system="Be brief.")
    assert chat_template_text(question, system="Be brief.").startswith(
        "<|startoftext|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user")


def test_chat_tokens_missing_token(tokenizer):
    with pytest.raises(ValueError, match="<|nope|>"):
        ChatTokens.from_tokenizer(tokenizer, LLADA_TOKEN_STRINGS | {"eot": "<|nope|>"})


def test_left_pad():
    ids, mask = left_pad([[7, 8, 9], [4], [5, 6]], pad_id=1, mask_id=2)
    assert ids.tolist() == [[7, 8, 9], [1, 1, 4], [1, 5, 6]]
    assert mask.tolist() == [[True, True, True], [False, False, True], [False, True, True]]
    assert ids.dtype == torch.long and mask.dtype == torch.bool
    with pytest.raises(ValueError, match="pad_id=2 equals mask_id=2"):
        left_pad([[1]], pad_id=2, mask_id=2)
    with pytest.raises(ValueError, match="empty"):
        left_pad([[1], []], pad_id=0, mask_id=2)


# -----------------------------------------------------------------------------
# GSM8K and rewards


def test_gsm8k_gold_and_local_file(tmp_path):
    assert gsm8k_gold("She sold 48/2 = <<48/2=24>>24 clips.\n#### 1,072") == "1072"
    rows = [{"question": "Q1?", "answer": "so 3\n#### 3"}, {"question": "Q2?", "answer": "a lot\n#### 12,000"}]
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = load_gsm8k(path)
    assert [d["gold"] for d in data] == ["3", "12000"] and data[0]["question"] == "Q1?"
    path.write_text(json.dumps({"question": "no answer"}) + "\n")
    with pytest.raises(ValueError, match=r"gsm8k.jsonl, line 1: lacks text field\(s\) \['answer'\]"):
        load_gsm8k(path)
    with pytest.raises(ValueError, match="no '####' marker"):
        gsm8k_gold("just text")


def test_gsm8k_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"question": ["Q?"], "answer": ["x\n#### 5"]}), tmp_path / "g.parquet")
    assert load_gsm8k(tmp_path / "g.parquet")[0]["gold"] == "5"


COMPLETIONS = [
    "<reasoning>\n48 / 2 = 24, 48 + 24 = 72\n</reasoning>\n\\boxed{72}",  # right, integer, formatted
    "<reasoning>\n48 + 48 = 96\n</reasoning>\n\\boxed{96}",  # wrong, integer, formatted
    "The total is \\boxed{1,072}.",  # right (commas), integer, no format
    "<reasoning>half</reasoning><answer>\\frac{7}{2}</answer>",  # right (3.5), not integer, strict format
    "I am not sure.",  # nothing
]
GOLDS = ["72", "72", "1072", "3.5", "72"]


def test_extract_answer():
    assert [extract_answer(c) for c in COMPLETIONS] == ["72", "96", "1,072", "\\frac{7}{2}", None]
    assert extract_answer("\\boxed{\\frac{1}{2}} then \\boxed{x^{2}}") == "x^{2}"  # last box, nested braces
    assert extract_answer("\\boxed{12") is None  # cut off inside the box


@pytest.mark.parametrize("checker", ["numeric", "math-verify"])
def test_answers_match(checker):
    if checker == "math-verify":
        pytest.importorskip("math_verify")
    assert answers_match("1,072", "1072", checker=checker)
    assert answers_match("72.0", "72", checker=checker)
    assert not answers_match("71", "72", checker=checker)
    assert not answers_match(None, "72", checker=checker)
    if checker == "math-verify":
        assert answers_match("\\frac{7}{2}", "3.5", checker=checker)
        # its SIGALRM timeouts only work in the main thread: a reward worker thread must still get answers
        with ThreadPoolExecutor(1) as pool:
            assert pool.submit(answers_match, "\\frac{144}{2}", "72", checker=checker).result()


def test_gsm8k_rewards():
    assert format_reward(COMPLETIONS, GOLDS) == [0.5, 0.5, 0.0, 0.5, 0.0]
    assert strict_format_reward(COMPLETIONS, GOLDS) == [0.0, 0.0, 0.0, 0.5, 0.0]
    assert integer_reward(COMPLETIONS, GOLDS) == [0.5, 0.5, 0.5, 0.0, 0.0]
    correct = correctness_reward(COMPLETIONS, GOLDS)
    assert correct[:3] == [2.0, 0.0, 2.0] and correct[4] == 0.0
    assert total_reward(COMPLETIONS[:3], GOLDS[:3]) == [3.0, 1.0, 2.5]
    with pytest.raises(ValueError, match="2 completions but 1 golds"):
        format_reward(COMPLETIONS[:2], GOLDS[:1])


# -----------------------------------------------------------------------------
# MMaDA t2i layout


def test_t2i_layout_official_sizes():
    ids = MMaDATokens.mmada_8b()
    text = [11, 12, 13]
    prompt = t2i_prompt(text, max_text_len=257, ids=ids)
    assert len(prompt) == 1283  # 257 + <soi> + 1024 + <eoi>
    pad = 257 - (len(text) + 3)
    assert prompt[:pad] == [ids.pad] * pad
    assert prompt[pad:257] == [ids.t2i, ids.bos, *text, ids.eos]
    assert prompt[257] == ids.soi and prompt[-1] == ids.eoi
    images = image_positions(max_text_len=257)
    assert prompt[images] == [ids.mask] * 1024 and (images.start, images.stop) == (258, 1282)
    assert t2i_prompt([ids.bos, *text], max_text_len=257, ids=ids) == prompt  # <bos> not doubled
    uncond = t2i_uncond_prompt(max_text_len=257, ids=ids)
    assert uncond[:257] == [ids.pad] * 254 + [ids.t2i, ids.bos, ids.eos] and uncond[257:] == prompt[257:]
    assert ids.image_columns == slice(126349, 126349 + 8192)


def test_t2i_truncation_batch_and_codes():
    ids = MMaDATokens.mmada_8b()
    long = t2i_prompt(list(range(20)), max_text_len=8, ids=ids, num_image_tokens=4)
    assert long[:8] == [ids.t2i, ids.bos, 0, 1, 2, 3, 4, ids.eos] and len(long) == 8 + 4 + 2
    batch, mask = t2i_batch([[1, 2], [1, 2, 3, 4]], max_text_len=8, ids=ids, num_image_tokens=4)
    assert batch.shape == mask.shape == (2, 14)
    assert mask[0].tolist() == [False] * 3 + [True] * 11 and mask[1].tolist() == [False] + [True] * 13
    codes = torch.tensor([[0, 5, 8191]])
    assert codes_to_ids(codes, ids).tolist() == [[126349, 126354, 134540]]
    assert ids_to_codes(torch.tensor([126349, 134540, 126081]), ids).tolist() == [0, 8191, 0]  # clamped
    with pytest.raises(ValueError, match="layout tokens"):
        t2i_prompt([ids.mask], max_text_len=8, ids=ids)
    with pytest.raises(ValueError, match="max_text_len=2"):
        t2i_prompt([], max_text_len=2, ids=ids)


# -----------------------------------------------------------------------------
# MAGVIT-v2 decoder


TINY_MAGVIT = MagvitConfig(ch=16, ch_mult=(1, 2, 2), num_res_blocks=(1, 2, 1), norm_groups=8)


def test_official_decoder_key_names():
    with torch.device("meta"):
        state = MagvitDecoder().state_dict()  # the default = the official decoder
    assert MagvitConfig().upsampling == 16
    assert state["decoder.conv_in.weight"].shape == (512, 13, 3, 3)
    assert state["decoder.post_quant_conv.weight"].shape == (13, 13, 1, 1)
    assert state["decoder.conv_out.weight"].shape == (3, 128, 3, 3)
    assert state["quantize.embedding"].shape == (8192, 13) and state["quantize.power_vals"].shape == (13,)
    for key in ("decoder.mid.attn_1.q.weight", "decoder.mid.attn_1.proj_out.weight", "decoder.mid.block_2.conv2.weight",
                "decoder.up.4.block.2.norm1.weight", "decoder.up.4.upsample.conv.weight",
                "decoder.up.3.block.0.nin_shortcut.weight", "decoder.norm_out.weight"):
        assert key in state, key
    assert "decoder.up.0.upsample.conv.weight" not in state  # level 0 (full resolution) does not upsample
    assert [sum(f"decoder.up.{i}.block.{j}.conv1.weight" in state for j in range(5)) for i in range(5)] == [4, 4, 3, 4, 3]


def test_code_bits_round_trip_msb_first():
    q = MagvitDecoder(TINY_MAGVIT).quantize
    codes = torch.arange(8192)
    bits = q.code_to_bits(codes)  # (8192, 13)
    assert set(bits.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(q.bits_to_code(bits), codes)
    assert bits[1].tolist() == [-1.0] * 12 + [1.0] and bits[4096].tolist() == [1.0] + [-1.0] * 12


def test_tiny_decoder_shape_range_and_loading(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = MagvitDecoder(TINY_MAGVIT)
    codes = torch.randint(0, 8192, (2, 16))
    pixels = model.decode_code(codes)
    assert pixels.shape == (2, 3, 16, 16) and pixels.min() >= 0 and pixels.max() <= 1  # 4x4 codes, 4x up
    assert torch.equal(model.decode_code(codes + 8192), model.decode_code(torch.full_like(codes, 8191)))  # clamped
    with pytest.raises(ValueError, match="not a square"):
        model.decode_code(torch.zeros(1, 15, dtype=torch.long))

    # a full MAGVIT-v2 file also holds encoder.* weights: they are ignored
    state = {k: v.clone() for k, v in model.state_dict().items()} | {"encoder.conv_in.weight": torch.zeros(1)}
    save_file(state, tmp_path / "magvit.safetensors")
    loaded = load_magvit_decoder(tmp_path, TINY_MAGVIT)
    assert torch.equal(loaded.decode_code(codes), pixels)
    state["quantize.embedding"] = state["quantize.embedding"].flip(-1)  # LSB-first table: refused
    save_file(state, tmp_path / "magvit.safetensors")
    with pytest.raises(ValueError, match="MSB-first"):
        load_magvit_decoder(tmp_path / "magvit.safetensors", TINY_MAGVIT)
    smaller = MagvitConfig(ch=16, ch_mult=(1, 2), num_res_blocks=(1, 1), norm_groups=8)
    with pytest.raises(ValueError, match="does not fit"):
        load_magvit_decoder(tmp_path / "magvit.safetensors", smaller)


def test_attention_block_matches_explicit_formula():
    torch.manual_seed(0)
    block = AttnBlock(16, groups=4)
    x = torch.randn(2, 16, 3, 5)
    n = block.norm(x)
    q, k, v = (p(n).flatten(2) for p in (block.q, block.k, block.v))  # (B, C, HW)
    w = torch.softmax(q.transpose(1, 2) @ k / 16**0.5, dim=-1)  # (B, HW_q, HW_k)
    slow = x + block.proj_out((v @ w.transpose(1, 2)).view_as(x))
    assert torch.allclose(block(x), slow, atol=1e-5)


# -----------------------------------------------------------------------------
# Image rewards


def test_stub_image_reward():
    reward = StubImageReward()
    assert isinstance(reward, RewardAdapter)
    red = torch.zeros(1, 3, 8, 8)
    red[:, 0] = 1
    images = torch.cat([red, torch.ones(1, 3, 8, 8), red.flip(1)])  # red, white, blue
    assert torch.allclose(reward(images, ["a", "b", "c"]), torch.tensor([1.0, 0.0, -0.5]))
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        reward(images, ["a", "b"])


def test_clip_reward_needs_local_weights(tmp_path):
    from scale.image import ClipScoreReward

    with pytest.raises(FileNotFoundError, match="CLIP weights not found"):
        ClipScoreReward(tmp_path / "clip-vit-large-patch14")
