"""Bridge to the pinned lm-eval: evaluate the realized model in memory through ``HFLM``.

Every task is built by a ``TaskManager`` that indexes only the folders it needs (never the ~14k built-in YAMLs:
``include_defaults=False``), so a run starts in milliseconds. What determines a value enters the task config
(harness version, shots, BOS policy, limit, LongBench truncation); the batch size is recorded beside it.

Families (name ``<family>-<task>``):

* ``qa-<task>``: zero-shot piqa, arc_easy, arc_challenge, boolq, hellaswag, winogrande, lambada_openai; every
  metric lm-eval reports is stored (acc *and* acc_norm); leaderboards show :data:`QA_SHOWN`.
* ``mmlu-[cloze-]<k>shot``: cais/mmlu through lm-eval's ``mmlu`` group (letter format, as DuQuant's
  ``mmlu_eval.py``) or ``mmlu_continuation`` (cloze): micro average (``weight_by_size``) and the four categories.
* ``longbench-<task>``: lm-eval's LongBench tasks (score in [0, 1]) with LongBench's middle truncation of the
  prompt to ``max_length`` tokens (THUDM/LongBench ``pred.py``; DuQuant: 3500 for Vicuna).

The shipped, offline stand-ins (``mmlu-local``, ``qa-local``, ``rolling-austen``, ``longbench-local``) live in
:mod:`quantbench.tasks.local`, which registers their builders in :data:`SHIPPED`, and run through the same bridge.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from importlib import metadata, resources
from pathlib import Path

import torch

from quantbench import hub, uncertainty
from quantbench.errors import ConfigError, NumericalError, UnavailableError
from quantbench.registry import TASKS
from quantbench.tasks.base import GROUPS, Task

log = logging.getLogger(__name__)

try:
    HARNESS = f"lm-eval-{metadata.version('lm_eval')}"
except metadata.PackageNotFoundError:  # a kernels-only install: the tasks say so when used (need_lm_eval)
    HARNESS = None


def need_lm_eval() -> str:
    if HARNESS is None:
        raise ConfigError("lm-eval tasks need lm-eval: pip install -r requirements.txt (it pins lm-eval==0.4.13)")
    return HARNESS
SEEDS = dict(random_seed=0, numpy_random_seed=1234, torch_random_seed=1234, fewshot_random_seed=1234)  # lm-eval's

# name -> (lm-eval task, folder under lm_eval/tasks, hub dataset)
QA = {
    "piqa": ("piqa", "piqa", "baber/piqa"),
    "arc_easy": ("arc_easy", "arc", "allenai/ai2_arc ARC-Easy"),
    "arc_challenge": ("arc_challenge", "arc", "allenai/ai2_arc ARC-Challenge"),
    "boolq": ("boolq", "super_glue/boolq", "aps/super_glue boolq"),
    "hellaswag": ("hellaswag", "hellaswag", "Rowan/hellaswag"),
    "winogrande": ("winogrande", "winogrande", "allenai/winogrande winogrande_xl"),
    "lambada_openai": ("lambada_openai", "lambada", "EleutherAI/lambada_openai"),
}
QA_METRICS = {"boolq": ("acc",), "winogrande": ("acc",), "lambada_openai": ("acc", "perplexity")}  # else acc, acc_norm
QA_SHOWN = "acc_norm where the task has it, else acc (QuaRot fake_quant/main.py convention)"
DUQUANT_QA6 = ("piqa", "arc_easy", "arc_challenge", "boolq", "hellaswag", "winogrande")  # DuQuant/OmniQuant avg
MMLU_CATEGORIES = ("stem", "humanities", "social_sciences", "other")
# DuQuant Tables D3/D4 (13 tasks); lcc completes KIVI's 8-task set, which DuQuant Table 4 says it follows (the
# reference notes do not list Table 4's columns: the 8-task average here is KIVI's set, labelled as such).
LONGBENCH = ("qasper", "multifieldqa_en", "multifieldqa_zh", "narrativeqa", "dureader", "2wikimqa", "qmsum",
             "gov_report", "multi_news", "trec", "triviaqa", "samsum", "repobench-p", "lcc")
LONGBENCH_SUBSETS = {
    "duquant13": LONGBENCH[:13],
    "kivi8": ("qasper", "qmsum", "multi_news", "trec", "triviaqa", "samsum", "lcc", "repobench-p"),
}
LONGBENCH_MAX_LENGTH = 3500  # DuQuant (Vicuna, KIVI setup); LongBench's own default for 4k-context Llama-2 chat
LONGBENCH_MAX_GEN = 512  # the largest max_gen_toks of lm-eval's LongBench tasks
SHIPPED: dict = {}  # family -> builder of its shipped offline task ("qa", "mmlu", "longbench"); quantbench.tasks.local


def _shipped(family: str):
    if family not in SHIPPED:
        raise ConfigError(f"the shipped offline {family} task is not registered: import quantbench.tasks")
    return SHIPPED[family]


def builtin(folder: str) -> str:
    return str(resources.files("lm_eval").joinpath("tasks", *folder.split("/")))


def task_manager(folders: list[str] = ()):
    """A TaskManager over exactly these built-in folders (``include_defaults=False``: no 14k-task index)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[builtin(f) for f in folders] or None, include_defaults=False)


