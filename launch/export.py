"""Export a pretraining or image-classifier checkpoint (any ep_size) to a Hugging Face folder that loads
without DeepSpeed (an image classifier with its image processor).

    python launch/export.py runs/wn-e4/checkpoints/step_00010000 runs/wn-e4/export-10k
    python launch/export.py runs/wn-e4 runs/wn-e4/export-latest     # the run's newest complete checkpoint

The checkpoint is verified first (every file's checksum; no file that would run code when loaded).
The destination must be a new or empty folder (``--overwrite`` replaces an earlier export).
"""

import argparse
from pathlib import Path

from widenet_ds.engine.checkpointing import export_to_folder
from widenet_ds.jobs.cli import main


def export(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="a step_XXXXXXXX folder, or a run's output_dir (its newest)")
    p.add_argument("out_dir", type=Path, help="the Hugging Face folder to write (new or empty)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: the run's output_dir/tokenizer)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in out_dir")
    args = p.parse_args(argv)
    path, out = export_to_folder(args.checkpoint, args.out_dir, args.tokenizer, overwrite=args.overwrite)
    print(f"exported {path} to {out}")
    return out


if __name__ == "__main__":
    main(export)
