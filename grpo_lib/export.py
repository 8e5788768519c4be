"""Taking a trained run home: the LoRA adapter merged into a standalone checkpoint, a GGUF file for llama.cpp and
Ollama, and a model card that carries the run's evidence.

    export_run("runs/demo", merged_dir="exports/demo", gguf_path="exports/demo.gguf", quant="q8_0")
    python -m grpo_lib export runs/demo --merged exports/demo --gguf exports/demo.gguf --quant q8_0

1) plan    what the merge needs (the base in its merge dtype, the adapter, one layer's update), checked against the
           free memory of the device before anything is loaded
2) merge   the base reloaded without 4-bit (a QLoRA run's base in bf16: merging into nf4 would re-quantise the
           update away), then W' = W + (alpha / r) B A in every adapted layer (peft's merge_and_unload)
3) save    safetensors, config, generation config, tokenizer with its chat template
4) GGUF    written tensor by tensor (one tensor in memory at a time) with the `gguf` package: llama.cpp's tensor
           names, llama's q/k rows permuted as llama.cpp's converter does, f16 / q8_0 / q4_0 blocks, the tokenizer
           (BPE tokens, merges, token types, special ids) and the chat template inside; an Ollama Modelfile beside it
5) card    README.md in every output folder: base, method, rewards, data, held-out evaluation, the run doctor,
           the training curves (PNG beside it), the command that reproduces the run
6) Hub     optional upload; without a token or a network it stops before uploading anything, the export kept
"""

from __future__ import annotations

import json
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import models, runlog
from .config import GRPOConfig
from .memory import GiB
from .memory_advice import MemoryPlanError
from .model_specs import lora_targets, model_spec

QUANTS = ("f16", "q8_0", "q4_0")
# GGUF architecture per transformers model_type. llama.cpp's llama rotates interleaved pairs of a head's
# dimensions, transformers' Llama the two halves: its converter permutes q/k rows to match (transformers' GGUF
# loader undoes it); Qwen2 uses the halves convention (NEOX) in both, nothing to permute.
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}
PERMUTED_QK = {"llama"}
MAX_SHARD = "2GB"  # safetensors shard size: bounds the host memory save_pretrained serialises at once
# one tensor while encoding: fp32 copy (4) + quantiser's fp32 blocks (4) + output (<= 2)
GGUF_BYTES_PER_ELEMENT_WORK = 10
CARD_MARK = "<!-- grpo_lib export -->"


class ExportError(RuntimeError):
    """A run cannot be exported as asked; the message says what is missing and what to do."""


# ----------------------------------------------------------------------------------------------
# 1) the run and the memory plan
# ----------------------------------------------------------------------------------------------


def read_run(run_dir: str | os.PathLike) -> tuple[dict, Path]:
    """(the run's config.json as a dict, its adapter folder). Refuses what cannot be merged, saying why."""
    run_dir = Path(run_dir)
    config = runlog.read_run_config(run_dir)
    if config is None:
        raise ExportError(f"{run_dir} has no config.json: pass a run directory made by `python -m grpo_lib train` "
                          f"or GRPOTrainer(..., run_dir=...)")
    if config.get("lora_r", 0) == 0:
        raise ExportError(f"{run_dir} trained all weights (lora_r=0) and saved no adapter: there is nothing to merge")
    adapter = run_dir / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise ExportError(f"{adapter} holds no adapter_config.json: the run has not finished (resume it with "
                          f"--resume), or export a checkpoint's adapter by copying checkpoints/step-N/adapter there")
    return config, adapter


def merge_dtype(run_config: dict, device: str, dtype: str = "auto") -> torch.dtype:
    """The dtype the adapter is merged into: `dtype` if named; a 4-bit run's base in bf16 (the 16-bit format its
    weights are published in, never nf4); otherwise the dtype the run computed in on this kind of device."""
    if dtype != "auto":
        return getattr(torch, dtype)
    if run_config.get("load_in_4bit"):
        return torch.bfloat16
    return models.compute_dtype(device, run_config.get("dtype", "auto"))


