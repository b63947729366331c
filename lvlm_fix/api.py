"""The Python API: apply methods around the real ``generate()``, or generate in one call."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from ._lazy import torch
from .errors import ConfigError, InputError, LvlmFixWarning
from .hooks.plan import Plan
from .interventions import Generation, Intervention, build_methods

if TYPE_CHECKING:
    from PIL import Image

    from .model import LVLM

__all__ = ["Generation", "apply", "check_length", "fit_new_tokens", "generate", "run_methods"]

MethodArg = str | Sequence[str] | Mapping[str, Mapping[str, Any]] | None


@contextmanager
def apply(lvlm: LVLM, method: MethodArg, **params: Any) -> Iterator[Plan]:
    """Apply one or more methods to every ``lvlm.model.generate(...)`` / forward inside the block.

    Args:
        lvlm: the handle from :func:`lvlm_fix.load`.
        method: a method spec: a registered name, ``"vhr+var"`` for several, ``"vhr:alpha=1.5"`` with
            parameters, a dict of per-method parameters ``{"vhr": {"layers": [1]}, "var": {"tau": 3.5}}``,
            or None / ``"none"`` for none.
        **params: parameters by field name, each routed to the one composed method that has it (a
            field that two composed methods share must be set per method, in the dict form).

    Yields:
        The active :class:`~lvlm_fix.hooks.Plan`; ``plan.report()`` says what each method touched,
        keyed by method name.

    Raises:
        LvlmFixError: a method is already applied to this model, in this thread (combine methods in
            one spec instead) or in another thread. Threads: one model serves one thread at a time,
            whichever handle it is reached through; run the calls one after another, or load the
            model once per thread. A model's forwards outside ``apply`` are not checked.

    Example:
        >>> with lvlm_fix.apply(handle, {"vhr": {"layers": [1]}, "var": {"layers": [2], "tau": 3.5}}) as plan:
        ...     ids = handle.model.generate(**batch, max_new_tokens=32)
    """
    from .model import check_handle

    check_handle(lvlm)
    methods = build_methods(method, **params)
    wrappers = [m.name for m in methods if m.stage.wraps_generate]
    if wrappers:
        raise ConfigError(
            f"method {wrappers[0]!r} runs generate() itself (stage {methods[0].stage.name.lower()}), so it cannot "
            "wrap a plain generate(); use lvlm_fix.generate(handle, images, prompts, method=...)"
        )
    plan = Plan(lvlm, methods)
    with plan.active():
        yield plan


def generate(
    lvlm: LVLM,
    images: Sequence[Image.Image | Sequence[Image.Image]],
    prompts: Sequence[str],
    method: MethodArg = None,
    *,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    num_beams: int = 1,
    seed: int | None = None,
    generate_kwargs: dict[str, Any] | None = None,
    system_prompt: str | None = None,
    **params: Any,
) -> Generation:
    """Generate answers for (image, prompt) rows with ``method`` applied, batched.

    Args:
        lvlm: the handle from :func:`lvlm_fix.load`.
        images, prompts: one image (or a list of images) and one prompt per row; an image is a PIL
            image, a file path, a numpy array or a torch tensor, read by :func:`lvlm_fix.images.load_image`
            (EXIF orientation, 16-bit, alpha, floats in [0, 1]: the rules are in :mod:`lvlm_fix.images`).
        method: a method spec, as for :func:`apply`; None for the vanilla model.
        max_new_tokens, do_sample, num_beams: passed to ``generate()``.
        seed: seeds torch before generating (sampling).
        generate_kwargs: any other ``generate()`` arguments.
        system_prompt: a system message for every row (see :meth:`LVLM.build_prompt`).
        **params: method parameters, as for :func:`apply`.

    Returns:
        The texts, each method's report (keyed by method name, as ``plan.report()``) and artifacts.
    """
    from .model import check_handle, check_rows

    check_handle(lvlm)
    methods = build_methods(method, **params)
    for name, value in (("max_new_tokens", max_new_tokens), ("num_beams", num_beams)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}={value!r} must be a whole number of at least 1")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32):
        raise ConfigError(f"seed={seed!r} must be a whole number from 0 to 2**32 - 1, or None")
    if system_prompt is not None and (not isinstance(system_prompt, str) or not system_prompt.strip()):
        raise InputError(f"system_prompt={system_prompt!r} must be non-empty text, or None for none")
    rows, prompts = check_rows(images, prompts)  # every image through the one loader, once
    gen = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "num_beams": num_beams, **(generate_kwargs or {})}
    if seed is not None:
        torch.manual_seed(seed)
    images = [row if isinstance(im, (list, tuple)) else row[0] for im, row in zip(images, rows)]
    return run_methods(lvlm, methods, images, prompts, gen, system_prompt=system_prompt)


def run_methods(lvlm: LVLM, methods: Sequence[Intervention], images: list[Any], prompts: list[str],
                gen: dict[str, Any], *, system_prompt: str | None = None) -> Generation:
    """Apply ``methods`` (in composition order) around one batched ``generate()``.

    A method that wraps ``generate()`` (a pipeline, an input refinement) comes first in the order;
    it runs the rest through the ``inner`` callback it is given, as many times as it needs. The
    other methods act inside the model's own ``generate()`` through one :class:`Plan`.
    """
    if methods and methods[0].stage.wraps_generate:
        first, rest = methods[0], methods[1:]
        refuse_early(lvlm, rest, gen)

        def inner(images: Sequence[Any], prompts: Sequence[str], gen: dict[str, Any]) -> Generation:
            return run_methods(lvlm, rest, list(images), list(prompts), gen, system_prompt=system_prompt)

        return first.generate(lvlm, images, prompts, gen, inner, system_prompt=system_prompt)
    batch = lvlm.encode(images, prompts, system_prompt=system_prompt)
    gen = dict(gen)
    fit_new_tokens(lvlm, batch["input_ids"].shape[1], gen)
    plan = Plan(lvlm, methods)
    with plan.active(), torch.inference_mode():
        out = lvlm.model.generate(**batch, **gen)
    # return_dict_in_generate=True gives generate()'s output object (scores, logits, ...): kept whole.
    sequences, output = (out.sequences, out) if hasattr(out, "sequences") else (out, None)
    prompt_len = batch["input_ids"].shape[1]
    from .model import eos_token_ids, generated_lengths  # here: the module imports torch, and api is imported early

    return Generation(texts=lvlm.decode(sequences, prompt_len), report=plan.report(), output=output,
                      tokens=generated_lengths(sequences, prompt_len, eos_token_ids(lvlm)).tolist())


def refuse_early(lvlm: LVLM, methods: Sequence[Intervention], gen: dict[str, Any]) -> None:
    """What the methods inside ``generate()`` would refuse of ``gen`` (a static cache for a contrast stream,
    ...), refused now: a pipeline (CARVE's statistics passes, MVP's captions) runs forwards of its own
    before it reaches the ``generate()`` where they would refuse it."""
    if not methods:
        return
    settings = {k: v for k, v in gen.items() if k not in ("logits_processor", "stopping_criteria", "streamer")}
    given = settings.pop("generation_config", None)  # generate()'s own first argument, when a caller passes one
    generation_config, model_kwargs = lvlm.model._prepare_generation_config(given, **settings)
    Plan(lvlm, list(methods)).check_generate(generation_config, model_kwargs)


def check_length(lvlm: LVLM, prompt_len: int, new_tokens: int = 0) -> None:
    """Refuse, before any forward, a prompt plus ``new_tokens`` longer than the model's positions."""
    limit = getattr(lvlm.text_config, "max_position_embeddings", None)
    if limit and prompt_len + new_tokens > limit:
        extra = f" and {new_tokens} tokens to generate or score" if new_tokens else ""
        raise InputError(f"the prompt is {prompt_len} tokens{extra}, but the model has {limit} positions; shorten the "
                         "prompt (or the image's token count)")


def fit_new_tokens(lvlm: LVLM, prompt_len: int, gen: dict[str, Any]) -> None:
    """Refuse a prompt the model cannot hold; cap ``gen["max_new_tokens"]`` (with a warning) so that
    prompt and answer fit the model's positions."""
    limit = getattr(lvlm.text_config, "max_position_embeddings", None)
    if not limit:
        return
    if prompt_len >= limit:  # not even one token could be generated
        raise InputError(f"the prompt is {prompt_len} tokens, but the model has {limit} positions; shorten the prompt "
                         "(or the image's token count)")
    wanted = gen.get("max_new_tokens")
    if wanted is not None and prompt_len + wanted > limit:
        gen["max_new_tokens"] = limit - prompt_len
        warnings.warn(f"max_new_tokens capped so that prompt and answer fit the model's {limit} positions",
                      LvlmFixWarning, stacklevel=3)
