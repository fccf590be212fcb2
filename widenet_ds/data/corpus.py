"""Raw text corpora, read from local files or a Hugging Face dataset and streamed as documents.

A *document* is a list of sentences (``list[str]``). Nothing is loaded whole: files are read
line by line (Parquet in record batches, hub datasets with ``streaming=True``).

How text becomes documents
--------------------------
Line-oriented text (``.txt`` and ``.txt.gz`` files; table or hub records read with
``CorpusFormat(records="lines")``, as wikitext stores them):

- lines are stripped; consecutive non-blank lines form a paragraph, which is cut into
  sentences by :func:`split_sentences`. A line that ends with ``.``, ``!`` or ``?`` ends a
  sentence; any other line break is read as a space, so wrapped book paragraphs work;
- a document ends at a run of ``blank_lines_between_documents`` blank lines (default 2:
  single blank lines only separate paragraphs, as in books), at a title line
  ``= Title =`` (wikitext article titles) and at the end of the file. Section headings
  ``= = Section = =`` are dropped;
- ALBERT-format files (one sentence per line, one blank line between documents) therefore
  need ``CorpusFormat(blank_lines_between_documents=1)``.

Record-oriented text (``.jsonl``, ``.parquet`` and hub datasets, ``records="documents"``, the
default): the text field of each record is one document, its paragraphs cut into sentences
the same way.

Any document longer than ``max_sentences_per_document`` sentences is cut into several, which
bounds memory on text without document boundaries.

Errors: :func:`check_sources` (run when a :class:`Corpus` is built, before any heavy work)
reports every missing, unreadable, undecodable or unsupported file in one :class:`CorpusError`.
While streaming, a single bad line (invalid JSON, bytes that are not UTF-8, a record without
text) is skipped, logged with its ``file:line`` and counted in :class:`CorpusStats`.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import itertools
import json
import logging
import re
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from ..config import ConfigError

logger = logging.getLogger(__name__)

Document = list[str]  # the sentences of one document, in order

SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".parquet")
_HEAD_BYTES = 64 * 1024  # how much of each text file check_sources reads
_HEAD_RECORDS = 20  # how many lines of each JSON-lines file check_sources reads
_WARNINGS_PER_FILE = 5  # skipped lines logged one by one per file; later ones are only counted


class CorpusError(ValueError):
    """Sources that cannot be read as a corpus. The message lists every problem found."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else problems
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"cannot read the corpus ({len(self.problems)} problem(s)):\n{lines}")


@dataclass(frozen=True)
class CorpusFormat:
    """How records and lines become documents (see the module docstring)."""

    text_field: str = "text"  # .jsonl key, .parquet column or hub dataset column holding the text
    records: str = "documents"  # "documents": one record is one document; "lines": one record is one line
    blank_lines_between_documents: int = 2  # in line-oriented text, this many blank lines end a document
    max_sentences_per_document: int = 10_000  # longer documents are cut (bounds memory)

    def validate(self) -> None:
        problems = []
        if not self.text_field:
            problems.append("text_field must name the field holding the text, got an empty string")
        if self.records not in ("documents", "lines"):
            problems.append(f"records must be 'documents' or 'lines', got {self.records!r}")
        for name in ("blank_lines_between_documents", "max_sentences_per_document"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{name} must be an integer >= 1, got {value!r}")
        if problems:
            raise ConfigError("CorpusFormat", problems)


@dataclass(frozen=True)
class HubSource:
    """A dataset read with ``datasets.load_dataset(name, config, split=..., streaming=True)``.

    Local files also work through the generic builders, e.g.
    ``HubSource("json", data_files="corpus/*.jsonl")``. Pin ``revision`` for reproducible caches:
    the cache key cannot see changes on the hub.
    """

    name: str  # hub id ("Salesforce/wikitext") or builder ("json", "parquet", "text")
    config: str | None = None  # configuration name ("wikitext-103-raw-v1")
    split: str = "train"
    data_files: str | list[str] | None = None  # for the generic builders
    revision: str | None = None  # git revision on the hub


# Hub datasets whose rows are lines of text files rather than documents: read them with
# CorpusFormat(records="lines") (wikitext rows are the lines of its articles, titles included).
LINE_DATASETS = frozenset({"wikitext", "Salesforce/wikitext"})


@dataclass
class CorpusStats:
    """Counters of one pass over a corpus."""

    documents: int = 0
    sentences: int = 0
    skipped_lines: int = 0  # bad lines or records, skipped
    skipped_by_source: dict[str, int] = field(default_factory=dict)  # file (or dataset) -> skipped lines

    def skip_line(self, source: str, line: int, reason: str) -> None:
        """Count a skipped line; log the first few of each source with their ``file:line``."""
        count = self.skipped_by_source.get(source, 0) + 1
        self.skipped_by_source[source] = count
        self.skipped_lines += 1
        if count <= _WARNINGS_PER_FILE:
            logger.warning("%s:%d: skipped (%s)", source, line, reason)
        elif count == _WARNINGS_PER_FILE + 1:
            logger.warning("%s:%d: skipped (%s); further skipped lines of this source are only counted",
                           source, line, reason)


# ---------------------------------------------------------------------------------------------
# Sentences and documents


_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof st jr sr vs no nos fig figs mt gen col lt sgt capt rev inc ltd co corp dept est vol "
    "approx jan feb mar apr jun jul aug sep sept oct nov dec e.g i.e cf al u.s u.k".split())
