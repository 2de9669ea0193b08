"""Reporting: the papers' numbers and reproduction cards, the paper columns of the leaderboard, and the accuracy
regression check (its committed baselines re-run in CI)."""
import argparse
import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from quantbench import cases as cases_mod, models, options
from quantbench.adapters import geometry
from quantbench.reports import leaderboard, papers, regress

ROOT = Path(__file__).resolve().parent.parent


def _bench_parser() -> argparse.ArgumentParser:
    """The bench's options (quantbench/options.py: the one table pytest bench/ and quantbench run share)."""
    ap = argparse.ArgumentParser()
    options.add_options(ap.add_argument)
    return ap, cases_mod


# the published config.json geometry of the cards' models (the checks a card passes are the real model's)
HUB_CONFIGS = {
    "llama-2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                       num_key_value_heads=32, max_position_embeddings=4096),
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                       num_key_value_heads=8, max_position_embeddings=8192),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                       num_key_value_heads=8, max_position_embeddings=32768),
    "opt-66b": dict(model_type="opt", hidden_size=9216, ffn_dim=36864, num_attention_heads=72,
                    word_embed_proj_dim=9216, max_position_embeddings=2048),
    "opt-13b": dict(model_type="opt", hidden_size=5120, ffn_dim=20480, num_attention_heads=40,
                    word_embed_proj_dim=5120, max_position_embeddings=2048),
    "opt-6.7b": dict(model_type="opt", hidden_size=4096, ffn_dim=16384, num_attention_heads=32,
                     word_embed_proj_dim=4096, max_position_embeddings=2048),
    "opt-125m": dict(model_type="opt", hidden_size=768, ffn_dim=3072, num_attention_heads=12,
                     word_embed_proj_dim=768, max_position_embeddings=2048),
    "bloom-176b": dict(model_type="bloom", hidden_size=14336, n_head=112, n_layer=70),
}


@pytest.mark.parametrize("card", papers.CARDS, ids=lambda c: f"{c.method}-{c.model}-{c.scheme}")
def test_every_reproduction_card_is_a_valid_bench_command(card, monkeypatch):
    """Each card's command goes through the bench's option validation (methods, options, schemes, tasks,
    calibration) and expands to exactly the card's (method, scheme); its expectations are paper values."""
    ap, conf = _bench_parser()
    opt = ap.parse_args(card.argv())
    assert opt.model == card.model and card.model in models.ZOO
    monkeypatch.setattr(models, "check_available", lambda name: None)  # the hub models: not here, by design
    monkeypatch.setattr(models, "geometry_of", lambda name: geometry(AutoConfig.for_model(**HUB_CONFIGS[name])))
    cases = conf.build_cases(opt)
    assert [(c.cfg.method, c.cfg.scheme) for c in cases] == [(card.method, card.scheme)]
    tasks = {t.name for t in cases[0].tasks}
    assert set(card.expect) <= tasks and (0 < card.rel_tol <= 0.25 if card.expect else "settings card" in card.notes)
    for task, value in card.expect.items():
        found = papers.lookup(card.model, card.method, card.scheme, task, "ppl")
        assert {v.value for v in found} == {value}, (task, found)
        protocol = next(t.protocol for t in cases[0].tasks if t.name == task)
        assert protocol in {v.protocol for v in found}, (protocol, found)


def test_paper_values_are_unique_per_cell_and_keep_the_inconsistencies_out():
    keys = [(v.key, v.source, v.setting) for v in papers.VALUES]
    assert len(keys) == len(set(keys))
    cells = {}
    for v in papers.VALUES:  # the same cell in two tables must agree (else it belongs in INCONSISTENT)
        assert cells.setdefault((v.key, v.protocol, v.grids, v.setting), v.value) == v.value, v
    assert not papers.lookup("llama-3-8b", "duquant", "w4a4q4kv4", "ppl-wikitext2", "ppl")[0].value == 8.53
    assert papers.lookup("llama-2-7b", "duquant", "w4a4q4kv4", "ppl-c4", "ppl")[0].value == 7.90


def _record(model, method, scheme, task, value, protocol, **extra):
    return {"model": model, "method": method, "scheme": scheme, "task": task, "metric": "ppl", "value": value,
            "protocol": protocol, "config_hash": f"{method}{scheme}{protocol}", "created": "2026", **extra}


