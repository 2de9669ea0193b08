"""Determinism: two runs of one configuration write byte-identical result records, timings aside."""
import json

import pytest

from quantbench.results import ResultStore, without_timings
from quantbench.runner import RunConfig, run
from quantbench.tasks import make_task

CAL = {"corpus": "austen", "nsamples": 2, "seqlen": 64}


@pytest.mark.parametrize("method,scheme,options", [
    ("duquant", "w4a4", {"steps": 4}),  # calibration sampling, greedy search, permutations
    ("omniquant", "w4a4", {"epochs": 1}),  # AdamW training of LWC/LET
    ("gptq", "w4a16", {}),
])
def test_two_runs_write_identical_records(method, scheme, options, tmp_path):
    texts = []
    for d in ("a", "b"):
        store = ResultStore(tmp_path / d)
        run(RunConfig(method, "tiny-llama", scheme, calibration=CAL, options=options),
            [make_task("ppl-austen", seqlen=64, max_windows=2)], store)
        (path,) = store.root.glob("*.json")
        rec = json.loads(path.read_text())
        assert rec["seed"] == 0 and rec["created"]  # seeded, and the timestamp is there to be stripped
        texts.append(json.dumps(without_timings(rec), sort_keys=True))
    assert texts[0] == texts[1]


def test_without_timings_strips_durations_everywhere_and_nothing_else():
    rec = {"created": "t", "wall_s": 1.0, "value": 3.0, "method_info": {"calib_per_block_s": 0.1, "steps": 4,
                                                                         "inner": [{"smooth_s": 2, "k": 1}]}}
    assert without_timings(rec) == {"value": 3.0, "method_info": {"steps": 4, "inner": [{"k": 1}]}}