def middle_truncate(tokenizer, text: str, max_tokens: int) -> str:
    """LongBench ``pred.py``: keep the first and last ``max_tokens // 2`` tokens of an over-long prompt."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) <= max_tokens:
        return text
    half = max_tokens // 2
    return tokenizer.decode(ids[:half], skip_special_tokens=True) + tokenizer.decode(ids[-half:],
                                                                                     skip_special_tokens=True)


def make_lm(model, tokenizer, batch_size: int = 1, max_length: int = 2048, add_bos: bool = False,
            truncate_to: int | None = None, name: str = "lm-eval"):
    """``HFLM`` over an in-memory model; with ``truncate_to``, generation prompts are middle-truncated first. NaN/inf
    logits are an error naming the task (``name``) and the model call, not scores computed from NaN."""
    from lm_eval.models.huggingface import HFLM

    calls = [0]

    class QuantbenchLM(HFLM):
        def _model_call(self, inps, *args, **kwargs):
            logits = super()._model_call(inps, *args, **kwargs)
            calls[0] += 1
            if not torch.isfinite(logits).all():
                raise NumericalError(f"{name}: the model's logits are NaN/inf in model call {calls[0]} "
                                     f"(a batch of {inps.shape[0]} requests)")
            return logits

        def generate_until(self, requests, disable_tqdm: bool = False):
            if truncate_to:
                for r in requests:
                    ctx, kwargs = r.arguments
                    r.arguments = (middle_truncate(self.tokenizer, ctx, truncate_to), kwargs)
            return super().generate_until(requests, disable_tqdm)

    with _quiet():
        return QuantbenchLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                            add_bos_token=add_bos)


@contextlib.contextmanager
def _quiet():
    """lm-eval logs every task and request build at INFO/WARNING; keep ours readable."""
    lg = logging.getLogger("lm_eval")
    level = lg.level
    lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        lg.setLevel(level)


class LmEvalTask(Task):
    """One lm-eval evaluation (task or group); ``pick`` maps lm-eval's results to our metric names.

    ``specs()`` returns what ``simple_evaluate`` takes (task names for built-in tasks, dicts for local ones).
    """

    def __init__(self, name, protocol, config, run_options, *, specs, folders, pick, metrics, dataset=""):
        super().__init__(name, protocol, config, run_options)
        self.specs, self.folders, self.pick, self.metrics = specs, folders, pick, tuple(metrics)
        self.dataset = dataset

    def _offline(self):
        return contextlib.nullcontext() if (not self.dataset or hub.reachable()) else hub.offline_mode()

    def prepare(self, tokenizer) -> None:
        """Build the lm-eval tasks (this loads their data) so a missing dataset fails before quantization."""
        try:
            with self._offline(), _quiet():
                task_manager(self.folders).load(self.specs())
        except ImportError as e:
            raise UnavailableError(f"{self.name} needs {e.name or e}: pip install 'quantbench[longbench]'") from None
        except Exception as e:  # datasets raises ConnectionError / DatasetNotFoundError / FileNotFoundError offline
            if not self.dataset:
                raise
            raise UnavailableError(
                f"needs dataset {self.dataset} from the Hugging Face hub, which is neither reachable nor cached "
                f"({type(e).__name__}). With network, run once to cache it; offline, use the shipped tasks "
                f"(--tasks local).") from None

    def evaluate(self, model, tokenizer) -> dict[str, float]:
        import lm_eval

        if self.specs is None:
            self.prepare(tokenizer)
        c = self.config
        limit = getattr(model.config, "max_position_embeddings", None) or c["max_length"]
        if c.get("lengths") and max(c["lengths"]) + c["max_gen_toks"] > limit:
            raise ConfigError(f"{self.name}: prompts of {max(c['lengths'])} tokens exceed the model's {limit} "
                              f"positions; pick shorter passkey lengths")
        max_length = min(c["max_length"], limit)  # lm-eval's context window: the model's, if shorter
        truncate = c.get("truncate_to") and min(c["truncate_to"], limit - c.get("max_gen_toks", 0))
        self.run_options.update(max_length_used=max_length, **({"truncate_to_used": truncate} if truncate else {}))
        lm = make_lm(model, tokenizer, self.run_options.get("batch_size", 1), max_length, c["add_bos"], truncate,
                     name=self.name)
        log.info("%s: lm-eval %s (%d-shot, batch %d)", self.name, ", ".join(_names(self.specs())),
                 c["num_fewshot"], lm.batch_size)
        with self._offline(), _quiet(), _no_bootstrap_pool():
            res = lm_eval.simple_evaluate(
                model=lm, tasks=self.specs(), task_manager=task_manager(self.folders), num_fewshot=c["num_fewshot"],
                limit=c.get("limit") or None, bootstrap_iters=BOOTSTRAP_ITERS, log_samples=False, **SEEDS)
        out = self.pick(res)
        bad = {k: v for k, v in out.items() if not math.isfinite(v)}
        if bad:
            raise NumericalError(f"{self.name}: non-finite lm-eval metrics {bad}")
        self.intervals = stderr_intervals(self.pick, res, out)
        return out


BOOTSTRAP_ITERS = 1000  # lm-eval's standard errors: closed form for means, its own seeded bootstrap otherwise


@contextlib.contextmanager
def _no_bootstrap_pool():
    """lm-eval's bootstrap in this process (``DISABLE_MULTIPROC``): its default forks a Pool per metric, which a
    process holding OpenMP threads must not do; the draws are the same seeded ones."""
    old = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = old


def stderr_intervals(pick, res: dict, values: dict[str, float]) -> dict[str, dict]:
    """Per metric, lm-eval's standard error as a normal 95 % interval: the task's ``pick`` applied to the results
    with every ``metric,filter`` replaced by its ``metric_stderr,filter``. A pick that averages subtasks gets the
    same average of their standard errors: an upper bound on the average's standard error (stated)."""
    def swap(entry: dict) -> dict:
        out = dict(entry)
        for key in entry:
            metric, sep, filt = key.partition(",")
            se = entry.get(f"{metric}_stderr{sep}{filt}")
            out[key] = float(se) if isinstance(se, (int, float)) else float("nan")
        return out

    swapped = {t: swap(e) for t, e in res["results"].items()}
    try:
        errs = pick({**res, "results": swapped})
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        errs = {}
    reported = {v for e in swapped.values() for v in e.values() if math.isfinite(v)}
    out = {}
    for m, v in values.items():
        se = errs.get(m)
        what = ("lm-eval standard error" if se in reported else
                "lm-eval standard errors averaged as the metric averages subtasks (an upper bound)")
        if m.startswith(("acc", "score", "exact_match", "f1")) and 0 <= v <= 1:  # a proportion
            out[m] = uncertainty.normal_interval(v, se, what, 0.0, 1.0)
        else:
            out[m] = uncertainty.normal_interval(v, se, what, 0.0 if "perplexity" in m else None)
    return out


