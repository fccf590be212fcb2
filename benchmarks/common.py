"""What the benchmark scripts share: the train table's model settings and batches (random or real
text), ZeRO variants, expert-parallel-safe batch feeds, and timing helpers.

Run the scripts as modules from the repository root (``python -m benchmarks.bench_train ...``):
they import this package and ``widenet_ds`` from there.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path
from typing import Any, Callable

import torch

from widenet_ds import PRESETS, WideNetConfig, WideNetForPreTraining
from widenet_ds.data.pretraining import num_to_predict

ROOT = Path(__file__).resolve().parents[1]  # the repository root: default outputs go under its runs/

# The tensors of a --batches file (benchmarks/text_batches.py), each (count, batch, ...).
TEXT_KEYS = ("input_ids", "token_type_ids", "attention_mask", "labels", "mlm_positions", "sentence_order_label")

# ZeRO stage[:fp32] (fp32: gradients accumulated in fp32, DeepSpeed's BF16_Optimizer)
ZERO_VARIANTS = ("0", "1", "2", "0:fp32", "1:fp32", "2:fp32")
MLM_HEADS = ("masked", "all")  # the MLM head at the masked positions (mlm_positions) or at all of them
MASK_PROB = 0.15
# --smoke: every preset keeps its family (sharing, experts, LN order) at the debug preset's sizes.
SMOKE_SIZES = {k: PRESETS["debug"][k] for k in ("vocab_size", "embedding_size", "hidden_size", "num_hidden_layers",
                                                  "num_attention_heads", "intermediate_size",
                                                  "max_position_embeddings")}


# ----------------------------------------------------------------------------- settings and inputs

def make_batch(vocab: int, batch: int, seq: int, device: torch.device, mask: bool,
               mlm_positions: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """A fixed pretraining batch: random ids, segments A/B, SOP labels and, as the collator does,
    ``num_to_predict(seq)`` (15%) labelled positions per row (never position 0), with the collator's
    ``mlm_positions`` when asked."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, seq), generator=g)
    predicted = num_to_predict(seq, MASK_PROB, None)
    positions = (torch.rand(batch, seq - 1, generator=g).argsort(1)[:, :predicted] + 1).sort(1).values
    labels = torch.full_like(ids, -100).scatter(1, positions, ids.gather(1, positions))
    types = (torch.arange(seq) >= seq // 2).long().expand(batch, seq).contiguous()
    out = dict(input_ids=ids, token_type_ids=types, labels=labels,
               sentence_order_label=torch.randint(0, 2, (batch,), generator=g))
    if mlm_positions:
        out["mlm_positions"] = positions
    if mask:
        out["attention_mask"] = torch.ones_like(ids)
    return {k: v.to(device) for k, v in out.items()}


def batch_feed(text: dict[int, dict[str, Any]], batch: int, vocab: int, seq: int, device: torch.device,
               mlm_positions: bool, mask: bool = True, rank: int = 0,
               world: int = 1) -> Callable[[], dict[str, torch.Tensor]]:
    """Each call the next training batch: the ``text`` batches of ``seq`` (``load_text_batches``) cycled
    through (moved to the device once; rank r of ``world`` takes batches r, r + world, ...), or
    ``make_batch``'s fixed one (seeded by the rank; ``mask``: an all-ones attention mask). ``mlm_positions``
    False drops them (the MLM head at every position)."""
    if seq not in text:
        fixed = make_batch(vocab, batch, seq, device, mask, mlm_positions=mlm_positions, seed=rank)
        return lambda: fixed
    saved = text[seq]
    if int(saved["input_ids"].max()) >= vocab:
        raise ValueError(f"{saved['path']}: token ids up to {int(saved['input_ids'].max())}, the model has {vocab}")
    if len(saved["input_ids"]) < world:
        raise ValueError(f"{saved['path']}: {len(saved['input_ids'])} batches, fewer than the {world} ranks")
    keys = [k for k in TEXT_KEYS if mlm_positions or k != "mlm_positions"]
    mine = range(rank, len(saved["input_ids"]), world)
    batches = [{k: saved[k][i].to(device, torch.long) for k in keys} for i in mine]
    turn = itertools.count()
    return lambda: batches[next(turn) % len(batches)]


def model_config(preset: str, args: argparse.Namespace, impl: str, **overrides: Any) -> WideNetConfig:
    """A preset's config at the run's capacity factor and MoE impl (``--smoke``: the debug sizes;
    ``--no_fused_act``, where the script has it: the moe.fused_act setting off)."""
    sizes = SMOKE_SIZES if args.smoke else {}
    moe = {"capacity_factor": args.capacity_factor, "eval_capacity_factor": args.capacity_factor, "impl": impl,
           "fused_act": not getattr(args, "no_fused_act", False)}
    return WideNetConfig.from_preset(preset, **{**sizes, **overrides}, moe=moe)


def zero_settings(variant: str) -> dict[str, Any]:
    """DeepSpeed JSON keys of a ZeRO variant 'stage[:fp32]' (fp32: gradients accumulated in fp32)."""
    stage, _, accumulate = variant.partition(":")
    zero = {"stage": int(stage)}
    if stage == "2":  # what widenet_ds.engine.ds_config requires of ZeRO 2 with MoE
        zero.update(contiguous_gradients=True, reduce_scatter=True, overlap_comm=True)
    return {"zero_optimization": zero, **({"data_types": {"grad_accum_dtype": accumulate}} if accumulate else {})}


def load_init(p: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    """``--init``: the exported model's config overrides (vocabulary, padding id) and weights, checked
    against every preset of the train table before any compute (``p.error`` names what differs)."""
    if not (args.init / "config.json").is_file():
        p.error(f"--init {args.init}: no exported model there (config.json); give launch/pretrain.py's "
                "output_dir/final or a folder written by launch/export.py")
    saved = WideNetForPreTraining.from_pretrained(args.init)
    state = saved.state_dict()
    overrides = {"vocab_size": saved.config.vocab_size, "pad_token_id": saved.config.pad_token_id}
    for preset in args.presets:
        config = model_config(preset, args, "batched", **overrides)
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in WideNetForPreTraining(config).state_dict().items()}
        differ = sorted(k for k in shapes.keys() | state.keys()
                        if shapes.get(k) != (state[k].shape if k in state else None))
        if differ or config.top_k != saved.config.top_k:
            p.error(f"--init {args.init} is not a {preset} model: top_k {saved.config.top_k} vs {config.top_k}, "
                    f"{len(differ)} parameters differ in name or shape (e.g. {differ[:3]}); pass its own preset "
                    "with --presets")
    return {"path": str(args.init), "overrides": overrides, "state": state}


def load_text_batches(p: argparse.ArgumentParser, paths: list[Path], batch: int,
                      seqs: list[int]) -> dict[int, dict[str, Any]]:
    """``--batches`` files by sequence length, checked against the run's ``batch`` and ``seqs`` before any
    compute (``p.error`` names what is wrong)."""
    text = {}
    for path in paths:
        if not path.is_file():
            p.error(f"--batches {path}: no such file (make it with benchmarks/text_batches.py)")
        saved = torch.load(path, weights_only=True)
        if saved["batch"] != batch:
            p.error(f"--batches {path}: {saved['batch']} sequences per batch, the run uses --batch {batch}")
        text[saved["seq"]] = {**saved, "path": str(path)}
    missing = [seq for seq in seqs if text and seq not in text]
    if missing:
        p.error(f"--batches has no file for --seqs {missing} (files for {sorted(text)})")
    return text


# ----------------------------------------------------------------------------- timing

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(run, sync, repeats: int, measurements: int = 3) -> list[float]:
    """Wall time in ms per call of ``run``, averaged over ``repeats`` calls, ``measurements`` times."""
    times = []
    for _ in range(measurements):
        sync()
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        sync()
        times.append(round((time.perf_counter() - start) * 1000 / repeats, 4))
    return times


def kernel_table(run, sync, calls: int = 5, top: int | None = 14) -> list[tuple[float, str]]:
    """GPU time (us per call) of the largest kernels (all with ``top=None``)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            run()
        sync()
    times: dict[str, float] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            times[event.name[:110]] = times.get(event.name[:110], 0.0) + event.device_time / calls
    return sorted(((round(t, 1), name) for name, t in times.items()), reverse=True)[:top]
