"""VTI: Visual and Textual Intervention (Liu, Ye, Zou, ICLR 2025, arXiv 2410.15778).

VTI steers the latent features of an LVLM along directions fitted offline, at no extra forward:

* **Textual direction** ``d_t^l`` (one ``[D]`` vector per decoder layer): for each calibration demo
  (an image, a question, a faithful caption and a hallucinated one), the prompt followed by each
  caption is run with the clean image; the last token's hidden states of every depth
  (``hidden_states[0..L]``, the model's own, the last one after the final norm) give ``H+`` and
  ``H-``; ``delta = vec(H+ - H-)``, one vector per demo. Its rank-1 PCA gives ``d = mean + u_1``
  (``u_1`` the unit first principal axis of the centred deltas, signed by svd_flip: the largest-|.|
  entry of the first left-singular vector is positive), and ``d_t^l = d[l + 1]``.
* **Visual direction** ``d_v^l`` (``[T, D_v]`` per ViT layer, one row per vision token, CLS included):
  per demo, ``num_trials`` copies of the processed pixels with ``int(mask_ratio * patches)`` random
  patches set to the image's per-channel mean; ``delta`` = the tower's hidden states (every depth,
  every token) averaged over the masked copies minus those of the clean image (toward the
  "stable", trial-averaged features). Rank-1 PCA per vision token over the demos, ``mean + u_1``.
* **Steering.** Every MLP output ``m`` of the text decoder and of the vision tower (every position,
  every forward, prefill and decode)::

      m' = ||m|| * normalize( normalize(m) + step * alpha * normalize(d^l) )

  per position (vision: per token, with that token's direction row), ``alpha = alpha_text`` in the
  decoder and ``alpha_image`` in the tower, ``step = 0.1`` (hard-coded in the release). The edit is
  position-wise and does not depend on the step, so the KV cache is exact (the release decodes
  with ``use_cache=False``; the tokens are the same).

The directions come from ``lvlm-fix calibrate --method vti`` (the file that ``directions_file``
reads back; its format is in ``lvlm_fix/interventions/vti_calibration.py``), or from a calibration on
the caption pairs of ``demos`` at the first use on the model, kept in memory for the process: the
flow of the release's runner, which fits its directions at the start of every run. The testbed
calibrates so on its own synthetic pairs when given neither; another model given neither is refused
in one line. Calibration with ``alpha_image > 0`` installs the visual
steering before the text pass, as the release does: the textual direction is fitted on the
vision-steered model.

Defaults (shengliu66/VTI ``bb5dfee``): ``alpha_text = alpha_image = 0.9`` and 70 demos (the README's
command; the runner's parser defaults are 0.8, 0 and 50), 50 masked trials at mask ratio 0.99, seed
42, step 0.1, rank 1.

Differences from the release, all deliberate:

* **Vision PCA grouping** (release bug): the release reshapes each demo's ``[L_v+1, T, D_v]`` delta
  to ``[T, -1]``, which groups consecutive (layer, token) vectors in layer-major order, so its
  per-"token" PCA mixes tokens and layers (the mean part maps back correctly, only ``u_1`` is
  scrambled). lvlm-fix runs one PCA per vision token over the concatenation of its layers.
* **Vision layer alignment**: the release gives ViT layer ``l`` the delta of ``hidden_states[l]``
  (the stream entering the layer, ``[:-1]``) while the decoder's layer ``l`` gets
  ``hidden_states[l + 1]`` (its output, ``[1:]``). lvlm-fix gives both the layer's output.
  ``release_compat=true`` brings back both release behaviours (scrambled grouping, entering stream)
  for the numbers as published.
* Each demo's prompt uses its own question (the release builds every pair with the last demo's
  question; its demo file has one question for all) and the caption follows the prompt after one
  space (the release appends it without a separator).
* The masks come from a private generator seeded with ``calibration_seed`` (calibrate: ``--option seed=N``) (the release draws them from the
  global RNG, so its directions depend on what ran before); demos are drawn with
  ``random.Random(seed).sample``, the release's draw after ``set_seed``.
* The trial average and the PCA run in fp32; the steered output keeps the model's dtype (the
  release returns ``.half()``, casting bf16 to fp16 and breaking fp32).
* Pixels come from the model's own processor (the release uses the CLIP image processor's resize and
  centre crop, which is what llava-hf's processor does).

Batches: the edit is per position, so left padding and variable image positions need nothing.
Greedy, sampling and beams all run. A tower whose token count differs from the directions' (dynamic
resolution, several crops) is refused with one line when ``alpha_image > 0``.
"""

