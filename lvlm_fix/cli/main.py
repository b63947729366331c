"""The ``lvlm-fix`` command: a thin shell over the Python API.

Every subcommand parses, calls one API function, and prints. Heavy imports happen inside the
commands so ``lvlm-fix --help`` stays instant. User errors (bad values, missing files, unknown
names) print one line and exit with code 2.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import re
import sys
import typing
import warnings
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import click

from ..errors import ConfigError, InputError, LvlmFixError, LvlmFixWarning, strict_bool

EXAMPLES = """
\b
Examples:
  lvlm-fix run --method vhr                                  # embedded testbed model and scene
  lvlm-fix run --model llava-hf/llava-1.5-7b-hf --image cat.jpg --prompt "Is there a dog?" --method var --compare
  lvlm-fix run --model DIR --jsonl rows.jsonl --batch-size 16 --method vhr+var --out answers/
  lvlm-fix heads --model DIR --image cat.jpg --prompt "Describe the image." --out heads/
  lvlm-fix eval --bench pope --split adversarial --methods none,vhr,var --limit 200 --out results/
  lvlm-fix score --bench chair --coco-annotations annotations/ --captions captions.jsonl --out scored/
  lvlm-fix eval --bench pope --methods none,vhr:alpha=1.5,vhr:alpha=2 --out sweep/ && lvlm-fix report sweep/
"""


ARTIFACT_DIR = "lvlm-fix-out"
TESTBED_SCENE = "<testbed scene>"  # answers.jsonl's "image" for the testbed's own scene (no file)


# -- method flags generated from the config dataclasses -------------------------------------------
def _method_fields() -> dict[str, tuple[Any, list[str], str]]:
    """field name -> (type, methods having it, help) over every registered method config."""
    from ..interventions import METHODS

    fields: dict[str, tuple[Any, list[str], str]] = {}
    for name in METHODS.names():
        cfg = METHODS.get(name).config_cls
        hints = typing.get_type_hints(cfg)
        for f in dataclasses.fields(cfg):
            typ, owners, help_ = fields.get(f.name, (hints[f.name], [], ""))
            owners.append(name)
            text = f.metadata.get("help", "")
            help_ = help_ + (" | " if help_ else "") + f"[{name}] {text}"
            fields[f.name] = (typ, owners, help_)
    return fields


class _IntTuple(click.ParamType):
    name = "INTS"

    def convert(self, value: Any, param: Any, ctx: Any) -> tuple[int, ...]:
        if isinstance(value, tuple):
            return value
        try:
            ints = tuple(int(v) for v in str(value).split(",") if v.strip())
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of integers, e.g. 1,18,19", param, ctx)
        if not ints:  # an empty list would run the method on nothing, without a word
            self.fail(f"{value!r} names no integer; give e.g. 1,18,19, or leave the flag out for the default", param, ctx)
        return ints


def _click_type(typ: Any) -> Any:
    args = [a for a in get_args(typ) if a is not type(None)]
    if get_origin(typ) is Literal:
        return click.Choice([str(a) for a in get_args(typ)])
    if typ in (int, float, str):
        return typ
    if args and (get_origin(args[0]) is tuple or args[0] is tuple):
        return _IntTuple()
    if len(args) == 1:
        return _click_type(args[0])
    return str


METHOD_PARAMS_HELP = ("Method parameters: `lvlm-fix list METHOD` prints each one's name, default, range, source and "
                      "meaning. Set one as --FIELD VALUE (e.g. --alpha 1.5, --outlier-filter/--no-outlier-filter), "
                      "--set METHOD.FIELD=VALUE, or inline in the spec, METHOD:FIELD=VALUE.")


def method_options(command: click.Command) -> click.Command:
    """Add one ``--flag`` per method config field (shared by methods with the same field).

    The flags are hidden from ``--help`` (a flag shared by six methods would print six meanings there); the
    command's help points to ``lvlm-fix list METHOD``, which prints each method's own."""
    for field, (typ, owners, help_) in sorted(_method_fields().items()):
        flag = "--" + field.replace("_", "-")
        if typ is bool:
            opt = click.Option([f"{flag}/--no-{field.replace('_', '-')}", field], default=None, help=help_, hidden=True)
        else:
            opt = click.Option([flag, field], type=_click_type(typ), default=None, help=help_, hidden=True)
        command.params.append(opt)
    command.help = f"{command.help}\n\n{METHOD_PARAMS_HELP}"
    return command


def _split_method_params(kwargs: dict[str, Any]) -> dict[str, Any]:
    names = set(_method_fields())
    return {k: kwargs.pop(k) for k in list(kwargs) if k in names and kwargs[k] is not None}


SET_HELP = ("a parameter of one method, METHOD.FIELD=VALUE (repeatable), e.g. --set vhr.layers=1 --set var.layers=2; "
            "needed when composed methods share a field. Values: numbers, true/false, lists as 1,2 or [1,2].")


def _parse_sets(sets: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """``("vhr.layers=1", "var.tau=3.5")`` -> ``{"vhr": {"layers": 1}, "var": {"tau": 3.5}}``."""
    from ..interventions import METHODS, parse_value
    from ..errors import UnknownNameError

    out: dict[str, dict[str, Any]] = {}
    for item in sets:
        target, eq, value = item.partition("=")
        method, dot, key = target.strip().partition(".")
        if not eq or not dot or not method or not key:
            raise ConfigError(f"--set {item!r} is not METHOD.FIELD=VALUE; write e.g. --set vhr.alpha=1.5")
        if method not in METHODS:
            raise UnknownNameError("method", method, METHODS.names())
        if key in out.setdefault(method, {}):
            raise ConfigError(f"--set {method}.{key} is given twice; give it once")
        out[method][key] = parse_value(value)
    return out


def _params_for(spec: str, flat: dict[str, Any], sets: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The arguments of ``build_methods(spec, ...)``: the ``--set`` entries and flat flags this spec takes."""
    from ..interventions import method_fields, parse_spec

    names = [n for n, _ in parse_spec(spec)]
    fields = {f for n in names for f in method_fields(n)}
    return {"params": {m: p for m, p in sets.items() if m in names},
            **{k: v for k, v in flat.items() if k in fields}}


