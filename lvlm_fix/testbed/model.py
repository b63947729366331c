"""The testbed LVLM: a small HF ``LlavaForConditionalGeneration`` and its processor.

The model is the real LLaVA architecture (CLIP ViT vision tower, 2-layer GELU projector,
Llama decoder) at toy size, so every code path that serves ``llava-hf`` checkpoints serves
it too. The tokenizer is a word-level tokenizer over the synthetic world's vocabulary
plus the prompt words, built offline; the processor is ``LlavaProcessor`` with the CLIP
image processor (its PIL backend, so torchvision is never needed).

Example:
    >>> from lvlm_fix.testbed.model import load_testbed, format_prompt
    >>> model, processor = load_testbed()
    >>> batch = processor(images=[image], text=[format_prompt("Is there a dog in the image?")],
    ...                   return_tensors="pt")
    >>> processor.batch_decode(model.generate(**batch)[:, batch["input_ids"].shape[1]:],
    ...                        skip_special_tokens=True)
    ['Yes']
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from .world import World

PROMPT_TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"  # the llava-hf 1.5 template
CHECKPOINT_DIR = Path(__file__).parent / "checkpoint"

PAD, UNK, BOS, EOS, IMAGE = "<pad>", "<unk>", "<s>", "</s>", "<image>"
# Words of common LVLM prompts beyond the trained ones (so that a user's "What objects do you
# see?" is not <unk>, even if never trained on). Every trained prompt's words come from
# :func:`lvlm_fix.testbed.prompts.example_prompts`.
EXTRA_WORDS = (
    "USER", "ASSISTANT", ":", "Yes", "No", "yes", "no", "not", "Is", "Are", "are", "any",
    "Please", "please", "describe", "detail", "Describe", "help", "me", "Answer", "answer",
    "question", "using", "single", "word", "or", "phrase", "What", "what", "objects", "you",
    "see", "photo", "Only", "only", "\"", "'", "!", "-", "with", "on", "at", "for", "to",
    "How", "how", "many", "Which", "which", "colour", "color", "?", "SYSTEM", "Assistant", "User",
)

# The chat template renders llava-hf style conversations into PROMPT_TEMPLATE's format.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\n' }}"
    "{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}"
    "{{ part['text'] + ' ' }}{% endif %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


@dataclass
class ModelConfig:
    """Sizes of the testbed LVLM.

    Attributes:
        image_size: input side in pixels; ``(image_size // patch_size) ** 2`` image tokens.
        patch_size: ViT patch side.
        vision_hidden / vision_layers / vision_heads: CLIP vision tower.
        text_hidden / text_layers / text_heads: Llama decoder (head dim = hidden / heads).
        mlp_ratio: MLP width as a multiple of the hidden size, in both towers.
        max_positions: longest text+image sequence the decoder supports.
    """

    image_size: int = 96
    patch_size: int = 12
    vision_hidden: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 8
    text_heads: int = 8
    mlp_ratio: int = 3
    max_positions: int = 512

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def format_prompt(prompt: str, system: str | None = None) -> str:
    """Wrap a user prompt in the llava-hf template: ``USER: <image>\\n{prompt} ASSISTANT:``.

    A ``system`` message goes first, followed by a space, as the chat template renders it.
    """
    text = PROMPT_TEMPLATE.format(prompt=prompt)
    return f"{system} {text}" if system else text


def build_tokenizer(world: World | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the world's vocabulary and the prompt words.

    Text is split on whitespace and punctuation; unknown words map to ``<unk>``; a ``<s>``
    is prepended; padding is on the left for batched generation.

    Args:
        world: the world whose words to include (default ``World()``).

    Returns:
        The tokenizer, with ``tokenizer.image_token == "<image>"``.
    """
    world = world or World()
    specials = [PAD, UNK, BOS, EOS, IMAGE]
    words = list(dict.fromkeys([*world.vocabulary(), *EXTRA_WORDS, *prompt_words()]))
    vocab = {tok: i for i, tok in enumerate(specials + [w for w in words if w not in specials])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.add_special_tokens(specials)
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens={"image_token": IMAGE},
        padding_side="left",
        model_input_names=["input_ids", "attention_mask"],
    )


def prompt_words() -> list[str]:
    """Every word (as the tokenizer splits text) of every prompt the testbed is trained on, sorted."""
    from .prompts import example_prompts

    split = pre_tokenizers.Whitespace()
    return sorted({w for text in example_prompts() for w, _ in split.pre_tokenize_str(text)})


def build_processor(tokenizer: PreTrainedTokenizerFast, config: ModelConfig) -> LlavaProcessor:
    """``LlavaProcessor`` with a CLIP image processor sized for ``config``.

    Args:
        tokenizer: from :func:`build_tokenizer`.
        config: model sizes (image and patch size fix the number of image tokens).

    Returns:
        The processor; ``"<image>"`` in a prompt expands to ``config.num_image_tokens`` tokens.
    """
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": config.image_size},
        crop_size={"height": config.image_size, "width": config.image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=config.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=CHAT_TEMPLATE,
    )


def build_model(tokenizer: PreTrainedTokenizerFast, config: ModelConfig) -> LlavaForConditionalGeneration:
    """A randomly initialised testbed LLaVA (seed torch before calling for reproducibility).

    Args:
        tokenizer: fixes the vocabulary and the special-token ids.
        config: model sizes.

    Returns:
        The model, in float32, with ``generation_config`` set for greedy decoding.
    """
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    vision = CLIPVisionConfig(
        hidden_size=config.vision_hidden,
        intermediate_size=config.vision_hidden * config.mlp_ratio,
        num_hidden_layers=config.vision_layers,
        num_attention_heads=config.vision_heads,
        image_size=config.image_size,
        patch_size=config.patch_size,
        projection_dim=config.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.text_hidden,
        intermediate_size=config.text_hidden * config.mlp_ratio,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        num_key_value_heads=config.text_heads,
        max_position_embeddings=config.max_positions,
        tie_word_embeddings=False,
        **ids,
    )
    llava = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.image_token_id,
        image_seq_length=config.num_image_tokens,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,  # a 4-layer tower has no spare layer to skip
        **ids,
    )
    model = LlavaForConditionalGeneration(llava)
    model.generation_config = GenerationConfig(
        max_new_tokens=40, do_sample=False, num_beams=1, **ids
    )
    return model


