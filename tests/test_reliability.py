"""The reliability probes: bad input fails before any work with one line, nothing damaged is ever reused, NaN/inf is
named where it appears, a full disk loses nothing, a killed run resumes bit-identically.

Tiny models, in-process where possible; the full-disk cases mount a small tmpfs (root only, skipped otherwise)."""
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from quantbench import cache, models, options
from quantbench.cases import build_cases
from quantbench.errors import NumericalError, QuantbenchError, StorageError, UnavailableError
from quantbench.layerwise import BlockCheckpoint
from quantbench.pipeline import resolve
from quantbench.quant import parse_scheme
from quantbench.results import ResultStore, without_timings
from quantbench.runner import RunConfig, run
from quantbench.tasks import make_task

ROOT = Path(__file__).resolve().parent.parent
CAL = {"corpus": "austen", "nsamples": 2, "seqlen": 64}


DEFAULTS = options.defaults()  # the bench's and the CLI's option table (quantbench/options.py)


def _cases(**over):
    return build_cases(Namespace(**{**DEFAULTS, "model": "tiny-llama", "seqlen": 64, **over}))


# ---------------------------------------------------------------- 3, 4, 6, 7: every option checked up front


@pytest.mark.parametrize("over,msg", [
    ({"method": "gptq", "nsamples": 0}, "--nsamples 0: calibration needs at least one window"),
    ({"method": "gptq", "nsamples": -3}, "--nsamples -3"),
    ({"method": "gptq", "calib_seqlen": 0}, "--calib-seqlen 0"),
    ({"method": "gptq", "calib_seqlen": 4096}, "longer than tiny-llama's context of 1024 tokens"),
    ({"method": "gptq"}, "calibration windows of 2048 tokens"),  # GPTQ's recipe (2048) on a 1024-token model
    ({"method": "fp16", "seqlen": 4096}, "--seqlen 4096 is longer than tiny-llama's context of 1024"),
    ({"method": "fp16", "device": "foo"}, "unknown device 'foo'"),
    ({"method": "fp16", "device": "mps"}, "device 'mps' is not supported"),
    ({"method": "rtn", "backend": "foo"}, "unknown backend 'foo'"),
    ({"method": "rtn", "group": 96}, "weight group size 96 does not divide the input width of q_proj (128)"),
    ({"method": "rtn", "scheme": "w4a4g48"}, "group size 48 does not divide"),
    ({"method": "gptq", "calib": "foo", "calib_seqlen": 64}, "unknown calibration corpus 'foo'"),
    ({"method": "gptq", "calib_seqlen": 64, "method_opt": ["percdamp=-1"]}, "percdamp=-1.0 of 'gptq' must be in"),
    ({"method": "gptq", "calib_seqlen": 64, "method_opt": ["blocksize=0"]}, "blocksize=0 of 'gptq' must be >= 1"),
    ({"method": "duquant", "calib_seqlen": 64, "method_opt": ["alpha=1.5"]}, "alpha=1.5 of 'duquant'"),
    ({"method": "smoothquant", "calib_seqlen": 64, "method_opt": ["alpha=2"]}, "or -1.0, its default"),
    ({"method": "fp16", "c4_variant": "foo"}, "unknown --c4-variant 'foo'"),  # even without ppl-c4
    ({"method": "fp16", "ppl_windows": 0}, "--ppl-windows 0: must be >= 1 (leave it out for all windows)"),
    ({"method": "fp16", "limit": -1}, "--limit -1"),
    ({"method": "fp16", "batch_size": 0}, "--batch-size 0"),
    ({"method": "fp16", "passkey_lengths": "512,0"}, "--passkey-lengths 0"),
])
def test_bad_option_is_refused_before_any_work(over, msg, tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path / "cache"))
    with pytest.raises(QuantbenchError) as e:
        _cases(results_dir=str(tmp_path / "res"), **over)
    assert msg in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "res").exists()  # nothing written


def test_cuda_without_a_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UnavailableError, match="no CUDA GPU is visible here"):
        _cases(method="fp16", device="cuda")


def test_valid_options_still_build_and_the_api_checks_too():
    assert [c.id for c in _cases(method="fp16,gptq", calib_seqlen=64, ppl_windows=2)] == ["fp16-w16a16", "gptq-w4a16"]
    with pytest.raises(QuantbenchError, match="longer than tiny-llama's context"):  # runner.run checks for API users
        run(RunConfig("fp16", "tiny-llama"), [make_task("ppl-austen", seqlen=2048)], ResultStore("/nonexistent"))


