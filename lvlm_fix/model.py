"""Loading an LVLM and turning (image, prompt) pairs into batched model inputs."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .adapters import Adapter, adapter_for
from .errors import InputError, LvlmFixError
from .hooks import attention

DEFAULT_MODEL = "testbed"  # the embedded checkpoint shipped in lvlm_fix/testbed/checkpoint


def testbed_path() -> Path:
    """Directory of the embedded testbed checkpoint."""
    return Path(__file__).parent / "testbed" / "checkpoint"


@dataclass
class LVLM:
    """A loaded model with its processor and adapter: what every lvlm-fix call takes.

    Attributes:
        model: the Hugging Face ``...ForConditionalGeneration`` model.
        processor: its processor (tokenizer + image processor).
        adapter: the architecture knowledge for ``config.model_type``.
        name: the id or path it was loaded from; ``revision``: the hub revision asked for.
    """

    model: Any
    processor: Any
    adapter: Adapter
    name: str
    revision: str | None = None
    _layers: Any = field(default=None, repr=False)

    # -- architecture facts -------------------------------------------------------------------
    @property
    def text_config(self) -> Any:
        return self.model.config.get_text_config()

    @property
    def text_layers(self) -> Any:
        """The text decoder's layer list (resolved once from the adapter's path)."""
        if self._layers is None:
            self._layers = self.model.get_submodule(self.adapter.text_layers)
        return self._layers

    @property
    def num_layers(self) -> int:
        return len(self.text_layers)

    @property
    def num_heads(self) -> int:
        return self.text_config.num_attention_heads

    @property
    def head_dim(self) -> int:
        c = self.text_config
        return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def known_sink_dims(self) -> tuple[int, ...] | None:
        return self.adapter.sink_dims.get(self.hidden_size)

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    @property
    def device(self) -> torch.device:
        return self.model.device

    # -- inputs -----------------------------------------------------------------------------
    def build_prompt(self, prompt: str, n_images: int = 1, system_prompt: str | None = None) -> str:
        """One user turn with ``n_images`` images then the text, in the model's own format.

        ``system_prompt`` becomes a system turn when the processor has a chat template, and is
        prepended (with a space) to the formatted prompt otherwise.
        """
        if getattr(self.processor, "chat_template", None):
            content = [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}]
            messages = [{"role": "user", "content": content}]
            if system_prompt is not None:
                messages.insert(0, {"role": "system", "content": system_prompt})
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)
        ph = self.adapter.image_placeholder
        text = self.adapter.prompt_template.replace(ph, ph * n_images).format(prompt=prompt)
        return text if system_prompt is None else f"{system_prompt} {text}"

    def encode(self, images: Sequence[Image.Image | Sequence[Image.Image]], prompts: Sequence[str],
               system_prompt: str | None = None) -> Any:
        """Batch inputs for ``generate()``, left padded, on the model's device.

        Args:
            images: one image per row, or a list of images per row (all rows the same count).
            prompts: the user text of each row.
            system_prompt: a system message for every row (see :meth:`build_prompt`).
        """
        if len(images) != len(prompts):
            raise InputError(f"got {len(images)} images for {len(prompts)} prompts; give one image per prompt")
        per_row = [list(im) if isinstance(im, (list, tuple)) else [im] for im in images]
        texts = [self.build_prompt(p, len(ims), system_prompt) for p, ims in zip(prompts, per_row)]
        nested = self.adapter.nested_images or len(per_row[0]) > 1
        imgs: list = per_row if nested else [ims[0] for ims in per_row]
        self.tokenizer.padding_side = "left"  # generation appends on the right: pad on the left
        batch = self.processor(images=imgs, text=texts, return_tensors="pt", padding=True)
        return batch.to(self.device)

    def text_only(self, batch: Any) -> dict[str, Any]:
        """The same rows with their image tokens deleted: the text-only stream of VHD and VHR.

        Every per-token tensor (``[b, L]``: ids, attention mask, token-type ids) is cut the same
        way; the kept tokens are left padded and the rows trimmed to the longest of them, so the
        stream costs only its own length. Image tensors (pixel values, grids, sizes) are dropped:
        no image token is left to use them.
        """
        ids = batch["input_ids"]
        b, length = ids.shape
        valid = batch["attention_mask"].bool() if "attention_mask" in batch else torch.ones_like(ids, dtype=torch.bool)
        keep = valid & (ids != self.image_token_id)
        kept = keep.sum(1, keepdim=True)
        width = int(kept.max())
        # Kept tokens go, in order, to the right end of the row: column = width - n_kept + rank.
        rank = keep.long().cumsum(1) - 1
        dest = torch.where(keep, width - kept + rank, torch.full_like(rank, width))
        pad_id = self.tokenizer.pad_token_id or 0
        out: dict[str, Any] = {}
        for name, value in batch.items():
            if not (torch.is_tensor(value) and value.dim() == 2 and value.shape == (b, length)):
                continue
            fill = pad_id if name == "input_ids" else 0
            text = torch.full((b, width + 1), fill, dtype=value.dtype, device=value.device)
            text.scatter_(1, dest, value)  # dropped tokens land in the extra last column
            if name == "attention_mask":
                text = torch.zeros_like(text).scatter_(1, dest, torch.ones_like(value))
            out[name] = text[:, :width]
        if "attention_mask" not in out:
            out["attention_mask"] = (torch.arange(width, device=ids.device) >= width - kept).long()
        return out

    def decode(self, output_ids: torch.Tensor, prompt_len: int) -> list[str]:
        """The generated continuations, without the prompt and special tokens."""
        return [t.strip() for t in self.tokenizer.batch_decode(output_ids[:, prompt_len:], skip_special_tokens=True)]

    # -- attention implementation -------------------------------------------------------------
    def _attn_setting(self, text_impl: str) -> dict[str, str]:
        """The per-sub-config dict: ``text_impl`` for the text decoder, sdpa for the rest."""
        setting = {}
        for key in self.model.config.sub_configs:
            sub = getattr(self.model.config, key, None)
            if sub is None:
                continue
            setting[key] = text_impl if sub is self.text_config else sub._attn_implementation
        return setting

    @contextmanager
    def attention_implementation(self, text_impl: str) -> Iterator[None]:
        """Temporarily route the text decoder's attention through ``text_impl``."""
        before = self.text_config._attn_implementation
        if before == text_impl:
            yield
            return
        self.model.set_attn_implementation(self._attn_setting(text_impl))
        try:
            yield
        finally:
            self.model.set_attn_implementation(self._attn_setting(before))


