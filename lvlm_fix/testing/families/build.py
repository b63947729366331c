"""The tiny model of each family and its inputs, built offline from the family's default config.

:func:`tiny_config` shrinks a default config (:data:`TEXT` and :data:`OTHER` sizes) and applies the
family's fix-ups (:data:`FIXES`, where a family couples dimensions the shrinker sets independently);
:func:`tiny_model` builds the model; :func:`tiny_batch` makes a left-padded batch by hand, the way
the model expects it ("model-only" inputs).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

# -- sizes ----------------------------------------------------------------------------------------
# Text decoder: 4 layers (methods skip the first two and the last), 4 heads of 16, 2 KV heads.
TEXT = {"hidden": 64, "inter": 128, "layers": 4, "heads": 4, "kv_heads": 2, "head_dim": 16}
# Every other sub-model (vision tower, projector, resampler, audio): 2 layers of width 32.
OTHER = {"hidden": 32, "inter": 64, "layers": 2, "heads": 2, "kv_heads": 2, "head_dim": 16}
VOCAB = 512
_SPECIAL_FROM = VOCAB - 64  # special token ids are moved to the top 64 ids of the small vocabulary
_CODES = 64  # a VQ image tokenizer's codebook (Chameleon, Emu3): the ids just below the special ones

# Config keys the shrinker sets, by what they size. A key holding something else in some family
# is fixed up in FIXES.
_KEYS = {
    "hidden": ("hidden_size", "d_model", "embed_dim", "n_embd", "width", "word_embed_proj_dim"),
    "inter": ("intermediate_size", "ffn_dim", "mlp_dim", "d_ff", "encoder_ffn_dim", "decoder_ffn_dim"),
    "layers": ("num_hidden_layers", "num_layers", "depth", "n_layer", "n_layers", "encoder_layers", "decoder_layers"),
    "heads": ("num_attention_heads", "num_heads", "n_head", "encoder_attention_heads", "decoder_attention_heads",
              "attention_heads"),
    "kv_heads": ("num_key_value_heads",),
    "head_dim": ("head_dim",),
}
_SMALL = {  # mixture-of-experts, low-rank attention and projector widths: set outright
    **dict.fromkeys(("moe_intermediate_size", "shared_expert_intermediate_size", "moe_hidden_size",
                     "shared_intermediate_size", "dense_intermediate_size", "shared_experts_intermediate_size",
                     "intermediate_size_mlp"), 32),
    **dict.fromkeys(("n_routed_experts", "num_experts", "num_local_experts", "moe_num_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "moe_k"), 2),
    **dict.fromkeys(("kv_lora_rank", "q_lora_rank"), 16),
    **dict.fromkeys(("qk_rope_head_dim", "qk_nope_head_dim"), 8),
    **dict.fromkeys(("v_head_dim", "qk_head_dim"), 16),
    **dict.fromkeys(("projector_hidden_size", "alignment_intermediate_size"), 64),
    "n_group": 2, "topk_group": 1,  # expert groups: 4 experts in 2 groups
}


def family_types() -> list[str]:
    """The model types of the installed transformers' image-text-to-text mapping, sorted."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return sorted(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)


