"""Architecture knowledge: derived from the model where possible, tables and the user's overrides where not.

lvlm-fix serves any model whose text decoder is a stack of self-attention layers reading the image
as image tokens in ``input_ids``. What the hooks need is read from the model itself
(:func:`derive_adapter`): where the decoder's layers are, each layer's attention module and its
output projection (VHR's per-head outputs are that projection's input), and the image token id(s).
Head counts come from the text config; prompts from the processor's chat template.

Only facts that cannot be read from a model are written down, keyed by ``config.model_type``:
:data:`OVERRIDES` (any :class:`Adapter` field: a prompt template for processors without a chat
template, whether the processor wants nested image lists, known massive-activation dimensions, and
the layer paths of a family that derivation misreads) and :data:`REFUSED` (why a family the seam
cannot serve is refused, where its config does not already say so).

A user serves a model that derivation cannot read, without editing the package, through the same
fields: ``load(..., adapter={...})`` / ``wrap(model, processor, adapter={...})`` take an
:class:`Adapter` or a mapping of some of its fields (:data:`HATCH_FIELDS`). What is given is checked
against the model before anything else happens and used as given; what is left out is derived.
The order is: derived, then :data:`OVERRIDES`, then the user's adapter.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

from .errors import InputError, UnsupportedModelError

__all__ = ["HATCH_FIELDS", "OVERRIDES", "REFUSED", "Adapter", "check_overrides", "derive_adapter",
           "unsupported_reason"]


@dataclass(frozen=True)
class Adapter:
    """What lvlm-fix needs to know about one loaded LVLM.

    Attributes:
        model_type: ``config.model_type`` of the top-level model.
        text_layers: dotted path, from the top-level model, to the text decoder's layer list.
        attention: dotted path, from a decoder layer, to its self-attention module.
        out_proj: dotted path, from that attention module, to its output projection.
        image_token_ids: the token id(s) standing for image features in ``input_ids``; in an
            override also one id or the token's text (read through the processor's tokenizer).
        prompt_template: a one-image user turn, with the processor's image placeholder written
            out and ``{prompt}`` for the text; used only when the processor has no chat template.
        image_placeholder: the image placeholder written in ``prompt_template``.
        nested_images: the processor wants ``[[img], [img]]`` for a batch (Idefics3, SmolVLM, Gemma3).
        sink_dims: known sink dimensions of the text backbone, keyed by its hidden size
            (found offline on BOS and sink tokens by the VAR authors). Missing -> discovered.
        token_grid: ``(rows, cols, offset)`` of each row's image among its image tokens, for a
            family whose layout :mod:`lvlm_fix.layout` cannot read (CARVE's masks, the heads
            figure); None -> read by the layout rules.
        mlp: dotted path, from a decoder layer, to its MLP (methods that edit its output: VISTA,
            VTI, MemVR); None -> the layer's ``mlp`` / ``feed_forward`` / ``ffn``.
        final_norm: dotted path, from the top-level model, to the text decoder's final norm
            (early exits: DoLa, DeCo, MemVR); None -> the ``norm`` beside the layer list.
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
    token_grid: tuple[int, int, int] | None = None
    mlp: str | None = None  # dotted path, from a decoder layer, to its MLP; None: found by its usual names
    final_norm: str | None = None  # dotted path, from the top-level model, to the text decoder's last norm; None: found


# What OVERRIDES and a user's adapter may set: every field but the model type, which the config names.
HATCH_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Adapter) if f.name != "model_type")
_PATH_FIELDS = ("text_layers", "attention", "out_proj")
_HATCH_HINT = ("; if it has them under other names, name them: lvlm_fix.wrap(model, processor, adapter={'text_layers': "
               "..., 'attention': ..., 'out_proj': ...}) (docs: adding a model family)")

_LLAMA_SINK_DIMS = {4096: (2533, 1415), 5120: (2100, 4743)}  # LLaVA-1.5-7B / -13B (VAR repo constants)
_QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"  # one vision span per image
_QWEN = "<|im_start|>user\n" + _QWEN_IMAGE + "{prompt}<|im_end|>\n<|im_start|>assistant\n"
_IDEFICS = "User:<image>{prompt}<end_of_utterance>\nAssistant:"

# Facts a model cannot tell about itself, keyed by config.model_type. Every key is one of HATCH_FIELDS; each
# replaces what derivation would find (a user's adapter replaces these in turn).
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


