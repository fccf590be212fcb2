"""Corpus reading: sentence splitting, document rules, formats, and errors a user can cause."""

import gzip
import json
import logging
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data.english import DOCUMENTS, albert_text, book_text, write_jsonl
from data.helpers import fixture_documents

from widenet_ds.config import ConfigError
from widenet_ds.data import (
    Corpus,
    CorpusError,
    CorpusFormat,
    HubSource,
    check_sources,
    split_sentences,
)


def test_split_sentences_keeps_abbreviations_initials_and_quotes_together():
    text = ('Dr. Amina Osei met Mr. J. R. Hale at 9 a.m. near St. Mary\'s. "Is it late?" she asked. '
            "It was 1987. Prices rose e.g. for bread! Nobody minded")
    assert split_sentences(text) == [
        "Dr. Amina Osei met Mr. J. R. Hale at 9 a.m. near St. Mary's.",
        '"Is it late?" she asked.',
        "It was 1987.",
        "Prices rose e.g. for bread!",
        "Nobody minded",
    ]


def test_split_sentences_treats_line_breaks_inside_a_sentence_as_spaces():
    assert split_sentences("The old bridge\nheld firm.\nthe water fell.") == [
        "The old bridge held firm.", "the water fell."]


def test_book_text_gives_one_document_per_double_blank_line(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text(book_text(), encoding="utf-8")
    corpus = Corpus([path])
    assert list(corpus) == fixture_documents()
    assert corpus.stats.documents == len(DOCUMENTS)
    assert corpus.stats.sentences == sum(len(d) for d in fixture_documents())


def test_single_blank_lines_separate_documents_when_configured(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text(book_text(), encoding="utf-8")
    paragraphs = [p for d in DOCUMENTS for p in d]
    assert list(Corpus([path], CorpusFormat(blank_lines_between_documents=1))) == paragraphs


def test_albert_format_with_one_sentence_per_line(tmp_path):
    path = tmp_path / "albert.txt"
    path.write_text(albert_text(), encoding="utf-8")
    assert list(Corpus([path], CorpusFormat(blank_lines_between_documents=1))) == fixture_documents()


def test_gzipped_text_and_globs(tmp_path):
    with gzip.open(tmp_path / "part-1.txt.gz", "wt", encoding="utf-8") as handle:
        handle.write(book_text(DOCUMENTS[:3]))
    (tmp_path / "part-2.txt").write_text(book_text(DOCUMENTS[3:]), encoding="utf-8")
    corpus = Corpus([tmp_path / "part-*.txt*"])
    assert [p.name for p in corpus.files] == ["part-1.txt.gz", "part-2.txt"]
    assert list(corpus) == fixture_documents()


def test_wikitext_style_lines_split_at_titles_and_drop_section_headings(tmp_path):
    lines = ["", " = Bread = ", "", " = = Baking = = ", "", " Good bread needs patience . It rises slowly . ", "",
             " = Lighthouses = ", "", " The keeper climbed the steps . ", ""]
    path = tmp_path / "wiki.jsonl"
    path.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines), encoding="utf-8")
    documents = list(Corpus([path], CorpusFormat(records="lines")))
    assert documents == [["Good bread needs patience .", "It rises slowly ."], ["The keeper climbed the steps ."]]


def test_jsonl_records_are_documents(tmp_path):
    assert list(Corpus([write_jsonl(tmp_path / "docs.jsonl")])) == fixture_documents()


def test_jsonl_records_longer_than_the_checked_head_are_accepted(tmp_path):
    long_text = " ".join([" ".join(s for d in fixture_documents() for s in d)] * 40)
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"text": long_text}) + "\n", encoding="utf-8")
    assert len(long_text) > 128 * 1024
    assert sum(len(d) for d in Corpus([path])) == 40 * sum(len(d) for d in fixture_documents())


def test_a_file_of_non_json_lines_is_rejected(tmp_path):
    path = tmp_path / "book.jsonl"
    path.write_text(book_text(), encoding="utf-8")
    with pytest.raises(CorpusError, match="book.jsonl: none of its first 20 lines is a JSON object"):
        Corpus([path])


