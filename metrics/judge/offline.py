"""Judging a result bundle offline, after ``test``: ``python -m editbench judge --bundle DIR``.

One judge pass over the bundle's images serves every aggregation, and no GPU waits on HTTP.
The bundle (:mod:`metrics.bundle`) is read and verified against its manifest; for each sample
of ``inputs.jsonl`` the judge answers VIEScore's SC prompt on ``[sources/<id>.png,
images/<id>.png]`` with the instruction and the PQ prompt on ``images/<id>.png``. Written into
the bundle:

- ``judge.jsonl``: one :class:`~metrics.judge.record.JudgeRecord` per sample and prompt;
- ``samples.jsonl``: per sample and aggregation (those the sample's rows already have), rows
  ``VIEScore_SC``, ``VIEScore_PQ``, ``VIEScore_O`` (value null where the sample failed: missing,
  never 0) and ``VIEScore_failure_rate`` (1 failed, 0 judged; its mean is the failure rate),
  all reduced by ``mean``, so the report recomputes them and bootstraps their intervals;
- ``judge_metrics.json`` (:data:`JUDGE_METRICS`): the aggregates keyed as in
  ``test_metrics.json`` (``metrics``), the default aggregation's values as the table shows
  them (``table``, scaled as the run's protocol scales VIEScore) with their ``scale``, the
  summary over all samples (means over the judged ones, ``n_judged``, ``failures``,
  ``failure_rate``) and the judge's description (no credentials);
- ``manifest.json`` rehashed for the three files.

``only_failed=True`` asks again only the prompts whose record has ``failed: true`` and the
samples without a record; every other line of ``judge.jsonl`` is kept byte for byte.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metrics.bundle import (
    IMAGES,
    RESULTS,
    SAMPLES,
    SOURCES,
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
from metrics.judge.judges import Judge
from metrics.judge.prompts import KINDS, PromptSet
from metrics.judge.record import (
    RECORDS,
    JudgeRecord,
    SampleScore,
    read_records,
    sample_scores,
    summarize,
    write_records,
)

JUDGE_METRICS = "judge_metrics.json"
JUDGE_FORMAT = "editbench.judge_metrics/1"
#: The per-sample rows the judge adds (summary key -> metric name).
METRIC_NAMES = {"SC": "VIEScore_SC", "PQ": "VIEScore_PQ", "O": "VIEScore_O"}
FAILURE_RATE = "VIEScore_failure_rate"
ROW_METRICS = (*METRIC_NAMES.values(), FAILURE_RATE)


@dataclass
class JudgedBundle:
    """What one judge pass did: the records, the per-sample scores, the summary and the
    number of prompts asked (cache hits included) in this pass."""

    folder: Path
    records: list[JudgeRecord]
    scores: list[SampleScore]
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
    todo: Sequence[tuple[str, str]],
    judge: Judge,
    prompts: PromptSet,
) -> list[Request]:
    requests = []
    loaded: dict[tuple[str, str], tuple[Any, bytes]] = {}

    def image(sample: str, kind: str) -> tuple[Any, bytes]:
        if (sample, kind) not in loaded:
            picture = load_image(_image_path(folder, bundle, sample, kind), judge.image_size)
            loaded[(sample, kind)] = (picture, encode_image(picture, judge.image_format))
        return loaded[(sample, kind)]

    for sample, kind in todo:
        instruction = str(inputs[sample]["instruction"])
        edit, edit_bytes = image(sample, IMAGES)
        if kind == "SC":
            source, source_bytes = image(sample, SOURCES)
            prompt = prompts.sc(instruction)
            requests.append(
                Request(sample, kind, prompt, (source, edit), (source_bytes, edit_bytes),
                        instruction)  # fmt: skip
            )
        else:
            requests.append(
                Request(sample, kind, prompts.pq_prompt, (edit,), (edit_bytes,), instruction)
            )
    return requests


def _record(judge: Judge, prompts: PromptSet, request: Request, outcome: Any) -> JudgeRecord:
    failed = outcome.scores is None
    return JudgeRecord(
        id=str(request.sample),
        kind=request.kind,
        backend=judge.backend,
        model=judge.model_id,
        prompt_set=prompts.name,
        prompt_sha256=prompts.sha256,
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
    bundle: Bundle, inputs: dict[str, dict], scores: Sequence[SampleScore], aggregation: str
) -> list[dict[str, Any]]:
    """The :data:`ROW_METRICS` rows: per sample, one per aggregation its model rows have
    (``aggregation`` for a sample without rows)."""
    keys: dict[str, dict[tuple, dict]] = {}
    for row in bundle.rows:
        if row["system"] == "model" and row["metric"] not in ROW_METRICS:
            key = (row["aggregation"], row.get("dataset"), row.get("session"), row.get("turn"))
            keys.setdefault(str(row["id"]), {}).setdefault(key, row)
    out = []
    for score in scores:
        found = keys.get(score.id)
        if not found:
            given = inputs[score.id]
            found = {(aggregation, given.get("dataset"), given.get("session"), given.get("turn")): {}}
        values = {
            METRIC_NAMES["SC"]: score.sc,
            METRIC_NAMES["PQ"]: score.pq,
            METRIC_NAMES["O"]: score.o,
            FAILURE_RATE: 1.0 if score.failed else 0.0,
        }
        for agg, dataset, session, turn in found:
            for metric, value in values.items():
                out.append(
                    {"id": score.id, "dataset": dataset, "session": session, "turn": turn,
                     "aggregation": agg, "system": "model", "metric": metric, "value": value}
                )  # fmt: skip
    return out


def _scale(protocol: dict[str, Any], name: str) -> float:
    """The table multiplier of ``name`` in the run's protocol (as the evaluator scales it)."""
    from metrics.protocols import get_protocol

    if name == FAILURE_RATE:
        return 1.0
    try:
        return float(get_protocol(str(protocol.get("name"))).scale_of(name))
    except ValueError:
        scale = protocol.get("scale") or {}
        return float(scale.get(name, scale.get("VIEScore", 1.0)))


