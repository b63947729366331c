"""How lvlm-fix reads and rewrites a model, without forking any modelling file.

* ``attention``: the one attention function registered with transformers (sdpa passthrough
  unless a plan edits or reads the layer);
* ``capture``: :class:`HookSet`, the only way hooks get onto modules (declared first, registered
  in ``try``, removed in ``finally``);
* ``plan``: :class:`Plan`, the participants of one call and the per-row token bookkeeping
  (image-token positions, padding, step) that every callback receives as :class:`AttnContext`;
* ``sidepass``: :class:`SidePass`, a second forward run in lock step with the one in progress
  (VHR's text-only stream, the statistics pass), on a thread that strictly alternates with the caller,
  with bounded waits; where no second thread can run (offloaded weights), a batched fallback;
* ``contrast``: :class:`~lvlm_fix.hooks.contrast.ContrastStream`, the same rows with another input
  decoded beside ``generate()`` with their own cache and combined at the logits (contrastive decoding).

This layer never names a method: methods (``lvlm_fix.interventions``) and diagnostics build on it.

Lifetimes: a Plan's hooks (and a contrast stream's attribute patches) exist only inside
``with plan.active():``, and only on its own model (the plan sits on that model's attention
modules); per-row state exists only from one prefill to the next. After the block, the model has
no lvlm-fix hook, patch, attribute or plan. Forwards a participant runs for itself beside the real
one go through :func:`~lvlm_fix.hooks.plan.outside_plan`.
"""

from .attention import ATTN_NAME, register
from .capture import HookSet, hooks_on
from .plan import AttnContext, Participant, Plan, StopForward, TokenState

__all__ = ["ATTN_NAME", "AttnContext", "HookSet", "Participant", "Plan", "StopForward", "TokenState",
           "hooks_on", "register"]
