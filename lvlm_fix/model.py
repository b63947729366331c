"""Loading an LVLM and turning (image, prompt) pairs into batched model inputs."""

from __future__ import annotations

import pickle
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors import SafetensorError, safe_open

from .adapters import Adapter, check_overrides, derive_adapter, unsupported_reason
from .devices import DEVICE_MAP_STRATEGIES, check_torch_device
from .errors import InputError, LvlmFixError, UnsupportedModelError, strict_bool
from .hooks import attention

DEFAULT_MODEL = "testbed"  # the embedded checkpoint shipped in lvlm_fix/testbed/checkpoint


# The usual names of a decoder layer's MLP and of the text decoder's final norm, in the families transformers ships.
_MLP_NAMES = ("mlp", "feed_forward", "ffn")
_FINAL_NORM_NAMES = ("norm", "final_layernorm", "final_layer_norm", "ln_f", "norm_f")
# The usual names of a pre-norm decoder layer's two norms: before the attention, and before the MLP.
_INPUT_NORM_NAMES = ("input_layernorm", "ln_1", "attention_norm")
_POST_ATTENTION_NORM_NAMES = ("post_attention_layernorm", "ln_2", "ffn_norm")


def testbed_path() -> Path:
    """Directory of the embedded testbed checkpoint."""
    return Path(__file__).parent / "testbed" / "checkpoint"


