"""ICD: Instruction Contrastive Decoding (Wang, Pan, Ding, Biemann, Findings of ACL 2024).

A "disturbance instruction" (a role that makes the model a vague or confused object detector)
worsens the alignment of image and text and makes hallucination likelier. ICD contrasts the
normal rows with the same rows under the disturbance, exactly as VCD contrasts the noised image::

    logits = (1 + alpha) * l(image, prompt) - alpha * l(image, disturbed prompt)
    logits[k] = -inf  where  p(k) < beta * max p          (adaptive plausibility, normal stream)

then ``generate()``'s processors and warpers run on the result.

Where the disturbance goes. The release (LLaVA path, ``icd_llava_pope.py`` L51-63) renders the
contrast prompt as the ``llava_custom`` conversation, whose system message *is* the disturbance:
the main prompt's own system message (``llava_v1``'s) is replaced, not kept
("{disturbance} USER: <image>\\n{question} ASSISTANT:"). Here, with ``placement="system"``, each
row becomes token for token the row :meth:`~lvlm_fix.model.LVLM.encode` gives with the disturbance
as its system message: the row's system message (a preset's, ``--system-prompt``'s, or the
template's default) is replaced, and a row without one gains one where lvlm-fix puts a system
message (the chat template's system turn; without a chat template, before the prompt and a space).
The system message is found in the tokens: the template's tokens before it and between it and
the first image are learned at bind from two probe system messages, and the edit is used only if
it turns the probe rows, and the row without a system message, into exactly the disturbed row.
The rows of a batch must hold system messages of one token length (one edit for all rows).
``placement="user"`` keeps the system message and inserts the disturbance's tokens, then a space,
at the start of the user's text, right after the image (where a third-party port puts it).
``"auto"`` (the default) takes the system message when the prompt format has one (a template that
refuses or drops a system message has none). The contrast rows keep the main rows' images (the
features are encoded once, for both streams); their position ids are the edited prompt's.

Differences from the release (p1k0pan/ICD ``2fa44c5``), on purpose:

* Greedy decoding and beam search apply ICD too (the release replaces only the sampling loop).
* The contrast prompt is edited from the main rows' tokens (any batch, left padding, beams), not
  re-tokenised from text; the release builds its contrast mask on ids holding the ``-200`` image
  placeholder, correct at batch size 1 only.
* The release loops over five disturbance texts, one result folder each (:meth:`ICD.prompts`);
  here one text per run, the fourth by default, which a third-party port reads as the paper's
  Fig. 1 prefix. Which one the paper's LLaVA numbers use was not established.

Defaults: ``alpha = 1`` and ``beta = 0.1`` (``icd_llava_pope.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

from .._lazy import torch
from ..errors import ConfigError, LvlmFixError
from ..hooks.contrast import insert_tokens
from .base import param
from .contrastive import ContrastiveMethod, LinearContrastConfig, cut_param, strength_param
from .registry import register_method

if TYPE_CHECKING:
    from torch import Tensor

    from ..model import LVLM

__all__ = ["DISTURBANCES", "ICD", "ICDConfig", "DisturbanceEdit", "apply_edit", "disturbance_edit"]

# The five disturbance instructions of the release's POPE scripts, in its order.
DISTURBANCES = (
    "You are an object detector to recognize every different objects.",
    "You are an object detector to recognize every different objects by focusing the shapes, colors and "
    "relationships of objects.",
    "I want you avoid any specific identification or categorization of the objects depicted.",
    "You are a confused objects detector to provide a fuzzy overview or impression of the image.",
    "You are an object detector to provide a general overview or impression of the image.",
)
# Two user texts that differ in their first word: where their tokens part is where the user's text begins.
_PROBES = ("Is there a dog in the image?", "What is in the image?")
# Two system messages that differ in their first and last token (in any vocabulary, the testbed's included):
# where their rows part and meet again is where a system message sits.
_SYSTEM_PROBES = ("Answer the question.", "Describe the image!")


@dataclass(frozen=True)
class DisturbanceEdit:
    """How a row of this model becomes its disturbed row, in tokens.

    ``placement="system"``: after its left padding the row opens with ``head``, then its system
    message, then ``tail`` and its first image token; the system message is replaced by ``new``.
    ``old`` is the system message the row must hold, or None for any (the span up to ``tail``).
    A row that does not open so is tried with ``bare``: the edit of a row without a system message,
    for templates that then leave the system block out. ``placement="user"``: after the row's last
    image token come ``tail`` and then the user's text; ``new`` is inserted before the user's text.
    """

    placement: str
    new: tuple[int, ...]
    head: tuple[int, ...] = ()
    old: tuple[int, ...] | None = ()
    tail: tuple[int, ...] = ()
    bare: DisturbanceEdit | None = None


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _probe_image() -> Any:
    from PIL import Image

    return Image.new("RGB", (64, 64), (128, 128, 128))


def _system_span(edit: DisturbanceEdit, row: list[int], image_token_id: int, start: int = 0) -> tuple[int, int] | None:
    """``(column, length)`` of the system message in ``row`` (from column ``start``), or None if the row is not in
    the edit's format: ``head``, the message (``old``, or anything without an image), ``tail``, an image token."""
    at = start + len(edit.head)
    if row[start:at] != list(edit.head) or image_token_id not in row[at:]:
        return None
    end = row.index(image_token_id, at) - len(edit.tail)  # the system message ends where the tail begins
    if end < at or row[end:end + len(edit.tail)] != list(edit.tail):
        return None
    if edit.old is not None and row[at:end] != list(edit.old):
        return None
    return at, end - at


