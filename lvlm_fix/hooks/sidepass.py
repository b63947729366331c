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
sequential forwards. The side thread inherits the caller's inference mode and CUDA stream.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any

from .._lazy import torch
from ..errors import LvlmFixError
from .plan import StopForward

__all__ = ["SidePass"]

_PAUSED, _ENDED, _RAISED, _GO, _STOP = "paused", "ended", "raised", "go", "stop"


class SidePass:
    """Run ``run()`` on a side thread, one pause at a time, driven from the calling thread.

    The calling thread calls :meth:`resume` to let the side forward run to its next
    :meth:`pause` and receive what it paused with, and :meth:`close` to stop it. The side
    forward (code called from ``run``, e.g. a hook) calls :meth:`pause` with a value and gets
    back the reply given to the next :meth:`resume`.
    """

    def __init__(self, run: Callable[[], None], name: str = "lvlm-fix side pass") -> None:
        self._run = run
        self._name = name
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
            inference = torch.is_inference_mode_enabled()
            stream = torch.cuda.current_stream() if torch.cuda.is_initialized() else None
            self._thread = threading.Thread(target=self._side_main, args=(inference, stream), name=self._name,
                                            daemon=True)
            self._thread.start()
        elif self._paused:
            self._to_side.put((_GO, reply))
        else:
            raise LvlmFixError(f"{self._name}: the side forward has already ended")
        kind, value = self._to_main.get()
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
            self._to_main.get()  # its end: ended (StopForward caught) or raised while unwinding
        if self._thread is not None:
            self._thread.join()

    # -- side thread ------------------------------------------------------------------------------
    def pause(self, value: Any) -> Any:
        """Hand ``value`` to the calling thread and wait; returns the reply of its next :meth:`resume`."""
        self._to_main.put((_PAUSED, value))
        kind, reply = self._to_side.get()
        if kind == _STOP:
            raise StopForward
        return reply

    def _side_main(self, inference: bool, stream: Any) -> None:
        try:
            on_stream = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
            with torch.inference_mode(inference), on_stream:
                self._run()
        except StopForward:
            pass
        except BaseException as exc:  # handed to the calling thread, which re-raises it
            self._to_main.put((_RAISED, exc))
            return
        self._to_main.put((_ENDED, None))

