"""Architecture knowledge: derived from the model where possible, a table of overrides where not.

lvlm-fix serves any model whose text decoder is a stack of self-attention layers reading the image
as image tokens in ``input_ids``. What the hooks need is read from the model itself
(:func:`derive_adapter`): where the decoder's layers are, each layer's attention module and its
output projection (VHR's per-head outputs are that projection's input), and the image token id(s).
Head counts come from the text config; prompts from the processor's chat template.

Only facts that cannot be read from a model are written down, keyed by ``config.model_type``:
:data:`OVERRIDES` (a prompt template for processors without a chat template, whether the
processor wants nested image lists, known massive-activation dimensions) and :data:`REFUSED` (why
a family the seam cannot serve is refused, where its config does not already say so).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .errors import UnsupportedModelError

__all__ = ["OVERRIDES", "REFUSED", "Adapter", "derive_adapter", "unsupported_reason"]


@dataclass(frozen=True)
class Adapter:
    """What lvlm-fix needs to know about one loaded LVLM.

    Attributes:
        model_type: ``config.model_type`` of the top-level model.
        text_layers: dotted path, from the top-level model, to the text decoder's layer list.
        attention: attribute of a decoder layer holding its self-attention module.
        out_proj: attribute of that attention module holding its output projection.
        image_token_ids: the token id(s) standing for image features in ``input_ids``.
        prompt_template: a one-image user turn, with the processor's image placeholder written
            out and ``{prompt}`` for the text; used only when the processor has no chat template.
        image_placeholder: the image placeholder written in ``prompt_template``.
        nested_images: the processor wants ``[[img], [img]]`` for a batch (Idefics3, SmolVLM, Gemma3).
        sink_dims: known sink dimensions of the text backbone, keyed by its hidden size
            (found offline on BOS and sink tokens by the VAR authors). Missing -> discovered.
    """

    model_type: str
    text_layers: str
    attention: str = "self_attn"
    out_proj: str = "o_proj"
    image_token_ids: tuple[int, ...] = ()
    prompt_template: str | None = None
    image_placeholder: str = "<image>"
    nested_images: bool = False
    sink_dims: Mapping[int, tuple[int, ...]] = field(default_factory=dict)


_LLAMA_SINK_DIMS = {4096: (2533, 1415), 5120: (2100, 4743)}  # LLaVA-1.5-7B / -13B (VAR repo constants)
_QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"  # one vision span per image
_QWEN = "<|im_start|>user\n" + _QWEN_IMAGE + "{prompt}<|im_end|>\n<|im_start|>assistant\n"
_IDEFICS = "User:<image>{prompt}<end_of_utterance>\nAssistant:"

# Facts a model cannot tell about itself. Every key is a field of Adapter.
OVERRIDES: Mapping[str, Mapping[str, Any]] = MappingProxyType({
    "llava": {"prompt_template": "USER: <image>\n{prompt} ASSISTANT:", "sink_dims": _LLAMA_SINK_DIMS},
    "llava_next": {"prompt_template": "[INST] <image>\n{prompt} [/INST]"},
    "qwen2_vl": {"prompt_template": _QWEN, "image_placeholder": _QWEN_IMAGE,
                 "sink_dims": {3584: (458, 2570)}},  # Qwen2-VL-7B, VAR paper
    "qwen2_5_vl": {"prompt_template": _QWEN, "image_placeholder": _QWEN_IMAGE},
    "qwen3_vl": {"prompt_template": _QWEN, "image_placeholder": _QWEN_IMAGE},
    "idefics3": {"prompt_template": _IDEFICS, "nested_images": True},
    "smolvlm": {"prompt_template": _IDEFICS, "nested_images": True},
    "gemma3": {"prompt_template": "<start_of_turn>user\n<start_of_image>{prompt}<end_of_turn>\n<start_of_turn>model\n",
               "image_placeholder": "<start_of_image>", "nested_images": True},
})

_CROSS = "the image enters the text decoder through cross-attention layers, not as image tokens in input_ids"
_OWN_GENERATE = ("its generate() hands the language model embeddings instead of input_ids, so the image tokens "
                 "cannot be located during generation")
_ACTION = "it is an action model: a PaliGemma backbone plus an action expert, not a text generator"
# Why the seam cannot serve a family, where its config does not say so by itself.
REFUSED: Mapping[str, str] = MappingProxyType({
    "mllama": _CROSS,
    "idefics": _CROSS,
    "evolla": "it reads protein sequences, not images",
    "pi0": _ACTION,
    "pi05": _ACTION,
    "mistral4": "it is a text-only model (no vision tower)",
    "blip-2": _OWN_GENERATE,
    "instructblip": _OWN_GENERATE,
    "diffusion_gemma": "its text model generates by block diffusion, not one token at a time",
})

# Where decoder layers keep their self-attention, and where that keeps its output projection.
_ATTENTION_NAMES = ("self_attn", "attention", "attn", "self_attention")
_OUT_PROJ_NAMES = ("o_proj", "out_proj", "dense", "wo", "c_proj")
_IMAGE_TOKEN_KEYS = ("image_token_id", "image_token_index")
# Kinds of decoder block, as text configs name them in ``layer_types``, that are not softmax attention.
_NOT_ATTENTION = frozenset({"linear_attention", "conv", "mamba", "mlp", "moe"})


def unsupported_reason(config: Any) -> str | None:
    """Why the seam cannot serve a model with this config, or None; read from the config alone.

    Called before any weight is loaded. The model-level checks of :func:`derive_adapter` come on top.
    """
    if config.model_type in REFUSED:
        return REFUSED[config.model_type]
    text = config.get_text_config()
    if getattr(config, "is_encoder_decoder", False) or getattr(text, "is_encoder_decoder", False):
        return "its text model is an encoder-decoder, whose encoder reads the image apart from the generated text"
    if getattr(text, "cross_attention_layers", None):
        return _CROSS
    others = sorted({t for t in getattr(text, "layer_types", None) or () if t in _NOT_ATTENTION})
    if others:
        return (f"some of its text decoder layers are {' / '.join(others)} blocks, not self-attention; lvlm-fix's "
                "methods act on attention layers only (hybrid models are not supported yet)")
    if not any(hasattr(config, key) for key in (*_IMAGE_TOKEN_KEYS, "vocabulary_map")):
        return "its config names no image token (image_token_id), so its image features are not placed at image tokens"
    return None


def _config_image_token_ids(config: Any) -> tuple[int, ...]:
    """The image token id of the config (``image_token_id`` / ``image_token_index`` / ``vocabulary_map["<image>"]``)."""
    for key in _IMAGE_TOKEN_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return (value,)
    vocab = getattr(config, "vocabulary_map", None)
    if isinstance(vocab, dict) and isinstance(vocab.get("<image>"), int):
        return (vocab["<image>"],)
    return ()


def derive_adapter(model: Any, processor: Any = None) -> Adapter:
    """Read the :class:`Adapter` of a loaded model (any image-text-to-text family).

    Raises:
        UnsupportedModelError: the model is not a stack of self-attention layers over image tokens
            that lvlm-fix's attention function can serve; the message says which part is missing.
    """
    config = model.config
    model_type = config.model_type
    reason = unsupported_reason(config)
    if reason is None:
        reason = _attention_backend_reason(model)
    if reason is not None:
        raise UnsupportedModelError(model_type, reason)
    text_layers, attention, out_proj, reason = _find_layers(model)
    if reason is not None:
        raise UnsupportedModelError(model_type, reason)
    image_token_ids = _config_image_token_ids(config) or _processor_image_token_ids(processor)
    if not image_token_ids:
        raise UnsupportedModelError(model_type, "neither its config (image_token_id) nor its processor (image_token) "
                                                "names its image token; set model.config.image_token_id")
    return Adapter(model_type=model_type, text_layers=text_layers, attention=attention, out_proj=out_proj,
                   image_token_ids=image_token_ids, **OVERRIDES.get(model_type, {}))


def _processor_image_token_ids(processor: Any) -> tuple[int, ...]:
    """The id of the processor's image token (``processor.image_token``), when the config names none."""
    token = getattr(processor, "image_token", None)
    tokenizer = getattr(processor, "tokenizer", None)
    if not isinstance(token, str) or tokenizer is None:
        return ()
    token_id = tokenizer.convert_tokens_to_ids(token)
    return (token_id,) if isinstance(token_id, int) and token_id != tokenizer.unk_token_id else ()


