"""Export of a real (tiny) run: the merge is W + (alpha/r) B A and follows the adapter-on model; the GGUF files,
read back by transformers' own GGUF loader (not by our writer), give the merged model's tokens and logits; the
model card holds the run's figures; a merge that would not fit and a push without a token are refused cleanly."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from grpo_lib import data, export, models, runlog
from grpo_lib import eval as evaluation
from grpo_lib.config import GRPOConfig
from grpo_lib.memory_advice import MemoryPlanError
from grpo_lib.trainer import GRPOTrainer
from tests.conftest import make_tiny_llama

MERGE_TOL = 1e-4  # fp32 merge: W + sBA computed once instead of x W + s (x A) B per forward; float32 reordering only
F16_TOL = 5e-3  # f16 matrices: each weight rounded by at most 2^-11 relative; measured 4e-4 on this model's logits


def has_a_vowel_share(completions, **kw):
    """A dense toy reward so that groups have variance and the adapter moves."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [sum(ch in "aeiou" for ch in t) / max(len(t), 1) for t in texts]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tokenizer):
    """A run directory as `python -m grpo_lib train` leaves it: 2 GRPO steps of LoRA on a tiny random Llama saved
    as a local model folder, with the held-out evaluation before and after."""
    root = tmp_path_factory.mktemp("export_run")
    base = make_tiny_llama(len(tokenizer), seed=1)
    base.generation_config.pad_token_id = tokenizer.pad_token_id
    base.generation_config.eos_token_id = tokenizer.eos_token_id
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    config = GRPOConfig(model=str(root / "base"), load_in_4bit=False, lora_r=4, lora_alpha=8,
                        gradient_checkpointing=False, task="larger", prompts_per_step=2, num_generations=4,
                        max_completion_length=6, learning_rate=5e-2, max_steps=2, save_steps=2, num_eval_prompts=3,
                        max_prompt_length=256, reward_funcs=("format",), seed=3)
    model, tok = models.load_policy_from_config(config, device="cpu")
    run = root / "run"
    eval_rows = data.task_rows(config, "test")
    before = evaluation.cached_evaluate(run / "eval_before.json", model, tok, eval_rows, config)
    GRPOTrainer(model, tok, [has_a_vowel_share], config, data.task_rows(config), run_dir=run).train()
    (run / "eval_after.json").write_text(json.dumps(evaluation.evaluate(model, tok, eval_rows, config)))
    assert before["n"] == 3
    return run


def held_out_texts(run, tokenizer, n=3):
    config = GRPOConfig.from_dict(runlog.read_run_config(run))
    return [data.format_prompt(tokenizer, r["prompt"]) for r in data.task_rows(config, "test", n=n)]


@torch.no_grad()
def logits_of(model, tokenizer, texts):
    return [model(input_ids=tokenizer(t, return_tensors="pt", add_special_tokens=False)["input_ids"]).logits[0]
            for t in texts]


