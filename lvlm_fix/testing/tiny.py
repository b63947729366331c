"""Tiny random-weight LVLMs built from configs, fully offline, for tests and benchmarks.

Every family is the real transformers architecture (``config.model_type`` names it)
shrunk to a 4-layer, 64-wide text decoder and a 2-layer, 32-wide vision tower on
64x64 images, with a byte-level BPE tokenizer trained on a few sentences so that any
English prompt tokenizes. Weights are random, so outputs are meaningless; what is
realistic is the plumbing: image-token expansion, left padding, GQA, M-RoPE, sliding
KV caches, processors and ``save_pretrained``/``from_pretrained`` round trips.

Example::

    from transformers import AutoModelForImageTextToText
    from lvlm_fix.processors import load_processor
    from lvlm_fix.testing.tiny import build_tiny

    path = build_tiny("qwen2_vl", tmp_path / "qwen2_vl")
    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = load_processor(path)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForImageTextToText,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3ImageProcessorPil,
    Gemma3Processor,
    Gemma3TextConfig,
    Idefics3Config,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    Idefics3VisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaNextConfig,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedConfig,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
    Qwen3VLConfig,
    Qwen3VLProcessor,
    SiglipVisionConfig,
    SmolVLMConfig,
    SmolVLMImageProcessorPil,
    SmolVLMProcessor,
    SmolVLMVisionConfig,
)

from lvlm_fix.processors import image_only_processor

__all__ = ["FAMILIES", "PROCESSOR_FAMILIES", "build_image", "build_llava_sized", "build_qwen2_vl_sized", "build_tiny"]

# The families every method test runs on.
FAMILIES: tuple[str, ...] = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm", "gemma3")

IMAGE_SIZE = 64

# Text decoder shared by all families: head_dim 16; GQA (2 KV heads) unless a family overrides it.
_TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,  # 4 so methods that skip the first two and the last layer still act
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)
_HEAD_DIM = 16
# Vision towers: 2 layers, width 32, 2 heads of 16.
_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)

# Prompt layouts used by the self-checks only; lvlm_fix.adapters owns the canonical copy.
_TEMPLATES = {
    "llava": "USER: <image>\n{prompt} ASSISTANT:",
    "llava_next": "[INST] <image>\n{prompt} [/INST]",
    "qwen2_vl": "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{prompt}<|im_end|>\n"
    "<|im_start|>assistant\n",
    "qwen2_5_vl": "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{prompt}<|im_end|>\n"
    "<|im_start|>assistant\n",
    "idefics3": "User:<image>{prompt}<end_of_utterance>\nAssistant:",
    "smolvlm": "User:<image>{prompt}<end_of_utterance>\nAssistant:",
    "gemma3": "<start_of_turn>user\n<start_of_image>{prompt}<end_of_turn>\n<start_of_turn>model\n",
}

# A little varied English so the BPE learns common merges; bytes cover everything else.
_CORPUS = (
    "Describe the image in detail.",
    "What is in this picture? There is a cat on the sofa.",
    "Is there a dog in the image? Yes, there is a dog next to the person.",
    "Is there a car in the image? No, there is no car.",
    "A man is riding a bicycle down the street.",
    "Two people are sitting at a table with plates of food.",
    "The red circle is above the blue square.",
    "A green triangle and a yellow cross are on a white background.",
    "How many birds are on the tree branch?",
    "The kitchen has a sink, an oven and a refrigerator.",
    "A woman holds an umbrella in the rain.",
    "The train is stopped at the station platform.",
    "Answer the question using a single word or phrase.",
    "Please describe this image briefly.",
    "There are three horses standing in a grassy field.",
    "The laptop and the keyboard are on the desk.",
    "A boy throws a frisbee to his friend in the park.",
    "What color is the bus? The bus is orange and black.",
    "A plate with a sandwich, a cup of coffee and a spoon.",
    "The sky is clear and the water is calm near the boat.",
    # Chat-template words, so prompt scaffolding does not fall apart into single bytes.
    "USER: What is in the image? ASSISTANT: A dog.",
    "User: Describe the picture. Assistant: The user sees a model of a ship.",
)
_VOCAB_SIZE = 400


@dataclass(frozen=True)
class _TokenSpec:
    """Special tokens of one family's tokenizer.

    ``named`` become ``extra_special_tokens``, i.e. ``tokenizer.<key>`` and
    ``tokenizer.<key>_id`` attributes, which several processors read.
    """

    bos: str
    eos: str
    pad: str
    named: dict[str, str] = field(default_factory=dict)
    other: tuple[str, ...] = ()
    add_bos: bool = True  # Llama/Gemma tokenizers prepend BOS, Qwen/SmolLM ones do not


_LLAVA_TOKENS = _TokenSpec("<s>", "</s>", "<pad>", {"image_token": "<image>"}, ("[INST]", "[/INST]"))
_QWEN_TOKENS = _TokenSpec(
    "<|endoftext|>",
    "<|im_end|>",
    "<|endoftext|>",
    {
        "image_token": "<|image_pad|>",
        "video_token": "<|video_pad|>",
        "vision_bos_token": "<|vision_start|>",
        "vision_eos_token": "<|vision_end|>",
    },
    ("<|im_start|>",),
    add_bos=False,
)
_IDEFICS_NAMED = {
    "image_token": "<image>",
    "fake_image_token": "<fake_token_around_image>",
    "global_image_token": "<global-img>",
    "end_of_utterance_token": "<end_of_utterance>",
}
# Tile tags exist in the real vocabularies; unused here (no image splitting) but never split.
_ROW_COL = tuple(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7))
_TOKEN_SPECS = {
    "llava": _LLAVA_TOKENS,
    "llava_next": _LLAVA_TOKENS,
    "qwen2_vl": _QWEN_TOKENS,
    "qwen2_5_vl": _QWEN_TOKENS,
    "qwen3_vl": _QWEN_TOKENS,
    "idefics3": _TokenSpec("<|begin_of_text|>", "<end_of_utterance>", "<|end_of_text|>", _IDEFICS_NAMED, _ROW_COL),
    "smolvlm": _TokenSpec(
        "<|im_start|>",
        "<end_of_utterance>",
        "<|im_end|>",
        {**_IDEFICS_NAMED, "video_token": "<video>"},
        _ROW_COL,
        add_bos=False,
    ),
    "gemma3": _TokenSpec(
        "<bos>",
        "<eos>",
        "<pad>",
        {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"},
        ("<start_of_turn>", "<end_of_turn>"),
    ),
}


def build_image(seed: int, size: int = IMAGE_SIZE) -> Image.Image:
    """Return a deterministic random RGB image.

    Args:
        seed: Seed of the pixel values; the same seed always gives the same image.
        size: Width and height in pixels.

    Returns:
        A ``size`` x ``size`` RGB ``PIL.Image``.
    """
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)  # HxWx3 uint8 -> RGB


def build_tiny(family: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Build a tiny random LVLM of ``family`` and save model and processor to ``out_dir``.

    The directory loads back with ``AutoModelForImageTextToText.from_pretrained`` and
    :func:`lvlm_fix.processors.load_processor`. The model is fp32, has a 4-layer text
    decoder (hidden 64, 4 heads of 16, 2 KV heads except LLaVA/LLaVA-NeXT, which keep
    multi-head attention like their Vicuna/Mistral bases) and a 2-layer, 32-wide vision
    tower for 64x64 images (16 image tokens; LLaVA-NeXT's anyres gives 88).

    Args:
        family: One of :data:`PROCESSOR_FAMILIES` (the HF ``config.model_type``).
        out_dir: Directory to write (created if missing; existing files are overwritten).
        seed: Seeds the weight initialisation; the same seed gives identical weights.

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        ValueError: If ``family`` is not in :data:`PROCESSOR_FAMILIES`.
    """
    if family not in _BUILDERS:
        raise ValueError(f"unknown family {family!r}; expected one of {PROCESSOR_FAMILIES}")
    tokenizer = _tokenizer(_TOKEN_SPECS[family])
    config, processor = _BUILDERS[family](tokenizer)
    return _save(config, processor, tokenizer, out_dir, seed)


