"""Architecture adapters: the one place that knows where a decoder keeps its parts (docs/architecture.md).

Methods ask the adapter for blocks, norms, linears, which linears read which norm, the order GPTQ quantizes them
in, the MLP's activation and head geometry; they never walk ``model.model.layers[i].self_attn`` themselves.

Linears have *roles*, one vocabulary for every family: ``q k v`` (or ``qkv`` where the model fuses them), ``o``
(attention output), ``gate up`` (MLP inputs; ``up`` alone where there is no gate) and ``down`` (MLP output).

| family | ``model_type`` | norms | linears (role: module) | MLP |
|---|---|---|---|---|
| :class:`LlamaAdapter` | llama, mistral, qwen2 | RMSNorm | q k v o gate up down (``self_attn.*``, ``mlp.*``) | SwiGLU |
| :class:`OptAdapter` | opt (pre-LN) | LayerNorm + bias | q k v, o (``out_proj``), up (``fc1``), down (``fc2``) | ReLU |
| :class:`BloomAdapter` | bloom | LayerNorm + bias | qkv (``query_key_value``), o (``dense``), up, down | GELU |

OPT adds learned positional embeddings to the token embeddings (both are the residual stream's "embed" part);
BLOOM has a LayerNorm on the embeddings (``word_embeddings_layernorm``) and ALiBi instead of rotary positions. A
variant an adapter does not support is refused when the config is read, naming what is supported.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import ClassVar

from torch import nn

from quantbench.errors import ConfigError

PARTS = ("embed", "norms", "linears", "final_norm", "lm_head")  # what a method may declare it changes


@dataclass
class Adapter:
    """What every family has; subclasses set the class attributes below and the paths of their parts."""

    model: nn.Module
    MODEL_TYPES: ClassVar[tuple[str, ...]] = ()
    FAMILY: ClassVar[str] = "?"
    LINEARS: ClassVar[dict[str, str]] = {}  # role -> attribute path inside a decoder block, in model order
    NORMS: ClassVar[tuple[str, str]] = ("", "")  # the norm before attention, the norm before the MLP
    ATTN_IN: ClassVar[tuple[str, ...]] = ()  # roles that read the first norm's output
    MLP_IN: ClassVar[tuple[str, ...]] = ()  # roles that read the second norm's output
    ATTN_OUT, MLP_OUT = "o", "down"
    SEQUENTIAL: ClassVar[tuple[tuple[str, ...], ...]] = ()  # GPTQ "true sequential" groups
    NORM: ClassVar[str] = "rms"  # "rms" (weight only) or "layer" (LayerNorm: mean subtracted, weight and bias)
    MLP_ACT: ClassVar[str] = "swiglu"  # how down's input is made: act(gate) * up, relu(up), gelu(up)
    ROUTES_ATTENTION: ClassVar[bool] = True  # post-RoPE Q/K/V reachable through transformers' AttentionInterface
    ATTENTION: ClassVar[str] = "self_attn"
    MLP: ClassVar[str | None] = "mlp"  # None: the MLP is inline in the block (no sub-module to replay)

    @property
    def config(self):
        return self.model.config

    @classmethod
    def check_config(cls, config) -> None:
        """Raise :class:`ConfigError` for a variant of the family this adapter does not support."""

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
        widths = {"o": self.num_heads * self.head_dim, "down": self.intermediate_size}
        return {r: widths.get(r, self.hidden_size) for r in self.LINEARS}

    def leader(self, role: str) -> str:
        """The first role of the group that reads the same input as ``role`` (its statistics stand for the group:
        q for q/k/v, gate for gate/up)."""
        for group in (self.ATTN_IN, self.MLP_IN):
            if role in group:
                return group[0]
        return role

    @property
    def tied_embeddings(self) -> bool:
        return self.lm_head.weight is self.embed.weight

    # parts -----------------------------------------------------------------------------------------
    @property
    def embed(self) -> nn.Embedding:
        raise NotImplementedError

    @property
    def embeddings(self) -> list[nn.Module]:
        """Every table whose rows sum into the residual stream's input (token, and positional where learned)."""
        return [self.embed]

    @property
    def blocks(self) -> nn.ModuleList:
        raise NotImplementedError

    @property
    def final_norm(self) -> nn.Module:
        raise NotImplementedError

    @property
    def lm_head(self) -> nn.Linear:
        return self.model.lm_head

    def norms(self, block: nn.Module) -> tuple[nn.Module, nn.Module]:
        """(the norm before attention, the norm before the MLP)."""
        return block.get_submodule(self.NORMS[0]), block.get_submodule(self.NORMS[1])

    def norm_inputs(self, block: nn.Module) -> list[tuple[nn.Module, list[nn.Linear]]]:
        """Each norm of the block with the linears that read its output: what a smoothing or norm fusion acts on."""
        lin = self.linears(block)
        ln1, ln2 = self.norms(block)
        return [(ln1, [lin[r] for r in self.ATTN_IN]), (ln2, [lin[r] for r in self.MLP_IN])]

    def attention(self, block: nn.Module) -> nn.Module:
        return block.get_submodule(self.ATTENTION)

    @staticmethod
    def block_output(out):
        """A decoder block's hidden states from what its forward returns (BLOOM returns a tuple)."""
        return out[0] if isinstance(out, tuple) else out

    def replay_parts(self) -> list[tuple[str, frozenset, str, object]]:
        """Sub-layers the layer-wise runner may replay (``layerwise._Replay``): (path, roles final before its last
        linear's input stops changing, its last linear's role, ``output(last, x)``). Only sub-layers that are a
        module returning a function of their last linear's input alone qualify."""
        return []

    def linears(self, block: nn.Module) -> dict[str, nn.Linear]:
        """role -> linear of one block, in model order."""
        return {role: block.get_submodule(path) for role, path in self.LINEARS.items()}

    def block_prefix(self, layer: int) -> str:
        """Qualified name of block ``layer`` with a trailing dot, e.g. ``model.layers.3.``."""
        raise NotImplementedError

    def linear_name(self, layer: int, role: str) -> str:
        """Fully qualified module name, e.g. ``model.layers.3.mlp.down_proj``."""
        return self.block_prefix(layer) + self.LINEARS[role]

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
        out = list(self.embeddings) if "embed" in kinds else []
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


