"""A second forward that runs in lock step with the forward in progress (VHR's text-only stream).

VHR picks heads layer by layer from two streams: the image rows, which are the real prefill,
and the same prompts with the image tokens deleted. Each stream, at each reinforced layer, needs
the heads chosen from *both* at that layer before it can go on. Padding the text-only rows into
the image batch would make them as long as the image rows, and a separate pass before the
prefill would compute the image rows twice. Instead, the text-only stream is a short forward of
its own that pauses at every reinforced layer.

A transformers forward cannot be suspended halfway, so the side forward runs on a thread. The two
threads strictly alternate: whenever one runs, the other is blocked in a queue. So no module,
cache or config is ever used by both at once, and the results are as deterministic as two
sequential forwards. The side thread inherits the caller's grad and inference modes, autocast
state and CUDA stream.

Fences, where a second thread cannot run in lock step (:func:`side_stream_mode`):

* every wait is bounded (:data:`TIMEOUT_ENV`, default :data:`DEFAULT_TIMEOUT` seconds): a side or a
  caller that stops answering raises a clear :class:`LvlmFixError` instead of hanging;
* a model with offloaded weights (accelerate's cpu/disk offload hooks load a layer's weights for
  one forward and drop them after it, so two forwards interleaved inside a layer would find them
  gone) runs the batched fallback, :func:`run_batched`: the side rows appended to the main rows in
  one forward of their own, before the real one (which then costs the main rows twice);
* a compiled model is refused: a paused thread cannot sit inside a compiled graph. ``generate()``'s
  own compilation (a static cache and a ``CompileConfig``) needs nothing: it compiles the decode
  steps only, and the side stream runs in the prefill, which ``generate()`` runs uncompiled;
* static caches need nothing: the side forward is its own ``generate()`` with its own cache.

``LVLM_FIX_SIDE_STREAM=batched`` forces the fallback (e.g. where threads are not allowed).
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .._lazy import torch
from ..errors import LvlmFixError
from .plan import Participant, Plan, StopForward

if TYPE_CHECKING:
    from ..model import LVLM

__all__ = ["DEFAULT_TIMEOUT", "MODE_ENV", "TIMEOUT_ENV", "SidePass", "run_batched", "side_batch", "side_forwards",
           "side_stream_mode"]

_PAUSED, _ENDED, _RAISED, _GO, _STOP = "paused", "ended", "raised", "go", "stop"
TIMEOUT_ENV = "LVLM_FIX_SIDE_TIMEOUT"  # seconds either side waits for the other before giving up
DEFAULT_TIMEOUT = 600.0  # generous: the other side may be running several layers of a large model on CPU
MODE_ENV = "LVLM_FIX_SIDE_STREAM"  # "thread" (default where possible) or "batched"


def _timeout() -> float:
    value = os.environ.get(TIMEOUT_ENV)
    if value is None:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        raise LvlmFixError(f"{TIMEOUT_ENV}={value!r} is not a number of seconds; set e.g. {TIMEOUT_ENV}=600") from None
    if not seconds > 0:
        raise LvlmFixError(f"{TIMEOUT_ENV}={value!r} must be a positive number of seconds")
    return seconds


def _offloaded(model: torch.nn.Module) -> bool:
    """Whether accelerate hooks load some of the model's weights only for the duration of a forward."""
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        for h in getattr(hook, "hooks", None) or ((hook,) if hook is not None else ()):
            if getattr(h, "offload", False):
                return True
    return False


def _compiled(model: torch.nn.Module) -> bool:
    return (torch.compiler.is_compiling() or isinstance(model, torch._dynamo.eval_frame.OptimizedModule)
            or hasattr(model.forward, "_torchdynamo_orig_callable"))


def side_stream_mode(lvlm: LVLM) -> str:
    """How a side stream in lock step with ``lvlm``'s forward runs: ``"thread"`` or ``"batched"``.

    Raises:
        LvlmFixError: the model is compiled, which neither mode can run inside.
    """
    if _compiled(lvlm.model):
        raise LvlmFixError("this method runs a second, text-only stream in lock step with the prefill, which cannot "
                           "run inside a compiled model; use the model uncompiled (and generate(..., "
                           "disable_compile=True) with a static cache on GPU)")
    forced = os.environ.get(MODE_ENV)
    if forced is not None and forced not in ("thread", "batched"):
        raise LvlmFixError(f"{MODE_ENV}={forced!r} is not a side-stream mode; use thread or batched")
    if forced == "batched" or _offloaded(lvlm.model):
        return "batched"
    return "thread"