@dataclass
class LVLM:
    """A loaded model with its processor and adapter: what every lvlm-fix call takes.

    Made by :func:`load` (from a checkpoint) or :func:`wrap` (around a model already loaded).

    Attributes:
        model: the Hugging Face image-text-to-text model.
        processor: its processor (tokenizer + image processor), or None when wrapped without one:
            then the calls that build inputs from images and prompts (``encode``, CARVE, the evals)
            say so, and batches come from the caller.
        adapter: the architecture knowledge, derived from the model and the caller's overrides
            (:func:`~lvlm_fix.adapters.derive_adapter`).
        name: the id or path it was loaded from; ``revision``: the hub revision asked for.
    """

    model: Any
    processor: Any
    adapter: Adapter
    name: str
    revision: str | None = None
    _layers: Any = field(default=None, repr=False)
    _attention: Any = field(default=None, repr=False)
    _final_norm: Any = field(default=None, repr=False)

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
    def attention_modules(self) -> list[Any]:
        """Each decoder layer's self-attention module, in layer order."""
        if self._attention is None:
            self._attention = [layer.get_submodule(self.adapter.attention) for layer in self.text_layers]
        return self._attention

    def out_proj(self, layer: int) -> Any:
        """The output projection of ``layer``'s attention: its input is the per-head outputs."""
        return self.attention_modules[layer].get_submodule(self.adapter.out_proj)

    def mlp(self, layer: int) -> Any:
        """``layer``'s MLP (feed-forward block): the adapter's path, else the child by its usual names."""
        block = self.text_layers[layer]
        if self.adapter.mlp is not None:
            return block.get_submodule(self.adapter.mlp)
        for name in _MLP_NAMES:
            found = getattr(block, name, None)
            if isinstance(found, torch.nn.Module):
                return found
        raise LvlmFixError(f"decoder layer {layer} ({type(block).__name__}) has no child named {' / '.join(_MLP_NAMES)}; "
                           "name its MLP: lvlm_fix.wrap(model, processor, adapter={'mlp': ...})")

    # -- the vision tower's layers (VTI steers their MLPs) -------------------------------------
    @property
    def vision_tower(self) -> Any:
        """The vision encoder: the outermost module whose ``config`` is the model's ``vision_config``."""
        vision_config = getattr(self.model.config, "vision_config", None)
        tower = next((m for m in self.model.modules() if vision_config is not None
                      and getattr(m, "config", None) is vision_config), None)
        if tower is None:
            raise LvlmFixError(f"cannot find the vision tower of this {self.adapter.model_type!r} model "
                               "(no module carries its vision_config)")
        return tower

    @property
    def vision_layers(self) -> Any:
        """The vision tower's layer list: its module list of ``vision_config.num_hidden_layers`` entries."""
        tower = self.vision_tower
        depth = getattr(self.model.config.vision_config, "num_hidden_layers", None)
        found = next((m for m in tower.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == depth), None)
        if found is None:
            raise LvlmFixError(f"cannot find the {depth} layers of the vision tower of this {self.adapter.model_type!r} "
                               f"model ({type(tower).__name__}: no module list of that length)")
        return found

    def vision_mlp(self, layer: int) -> Any:
        """The MLP of the vision tower's ``layer`` (its child by the usual names)."""
        block = self.vision_layers[layer]
        for name in _MLP_NAMES:
            found = getattr(block, name, None)
            if isinstance(found, torch.nn.Module):
                return found
        raise LvlmFixError(f"vision layer {layer} ({type(block).__name__}) has no child named {' / '.join(_MLP_NAMES)}")

    def pre_norms(self, layer: int) -> tuple[Any, Any]:
        """``layer``'s two norms ``(N_in, N_post)`` when it is a pre-norm decoder layer,
        ``h = x + attn(N_in(x))``, ``out = h + mlp(N_post(h))`` (Llama, Qwen2, ...), found by their usual names.

        Raises:
            LvlmFixError: the layer has other norms (Gemma's around the attention's and the MLP's outputs)
                or not these two: a computation that rebuilds the layer from them would not be the layer's.
        """
        block = self.text_layers[layer]
        norms = [n for n, m in block.named_children() if "norm" in n.lower() or "norm" in type(m).__name__.lower()]
        found = [next((getattr(block, n) for n in names if isinstance(getattr(block, n, None), torch.nn.Module)), None)
                 for names in (_INPUT_NORM_NAMES, _POST_ATTENTION_NORM_NAMES)]
        if None in found or len(norms) != 2:
            raise LvlmFixError(f"decoder layer {layer} ({type(block).__name__}) is not a pre-norm layer with the two "
                               f"norms {_INPUT_NORM_NAMES[0]} and {_POST_ATTENTION_NORM_NAMES[0]} (its norms: "
                               f"{', '.join(norms) or 'none'})")
        return found[0], found[1]

    @property
    def final_norm(self) -> Any:
        """The text decoder's final norm, applied to the last layer's output before ``lm_head``."""
        if self._final_norm is None:
            if self.adapter.final_norm is not None:
                self._final_norm = self.model.get_submodule(self.adapter.final_norm)
            else:
                parent = self.model.get_submodule(self.adapter.text_layers.rpartition(".")[0])
                found = [getattr(parent, n) for n in _FINAL_NORM_NAMES if isinstance(getattr(parent, n, None), torch.nn.Module)]
                if not found:
                    raise LvlmFixError(f"no final norm ({' / '.join(_FINAL_NORM_NAMES)}) beside the decoder layers of "
                                       f"{type(self.model).__name__}; name it: lvlm_fix.wrap(model, processor, "
                                       "adapter={'final_norm': ...})")
                self._final_norm = found[0]
        return self._final_norm

    @property
    def lm_head(self) -> Any:
        """The unembedding (``get_output_embeddings()``): hidden states to vocabulary logits."""
        head = self.model.get_output_embeddings()
        if head is None:
            raise LvlmFixError(f"{type(self.model).__name__} has no output embeddings (get_output_embeddings() is None); "
                               "load it with its language-modelling head")
        return head

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
    def image_token_ids(self) -> tuple[int, ...]:
        return self.adapter.image_token_ids

    @property
    def image_token_id(self) -> int:
        """The (first) image token id."""
        return self.adapter.image_token_ids[0]

    def image_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[b, t]`` True at image tokens."""
        ids = self.adapter.image_token_ids
        if len(ids) == 1:
            return input_ids == ids[0]
        return torch.isin(input_ids, torch.tensor(ids, device=input_ids.device))

    @property
    def known_sink_dims(self) -> tuple[int, ...] | None:
        return self.adapter.sink_dims.get(self.hidden_size)

    def require_processor(self, what: str) -> Any:
        """The processor, or :class:`LvlmFixError` saying that ``what`` needs one."""
        if self.processor is None:
            raise LvlmFixError(f"{what} needs the model's processor; pass it: lvlm_fix.wrap(model, processor)")
        return self.processor

    @property
    def tokenizer(self) -> Any:
        processor = self.require_processor("decoding and tokenising")
        return getattr(processor, "tokenizer", processor)

    @property
    def device(self) -> torch.device:
        return self.model.device

    # -- inputs -----------------------------------------------------------------------------
    def build_prompt(self, prompt: str, n_images: int = 1, system_prompt: str | None = None) -> str:
        """One user turn with ``n_images`` images then the text, in the model's own format.

        The processor's chat template when it has one, else the adapter's ``prompt_template``.
        ``system_prompt`` becomes a system turn with a chat template, and is prepended (with a
        space) to the formatted prompt otherwise.
        """
        processor = self.require_processor("building a prompt")
        if getattr(processor, "chat_template", None):
            content = [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}]
            messages = [{"role": "user", "content": content}]
            if system_prompt is not None:
                messages.insert(0, {"role": "system", "content": system_prompt})
            return processor.apply_chat_template(messages, add_generation_prompt=True)
        if self.adapter.prompt_template is None:
            raise LvlmFixError(
                f"the processor of this {self.adapter.model_type!r} model has no chat template; give it one "
                "(processor.chat_template = ...) or pass prompt_template='...<image>...{prompt}...' to load()/wrap()")
        ph = self.adapter.image_placeholder
        text = self.adapter.prompt_template.replace(ph, ph * n_images).format(prompt=prompt)
        return text if system_prompt is None else f"{system_prompt} {text}"

    def encode(self, images: Sequence[Image.Image | Sequence[Image.Image]], prompts: Sequence[str],
               system_prompt: str | None = None) -> Any:
        """Batch inputs for ``generate()``, left padded, on the model's device.

        Args:
            images: one image per row, or a list of images per row (all rows the same count); each a
                PIL image, a file path, an array or a tensor, read by :func:`lvlm_fix.images.load_image`.
            prompts: the user text of each row.
            system_prompt: a system message for every row (see :meth:`build_prompt`).

        Raises:
            InputError: see :func:`check_rows`.
        """
        per_row, prompts = check_rows(images, prompts)
        processor = self.require_processor("encoding images and prompts")
        texts = [self.build_prompt(p, len(ims), system_prompt) for p, ims in zip(prompts, per_row)]
        nested = self.adapter.nested_images or len(per_row[0]) > 1
        imgs: list = per_row if nested else [ims[0] for ims in per_row]
        self.tokenizer.padding_side = "left"  # generation appends on the right: pad on the left
        batch = processor(images=imgs, text=texts, return_tensors="pt", padding=True)
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
        mask = batch.get("attention_mask")
        valid = attention.key_padding(mask, length) if mask is not None else torch.ones_like(ids, dtype=torch.bool)
        keep = valid & ~self.image_token_mask(ids)
        kept = keep.sum(1, keepdim=True)
        width = int(kept.max())
        # Kept tokens go, in order, to the right end of the row: column = width - n_kept + rank.
        rank = keep.long().cumsum(1) - 1
        dest = torch.where(keep, width - kept + rank, torch.full_like(rank, width))
        pad_id = self.pad_token_id
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

    @property
    def pad_token_id(self) -> int:
        """The tokenizer's pad id, else the configs' (a model wrapped without its processor), else 0."""
        if self.processor is not None and self.tokenizer.pad_token_id is not None:
            return int(self.tokenizer.pad_token_id)
        for config in (self.model.generation_config, self.text_config, self.model.config):
            pad = getattr(config, "pad_token_id", None)
            if isinstance(pad, int):
                return pad
        return 0

    def decode(self, output_ids: torch.Tensor, prompt_len: int) -> list[str]:
        """The generated continuations, without the prompt and special tokens."""
        return [t.strip() for t in self.tokenizer.batch_decode(output_ids[:, prompt_len:], skip_special_tokens=True)]

    # -- attention implementation -------------------------------------------------------------
    def _attn_setting(self, text_impl: str) -> dict[str, str] | str:
        """The per-sub-config dict: ``text_impl`` for the text decoder, the rest unchanged."""
        if self.text_config is self.model.config:  # one config for the whole model (e.g. Fuyu)
            return text_impl
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


def _what(value: Any) -> str:
    shape = getattr(value, "shape", None)
    if shape is not None and not isinstance(value, Image.Image):  # an array's repr spans lines: name its shape
        return f"{type(value).__name__} of shape {tuple(shape)}"
    text = " ".join(repr(value).split())  # one line, whatever the repr
    return f"{type(value).__name__} {text[:40] + '...' if len(text) > 40 else text}"


def check_handle(lvlm: Any) -> LVLM:
    """``lvlm`` if it is a usable handle, else one line saying what it is and the fix."""
    if not isinstance(lvlm, LVLM):
        raise InputError(f"expected the handle of lvlm_fix.load() or lvlm_fix.wrap(), got {_what(lvlm)}; load the "
                         "model first: handle = lvlm_fix.load('org/name')")
    model = getattr(lvlm, "model", None)
    first = next(model.parameters(), None) if hasattr(model, "parameters") else None
    if model is None or not hasattr(model, "generate") or (first is not None and first.device.type == "meta"):
        raise InputError(f"the model of this handle ({lvlm.name}) is gone (deleted, set to None or freed to the "
                         "meta device); load it again with lvlm_fix.load()")
    return lvlm


def check_rows(images: Any, prompts: Any) -> tuple[list[list[Any]], list[str]]:
    """The rows of a batch, every image through the one loader (:func:`lvlm_fix.images.load_image`).

    Raises:
        InputError: None or a bare image or string where a list is expected, an empty list, a row
            without images, rows with different image counts, lengths that differ, or an empty or
            non-text prompt; one line each.
    """
    from .images import load_image

    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise InputError(f"prompts must be a list of strings, one per row; got {_what(prompts)} (wrap one prompt "
                         "as [prompt])")
    if images is None or isinstance(images, (str, Path, Image.Image)) or getattr(images, "ndim", 4) != 4:
        raise InputError(f"images must be a list with one image (or a list of images) per prompt; got "
                         f"{_what(images)} (wrap one image as [image])")
    try:
        images = list(images)
    except TypeError:
        raise InputError(f"images must be a list with one image per prompt; got {_what(images)}") from None
    prompts = list(prompts)
    if not prompts or not images:
        raise InputError("no rows: images and prompts are empty lists; give one image and one prompt per row")
    if len(images) != len(prompts):
        raise InputError(f"got {len(images)} images for {len(prompts)} prompts; give one image per prompt")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise InputError(f"prompt {i} is {_what(p)}; every row needs its question as non-empty text")
    rows = [list(im) if isinstance(im, (list, tuple)) else [im] for im in images]
    for i, row in enumerate(rows):
        if not row:
            raise InputError(f"row {i} has an empty list of images; give each row at least one image")
        if len(row) != len(rows[0]):
            raise InputError(f"row {i} has {len(row)} images and row 0 has {len(rows[0])}; every row of a batch "
                             "holds the same number (batch rows by image count)")
    return [[load_image(im) for im in row] for row in rows], prompts


def _resolve_dtype(dtype: str | torch.dtype | None) -> Any:
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype or "auto"
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16}[dtype]
    except KeyError:
        raise InputError(f"unknown dtype {dtype!r}; use one of auto, float32, bfloat16, float16") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0].rstrip(" .:")


def _weights_error(name: str, e: BaseException) -> LvlmFixError:
    """One line for weights that would not load: the broken file when it can be found, and the fix."""
    folder = Path(name).expanduser()
    if folder.is_dir():
        for path in sorted(folder.glob("*.safetensors")):
            try:  # reads the header only: a truncated or garbled file fails here
                with safe_open(path, "pt"):
                    pass
            except (SafetensorError, OSError) as bad:
                return LvlmFixError(f"{path} is corrupt or truncated ({_first_line(bad)}); download or save the "
                                    "model again (save_pretrained) and pass that folder")
        return LvlmFixError(f"cannot load the weights in {folder}: {_first_line(e)}; the folder needs the "
                            "model.safetensors (or shards and their index) that save_pretrained() writes")
    return LvlmFixError(f"cannot load the weights of {name!r}: {_first_line(e)}; check the hub id (offline? "
                        "pass a local folder with config.json and model.safetensors)")


# from_pretrained's own arguments (transformers 5: its signature and the keys it takes from **kwargs); any
# other key must be a setting of the model's config, else the model's __init__ fails on it after the config loads.
LOAD_KWARGS = frozenset({
    "adapter_kwargs", "adapter_name", "allow_all_kernels", "attn_implementation", "cache_dir", "config", "device_map",
    "device_mesh", "disable_mmap", "distributed_config", "experts_implementation", "force_download", "fusion_config",
    "generation_config", "gguf_file", "ignore_mismatched_sizes", "kernel_config", "kernels_mode", "key_mapping",
    "local_files_only", "max_memory", "offload_buffers", "offload_folder", "output_loading_info",
    "proxies", "quantization_config", "state_dict", "subfolder", "token", "tp_plan", "tp_size", "use_kernels",
    "use_safetensors", "variant", "weights_only"})
# Those of them that are booleans: read strictly, as text "no" would be true.
BOOL_LOAD_KWARGS = frozenset({"allow_all_kernels", "disable_mmap", "force_download", "ignore_mismatched_sizes",
                              "local_files_only", "offload_buffers", "output_loading_info",
                              "use_fast", "use_kernels", "use_safetensors", "weights_only"})
# Keys load() takes itself: given again among the keyword arguments they would contradict it.
OWN_KWARGS = {"dtype": "dtype", "torch_dtype": "dtype", "device": "device", "revision": "revision",
              "trust_remote_code": "trust_remote_code", "pretrained_model_name_or_path": "the model name"}
# Boolean-looking words no from_pretrained argument takes as text: a bool written another way.
_BOOL_WORDS = frozenset({"yes", "no", "on", "off", "y", "n", "t", "f", "true", "false"})


def check_kwargs(kwargs: dict[str, Any] | None, what: str) -> dict[str, Any]:
    """``kwargs`` for a ``from_pretrained`` (``what`` names them in messages), booleans read strictly.

    A known boolean argument takes only an explicit spelling (:func:`~lvlm_fix.errors.strict_bool`);
    any other value that is a boolean word as text (``"no"``, ``"off"``) is refused, since Python
    would read it as true.
    """
    out: dict[str, Any] = {}
    for key, value in (kwargs or {}).items():
        if not isinstance(key, str) or not key.isidentifier():
            raise InputError(f"{what}: {key!r} is not a keyword argument name; write e.g. attn_implementation=eager")
        if key in BOOL_LOAD_KWARGS:
            value = strict_bool(key, value)
        elif isinstance(value, str) and value.strip().strip("\"'").lower() in _BOOL_WORDS:
            raise InputError(f"{what} {key}={value!r} is a boolean written as text; write {key}=true or {key}=false")
        out[key] = value
    return out


def _check_model_kwargs(kwargs: dict[str, Any]) -> None:
    """What can be checked of the model's keyword arguments before its config is read."""
    for key, flag in OWN_KWARGS.items():
        if key in kwargs:
            raise InputError(f"model keyword argument {key!r} is load()'s own {flag} argument; pass it there "
                             f"(on the command line: --{flag.replace('_', '-')})")
    impl = kwargs.get("attn_implementation")
    if impl is not None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        valid = ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]
        for value in (impl.values() if isinstance(impl, dict) else [impl]):
            # "org/repo" names a hub kernel, which transformers resolves itself
            if not (isinstance(value, str) and (value in valid or "/" in value)) and value is not None:
                raise InputError(f"attn_implementation={value!r} is not an attention implementation; use one of "
                                 f"{', '.join(valid)}")
    quant = kwargs.get("quantization_config")
    bits = (quant.get("load_in_4bit") or quant.get("load_in_8bit") if isinstance(quant, dict)
            else getattr(quant, "load_in_4bit", False) or getattr(quant, "load_in_8bit", False))
    if bits or kwargs.get("load_in_4bit") or kwargs.get("load_in_8bit"):
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise InputError("4-bit and 8-bit loading needs the bitsandbytes package (pip install bitsandbytes), "
                             "which is not installed; install it or load without quantization_config")