def unsupported_reason(config: Any, image_token_given: bool = False) -> str | None:
    """Why the seam cannot serve a model with this config, or None; read from the config alone.

    Called before any weight is loaded. The model-level checks of :func:`derive_adapter` come on top.
    ``image_token_given``: the image token comes from an override, so a config naming none is no reason.
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
    if not image_token_given and not any(hasattr(config, key) for key in (*_IMAGE_TOKEN_KEYS, "vocabulary_map")):
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


def check_overrides(adapter: Adapter | Mapping[str, Any] | None, model_type: str | None = None) -> dict[str, Any]:
    """The fields an escape-hatch ``adapter`` sets, checked for names and types (the model is not needed).

    ``adapter`` is an :class:`Adapter` (every field counts as given; its ``model_type`` must be
    ``model_type`` when that is known) or a mapping of some of :data:`HATCH_FIELDS`.

    Raises:
        InputError: not an Adapter or a mapping, a key that is no field, or a value of the wrong type;
            one line naming it and the fix.
    """
    if adapter is None:
        return {}
    if isinstance(adapter, Adapter):
        if model_type is not None and adapter.model_type != model_type:
            raise InputError(f"adapter.model_type={adapter.model_type!r} is not this model's {model_type!r}; pass "
                             "a mapping of the fields to set instead (adapter={'text_layers': ...})")
        given = {name: getattr(adapter, name) for name in HATCH_FIELDS}
        if not given["image_token_ids"]:  # the dataclass default: nothing said, so derived
            del given["image_token_ids"]
    elif isinstance(adapter, Mapping):
        given = dict(adapter)
    else:
        raise InputError(f"adapter must be a lvlm_fix.adapters.Adapter or a dict of its fields, got "
                         f"{type(adapter).__name__}; e.g. adapter={{'text_layers': 'model.decoder.blocks'}}")
    for key, value in given.items():
        if key not in HATCH_FIELDS:
            import difflib

            close = difflib.get_close_matches(str(key), HATCH_FIELDS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise InputError(f"adapter key {key!r} is not an adapter field; {hint}use one of {', '.join(HATCH_FIELDS)}")
        _check_field(key, value)
    return given


def _check_field(key: str, value: Any) -> None:
    """One overridden field's type; paths are checked against the model later (:func:`derive_adapter`)."""
    def wrong(expected: str) -> InputError:
        return InputError(f"adapter {key}={value!r} is not {expected}")

    if key in _PATH_FIELDS and not (isinstance(value, str) and value.strip(".") and " " not in value):
        raise wrong("a dotted module path; write it as named_modules() names it, e.g. 'model.language_model.layers'")
    if key == "image_token_ids":
        ids = (value,) if isinstance(value, (int, str)) else value
        if not (isinstance(ids, (list, tuple)) and ids and all(
                isinstance(i, str) and i or isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)):
            raise wrong("a token id, a list of them, or the image token's text (e.g. '<image>')")
    if key in ("mlp", "final_norm") and value is not None and not (isinstance(value, str) and value.strip(".")
                                                                    and " " not in value):
        raise wrong("a dotted module path, e.g. 'mlp' (from a decoder layer) or 'model.language_model.norm'")
    if key == "prompt_template" and value is not None and not (isinstance(value, str) and "{prompt}" in value):
        raise wrong("a template with {prompt}; write the user text as {prompt}")
    if key == "image_placeholder" and not (isinstance(value, str) and value):
        raise wrong("the image placeholder text of the prompt template")
    if key == "nested_images" and not isinstance(value, bool):
        raise wrong("True or False")
    if key == "sink_dims" and not (isinstance(value, Mapping) and all(
            isinstance(k, int) and isinstance(v, (list, tuple)) and all(isinstance(d, int) for d in v)
            for k, v in value.items())):
        raise wrong("a mapping {hidden_size: (dim, ...)}")
    if key == "token_grid" and value is not None and not (
            isinstance(value, (list, tuple)) and len(value) in (2, 3)
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            and value[0] > 0 and value[1] > 0 and (len(value) == 2 or value[2] >= 0)):
        raise wrong("(rows, cols) or (rows, cols, offset) with rows, cols >= 1 and offset >= 0")


