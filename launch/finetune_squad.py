"""Fine-tune WideNet (or an ALBERT / BERT baseline) on SQuAD v1.1 or v2.0 with DeepSpeed.

    deepspeed --num_gpus 1 launch/finetune_squad.py --version 1.1 --train_file train-v1.1.json \
        --validation_file dev-v1.1.json --model_name_or_path runs/wn-e4/final \
        --output_dir runs/squad/wn-e4/v1.1                     # ds_configs/finetune_squad_v1.json
    python launch/finetune_squad.py --version 2.0 --model_name_or_path albert_base_folder \
        --override num_experts=4 --output_dir runs/squad/upcycled/v2.0   # hub data; upcycled ALBERT

See ``python launch/finetune_squad.py --help`` and README.md.
"""

from widenet_ds.jobs.cli import main
from widenet_ds.jobs.finetune_squad import run

if __name__ == "__main__":
    main(run)
