"""Small SQuAD-format files written by the tests, and the project's SentencePiece tokenizer
trained offline on the English fixture corpus."""

from __future__ import annotations

import json
from pathlib import Path

from data.english import DOCUMENTS

SENTENCES = [sentence for document in DOCUMENTS for paragraph in document for sentence in paragraph]


def qa(qid: str, question: str, context: str, *answers: str, impossible: bool | None = None) -> dict:
    """A question whose answers are located by their first occurrence in ``context``."""
    item = {"id": qid, "question": question,
            "answers": [{"text": a, "answer_start": context.index(a)} for a in answers]}
    if impossible is not None:
        item["is_impossible"] = impossible
    return item


def document(paragraphs: list[tuple[str, list[dict]]], version: str = "1.1") -> dict:
    """The official layout: one article holding the given (context, questions) paragraphs."""
    return {"version": version, "data": [{"title": "Fixture", "paragraphs": [
        {"context": context, "qas": questions} for context, questions in paragraphs]}]}


def write_json(path: Path, content) -> Path:
    path.write_text(json.dumps(content) if not isinstance(content, str) else content, encoding="utf-8")
    return path


def code_word_document(count: int, offset: int = 0, version: str = "1.1", unanswerable: int = 0) -> dict:
    """``count`` questions "what is the code word?" about contexts of fixture sentences with
    "the code word is zebra." put at a different place each time (so the answer falls in
    different windows); the last ``unanswerable`` contexts lack the phrase (v2.0)."""
    paragraphs = []
    for i in range(count):
        sentences = [SENTENCES[(offset + i + j) % len(SENTENCES)] for j in range(3)]
        qid = f"q{offset + i}"
        if i >= count - unanswerable:
            context = " ".join(sentences)
            paragraphs.append((context, [qa(qid, "What is the code word?", context, impossible=True)]))
            continue
        sentences.insert(i % 4, "The code word is zebra.")
        context = " ".join(sentences)
        extra = {"impossible": False} if version == "2.0" else {}
        paragraphs.append((context, [qa(qid, "What is the code word?", context, "zebra", **extra)]))
    return document(paragraphs, version)


def train_fixture_tokenizer(output_dir: Path):
    """The project's ALBERT-style SentencePiece tokenizer on the fixture corpus and the code word."""
    from widenet_ds.data import train_tokenizer

    texts = [[s] for s in SENTENCES] + [["The code word is zebra. What is the code word?"]] * 20
    return train_tokenizer(texts, output_dir, vocab_size=300)
