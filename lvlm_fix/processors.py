"""Load LVLM processors on installs without torchvision.

lvlm-fix deliberately does not depend on torchvision: the only PyPI builds of it are
CUDA builds that pin a newer torch, and a half-working copy makes transformers pick
torchvision-only classes that then fail to import. Without torchvision, transformers
5 falls back to the PIL ``*ImageProcessorPil`` classes for images, which is all
lvlm-fix needs. Video is another matter: the Qwen2-VL, Qwen2.5-VL and SmolVLM
processors take a ``video_processor`` argument, and their video processors exist only
as torchvision classes, so ``AutoProcessor.from_pretrained`` raises for them.

:func:`load_processor` first tries ``AutoProcessor`` unchanged. Only when that fails
and torchvision is missing does it fall back to an *image-only* subclass of the
model's processor class (:func:`image_only_processor`): ``ProcessorMixin`` works out
its sub-processors from the ``__init__`` signature, so a subclass whose ``__init__``
has no ``video_processor`` argument loads just the image processor
(``AutoImageProcessor``) and the tokenizer (``AutoTokenizer``) from the same path,
and otherwise behaves like the original for text and images.

Users who need video inputs must install a torchvision build matching their torch;
the image-only processors reject ``videos=``.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
from typing import Any

import transformers
from transformers import AutoConfig, AutoProcessor, ProcessorMixin
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
from transformers.utils import cached_file, is_torchvision_available

__all__ = ["image_only_processor", "load_processor"]

logger = logging.getLogger(__name__)

# Files that may record which processor class saved a directory, most specific first.
_CLASS_RECORDS = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json")


@functools.cache
def image_only_processor(proc_cls: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """Return a subclass of ``proc_cls`` that needs no video processor.

    The subclass drops ``video_processor`` from ``__init__`` (passing ``None`` to the
    parent), so ``from_pretrained``/``save_pretrained`` handle only the image processor
    and the tokenizer; calling it with ``videos=`` raises a ``ValueError``. Its ``__name__`` stays that of ``proc_cls`` so that saved files
    record the real class and ``AutoProcessor`` can load them once torchvision is
    installed; ``__qualname__`` carries an ``ImageOnly`` suffix for debugging.

    Results are cached, so the same class object is returned for the same
    ``proc_cls`` and ``isinstance``/``type(...) is`` checks stay consistent.

    Args:
        proc_cls: A ``ProcessorMixin`` subclass, e.g. ``Qwen2VLProcessor``.

    Returns:
        The image-only subclass, or ``proc_cls`` itself when it takes no video processor.
    """
    if "video_processor" not in inspect.signature(proc_cls.__init__).parameters:
        return proc_cls
    return type(
        proc_cls.__name__,
        (proc_cls,),
        {
            "__init__": _init_without_video(proc_cls),
            "__call__": _call_without_video(proc_cls),
            "__qualname__": f"{proc_cls.__qualname__}ImageOnly",
            "__module__": __name__,
            "__doc__": f"{proc_cls.__name__} without a video processor (torchvision-free).",
        },
    )


def _init_without_video(proc_cls: type[ProcessorMixin]) -> Any:
    """Build an ``__init__`` with ``proc_cls``'s parameters minus ``video_processor``.

    ``ProcessorMixin`` inspects the *real* parameter list of ``__init__``: the signature
    to find sub-processors and to choose what ``save_pretrained`` writes, and the code
    object's argument names to decide which saved settings ``from_pretrained`` passes
    back (e.g. SmolVLM's ``image_seq_len``). A ``**kwargs`` wrapper would silently drop
    those settings on reload, so the wrapper is generated with explicit parameters.
    """
    params = [p for name, p in inspect.signature(proc_cls.__init__).parameters.items() if name != "video_processor"]
    defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    this = params[0].name  # "self"
    header, forwarded, star_seen = [this], [], False
    for p in params[1:]:
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            raise TypeError(f"{proc_cls.__name__}.__init__ takes *{p.name}; cannot drop its video processor")
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            header.append(f"**{p.name}")
            forwarded.append(f"**{p.name}")
            continue
        if p.kind is inspect.Parameter.KEYWORD_ONLY and not star_seen:
            header.append("*")
            star_seen = True
        header.append(f"{p.name}=_defaults[{p.name!r}]" if p.name in defaults else p.name)
        forwarded.append(f"{p.name}={p.name}")
    source = (
        f"def __init__({', '.join(header)}):\n"
        f"    _parent_init({this}, video_processor=None, {', '.join(forwarded)})\n"
    )
    namespace: dict[str, Any] = {"__name__": __name__, "_defaults": defaults, "_parent_init": proc_cls.__init__}
    exec(source, namespace)  # noqa: S102 - source is built only from parameter names
    return namespace["__init__"]


def _call_without_video(proc_cls: type[ProcessorMixin]) -> Any:
    """Wrap ``__call__`` to fail clearly on ``videos=`` (the parent would ignore them and crash later)."""
    call_signature = inspect.signature(proc_cls.__call__)

    def __call__(self, *args, **kwargs):
        if call_signature.bind_partial(self, *args, **kwargs).arguments.get("videos") is not None:
            raise ValueError(
                f"{proc_cls.__name__} was loaded without a video processor because torchvision is "
                "not installed; install torchvision to process videos."
            )
        return proc_cls.__call__(self, *args, **kwargs)

    return __call__


def load_processor(path_or_name: str | os.PathLike, **kwargs: Any) -> ProcessorMixin:
    """Load the processor of an LVLM, falling back to an image-only one without torchvision.

    Args:
        path_or_name: Local directory or hub id, as for ``AutoProcessor.from_pretrained``.
        **kwargs: Passed to ``from_pretrained`` (e.g. ``local_files_only=True``).

    Returns:
        The ``AutoProcessor`` result, or, when that fails only because torchvision is
        missing, an instance of :func:`image_only_processor` of the model's processor class.

    Raises:
        Exception: Whatever ``AutoProcessor.from_pretrained`` raised, when no image-only
            fallback applies or the fallback fails too.
    """
    try:
        return AutoProcessor.from_pretrained(path_or_name, **kwargs)
    except Exception as err:
        if is_torchvision_available() or not _is_video_failure(err):
            raise
        try:
            proc_cls = _processor_class(path_or_name, **kwargs)
        except Exception:  # the lookup's own failure would hide the real error
            raise err from None
        if proc_cls is None or image_only_processor(proc_cls) is proc_cls:
            raise err
        logger.info("torchvision not installed: loading %s without a video processor", proc_cls.__name__)
        try:
            return image_only_processor(proc_cls).from_pretrained(path_or_name, **kwargs)
        except Exception as fallback_err:
            raise fallback_err from err


def _is_video_failure(err: BaseException) -> bool:
    """Whether ``err`` (or an exception it chains) comes from the missing video processor.

    Transformers reports it as ``OSError: Can't load video processor ...`` or an
    ``AttributeError`` on ``VIDEO_PROCESSOR_MAPPING``; anything else (missing repo, no
    network, bad config) is re-raised untouched instead of being retried.
    """
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        text = f"{type(err).__name__} {err}".lower()
        if "video" in text or "torchvision" in text:
            return True
        err = err.__cause__ or err.__context__
    return False


def _processor_class(path_or_name: str | os.PathLike, **kwargs: Any) -> type[ProcessorMixin] | None:
    """Find the processor class for a checkpoint without instantiating anything.

    Mirrors ``AutoProcessor``'s lookup order: a ``processor_class`` recorded by
    ``save_pretrained``, else the class registered for the config's ``model_type``.
    """
    for filename in _CLASS_RECORDS:
        name = _read_json(path_or_name, filename, **kwargs).get("processor_class")
        if name:
            return getattr(transformers, name, None)
    try:
        model_type = AutoConfig.from_pretrained(path_or_name, **kwargs).model_type
    except Exception:  # no config.json either: nothing more to go on
        return None
    name = PROCESSOR_MAPPING_NAMES.get(model_type)
    return getattr(transformers, name, None) if isinstance(name, str) else None


def _read_json(path_or_name: str | os.PathLike, filename: str, **kwargs: Any) -> dict[str, Any]:
    """Read ``filename`` from a local directory or the hub cache; ``{}`` if absent."""
    if os.path.isdir(path_or_name):
        path = os.path.join(path_or_name, kwargs.get("subfolder", ""), filename)
    else:
        hub_keys = ("cache_dir", "force_download", "token", "revision", "local_files_only", "subfolder")
        path = cached_file(
            path_or_name,
            filename,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            **{k: v for k, v in kwargs.items() if k in hub_keys},
        )
    if not path or not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)
