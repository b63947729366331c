"""ICD: Instruction Contrastive Decoding (Wang, Pan, Ding, Biemann, Findings of ACL 2024).

A "disturbance instruction" (a role that makes the model a vague or confused object detector)
worsens the alignment of image and text and makes hallucination likelier. ICD contrasts the
normal rows with the same rows under the disturbance, exactly as VCD contrasts the noised image::

    logits = (1 + alpha) * l(image, prompt) - alpha * l(image, disturbed prompt)
    logits[k] = -inf  where  p(k) < beta * max p          (adaptive plausibility, normal stream)

then ``generate()``'s processors and warpers run on the result.

Where the disturbance goes. The release (LLaVA path) renders the contrast prompt with the system
message replaced by the disturbance ("{disturbance} USER: <image>\\n{question} ASSISTANT:").
Here, with ``placement="system"``, the model's chat template is rendered with the disturbance as
the system message, and the token difference from the normal rendering (an inserted system block,
or the template's default system message replaced) is applied to every row, after checking that
the row opens with the template's tokens. Templates without a system message (no chat template,
or one that drops it) take ``placement="user"``: the disturbance's tokens, then a space, are
inserted at the start of the user's text, right after the image. ``"auto"`` (the default) takes
the system message when the template has one. The contrast rows keep the main rows' images (the
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

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from .._lazy import torch
from ..errors import ConfigError, LvlmFixError
from ..hooks.contrast import ContrastStream, insert_tokens, linear_contrast
from .base import ContrastConfig, Intervention, Stage, param
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


@dataclass(frozen=True)
class DisturbanceEdit:
    """How a row of this model becomes its disturbed row, in tokens.

    ``placement="system"``: the row opens with ``head`` then ``old`` (after its left padding);
    ``old`` is replaced by ``new``. ``placement="user"``: after the row's last image token come
    ``tail`` and then the user's text; ``new`` is inserted before the user's text.
    """

    placement: str
    new: tuple[int, ...]
    head: tuple[int, ...] = ()
    old: tuple[int, ...] = ()
    tail: tuple[int, ...] = ()


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _system_edit(lvlm: LVLM, text: str) -> DisturbanceEdit | None:
    """The edit that puts ``text`` in the chat template's system message, or None if the template has none."""
    processor = lvlm.processor
    if not getattr(processor, "chat_template", None):
        return None
    edits = set()
    for probe in _PROBES:
        user = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": probe}]}]
        disturbed = None
        for content in ([{"type": "text", "text": text}], text):  # templates take a list of parts, or a string
            try:
                disturbed = processor.apply_chat_template([{"role": "system", "content": content}, *user],
                                                          add_generation_prompt=True)
                break
            except Exception:  # a template that refuses a system message has none
                continue
        if disturbed is None:
            return None
        a = lvlm.tokenizer(lvlm.build_prompt(probe))["input_ids"]
        b = lvlm.tokenizer(disturbed)["input_ids"]
        if a == b:
            return None  # the template drops the system message
        c = _common_prefix(a, b)
        s = _common_prefix(a[c:][::-1], b[c:][::-1])
        edits.add(DisturbanceEdit("system", new=tuple(b[c:len(b) - s]), head=tuple(a[:c]), old=tuple(a[c:len(a) - s])))
    edit = edits.pop()
    # An edit that differs with the user's text, or that sits after the image, is not a system message.
    return None if edits or lvlm.image_token_id in edit.head + edit.old else edit


def _user_edit(lvlm: LVLM, text: str) -> DisturbanceEdit:
    """The edit that puts ``text`` at the start of the user's text, right after the image."""
    from PIL import Image

    image = Image.new("RGB", (64, 64), (128, 128, 128))
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


