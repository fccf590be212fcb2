#!/usr/bin/env bash
# Pretraining on several nodes from one of them: the DeepSpeed launcher reaches every host of
# HOSTFILE through pdsh + passwordless ssh and starts its ranks there. Each node needs this
# repository and the Python environment at the same paths, and output_dir on a shared filesystem.
#
#   HOSTFILE=launch/hostfile MASTER_ADDR=10.0.0.1 launch/run_multinode_hostfile.sh \
#       --preset widenet-base-e8 --train_files '/shared/corpus/*.txt' --output_dir /shared/runs/wn-e8
#
# Environment:
#   HOSTFILE       required: one "host slots=N" line per node (see launch/hostfile.example)
#   MASTER_ADDR    address of the first host, reachable from all (default: its `hostname -I` over ssh)
#   MASTER_PORT    rendezvous port on the first host (default 29500)
#   NUM_NODES      use only the first NUM_NODES hosts (default: all)
#   NUM_GPUS       ranks per node (default: the hostfile's slots)
#   DS_CONFIG      DeepSpeed JSON (default: ds_configs/pretrain_multinode.json, ep_size 8 within a node)
#   LAUNCHER_ARGS  more `deepspeed` launcher flags, e.g. "--launcher openmpi" or "--ssh_port 2222"
# Only NCCL_*, PYTHON*, UCX_*, MV2_* and MLFLOW_* variables reach the other nodes; put anything
# else (GLOO_SOCKET_IFNAME, OMP_NUM_THREADS, HF_HOME ...) as KEY=VALUE lines in ./.deepspeed_env.
# Every argument goes to launch/pretrain.py (see its --help).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
: "${HOSTFILE:?set HOSTFILE to a hostfile listing every node (see launch/hostfile.example)}"
read -r -a launcher_args <<< "${LAUNCHER_ARGS:-}"

exec deepspeed --hostfile "$HOSTFILE" ${MASTER_ADDR:+--master_addr "$MASTER_ADDR"} \
    --master_port "${MASTER_PORT:-29500}" ${NUM_NODES:+--num_nodes "$NUM_NODES"} \
    ${NUM_GPUS:+--num_gpus "$NUM_GPUS"} "${launcher_args[@]}" \
    "$root/launch/pretrain.py" --deepspeed_config "${DS_CONFIG:-$root/ds_configs/pretrain_multinode.json}" "$@"
