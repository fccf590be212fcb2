"""Shared builders for the data-pipeline tests."""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerBase

from widenet_ds.data import train_tokenizer

from .english import DOCUMENTS, book_text, sentences

VOCAB_SIZE = 300  # what the fixture text supports comfortably


def fixture_documents() -> list[list[str]]:
    """The fixture documents as the corpus reader returns them (lists of sentences)."""
    return [sentences(d) for d in DOCUMENTS]


def write_book(directory: Path, name: str = "book.txt") -> Path:
    """The fixture corpus as one book-like .txt file."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(book_text(), encoding="utf-8")
    return path


def make_tokenizer(directory: Path) -> PreTrainedTokenizerBase:
    """A small tokenizer trained on the fixture corpus."""
    return train_tokenizer(fixture_documents(), directory, vocab_size=VOCAB_SIZE)
