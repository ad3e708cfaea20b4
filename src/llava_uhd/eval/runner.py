"""Run a benchmark's items through a model in batches, resumably and in shards, then score them.

The items are cut into fixed batches in dataset order (batch ``k`` holds items ``k*B .. k*B+B-1``) and
shard ``I`` of ``N`` answers batches ``I, I+N, I+2N, ...``. Every item is therefore generated in the same
batch, beside the same neighbours, however the run is split or resumed, so a sharded or resumed run
writes exactly the answers of an uninterrupted one (left padding makes an answer depend, in the last
bits, on its batch). Answers are appended a batch at a time; ``resume`` keeps the complete batches of a
predictions file and answers the rest.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from llava_uhd.errors import EvalInputError
from llava_uhd.eval.benchmarks import EvalItem
from llava_uhd.eval.scoring import score

PREDICTIONS = "predictions.jsonl"
SCORES = "scores.json"
RUN = "run.json"


def shard_batches(
    items: Sequence[EvalItem], batch_size: int, num_shards: int, shard: int
) -> list[list[EvalItem]]:
    """The batches shard ``shard`` of ``num_shards`` answers, in order (module docstring)."""
    if batch_size < 1:
        raise EvalInputError(f"batch size must be >= 1, got {batch_size}")
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise EvalInputError(
            f"--shard must be in 0..{num_shards - 1} for --num-shards {num_shards}, got {shard}"
        )
    batches = [list(items[i : i + batch_size]) for i in range(0, len(items), batch_size)]
    return batches[shard::num_shards]


def predictions_path(output: Path, num_shards: int = 1, shard: int = 0) -> Path:
    """``predictions.jsonl``, or a shard's own file under ``shards/``."""
    if num_shards == 1:
        return output / PREDICTIONS
    return output / "shards" / f"predictions-{shard}-of-{num_shards}.jsonl"


def _read_records(path: Path) -> list[dict[str, Any]]:
    records = []
    if not path.is_file():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # the cut-off last line of a killed run
        if isinstance(record, dict) and "question_id" in record:
            records.append(record)
    return records


def completed_batches(path: Path, batches: Sequence[Sequence[EvalItem]]) -> int:
    """How many leading ``batches`` ``path`` holds in full; the file is cut back to exactly those."""
    records = {str(r["question_id"]): r for r in _read_records(path)}
    done = 0
    for batch in batches:
        if not all(str(item.question_id) in records for item in batch):
            break
        done += 1
    kept = [records[str(item.question_id)] for batch in batches[:done] for item in batch]
    _write_lines(path, kept)
    return done


def _write_lines(path: Path, records: Sequence[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def answer_items(
    answer: Callable[[Sequence[EvalItem]], list[tuple[str | None, str | None]]],
    batches: Sequence[Sequence[EvalItem]],
    path: Path,
    *,
    resume: bool,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Answer ``batches`` into ``path`` with ``answer`` (a batch -> ``(text, error)`` per item), skipping
    the complete batches already there when ``resume``; returns how many batches were skipped."""
    skipped = completed_batches(path, batches) if resume else 0
    if not resume:
        _write_lines(path, [])
    if progress is not None and skipped:
        progress(sum(len(b) for b in batches[:skipped]))
    with path.open("a", encoding="utf-8") as out:
        for batch in batches[skipped:]:
            for item, (text, error) in zip(batch, answer(batch), strict=True):
                record: dict[str, Any] = {"question_id": item.question_id, "prompt": item.prompt}
                record.update({"answer": text} if error is None else {"error": error})
                out.write(json.dumps(record) + "\n")
            out.flush()
            os.fsync(out.fileno())  # a kill loses at most the batch being written
            if progress is not None:
                progress(len(batch))
    return skipped


def merge_shards(
    output: Path, items: Sequence[EvalItem], batch_size: int, num_shards: int
) -> list[dict[str, Any]]:
    """The predictions of all ``num_shards`` shard files in dataset order, written to ``predictions.jsonl``.
    Every shard must be complete."""
    records: dict[str, dict[str, Any]] = {}
    for shard in range(num_shards):
        path = predictions_path(output, num_shards, shard)
        batches = shard_batches(items, batch_size, num_shards, shard)
        if not path.is_file():
            raise EvalInputError(f"{path}: shard {shard} of {num_shards} has not run")
        found = {str(r["question_id"]): r for r in _read_records(path)}
        wanted = [str(item.question_id) for batch in batches for item in batch]
        absent = [qid for qid in wanted if qid not in found]
        if absent:
            raise EvalInputError(
                f"{path}: shard {shard} of {num_shards} is incomplete ({len(absent)} of {len(wanted)} "
                "questions unanswered); rerun it with --resume"
            )
        records.update({qid: found[qid] for qid in wanted})
    ordered = [records[str(item.question_id)] for item in items]
    _write_lines(output / PREDICTIONS, ordered)
    return ordered


def write_scores(
    output: Path,
    metric: str,
    items: Sequence[EvalItem],
    records: Sequence[dict[str, Any]],
    run: dict[str, Any],
) -> dict[str, Any]:
    """Score ``records`` (errors count as missing answers) and write ``scores.json``: the run description
    ``run`` (model, preset, slicing, prompt convention, decoding), the counts and the metric's aggregate."""
    predictions = {str(r["question_id"]): r["answer"] for r in records if "answer" in r}
    aggregate, _ = score(metric, [item.truth for item in items], predictions)
    result = {
        **run,
        "counts": {
            "questions": len(items),
            "answered": len(predictions),
            "errors": sum("error" in r for r in records),
        },
        "scores": aggregate,
    }
    (output / SCORES).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def save_run(output: Path, run: dict[str, Any]) -> None:
    """Record the run's settings (``run.json``), atomically: shards started together all write it."""
    output.mkdir(parents=True, exist_ok=True)
    temporary = output / f".{RUN}.{os.getpid()}"
    temporary.write_text(json.dumps(run, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, output / RUN)


def load_run(output: Path) -> dict[str, Any] | None:
    """The settings recorded in ``run.json``, or None if there are none."""
    path = output / RUN
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def check_run(output: Path, run: dict[str, Any], why: str) -> None:
    """Refuse to resume or merge a run whose recorded settings differ from ``run`` (on ``run``'s keys)."""
    recorded = load_run(output)
    if recorded is None:
        return
    path = output / RUN
    run = json.loads(json.dumps(run))  # compare as recorded: tuples read back as lists
    changed = sorted(k for k in run if recorded.get(k) != run[k])
    if changed:
        raise EvalInputError(
            f"{path}: cannot {why} a run made with other settings (differ: {', '.join(changed)})"
        )
