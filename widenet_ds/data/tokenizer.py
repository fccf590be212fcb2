"""Train an ALBERT-style SentencePiece tokenizer, and load it as a Hugging Face tokenizer.

The SentencePiece model is a unigram model with ALBERT's special pieces at fixed ids::

    <pad>=0  <unk>=1  [CLS]=2  [SEP]=3  [MASK]=4

:func:`train_tokenizer` writes ``spiece.model`` and the Hugging Face files (``tokenizer.json``,
``tokenizer_config.json``) into one directory, so ``AutoTokenizer.from_pretrained(directory)``
works offline. The tokenizer is transformers' ``AlbertTokenizer`` (backed by the ``tokenizers``
library); a pair encodes as ``[CLS] a [SEP] b [SEP]`` with ``token_type_ids`` 0 up to the first
``[SEP]`` and 1 after it.

Normalisation matches between training and use: before SentencePiece sees a sentence it gets
what ``AlbertTokenizer`` does to text (``\\`\\```/``''`` to ``"``, NFKD and accent stripping unless
``keep_accents``, lowercasing if ``lowercase``); SentencePiece's own ``nmt_nfkc`` rule follows in both.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import sentencepiece as spm
import tokenizers
from tqdm.auto import tqdm
from transformers import AlbertTokenizer, AutoTokenizer, PreTrainedTokenizerBase

from .corpus import Corpus

logger = logging.getLogger(__name__)

SPECIAL_PIECES = ("<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4, as in ALBERT
MODEL_INPUT_NAMES = ["input_ids", "token_type_ids", "attention_mask"]
_RESTORE = "restore the directory from a copy, or train a new tokenizer with widenet_ds.data.train_tokenizer(...)"


class TokenizerError(ValueError):
    """A tokenizer that cannot be trained or loaded; the message says what to do."""


def normalize_text(text: str, lowercase: bool = True, keep_accents: bool = False) -> str:
    """Apply ``AlbertTokenizer``'s normalisation (before SentencePiece's own) to ``text``."""
    text = text.replace("``", '"').replace("''", '"')
    if not keep_accents:
        text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    return text.lower() if lowercase else text


def _training_sentences(documents: Iterable[list[str]], lowercase: bool, keep_accents: bool) -> Iterator[str]:
    for document in documents:
        for sentence in document:
            yield normalize_text(sentence, lowercase, keep_accents)


class _KeepError:
    """Iterates ``items`` and keeps the exception they raise: SentencePiece turns it into a RuntimeError."""

    def __init__(self, items: Iterator[str]):
        self.items = items
        self.error: Exception | None = None

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        try:
            return next(self.items)
        except StopIteration:
            raise
        except Exception as error:
            self.error = error
            raise


def _train_sentencepiece(sentences: Iterator[str], vocab_size: int, input_sentence_size: int,
                         character_coverage: float) -> bytes:
    """Train a unigram SentencePiece model with ALBERT's special pieces; returns the serialised model."""
    model = io.BytesIO()
    source = _KeepError(sentences)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=source, model_writer=model, model_type="unigram", vocab_size=vocab_size,
            pad_id=0, unk_id=1, bos_id=-1, eos_id=-1, control_symbols=list(SPECIAL_PIECES[2:]),
            input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
            character_coverage=character_coverage, num_threads=os.cpu_count() or 1, minloglevel=2)
    except RuntimeError as error:
        if source.error is not None:  # e.g. a CorpusError from the documents
            raise source.error from None
        message = str(error)
        if "Vocabulary size too high" in message:
            raise TokenizerError(f"vocab_size={vocab_size} is more than this text supports ({message.strip()}); "
                                 f"lower vocab_size or train on more text") from error
        if "sentences_.empty()" in message:
            raise TokenizerError(f"no text to train the tokenizer on ({message.strip()}); "
                                 f"check that the corpus yields documents") from error
        raise
    return model.getvalue()


def _as_documents(source: Iterable[list[str]] | Sequence[str | Path] | str | Path) -> Iterable[list[str]]:
    """Documents from ``source``: paths and globs become a :class:`Corpus`; anything else is documents already."""
    if isinstance(source, (str, Path)):
        return Corpus([source])
    if isinstance(source, Sequence) and source and all(isinstance(item, (str, Path)) for item in source):
        return Corpus(source)
    return source


