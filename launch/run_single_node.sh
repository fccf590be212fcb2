#!/usr/bin/env bash
# Pretraining on one node: the DeepSpeed launcher starts one rank per GPU.
#
#   NUM_GPUS=8 launch/run_single_node.sh --preset widenet-base-e4 --train_files 'corpus/*.txt' \
#       --output_dir runs/wn-e4 --max_steps 125000
#
# Environment (all optional):
#   NUM_GPUS     ranks to start (default: every visible GPU; unset it to honour CUDA_VISIBLE_DEVICES)
#   DS_CONFIG    DeepSpeed JSON (default: ds_configs/pretrain_multigpu_ep.json, ep_size 4)
#   MASTER_PORT  rendezvous port on this node (default 29500)
# Every argument goes to launch/pretrain.py (see its --help).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)

exec deepspeed ${NUM_GPUS:+--num_gpus "$NUM_GPUS"} --master_port "${MASTER_PORT:-29500}" \
    "$root/launch/pretrain.py" --deepspeed_config "${DS_CONFIG:-$root/ds_configs/pretrain_multigpu_ep.json}" "$@"
