"""Judging a result bundle offline, after ``test``: ``python -m editbench judge --bundle DIR``.

One judge pass over the bundle's images serves every aggregation, and no GPU waits on HTTP.
The bundle (:mod:`metrics.bundle`) is read and verified against its manifest; for each sample
of ``inputs.jsonl`` the judge answers the questions of a scheme (:mod:`metrics.judge.schemes`):
VIEScore's SC prompt on ``[sources/<id>.png, images/<id>.png]`` with the instruction and its PQ
prompt on ``images/<id>.png``, or ImgEdit-Bench's prompt of the sample's edit type on
``[sources/<id>.png, images/<id>.png]``. Written into the bundle:

- ``judge.jsonl``: one :class:`~metrics.judge.record.JudgeRecord` per sample and question;
- ``samples.jsonl``: per sample and aggregation (those the sample's rows already have), the
  scheme's rows (``VIEScore_SC``, ``VIEScore_PQ``, ``VIEScore_O``, or ``ImgEdit_<edit_type>``;
  value null where the sample failed: missing, never 0) and ``<scheme>_failure_rate`` (1 failed,
  0 judged; its mean is the failure rate), all reduced by ``mean``, so the report recomputes
  them and bootstraps their intervals; the rows of an earlier judgement are replaced;
- ``judge_metrics.json`` (:data:`JUDGE_METRICS`): the scheme, the aggregates keyed as in
  ``test_metrics.json`` (``metrics``), the default aggregation's values as the table shows
  them (``table``, scaled as the run's protocol scales them) with their ``scale``, the summary
  over all samples (means over the judged ones, ``n_judged``, ``failures``, ``failure_rate``)
  and the judge's description (no credentials);
- ``manifest.json`` rehashed for the three files.

``only_failed=True`` asks again only the questions whose record has ``failed: true`` and the
samples without a record; every other line of ``judge.jsonl`` is kept byte for byte.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metrics.bundle import (
    RESULTS,
    SAMPLES,
    Bundle,
    BundleError,
    image_name,
    read_bundle,
    read_inputs,
    recompute,
    update_manifest,
    write_samples,
)
from metrics.judge.asking import Request, answer_requests
from metrics.judge.cache import AnswerCache
from metrics.judge.images import encode_image, load_image
from metrics.judge.imgedit import ImgEditPrompts
from metrics.judge.judges import Judge
from metrics.judge.prompts import PromptSet
from metrics.judge.record import RECORDS, JudgeRecord, read_records, write_records
from metrics.judge.schemes import Question, SampleResult, Scheme, VIEScoreScheme, scheme_for

JUDGE_METRICS = "judge_metrics.json"
JUDGE_FORMAT = "editbench.judge_metrics/1"
#: VIEScore's per-sample rows (summary key -> metric name), its failure rate and all its rows.
METRIC_NAMES = VIEScoreScheme.metric_names
FAILURE_RATE = VIEScoreScheme.failure_metric
ROW_METRICS = VIEScoreScheme.columns


@dataclass
class JudgedBundle:
    """What one judge pass did: the scheme, the records, the per-sample results, the summary
    and the number of questions asked (cache hits included) in this pass."""

    folder: Path
    scheme: Scheme
    records: list[JudgeRecord]
    scores: list[SampleResult]
    summary: dict[str, Any]
    asked: int

    @property
    def failures(self) -> int:
        return int(self.summary["failures"])


def _verified_bundle(folder: Path) -> Bundle:
    bundle = read_bundle(folder)
    if bundle is None:
        raise BundleError(f"{folder}: no manifest.json, so not a result bundle to judge")
    return bundle


def _image_path(folder: Path, bundle: Bundle, sample: str, kind: str) -> Path:
    """A bundle image that the manifest hashes (so the judged pixels are the recorded ones)."""
    name = image_name(sample, kind)
    if name not in (bundle.manifest.get("files") or {}):
        raise BundleError(
            f"{folder / name}: not in the bundle's manifest; the judge needs the edited images "
            "and their sources (rerun `test` with --model.init_args.bundle_images true)"
        )
    return folder / name


def _requests(
    folder: Path,
    bundle: Bundle,
    inputs: dict[str, dict],
    questions: dict[str, list[Question]],
    todo: set[tuple[str, str]],
    judge: Judge,
) -> list[Request]:
    requests = []
    loaded: dict[tuple[str, str], tuple[Any, bytes]] = {}

    def image(sample: str, kind: str) -> tuple[Any, bytes]:
        if (sample, kind) not in loaded:
            picture = load_image(_image_path(folder, bundle, sample, kind), judge.image_size)
            loaded[(sample, kind)] = (picture, encode_image(picture, judge.image_format))
        return loaded[(sample, kind)]

    for sample, asked in questions.items():
        for question in asked:
            if (sample, question.kind) not in todo:
                continue
            pictures = [image(sample, kind) for kind in question.images]
            requests.append(
                Request(sample, question.kind, question.prompt, tuple(p for p, _ in pictures),
                        tuple(b for _, b in pictures), str(inputs[sample]["instruction"]))
            )  # fmt: skip
    return requests


def _record(judge: Judge, scheme: Scheme, request: Request, outcome: Any) -> JudgeRecord:
    failed = outcome.scores is None
    return JudgeRecord(
        id=str(request.sample),
        kind=request.kind,
        backend=judge.backend,
        model=judge.model_id,
        prompt_set=scheme.prompts.name,
        prompt_sha256=scheme.prompts.sha256,
        sampling=judge.settings(),
        model_reported=outcome.model,
        system_fingerprint=outcome.system_fingerprint,
        answer=outcome.answer,
        scores=outcome.scores,
        failed=failed,
        reason=(outcome.error or "no answer") if failed else None,
        attempts=outcome.attempts,
        cached=outcome.cached,
    )


def judge_rows(
    bundle: Bundle,
    inputs: dict[str, dict],
    results: Sequence[SampleResult],
    aggregation: str,
    judged: Sequence[str] = ROW_METRICS,
) -> list[dict[str, Any]]:
    """The judge's rows: per sample, one per aggregation its model rows (other than the
    ``judged`` metrics) have (``aggregation`` for a sample without rows)."""
    keys: dict[str, dict[tuple, dict]] = {}
    for row in bundle.rows:
        if row["system"] == "model" and row["metric"] not in judged:
            key = (row["aggregation"], row.get("dataset"), row.get("session"), row.get("turn"))
            keys.setdefault(str(row["id"]), {}).setdefault(key, row)
    out = []
    for result in results:
        found = keys.get(result.id)
        if not found:
            given = inputs[result.id]
            found = {(aggregation, given.get("dataset"), given.get("session"), given.get("turn")): {}}
        for agg, dataset, session, turn in found:
            for metric, value in result.values.items():
                out.append(
                    {"id": result.id, "dataset": dataset, "session": session, "turn": turn,
                     "aggregation": agg, "system": "model", "metric": metric, "value": value}
                )  # fmt: skip
    return out


def _scale(protocol: dict[str, Any], scheme: Scheme, name: str) -> float:
    """The table multiplier of ``name`` in the run's protocol (as the evaluator scales it)."""
    from metrics.protocols import get_protocol

    if name == scheme.failure_metric:
        return 1.0
    try:
        return float(get_protocol(str(protocol.get("name"))).scale_of(name))
    except ValueError:
        scale = protocol.get("scale") or {}
        return float(scale.get(name, scale.get(scheme.name, 1.0)))


