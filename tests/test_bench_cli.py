"""The pytest bench driver end to end (subprocess): records, leaderboard file, and one-line usage errors."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def bench(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "pytest", "bench/", "-q", "-p", "no:cacheprovider", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=600)


def test_bench_writes_records_and_leaderboard(tmp_path):
    res, board = tmp_path / "res", tmp_path / "board.md"
    p = bench("--model", "tiny-llama", "--method", "fp16,rtn", "--wbits", "4", "--abits", "4,16", "--seqlen",
              "128", "--ppl-windows", "2", "--tasks", "ppl-austen,ppl-wikitext2", "--results-dir", str(res),
              "--leaderboard", str(board))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "3 passed" in p.stdout and "ppl-wikitext2 not run" in p.stdout  # offline hub task: a clear warning
    recs = [json.loads(f.read_text()) for f in res.glob("*.json")]
    assert sorted(r["scheme"] for r in recs) == ["w16a16", "w4a16", "w4a4"]
    text = board.read_text()
    assert "| fp16" in text and "| rtn      | w4a4" in text


@pytest.mark.parametrize("args,msg", [
    (["--method", "nope"], "unknown method 'nope'"),
    (["--model", "llama-2-7b"], "not in the local Hugging Face cache"),
    (["--wbits", "1"], "impossible"),
    (["--tasks", "ppl-foo"], "unknown perplexity corpus 'foo'"),
    (["--tasks", "mmlu-fewshot"], "expected <k>shot"),
    (["--tasks", "longbench-local", "--passkey-lengths", "1k"], "--passkey-lengths expects integers"),
    (["--method", "rtn,gptq", "--method-opt", "bogus=1"], "no selected method has option bogus"),
    (["--method", "quarot", "--rotate-mode", "spin"], "rotate_mode='spin' of 'quarot': choose one of hadamard"),
    (["--method", "gptq", "--method-opt", "act_order"], "--method-opt expects KEY=VALUE"),
])
def test_bad_input_is_a_usage_error(args, msg):
    p = bench(*args)
    assert p.returncode == 4 and msg in p.stderr and "Traceback" not in p.stderr + p.stdout


def test_group_size_that_does_not_divide_is_a_usage_error_before_any_work(tmp_path):
    p = bench("--model", "tiny-llama", "--method", "rtn", "--group", "96", "--seqlen", "64", "--ppl-windows", "1",
              "--results-dir", str(tmp_path / "res"))
    out = p.stdout + p.stderr
    assert p.returncode == 4 and "weight group size 96 does not divide the input width of q_proj (128)" in out
    assert "Traceback" not in out and out.count("group size 96") == 1
    assert not (tmp_path / "res").exists()  # nothing written


def test_method_options_reach_the_record(tmp_path):
    p = bench("--model", "tiny-llama", "--method", "rtn,quarot-gptq", "--wbits", "4", "--abits", "4", "--seqlen",
              "64", "--ppl-windows", "1", "--nsamples", "2", "--calib-seqlen", "64", "--rotate-mode", "random",
              "--method-opt", "act_order=true,percdamp=0.05", "--results-dir", str(tmp_path))
    assert p.returncode == 0, p.stdout + p.stderr
    recs = {r["method"]: r for r in (json.loads(f.read_text()) for f in tmp_path.glob("*.json"))}
    opts = recs["quarot-gptq"]["method_options"]
    assert opts["rotate_mode"] == "random" and opts["act_order"] is True and opts["percdamp"] == 0.05
    assert recs["rtn"]["method_options"] == {}
    assert recs["quarot-gptq"]["method_info"]["gptq"]["act_order"] is True


def test_unavailable_calibration_corpus_is_a_clear_skip(tmp_path):
    p = bench("--model", "tiny-llama", "--method", "fp16,gptq", "--calib", "wikitext2", "--calib-seqlen", "64", "--seqlen", "64",
              "--ppl-windows", "1", "--results-dir", str(tmp_path), "-rs")
    out = p.stdout + p.stderr
    assert p.returncode == 0 and "1 passed, 1 skipped" in out, out
    assert "gptq w4a16 not run" in out and "wikitext" in out and "Traceback" not in out


def test_lm_eval_families_offline_with_tables(tmp_path):
    """The issue's command on the tiny model: local tasks run, hub tasks say which dataset they need, and the
    leaderboard has one table per family."""
    res, board = tmp_path / "res", tmp_path / "board.md"
    p = bench("--model", "tiny-llama", "--method", "fp16,rtn", "--tasks", "mmlu-local-0shot,longbench-local,qa",
              "--passkey-lengths", "256", "--limit", "8", "--results-dir", str(res), "--leaderboard", str(board))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "2 passed" in p.stdout and "qa-piqa not run: needs dataset baber/piqa" in p.stdout
    recs = [json.loads(f.read_text()) for f in res.glob("*.json")]
    assert {r["task"] for r in recs} == {"mmlu-local-0shot", "longbench-local"}
    assert all(r["versions"]["lm_eval"] and r["task_config"]["harness"].startswith("lm-eval-") for r in recs)
    assert all(r["task_options"]["batch_size"] == 1 and "add_bos" in r["task_config"] for r in recs)
    text = board.read_text()
    assert "### MMLU (shipped offline tasks)" in text and "### LongBench (shipped offline tasks)" in text
    assert "| method   | scheme   | stem   | humanities   | social_sciences   | other   | avg   |" in text
    assert "| method   | scheme   | len256   | avg   |" in text


def test_duquant_on_the_triton_backend_matches_fake_quant(tmp_path):
    """The issue's command on the tiny model: ``--method duquant --backend triton`` (interpreter on CPU)."""
    common = ("--model", "tiny-llama", "--method", "duquant", "--scheme", "w4a4", "--seqlen", "128", "--ppl-windows",
              "2", "--nsamples", "2", "--calib-seqlen", "64", "--results-dir", str(tmp_path))
    for backend in ("triton", "fake_quant"):
        p = bench(*common, "--backend", backend)
        assert p.returncode == 0, p.stdout + p.stderr
    recs = {r["backend"]: r for r in (json.loads(f.read_text()) for f in tmp_path.glob("*.json"))}
    assert recs["triton"]["value"] == pytest.approx(recs["fake_quant"]["value"], rel=1e-4)