def test_usage_error_is_one_line_exit_4_and_writes_nothing(tmp_path):
    env = {**os.environ, "QUANTBENCH_CACHE": str(tmp_path / "cache")}
    p = subprocess.run([sys.executable, "-m", "pytest", "bench/", "-q", "-p", "no:cacheprovider", "--model",
                        "tiny-llama", "--method", "gptq", "--nsamples", "0", "--results-dir", str(tmp_path / "res")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    out = p.stdout + p.stderr
    assert p.returncode == 4 and "Traceback" not in out and "During handling" not in out
    assert [line for line in out.splitlines() if line.strip()] == [
        "ERROR: --nsamples 0: calibration needs at least one window"]
    assert not (tmp_path / "cache").exists() and not (tmp_path / "res").exists()


# ---------------------------------------------------------------- 1: a damaged block checkpoint is never reused


def _flip(path: Path, n: int, at: float = 0.5) -> None:
    """XOR ``n`` bytes in the middle of ``path`` (size and modification time kept)."""
    st = path.stat()
    b = bytearray(path.read_bytes())
    i = int(len(b) * at)
    b[i:i + n] = bytes(x ^ 0xFF for x in b[i:i + n])
    path.write_bytes(bytes(b))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _gptq_run(res: Path):
    cfg = RunConfig("gptq", "tiny-llama", "w4a16", calibration=CAL)
    return run(cfg, [make_task("ppl-austen", seqlen=64, max_windows=2)], ResultStore(res)).records[0]


def test_byte_flipped_checkpoint_is_recalibrated_to_the_clean_value(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("QUANTBENCH_PLAN_CACHE", "1")
    with monkeypatch.context() as m:
        m.setenv("QUANTBENCH_NO_CACHE", "1")
        clean = _gptq_run(tmp_path / "clean")
    real = BlockCheckpoint.save

    def killed_after_block_0(self, i, state):
        if i == 1:
            raise KeyboardInterrupt("killed")
        real(self, i, state)

    with monkeypatch.context() as m:
        m.setattr(BlockCheckpoint, "save", killed_after_block_0)
        with pytest.raises(KeyboardInterrupt):
            _gptq_run(tmp_path / "r1")
    (ckpt,) = (tmp_path / "cache" / "checkpoints").glob("gptq-*/0.pt")
    _flip(ckpt, 256)
    torch.load(ckpt, weights_only=True)  # torch alone does not notice: the checksum must
    with caplog.at_level(logging.WARNING, logger="quantbench"):
        again = _gptq_run(tmp_path / "r2")
    assert "checkpoint of block 0" in caplog.text and "is damaged" in caplog.text
    assert (again["value"], again["config_hash"]) == (clean["value"], clean["config_hash"])
    assert again["method_info"].get("gptq_resumed_blocks") is None  # block 0 calibrated again, not restored
    cached = _gptq_run(tmp_path / "r3")  # the plan cached after the rebuild is the clean one
    assert cached["plan_source"].startswith("cache:") and cached["value"] == clean["value"]


@pytest.mark.parametrize("damage", ["flip", "truncate", "sidecar"])
def test_damaged_cache_entry_is_removed_and_rebuilt(damage, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path))
    built = []
    build = lambda: built.append(1) or {"x": torch.arange(4096.0)}  # noqa: E731
    cache.load_or_build("act-stats", "k", build, "stats")
    entry = tmp_path / "act-stats" / "k.pt"
    if damage == "flip":
        _flip(entry, 64)
    elif damage == "truncate":
        entry.write_bytes(entry.read_bytes()[:1000])
    else:
        entry.with_suffix(".sha256").write_text("0" * 64)
    with caplog.at_level(logging.WARNING, logger="quantbench"):
        assert cache.load("act-stats", "k", "stats") is None
    assert "is damaged" in caplog.text and not entry.exists() and not entry.with_suffix(".sha256").exists()
    assert torch.equal(cache.load_or_build("act-stats", "k", build, "stats")["x"], torch.arange(4096.0))
    assert len(built) == 2


# ---------------------------------------------------------------- 2: converted and local models are checked


def _saved_tiny(folder: Path, nan: bool = False) -> Path:
    m = models.tiny_model("tiny-llama")
    if nan:
        with torch.no_grad():
            m.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
    m.save_pretrained(folder)
    models.tiny_tokenizer().save_pretrained(folder)
    return folder


def test_manifest_catches_a_flipped_or_truncated_file(tmp_path, caplog):
    d = _saved_tiny(tmp_path / "m")
    files = models.write_manifest(d, {"source": "test"})
    assert models.verify_manifest(d) == files and "model.safetensors" in files
    st = d / "model.safetensors"
    good = st.read_bytes()
    _flip(st, 4096)
    with caplog.at_level(logging.WARNING, logger="quantbench"):
        assert models.verify_manifest(d) is None
    assert "model.safetensors does not match its sha256" in caplog.text
    st.write_bytes(good[: len(good) // 2])
    assert models.verify_manifest(d) is None
    st.write_bytes(good)
    (d / "tokenizer.json").unlink()
    assert models.verify_manifest(d) is None


@pytest.mark.slow
def test_damaged_converted_smollm2_is_rebuilt_with_the_clean_revision(tmp_path, monkeypatch, caplog):
    """The 4 KB overwrite of the issue in the cached model.safetensors: logged, rebuilt from the GGUF (~40 s)."""
    clean = models.load("smollm2-135m")  # the session's converted copy (converted once if absent)
    src = next(cache.cache_dir().glob("smollm2-135m-*/quantbench.json")).parent
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path))
    shutil.copytree(src, tmp_path / src.name)
    st = tmp_path / src.name / "model.safetensors"
    good = models.sha256_file(st)
    _flip(st, 4096)
    with caplog.at_level(logging.WARNING, logger="quantbench"):
        again = models.load("smollm2-135m")
    assert "is damaged" in caplog.text and "model.safetensors does not match its sha256" in caplog.text
    assert models.sha256_file(st) == good
    assert again.info["revision"] == clean.info["revision"] and again.info["revision"].startswith("sha256:")
    assert again.info["source_revision"].startswith("gguf-sha256:")
    w = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(again.model.get_parameter(w), clean.model.get_parameter(w))


def test_local_model_directory_damage_is_an_error_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path / "cache"))
    d = _saved_tiny(tmp_path / "m")
    first = models.load(str(d)).info["revision"]
    assert models.load(str(d)).info["revision"] == first
    good = (d / "model.safetensors").read_bytes()
    _flip(d / "model.safetensors", 4096)  # same size and time stamp, other bytes: damage
    with pytest.raises(UnavailableError, match=r"model file .*model\.safetensors is damaged: its bytes changed"):
        models.load(str(d))
    (d / "model.safetensors").write_bytes(good[:-5000])  # truncated (new size): named, no raw SafetensorError
    with pytest.raises(UnavailableError, match=r"model file .*model\.safetensors is damaged or truncated"):
        models.load(str(d))
    (d / "model.safetensors").write_bytes(good)  # restored (a new time stamp): loads, with the first revision
    assert models.load(str(d)).info["revision"] == first
    _flip(d / "model.safetensors", 4096)
    with pytest.raises(UnavailableError, match="is damaged"):
        models.load(str(d))
    assert cache.clean("model-manifests")[0] == 1  # the change was intended: forget what was seen
    assert models.load(str(d)).info["revision"] != first


