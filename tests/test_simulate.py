"""The simulation primitives against the pinned transformers: the one module swap, attention routed through the
registered function (no plan = plain SDPA bit for bit, a plan changes Q/K/V, the model's implementation is restored
afterwards), and a block run as the fake-quant backend runs it."""
import pytest
import torch

from quantbench import models
from quantbench.backends.fake_quant import realize
from quantbench.plan import AttentionPlan
from quantbench.quant import QuantSpec, parse_scheme
from quantbench.pipeline import resolve
from quantbench.simulate import ATTN_NAME, attention_plans, plan_of, quantized_block, swap_modules, swapped

from helpers import logits


def test_swap_modules_puts_back_what_it_replaced_and_checks_every_path_first():
    lm = models.load("tiny-llama")
    block = lm.adapter.blocks[0]
    q, o = block.self_attn.q_proj, block.self_attn.o_proj
    restore = swap_modules(block, {"self_attn.q_proj": torch.nn.Identity(), "self_attn.o_proj": torch.nn.Identity()})
    assert isinstance(block.self_attn.q_proj, torch.nn.Identity) and isinstance(block.self_attn.o_proj, torch.nn.Identity)
    restore()
    assert block.self_attn.q_proj is q and block.self_attn.o_proj is o
    with pytest.raises(AttributeError):
        swap_modules(block, {"self_attn.q_proj": torch.nn.Identity(), "self_attn.nope.x": torch.nn.Identity()})
    assert block.self_attn.q_proj is q  # nothing changed: the bad path was found before any swap
    with pytest.raises(RuntimeError), swapped(block, {"mlp.down_proj": torch.nn.Identity()}):
        raise RuntimeError
    assert isinstance(block.mlp.down_proj, torch.nn.Linear)


def test_routed_attention_without_a_plan_is_sdpa_and_a_plan_quantizes_qkv(ids):
    lm = models.load("tiny-llama")
    ref = logits(lm.model, ids)
    attn = lm.adapter.attention(lm.adapter.blocks[0])
    spec = QuantSpec(2, "sym", "token")
    with attention_plans(lm.model, {attn: AttentionPlan(k=spec, v=spec)}):
        assert lm.model.config._attn_implementation == ATTN_NAME and plan_of(attn) is not None
        quantized = logits(lm.model, ids)
        with attention_plans(lm.model, {attn: None}):  # nesting with nothing to add changes nothing
            assert lm.model.config._attn_implementation == ATTN_NAME
    assert lm.model.config._attn_implementation == "sdpa" and plan_of(attn) is None
    assert (quantized - ref).abs().max() > 1e-2  # 2-bit K/V really reach the attention
    assert torch.equal(logits(lm.model, ids), ref)
    lm.model.set_attn_implementation(ATTN_NAME)  # routed, no plan: exactly the SDPA path
    assert torch.equal(logits(lm.model, ids), ref)


def test_quantized_block_runs_the_block_as_the_backend_does():
    lm = models.load("tiny-mistral")
    m = resolve("quarot")()
    qm = m.quantize(lm, parse_scheme("w4a4kv4", m.specs()), None)
    block = qm.adapter.blocks[1]
    x = torch.randn(1, 12, 128, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(12)[None]
    kw = {"position_embeddings": qm.model.model.rotary_emb(x, pos), "attention_mask": None, "position_ids": pos}
    with torch.no_grad():
        fp = block(x, **kw)
        with quantized_block(qm, 1, block):
            sim = block(x, **kw)
        assert torch.equal(block(x, **kw), fp) and plan_of(qm.adapter.attention(block)) is None  # restored
        realize(qm)
        assert torch.equal(block(x, **kw), sim)
    assert (sim - fp).abs().max() > 1e-3