def derive_adapter(model: Any, processor: Any = None, adapter: Adapter | Mapping[str, Any] | None = None) -> Adapter:
    """Read the :class:`Adapter` of a loaded model (any image-text-to-text family).

    Args:
        model: the loaded model.
        processor: its processor, for the image token when the config names none.
        adapter: the escape hatch: an :class:`Adapter`, or a mapping of some of its fields, set on
            top of what is derived and of the family's :data:`OVERRIDES`. A given path is used as
            given (derivation does not second-guess it) after it is checked against the model.

    Raises:
        UnsupportedModelError: the model is not a stack of self-attention layers over image tokens
            that lvlm-fix's attention function can serve; the message says which part is missing.
        InputError: an override that does not fit the model (a path it does not have, a layer list
            of another length than ``num_hidden_layers``); one line naming the path and the fix.
    """
    config = model.config
    model_type = config.model_type
    wanted = {**OVERRIDES.get(model_type, {}), **check_overrides(adapter, model_type)}
    reason = unsupported_reason(config, image_token_given="image_token_ids" in wanted)
    if reason is None:
        reason = _attention_backend_reason(model)
    if reason is not None:
        raise UnsupportedModelError(model_type, reason)
    text_layers, attention, out_proj, reason = _find_layers(
        model, wanted.get("text_layers"), wanted.get("attention"), wanted.get("out_proj"))
    if reason is not None:
        raise UnsupportedModelError(model_type, reason)
    if "image_token_ids" in wanted:
        image_token_ids = _given_image_token_ids(model, processor, wanted["image_token_ids"])
    else:
        image_token_ids = _config_image_token_ids(config) or _processor_image_token_ids(processor)
    if not image_token_ids:
        raise UnsupportedModelError(model_type, "neither its config (image_token_id) nor its processor (image_token) "
                                                "names its image token; set model.config.image_token_id or pass "
                                                "adapter={'image_token_ids': ...}")
    rest = {k: v for k, v in wanted.items() if k not in (*_PATH_FIELDS, "image_token_ids")}
    if rest.get("token_grid") is not None:
        rest["token_grid"] = (*rest["token_grid"], 0)[:3]  # (rows, cols) starts at the first image token
    return Adapter(model_type=model_type, text_layers=text_layers, attention=attention, out_proj=out_proj,
                   image_token_ids=image_token_ids, **rest)


def _given_image_token_ids(model: Any, processor: Any, value: Any) -> tuple[int, ...]:
    """An overridden image token (an id, ids, or token text) as ids inside the model's vocabulary."""
    ids = []
    for item in (value,) if isinstance(value, (int, str)) else value:
        if isinstance(item, str):
            tokenizer = getattr(processor, "tokenizer", processor)
            if tokenizer is None or not hasattr(tokenizer, "convert_tokens_to_ids"):
                raise InputError(f"adapter image_token_ids={item!r} is token text, which needs the processor; pass "
                                 "it (wrap(model, processor, ...)) or give the token id")
            token_id = tokenizer.convert_tokens_to_ids(item)
            if not isinstance(token_id, int) or token_id == tokenizer.unk_token_id:
                raise InputError(f"adapter image_token_ids={item!r} is not a token of this tokenizer; give the "
                                 "image token exactly as the processor writes it, or its id")
            item = token_id
        ids.append(item)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None)
    for token_id in ids:
        if vocab is not None and token_id >= vocab:
            raise InputError(f"adapter image_token_ids: {token_id} is outside this model's vocabulary of {vocab} "
                             "tokens; give the id of the token the processor puts where the image features go")
    return tuple(dict.fromkeys(ids))


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


def _module_at(root: Any, path: str) -> Any:
    """The module at dotted ``path`` under ``root``, or None."""
    import torch

    try:
        found = root.get_submodule(path)
    except AttributeError:
        return None
    return found if isinstance(found, torch.nn.Module) else None


def _paths_ending(root: Any, names: tuple[str, ...]) -> list[str]:
    """Paths of ``root``'s submodules whose last name is one of ``names`` (for a "did you mean")."""
    return [path for path, _ in root.named_modules() if path and path.rsplit(".", 1)[-1] in names][:3]


