"""Model families the runtime serves, chosen from config.json's architectures / model_type."""

from __future__ import annotations

from uora_rt.models.bert import BertModel, BertSpec, read_pooling
from uora_rt.models.llama import LlamaModel, LlamaSpec

DECODERS = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"}
ENCODERS = {"BertModel", "BertForMaskedLM", "BertForSequenceClassification", "RobertaModel",
            "RobertaForMaskedLM", "XLMRobertaModel"}
DECODER_TYPES = {"llama", "mistral", "qwen2"}
ENCODER_TYPES = {"bert", "roberta", "xlm-roberta"}


def build(config: dict, folder, tensor_names) -> "LlamaModel | BertModel":
    """An empty model of the right family for this checkpoint (weights not yet loaded)."""
    archs = config.get("architectures") or []
    model_type = config.get("model_type")
    if any(a in DECODERS for a in archs) or (not archs and model_type in DECODER_TYPES):
        return LlamaModel(LlamaSpec.from_config(config))
    if any(a in ENCODERS for a in archs) or (not archs and model_type in ENCODER_TYPES):
        pooling, normalize = read_pooling(folder)
        has_pooler = any(n.endswith("pooler.dense.weight") for n in tensor_names)
        return BertModel(BertSpec.from_config(config), pooling, normalize, pooler=has_pooler)
    raise ValueError(f"{folder}: unsupported architecture {archs or model_type!r}; supported: "
                     f"{sorted(DECODERS | ENCODERS)}")
