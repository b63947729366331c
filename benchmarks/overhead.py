"""Overhead of each lvlm-fix method over vanilla sdpa ``generate()``: wall time and peak memory.

For every model and batch size, one process times, in interleaved rounds (the order rotates
every round, so drift and position effects cancel), after one warm-up run of each:

===============  ===================================================================================
``vanilla``      ``lvlm.model.generate(**batch)``, no plan: the text decoder's attention is lvlm-fix's
                 registered function, which with no plan *is* the sdpa function (the baseline)
``sdpa``         the same generate with the text decoder switched to stock ``"sdpa"``
``none``         ``with lvlm_fix.apply(lvlm, None): generate`` (an empty plan: its hook, no layer touched)
``vhr``/``var``/``act``  ``with lvlm_fix.apply(lvlm, m): generate``
``vcd``/``icd``/``m3id``/``pai``  the same: one contrast stream beside the rows (PAI also amplifies attention)
``api``          ``lvlm_fix.generate(lvlm, images, prompts, method=None)`` (encode included): CARVE's baseline
``carve``        ``lvlm_fix.generate(..., method="carve")``: two statistics passes, refine, final pass
``paint``        ``with lvlm_fix.apply(lvlm, "paint"): generate`` (the tower's CLS rows, the last-row edit)
``yes_no``       ``lvlm_fix.generate`` of a POPE question, no method, stopping at EOS: MVP's baseline
``mvp``          ``lvlm_fix.generate(..., method="mvp")`` on that question: 3 captions per image (capped at
                 the benchmark's new-token count), a scoring forward per view, the yes/no paths
``prefill``      encode + ``generate(max_new_tokens=1)``: the baseline of the statistics pass
``heads``        the statistics pass of ``lvlm-fix heads`` (:func:`lvlm_fix.head_statistics`; batch > 1
                 runs the same recorder on a batch of rows). It is prefill-only by design.
===============  ===================================================================================

Every generate is greedy with ``min_new_tokens = max_new_tokens`` (128 in full mode), so EOS
never makes two runs incomparable. Reported per method: the median time (wall clock; with
``--clock cpu`` the process's CPU time, for a shared CPU machine), the median of the per-round
ratios to its baseline, and peak memory from one extra run of each (not timed):

* CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats`` (total, weights included) and
  the same minus ``memory_allocated`` before the call ("extra": activations, KV cache, maps).
* CPU: torch has no peak counter for CPU memory and the process RSS lags the allocator (glibc
  keeps freed blocks), so the run is recorded with ``torch.profiler`` (``profile_memory=True``),
  which reports every allocation and free made through torch's CPU allocator; the running sum of
  those events, in time order, peaks at "extra". The profiler sees only its own thread, so VHR's
  text-only stream (on a side thread) is measured alone, as a plain prefill of the text-only rows,
  and its peak is added: an upper bound, since the two peaks need not coincide. "Total" is the
  model's parameter and buffer bytes plus "extra".

Usage::

    python benchmarks/overhead.py                       # embedded testbed model, batch 1 and 16, 5 reps
    python benchmarks/overhead.py --sized-llava --batch-sizes 1   # the ~118M random LLaVA (see BENCHMARKS.md)
    python benchmarks/overhead.py --gpu-configs llava-1.5-7b qwen2.5-vl-7b   # needs CUDA
    python benchmarks/overhead.py --threads 1 --clock cpu --long-context llava-3k llava-8k qwen2vl-3k  # long prompts
    python benchmarks/overhead.py --smoke               # CI: tiny model, 4 tokens, 1 repetition, batch 1 and 2
    python benchmarks/overhead.py --threads 1 --clock cpu --methods none vcd icd m3id pai   # CPU time, shared machine

``main(argv)`` returns the results dict (``rows``: one per model x batch x method).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

# Methods edited inside the one generate(), timed as apply() around it.
IN_PLAN = ("none", "vhr", "var", "act", "vcd", "icd", "m3id", "pai", "paint", "clearsight", "hgai", "avisc", "dola",
           "deco", "vista", "vti", "only", "memvr")
METHODS = (*IN_PLAN, "carve", "mvp", "opera", "heads")  # table rows
# Ratio to vanilla sdpa (the issues). A contrast stream is a second forward per step: its limit is 2. OPERA's is
# to vanilla beam search with its beams.
TIME_TARGETS = {"vhr": 1.10, "var": 1.25, "act": 1.25, "vcd": 2.1, "icd": 2.1, "m3id": 2.1, "pai": 2.2, "carve": 2.5,
                "clearsight": 1.25, "hgai": 1.25, "avisc": 2.1, "dola": 1.15, "deco": 1.15, "vista": 1.5, "vti": 1.1,
                "only": 1.15, "memvr": 1.25, "opera": 3.0}
OPERA_BEAMS = 5  # the release's num_beams
HEADS_MEMORY_TARGET = 1.2  # the statistics pass's peak memory / vanilla generate's
# Long prompts: every attention method and the statistics pass within these of vanilla (time; peak
# memory, total); CARVE (two statistics passes and a final pass by design) keeps 2.5.
LONG_TIME_TARGET, LONG_MEMORY_TARGET = 1.3, 1.25
LONG_ATTENTION_METHODS = ("vhr", "var", "act", "pai", "paint")  # edit attention inside the one decode: 1.3 / 1.25
PROMPT = "Describe the image in detail."
YES_NO_PROMPT = "Is there a dog in the image?"  # MVP answers yes/no questions (POPE)

# The ~118M-parameter random LLaVA of feasibility.md §4 (CLIP-S/16 at 224px: 196 image tokens).
SIZED_LLAVA = dict(text_layers=10, text_hidden=640, text_heads=10, vision_layers=6, vision_hidden=384,
                   image_size=224, patch_size=16, vocab_size=32064)
GPU_CONFIGS = ("llava-1.5-7b", "qwen2.5-vl-7b")
# Long-prompt models (random weights): a LLaVA with 8 px patches, whose image side sets the prompt
# (448 px: 3,136 image tokens, a 3,156-token prompt; 720 px: 8,100 and 8,120), the issue's
# measurement model; and a Qwen2-VL with 2 KV heads whose 1,540 px image gives 3,025 image tokens
# (110 x 110 patches of 14 px merged 2 x 2; a 3,049-token prompt).
LONG_LLAVA = dict(text_layers=4, text_hidden=512, text_heads=8, vision_layers=2, vision_hidden=128, patch_size=8,
                  vocab_size=32064, max_positions=16384)
LONG_QWEN = dict(text_layers=4, text_hidden=512, text_heads=8, kv_heads=2, vision_layers=2, vision_hidden=64,
                 patch_size=14)
LONG_SUBJECTS = {"llava-3k": ("llava", 448), "llava-8k": ("llava", 720), "qwen2vl-3k": ("qwen2_vl", 1540)}


# -- models ---------------------------------------------------------------------------------------
@dataclass
class Subject:
    """A model to benchmark: its handle, a label, the image side and a description."""

    label: str
    lvlm: Any
    image_size: int
    info: dict[str, Any] = field(default_factory=dict)
    long: bool = False  # a long-prompt model: the long-context targets apply


def register_methods() -> list[str]:
    """The registered method names (the registry imports every built-in on first use)."""
    from lvlm_fix.interventions import METHODS

    return METHODS.names()


def _describe(lvlm: Any) -> dict[str, Any]:
    m = lvlm.model
    text = lvlm.text_config
    vision = getattr(m.config, "vision_config", None)
    n_params = sum(p.numel() for p in m.parameters())
    return {
        "model_type": lvlm.adapter.model_type,
        "params": n_params,
        "dtype": str(m.dtype).replace("torch.", ""),
        "device": str(m.device),
        "text": f"{text.num_hidden_layers} layers x {text.hidden_size}, {text.num_attention_heads} heads "
                f"({getattr(text, 'num_key_value_heads', text.num_attention_heads)} KV), vocab {text.vocab_size}",
        "vision": (f"{getattr(vision, 'num_hidden_layers', getattr(vision, 'depth', '?'))} layers x "
                   f"{getattr(vision, 'hidden_size', '?')}, patch {getattr(vision, 'patch_size', '?')}")
        if vision is not None else None,
    }


def _static_bytes(lvlm: Any) -> int:
    m = lvlm.model
    return sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])


def load_subject(path: str | None, label: str, image_size: int, dtype: str, device: str | None) -> Subject:
    """Load a saved model (None: the embedded testbed) through :func:`lvlm_fix.load`."""
    import lvlm_fix

    lvlm = lvlm_fix.load(path, dtype=dtype, device=device)
    return Subject(label, lvlm, image_size, _describe(lvlm))


def testbed_subject(dtype: str, device: str | None, workdir: Path) -> Subject:
    """The embedded testbed; if its checkpoint is not there, a random-weight model of the same architecture."""
    from lvlm_fix.model import testbed_path

    if (testbed_path() / "config.json").exists():
        s = load_subject(None, "testbed", 96, dtype, device)
        s.info["weights"] = "trained (embedded checkpoint)"
        return s
    from lvlm_fix.testbed.model import ModelConfig, build_model, build_processor, build_tokenizer, save_testbed

    print("note: the embedded testbed checkpoint is missing; timing a random-weight model of its architecture",
          file=sys.stderr)
    torch.manual_seed(0)
    cfg = ModelConfig()
    tok = build_tokenizer()
    out = save_testbed(build_model(tok, cfg), build_processor(tok, cfg), workdir / "testbed-random")
    s = load_subject(str(out), "testbed (random weights)", cfg.image_size, dtype, device)
    s.info["weights"] = "random (testbed architecture; checkpoint not present)"
    return s


def sized_llava_subject(dtype: str, device: str | None, workdir: Path) -> Subject:
    from lvlm_fix.testing.tiny import build_llava_sized

    path = build_llava_sized(workdir / "llava-sized", **SIZED_LLAVA)
    s = load_subject(str(path), "llava-118M (random)", SIZED_LLAVA["image_size"], dtype, device)
    s.info.update(weights="random", config=dict(SIZED_LLAVA))
    return s


def long_subject(name: str, dtype: str, device: str | None, workdir: Path) -> Subject:
    """One of :data:`LONG_SUBJECTS`, built once into ``workdir``."""
    from lvlm_fix.testing.tiny import build_llava_sized, build_qwen2_vl_sized

    family, side = LONG_SUBJECTS[name]
    out = workdir / name
    if not (out / "config.json").exists():
        if family == "llava":
            build_llava_sized(out, image_size=side, **LONG_LLAVA)
        else:
            build_qwen2_vl_sized(out, image_size=side, **LONG_QWEN)
    s = load_subject(str(out), f"{name} (random)", side, dtype, device)
    s.long = True
    s.info.update(weights="random", config=dict(LONG_LLAVA if family == "llava" else LONG_QWEN, image_size=side))
    return s


def tiny_subject(workdir: Path) -> Subject:
    from lvlm_fix.testing.tiny import IMAGE_SIZE, build_tiny

    s = load_subject(str(build_tiny("llava", workdir / "tiny-llava")), "tiny-llava (random)", IMAGE_SIZE,
                     "float32", None)
    s.info["weights"] = "random"
    return s


def real_size_config(name: str, *, shrink: bool = False) -> tuple[Any, Any, int]:
    """``(config, processor, image side)`` of a real-size random-weight LLaVA-1.5-7B or Qwen2.5-VL-7B.

    Sizes are those of the released checkpoints' ``config.json`` (llava-hf/llava-1.5-7b-hf:
    Llama 32 x 4096, 32 heads, MLP 11008, vocab 32064, CLIP ViT-L/14 at 336px, 24 x 1024 -> 576
    image tokens; Qwen/Qwen2.5-VL-7B-Instruct: 28 x 3584, 28 heads, 4 KV heads, MLP 18944, vocab
    152064, M-RoPE [16, 24, 24], ViT 32 x 1280 with windowed attention, 336px -> 24 x 24 patches
    merged 2 x 2 -> 144 image tokens). The tokenizer is the tiny offline BPE (vocab_size only sizes
    the embeddings). ``shrink`` keeps the structure (image side, token counts) at toy widths, so
    the code path can be exercised on a CPU.
    """
    from transformers import CLIPImageProcessorPil, Qwen2_5_VLConfig, Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil

    from lvlm_fix.processors import image_only_processor
    from lvlm_fix.testing.tiny import _LLAVA_TOKENS, _QWEN_TOKENS, _llava, _token_ids, _tokenizer

    side = 336
    if name == "llava-1.5-7b":
        tok = _tokenizer(_LLAVA_TOKENS)
        text = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5)
        vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      projection_dim=768)
        vocab = 32064
        if shrink:
            text.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=4)
            vision.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
            vocab = 512
        config, processor = _llava(tok, text=text, vision=vision, image_size=side, patch_size=14)
        config.vision_feature_layer = -2  # LLaVA-1.5 reads the penultimate CLIP layer
        config.text_config.vocab_size = vocab
        processor.image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": side}, crop_size={"height": side, "width": side})
        return config, processor, side
    if name == "qwen2.5-vl-7b":
        tok = _tokenizer(_QWEN_TOKENS)
        text = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                    num_key_value_heads=4, max_position_embeddings=128000, rms_norm_eps=1e-6, vocab_size=152064,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                    tie_word_embeddings=False, **_token_ids(tok))
        vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                      fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu")
        if shrink:
            text.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=512,
                        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]})
            vision.update(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                          fullatt_block_indexes=[1])
        config = Qwen2_5_VLConfig(
            text_config=text, vision_config=vision, image_token_id=tok.image_token_id,
            video_token_id=tok.video_token_id, vision_start_token_id=tok.vision_bos_token_id,
            vision_end_token_id=tok.vision_eos_token_id,
        )
        image_processor = Qwen2VLImageProcessorPil(min_pixels=side * side, max_pixels=side * side, patch_size=14,
                                                   merge_size=2, temporal_patch_size=2)
        processor = image_only_processor(Qwen2_5_VLProcessor)(image_processor=image_processor, tokenizer=tok)
        return config, processor, side
    raise SystemExit(f"unknown --gpu-configs entry {name!r}; choose from {', '.join(GPU_CONFIGS)}")


def real_size_subject(name: str, device: str, dtype: str, *, shrink: bool = False) -> Subject:
    """Instantiate :func:`real_size_config` directly on ``device`` (no checkpoint is written).

    The handle is :func:`lvlm_fix.wrap` of the instantiated model, as :func:`lvlm_fix.load` builds it.
    """
    from transformers import AutoModelForImageTextToText

    from lvlm_fix.model import _resolve_dtype, wrap

    config, processor, side = real_size_config(name, shrink=shrink)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=_resolve_dtype(dtype))
    model.eval()
    tok = processor.tokenizer
    model.generation_config.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                   pad_token_id=tok.pad_token_id)
    lvlm = wrap(model, processor, name=name)
    s = Subject(f"{name} (random{', shrunk' if shrink else ''})", lvlm, side, _describe(lvlm))
    s.info["weights"] = "random"
    return s


def subjects_from_args(args: argparse.Namespace, workdir: Path) -> list[Subject]:
    """The models the arguments ask for (shared with eval_throughput.py)."""
    if args.smoke:
        return [tiny_subject(workdir)]
    if args.gpu_configs:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu-configs needs a CUDA GPU (torch.cuda.is_available() is False); "
                             "the CPU runs use the testbed model and --sized-llava")
        return [real_size_subject(n, args.device or "cuda", args.dtype if args.dtype != "auto" else "bfloat16")
                for n in args.gpu_configs]
    if getattr(args, "long_context", None):
        return [long_subject(n, args.dtype, args.device, workdir) for n in args.long_context]
    out = []
    if args.model is not None:
        label = "testbed" if args.model == "testbed" else Path(args.model).name
        out.append(testbed_subject(args.dtype, args.device, workdir) if args.model == "testbed"
                   else load_subject(args.model, label, 336, args.dtype, args.device))
    if args.sized_llava:
        out.append(sized_llava_subject(args.dtype, args.device, workdir))
    return out


# -- measurement ----------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# The clock of the timings (--clock). "cpu" is the process's CPU time, every thread's: on a shared
# CPU machine a single-threaded run then counts the work it does, not the time it waits for a core
# (its wall time moved by 2x within one round on the machine of BENCHMARKS.md). A GPU's work is
# seen by the wall clock only.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_call(fn: Callable[[], Any], device: torch.device, context: Callable[[], Any] = contextlib.nullcontext,
              clock: Callable[[], float] = time.perf_counter) -> float:
    """Time of one call of ``fn`` on ``clock``; ``context`` (e.g. switching the attention) is entered untimed."""
    with context(), torch.inference_mode():
        _sync(device)
        t0 = clock()
        fn()
        _sync(device)
        return clock() - t0


def cpu_peak_extra_bytes(fn: Callable[[], Any]) -> int:
    """Peak of the live bytes allocated through torch's CPU allocator during ``fn`` (see module doc).

    torch.profiler records the allocations of the thread that runs it only; work a method does on
    another thread is measured apart (:attr:`Config.side_work`).
    """
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof, torch.inference_mode():
        fn()
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    del prof
    _trim()
    events.sort(key=lambda e: e[0])
    live = peak = 0
    for _, n in events:
        live += n
        peak = max(peak, live)
    return peak


def peak_memory(c: Config, device: torch.device, static: int) -> tuple[int, int]:
    """``(total, extra)`` peak bytes of one call of the configuration."""
    with c.context():
        total, extra = _peak_memory(c.fn, device, static)
        if c.side_work is not None and device.type == "cpu":
            side = cpu_peak_extra_bytes(c.side_work)
            total, extra = total + side, extra + side
        return total, extra


def _peak_memory(fn: Callable[[], Any], device: torch.device, static: int) -> tuple[int, int]:
    if device.type == "cuda":
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        with torch.inference_mode():
            fn()
        torch.cuda.synchronize(device)
        total = torch.cuda.max_memory_allocated(device)
        return total, total - before
    extra = cpu_peak_extra_bytes(fn)
    return static + extra, extra


def top_ops(fn: Callable[[], Any], n: int = 12, context: Callable[[], Any] = contextlib.nullcontext) -> list[dict[str, Any]]:
    """The ``n`` torch ops with the most self time (CPU, or CUDA on a GPU) in one call of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with context(), profile(activities=acts) as prof, torch.inference_mode():
        fn()
    cuda = torch.cuda.is_available()
    rows = []
    for e in prof.key_averages():
        t = (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e3
        rows.append({"op": e.key, "self_ms": round(t, 2), "calls": e.count})
    rows.sort(key=lambda r: -r["self_ms"])
    return rows[:n]


# -- the configurations ---------------------------------------------------------------------------
@dataclass
class Config:
    name: str
    fn: Callable[[], Any]
    baseline: str  # the config its time ratio is taken against
    memory_baseline: str
    context: Callable[[], Any] = contextlib.nullcontext  # entered around the call, outside the timing
    # Work the call does on another thread, as a call of its own: its CPU peak is measured apart
    # and added (torch.profiler sees one thread). CUDA's counters see every thread already.
    side_work: Callable[[], Any] | None = None


def inputs(s: Subject, batch_size: int) -> tuple[list[Any], list[str], Any]:
    """``batch_size`` random images (seeds 0..b-1) with the same prompt, and their encoded batch."""
    from lvlm_fix.testing.tiny import build_image

    images = [build_image(seed, s.image_size) for seed in range(batch_size)]
    prompts = [PROMPT] * batch_size
    return images, prompts, s.lvlm.encode(images, prompts)


def build_configs(s: Subject, batch_size: int, new_tokens: int, methods: Sequence[str]) -> list[Config]:
    import lvlm_fix
    from lvlm_fix.diagnostics import head_statistics, record_head_statistics

    lvlm = s.lvlm
    images, prompts, batch = inputs(s, batch_size)
    gen = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "num_beams": 1}

    def vanilla() -> Any:
        return lvlm.model.generate(**batch, **gen)

    def applied(method: str | None, **extra: Any) -> Callable[[], Any]:
        params = method_params(method, s)

        def run() -> Any:
            with lvlm_fix.apply(lvlm, method, **params):
                return lvlm.model.generate(**batch, **{**gen, **extra})
        return run

    def api(method: str | None) -> Callable[[], Any]:
        def run() -> Any:
            return lvlm_fix.generate(lvlm, images, prompts, method, max_new_tokens=new_tokens,
                                     generate_kwargs={"min_new_tokens": new_tokens})
        return run

    def yes_no(method: str | None) -> Callable[[], Any]:
        params = {"caption_max_new_tokens": new_tokens} if method == "mvp" else {}

        def run() -> Any:  # stops at EOS, as a POPE evaluation does
            return lvlm_fix.generate(lvlm, images, [YES_NO_PROMPT] * batch_size, method, max_new_tokens=new_tokens,
                                     **params)
        return run

    def prefill() -> Any:
        b = lvlm.encode(images, prompts)
        return lvlm.model.generate(**b, max_new_tokens=1, do_sample=False)

    def text_only_prefill() -> Any:  # VHR's side thread, run whole (it stops at the last reinforced layer)
        return lvlm.model.generate(**lvlm.text_only(batch), max_new_tokens=1, do_sample=False)

    def heads() -> Any:
        if batch_size == 1:
            return head_statistics(lvlm, images[0], prompts[0])
        # The same passes on a batch of rows.
        return record_head_statistics(lvlm, lvlm.encode(images, prompts)).report()

    configs = [Config("vanilla", vanilla, "vanilla", "vanilla"), Config("sdpa", vanilla, "vanilla", "vanilla",
                                                                           lambda: lvlm.attention_implementation("sdpa"))]
    for m in methods:
        if m in IN_PLAN:
            configs.append(Config(m, applied(None if m == "none" else m), "vanilla", "vanilla",
                                  side_work=text_only_prefill if m == "vhr" else None))
        elif m == "carve":
            configs += [Config("api", api(None), "vanilla", "vanilla"), Config("carve", api("carve"), "api", "api")]
        elif m == "mvp":
            configs += [Config("yes_no", yes_no(None), "vanilla", "vanilla"),
                        Config("mvp", yes_no("mvp"), "yes_no", "yes_no")]
        elif m == "opera":  # its own beam search against generate()'s, with the same beams
            beams = {"num_beams": OPERA_BEAMS}
            configs += [Config("beams", applied(None, **beams), "vanilla", "vanilla"),
                        Config("opera", applied("opera", **beams), "beams", "beams")]
        elif m == "heads":
            configs += [Config("prefill", prefill, "vanilla", "vanilla"), Config("heads", heads, "prefill", "vanilla")]
    return configs