def encode_pair(tokenizer: PreTrainedTokenizerFast, prompt: str, answer: str | None,
                num_image_tokens: int, system: str | None = None) -> tuple[list[int], int]:
    """Token ids of one single-turn example, exactly as the processor would produce them.

    Args:
        tokenizer: the testbed tokenizer.
        prompt: the user prompt (without the template).
        answer: the assistant's answer, or None for the prompt alone.
        num_image_tokens: how many times ``<image>`` is repeated.
        system: an optional system message (see :func:`format_prompt`).

    Returns:
        ``(ids, n_prompt)``: the ids (answer followed by ``</s>``) and the prompt length.
    """
    text = format_prompt(prompt, system).replace(IMAGE, IMAGE * num_image_tokens)
    ids = tokenizer(text)["input_ids"]
    n_prompt = len(ids)
    if answer is not None:
        ids = ids + tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return ids, n_prompt


def save_testbed(model: LlavaForConditionalGeneration, processor: LlavaProcessor,
                 out_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Save model and processor so that the ``Auto*`` classes load them.

    Args:
        model: the trained model.
        processor: its processor.
        out_dir: target directory.
        extra: JSON-able metadata written to ``testbed.json`` (recipe, sizes, metrics).

    Returns:
        ``out_dir`` as a Path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    if extra is not None:
        (out / "testbed.json").write_text(json.dumps(extra, indent=2, sort_keys=True) + "\n")
    return out


def load_testbed(path: str | Path | None = None, dtype: torch.dtype = torch.float32,
                 ) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Load a testbed checkpoint (default: the one shipped in the package).

    Args:
        path: checkpoint directory; None for :data:`CHECKPOINT_DIR`.
        dtype: dtype to load the (float32) weights in.

    Returns:
        ``(model, processor)``, the model in eval mode.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = Path(path) if path is not None else CHECKPOINT_DIR
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
    processor = AutoProcessor.from_pretrained(path)
    return model.eval(), processor