def build_llava_sized(
    out_dir: str | Path,
    *,
    text_layers: int,
    text_hidden: int,
    text_heads: int,
    vision_layers: int,
    vision_hidden: int,
    image_size: int,
    patch_size: int,
    vocab_size: int = 32064,
    intermediate: int | None = None,
    vision_heads: int | None = None,
    max_positions: int = 4096,
    seed: int = 0,
) -> Path:
    """Build a random LLaVA (CLIP ViT + Llama) of a chosen size, for benchmarks.

    For example ``text_layers=10, text_hidden=640, text_heads=10, vision_layers=6,
    vision_hidden=384, image_size=224, patch_size=16`` gives about 118M parameters and
    196 image tokens. Only the model described by the arguments is allocated. The
    tokenizer is the tiny BPE one; ``vocab_size`` only sizes the embeddings and LM head
    (extra rows are never produced by the tokenizer but can be generated).

    Args:
        out_dir: Directory to write.
        text_layers: Llama decoder layers.
        text_hidden: Llama hidden size (a multiple of ``text_heads``).
        text_heads: Llama attention heads (no GQA).
        vision_layers: CLIP vision layers.
        vision_hidden: CLIP hidden size.
        image_size: Input resolution (square), a multiple of ``patch_size``.
        patch_size: ViT patch size; there are ``(image_size // patch_size) ** 2`` image tokens.
        vocab_size: Embedding rows; at least the tokenizer's size.
        intermediate: Llama MLP width; defaults to ``4 * text_hidden``.
        vision_heads: CLIP heads; defaults to ``vision_hidden // 64`` (at least 1).
        max_positions: the Llama's ``max_position_embeddings`` (the longest prompt it accepts).
        seed: Seeds the weight initialisation.

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        ValueError: On inconsistent sizes.
    """
    vision_heads = vision_heads or max(1, vision_hidden // 64)
    # Checked here so callers get a ValueError, not the configs' strict-dataclass error.
    for what, size, parts in (
        ("image_size", image_size, patch_size),
        ("text_hidden", text_hidden, text_heads),
        ("vision_hidden", vision_hidden, vision_heads),
    ):
        if size % parts:
            raise ValueError(f"{what} {size} is not a multiple of {parts}")
    tokenizer = _tokenizer(_LLAVA_TOKENS)
    if vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer ({len(tokenizer)})")
    text = dict(
        hidden_size=text_hidden,
        intermediate_size=intermediate or 4 * text_hidden,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        num_key_value_heads=text_heads,
        max_position_embeddings=max_positions,
    )
    vision = dict(
        hidden_size=vision_hidden,
        intermediate_size=4 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
    )
    config, processor = _llava(tokenizer, text=text, vision=vision, image_size=image_size, patch_size=patch_size)
    config.text_config.vocab_size = vocab_size
    return _save(config, processor, tokenizer, out_dir, seed)


def build_qwen2_vl_sized(
    out_dir: str | Path,
    *,
    text_layers: int,
    text_hidden: int,
    text_heads: int,
    kv_heads: int,
    vision_layers: int,
    vision_hidden: int,
    image_size: int,
    patch_size: int = 14,
    max_positions: int = 32768,
    seed: int = 0,
) -> Path:
    """Build a random Qwen2-VL of a chosen size, for benchmarks (many image tokens per image).

    Images are resized to ``image_size`` x ``image_size`` pixels and cut into patches merged 2 x 2,
    so there are ``(image_size // (2 * patch_size)) ** 2`` image tokens (``image_size=1540,
    patch_size=14``: 3,025) and four times as many patches in the vision tower. M-RoPE splits the
    head's rotary pairs into temporal / height / width sections as the tiny Qwen2-VL does. The
    tokenizer is the tiny BPE one.

    Args:
        out_dir: Directory to write.
        text_layers, text_hidden, text_heads: Qwen2 decoder size (``text_hidden`` a multiple of ``text_heads``).
        kv_heads: key/value heads (grouped-query attention), dividing ``text_heads``.
        vision_layers, vision_hidden: ViT depth and width (``vision_hidden`` a multiple of 32: 32-wide heads).
        image_size: Input side in pixels, a multiple of ``2 * patch_size``.
        patch_size: ViT patch size.
        max_positions: the decoder's ``max_position_embeddings``.
        seed: Seeds the weight initialisation.

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        ValueError: On inconsistent sizes.
    """
    merge = 2
    for what, size, parts in (("image_size", image_size, merge * patch_size), ("text_hidden", text_hidden, text_heads),
                              ("text_heads", text_heads, kv_heads), ("vision_hidden", vision_hidden, 32)):
        if size % parts:
            raise ValueError(f"{what} {size} is not a multiple of {parts}")
    tokenizer = _tokenizer(_TOKEN_SPECS["qwen2_vl"])
    half = text_hidden // text_heads // 2
    text = dict(
        hidden_size=text_hidden,
        intermediate_size=4 * text_hidden,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        vocab_size=len(tokenizer),
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                         "mrope_section": _mrope_section(half)},
        **_token_ids(tokenizer),
    )
    vision = dict(depth=vision_layers, num_heads=vision_hidden // 32, embed_dim=vision_hidden, mlp_ratio=2,
                  hidden_size=text_hidden, patch_size=patch_size, spatial_merge_size=merge, temporal_patch_size=2)
    config, processor = _qwen_vl(Qwen2VLConfig, Qwen2VLProcessor, tokenizer, text, vision, image_size, patch_size,
                                 merge)
    return _save(config, processor, tokenizer, out_dir, seed)