def available_bytes(device: str) -> int:
    """Memory free for the export now: free device memory on CUDA, MemAvailable of /proc/meminfo (psutil's
    figure where installed) on the CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024


@dataclass
class ExportPlan:
    """Bytes the export holds at its peak, by component. On the CPU everything shares the RAM; on a GPU the
    merge lives on the device and saving / GGUF encoding in host RAM (`host` components)."""

    device: str
    dtype: str
    params: int
    components: dict[str, int]
    available: int
    host_available: int | None = None  # RAM on a GPU machine; None on the CPU (the same memory as `available`)
    notes: list[str] = field(default_factory=list)

    DEVICE = ("weights", "adapter", "merge_update", "verify_copy")
    HOST = ("save_buffer", "gguf_tensor")

    @property
    def device_peak(self) -> int:
        """weights + adapter + the larger of the merge's update and a verification copy; on the CPU also the
        larger host phase (saving, then GGUF encoding: one after the other)."""
        c = self.components
        peak = c["weights"] + c["adapter"] + max(c["merge_update"], c["verify_copy"])
        return peak + (self.host_peak if self.host_available is None else 0)

    @property
    def host_peak(self) -> int:
        return max(self.components[n] for n in self.HOST)

    @property
    def fits(self) -> bool:
        host_ok = self.host_available is None or self.host_peak <= self.host_available
        return self.device_peak <= self.available and host_ok

    def format(self) -> str:
        f = lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
        labels = {"weights": "merged weights", "adapter": "LoRA adapter (fp32)",
                  "merge_update": "one layer's update (alpha/r) B A, fp32",
                  "verify_copy": "GGUF model loaded back for --verify (fp32)",
                  "save_buffer": "safetensors shard serialised in RAM",
                  "gguf_tensor": "largest tensor while encoding the GGUF"}
        lines = [f"export plan: {self.params / 1e6:.0f}M parameters merged in {self.dtype} on {self.device}"]
        lines += [f"  {labels[n]:44} {f(b):>10}" for n, b in self.components.items() if b]
        where = "device" if self.host_available is not None else "RAM"
        lines.append(f"  {'peak (' + where + ')':44} {f(self.device_peak):>10}   available {f(self.available)}")
        if self.host_available is not None:
            lines.append(f"  {'peak (host RAM)':44} {f(self.host_peak):>10}   available {f(self.host_available)}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def plan_export(run_config: dict, device: str, dtype: torch.dtype, *, merged: bool = True, gguf: bool = False,
                verify: bool = False, available: int | None = None, host_available: int | None = None) -> ExportPlan:
    """The memory the merge (and GGUF encoding, and --verify's second copy) needs, from the architecture alone:

        weights = params * bytes(dtype)      adapter = LoRA params * 4      update = max over adapted layers out*in*4
    `available` (and `host_available` on a GPU) default to what is free now; pass smaller ones to test a refusal."""
    spec = model_spec(run_config["model"])
    targets = run_config.get("lora_target_modules", "all-linear")
    shapes = [i * o for n, (i, o) in spec.linear_shapes().items() if n in lora_targets(targets)]
    largest = max(spec.vocab_size * spec.hidden_size, *(i * o for i, o in spec.linear_shapes().values()))
    weights = spec.num_params * torch.finfo(dtype).bits // 8
    components = {
        "weights": weights,
        "adapter": spec.lora_params(run_config["lora_r"], targets) * 4,
        "merge_update": max(shapes, default=0) * 4,
        "verify_copy": spec.num_params * 4 if verify else 0,
        "save_buffer": min(weights, int(MAX_SHARD[:-2]) * 10**9) if merged else 0,
        "gguf_tensor": largest * GGUF_BYTES_PER_ELEMENT_WORK if gguf else 0,
    }
    cuda = torch.device(device).type == "cuda"
    notes = ["the 4-bit run's base is reloaded in 16-bit and merged there (never into nf4)"] \
        if run_config.get("load_in_4bit") else []
    return ExportPlan(device=str(device), dtype=str(dtype).replace("torch.", ""), params=spec.num_params,
                      components=components,
                      available=available_bytes(device) if available is None else int(available),
                      host_available=(available_bytes("cpu") if host_available is None else int(host_available))
                      if cuda else None, notes=notes)


# ----------------------------------------------------------------------------------------------
# 2) merge, 3) save
# ----------------------------------------------------------------------------------------------


def load_adapted(run_dir: str | os.PathLike, dtype: torch.dtype, device: str):
    """(peft model, tokenizer): the run's adapter on its base loaded in `dtype` without 4-bit, in eval mode."""
    from peft import PeftModel

    config, adapter = read_run(run_dir)
    base, tokenizer = models.load_policy(config["model"], load_in_4bit=False, lora_r=0, device=device, dtype=dtype)
    with models.quiet_library_notices():
        return PeftModel.from_pretrained(base, adapter).eval(), tokenizer


def save_merged(model, tokenizer, out_dir: str | os.PathLike) -> Path:
    """A standalone Hugging Face checkpoint: safetensors shards, config.json, generation_config.json, the
    tokenizer with its chat template. Loads with AutoModelForCausalLM.from_pretrained(out_dir), no peft."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    with models.quiet_loading():  # no "Writing model shards" bar: the export prints its own lines
        model.save_pretrained(out, max_shard_size=MAX_SHARD)
    tokenizer.save_pretrained(out)
    return out


# ----------------------------------------------------------------------------------------------
# 4) GGUF
# ----------------------------------------------------------------------------------------------


def gguf_architecture(hf_config) -> str:
    kind = hf_config.model_type
    if kind not in GGUF_ARCHITECTURES:
        raise ExportError(f"GGUF export supports {sorted(GGUF_ARCHITECTURES)} models (Llama/SmolLM2, Qwen2/2.5); "
                          f"this one is {kind!r}: export --merged only and convert it with llama.cpp's "
                          f"convert_hf_to_gguf.py")
    rope = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ExportError(f"the model uses {rope['rope_type']!r} RoPE scaling, which this GGUF writer does not "
                          f"encode: export --merged only and convert it with llama.cpp's convert_hf_to_gguf.py")
    return GGUF_ARCHITECTURES[kind]


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: within each head, rows [first half | second half] -> interleaved pairs.
    w: [n_head * head_dim, ...] -> same shape; row (h, i, j) of the [n_head, 2, head_dim/2] view moves to (h, j, i)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensor_qtype(gguf_name: str, shape: tuple[int, ...], quant: str, tied: bool):
    """The GGML type of one tensor, as llama.cpp's converter chooses it: vectors and norms in F32; matrices in the
    requested type, F16 where a row does not split into 32-value blocks. q4_0 keeps the output projection (the
    embedding, when tied) in Q8_0, as llama-quantize keeps it above 4 bits (there in Q6_K, which gguf cannot write)."""
    from gguf import GGMLQuantizationType as T

    if len(shape) <= 1 or gguf_name.endswith("_norm.weight"):
        return T.F32
    if quant == "f16" or shape[-1] % 32:
        return T.F16
    if quant == "q4_0" and (gguf_name == "output.weight" or (tied and gguf_name == "token_embd.weight")):
        return T.Q8_0
    return {"q8_0": T.Q8_0, "q4_0": T.Q4_0}[quant]


def encode_tensor(t: torch.Tensor, qtype) -> np.ndarray:
    """A tensor as the bytes GGUF stores: float32 / float16 arrays, or uint8 blocks of a quantised type."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quantize

    a = t.detach().to("cpu", torch.float32).numpy()
    if qtype == T.F32:
        return a
    if qtype == T.F16:
        return a.astype(np.float16)
    return quantize(a, qtype)


def encoded_nbytes(shape: tuple[int, ...], qtype) -> int:
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape[:-1], dtype=np.int64)) * shape[-1] // block * size


