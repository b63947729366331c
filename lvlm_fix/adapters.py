"""Architecture knowledge as data, keyed by ``config.model_type``.

Everything model-specific that the hooks and methods need lives here and nowhere else: where
the text decoder's layers are, how a prompt with one image is written when the processor has no
chat template, and the known massive-activation ("sink") dimensions of a text backbone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from .errors import UnsupportedModelError


@dataclass(frozen=True)
class Adapter:
    """What lvlm-fix needs to know about one LVLM architecture.

    Attributes:
        model_type: ``config.model_type`` of the top-level model.
        text_layers: dotted path, from the top-level model, to the text decoder's layer list.
        prompt_template: a one-image user turn, with the processor's image placeholder written
            out and ``{prompt}`` for the text; used when the processor has no chat template.
        image_placeholder: the image placeholder written in ``prompt_template``.
        nested_images: the processor wants ``[[img], [img]]`` for a batch (Idefics3, SmolVLM, Gemma3).
        sink_dims: known sink dimensions of the text backbone, keyed by its hidden size
            (found offline on BOS and sink tokens by the VAR authors). Missing -> discovered.
    """

    model_type: str
    text_layers: str
    prompt_template: str
    image_placeholder: str = "<image>"
    nested_images: bool = False
    sink_dims: Mapping[int, tuple[int, ...]] = field(default_factory=dict)


_LLAMA_SINK_DIMS = {4096: (2533, 1415), 5120: (2100, 4743)}  # LLaVA-1.5-7B / -13B (VAR repo constants)
_QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"  # one vision span per image
_QWEN = "<|im_start|>user\n" + _QWEN_IMAGE + "{prompt}<|im_end|>\n<|im_start|>assistant\n"
_IDEFICS = "User:<image>{prompt}<end_of_utterance>\nAssistant:"

ADAPTERS: Mapping[str, Adapter] = MappingProxyType(
    {
        a.model_type: a
        for a in (
            Adapter("llava", "model.language_model.layers", "USER: <image>\n{prompt} ASSISTANT:",
                    sink_dims=_LLAMA_SINK_DIMS),
            Adapter("llava_next", "model.language_model.layers", "[INST] <image>\n{prompt} [/INST]"),
            Adapter("qwen2_vl", "model.language_model.layers", _QWEN, _QWEN_IMAGE,
                    sink_dims={3584: (458, 2570)}),  # Qwen2-VL-7B, VAR paper
            Adapter("qwen2_5_vl", "model.language_model.layers", _QWEN, _QWEN_IMAGE),
            Adapter("idefics3", "model.text_model.layers", _IDEFICS, nested_images=True),
            Adapter("smolvlm", "model.text_model.layers", _IDEFICS, nested_images=True),
            Adapter("gemma3", "model.language_model.layers",
                    "<start_of_turn>user\n<start_of_image>{prompt}<end_of_turn>\n<start_of_turn>model\n",
                    "<start_of_image>", nested_images=True),
        )
    }
)


def adapter_for(model_type: str) -> Adapter:
    """The adapter for ``model_type``, or :class:`UnsupportedModelError` naming the supported list."""
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise UnsupportedModelError(model_type, ADAPTERS) from None