def _given_layers(model: Any, path: str, n: int) -> Any:
    """The layer list at a given ``text_layers`` path, or one line on what is there instead."""
    import torch

    lists = [name for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n]
    hint = (f" (lists of {n} modules here: {', '.join(lists[:4])})" if lists else "")
    layers = _module_at(model, path)
    if layers is None:
        raise InputError(f"adapter text_layers={path!r} is not a module of this {type(model).__name__}; pass the "
                         f"dotted path, from the model, of its text decoder's layer list{hint}")
    if not isinstance(layers, (torch.nn.ModuleList, torch.nn.Sequential)):
        raise InputError(f"adapter text_layers={path!r} is a {type(layers).__name__}, not a list of decoder layers; "
                         f"pass the path of the ModuleList of its text decoder's layers{hint}")
    if len(layers) != n:
        raise InputError(f"adapter text_layers={path!r} holds {len(layers)} modules, but the text config has "
                         f"num_hidden_layers={n}: it is not the text decoder's layer list; pass that list's path{hint}")
    return layers


def _find_layers(model: Any, layers_path: str | None = None, attention: str | None = None,
                 out_proj: str | None = None) -> tuple[str, str, str, str | None]:
    """``(layers path, attention path, output projection path, reason)`` of the text decoder.

    Derived, each part not given: the layer list is the ``ModuleList`` of ``num_hidden_layers``
    items inside the text decoder (``get_decoder()``) whose items hold a self-attention module
    with an output projection. A given part is the only candidate, and one that is not in the
    model raises :class:`InputError` naming it.
    """
    import torch

    text_config = model.config.get_text_config()
    n = text_config.num_hidden_layers
    if layers_path is not None:
        lists = [(layers_path, _given_layers(model, layers_path, n))]
    else:
        decoder = _text_model(model)
        prefix = next((name for name, m in model.named_modules() if m is decoder), "")
        lists = [(name, m) for name, m in model.named_modules()
                 if isinstance(m, torch.nn.ModuleList) and len(m) == n and name.startswith(prefix)]
    if not lists:
        return "", "", "", (f"no list of {n} decoder layers (num_hidden_layers) was found in its text decoder"
                            f"{_HATCH_HINT}")
    best: tuple[str, str, str, int] | None = None
    for name, layers in lists:
        for attn in (attention,) if attention else _ATTENTION_NAMES:
            found = [m for m in (_module_at(layer, attn) for layer in layers) if m is not None]
            if not found:
                continue
            out = next((o for o in ((out_proj,) if out_proj else _OUT_PROJ_NAMES)
                        if all(_module_at(m, o) is not None for m in found)), None)
            if out is not None and (best is None or len(found) > best[3]):
                best = (name, attn, out, len(found))
    if best is None:
        first = lists[0][1][0]
        if attention and _module_at(first, attention) is None:
            near = _paths_ending(first, _ATTENTION_NAMES)
            raise InputError(f"adapter attention={attention!r} is not a module of decoder layer 0 "
                             f"({type(first).__name__}); pass the dotted path, from a decoder layer, of its "
                             f"self-attention module{', e.g. ' + repr(near[0]) if near else ''}")
        attn_module = _module_at(first, attention) if attention else next(
            (m for a in _ATTENTION_NAMES if (m := _module_at(first, a)) is not None), None)
        if out_proj and attn_module is not None:
            near = _paths_ending(attn_module, _OUT_PROJ_NAMES)
            raise InputError(f"adapter out_proj={out_proj!r} is not a module of the attention module of decoder "
                             f"layer 0 ({type(attn_module).__name__}); pass the dotted path, from the attention "
                             f"module, of its output projection{', e.g. ' + repr(near[0]) if near else ''}")
        near = _paths_ending(first, _ATTENTION_NAMES)  # nested one level down, say: the user confirms it
        hint = (f"; if {near[0]!r} of each layer is its self-attention, name it: lvlm_fix.wrap(model, processor, "
                f"adapter={{'attention': {near[0]!r}}}) (docs: adding a model family)" if near and not attention
                else _HATCH_HINT)
        return "", "", "", f"its text decoder layers have no self-attention module with an output projection{hint}"
    name, attn, out, n_attn = best
    if n_attn < n:
        return name, attn, out, (f"{n - n_attn} of its {n} text decoder layers have no self-attention module; "
                                 "lvlm-fix's methods act on attention layers only (hybrid models are not supported yet)")
    heads = text_config.num_attention_heads
    width = getattr(_module_at(_module_at(model.get_submodule(name)[0], attn), out), "in_features", None)
    if width is not None and width % heads:
        return name, attn, out, f"its attention output projection takes {width} features, not a multiple of {heads} heads"
    return name, attn, out, None