def gguf_tensor_plan(model, arch: str, quant: str) -> list[tuple[str, str, tuple[int, ...], object]]:
    """[(gguf name, state_dict name, shape, GGML type)] in the file's order. The tied output head is left out:
    without output.weight, llama.cpp and transformers both reuse token_embd."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    cfg = model.config
    arch_id = next(k for k, v in MODEL_ARCH_NAMES.items() if v == arch)
    names = get_tensor_name_map(arch_id, cfg.num_hidden_layers)
    tied = bool(cfg.tie_word_embeddings)
    plan = []
    for hf_name, t in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        stem, suffix = hf_name.rsplit(".", 1)
        gguf_stem = names.get_name(stem)
        if gguf_stem is None:
            raise ExportError(f"no GGUF name for tensor {hf_name!r} of a {arch} model")
        name = f"{gguf_stem}.{suffix}"
        plan.append((name, hf_name, tuple(t.shape), tensor_qtype(name, tuple(t.shape), quant, tied)))
    return plan


def tokenizer_pre(model_name: str, tokenizer) -> str:
    """llama.cpp's name for how text is split before BPE (tokenizer.ggml.pre). The embedded model's own GGUF states
    it; otherwise it is recognised from the tokenizer's pre-tokenizer: GPT-2's ByteLevel regex, SmolLM's single
    digits, or one of the split regexes transformers' GGUF loader knows (Qwen2's, Llama 3's)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    if model_name in models.EMBEDDED_MODELS:
        from gguf import GGUFReader

        reader = GGUFReader(models.embedded_gguf_file(models.EMBEDDED_MODELS[model_name][0]))
        return reader.fields["tokenizer.ggml.pre"].contents()
    pre = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds[:1] == ["Split"]:
        pattern = steps[0].get("pattern", {}).get("Regex")
        for name, regex in GGUF_PRE_TOKENIZER_SPLITS.items():
            if regex == pattern:
                return name
    raise ExportError(f"cannot name this tokenizer's pre-tokenizer for llama.cpp ({kinds}): supported are GPT-2's, "
                      f"SmolLM's, Qwen2's and Llama 3's")