# --------------------------------------------------------------------------- tokenizer


@functools.cache
def _bpe_json(specials: tuple[str, ...]) -> str:
    """Train the byte-level BPE once per set of specials (serialized, so callers get fresh copies)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE + len(specials),
        special_tokens=list(specials),  # ids 0..n-1, and never split by the pre-tokenizer
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text encodes
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return tok.to_str()


def _tokenizer(spec: _TokenSpec) -> PreTrainedTokenizerFast:
    """Wrap the trained BPE as a transformers tokenizer with the family's special tokens."""
    specials = tuple(dict.fromkeys([spec.pad, spec.bos, spec.eos, *spec.named.values(), *spec.other]))
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_bpe_json(specials)),
        bos_token=spec.bos,
        eos_token=spec.eos,
        pad_token=spec.pad,
        extra_special_tokens=dict(spec.named),
        additional_special_tokens=list(spec.other),
        add_bos_token=spec.add_bos,
        padding_side="left",  # decoder-only batched generation
        # No token_type_ids from the tokenizer: the models' forward() does not take them
        # (Gemma3's processor adds its own multimodal token_type_ids).
        model_input_names=["input_ids", "attention_mask"],
    )


def _token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    return dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


# --------------------------------------------------------------------------- families
# Each builder returns (config, processor) for a tokenizer; weights are created in _save.