def _resolve_dtype(dtype: str | torch.dtype | None) -> Any:
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype or "auto"
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16}[dtype]
    except KeyError:
        raise InputError(f"unknown dtype {dtype!r}; use one of auto, float32, bfloat16, float16") from None


def load(
    name_or_path: str | Path | None = None,
    *,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = None,
    device_map: str | dict | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    processor_kwargs: dict[str, Any] | None = None,
    **from_pretrained_kwargs: Any,
) -> LVLM:
    """Load a Hugging Face LVLM (hub id or local directory) ready for lvlm-fix.

    The real ``from_pretrained`` path: a hub id downloads (when online), a local directory
    loads offline. The text decoder is switched to lvlm-fix's attention function, which is
    plain sdpa until a method or statistic is applied.

    Args:
        name_or_path: hub id, local directory, or None / ``"testbed"`` for the embedded model.
        dtype: ``"auto"`` (the checkpoint's), ``"float32"``, ``"bfloat16"``, ``"float16"`` or a torch dtype.
        device: where to put the whole model (ignored when ``device_map`` is given).
        device_map: passed to ``from_pretrained`` (e.g. ``"auto"`` to spread a large model over GPUs).
        revision: hub revision, recorded in provenance.
        trust_remote_code: off unless asked.
        processor_kwargs: passed to the processor's ``from_pretrained`` (e.g. Qwen's ``max_pixels``).
        **from_pretrained_kwargs: passed to the model's ``from_pretrained`` (e.g. ``attn_implementation``,
            ``quantization_config``).

    Returns:
        The :class:`LVLM` handle.

    Raises:
        UnsupportedModelError: ``config.model_type`` has no adapter.
        LvlmFixError: the model cannot be found or loaded.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText

    from .processors import load_processor

    name = str(name_or_path) if name_or_path not in (None, DEFAULT_MODEL) else str(testbed_path())
    if name_or_path in (None, DEFAULT_MODEL) and not (Path(name) / "config.json").exists():
        raise LvlmFixError(f"the embedded testbed checkpoint is missing at {name}; reinstall lvlm-fix or pass --model")
    hub_kwargs = {"revision": revision, "trust_remote_code": trust_remote_code}
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1  # hub ids are org/name
    if looks_like_path and not Path(name).expanduser().exists():
        raise LvlmFixError(f"model directory not found: {name}; pass an existing directory or a hub id like org/name")
    try:
        config = AutoConfig.from_pretrained(name, **hub_kwargs)
    except (OSError, ValueError) as e:
        where = "directory" if Path(name).exists() else "hub id (offline? pass a local directory)"
        raise LvlmFixError(f"cannot load model {name!r} as a {where}: {str(e).splitlines()[0]}") from None
    adapter = adapter_for(config.model_type)
    attention.register()
    model = AutoModelForImageTextToText.from_pretrained(
        name, dtype=_resolve_dtype(dtype), device_map=device_map, **hub_kwargs, **from_pretrained_kwargs
    )
    if device is not None and device_map is None:
        model = model.to(device)
    model.eval()
    processor = load_processor(name, **hub_kwargs, **(processor_kwargs or {}))
    lvlm = LVLM(model=model, processor=processor, adapter=adapter, name=name if name_or_path else DEFAULT_MODEL,
                revision=revision)
    model.set_attn_implementation(lvlm._attn_setting(attention.ATTN_NAME))
    return lvlm