# Sentence-final punctuation (and closing quotes/brackets), then either a line break or
# whitespace before something that can start a sentence (capital, digit, opening quote).
_BOUNDARY = re.compile(r"""[.!?]+["'”’)\]]*(?:[ \t]*\n\s*|\s+(?=["'“‘(\[]*[A-Z0-9]))""")


def _is_abbreviation(text_before_period: str) -> bool:
    """True if the word right before a period is an abbreviation ("Dr") or an initial ("J")."""
    if not text_before_period or text_before_period[-1].isspace():
        return False
    word = text_before_period.rsplit(maxsplit=1)[-1].lstrip("\"'“‘([")
    return word.lower() in _ABBREVIATIONS or (len(word) == 1 and word.isalpha())


def split_sentences(text: str) -> list[str]:
    """Cut text into sentences with a small regex splitter (no model, English-oriented).

    A sentence ends at ``.``, ``!`` or ``?`` (plus closing quotes or brackets) followed by a
    line break, or by whitespace and a capital letter, digit or opening quote. A single period
    after a known abbreviation ("Dr.", "e.g.") or an initial ("J.") does not end a sentence.
    Whitespace inside a sentence is collapsed to single spaces.
    """
    sentences = []
    start = 0
    for match in _BOUNDARY.finditer(text):
        punctuation = match.group(0).rstrip()
        if punctuation.startswith(".") and not punctuation.startswith("..") \
                and _is_abbreviation(text[start:match.start()]):
            continue
        sentences.append(text[start:match.start() + len(punctuation)])
        start = match.end()
    sentences.append(text[start:])
    return [" ".join(s.split()) for s in sentences if s.strip()]


def _heading_kind(line: str) -> str | None:
    """'title' for ``= Title =``, 'section' for ``= = Section = =``, else None (``line`` is stripped)."""
    if len(line) < 5 or not (line.startswith("= ") and line.endswith(" =")):
        return None
    return "section" if line.startswith("= =") else "title"


class _DocumentBuilder:
    """Collects paragraphs into one document, cutting it at ``max_sentences``."""

    def __init__(self, max_sentences: int):
        self.max_sentences = max_sentences
        self.sentences: Document = []

    def add_paragraph(self, lines: list[str]) -> Iterator[Document]:
        """Add a paragraph; yields a document whenever one reaches ``max_sentences``."""
        for sentence in split_sentences("\n".join(lines)):
            self.sentences.append(sentence)
            if len(self.sentences) >= self.max_sentences:
                yield from self.finish()

    def finish(self) -> Iterator[Document]:
        """Yield the current document, if it has any sentence, and start a new one."""
        if self.sentences:
            yield self.sentences
        self.sentences = []


