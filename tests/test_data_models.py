"""Shipped corpus, GPTQ-protocol windows, seeded calibration, model zoo and fast offline errors."""
import time

import pytest
import torch

from quantbench import corpus, data, hub, models
from quantbench.errors import ConfigError, UnavailableError


def test_austen_splits_are_disjoint_and_verified():
    manifest = data.corpus_manifest()["austen"]
    files = [f for split in manifest["splits"].values() for f in split]
    assert len(files) == len(set(files)) == 6
    test = data.corpus_text("austen", "test")
    assert test.startswith("PRIDE AND PREJUDICE") and len(test) > 600_000
    with pytest.raises(ConfigError, match="no split"):
        data.corpus_text("austen", "dev")


def test_corrupted_corpus_is_detected(monkeypatch):
    bad = {"austen": {**data.corpus_manifest()["austen"]}}
    bad["austen"]["sha256"] = {k: "0" * 64 for k in bad["austen"]["sha256"]}
    corpus.text.cache_clear()
    monkeypatch.setattr(corpus, "manifest", lambda: bad)
    with pytest.raises(UnavailableError, match="corrupted"):
        data.corpus_text("austen", "validation")
    corpus.text.cache_clear()


def test_ppl_windows_follow_gptq_protocol(tokenizer):
    ids = data.joined_ids(tokenizer, "austen", "validation")
    w = data.ppl_windows(tokenizer, "austen", "validation", seqlen=512)
    assert w.shape == (ids.numel() // 512, 512)  # tail dropped
    assert torch.equal(w.flatten(), ids[: w.numel()])  # contiguous, non-overlapping


def test_calibration_is_seeded(tokenizer):
    a = data.calibration_windows(tokenizer, "austen", nsamples=4, seqlen=64, seed=2)
    b = data.calibration_windows(tokenizer, "austen", nsamples=4, seqlen=64, seed=2)
    c = data.calibration_windows(tokenizer, "austen", nsamples=4, seqlen=64, seed=3)
    assert a.shape == (4, 64) and torch.equal(a, b) and not torch.equal(a, c)
    assert data.windows_digest(a) == data.windows_digest(b) != data.windows_digest(c)
    calib = data.Calibration(tokenizer, "austen", 4, 64, 2)
    assert torch.equal(calib.windows, a) and calib.config()["seed"] == 2


@pytest.mark.parametrize("corpus", ["wikitext2", "c4"])
def test_hub_corpus_offline_fails_fast_and_clearly(tokenizer, corpus):
    t0 = time.perf_counter()
    with pytest.raises(UnavailableError, match="not available.*offline"):
        data.ppl_windows(tokenizer, corpus)
    assert time.perf_counter() - t0 < 5


def test_unknown_corpus_and_variant(tokenizer):
    with pytest.raises(ConfigError, match="unknown corpus"):
        data.ppl_windows(tokenizer, "ptb")
    with pytest.raises(ConfigError, match="unknown c4 variant"):
        data._c4_eval_windows(tokenizer, 2048, "seed7")


def test_zoo_resolution():
    assert models.resolve("mistral-7b") == ("hub", "mistralai/Mistral-7B-v0.1")
    assert models.resolve("llama-2-70b") == ("hub", "meta-llama/Llama-2-70b-hf")
    assert models.resolve("smollm2-135m") == ("builtin", "smollm2-135m")
    assert models.resolve("org/some-model") == ("hub", "org/some-model")
    with pytest.raises(ConfigError, match="unknown model 'gpt-5'"):
        models.resolve("gpt-5")


def test_hub_model_offline_fails_in_well_under_a_second():
    t0 = time.perf_counter()
    with pytest.raises(UnavailableError, match="hf download mistralai/Mistral-7B-v0.1"):
        models.check_available("mistral-7b")
    with pytest.raises(UnavailableError, match="not in the local Hugging Face cache"):
        models.load("llama-3-8b")
    assert time.perf_counter() - t0 < 1.0


def test_tiny_models_are_seeded():
    a, b = models.tiny_model("tiny-llama", seed=0), models.tiny_model("tiny-llama", seed=0)
    c = models.tiny_model("tiny-llama", seed=1)
    wa, wb, wc = (m.model.layers[0].mlp.down_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_local_directory_round_trip(tmp_path, tokenizer):
    m = models.tiny_model("tiny-mistral")
    m.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    lm = models.load(str(tmp_path))
    assert lm.info["revision"].startswith("dir:") and lm.info["model_type"] == "mistral"
    assert lm.info["tokenizer_hash"] == models.tokenizer_hash(tokenizer)
    ids = torch.randint(0, 1024, (1, 16))
    with torch.no_grad():
        assert torch.equal(lm.model(input_ids=ids).logits, m(input_ids=ids).logits)


def test_no_offline_variables_still_no_retry_wait(tokenizer, monkeypatch):
    """A user without HF_*_OFFLINE and without network: the probe fails, datasets runs cache-only, no 24 s retries."""
    import datasets.config
    from huggingface_hub import constants

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "reachable", lambda timeout=2.0: False)
    t0 = time.perf_counter()
    with pytest.raises(UnavailableError, match="wikitext.*not available"):
        data.ppl_windows(tokenizer, "wikitext2")
    assert time.perf_counter() - t0 < 5
    assert constants.HF_HUB_OFFLINE is False and datasets.config.HF_HUB_OFFLINE is False  # restored


def test_local_directory_revision_is_a_content_hash(tmp_path, tokenizer, monkeypatch):
    """Same config, same file sizes, other weights (a re-saved fine-tune): another revision, so no cached plan or
    statistic of the old weights is ever reused."""
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path / "cache"))
    revs = []
    for seed in (0, 1, 0):
        models.tiny_model("tiny-llama", seed=seed).save_pretrained(tmp_path / "m")
        revs.append(models._dir_fingerprint(str(tmp_path / "m")))
    assert revs[0] != revs[1] and revs[0] == revs[2]
