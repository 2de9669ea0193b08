"""Shipped, offline task for every lm-eval family: they run through the same bridge, so the whole path is tested
without a network (the data is the shipped Austen corpus and the MMLU exemplars that lm-eval's wheel carries).

* ``mmlu-local-<k>shot``: the 281 real MMLU dev exemplars inside lm-eval (``flan_cot_fewshot/_cot_prompts.json``),
  MMLU's prompt and scoring (answer letter by loglikelihood), one lm-eval task per MMLU category (the category of
  each subject is read from lm-eval's own ``mmlu/default`` YAMLs); k-shot exemplars are drawn from the same
  category, never the question itself (there are only ~5 per subject).
* ``qa-local``: LAMBADA-style last-word prediction on Austen's *Persuasion* (validation split): loglikelihood,
  ``acc`` (greedy match) and ``perplexity``, as lm-eval's lambada_openai.
* ``rolling-austen``: lm-eval ``loglikelihood_rolling`` on *Pride and Prejudice* (test split): word / byte
  perplexity and bits per byte (lm-eval's wikitext protocol, not the GPTQ one of ``ppl-austen``).
* ``longbench-local``: passkey retrieval (Mohtashami & Jaggi 2023) in Austen text at several depths and lengths,
  generated greedily, LongBench-style prompt truncation and a [0, 1] score per length.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
from functools import lru_cache

from quantbench.corpus import text as corpus_text
from quantbench.errors import ConfigError
from quantbench.registry import TASKS
from quantbench.tasks import lmeval
from quantbench.tasks.lmeval import MMLU_CATEGORIES, LmEvalTask, base_config, builtin, label, metrics_of

_Q = re.compile(r"Q: (?P<q>.*?)\n\(A\) (?P<a>.*?)\s\(B\) (?P<b>.*?)\s\(C\) (?P<c>.*?)\s\(D\) (?P<d>.*?)\n"
                r"A: .*?The answer is \((?P<ans>[ABCD])\)", re.S)  # options on one line or one per line


@lru_cache(maxsize=1)
def mmlu_exemplars() -> tuple[dict, ...]:
    """The four-option MMLU dev questions with gold answers recoverable from lm-eval's CoT prompt file."""
    prompts = json.loads(open(builtin("mmlu/flan_cot_fewshot/_cot_prompts.json")).read())
    rows = []
    for subject, text in sorted(prompts.items()):
        category = subject_category(subject)
        for block in ("\n\n" + text).split("\n\nQ: ")[1:]:
            m = _Q.match("Q: " + block)
            if m:
                rows.append({"subject": subject.replace("_", " "), "category": category,
                             "question": m["q"].strip(), "choices": [m[x].strip() for x in "abcd"],
                             "answer": "ABCD".index(m["ans"])})
    return tuple(rows)


def subject_category(subject: str) -> str:
    text = open(builtin(f"mmlu/default/mmlu_{subject}.yaml")).read()
    m = re.search(r'"?tag"?: "?mmlu_(\w+?)_tasks', text)
    if not m or m[1] not in MMLU_CATEGORIES:
        raise ConfigError(f"cannot read the MMLU category of {subject} from lm-eval's mmlu/default YAML")
    return m[1]


def digest(rows) -> str:
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]


def _dataset(rows):
    def build(**_):
        import datasets

        return datasets.DatasetDict({"test": datasets.Dataset.from_list(list(rows))})
    return build


def make_mmlu_local(k: int, fmt: str = "letter", batch_size: int = 1, add_bos: bool = False, limit: int = 0,
                    max_length: int = 2048):
    """Letter format: lm-eval's ``mmlu/default`` prompt and subject header; cloze: ``mmlu/continuation``'s
    "Question: ...\nAnswer:" with the answer texts scored (what small models are usually reported on)."""
    rows = mmlu_exemplars()
    by_cat = {cat: [r for r in rows if r["category"] == cat] for cat in MMLU_CATEGORIES}
    names = {cat: f"qb_mmlu_local_{fmt}_{cat}" for cat in MMLU_CATEGORIES}
    prompt = {"letter": dict(doc_to_text=lmeval_mmlu_prompt("default/_default_template_yaml"),
                             doc_to_choice=["A", "B", "C", "D"],
                             description="The following are multiple choice questions (with answers) about "
                                         "{{subject}}.\n\n"),
              "cloze": dict(doc_to_text=lmeval_mmlu_prompt("continuation/_continuation_template_yaml"),
                            doc_to_choice="{{choices}}")}[fmt]

    def specs():
        return [{
            "task": names[cat], "dataset_path": "none", "custom_dataset": _dataset(by_cat[cat]),
            "test_split": "test", "fewshot_split": "test", "output_type": "multiple_choice", **prompt,
            "doc_to_target": "answer",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        } for cat in MMLU_CATEGORIES]

    def pick(res):
        out, total, n_all = {}, 0.0, 0
        for cat in MMLU_CATEGORIES:
            acc = float(res["results"][names[cat]]["acc,none"])
            n = res["n-samples"][names[cat]]["effective"]
            out[f"acc_{cat}"] = acc
            total, n_all = total + acc * n, n_all + n
        return {"acc": total / n_all, **out}  # micro average, as lm-eval's mmlu group (weight_by_size)

    c = base_config("mmlu", "local", "mmlu-local", num_fewshot=k, add_bos=add_bos, max_length=max_length,
                    limit=limit, data_sha256=digest(rows), n_questions=len(rows), fewshot="same-category-random",
                    format=fmt)
    name = f"mmlu-local-{'cloze-' * (fmt == 'cloze')}{k}shot"
    return LmEvalTask(name, label("mmlu", f"mmlu-dev-exemplars{len(rows)}-{fmt}", c, "/micro"),
                      c, {"batch_size": batch_size}, specs=specs, folders=[], pick=pick,
                      metrics=("acc", *(f"acc_{c}" for c in MMLU_CATEGORIES)))