def next_token_logprobs(logits, tokenizer, texts):
    """[sum of T_i - 1] log p(token t+1 | prefix) over the texts."""
    out = []
    for lg, t in zip(logits, texts):
        ids = tokenizer(t, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
        out.append(torch.log_softmax(lg[:-1].float(), -1).gather(1, ids[1:, None])[:, 0])
    return torch.cat(out)


@pytest.fixture(scope="module")
def merged(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports")
    result = export.export_run(run_dir, merged_dir=out / "merged", gguf_path=out / "gguf" / "model-f16.gguf",
                               quant="f16", device="cpu", verify=True, verify_prompts=3)
    return result


def test_merge_is_w_plus_scaled_ba_and_follows_the_adapter(run_dir, merged, tokenizer):
    from transformers import AutoModelForCausalLM

    out = merged["merged_dir"]
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md",
                 "training_curves.png", "grpo_config.yaml"):
        assert (out / name).is_file(), name
    # one layer by hand: W' = W + (alpha / r) B A, from the files the run and its base left
    base = load_file(next((run_dir.parent / "base").glob("*.safetensors")))
    adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    key = "model.layers.1.self_attn.k_proj"
    A = next(v for k, v in adapter.items() if k.endswith(f"{key}.lora_A.weight"))  # [r, in]
    B = next(v for k, v in adapter.items() if k.endswith(f"{key}.lora_B.weight"))  # [out, r]
    assert B.abs().max() > 1e-3  # two steps moved the adapter (B starts at 0)
    torch.testing.assert_close(load_file(out / "model.safetensors")[f"{key}.weight"],
                               base[f"{key}.weight"] + (8 / 4) * B @ A, rtol=0, atol=1e-6)

    # the standalone checkpoint (plain transformers, no peft) against the trained adapter-on policy
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    adapted, tok = models.load_trained(run_dir / "adapter", device="cpu")
    texts = held_out_texts(run_dir, tokenizer)
    lp_merged = next_token_logprobs(logits_of(plain, tok, texts), tok, texts)
    lp_adapted = next_token_logprobs(logits_of(adapted, tok, texts), tok, texts)
    with adapted.disable_adapter():
        lp_base = next_token_logprobs(logits_of(adapted, tok, texts), tok, texts)
    gap = (lp_merged - lp_adapted).abs().max().item()
    assert gap < MERGE_TOL
    assert (lp_base - lp_adapted).abs().max().item() > 100 * MERGE_TOL  # the adapter matters: the check can fail
    # the export's own figure is this measurement
    assert merged["checks"]["merged vs adapter-on"]["max_abs_logprob_diff"] == pytest.approx(gap, abs=2e-6)
    # the chat template travels with the tokenizer
    from transformers import AutoTokenizer

    messages = [{"role": "user", "content": "Which is larger, 3 or 4?"}]
    assert AutoTokenizer.from_pretrained(out).apply_chat_template(messages, tokenize=False) == \
        tok.apply_chat_template(messages, tokenize=False)


def round_fp16(model):
    """The model with every matrix rounded to fp16 (vectors kept fp32), as an f16 GGUF stores it."""
    import copy

    m = copy.deepcopy(model)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.copy_(p.half().float())
    return m


def q8_0(w: torch.Tensor) -> torch.Tensor:
    """ggml's Q8_0 round trip, written from its reference (quantize_row_q8_0_ref): blocks of 32 along a row,
    d = max|x| / 127 stored as fp16, q = roundf(x * (1 / d)) (halves away from zero) in int8, value = d * q."""
    blocks = w.reshape(-1, 32)
    d = blocks.abs().amax(1, keepdim=True) / 127
    y = blocks * torch.where(d == 0, 0, 1 / d)
    q = torch.sign(y) * torch.floor(y.abs() + 0.5)
    return (d.half().float() * q).reshape(w.shape)


def load_gguf(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.mark.slow
def test_gguf_f16_round_trip_through_transformers(run_dir, merged, tokenizer):
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(merged["merged_dir"], dtype=torch.float32).eval()
    model, gguf_tok = load_gguf(merged["gguf"])
    texts = held_out_texts(run_dir, tokenizer)
    for t in texts:  # the tokenizer rebuilt from the file's vocabulary, merges and special tokens
        assert gguf_tok(t, add_special_tokens=False)["input_ids"] == tokenizer(t, add_special_tokens=False)["input_ids"]
    assert gguf_tok.chat_template == tokenizer.chat_template
    assert gguf_tok.eos_token == tokenizer.eos_token
    got = logits_of(model, tokenizer, texts)
    # exact up to float32 summation order against the merged model with fp16-rounded matrices: the q/k rows came
    # back in place (4 heads, 2 kv heads: a wrong permutation would move whole rows)
    for g, r in zip(got, logits_of(round_fp16(plain), tokenizer, texts)):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-5)
    diff = max((g - r).abs().max().item() for g, r in zip(got, logits_of(plain, tokenizer, texts)))
    print(f"f16 GGUF vs merged: max |logit diff| {diff:.2e}")
    assert diff < F16_TOL
    assert merged["checks"]["GGUF f16"]["max_abs_logit_diff"] == pytest.approx(diff, abs=1e-6)
    assert merged["checks"]["GGUF f16"]["tokenizer_matches"]


@pytest.mark.slow
def test_gguf_q8_0_round_trip_keeps_the_greedy_tokens(run_dir, merged, tokenizer, tmp_path):
    import copy

    from transformers import AutoModelForCausalLM

    result = export.export_run(run_dir, gguf_path=tmp_path / "model-q8_0.gguf", quant="q8_0", device="cpu")
    assert result["merged_dir"] is None and (tmp_path / "README.md").is_file()
    plain = AutoModelForCausalLM.from_pretrained(merged["merged_dir"], dtype=torch.float32).eval()
    model, _ = load_gguf(result["gguf"])
    texts = held_out_texts(run_dir, tokenizer)
    got, ref = logits_of(model, tokenizer, texts), logits_of(plain, tokenizer, texts)
    got, ref = torch.cat(got), torch.cat(ref)  # [positions, V]
    same = got.argmax(-1) == ref.argmax(-1)
    diff = (got - ref).abs().max().item()
    print(f"q8_0 GGUF vs merged: same greedy token at {same.sum().item()}/{len(same)} positions "
          f"({same.float().mean().item():.4f}), max |logit diff| {diff:.2e}")
    assert same.float().mean() >= 0.9
    # a perturbation of at most `diff` per logit can only flip a near-tie: the top two within 2 * diff (this random
    # model's logits are nearly flat, so it has near-ties; the trained SmolLM2 in the README has few)
    top2 = ref.topk(2, -1).values
    assert ((top2[:, 0] - top2[:, 1])[~same] <= 2 * diff).all()
    # and the file holds exactly Q8_0 of the merged matrices (norms in F32): against our own emulation
    emulated = copy.deepcopy(plain)
    with torch.no_grad():
        for p in emulated.parameters():
            if p.dim() == 2:
                p.copy_(q8_0(p))
    torch.testing.assert_close(got, torch.cat(logits_of(emulated, tokenizer, texts)), rtol=0, atol=1e-4)


@pytest.mark.slow
def test_gguf_qwen2_with_biases_round_trips(tokenizer, tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # non-zero q/k/v biases, so that losing them would show
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    path = export.write_gguf(model, tokenizer, tmp_path / "qwen2.gguf", "f16", pre="qwen2")
    back, _ = load_gguf(path)
    assert back.config.model_type == "qwen2" and not back.config.tie_word_embeddings
    texts = ["<|im_start|>user\nWhat is 25 + 38?<|im_end|>\n<|im_start|>assistant\n"]
    for g, r in zip(logits_of(back, tokenizer, texts), logits_of(round_fp16(model), tokenizer, texts)):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-5)


def q4_0(w: torch.Tensor) -> torch.Tensor:
    """ggml's Q4_0 round trip, from its reference (quantize_row_q4_0_ref): per block of 32, m = the value of largest
    magnitude (with its sign), d = m / -8, q = min(15, trunc(x / d + 8.5)), value = (q - 8) * d with d in fp16."""
    blocks = w.reshape(-1, 32)
    m = blocks.gather(1, blocks.abs().argmax(1, keepdim=True))
    d = m / -8
    q = torch.clamp(torch.trunc(blocks * torch.where(d == 0, 0, 1 / d) + 8.5), max=15)
    return ((q - 8) * d.half().float()).reshape(w.shape)


@pytest.mark.slow
def test_gguf_q4_0_holds_ggml_q4_0_blocks(tokenizer, tmp_path):
    """q4_0: the matrices in Q4_0, the (untied) output projection in Q8_0, the norms in F32; read back by
    transformers, the logits are those of our emulation of ggml's reference quantisers."""
    import copy

    from gguf import GGUFReader
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(2)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=256, tie_word_embeddings=False)).eval()
    path = export.write_gguf(model, tokenizer, tmp_path / "q4.gguf", "q4_0", pre="gpt-2")
    types = {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}
    assert types["output.weight"] == "Q8_0" and types["token_embd.weight"] == "Q4_0"
    assert types["blk.0.attn_q.weight"] == "Q4_0" and types["blk.0.attn_norm.weight"] == "F32"
    emulated = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in emulated.named_parameters():
            if p.dim() == 2:
                p.copy_(q8_0(p) if name == "lm_head.weight" else q4_0(p))
    back, _ = load_gguf(path)
    texts = ["<|im_start|>user\nWhat number comes after 139?<|im_end|>\n<|im_start|>assistant\n"]
    for g, e in zip(logits_of(back, tokenizer, texts), logits_of(emulated, tokenizer, texts)):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-4)