def _check_against_config(kwargs: dict[str, Any], config: Any) -> dict[str, Any]:
    """Each model keyword argument is from_pretrained's own or a setting of the model's config (a
    boolean setting read strictly), before any weight is read."""
    out = dict(kwargs)
    for key, value in kwargs.items():
        if key in LOAD_KWARGS:
            continue
        if not hasattr(config, key):
            import difflib

            close = difflib.get_close_matches(key, [*LOAD_KWARGS, *config.to_dict()], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else "; check its spelling"
            raise InputError(f"model keyword argument {key!r} is neither a from_pretrained argument nor a setting of "
                             f"this {config.model_type!r} model's config{hint}")
        if isinstance(getattr(config, key), bool):
            out[key] = strict_bool(key, value)
    return out


def _check_processor_kwargs(processor: Any, kwargs: dict[str, Any]) -> None:
    """A processor keyword argument that no part of the processor took (it would be ignored without a word)."""
    import inspect

    hub = {"cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "use_fast",
           "backend", "trust_remote_code", "proxies"}
    parts = [processor, *(getattr(processor, a, None) for a in ("image_processor", "tokenizer", "video_processor"))]
    taken = set(hub)
    for part in filter(None, parts):
        # what its __init__ and its declared kwargs take (Qwen's max_pixels is read into size, not kept as itself)
        taken |= set(inspect.signature(type(part).__init__).parameters)
        for klass in getattr(getattr(part, "valid_kwargs", None), "__mro__", ()):
            taken |= set(getattr(klass, "__annotations__", {}))
    for key in kwargs:
        if key not in taken and not any(part is not None and hasattr(part, key) for part in parts):
            raise InputError(f"processor keyword argument {key!r} is not a setting of this model's processor "
                             f"({type(processor).__name__}), which would ignore it; check its spelling or drop it")


def _with_template(adapter: Adapter | dict[str, Any] | None, prompt_template: str | None,
                   model_type: str | None = None) -> dict[str, Any]:
    """The adapter fields to set, ``prompt_template=`` (load()'s and wrap()'s own argument) among them."""
    given = check_overrides(adapter, model_type)
    if prompt_template is None:
        return given
    if "{prompt}" not in str(prompt_template):
        raise InputError(f"prompt_template={prompt_template!r} has no {{prompt}}; write the user text as {{prompt}}")
    if given.get("prompt_template") not in (None, prompt_template):
        raise InputError("prompt_template= and adapter['prompt_template'] differ; pass the template once")
    return {**given, "prompt_template": prompt_template}


def load(
    name_or_path: str | Path | None = None,
    *,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = None,
    device_map: str | dict | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    prompt_template: str | None = None,
    processor_kwargs: dict[str, Any] | None = None,
    adapter: Adapter | dict[str, Any] | None = None,
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
        prompt_template: a one-image user turn (``"<image>"`` and ``{prompt}`` written out), for a
            processor without a chat template; see :func:`wrap`.
        adapter: what derivation cannot read from this model (its layer list, attention module, output
            projection, image token, ...): see :func:`wrap`. Its names and types are checked before
            any file is read, its paths once the model is built, before anything else.
        processor_kwargs: passed to the processor's ``from_pretrained`` (e.g. Qwen's ``max_pixels``).
        **from_pretrained_kwargs: passed to the model's ``from_pretrained`` (e.g. ``attn_implementation``,
            ``quantization_config``).

    Returns:
        The :class:`LVLM` handle.

    Raises:
        UnsupportedModelError: the architecture cannot be served (the message says why), checked
            from the config before any weight is loaded.
        LvlmFixError: the model cannot be found or loaded.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText

    from .processors import load_processor

    trust_remote_code = strict_bool("trust_remote_code", trust_remote_code)  # "no" must never run remote code
    torch_dtype = _resolve_dtype(dtype)  # an unknown dtype is one line before any file is read
    if isinstance(device, str):  # a device or device map torch cannot use: one line now, not after the weights
        check_torch_device(device, "device")
    if isinstance(device_map, str) and device_map not in DEVICE_MAP_STRATEGIES:
        check_torch_device(device_map, "device_map")
    from_pretrained_kwargs = check_kwargs(from_pretrained_kwargs, "model keyword argument")
    processor_kwargs = check_kwargs(processor_kwargs, "processor keyword argument")
    _check_model_kwargs(from_pretrained_kwargs)
    _with_template(adapter, prompt_template)  # a misspelt adapter field: one line before any file is read
    name = str(name_or_path) if name_or_path not in (None, DEFAULT_MODEL) else str(testbed_path())
    if name_or_path in (None, DEFAULT_MODEL) and not (Path(name) / "config.json").exists():
        raise LvlmFixError(f"the embedded testbed checkpoint is missing at {name}; reinstall lvlm-fix or pass --model")
    hub_kwargs = {"revision": revision, "trust_remote_code": trust_remote_code}
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1  # hub ids are org/name
    if looks_like_path and not Path(name).expanduser().exists():
        raise LvlmFixError(f"model directory not found: {name}; pass an existing directory or a hub id like org/name")
    local = Path(name).expanduser()
    if local.is_dir() and not (local / "config.json").is_file() and "subfolder" not in from_pretrained_kwargs:
        raise LvlmFixError(f"{local} has no config.json, so it is not a saved model; pass the folder that "
                           "save_pretrained() wrote (config.json, model.safetensors, the processor files) or a hub id")
    try:
        config = AutoConfig.from_pretrained(name, **hub_kwargs)
    except (OSError, ValueError) as e:
        where, fix = (("directory", "; fix config.json or save the model again (save_pretrained)") if local.exists()
                      else ("hub id (offline? pass a local directory)", ""))
        raise LvlmFixError(f"cannot load model {name!r} as a {where}: {_first_line(e)}{fix}") from None
    overrides = _with_template(adapter, prompt_template, config.model_type)  # an Adapter of another model type
    reason = unsupported_reason(config, image_token_given="image_token_ids" in overrides)
    if reason is not None:
        raise UnsupportedModelError(config.model_type, reason)
    from_pretrained_kwargs = _check_against_config(from_pretrained_kwargs, config)
    # The processor before the weights: a bad processor argument is refused before the slow part.
    try:
        processor = load_processor(name, **hub_kwargs, **processor_kwargs)
    except (OSError, ValueError) as e:  # tokenizer / processor files missing or not valid JSON
        raise LvlmFixError(f"cannot load the processor (tokenizer, image processor) of {name}: "
                           f"{_first_line(e)}; save it beside the model again (processor.save_pretrained)") from None
    _check_processor_kwargs(processor, processor_kwargs)
    attention.register()
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            name, dtype=torch_dtype, device_map=device_map, **hub_kwargs, **from_pretrained_kwargs
        )
    except (SafetensorError, OSError, pickle.UnpicklingError) as e:  # weight files missing, corrupt, truncated
        raise _weights_error(name, e) from None
    if device is not None and device_map is None:
        model = model.to(device)
    model.eval()
    return wrap(model, processor, name=name if name_or_path else DEFAULT_MODEL, revision=revision, adapter=overrides)


