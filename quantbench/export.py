"""A plan out as a compressed-tensors checkpoint, and a compressed-tensors checkpoint in as a plan (docs/export.md).

compressed-tensors is the format llm-compressor writes and transformers and vLLM read: per quantized linear the
integer codes packed into int32 (``weight_packed``, ``pack-quantized``) or kept as int8 (``int-quantized``, 8-bit
weights with quantized activations), ``weight_scale``, ``weight_zero_point`` (asymmetric grids) and
``weight_shape``, and in ``config.json`` a ``quantization_config`` whose ``config_groups`` name the modules and
the quantization args of their weights and input activations.

:func:`save` writes the plan's own codes and scales (``compressed_tensors``' ``pack_to_int32`` packs them; nothing
is quantized again), the folded FP tensors, the tokenizer, and the record's provenance (``config.json`` key
``quantbench`` and ``quantbench.json``, which also holds the sha256 of every file). What the format cannot carry is
refused before anything is written, naming the layer and the reason (:func:`refusals`): an online transform
(transformers' loader applies ``quantization_config`` but not ``transform_config``, so the checkpoint would load as
another model), Q/K/V quantization (the format's ``kv_cache_scheme`` is static, calibrated scales; quantbench
quantizes K/V per token at run time), activations on a grid other than ``sym_ct`` (the format's dynamic
activations compute ``absmax / ((2^b - 1) / 2)``) or with a clip ratio, weights wider than 8 bits.

:func:`checkpoint_plan` reads such a checkpoint (ours or another tool's) back into a plan, so ``--method load``
evaluates it through every task and backend: codes and scales as stored, dynamic symmetric activations on
``sym_ct``.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from quantbench.cache import sha256_file
from quantbench.errors import ConfigError, StorageError, UnavailableError
from quantbench.plan import AttentionPlan, LinearPlan, QuantizedModel
from quantbench.quant import QTensor, QuantScheme, QuantSpec, canonical_name

log = logging.getLogger(__name__)

FORMATS = ("compressed-tensors",)
PROVENANCE = "quantbench.json"
ACT_GRID = "sym_ct"  # the activation grid a compressed-tensors checkpoint's dynamic quantization computes
# what each refusal says (docs/export.md lists them per method)
WHY_ONLINE = ("transformers loads a compressed-tensors checkpoint's quantization_config but not its "
              "transform_config, so the checkpoint would load without this transform: a different model")
WHY_ATTENTION = ("the format's kv_cache_scheme holds static K/V scales calibrated offline; quantbench quantizes "
                 "Q/K/V per token at run time, after RoPE")


def _ct():
    try:
        import compressed_tensors  # noqa: F401 - the optional dependency, imported only here
    except ImportError:
        raise UnavailableError("export and --method load need the PyPI package compressed-tensors: "
                               "`pip install compressed-tensors==0.19.0` (or `pip install quantbench[export]`)") \
            from None
    return compressed_tensors


# ------------------------------------------------------------------------------------------------ args

def weight_args(spec: QuantSpec) -> dict:
    """compressed-tensors ``QuantizationArgs`` of a weight on ``spec`` (its scales are stored, so any grid goes)."""
    args = {"num_bits": spec.bits, "type": "int", "symmetric": spec.signed, "dynamic": False,
            "strategy": {"channel": "channel", "group": "group", "tensor": "tensor"}[spec.granularity]}
    if spec.granularity == "group":
        args["group_size"] = spec.group_size
    return args


def act_args(spec: QuantSpec) -> dict:
    """``QuantizationArgs`` of dynamic input activations on ``spec`` (symmetric; per token, group or tensor)."""
    args = {"num_bits": spec.bits, "type": "int", "symmetric": True, "dynamic": True,
            "strategy": {"token": "token", "group": "group", "tensor": "tensor"}[spec.granularity]}
    if spec.granularity == "group":
        args["group_size"] = spec.group_size
    return args


def scheme_refusals(scheme: dict, allow_activation_grid: bool = False) -> list[str]:
    """What the scheme alone (a record's ``scheme_spec``) rules out, known before any model loads."""
    out = []
    w, a = scheme.get("w"), scheme.get("a")
    if w and w["bits"] > 8:
        out.append(f"{w['bits']}-bit weights; the format packs 1..8 bits")
    if a and a["grid"] != ACT_GRID and not allow_activation_grid:
        out.append(f"activations measured on grid {a['grid']!r}; a compressed-tensors checkpoint quantizes them at "
                   f"run time on {ACT_GRID!r} (absmax / ((2^b - 1) / 2)): re-run with --agrid {ACT_GRID} to measure "
                   f"the model the checkpoint is, or export with --allow-activation-grid (the provenance then says so)")
    if a and a["clip_ratio"] != 1.0:
        out.append(f"activations clipped to {a['clip_ratio']} of their range; the format's dynamic activations use "
                   f"the full range")
    kv = [t.upper() for t in "qkv" if scheme.get(t)]
    if kv:
        out.append(f"{', '.join(kv)} quantization: {WHY_ATTENTION}")
    return out


def refusals(plan: QuantizedModel, allow_activation_grid: bool = False) -> list[str]:
    """Why ``plan`` cannot be written as a compressed-tensors checkpoint that loads as the model it is (empty: it
    can). One line per kind of problem, naming the first layer it occurs in."""
    out: dict[str, str] = {}

    def once(kind: str, text: str) -> None:
        out.setdefault(kind, text)

    for name, lp in plan.linears.items():
        for t in lp.pre:
            once(f"pre:{type(t).__name__}", f"online transform {type(t).__name__} on the input of {name} "
                                            f"(and others): {WHY_ONLINE}")
        w, a = lp.weight, lp.act
        if w is None and a is not None:
            once("aonly", f"{name} quantizes its activations but keeps an FP weight: export a scheme that "
                          f"quantizes weights too")
        if w is not None:
            if w.spec.bits > 8:
                once("wbits", f"{name}: {w.spec.bits}-bit weights; the format packs 1..8 bits")
            if w.spec.granularity not in ("channel", "group", "tensor"):
                once("wgran", f"{name}: {w.spec.granularity} weights; the format has channel, group, tensor")
            if not w.spec.signed and w.spec.granularity == "tensor":
                once("wtensor", f"{name}: an asymmetric per-tensor weight; the format packs zero points only per "
                                f"channel or group")
            if not w.spec.signed:
                z = w.zero - 2 ** (w.spec.bits - 1)
                lo, hi = -(2 ** (w.spec.bits - 1)), 2 ** (w.spec.bits - 1) - 1
                if bool((z < lo).any() or (z > hi).any()):
                    once("zrange", f"{name}: zero points outside the signed {w.spec.bits}-bit range [{lo}, {hi}] "
                                   f"(grid {w.spec.grid}: a row whose values do not straddle 0); the format stores "
                                   f"zero points as {w.spec.bits}-bit integers")
        if a is not None:
            if a.granularity not in ("token", "group", "tensor"):
                once("agran", f"{name}: {a.granularity} activations; the format has token, group, tensor")
            if a.bits > 8:
                once("abits", f"{name}: {a.bits}-bit activations; the format's integer activations are 1..8 bits")
            if a.clip_ratio != 1.0:
                once("aclip", f"{name}: activations clipped to {a.clip_ratio} of their range; the format's dynamic "
                              f"activations use the full range")
            if a.grid != ACT_GRID and not allow_activation_grid:
                once("agrid", f"{name}: activations measured on grid {a.grid!r}; a compressed-tensors checkpoint "
                              f"quantizes them at run time on {ACT_GRID!r} (absmax / ((2^b - 1) / 2)): re-run with "
                              f"--agrid {ACT_GRID} to measure the model the checkpoint is, or export with "
                              f"--allow-activation-grid (the provenance then says so)")
    for i, ap in plan.attention.items():
        if ap.active:
            what = ", ".join(t.upper() for t in "qkv" if getattr(ap, t) is not None)
            what = (what + (" and " if what else "")) + "a Q/K transform" if ap.qk_pre is not None else what
            once("attention", f"{what} quantization in layer {i} (and others): {WHY_ATTENTION}")
    return list(out.values())


# ------------------------------------------------------------------------------------------------ export

def _signed_codes(w: QTensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Codes and zero point as the format stores them: signed ``[-2^(b-1), 2^(b-1))`` (unsigned grids shifted by
    ``2^(b-1)``, zero points with them), int8, zero point ``[rows, groups]``."""
    shift = 0 if w.spec.signed else 2 ** (w.spec.bits - 1)
    codes = (w.codes.to(torch.int16) - shift).to(torch.int8)
    if w.zero is None:
        return codes, None
    return codes, (w.zero.reshape(w.codes.shape[0], -1) - shift).to(torch.int8)


def _scale(w: QTensor) -> torch.Tensor:
    return w.scale.reshape(w.codes.shape[0], -1) if w.spec.granularity != "tensor" else w.scale.reshape(1)


def linear_tensors(w: QTensor, packed: bool) -> dict[str, torch.Tensor]:
    """The tensors of one quantized linear in the format (``weight_packed`` or int8 ``weight``, ``weight_scale``,
    ``weight_zero_point``, ``weight_shape``)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    codes, zero = _signed_codes(w)
    out = {"weight_scale": _scale(w).float().contiguous()}
    if packed:
        out["weight_packed"] = pack_to_int32(codes, w.spec.bits).contiguous()
        out["weight_shape"] = torch.tensor(list(codes.shape))
        if zero is not None:
            out["weight_zero_point"] = pack_to_int32(zero, w.spec.bits, packed_dim=0).contiguous()
    else:
        out["weight"] = codes.contiguous()
        if zero is not None:
            out["weight_zero_point"] = zero.contiguous()
    return out


def quantization_config(plan: QuantizedModel) -> tuple[dict, dict[str, bool]]:
    """(``quantization_config`` of the checkpoint, ``{linear: packed?}``): one config group per distinct pair of
    weight and activation args, its targets the modules by name."""
    from compressed_tensors.quantization import QuantizationConfig

    groups: dict[str, dict] = {}
    packed: dict[str, bool] = {}
    for name, lp in plan.linears.items():
        if lp.weight is None:
            continue
        wa, aa = weight_args(lp.weight.spec), act_args(lp.act) if lp.act is not None else None
        packed[name] = not (lp.weight.spec.bits == 8 and aa is not None)  # W8A8: int-quantized, as vLLM expects
        key = json.dumps([wa, aa, packed[name]], sort_keys=True)
        g = groups.setdefault(key, {"targets": [], "weights": wa, "input_activations": aa,
                                    "format": "pack-quantized" if packed[name] else "int-quantized"})
        g["targets"].append(name)
    formats = {g["format"] for g in groups.values()}
    cfg = QuantizationConfig(
        config_groups={f"group_{i}": {k: v for k, v in g.items() if k != "format"} | {"format": g["format"]}
                       for i, g in enumerate(groups.values())},
        quant_method="compressed-tensors", format=formats.pop() if len(formats) == 1 else "mixed-precision",
        quantization_status="compressed", ignore=[])
    data = cfg.model_dump(exclude=["quant_method"])
    return data, packed


def provenance(info: dict, plan: QuantizedModel, versions: dict) -> dict:
    """What the exported config carries to trace a served model back to its record (``info``: an
    :class:`quantbench.api.QuantizedModel`'s provenance; ``versions``: :func:`quantbench.results.versions`)."""
    return {"run_id": info.get("config_hash"), "record": info.get("record"), "method": info.get("method"),
            "scheme": info.get("scheme"), "method_options": info.get("method_options"),
            "calibration": info.get("calibration"), "model": info.get("model"), "method_info": info.get("method_info"),
            "versions": versions, "activation_grid": {"measured": sorted({lp.act.grid for lp in plan.linears.values() if lp.act}),
                                "checkpoint": ACT_GRID}}


def save(plan: QuantizedModel, tokenizer, prov: dict, path, format: str = "compressed-tensors",
         allow_activation_grid: bool = False, overwrite: bool = False) -> Path:
    """Write ``plan`` (with ``tokenizer`` and the provenance ``prov``, :func:`provenance`) to the folder ``path`` in
    ``format``; returns it.

    Everything is checked before anything is written; the folder appears whole or not at all (written beside it,
    then renamed), and an existing non-empty folder is replaced only with ``overwrite``."""
    from safetensors.torch import save_file

    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}; formats: {', '.join(FORMATS)}")
    _ct()
    why = refusals(plan, allow_activation_grid)
    if why:
        raise ConfigError(f"cannot export {prov.get('method')} {plan.scheme.name} as {format}: " + "; ".join(why))
    out = Path(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConfigError(f"{out} exists and is not empty: pick a new folder or pass overwrite (--overwrite)")
    qcfg, packed = quantization_config(plan)
    model = plan.model
    tensors: dict[str, torch.Tensor] = {}
    dropped = tuple(f"{n}." for n in packed)
    for k, t in model.state_dict().items():
        if not k.startswith(dropped):
            tensors[k] = t
    for name, is_packed in packed.items():
        lin = model.get_submodule(name)
        for k, t in linear_tensors(plan.linears[name].weight, is_packed).items():
            tensors[f"{name}.{k}"] = t
        if getattr(lin, "bias", None) is not None:
            tensors[f"{name}.bias"] = lin.bias.detach()
    config = model.config.to_dict()
    tied = plan.adapter.tied_embeddings
    if tied:
        tensors.pop("lm_head.weight", None)
    config["tie_word_embeddings"] = tied
    config.pop("quantization_config", None)
    config["quantization_config"] = {"quant_method": "compressed-tensors", **qcfg}
    config["quantbench"] = prov
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp / "model.safetensors",
                  metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        files = {f.name: sha256_file(f) for f in sorted(tmp.iterdir()) if f.is_file()}
        (tmp / PROVENANCE).write_text(json.dumps({"format": format, **config["quantbench"], "files": files},
                                                 indent=1, default=str))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise StorageError(f"could not write the export to {out}: {e.strerror or e}") from None
    log.info("exported %s %s to %s (%d quantized linears, %s)", prov.get("method"), plan.scheme.name, out,
             len(packed), qcfg["format"])
    return out


# ------------------------------------------------------------------------------------------------ import

def is_checkpoint(path) -> bool:
    """Whether the folder holds a compressed-tensors checkpoint (its config.json says so)."""
    try:
        q = json.loads((Path(path) / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError, AttributeError):
        return False
    return q.get("quant_method") == "compressed-tensors"


def read_config(path) -> dict:
    """The ``quantization_config`` of a compressed-tensors checkpoint folder, or a clear error."""
    f = Path(path) / "config.json"
    try:
        cfg = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} is not a model folder with a readable config.json ({e})") from None
    q = cfg.get("quantization_config") or {}
    if q.get("quant_method") != "compressed-tensors":
        raise ConfigError(f"{path} is not a compressed-tensors checkpoint (config.json has no quantization_config "
                          f"with quant_method 'compressed-tensors'): --method load evaluates such checkpoints; "
                          f"quantize this model with a method instead")
    return q


def _spec_of(args: dict, what: str, where: str, weight: bool) -> QuantSpec:
    """Our spec for a compressed-tensors ``QuantizationArgs`` dict, or a refusal naming what cannot be read."""
    if args.get("type", "int") != "int":
        raise ConfigError(f"{where}: {args.get('type')} {what} quantization is not supported (integer grids only)")
    strategy = args.get("strategy") or ("group" if args.get("group_size") else "tensor")
    gran = {"channel": "channel", "group": "group", "tensor": "tensor", "token": "token"}.get(strategy)
    if gran is None or (weight and gran == "token") or (not weight and gran == "channel"):
        raise ConfigError(f"{where}: {what} strategy {strategy!r} is not supported")
    if not weight:
        if not args.get("dynamic") or args.get("dynamic") == "local":
            raise ConfigError(f"{where}: static (calibrated) activation scales are not supported; quantbench "
                              f"quantizes activations at run time (dynamic)")
        if not args.get("symmetric", True):
            raise ConfigError(f"{where}: asymmetric dynamic activations are not supported (symmetric only)")
    if weight and args.get("actorder") not in (None, "weight", "static"):
        raise ConfigError(f"{where}: weight activation ordering {args.get('actorder')!r} (g_idx) is not supported")
    grid = ("sym" if args.get("symmetric", True) else "asym") if weight else ACT_GRID
    return QuantSpec(int(args.get("num_bits", 8)), grid, gran, int(args.get("group_size") or 0)
                     if gran == "group" else 0)


def checkpoint_scheme(path) -> str:
    """The scheme name of a compressed-tensors checkpoint (``w4a16g128``, ``w8a8``): the widest bits of its
    groups' weights and activations."""
    q = read_config(path)
    w = a = 16
    g = 0
    for name, grp in (q.get("config_groups") or {}).items():
        if grp.get("weights"):
            w = min(w, int(grp["weights"].get("num_bits", 8)))
            g = g or int(grp["weights"].get("group_size") or 0)
        if grp.get("input_activations"):
            a = min(a, int(grp["input_activations"].get("num_bits", 8)))
    return canonical_name({"w": w, "a": a, **({"g": g} if g else {})})


def checkpoint_plan(lm, path) -> QuantizedModel:
    """A plan of the compressed-tensors checkpoint at ``path`` over ``lm`` (the same folder loaded dense): every
    quantized linear's codes, scales and zero points as stored, its activation spec from the config."""
    _ct()
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.utils.match import match_named_modules
    from safetensors import safe_open

    q = read_config(path)
    if q.get("transform_config"):
        raise ConfigError(f"{path}: the checkpoint has online transforms (transform_config: "
                          f"{', '.join(q['transform_config'].get('config_groups', {}))}); --method load reads "
                          f"quantization only")
    if q.get("kv_cache_scheme"):
        raise ConfigError(f"{path}: the checkpoint quantizes the KV cache with static scales (kv_cache_scheme); "
                          f"--method load does not read it")
    files = sorted(Path(path).glob("*.safetensors"))
    handles = [safe_open(f, "pt") for f in files]
    where = {k: h for h in handles for k in h.keys()}

    def get(key: str) -> torch.Tensor:
        if key not in where:
            raise ConfigError(f"{path}: tensor {key} is missing from the checkpoint")
        return where[key].get_tensor(key)

    ad = lm.adapter
    names = [n for n, *_ in ad.named_linears()]
    plan = QuantizedModel(lm.model, ad, QuantScheme(name=checkpoint_scheme(path)),
                          info={"weights": "read from a compressed-tensors checkpoint (codes and scales as stored)",
                                "checkpoint": str(Path(path).resolve()), "kept_fp": ["embed_tokens", "norms",
                                                                                     "lm_head"]})
    modules = dict(lm.model.named_modules())
    for gname, grp in (q.get("config_groups") or {}).items():
        targets, fmt = grp.get("targets") or [], grp.get("format") or q.get("format")
        wargs, aargs = grp.get("weights"), grp.get("input_activations")
        if grp.get("output_activations"):
            raise ConfigError(f"{path}: config group {gname} quantizes output activations; not supported")
        if fmt not in ("pack-quantized", "int-quantized", "naive-quantized"):
            raise ConfigError(f"{path}: config group {gname} has format {fmt!r}; --method load reads "
                              f"pack-quantized and int-quantized")
        matched = [n for n, _ in match_named_modules(lm.model, targets, q.get("ignore") or [])]
        for name in matched:
            if name not in names:
                raise ConfigError(f"{path}: {name} is quantized in the checkpoint but is not a decoder linear "
                                  f"quantbench plans (lm_head and embeddings stay FP)")
            if wargs is None:
                raise ConfigError(f"{path}: {name} quantizes activations only; not supported")
            ws = _spec_of(wargs, "weight", name, True)
            shape = tuple(modules[name].weight.shape)
            if fmt == "pack-quantized":
                codes = unpack_from_int32(get(f"{name}.weight_packed"), ws.bits, torch.Size(shape))
            else:
                codes = get(f"{name}.weight").to(torch.int8)
            scale = get(f"{name}.weight_scale").float()
            groups = 1 if ws.granularity in ("channel", "tensor") else shape[1] // ws.group_size
            zero = None
            shift = 0 if ws.signed else 2 ** (ws.bits - 1)
            if not ws.signed:
                zp = get(f"{name}.weight_zero_point")
                if fmt == "pack-quantized":
                    zp = unpack_from_int32(zp, ws.bits, torch.Size((shape[0], groups)), packed_dim=0)
                zero = (zp.float() + shift).reshape(shape[0], groups, 1) if groups > 1 else \
                    (zp.float() + shift).reshape(shape[0], 1)
            codes = (codes.to(torch.int16) + shift).to(ws.code_dtype)
            scale = scale.reshape(shape[0], groups, 1) if groups > 1 else scale.reshape(-1, 1)
            if ws.granularity == "tensor":
                scale = scale.reshape(1, 1)
                zero = None if zero is None else zero.reshape(1, 1)
            act = _spec_of(aargs, "activation", name, False) if aargs else None
            plan.linears[name] = LinearPlan(QTensor(codes, scale, zero, ws), act=act)
    if not plan.linears:
        raise ConfigError(f"{path}: no decoder linear is quantized in this checkpoint")
    for i in range(len(ad.blocks)):
        plan.attention[i] = AttentionPlan()
    return plan


def verify(path) -> dict | None:
    """Check an exported folder against its ``quantbench.json`` (the sha256 of every file); its provenance, or None
    for a checkpoint another tool wrote. A file that is missing or changed is an error naming it."""
    f = Path(path) / PROVENANCE
    if not f.is_file():
        return None
    try:
        meta = json.loads(f.read_text())
        files = meta["files"]
    except (OSError, ValueError, KeyError) as e:
        raise UnavailableError(f"{f} is damaged ({e}); export the model again") from None
    if "format" not in meta:  # not an export (e.g. the converted offline model's manifest)
        return None
    for name, want in files.items():
        p = Path(path) / name
        if not p.is_file() or sha256_file(p) != want:
            raise UnavailableError(f"exported file {p} is missing or does not match its sha256 in {PROVENANCE}: "
                                   f"the checkpoint is damaged; export it again")
    return meta