def lmeval_mmlu_prompt(template: str) -> str:
    """The ``doc_to_text`` of an lm-eval MMLU template (read from the pinned package)."""
    text = open(builtin(f"mmlu/{template}")).read()
    m = re.search(r'^doc_to_text: "(.*)"$', text, re.M)
    if not m:
        raise ConfigError("cannot read doc_to_text from lm-eval's MMLU template")
    return m[1].encode().decode("unicode_escape")


@lru_cache(maxsize=1)
def lastword_docs(n: int = 200) -> tuple[dict, ...]:
    """Paragraphs of >= 40 words from *Persuasion*: context = all but the last word, target = that word
    (trailing punctuation stripped, as LAMBADA's targets); the first ``n`` eligible paragraphs."""
    docs = []
    for p in corpus_text("austen", "validation").split("\n\n"):
        words = " ".join(p.split()).rsplit(" ", 1)
        if len(p.split()) < 40 or len(words) < 2:
            continue
        target = words[1].strip(".,;:!?\"'-_()")
        if target.isalpha():
            docs.append({"context": words[0], "target": " " + target})
        if len(docs) == n:
            break
    return tuple(docs)


def make_lastword(batch_size: int = 1, add_bos: bool = False, limit: int = 0, max_length: int = 2048):
    docs = lastword_docs()
    c = base_config("qa", "local", "austen-lastword", add_bos=add_bos, max_length=max_length, limit=limit,
                    data_sha256=digest(docs), n_docs=len(docs))

    def specs():
        return [{"task": "qb_austen_lastword", "dataset_path": "none", "custom_dataset": _dataset(docs),
                 "test_split": "test", "output_type": "loglikelihood", "doc_to_text": "{{context}}",
                 "doc_to_target": "{{target}}", "target_delimiter": "",
                 "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                                 {"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}]

    return LmEvalTask("qa-local", label("qa", "austen-persuasion-lastword", c), c, {"batch_size": batch_size},
                      specs=specs, folders=[], pick=lambda r: metrics_of(r, "qb_austen_lastword"),
                      metrics=("acc", "perplexity"))


