"""gguf_import: the packaged SmolLM2 Q4_1 GGUF -> HF folder, checked against an independent
implementation, transformers' own GGUF loader (`from_pretrained(..., gguf_file=...)`)."""

import json
import os
import time
import unicodedata

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jinja2
import pytest
import torch
from safetensors import safe_open

from conftest import requires_smollm2
from uora_rt.models import gguf_import
from uora_rt.models.assets import smollm2_gguf
from uora_rt.models.gguf_import import default_base, materialize_gguf

transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.slow, requires_smollm2]  # a real 135M checkpoint: ~40 s on 2 cores

CHAT = [{"role": "user", "content": "Write one sentence about the sea."}]
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "1, 2, 3, 4,"]
TEXTS = [
    "Hello world", "12345", "3.14159 and 1,000,000", "  leading spaces", "trailing  ",
    "a  b   c    d", "line one\nline two\n\n\nthree", "tab\tsep\r\nwin", "don't I'll we've",
    "héllo wörld — ça va?", "🤗 emoji 🚀🚀", "日本語のテキスト", "x 1 2 y",
    "x = [1,2]; print(x)",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "<|endoftext|><repo_name>x",
]
# Spaces before a digit: llama.cpp's "smollm" pre-tokenizer (and SmolLM's own tokenizer.json)
# isolates each digit first, so "a  1" -> [a, ĠĠ, 1]; transformers' GGUF tokenizer ignores
# "smollm" and splits GPT-2 style -> [a, Ġ, Ġ, 1]; likewise " ²" (byte-level "ĠÂ²", and the
# merge "Ġ Â" exists). We follow llama.cpp; see test_tokenizer_digit_split.
DIVERGENT = ["a  1", "x   42 y", "total:\n  7 items", "½ ² ٣"]


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("UORA_RT_CACHE", str(tmp_path_factory.mktemp("uora_rt_cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def folder(cache):
    t = time.perf_counter()
    path = default_base("float32")
    size = sum(f.stat().st_size for f in path.iterdir()) / 2**20
    print(f"\nmaterialized {path.name} in {time.perf_counter() - t:.1f} s, {size:.0f} MiB")
    return path


@pytest.fixture(scope="session")
def gguf_ref():
    path = smollm2_gguf()
    return str(path.parent), path.name


@pytest.fixture(scope="session")
def ref_model(gguf_ref):
    model = transformers.LlamaForCausalLM.from_pretrained(gguf_ref[0], gguf_file=gguf_ref[1],
                                                          dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def ref_tok(gguf_ref):
    return transformers.AutoTokenizer.from_pretrained(gguf_ref[0], gguf_file=gguf_ref[1])


@pytest.fixture(scope="session")
def model(folder):
    return transformers.LlamaForCausalLM.from_pretrained(folder).eval()


@pytest.fixture(scope="session")
def tok(folder):
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(folder / "tokenizer.json"))


def test_folder_layout_and_config(folder):
    names = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= names
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temp leftovers
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["torch_dtype"] == "float32"
    assert (cfg["hidden_size"], cfg["intermediate_size"]) == (576, 1536)
    assert cfg["num_hidden_layers"] == 30
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (9, 3, 64)
    assert (cfg["rope_theta"], cfg["rms_norm_eps"], cfg["vocab_size"]) == (100000.0, 1e-5, 49152)
    assert cfg["tie_word_embeddings"] is True and cfg["max_position_embeddings"] == 8192
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 2)
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert "lm_head.weight" not in f.keys() and len(list(f.keys())) == 272
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    assert (tc["bos_token"], tc["eos_token"], tc["pad_token"], tc["unk_token"]) == \
        ("<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")


def test_unpermute_inverts_llama_cpp_permute():
    # convert_hf_to_gguf.LlamaModel.permute, verbatim in behaviour
    def permute(w, n_head):
        half = w.shape[0] // n_head // 2
        return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = torch.randn(3 * 64, 10)
    assert torch.equal(gguf_import._unpermute_qk(permute(w, 3), 3), w)
    assert not torch.equal(permute(w, 3), w)


def test_weights_and_logits_match_transformers_gguf(model, ref_model):
    ours, ref = model.state_dict(), ref_model.state_dict()
    assert ours.keys() == ref.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], ref[name], atol=0, rtol=0, msg=name)
    tok_ids = [[1, 4093, 198, 19556, 905], [504, 3575, 282, 4649, 314],
               [33, 28, 216, 34, 28, 216, 35]]
    with torch.no_grad():
        for ids in tok_ids:
            ids = torch.tensor([ids])
            torch.testing.assert_close(model(ids).logits, ref_model(ids).logits,
                                       atol=1e-4, rtol=1e-4)