def _llava(
    tokenizer: PreTrainedTokenizerFast,
    *,
    text: dict[str, Any] | None = None,
    vision: dict[str, Any] | None = None,
    image_size: int = IMAGE_SIZE,
    patch_size: int = 16,
) -> tuple[PreTrainedConfig, ProcessorMixin]:
    text = text or {**_TEXT, "num_key_value_heads": 4}
    vision_config = CLIPVisionConfig(**(vision or _VISION), image_size=image_size, patch_size=patch_size)
    num_tokens = (image_size // patch_size) ** 2
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=LlamaConfig(**text, vocab_size=len(tokenizer), **_token_ids(tokenizer)),
        image_token_index=tokenizer.image_token_id,
        image_seq_length=num_tokens,
        vision_feature_select_strategy="default",  # drop CLS: one token per patch
    )
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS, removed by the "default" strategy
    )
    return config, processor


def _llava_next(tokenizer: PreTrainedTokenizerFast) -> tuple[PreTrainedConfig, ProcessorMixin]:
    # Anyres: a 32x32 base view plus 32x32 tiles of the best-fitting grid, so a 64x64
    # image gives 16 base tokens + a 2x2-tile 8x8 grid with one newline token per row.
    tile, patch = 32, 8
    pinpoints = [[32, 64], [64, 32], [64, 64]]
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**_VISION, image_size=tile, patch_size=patch),
        text_config=LlamaConfig(
            **{**_TEXT, "num_key_value_heads": 4}, vocab_size=len(tokenizer), **_token_ids(tokenizer)
        ),
        image_token_index=tokenizer.image_token_id,
        image_grid_pinpoints=pinpoints,
        image_seq_length=(tile // patch) ** 2,
        vision_feature_select_strategy="default",
    )
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile}, image_grid_pinpoints=pinpoints
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return config, processor