def documents_from_lines(lines: Iterable[str], fmt: CorpusFormat) -> Iterator[Document]:
    """Documents of line-oriented text (the rules are in the module docstring)."""
    builder = _DocumentBuilder(fmt.max_sentences_per_document)
    paragraph: list[str] = []
    blank_run = 0
    for raw in lines:
        line = raw.strip()
        heading = _heading_kind(line)
        if line and not heading:
            paragraph.append(line)
            blank_run = 0
            if len(paragraph) == fmt.max_sentences_per_document:  # bounds memory on text without blank lines
                yield from builder.add_paragraph(paragraph)
                paragraph = []
            continue
        yield from builder.add_paragraph(paragraph)
        paragraph = []
        blank_run = 0 if heading else blank_run + 1
        if heading == "title" or blank_run == fmt.blank_lines_between_documents:
            yield from builder.finish()
    yield from builder.add_paragraph(paragraph)
    yield from builder.finish()


def documents_from_text(text: str, fmt: CorpusFormat) -> Iterator[Document]:
    """The document held by one record (cut only if longer than ``max_sentences_per_document``)."""
    builder = _DocumentBuilder(fmt.max_sentences_per_document)
    for paragraph in re.split(r"\n\s*\n", text):
        yield from builder.add_paragraph(paragraph.split("\n"))
    yield from builder.finish()


# ---------------------------------------------------------------------------------------------
# Checking sources before reading them


def _kind(path: Path) -> str | None:
    """The suffix of ``SUFFIXES`` that ``path`` has, or None."""
    name = path.name.lower()
    return next((s for s in SUFFIXES if name.endswith(s)), None)