@TASKS.register("rolling")
def make_rolling(corpus: str, batch_size: int = 1, add_bos: bool = False, limit: int = 0, max_length: int = 2048,
                 n_docs: int = 24, doc_chars: int = 6000, **_):
    """lm-eval ``loglikelihood_rolling`` on ``n_docs`` consecutive ``doc_chars``-character pieces (cut at a
    paragraph end) of the shipped test split."""
    if corpus != "austen":
        raise ConfigError(f"rolling perplexity runs on the shipped corpus only: rolling-austen (not {corpus!r})")
    docs, cur = [], ""
    for p in corpus_text("austen", "test").split("\n\n"):
        cur = f"{cur}\n\n{p}" if cur else p
        if len(cur) >= doc_chars:
            docs.append({"text": cur})
            cur = ""
        if len(docs) == n_docs:
            break
    c = base_config("rolling", "local", "austen-test", add_bos=add_bos, max_length=max_length, limit=limit,
                    data_sha256=digest(docs), n_docs=len(docs))

    def specs():
        return [{"task": "qb_austen_rolling", "dataset_path": "none", "custom_dataset": _dataset(docs),
                 "test_split": "test", "output_type": "loglikelihood_rolling", "doc_to_text": "",
                 "doc_to_target": "{{text}}",
                 "metric_list": [{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")]}]

    return LmEvalTask("rolling-austen", label("rolling", f"austen-test-{len(docs)}x{doc_chars}chars", c,
                                              f"/window{max_length}"),
                      c, {"batch_size": batch_size}, specs=specs, folders=[],
                      pick=lambda r: metrics_of(r, "qb_austen_rolling"),
                      metrics=("word_perplexity", "byte_perplexity", "bits_per_byte"))


PASSKEY_LENGTHS = (512, 1024, 2048)  # prompt tokens
PASSKEY_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
PASSKEY_INTRO = ("There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the pass key.\n\n")
PASSKEY_QUESTION = "\n\nWhat is the pass key? The pass key is"


def passkey_docs(tokenizer, lengths=PASSKEY_LENGTHS, depths=PASSKEY_DEPTHS, repeats: int = 2, seed: int = 0):
    """Haystacks of *Persuasion* text of ``length`` prompt tokens with the needle "The pass key is N. Remember it.
    N is the pass key." at relative ``depth`` (0 = start, 1 = just before the question); a 5-digit N per doc."""
    rng = random.Random(seed)
    hay = tokenizer(corpus_text("austen", "validation"), add_special_tokens=False).input_ids
    frame = len(tokenizer(PASSKEY_INTRO + PASSKEY_QUESTION, add_special_tokens=False).input_ids)
    docs = []
    for length in lengths:
        for depth in depths:
            for _ in range(repeats):
                key = str(rng.randint(10000, 99999))
                needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
                room = length - frame - len(tokenizer(needle, add_special_tokens=False).input_ids)
                if room < 16:
                    raise ConfigError(f"passkey length {length} leaves no room for a haystack")
                start = rng.randrange(0, len(hay) - room)
                filler = hay[start:start + room]
                cut = round(depth * room)
                text = (PASSKEY_INTRO + tokenizer.decode(filler[:cut]) + needle + tokenizer.decode(filler[cut:])
                        + PASSKEY_QUESTION)
                docs.append({"text": text, "answer": key, "length": length, "depth": depth})
    return docs


def _passkey_score(doc, results):
    return {"score": float(doc["answer"] in results[0])}


def make_passkey(arg: str = "local", batch_size: int = 1, add_bos: bool = False, limit: int = 0,
                 lengths=PASSKEY_LENGTHS, depths=PASSKEY_DEPTHS, repeats: int = 2,
                 longbench_max_length: int = lmeval.LONGBENCH_MAX_LENGTH, **_):
    lengths = lengths or PASSKEY_LENGTHS
    if arg != "local":
        raise ConfigError(f"unknown local LongBench task longbench-{arg}; known: longbench-local")
    lengths, depths = tuple(sorted(lengths)), tuple(depths)
    if not lengths or lengths[0] < 64 or any(not 0 <= d <= 1 for d in depths) or repeats < 1:
        raise ConfigError("passkey needs lengths >= 64 tokens, depths in [0, 1] and repeats >= 1")
    max_gen = 8
    c = base_config("longbench", "local", "passkey", add_bos=add_bos, limit=limit,
                    max_length=max(longbench_max_length, lengths[-1]) + max_gen, truncate_to=longbench_max_length,
                    lengths=list(lengths), depths=list(depths), repeats=repeats, seed=0, max_gen_toks=max_gen)
    names = {L: f"qb_passkey_{L}" for L in lengths}
    task = LmEvalTask("longbench-local", label("longbench", "passkey-austen", c,
                                               f"/middle-trunc{longbench_max_length}"),
                      c, {"batch_size": batch_size}, specs=None, folders=[], pick=None,
                      metrics=("score", *(f"score_len{L}" for L in lengths)))

    def prepare(tokenizer):
        docs = passkey_docs(tokenizer, lengths, depths, repeats)
        task.run_options["data_sha256"] = digest(docs)  # a function of the tokenizer, which the run hash covers

        def specs():
            return [{"task": names[L], "dataset_path": "none",
                     "custom_dataset": _dataset([d for d in docs if d["length"] == L]), "test_split": "test",
                     "output_type": "generate_until", "doc_to_text": "{{text}}", "doc_to_target": "{{answer}}",
                     "generation_kwargs": {"until": ["\n"], "max_gen_toks": max_gen, "do_sample": False},
                     "process_results": _passkey_score,
                     "metric_list": [{"metric": "score", "aggregation": "mean", "higher_is_better": True}]}
                    for L in lengths]
        task.specs = specs
        LmEvalTask.prepare(task, tokenizer)

    def pick(res):
        per = {f"score_len{L}": float(res["results"][names[L]]["score,none"]) for L in lengths}
        return {"score": sum(per.values()) / len(per), **per}

    task.prepare, task.pick = prepare, pick
    return task


lmeval.SHIPPED.update(qa=make_lastword, mmlu=make_mmlu_local, longbench=make_passkey)
