"""Multi-node launch, for real: two "hosts" as Linux network namespaces joined by a veth pair, each
running ``launch/run_multinode_no_ssh.sh`` (the DeepSpeed launcher in ``--no_ssh`` mode, one rank per
node), so the expert all-to-all of an ep_size=2 run crosses a network link. Then the recipes' command
lines, checked against stand-ins for ``deepspeed``, ``srun`` and ``scontrol``."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from data.english import book_text, write_jsonl
from multinode import netns

from widenet_ds.engine.checkpointing import complete_checkpoints

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"
STEPS = 4
TIMEOUT_S = 240  # the first gloo init on a fresh machine JIT-compiles DeepSpeed's shm op (~1 min)
# Variables an earlier in-process run may have left behind; the launcher sets its own.
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT",
                  "CUDA_VISIBLE_DEVICES")


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")  # this venv's `deepspeed`
    return env


def _corpus(directory: Path) -> list[str]:
    directory.mkdir(parents=True)
    (directory / "book.txt").write_text(book_text() * 3, encoding="utf-8")
    write_jsonl(directory / "extra.jsonl")
    return [str(directory / "*.txt"), str(directory / "*.jsonl")]


@pytest.fixture
def hosts():
    prefix = f"wn{os.getpid()}"
    reason = netns.unavailable(f"{prefix}-probe")
    if reason:
        pytest.skip(reason)
    with netns.two_hosts(prefix) as made:
        yield made


def _wait(processes: list[subprocess.Popen], logs: list[Path]) -> list[int | None]:
    """Exit codes once all are done, or as soon as one fails (the others would wait for it until
    DeepSpeed's process-group timeout, DEEPSPEED_TIMEOUT minutes)."""
    deadline = time.monotonic() + TIMEOUT_S
    running = list(processes)
    while running and time.monotonic() < deadline:
        for process in list(running):
            try:
                process.wait(timeout=1)
            except subprocess.TimeoutExpired:
                continue
            running.remove(process)
            if process.returncode != 0:
                return [p.poll() for p in processes]
    if running:
        tails = "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in logs)
        pytest.fail(f"the nodes did not finish in {TIMEOUT_S} s\n{tails}")
    return [p.returncode for p in processes]


@pytest.mark.distributed
def test_two_nodes_train_with_the_experts_split_across_the_network(hosts, tmp_path):
    out = tmp_path / "run"  # output_dir and corpus on a filesystem both hosts see, as on a cluster
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("host-0 slots=2\nhost-1 slots=2\n")  # NUM_GPUS=1 must trim this to one rank per node
    args = ["--preset", "debug", "--vocab_size", "300", "--max_seq_length", "64", "--log_every", "1",
            "--max_steps", str(STEPS), "--save_every", str(STEPS), "--eval_every", str(STEPS),
            "--eval_batches", "2", "--train_files", *_corpus(tmp_path / "corpus"), "--output_dir", str(out)]
    env = {**_base_env(), "MASTER_ADDR": hosts[0].address, "HOSTFILE": str(hostfile), "NUM_GPUS": "1",
           "DS_CONFIG": str(ROOT / "ds_configs" / "pretrain_cpu_ep2.json"),
           "GLOO_SOCKET_IFNAME": netns.IFNAME}  # the hostname resolves to 127.0.0.1 in a namespace

    before = hosts[0].link_bytes()
    logs = [tmp_path / f"node{rank}.log" for rank in range(2)]
    processes = [host.start(["bash", str(LAUNCH / "run_multinode_no_ssh.sh"), *args],
                            {**env, "NODE_RANK": str(rank)}, logs[rank])
                 for rank, host in enumerate(hosts)]
    codes = _wait(processes, logs)
    after = hosts[0].link_bytes()
    text = [log.read_text() for log in logs]
    assert codes == [0, 0], "\n".join(f"--- node {r} exited {c}\n{t[-3000:]}" for r, (c, t) in
                                      enumerate(zip(codes, text)))
    assert [host.pids() for host in hosts] == [[], []], "every process of both nodes exited"

    assert "nnodes=2, num_local_procs=1, node_rank=1" in text[1] and "dist_world_size=2" in text[1]
    assert f"--master_addr={hosts[0].address}" in text[1]
    assert json.loads((out / "run.json").read_text())["world_size"] == 2
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, STEPS + 1))
    assert [r["step"] for r in records if "eval_mlm_accuracy" in r] == [STEPS]

    checkpoint, = complete_checkpoints(out / "checkpoints")
    assert checkpoint.name == f"step_{STEPS:08d}"
    assert len(list(checkpoint.glob("layer_0_expert_*_model_states.pt"))) == 4, "2 experts from each node"
    assert (checkpoint / "rng_rank0.pt").is_file() and (checkpoint / "rng_rank1.pt").is_file()

    # Each expert all-to-all of the debug model sends half of a (4 experts x capacity 154 x hidden 32) fp32
    # tensor to the other rank, ~39 KB; 3 blocks x (dispatch + combine) x (forward + backward) make ~0.47 MB
    # per training step each way, on top of the gradient all-reduce and the launcher's own traffic. The same
    # run with ep_size 1 (no all-to-all: the experts replicated, their gradients all-reduced) moves under
    # 1 MB each way, so more than 1.5 MB means the all-to-all crossed the link.
    received, sent = after[0] - before[0], after[1] - before[1]
    assert received > 1_500_000 and sent > 1_500_000, f"only {received} B in, {sent} B out over the link"