def _digit_split_oracle(ref_tok, text):
    """llama.cpp "smollm": isolate every \\p{N} char, then GPT-2 split + BPE on each piece."""
    pieces, cur = [], ""
    for ch in text:
        if unicodedata.category(ch).startswith("N"):
            pieces += [cur, ch] if cur else [ch]
            cur = ""
        else:
            cur += ch
    pieces += [cur] if cur else []
    return [i for p in pieces for i in ref_tok.encode(p, add_special_tokens=False)]


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_matches_transformers_gguf(tok, ref_tok, text):
    ids = tok.encode(text).ids
    assert ids == ref_tok.encode(text, add_special_tokens=False)
    assert ids == _digit_split_oracle(ref_tok, text)
    assert tok.decode(ids, skip_special_tokens=False) == text


@pytest.mark.parametrize("text", DIVERGENT)
def test_tokenizer_digit_split(tok, ref_tok, text):
    ids = tok.encode(text).ids
    assert ids == _digit_split_oracle(ref_tok, text)
    assert ids != ref_tok.encode(text, add_special_tokens=False)  # transformers' GPT-2 fallback
    assert tok.decode(ids) == text


def test_special_tokens_are_whole(tok):
    for i, name in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]):
        assert tok.encode(name).ids == [i]
    assert tok.decode([1, 4093, 2], skip_special_tokens=True) == "user"


def test_chat_template_matches(folder, ref_tok):
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    multi = ([{"role": "system", "content": "Be brief."}] + CHAT
             + [{"role": "assistant", "content": "Waves."}, {"role": "user", "content": "More"}])
    for messages in (CHAT, multi):
        for gen in (True, False):
            want = ref_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            got = env.from_string(tc["chat_template"]).render(messages=messages,
                                                              add_generation_prompt=gen)
            assert got == want
    ours = transformers.AutoTokenizer.from_pretrained(folder)
    assert ours.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == \
        ref_tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)


def test_greedy_generation_matches(folder, model, ref_model, ref_tok):
    ours_tok = transformers.AutoTokenizer.from_pretrained(folder)
    chat = dict(add_generation_prompt=True, return_tensors="pt", return_dict=True)
    enc = ours_tok.apply_chat_template(CHAT, **chat)
    ref_enc = ref_tok.apply_chat_template(CHAT, **chat)
    assert torch.equal(enc["input_ids"], ref_enc["input_ids"])
    kw = dict(max_new_tokens=20, do_sample=False)
    out = model.generate(**enc, **kw)[0, enc["input_ids"].shape[1]:]
    ref = ref_model.generate(**ref_enc, **kw)[0, enc["input_ids"].shape[1]:]
    text = ours_tok.decode(out, skip_special_tokens=True)
    print(f"\ngreedy: {text!r}")
    assert out.tolist() == ref.tolist()
    assert len(text.split()) >= 5 and any(w in text.lower() for w in ("sea", "ocean", "wave"))


def test_bfloat16(cache, folder, model):
    path = default_base("bfloat16")
    assert path != folder and "bfloat16" in path.name
    assert json.loads((path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    fp32 = model.state_dict()
    with safe_open(path / "model.safetensors", "pt") as f:
        for name in f.keys():
            w = f.get_tensor(name)
            assert w.dtype == torch.bfloat16, name
            assert torch.equal(w, fp32[name].to(torch.bfloat16)), name
    loaded = transformers.LlamaForCausalLM.from_pretrained(path)
    assert loaded.dtype == torch.bfloat16


def test_default_base_reuses_cache(folder):
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    t = time.perf_counter()
    again = default_base("float32")
    assert time.perf_counter() - t < 0.5
    assert again == folder and (folder / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError):
        default_base("float16")


def test_crash_leaves_no_half_folder(tmp_path, monkeypatch):
    def boom(path, obj):
        raise RuntimeError("simulated crash while writing")

    monkeypatch.setattr(gguf_import, "_write_json", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        materialize_gguf(smollm2_gguf(), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