def gguf_vocab(tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) as llama.cpp's converter writes a BPE vocabulary: every id up to the model's
    vocab_size (ids the tokenizer lacks as [PADi], UNUSED), added special tokens CONTROL, other added tokens
    USER_DEFINED, merges as "left right" strings."""
    from gguf import TokenType

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE":
        raise ExportError(f"GGUF export writes BPE vocabularies (tokenizer.ggml.model=gpt2); this tokenizer is "
                          f"{spec['model']['type']}")
    by_id = {i: tok for tok, i in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise ExportError(f"the tokenizer has id {max(by_id)} but the model only {vocab_size} embeddings")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL if i not in added else
                         TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return tokens, [int(t) for t in types], merges


def write_gguf(model, tokenizer, path: str | os.PathLike, quant: str = "f16", *, pre: str = "gpt-2",
               name: str = "model") -> Path:
    """Write a merged Llama / Qwen2 model and its tokenizer as one GGUF file, streamed tensor by tensor.

    quant: "f16" (every matrix in F16), "q8_0" (blocks of 32 int8 values with an f16 scale, ~8.5 bits a weight),
    "q4_0" (blocks of 32 4-bit values; the output projection in q8_0). Vectors and norms stay F32 in all three.
    pre: llama.cpp's pre-tokenizer name (tokenizer_pre)."""
    import gguf
    from gguf.quants import quant_shape_to_byte_shape

    if quant not in QUANTS:
        raise ExportError(f"quant={quant!r}: choose one of {QUANTS} (the gguf package cannot write k-quants such "
                          f"as q4_k_m; make one from the f16 file with llama.cpp's llama-quantize)")
    cfg = model.config
    arch = gguf_architecture(cfg)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plan = gguf_tensor_plan(model, arch, quant)
    w = gguf.GGUFWriter(path, arch)
    # --- metadata: the hyperparameters llama.cpp and transformers' GGUF loader read -------------------
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rope = getattr(cfg, "rope_parameters", None) or {}
    w.add_name(name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(head_dim)
    if head_dim != cfg.hidden_size // cfg.num_attention_heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                     "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[quant])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    # --- tokenizer and chat template ------------------------------------------------------------------
    tokens, types, merges = gguf_vocab(tokenizer, cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else cfg.bos_token_id
    for add, token_id in ((w.add_bos_token_id, bos), (w.add_eos_token_id, tokenizer.eos_token_id),
                          (w.add_pad_token_id, tokenizer.pad_token_id), (w.add_unk_token_id, tokenizer.unk_token_id)):
        if token_id is not None:
            add(int(token_id))
    w.add_add_bos_token(bool(bos is not None and tokenizer("a")["input_ids"][:1] == [bos]))
    if isinstance(tokenizer.chat_template, str):
        w.add_chat_template(tokenizer.chat_template)
    # --- tensors: infos first, then the data one tensor at a time --------------------------------------
    for gguf_name, _, shape, qtype in plan:
        np_dtype = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}.get(qtype)
        if np_dtype is not None:
            w.add_tensor_info(gguf_name, shape, np_dtype, encoded_nbytes(shape, qtype))
        else:  # a quantised tensor is described by its shape in bytes, as add_tensor would see its uint8 blocks
            w.add_tensor_info(gguf_name, quant_shape_to_byte_shape(shape, qtype), np.uint8,
                              encoded_nbytes(shape, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    state = model.state_dict()
    heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}
    for gguf_name, hf_name, _, qtype in plan:
        t = state[hf_name]
        kind = gguf_name.split(".")[-2]
        if arch in PERMUTED_QK and kind in heads:
            t = torch.from_numpy(permute_qk(t.detach().to("cpu", torch.float32).numpy(), heads[kind]))
        w.write_tensor_data(encode_tensor(t, qtype))
    w.close()
    return path


def is_chatml(tokenizer) -> bool:
    """Whether the chat template renders ChatML (<|im_start|>role\\ncontent<|im_end|>\\n), as SmolLM2's and
    Qwen2's do."""
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # no template, or one that refuses these messages
        return False
    return text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"


CHATML_GO_TEMPLATE = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
                      "{{ end }}<|im_start|>assistant\n")


def modelfile_text(gguf_name: str, tokenizer, prefix: list[dict], temperature: float) -> str:
    """An Ollama Modelfile: FROM the GGUF, the chat template in Ollama's Go syntax (ChatML; other templates are left
    to the one inside the GGUF), the system prompt and the one-shot turn the model was trained with, EOS as stop."""
    lines = [f"# ollama create grpo-model -f {gguf_name[:-5]}.Modelfile && ollama run grpo-model",
             f"FROM ./{gguf_name}"]
    if is_chatml(tokenizer):
        lines.append(f'TEMPLATE """{CHATML_GO_TEMPLATE}"""')
    else:
        lines.append("# no TEMPLATE: Ollama uses the chat template stored in the GGUF")
    for m in prefix:
        if m["role"] == "system":
            lines.append(f'SYSTEM """{m["content"]}"""')
        else:
            lines.append(f'MESSAGE {m["role"]} """{m["content"]}"""')
    if tokenizer.eos_token:
        lines.append(f'PARAMETER stop "{tokenizer.eos_token}"')
    lines.append(f"PARAMETER temperature {temperature}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# verification: log-probs and logits on held-out prompts
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def prompt_logits(model, tokenizer, texts: list[str]) -> list[torch.Tensor]:
    """[T_i, V] fp32 CPU logits of each text, one forward per text (no padding to differ between models)."""
    device = models.model_device(model)
    out = []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
        out.append(model(input_ids=ids).logits[0].float().cpu())
    return out


def agreement(reference: list[torch.Tensor], other: list[torch.Tensor], ids: list[torch.Tensor]) -> dict:
    """How closely `other`'s next-token distributions follow `reference`'s over the same tokens:
    max |logit difference|, max |log p(next token) difference|, and the share of positions with the same argmax."""
    logit, logp, same, n = 0.0, 0.0, 0, 0
    for ref, oth, tok in zip(reference, other, ids):
        nxt = tok[1:].unsqueeze(1)  # [T-1, 1] the tokens that follow each position
        lp = lambda x: torch.log_softmax(x[:-1], -1).gather(1, nxt)  # noqa: E731  [T-1, 1]
        logit = max(logit, (ref - oth).abs().max().item())
        logp = max(logp, (lp(ref) - lp(oth)).abs().max().item())
        same += (ref.argmax(-1) == oth.argmax(-1)).sum().item()
        n += ref.shape[0]
    return {"max_abs_logit_diff": logit, "max_abs_logprob_diff": logp, "greedy_agreement": same / n, "positions": n}


def load_gguf(path: str | os.PathLike):
    """(model, tokenizer) read back through transformers' own GGUF loader (dequantised to fp32, on the CPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    with models.quiet_loading():
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model.eval(), tokenizer


def check_gguf(path, reference_logits: list[torch.Tensor], tokenizer, texts: list[str]) -> dict:
    """The GGUF file against the merged model's logits on `texts`: agreement(), plus whether the tokenizer rebuilt
    from the file gives the same token ids as the merged model's."""
    model, gguf_tokenizer = load_gguf(path)
    ids = [tokenizer(t, add_special_tokens=False, return_tensors="pt")["input_ids"][0] for t in texts]
    same_ids = all(gguf_tokenizer(t, add_special_tokens=False)["input_ids"] == i.tolist() for t, i in zip(texts, ids))
    result = agreement(reference_logits, prompt_logits(model, tokenizer, texts), ids)
    del model
    return {**result, "tokenizer_matches": same_ids}


# ----------------------------------------------------------------------------------------------
# 5) the model card
# ----------------------------------------------------------------------------------------------


def base_model_id(name: str) -> str:
    """The Hub id of the base model (the embedded one's original), else the name as the run gave it."""
    return f"HuggingFaceTB/{models.EMBEDDED_MODELS[name][1]}" if name in models.EMBEDDED_MODELS else name


def reproduce_command() -> str:
    return "python -m grpo_lib train --config grpo_config.yaml --run-dir runs/reproduce"


def _eval_rows(before: dict | None, after: dict | None) -> list[str]:
    if not before:
        return ["No held-out evaluation was recorded (num_eval_prompts=0)."]
    from .eval import comparison_table

    if not after:
        return [f"Before training only, on {before['n']} held-out prompts: format {before['format']:.3f}, "
                f"correct {before['accuracy']:.3f}, mean reward {before['reward/mean']:.3f}."]
    s = before.get("settings", {})
    how = "greedy" if s.get("greedy") else f"{s.get('num_samples', '?')} sampled completions per prompt, " \
                                           f"temperature {s.get('temperature')}, seed {s.get('seed')}"
    return [f"Held-out prompts never trained on ({how}):", "", "```", comparison_table(before, after), "```"]


def model_card(run_dir: Path, run_config: dict, files: list[str], checks: dict, figure: str | None) -> str:
    """README.md of an export: what the model is, how it was trained (from config.json and the run log), what the
    held-out evaluation and the run doctor say, how closely the exported files follow the trained policy."""
    import yaml

    from .doctor import diagnose, format_findings

    c = run_config
    quantised = "QLoRA: nf4 base in training, merged into the 16-bit base" if c["load_in_4bit"] else "no 4-bit"
    records = runlog.load_run_log(run_dir) if (run_dir / runlog.LOG_NAME).exists() else []
    last = records[-1] if records else None
    names = last.reward_names if last else list(c.get("reward_funcs", []))
    weights = last.reward_weights if last else (c.get("reward_weights") or [1.0] * len(names))
    read = lambda n: json.loads((run_dir / n).read_text()) if (run_dir / n).is_file() else None  # noqa: E731
    base = base_model_id(c["model"])
    clip = f"epsilon={c['epsilon']}" + (f", epsilon_high={c['epsilon_high']}" if c.get("epsilon_high") else "")
    reward_lines = [f"| `{n}` | {w:g} |" for n, w in zip(names, weights)]
    mean = [r.metrics.get("reward/mean") for r in records]
    lines = [
        "---", yaml.safe_dump({"base_model": base, "library_name": "transformers",
                               "tags": ["grpo", "grpo_lib", "lora-merged", "reinforcement-learning"]}).strip(),
        "---", CARD_MARK, "",
        f"# {base.split('/')[-1]} + GRPO ({c['task']})", "",
        f"`{base}` fine-tuned with GRPO by the GRPO workbench (`grpo_lib`), its LoRA adapter merged into the weights.",
        "", "## Files", "", *[f"- {f}" for f in files],
        "- `README.md` (this card), `training_curves.png`, `grpo_config.yaml` (the run's configuration)", "",
        "## Method", "",
        f"- GRPO, loss_type `{c['loss_type']}`, importance sampling per {c.get('importance_sampling_level', 'token')}, "
        f"beta={c['beta']} (k3 KL to the base), clip {clip}, G={c['num_generations']} completions per prompt, "
        f"{c['prompts_per_step']} prompts per step, {len(records)} steps logged (max_steps={c['max_steps']}), "
        f"scale_rewards `{c.get('scale_rewards', 'group')}`",
        f"- LoRA r={c['lora_r']}, alpha={c['lora_alpha']} on `{c['lora_target_modules']}`, "
        f"{quantised}, "
        f"learning rate {c['learning_rate']} ({c.get('lr_scheduler_type', 'constant')}), seed {c['seed']}",
        f"- sampling: temperature {c['temperature']}, top_p {c['top_p']}, at most {c['max_completion_length']} "
        f"completion tokens", "",
        "## Rewards", "", "| function | weight |", "|---|---|", *reward_lines, "",
        *([f"Mean total reward per step: {_three_decimals(mean[0])} (step {records[0].step}) -> "
           f"{_three_decimals(mean[-1])} "
           f"(step {records[-1].step}).", ""] if records else []),
        "## Data", "",
        f"Task `{c['task']}`, {'with' if c.get('one_shot', True) else 'without'} a one-shot example turn, system "
        f"prompt: {c.get('system_prompt') or 'the task default'!s}; prompts up to {c['max_prompt_length']} tokens.", "",
        "## Held-out evaluation", "", *_eval_rows(read("eval_before.json"), read("eval_after.json")), "",
        "## Run doctor", "", "```", format_findings(diagnose(run_dir)) if records else "no run log", "```", "",
        *(["## Training curves", "", f"![training curves]({figure})", ""] if figure else []),
        "## Exported files against the trained policy", "", *_check_rows(checks), "",
        "## Reproduce", "",
        "The run's exact configuration (`grpo_config.yaml` beside this card, from the run's config.json):", "",
        "```bash", reproduce_command(), "```", "",
        *([f"The run scored with reward functions passed from Python ({', '.join(names)}); the command needs them "
           f"registered under the config's names ({', '.join(c.get('reward_funcs', []))}).", ""]
          if list(c.get("reward_funcs", [])) != list(names) else []),
    ]
    return "\n".join(lines)


def _three_decimals(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _check_rows(checks: dict) -> list[str]:
    if not checks:
        return ["Not measured for this export (run with --verify)."]
    rows = [f"Measured on {checks['prompts']} held-out prompts, teacher-forced ({checks.get('device', '')}):", "",
            "| file | max abs log-prob diff | max abs logit diff | same greedy token |", "|---|---|---|---|"]
    for label, r in checks.items():
        if isinstance(r, dict):
            rows.append(f"| {label} | {r['max_abs_logprob_diff']:.2e} | {r['max_abs_logit_diff']:.2e} | "
                        f"{r['greedy_agreement']:.4f} of {r['positions']} |")
    return rows


def write_card(folder: Path, run_dir: Path, run_config: dict, files: list[str], checks: dict) -> Path:
    """README.md + training_curves.png + grpo_config.yaml in `folder`. A README.md that is not an export's card
    is never overwritten."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import plots

    folder.mkdir(parents=True, exist_ok=True)
    card = folder / "README.md"
    if card.exists() and CARD_MARK not in card.read_text(errors="replace"):
        raise ExportError(f"{card} exists and is not an export's model card: choose an empty output folder")
    figure = None
    if (run_dir / runlog.LOG_NAME).exists():
        fig = plots.plot_training_curves(run_dir)
        fig.savefig(folder / "training_curves.png", dpi=100)
        plt.close(fig)
        figure = "training_curves.png"
    GRPOConfig.from_dict(run_config).to_yaml(str(folder / "grpo_config.yaml"))
    card.write_text(model_card(run_dir, run_config, files, checks, figure))
    return card


# ----------------------------------------------------------------------------------------------
# 6) the Hub
# ----------------------------------------------------------------------------------------------


def hub_preflight(timeout_s: float = 5.0) -> str:
    """The Hugging Face token, after checking that the Hub can be reached; ExportError (one line) otherwise.
    Nothing is sent: the network check opens a TCP connection to the endpoint and closes it."""
    import huggingface_hub
    from huggingface_hub import constants

    token = huggingface_hub.get_token()
    if not token:
        raise ExportError("--push-to-hub needs a Hugging Face token (`hf auth login`, or HF_TOKEN); nothing was "
                          "uploaded")
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        raise ExportError("--push-to-hub: HF_HUB_OFFLINE is set; nothing was uploaded")
    url = re.match(r"(https?)://([^/:]+)(?::(\d+))?", constants.ENDPOINT)
    port = int(url.group(3) or (443 if url.group(1) == "https" else 80))
    try:
        socket.create_connection((url.group(2), port), timeout=timeout_s).close()
    except OSError as e:
        raise ExportError(f"--push-to-hub: cannot reach {constants.ENDPOINT} ({type(e).__name__}: {e}); nothing was "
                          f"uploaded") from e
    return token


def push_to_hub(repo_id: str, folders: list[Path], token: str | None = None) -> str:
    """Upload the export's folders to the model repo `repo_id` (created if missing, private by default). Returns
    the repo's URL."""
    from huggingface_hub import HfApi

    token = token or hub_preflight()
    api = HfApi(token=token)
    url = api.create_repo(repo_id, repo_type="model", private=True, exist_ok=True)
    for folder in dict.fromkeys(folders):
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="grpo_lib export")
    return str(url)


# ----------------------------------------------------------------------------------------------
# the whole export
# ----------------------------------------------------------------------------------------------


def export_run(run_dir: str | os.PathLike, merged_dir: str | os.PathLike | None = None,
               gguf_path: str | os.PathLike | None = None, quant: str = "f16", *, dtype: str = "auto",
               device: str | None = None, verify: bool = False, verify_prompts: int = 8,
               push_to_hub_repo: str | None = None, available: int | None = None, log=print) -> dict:
    """Merge a run's adapter and write what was asked: a Hugging Face checkpoint in `merged_dir`, a GGUF at
    `gguf_path` (+ an Ollama Modelfile beside it), a model card in each output folder; then optionally upload.

    dtype: "auto" (a 4-bit run in bf16, else the run's compute dtype), "float32", "bfloat16", "float16".
    verify: measure on `verify_prompts` held-out prompts how closely the merged model follows the adapter-on model
    and the GGUF the merged model (figures printed and written into the card).
    available: the memory budget in bytes (default: what is free now); a plan over it is refused (MemoryPlanError).
    Returns {"plan", "merged_dir", "gguf", "modelfile", "cards", "checks", "hub"}."""
    run_dir = Path(run_dir)
    run_config, _ = read_run(run_dir)
    if merged_dir is None and gguf_path is None:
        raise ExportError("nothing to export: pass merged_dir (--merged OUT_DIR) and/or gguf_path (--gguf OUT.gguf)")
    if gguf_path is not None and not str(gguf_path).endswith(".gguf"):
        raise ExportError(f"--gguf {gguf_path}: the file name must end in .gguf")
    if quant not in QUANTS:
        raise ExportError(f"quant={quant!r}: choose one of {QUANTS}")
    if gguf_path and merged_dir and Path(gguf_path).parent.resolve() == Path(merged_dir).resolve():
        raise ExportError(f"--gguf {gguf_path}: write it outside the merged folder {merged_dir} (transformers "
                          f"reading the GGUF from that folder would take the folder's config and tokenizer)")
    device = device or models.default_device()
    dt = merge_dtype(run_config, device, dtype)
    plan = plan_export(run_config, device, dt, merged=merged_dir is not None, gguf=gguf_path is not None,
                       verify=verify, available=available)
    log(plan.format())
    if not plan.fits:
        raise MemoryPlanError(f"{plan.format()}\nthe merge would not fit: free memory (close other sessions), export "
                              f"on a machine with more memory, or merge in a smaller dtype (--dtype bfloat16)")

    # 2) merge (with the adapter-on logits first, when verifying)
    model, tokenizer = load_adapted(run_dir, dt, device)
    config = GRPOConfig.from_dict(run_config)
    from . import data

    rows = data.task_rows(config, "test", n=max(1, verify_prompts))
    texts = [data.format_prompt(tokenizer, r["prompt"]) for r in rows]
    checks = {}
    if verify:
        adapted = prompt_logits(model, tokenizer, texts)
    model = model.merge_and_unload().eval()
    if verify:
        ids = [tokenizer(t, add_special_tokens=False, return_tensors="pt")["input_ids"][0] for t in texts]
        merged_logits = prompt_logits(model, tokenizer, texts)
        checks = {"prompts": len(texts), "device": f"{device}, merged in {plan.dtype}",
                  "merged vs adapter-on": agreement(adapted, merged_logits, ids)}
        del adapted
    result = {"plan": plan, "merged_dir": None, "gguf": None, "modelfile": None, "cards": [], "checks": checks,
              "hub": None}
    folders: dict[Path, list[str]] = {}
    # 3) save
    if merged_dir is not None:
        result["merged_dir"] = save_merged(model, tokenizer, merged_dir)
        log(f"merged checkpoint: {result['merged_dir']}")
        folders[Path(merged_dir)] = ["`*.safetensors`, `config.json`, `generation_config.json`, `tokenizer.json`, "
                                     "`chat_template.jinja`: the merged checkpoint "
                                     "(`AutoModelForCausalLM.from_pretrained(folder)`, vLLM, TGI)"]
    # 4) GGUF
    if gguf_path is not None:
        gguf_path = Path(gguf_path)
        write_gguf(model, tokenizer, gguf_path, quant, pre=tokenizer_pre(run_config["model"], tokenizer),
                   name=f"{base_model_id(run_config['model']).split('/')[-1]}-grpo")
        modelfile = gguf_path.with_suffix(".Modelfile")
        modelfile.write_text(modelfile_text(gguf_path.name, tokenizer, rows[0]["prompt"][:-1]
                                            if isinstance(rows[0]["prompt"], list) else [], config.temperature))
        result["gguf"], result["modelfile"] = gguf_path, modelfile
        log(f"GGUF ({quant}): {gguf_path} ({gguf_path.stat().st_size / 2**20:.0f} MiB), Ollama: {modelfile}")
        folders.setdefault(gguf_path.parent, []).extend(
            [f"`{gguf_path.name}`: GGUF {quant} for llama.cpp (`llama-cli -m {gguf_path.name}`)",
             f"`{modelfile.name}`: Ollama (`ollama create NAME -f {modelfile.name}`)"])
        if verify:
            checks[f"GGUF {quant}"] = check_gguf(gguf_path, merged_logits, tokenizer, texts)
    if verify:
        for label, r in checks.items():
            if isinstance(r, dict):
                log(f"{label}: max |log-prob diff| {r['max_abs_logprob_diff']:.2e}, max |logit diff| "
                    f"{r['max_abs_logit_diff']:.2e}, same greedy token {r['greedy_agreement']:.4f} of "
                    f"{r['positions']} positions{'' if r.get('tokenizer_matches', True) else ', TOKENIZER DIFFERS'}")
    # 5) cards
    for folder, files in folders.items():
        result["cards"].append(write_card(folder, run_dir, run_config, files, checks))
    # 6) Hub: checked before anything is uploaded; a failure leaves the local export as it is
    if push_to_hub_repo:
        result["hub"] = push_to_hub(push_to_hub_repo, list(folders), hub_preflight())
        log(f"uploaded to {result['hub']}")
    return result
