"""Tiny transformers models built inside the tests (no hub): shared by several test files."""

import torch


def tiny_llama(seed=0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
               rms_norm_eps=1e-6, tie_word_embeddings=False)
    cfg.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def tiny_qwen2(seed=0, **overrides):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
               tie_word_embeddings=True)
    cfg.update(overrides)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(**cfg)).eval()


def tiny_gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=64, n_layer=2, n_head=4,
                                      n_positions=64)).eval()


def tiny_bert(seed=0, **overrides):
    from transformers import BertConfig, BertModel

    cfg = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=64)
    cfg.update(overrides)
    torch.manual_seed(seed)
    return BertModel(BertConfig(**cfg), add_pooling_layer=True).eval()


def randomize_lambdas(model, seed=1, scale=1.0):
    """Gives every UORA layer non-trivial lambda vectors (fresh adapters are exact no-ops)."""
    from uora_rt.training.inject import adapter_layers

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            layer.lambda_b.copy_(torch.randn(layer.lambda_b.shape, generator=g) * scale)
            layer.lambda_d.copy_(torch.randn(layer.lambda_d.shape, generator=g) * scale)