@dataclass
class LlamaAdapter(Adapter):
    """Llama / Mistral / Qwen2 decoders (one module layout in transformers; Qwen2 adds q/k/v biases), GQA and tied
    embeddings."""

    MODEL_TYPES = ("llama", "mistral", "qwen2")
    FAMILY = "llama"
    LINEARS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
               "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
    NORMS = ("input_layernorm", "post_attention_layernorm")
    ATTN_IN, MLP_IN = ("q", "k", "v"), ("gate", "up")
    SEQUENTIAL = (("k", "v", "q"), ("o",), ("up", "gate"), ("down",))  # QuaRot gptq_fwrd ``sequential``

    @property
    def embed(self) -> nn.Embedding:
        return self.model.model.embed_tokens

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.model.layers

    @property
    def final_norm(self) -> nn.Module:
        return self.model.model.norm

    def block_prefix(self, layer: int) -> str:
        return f"model.layers.{layer}."

    def replay_parts(self):
        # LlamaAttention.forward ends ``return self.o_proj(attn_output), attn_weights``; LlamaMLP.forward is
        # ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``
        return [(self.ATTENTION, frozenset(self.ATTN_IN), "o", lambda o, x: (o(x), None)),
                (self.MLP, frozenset(self.MLP_IN), "down", lambda d, x: d(x))]


@dataclass
class OptAdapter(Adapter):
    """OPT (``transformers`` ``OPTForCausalLM``), pre-LN: 125m, 1.3b, 2.7b, 6.7b, 13b, 30b, 66b, 175b.

    Refused: OPT-350m's layout (post-LN blocks, ``do_layer_norm_before=False``, and the ``project_in``/``project_out``
    linears between its 512-wide embeddings and 1024-wide blocks), and models without LayerNorm affine parameters.
    """

    MODEL_TYPES = ("opt",)
    FAMILY = "opt"
    LINEARS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.out_proj",
               "up": "fc1", "down": "fc2"}
    NORMS = ("self_attn_layer_norm", "final_layer_norm")
    ATTN_IN, MLP_IN = ("q", "k", "v"), ("up",)
    SEQUENTIAL = (("k", "v", "q"), ("o",), ("up",), ("down",))  # AutoGPTQ's OPT inside_layer_modules
    NORM, MLP_ACT, MLP = "layer", "relu", None

    @classmethod
    def check_config(cls, config) -> None:
        why = []
        if not getattr(config, "do_layer_norm_before", True):
            why.append("post-LN blocks (do_layer_norm_before=False)")
        if getattr(config, "word_embed_proj_dim", config.hidden_size) != config.hidden_size:
            why.append(f"project_in/project_out (embeddings {config.word_embed_proj_dim} wide, blocks "
                       f"{config.hidden_size})")
        if not getattr(config, "layer_norm_elementwise_affine", True):
            why.append("LayerNorms without weight and bias")
        if getattr(config, "activation_function", "relu") != "relu":
            why.append(f"activation {config.activation_function!r} (OPT uses relu)")
        if why:
            raise ConfigError(f"unsupported OPT variant: {'; '.join(why)} (as in OPT-350m); supported: pre-LN OPT "
                              "with ReLU and LayerNorm affine parameters (OPT-125m, 1.3b, 2.7b, 6.7b, 13b, 30b, 66b)")

    @property
    def intermediate_size(self) -> int:
        return self.config.ffn_dim

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads  # no GQA in OPT

    @property
    def embed(self) -> nn.Embedding:
        return self.model.model.decoder.embed_tokens

    @property
    def embeddings(self) -> list[nn.Module]:
        return [self.embed, self.model.model.decoder.embed_positions]

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.model.decoder.layers

    @property
    def final_norm(self) -> nn.Module:
        return self.model.model.decoder.final_layer_norm

    def block_prefix(self, layer: int) -> str:
        return f"model.decoder.layers.{layer}."

    def replay_parts(self):
        # OPTAttention.forward ends ``attn_output = self.out_proj(attn_output); return attn_output, attn_weights``;
        # the MLP is inline in OPTDecoderLayer (nothing to replay)
        return [(self.ATTENTION, frozenset(self.ATTN_IN), "o", lambda o, x: (o(x), None))]