def test_permute_qk_is_llama_cpp_layout_that_transformers_undoes():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = torch.arange(16.0).reshape(8, 2).numpy()  # 2 heads of head_dim 4: rows 0-3, 4-7
    permuted = export.permute_qk(w, 2)
    assert permuted[:, 0].tolist() == [0, 4, 2, 6, 8, 12, 10, 14]  # each head's halves interleaved
    back = LlamaTensorProcessor()._reverse_permute_weights(permuted, 2)
    assert (back == w).all()


def test_tokenizer_pre_names(tokenizer):
    assert export.tokenizer_pre("smollm2-135m", tokenizer) == "smollm"  # from the embedded GGUF itself
    assert export.tokenizer_pre("some/folder", tokenizer) == "gpt-2"  # its converted tokenizer: GPT-2's ByteLevel


def test_modelfile_carries_the_training_prompt(run_dir, merged):
    text = merged["modelfile"].read_text()
    assert text.splitlines()[1] == "FROM ./model-f16.gguf"
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}' in text
    assert f'SYSTEM """{data.SYSTEM_PROMPT}"""' in text
    question, answer = data.SYNTHETIC_TASKS["larger"][1]
    assert f'MESSAGE user """{question}"""' in text and f'MESSAGE assistant """{answer}"""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text