# ---------------------------------------------------------------- 6: NaN/inf named where it appears


def test_nan_weights_are_an_error_naming_the_tensor(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path / "cache"))
    d = _saved_tiny(tmp_path / "m", nan=True)
    with pytest.raises(NumericalError, match=r"model\.layers\.1\.mlp\.down_proj\.weight"):
        models.load(str(d))


def test_inf_activations_during_calibration_name_the_block():
    lm = models.load("tiny-llama")

    def overflow(_mod, _args, out):  # block 0's output overflows (its linears and their inputs stay finite)
        return (out[0] * float("inf"), *out[1:]) if isinstance(out, tuple) else out * float("inf")

    lm.model.model.layers[0].register_forward_hook(overflow)
    m = resolve("gptq")()
    from quantbench.data import Calibration

    with pytest.raises(NumericalError, match=r"gptq: the output of block 0 \(model\.layers\.0\) has NaN/inf"):
        m.quantize(lm, parse_scheme("w4a16", m.specs()), Calibration(lm.tokenizer, **CAL))


def test_nan_logits_during_evaluation_name_the_task_and_window():
    lm = models.load("tiny-llama")
    task = make_task("ppl-austen", seqlen=64, max_windows=3)
    task.prepare(lm.tokenizer)
    token = next(int(t) for t in task.windows[1] if not (task.windows[0] == t).any())  # in window 1, not in 0
    with torch.no_grad():
        lm.model.model.embed_tokens.weight[token] = float("nan")  # NaN from that token on, in its windows only
    bad = [i for i in range(3) if bool((task.windows[i] == token).any())]
    assert bad[0] == 1
    with pytest.raises(NumericalError, match=rf"ppl-austen: .* on {len(bad)} of 3 windows \(first: window 1\)"):
        task.evaluate(lm.model, lm.tokenizer)


# ---------------------------------------------------------------- 5: a full disk loses nothing


@contextlib.contextmanager
def _full_tmpfs(where: Path, size_kb: int = 256):
    """A tmpfs of ``size_kb`` filled to the last byte."""
    where.mkdir(parents=True)
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(where)], capture_output=True,
                       text=True)
    if p.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({p.stderr.strip() or 'not root'}): the full-disk probe needs one")
    try:
        with contextlib.suppress(OSError), open(where / "filler", "wb") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)


