"""Train a ViT / WideNet / ViT-MoE image classifier on DeepSpeed.

    deepspeed --num_gpus 8 launch/train_vit.py --preset widenet-vit-b --data_dir /data/imagenet \
        --deepspeed_config ds_configs/vit_imagenet.json --output_dir runs/widenet-vit-b --resume auto
    python launch/train_vit.py --data_dir my_images --output_dir runs/vit-demo --max_steps 50   # CPU, debug preset

See ``python launch/train_vit.py --help`` and README.md.
"""

from widenet_ds.jobs.cli import main
from widenet_ds.jobs.train_vit import run

if __name__ == "__main__":
    main(run)