# ---- the recipes' command lines, against stand-ins (no GPU, no cluster) ----

FAKE_DEEPSPEED = """#!{python}
import json, os, sys
argv = sys.argv[1:]
hostfile = argv[argv.index("--hostfile") + 1] if "--hostfile" in argv else None
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({{"argv": argv, "hostfile": open(hostfile).read() if hostfile else None}}) + "\\n")
"""
FAKE_SRUN = """#!/usr/bin/env bash
# srun stand-in: records its options, runs the command once per node of SLURM_JOB_NODELIST.
echo "$*" > "$FAKE_LOG.srun"
while [[ $1 == -* ]]; do shift; done
nodes=$(tr ',' '\\n' <<< "$SLURM_JOB_NODELIST" | wc -l)
for ((i = 0; i < nodes; i++)); do SLURM_NODEID=$i "$@" || exit; done
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
[[ "$1 $2" == "show hostnames" ]] && tr ',' '\\n' <<< "$3"
"""


@pytest.fixture
def fakes(tmp_path):
    """A PATH whose deepspeed/srun/scontrol record what they were asked, and where the records go."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("deepspeed", FAKE_DEEPSPEED.format(python=sys.executable)), ("srun", FAKE_SRUN),
                       ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES + ("NUM_GPUS", "NUM_NODES", "HOSTFILE",
                                                                            "DS_CONFIG", "NODE_RANK")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", FAKE_LOG=str(log))
    return env, log


def _run_recipe(recipe: Path, env: dict[str, str], *args: str) -> list[dict]:
    result = subprocess.run(["bash", str(recipe), *args], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    log = Path(env["FAKE_LOG"])
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    log.unlink()
    return calls


USER_ARGS = ["--train_files", "my corpus/*.txt", "--max_steps", "3"]  # a space must survive


def test_recipes_hand_settings_and_arguments_to_the_deepspeed_launcher(fakes):
    env, _ = fakes
    script = str(LAUNCH / "pretrain.py")
    config = ["--deepspeed_config", str(ROOT / "ds_configs" / "pretrain_multigpu_ep.json")]
    multinode = ["--deepspeed_config", str(ROOT / "ds_configs" / "pretrain_multinode.json")]

    call, = _run_recipe(LAUNCH / "run_single_node.sh", env, *USER_ARGS)
    assert call["argv"] == ["--master_port", "29500", script, *config, *USER_ARGS]
    call, = _run_recipe(LAUNCH / "run_single_node.sh", {**env, "NUM_GPUS": "4", "DS_CONFIG": "x.json"}, *USER_ARGS)
    assert call["argv"] == ["--num_gpus", "4", "--master_port", "29500", script, "--deepspeed_config", "x.json",
                            *USER_ARGS]

    hostfile = str(LAUNCH / "hostfile.example")
    call, = _run_recipe(LAUNCH / "run_multinode_hostfile.sh",
                        {**env, "HOSTFILE": hostfile, "LAUNCHER_ARGS": "--launcher openmpi --ssh_port 2222"},
                        *USER_ARGS)
    assert call["argv"] == ["--hostfile", hostfile, "--master_port", "29500", "--launcher", "openmpi",
                            "--ssh_port", "2222", script, *multinode, *USER_ARGS]
    assert call["hostfile"].count("slots=8") == 2
    call, = _run_recipe(LAUNCH / "run_multinode_hostfile.sh",
                        {**env, "HOSTFILE": hostfile, "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "6000",
                         "NUM_NODES": "1", "NUM_GPUS": "2"}, *USER_ARGS)
    assert call["argv"][:10] == ["--hostfile", hostfile, "--master_addr", "10.1.2.3", "--master_port", "6000",
                                 "--num_nodes", "1", "--num_gpus", "2"]

    call, = _run_recipe(LAUNCH / "run_multinode_no_ssh.sh",
                        {**env, "HOSTFILE": hostfile, "MASTER_ADDR": "10.1.2.3", "NODE_RANK": "1"}, *USER_ARGS)
    assert call["argv"] == ["--no_ssh", "--node_rank", "1", "--hostfile", hostfile, "--master_addr", "10.1.2.3",
                            "--master_port", "29500", script, *multinode, *USER_ARGS]
    for missing in ("NODE_RANK", "MASTER_ADDR", "HOSTFILE"):
        partial = {**env, "HOSTFILE": hostfile, "MASTER_ADDR": "10.1.2.3", "NODE_RANK": "1"}
        del partial[missing]
        result = subprocess.run(["bash", str(LAUNCH / "run_multinode_no_ssh.sh")], env=partial,
                                capture_output=True, text=True, timeout=30)
        assert result.returncode != 0 and f"set {missing}" in result.stderr, missing
    assert not Path(env["FAKE_LOG"]).exists(), "nothing launched without the required variables"


def test_slurm_recipe_runs_one_no_ssh_launcher_per_node(fakes, tmp_path):
    env, log = fakes
    submit_dir = tmp_path / "submit"  # sbatch runs a copy of the script: it finds the recipes from here
    submit_dir.mkdir()
    (submit_dir / "launch").symlink_to(LAUNCH)
    slurm = {"SLURM_SUBMIT_DIR": str(submit_dir), "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "gpu-a,gpu-b",
             "SLURM_GPUS_ON_NODE": "4", "SLURM_CPUS_ON_NODE": "32"}
    calls = _run_recipe(LAUNCH / "slurm_pretrain.sbatch", {**env, **slurm}, *USER_ARGS)

    assert [c["argv"][:9] for c in calls] == [
        ["--no_ssh", "--node_rank", str(rank), "--hostfile", str(submit_dir / ".hostfile.77"),
         "--master_addr", "gpu-a", "--master_port", "29500"] for rank in range(2)]
    assert all(c["argv"][-4:] == USER_ARGS for c in calls)
    assert all(c["hostfile"] == "gpu-a slots=4\ngpu-b slots=4\n" for c in calls)
    assert not (submit_dir / ".hostfile.77").exists(), "the job's hostfile is removed at the end"
    srun_options = (tmp_path / "calls.jsonl.srun").read_text().split()
    assert "--ntasks-per-node=1" in srun_options and "--cpus-per-task=32" in srun_options
