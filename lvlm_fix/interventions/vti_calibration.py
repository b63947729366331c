"""VTI's calibration: caption pairs and masked images in, steering directions out.

**Demo file** (``lvlm-fix calibrate --method vti --demos FILE --image-dir DIR``): one JSON object per
line with ``image`` (a file name under ``DIR``), ``question`` (the user turn, e.g. "Describe this
image in detail."), ``value`` (a faithful caption of the image) and ``h_value`` (the same caption
with hallucinated content). The release's own demo file (``hallucination_vti_demos.jsonl``, 100
COCO train2014 images) has this format; it ships without a licence, so point the command at your
own copy. Without ``--demos`` the command uses built-in synthetic pairs: scenes of the testbed's
world (world seed 1, a stream of their own), each with its canonical caption and the same caption
naming one more, absent object.

**Directions file** (``torch.save``, read back with ``weights_only=True``)::

    {"format": "lvlm-fix/vti-directions/1",
     "text":   [L, D] fp32            # d_t^l, one per decoder layer (None when not computed)
     "vision": [L_v, T, D_v] fp32     # d_v^l per ViT layer and vision token (None when the tower is not steerable)
     "meta":   {model, model_type, num_layers, hidden_size, vision_layers, vision_tokens, vision_hidden_size,
                num_demos, num_trials, mask_ratio, seed, grouping, alpha_image, step, pixels, dataset, ...}}
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._lazy import torch
from ..errors import ConfigError, InputError, LvlmFixError

if TYPE_CHECKING:
    from torch import Tensor

    from ..model import LVLM

__all__ = ["FORMAT", "calibrate_vti", "check_directions", "load_demos", "mask_copies", "pca_direction",
           "read_directions", "steer", "steer_toward", "text_direction", "unit", "vision_direction", "write_directions"]

FORMAT = "lvlm-fix/vti-directions/1"
_VISION_CHUNK = 16  # masked copies per tower forward


# -- the math (pure) -------------------------------------------------------------------------------
def unit(x: Tensor) -> Tensor:
    """``x / max(||x||, 1e-12)`` along the last axis, in fp32 (the release's ``F.normalize``)."""
    return torch.nn.functional.normalize(x.float(), dim=-1)


def steer(out: Tensor, direction: Tensor, strength: float) -> Tensor:
    """``||m|| * normalize(normalize(m) + strength * normalize(d))`` per position, in ``out``'s dtype.

    Args:
        out: MLP outputs ``[..., D]``.
        direction: ``[D]`` or any shape broadcastable to ``out`` (a vision layer's ``[T, D]``); it is
            normalised along its last axis here.
        strength: ``step * alpha``.
    """
    return steer_toward(out, strength * unit(direction.to(out.device)))


def steer_toward(out: Tensor, push: Tensor) -> Tensor:
    """:func:`steer` with ``push = strength * normalize(d)`` computed once: ``||m|| * normalize(m / ||m|| + push)``.

    The hot path of every MLP output, in as few tensor ops as it takes (fp32; the ``1e-12`` floors are
    ``F.normalize``'s: an all-zero output stays zero up to 1e-12).
    """
    m = out.float()
    norm = torch.linalg.vector_norm(m, dim=-1, keepdim=True).clamp_min_(1e-12)
    turned = torch.addcdiv(push, m, norm)  # normalize(m) + push
    turned *= norm.div_(torch.linalg.vector_norm(turned, dim=-1, keepdim=True).clamp_min_(1e-12))
    return turned.to(out.dtype)


def pca_direction(deltas: Tensor) -> tuple[Tensor, Tensor]:
    """Rank-1 PCA of each group of vectors: ``(mean, u_1)``, the direction being ``mean + u_1``.

    Args:
        deltas: ``[groups, n, F]`` (``n`` samples per group) or ``[n, F]`` (one group).

    Returns:
        ``mean`` and ``u_1`` (``[groups, F]``, or ``[F]`` for one group): ``u_1`` is the first right-singular
        vector of the centred samples (unit norm), with svd_flip's sign: the entry of largest magnitude
        of the matching left-singular vector is positive.
    """
    x = deltas.float()
    single = x.dim() == 2
    if single:
        x = x[None]
    mean = x.mean(1)
    u, _, vh = torch.linalg.svd(x - mean[:, None], full_matrices=False)
    first = u[..., 0]  # [groups, n]
    sign = torch.sign(first.gather(1, first.abs().argmax(1, keepdim=True)))  # [groups, 1]
    u1 = vh[:, 0] * sign
    return (mean[0], u1[0]) if single else (mean, u1)


# -- data ------------------------------------------------------------------------------------------
def load_demos(path: str | Path, image_dir: str | Path | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The demos of a jsonl file (see the module docstring), images read lazily from ``image_dir``
    (default: the file's own folder)."""
    p = Path(path)
    root = p.parent if image_dir is None else Path(image_dir)
    if not p.is_file():
        raise InputError(f"demos file {p} is not a file; give a jsonl of caption pairs")
    if not root.is_dir():
        raise InputError(f"--image-dir {root} is not a folder")
    raw = p.read_bytes()
    demos = []
    for n, line in enumerate(raw.decode().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{p} line {n} is not JSON ({e.msg})") from None
        missing = [k for k in ("image", "question", "value", "h_value") if not isinstance(row.get(k), str)]
        if missing:
            raise InputError(f"{p} line {n} has no {', '.join(missing)}; each line needs image, question, value "
                             "(faithful caption) and h_value (hallucinated caption)")
        demos.append({"id": row["image"], "image": root / row["image"], "question": row["question"],
                      "value": row["value"], "h_value": row["h_value"]})
    if not demos:
        raise InputError(f"{p} holds no caption pair")
    return demos, {"id": str(p), "sha256": hashlib.sha256(raw).hexdigest(), "size": len(demos),
                   "image_dir": str(root)}


# -- the visual side -------------------------------------------------------------------------------
def mask_copies(pixels: Tensor, patch: int, indices: list[Tensor]) -> Tensor:
    """Copies of ``pixels`` (``[C, H, W]``), copy ``i`` with the patches ``indices[i]`` set to the per-channel mean.

    Patch ``k`` is row ``k // (W // patch)``, column ``k % (W // patch)`` of the grid (the release's mask).
    """
    mean = pixels.mean(dim=(1, 2))  # over the whole image, per channel
    c, h, w = pixels.shape
    rows, cols = h // patch, w // patch
    chosen = torch.zeros(len(indices), rows * cols, dtype=torch.bool)
    for i, idx in enumerate(indices):
        chosen[i, idx] = True
    # patch grid -> pixels (a ragged border beyond the last whole patch is never masked, as in the release)
    grid = chosen.view(-1, rows, cols).repeat_interleave(patch, 1).repeat_interleave(patch, 2)
    covered = torch.zeros(len(indices), h, w, dtype=torch.bool)
    covered[:, : rows * patch, : cols * patch] = grid
    return torch.where(covered[:, None], mean[None, :, None, None], pixels[None])


def vision_direction(masked: Tensor, clean: Tensor, release_compat: bool = False) -> Tensor:
    """The visual direction ``[L_v + 1, T, D_v]`` from per-demo trial-averaged and clean tower states.

    Args:
        masked, clean: ``[N, L_v + 1, T, D_v]`` hidden states of every depth (index 0: the stream entering
            layer 0).
        release_compat: group as the release does (each demo's delta reshaped to ``[T, -1]``: consecutive
            (layer, token) vectors); else one PCA per vision token over its layers.
    """
    delta = (masked.float() - clean.float())  # toward the trial-averaged features
    n, depth, tokens, width = delta.shape
    if release_compat:
        groups = delta.reshape(n, tokens, -1).transpose(0, 1)  # [T, N, (L+1) D], the release's grouping
    else:
        groups = delta.permute(2, 0, 1, 3).reshape(tokens, n, -1)  # token t: its vectors of every layer
    mean, u1 = pca_direction(groups)
    direction = mean + u1  # [T, F]
    if release_compat:
        return direction.reshape(depth, tokens, width)  # inverts the release's view
    return direction.reshape(tokens, depth, width).transpose(0, 1).contiguous()


def text_direction(positive: Tensor, negative: Tensor) -> Tensor:
    """The textual direction ``[L + 1, D]``: rank-1 PCA (mean + u_1) of the per-demo ``vec(H+ - H-)``."""
    n, depth, width = positive.shape
    mean, u1 = pca_direction((positive.float() - negative.float()).reshape(n, -1))
    return (mean + u1).reshape(depth, width)


class _TowerStates:
    """Hooks that read every depth of the vision tower: the stream entering layer 0 and each layer's output."""

    def __init__(self, lvlm: LVLM) -> None:
        self.layers = lvlm.vision_layers
        self.states: list[Tensor] = []

    def __enter__(self) -> _TowerStates:
        def first(module: Any, args: tuple, kwargs: dict) -> None:
            self.states = [(args[0] if args else kwargs["hidden_states"]).float()]

        def each(module: Any, args: tuple, output: Any) -> None:
            self.states.append((output[0] if isinstance(output, tuple) else output).float())

        self._handles = [self.layers[0].register_forward_pre_hook(first, with_kwargs=True)]
        self._handles += [layer.register_forward_hook(each) for layer in self.layers]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()

    def take(self) -> Tensor:
        """``[images, L_v + 1, T, D_v]`` of the last tower forward."""
        out = torch.stack(self.states, dim=1)
        self.states = []
        return out


def _tower_states(lvlm: LVLM, reader: _TowerStates, pixels: Tensor) -> Tensor:
    tower = lvlm.vision_tower
    dtype = next(tower.parameters()).dtype
    tower(pixel_values=pixels.to(lvlm.device, dtype))
    states = reader.take()
    if states.shape[1] != len(reader.layers) + 1 or states.dim() != 4:
        raise LvlmFixError(f"vti could not read the {len(reader.layers)} layers of the vision tower "
                           f"({type(tower).__name__}) as [images, tokens, width] states")
    return states.cpu()


# -- the whole calibration -------------------------------------------------------------------------
def _inputs(lvlm: LVLM, image: Any, question: str, caption: str) -> Any:
    """One row: the model's prompt for ``question`` with the image, then the caption as the answer."""
    processor = lvlm.require_processor("calibrating vti")
    text = lvlm.build_prompt(question, 1) + " " + caption  # the caption as the answer the model would write
    images = [[image]] if lvlm.adapter.nested_images else [image]
    return processor(images=images, text=[text], return_tensors="pt").to(lvlm.device)


def _last_token_states(lvlm: LVLM, inputs: Any) -> Tensor:
    """The last token's ``hidden_states[0..L]`` as transformers returns them: the stream entering each layer,
    then the final norm's output, read by hooks of our own (``output_hidden_states`` would leave
    transformers' capture hooks on the model)."""
    states: list[Tensor] = []

    def entering(module: Any, args: tuple, kwargs: dict) -> None:
        states.append((args[0] if args else kwargs["hidden_states"])[0, -1].float())

    def final(module: Any, args: tuple, output: Any) -> None:
        states.append((output[0] if isinstance(output, tuple) else output)[0, -1].float())

    handles = [layer.register_forward_pre_hook(entering, with_kwargs=True) for layer in lvlm.text_layers]
    handles.append(lvlm.final_norm.register_forward_hook(final))
    try:
        lvlm.model(**inputs, use_cache=False, return_dict=True)
    finally:
        for h in handles:
            h.remove()
    if len(states) != lvlm.num_layers + 1:
        raise LvlmFixError(f"vti read {len(states)} hidden states of the decoder's {lvlm.num_layers} layers; it needs "
                           "the stream entering each layer and the final norm's output once per forward")
    return torch.stack(states).cpu()  # [L + 1, D]


def calibrate_vti(lvlm: LVLM, samples: list[Any], *, limit: int, dataset: dict[str, Any] | None = None,
                  num_trials: int = 50, mask_ratio: float = 0.99, seed: int = 42, alpha_image: float = 0.9,
                  step: float = 0.1, release_compat: bool = False, vision: bool = True,
                  mask_indices: list[list[Tensor]] | None = None) -> dict[str, Any]:
    """VTI's directions from caption pairs (the release's protocol).

    1. ``random.Random(seed).sample(samples, limit)`` demos;
    2. visual: per demo ``num_trials`` masked copies (``int(mask_ratio * patches)`` patches each, drawn by
       ``torch.randperm`` from a generator seeded with ``seed``, demo by demo, trial by trial), the tower's
       states averaged over them, minus the clean image's; :func:`vision_direction`;
    3. with ``alpha_image > 0`` the visual steering is installed, then textual: per demo the last token's
       hidden states of prompt + faithful caption and prompt + hallucinated caption, with the clean image;
       :func:`text_direction`.

    Args:
        vision: compute the visual direction (the in-memory calibration skips it when ``alpha_image = 0``);
            it is skipped, and left None, for a processor whose pixels are not one ``[3, H, W]`` image per row
            unless ``alpha_image > 0`` asks for it (then refused).
        mask_indices: the masked patches per demo and trial (tests inject them); default drawn as above.

    Returns:
        ``{"format", "text" [L, D], "vision" [L_v, T, D_v] or None, "meta"}`` (see the module docstring).
    """
    if not samples:
        raise InputError("vti calibration got no caption pair")
    if limit > len(samples):
        raise ConfigError(f"--limit {limit}: the demo file holds {len(samples)} caption pairs; pass at most that")
    if not 0 < mask_ratio <= 1 or num_trials < 1:
        raise ConfigError(f"vti calibration: mask_ratio={mask_ratio} must be in (0, 1] and num_trials={num_trials} >= 1")
    from ..images import load_image

    demos = random.Random(seed).sample(list(samples), limit)
    generator = torch.Generator().manual_seed(seed)
    vision_config = lvlm.model.config.vision_config
    patch = int(vision_config.patch_size)
    model = lvlm.model
    was_training = model.training
    model.eval()
    rows: list[tuple[Any, Any, Any]] = []
    masked, clean = [], []
    vision_ok = vision or alpha_image > 0
    with torch.no_grad():
        for i, d in enumerate(demos):
            image = load_image(d["image"])
            pos, neg = _inputs(lvlm, image, d["question"], d["value"]), _inputs(lvlm, image, d["question"], d["h_value"])
            rows.append((pos, neg, image))
            pixels = pos.get("pixel_values")
            if not vision_ok or pixels is None or pixels.dim() != 4 or pixels.shape[0] != 1:
                vision_ok = False
                continue
            p = pixels[0].float().cpu()
            grid = (p.shape[1] // patch) * (p.shape[2] // patch)
            if mask_indices is not None:
                idx = mask_indices[i]
            else:
                idx = [torch.randperm(grid, generator=generator)[: int(mask_ratio * grid)] for _ in range(num_trials)]
            with _TowerStates(lvlm) as reader:
                clean.append(_tower_states(lvlm, reader, p[None])[0])
                total = None
                for start in range(0, len(idx), _VISION_CHUNK):
                    states = _tower_states(lvlm, reader, mask_copies(p, patch, idx[start:start + _VISION_CHUNK]))
                    total = states.sum(0) if total is None else total + states.sum(0)
                masked.append(total / len(idx))
        if not vision_ok and alpha_image > 0:
            raise LvlmFixError(f"vti steers the vision tower per token, which needs one [3, H, W] image per row; "
                               f"this {lvlm.adapter.model_type!r} model's processor gives pixel_values of another "
                               "layout (dynamic resolution or crops); set alpha_image=0 (textual steering only)")
        vision = None
        if vision_ok:
            full = vision_direction(torch.stack(masked), torch.stack(clean), release_compat)
            vision = full[:-1] if release_compat else full[1:]  # per ViT layer: entering stream (release) or output
        positive, negative = [], []
        from contextlib import ExitStack

        with ExitStack() as stack:
            if vision is not None and alpha_image > 0:  # the release's order: text pairs on the vision-steered tower
                directions = unit(vision).to(lvlm.device)
                for layer in range(len(lvlm.vision_layers)):
                    def hook(module: Any, args: tuple, output: Tensor, layer: int = layer) -> Tensor:
                        return steer(output, directions[layer], step * alpha_image)

                    stack.callback(lvlm.vision_mlp(layer).register_forward_hook(hook).remove)
            for pos, neg, _ in rows:
                positive.append(_last_token_states(lvlm, pos))
                negative.append(_last_token_states(lvlm, neg))
    model.train(was_training)
    text = text_direction(torch.stack(positive), torch.stack(negative))[1:]  # index 0, the embeddings, dropped
    meta = {
        "source": dataset.get("id") if dataset else "caller's samples",
        "model": lvlm.name, "model_type": lvlm.adapter.model_type,
        "num_layers": lvlm.num_layers, "hidden_size": lvlm.hidden_size,
        "vision_layers": None if vision is None else int(vision.shape[0]),
        "vision_tokens": None if vision is None else int(vision.shape[1]),
        "vision_hidden_size": None if vision is None else int(vision.shape[2]),
        "num_demos": limit, "num_trials": num_trials, "mask_ratio": mask_ratio, "seed": seed,
        "grouping": "release (consecutive layer-token vectors), entering stream" if release_compat
        else "per vision token, layer output",
        "alpha_image": alpha_image, "step": step, "pixels": "the model's processor",
        "demos": [str(d.get("id", i)) for i, d in enumerate(demos)],
        **({"dataset": dataset} if dataset else {}),
    }
    return {"format": FORMAT, "text": text, "vision": vision, "meta": meta}


# -- the file --------------------------------------------------------------------------------------
def write_directions(result: dict[str, Any], path: str | Path) -> Path:
    """Write a :func:`calibrate_vti` result as the file ``directions_file`` reads back."""
    import io

    from ..files import atomic_write

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "text": result["text"], "vision": result["vision"],
                "meta": json.loads(json.dumps(result["meta"], default=str))}, buffer)
    atomic_write(p, buffer.getvalue())
    return p


def read_directions(path: str | Path) -> dict[str, Any]:
    """A directions file, checked for its format (tensors only, no code: ``weights_only``)."""
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise ConfigError(f"vti: directions_file={path} is not a directions file ({type(e).__name__}); write one "
                          "with `lvlm-fix calibrate --method vti --out FILE`") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ConfigError(f"vti: directions_file={path} is not a {FORMAT} file; write one with "
                          "`lvlm-fix calibrate --method vti --out FILE`")
    return doc


def check_directions(doc: dict[str, Any], lvlm: LVLM, path: str | Path | None, vision: bool) -> None:
    """Refuse directions made for another model (decoder layers and width; vision layers and width)."""
    where = f"directions_file={path}" if path is not None else "the calibrated directions"
    text = doc["text"]
    if tuple(text.shape) != (lvlm.num_layers, lvlm.hidden_size):
        raise ConfigError(f"vti: {where} has text directions for {text.shape[0]} layers of width {text.shape[1]}; "
                          f"this model has {lvlm.num_layers} of width {lvlm.hidden_size}: calibrate for this model")
    if not vision:
        return
    v = doc["vision"]
    if v is None:
        raise ConfigError(f"vti: {where} has no vision directions (its model's tower could not be steered per "
                          "token); set alpha_image=0")
    width = getattr(lvlm.model.config.vision_config, "hidden_size", None)
    if v.shape[0] != len(lvlm.vision_layers) or v.shape[2] != width:
        raise ConfigError(f"vti: {where} has vision directions for {v.shape[0]} layers of width {v.shape[2]}; this "
                          f"model's tower has {len(lvlm.vision_layers)} of width {width}: calibrate for this model")