def _names(specs) -> list[str]:
    return [s if isinstance(s, str) else s["task"] for s in specs]


def metrics_of(results: dict, task: str) -> dict[str, float]:
    """Every numeric metric lm-eval reports for ``task`` (``acc,none`` -> ``acc``; other filters suffixed)."""
    out = {}
    for key, v in results["results"][task].items():
        metric, _, filt = key.partition(",")
        if not filt or "_stderr" in metric or not isinstance(v, (int, float)):
            continue
        out[metric if filt == "none" else f"{metric}_{filt}"] = float(v)
    return out


def base_config(family: str, suite: str, task: str, *, num_fewshot=0, add_bos=False, max_length=2048, limit=0,
                **extra) -> dict:
    return {"kind": "lmeval", "family": family, "suite": suite, "task": task, "harness": need_lm_eval(),
            "num_fewshot": num_fewshot, "add_bos": add_bos, "max_length": max_length, "limit": limit, "seeds": SEEDS,
            **extra}


def label(family: str, where: str, c: dict, extra: str = "") -> str:
    bos = "bos" if c["add_bos"] else "nobos"
    lim = f"/first{c['limit']}" if c["limit"] else ""
    return f"{family}/{c['harness']}/{where}/{c['num_fewshot']}shot/{bos}{extra}{lim}"