def method_params(method: str | None, s: Subject) -> dict[str, Any]:
    """The parameters a method is timed with beyond its defaults: VTI away from the testbed calibrates its
    directions on the testbed's caption pairs (cut short: 8 pairs, 4 masked copies) at the warm-up, untimed."""
    if method != "vti" or s.label == "testbed":
        return {}
    from lvlm_fix.testbed.caption_pairs import write_caption_pairs

    folder = Path(tempfile.mkdtemp(prefix="vti-demos-"))
    return {"demos": str(write_caption_pairs(8, folder)), "num_demos": 8, "num_trials": 4}


def measure(s: Subject, batch_size: int, new_tokens: int, reps: int, methods: Sequence[str],
            log: Callable[[str], None] = print, warmup: int = 1, clock: str = "wall") -> list[dict[str, Any]]:
    """Warm up and time ``reps`` interleaved rounds; one row per config (memory: :func:`add_memory`)."""
    configs = build_configs(s, batch_size, new_tokens, methods)
    by_name = {c.name: c for c in configs}
    device = s.lvlm.device
    times: dict[str, list[float]] = {c.name: [] for c in configs}
    for _ in range(warmup):
        for c in configs:
            time_call(c.fn, device, c.context)
    for r in range(reps):
        k = r % len(configs)
        for c in configs[k:] + configs[:k]:  # rotate the order every round
            times[c.name].append(time_call(c.fn, device, c.context, CLOCKS[clock]))
        log(f"  {s.label} b={batch_size} round {r + 1}/{reps} (load {_load():.1f}): "
            + ", ".join(f"{n} {t[-1]:.3f}s" for n, t in times.items()))
    rows = []
    for c in configs:
        base = by_name[c.baseline]
        ratios = [t / b for t, b in zip(times[c.name], times[base.name])]
        rows.append({
            "model": s.label, "batch": batch_size, "config": c.name, "baseline": c.baseline,
            "time_s": statistics.median(times[c.name]), "baseline_time_s": statistics.median(times[base.name]),
            "time_ratio": statistics.median(ratios), "time_ratio_min": min(ratios), "time_ratio_max": max(ratios),
            "times_s": times[c.name], "memory_baseline": c.memory_baseline,
            "peak_bytes": 0, "peak_extra_bytes": 0, "mem_ratio": float("nan"), "mem_extra_ratio": float("nan"),
        })
        time_target, memory_target = targets(c.name, s.long)
        row = rows[-1]
        parts = []
        if time_target is not None:
            parts.append(f"time <= {time_target}")
            row.update(time_target=time_target, time_met=bool(row["time_ratio"] <= time_target))
        if memory_target is not None:
            parts.append(f"peak memory <= {memory_target}" + (" x vanilla generate" if c.name == "heads" else ""))
            row.update(memory_target=memory_target, memory_met=None)  # until add_memory
        if parts:
            row["target"] = " and ".join(parts)
            row["meets_target"] = row.get("time_met") if memory_target is None else None
    return rows