def test_full_results_disk_is_one_clear_error_and_keeps_the_old_record(tmp_path):
    with _full_tmpfs(tmp_path / "disk") as disk:
        (disk / "filler").write_bytes(b"")  # room for one small record first
        rec = {k: 0 for k in ("method", "model", "scheme", "backend", "task", "metric", "value", "protocol", "seed",
                              "calibration", "versions", "device", "wall_s", "peak_mem_mb")}
        rec.update(config_hash="c0ffee", metric="ppl", value=1.5)
        store = ResultStore(disk / "res")
        path = store.write(rec)
        with contextlib.suppress(OSError), open(disk / "filler", "wb") as f:
            while True:
                f.write(b"\0" * 512)
                f.flush()
        with pytest.raises(StorageError, match=r"cannot write result record .*c0ffee-ppl\.json \(No space left"):
            store.write({**rec, "value": 2.5, "versions": {"pad": "x" * 100_000}})
        assert json.loads(path.read_text())["value"] == 1.5  # the earlier record is intact
        assert sorted(p.name for p in (disk / "res").iterdir()) == ["c0ffee-ppl.json"]  # no tmp file left


def test_full_cache_disk_is_a_warning_and_the_run_goes_on(tmp_path, monkeypatch, caplog):
    clean = _gptq_run(tmp_path / "clean")  # (this session's cache: the tiny tokenizer is already there)
    with _full_tmpfs(tmp_path / "disk") as disk:
        monkeypatch.setenv("QUANTBENCH_CACHE", str(disk))
        monkeypatch.setenv("QUANTBENCH_PLAN_CACHE", "1")
        with caplog.at_level(logging.WARNING, logger="quantbench"):
            rec = _gptq_run(tmp_path / "res")
        left = sorted(str(p.relative_to(disk)) for p in disk.rglob("*") if p.is_file() and p.name != "filler")
    assert "going on without" in caplog.text and "No space left" in caplog.text
    assert without_timings(rec)["value"] == clean["value"] and rec["config_hash"] == clean["config_hash"]
    assert not [f for f in left if ".tmp" in f or f.endswith(".pt")], left


def test_stale_tmp_files_of_dead_writers_are_swept(tmp_path, monkeypatch):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "cache" / "plans").mkdir(parents=True)
        (tmp_path / "res").mkdir()
        stale = [tmp_path / "cache" / "plans" / f"k.pt.tmp{dead}", tmp_path / "res" / f"x-ppl.json.tmp{dead}",
                 tmp_path / "cache" / f"smollm2-135m-abc.tmp{dead}"]
        kept = [tmp_path / "cache" / "plans" / f"j.pt.tmp{live.pid}", tmp_path / "cache" / "plans" / "k.pt"]
        for p in stale[:2] + kept:
            p.write_bytes(b"partial")
        stale[2].mkdir()
        (stale[2] / "model.safetensors").write_bytes(b"half")
        monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path / "cache"))
        monkeypatch.setattr(cache, "_SWEPT", set())
        cache.cache_dir()
        ResultStore(tmp_path / "res")
        assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
    finally:
        live.kill()
        live.wait()


# ---------------------------------------------------------------- a real SIGKILL, then resume


def test_sigkill_after_a_checkpoint_then_resume_is_bit_identical(tmp_path, monkeypatch):
    script = textwrap.dedent("""
        import os, signal
        from quantbench import layerwise
        from quantbench.plugins import load_plugins
        from quantbench.runner import RunConfig, run
        from quantbench.results import ResultStore
        from quantbench.tasks import make_task
        load_plugins()
        real = layerwise.BlockCheckpoint.save
        def save(self, i, state):
            real(self, i, state)
            os.kill(os.getpid(), signal.SIGKILL)  # right after block 0's checkpoint
        layerwise.BlockCheckpoint.save = save
        run(RunConfig("gptq", "tiny-llama", "w4a16", calibration={"corpus": "austen", "nsamples": 2, "seqlen": 64}),
            [make_task("ppl-austen", seqlen=64, max_windows=2)], ResultStore(os.environ["RES"]))
    """)
    env = {**os.environ, "QUANTBENCH_CACHE": str(tmp_path / "cache"), "RES": str(tmp_path / "killed")}
    p = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert sorted(f.name for f in (tmp_path / "cache" / "checkpoints").glob("gptq-*/*")) == ["0.pt", "0.sha256"]
    clean = _gptq_run(tmp_path / "clean")  # this process's cache: no checkpoint to resume
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path / "cache"))
    resumed = _gptq_run(tmp_path / "resumed")
    assert resumed["method_info"].pop("gptq_resumed_blocks") == [0]
    assert without_timings(resumed) == without_timings(clean)  # value, hashes, plan: bit-identical
