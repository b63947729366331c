"""MVP: multi-view multi-path reasoning, "Look, Compare, Decide" (Qu et al., COLING 2025).

A pipeline of the model's own ``generate()`` calls, each made through ``inner`` so that methods of
later stages (``mvp+vhr``, ``mvp+paint``) act in every one of them:

1. **Views** (multi-view information seeking). Each image is captioned once per view, with no
   question in the prompt, by sampling (temperature 0.7, top-p 0.95, up to 512 tokens):

   * ``bottom_up``: "Through a systematic examination of the image at the pixel level and by
     analyzing various visual features, such as shape, color, and texture, along with employing
     object detection techniques, describe this image in details."
   * ``top_down``: "Given the overall scene depicted in the image, taking into account the
     context, environmental factors, and any relevant visual cues, describe this image in details."
   * ``normal``: "Describe this image in details."
   * ``question``: no caption; the question exactly as asked (off by default; the identity view).

   A view runs when its weight (``w_bottom_up``, ``w_top_down``, ``w_normal``, ``w_question``) is
   above 0. The question is then asked with the caption in context::

       Here is the caption of the image:\\n{caption}\\nQuestion: {question, lower-cased}

2. **Paths** (multi-path reasoning). One forward on each view's prompt gives the first-token
   distribution ``P`` (softmax of the logits); its top ``top_k`` tokens start paths. For a yes/no
   question, a top-k token that is itself "yes" or "no" (any case, with or without a leading
   space) adds ``P(t)`` to that answer's score ``S_v``. Every other top-k token with
   ``P(t) >= threshold`` is appended, as a token id, to the prompt and continued (temperature 0.7,
   top-p 1, up to 50 tokens); the first word "yes" / "no" of the continuation is the path's answer,
   and ``S_v[answer] += P(t) * certainty``, where ``certainty = p_top1 - p_top2`` of the model's
   distribution at that word's first token. A path that never says yes or no adds ``P(t)`` to Yes
   (``unanswered="yes"``, the release's rule) or nothing (``unanswered="skip"``).
3. **Fusion.** ``score[a] = sum_v w_v S_v[a]``; the answer is "Yes" when ``score[yes] > score[no]``,
   else "No" (weights 0.4 / 0.4 / 0.2 for bottom-up / top-down / normal).

**Free-form answers** (questions that are not yes/no; ``answer="auto"`` calls a question yes/no
when its first word is an auxiliary verb, "is", "are", "does", "can", ...). Every top-k token
with ``P(t) >= threshold`` (and always the top-1) starts a path, continued up to the call's
``max_new_tokens``; the path's answer is its whole text, compared after normalisation (lower
case, collapsed spaces, no trailing punctuation), and its certainty is the mean of
``p_top1 - p_top2`` over its tokens. ``S_v[answer] += P(t) * certainty``, fused as above; the
answer returned is the text of the best-scoring path with the winning normalised answer. For a
yes/no question this is the same certainty-weighted vote, over whole answers instead of the
first yes/no word.

**Sampling, per row.** Captions and paths are sampled by the Gumbel-max trick (temperature and
top-p warping, then ``argmax(scores + Gumbel noise)``, an exact draw from the warped distribution)
with one random generator per row, seeded from ``sample_seed``, the view and the row's image (and, for
paths, its prompt and first token). So a row gets the same captions and paths whatever else is in
the batch, and the same image is captioned once per view within a call (a cache by image content).
``path_temperature=0`` makes the paths greedy. This is a choice, against the release's one global seed
(336), under which an image's captions depend on how many draws came before them (its question's row
number): here a caption is a function of (image, view, ``sample_seed``, caption settings), the same for
each of an image's questions, which is what lets a kept caption be exactly the one a new call would draw.

**Captions kept across calls.** A caption depends on the image, the view and the caption settings,
not on the question, and POPE asks six questions per image. While ``lvlm-fix eval`` (the runner)
generates with a setting, it gives MVP a run cache (:attr:`MVP.run_cache`): captions made in one
batch are reused by the next ones, and stored in ``<setting folder>/cache/mvp.jsonl``, so a resumed
run reads them back. Each is keyed on everything that makes it: the image's content, the view's
prompt as the model reads it (chat template, system prompt), ``sample_seed``, the caption
temperature and top-p, its token budget, the model (:func:`model_identity`: name, revision,
dtype, image processor settings, sampled weights) and its ``generation_config`` (defaults such as a
repetition penalty reach the caption calls); the methods composed after MVP are the setting's,
whose folder holds the file. A change of any of them misses, so a file of another setting or seed
is never used, only added to. Per-row sampling makes a reused caption the one the call would have
drawn, so the answers are the same with and without the cache. The prompt widths that set the
caption budget are kept the same way (``width-`` entries). The file is appended and fsynced per
batch; a line that does not read (torn by a kill, edited) is set aside with one warning and its
caption made again; a readable entry whose value has the wrong type is refused in one line
(``InputError``: the file was written by something else). Outside the runner nothing is kept
between calls.

**The caller's generate() arguments.** MVP's calls decode with its own settings; it takes the
call's ``max_new_tokens`` (the free-form paths' budget) and accepts, unused, the sampling settings
(``do_sample``, ``temperature``, ``top_p``, ``top_k``) that its stages replace. Any other argument
(a static cache, a streamer, beams, ``output_scores``, ``stop_strings``, ...) would not reach its
calls, so it is refused in one line before any forward (docs/generate-features.md).

**Cost**, reported as ``report["mvp"]["cost"]``: per stage (captions, scoring, paths) the rows,
forward passes (batched steps of ``generate()``), prompt tokens and generated tokens; ``captions``
also counts the captions ``reused`` from the run cache.

Differences from the release (GasolSun36/MVP ``8a96be3``), all deliberate:

* yes/no paths are scored as described; the release never defines the sums it adds to
  (``UnboundLocalError`` on any path that says yes or no, bug 1), so only its "no answer -> Yes"
  branch can run;
* the certainty is taken from the unwarped distribution (``certainty_from="raw"``); the release
  reads the scores after temperature / top-p warping (bug 2; ``certainty_from="warped"``);
* top-k tokens are classified one by one, case-insensitively, and appended as token ids (the
  release decodes them together and splits on spaces, so sub-words misalign with their
  probabilities, "yes" in lower case is not counted, and ``prompt + token`` is re-tokenised, bug 3);
* the first yes/no word of a continuation is taken in text order, punctuation allowed ("Yes,");
  the release looks for "yes" anywhere before "no", and only whole space-separated words;
* captions are made per image and per view, inside the call, and kept across an evaluation run's
  batches and its resumption (the release reads a fixed file of the COCO *popular* split, joined to
  the questions by row number, and captions each question row, bug 4); fusion is the weighted sum
  above (the release's ``eval_pope.py`` zips three weights with two keys and cannot run, bug 5);
* batched over rows, and sampling is per row (see above); the release is batch size 1 with one
  global seed (336);
* captions are kept short enough, when needed, for the caption and answer prompts to fit the model's
  positions (never needed on LLaVA-1.5's 4096 with 512-token captions).
"""