def _qwen(
    tokenizer: PreTrainedTokenizerFast, config_cls: type[PreTrainedConfig], proc_cls: type[ProcessorMixin]
) -> tuple[PreTrainedConfig, ProcessorMixin]:
    # 8x8 patches of 64x64 merged 2x2 -> 16 image tokens. M-RoPE splits the 8 rotary
    # frequency pairs of a 16-dim head into temporal/height/width sections.
    patch, merge = 8, 2
    half = _HEAD_DIM // 2
    text = dict(
        **_TEXT,
        vocab_size=len(tokenizer),
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": _mrope_section(half),
        },
        **_token_ids(tokenizer),
    )
    vision: dict[str, Any] = dict(
        depth=_VISION["num_hidden_layers"],
        num_heads=_VISION["num_attention_heads"],
        patch_size=patch,
        spatial_merge_size=merge,
        temporal_patch_size=2,
    )
    if config_cls is Qwen2VLConfig:
        vision.update(embed_dim=_VISION["hidden_size"], mlp_ratio=2, hidden_size=_TEXT["hidden_size"])
    elif config_cls is Qwen3VLConfig:
        # Qwen3-VL: learned position embeddings (an 8 x 8 table) and DeepStack features from its first block.
        vision.update(hidden_size=_VISION["hidden_size"], intermediate_size=_VISION["intermediate_size"],
                      out_hidden_size=_TEXT["hidden_size"], num_position_embeddings=64, deepstack_visual_indexes=[0])
        text["head_dim"] = _HEAD_DIM
    else:
        # Qwen2.5-VL: windowed attention (2x2 merged units per window) except in the last block.
        vision.update(
            hidden_size=_VISION["hidden_size"],
            intermediate_size=_VISION["intermediate_size"],
            out_hidden_size=_TEXT["hidden_size"],
            window_size=2 * merge * patch,
            fullatt_block_indexes=[_VISION["num_hidden_layers"] - 1],
        )
    return _qwen_vl(config_cls, proc_cls, tokenizer, text, vision, IMAGE_SIZE, patch, merge)


def _idefics(
    tokenizer: PreTrainedTokenizerFast,
    config_cls: type[PreTrainedConfig],
    vision_cls: type[PreTrainedConfig],
    image_processor_cls: type,
    proc_cls: type[ProcessorMixin],
) -> tuple[PreTrainedConfig, ProcessorMixin]:
    # 8x8 patches, pixel-shuffled by scale_factor 2 -> 16 image tokens; no tiling.
    patch, scale = 8, 2
    num_tokens = (IMAGE_SIZE // patch) ** 2 // scale**2
    config = config_cls(
        vision_config=vision_cls(**_VISION, image_size=IMAGE_SIZE, patch_size=patch),
        text_config=LlamaConfig(**_TEXT, head_dim=_HEAD_DIM, vocab_size=len(tokenizer), **_token_ids(tokenizer)),
        image_token_id=tokenizer.image_token_id,
        scale_factor=scale,
        pad_token_id=tokenizer.pad_token_id,
    )
    image_processor = image_processor_cls(
        do_image_splitting=False,
        size={"longest_edge": IMAGE_SIZE},
        max_image_size={"longest_edge": IMAGE_SIZE},
    )
    processor = image_only_processor(proc_cls)(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=num_tokens
    )
    return config, processor


def _gemma3(tokenizer: PreTrainedTokenizerFast) -> tuple[PreTrainedConfig, ProcessorMixin]:
    # One sliding-window layer (window 8, shorter than any image prompt) and one global
    # layer, so sliding KV caches really crop. 8x8 SigLIP patches are avg-pooled to 4x4.
    num_tokens = 16
    text = Gemma3TextConfig(
        **_TEXT,
        head_dim=_HEAD_DIM,
        query_pre_attn_scalar=_HEAD_DIM,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        vocab_size=len(tokenizer),
        **_token_ids(tokenizer),
    )
    config = Gemma3Config(
        text_config=text,
        vision_config=SiglipVisionConfig(**_VISION, image_size=IMAGE_SIZE, patch_size=8),
        mm_tokens_per_image=num_tokens,
        boi_token_index=tokenizer.boi_token_id,
        eoi_token_index=tokenizer.eoi_token_id,
        image_token_index=tokenizer.image_token_id,
    )
    image_processor = Gemma3ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=num_tokens)
    return config, processor