def targets(config: str, long: bool) -> tuple[float | None, float | None]:
    """``(time, peak memory)`` ratio targets of a configuration (None: none)."""
    if long:
        if config in LONG_ATTENTION_METHODS:
            return LONG_TIME_TARGET, LONG_MEMORY_TARGET
        if config == "heads":
            return None, LONG_MEMORY_TARGET
        # CARVE (three passes) and the two-stream contrast methods keep their short-prompt time limits.
        return TIME_TARGETS.get(config), None
    return TIME_TARGETS.get(config), HEADS_MEMORY_TARGET if config == "heads" else None


def add_memory(s: Subject, batch_size: int, new_tokens: int, methods: Sequence[str],
               rows: list[dict[str, Any]]) -> None:
    """Peak memory of one extra (untimed) run of each config, filled into ``rows``."""
    configs = build_configs(s, batch_size, new_tokens, methods)
    static = _static_bytes(s.lvlm)
    mem = {c.name: peak_memory(c, s.lvlm.device, static) for c in configs}
    for row in rows:
        total, extra = mem[row["config"]]
        btotal, bextra = mem[row["memory_baseline"]]
        row.update(peak_bytes=total, peak_extra_bytes=extra,
                   mem_ratio=total / btotal if btotal else float("nan"),
                   mem_extra_ratio=extra / bextra if bextra else float("nan"))
        if row["config"] == "heads":
            _, pextra = mem["prefill"]
            row["mem_extra_ratio_vs_prefill"] = extra / pextra if pextra else float("nan")
        if "memory_target" in row:
            row["memory_met"] = bool(row["mem_ratio"] <= row["memory_target"])
            row["meets_target"] = row["memory_met"] and row.get("time_met", True)