def test_long_documents_are_cut(tmp_path):
    every_sentence = [s for d in fixture_documents() for s in d]
    records = Corpus([write_jsonl(tmp_path / "docs.jsonl")], CorpusFormat(max_sentences_per_document=4))
    (tmp_path / "no-blank-lines.txt").write_text("\n".join(every_sentence), encoding="utf-8")
    lines = Corpus([tmp_path / "no-blank-lines.txt"], CorpusFormat(max_sentences_per_document=4))
    for corpus in (records, lines):
        documents = list(corpus)
        assert max(len(d) for d in documents) == 4
        assert [s for d in documents for s in d] == every_sentence
    assert len(documents) == -(-len(every_sentence) // 4)


def test_bad_jsonl_lines_are_skipped_counted_and_logged(tmp_path, caplog):
    good = [json.dumps({"text": " ".join(p for p in d[0])}) for d in DOCUMENTS[:3]]
    path = tmp_path / "docs.jsonl"
    path.write_bytes("\n".join([good[0], '{"text": "unterminated', good[1], '{"title": "no text"}',
                                good[2]]).encode() + b"\n" + b'{"text": "caf\xe9 au lait"}\n')
    corpus = Corpus([path])
    with caplog.at_level(logging.WARNING, logger="widenet_ds.data.corpus"):
        documents = list(corpus)
    assert len(documents) == 3
    assert corpus.stats.skipped_lines == 3
    assert corpus.stats.skipped_by_source == {str(path): 3}
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert f"{path}:2" in logged and f"{path}:4" in logged and f"{path}:6" in logged


@pytest.mark.parametrize("name", ["docs.jsonl", "docs.jsonl.gz"])
def test_skip_reports_give_the_real_line_number_after_an_undecodable_line(tmp_path, caplog, name):
    good = [json.dumps({"text": " ".join(d[0])}) for d in DOCUMENTS[:3]]
    lines = [good[0], b'{"text": "caf\xe9"}', good[1], "{not json", "", '{"title": "no text"}', good[2]]
    data = b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines)
    path = tmp_path / name
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    with caplog.at_level(logging.WARNING, logger="widenet_ds.data.corpus"):
        documents = list(Corpus([path]))
    assert len(documents) == 3
    reported = [int(n) for n in re.findall(rf"{re.escape(str(path))}:(\d+): skipped", caplog.text)]
    assert reported == [2, 4, 6]  # the lines as an editor numbers them: the blank line 5 is not a record


def test_undecodable_text_lines_are_skipped(tmp_path, caplog):
    path = tmp_path / "book.txt"
    lines = book_text().encode().split(b"\n")
    lines[1:1] = [b"Caf\xe9 cr\xe8me is a line in Latin-1.", b"D\xe9j\xe0 vu."]
    path.write_bytes(b"\n".join(lines))
    corpus = Corpus([path])
    with caplog.at_level(logging.WARNING, logger="widenet_ds.data.corpus"):
        assert list(corpus) == fixture_documents()
    assert corpus.stats.skipped_lines == 2
    assert re.findall(rf"{re.escape(str(path))}:(\d+): skipped", caplog.text) == ["2", "3"]


def test_parquet_column_and_null_rows(tmp_path):
    texts = [" ".join(d) for d in fixture_documents()]
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"body": texts[:2] + [None] + texts[2:]}), path)
    corpus = Corpus([path], CorpusFormat(text_field="body"))
    assert list(corpus) == fixture_documents()
    assert corpus.stats.skipped_lines == 1


def test_hub_path_streams_a_local_dataset_through_load_dataset(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl")
    assert list(Corpus(HubSource("json", data_files=str(path)))) == fixture_documents()


def test_hub_load_failure_is_a_corpus_error(tmp_path):
    with pytest.raises(CorpusError, match="cannot load dataset json"):
        list(Corpus(HubSource("json", data_files=str(tmp_path / "missing" / "*.jsonl"))))


def test_missing_glob_and_bad_files_are_reported_together(tmp_path):
    (tmp_path / "notes.docx").write_text("not supported")
    (tmp_path / "utf16.txt").write_bytes("The river rose.\n".encode("utf-16"))
    with pytest.raises(CorpusError) as error:
        check_sources([tmp_path / "nothing-*.txt", tmp_path / "notes.docx", tmp_path / "utf16.txt"])
    message = str(error.value)
    assert len(error.value.problems) == 3
    assert "nothing-*.txt' matches no file" in message
    assert "notes.docx: unsupported file type" in message
    assert "utf16.txt: contains NUL bytes" in message


def test_a_gz_file_that_is_not_gzip_is_rejected(tmp_path):
    (tmp_path / "book.txt.gz").write_text(book_text(), encoding="utf-8")
    with pytest.raises(CorpusError, match="book.txt.gz: cannot be read .*gzip"):
        Corpus([tmp_path / "book.txt.gz"])


def test_a_directory_needs_a_glob(tmp_path):
    with pytest.raises(CorpusError, match="is a directory; use a glob"):
        check_sources(tmp_path)


def test_mostly_undecodable_file_is_rejected_before_reading(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("Caf\u00e9 cr\u00e8me.\nD\u00e9j\u00e0 vu.\n".encode("latin-1"))
    with pytest.raises(CorpusError, match="not valid UTF-8; convert the file"):
        Corpus([path])


def test_jsonl_without_the_text_field_names_the_fields_found(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"id": 1, "body": "The river rose."}) + "\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"no record has a string field 'text' \(fields found: body, id\)"):
        Corpus([path])


def test_parquet_without_the_text_column_names_the_columns(tmp_path):
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"body": ["The river rose."]}), path)
    with pytest.raises(CorpusError, match=r"no column 'text' \(columns: body\)"):
        Corpus([path])


def test_empty_files_are_skipped_but_an_empty_corpus_is_an_error(tmp_path, caplog):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(CorpusError, match="all 1 source file"):
        Corpus([tmp_path / "empty.txt"])
    (tmp_path / "book.txt").write_text(book_text(), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="widenet_ds.data.corpus"):
        corpus = Corpus([tmp_path / "*.txt"])
    assert [p.name for p in corpus.files] == ["book.txt"]
    assert "empty.txt: empty file, skipped" in caplog.text


def test_corpus_format_reports_every_bad_field():
    with pytest.raises(ConfigError) as error:
        CorpusFormat(records="paragraphs", blank_lines_between_documents=0).validate()
    assert len(error.value.problems) == 2