def _kept_records(
    folder: Path, inputs: dict[str, dict], judge: Judge, scheme: Scheme
) -> dict[tuple[str, str], tuple[JudgeRecord, str]]:
    """The judged records of ``judge.jsonl`` to keep (``--only-failed``); a record of another
    judge, prompt set or sampling is a :class:`BundleError` (no mixed judges)."""
    kept: dict[tuple[str, str], tuple[JudgeRecord, str]] = {}
    if not (folder / RECORDS).is_file():
        return kept
    current = (judge.backend, judge.model_id, scheme.prompts.sha256, judge.settings())
    for record, line in read_records(folder / RECORDS):
        if not record.failed and record.id in inputs:
            kept[(record.id, record.kind)] = (record, line)
        given = (record.backend, record.model, record.prompt_sha256, record.sampling)
        if given != current:
            raise BundleError(
                f"{folder / RECORDS}: --only-failed would mix judges: {record.id} "
                f"{record.kind} was judged by {given[:2]} (prompts {given[2][:12]}, "
                f"{given[3]}), this pass asks {current[:2]} (prompts {current[2][:12]}, "
                f"{current[3]}); rerun without --only-failed to judge every sample anew"
            )
    return kept


def judge_bundle(
    folder: str | Path,
    judge: Judge,
    prompts: PromptSet | ImgEditPrompts,
    *,
    only_failed: bool = False,
    cache: AnswerCache | None = None,
    num_threads: int = 4,
    retry_delay: float = 1.0,
) -> JudgedBundle:
    """Judge the bundle in ``folder`` with the scheme of ``prompts`` (VIEScore for a
    :class:`PromptSet`, ImgEdit for :class:`ImgEditPrompts`) and write the judge's files into
    it (module docstring)."""
    folder = Path(folder)
    scheme = scheme_for(prompts)
    bundle = _verified_bundle(folder)
    inputs = read_inputs(folder)
    ids = sorted(inputs)
    kept = _kept_records(folder, inputs, judge, scheme) if only_failed else {}
    questions = {i: scheme.questions(i, inputs[i]) for i in ids}
    order = [(i, q.kind) for i in ids for q in questions[i]]
    todo = {key for key in order if key not in kept}
    requests = _requests(folder, bundle, inputs, questions, todo, judge)
    outcomes = (
        answer_requests(
            judge, scheme.prompts, requests, cache, num_threads=num_threads, retry_delay=retry_delay
        )
        if requests
        else []
    )
    new = {
        (r.sample, r.kind): _record(judge, scheme, r, o)
        for r, o in zip(requests, outcomes, strict=True)
    }
    records, lines = [], []
    for key in order:
        record, line = kept[key] if key in kept else (new[key], None)
        records.append(record)
        lines.append(line if line is not None else record)
    write_records(folder / RECORDS, lines)

    results, summary = scheme.results(records, ids, inputs)
    document = json.loads((folder / RESULTS).read_text())
    protocol = document.get("protocol") or {}
    earlier = read_judge_metrics(folder)
    replaced = {*scheme.columns, *((earlier or {}).get("columns") or ())}
    ours = judge_rows(bundle, inputs, results, str(protocol.get("aggregation", "all")), replaced)
    rows = [r for r in bundle.rows if r["metric"] not in replaced] + ours
    write_samples(folder / SAMPLES, rows)
    reductions = dict.fromkeys(scheme.columns, "mean")
    metrics = recompute(Bundle(folder, {"reductions": reductions}, ours), protocol)
    scale = {name: _scale(protocol, scheme, name) for name in scheme.columns}
    table = {}  # the default aggregation's values, scaled (test_metrics.json's `table`)
    for name in scheme.columns:
        value = metrics.get(f"test/{name}")
        table[name] = None if value is None or value != value else value * scale[name]
    reported = sorted({r.model_reported for r in records if r.model_reported})
    judged = {
        "format": JUDGE_FORMAT,
        "scheme": scheme.name,
        "judge": {**judge.describe(), **scheme.prompts.describe(), "models_reported": reported},
        "aggregation": protocol.get("aggregation", "all"),
        "columns": list(scheme.columns),
        "metrics": metrics,
        "table": table,
        "scale": scale,
        "summary": summary,
    }
    (folder / JUDGE_METRICS).write_text(json.dumps(judged, indent=2, sort_keys=True) + "\n")
    update_manifest(
        folder,
        [SAMPLES, RECORDS, JUDGE_METRICS],
        reductions=reductions,
        recomputable=scheme.columns,
        num_rows=len(rows),
        removed=sorted(replaced - set(scheme.columns)),
    )
    return JudgedBundle(folder, scheme, records, results, summary, len(requests))


def read_judge_metrics(folder: str | Path) -> dict[str, Any] | None:
    """A bundle's ``judge_metrics.json`` (None when it was not judged)."""
    path = Path(folder) / JUDGE_METRICS
    if not path.is_file():
        return None
    document = json.loads(path.read_text())
    if not isinstance(document, dict) or document.get("format") != JUDGE_FORMAT:
        raise BundleError(f"{path}: not a judge metrics file ({JUDGE_FORMAT})")
    return document


__all__ = [
    "FAILURE_RATE",
    "JUDGE_FORMAT",
    "JUDGE_METRICS",
    "METRIC_NAMES",
    "ROW_METRICS",
    "JudgedBundle",
    "judge_bundle",
    "judge_rows",
    "read_judge_metrics",
]
