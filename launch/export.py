"""Export a pretraining checkpoint (any ep_size) to a Hugging Face folder that loads without DeepSpeed.

    python launch/export.py runs/wn-e4/checkpoints/step_00010000 runs/wn-e4/export-10k
    python launch/export.py runs/wn-e4 runs/wn-e4/export-latest     # the run's newest complete checkpoint
"""

import argparse
from pathlib import Path

from widenet_ds.checkpointing import CheckpointError, complete_checkpoints, export_pretrained


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="a step_XXXXXXXX folder, or a run's output_dir (its newest)")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: the run's output_dir/tokenizer)")
    args = p.parse_args()
    path = args.checkpoint
    if not path.name.startswith("step_"):
        complete = complete_checkpoints(path / "checkpoints")
        if not complete:
            raise CheckpointError(f"{path}: no complete checkpoint in {path / 'checkpoints'}")
        path = complete[-1]
    tokenizer = args.tokenizer or path.parent.parent / "tokenizer"
    export_pretrained(path, args.out_dir, tokenizer_dir=tokenizer if tokenizer.is_dir() else None)
    print(f"exported {path} to {args.out_dir}")


if __name__ == "__main__":
    main()