def test_paper_columns_compare_only_the_same_protocol_and_grids():
    recs = [_record("llama-2-7b", "duquant", "w4a4q4kv4", "ppl-wikitext2", 6.31, papers.WIKI),
            _record("llama-2-7b", "duquant", "w4a4q4kv4", "ppl-c4", 8.2, papers.C4["omniquant-seed0"]),
            _record("llama-2-7b", "quarot", "w4a4q4kv4", "ppl-wikitext2", 9.9, papers.WIKI,
                    scheme_spec={"w": {"grid": "sym"}, "a": {"grid": "sym"}})]
    text = "\n".join(leaderboard.paper_tables(recs, ["llama-2-7b"]))
    row = next(line for line in text.splitlines() if line.startswith("| duquant ") and "Table 1" in line)
    assert "6.31 (+0.03)" in row and "8.20 ≠" in row  # C4 under OmniQuant's subset: shown, not compared
    assert "≠ duquant w4a4q4kv4 ppl-c4: ours `ppl/gptq/c4-validation/omniquant-seed0" in text
    assert "9.90 ≠" in text and "paper grids w=asym, a=asym" in text  # QuaRot in DuQuant's asymmetric setting
    assert leaderboard.paper_tables(recs, ["smollm2-135m"]) == []  # no paper numbers for the offline model


def test_opt_and_bloom_paper_rows_compare_ours_and_keep_smoothquant_levels_apart():
    recs = [_record("opt-125m", "omniquant", "w4a16", "ppl-wikitext2", 29.95, papers.WIKI),
            _record("opt-125m", "omniquant", "w4a16", "ppl-c4", 26.0, papers.C4["duquant-seed20"])]
    text = "\n".join(leaderboard.paper_tables(recs, ["opt-125m", "bloom-176b"]))
    row = next(line for line in text.splitlines() if line.startswith("| omniquant ") and "| w4a16 " in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:6] == ["29.45", "29.95 (+0.50)", "26.36", "26.00 ≠"]  # C4: another subset, not compared
    levels = [line for line in text.splitlines() if line.startswith("| smoothquant ") and "Table 4" in line]
    assert len(levels) == 3 and any("O3: per-tensor W, per-tensor static A" in line and "67.40" in line
                                    for line in levels)
    assert papers.lookup("opt-13b", "fp16", "w16a16", "ppl-wikitext2", "ppl")[0].value == 10.12  # A20, not A25


def test_regression_compare_flags_moves_either_way_missing_baselines_and_failed_runs():
    checks = regress.CHECKS[:4]
    base = {c.id: {"value": 10.0, "config_hash": "h"} for c in checks[:3]}
    tol = checks[0].tol
    now = {checks[0].id: {"value": 10.0 * (1 + tol / 2), "config_hash": "h", "protocol": "p"},
           checks[1].id: {"value": 10.0 * (1 - 3 * checks[1].tol), "config_hash": "h2", "protocol": "p"},
           checks[2].id: "RuntimeError: boom",
           checks[3].id: {"value": 5.0, "config_hash": "h", "protocol": "p"}}
    rows, ok = regress.compare(checks, now, base)
    status = {r[0]: r[-1] for r in rows}
    assert not ok and status[checks[0].id] == "ok"
    assert status[checks[1].id] == "BETTER beyond tol; config changed"
    assert status[checks[2].id].startswith("RUN FAILED") and status[checks[3].id] == "NO BASELINE"
    assert regress.compare(checks[:1], now, base)[1]


def test_regression_main_prints_a_diff_table_and_fails_on_a_move(tmp_path, monkeypatch, capsys):
    baseline = json.loads(regress.BASELINE.read_text())
    assert {c.id for c in regress.CHECKS} == set(baseline)  # every check has a committed baseline
    moved = copy.deepcopy(baseline)
    cid = regress.CHECKS[0].id
    moved[cid]["value"] *= 1.5
    path = tmp_path / "b.json"
    path.write_text(json.dumps(moved))
    monkeypatch.setattr(regress, "run_check", lambda c, d: baseline[c.id])
    assert regress.main(["--baseline", str(path), "-k", cid]) == 1
    out = capsys.readouterr().out
    assert "| check" in out and "beyond tol" in out and "regress: FAILED" in out
    assert regress.main(["--baseline", str(regress.BASELINE), "-k", cid]) == 0
    assert regress.main(["-k", "no-such-check"]) == 2


@pytest.mark.slow
def test_regression_subset_matches_the_committed_baselines(capsys):
    """The CI step: every check re-run (about 80 s on 2 CPU cores) within its tolerance of the baseline."""
    rc = regress.main([])
    out = capsys.readouterr().out
    print(out)
    assert rc == 0, out


