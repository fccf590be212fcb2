"""Fine-tune WideNet (or an ALBERT / BERT baseline) on one GLUE task with DeepSpeed.

    deepspeed --num_gpus 1 launch/finetune_glue.py --task mnli --data_dir glue_data \
        --model_name_or_path runs/wn-e4/final --output_dir runs/glue/wn-e4/mnli   # ds_configs/finetune_mnli.json
    python launch/finetune_glue.py --task rte --model_name_or_path albert_base_folder --override num_experts=4 \
        --output_dir runs/glue/upcycled/rte   # hub data; ALBERT sparsely upcycled to 4 experts

See ``python launch/finetune_glue.py --help`` and README.md.
"""

from widenet_ds.jobs.cli import main
from widenet_ds.jobs.finetune import run

if __name__ == "__main__":
    main(run)
