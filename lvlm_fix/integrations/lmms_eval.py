"""The lmms-eval model ``lvlm_fix``: any lmms-eval task, with an lvlm-fix method applied.

::

    python -m lmms_eval --model lvlm_fix --model_args pretrained=DIR,method=vhr,alpha=2 --tasks pope

lmms-eval finds the model through lvlm-fix's entry point ``lvlm_fix`` in the group
``lmms_eval.models`` (see ``pyproject.toml``), :func:`lvlm_fix.integrations.lmms_eval_manifest`, and
imports this module when the model is asked for. Only this module (and that function) import
lmms_eval; the rest of lvlm-fix never needs it.

``--model_args`` (comma-separated ``key=value``; lmms-eval reads ``true``/``false``, integers and
floats, everything else stays a string):

* ``pretrained``: a model directory or hub id, as for :func:`lvlm_fix.load`; absent (or
  ``testbed``) is the embedded testbed model.
* ``method``: a method spec, as ``lvlm-fix run --method``: ``none`` (default), ``vhr``,
  ``vhr+var``, or with inline parameters ``vhr:alpha=1.5+var:tau=3.5``.
* any other key is a method parameter: ``alpha=2`` goes to the one composed method that has the
  field, ``var.tau=3.5`` to one method of a composition (as ``--set var.tau=3.5``). A list is
  written in brackets, ``layers=[1,2]`` (lmms-eval keeps brackets together). A key that is neither
  a model argument nor a parameter of the method is refused, with both lists in the message.
* ``dtype`` (default ``auto``), ``device`` (default: ``cuda`` when available, else the CPU),
  ``device_map`` (``auto``, or a JSON object in quotes), ``revision``, ``trust_remote_code``.
* ``system_prompt``: a system turn for every request (a file path is read, as lmms-eval's own
  models do).
* ``report``: a JSON-lines file; each ``generate()`` batch appends
  ``{"task", "split", "doc_ids", "method", "report"}``, where ``report`` is the methods' report
  (``plan.report()``) and each per-row list in it follows ``doc_ids``.

lmms-eval's ``--batch_size N`` (a number; ``auto`` is refused) sets the batch: requests are grouped
by identical generation arguments, sorted by prompt length and generated N at a time.
"""

from __future__ import annotations

import difflib
import itertools
import json
import os
import tempfile
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

try:
    from lmms_eval.api.instance import Instance
    from lmms_eval.api.model import lmms
except ImportError as e:  # lvlm-fix installed without lmms-eval
    raise ImportError(f"lvlm_fix.integrations.lmms_eval needs lmms-eval ({e}); install it as README.md's "
                      "'lmms-eval' section says: pip install 'lvlm-fix[lmms]' && pip install --no-deps lmms-eval==0.7.3"
                      ) from None

import torch
from tqdm import tqdm

from ..api import check_length, generate
from ..errors import ConfigError, InputError, strict_bool
from ..evals.runner import _cut as cut_at_stops
from ..images import load_image
from ..interventions import NONE, build_methods, format_spec, method_fields, parse_spec, parse_value
from ..devices import DEVICE_MAP_STRATEGIES, check_torch_device

__all__ = ["MODEL_ARGS", "LvlmFixLMMS", "method_spec"]

# The model's own --model_args; every other key is a method parameter.
MODEL_ARGS = ("pretrained", "method", "dtype", "device", "device_map", "revision", "trust_remote_code",
              "system_prompt", "report")
DEFAULT_MAX_NEW_TOKENS = 1024  # when a task sets none: lmms-eval's own models' default
# Generation arguments of a task that are not generate() arguments.
_NOT_GENERATE = ("until", "image_aspect_ratio", "max_gen_toks")