def test_overview_page_and_plots_from_records(tmp_path):
    from quantbench.reports import site

    def rec(method, scheme, value, w, a):
        spec = {"w": {"bits": w, "grid": "sym"} if w < 16 else None, "a": {"bits": a, "grid": "sym"} if a < 16 else None}
        return _record("smollm2-135m", method, scheme, "ppl-austen", value, site.MAIN_PROTOCOL, scheme_spec=spec,
                       run_id=method + scheme, backend="fake_quant", versions={"torch": "2.13"},
                       device={"kind": "cpu", "name": "cpu"})
    recs = [rec("fp16", "w16a16", 21.9, 16, 16), rec("rtn", "w4a4", 5261.8, 4, 4), rec("rtn", "w4a16", 46.8, 4, 16),
            rec("duquant", "w4a4", 32.1, 4, 4), rec("gptq", "w3a16", 193.7, 3, 16)]
    layer = tmp_path / "speed" / "layer-Fake-GPU.md"
    layer.parent.mkdir()
    layer.write_text("# head\n\ntext\n\n| phase | batch | variant | ms | speedup vs bf16 |\n|---|---|---|---|---|\n"
                     "| prefill | 16 | bf16 | 30.0 | 1 |\n| prefill | 16 | w4a4 rtn | 38.2 | 0.79 |\n"
                     "| prefill | 16 | w4a4 duquant | 81.5 | 0.37 |\n| decode | 1 | w4a4 rtn | 1.3 | 0.24 |\n"
                     "| prefill | 1 | w4a4 quarot | 3.7 | 0.54 |\n")
    text = site.render(recs, tmp_path / "README.md", "results", speed_dir=layer.parent)
    assert "![accuracy-vs-speed-Fake-GPU](plots/accuracy-vs-speed-Fake-GPU.png)" in text
    assert "Not plotted (no accuracy record of that cell): w4a16 g128, w4a4 quarot." in text
    assert (tmp_path / "plots" / "accuracy-vs-speed-Fake-GPU.png").read_bytes()[:4] == b"\x89PNG"
    from quantbench.reports.speed import read_tables

    rows = read_tables("layer", layer.parent)["Fake GPU"]
    assert rows[1] == {"phase": "prefill", "batch": 16.0, "variant": "w4a4 rtn", "ms": 38.2, "speedup vs bf16": 0.79}
    assert "No accuracy-vs-speed plot" in site.render(recs, tmp_path / "R2.md", "results", speed_dir=tmp_path / "none")
    table = text.split("| method", 1)[1]
    rtn = next(line for line in table.splitlines() if line.startswith("| rtn "))
    assert [c.strip() for c in rtn.split("|")[1:6]] == ["rtn", "5261.80", "·", "46.80", "·"]
    duquant = next(line for line in table.splitlines() if line.startswith("| duquant "))  # activation methods:
    assert [c.strip() for c in duquant.split("|")[1:6]] == ["duquant", "32.10", "·", "n/a", "n/a"]  # a16 is n/a
    sq = next(line for line in table.splitlines() if line.startswith("| smoothquant "))
    assert [c.strip() for c in sq.split("|")[2:6]] == ["·", "·", "n/a", "n/a"]
    assert "FP16 reference: 21.90" in text and "| smoothquant " in table  # every registered method has a row
    for name in ("ppl-vs-bits-smollm2-135m.png", "ranking-w4a4-smollm2-135m.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"plots/{name}" in text
    assert "### Papers' numbers beside ours — llama-2-7b" in text and "## Reproduction cards" in text
    assert f"`{papers.CARDS[0].command}`" in text and "Table F21" in text
    assert site.main([str(tmp_path / "empty"), "-o", str(tmp_path / "x.md")]) == 1


def test_cache_switch_list_and_clean(tmp_path, monkeypatch, capsys):
    """--no-cache (QUANTBENCH_NO_CACHE=1) rebuilds and stores nothing; `quantbench cache list|clean [KIND]`."""
    from quantbench import cache, cli

    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path))
    calls = []

    def build():
        calls.append(1)
        return {"x": len(calls)}

    assert cache.load_or_build("act-stats", "k1", build, "t") == {"x": 1}
    assert cache.load_or_build("act-stats", "k1", build, "t") == {"x": 1} and len(calls) == 1  # from the cache
    cache.load_or_build("generated", "k2", build, "t")
    monkeypatch.setenv("QUANTBENCH_NO_CACHE", "1")
    assert cache.load_or_build("act-stats", "k1", build, "t") == {"x": 3}  # rebuilt, not read
    cache.load_or_build("act-stats", "k3", build, "t")
    assert not (tmp_path / "act-stats" / "k3.pt").exists()  # and not stored
    monkeypatch.delenv("QUANTBENCH_NO_CACHE")
    assert [p.name for p in cache.entries()] == ["k1.pt", "k2.pt"]
    assert cli.main(["cache", "list"]) == 0 and "act-stats/k1.pt" in capsys.readouterr().out
    assert cli.main(["cache", "clean", "act-stats"]) == 0 and "removed 2 files" in capsys.readouterr().out
    assert [p.name for p in cache.entries()] == ["k2.pt"]
    with pytest.raises(SystemExit) as e:
        cli.main(["cache", "bogus"])
    assert e.value.code == 4 and "invalid choice: 'bogus'" in capsys.readouterr().err