from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._lazy import torch
from ..errors import ConfigError, LvlmFixError
from .base import Intervention, MethodConfig, Stage, param
from .calibration import Calibration
from .registry import register_method
from .vti_calibration import (
    calibrate_vti,
    check_directions,
    load_demos,
    read_directions,
    steer_toward,
    unit,
    write_directions,
)

if TYPE_CHECKING:
    from torch import Tensor

    from ..hooks.capture import HookSet
    from ..hooks.plan import AttnContext, Plan
    from ..model import LVLM

__all__ = ["Vti", "VtiConfig"]


# -- config --------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class VtiConfig(MethodConfig):
    """VTI's parameters (shengliu66/VTI bb5dfee)."""

    alpha_text: float = param(0.9, (
        "Strength of the textual steering in every decoder layer's MLP output (times step). 0 turns it off. "
        "Default 0.9 (source: README command --alpha_text 0.9; run_mmhal_vti.py's parser default is 0.8)."), lo=0.0)
    alpha_image: float = param(0.9, (
        "Strength of the visual steering in every vision-tower layer's MLP output (times step). 0 turns it off. "
        "Default 0.9 (source: README command --alpha_image 0.9; the parser default is 0, off)."), lo=0.0)
    step: float = param(0.1, (
        "Factor on alpha: the steered output is ||m|| normalize(normalize(m) + step alpha normalize(d)). Default "
        "0.1 (source: vti_utils/llm_layers.py, hard-coded)."), lo=0.0)
    directions_file: str | None = param(None, (
        "Directions file written by `lvlm-fix calibrate --method vti` (checked against the model: layers, widths, "
        "vision tokens). Default None: give it or demos; the testbed without either calibrates on its synthetic pairs (source: "
        "lvlm-fix; the release fits its directions at the start of each run)."))
    demos: str | None = param(None, (
        "Caption pairs (jsonl: image, question, value, h_value; images relative to the file's folder) to "
        "calibrate on at first use instead of a directions_file, with the settings below; the directions are "
        "kept in memory for the model for the process. Default None (source: the release's runner, which "
        "calibrates on its demo file at the start of each run)."))
    num_demos: int = param(70, (
        "Demos drawn from the demos file for the in-memory calibration. Default 70 (source: README "
        "--num_demos 70; parser default 50)."), lo=1)
    num_trials: int = param(50, (
        "Masked copies of each demo's image averaged for the visual direction (in-memory calibration). "
        "Default 50 (source: run_mmhal_vti.py --num_trials)."), lo=1)
    mask_ratio: float = param(0.99, (
        "Fraction of the patches of each masked copy set to the image's per-channel mean (in-memory "
        "calibration). Default 0.99 (source: run_mmhal_vti.py --mask_ratio)."), lo=0.0, hi=1.0)
    calibration_seed: int = param(42, (
        "Seed of the demo draw and of the masks (in-memory calibration). Default 42 (source: "
        "run_mmhal_vti.py --seed)."), lo=0)
    release_compat: bool = param(False, (
        "Calibrate as the release does (in-memory calibration): its vision PCA grouping (consecutive "
        "(layer, token) vectors) and ViT layer l steered with the delta of the stream entering it. Default False: "
        "one PCA per vision token, each layer its output's delta (source: lvlm-fix fix of the release)."))

    def validate(self) -> None:
        for field in ("directions_file", "demos"):
            path = getattr(self, field)
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"vti: {field}={path} is not a file; write directions with `lvlm-fix calibrate "
                                  "--method vti --out FILE`, or give demos=FILE.jsonl of caption pairs")
        if self.directions_file is not None and self.demos is not None:
            raise ConfigError("vti: give directions_file (calibrated offline) or demos (calibrated at first use), "
                              "not both")

    @classmethod
    def noop(cls) -> VtiConfig:
        """Both strengths 0: no hook is installed."""
        return cls(alpha_text=0.0, alpha_image=0.0)

    @classmethod
    def math_identity(cls) -> VtiConfig:
        """``step = 0``: every MLP output is renormalised and rescaled to its own norm (``m`` within rounding)."""
        return cls(step=0.0)


