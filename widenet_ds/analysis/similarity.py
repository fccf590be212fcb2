"""How alike consecutive blocks' outputs are: the mean cosine similarity, over the real (unpadded)
tokens of some batches, between the output of block j and of block j + 1 (one value per pair)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


def _base_model(model: nn.Module) -> nn.Module:
    """The encoder-holding model (``WideNetModel``) of a task model, or the model itself."""
    return getattr(model, "widenet", model)


@contextlib.contextmanager
def _eager() -> Iterator[None]:
    """Run compiled modules eagerly (the hooks below would otherwise cost recompilations)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None:
        yield
        return
    with set_stance("force_eager"):
        yield


@contextlib.contextmanager
def _block_outputs(encoder: nn.Module) -> Iterator[list[Tensor]]:
    """Collects every block call's output, in call order (a shared block module is called once per block)."""
    outputs: list[Tensor] = []

    def keep(_module, _inputs, output):
        outputs.append((output[0] if isinstance(output, tuple) else output).detach())

    handles = [block.register_forward_hook(keep) for block in encoder.blocks]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def block_output_cosine(model: nn.Module, batches: Iterable[dict[str, Tensor]], max_batches: int) -> list[float]:
    """Mean cosine similarity of consecutive blocks' outputs (``num_hidden_layers - 1`` values), averaged
    over the real tokens of up to ``max_batches`` batches (and over the ranks). Runs the model in eval
    mode without gradients; every rank must call it with as many batches (the MoE may communicate)."""
    base = _base_model(model)
    device = next(model.parameters()).device
    layers = base.config.num_hidden_layers
    sums = torch.zeros(max(layers - 1, 0) + 1, dtype=torch.float64, device=device)  # pairs..., tokens
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _eager(), _block_outputs(base.encoder) as outputs:
            for i, batch in enumerate(batches):
                if i >= max_batches:
                    break
                outputs.clear()
                mask = batch["attention_mask"].to(device)
                types = batch.get("token_type_ids")
                base(batch["input_ids"].to(device), mask, None if types is None else types.to(device))
                real = mask.bool()
                for j in range(len(outputs) - 1):
                    cosine = F.cosine_similarity(outputs[j].float(), outputs[j + 1].float(), dim=-1)  # (B, T)
                    sums[j] += cosine[real].double().sum()
                sums[-1] += real.sum()
    finally:
        model.train(was_training)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums)
    return (sums[:-1] / sums[-1].clamp(min=1)).tolist()