def _text_model(model: Any) -> Any:
    """The text decoder module (``get_decoder()``), or the model itself."""
    get = getattr(model, "get_decoder", None)
    decoder = get() if callable(get) else None
    return decoder if decoder is not None else model


def _attention_backend_reason(model: Any) -> str | None:
    """Why the text decoder's attention cannot go through lvlm-fix's attention function, or None."""
    text = _text_model(model)
    if not getattr(text, "_supports_sdpa", True):
        return ("its text attention runs only through the model's own eager code (e.g. attention sinks or sparse "
                "attention), which lvlm-fix's attention function cannot stand in for exactly")
    can_set = getattr(type(text), "_can_set_attn_implementation", None)
    if callable(can_set) and not can_set():
        return "its text attention does not go through transformers' attention interface"
    return None


def _find_layers(model: Any) -> tuple[str, str, str, str | None]:
    """``(layers path, attention attribute, output projection attribute, reason)`` of the text decoder.

    The layer list is the ``ModuleList`` of ``num_hidden_layers`` items inside the text decoder
    (``get_decoder()``) whose items hold a self-attention module with an output projection.
    """
    import torch

    text_config = model.config.get_text_config()
    n = text_config.num_hidden_layers
    decoder = _text_model(model)
    prefix = next((name for name, m in model.named_modules() if m is decoder), "")
    lists = [(name, m) for name, m in model.named_modules()
             if isinstance(m, torch.nn.ModuleList) and len(m) == n and name.startswith(prefix)]
    if not lists:
        return "", "", "", f"no list of {n} decoder layers (num_hidden_layers) was found in its text decoder"
    best: tuple[str, str, str, int] | None = None
    for name, layers in lists:
        for attn in _ATTENTION_NAMES:
            modules = [getattr(layer, attn, None) for layer in layers]
            found = [m for m in modules if isinstance(m, torch.nn.Module)]
            if not found:
                continue
            out = next((o for o in _OUT_PROJ_NAMES if all(hasattr(m, o) for m in found)), None)
            if out is not None and (best is None or len(found) > best[3]):
                best = (name, attn, out, len(found))
    if best is None:
        return "", "", "", "its text decoder layers have no self-attention module with an output projection"
    name, attn, out, n_attn = best
    if n_attn < n:
        return name, attn, out, (f"{n - n_attn} of its {n} text decoder layers have no self-attention module; "
                                 "lvlm-fix's methods act on attention layers only (hybrid models are not supported yet)")
    heads = text_config.num_attention_heads
    width = getattr(getattr(getattr(model.get_submodule(name)[0], attn), out), "in_features", None)
    if width is not None and width % heads:
        return name, attn, out, f"its attention output projection takes {width} features, not a multiple of {heads} heads"
    return name, attn, out, None