def method_spec(method: str | None, params: dict[str, Any]) -> dict[str, dict[str, Any]] | None:
    """The method setting of ``--model_args``, checked and resolved into one per-method dict.

    Args:
        method: a method spec (``"vhr"``, ``"vhr+var"``, ``"vhr:alpha=1.5+var:tau=3.5"``), or None.
        params: the other model args: ``field=value`` for the one composed method with that field,
            ``method.field=value`` for one method of a composition. String values are read as
            lvlm-fix reads spec values (JSON where they parse: ``[1,2]``, ``true``).

    Returns:
        ``{method: its full resolved config}`` in composition order (None for the vanilla model):
        the form :func:`lvlm_fix.generate` and :func:`lvlm_fix.apply` take.

    Raises:
        ConfigError / UnknownNameError: an unknown method, an unknown key, or a bad value, named.
    """
    method = _unquote(method) if isinstance(method, str) else method
    names = [name for name, _ in parse_spec(method)]
    per_method: dict[str, dict[str, Any]] = defaultdict(dict)
    flat: dict[str, Any] = {}
    for key, value in params.items():
        value = parse_value(_unquote(value)) if isinstance(value, str) else value
        owner, dot, field = key.partition(".")
        if dot:
            per_method[owner][field] = value
        elif any(key in method_fields(n) for n in names):
            flat[key] = value
        else:
            fields = sorted({f for n in names for f in method_fields(n)})
            close = difflib.get_close_matches(key.lower(), [*MODEL_ARGS, *fields], n=1)
            raise ConfigError(
                f"--model_args: {key!r} is neither an argument of the lvlm_fix model ({', '.join(MODEL_ARGS)}) "
                f"nor a parameter of method {format_spec(parse_spec(method))!r}"
                + (f" ({', '.join(fields)})" if fields else "") + (f"; did you mean {close[0]!r}?" if close else ""))
    methods = build_methods(method, params=dict(per_method), **flat)
    return {m.name: m.config.to_dict() for m in methods} or None