def _check_all_used(specs: list[str], flat: dict[str, Any], sets: dict[str, dict[str, Any]]) -> None:
    """A flag or ``--set`` that no listed method takes is an error, not silently dropped."""
    from ..interventions import method_fields, parse_spec

    names = {n for spec in specs for n, _ in parse_spec(spec)}
    for method in sets:
        if method not in names:
            raise ConfigError(f"--set names method {method!r}, which is not in {', '.join(specs)}")
    fields = {f for n in names for f in method_fields(n)}
    for key in flat:
        if key not in fields:
            raise ConfigError(f"--{key.replace('_', '-')} is not a parameter of any of {', '.join(specs)}")


# -- shared options -----------------------------------------------------------------------------------
def _model_options(f: Any) -> Any:
    f = click.option("--device", default=None, help="torch device, e.g. cuda:0 (default: the checkpoint's / CPU).")(f)
    f = click.option("--device-map", default=None, help="accelerate device map, e.g. auto (models larger than one GPU).")(f)
    f = click.option("--dtype", default="auto", show_default=True, help="auto, float32, bfloat16 or float16.")(f)
    f = click.option("--revision", default=None, help="hub revision of --model.")(f)
    f = click.option("--trust-remote-code", is_flag=True, help="allow the model repository's own code.")(f)
    f = click.option("--processor-args", default=None, metavar="K=V,...",
                     help="keyword arguments for the processor's from_pretrained, e.g. max_pixels=200704 (Qwen).")(f)
    f = click.option("--model-args", default=None, metavar="K=V,...",
                     help="keyword arguments for the model's from_pretrained, e.g. attn_implementation=eager or "
                          "quantization_config={\"load_in_4bit\":true} (K=V pairs or one JSON object).")(f)
    f = click.option("--model", "model_name", default=None,
                     help="hub id or local directory (default: the embedded testbed model).")(f)
    return f


