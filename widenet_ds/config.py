"""The model configuration: architecture (``WideNetConfig``), MoE run-time settings
(``MoESettings``) and the named presets.

Where settings live:

- ``WideNetConfig`` holds the architecture. It is saved as ``config.json`` with every
  checkpoint and export.
- ``MoESettings`` holds the MoE's run-time knobs (capacity, token dropping, expert
  parallelism, aux-loss weight). Their home is the ``moe`` block of the DeepSpeed JSON;
  the values in effect are copied into ``WideNetConfig.moe`` so that a model loaded
  without DeepSpeed routes exactly as it was trained.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedConfig

NOISE_POLICIES = ("gaussian", "jitter", "rsample", "none")
ACTIVATIONS = ("gelu_new", "gelu", "relu")
MOE_IMPLS = ("batched", "grouped", "deepspeed")


class ConfigError(ValueError):
    """A configuration that cannot be built. The message lists every problem found."""

    def __init__(self, what: str, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid {what} ({len(problems)} problem(s)):\n{lines}")


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _raise_if(what: str, problems: list[str]) -> None:
    if problems:
        raise ConfigError(what, problems)


@dataclass
class MoESettings:
    """Run-time settings of the MoE layer (the ``moe`` block of a DeepSpeed JSON)."""

    capacity_factor: float = 1.2  # C in training: an expert keeps at most C*K*tokens/E tokens
    eval_capacity_factor: float = 1.2  # C in eval mode (the paper uses 2.0 for SQuAD1.1)
    min_capacity: int = 4  # lower bound of the per-expert capacity, in tokens
    drop_tokens: bool = True  # False: capacity grows to fit every route (no token dropped)
    ep_size: int = 1  # expert-parallel world: ranks that split the experts between them
    aux_loss_coef: float = 0.01  # lambda: weight of the load-balance loss (mean over routing calls)
    # How the MoE computes (same parameters, same results): "batched" runs the local experts as one
    # batched matmul over all E x C capacity slots and routes without host syncs; "grouped" packs the
    # kept routes and runs grouped matmuls over them only (with expert parallelism: the filled slots each
    # rank received);
    # "deepspeed" is DeepSpeed's own MoE forward and expert loop (the reference). A run-time setting,
    # not architecture: checkpoints load under any.
    impl: str = "batched"
    # The grouped experts' first bias + activation as one Triton kernel each way, where Triton runs
    # (false: plain ops, e.g. for a Triton problem on a GPU or to compare). Same function either way.
    fused_act: bool = True

    @classmethod
    def from_dict(cls, block: dict[str, Any] | None, source: str = "moe block") -> MoESettings:
        """Build from a JSON block, refusing unknown keys and bad values (all reported at once)."""
        settings, problems = cls._parse(block, source)
        _raise_if(source, problems)
        return settings

    @classmethod
    def _parse(cls, block: dict[str, Any] | None, source: str) -> tuple[MoESettings, list[str]]:
        """Settings from the known keys, and every problem of the block."""
        block = dict(block or {})
        known = {f.name for f in dataclasses.fields(cls)}
        problems = [f"{source}: unknown key '{k}' (known: {', '.join(sorted(known))})"
                    for k in block if k not in known]
        settings = cls(**{k: v for k, v in block.items() if k in known})
        return settings, problems + settings.problems(source)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def problems(self, source: str = "moe") -> list[str]:
        out = []
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            if not _finite_number(value) or value <= 0:
                out.append(f"{source}.{name} must be a number > 0, got {value!r}: an expert keeps at most "
                           "capacity_factor x top_k x tokens / experts routes, so even a uniform router would drop "
                           "every route (all tokens skip the MoE); the paper uses 1.2")
        if not _finite_number(self.aux_loss_coef) or self.aux_loss_coef < 0:
            out.append(f"{source}.aux_loss_coef must be a number >= 0, got {self.aux_loss_coef!r}")
        for name, low in (("min_capacity", 0), ("ep_size", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                out.append(f"{source}.{name} must be an integer >= {low}, got {value!r}")
        for name in ("drop_tokens", "fused_act"):
            if not isinstance(getattr(self, name), bool):
                out.append(f"{source}.{name} must be true or false, got {getattr(self, name)!r}")
        if self.impl not in MOE_IMPLS:
            out.append(f"{source}.impl must be one of {MOE_IMPLS}, got {self.impl!r}")
        return out

    def warnings(self, source: str = "moe") -> list[str]:
        """Settings that run but drop many routes: with C < 1, even a perfectly uniform router
        (every expert offered top_k x tokens / experts routes) overflows every expert's capacity of
        C x top_k x tokens / experts and drops 1 - C of its routes."""
        if not self.drop_tokens:
            return []
        return [f"{source}.{name} {value} drops routes even when the router is perfectly balanced: a uniform "
                f"router would drop {1 - value:.0%} of them (they skip the MoE); the paper uses 1.2 (2.0 at "
                "evaluation for SQuAD1.1)"
                for name, value in (("capacity_factor", self.capacity_factor),
                                    ("eval_capacity_factor", self.eval_capacity_factor))
                if _finite_number(value) and 0 < value < 1]


class WideNetConfig(PreTrainedConfig):
    """Architecture of a WideNet, ALBERT or BERT encoder (one class, three families).

    Sharing is set per component: ``share_attention`` and ``share_ffn`` make one module
    instance that every block calls; ``share_layer_norm`` shares the two LayerNorms of a
    block as well (ALBERT). WideNet shares attention and FFN/MoE but not LayerNorms.
    ``num_experts == 1`` gives a dense FFN.
    """

    model_type = "widenet"

    vocab_size: int = 30000  # tokens in the vocabulary
    embedding_size: int = 128  # factorized embedding width (ALBERT's E), projected to hidden_size
    hidden_size: int = 768  # width of the residual stream
    num_hidden_layers: int = 12  # blocks N; with sharing, the number of times the shared layers run
    num_attention_heads: int = 12  # heads of the multi-head attention
    intermediate_size: int = 3072  # inner width of the FFN and of every expert
    hidden_act: str = "gelu_new"  # FFN activation: gelu_new (tanh approx., ALBERT), gelu or relu
    hidden_dropout_prob: float = 0.0  # dropout on embeddings and on every residual branch
    attention_probs_dropout_prob: float = 0.0  # dropout on attention probabilities
    classifier_dropout_prob: float = 0.1  # dropout before the SOP and GLUE classifiers
    max_position_embeddings: int = 512  # longest sequence (learned absolute positions)
    type_vocab_size: int = 2  # segment ids (A/B)
    initializer_range: float = 0.02  # std of the normal init of weights
    layer_norm_eps: float = 1e-12  # LayerNorm epsilon
    pre_layer_norm: bool = True  # True: x + f(LN(x)) (the paper's WideNet); False: LN(x + f(x)) (ALBERT/BERT)
    share_attention: bool = True  # one attention module reused by every block
    share_ffn: bool = True  # one FFN / MoE module reused by every block
    share_layer_norm: bool = False  # one LayerNorm pair for all blocks (ALBERT) instead of one per block
    num_experts: int = 4  # experts E in the MoE; 1 gives a dense FFN
    top_k: int = 2  # experts per token K
    router_noise: str = "gaussian"  # gaussian (paper, on logits), jitter / rsample (DeepSpeed's), none
    router_noise_std: float | None = None  # std of the gaussian logit noise; None means 1/E (official code)
    router_normalize_top_k: bool = False  # renormalise the kept top-k gates to sum 1 (GShard/DeepSpeed top-2)
    moe: dict | None = None  # MoESettings in effect, recorded from the DeepSpeed JSON
    pad_token_id: int | None = 0
    bos_token_id: int | None = 2
    eos_token_id: int | None = 3
    tie_word_embeddings: bool = True  # MLM decoder shares the word-embedding matrix

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.moe = {**MoESettings().to_dict(), **(self.moe or {})}
        self.check()

    @property
    def moe_settings(self) -> MoESettings:
        return MoESettings(**self.moe)

    @property
    def noise_std(self) -> float:
        """Std of the Gaussian router noise actually used."""
        return 1.0 / self.num_experts if self.router_noise_std is None else self.router_noise_std

    def check(self) -> None:
        """Raise one ConfigError listing every problem of this config."""
        _raise_if("WideNetConfig", self.problems())

    def problems(self) -> list[str]:
        p = []
        positive = ("vocab_size", "embedding_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "intermediate_size", "max_position_embeddings", "type_vocab_size", "num_experts", "top_k")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                p.append(f"{name} must be a positive integer, got {value!r}")
        if not p and self.hidden_size % self.num_attention_heads:
            p.append(f"num_attention_heads ({self.num_attention_heads}) must divide hidden_size ({self.hidden_size})")
        if not p and self.top_k > self.num_experts:
            p.append(f"top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout_prob"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 <= value < 1:
                p.append(f"{name} must be in [0, 1), got {value!r}")
        if self.hidden_act not in ACTIVATIONS:
            p.append(f"hidden_act must be one of {ACTIVATIONS}, got {self.hidden_act!r}")
        if self.router_noise not in NOISE_POLICIES:
            p.append(f"router_noise must be one of {NOISE_POLICIES}, got {self.router_noise!r}")
        if self.router_noise == "rsample" and self.top_k != 1:
            p.append("router_noise 'rsample' (Gumbel sampling of the expert) needs top_k 1")
        if self.router_noise_std is not None and not self.router_noise_std >= 0:
            p.append(f"router_noise_std must be >= 0 or null (1/E), got {self.router_noise_std!r}")
        settings, moe_problems = MoESettings._parse(self.moe, "moe")
        p += moe_problems
        if isinstance(self.num_experts, int) and isinstance(settings.ep_size, int) and settings.ep_size >= 1:
            if self.num_experts % settings.ep_size:
                p.append(f"moe.ep_size ({settings.ep_size}) must divide num_experts ({self.num_experts})")
        return p

    @classmethod
    def presets(cls) -> dict[str, dict[str, Any]]:
        """The named presets of this config class."""
        return PRESETS

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> WideNetConfig:
        """A named preset (see ``presets()``), with field overrides."""
        presets = cls.presets()
        if name not in presets:
            raise ConfigError("preset", [f"unknown preset '{name}' (known: {', '.join(presets)})"])
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)} - {"num_labels"})
        _raise_if(f"overrides of preset '{name}'", [f"unknown field '{k}'" for k in unknown])
        return cls(**{**presets[name], **overrides})

    def with_moe_settings(self, settings: MoESettings) -> WideNetConfig:
        """Record run-time MoE settings (from a DeepSpeed JSON) in this config; returns self."""
        self.moe = settings.to_dict()
        self.check()
        return self


def _family(hidden: int, layers: int, heads: int, ffn: int) -> dict[str, dict[str, Any]]:
    """ALBERT, BERT (factorized embedding) and WideNet E=4/8/16 at one size."""
    shape = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                 intermediate_size=ffn, embedding_size=128, vocab_size=30000)
    dense = dict(num_experts=1, top_k=1, pre_layer_norm=False)
    albert = dict(shape, **dense, share_attention=True, share_ffn=True, share_layer_norm=True)
    bert = dict(shape, **dense, share_attention=False, share_ffn=False, share_layer_norm=False)
    widenet = {e: dict(shape, num_experts=e, top_k=2, pre_layer_norm=True, share_attention=True,
                       share_ffn=True, share_layer_norm=False) for e in (4, 8, 16)}
    return {"albert": albert, "bert": bert, **{f"widenet-e{e}": w for e, w in widenet.items()}}


def _presets() -> dict[str, dict[str, Any]]:
    presets = {
        "debug": dict(vocab_size=512, embedding_size=16, hidden_size=32, num_hidden_layers=3,
                      num_attention_heads=4, intermediate_size=64, max_position_embeddings=128,
                      num_experts=4, top_k=2),
        # small enough to pretrain on a laptop CPU in minutes (the README's default run)
        "widenet-small": dict(vocab_size=8000, embedding_size=128, hidden_size=256, num_hidden_layers=4,
                              num_attention_heads=4, intermediate_size=1024, num_experts=4, top_k=2),
    }
    for size, shape in (("base", (768, 12, 12, 3072)), ("large", (1024, 24, 16, 4096))):
        for family, fields in _family(*shape).items():
            stem, _, experts = family.partition("-")
            presets["-".join(filter(None, (stem, size, experts)))] = fields
    return presets


# debug, widenet-small, albert-base, bert-base, widenet-base-e4/e8/e16, and the same at -large.
PRESETS: dict[str, dict[str, Any]] = _presets()


class WideNetVisionConfig(WideNetConfig):
    """Architecture of a vision transformer on the same encoder: ViT (no sharing, dense FFN), WideNet
    (shared attention and MoE, one LayerNorm pair per block) or ViT-MoE (MoE in every other block).

    The image is cut into ``patch_size`` x ``patch_size`` patches, each projected to ``hidden_size``; a
    class token and learned positions are added, and the classifier reads the class token after the
    encoder's final LayerNorm. The text fields (vocab_size, embedding_size, ...) are unused.
    """

    model_type = "widenet_vision"

    image_size: int = 224  # side of the (square) input image, in pixels
    patch_size: int = 16  # side of a patch; image_size must be a multiple of it
    num_channels: int = 3  # input channels (RGB)
    moe_every: int = 1  # with share_ffn False: an MoE in every moe_every-th block (ViT-MoE: 2), dense elsewhere
    pooling: str = "token"  # what the classifier reads: the class token, or the "mean" of the patch tokens
    hidden_act: str = "gelu"  # ViT's exact GELU
    layer_norm_eps: float = 1e-6  # ViT's LayerNorm epsilon
    classifier_dropout_prob: float = 0.0  # dropout before the classifier
    tie_word_embeddings: bool = False  # no word embeddings

    @classmethod
    def presets(cls) -> dict[str, dict[str, Any]]:
        return VISION_PRESETS

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def problems(self) -> list[str]:
        p = super().problems()
        for name in ("image_size", "patch_size", "num_channels", "moe_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                p.append(f"{name} must be a positive integer, got {value!r}")
        if self.pooling not in ("token", "mean"):
            p.append(f"pooling must be 'token' or 'mean', got {self.pooling!r}")
        if not p and self.image_size % self.patch_size:
            p.append(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        if not p and self.moe_every > 1 and self.share_ffn:
            p.append(f"moe_every {self.moe_every} needs share_ffn false (a shared FFN is one module: every "
                     "block runs the same one)")
        if not p and self.moe_every > 1 and self.num_experts == 1:
            p.append(f"moe_every {self.moe_every} needs num_experts > 1")
        return p


def _vision_family(name: str, hidden: int, layers: int, heads: int, ffn: int, moe_ffn: int) -> dict[str, dict]:
    """ViT, WideNet (E=4, K=2) and ViT-MoE (MoE every other block, E=4, K=2) at one ViT size."""
    # dropout 0.1: the official WideNet code's ViT configs (dropout_rate 0.1, attention dropout 0)
    shape = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, image_size=224,
                 patch_size=16, pre_layer_norm=True, share_layer_norm=False, hidden_dropout_prob=0.1)
    moe = dict(num_experts=4, top_k=2)
    return {
        f"vit-{name}16": dict(shape, intermediate_size=ffn, num_experts=1, top_k=1, share_attention=False,
                              share_ffn=False),
        f"widenet-vit-{name}": dict(shape, **moe, intermediate_size=moe_ffn, share_attention=True, share_ffn=True),
        f"vit-moe-{name}16": dict(shape, **moe, intermediate_size=ffn, share_attention=False, share_ffn=False,
                                  moe_every=2),
    }


def _vision_presets() -> dict[str, dict[str, Any]]:
    presets = {
        # 32 px images, 8 px patches (16 patches + the class token): trains in seconds on a CPU
        "debug": dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                      image_size=32, patch_size=8, num_experts=4, top_k=2),
    }
    # ViT-B/L/H widths and depths; WideNet's MoE FFN 4096 / 4096 / 5120 (the paper's WideNet-B/L/H)
    for name, shape in (("b", (768, 12, 12, 3072, 4096)), ("l", (1024, 24, 16, 4096, 4096)),
                        ("h", (1280, 32, 16, 5120, 5120))):
        presets.update(_vision_family(name, *shape))
    return presets


# debug, vit-b16 / -l16 / -h16, widenet-vit-b / -l / -h, vit-moe-b16 / -l16 / -h16 (1000 classes unless
# num_labels is given).
VISION_PRESETS: dict[str, dict[str, Any]] = _vision_presets()