# -- directions calibrated at first use, kept per model ------------------------------------------------
# The testbed's own caption pairs (lvlm_fix/testbed/caption_pairs.py wrote them): its default calibration set.
TESTBED_DEMOS = Path(__file__).resolve().parents[1] / "testbed" / "caption_pairs_data" / "demos.jsonl"


def _default_model() -> str:
    from ..model import DEFAULT_MODEL  # not at import: lvlm-fix list and --help import no torch

    return DEFAULT_MODEL


_MEMORY: weakref.WeakKeyDictionary[Any, dict[tuple, dict[str, Any]]] = weakref.WeakKeyDictionary()


def _calibrated(lvlm: LVLM, config: VtiConfig, demos: str | Path | None = None) -> dict[str, Any]:
    """The directions of an in-memory calibration on ``demos`` (default ``config.demos``), once per model, file
    content and settings."""
    c = config
    demos = Path(demos or c.demos)
    digest = hashlib.sha256(demos.read_bytes()).hexdigest()
    key = (digest, str(demos.resolve()), c.num_demos, c.num_trials, c.mask_ratio, c.calibration_seed,
           c.release_compat, c.step, c.alpha_image)
    per_model = _MEMORY.setdefault(lvlm.model, {})
    if key not in per_model:
        samples, dataset = load_demos(demos)
        per_model[key] = calibrate_vti(lvlm, samples, limit=min(c.num_demos, len(samples)), dataset=dataset,
                                       num_trials=c.num_trials, mask_ratio=c.mask_ratio, seed=c.calibration_seed,
                                       release_compat=c.release_compat, alpha_image=c.alpha_image, step=c.step,
                                       vision=c.alpha_image > 0)
    return per_model[key]