def test_parallel_workers_share_one_results_directory(tmp_path):
    """`pytest -n 2 bench/ ...` (pytest-xdist): the cases split over two worker processes writing into one results
    directory (atomic, config-hash-named files); every record lands once, whole, and a second run with --resume
    re-evaluates nothing."""
    res = tmp_path / "res"
    args = ("-n", "2", "--model", "tiny-llama", "--method", "fp16,rtn,gptq", "--wbits", "4,3", "--seqlen", "64",
            "--ppl-windows", "2", "--nsamples", "2", "--calib-seqlen", "64", "--results-dir", str(res))
    p = bench(*args)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "5 passed" in p.stdout
    files = sorted(res.glob("*.json"))
    recs = [json.loads(f.read_text()) for f in files]
    assert len(recs) == 5 and len({r["config_hash"] for r in recs}) == 5
    assert not list(res.glob(".*tmp*"))  # no temporary file left behind
    stamps = {f.name: f.stat().st_mtime_ns for f in files}
    p = bench(*args, "--resume")
    assert p.returncode == 0, p.stdout + p.stderr
    assert {f.name: f.stat().st_mtime_ns for f in res.glob("*.json")} == stamps  # nothing rewritten


def test_slurm_array_script_runs_one_case_per_index(tmp_path):
    """bench/slurm_array.sh: --count gives the array size; index i runs the i-th case into the shared directory."""
    import os

    res = tmp_path / "res"
    opts = ["--model", "tiny-llama", "--method", "fp16,rtn", "--wbits", "4", "--seqlen", "64", "--ppl-windows", "2",
            "--results-dir", str(res)]
    script = str(ROOT / "bench" / "slurm_array.sh")
    env = dict(os.environ, PYTHON=sys.executable)
    n = subprocess.run(["bash", script, "--count", *opts], capture_output=True, text=True, timeout=300, env=env)
    assert n.returncode == 0 and n.stdout.strip() == "2", n.stderr
    env["SLURM_ARRAY_TASK_ID"] = "1"
    p = subprocess.run(["bash", script, *opts], capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    assert [json.loads(f.read_text())["method"] for f in res.glob("*.json")] == ["rtn"]
    env["SLURM_ARRAY_TASK_ID"] = "2"
    assert subprocess.run(["bash", script, *opts], capture_output=True, text=True, timeout=300,
                          env=env).returncode == 2
