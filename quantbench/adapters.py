"""Architecture adapters: the one place that knows where a decoder keeps its parts (docs/architecture.md).

Methods ask the adapter for blocks, norms, linears and head geometry; they never walk
``model.model.layers[i].self_attn`` themselves. Llama, Mistral and Qwen2 share one module layout in
transformers (Qwen2 adds q/k/v biases), so one adapter class serves all three; a new layout is a new subclass.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

from torch import nn

from quantbench.errors import ConfigError

# role -> attribute path inside a decoder block
LINEARS = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
# linears that read the same input, in the order the reference repos treat them (QuaRot/GPTQ "true sequential")
INPUT_GROUPS = {"qkv": ("q", "k", "v"), "o": ("o",), "gate_up": ("gate", "up"), "down": ("down",)}


@dataclass
class LlamaAdapter:
    """Llama / Mistral / Qwen2 decoders (``model_type`` in :attr:`MODEL_TYPES`), GQA and tied embeddings."""

    model: nn.Module
    MODEL_TYPES = ("llama", "mistral", "qwen2")

    @property
    def config(self):
        return self.model.config

    # geometry --------------------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def intermediate_size(self) -> int:
        return self.config.intermediate_size

    @property
    def num_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return getattr(self.config, "num_key_value_heads", None) or self.num_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.hidden_size // self.num_heads

    @property
    def gqa_groups(self) -> int:
        """Query heads per KV head (1 = plain multi-head attention)."""
        return self.num_heads // self.num_kv_heads

    @property
    def context(self) -> int | None:
        """The longest sequence the model was built for (``max_position_embeddings``), if it says."""
        return getattr(self.config, "max_position_embeddings", None)

    def linear_inputs(self) -> dict[str, int]:
        """Input width of every linear role, from the config alone (options are checked before weights load)."""
        h = self.hidden_size
        return {"q": h, "k": h, "v": h, "o": self.num_heads * self.head_dim, "gate": h, "up": h,
                "down": self.intermediate_size}

    @property
    def tied_embeddings(self) -> bool:
        return self.model.lm_head.weight is self.model.model.embed_tokens.weight

    # parts -----------------------------------------------------------------------------------------
    @property
    def embed(self) -> nn.Embedding:
        return self.model.model.embed_tokens

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.model.layers

    @property
    def final_norm(self) -> nn.Module:
        return self.model.model.norm

    @property
    def lm_head(self) -> nn.Linear:
        return self.model.lm_head

    def norms(self, block: nn.Module) -> tuple[nn.Module, nn.Module]:
        """(input_layernorm before q/k/v, post_attention_layernorm before gate/up)."""
        return block.input_layernorm, block.post_attention_layernorm

    ATTENTION, MLP = "self_attn", "mlp"  # the sub-layers' paths inside a block

    def attention(self, block: nn.Module) -> nn.Module:
        return block.get_submodule(self.ATTENTION)

    @staticmethod
    def attention_output(o_proj: nn.Module, o_input):
        """What the attention sub-layer returns given its o_proj and that linear's input: ``LlamaAttention.forward``
        ends ``return self.o_proj(attn_output), attn_weights`` (the decoder layer discards the weights). The
        layer-wise runner's replay (``layerwise._Replay``) uses it to skip recomputing attention."""
        return o_proj(o_input), None

    @staticmethod
    def mlp_output(down_proj: nn.Module, down_input):
        """What the MLP sub-layer returns given its down_proj and that linear's input (``LlamaMLP.forward`` is
        ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``)."""
        return down_proj(down_input)

    def linears(self, block: nn.Module) -> dict[str, nn.Linear]:
        """role -> linear of one block, in the order q, k, v, o, gate, up, down."""
        return {role: block.get_submodule(path) for role, path in LINEARS.items()}

    def block_prefix(self, layer: int) -> str:
        """Qualified name of block ``layer`` with a trailing dot, e.g. ``model.layers.3.``."""
        return f"model.layers.{layer}."

    def linear_name(self, layer: int, role: str) -> str:
        """Fully qualified module name, e.g. ``model.layers.3.mlp.down_proj``."""
        return self.block_prefix(layer) + LINEARS[role]

    def named_linears(self):
        """Yield (qualified name, layer index, role, module) for every decoder linear (lm_head excluded)."""
        for i, block in enumerate(self.blocks):
            for role, lin in self.linears(block).items():
                yield self.linear_name(i, role), i, role, lin


    def parts(self, kinds) -> list[nn.Module]:
        """The modules of the named kinds of :data:`PARTS`, in model order."""
        unknown = set(kinds) - set(PARTS)
        if unknown:
            raise ValueError(f"unknown model parts {sorted(unknown)}; parts: {', '.join(PARTS)}")
        out = [self.embed] if "embed" in kinds else []
        for block in self.blocks:
            out += list(self.norms(block)) if "norms" in kinds else []
            out += list(self.linears(block).values()) if "linears" in kinds else []
        out += [self.final_norm] if "final_norm" in kinds else []
        out += [self.lm_head] if "lm_head" in kinds else []
        return out

    def tensor_names(self, kinds) -> list[str]:
        """State-dict names of every parameter and buffer of :meth:`parts` ``(kinds)``: what a method that
        declares it changes those parts leaves different from the loaded model (``Method.modifies``)."""
        names = {id(m): n for n, m in self.model.named_modules(remove_duplicate=False)}
        out = []
        for m in self.parts(kinds):
            prefix = names[id(m)]
            out += [f"{prefix}.{k}" for k, _ in m.named_parameters(recurse=False)]
            out += [f"{prefix}.{k}" for k, _ in m.named_buffers(recurse=False)]
        return list(dict.fromkeys(out))


PARTS = ("embed", "norms", "linears", "final_norm", "lm_head")  # what a method may declare it changes
ADAPTERS = {t: LlamaAdapter for t in LlamaAdapter.MODEL_TYPES}


def geometry(config) -> LlamaAdapter:
    """An adapter over a bare config: geometry only (no parts), for validating a request before the model loads."""
    return adapter_for(SimpleNamespace(config=config))


def adapter_for(model: nn.Module) -> LlamaAdapter:
    """The adapter for ``model``'s architecture, or a clear error naming the supported ones."""
    mtype = getattr(getattr(model, "config", None), "model_type", None)
    if mtype not in ADAPTERS:
        raise ConfigError(
            f"unsupported architecture {mtype!r}; supported model types: {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[mtype](model)