def train_tokenizer(
    documents: Iterable[list[str]] | Sequence[str | Path] | str | Path,
    output_dir: str | Path,
    vocab_size: int = 30_000,
    *,
    lowercase: bool = True,
    keep_accents: bool = False,
    input_sentence_size: int = 1_000_000,
    character_coverage: float = 0.99995,
) -> PreTrainedTokenizerBase:
    """Train a SentencePiece unigram tokenizer ALBERT-style and save it for ``AutoTokenizer``.

    Args:
        documents: documents (lists of sentences), e.g. a :class:`~widenet_ds.data.Corpus` or a
            list of lists of strings; or paths and globs of files, read as ``Corpus(documents)``
            (checked before training starts).
        output_dir: created if needed; receives ``spiece.model``, ``tokenizer.json`` and
            ``tokenizer_config.json``.
        vocab_size: pieces in the vocabulary, the five special pieces included.
        lowercase: lowercase the text (ALBERT's default).
        keep_accents: keep accents instead of stripping them after NFKD.
        input_sentence_size: SentencePiece samples at most this many sentences (reservoir
            sampling over the stream), which bounds memory on big corpora.
        character_coverage: share of characters the vocabulary must cover; the rest map to ``<unk>``.

    Returns:
        The trained tokenizer, as ``load_tokenizer(output_dir)`` returns it.

    Raises:
        CorpusError: when files given as paths are missing or unreadable.
        TokenizerError: when there is no text, or ``vocab_size`` is larger than the text allows.
    """
    output = Path(output_dir)
    logger.info("training a %d-piece SentencePiece tokenizer on up to %d sentences", vocab_size, input_sentence_size)
    source = _as_documents(documents)
    sentences = tqdm(_training_sentences(source, lowercase, keep_accents), desc="reading sentences",
                     unit="sentence", disable=None)
    model = _train_sentencepiece(iter(sentences), vocab_size, input_sentence_size, character_coverage)
    with tempfile.TemporaryDirectory() as converting:
        # AlbertTokenizer(vocab_file=...) does not read the model in transformers 5; from_pretrained
        # on a directory holding only spiece.model converts it to a `tokenizers` backend.
        (Path(converting) / "spiece.model").write_bytes(model)
        tokenizer = AlbertTokenizer.from_pretrained(converting, do_lower_case=lowercase, keep_accents=keep_accents,
                                                    model_input_names=MODEL_INPUT_NAMES)
    output.mkdir(parents=True, exist_ok=True)
    (output / "spiece.model").write_bytes(model)
    tokenizer.save_pretrained(output)
    logger.info("saved the tokenizer to %s", output)
    return load_tokenizer(output)


def _tokenizer_problem(directory: Path) -> str | None:
    """Why ``directory`` cannot hold a loadable tokenizer, judged from its files alone; or None.

    Checked before ``from_pretrained`` sees the path: given a path that is not a directory it
    would try the string as a hub repo id, and a damaged file fails deep inside ``tokenizers``
    or ``json`` with a message that names no file.
    """
    if not directory.exists():
        return (f"no tokenizer at {directory}: the path does not exist (relative paths start at {Path.cwd()}); "
                f"pass the directory a tokenizer was saved to, or create one with widenet_ds.data.train_tokenizer(...)")
    if not directory.is_dir():
        return (f"no tokenizer at {directory}: it is a file, not a directory; pass the directory that holds "
                f"tokenizer_config.json and tokenizer.json")
    config = directory / "tokenizer_config.json"
    if not config.is_file():
        return (f"no tokenizer at {directory}: expected a directory with tokenizer_config.json "
                f"(as save_pretrained writes it); create one with widenet_ds.data.train_tokenizer(...)")
    try:
        settings = json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, OSError) as error:
        return f"{config} is damaged: not readable as JSON ({error}); {_RESTORE}"
    if not isinstance(settings, dict):
        return f"{config} is damaged: it holds a JSON {type(settings).__name__}, not an object; {_RESTORE}"
    if "auto_map" in settings:
        return (f"{config} names custom tokenizer code (auto_map: {settings['auto_map']}); load_tokenizer never "
                f"runs code from a tokenizer directory: use a tokenizer class of transformers, e.g. one saved by "
                f"widenet_ds.data.train_tokenizer(...)")
    fast = directory / "tokenizer.json"
    if fast.exists():
        if fast.stat().st_size == 0:
            return f"{fast} is empty (0 bytes), so the tokenizer was not saved completely; {_RESTORE}"
        try:
            tokenizers.Tokenizer.from_file(str(fast))
        except Exception as error:  # tokenizers raises a bare Exception for bad JSON and bad structure alike
            return f"{fast} is damaged: tokenizers cannot read it ({error}); {_RESTORE}"
    return None


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer saved by :func:`train_tokenizer` (or any local ALBERT-style tokenizer).

    Only local files are read (``local_files_only``), and no code from the directory is run
    (a ``tokenizer_config.json`` with an ``auto_map`` is refused): a path is never taken for a
    Hugging Face hub repo id.

    Raises:
        TokenizerError: when ``path`` does not exist, is not a directory with
            ``tokenizer_config.json``, holds an empty or damaged ``tokenizer_config.json`` or
            ``tokenizer.json``, names custom code, or lacks a token pretraining needs.
    """
    directory = Path(path)
    problem = _tokenizer_problem(directory)
    if problem:
        raise TokenizerError(problem)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
    except Exception as error:  # transformers raises many types (OSError, ValueError, KeyError) for bad files
        raise TokenizerError(f"cannot load the tokenizer at {directory} ({type(error).__name__}: {error}); "
                             f"{_RESTORE}") from error
    missing = [name for name in ("cls_token", "sep_token", "mask_token", "pad_token")
               if getattr(tokenizer, f"{name}_id") is None]
    if missing:
        raise TokenizerError(f"tokenizer at {directory} has no {', '.join(missing)}; pretraining needs "
                             f"[CLS], [SEP], [MASK] and <pad>: train one with train_tokenizer(...)")
    return tokenizer