# -- output ---------------------------------------------------------------------------------------
_LABELS = {
    "sdpa": "stock sdpa (attn_implementation='sdpa')",
    "none": "none (lvlm-fix, empty plan)",
    "api": "lvlm_fix.generate(method=None)",
    "prefill": "prefill only (generate, 1 token)",
    "heads": "heads (statistics pass, prefill only)",
    "yes_no": "lvlm_fix.generate(method=None), a POPE question",
    "mvp": "mvp (same POPE question)",
}


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def format_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of the rows (all models and batch sizes)."""
    head = ("| model | batch | method | vs | time (s) | time ratio (min-max) | peak MiB (total) | ratio "
            "| peak extra MiB | extra ratio | target |")
    lines = [head, "|---|---:|---|---|---:|---|---:|---:|---:|---:|---|"]
    for r in rows:
        if r["config"] == "vanilla":
            ratio = "1 (baseline)"
        else:
            ratio = f"{r['time_ratio']:.3f} ({r['time_ratio_min']:.3f}-{r['time_ratio_max']:.3f})"
        tgt = ""
        if "target" in r:
            tgt = r["target"] + (": **yes**" if r["meets_target"] else (": **NO**" if r["meets_target"] is False else ""))
        lines.append(
            f"| {r['model']} | {r['batch']} | {_LABELS.get(r['config'], r['config'])} | {r['baseline']} "
            f"| {r['time_s']:.3f} | {ratio} | {_mib(r['peak_bytes'])} | {r['mem_ratio']:.3f} "
            f"| {_mib(r['peak_extra_bytes'])} | {r['mem_extra_ratio']:.2f} | {tgt} |")
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    import transformers

    info = {
        "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "processor": platform.processor() or platform.machine(),
    }
    with contextlib.suppress(OSError):
        info["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]
    with contextlib.suppress(OSError, StopIteration):
        info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                                 if line.startswith("model name"))
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def common_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--smoke", action="store_true",
                   help="CI mode: tiny random LLaVA, a few tokens, 1 repetition, batch 1 and 2")
    p.add_argument("--model", default="testbed",
                   help="model directory or hub id; 'testbed' (default) = the embedded testbed; 'none' = skip it")
    p.add_argument("--sized-llava", action="store_true",
                   help="also run the ~118M random LLaVA (Llama 10x640 + CLIP 6x384, 224px/16: 196 image tokens)")
    p.add_argument("--gpu-configs", nargs="+", choices=GPU_CONFIGS, default=None,
                   help="real-size random-weight configs on CUDA in bf16 at 336px (needs a GPU; replaces the CPU models)")
    p.add_argument("--device", default=None, help="device for --model/--sized-llava (default: CPU)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16 (default auto; bf16 for --gpu-configs)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's default; smoke: 1, which is robust on a busy machine)")
    p.add_argument("--workdir", default=None, help="where built models are saved (default: a temporary folder)")
    p.add_argument("--json", default=None, help="write the results dict to this file")
    return p


def parse(argv: Sequence[str] | None, parser: argparse.ArgumentParser) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if args.model in ("none", ""):
        args.model = None
    return args


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run with ``n`` torch CPU threads (None: unchanged), restoring the previous count after."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = common_parser(__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default 1 16 (smoke: 1 2)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens generated per call (default 128; smoke 4)")
    p.add_argument("--reps", type=int, default=None,
                   help="timed rounds after the warm-up (default 5; smoke 1; --long-context 2)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed calls of every configuration first (default 1; --long-context 0: a call takes "
                        "seconds there, so first-call costs do not weigh)")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall (default) or cpu: the process's CPU time, robust to other tenants of a shared CPU "
                        "machine (use with --threads 1; CPU runs only)")
    p.add_argument("--long-context", nargs="+", default=None, choices=list(LONG_SUBJECTS),
                   help="long-prompt random models instead of the CPU models (default batch 1 4, 8 new tokens)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    p.add_argument("--profile", action="store_true",
                   help="for every method missing its target, print the top torch ops of one call (and vanilla's)")
    args = parse(argv, p)
    if args.clock == "cpu" and (args.gpu_configs or (args.device or "cpu").startswith("cuda")):
        raise SystemExit("--clock cpu cannot see GPU work; time a GPU with --clock wall")
    with torch_threads(args.threads or (1 if args.smoke else None)):
        return _run(args, argv)


def _run(args: argparse.Namespace, argv: Sequence[str] | None) -> dict[str, Any]:
    long = bool(args.long_context)
    batch_sizes = args.batch_sizes or ([1, 2] if args.smoke else [1, 4] if long else [1, 16])
    new_tokens = args.new_tokens or (4 if args.smoke else 8 if long else 128)
    reps = args.reps or (1 if args.smoke else 2 if long else 5)
    warmup = args.warmup if args.warmup is not None else (0 if long else 1)
    registered = register_methods()
    missing = [m for m in args.methods if m not in ("none", "heads") and m not in registered]
    if missing:
        raise SystemExit(f"methods not registered yet: {missing} (registered: {registered})")
    quiet = args.smoke
    log = (lambda _msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))

    results: dict[str, Any] = {
        "machine": machine_info(),
        "settings": {"batch_sizes": batch_sizes, "new_tokens": new_tokens, "reps": reps, "prompt": PROMPT,
                     "greedy": True, "min_new_tokens": new_tokens, "warmup_runs": warmup, "clock": args.clock, "argv": list(argv or sys.argv[1:])},
        "models": {}, "rows": [], "profiles": {},
    }
    with tempfile.TemporaryDirectory(prefix="lvlm-fix-bench-") as tmp:
        workdir = Path(args.workdir or tmp)
        runs = []
        for s in subjects_from_args(args, workdir):
            results["models"][s.label] = s.info
            log(f"{s.label}: {s.info}")
            for b in batch_sizes:
                rows = measure(s, b, new_tokens, reps, args.methods, log=log, warmup=warmup, clock=args.clock)
                results["rows"] += rows
                runs.append((s, b, rows))
                if args.profile:
                    results["profiles"].update(_profiles(s, b, new_tokens, rows, log, "time"))
        for s, b, rows in runs:  # memory runs, untimed, after all timing
            if not args.no_memory:
                add_memory(s, b, new_tokens, args.methods, rows)
                if args.profile:
                    results["profiles"].update(_profiles(s, b, new_tokens, rows, log, "memory"))
    with contextlib.suppress(OSError):
        results["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    table = format_table(results["rows"])
    results["table"] = table
    if not quiet:
        print(table)
        print(f"\nload average at start {results['machine'].get('loadavg_start')}, "
              f"at end {results['machine'].get('loadavg_end')}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return results


def _profiles(s: Subject, b: int, new_tokens: int, rows: list[dict[str, Any]],
              log: Callable[[str], None], what: str) -> dict[str, Any]:
    """For every ``what`` ("time" or "memory") target missed: top ops (time) or the allocation
    peak's site (memory), beside vanilla's."""
    missed = [r["config"] for r in rows if r.get("time_met" if what == "time" else "memory_met") is False]
    if not missed:
        return {}
    configs = {c.name: c for c in build_configs(s, b, new_tokens, missed)}
    out: dict[str, Any] = {}
    timed = missed if what == "time" else []
    for name in (["vanilla", *(["api"] if "carve" in timed else []), *timed] if timed else []):
        ops = top_ops(configs[name].fn, context=configs[name].context)
        out[f"{s.label} b={b} {name}"] = ops
        log(f"\nprofile: {s.label} b={b} {name} (top ops by self time)")
        for o in ops:
            log(f"  {o['self_ms']:10.1f} ms  {o['calls']:7d}x  {o['op']}")
    if "vhr" in timed:
        out[f"{s.label} b={b} vhr breakdown"] = br = vhr_breakdown(s, b)
        log(f"\nvhr breakdown (median of 3, prefill-only calls): {br}")
    if what == "memory" and s.lvlm.device.type == "cpu":
        for name in ("vanilla", *missed):
            with configs[name].context():
                out[f"{s.label} b={b} {name} memory peak"] = site = cpu_peak_site(configs[name].fn)
            log(f"\nmemory peak: {s.label} b={b} {name}: {site}")
    return out


def vhr_breakdown(s: Subject, batch_size: int, reps: int = 3) -> dict[str, Any]:
    """Where VHR's extra time goes, from prefill-only calls (medians of ``reps``).

    ``vhr_prefill_s``: a prefill with VHR (its selection runs inside it, beside the text-only
    stream); ``prefill_s``: a vanilla prefill of the same rows; ``text_rows_s``: the text-only
    stream alone, a plain prefill of the rows without image tokens at their own length (VHR's
    irreducible extra work).
    """
    import lvlm_fix

    lvlm = s.lvlm
    _, _, batch = inputs(s, batch_size)
    device = lvlm.device
    text = lvlm.text_only(batch)
    one = {"max_new_tokens": 1, "do_sample": False}

    def with_vhr() -> None:
        with lvlm_fix.apply(lvlm, "vhr"):
            lvlm.model.generate(**batch, **one)

    runs = [(time_call(with_vhr, device), time_call(lambda: lvlm.model.generate(**batch, **one), device),
             time_call(lambda: lvlm.model.generate(**text, **one), device)) for _ in range(reps)]
    med = lambda xs: round(statistics.median(xs), 4)  # noqa: E731
    return {"vhr_prefill_s": med([r[0] for r in runs]), "prefill_s": med([r[1] for r in runs]),
            "text_rows_s": med([r[2] for r in runs]), "prompt_len": int(batch["input_ids"].shape[1]),
            "text_only_len": int(text["input_ids"].shape[1])}


def cpu_peak_site(fn: Callable[[], Any]) -> dict[str, Any]:
    """The CPU allocation peak of one call of ``fn`` and the ops running when it was reached (outer to inner).

    No ``record_shapes``: with it the profiler itself needs gigabytes on a 128-token batch-16 call.
    """
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof, torch.inference_mode():
        fn()
    events = prof.profiler.kineto_results.events()
    live = peak = 0
    at = 0
    for t, n in sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"):
        live += n
        if live > peak:
            peak, at = live, t
    ops = sorted((e for e in events if e.name() != "[memory]" and e.start_ns() <= at <= e.end_ns()),
                 key=lambda e: e.start_ns())
    del prof, events
    _trim()
    return {"peak_extra_mib": round(peak / 2**20, 1), "ops": [e.name() for e in ops][-4:]}


def _load() -> float:
    """The 1-minute load average (nan where the OS has none): the machine is shared, so each round logs it."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def _trim() -> None:
    """Give freed heap memory back to the OS (glibc), so profiled runs do not pile up RSS."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


if __name__ == "__main__":
    main()
