#!/usr/bin/env bash
# Pretraining on several nodes where each node runs this script itself (Kubernetes-style jobs,
# SLURM's srun, ...): no ssh. The DeepSpeed launcher starts this node's ranks; node n's ranks are
# the global ranks that follow those of nodes 0..n-1 in HOSTFILE. output_dir must be on a
# filesystem every node sees.
#
#   # on every node, the same HOSTFILE, MASTER_ADDR and arguments, its own NODE_RANK:
#   NODE_RANK=1 MASTER_ADDR=10.0.0.1 HOSTFILE=launch/hostfile GLOO_SOCKET_IFNAME=eth0 \
#       launch/run_multinode_no_ssh.sh --preset widenet-base-e8 --output_dir /shared/runs/wn-e8
#
# Environment:
#   NODE_RANK     required: this node's index in HOSTFILE, 0 .. nodes-1
#   MASTER_ADDR   required: address of node 0 that the others can reach (not 127.0.0.1)
#   HOSTFILE      required: one "name slots=N" line per node, the same file (or content) on every
#                 node; in this mode only the order and the slots matter, not the names
#   MASTER_PORT   rendezvous port on node 0 (default 29500)
#   NUM_GPUS      ranks per node (default: the hostfile's slots)
#   DS_CONFIG     DeepSpeed JSON (default: ds_configs/pretrain_multinode.json, ep_size 8 within a node)
#   NCCL_SOCKET_IFNAME (GPU) / GLOO_SOCKET_IFNAME (CPU): the interface that reaches the other nodes,
#                 needed where this host's name does not resolve to that interface's address
# This node's environment reaches its ranks as it is. Every argument goes to launch/pretrain.py.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
: "${NODE_RANK:?set NODE_RANK to the index of this node in HOSTFILE (0 .. nodes-1)}"
: "${MASTER_ADDR:?set MASTER_ADDR to the address of node 0, reachable from every node}"
: "${HOSTFILE:?set HOSTFILE to a hostfile listing every node (see launch/hostfile.example)}"

exec deepspeed --no_ssh --node_rank "$NODE_RANK" --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" \
    --master_port "${MASTER_PORT:-29500}" ${NUM_GPUS:+--num_gpus "$NUM_GPUS"} \
    "$root/launch/pretrain.py" --deepspeed_config "${DS_CONFIG:-$root/ds_configs/pretrain_multinode.json}" "$@"