_BUILDERS: dict[str, Callable[[PreTrainedTokenizerFast], tuple[PreTrainedConfig, ProcessorMixin]]] = {
    "llava": _llava,
    "llava_next": _llava_next,
    "qwen2_vl": lambda tok: _qwen(tok, Qwen2VLConfig, Qwen2VLProcessor),
    "qwen2_5_vl": lambda tok: _qwen(tok, Qwen2_5_VLConfig, Qwen2_5_VLProcessor),
    "qwen3_vl": lambda tok: _qwen(tok, Qwen3VLConfig, Qwen3VLProcessor),
    "idefics3": lambda tok: _idefics(
        tok, Idefics3Config, Idefics3VisionConfig, Idefics3ImageProcessorPil, Idefics3Processor
    ),
    "smolvlm": lambda tok: _idefics(
        tok, SmolVLMConfig, SmolVLMVisionConfig, SmolVLMImageProcessorPil, SmolVLMProcessor
    ),
    "gemma3": _gemma3,
}

# Every family built here with its real processor (the family matrix drives these through it).
PROCESSOR_FAMILIES: tuple[str, ...] = tuple(_BUILDERS)


# --------------------------------------------------------------------------- saving


def _save(
    config: PreTrainedConfig,
    processor: ProcessorMixin,
    tokenizer: PreTrainedTokenizerFast,
    out_dir: str | Path,
    seed: int,
) -> Path:
    """Instantiate random weights from ``config`` and save them with the processor."""
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32).eval()
    projector = getattr(getattr(model, "model", None), "multi_modal_projector", None)
    if hasattr(projector, "mm_input_projection_weight"):
        # Gemma3 zero-initialises this projection, which would make the tiny model blind to its image.
        torch.nn.init.normal_(projector.mm_input_projection_weight, std=0.02)
    # generate() reads these from the generation config, not the model config.
    model.generation_config.update(**_token_ids(tokenizer))
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out


def _mrope_section(half: int) -> list[int]:
    """M-RoPE's (temporal, height, width) split of half a head dimension, the remainder to time."""
    return [half - 2 * (half // 3), half // 3, half // 3]


def _qwen_vl(config_cls: Any, proc_cls: Any, tokenizer: Any, text: dict[str, Any], vision: dict[str, Any],
             image_size: int, patch: int, merge: int) -> tuple[Any, Any]:
    """A Qwen-VL family's config (its special tokens from ``tokenizer``) and a processor that gives every
    image exactly ``image_size`` x ``image_size`` pixels."""
    config = config_cls(
        text_config=text,
        vision_config=vision,
        image_token_id=tokenizer.image_token_id,
        video_token_id=tokenizer.video_token_id,
        vision_start_token_id=tokenizer.vision_bos_token_id,
        vision_end_token_id=tokenizer.vision_eos_token_id,
    )
    pixels = image_size * image_size
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=pixels, max_pixels=pixels, patch_size=patch, merge_size=merge, temporal_patch_size=2
    )
    return config, image_only_processor(proc_cls)(image_processor=image_processor, tokenizer=tokenizer)