def _open_binary(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _expand(pattern: str | Path) -> list[Path]:
    """Files named by a path or a glob (``**`` allowed), sorted."""
    text = str(pattern)
    if glob.has_magic(text):
        return sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
    return [Path(text)] if Path(text).is_file() else []


def _head_lines(path: Path) -> list[bytes]:
    """The complete lines in the first 64 KiB of a (decompressed) file."""
    with _open_binary(path) as handle:
        head = handle.read(_HEAD_BYTES)
    lines = head.split(b"\n")
    return lines if len(head) < _HEAD_BYTES else lines[:-1] or lines


def _head_records(path: Path) -> list[bytes]:
    """The first lines of a JSON-lines file, each whole (a record may be longer than 64 KiB)."""
    with _open_binary(path) as handle:
        return list(itertools.islice(handle, _HEAD_RECORDS))


def _decodes(line: bytes) -> bool:
    try:
        line.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _text_problem(path: Path, lines: list[bytes]) -> str | None:
    """Why a text file does not look like UTF-8 text, or None."""
    if any(b"\x00" in line for line in lines):
        return f"{path}: contains NUL bytes, so it is binary or UTF-16, not UTF-8 text; convert it to UTF-8"
    bad = sum(not _decodes(line) for line in lines)
    if bad * 2 > len(lines):
        return (f"{path}: {bad} of its first {len(lines)} lines are not valid UTF-8; convert the file "
                f"(e.g. `iconv -f latin1 -t utf-8`)")
    return None


def _jsonl_problem(path: Path, lines: list[bytes], text_field: str) -> str | None:
    """Why a .jsonl file cannot give text from ``text_field``, or None."""
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    if not records and any(line.strip() for line in lines):
        return (f"{path}: none of its first {len(lines)} lines is a JSON object; a .jsonl file needs one "
                f"JSON object per line")
    if records and not any(isinstance(r.get(text_field), str) for r in records):
        keys = sorted({k for r in records for k in r})
        return (f"{path}: no record has a string field '{text_field}' (fields found: {', '.join(keys)}); "
                f"set CorpusFormat(text_field=...)")
    return None


def _parquet_problem(path: Path, text_field: str) -> str | None:
    """Why a .parquet file cannot give text from column ``text_field``, or None."""
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as error:  # pyarrow raises several types for a damaged file
        return f"{path}: not a readable Parquet file ({error})"
    if text_field not in schema.names:
        return (f"{path}: no column '{text_field}' (columns: {', '.join(schema.names)}); "
                f"set CorpusFormat(text_field=...)")
    return None


def _file_problem(path: Path, fmt: CorpusFormat) -> str | None:
    """Why a file cannot be read as part of the corpus, or None."""
    kind = _kind(path)
    if kind is None:
        return f"{path}: unsupported file type; use one of {', '.join(SUFFIXES)}"
    if kind == ".parquet":
        return _parquet_problem(path, fmt.text_field)
    is_jsonl = kind.startswith(".jsonl")
    try:
        lines = _head_records(path) if is_jsonl else _head_lines(path)
    except (OSError, EOFError, zlib.error) as error:
        return f"{path}: cannot be read ({error}); check its permissions and, for .gz, that it is gzip"
    return _jsonl_problem(path, lines, fmt.text_field) if is_jsonl else _text_problem(path, lines)


def _is_empty(path: Path) -> bool:
    """True for a file with no bytes (for .gz, no bytes once decompressed)."""
    if path.stat().st_size == 0:
        return True
    if path.name.lower().endswith(".gz"):
        with gzip.open(path, "rb") as handle:
            return not handle.read(1)
    return False


def check_sources(sources: Sequence[str | Path] | str | Path, fmt: CorpusFormat = CorpusFormat()) -> list[Path]:
    """Expand paths and globs to the corpus files, checking each one cheaply first.

    Reads the first 64 KiB of each text file, the first 20 lines of each JSON-lines file and
    the schema of each Parquet file. Empty files are skipped with a warning.

    Returns:
        The non-empty files, in the order given (each glob sorted, duplicates removed).

    Raises:
        CorpusError: listing every pattern that matches no file and every file that is
            unreadable, undecodable, of an unsupported type or lacks the text field; or
            when every file is empty.
    """
    patterns = [sources] if isinstance(sources, (str, Path)) else list(sources)
    if not patterns:
        raise CorpusError("no source given; pass file paths or globs such as 'corpus/*.txt'")
    files: dict[Path, None] = {}  # ordered set
    problems = []
    for pattern in patterns:
        matched = _expand(pattern)
        if not matched:
            where = "is a directory; use a glob such as 'dir/*.txt'" if Path(pattern).is_dir() \
                else f"matches no file (relative paths start at {Path.cwd()})"
            problems.append(f"'{pattern}' {where}")
        files.update(dict.fromkeys(matched))
    problems.extend(p for p in (_file_problem(f, fmt) for f in files) if p)
    if problems:
        raise CorpusError(problems)
    non_empty = [f for f in files if not _is_empty(f)]
    for empty in sorted(set(files) - set(non_empty)):
        logger.warning("%s: empty file, skipped", empty)
    if not non_empty:
        raise CorpusError(f"all {len(files)} source file(s) are empty: {', '.join(map(str, files))}")
    return non_empty


# ---------------------------------------------------------------------------------------------
# Reading


def _numbered_lines(path: Path, stats: CorpusStats) -> Iterator[tuple[int, str]]:
    """Decoded lines of a text file with their 1-based line numbers in the file (of the
    decompressed text for .gz); lines that are not UTF-8 are skipped and counted.

    The numbers come from the file, not from counting what is yielded, so a skipped line does
    not shift the ``file:line`` of later reports.
    """
    with _open_binary(path) as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                stats.skip_line(str(path), number, f"not valid UTF-8 at byte {error.start}")
                continue
            yield number, line.removeprefix("\ufeff") if number == 1 else line


def _text_lines(path: Path, stats: CorpusStats) -> Iterator[str]:
    """Decoded lines of a text file; lines that are not UTF-8 are skipped and counted."""
    return (line for _, line in _numbered_lines(path, stats))


def _jsonl_texts(path: Path, text_field: str, stats: CorpusStats) -> Iterator[str]:
    """The text field of each record of a JSON-lines file; bad lines are skipped and counted."""
    for number, line in _numbered_lines(path, stats):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as error:
            stats.skip_line(str(path), number, f"invalid JSON: {error}")
            continue
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            stats.skip_line(str(path), number, f"no string field '{text_field}'")
            continue
        yield text


def _parquet_texts(path: Path, text_field: str, stats: CorpusStats) -> Iterator[str]:
    """The text column of a Parquet file, read in record batches; null values are skipped and counted."""
    import pyarrow.parquet as pq

    row = 0
    for batch in pq.ParquetFile(path).iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            row += 1
            if isinstance(text, str):
                yield text
            else:
                stats.skip_line(str(path), row, f"column '{text_field}' is not a string ({text!r})")


def _hub_texts(source: HubSource, text_field: str, stats: CorpusStats) -> Iterator[str]:
    """The text column of a streamed hub dataset."""
    import datasets

    where = f"{source.name}{f'/{source.config}' if source.config else ''} ({source.split})"
    try:
        dataset = datasets.load_dataset(source.name, source.config, split=source.split, streaming=True,
                                        data_files=source.data_files, revision=source.revision)
    except Exception as error:  # datasets raises many types for a missing name, config or network
        raise CorpusError(f"cannot load dataset {where} ({type(error).__name__}: {error}); check the name, "
                          f"config, split and data_files, and that the hub is reachable or the dataset is "
                          f"in the local cache") from error
    for row, record in enumerate(dataset, start=1):
        if text_field not in record:
            raise CorpusError(f"dataset {where} has no column '{text_field}' (columns: "
                              f"{', '.join(record)}); set CorpusFormat(text_field=...)")
        text = record[text_field]
        if isinstance(text, str):
            yield text
        else:
            stats.skip_line(where, row, f"column '{text_field}' is not a string ({text!r})")


def _record_lines(texts: Iterable[str]) -> Iterator[str]:
    """The lines of records that are themselves lines (an empty record is a blank line)."""
    for text in texts:
        yield from text.splitlines() or [""]


class Corpus:
    """Documents streamed from local files or a hub dataset.

    Building a ``Corpus`` checks local files at once (:func:`check_sources`); iterating reads
    them. Each pass resets and fills :attr:`stats`.

    Args:
        sources: paths and globs of ``.txt``, ``.txt.gz``, ``.jsonl``, ``.jsonl.gz`` and
            ``.parquet`` files, or a :class:`HubSource`.
        fmt: how records and lines become documents.
    """

    def __init__(self, sources: Sequence[str | Path] | str | Path | HubSource, fmt: CorpusFormat = CorpusFormat()):
        fmt.validate()
        self.format = fmt
        self.hub = sources if isinstance(sources, HubSource) else None
        self.files = [] if self.hub else check_sources(sources, fmt)
        self.stats = CorpusStats()

    def __iter__(self) -> Iterator[Document]:
        self.stats = CorpusStats()
        for document in self._documents():
            self.stats.documents += 1
            self.stats.sentences += len(document)
            yield document

    def _documents(self) -> Iterator[Document]:
        if self.hub:
            yield from self._documents_of(_hub_texts(self.hub, self.format.text_field, self.stats))
            return
        for path in self.files:
            kind = _kind(path)
            if kind.startswith(".txt"):
                yield from documents_from_lines(_text_lines(path, self.stats), self.format)
            elif kind.startswith(".jsonl"):
                yield from self._documents_of(_jsonl_texts(path, self.format.text_field, self.stats))
            else:
                yield from self._documents_of(_parquet_texts(path, self.format.text_field, self.stats))

    def _documents_of(self, texts: Iterator[str]) -> Iterator[Document]:
        """Documents of records, following ``format.records``."""
        if self.format.records == "lines":
            yield from documents_from_lines(_record_lines(texts), self.format)
            return
        for text in texts:
            yield from documents_from_text(text, self.format)

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this corpus for caching: the format and each file's path, size and mtime."""
        if self.hub:
            source: Any = dataclasses.asdict(self.hub)
        else:
            source = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in self.files]
        return {"source": source, "format": dataclasses.asdict(self.format)}
