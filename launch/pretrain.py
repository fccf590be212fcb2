"""Pretrain WideNet (or an ALBERT / BERT baseline) with MLM + SOP on DeepSpeed.

    deepspeed --num_gpus 8 launch/pretrain.py --preset widenet-base-e4 --train_files 'corpus/*.txt' \
        --deepspeed_config ds_configs/pretrain_multigpu_ep.json --output_dir runs/wn-e4 --max_steps 125000
    python launch/pretrain.py --max_seq_length 128 --output_dir runs/demo   # built-in corpus, CPU

See ``python launch/pretrain.py --help`` and README.md.
"""

from widenet_ds.jobs.cli import main
from widenet_ds.jobs.pretrain import run

if __name__ == "__main__":
    main(run)