def test_model_card_holds_the_run_figures(run_dir, merged):
    from grpo_lib.doctor import diagnose, format_findings

    card = (merged["merged_dir"] / "README.md").read_text()
    config = runlog.read_run_config(run_dir)
    records = runlog.load_run_log(run_dir)
    before = json.loads((run_dir / "eval_before.json").read_text())
    after = json.loads((run_dir / "eval_after.json").read_text())
    assert f"base_model: {config['model']}" in card
    assert "loss_type `grpo`" in card and "beta=0.04" in card and "epsilon=0.2" in card and "G=4" in card
    assert f"{len(records)} steps logged (max_steps=2)" in card and len(records) == 2
    assert "| `has_a_vowel_share` | 1 |" in card
    assert f"held-out prompts: {before['n']} ({before['samples']} completions)" in card
    assert f"{before['reward/mean']:>8.3f}{after['reward/mean']:>8.3f}" in card  # the evaluation's own numbers
    assert format_findings(diagnose(run_dir)).splitlines()[0] in card
    assert "![training curves](training_curves.png)" in card
    assert (merged["merged_dir"] / "training_curves.png").read_bytes()[:4] == b"\x89PNG"
    first, last = records[0].metrics["reward/mean"], records[-1].metrics["reward/mean"]
    assert f"{first:.3f} (step 1) -> {last:.3f} (step 2)" in card
    gguf = merged["checks"]["GGUF f16"]
    assert f"| GGUF f16 | {gguf['max_abs_logprob_diff']:.2e} | {gguf['max_abs_logit_diff']:.2e} |" in card
    assert "python -m grpo_lib train --config grpo_config.yaml" in card
    assert GRPOConfig.from_yaml(str(merged["merged_dir"] / "grpo_config.yaml")).to_dict() == config
    assert "passed from Python (has_a_vowel_share)" in card  # the config's names are not what scored the run


def test_merge_that_would_not_fit_is_refused_with_the_numbers(run_dir, tmp_path):
    base = make_tiny_llama(49152, seed=1)
    params = sum(p.numel() for p in base.parameters())  # tied embedding counted once
    plan = export.plan_export(runlog.read_run_config(run_dir), "cpu", torch.float32, available=10**6)
    assert plan.params == params and plan.components["weights"] == 4 * params
    lora = 2 * 4 * sum(i + o for i, o in [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)])
    assert plan.components["adapter"] == 4 * lora  # r (in + out) per adapted layer, 2 layers, fp32
    with pytest.raises(MemoryPlanError, match=r"merged weights .* 0\.\d\d GiB(.|\n)*available 0\.00 GiB"):
        export.export_run(run_dir, merged_dir=tmp_path / "out", device="cpu", available=10**6, log=lambda s: None)
    assert not (tmp_path / "out").exists()  # refused before anything was loaded or written


def test_a_4bit_run_is_merged_into_its_16bit_base(run_dir, tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    qlora = tmp_path / "qlora-run"
    shutil.copytree(run_dir, qlora)
    config = runlog.read_run_config(qlora)
    runlog.write_run_config(qlora, {**config, "load_in_4bit": True})
    result = export.export_run(qlora, merged_dir=tmp_path / "out", device="cpu", log=lambda s: None)
    assert result["plan"].dtype == "bfloat16" and "never into nf4" in result["plan"].format()
    assert all(t.dtype == torch.bfloat16 for t in load_file(tmp_path / "out" / "model.safetensors").values())
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    adapted, tok = models.load_trained(run_dir / "adapter", device="cpu")  # the fp32 original run
    texts = held_out_texts(run_dir, tokenizer)
    gap = (next_token_logprobs(logits_of(merged, tok, texts), tok, texts)
           - next_token_logprobs(logits_of(adapted, tok, texts), tok, texts)).abs().max().item()
    assert gap < 0.05  # bf16 weights: 2^-9 relative rounding per weight


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing")  # as grpo_lib.models filters it outside pytest
def test_push_without_a_token_fails_in_one_line_and_keeps_the_export(run_dir, tmp_path, monkeypatch, capsys):
    import huggingface_hub
    from huggingface_hub import HfApi

    from grpo_lib import cli

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda *a, **k: calls.append("create_repo"))
    monkeypatch.setattr(HfApi, "upload_folder", lambda *a, **k: calls.append("upload_folder"))
    code = cli.main(["export", str(run_dir), "--merged", str(tmp_path / "out"), "--push-to-hub", "someone/model"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("export: --push-to-hub needs a Hugging Face token")
    assert calls == []
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "out" / "README.md").is_file()


def test_push_to_an_unreachable_hub_fails_fast(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    with pytest.raises(export.ExportError, match=r"cannot reach http://127\.0\.0\.1:9 .*nothing was uploaded"):
        export.hub_preflight(timeout_s=2)
