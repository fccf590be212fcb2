"""Load a pretraining checkpoint into a DeepSpeed engine of any ep_size / world size, write the
eval-mode logits of a fixed batch (rank 0), and optionally save the engine again.

    deepspeed --num_gpus N tests/tools/eval_checkpoint.py CHECKPOINT DS_JSON OUT.pt [SAVE_DIR]
"""

import sys
from pathlib import Path

import torch

from widenet_ds import WideNetConfig, WideNetForPreTraining
from widenet_ds.distributed import close_distributed, init_distributed
from widenet_ds.engine.build import initialize_engine
from widenet_ds.engine.checkpointing import load_checkpoint, save_checkpoint
from widenet_ds.engine.ds_config import load_run_config


def fixed_batch(vocab_size: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(5, vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 18:] = 0
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids))


def main(checkpoint: str, ds_json: str, out: str, save_dir: str | None = None) -> None:
    init_distributed()
    try:
        run = load_run_config(ds_json, world_size=torch.distributed.get_world_size(), max_steps=100)
        config = WideNetConfig.from_json_file(Path(checkpoint) / "config.json").with_moe_settings(run.moe)
        engine, _, _ = initialize_engine(WideNetForPreTraining(config), run)
        state = load_checkpoint(engine, Path(checkpoint), config)
        engine.eval()
        with torch.no_grad():
            logits = engine(**fixed_batch(config.vocab_size)).prediction_logits
        if torch.distributed.get_rank() == 0:
            torch.save(logits, out)
        if save_dir:
            save_checkpoint(engine, save_dir, state["step"], state, config, run.to_dict())
    finally:
        close_distributed()


if __name__ == "__main__":
    main(*[a for a in sys.argv[1:] if not a.startswith("--local_rank")])