def _edited(edit: DisturbanceEdit, row: list[int], image_token_id: int) -> list[int] | None:
    """``row`` with its system message replaced (``edit`` or its ``bare`` edit), or None if it has no place for one."""
    for e in (edit, edit.bare):
        span = None if e is None else _system_span(e, row, image_token_id)
        if span is not None:
            return row[:span[0]] + list(e.new) + row[sum(span):]
    return None


def _system_edit(lvlm: LVLM, text: str) -> DisturbanceEdit | None:
    """The edit that makes ``text`` the row's system message, or None if the prompt format has none.

    Learned from the rows :meth:`~lvlm_fix.model.LVLM.encode` gives the probe question with two
    probe system messages: they share the tokens before (``head``) and after (``tail``, up to the
    image) the message. The edit must turn the probe rows, and the row without a system message,
    into exactly the row with ``text`` as the system message, or it is not used.
    """
    image, image_id = _probe_image(), lvlm.image_token_id

    def row(system: str | None) -> list[int] | None:
        try:
            return lvlm.encode([image], [_PROBES[0]], system_prompt=system)["input_ids"][0].tolist()
        except Exception:  # a chat template that refuses a system role has no system message
            return None

    a, b, disturbed, plain = row(_SYSTEM_PROBES[0]), row(_SYSTEM_PROBES[1]), row(text), row(None)
    if a is None or b is None or disturbed is None or plain is None or a == b:
        return None  # refused, or dropped by the template
    c = _common_prefix(a, b)
    after = a[len(a) - _common_prefix(a[c:][::-1], b[c:][::-1]):]
    if image_id not in after or image_id in a[:c]:
        return None  # the system message does not come before the image
    edit = DisturbanceEdit("system", new=(), head=tuple(a[:c]), old=None, tail=tuple(after[:after.index(image_id)]))
    span = _system_span(edit, disturbed, image_id)
    if span is None:
        return None
    edit = replace(edit, new=tuple(disturbed[span[0]:sum(span)]))
    if _system_span(edit, plain, image_id) is None:  # no system message: the template leaves its block out
        c = _common_prefix(plain, disturbed)
        s = _common_prefix(plain[c:][::-1], disturbed[c:][::-1])
        first = plain.index(image_id) if image_id in plain else -1
        if len(plain) - s <= first:
            edit = replace(edit, bare=DisturbanceEdit("system", new=tuple(disturbed[c:len(disturbed) - s]),
                                                      head=tuple(plain[:c]), old=tuple(plain[c:len(plain) - s]),
                                                      tail=tuple(plain[len(plain) - s:first])))
    ok = all(_edited(edit, r, image_id) == disturbed for r in (a, b, plain))
    return edit if ok else None


