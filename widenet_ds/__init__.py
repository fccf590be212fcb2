"""widenet-ds: WideNet ("Go Wider Instead of Deeper") on DeepSpeed's MoE layer."""

from transformers import (
                          AutoConfig,
                          AutoModel,
                          AutoModelForImageClassification,
                          AutoModelForMaskedLM,
                          AutoModelForPreTraining,
                          AutoModelForQuestionAnswering,
                          AutoModelForSequenceClassification,
)

from .config import PRESETS, VISION_PRESETS, ConfigError, MoESettings, WideNetConfig, WideNetVisionConfig
from .modeling import (
                          WideNetForImageClassification,
                          WideNetForMaskedLM,
                          WideNetForPreTraining,
                          WideNetForQuestionAnswering,
                          WideNetForSequenceClassification,
                          WideNetModel,
                          WideNetPreTrainedModel,
                          WideNetVisionModel,
)

AutoConfig.register("widenet", WideNetConfig, exist_ok=True)
AutoModel.register(WideNetConfig, WideNetModel, exist_ok=True)
AutoModelForPreTraining.register(WideNetConfig, WideNetForPreTraining, exist_ok=True)
AutoModelForMaskedLM.register(WideNetConfig, WideNetForMaskedLM, exist_ok=True)
AutoModelForSequenceClassification.register(WideNetConfig, WideNetForSequenceClassification, exist_ok=True)
AutoModelForQuestionAnswering.register(WideNetConfig, WideNetForQuestionAnswering, exist_ok=True)
# the vision models: a config type of their own, so that AutoModel gives the vision encoder
AutoConfig.register("widenet_vision", WideNetVisionConfig, exist_ok=True)
AutoModel.register(WideNetVisionConfig, WideNetVisionModel, exist_ok=True)
AutoModelForImageClassification.register(WideNetVisionConfig, WideNetForImageClassification, exist_ok=True)

__all__ = [
    "PRESETS", "ConfigError", "MoESettings", "WideNetConfig", "WideNetForMaskedLM", "WideNetForPreTraining",
    "WideNetForQuestionAnswering", "WideNetForSequenceClassification", "WideNetModel", "WideNetPreTrainedModel",
    "VISION_PRESETS", "WideNetForImageClassification", "WideNetVisionConfig", "WideNetVisionModel",
]
__version__ = "0.1.0"