def wrap(
    model: Any,
    processor: Any = None,
    *,
    name: str | None = None,
    revision: str | None = None,
    prompt_template: str | None = None,
    adapter: Adapter | dict[str, Any] | None = None,
) -> LVLM:
    """The :class:`LVLM` handle of a model already loaded: quantised, sharded with ``device_map``, fine-tuned.

    The same handle as :func:`load`: the adapter is derived from the model, and its text decoder is
    switched to lvlm-fix's attention function (plain sdpa until a method is applied; the vision
    tower keeps its own attention). Nothing else about the model changes: its device placement,
    dtype and train/eval mode stay as they are.

    Args:
        model: a transformers image-text-to-text model (e.g. from ``AutoModelForImageTextToText``).
        processor: its processor. Without one, batches must come from the caller (``model.generate(**batch)``
            inside :func:`lvlm_fix.apply` works); what builds inputs from images and prompts
            (``encode``, ``lvlm_fix.generate``, CARVE, the evals) raises a clear error.
        name: how the model is named in reports (default: ``model.name_or_path``).
        revision: recorded in provenance.
        prompt_template: a one-image user turn with the image placeholder and ``{prompt}`` written
            out (e.g. ``"USER: <image>\n{prompt} ASSISTANT:"``), used when the processor has no chat template.
        adapter: the escape hatch for a model that derivation cannot read: a
            :class:`~lvlm_fix.adapters.Adapter`, or a dict of some of its fields, e.g.
            ``{"text_layers": "model.decoder.blocks", "attention": "mixer", "out_proj": "proj",
            "image_token_ids": "<image>"}`` (paths dotted, as ``named_modules()`` writes them; the
            attention path from a decoder layer, the projection's from the attention module). What is
            given is used as given, what is left out is derived. Checked against the model before
            anything else happens.

    Raises:
        UnsupportedModelError: the model cannot be served; the message says why (and, where an
            adapter would help, which field to pass). Among the reasons: an attention module that
            reads a config of its own, which switching the text decoder's attention does not reach.
        InputError: an ``adapter`` field the model does not fit (a path it does not have); one line
            naming it and the fix.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "get_text_config"):
        raise InputError(f"wrap() takes a transformers model, got {type(model).__name__}; load it with "
                         "AutoModelForImageTextToText.from_pretrained(...) first")
    overrides = _with_template(adapter, prompt_template, config.model_type)
    resolved = derive_adapter(model, processor, overrides)
    attention.register()
    lvlm = LVLM(model=model, processor=processor, adapter=resolved,
                name=name or str(getattr(config, "name_or_path", "") or type(model).__name__), revision=revision)
    before = lvlm.text_config._attn_implementation
    model.set_attn_implementation(lvlm._attn_setting(attention.ATTN_NAME))
    _check_switched(lvlm, before, given=bool({"text_layers", "attention"} & set(overrides)))
    return lvlm


def _check_switched(lvlm: LVLM, before: str, given: bool) -> None:
    """Every attention module reads the switched implementation; else the switch is undone and one line says why.

    An attention module that reads a config of its own (a copy, or another sub-config) is not reached
    by ``set_attn_implementation`` on the text config: lvlm-fix's attention function would never run
    there, and every method acting through it would silently change nothing.
    """
    for i, module in enumerate(lvlm.attention_modules):
        impl = getattr(getattr(module, "config", None), "_attn_implementation", attention.ATTN_NAME)
        if impl == attention.ATTN_NAME:
            continue
        lvlm.model.set_attn_implementation(lvlm._attn_setting(before))
        why = (f"the attention module of text decoder layer {i} ({type(module).__name__}) reads a config of its own "
               f"(attention implementation {impl!r}), which switching the text config does not reach, so lvlm-fix's "
               "methods would not act on it")
        if given:
            raise InputError(f"adapter attention={lvlm.adapter.attention!r} of text_layers={lvlm.adapter.text_layers!r}: "
                             f"{why}; pass the self-attention modules of the text decoder")
        raise UnsupportedModelError(lvlm.adapter.model_type, why)


# -- what a generation produced -----------------------------------------------------------------
def eos_token_ids(lvlm: LVLM) -> set[int]:
    """The ids that end a generation (the generation config's, else the tokenizer's)."""
    eos = lvlm.model.generation_config.eos_token_id
    if eos is None:
        eos = lvlm.tokenizer.eos_token_id
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None}


def generated_lengths(sequences: Any, prompt_len: int, eos: set[int]) -> Any:
    """``[rows]`` generated tokens per row, up to and including the first EOS (padding after it excluded)."""
    gen = sequences[:, prompt_len:]
    n = gen.shape[1]
    is_eos = torch.isin(gen, torch.tensor(sorted(eos), dtype=gen.dtype, device=gen.device))
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, torch.full((gen.shape[0],), n, device=gen.device))
    return first.cpu()