class LvlmFixLMMS(lmms):
    """lmms-eval's "simple" model protocol around :func:`lvlm_fix.generate` (see the module docstring).

    ``generate_until`` batches; ``loglikelihood`` forces each request's continuation through
    ``generate()`` under :func:`lvlm_fix.apply` (methods that rewrite the input and run ``generate()``
    themselves, such as CARVE, are refused there); ``generate_until_multi_round`` runs each
    document's rounds in turn.
    """

    is_simple = True

    def __init__(self, pretrained: str | None = None, method: str = NONE, dtype: str = "auto",
                 device: str | None = None, device_map: str | None = None, revision: str | None = None,
                 trust_remote_code: bool = False, system_prompt: str | None = None, report: str | None = None,
                 batch_size: int | str = 1, max_batch_size: int | None = None, **method_params: Any) -> None:
        super().__init__()
        import lvlm_fix

        del max_batch_size  # lmms-eval always passes it; it only matters for batch_size=auto, refused here

        trust_remote_code = strict_bool("trust_remote_code", trust_remote_code)  # text: "no" is not true
        self.batch_size = _batch_size(batch_size)
        self.spec = method_spec(method, method_params)  # every value checked before any weight is loaded
        self.method = format_spec(parse_spec(self.spec))
        self.system_prompt = self._resolve_system_prompt(_unquote(system_prompt)) if system_prompt else None
        self.report_path = _report_path(_unquote(report)) if report else None
        pretrained = _unquote(pretrained) if isinstance(pretrained, str) else pretrained
        device = _unquote(device) if isinstance(device, str) else device
        if isinstance(device, str):  # before any weight is loaded
            check_torch_device(device, "device")
        device_map = _device_map(device_map)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # accelerate launch: one model copy per process
            if device_map is not None:
                raise ConfigError("--model_args device_map spreads one model over devices; under accelerate launch "
                                  "each process holds its own copy: leave device_map out")
            from accelerate import Accelerator

            self.accelerator = Accelerator()  # the evaluator gathers the ranks' results through it
            self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
            device = str(self.accelerator.device)
        elif device is None and device_map is None and torch.cuda.is_available():
            device = "cuda"
        self.lvlm = lvlm_fix.load(pretrained or None, dtype=dtype, device=device, device_map=device_map,
                                  revision=revision, trust_remote_code=trust_remote_code)
        if self.rank == 0:
            # lmms-eval prints --model_args as typed; this line names every parameter the method runs with
            # (the defaults filled in), so the printed results can be read without the method's docs.
            print(f"lvlm_fix: {self.lvlm.name}, method {self.resolved_method}", flush=True)

    @property
    def resolved_method(self) -> str:
        """The method with every parameter, defaults included (``"vhr:alpha=2.0:..."``; ``"none"``)."""
        return format_spec(list((self.spec or {}).items()))

    @property
    def device(self) -> torch.device:
        """Where the model is (the evaluator puts its gather tensors there)."""
        return self.lvlm.device

    # -- generate_until -------------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """One answer per request, in request order, each cut at the task's first ``until`` string."""
        out: list[str] = [""] * len(requests)
        groups: dict[str, list[int]] = defaultdict(list)
        for i, request in enumerate(requests):
            groups[json.dumps(request.args[1], sort_keys=True, default=repr)].append(i)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="lvlm_fix")
        for members in groups.values():
            gen, stops = self._generation(requests[members[0]].args[1])
            members.sort(key=lambda i: -len(requests[i].args[0]))  # longest first: less padding per batch
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                rows = []
                for i in chunk:
                    context, _, doc_to_visual, doc_id, task, split = requests[i].args
                    rows.append((i, context, self._images(doc_to_visual, task, split, doc_id), (task, split, doc_id)))
                by_count: dict[int, list[tuple]] = defaultdict(list)  # rows of one generate() hold equally many images
                for row in rows:
                    by_count[len(row[2])].append(row)
                for same in by_count.values():
                    texts = self._generate([r[2] for r in same], [r[1] for r in same], gen, [r[3] for r in same])
                    for (i, context, _, _), text in zip(same, texts):
                        out[i] = cut_at_stops(text, stops)
                        self.cache_hook.add_partial("generate_until", (context, requests[i].args[1]), out[i])
                bar.update(len(chunk))
        bar.close()
        return out

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        """Each document's rounds in turn (one document per ``generate()``), as lmms-eval's own models do.

        Round 0 answers the request's context; every later round asks the task's ``doc_to_text(doc,
        previous_output=..., round_idx=..., previous_round_info=...)`` for its images and context,
        until it signals the end. The result of a request is the list of its rounds' answers.
        """
        results = []
        for request in tqdm(requests, disable=self.rank != 0, desc="lvlm_fix"):
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = request.args
            gen, stops = self._generation(gen_kwargs)
            doc = self.task_dict[task][split][doc_id]
            visuals = doc_to_visual(doc)
            rounds: list[str] = []
            info = None
            for round_idx in itertools.count():  # until the task's doc_to_text says done
                if round_idx:
                    visuals, context, done, rounds, info = doc_to_text(
                        doc, previous_output=list(rounds), round_idx=round_idx, previous_round_info=info)
                    rounds = list(rounds)
                    if done:
                        break
                images = self._check_images(visuals, task, doc_id)
                rounds.append(cut_at_stops(self._generate([images], [context], gen, [(task, split, doc_id)])[0], stops))
            results.append(rounds)
        return results

    # -- loglikelihood --------------------------------------------------------------------------------
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(sum of the continuation's token log-probabilities, whether greedy decoding gives it), per request.

        One request at a time, teacher-forced through the model's own ``generate()`` under
        :func:`lvlm_fix.apply`, so the method acts exactly as when it generates: the prompt (the
        model's chat template around the images and the context) is the prefill, and each token
        of the continuation (tokenised on its own, without special tokens) is one decoding step.
        """
        import lvlm_fix

        wrapper = next((m for m in self.spec or {} if _wraps_generate(m)), None)
        if wrapper:
            raise ConfigError(f"method {wrapper!r} rewrites the input and runs generate() itself, so it has no "
                              "log-likelihood of a given continuation; use it on generate_until tasks only")
        results = []
        for request in tqdm(requests, disable=self.rank != 0, desc="lvlm_fix"):
            context, target, doc_to_visual, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            continuation = target if isinstance(target, str) else target(doc)
            images = self._images(doc_to_visual, task, split, doc_id)
            with lvlm_fix.apply(self.lvlm, self.spec), torch.inference_mode():
                results.append(self._score(images, context, continuation))
            self.cache_hook.add_partial("loglikelihood", (context, continuation), results[-1])
        return results

    def _score(self, images: list[Any], context: str, continuation: str) -> tuple[float, bool]:
        """Teacher forcing through the real ``generate()``: each step is forced to the next
        continuation token, and the model's unprocessed logits of every step are kept."""
        from transformers import LogitsProcessor, LogitsProcessorList

        lvlm = self.lvlm
        batch = lvlm.encode([images], [context], system_prompt=self.system_prompt)
        tokens = lvlm.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        if not tokens:
            return 0.0, True
        length = batch["input_ids"].shape[1]
        check_length(lvlm, length, len(tokens))

        class Force(LogitsProcessor):
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
                forced = torch.full_like(scores, float("-inf"))
                forced[:, tokens[input_ids.shape[1] - length]] = 0.0
                return forced

        out = lvlm.model.generate(**batch, max_new_tokens=len(tokens), do_sample=False, num_beams=1,
                                  logits_processor=LogitsProcessorList([Force()]), output_logits=True,
                                  return_dict_in_generate=True)
        if len(out.logits) < len(tokens):  # an end-of-sequence token inside the continuation stopped generate()
            raise InputError(f"the continuation {continuation!r} holds the model's end-of-sequence token before its "
                             "end; its log-likelihood cannot be computed by generation")
        logprobs = torch.stack([step[0] for step in out.logits]).float().log_softmax(-1)
        target = torch.tensor(tokens, device=logprobs.device)
        total = float(logprobs.gather(1, target[:, None]).sum())
        return total, bool((logprobs.argmax(-1) == target).all())

    # -- helpers ----------------------------------------------------------------------------------------
    def _images(self, doc_to_visual: Callable[[Any], Any], task: str, split: str, doc_id: int) -> list[Any]:
        return self._check_images(doc_to_visual(self.task_dict[task][split][doc_id]), task, doc_id)

    @staticmethod
    def _check_images(visuals: Any, task: str, doc_id: int) -> list[Any]:
        visuals = [] if visuals is None else list(visuals) if isinstance(visuals, (list, tuple)) else [visuals]
        if not visuals:
            raise InputError(f"task {task!r} gave no image for document {doc_id}; the lvlm_fix model runs image tasks "
                             "only (its methods act on image tokens)")
        return [load_image(v) for v in visuals]  # PIL images (to RGB) or image files; a video file is refused

    def _generation(self, gen_kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """A task's generation arguments as ``generate()`` arguments, and its stop strings."""
        from transformers import GenerationConfig

        kw = dict(gen_kwargs or {})
        until = kw.get("until") or []
        if not (isinstance(until, str) or (isinstance(until, (list, tuple)) and all(isinstance(u, str) for u in until))):
            raise ConfigError(f"generation argument until={until!r} of the task must be a string or a list of strings")
        stops = [until] if isinstance(until, str) else list(until)
        temperature = _number("temperature", kw.pop("temperature", 0) or 0, float, low=0)
        sample = strict_bool("do_sample", kw.pop("do_sample", temperature > 0))
        new_tokens = next((v for v in (kw.pop("max_new_tokens", None), kw.get("max_gen_toks")) if v is not None),
                          DEFAULT_MAX_NEW_TOKENS)  # a 0 is refused, not replaced by the default
        beams = kw.pop("num_beams", None)
        gen: dict[str, Any] = {"max_new_tokens": _number("max_new_tokens", new_tokens, int, low=1),
                               "do_sample": sample, "num_beams": _number("num_beams", 1 if beams is None else beams,
                                                                         int, low=1)}
        known = GenerationConfig()
        for key, value in kw.items():
            if key in _NOT_GENERATE or value is None:
                continue
            if key in ("top_p", "top_k") and not sample:
                continue  # sampling-only settings of a greedy task (POPE sends top_p=1.0)
            if not hasattr(known, key):
                raise ConfigError(f"generation argument {key}={value!r} of the task is not a generate() argument; "
                                  "remove it with --gen_kwargs or from the task's generation_kwargs")
            gen[key] = value
        if sample and temperature > 0:
            gen["temperature"] = temperature
        return gen, stops

    def _generate(self, images: Sequence[list[Any]], prompts: Sequence[str], gen: dict[str, Any],
                  docs: Sequence[tuple[str, str, int]]) -> list[str]:
        core = {k: gen[k] for k in ("max_new_tokens", "do_sample", "num_beams")}
        extra = {k: v for k, v in gen.items() if k not in core}
        out = generate(self.lvlm, list(images), list(prompts), self.spec, generate_kwargs=extra or None,
                       system_prompt=self.system_prompt, **core)
        if self.report_path is not None:
            path = self.report_path if self.world_size == 1 else self.report_path.with_suffix(
                f".rank{self.rank}{self.report_path.suffix}")
            path.parent.mkdir(parents=True, exist_ok=True)
            line = {"task": docs[0][0], "split": docs[0][1], "doc_ids": [d[2] for d in docs], "method": self.method,
                    "report": out.report}
            with path.open("a") as f:
                f.write(json.dumps(line, default=repr) + "\n")
        return out.texts


def _number(name: str, value: Any, kind: type, low: float) -> Any:
    """A task's numeric generation argument, checked at the first request rather than deep in generate()."""
    text = value.strip() if isinstance(value, str) else value
    try:
        number = kind(text) if not isinstance(text, bool) else None
        if kind is int and isinstance(text, float) and not text.is_integer():
            number = None
    except (TypeError, ValueError):
        number = None
    if number is None or number != number or number < low:
        what = "a whole number" if kind is int else "a number"
        raise ConfigError(f"generation argument {name}={value!r} of the task must be {what} of at least {low:g}; fix "
                          "it with --gen_kwargs or in the task's generation_kwargs")
    return number


def _device_map(value: Any) -> Any:
    """``device_map`` of ``--model_args``: a name (auto, balanced, sequential, a device) or a JSON object of
    module -> device; a malformed one is one line here, before any weight is loaded."""
    if value is None or isinstance(value, dict):
        return value
    text = _unquote(str(value))
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--model_args device_map={text!r} is not a JSON object ({e.msg}); write e.g. "
                              'device_map=\'{"": 0}\' or device_map=auto') from None
        if not isinstance(value, dict) or not all(isinstance(v, (int, str)) for v in value.values()):
            raise ConfigError(f"--model_args device_map={text!r} must map module names to devices (an index or a "
                              "name such as cpu)")
        for v in value.values():
            if isinstance(v, str) and v not in ("disk",):
                check_torch_device(v, "device_map device")
        return value
    if text not in DEVICE_MAP_STRATEGIES:
        check_torch_device(text, "device_map")
    return text


def _report_path(text: str) -> Path:
    """``report=`` checked at construction: a file whose folder can be made and written (else one line now,
    rather than after the first batch)."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise ConfigError(f"--model_args report={text} is a folder; give a file name, e.g. report={path / 'report.jsonl'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and not os.access(path, os.W_OK):
            raise PermissionError(13, "Permission denied")
        with tempfile.NamedTemporaryFile(dir=path.parent):  # the folder takes a file (the report comes later)
            pass
    except OSError as e:
        raise ConfigError(f"--model_args report={text} cannot be written ({e.strerror or e}); choose another "
                          "path") from None
    return path


def _wraps_generate(name: str) -> bool:
    from ..interventions import METHODS

    return METHODS.get(name).stage.wraps_generate


def _batch_size(value: int | str) -> int:
    """lmms-eval's ``--batch_size`` (an int, or the CLI's string) as a positive int."""
    text = str(value).strip()
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"--batch_size {value!r}: the lvlm_fix model takes a positive number (auto is not supported)")
    return int(text)


def _unquote(value: str) -> str:
    """A model arg without the quotes that protected its commas on the command line."""
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value