class SidePass:
    """Run ``run()`` on a side thread, one pause at a time, driven from the calling thread.

    The calling thread calls :meth:`resume` to let the side forward run to its next
    :meth:`pause` and receive what it paused with, and :meth:`close` to stop it. The side
    forward (code called from ``run``, e.g. a hook) calls :meth:`pause` with a value and gets
    back the reply given to the next :meth:`resume`.
    """

    def __init__(self, run: Callable[[], None], name: str = "lvlm-fix side pass", timeout: float | None = None) -> None:
        self._run = run
        self._name = name
        self.timeout = _timeout() if timeout is None else timeout
        self._to_side: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._to_main: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._paused = False  # the side thread is blocked in pause(), waiting for us

    # -- calling thread ---------------------------------------------------------------------------
    def resume(self, reply: Any = None) -> Any:
        """Let the side forward run to its next pause; ``reply`` answers its previous pause.

        Returns the value it paused with. Re-raises, here, an exception raised on the side; raises
        :class:`LvlmFixError` if the side forward ends without pausing again.
        """
        if self._thread is None:
            self._thread = threading.Thread(target=self._side_main, args=(_caller_state(),), name=self._name,
                                            daemon=True)
            self._thread.start()
        elif self._paused:
            self._to_side.put((_GO, reply))
        else:
            raise LvlmFixError(f"{self._name}: the side forward has already ended")
        kind, value = self._wait(self._to_main, "the side forward")
        self._paused = kind == _PAUSED
        if kind == _PAUSED:
            return value
        self._thread.join()
        if kind == _RAISED:
            raise value
        raise LvlmFixError(f"{self._name}: the side forward ended before reaching the layers it was asked for")

    def close(self) -> None:
        """Stop the side forward where it is paused (it unwinds by ``StopForward``) and join it.

        Idempotent; a no-op if it never started or has already ended.
        """
        if self._paused:
            self._paused = False
            self._to_side.put((_STOP, None))
            self._wait(self._to_main, "the side forward")  # its end: ended (StopForward caught) or raised unwinding
        if self._thread is not None:
            self._thread.join(self.timeout)

    def _wait(self, q: queue.SimpleQueue, who: str) -> tuple[str, Any]:
        try:
            return q.get(timeout=self.timeout)
        except queue.Empty:
            raise LvlmFixError(
                f"{self._name}: {who} gave no answer in {self.timeout:g} s; if the model is just slow, raise "
                f"{TIMEOUT_ENV} (seconds)") from None

    # -- side thread ------------------------------------------------------------------------------
    def pause(self, value: Any) -> Any:
        """Hand ``value`` to the calling thread and wait; returns the reply of its next :meth:`resume`."""
        self._to_main.put((_PAUSED, value))
        kind, reply = self._wait(self._to_side, "the calling thread")
        if kind == _STOP:
            raise StopForward
        return reply

    def _side_main(self, state: dict[str, Any]) -> None:
        try:
            with contextlib.ExitStack() as stack:
                stack.enter_context(torch.inference_mode(state["inference"]))
                stack.enter_context(torch.set_grad_enabled(state["grad"]))  # after: inference_mode(False) sets grad
                for device, dtype in state["autocast"]:
                    stack.enter_context(torch.autocast(device, dtype=dtype))
                if state["stream"] is not None:
                    stack.enter_context(torch.cuda.stream(state["stream"]))
                self._run()
        except StopForward:
            pass
        except BaseException as exc:  # handed to the calling thread, which re-raises it
            self._to_main.put((_RAISED, exc))
            return
        self._to_main.put((_ENDED, None))


def _caller_state() -> dict[str, Any]:
    """The calling thread's thread-local torch state that the side forward must run under."""
    autocast = [(d, torch.get_autocast_dtype(d)) for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)]
    return {"grad": torch.is_grad_enabled(), "inference": torch.is_inference_mode_enabled(), "autocast": autocast,
            "stream": torch.cuda.current_stream() if torch.cuda.is_initialized() else None}


class _LockStep(Participant):
    """Both streams as one batch: at each layer, the factor chosen from both halves scales both."""

    def __init__(self, rows: int, layers: frozenset[int], at_layer: Callable[[int, torch.Tensor, torch.Tensor], Any]):
        self.rows, self.head_output_layers, self.at_layer = rows, layers, at_layer

    def head_output(self, heads: torch.Tensor, ctx: Any) -> torch.Tensor:  # [2n, q, h, d]
        main, side = heads[: self.rows], heads[self.rows:]
        factor = self.at_layer(ctx.layer, main[:, -1], side[:, -1])  # [n, h]
        if ctx.layer == max(self.head_output_layers):
            raise StopForward  # nothing after the last layer is needed
        return heads * factor.repeat(2, 1).to(heads.device, heads.dtype)[:, None, :, None]


