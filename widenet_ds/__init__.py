"""widenet-ds: WideNet ("Go Wider Instead of Deeper") on DeepSpeed's MoE layer."""

from transformers import (
                          AutoConfig,
                          AutoModel,
                          AutoModelForMaskedLM,
                          AutoModelForPreTraining,
                          AutoModelForQuestionAnswering,
                          AutoModelForSequenceClassification,
)

from .config import PRESETS, ConfigError, MoESettings, WideNetConfig
from .modeling import (
                          WideNetForMaskedLM,
                          WideNetForPreTraining,
                          WideNetForQuestionAnswering,
                          WideNetForSequenceClassification,
                          WideNetModel,
                          WideNetPreTrainedModel,
)

AutoConfig.register("widenet", WideNetConfig, exist_ok=True)
AutoModel.register(WideNetConfig, WideNetModel, exist_ok=True)
AutoModelForPreTraining.register(WideNetConfig, WideNetForPreTraining, exist_ok=True)
AutoModelForMaskedLM.register(WideNetConfig, WideNetForMaskedLM, exist_ok=True)
AutoModelForSequenceClassification.register(WideNetConfig, WideNetForSequenceClassification, exist_ok=True)
AutoModelForQuestionAnswering.register(WideNetConfig, WideNetForQuestionAnswering, exist_ok=True)

__all__ = [
    "PRESETS", "ConfigError", "MoESettings", "WideNetConfig", "WideNetForMaskedLM", "WideNetForPreTraining",
    "WideNetForQuestionAnswering", "WideNetForSequenceClassification", "WideNetModel", "WideNetPreTrainedModel",
]
__version__ = "0.1.0"