# -- per-family knowledge -------------------------------------------------------------------------
# Config fix-ups applied after the generic shrinker, as dotted keys into the config dict. They are
# where a family couples dimensions the shrinker sets independently.
FIXES: dict[str, dict[str, Any]] = {
    "apertus1p5": {"audio_config.codebook_dim": OTHER["hidden"],  # image and audio codes inside the small vocab
                   "image_token_offset": 256, "vision_config.codebook_size": 64, "audio_token_offset": 320,
                   "audio_config.codebook_size": 64,
                   # a small VQ image tokenizer: 3 stages (4x downsampling), one residual block each
                   "vision_config.base_channels": 32, "vision_config.latent_channels": 32,
                   "vision_config.embed_dim": 16, "vision_config.num_res_blocks": 1,
                   "vision_config.channel_multiplier": [1, 1, 2]},
    "aria": {"projector_patch_to_query_dict": {64: 16}, "max_value_projector_patch_to_query_dict": 16},  # 8x8 -> 16
    # A VQ image tokenizer of _CODES codes, 32 channels wide (its GroupNorms have 32 groups); the rest is the
    # checkpoint's own layout. Its codes enter the text vocabulary through VQ_CODE_NAMES.
    "chameleon": {"vq_config.num_embeddings": _CODES, "vq_config.base_channels": 32},
    "emu3": {"vq_config.codebook_size": _CODES, "vq_config.base_channels": 32,
             "vq_config.hidden_size": 32 * 4},  # its attention runs at the last stage's width (channel multiplier 4)
    "ernie4_5_vl_moe": {"text_config.rope_parameters.mrope_section": [3, 3, 2]},  # its height and width sections equal
    "gemma3": {"mm_tokens_per_image": 16},  # 8 x 8 patches pooled to 4 x 4
    "gemma4_unified": {"vision_config.mm_embed_dim": OTHER["hidden"], "vision_config.mm_posemb_size": 64,
                       "vision_config.output_proj_dims": OTHER["hidden"]},
    "kimi_k25": {"projection_hidden_size": OTHER["hidden"]},  # its projector's norm runs at the vision width
    # Pixel shuffle at ratio 1/2 makes the vision width 4x (the projector MLP's input); its output is what the
    # multimodal projector reads (vision_output_dim).
    "llama4": {"vision_config.intermediate_size": 4 * OTHER["hidden"], "vision_config.projector_input_dim": 64,
               "vision_config.projector_output_dim": 64, "vision_config.vision_output_dim": 64},
    "muse_glimmer": {"out_hidden_size": 4 * OTHER["hidden"]},  # the vision width after its 2 x 2 merge
    "muse_spark": {"out_hidden_size": 4 * OTHER["hidden"]},
    "ovis2": {"hidden_size": TEXT["hidden"]},  # the width of its visual embedding table, read by the text decoder
    "paddleocr_vl": {"text_config.rope_parameters.mrope_section": [2, 3, 3]},  # M-RoPE left to the modelling code
    # The thinker reads these from the omni model's config, which a thinker config alone lacks.
    "qwen2_5_omni_thinker": {"vision_start_token_id": 300, "audio_start_token_id": 301, "seconds_per_chunk": 2},
    "qwen3_omni_moe_thinker": {"vision_start_token_id": 300, "audio_start_token_id": 301, "seconds_per_chunk": 2},
    "qwen2_vl": {"vision_config.hidden_size": TEXT["hidden"]},  # Qwen2-VL's vision hidden_size is its output width
    "shieldgemma2": {"mm_tokens_per_image": 16},
    "step3p7": {"text_config.sliding_window": 8},  # its sliding layers have no default window
    "vipllava": {"vision_feature_layers": [-2, -1]},  # indices into the 2-layer tiny tower
}

# VQ families: the image is a grid of codebook codes, each fed to the decoder as a text-vocabulary id that the
# checkpoint's ``vocabulary_map`` (its tokenizer's vocabulary) names. The tiny map holds what the modelling code
# reads, as transformers' own testers build it: ``<image>`` at the image token id and code ``c`` at id
# ``VOCAB - 64 - _CODES + c`` under the checkpoint's token name (Emu3 also ends each row of codes with ``<|extra_200|>``).
VQ_CODE_NAMES: dict[str, Callable[[int], str]] = {
    "chameleon": lambda c: "IMGIMG" + "".join(chr(ord("A") + int(x)) for x in str(c)) + "Z",  # digits as letters
    "emu3": lambda c: f"<|visual token{c:06d}|>",
}
_VQ_EXTRA: dict[str, tuple[str, ...]] = {"emu3": ("<|extra_200|>",)}  # given the ids just below the codes


# -- configs and models ---------------------------------------------------------------------------
def _cycle(values: Sequence[Any], n: int) -> list[Any]:
    """``n`` entries cycling through the distinct values of ``values`` (keeps e.g. sliding and full layers)."""
    kinds = list(dict.fromkeys(values))
    return [kinds[i % len(kinds)] for i in range(n)]


