"""The Python API: apply a method around the real ``generate()``, or generate in one call."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from .errors import ConfigError
from .hooks.plan import Plan
from .interventions import build_methods
from .model import LVLM


@contextmanager
def apply(lvlm: LVLM, method: str | Sequence[str] | None, **params: Any) -> Iterator[Plan]:
    """Apply one or more methods to every ``lvlm.model.generate(...)`` / forward inside the block.

    Args:
        lvlm: the handle from :func:`lvlm_fix.load`.
        method: a registered name, ``"vhr+var"`` for several, or None / ``"none"`` for none.
        **params: method parameters, routed to each method whose config has the field.

    Yields:
        The active :class:`~lvlm_fix.hooks.Plan`; ``plan.report()`` says what was touched.

    Example:
        >>> with lvlm_fix.apply(handle, "var", rho=0.5):
        ...     ids = handle.model.generate(**batch, max_new_tokens=32)
    """
    methods = build_methods(method, **params)
    refiners = [m.name for m in methods if m.refines_input]
    if refiners:
        raise ConfigError(
            f"method {refiners[0]!r} rewrites the input image, so it cannot wrap a plain generate(); "
            "use lvlm_fix.generate(handle, images, prompts, method=...)"
        )
    plan = Plan(lvlm, methods)
    with plan.active():
        yield plan


@dataclass
class Generation:
    """Texts generated for a batch, and what the methods saw and touched."""

    texts: list[str]
    report: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, Any] = field(default_factory=dict)  # e.g. CARVE's refined images and masks


def generate(
    lvlm: LVLM,
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    method: str | Sequence[str] | None = None,
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
        images, prompts: one image and one prompt per row.
        method: a registered name, ``"vhr+var"``, or None for the vanilla model.
        max_new_tokens, do_sample, num_beams: passed to ``generate()``.
        seed: seeds torch before generating (sampling).
        generate_kwargs: any other ``generate()`` arguments.
        system_prompt: a system message for every row (see :meth:`LVLM.build_prompt`).
        **params: method parameters.
    """
    methods = build_methods(method, **params)
    gen = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "num_beams": num_beams, **(generate_kwargs or {})}
    images = list(images)
    artifacts: dict[str, Any] = {}
    report: dict[str, Any] = {}
    for m in (m for m in methods if m.refines_input):
        images, extra = m.refine(lvlm, images, list(prompts), gen)
        artifacts[m.name] = extra
        report[m.name] = m.report()
    batch = lvlm.encode(images, prompts, system_prompt=system_prompt)
    plan = Plan(lvlm, [m for m in methods if not m.refines_input])
    if seed is not None:
        torch.manual_seed(seed)
    with plan.active(), torch.inference_mode():
        out = lvlm.model.generate(**batch, **gen)
    report.update({m.name: m.report() for m in plan.participants})
    return Generation(texts=lvlm.decode(out, batch["input_ids"].shape[1]), report=report, artifacts=artifacts)