# -- the method ------------------------------------------------------------------------------------
@register_method
class Vti(Intervention):
    """VTI: every MLP output of the decoder and of the vision tower steered toward calibrated directions."""

    name = "vti"
    stage = Stage.MLP_OUTPUTS
    config_cls = VtiConfig
    config: VtiConfig

    def __init__(self, config: VtiConfig | None = None) -> None:
        super().__init__(config)
        self._text: Tensor | None = None  # [L, D] unit directions
        self._vision: Tensor | None = None  # [L_v, T, D_v] unit directions
        self._vision_layers: list[int] = []
        self._meta: dict[str, Any] = {}
        self._edits = {"text": 0, "vision": 0}

    def bind(self, lvlm: LVLM) -> None:
        c = self.config
        self._edits = {"text": 0, "vision": 0}
        self._text = self._vision = None
        self._vision_layers = []
        self.mlp_layers = frozenset()
        if c.alpha_text == 0 and c.alpha_image == 0:
            return
        if c.step == 0:  # the edit is the identity: no direction is needed (math_identity)
            doc = {"text": torch.zeros(lvlm.num_layers, lvlm.hidden_size), "vision": None, "meta": {}}
        elif c.directions_file is not None:
            doc = read_directions(c.directions_file)
        elif c.demos is not None:
            doc = _calibrated(lvlm, c)
        elif lvlm.name == _default_model():  # the testbed calibrates on its own synthetic caption pairs
            doc = _calibrated(lvlm, c, TESTBED_DEMOS)
        else:
            raise ConfigError("vti needs directions: write them with `lvlm-fix calibrate --method vti --out FILE` "
                              "and pass directions_file=FILE, or give demos=FILE.jsonl of caption pairs")
        if c.step != 0:
            check_directions(doc, lvlm, c.directions_file, vision=c.alpha_image > 0)
        self._meta = doc["meta"]
        device = lvlm.device
        # Each layer's push, step * alpha * normalize(d), is computed once here, not at every forward.
        if c.alpha_text > 0:
            self._text = (c.step * c.alpha_text * unit(doc["text"])).to(device)
            self.mlp_layers = frozenset(range(lvlm.num_layers))
        if c.alpha_image > 0:
            self._vision_layers = list(range(len(lvlm.vision_layers)))
            if doc["vision"] is not None:
                self._vision = (c.step * c.alpha_image * unit(doc["vision"])).to(device)

    def mlp_output(self, out: Tensor, x: Tensor, ctx: AttnContext) -> Tensor:
        self._edits["text"] += 1
        return steer_toward(out, self._text[ctx.layer])

    def install(self, plan: Plan, hooks: HookSet) -> None:
        """Forward hooks on each vision-tower layer's MLP (the tower runs once per prefill)."""
        for i in self._vision_layers:
            hooks.forward(plan.lvlm.vision_mlp(i), self._vision_hook(plan, i))

    def _vision_hook(self, plan: Plan, layer: int):
        def hook(module: Any, args: tuple, output: Tensor) -> Tensor | None:
            if not plan.is_current():  # another stream's or plan's tower pass
                return None
            return self.steer_vision(output, layer)

        return hook

    def steer_vision(self, output: Tensor, layer: int) -> Tensor:
        """One vision layer's MLP output ``[images, T, D_v]`` steered with that layer's per-token pushes."""
        self._edits["vision"] += 1
        if self._vision is None:  # step = 0: the identity, with the math in the path
            return steer_toward(output, torch.zeros((), device=output.device))
        push = self._vision[layer]
        if output.shape[-2] != push.shape[0]:
            raise LvlmFixError(f"vti: the vision tower gives {output.shape[-2]} tokens per image but the directions "
                               f"hold {push.shape[0]} (a tower of another resolution or crop layout); "
                               "calibrate for this input layout or set alpha_image=0")
        return steer_toward(output, push)

    def report(self) -> dict[str, Any]:
        c = self.config
        out: dict[str, Any] = {"alpha_text": c.alpha_text, "alpha_image": c.alpha_image, "step": c.step,
                               "text_layers": sorted(self.mlp_layers), "vision_layers": self._vision_layers,
                               "edited_forwards": dict(self._edits)}
        if self._meta:
            out["directions"] = {k: self._meta[k] for k in ("source", "model", "num_demos", "num_trials", "mask_ratio",
                                                            "seed", "grouping", "alpha_image") if k in self._meta}
        return out


# -- the offline calibration `lvlm-fix calibrate --method vti` runs ----------------------------------
def _run(lvlm: LVLM, samples: list[Any], *, limit: int, dataset: dict[str, Any] | None = None,
         **options: Any) -> dict[str, Any]:
    return calibrate_vti(lvlm, samples, limit=limit, dataset=dataset, **options)


def _load(data: dict[str, Any], limit: int) -> tuple[list[Any], dict[str, Any]]:
    return load_demos(data["demos"], data.get("image_dir"))


Vti.calibration = Calibration(
    what="the textual and visual steering directions, from faithful/hallucinated caption pairs (--demos jsonl, "
         "--image-dir; default: the testbed's synthetic pairs) and masked image copies",
    run=_run, write=write_directions, reads_back="directions_file", bench="caption_pairs", limit=70, load=_load,
    options={"num_trials": int, "mask_ratio": float, "seed": int, "alpha_image": float, "step": float,
             "release_compat": bool})
