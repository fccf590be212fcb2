"""The ALBERT-style SentencePiece tokenizer: training, special ids, pair layout, loading."""

import json
import re
import shutil

import pytest
from data.english import all_sentences
from data.helpers import VOCAB_SIZE, fixture_documents, make_tokenizer, write_book
from transformers import AutoTokenizer

from widenet_ds.data import (
    Corpus,
    CorpusError,
    TokenizerError,
    load_tokenizer,
    train_tokenizer,
)
from widenet_ds.data.tokenizer import SPECIAL_PIECES, normalize_text


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    return directory, make_tokenizer(directory)


def test_training_writes_sentencepiece_and_hugging_face_files(trained):
    directory, tokenizer = trained
    assert {p.name for p in directory.iterdir()} >= {"spiece.model", "tokenizer.json", "tokenizer_config.json"}
    assert len(tokenizer) == VOCAB_SIZE


def test_special_pieces_have_albert_ids(trained):
    _, tokenizer = trained
    assert tokenizer.convert_tokens_to_ids(list(SPECIAL_PIECES)) == [0, 1, 2, 3, 4]
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id,
            tokenizer.mask_token_id) == (0, 1, 2, 3, 4)


def test_text_round_trips_lowercased(trained):
    _, tokenizer = trained
    for sentence in all_sentences():
        ids = tokenizer(sentence, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == sentence.lower()


def test_pair_encoding_is_cls_a_sep_b_sep_with_token_types(trained):
    _, tokenizer = trained
    a, b = "The river rose.", "Farmers moved their cattle."
    ids_a = tokenizer(a, add_special_tokens=False)["input_ids"]
    ids_b = tokenizer(b, add_special_tokens=False)["input_ids"]
    encoded = tokenizer(a, b)
    assert encoded["input_ids"] == [2, *ids_a, 3, *ids_b, 3]
    assert encoded["token_type_ids"] == [0] * (len(ids_a) + 2) + [1] * (len(ids_b) + 1)
    assert encoded["attention_mask"] == [1] * len(encoded["input_ids"])


def test_auto_tokenizer_loads_the_directory_offline(trained):
    directory, tokenizer = trained
    loaded = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    text = "The keeper recorded the wind and the state of the sea."
    assert loaded(text, "It rained.")["input_ids"] == tokenizer(text, "It rained.")["input_ids"]
    assert load_tokenizer(directory)(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_trains_from_a_corpus_or_file_paths_and_can_keep_case(tmp_path):
    path = write_book(tmp_path)
    from_corpus = train_tokenizer(Corpus([path]), tmp_path / "corpus", vocab_size=VOCAB_SIZE, lowercase=False)
    from_glob = train_tokenizer(str(tmp_path / "*.txt"), tmp_path / "glob", vocab_size=VOCAB_SIZE, lowercase=False)
    ids = from_corpus("The River rose.", add_special_tokens=False)["input_ids"]
    assert from_corpus.decode(ids) == "The River rose."
    assert from_glob("The River rose.", add_special_tokens=False)["input_ids"] == ids


def test_a_missing_file_fails_before_training(tmp_path):
    with pytest.raises(CorpusError, match="matches no file"):
        train_tokenizer([tmp_path / "missing.txt"], tmp_path / "tokenizer", vocab_size=VOCAB_SIZE)
    assert not (tmp_path / "tokenizer").exists()


def test_retraining_into_the_same_directory_replaces_the_tokenizer(tmp_path):
    train_tokenizer(fixture_documents(), tmp_path, vocab_size=VOCAB_SIZE)
    assert len(train_tokenizer(fixture_documents(), tmp_path, vocab_size=120)) == 120
    assert len(load_tokenizer(tmp_path)) == 120


def test_normalisation_matches_the_hugging_face_normaliser(trained):
    _, tokenizer = trained
    text = "Caf\u00e9 ``Na\u00efve'' R\u00e9SUM\u00c9"
    assert normalize_text(text) == tokenizer.backend_tokenizer.normalizer.normalize_str(text)


def test_missing_tokenizer_says_how_to_make_one(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer at .*nowhere: the path does not exist.*train_tokenizer"):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(TokenizerError, match="no tokenizer at .*: expected a directory with tokenizer_config.json"):
        load_tokenizer(tmp_path)


def test_a_hub_repo_id_is_a_missing_path_not_a_download():
    with pytest.raises(TokenizerError, match="no tokenizer at albert/albert-base-v2: the path does not exist"):
        load_tokenizer("albert/albert-base-v2")


def test_a_file_instead_of_the_directory_names_the_fix(trained):
    directory, _ = trained
    with pytest.raises(TokenizerError, match="tokenizer.json: it is a file, not a directory; pass the directory"):
        load_tokenizer(directory / "tokenizer.json")


def _damaged_copy(trained, tmp_path, name, content):
    """A copy of the trained tokenizer's directory whose file ``name`` holds ``content``."""
    directory = tmp_path / "damaged"
    shutil.copytree(trained[0], directory)
    (directory / name).write_text(content)
    return directory


@pytest.mark.parametrize("name, content, problem", [
    ("tokenizer.json", "", r"tokenizer.json is empty \(0 bytes\)"),
    ("tokenizer.json", '{"version": "1.0", "trunc', r"tokenizer.json is damaged: tokenizers cannot read it"),
    ("tokenizer.json", '{"model": {}}', r"tokenizer.json is damaged: tokenizers cannot read it"),
    ("tokenizer_config.json", "", r"tokenizer_config.json is damaged: not readable as JSON"),
    ("tokenizer_config.json", "[]", r"tokenizer_config.json is damaged: it holds a JSON list"),
])
def test_an_empty_or_damaged_file_is_named_with_the_fix(trained, tmp_path, name, content, problem):
    directory = _damaged_copy(trained, tmp_path, name, content)
    with pytest.raises(TokenizerError, match=f"^{re.escape(str(directory))}/{problem}.*restore the directory"):
        load_tokenizer(directory)


def test_a_damaged_sentencepiece_model_is_a_tokenizer_error(trained, tmp_path):
    directory = _damaged_copy(trained, tmp_path, "spiece.model", "")
    (directory / "tokenizer.json").unlink()  # transformers then builds the tokenizer from spiece.model
    with pytest.raises(TokenizerError, match=f"cannot load the tokenizer at {re.escape(str(directory))} .*restore"):
        load_tokenizer(directory)


def test_custom_code_in_the_directory_is_refused_and_never_run(trained, tmp_path):
    settings = json.loads((trained[0] / "tokenizer_config.json").read_text())
    settings.update(auto_map={"AutoTokenizer": ["custom.CustomTokenizer", None]}, tokenizer_class="CustomTokenizer")
    directory = _damaged_copy(trained, tmp_path, "tokenizer_config.json", json.dumps(settings))
    marker = tmp_path / "code-ran"
    (directory / "custom.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                         f"from transformers import AlbertTokenizer as CustomTokenizer\n")
    with pytest.raises(TokenizerError, match="names custom tokenizer code .*never runs code"):
        load_tokenizer(directory)
    assert not marker.exists()


def test_vocab_too_large_for_the_text_is_explained(tmp_path):
    with pytest.raises(TokenizerError, match="vocab_size=20000 is more than this text supports"):
        train_tokenizer(fixture_documents(), tmp_path, vocab_size=20_000)


def test_no_text_is_explained(tmp_path):
    with pytest.raises(TokenizerError, match="no text to train the tokenizer on"):
        train_tokenizer([], tmp_path, vocab_size=100)