def _user_edit(lvlm: LVLM, text: str) -> DisturbanceEdit:
    """The edit that puts ``text`` at the start of the user's text, right after the image."""
    image = _probe_image()
    batch = lvlm.encode([image, image], list(_PROBES))
    rows = [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    start = _common_prefix(rows[0], rows[1])  # the user's text begins here
    images = [i for i, t in enumerate(rows[0][:start]) if t == lvlm.image_token_id]
    if not images:
        raise LvlmFixError("icd found no image token before the user's text in this model's prompt format")
    new = lvlm.tokenizer(text + " ", add_special_tokens=False)["input_ids"]
    return DisturbanceEdit("user", new=tuple(new), tail=tuple(rows[0][images[-1] + 1:start]))


def disturbance_edit(lvlm: LVLM, text: str, placement: str = "auto") -> DisturbanceEdit:
    """How this model's rows take the disturbance ``text`` (see the module docstring)."""
    if placement != "user":
        edit = _system_edit(lvlm, text)
        if edit is not None:
            return edit
        if placement == "system":
            raise ConfigError("icd: this model's prompt format has no system message; use placement=user (or auto)")
    return _user_edit(lvlm, text)


def _starts_with(ids: Tensor, at: Tensor, expected: tuple[int, ...]) -> Tensor:
    """``[b]``: row r holds ``expected`` from column ``at[r]``."""
    if not expected:
        return torch.ones_like(at, dtype=torch.bool)
    cols = (at[:, None] + torch.arange(len(expected), device=ids.device)).clamp(max=ids.shape[1] - 1)
    want = torch.tensor(expected, device=ids.device, dtype=ids.dtype)
    return (ids.gather(1, cols) == want).all(1) & (at + len(expected) <= ids.shape[1])


def _not_in_format(row: int, expected: str) -> LvlmFixError:
    return LvlmFixError(f"icd: row {row} of the batch is not in this model's prompt format (expected {expected}); "
                        "build the prompts with lvlm.encode() or the processor's chat template")


def _apply_system(edit: DisturbanceEdit, inputs: dict[str, Any], image_token_id: int) -> dict[str, Any]:
    """Every row's system message replaced by the disturbance; one edit for the whole batch (same length)."""
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    starts = mask.long().argmax(1).tolist() if mask is not None else [0] * ids.shape[0]
    found = []
    for r, (row, start) in enumerate(zip(ids.tolist(), starts)):
        hit = next(((e, span) for e in (edit, edit.bare) if e is not None
                    and (span := _system_span(e, row, image_token_id, start)) is not None), None)
        if hit is None:
            raise _not_in_format(r, "the system-message slot of the chat template, then the image")
        found.append(hit)
    (new, remove), *others = [(e.new, span[1]) for e, span in found]
    if any(o != (new, remove) for o in others):
        raise LvlmFixError("icd: the rows of this batch hold system messages of different lengths; ICD edits every "
                           "row alike: batch together the rows that share a system message")
    at = torch.tensor([span[0] for _, span in found], device=ids.device)
    return insert_tokens(inputs, at, torch.tensor(new, dtype=ids.dtype), remove=remove)


def apply_edit(edit: DisturbanceEdit, inputs: dict[str, Any], image_token_id: int) -> dict[str, Any]:
    """The disturbed rows (:func:`~lvlm_fix.hooks.contrast.insert_tokens`); a row not in the format is an error."""
    if edit.placement == "system":
        return _apply_system(edit, inputs, image_token_id)
    ids = inputs["input_ids"]
    cols = torch.arange(ids.shape[1], device=ids.device)
    last = torch.where(ids == image_token_id, cols, -1).amax(1)
    ok = (last >= 0) & _starts_with(ids, last + 1, edit.tail)
    if not bool(ok.all()):
        raise _not_in_format(int((~ok).nonzero()[0]), "an image followed by the user's text")
    return insert_tokens(inputs, last + 1 + len(edit.tail), torch.tensor(edit.new, dtype=ids.dtype))


@dataclass(frozen=True, kw_only=True)
class ICDConfig(LinearContrastConfig):
    """ICD's parameters (``noop``: ``alpha = beta = 0``; ``math_identity``: the undisturbed prompt against itself)."""

    alpha: float = strength_param(1.0, main="prompt", contrast="disturbed prompt",
                                  source="ICD release, icd_llava_pope.py cd_alpha")
    beta: float = cut_param(0.1, stream="normal-stream", source="ICD release, icd_llava_pope.py cd_beta")
    disturbance: str = param(DISTURBANCES[3], (
        "The disturbance instruction of the contrast prompt. Default: the fourth of the five the release loops over "
        f"({DISTURBANCES[3]!r}; source: ICD release, icd_llava_pope.py; the five are ICD.prompts())."))
    placement: Literal["auto", "system", "user"] = param("auto", (
        "Where the disturbance goes: system = it replaces the row's system message, or becomes one (the release, "
        "LLaVA path: icd_llava_pope.py L51-63); user = before the user's text, after the image, the system message "
        "kept; auto = system when the model's prompt format has a system message, else user. Default auto (source: "
        "lvlm-fix)."))

    def validate(self) -> None:
        if not self.disturbance.strip():
            raise ConfigError("icd: disturbance is empty; give an instruction (null_contrast=true contrasts the "
                              "prompt with itself)")


@register_method
class ICD(ContrastiveMethod):
    """ICD: next-token logits contrasted with those under a disturbance instruction."""

    name = "icd"
    config_cls = ICDConfig
    config: ICDConfig
    contrast_kind = "disturbed instruction"

    @classmethod
    def prompts(cls) -> list[str]:
        return list(DISTURBANCES)

    def bind(self, lvlm: LVLM) -> None:
        self._lvlm = lvlm
        self.edit = None
        super().bind(lvlm)
        if self.contrast_on and not self.null_contrast:
            self.edit = disturbance_edit(lvlm, self.config.disturbance, self.config.placement)

    def contrast_rows(self, lvlm: LVLM, inputs: dict[str, Any]) -> dict[str, Any]:
        return apply_edit(self.edit, inputs, lvlm.image_token_id)

    def report(self) -> dict[str, Any]:
        out = {**super().report(), "disturbance": self.config.disturbance,
               "placement": None if self.edit is None else self.edit.placement}
        if self._rows is not None and self.edit is not None:
            ids, image = self._rows.first_ids, self._lvlm.image_token_id
            shown = [t for i, t in enumerate(ids) if t != image or i == 0 or ids[i - 1] != image]  # one per image
            out["contrast_prompt_row0"] = self._lvlm.tokenizer.decode(shown)
        return out
