"""Load SQuAD v1.1 / v2.0 questions from the official JSON files or from the hub, checked.

The official layout: ``{"version": ..., "data": [{"title": ..., "paragraphs": [{"context": ...,
"qas": [{"id": ..., "question": ..., "answers": [{"text": ..., "answer_start": ...}, ...],
"is_impossible": ...}]}]}]}``. The hub's datasets (``rajpurkar/squad`` and ``rajpurkar/squad_v2``,
the hub's ``squad`` and ``squad_v2``) are turned into that layout and pass the same checks.

What is refused (``SquadDataError``, before any compute; structural problems are listed together,
each with its place in the file, e.g. ``data[3].paragraphs[0].qas[7]``):

- a missing file, text that is not JSON (line and column named), a layout other than the above,
  an empty ``context``, ``question`` or ``id``, a non-integer ``answer_start``, duplicate ids;
- an unanswerable question (no answers, or ``is_impossible``) in a v1.1 run: the file is v2.0 data;
- in v2.0, ``is_impossible: true`` with answers, or ``is_impossible: false`` without any;
- a split without questions (an empty dev file, or a train file whose questions were all skipped).

An answer whose text is not at its ``answer_start`` in the context is **counted and reported**
(a warning with the count and the first ids): a train question with such an answer is skipped
(training would point at the wrong tokens); a dev question is kept, since the official
evaluation compares answer texts only and never reads ``answer_start``. With ``strict=True``
(``--strict_answers``) any misplaced answer is refused instead.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

VERSIONS = ("1.1", "2.0")
HUB_DATASETS = {"1.1": "rajpurkar/squad", "2.0": "rajpurkar/squad_v2"}  # the hub's `squad` and `squad_v2`
HUB_SPLITS = {"train": "train", "dev": "validation"}
_SHOWN = 8  # problems (or ids) listed in one message


class SquadDataError(ValueError):
    """SQuAD data that cannot be used; the message names the file, the place in it and what to fix."""


@dataclass(frozen=True)
class Answer:
    text: str
    start: int  # character offset of ``text`` in the context


@dataclass(frozen=True)
class SquadExample:
    """One question about one paragraph."""

    id: str
    title: str
    context: str
    question: str
    answers: tuple[Answer, ...]  # empty for an unanswerable (v2.0) question
    is_impossible: bool = False

    @property
    def misplaced_answers(self) -> list[Answer]:
        """The answers whose text is not at their ``answer_start`` in the context."""
        return [a for a in self.answers if not (0 <= a.start and self.context[a.start:a.start + len(a.text)] == a.text)]


def check_version(version: str) -> str:
    if version not in VERSIONS:
        raise SquadDataError(f"SQuAD version {version!r}: choose 1.1 or 2.0")
    return version


def load_squad(version: str, split: str, data_file: str | Path | None = None,
               strict: bool = False) -> list[SquadExample]:
    """The questions of ``split`` ("train" or "dev"): from ``data_file`` (official JSON), else from
    the hub. Checked as the module docstring says."""
    check_version(version)
    if split not in HUB_SPLITS:
        raise SquadDataError(f"split {split!r}: choose train or dev")
    if data_file is not None:
        source = str(data_file)
        document = read_json(Path(data_file), split)
    else:
        source = f"{HUB_DATASETS[version]} ({HUB_SPLITS[split]})"
        document = _hub_document(version, split)
    examples = parse_document(document, version, source)
    return check_answers(examples, split, source, strict)


def read_json(path: Path, split: str) -> Any:
    """The parsed file; SquadDataError for a missing, empty or non-JSON file."""
    if not path.is_file():
        raise SquadDataError(f"SQuAD {split} file {path} does not exist")
    text = path.read_text(encoding="utf-8-sig")
    if not text.strip():
        raise SquadDataError(f"SQuAD {split} file {path} is empty; expected the official JSON layout "
                             '{"data": [{"title", "paragraphs": [{"context", "qas": [...]}]}]}')
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise SquadDataError(f"{path}, line {err.lineno} column {err.colno}: not valid JSON ({err.msg})") from None


def _hub_document(version: str, split: str) -> dict[str, Any]:
    """A hub split in the official layout (one paragraph per row: the hub repeats contexts)."""
    import datasets

    name, hub_split = HUB_DATASETS[version], HUB_SPLITS[split]
    try:
        rows = datasets.load_dataset(name, split=hub_split)
    except Exception as err:  # network, cache and hub errors alike: the fix is the same
        raise SquadDataError(f"could not load {name} ({hub_split}) from the hub ({type(err).__name__}: {err}); "
                             "without hub access pass the official JSON files (--train_file, --validation_file)"
                             ) from err
    return {"data": [{"title": row["title"], "paragraphs": [{"context": row["context"], "qas": [{
        "id": row["id"], "question": row["question"],
        "answers": [{"text": t, "answer_start": s} for t, s in zip(row["answers"]["text"],
                                                                   row["answers"]["answer_start"])]}]}]}
        for row in rows]}


def parse_document(document: Any, version: str, source: str) -> list[SquadExample]:
    """Every question of a parsed SQuAD document; SquadDataError listing every structural problem."""
    problems: list[str] = []
    examples = list(_walk(document, version, problems))
    seen: dict[str, int] = {}
    for example in examples:
        seen[example.id] = seen.get(example.id, 0) + 1
    duplicates = [qid for qid, count in seen.items() if count > 1]
    if duplicates:
        problems.append(f"{len(duplicates)} question id(s) appear more than once (predictions are keyed by id): "
                        f"{', '.join(map(repr, duplicates[:_SHOWN]))}")
    if problems:
        shown = "\n".join(f"  - {p}" for p in problems[:_SHOWN])
        more = f"\n  ... and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else ""
        raise SquadDataError(f"{source}: not usable as SQuAD {version} data ({len(problems)} problem(s)):\n"
                             f"{shown}{more}")
    if not examples:
        raise SquadDataError(f"{source}: no questions in it; give a file with at least one question")
    return examples


def _walk(document: Any, version: str, problems: list[str]) -> Iterator[SquadExample]:
    articles = document.get("data") if isinstance(document, dict) else None
    if not isinstance(articles, list):
        problems.append('the top level must be an object with a "data" list (the official SQuAD layout)')
        return
    for a, article in enumerate(articles):
        where = f"data[{a}]"
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            problems.append(f'{where}: expected an object with a "paragraphs" list')
            continue
        title = article.get("title", "")
        for p, paragraph in enumerate(paragraphs):
            here = f"{where}.paragraphs[{p}]"
            if not isinstance(paragraph, dict) or not isinstance(paragraph.get("qas"), list):
                problems.append(f'{here}: expected an object with "context" and a "qas" list')
                continue
            context = paragraph.get("context")
            if not isinstance(context, str) or not context.strip():
                problems.append(f"{here}.context: expected a non-empty string, got {context!r:.40}")
                continue
            for q, qa in enumerate(paragraph["qas"]):
                example = _question(qa, f"{here}.qas[{q}]", str(title), context, version, problems)
                if example is not None:
                    yield example


def _question(qa: Any, where: str, title: str, context: str, version: str,
              problems: list[str]) -> SquadExample | None:
    """One question, or None with its problems added."""
    if not isinstance(qa, dict):
        problems.append(f"{where}: expected an object, got {type(qa).__name__}")
        return None
    found = len(problems)
    for key in ("id", "question"):
        if not isinstance(qa.get(key), str) or not qa[key].strip():
            problems.append(f"{where}.{key}: expected a non-empty string, got {qa.get(key)!r:.40}")
    answers = _answers(qa.get("answers", []), where, problems)
    impossible = qa.get("is_impossible", not answers if version == "2.0" else False)
    if not isinstance(impossible, bool):
        problems.append(f"{where}.is_impossible: expected true or false, got {impossible!r}")
    elif version == "1.1" and (impossible or not answers) and len(problems) == found:
        problems.append(f"{where} (id {qa.get('id')!r}): an unanswerable question; SQuAD 1.1 has none: this is "
                        "v2.0 data (--version 2.0)")
    elif version == "2.0" and impossible and answers:
        problems.append(f"{where}: is_impossible is true but it has {len(answers)} answer(s)")
    elif version == "2.0" and not impossible and not answers and len(problems) == found:
        problems.append(f"{where}: is_impossible is false but it has no answer")
    if len(problems) > found:
        return None
    return SquadExample(qa["id"], title, context, qa["question"], tuple(answers), bool(impossible))


def _answers(items: Any, where: str, problems: list[str]) -> list[Answer]:
    if not isinstance(items, list):
        problems.append(f"{where}.answers: expected a list, got {type(items).__name__}")
        return []
    out = []
    for i, item in enumerate(items):
        text = item.get("text") if isinstance(item, dict) else None
        start = item.get("answer_start") if isinstance(item, dict) else None
        if not isinstance(text, str) or not text.strip():
            problems.append(f"{where}.answers[{i}].text: expected a non-empty string, got {text!r:.40}")
        elif isinstance(start, bool) or not isinstance(start, int):
            problems.append(f"{where}.answers[{i}].answer_start: expected an integer, got {start!r:.40}")
        else:
            out.append(Answer(text, start))
    return out


def check_answers(examples: list[SquadExample], split: str, source: str, strict: bool) -> list[SquadExample]:
    """Count answers whose text is not at ``answer_start``: refuse (``strict``), skip (train: the
    position training points at would be wrong) or keep (dev: evaluation compares texts); report."""
    misplaced = [e for e in examples if e.misplaced_answers]
    if not misplaced:
        return examples
    first, answer = misplaced[0], misplaced[0].misplaced_answers[0]
    detail = (f"{len(misplaced)} of {len(examples)} question(s) in {source} have an answer whose text is not at "
              f"its answer_start (first: id {first.id!r}, answer {answer.text!r} at {answer.start}, the context "
              f"there reads {first.context[max(answer.start, 0):answer.start + len(answer.text)]!r})")
    if strict:
        raise SquadDataError(f"{detail}; fix the offsets, or drop --strict_answers to skip such train questions")
    if split == "dev":
        log.warning("%s; kept: the evaluation compares answer texts only", detail)
        return examples
    kept = [e for e in examples if not e.misplaced_answers]
    if not kept:
        raise SquadDataError(f"{detail}: no train question left; the offsets do not belong to these contexts")
    ids = ", ".join(repr(e.id) for e in misplaced[:_SHOWN])
    log.warning("%s; skipped them (ids %s%s)", detail, ids, ", ..." if len(misplaced) > _SHOWN else "")
    return kept


def gold_answers(examples: list[SquadExample]) -> dict[str, list[str]]:
    """id -> the gold answer texts (empty for an unanswerable question), as the evaluation reads them."""
    return {e.id: [a.text for a in e.answers] for e in examples}