from __future__ import annotations

import hashlib
import json
import re
import weakref
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from .._lazy import torch
from ..errors import ConfigError, InputError
from .base import Generation, Inner, Intervention, MethodConfig, Stage, param
from .registry import register_method

if TYPE_CHECKING:
    from PIL import Image
    from torch import Tensor

    from ..model import LVLM

__all__ = ["ANSWER_TEMPLATE", "MVP", "MVPConfig", "VIEW_PROMPTS", "certainty", "first_yes_no", "fuse",
           "is_yes_no_question", "normalize_answer", "yes_no_token"]

VIEW_PROMPTS = {
    "bottom_up": ("Through a systematic examination of the image at the pixel level and by analyzing various visual "
                  "features, such as shape, color, and texture, along with employing object detection techniques, "
                  "describe this image in details."),
    "top_down": ("Given the overall scene depicted in the image, taking into account the context, environmental "
                 "factors, and any relevant visual cues, describe this image in details."),
    "normal": "Describe this image in details.",
}
QUESTION_VIEW = "question"  # no caption: the question as asked
VIEWS = (*VIEW_PROMPTS, QUESTION_VIEW)
ANSWER_TEMPLATE = "Here is the caption of the image:\n{caption}\nQuestion: {question}"
YES, NO = "yes", "no"

_AUXILIARIES = frozenset(
    "is are am was were do does did can could will would shall should may might must has have had".split())
_YES_NO_WORD = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


# -- the math (pure) -------------------------------------------------------------------------------
def certainty(probs: Tensor) -> Tensor:
    """``p_top1 - p_top2`` along the last dimension of a probability distribution."""
    top = probs.topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


def yes_no_token(text: str) -> str | None:
    """``"yes"`` / ``"no"`` when a token's text is that word (any case, spaces and punctuation around), else None."""
    word = text.strip().strip(".,!?;:'\"").lower()
    return word if word in (YES, NO) else None


def first_yes_no(text: str) -> tuple[str, int] | None:
    """The first whole word "yes" or "no" of ``text`` (any case) and its character offset, or None."""
    m = _YES_NO_WORD.search(text)
    return (m.group(1).lower(), m.start()) if m else None


def is_yes_no_question(question: str) -> bool:
    """True when the question's first word is an auxiliary verb ("Is there a dog?", "Does it ...")."""
    words = question.strip().split()
    return bool(words) and words[0].strip(".,!?;:'\"").lower() in _AUXILIARIES


def normalize_answer(text: str) -> str:
    """Free-form answers are compared lower-cased, with spaces collapsed and trailing punctuation dropped."""
    return " ".join(text.lower().split()).rstrip(".,!?;: ")


def fuse(view_scores: list[dict[str, float]], weights: list[float]) -> dict[str, float]:
    """``score[a] = sum_v w_v S_v[a]`` over the views' answer scores."""
    out: dict[str, float] = {}
    for scores, w in zip(view_scores, weights):
        for answer, s in scores.items():
            out[answer] = out.get(answer, 0.0) + w * s
    return out