def _check(batch_size: int, limit: int, max_length: int):
    if batch_size < 1 or limit < 0 or max_length < 16:
        raise ConfigError("lm-eval tasks need batch_size >= 1, limit >= 0 (0 = all), max_length >= 16")


@TASKS.register("qa")
def make_qa(arg: str, batch_size: int = 1, add_bos: bool = False, limit: int = 0, max_length: int = 2048,
            **_) -> Task:
    if arg == "local":
        return _shipped("qa")(batch_size=batch_size, add_bos=add_bos, limit=limit, max_length=max_length)
    if arg not in QA:
        raise ConfigError(f"unknown QA task qa-{arg}; known: {', '.join('qa-' + t for t in [*QA, 'local'])}")
    _check(batch_size, limit, max_length)
    name, folder, dataset = QA[arg]
    c = base_config("qa", "hub", arg, add_bos=add_bos, max_length=max_length, limit=limit)
    metrics = QA_METRICS.get(arg, ("acc", "acc_norm"))
    return LmEvalTask(f"qa-{arg}", label("qa", name, c), c, {"batch_size": batch_size}, specs=lambda: [name],
                      folders=[folder], pick=lambda r: metrics_of(r, name), metrics=metrics, dataset=dataset)


MMLU_FORMATS = {  # lm-eval folder, group, result key per category
    "letter": ("mmlu/default", "mmlu", {c: f"mmlu_{c}" for c in MMLU_CATEGORIES}),
    "cloze": ("mmlu/continuation", "mmlu_continuation",
              {"stem": "stem", "humanities": "humanities", "social_sciences": "social sciences", "other": "other"}),
}


def _mmlu_pick(fmt: str):
    _, group, keys = MMLU_FORMATS[fmt]

    def pick(results: dict) -> dict[str, float]:
        out = {"acc": float(results["results"][group]["acc,none"])}  # lm-eval group: weight_by_size = micro avg
        for cat in MMLU_CATEGORIES:
            out[f"acc_{cat}"] = float(results["results"][keys[cat]]["acc,none"])
        return out
    return pick


def parse_shots(arg: str, default: int = 0) -> int:
    if not arg:
        return default
    if not (arg.endswith("shot") and arg[:-4].isdigit()):
        raise ConfigError(f"expected <k>shot (e.g. 0shot, 5shot), got {arg!r}")
    return int(arg[:-4])