def judge_bundle(
    folder: str | Path,
    judge: Judge,
    prompts: PromptSet,
    *,
    only_failed: bool = False,
    cache: AnswerCache | None = None,
    num_threads: int = 4,
    retry_delay: float = 1.0,
) -> JudgedBundle:
    """Judge the bundle in ``folder`` and write the judge's files into it (module docstring)."""
    folder = Path(folder)
    bundle = _verified_bundle(folder)
    inputs = read_inputs(folder)
    ids = sorted(inputs)
    kept: dict[tuple[str, str], tuple[JudgeRecord, str]] = {}
    if only_failed and (folder / RECORDS).is_file():
        current = (judge.backend, judge.model_id, prompts.sha256, judge.settings())
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
    todo = [(i, k) for i in ids for k in KINDS if (i, k) not in kept]
    requests = _requests(folder, bundle, inputs, todo, judge, prompts)
    outcomes = (
        answer_requests(
            judge, prompts, requests, cache, num_threads=num_threads, retry_delay=retry_delay
        )
        if requests
        else []
    )
    new = {
        (r.sample, r.kind): _record(judge, prompts, r, o)
        for r, o in zip(requests, outcomes, strict=True)
    }
    records, lines = [], []
    for key in ((i, k) for i in ids for k in KINDS):
        record, line = kept[key] if key in kept else (new[key], None)
        records.append(record)
        lines.append(line if line is not None else record)
    write_records(folder / RECORDS, lines)

    scores = sample_scores(records, ids)
    summary = summarize(scores)
    document = json.loads((folder / RESULTS).read_text())
    protocol = document.get("protocol") or {}
    ours = judge_rows(bundle, inputs, scores, str(protocol.get("aggregation", "all")))
    rows = [r for r in bundle.rows if r["metric"] not in ROW_METRICS] + ours
    write_samples(folder / SAMPLES, rows)
    reductions = {name: "mean" for name in ROW_METRICS}
    metrics = recompute(Bundle(folder, {"reductions": reductions}, ours), protocol)
    scale = {name: _scale(protocol, name) for name in ROW_METRICS}
    table = {}  # the default aggregation's values, scaled (test_metrics.json's `table`)
    for name in ROW_METRICS:
        value = metrics.get(f"test/{name}")
        table[name] = None if value is None or value != value else value * scale[name]
    reported = sorted({r.model_reported for r in records if r.model_reported})
    judged = {
        "format": JUDGE_FORMAT,
        "judge": {**judge.describe(), **prompts.describe(), "models_reported": reported},
        "aggregation": protocol.get("aggregation", "all"),
        "columns": list(ROW_METRICS),
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
        recomputable=ROW_METRICS,
        num_rows=len(rows),
    )
    return JudgedBundle(folder, records, scores, summary, len(requests))


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