def _seed(*parts: Any) -> int:
    """A 63-bit seed from its parts, the same in every process."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big") >> 1


def _image_key(image: Image.Image) -> str:
    return hashlib.sha256(image.mode.encode() + repr(image.size).encode() + image.tobytes()).hexdigest()[:16]


def _cached(cache: Any, key: str, kind: type) -> Any | None:
    """The run cache's value under ``key``, None when absent. A value of another type under a key made of
    every setting can only come from a file edited or written by something else: refused, never used."""
    value = cache.get(key)
    if value is None or (isinstance(value, kind) and not isinstance(value, bool)):
        return value
    where = getattr(cache, "path", None) or "the run cache"
    raise InputError(f"{where}: entry {key} holds {type(value).__name__}, not {kind.__name__}; the file was edited "
                     "or written by something else: delete it and run again to make its entries anew")


# model -> (what the digest was taken from: handle fields, parameters and their version counters; digest)
_IDENTITIES: weakref.WeakKeyDictionary[Any, tuple[tuple[Any, ...], list[Any], list[int], str]] = (
    weakref.WeakKeyDictionary())


def model_identity(lvlm: LVLM) -> str:
    """A digest of what makes the model caption the way it does: its name, revision, type and dtype, its
    image processor's settings, and every parameter's name, shape and 16 of its values (evenly spaced), so
    that weights changed under the same name (a re-trained local folder, an edit in place) are told apart
    without reading all of them. Asked once per call, it is remembered per model while none of the
    parameters it read is edited in place (``load_state_dict`` included: each tensor's version counter);
    walking the modules again per call would cost a tenth of a testbed answer. A parameter replaced by
    assignment (``module.weight = Parameter(...)``) is not seen: build a new handle for new weights."""
    handle = (lvlm.name, lvlm.revision, id(lvlm.processor), str(lvlm.model.dtype))
    known = _IDENTITIES.get(lvlm.model)
    if known is not None and known[0] == handle and all(p._version == v for p, v in zip(known[1], known[2])):
        return known[3]
    params = list(lvlm.model.parameters())
    versions = [p._version for p in params]
    h = hashlib.sha256(repr((lvlm.name, lvlm.revision, lvlm.adapter.model_type, str(lvlm.model.dtype))).encode())
    image_processor = getattr(lvlm.processor, "image_processor", None)
    if hasattr(image_processor, "to_dict"):
        h.update(json.dumps(image_processor.to_dict(), sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in lvlm.model.named_parameters():
            flat = p.detach().reshape(-1)
            # An offloaded weight (accelerate's device_map) waits on the meta device, with no values to read.
            sample = None if p.is_meta else flat[:: max(1, flat.numel() // 16)][:16].double().cpu().tolist()
            h.update(repr((name, tuple(p.shape), str(p.dtype), sample)).encode())
    _IDENTITIES[lvlm.model] = (handle, params, versions, h.hexdigest()[:16])
    return _IDENTITIES[lvlm.model][3]


# -- config --------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class MVPConfig(MethodConfig):
    """MVP's parameters (GasolSun36/MVP 8a96be3)."""

    w_bottom_up: float = param(0.4, (
        "Fusion weight of the bottom-up view (its caption prompt: pixel-level features and object detection); "
        "0 skips the view. Default 0.4 (source: eval/eval_pope.py --a)."), lo=0.0)
    w_top_down: float = param(0.4, (
        "Fusion weight of the top-down view (its caption prompt: scene, context, environment); 0 skips it. "
        "Default 0.4 (source: eval/eval_pope.py --b)."), lo=0.0)
    w_normal: float = param(0.2, (
        "Fusion weight of the normal view ('Describe this image in details.'); 0 skips it. Default 0.2 (source: "
        "eval/eval_pope.py --c)."), lo=0.0)
    w_question: float = param(0.0, (
        "Fusion weight of the question view: no caption, the question exactly as asked; 0 skips it. Default 0 "
        "(source: lvlm-fix; with the other weights 0, top_k 1 and greedy paths it is the plain greedy answer)."),
        lo=0.0)
    top_k: int = param(3, (
        "First tokens explored per view. Default 3 (source: MVP_llava.sh --topk 3; the parser's default is 5)."),
        lo=1)
    threshold: float = param(0.001, (
        "Smallest first-token probability that starts a path (the top-1 always does for a free-form answer). "
        "Default 0.001 (source: MVP_llava.sh --threshold)."), lo=0.0, hi=1.0)
    answer: Literal["auto", "yes_no", "free_form"] = param("auto", (
        "yes_no: the answer is Yes or No (POPE); free_form: the answer is a path's text; auto: yes_no when the "
        "question's first word is an auxiliary verb (is, are, does, can, ...). Default auto (source: lvlm-fix; the "
        "release handles yes/no questions only)."))
    unanswered: Literal["yes", "skip"] = param("yes", (
        "A yes/no path whose continuation says neither: yes adds its first-token probability to Yes, as the "
        "release does; skip adds nothing. Default yes (source: MVP/MVP_llava.py)."))
    certainty_from: Literal["raw", "warped"] = param("raw", (
        "Distribution of the certainty p_top1 - p_top2: raw = the model's softmax at temperature 1, warped = "
        "after the path's temperature / top-p, as the release reads output.scores. Default raw (source: "
        "lvlm-fix; the release's warped reading is its bug 2)."))
    lowercase_question: bool = param(True, (
        "Lower-case the question in the caption prompts. Default True (source: MVP/MVP_llava.py "
        "cur_prompt.lower())."))
    path_temperature: float = param(0.7, (
        "Sampling temperature of the path continuations; 0 is greedy. Default 0.7 (source: MVP_llava.sh "
        "--temperature)."), lo=0.0)
    path_top_p: float = param(1.0, (
        "Top-p of the path continuations. Default 1.0 (source: MVP_llava.sh --top_p)."), lo=0.0, hi=1.0, lo_open=True)
    path_max_new_tokens: int = param(50, (
        "Longest continuation of a yes/no path (a free-form path uses the call's max_new_tokens). Default 50 "
        "(source: MVP_llava.sh --max_new_tokens)."), lo=1)
    caption_temperature: float = param(0.7, (
        "Sampling temperature of the captions; 0 is greedy. Default 0.7 (source: caption.sh --temperature)."),
        lo=0.0)
    caption_top_p: float = param(0.95, (
        "Top-p of the captions. Default 0.95 (source: caption.sh --top_p)."), lo=0.0, hi=1.0, lo_open=True)
    caption_max_new_tokens: int = param(512, (
        "Longest caption, in tokens (cut further when the model's positions require). Default 512 (source: "
        "caption.sh --max_new_tokens)."), lo=1)
    sample_seed: int = param(336, (
        "Seed of the per-row random generators of captions and paths (a row's draws depend on it, its view, "
        "image, prompt and first token, not on the batch). Default 336 (source: caption.sh, MVP_llava.sh "
        "--seed)."), lo=0)

    def weights(self) -> dict[str, float]:
        """The views that run, in order, with their fusion weights."""
        all_ = {"bottom_up": self.w_bottom_up, "top_down": self.w_top_down, "normal": self.w_normal,
                QUESTION_VIEW: self.w_question}
        return {v: w for v, w in all_.items() if w > 0}

    @classmethod
    def noop(cls) -> MVPConfig:
        """No view: the call's own generate() answers the prompts as given."""
        return cls(w_bottom_up=0.0, w_top_down=0.0, w_normal=0.0, w_question=0.0)

    @classmethod
    def math_identity(cls) -> MVPConfig:
        """The question view alone, top-1, greedy free-form path: the pipeline runs and gives the greedy answer."""
        return cls(w_bottom_up=0.0, w_top_down=0.0, w_normal=0.0, w_question=1.0, top_k=1, path_temperature=0.0,
                   answer="free_form")


# -- generate() with per-row sampling, recording the distributions -----------------------------
class _Recorder:
    """A logits processor that records, per step, the top-``k`` probabilities and ids of the scores it sees
    (with ``k=0`` only the prompt: the captions need no distribution, and a step of a small model is
    mostly per-op dispatch, so the softmax, top-k and copies it would skip are a real share of it)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.values: list[Tensor] = []  # per step [rows, k]
        self.ids: list[Tensor] = []
        self.prompt: Tensor | None = None  # input_ids at the first step

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.prompt is None:
            self.prompt = input_ids.detach().cpu()
        if not self.k:
            return scores
        top = scores.float().softmax(-1).topk(self.k, dim=-1)
        self.values.append(top.values.cpu())
        self.ids.append(top.indices.cpu())
        return scores


class _ForceFirst:
    """At the first step, every row's only possible token is its own ``first`` id."""

    def __init__(self, first: list[int]) -> None:
        self.first = first
        self.done = False

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.done:
            return scores
        self.done = True
        ids = torch.tensor(self.first, device=scores.device)[:, None]
        return torch.full_like(scores, -float("inf")).scatter(1, ids, 0.0)


class _Gumbel:
    """Adds Gumbel noise from one generator per row: greedy argmax then draws from ``softmax(scores)``."""

    def __init__(self, seeds: list[int]) -> None:
        self.seeds = seeds
        self.generators: list[Any] | None = None

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.generators is None:
            self.generators = [torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds]
        u = torch.stack([torch.rand(scores.shape[-1], generator=g, device=scores.device) for g in self.generators])
        tiny = torch.finfo(u.dtype).tiny
        return scores + -torch.log(-torch.log(u.clamp(tiny, 1 - 1e-7)))


class _Chosen:
    """Records the token each row gets (the argmax of the final scores: generate() runs greedy)."""

    def __init__(self) -> None:
        self.steps: list[Tensor] = []

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        self.steps.append(scores.argmax(-1))  # on the device: copied once at the end, not per step
        return scores


@dataclass
class _Run:
    texts: list[str]
    report: dict[str, Any]  # the composed methods' reports (inner's)
    artifacts: dict[str, Any]
    tokens: list[list[int]]  # per row, its generated ids up to and including EOS
    raw: list[Tensor]  # per step [rows, top]: the top probabilities of the model's distribution
    raw_ids: list[Tensor]  # per step [rows, top]: their token ids
    warped: list[Tensor]  # per step [rows, 2], after temperature / top-p (the raw ones when greedy)
    cost: dict[str, int]


def _run(lvlm: LVLM, inner: Inner, images: list[Any], prompts: list[str], *, max_new_tokens: int,
         temperature: float, top_p: float, seeds: list[int], first: list[int] | None = None, top: int = 2) -> _Run:
    """One ``inner`` generate() with per-row sampling, recording what the pipeline needs (``top=0``: the
    texts and tokens only, no distribution)."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    raw, chosen = _Recorder(top), _Chosen()
    processors: list[Any] = [raw]
    warped = raw
    if temperature > 0:
        processors += [TemperatureLogitsWarper(temperature), TopPLogitsWarper(top_p)]
        if top:
            warped = _Recorder(2)
            processors.append(warped)
    if first is not None:
        processors.append(_ForceFirst(first))
    if temperature > 0:
        processors.append(_Gumbel(seeds))
    processors.append(chosen)
    gen = {"max_new_tokens": max_new_tokens, "do_sample": False, "num_beams": 1,
           "logits_processor": LogitsProcessorList(processors)}
    out = inner(images, prompts, gen)
    from ..model import eos_token_ids  # at run time: lvlm_fix.model imports torch

    eos = eos_token_ids(lvlm)
    ids = torch.stack(chosen.steps, 1).tolist() if chosen.steps else [[] for _ in prompts]  # one copy
    tokens = []
    for row in ids:
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        tokens.append(row[:end])
    pad = lvlm.tokenizer.pad_token_id
    prompt_tokens = int((raw.prompt != pad).sum()) if raw.prompt is not None and pad is not None else 0
    cost = {"rows": len(prompts), "forward_passes": len(chosen.steps), "prompt_tokens": prompt_tokens,
            "generated_tokens": sum(len(t) for t in tokens)}
    return _Run(out.texts, out.report, out.artifacts, tokens, raw.values, raw.ids, warped.values, cost)


# generate() arguments MVP reads (the answer budget) or replaces by its stages' own sampling; and
# arguments accepted at their plain value. Any other would be dropped silently, so it is refused.
_CALLER_SETTINGS = frozenset({"max_new_tokens", "do_sample", "temperature", "top_p", "top_k"})
_PLAIN = {"num_beams": 1, "num_return_sequences": 1, "use_cache": True}


# -- the intervention ----------------------------------------------------------------------------
@dataclass
class _Path:
    """One explored first token of one (row, view) prompt, and what its continuation said."""

    row: int  # question row
    view: int  # index into the running views
    prompt: int  # index into the (row, view) prompts
    token: int
    prob: float  # P(token) at the first position
    text: str = ""


@register_method
class MVP(Intervention):
    """MVP: captions from several views in context, top-k first-token paths, certainty-weighted fusion."""

    name = "mvp"
    stage = Stage.PIPELINE
    config_cls = MVPConfig
    config: MVPConfig
    # Captions kept beyond one call: the evaluation runner sets this, for the setting it runs, to a cache
    # (``get(key)`` / ``put({key: value})``, lvlm_fix.evals.store.RunCache) held across its batches and
    # stored in the setting's folder, so POPE's questions on one image share its captions, also on resume.
    run_cache: ClassVar[ContextVar[Any]] = ContextVar("lvlm_fix_mvp_run_cache", default=None)

    def __init__(self, config: MVPConfig | None = None) -> None:
        super().__init__(config)
        self._report: dict[str, Any] = {}

    @classmethod
    def prompts(cls) -> list[str]:
        return [*VIEW_PROMPTS.values(), ANSWER_TEMPLATE.format(caption="", question="")]

    def report(self) -> dict[str, Any]:
        return self._report

    def summarize(self, report: dict[str, Any]) -> str:
        if "cost" not in report:
            return report.get("answered", "")
        total, row = report["cost"]["total"], report["rows"][0]
        fused = ", ".join(f"{a}: {v:.3g}" for a, v in row["fused"].items())
        return (f"{len(report['views'])} views, {row['paths']} paths; fused scores {fused}; cost "
                f"{total['forward_passes']} forward passes, {total['generated_tokens']} generated tokens"
                + (f" (row 1 of {len(report['rows'])})" if len(report["rows"]) > 1 else ""))

    def generate(self, lvlm: LVLM, images: Any, prompts: Any, gen: dict[str, Any], inner: Inner, *,
                 system_prompt: str | None = None) -> Generation:
        """Answer each row through captions, first-token paths and fusion (plainly when no view runs)."""
        c = self.config
        views = c.weights()
        if not views:
            out = inner(images, prompts, gen)
            self._report = {"views": {}, "answered": "plainly (no view)"}
            out.report[self.name] = self._report
            return out
        self._refuse_generate_arguments(gen)
        rows = [self._single(im, r) for r, im in enumerate(images)]
        if len(rows) != len(prompts):
            raise InputError(f"got {len(rows)} images for {len(prompts)} prompts; give one image per prompt")
        names, weights = list(views), list(views.values())
        modes = [self._mode(p) for p in prompts]
        cost: dict[str, dict[str, int]] = {}

        captions = self._captions(lvlm, inner, rows, prompts, names, modes, gen, system_prompt, cost)
        asked = [self._asked(prompts[r], v, captions.get((r, v))) for r in range(len(rows)) for v in names]
        scores, paths, last = self._first_tokens(lvlm, inner, rows, asked, names, modes, cost)
        last = self._follow(lvlm, inner, rows, asked, names, modes, gen, scores, paths, cost) or last

        texts, row_reports = [], []
        for r in range(len(rows)):
            fused = fuse(scores[r], weights)
            if modes[r] == "yes_no":
                answer = "Yes" if fused.get(YES, 0.0) > fused.get(NO, 0.0) else "No"
            else:
                answer = self._free_form_text([p for p in paths if p.row == r], fused, weights)
            texts.append(answer)
            row_reports.append({
                "mode": modes[r], "answer": answer, "paths": sum(1 for p in paths if p.row == r),
                "fused": {a: round(v, 6) for a, v in sorted(fused.items(), key=lambda x: -x[1])[:5]},
                "views": {names[v]: {a: round(x, 6) for a, x in scores[r][v].items()} for v in range(len(names))},
            })
        total = {k: sum(stage[k] for stage in cost.values())
                 for k in ("forward_passes", "prompt_tokens", "generated_tokens")}
        self._report = {"views": dict(views), "top_k": c.top_k, "cost": {**cost, "total": total}, "rows": row_reports}
        caption_text = [{v: captions[(r, v)] for v in names if (r, v) in captions} for r in range(len(rows))]
        tokens = [len(lvlm.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        return Generation(texts=texts, report={**last.report, self.name: self._report},
                          artifacts={**last.artifacts, self.name: {"captions": caption_text}}, tokens=tokens)

    @staticmethod
    def _refuse_generate_arguments(gen: dict[str, Any]) -> None:
        """Refuse, before any forward, a ``generate()`` argument that would not reach MVP's own calls.

        They decode with MVP's settings (captions, first-token scores, paths): only the answer budget
        is the caller's. Sampling settings are accepted and unused, as MVP's stages sample on their own.
        """
        for key, value in gen.items():
            if key in _CALLER_SETTINGS or value is None or _PLAIN.get(key, object()) == value:
                continue
            raise ConfigError(f"mvp decodes its captions and paths with its own generate() settings, so it does not "
                              f"take {key}; drop it")

    def _first_tokens(self, lvlm: LVLM, inner: Inner, rows: list[Any], asked: list[str], names: list[str],
                      modes: list[str], cost: dict[str, dict[str, int]]):
        """One forward per (row, view): yes/no tokens of the top-k score at once; the others become paths.

        Returns:
            ``(scores, paths, generation)``: ``scores[row][view]`` maps answers to ``S_v``.
        """
        c = self.config
        run = _run(lvlm, inner, [rows[i // len(names)] for i in range(len(asked))], asked, max_new_tokens=1,
                   temperature=0.0, top_p=1.0, seeds=[], top=c.top_k)
        cost["scoring"] = run.cost
        probs, ids = run.raw[0], run.raw_ids[0]  # [rows x views, top_k]: P and its tokens, most likely first
        scores: list[list[dict[str, float]]] = [[{} for _ in names] for _ in rows]
        paths: list[_Path] = []
        for i in range(len(asked)):
            r, v = divmod(i, len(names))
            for j in range(c.top_k):
                tok, p = int(ids[i, j]), float(probs[i, j])
                word = yes_no_token(lvlm.tokenizer.decode([tok])) if modes[r] == "yes_no" else None
                if word is not None:
                    scores[r][v][word] = scores[r][v].get(word, 0.0) + p
                elif p >= c.threshold or (j == 0 and modes[r] == "free_form"):
                    paths.append(_Path(r, v, i, tok, p))
        return scores, paths, run

    def _follow(self, lvlm: LVLM, inner: Inner, rows: list[Any], asked: list[str], names: list[str],
                modes: list[str], gen: dict[str, Any], scores: list[list[dict[str, float]]], paths: list[_Path],
                cost: dict[str, dict[str, int]]) -> _Run | None:
        """Continue every path (one batched generate() per answer length) and add its vote to ``scores``."""
        c = self.config
        groups: dict[int, list[_Path]] = {}
        for p in paths:
            groups.setdefault(self._budget(modes[p.row], gen), []).append(p)
        run = None
        for budget, group in groups.items():
            seeds = [_seed(c.sample_seed, "path", names[p.view], _image_key(rows[p.row]), asked[p.prompt], p.token)
                     for p in group]
            run = _run(lvlm, inner, [rows[p.row] for p in group], [asked[p.prompt] for p in group],
                       max_new_tokens=budget, temperature=c.path_temperature, top_p=c.path_top_p, seeds=seeds,
                       first=[p.token for p in group])
            self._add_cost(cost, "paths", run.cost)
            dists = run.raw if c.certainty_from == "raw" else run.warped
            for k, p in enumerate(group):
                p.text = run.texts[k]
                sure = certainty(torch.stack([d[k] for d in dists])).tolist()  # p_top1 - p_top2 per step
                self._vote(lvlm, p, run.tokens[k], sure, modes[p.row], scores[p.row][p.view])
        return run

    def _vote(self, lvlm: LVLM, path: _Path, tokens: list[int], sure: list[float], mode: str,
              view_scores: dict[str, float]) -> None:
        """Add one path's certainty-weighted vote ``P(t) * certainty`` to its view's scores."""
        if mode == "yes_no":
            decode = lvlm.tokenizer.decode
            found = first_yes_no(decode(tokens, skip_special_tokens=True))
            if found is None:
                if self.config.unanswered == "yes":
                    view_scores[YES] = view_scores.get(YES, 0.0) + path.prob
                return
            word, start = found  # the step whose token holds the word's first character
            prefix_len = [len(decode(tokens[: i + 1], skip_special_tokens=True)) for i in range(len(tokens))]
            step = next((i for i, n in enumerate(prefix_len) if n > start), len(tokens) - 1)
            view_scores[word] = view_scores.get(word, 0.0) + path.prob * sure[step]
            return
        from ..model import eos_token_ids

        eos = eos_token_ids(lvlm)
        n = max(1, sum(1 for t in tokens if t not in eos))
        answer = normalize_answer(path.text)
        view_scores[answer] = view_scores.get(answer, 0.0) + path.prob * sum(sure[:n]) / n

    @staticmethod
    def _free_form_text(paths: list[_Path], fused: dict[str, float], weights: list[float]) -> str:
        """The text of the most probable (weighted) path whose normalised answer won the fusion."""
        if not fused:
            return ""
        best = max(fused, key=lambda a: fused[a])
        return max((p for p in paths if normalize_answer(p.text) == best), key=lambda p: weights[p.view] * p.prob).text

    # -- stages --------------------------------------------------------------------------------------
    def _captions(self, lvlm: LVLM, inner: Inner, rows: list[Any], prompts: list[str], names: list[str],
                  modes: list[str], gen: dict[str, Any], system_prompt: str | None,
                  cost: dict[str, dict[str, int]]) -> dict[tuple[int, str], str]:
        """Each distinct image captioned once per caption view: ``{(row, view): caption}``."""
        c = self.config
        caption_views = [v for v in names if v != QUESTION_VIEW]
        if not caption_views:
            return {}
        keys = [_image_key(im) for im in rows]
        unique: dict[tuple[str, str], int] = {}  # (image key, view) -> caption row
        cap_images, cap_prompts, seeds = [], [], []
        for r, key in enumerate(keys):
            for view in caption_views:
                if (key, view) not in unique:
                    unique[(key, view)] = len(cap_prompts)
                    cap_images.append(rows[r])
                    cap_prompts.append(VIEW_PROMPTS[view])
                    seeds.append(_seed(c.sample_seed, "caption", view, key))
        # The budget of the whole call, as if nothing were cached: a cached caption was made with it.
        budget = self._caption_budget(lvlm, rows, prompts, names, modes, gen, system_prompt, cap_images, cap_prompts)
        texts: list[str | None] = [None] * len(cap_prompts)
        cache, cache_keys = self.run_cache.get(), []
        if cache is not None:
            cache_keys = self._caption_keys(lvlm, [k for k, _ in unique], [v for _, v in unique], budget, system_prompt)
            texts = [_cached(cache, k, str) for k in cache_keys]
        todo = [i for i, t in enumerate(texts) if t is None]
        cost["captions"] = {"rows": 0, "forward_passes": 0, "prompt_tokens": 0, "generated_tokens": 0}
        if todo:  # per-row sampling: the captions still to make come out as they would in the whole batch
            run = _run(lvlm, inner, [cap_images[i] for i in todo], [cap_prompts[i] for i in todo],
                       max_new_tokens=budget, temperature=c.caption_temperature, top_p=c.caption_top_p,
                       seeds=[seeds[i] for i in todo], top=0)
            cost["captions"] = run.cost
            for i, text in zip(todo, run.texts):
                texts[i] = text
            if cache is not None:
                cache.put({cache_keys[i]: texts[i] for i in todo})
        cost["captions"]["reused"] = len(cap_prompts) - len(todo)
        return {(r, view): texts[unique[(keys[r], view)]] for r in range(len(rows)) for view in caption_views}

    def _caption_keys(self, lvlm: LVLM, images: list[str], views: list[str], budget: int,
                      system_prompt: str | None) -> list[str]:
        """One key per caption naming everything that makes it: the image's content, the view's prompt as the
        model reads it (chat template and system prompt), the caption's sampling and length, the seed, the
        model (:func:`model_identity`) and its generation defaults (``generation_config``: a repetition penalty
        or an end token set there reaches the caption calls, and can change without the weights). The methods
        composed after MVP are the run's setting: its folder."""
        c = self.config
        defaults = lvlm.model.generation_config.to_json_string(use_diff=True)
        settings = (model_identity(lvlm), defaults, c.sample_seed, c.caption_temperature, c.caption_top_p, budget)
        built = {v: lvlm.build_prompt(VIEW_PROMPTS[v], system_prompt=system_prompt) for v in set(views)}
        return ["caption-" + hashlib.sha256(repr((*settings, image, built[view])).encode()).hexdigest()[:24]
                for image, view in zip(images, views)]

    def _caption_budget(self, lvlm: LVLM, rows: list[Any], prompts: list[str], names: list[str], modes: list[str],
                        gen: dict[str, Any], system_prompt: str | None, cap_images: list[Any],
                        cap_prompts: list[str]) -> int:
        """``caption_max_new_tokens``, lowered so that the captions and the prompts holding them fit the positions."""
        c = self.config
        limit = getattr(lvlm.text_config, "max_position_embeddings", None)
        if not limit:
            return c.caption_max_new_tokens
        caption_width = self._width(lvlm, cap_images, cap_prompts, system_prompt)
        scaffold = self._width(lvlm, [rows[r] for r in range(len(rows)) for _ in names],
                               [self._asked(prompts[r], v, "") for r in range(len(rows)) for v in names], system_prompt)
        answer_tokens = max(self._budget(m, gen) for m in modes)
        slack = 4  # a caption may re-tokenise a little longer inside the question's prompt
        budget = min(c.caption_max_new_tokens, limit - caption_width, limit - scaffold - answer_tokens - slack)
        if budget < 1:
            raise InputError(f"mvp: the caption prompts need {max(caption_width, scaffold + answer_tokens)} of the "
                             f"model's {limit} positions, leaving no room for a caption; lower max_new_tokens or "
                             "path_max_new_tokens, or use a model with more positions")
        return budget

    def _width(self, lvlm: LVLM, images: list[Any], prompts: list[str], system_prompt: str | None) -> int:
        """The width ``lvlm.encode`` gives these rows (the longest row), encoding each distinct (image, prompt)
        once, and, with a run cache, once per run: the caption views' rows are one image under three prompts,
        and the scaffold rows of the caption views are one text."""
        cache, identity = self.run_cache.get(), None
        lengths: dict[tuple[str, str], int] = {}
        todo: dict[tuple[str, str], tuple[Any, str | None]] = {}
        for image, prompt in zip(images, prompts):
            pair = (_image_key(image), prompt)
            if pair in lengths or pair in todo:
                continue
            key = None
            if cache is not None:
                identity = identity or model_identity(lvlm)
                key = "width-" + hashlib.sha256(repr((identity, *pair, system_prompt)).encode()).hexdigest()[:24]
                if (n := _cached(cache, key, int)) is not None:
                    lengths[pair] = n
                    continue
            todo[pair] = (image, key)
        if todo:
            mask = lvlm.encode([im for im, _ in todo.values()], [p for _, p in todo], system_prompt=system_prompt)[
                "attention_mask"]
            for (pair, (_, key)), n in zip(todo.items(), mask.sum(1).tolist()):
                lengths[pair] = int(n)
            if cache is not None:
                cache.put({key: lengths[pair] for pair, (_, key) in todo.items()})
        return max(lengths.values())

    def _asked(self, question: str, view: str, caption: str | None) -> str:
        if view == QUESTION_VIEW:
            return question
        q = question.lower() if self.config.lowercase_question else question
        return ANSWER_TEMPLATE.format(caption=caption or "", question=q)

    def _mode(self, question: str) -> str:
        a = self.config.answer
        if a == "auto":
            return "yes_no" if is_yes_no_question(question) else "free_form"
        return a

    def _budget(self, mode: str, gen: dict[str, Any]) -> int:
        return self.config.path_max_new_tokens if mode == "yes_no" else int(gen.get("max_new_tokens") or 64)

    @staticmethod
    def _add_cost(cost: dict[str, dict[str, int]], stage: str, add: dict[str, int]) -> None:
        into = cost.setdefault(stage, {k: 0 for k in add})
        for k, v in add.items():
            into[k] += v

    @staticmethod
    def _single(image: Any, row: int) -> Any:
        if isinstance(image, (list, tuple)):
            if len(image) != 1:
                raise InputError(f"mvp captions one image per row; row {row} has {len(image)}")
            image = image[0]
        if not hasattr(image, "tobytes"):
            raise InputError(f"row {row}: mvp needs a PIL image, got {type(image).__name__}")
        return image