_PER_TOKEN = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")
# Forward arguments that belong to one call of generate() or are rebuilt here.
_NOT_CARRIED = frozenset({"cache", "past_key_values", "cache_position", "position_ids", "use_cache", "logits_to_keep",
                          "num_logits_to_keep", "return_dict", "labels", "inputs_embeds", *_PER_TOKEN})


def _left_pad(t: torch.Tensor, width: int, fill: int) -> torch.Tensor:
    return t if t.shape[-1] == width else torch.cat([t.new_full((*t.shape[:-1], width - t.shape[-1]), fill), t], -1)


def side_batch(lvlm: LVLM, main: dict[str, Any], side: dict[str, Any]) -> dict[str, Any]:
    """One forward's arguments holding the ``n`` main rows, then the ``n`` side rows (rows ``n..2n-1``).

    ``main`` is a prefill's forward arguments, ``side`` the same rows' per-token tensors without
    images (:meth:`LVLM.text_only`). The side rows are left padded to the main rows' width and get
    plain text positions; image inputs belong to the main rows. Cache and generation-internal
    arguments are dropped: run it with ``use_cache=False``. Both halves end at their last token.
    """
    ids = main["input_ids"]
    width = ids.shape[1]
    main_mask = main.get("attention_mask")
    if main_mask is None or main_mask.dim() != 2:
        main_mask = torch.ones_like(ids)
    batch = {k: v for k, v in main.items() if k not in _NOT_CARRIED and v is not None}
    for key in _PER_TOKEN:
        value = main_mask if key == "attention_mask" else main.get(key)
        if value is not None:
            fill = lvlm.pad_token_id if key == "input_ids" else 0
            other = side.get(key, torch.zeros_like(side["input_ids"]))
            batch[key] = torch.cat([value, _left_pad(other, width, fill)], 0)
    side_pos = _left_pad((side["attention_mask"].long().cumsum(-1) - 1).clamp(min=0), width, 0)  # text positions
    main_pos = main.get("position_ids")
    if main_pos is None:
        main_pos = (main_mask.long().cumsum(-1) - 1).clamp(min=0)
    if main_pos.dim() == 3:  # multimodal RoPE: one row of positions per component, all equal for text
        side_pos = side_pos.expand(main_pos.shape[0], -1, -1)
    batch["position_ids"] = torch.cat([main_pos, side_pos.to(main_pos)], -2)
    return batch


def side_forwards(lvlm: LVLM, main: dict[str, Any], side: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """:func:`side_batch`'s two halves as the arguments of two forwards: the ``n`` main rows, and the ``n`` side
    rows at their own width (not left padded to the main rows'). Where the side rows are much shorter (a prompt
    without its image tokens) two forwards cost less than one of ``2n`` rows: a padding column is computed like
    any other, so the batched forward pays the long rows' width for the short ones."""
    batch = side_batch(lvlm, main, side)
    n, width = main["input_ids"].shape[0], batch["input_ids"].shape[-1]
    cut = width - min(side["input_ids"].shape[-1], width)  # the side rows' padding up to the main rows' width
    first = {k: v[..., :n, :] if k in _PER_TOKEN or k == "position_ids" else v for k, v in batch.items()}
    second = {k: v[..., n:, cut:] for k, v in batch.items() if k in _PER_TOKEN or k == "position_ids"}
    return first, second


def run_batched(lvlm: LVLM, main: dict[str, Any], side: dict[str, Any], layers: frozenset[int],
                at_layer: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    """The batched fallback of a lock-step side stream on head outputs: both streams in one forward.

    ``main`` is the prefill's forward arguments (as the model's pre-hook sees them: position ids
    computed, image features possibly pre-encoded) and ``side`` the same rows' per-token tensors
    without images. The side rows are appended to the main rows (:func:`side_batch`) and the batch
    runs one forward, stopped after the last of ``layers``. At each of ``layers``, in order,
    ``at_layer(layer, main_heads, side_heads)`` gets both streams' per-head outputs at the last
    position (``[n, h, d]`` each) and returns an ``[n, h]`` factor that scales both streams' heads
    there, so later layers see both reinforced, as in the threaded lock step.
    """
    n = main["input_ids"].shape[0]
    batch = side_batch(lvlm, main, side)
    try:
        with Plan(lvlm, [_LockStep(n, layers, at_layer)]).active(inner=True):
            lvlm.model(**batch, use_cache=False)
    except StopForward:
        return
    raise LvlmFixError("the batched side stream ended before reaching the layers it was asked for")
