"""The user's surface: the ``quantbench`` command line (argparse, one option table with ``pytest bench/``), the
Python API (quantize / realize / evaluate / load_results, and the README's example), reports from any results
directory (markdown, the HTML page in headless Chromium), and nothing written into the checkout."""
import json
import os
import re
import shutil
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

import quantbench
from quantbench import cli, models, options
from quantbench.cases import build_cases
from quantbench.results import ResultStore
from quantbench.runner import DTYPES, run

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--model", "tiny-llama", "--seqlen", "64", "--ppl-windows", "1", "--nsamples", "2", "--calib-seqlen", "64"]


def qb(*args, cwd=ROOT, env=None):
    return subprocess.run([sys.executable, "-m", "quantbench.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=env)


# ---------------------------------------------------------------- the command line

def test_help_is_on_stdout_with_exit_0_and_loads_no_torch():
    for args in ([], ["--help"], ["run", "--help"], ["site", "--help"]):
        p = qb(*args)
        assert p.returncode == 0 and "usage: quantbench" in p.stdout and p.stderr == "", (args, p.stderr)
    assert "--calib-seqlen" in qb("run", "--help").stdout and "--speed" not in qb("run", "--help").stdout
    mods = subprocess.run([sys.executable, "-c", "import sys, quantbench.cli; print('torch' in sys.modules)"],
                          capture_output=True, text=True)
    assert mods.stdout.strip() == "False"


def test_the_cli_and_the_pytest_driver_share_one_option_table():
    run_parser = cli.parser()._subparsers._group_actions[0].choices["run"]
    flags = {s for a in run_parser._actions for s in a.option_strings if s.startswith("--")}
    assert flags - {"--help", "--quiet", "--jobs"} == {f for f, _ in options.OPTIONS} - cli.PYTEST_ONLY
    assert set(options.DTYPE_CHOICES) == {"auto", *DTYPES}


@pytest.mark.parametrize("args,msg", [
    (["rn"], "unknown command 'rn' (did you mean 'run'?)"),
    (["run", "--method", "gtpq", "--model", "tiny-llama"], "unknown method 'gtpq' (did you mean 'gptq'?)"),
    (["run", "--model", "tiny-lama"], "unknown model 'tiny-lama' (did you mean 'tiny-llama'?)"),
    (["run", "--model", "tiny-llama", "--tasks", "ppl-austin"], "(did you mean 'ppl-austen'?)"),
    (["run", "--model", "tiny-llama", "--tasks", "mmlu-locl-5shot"], "(did you mean 'mmlu-local-5shot'?)"),
    (["run", "--model", "tiny-llama", "--nsamples", "x"], "argument --nsamples: invalid int value: 'x'"),
    (["run", "--model", "tiny-llama", "--nsamples", "0"], "--nsamples 0"),
    (["run", "--model", "tiny-llama", "--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'"),
])
def test_bad_input_is_one_line_and_exit_4(args, msg, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        sys.exit(cli.main([*args, *(["--results-dir", str(tmp_path / "r")] if args[0] == "run" else [])]))
    err = capsys.readouterr().err
    assert e.value.code == 4 and msg in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


def test_quantbench_run_writes_the_same_records_as_the_pytest_driver(tmp_path, capsys):
    args = [*TINY, "--method", "fp16,gptq+normtweak,rtn", "--scheme", "w4a4", "--tasks", "ppl-austen"]
    assert cli.main(["run", *args, "--results-dir", str(tmp_path / "cli"), "-q", "-j", "2"]) == 0  # two workers
    out = capsys.readouterr()
    assert "| gptq+normtweak" in out.out and "3 records written" in out.err  # a pipeline crosses to a worker too
    p = subprocess.run([sys.executable, "-m", "pytest", "bench/", "-q", "-p", "no:cacheprovider", *args,
                        "--results-dir", str(tmp_path / "pytest")], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env={**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // 2))})  # a worker's share
    assert p.returncode == 0, p.stdout + p.stderr
    a, b = (sorted((r["config_hash"], r["value"], r["device"]["threads"]) for r in ResultStore(tmp_path / d).records())
            for d in ("cli", "pytest"))
    assert a == b and len(a) == 3  # float32 results depend on the thread count, which every record carries


def test_headline_scheme_is_each_methods_own(tmp_path):
    opt = Namespace(**{**options.defaults(), "model": "tiny-llama", "seqlen": 64, "scheme": "headline", "calib_seqlen": 64,
                       "method": "fp16,gptq,quarot,smoothquant,duquant,gptq+normtweak"})
    assert {c.cfg.method: c.cfg.scheme for c in build_cases(opt)} == {
        "fp16": "w16a16", "gptq": "w4a16", "quarot": "w4a4", "smoothquant": "w8a8", "duquant": "w4a4",
        "gptq+normtweak": "w4a16"}


def test_a_failed_case_is_reported_and_the_others_still_run(tmp_path, capsys, caplog, monkeypatch):
    from quantbench.errors import NumericalError

    real = run

    def flaky(cfg, *a, **k):
        if cfg.method == "rtn":
            raise NumericalError("rtn: the output of block 0 has NaN/inf values")
        return real(cfg, *a, **k)

    monkeypatch.setattr("quantbench.cases.run", flaky)
    rc = cli.main(["run", *TINY, "--method", "rtn,fp16", "--results-dir", str(tmp_path), "-q"])
    err = capsys.readouterr().err
    assert rc == 1 and "rtn-w4a16 failed: rtn: the output of block 0" in caplog.text and "failed: rtn-w4a16" in err
    assert [r["method"] for r in ResultStore(tmp_path).records()] == ["fp16"]


# ---------------------------------------------------------------- the Python API

def test_api_on_a_plain_transformers_model_matches_the_bench(tmp_path):
    """quantize() on an already-loaded HF model (not the suite's wrapper), realize(), generate() and evaluate():
    the same PPL as the bench's record of the same configuration."""
    hf = models.tiny_model("tiny-llama", seed=0)
    tok = models.tiny_tokenizer()
    qm = quantbench.quantize(hf, "gptq", "w4a4", tokenizer=tok, calibration={"nsamples": 2, "seqlen": 64})
    assert qm.info["method"] == "gptq" and qm.info["calibration"]["nsamples"] == 2
    assert qm.info["model"]["revision"].startswith("sha256:")
    model = qm.realize()
    assert model is hf and qm.realize() is model
    ids = torch.tensor([[1, 5, 9, 13]])
    gen = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert gen.shape == (1, 7)
    got = quantbench.evaluate(qm, "ppl-austen", seqlen=64, ppl_windows=1)
    opt = Namespace(**{**options.defaults(), "model": "tiny-llama", "seqlen": 64, "ppl_windows": 1,
                       "method": "gptq", "scheme": "w4a4", "nsamples": 2, "calib_seqlen": 64,
                       "results_dir": str(tmp_path)})
    (case,) = build_cases(opt)
    (rec,) = run(case.cfg, case.tasks, ResultStore(tmp_path), resolved=case.resolved).records
    assert got == {"ppl-austen": {"ppl": pytest.approx(rec["value"], rel=1e-6)}}
    with pytest.raises(quantbench.ConfigError, match="already realized with backend 'fake_quant'"):
        qm.realize("triton")


def test_api_checks_its_input_before_any_work():
    with pytest.raises(quantbench.ConfigError, match="calibration has no key nsample"):
        quantbench.quantize("tiny-llama", "gptq", "w4a4", calibration={"nsample": 2})
    with pytest.raises(quantbench.ConfigError, match="did you mean 'gptq'"):
        quantbench.quantize("tiny-llama", "gptqq", "w4a4")
    with pytest.raises(quantbench.ConfigError, match="weight group size 96 does not divide"):
        quantbench.quantize("tiny-llama", "rtn", "w4a16g96")
    with pytest.raises(quantbench.ConfigError, match="longer than the model's context of 1024"):
        quantbench.evaluate("tiny-llama", "ppl-austen", seqlen=4096)


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"## Python API\n.*?```python\n(.*?)```", text, re.S)
    assert m, "README has a '## Python API' section with a python example"
    return m.group(1)


@pytest.mark.slow
def test_the_readme_api_example_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # it reads the committed results
    exec(compile(_readme_example(), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "ppl" in out and "records" in out


def test_load_results_on_the_committed_results():
    df = quantbench.load_results(ROOT / "reports" / "results")
    n = len(list((ROOT / "reports" / "results").glob("*.json")))
    assert n > 0 and len(df) == n and list(df.columns[:len(quantbench.api.FIRST_COLUMNS)]) == list(
        quantbench.api.FIRST_COLUMNS)
    assert df["value"].dtype.kind == "f" and isinstance(df["scheme_spec"].dropna().iloc[0], dict)  # nested
    assert df["revision"].str.startswith("0.1.0").all()


def test_results_as_csv(tmp_path, capsys):
    res = tmp_path / "res"
    assert cli.main(["run", *TINY, "--method", "fp16,rtn", "--results-dir", str(res), "-q"]) == 0
    capsys.readouterr()
    assert cli.main(["results", str(res), "--csv", str(tmp_path / "r.csv")]) == 0
    import pandas as pd

    df = pd.read_csv(tmp_path / "r.csv")
    assert sorted(df["method"]) == ["fp16", "rtn"] and json.loads(df["scheme_spec"][0]) is not None
    assert cli.main(["results", str(res)]) == 0 and "| fp16" in capsys.readouterr().out


# ---------------------------------------------------------------- reports from any results directory

@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    res = tmp_path_factory.mktemp("tiny") / "results"
    assert cli.main(["run", *TINY, "--method", "fp16,rtn,gptq", "--scheme", "w4a4,w4a16", "--results-dir", str(res),
                     "-q"]) == 0
    return res


def test_site_renders_any_results_directory(tiny_results, tmp_path, capsys):
    out = tmp_path / "new" / "folder" / "README.md"  # created
    assert cli.main(["site", str(tiny_results), "-o", str(out)]) == 0
    text = out.read_text()
    assert "## tiny-llama: every method x scheme (PPL, `ppl/gptq/austen-test/seqlen64/first1windows`)" in text
    rtn = next(line for line in text.splitlines() if line.startswith("| rtn "))
    assert re.match(r"\| rtn +\| [0-9.]+ +\| · +\| [0-9.]+ ", rtn), rtn
    page = (out.parent / "index.html").read_text()
    recs = ResultStore(tiny_results).records()
    provs = re.findall(r'data-prov="([^"]*)"', page)
    assert len(provs) == 4 + len(recs)  # the matrix's 4 quantized cells and every record
    import html as html_mod

    assert {json.loads(html_mod.unescape(p))["config hash"] for p in provs} == {r["config_hash"] for r in recs}
    assert "data:image/png;base64," in page and "<script>" in page
    assert "http://" not in page and "https://" not in page  # self-contained: no CDN
    assert {p.name for p in (out.parent / "plots").iterdir()} == {"ppl-vs-bits-tiny-llama.png",
                                                                 "ranking-w4a4-tiny-llama.png"}


def test_site_warns_when_records_come_from_several_revisions(tiny_results, tmp_path, capsys):
    mixed = tmp_path / "mixed"
    shutil.copytree(tiny_results, mixed)
    for i, f in enumerate(sorted(mixed.glob("*.json"))):
        rec = json.loads(f.read_text())
        rec["versions"]["quantbench"] = "0.1.0+gdeadbeef0000.dirty" if i == 0 else "0.1.0+g0123456789ab"
        f.write_text(json.dumps(rec))
    assert cli.main(["site", str(mixed), "-o", str(tmp_path / "site" / "README.md")]) == 0
    err = capsys.readouterr().err
    assert "these 5 records come from 2 code revisions (0.1.0+g0123456789ab: 4, 0.1.0+gdeadbeef0000.dirty: 1)" in err
    assert "1 records come from a dirty tree (uncommitted code: 0.1.0+gdeadbeef0000.dirty)" in err
    assert "Warning:" in (tmp_path / "site" / "README.md").read_text()


def _browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    try:
        from selenium import webdriver
    except ImportError:
        pytest.skip("selenium is not installed (requirements.txt)")
    if not (chromium and driver):
        pytest.skip("no Chromium here: `apt-get install chromium chromium-driver` (Debian; .ci/run installs it)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=driver), options=opts)


def test_html_page_in_headless_chromium(tiny_results, tmp_path):
    """The page loads without console errors, sorting a column reorders its rows, a number's tooltip and its
    provenance panel show the record's config hash."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    out = tmp_path / "site" / "README.md"
    assert cli.main(["site", str(tiny_results), "-o", str(out)]) == 0
    browser = _browser()
    try:
        browser.get((out.parent / "index.html").as_uri())
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == []
        table = browser.find_element(By.ID, "records")
        col = [h.text for h in table.find_elements(By.CSS_SELECTOR, "thead th")].index("value")

        def values():
            return [float(r.find_elements(By.TAG_NAME, "td")[col].get_attribute("data-v"))
                    for r in table.find_elements(By.CSS_SELECTOR, "tbody tr")]

        before = values()
        header = table.find_elements(By.CSS_SELECTOR, "thead th")[col]
        header.click()
        assert values() == sorted(before) and header.get_attribute("aria-sort") == "ascending"
        header.click()
        assert values() == sorted(before, reverse=True)
        cell = table.find_elements(By.CSS_SELECTOR, "tbody tr")[0].find_elements(By.TAG_NAME, "td")[col]
        recs = {r["value"]: r for r in ResultStore(tiny_results).records()}
        chash = recs[float(cell.get_attribute("data-v"))]["config_hash"]
        ActionChains(browser).move_to_element(cell).perform()
        assert f"config hash {chash}" in cell.get_attribute("title")
        cell.click()
        assert f"config hash: {chash}" in browser.find_element(By.ID, "prov").text
        assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
    finally:
        browser.quit()


# ---------------------------------------------------------------- nothing written into the checkout

def test_the_bench_writes_no_benchmark_storage_or_pytest_cache_into_the_checkout(tmp_path):
    env = {**os.environ, "HOME": str(tmp_path / "home"), "QUANTBENCH_CACHE": str(tmp_path / "cache")}
    before = set(os.listdir(ROOT))
    p = subprocess.run([sys.executable, "-m", "pytest", "bench/", "-q", *TINY, "--method", "fp16",
                        "--results-dir", str(tmp_path / "res")], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    assert set(os.listdir(ROOT)) - before == set()
    assert (tmp_path / "home" / ".cache" / "quantbench" / "pytest").is_dir()  # pytest's cache went here