def test_calibration_windows_are_cached_by_tokenizer_and_corpus_content(tmp_path, monkeypatch):
    """Calibration windows: built once per (tokenizer content, corpus content, count, length, seed), then read; a
    damaged entry is rebuilt."""
    from quantbench import cache
    from quantbench.data import Calibration, calibration_windows

    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path))
    tok = models.tiny_tokenizer()
    ref = calibration_windows(tok, "austen", 3, 64, 2)
    assert torch.equal(Calibration(tok, "austen", 3, 64, 2).windows, ref)
    (entry,) = cache.entries("calib-windows")
    monkeypatch.setattr("quantbench.data.calibration_windows", lambda *a: pytest.fail("rebuilt, not read"))
    assert torch.equal(Calibration(tok, "austen", 3, 64, 2).windows, ref)
    entry.write_bytes(b"garbage")
    monkeypatch.setattr("quantbench.data.calibration_windows", lambda *a: ref + 0)
    assert torch.equal(Calibration(tok, "austen", 3, 64, 2).windows, ref)  # damaged: rebuilt
    Calibration(tok, "austen", 3, 64, 7).windows  # another seed: another entry
    assert len(cache.entries("calib-windows")) == 2


def test_cost_table_puts_the_papers_times_and_speedups_beside_ours():
    """DuQuant Tables 9, 10, 12: our calibrated record's quantization time (a cached plan's does not count) and the
    layer benchmark's speedup; another GPU is marked ≠."""
    from quantbench.quant import parse_scheme
    from quantbench.pipeline import resolve
    from quantbench.reports import site
    from quantbench.reports.papers import COSTS

    for c in COSTS:  # every cost names a registered method and a valid scheme
        resolve(c.method), parse_scheme(c.scheme)
    recs = [_record("llama-2-7b", "duquant", "w4a4q4kv4", "ppl-wikitext2", 6.3, papers.WIKI, quant_wall_s=48.0,
                    device={"kind": "cuda", "name": "NVIDIA A100-SXM4-80GB"}, created="1"),
            _record("llama-2-7b", "duquant", "w4a4q4kv4", "ppl-c4", 7.9, papers.C4["duquant-seed20"], quant_wall_s=0.5,
                    plan_source="cache:k", device={"kind": "cuda", "name": "NVIDIA A100-SXM4-80GB"}, created="2"),
            _record("llama-2-13b", "duquant", "w4a4q4kv4", "ppl-wikitext2", 5.3, papers.WIKI, quant_wall_s=95.0,
                    config_hash="13b", device={"kind": "cuda", "name": "NVIDIA H100 80GB HBM3"})]
    layer = {"NVIDIA H100 80GB HBM3": [{"phase": "prefill", "batch": 16.0, "variant": "w4a4 duquant",
                                        "speedup vs bf16": 0.37}]}
    text = "\n".join(site.cost_table(recs, layer))
    lines = {tuple(c.strip() for c in ln.split("|")[1:5]): ln for ln in text.splitlines() if ln.startswith("| llama")}
    assert "| 50 s " in lines[("llama-2-7b", "duquant", "w4a4q4kv4", "quantize")]
    assert "| 48 s " in lines[("llama-2-7b", "duquant", "w4a4q4kv4", "quantize")]  # not the cached 0.5 s
    assert "95 s ≠" in lines[("llama-2-13b", "duquant", "w4a4q4kv4", "quantize")]  # H100 vs the paper's A100
    assert "| 2.08x " in lines[("llama-2-7b", "duquant", "w4a4", "layer prefill bs 16")]
    assert "0.37x ≠" in lines[("llama-2-7b", "duquant", "w4a4", "layer prefill bs 16")]
    assert "| 14.6 h " in lines[("llama-2-70b", "omniquant", "w4a4q4kv4", "quantize")]