def apply_edit(edit: DisturbanceEdit, inputs: dict[str, Any], image_token_id: int) -> dict[str, Any]:
    """The disturbed rows (:func:`~lvlm_fix.hooks.contrast.insert_tokens`); a row not in the format is an error."""
    ids = inputs["input_ids"]
    b, length = ids.shape
    cols = torch.arange(length, device=ids.device)
    mask = inputs.get("attention_mask")
    if edit.placement == "system":
        start = mask.long().argmax(1) if mask is not None else torch.zeros(b, dtype=torch.long, device=ids.device)
        at = start + len(edit.head)
        ok = _starts_with(ids, start, edit.head + edit.old)
        expected = "the chat template's opening (its system-message slot)"
    else:
        last = torch.where(ids == image_token_id, cols, -1).amax(1)
        at = last + 1 + len(edit.tail)
        ok = (last >= 0) & _starts_with(ids, last + 1, edit.tail)
        expected = "an image followed by the user's text"
    if not bool(ok.all()):
        row = int((~ok).nonzero()[0])
        raise LvlmFixError(f"icd: row {row} of the batch is not in this model's prompt format (expected {expected}); "
                           "build the prompts with lvlm.encode() or the processor's chat template")
    return insert_tokens(inputs, at, torch.tensor(edit.new, dtype=ids.dtype), remove=len(edit.old))


@dataclass(frozen=True, kw_only=True)
class ICDConfig(ContrastConfig):
    """ICD's parameters."""

    alpha: float = param(1.0, (
        "Contrast strength: logits = (1 + alpha) l(prompt) - alpha l(disturbed prompt). 0 with beta 0 installs "
        "nothing. Default 1.0 (source: ICD release, icd_llava_pope.py cd_alpha)."), lo=0.0)
    beta: float = param(0.1, (
        "Adaptive plausibility: tokens with normal-stream probability below beta times the top one's get -inf, "
        "before temperature/top-k/top-p. 0 cuts nothing. Default 0.1 (source: ICD release, icd_llava_pope.py "
        "cd_beta)."), lo=0.0, hi=1.0)
    disturbance: str = param(DISTURBANCES[3], (
        "The disturbance instruction of the contrast prompt. Default: the fourth of the five the release loops over "
        f"({DISTURBANCES[3]!r}; source: ICD release, icd_llava_pope.py; the five are ICD.prompts())."))
    placement: Literal["auto", "system", "user"] = param("auto", (
        "Where the disturbance goes: system = as the chat template's system message (the release, LLaVA path); "
        "user = before the user's text, after the image; auto = system when the model's template has a system "
        "message, else user. Default auto (source: lvlm-fix)."))

    def validate(self) -> None:
        if not self.disturbance.strip():
            raise ConfigError("icd: disturbance is empty; give an instruction (null_contrast=true contrasts the "
                              "prompt with itself)")

    @classmethod
    def noop(cls) -> ICDConfig:
        """``alpha = beta = 0``: no contrast stream is installed."""
        return cls(alpha=0.0, beta=0.0)

    @classmethod
    def math_identity(cls) -> ICDConfig:
        """The stream runs on the undisturbed prompt itself, no cut: ``2 l - l = l`` exactly."""
        return cls(alpha=1.0, beta=0.0, null_contrast=True)


@register_method
class ICD(Intervention, ContrastStream):
    """ICD: next-token logits contrasted with those under a disturbance instruction."""

    name = "icd"
    stage = Stage.LOGITS
    config_cls = ICDConfig
    config: ICDConfig
    contrast_kind = "disturbed instruction"

    @classmethod
    def prompts(cls) -> list[str]:
        return list(DISTURBANCES)

    def contrast_active(self) -> bool:
        return self.config.alpha != 0 or self.config.beta != 0

    def bind(self, lvlm: LVLM) -> None:
        self.null_contrast = self.config.null_contrast
        self._lvlm = lvlm
        self.edit = None
        super().bind(lvlm)
        if self.contrast_on and not self.null_contrast:
            self.edit = disturbance_edit(lvlm, self.config.disturbance, self.config.placement)

    def contrast_rows(self, lvlm: LVLM, inputs: dict[str, Any]) -> dict[str, Any]:
        return apply_edit(self.edit, inputs, lvlm.image_token_id)

    def combine(self, main: Tensor, contrast: Tensor, step: int) -> Tensor:
        return linear_contrast(main, contrast, self.config.alpha, self.config.beta)

    def report(self) -> dict[str, Any]:
        out = {"alpha": self.config.alpha, "beta": self.config.beta, "disturbance": self.config.disturbance,
               "placement": None if self.edit is None else self.edit.placement, **self.stream_report()}
        if self._rows is not None and self.edit is not None:
            ids, image = self._rows.first_ids, self._lvlm.image_token_id
            shown = [t for i, t in enumerate(ids) if t != image or i == 0 or ids[i - 1] != image]  # one per image
            out["contrast_prompt_row0"] = self._lvlm.tokenizer.decode(shown)
        return out