@TASKS.register("mmlu")
def make_mmlu(arg: str, batch_size: int = 1, add_bos: bool = False, limit: int = 0, max_length: int = 2048,
              **_) -> Task:
    """``mmlu-[local-][cloze-]<k>shot``: letter format (answer letter scored: lm-eval ``mmlu``, DuQuant's
    ``mmlu_eval.py``) or cloze (answer text scored: lm-eval ``mmlu_continuation``)."""
    parts = arg.split("-")
    local = parts[0] == "local"
    parts = parts[local:]
    fmt = "cloze" if parts and parts[0] == "cloze" else "letter"
    parts = parts[fmt == "cloze":]
    if len(parts) > 1:
        raise ConfigError(f"unknown MMLU task mmlu-{arg}; use mmlu-[local-][cloze-]<k>shot, e.g. mmlu-5shot")
    k = parse_shots(parts[0] if parts else "")
    _check(batch_size, limit, max_length)
    if local:
        return _shipped("mmlu")(k, fmt, batch_size=batch_size, add_bos=add_bos, limit=limit, max_length=max_length)
    folder, group, _ = MMLU_FORMATS[fmt]
    c = base_config("mmlu", "hub", "mmlu", num_fewshot=k, add_bos=add_bos, max_length=max_length, limit=limit,
                    format=fmt)
    name = f"mmlu-{'cloze-' * (fmt == 'cloze')}{k}shot"
    return LmEvalTask(name, label("mmlu", f"cais-mmlu-test-{fmt}", c, "/micro"), c, {"batch_size": batch_size},
                      specs=lambda: [group], folders=[folder], pick=_mmlu_pick(fmt),
                      metrics=("acc", *(f"acc_{c}" for c in MMLU_CATEGORIES)), dataset="cais/mmlu (57 subjects)")


@TASKS.register("longbench")
def make_longbench(arg: str, batch_size: int = 1, add_bos: bool = False, limit: int = 0,
                   longbench_max_length: int = LONGBENCH_MAX_LENGTH, passkey_lengths=None, **_) -> Task:
    if arg.startswith("local"):
        return _shipped("longbench")(arg, batch_size=batch_size, add_bos=add_bos, limit=limit,
                                     lengths=passkey_lengths, longbench_max_length=longbench_max_length)
    if arg not in LONGBENCH:
        raise ConfigError(f"unknown LongBench task longbench-{arg}; known: "
                          f"{', '.join('longbench-' + t for t in [*LONGBENCH, 'local'])}")
    _check(batch_size, limit, longbench_max_length)
    name = f"longbench_{arg}"
    c = base_config("longbench", "hub", arg, add_bos=add_bos, max_length=longbench_max_length + LONGBENCH_MAX_GEN,
                    limit=limit, truncate_to=longbench_max_length, max_gen_toks=LONGBENCH_MAX_GEN)
    return LmEvalTask(f"longbench-{arg}", label("longbench", arg, c, f"/middle-trunc{longbench_max_length}"), c,
                      {"batch_size": batch_size}, specs=lambda: [name], folders=["longbench"],
                      pick=lambda r: {"score": float(r["results"][name]["score,none"])}, metrics=("score",),
                      dataset=f"Xnhyacinth/LongBench {arg}")


GROUPS.update({
    "qa": [f"qa-{t}" for t in QA],
    "qa6": [f"qa-{t}" for t in DUQUANT_QA6],
    "mmlu": ["mmlu-0shot", "mmlu-5shot"],
    "longbench": [f"longbench-{t}" for t in LONGBENCH],
    "ppl": ["ppl-wikitext2", "ppl-c4"],
    "local": ["ppl-austen", "rolling-austen", "qa-local", "mmlu-local-0shot", "mmlu-local-5shot",
              "mmlu-local-cloze-0shot", "longbench-local"],
    "mmlu-local": ["mmlu-local-0shot", "mmlu-local-5shot"],
    "mmlu-cloze": ["mmlu-cloze-0shot", "mmlu-cloze-5shot"],
    "mmlu-local-cloze": ["mmlu-local-cloze-0shot", "mmlu-local-cloze-5shot"],
})


def hub_dir_exists(folder: str) -> bool:  # used by the tests: the pinned lm-eval still ships the folder
    return Path(builtin(folder)).is_dir()
