"""Adapter invariants on tiny Llama/Mistral/Qwen2 with GQA, tied embeddings, and the unsupported-arch error (OPT and
BLOOM: tests/test_layernorm_models.py)."""
import pytest
from transformers import GPT2Config, GPT2LMHeadModel

from quantbench import models
from quantbench.adapters import LlamaAdapter, adapter_for
from quantbench.errors import ConfigError


def test_geometry_and_parts(tiny):
    a = tiny.adapter
    assert (a.num_heads, a.num_kv_heads, a.head_dim, a.gqa_groups) == (4, 2, 32, 2)
    assert len(a.blocks) == 2 and not a.tied_embeddings
    named = list(a.named_linears())
    assert len(named) == 7 * 2
    for name, layer, role, lin in named:
        assert tiny.model.get_submodule(name) is lin
        assert name == f"model.layers.{layer}.{LlamaAdapter.LINEARS[role]}"
    lin = a.linears(a.blocks[0])
    assert lin["k"].out_features == lin["v"].out_features == a.num_kv_heads * a.head_dim
    assert lin["q"].out_features == a.num_heads * a.head_dim
    assert lin["down"].in_features == a.intermediate_size
    assert {r for g in a.SEQUENTIAL for r in g} == set(a.LINEARS) == {*a.ATTN_IN, a.ATTN_OUT, *a.MLP_IN, a.MLP_OUT}
    n_in, n_post = a.norms(a.blocks[0])
    assert n_in is a.blocks[0].input_layernorm and n_post is a.blocks[0].post_attention_layernorm
    assert a.lm_head is tiny.model.lm_head and a.final_norm is tiny.model.model.norm


def test_qwen2_has_qkv_bias():
    a = models.load("tiny-qwen2").adapter
    lin = a.linears(a.blocks[0])
    assert lin["q"].bias is not None and lin["o"].bias is None


def test_tied_embeddings():
    m = models.tiny_model("tiny-llama", tie_word_embeddings=True)
    assert adapter_for(m).tied_embeddings


def test_unsupported_architecture():
    m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ConfigError, match="unsupported architecture 'gpt2'.*bloom, llama, mistral, opt, qwen2"):
        adapter_for(m)