@dataclass
class BloomAdapter(Adapter):
    """BLOOM (``transformers`` ``BloomForCausalLM``): fused ``query_key_value`` (rows ``[head, q|k|v, head_dim]``),
    ALiBi, GELU MLP, a LayerNorm on the embeddings (``word_embeddings_layernorm``, kept FP and untouched).

    Its attention computes ALiBi scores inline (no ``AttentionInterface``), so schemes that quantize Q/K/V are
    refused on BLOOM (``ROUTES_ATTENTION``); its sub-layers add the residual themselves, so nothing is replayed.
    Refused: ``apply_residual_connection_post_layernorm=True`` and the tensor-parallel ``slow_but_exact`` MLP.
    """

    MODEL_TYPES = ("bloom",)
    FAMILY = "bloom"
    LINEARS = {"qkv": "self_attention.query_key_value", "o": "self_attention.dense", "up": "mlp.dense_h_to_4h",
               "down": "mlp.dense_4h_to_h"}
    NORMS = ("input_layernorm", "post_attention_layernorm")
    ATTN_IN, MLP_IN = ("qkv",), ("up",)
    SEQUENTIAL = (("qkv",), ("o",), ("up",), ("down",))  # GPTQ bloom.py / AutoGPTQ's BLOOM inside_layer_modules
    NORM, MLP_ACT, ROUTES_ATTENTION, ATTENTION = "layer", "gelu", False, "self_attention"

    @classmethod
    def check_config(cls, config) -> None:
        why = []
        if getattr(config, "apply_residual_connection_post_layernorm", False):
            why.append("apply_residual_connection_post_layernorm=True")
        if getattr(config, "pretraining_tp", 1) > 1 and getattr(config, "slow_but_exact", False):
            why.append("slow_but_exact tensor-parallel MLP")
        if why:
            raise ConfigError(f"unsupported BLOOM variant: {'; '.join(why)}; supported: the released BLOOM models "
                              "(bloom-560m ... bloom-176b: residual before the norm, plain MLP)")

    @property
    def intermediate_size(self) -> int:
        return 4 * self.hidden_size

    @property
    def num_heads(self) -> int:
        return self.config.n_head

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads  # no GQA in BLOOM

    @property
    def context(self) -> int | None:
        return None  # ALiBi: no position table; the training length (seq_length 2048) is not a limit

    @property
    def embed(self) -> nn.Embedding:
        return self.model.transformer.word_embeddings

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.transformer.h

    @property
    def final_norm(self) -> nn.Module:
        return self.model.transformer.ln_f

    def block_prefix(self, layer: int) -> str:
        return f"transformer.h.{layer}."


ADAPTERS = {t: cls for cls in (LlamaAdapter, OptAdapter, BloomAdapter) for t in cls.MODEL_TYPES}


def geometry(config) -> Adapter:
    """An adapter over a bare config: geometry only (no parts), for validating a request before the model loads."""
    return adapter_for(SimpleNamespace(config=config))


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter for ``model``'s architecture, or a clear error naming the supported ones."""
    config = getattr(model, "config", None)
    mtype = getattr(config, "model_type", None)
    if mtype not in ADAPTERS:
        raise ConfigError(
            f"unsupported architecture {mtype!r}; supported model types: {', '.join(sorted(ADAPTERS))}"
        )
    ADAPTERS[mtype].check_config(config)
    return ADAPTERS[mtype](model)
