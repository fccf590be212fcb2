"""Pretraining batches of real text for the benchmark (``bench_train.py --batches FILE``).

The benchmark's default batch is one fixed batch of random ids: the router then learns that one
batch and drifts (it drops routes), which moves the FLOPs it counts. Batches
made here go through the pretraining job's own data path (SentencePiece tokenizer trained on the
text, SOP instances, dynamic n-gram masking, ``mlm_positions``), padded to one length, and are
saved as one tensor file that the GPU machine loads with torch alone:

    python -m benchmarks.text_batches --text ../shared/data/gutenberg/*.txt --seq 512 --batch 32 \
        --count 48 --out runs/bench_data/text-s512-b32.pt

The file holds ``input_ids``, ``token_type_ids``, ``attention_mask``, ``labels`` (count, batch, seq),
``mlm_positions`` (count, batch, P), ``sentence_order_label`` (count, batch), and what made them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .common import ROOT
from .common import TEXT_KEYS as KEYS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", nargs="+", required=True, type=Path,
                   help="plain-text files, each one document (e.g. a book), so that instances fill --seq")
    p.add_argument("--seq", type=int, default=512, help="sequence length (every batch padded to it)")
    p.add_argument("--batch", type=int, default=32, help="sequences per batch")
    p.add_argument("--count", type=int, default=48, help="batches to save (the benchmark cycles through them)")
    p.add_argument("--vocab_size", type=int, default=24_000,
                   help="tokenizer size, at most the model's (30000 in the base presets); 6 MB of English "
                        "supports about 27800")
    p.add_argument("--work_dir", type=Path, default=ROOT / "runs" / "bench_data",
                   help="where the tokenizer and the instance cache are kept (reused by later calls: the "
                        "tokenizer is trained once per folder, so give other text its own folder)")
    p.add_argument("--out", type=Path, required=True, help="the tensor file to write")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def make_batches(args: argparse.Namespace) -> dict:
    """``args.count`` collated training batches of ``args.text``, stacked (see the module docstring)."""
    from widenet_ds.data import prepare_pretraining_data

    # one JSONL record per file: a document each (as plain text, blank lines would cut a book into
    # short documents, and most instances would be mostly padding)
    # written only when it changes: the cache key holds its mtime, and a rewrite would rebuild the cache
    args.work_dir.mkdir(parents=True, exist_ok=True)
    documents = args.work_dir / "documents.jsonl"
    lines = "".join(json.dumps({"text": path.read_text(encoding="utf-8", errors="replace")}) + "\n"
                    for path in args.text)
    if not documents.is_file() or documents.read_text(encoding="utf-8") != lines:
        documents.write_text(lines, encoding="utf-8")
    data_args = argparse.Namespace(
        train_files=[str(documents)], dataset=None, dataset_config=None, text_field="text", tokenizer=None,
        vocab_size=args.vocab_size, max_seq_length=args.seq, short_seq_prob=0.1, masked_lm_prob=0.15, max_ngram=3,
        eval_fraction=0.01, num_proc=1, seed=args.seed, compile="model")  # compile: padded to --seq
    data = prepare_pretraining_data(data_args, args.work_dir, micro_batch_size=args.batch)
    available = len(data.train_loader)
    if available < args.count:
        raise SystemExit(f"the text gives {available} batches of {args.batch} x {args.seq}, fewer than --count "
                         f"{args.count}: give more text or ask for fewer batches")
    batches = data.train_batches()
    drawn = [next(batches) for _ in range(args.count)]
    tensors = {k: torch.stack([b[k] for b in drawn]).to(torch.int32) for k in KEYS}
    return {**tensors, "seq": args.seq, "batch": args.batch, "vocab_size": data.vocab_size,
            "source": [str(p) for p in args.text], "tokenizer": str(data.tokenizer_dir)}


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    saved = make_batches(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(saved, args.out)
    real = saved["attention_mask"].float().mean().item()
    print(f"[text_batches] wrote {args.count} batches of {args.batch} x {args.seq} ({real:.1%} real tokens, "
          f"vocab {saved['vocab_size']}) to {args.out}")
    return args.out


if __name__ == "__main__":
    main()