class _Shrinker:
    """Shrinks a config dict and its nested sub-config dicts; moves large token ids into the small vocabulary."""

    def __init__(self, mrope: bool = False) -> None:
        self.token_ids: dict[int, int] = {}
        self.mrope = mrope  # the text config reads rope_parameters["mrope_section"]

    def token(self, value: Any) -> Any:
        if isinstance(value, list):
            return [self.token(v) for v in value]
        if not isinstance(value, int) or isinstance(value, bool) or value < _SPECIAL_FROM:
            return value
        if value not in self.token_ids:
            self.token_ids[value] = VOCAB - 1 - len(self.token_ids)
        return self.token_ids[value]

    def shrink(self, d: dict[str, Any], role: dict[str, int]) -> dict[str, Any]:
        sizes = {key: role[kind] for kind, keys in _KEYS.items() for key in keys}
        n_old = next((d[k] for k in _KEYS["layers"] if isinstance(d.get(k), int) and not isinstance(d[k], bool)), None)
        out = dict(d)
        for k, v in d.items():
            if isinstance(v, dict) and "model_type" in v:  # a nested sub-config: never the text decoder here
                out[k] = self.shrink(v, OTHER)
            elif re.search(r"(token_id|token_index|token_ids|_id)$", k):
                out[k] = self.token(v)
            elif k == "head_dim" and v is None and role is TEXT:  # some decoders read it without a fallback
                out[k] = role["head_dim"]
            elif isinstance(v, bool) or v is None:
                continue
            elif isinstance(v, int):
                if k in sizes:
                    out[k] = sizes[k]
                elif k == "vocab_size" and role is TEXT:
                    out[k] = VOCAB
                elif k in _SMALL:
                    out[k] = min(v, _SMALL[k])  # never above the default: 0 stays 0 (e.g. no RoPE dims)
                elif k in ("out_hidden_size", "text_hidden_size"):  # a vision tower's output, fed to the text decoder
                    out[k] = TEXT["hidden"]
                elif k == "max_position_embeddings" and v > 4096:
                    out[k] = 4096
                elif k == "sliding_window":
                    out[k] = min(v, 8)  # shorter than any prompt, so sliding KV caches really crop
            elif isinstance(v, list) and n_old and len(v) == n_old and k != "mrope_section":
                out[k] = _cycle(v, role["layers"])  # one entry per layer
            elif (isinstance(v, list) and n_old and v and re.search(r"(indexes|indices|layers?)$", k)
                  and all(isinstance(i, int) and 0 <= i < n_old for i in v)):
                # layer indices (e.g. SAM's global-attention blocks): the same relative depths in the small stack
                out[k] = list(dict.fromkeys(i * role["layers"] // n_old for i in v))
            elif isinstance(v, dict) and v and n_old and all(str(x).isdigit() for x in v):
                n = role["layers"]  # per-layer settings keyed by layer index
                out[k] = {str(i): v[key] for i, key in enumerate(sorted(v, key=int)[:n])}
        patch, image = out.get("patch_size"), out.get("image_size")
        if role is OTHER and isinstance(patch, int) and isinstance(image, int):
            out["image_size"] = 8 * patch  # 8 x 8 patches: few image tokens, and divisible by 2 and 4 for pooling
        elif role is OTHER and isinstance(patch, list) and isinstance(image, list) and len(patch) == len(image) == 2:
            out["image_size"] = [8 * p for p in patch]  # (height, width) pairs, e.g. InternVL
        if role is OTHER and isinstance(out.get("projection_dim"), int):
            out["projection_dim"] = TEXT["hidden"]  # where a vision config projects, it projects to the text width
        if isinstance(out.get("qk_rope_head_dim"), int):  # multi-head latent attention: RoPE runs on head_dim,
            out["head_dim"] = out["qk_rope_head_dim"]  # and every head has its own keys and values
            if "num_key_value_heads" in out:
                out["num_key_value_heads"] = out.get("num_attention_heads", role["heads"])
            if "qk_head_dim" in out:
                out["qk_head_dim"] = out["qk_rope_head_dim"] + out.get("qk_nope_head_dim", 0)
        rope = out.get("rope_parameters")
        if role is TEXT and isinstance(rope, dict) and rope and (rope.get("mrope_section") or self.mrope):
            # M-RoPE families that leave the section to their modelling code default to Qwen2-VL's.
            out["rope_parameters"] = {**rope, "mrope_section": _mrope_section(rope.get("mrope_section") or [16, 24, 24], out)}
        return out


def _mrope_section(section: list[int], text: dict[str, Any]) -> list[int]:
    """M-RoPE's (temporal, height, width) split of the rotary pairs, rescaled to the tiny head dim."""
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    rope = text.get("rope_parameters") or {}
    factor = rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 1.0))
    pairs = int(head_dim * factor) // 2
    new = [max(1, x * pairs // sum(section)) for x in section]
    while sum(new) != pairs:  # hand out or take back the rounding, largest section first
        i = max(range(len(new)), key=lambda j: new[j]) if sum(new) > pairs else min(range(len(new)), key=lambda j: new[j])
        new[i] += 1 if sum(new) < pairs else -1
    return new


def _set(d: dict[str, Any], dotted: str, value: Any) -> None:
    *path, last = dotted.split(".")
    for key in path:
        d = d[key]
    d[last] = value


def tiny_config(model_type: str) -> Any:
    """The family's default config, shrunk to a tiny model (:data:`TEXT` / :data:`OTHER` sizes)."""
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    default = cls()
    text = default.get_text_config()
    d = default.to_dict()
    if d.get("vision_config", 0) is None:  # a vision tower left out by default (e.g. Gemma 4): its defaults
        d["vision_config"] = cls.sub_configs["vision_config"]().to_dict()
    shrinker = _Shrinker(mrope="mrope_section" in getattr(type(text), "ignore_keys_at_rope_validation", ()))
    if text is default:
        d = shrinker.shrink(d, TEXT)
    else:
        key = next(k for k in default.sub_configs if getattr(default, k, None) is text)
        top = shrinker.shrink({k: v for k, v in d.items() if k != key}, OTHER)
        d = {**top, key: shrinker.shrink(d[key], TEXT)}
        for k, v in top.items():  # a top-level copy of a text size (e.g. hidden_size) follows the text config
            if not isinstance(v, dict) and k in d[key] and default.to_dict().get(k) == text.to_dict().get(k):
                d[k] = d[key][k]
    for key in ("image_token_id", "image_token_index"):
        if key in d and d[key] is None:  # set by real checkpoints only
            d[key] = shrinker.token(2**31 - 1)
    old, new = default.to_dict().get("vision_config") or {}, d.get("vision_config") or {}
    if d.get("image_grid_pinpoints") and old.get("image_size") != new.get("image_size"):
        scale = _size(new["image_size"]) / _size(old["image_size"])  # anyres tiles follow the vision tower's size
        d["image_grid_pinpoints"] = [[round(h * scale), round(w * scale)] for h, w in d["image_grid_pinpoints"][:3]]
    for dotted, value in FIXES.get(model_type, {}).items():
        _set(d, dotted, value)
    if model_type in VQ_CODE_NAMES:
        d["vocabulary_map"] = _vq_vocabulary(model_type, d["image_token_id"])
    return cls.from_dict(d)


def _vq_vocabulary(model_type: str, image_token_id: int) -> dict[str, int]:
    """The tiny checkpoint's ``vocabulary_map`` of a VQ family (see :data:`VQ_CODE_NAMES`)."""
    start = _SPECIAL_FROM - _CODES
    name = VQ_CODE_NAMES[model_type]
    extra = _VQ_EXTRA.get(model_type, ())
    return {"<image>": image_token_id, **{name(c): start + c for c in range(_CODES)},
            **{token: start - 1 - i for i, token in enumerate(extra)}}


def tiny_model(model_type: str, seed: int = 0) -> Any:
    """A tiny random fp32 model of ``model_type`` in eval mode (:func:`tiny_config`)."""
    import torch
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(tiny_config(model_type), dtype=torch.float32).eval()
    text = model.config.get_text_config()
    pad = getattr(text, "pad_token_id", None)
    eos = getattr(text, "eos_token_id", None)
    model.generation_config.update(pad_token_id=pad if isinstance(pad, int) else 0, eos_token_id=eos)
    return model


# -- inputs ---------------------------------------------------------------------------------------
def _vision(model: Any) -> Any:
    config = model.config
    return getattr(config, "vision_config", None) or config


def _size(value: Any) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def _square(model: Any, rows: int) -> dict[str, Any]:
    """``[rows, 3, S, S]`` pixels at the vision tower's resolution (ViT-style towers)."""
    import torch

    v = _vision(model)
    s = _size(getattr(v, "image_size", 224))
    return {"pixel_values": torch.randn(rows, getattr(v, "num_channels", 3), s, s)}


def _grid_thw(model: Any, rows: int, layout: str = "flat", **extra: Any) -> dict[str, Any]:
    """Patches and ``image_grid_thw`` (Qwen-VL-style towers): a 4 x 4 grid of patches per image.

    ``layout`` is how the tower takes the patches: ``flat`` ``[n, C*T*P*P]`` or ``chw`` ``[n, C, P, P]``.
    ``extra`` entries are repeated per image (e.g. VideoLLaMA3's ``image_merge_sizes``).
    """
    import torch

    v = _vision(model)
    p = _size(v.patch_size)
    t = getattr(v, "temporal_patch_size", None) or getattr(v, "patch_temporal", None) or 1
    merge = getattr(v, "spatial_merge_size", None) or getattr(v, "merge_size", None) or \
        _size(getattr(v, "merge_kernel_size", None) or 2)
    side = 2 * merge
    channels = getattr(v, "in_channels", None) or getattr(v, "num_channels", 3)
    n = rows * side * side
    pixels = torch.randn(n, channels * t * p * p) if layout == "flat" else torch.randn(n, channels, p, p)
    return {"pixel_values": pixels, "image_grid_thw": torch.tensor([[1, side, side]] * rows),
            **{k: torch.tensor([value] * rows) for k, value in extra.items()}}


def _sized(model: Any, rows: int) -> dict[str, Any]:
    """Pixtral-style: ``[rows, 3, H, W]`` with ``image_sizes``; H = W = 8 patches."""
    import torch

    v = _vision(model)
    s = 8 * _size(v.patch_size)
    return {"pixel_values": torch.randn(rows, getattr(v, "num_channels", 3), s, s),
            "image_sizes": torch.tensor([[s, s]] * rows)}


def _anyres(model: Any, rows: int) -> dict[str, Any]:
    """LLaVA-NeXT-style: a base view plus tiles, ``[rows, 1 + tiles, 3, S, S]`` with ``image_sizes``."""
    import torch

    v = _vision(model)
    s = _size(v.image_size)
    pinpoints = model.config.image_grid_pinpoints
    h, w = pinpoints[0]
    tiles = (h // s) * (w // s)
    return {"pixel_values": torch.randn(rows, 1 + tiles, getattr(v, "num_channels", 3), s, s),
            "image_sizes": torch.tensor([[h, w]] * rows)}


def _pixel_kind(model: Any) -> Callable[[Any, int], dict[str, Any]]:
    import inspect

    kind = PIXELS.get(model.config.model_type)
    if kind is not None:
        return kind
    try:
        params = inspect.signature(_image_features_fn(model)).parameters
    except AttributeError:
        params = {}
    if "image_grid_thw" in params:
        return _grid_thw
    if "image_sizes" in params:
        return _anyres if hasattr(model.config, "image_grid_pinpoints") else _sized
    return _square


# Families whose image tokens must sit between boundary tokens (the config keys naming the start and, where
# there is one, the end token): the Omni thinkers compute position ids from the start token; Ovis 2.5 gives
# both boundary tokens learned visual-indicator embeddings and checks there is one pair per image.
SPANS: dict[str, tuple[str, ...]] = {
    "ovis2_5": ("image_start_token_id", "image_end_token_id"),
    "qwen2_5_omni_thinker": ("vision_start_token_id",),
    "qwen3_omni_moe_thinker": ("vision_start_token_id",),
}

# Pixel inputs of families whose kind is not read from get_image_features' signature.
def _patches_xy(model: Any, rows: int) -> dict[str, Any]:
    """Gemma 4-style: ``[rows, patches, C*P*P]`` with each patch's (x, y); a grid of 2 x 2 pooling windows."""
    import torch

    v = _vision(model)
    p, k = _size(v.patch_size), getattr(v, "pooling_kernel_size", 1) or 1
    if getattr(v, "model_patch_size", None):  # patches already merged k x k: one token each (Gemma 4 unified)
        p, k = v.model_patch_size, 1
    side = 2 * k
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    xy = torch.stack([xs.flatten(), ys.flatten()], -1)
    return {"pixel_values": torch.randn(rows, side * side, getattr(v, "num_channels", 3) * p * p),
            "image_position_ids": xy.expand(rows, -1, -1).clone()}


def _with_high_res(model: Any, rows: int) -> dict[str, Any]:
    """DeepSeek-VL hybrid: low-resolution pixels plus the same image at the high-resolution tower's size."""
    import torch

    s = _size(model.config.high_res_vision_config.image_size)
    return {**_square(model, rows), "high_res_pixel_values": torch.randn(rows, 3, s, s)}


def _patch_rows(model: Any, rows: int) -> dict[str, Any]:
    """Fuyu: no vision tower, ``[rows, patches, C*P*P]`` raw patches projected straight into the decoder."""
    import torch

    c = model.config
    return {"pixel_values": torch.randn(rows, 4, getattr(c, "num_channels", 3) * c.patch_size**2)}


def _naflex(model: Any, rows: int) -> dict[str, Any]:
    """SigLIP2-NaFlex-style: ``[rows, patches, C*P*P]`` with each image's patch grid and patch mask (4 x 4)."""
    import torch

    v = _vision(model)
    p = _size(v.patch_size)
    return {"pixel_values": torch.randn(rows, 16, getattr(v, "num_channels", 3) * p * p),
            "spatial_shapes": torch.tensor([[4, 4]] * rows),
            "pixel_attention_mask": torch.ones(rows, 16, dtype=torch.long)}


def _tiles(model: Any, rows: int, per_tile_mask: bool = False) -> dict[str, Any]:
    """Idefics-style: ``[rows, images, 3, S, S]`` (one image, no splitting) with its pixel (or tile) mask."""
    import torch

    v = _vision(model)
    s = _size(v.image_size)
    mask = torch.ones((rows, 1) if per_tile_mask else (rows, 1, s, s), dtype=torch.bool)
    return {"pixel_values": torch.randn(rows, 1, getattr(v, "num_channels", 3), s, s), "pixel_attention_mask": mask}


def _image_sized(model: Any, rows: int, side: int = 16, sizes: bool = True) -> dict[str, Any]:
    """``[rows, 3, side, side]`` pixels, with ``image_sizes`` if ``sizes``: for towers without a patch size (a VQ tokenizer)."""
    import torch

    pixels = torch.randn(rows, 3, side, side)
    return {"pixel_values": pixels, "image_sizes": torch.tensor([[side, side]] * rows)} if sizes else {"pixel_values": pixels}


PIXELS: dict[str, Callable[[Any, int], dict[str, Any]]] = {
    "apertus1p5": _image_sized,
    "chameleon": partial(_image_sized, side=64, sizes=False),  # 16x downsampling: 4 x 4 codes
    "deepseek_vl_hybrid": _with_high_res,
    "emu3": partial(_image_sized, side=32),  # 8x downsampling: 4 rows of 4 codes and an end-of-row token
    "fuyu": _patch_rows,
    "gemma4": _patches_xy,
    "gemma4_unified": _patches_xy,
    "granite_docling": partial(_tiles, per_tile_mask=True),
    "idefics2": _tiles,
    "idefics3": _tiles,
    "inkling_mm_model": _tiles,
    "kimi_k25": partial(_grid_thw, layout="chw"),
    "lfm2_vl": _naflex,
    "paddleocr_vl": partial(_grid_thw, layout="chw"),
    "smolvlm": _tiles,
    "video_llama_3": partial(_grid_thw, image_merge_sizes=2),
}


def _flat(x: Any) -> list[Any]:
    import torch

    if torch.is_tensor(x):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for y in x for t in _flat(y)]
    pooled = getattr(x, "pooler_output", None)
    return _flat(pooled if pooled is not None else getattr(x, "last_hidden_state", None))


def _image_features_fn(model: Any) -> Any:
    """``get_image_features`` of the model, or of its base model when only that one has it."""
    for m in (model, getattr(model, "model", None)):
        if hasattr(m, "get_image_features"):
            return m.get_image_features
    raise AttributeError(f"{type(model).__name__} has no get_image_features")


# Names a model may take its image input by, instead of pixel_values (some releases of Video-LLaVA and Fuyu).
_PIXEL_NAMES = ("pixel_values", "pixel_values_images", "image_patches")


def _pixels_as(pixels: dict[str, Any], params: Any) -> dict[str, Any]:
    """``pixels`` with ``pixel_values`` renamed to the name among ``params`` that takes the image."""
    name = next((n for n in _PIXEL_NAMES if n in params), "pixel_values")
    return {(name if k == "pixel_values" else k): v for k, v in pixels.items()}


def image_token_count(model: Any, pixels: dict[str, Any]) -> int:
    """How many image tokens one image's features fill: the vision side's own output, counted."""
    import inspect

    import torch

    get = _image_features_fn(model)
    params = inspect.signature(get).parameters
    pixels = _pixels_as(pixels, params)
    takes_all = any(p.kind is p.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in pixels.items() if k in params or takes_all}
    with torch.inference_mode():
        features = _flat(get(**kwargs))
    return sum(f.numel() // f.shape[-1] for f in features)


def tiny_batch(model: Any, text_lengths: Sequence[int] = (3, 6), seed: int = 0,
               rows: Sequence[int] | None = None) -> dict[str, Any]:
    """A left-padded batch of one image per row, built by hand the way the model expects it.

    Row ``r``: ``text_lengths[r]`` text tokens, the image's tokens (as many as its vision side
    produces, between the family's boundary tokens where it has them, see :data:`SPANS`), 4 more
    text tokens. Text ids avoid every special id of the config. Each row is drawn from its own seed
    (``seed + r``), so ``rows`` picks some rows and gives them exactly as in the whole batch, less
    the padding: ``tiny_batch(model, rows=[1])`` is row 1 alone.
    """
    import inspect

    import torch

    make = _pixel_kind(model)
    n_image = image_token_count(model, make(model, 1))
    config = model.config
    image_id = next(getattr(config, k) for k in ("image_token_id", "image_token_index") if hasattr(config, k))
    bounds = [getattr(config, k) for k in SPANS.get(config.model_type, ())]  # [start] or [start, end]
    special = {v for v in _token_ids(config)}
    words = torch.tensor([i for i in range(3, _SPECIAL_FROM) if i not in special])
    seqs, pixels = [], []
    for r in range(len(text_lengths)) if rows is None else rows:
        n_text = text_lengths[r]
        text = words[torch.randint(len(words), (n_text + 4,), generator=torch.Generator().manual_seed(seed + r))]
        image = torch.tensor(bounds[:1] + [image_id] * n_image + bounds[1:])
        seqs.append(torch.cat([text[:n_text], image, text[n_text:]]))
        torch.manual_seed(seed + r)
        pixels.append(_pixels_as(make(model, 1), inspect.signature(model.forward).parameters))
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), model.generation_config.pad_token_id)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, width - len(s):], mask[r, width - len(s):] = s, 1
    # Every pixel input is per image along its first axis (images, or the patches of the images in order).
    batch = {"input_ids": ids, "attention_mask": mask, **{k: torch.cat([p[k] for p in pixels]) for k in pixels[0]}}
    if "mm_token_type_ids" in inspect.signature(model.forward).parameters:
        batch["mm_token_type_ids"] = (ids == image_id).int()
    return batch


def _token_ids(config: Any) -> list[int]:
    """Every token id named in a config and its sub-configs."""
    out = []
    for k, v in config.to_dict().items() if hasattr(config, "to_dict") else config.items():
        if k == "vocabulary_map" and isinstance(v, dict):  # a tiny VQ family's: its image token and codes
            out += list(v.values())
        elif isinstance(v, dict):
            out += _token_ids(v)
        elif re.search(r"(token_id|token_index|_id)$", str(k)):
            out += [x for x in (v if isinstance(v, list) else [v]) if isinstance(x, int)]
    return out