def _kwargs(text: str | None, option: str) -> dict[str, Any]:
    """``--model-args`` / ``--processor-args``: a JSON object or ``k=v,k=v`` (values read as in method specs)."""
    from ..interventions import parse_value
    from ..interventions.registry import split_specs

    if not text:
        return {}
    if text.lstrip().startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{option} {text!r} is not a JSON object ({e.msg}); write k=v,k=v or {{\"k\": v}}") from None
        if not isinstance(value, dict):
            raise InputError(f"{option} {text!r} is not a JSON object; write k=v,k=v or {{\"k\": v}}")
        return value
    out = {}
    for item in split_specs(text):
        key, eq, value = item.partition("=")
        if not eq or not key.strip().isidentifier():
            raise InputError(f"{option}: {item!r} is not key=value; write e.g. {option} attn_implementation=eager")
        out[key.strip()] = parse_value(value)
    return out


DEFAULT_PROMPT = "Please describe this image in detail."
SEED = click.IntRange(0, 2**32 - 1)  # what numpy's generators and torch.manual_seed both take


def _check_device(device: str | None) -> None:
    """A device torch can use here, or one line naming it and the fix (before any weight is loaded)."""
    from ..devices import check_device  # imports torch only for a cuda or mps name

    check_device(device, "--device")


def _out_dir(out: str, option: str, owned: tuple[str, ...]) -> Path:
    """Create the output folder now (before any work), refusing a file, an unwritable place, a full
    disk, or earlier results that this command would overwrite (``owned``: the files it writes)."""
    from ..evals.store import check_out_dir

    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise InputError(f"{option} {out} is a file; give a folder (e.g. {option} {path.parent / (path.stem + '_out')})")
    taken = [name for name in owned if (path / name).exists()]
    if taken:
        raise InputError(f"{path / taken[0]} already exists; choose a new {option} folder or move the old results away")
    return check_out_dir(path, option)


def _out_file(out: str, option: str, force: bool) -> Path:
    """An output file checked before any work: its folder writable with room left, and no earlier
    file replaced unless ``force``."""
    from ..evals.store import check_out_dir

    path = Path(out).expanduser()
    if path.is_dir():
        raise InputError(f"{option} {out} is a folder; give a file name (e.g. {option} {path / 'heads.json'})")
    if path.exists() and not force:
        raise InputError(f"{option} {out} already exists; choose a new name, or pass --force to replace it")
    check_out_dir(path.parent, f"the folder of {option}")
    return path


def _is_testbed(model_name: str | None) -> bool:
    from ..model import DEFAULT_MODEL

    return model_name in (None, DEFAULT_MODEL)


MODEL_PARAMS = ("model_name", "dtype", "device", "device_map", "revision", "trust_remote_code", "model_args",
                "processor_args")


def _model_params(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Take the model options out of a command's arguments and check them (before any weight is loaded)."""
    opts = {k: kwargs.pop(k) for k in MODEL_PARAMS}
    _check_device(opts["device"])
    opts["model_args"] = _kwargs(opts["model_args"], "--model-args")
    for key, flag in (("dtype", "--dtype"), ("torch_dtype", "--dtype"), ("device", "--device"),
                      ("device_map", "--device-map"), ("revision", "--revision")):
        if key in opts["model_args"]:  # said twice, in two places: refuse rather than pick one
            raise InputError(f"--model-args {key}=... duplicates {flag}; give it as {flag}")
    if "trust_remote_code" in opts["model_args"]:  # said in --model-args too: read strictly, and once
        said = strict_bool("trust_remote_code", opts["model_args"].pop("trust_remote_code"))
        if opts["trust_remote_code"] and not said:
            raise InputError("--trust-remote-code and --model-args trust_remote_code=false disagree; give one")
        opts["trust_remote_code"] = said
    opts["processor_args"] = _kwargs(opts["processor_args"], "--processor-args")
    return opts


def _load(opts: dict[str, Any]):
    """The model of ``opts`` (from :func:`_model_params`); the testbed when no or ``testbed`` model is named."""
    import os

    from .. import model as model_mod

    device = opts["device"]
    if device is None and opts["device_map"] is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch
        from accelerate import PartialState  # under `accelerate launch` / torchrun: one device per process

        device = str(PartialState(cpu=not torch.cuda.is_available()).device)
    name = None if _is_testbed(opts["model_name"]) else opts["model_name"]
    return model_mod.load(name, dtype=opts["dtype"], device=device, device_map=opts["device_map"],
                          revision=opts["revision"], trust_remote_code=opts["trust_remote_code"],
                          processor_kwargs=opts["processor_args"], **opts["model_args"])


def _check_prompt(prompt: str | None) -> str:
    if prompt is not None and not prompt.strip():
        raise InputError("--prompt is empty; give the question, or leave --prompt out for the default "
                         f"({DEFAULT_PROMPT!r})")
    return prompt if prompt is not None else DEFAULT_PROMPT


def _default_image(model_name: str | None, image: str | None) -> tuple[Any, list[str] | None]:
    """The image to use and, for the testbed's own scene, the objects in it: the file given (loaded and
    checked now; objects unknown), or on the testbed a synthetic scene the benchmark does not use."""
    from ..images import load_image

    if image is not None:
        return load_image(image), None
    if not _is_testbed(model_name):
        raise InputError("--image is required with --model; pass an image file")
    from ..testbed.world import World

    world = World()  # a validation-stream scene the benchmark does not use (stream 999)
    scene = world.scene("val", 0, stream=999, min_categories=3)
    return world.render(scene), sorted(set(scene.categories))


def _read_jsonl(path: str) -> list[dict[str, str]]:
    """Rows ``{"image": path, "prompt": text}``, every image checked readable now; ``image`` stays as written and
    ``image_resolved`` is its absolute path (a relative path is read relative to the file)."""
    from ..images import check_image_file

    p = Path(path)
    if not p.is_file():
        raise InputError(f"jsonl file not found: {p}; pass an existing file")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:  # replaced characters would reach the model as a prompt nobody wrote
        line = raw[: e.start].count(b"\n") + 1
        raise InputError(f"{p}:{line} is not UTF-8 text; save the file as UTF-8") from None
    rows = []
    for i, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{p}:{i}: not valid JSON ({e.msg}); each line must be {{\"image\": ..., \"prompt\": ...}}") from None
        if not isinstance(row, dict) or not isinstance(row.get("image"), str) or not isinstance(row.get("prompt"), str):
            raise InputError(f"{p}:{i}: each line needs string fields \"image\" and \"prompt\"; got {line.strip()[:80]}")
        if not row["prompt"].strip():
            raise InputError(f"{p}:{i}: the prompt is empty; give each row its question")
        img = Path(row["image"]).expanduser()
        where = str(img if img.is_absolute() or "://" in row["image"] else p.parent / img)
        try:  # decoded whole: a bad or truncated image must stop the run before any answer is generated
            row["image_resolved"] = str(check_image_file(where).resolve())
        except InputError as e:
            raise InputError(f"{p}:{i}: {e}") from None
        rows.append(row)
    if not rows:
        raise InputError(f"{p} has no rows; add lines like {{\"image\": \"cat.jpg\", \"prompt\": \"Is there a dog?\"}}")
    return rows


# -- commands -------------------------------------------------------------------------------------
@click.group(epilog=EXAMPLES, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="lvlm-fix")
def cli() -> None:
    """Inference-time hallucination fixes for Hugging Face vision-language models."""


@cli.command("list")
@click.argument("method", required=False)
def list_cmd(method: str | None) -> None:
    """List the methods and evals; with METHOD, that method's parameters."""
    from ..interventions import METHODS

    if method is not None:
        _list_params(method)
        return
    click.echo("methods (name, stage, what it does):")
    width = max(8, *(len(n) for n in METHODS.names()))  # one column whatever the longest name
    click.echo(f"  {'none':{width}s} {'-':18s} the vanilla model (baseline)")
    for name in METHODS.names():
        cls = METHODS.get(name)
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        click.echo(f"  {name:{width}s} {cls.stage.name.lower():18s} {doc}")
    click.echo("evals:")
    from ..evals.runner import list_benches

    for name, doc in list_benches().items():
        click.echo(f"  {name:8s} {doc}")


@cli.command("demo")
@click.option("--method", default="mvp", show_default=True,
              help="the method to show beside the baseline (a method spec, as run's --method).")
@click.option("--task", type=click.Choice(["yes-no", "caption"]), default="yes-no", show_default=True,
              help="yes-no: POPE's adversarial questions; caption: CHAIR's caption prompt.")
@click.option("--examples", default=2, show_default=True, type=click.IntRange(1, 10), help="how many examples.")
def demo_cmd(method: str, task: str, examples: int) -> None:
    """On the embedded testbed: the first samples of its benchmark where the baseline contradicts the scene, the
    method's answer beside it, what contradicts the scene marked, and the method's effect over the whole split."""
    from ..interventions import build_methods

    build_methods(method)  # checked before the model loads
    from ..extras import check_installed

    check_installed("lvlm-fix demo", "nltk", "inflect")  # it reads answers with CHAIR's and POPE's scorers
    from ..demo import run_demo
    from ..model import load

    for line in run_demo(load(None), method, task, n=examples):
        click.echo(line)


def _list_params(method: str) -> None:
    """A method's parameters as its config declares them (the table of its docs page): name, type, default, range,
    source and the first sentence of the help."""
    from ..errors import UnknownNameError
    from ..interventions import METHODS

    if method not in METHODS:
        raise UnknownNameError("method", method, METHODS.names())
    cls = METHODS.get(method)
    click.echo(f"{method} ({cls.stage.name.lower()}): {(cls.__doc__ or '').strip().splitlines()[0]}")
    for d in cls.config_cls.param_docs():
        rng = f", range {d.range}" if d.range else ""
        click.echo(f"  {d.name}  ({d.type}, default {d.default!r}{rng})" if d.type == "str" and d.default != "None"
                   else f"  {d.name}  ({d.type}, default {d.default}{rng})")
        click.echo(f"      {d.meaning}")
        click.echo(f"      source: {d.source}")
    click.echo(f"Set: --set {method}.FIELD=VALUE, inline --method {method}:FIELD=VALUE, or --FIELD VALUE (underscores "
               "as dashes). The whole help of each parameter: the method's page of the docs.")


def _generation_options(f: Any) -> Any:
    """Decoding flags shared by run and eval (eval: None keeps the bench preset's setting)."""
    f = click.option("--repetition-penalty", default=None, type=click.FloatRange(min=0, min_open=True),
                     help="generate()'s repetition_penalty (default: none).")(f)
    f = click.option("--top-p", default=None, type=click.FloatRange(0, 1, min_open=True),
                     help="nucleus sampling mass, with --do-sample.")(f)
    f = click.option("--temperature", default=None, type=click.FloatRange(min=0, min_open=True),
                     help="sampling temperature, with --do-sample.")(f)
    return f


def _generation_kwargs(do_sample: bool | None, temperature: float | None, top_p: float | None,
                       repetition_penalty: float | None) -> dict[str, Any]:
    """The generate() arguments the decoding flags set (unset flags are left out)."""
    if (temperature is not None or top_p is not None) and do_sample is False:
        raise InputError("--temperature and --top-p apply to sampling; add --do-sample")
    out = {"temperature": temperature, "top_p": top_p, "repetition_penalty": repetition_penalty}
    return {k: v for k, v in out.items() if v is not None}


@cli.command("run", epilog=EXAMPLES)
@_model_options
@click.option("--image", default=None, help="image file (default on the testbed: a synthetic scene).")
@click.option("--prompt", default=None, help=f'user prompt (default: "{DEFAULT_PROMPT}").')
@click.option("--system-prompt", default=None, help="a system message before the user turn (default: none).")
@click.option("--jsonl", default=None, help='rows {"image": path, "prompt": text} to run batched.')
@click.option("--method", default="none", show_default=True,
              help="a method spec: a method, several joined by + (vhr+var), parameters inline (vhr:alpha=1.5), or none.")
@click.option("--set", "sets", multiple=True, metavar="METHOD.FIELD=VALUE", help=SET_HELP)
@click.option("--compare", is_flag=True, help="also run the baseline and print both, with what the method touched.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--do-sample", is_flag=True, help="sample instead of greedy decoding.")
@_generation_options
@click.option("--num-beams", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=0, show_default=True, type=SEED)
@click.option("--out", default=None,
              help=f"folder for answers.jsonl and reports.jsonl (written batch by batch) and method artifacts "
                   f"(with --compare and no --out, artifacts go to ./{ARTIFACT_DIR}).")
def run_cmd(image, prompt, system_prompt, jsonl, method, sets, compare, batch_size, max_new_tokens, do_sample,
            temperature, top_p, repetition_penalty, num_beams, seed, out, **kwargs) -> None:
    """Generate answers with a method applied (optionally beside the baseline)."""
    from ..interventions import build_methods

    # Every input is checked before any weight is loaded or any file written.
    model_opts = _model_params(kwargs)
    flat = _split_method_params(kwargs)
    method_args = {"params": _parse_sets(sets), **flat}
    methods = build_methods(method, **method_args)
    if jsonl and (image or prompt is not None):
        raise InputError("--jsonl takes its images and prompts from the file; drop --image and --prompt")
    if system_prompt is not None and not system_prompt.strip():
        raise InputError("--system-prompt is empty; give the system message or leave the flag out")
    extra = _generation_kwargs(do_sample, temperature, top_p, repetition_penalty)
    truth: list[str] | None = None  # the objects of the testbed's default scene, to mark hallucinations
    # Each item: what the model is shown (a path, or an image already loaded), the prompt, and how answers.jsonl
    # names the image: the path the user gave and where it resolved, or the testbed's own scene.
    if jsonl:
        items = [(r["image_resolved"], r["prompt"], {"image": r["image"], "image_resolved": r["image_resolved"]})
                 for r in _read_jsonl(jsonl)]
    else:
        img, truth = _default_image(model_opts["model_name"], image)
        shown = ({"image": TESTBED_SCENE} if image is None
                 else {"image": image, "image_resolved": str(Path(image).expanduser().resolve())})
        items = [(img, _check_prompt(prompt), shown)]
    out_dir = _out_dir(out, "--out", ("answers.jsonl", "reports.jsonl")) if out else None

    from tqdm import tqdm

    from ..api import generate
    from ..demo import MARK_LEGEND, mark_against_scene
    from ..images import load_image

    if truth is not None:  # marking reads the answers with CHAIR's extractor (inflect): without it, plain answers
        from ..extras import MissingExtraError, check_installed

        try:
            check_installed("marking what contradicts the scene", "inflect")
        except MissingExtraError as e:
            click.echo(f"note: {e}", err=True)
            truth = None
    lvlm = _load(model_opts)
    gen = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, num_beams=num_beams, seed=seed,
               generate_kwargs=extra or None, system_prompt=system_prompt)
    if truth is not None:
        click.echo(f"scene (the testbed knows what it drew): {', '.join(truth)}")
    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    done, marked = 0, False
    for batch in tqdm(batches, desc="generating", unit="batch", disable=len(batches) == 1, file=sys.stderr):
        imgs = [load_image(x) if isinstance(x, str) else x for x, _, _ in batch]
        prompts = [p for _, p, _ in batch]
        res = generate(lvlm, imgs, prompts, method, **gen, **method_args)
        base = generate(lvlm, imgs, prompts, None, **gen) if compare and methods else None
        rows = []
        for i, (_, p, shown) in enumerate(batch):
            row = {**shown, "prompt": p, "method": method, "answer": res.texts[i]}
            if base is not None:
                row["baseline"] = base.texts[i]
            rows.append(row)
            answers = ([("baseline", row["baseline"])] if base is not None else []) + [(method, row["answer"])]
            for label, text in answers:
                shown = text if truth is None else mark_against_scene(text, truth, p)
                marked = marked or shown != text
                click.echo(f"[{label}] {shown}" if len(answers) > 1 or truth is not None else shown)
        if marked:
            click.echo(f"  *word*: {MARK_LEGEND}")
        if out_dir is not None:  # appended as produced: an interrupted run (or a full disk) keeps every finished batch
            from ..evals.store import append_records

            append_records(out_dir / "answers.jsonl", rows)
            append_records(out_dir / "reports.jsonl", [{"rows": [done, done + len(batch)], "report": res.report}])
        if compare:
            _print_touched(methods, res.report, out_dir)
        if res.artifacts and (out_dir is not None or compare):  # e.g. CARVE's masks, beside the answers
            _save_artifacts(res.artifacts, out_dir or Path(ARTIFACT_DIR), start=done, images=imgs)
        done += len(batch)
    if out_dir is not None:
        click.echo(f"wrote {out_dir / 'answers.jsonl'} and {out_dir / 'reports.jsonl'}", err=True)


def _print_touched(methods: list[Any], report: dict[str, Any], out_dir: Path | None) -> None:
    """One short line per method of what it touched; the full report goes to --out (reports.jsonl)."""
    for m in methods:
        if m.name in report:
            click.echo(f"[{m.name} touched] {m.summarize(report[m.name])}", err=True)
    if out_dir is None:
        click.echo("(the full report of each method: pass --out DIR, it goes to DIR/reports.jsonl)", err=True)


def _save_artifacts(artifacts: dict[str, Any], out_dir: Path, start: int, images: list[Any] | None = None) -> None:
    """Save PIL images found in method artifacts (e.g. CARVE's masks) as PNGs; CARVE's mask and crop also drawn
    over each row's image (``carve_overlay_<row>.png``)."""
    from PIL import Image

    from ..diagnostics import mask_overlay

    carve = artifacts.get("carve") or {}
    for i, (mask, box) in enumerate(zip(carve.get("masks", []), carve.get("bboxes", []))):
        if images is not None and i < len(images) and isinstance(images[i], Image.Image):
            out_dir.mkdir(parents=True, exist_ok=True)
            path = out_dir / f"carve_overlay_{start + i}.png"
            mask_overlay(images[i], mask, box).save(path)
            click.echo(f"saved {path}", err=True)
    for method, art in artifacts.items():
        for key, value in (art or {}).items():
            if isinstance(value, list):
                for i, im in enumerate(value):
                    if isinstance(im, Image.Image):
                        out_dir.mkdir(parents=True, exist_ok=True)  # only when there is an image to save
                        path = out_dir / f"{method}_{key}_{start + i}.png"
                        im.save(path)
                        click.echo(f"saved {path}", err=True)


@cli.command("heads")
@_model_options
@click.option("--image", default=None, help="image file (default on the testbed: a synthetic scene).")
@click.option("--prompt", default=None, help="user prompt.")
@click.option("--tau", default=None, type=float,
              help="visual-sink threshold on a token's massive-activation score, > 0 (default: VAR's, 20).")
@click.option("--out", required=True, help="folder for stats.json and the PNG figures.")
def heads_cmd(image, prompt, tau, out, **kwargs) -> None:
    """Head diagnostics: VHD per layer x head (VHR's heads marked), visual sinks, attention entropy, image mass."""
    import math

    from ..interventions.var import SINK_TAU

    model_opts = _model_params(kwargs)
    tau = SINK_TAU if tau is None else tau
    if not (math.isfinite(tau) and tau > 0):
        raise ConfigError(f"--tau {tau} must be a finite number > 0 (a token is a sink when its score exceeds it); "
                          f"leave --tau out for the default {SINK_TAU:g}")
    (img, _), text = _default_image(model_opts["model_name"], image), _check_prompt(prompt)
    out_dir = _out_dir(out, "--out", ("stats.json",))

    from ..diagnostics import head_statistics, write_outputs
    from ..extras import check_installed

    check_installed("lvlm-fix heads", "matplotlib")  # its figures; refused before the model loads
    lvlm = _load(model_opts)
    report = head_statistics(lvlm, img, text, tau=tau)
    for path in write_outputs(report, out_dir, image=img):
        click.echo(f"wrote {path}")
    vhd = report["vhd_filtered"]
    top = sorted(((v, l, h) for l, row in zip(report["layers"], vhd) for h, v in enumerate(row)), reverse=True)[:5]
    click.echo("top vision-aware heads (layer, head, VHD): " + ", ".join(f"({l}, {h}, {v:.3g})" for v, l, h in top))
    click.echo(f"sink dims: {report['sink_dims']} ({report['sink_dims_source']}); layers with visual sinks at "
               f"tau = {tau:g}: {sum(1 for v in report['visual_sinks'].values() if v[0])}")


def _data_options(f: Any) -> Any:
    f = click.option("--coco-annotations", default=None, help="CHAIR: folder with instances/captions_val2014.json.")(f)
    f = click.option("--hf-dataset", default=None, help="POPE from `datasets`: lmms-lab/POPE or a local copy.")(f)
    f = click.option("--image-dir", default=None, help="images of --pope-questions / --coco-annotations.")(f)
    f = click.option("--pope-questions", default=None, help="POPE question file, or a folder of *_<split>.json.")(f)
    return f


# -- bench flags generated from the eval registry ------------------------------------------------------
def _bench_option_defs() -> dict[str, tuple[Any, str]]:
    """option name -> (an Option, help joined over the benches that take it)."""
    from ..evals.bench import BENCHES

    defs: dict[str, tuple[Any, str]] = {}
    for name in BENCHES.names():
        for opt in BENCHES.get(name).options:
            first, help_ = defs.get(opt.name, (opt, ""))
            if opt.help not in help_:
                help_ = help_ + (" " if help_ else "") + opt.help
            defs[opt.name] = (first, help_)
    return defs


def bench_options(command: click.Command) -> click.Command:
    """Add every bench's own flags (``--prompt-preset``, ``--chair-mode``, ...) and the --bench choices: the
    built-ins' and the plugins' (an entry point in ``lvlm_fix.benches``, or ``$LVLM_FIX_PLUGINS``)."""
    from ..evals.bench import BENCHES

    for name, (opt, help_) in sorted(_bench_option_defs().items()):
        if opt.flag:
            param = click.Option([opt.cli, name], is_flag=True, default=False, help=help_)
        else:
            param = click.Option([opt.cli, name], type=click.Choice(opt.choices) if opt.choices else str,
                                 default=None, help=help_ + (f" [default: {opt.default}]" if opt.default else ""))
        command.params.append(param)
    for param in command.params:
        if param.name == "bench":
            param.type = click.Choice(BENCHES.names())
    return command


def _bench_flags(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The bench flags the user gave (unset ones are None / False)."""
    names = set(_bench_option_defs())
    return {k: kwargs.pop(k) for k in list(kwargs) if k in names and kwargs[k] not in (None, False)}


def _system_prompt(value: str | None) -> str | None:
    if value == "vicuna":
        from ..prompts import VICUNA_SYSTEM_PROMPT

        return VICUNA_SYSTEM_PROMPT
    return value


@cli.command("eval", epilog=EXAMPLES)
@_model_options
@click.option("--bench", default="pope", show_default=True, help="an eval of `lvlm-fix list`.")
@click.option("--split", default=None,
              help="POPE: random, popular, adversarial (default) or all; AMBER: generative, discriminative or all "
                   "(default); CHAIR takes none.")
@click.option("--methods", default="none", show_default=True,
              help="comma-separated method specs, each its own result: none,vhr,var:tau=3.5,vhr+var ...")
@click.option("--method", "method_alias", default=None, hidden=True)
@click.option("--sweep", default=None, metavar="FILE.toml",
              help="the settings from a sweep file instead of --methods: one [METHOD] table each, a list value a grid "
                   "([vhr] alpha = [1.5, 2, 3]); copied into the run folder.")
@click.option("--set", "sets", multiple=True, metavar="METHOD.FIELD=VALUE", help=SET_HELP)
@click.option("--limit", default=None, type=int, help="samples per split (CHAIR: images, default 500).")
@click.option("--batch-size", default=16, show_default=True, type=int)
@click.option("--max-new-tokens", default=None, type=int,
              help="default: the bench's (POPE: the preset's; CHAIR 512; AMBER 512 generative, 32 yes/no).")
@click.option("--do-sample/--greedy", default=None, help="sample or decode greedily (default: the preset's).")
@_generation_options
@click.option("--num-beams", default=None, type=click.IntRange(min=1), help="beam search (default: the preset's).")
@click.option("--prompt-template", default=None,
              help="user-turn template with {question} (default: the bench's; POPE: the preset's).")
@click.option("--system-prompt", default=None,
              help="system prompt for every sample: text, 'vicuna' (LLaVA-1.5's), or '' for none (default: the "
                   "preset's).")
@click.option("--seed", default=None, type=SEED, help="CHAIR image sampling and generation seed (default 0; vcd 55).")
@click.option("--n-boot", default=1000, show_default=True, type=click.IntRange(min=1), help="bootstrap replicates.")
@click.option("--out", default="results", show_default=True, help="run folder (resumable).")
def eval_cmd(bench, split, methods, method_alias, sweep, sets, limit, batch_size, max_new_tokens, do_sample, temperature,
             top_p, repetition_penalty, num_beams, prompt_template, system_prompt, seed, n_boot, out,
             **kwargs) -> None:
    """POPE / CHAIR / AMBER: baseline and methods on the same samples, with CIs and paired tests."""
    from ..evals.runner import prepare_eval
    from ..interventions import build_methods
    from ..interventions.registry import split_specs

    model_opts = _model_params(kwargs)
    flat, overrides = _split_method_params(kwargs), _parse_sets(sets)
    decoding = _generation_kwargs(do_sample, temperature, top_p, repetition_penalty)
    decoding.update({k: v for k, v in (("do_sample", do_sample), ("num_beams", num_beams)) if v is not None})
    options = _bench_flags(kwargs)
    if method_alias is not None and methods != "none":
        raise ConfigError("give the methods once: --methods (comma-separated) or --method, not both")
    if sweep is not None and (methods != "none" or method_alias is not None):
        raise ConfigError("give the settings once: --sweep FILE or --methods, not both (add [none] to the file)")
    if sweep is not None:
        from ..sweep import sweep_specs

        names = sweep_specs(sweep)
    else:
        names = split_specs(method_alias or methods)
    if not any(names):
        raise ConfigError(f"--methods {methods!r} names no method; pass e.g. --methods none,vhr")
    # Each spec gets the flags and --set entries its methods take; one that no spec takes is an error.
    _check_all_used(names, flat, overrides)
    per_method = {m: _params_for(m, flat, overrides) for m in names}
    for m in names:
        build_methods(m, **per_method[m])  # every value checked before any weight is loaded
    job = prepare_eval(bench, split, names, limit=limit, batch_size=batch_size, out_dir=out,
                       max_new_tokens=max_new_tokens, generation=decoding, prompt_template=prompt_template,
                       system_prompt=_system_prompt(system_prompt), seed=seed, method_params=per_method,
                       n_boot=n_boot, command=_invocation, **options)
    with job.lock():  # before the model loads: a second run into --out is refused at once
        if sweep is not None:  # the run folder records the file its settings came from
            import shutil

            from ..sweep import SWEEP_FILE

            shutil.copyfile(sweep, Path(out) / SWEEP_FILE)
        lvlm = _load(model_opts)
        summary = job.run(lvlm)
    if summary:
        click.echo((Path(out) / "results.md").read_text())
        click.echo(f"wrote {Path(out) / 'summary.json'}")


@cli.command("score")
@click.option("--bench", required=True, help="an eval of `lvlm-fix list`.")
@click.option("--input", "--captions", "--answers", "--responses", "input_file", required=True,
              help="outputs to score: a JSON list or JSON lines. CHAIR: image_id + caption; POPE: question_id + "
                   "text/answer (or with its own label); AMBER: [{id, response}].")
@click.option("--split", default=None, help="POPE: the split the answers belong to; AMBER: generative, "
                                            "discriminative or all.")
@click.option("--name", default=None, help="the outputs' name in the table and folder (default: the file name).")
@click.option("--id-key", default=None, help="key of the sample id (default: image_id / question_id / id).")
@click.option("--text-key", default=None, help="key of the text (default: caption / text / answer / ans / response).")
@click.option("--label-key", default=None, help="POPE: key of a yes/no (or 1/0) label inside the answer file.")
@click.option("--n-boot", default=1000, show_default=True, type=click.IntRange(min=1), help="bootstrap replicates.")
@click.option("--seed", default=0, show_default=True, type=SEED, help="bootstrap seed.")
@click.option("--out", required=True, help="run folder; score several files into one folder to compare them.")
def score_cmd(bench, input_file, split, name, id_key, text_key, label_key, n_boot, seed, out, **kwargs) -> None:
    """Score captions / answers generated elsewhere (any model, a paper's released files), as eval does."""
    from ..evals.runner import score_outputs

    summary = score_outputs(bench, input_file, out_dir=out, split=split, name=name, id_key=id_key, text_key=text_key,
                            label_key=label_key, n_boot=n_boot, seed=seed, **_bench_flags(kwargs))
    if summary:
        click.echo((Path(out) / "results.md").read_text())
        click.echo(f"wrote {Path(out) / 'summary.json'}")


@cli.command("report")
@click.argument("results_dirs", nargs=-1, required=True, metavar="RESULTS_DIR...")
@click.option("--out", default=None, help="with several folders: the file of their combined table (default: "
                                          "combined.md in the first folder).")
def report_cmd(results_dirs, out) -> None:
    """Figures of a results folder (metrics with CIs, trade-offs, sweeps, cost), linked from its results.md.

    With several folders (runs of one bench: other models, other dates), prints one table of them all instead,
    a row per run, setting and split, and writes it to --out (default: combined.md in the first folder)."""
    from ..report import write_combined, write_report

    if len(results_dirs) == 1:
        if out is not None:
            raise ConfigError(f"--out {out} is for the table of several folders; with one, the figures go to "
                              f"{Path(results_dirs[0]) / 'figures'} (leave --out out)")
        for path in write_report(results_dirs[0]):
            click.echo(f"wrote {path}")
        return
    text, path = write_combined(list(results_dirs), out)
    click.echo(text)
    click.echo(f"wrote {path}")


@cli.command("calibrate")
@_model_options
@_data_options
@click.option("--method", default="act", show_default=True,
              help="a method that declares a calibration (listed here when the command starts).")
@click.option("--bench", default=None, help="the bench whose questions calibrate (default: the method's; act: pope).")
@click.option("--split", default=None, help="the split used as the calibration set (default: the method's; act: "
                                            "POPE random).")
@click.option("--limit", default=None, type=int, help="calibration samples (default: the method's; act: 100, "
                                                          "vti: 70 demos).")
@click.option("--demos", default=None, help="vti: a jsonl of caption pairs (image, question, value = faithful caption, "
                                            "h_value = hallucinated one), its images in --image-dir.")
@click.option("--option", "options", multiple=True, metavar="NAME=VALUE",
              help="a setting of the method's calibration (vti: num_trials, mask_ratio, seed, alpha_image, step, "
                   "release_compat); repeat for several.")
@click.option("--out", required=True, help="file to write (pass it to the method's flag, e.g. --heads-file).")
@click.option("--force", is_flag=True, help="replace an existing --out file.")
def calibrate_cmd(pope_questions, image_dir, hf_dataset, coco_annotations, method, bench, split, limit, demos, options,
                  out, force, **kwargs) -> None:
    """A method's offline calibration on a split; writes the file the method reads back.

    The methods that declare one (ACT, whose per-head search writes the head list of --heads-file; VTI, whose
    caption pairs (--demos, --image-dir) give the directions of --directions-file) are the choices of --method.
    Without data flags it calibrates on the testbed's second synthetic benchmark (seed 1,
    other scenes), not on the one `eval` scores; with your own data, give questions whose images your evaluation
    does not use."""
    from ..errors import UnknownNameError
    from ..evals.bench import make_bench
    from ..interventions.calibration import calibrations

    model_opts = _model_params(kwargs)
    declared = calibrations()
    if method not in declared:
        raise ConfigError(f"--method {method!r} declares no calibration; the methods that do: {', '.join(declared)}")
    cal = declared[method]
    bench = bench or cal.bench
    if bench != cal.bench:
        raise ConfigError(f"--method {method} calibrates on --bench {cal.bench}, not {bench!r}; leave --bench out")
    split = split or cal.split
    limit = cal.limit if limit is None else limit
    if limit < 1:
        raise ConfigError(f"--limit {limit} selects no sample; pass a positive number")
    run_options = _calibration_options(method, cal, options)
    if demos is not None and cal.load is None:
        raise ConfigError(f"--demos is for the methods that calibrate on caption pairs; --method {method} takes "
                          f"{cal.bench} questions")
    _out_file(out, "--out", force)  # before the search: a file it would replace, a full disk
    if cal.load is not None:  # the method reads its own data (caption pairs), not a bench's samples
        if demos is None and image_dir is not None:
            raise ConfigError("--image-dir goes with --demos (a jsonl of caption pairs); give both, or neither for "
                              "the testbed's synthetic pairs")
        if demos is None:  # the testbed's own pairs, from other scenes than the benchmark eval scores
            from ..testbed.caption_pairs import caption_pairs

            samples, dataset = caption_pairs(limit)
        else:
            samples, dataset = cal.load({"demos": demos, "image_dir": image_dir}, limit)
        click.echo(f"calibration data: {len(samples)} samples from {dataset['id']}", err=True)
        lvlm = _load(model_opts)
        result = cal.run(lvlm, samples, limit=limit, dataset=dataset, **run_options)
        _write_calibration(cal, method, result, out)
        return
    data = {k: v for k, v in (("pope_questions", pope_questions), ("image_dir", image_dir),
                              ("hf_dataset", hf_dataset), ("coco_annotations", coco_annotations)) if v is not None}
    if bench == "pope" and pope_questions is None and hf_dataset is None:
        from ..evals.pope import SPLITS

        if split not in SPLITS:
            raise UnknownNameError("POPE split", split, SPLITS)
        # Data chosen on the questions eval then scores would inflate the method's score there: other scenes instead.
        from ..testbed.benchmark import SyntheticBenchmark, ensure_benchmark

        calibration = SyntheticBenchmark(ensure_benchmark(seed=CALIBRATION_SEED))
        data.update(pope_questions=str(calibration.pope_file(split)), image_dir=str(calibration.images_dir))
    b = make_bench(bench, split, **data)
    samples, dataset = b.load(limit, seed=0)
    click.echo(f"calibration data: {len(samples)} questions of {bench.upper()} {split} from {dataset['id']}"
               + (f" (images: {dataset['image_dir']})" if dataset.get("image_dir") else ""), err=True)
    lvlm = _load(model_opts)
    result = cal.run(lvlm, [s.data for s in samples], limit=limit, dataset=dataset, **run_options)
    _write_calibration(cal, method, result, out)


def _calibration_options(method: str, cal: Any, options: tuple[str, ...]) -> dict[str, Any]:
    """``--option NAME=VALUE`` pairs, typed by the calibration's declared options."""
    out: dict[str, Any] = {}
    for item in options:
        name, sep, value = item.partition("=")
        if not sep or name not in cal.options:
            known = ", ".join(cal.options) or "none"
            raise ConfigError(f"--option {item!r}: give NAME=VALUE with a setting of {method}'s calibration ({known})")
        typ = cal.options[name]
        try:
            out[name] = strict_bool(f"--option {name}", value) if typ is bool else typ(value)
        except (TypeError, ValueError):
            raise ConfigError(f"--option {item!r}: {value!r} is not a {typ.__name__}") from None
    return out


def _write_calibration(cal: Any, method: str, result: dict[str, Any], out: str) -> None:
    cal.write(result, out)
    line = cal.summary(result, out) if cal.summary is not None else ""
    if line:
        click.echo(line, err=True)
    click.echo(f"wrote {out} (use it as --method {method} {cal.flag} {out})")


def calibrate_options(command: click.Command) -> click.Command:
    """The --method help of `calibrate`: each method that declares a calibration, what it picks and its flag."""
    from ..interventions.calibration import calibrations

    listed = "; ".join(f"{name}: {cal.what}, read back with {cal.flag}" for name, cal in calibrations().items())
    for param in command.params:
        if param.name == "method":
            param.help = f"a method that declares a calibration ({listed})."
    return command


@cli.command("lmms-data")
@click.option("--pope-questions", default=None, help="POPE question file, or a folder of *_<split>.json (default: "
              "the testbed's synthetic POPE).")
@click.option("--image-dir", default=None, help="the images the question files name (COCO val2014).")
@click.option("--split", default="all", show_default=True, type=click.Choice(["random", "popular", "adversarial", "all"]))
@click.option("--limit", default=None, type=click.IntRange(min=1), help="questions per split (default: all).")
@click.option("--out", required=True, help="folder to write: pope_local_data/ and tasks/pope_local/.")
def lmms_data_cmd(pope_questions, image_dir, split, limit, out) -> None:
    """POPE in lmms-eval's local layout (a save_to_disk copy in lmms-lab/POPE's schema) and the pope_local task."""
    from ..integrations.lmms_data import write_lmms_pope

    if pope_questions is not None and image_dir is None:
        raise InputError("--pope-questions needs --image-dir, the folder of the images they name (COCO val2014)")
    out_dir = write_lmms_pope(_out_dir(out, "--out", ("pope_local_data",)), split, pope_questions, image_dir, limit)
    click.echo(f"wrote {out_dir / 'pope_local_data'} and {out_dir / 'tasks' / 'pope_local'}; run lmms-eval there:")
    click.echo(f"  cd {out_dir} && python -m lmms_eval --model lvlm_fix --model_args method=vhr --tasks pope_local "
               "--include_path tasks --batch_size 8 --output_path results")


@cli.group("testbed")
def testbed_group() -> None:
    """The embedded testbed model: train it, write its synthetic benchmark."""


@testbed_group.command("train")
@click.option("--out", required=True, help="checkpoint folder to write.")
@click.option("--steps", default=None, type=click.IntRange(min=1), help="training steps (default: the shipped recipe).")
@click.option("--seed", default=0, show_default=True, type=SEED)
@click.option("--device", default="cpu", show_default=True)
def testbed_train_cmd(out, steps, seed, device) -> None:
    """Train the testbed LVLM from scratch (the recipe of the shipped checkpoint)."""
    from ..testbed.dev.train import train

    path = train(out, steps=steps, seed=seed, device=device)
    click.echo(f"wrote {path}")


CALIBRATION_SEED = 1  # `calibrate`'s default data: the testbed benchmark of this seed, not eval's (seed 0)

_METHOD_FLAGS_ADDED = False


@testbed_group.command("benchmark")
@click.option("--out", required=True, help="folder to write (POPE jsonl files, images/, COCO-format JSON).")
@click.option("--seed", default=0, show_default=True, type=SEED, help="another seed gives disjoint scenes and questions.")
@click.option("--n-images", default=500, show_default=True, type=click.IntRange(min=1))
@click.option("--force", is_flag=True, help="write into an existing, non-empty --out folder (same-named files are replaced).")
def testbed_benchmark_cmd(out, seed, n_images, force) -> None:
    """Write a synthetic POPE + CHAIR benchmark (e.g. a calibration set disjoint from the default one)."""
    from ..evals.store import check_out_dir
    from ..testbed.benchmark import write_benchmark

    path = Path(out).expanduser()
    if path.is_dir() and any(path.iterdir()) and not force:  # a folder it did not create: its files are the user's
        raise InputError(f"--out {out} is a folder that already holds files, which the benchmark's same-named files "
                         "would replace; choose a new folder, or pass --force")
    check_out_dir(path)
    write_benchmark(out, seed=seed, n_images=n_images)
    click.echo(f"wrote {out}")


_show_warning = warnings.showwarning


def _one_line_warning(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    """lvlm-fix's own warnings (e.g. a repaired samples.jsonl) as one ``warning:`` line."""
    if issubclass(category, LvlmFixWarning):
        click.echo(f"warning: {message}", err=True)
    else:
        _show_warning(message, category, *args, **kwargs)


_invocation: str | None = None  # this command line, for the results' provenance


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors print one line and exit 2, never a traceback."""
    import shlex

    global _METHOD_FLAGS_ADDED, _invocation
    _invocation = shlex.join(["lvlm-fix", *(sys.argv[1:] if argv is None else argv)])
    try:
        if not _METHOD_FLAGS_ADDED:  # once per process: tests call main() many times
            method_options(run_cmd)  # reads the method configs and the eval registry; imports no torch
            method_options(eval_cmd)
            bench_options(eval_cmd)
            bench_options(score_cmd)
            calibrate_options(calibrate_cmd)
            warnings.showwarning = _one_line_warning
            _METHOD_FLAGS_ADDED = True
        cli.main(args=argv, prog_name="lvlm-fix", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        click.echo(f"error: {e.format_message()}", err=True)
        sys.exit(2)
    except LvlmFixError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except OSError as e:  # the machine, not the input: a full disk, a read-only or vanished output place
        if e.errno not in _WRITE_ERRNOS:
            raise
        where = f" ({e.filename})" if e.filename else ""
        fix = ("free some space or choose --out on another disk" if e.errno in (errno.ENOSPC, errno.EDQUOT)
               else "check the output place and its permissions")
        click.echo(f"error: {e.strerror or e}{where}; {fix}, then run the same command again: what was written before "
                   "is kept whole (eval and score resume from it)", err=True)
        sys.exit(2)


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EISDIR,
                 errno.ENOTDIR, errno.EIO}
