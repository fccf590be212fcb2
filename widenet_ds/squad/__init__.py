"""SQuAD v1.1 and v2.0: loading and checking the data, windows with a document stride, n-best span
decoding (with the v2.0 no-answer score) and the official evaluation."""

from .data import (
    HUB_DATASETS,
    VERSIONS,
    Answer,
    SquadDataError,
    SquadExample,
    check_version,
    gold_answers,
    load_squad,
    parse_document,
)
from .encoding import check_lengths, collate, encode_eval, encode_train
from .metrics import evaluate_v1, evaluate_v2, normalize_answer
from .postprocess import postprocess_predictions

__all__ = [
    "HUB_DATASETS", "VERSIONS", "Answer", "SquadDataError", "SquadExample", "check_lengths", "check_version",
    "collate", "encode_eval", "encode_train", "evaluate_v1", "evaluate_v2", "gold_answers", "load_squad",
    "normalize_answer", "parse_document", "postprocess_predictions",
]
