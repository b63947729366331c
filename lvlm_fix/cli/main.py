"""The ``lvlm-fix`` command: a thin shell over the Python API.

Every subcommand parses, calls one API function, and prints. Heavy imports happen inside the
commands so ``lvlm-fix --help`` stays instant. User errors (bad values, missing files, unknown
names) print one line and exit with code 2.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import typing
import warnings
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import click

from ..errors import ConfigError, InputError, LvlmFixError, LvlmFixWarning

EXAMPLES = """
\b
Examples:
  lvlm-fix run --method vhr                                  # embedded testbed model and scene
  lvlm-fix run --model llava-hf/llava-1.5-7b-hf --image cat.jpg --prompt "Is there a dog?" --method var --compare
  lvlm-fix run --model DIR --jsonl rows.jsonl --batch-size 16 --method vhr+var --out answers.jsonl
  lvlm-fix heads --model DIR --image cat.jpg --prompt "Describe the image." --out heads/
  lvlm-fix eval --bench pope --split adversarial --methods none,vhr,var --limit 200 --out results/
  lvlm-fix score --bench chair --coco-annotations annotations/ --captions captions.jsonl --out scored/
"""


ARTIFACT_DIR = "lvlm-fix-out"


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
            return tuple(int(v) for v in str(value).split(",") if v.strip())
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of integers, e.g. 1,18,19", param, ctx)


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


def method_options(command: click.Command) -> click.Command:
    """Add one ``--flag`` per method config field (shared by methods with the same field)."""
    for field, (typ, owners, help_) in sorted(_method_fields().items()):
        flag = "--" + field.replace("_", "-")
        if typ is bool:
            opt = click.Option([f"{flag}/--no-{field.replace('_', '-')}", field], default=None, help=help_)
        else:
            opt = click.Option([flag, field], type=_click_type(typ), default=None, help=help_)
        command.params.append(opt)
    return command


def _split_method_params(kwargs: dict[str, Any]) -> dict[str, Any]:
    names = set(_method_fields())
    return {k: kwargs.pop(k) for k in list(kwargs) if k in names and kwargs[k] is not None}


# -- shared options -----------------------------------------------------------------------------------
def _model_options(f: Any) -> Any:
    f = click.option("--device", default=None, help="torch device, e.g. cuda:0 (default: the checkpoint's / CPU).")(f)
    f = click.option("--device-map", default=None, help="accelerate device map, e.g. auto (models larger than one GPU).")(f)
    f = click.option("--dtype", default="auto", show_default=True, help="auto, float32, bfloat16 or float16.")(f)
    f = click.option("--revision", default=None, help="hub revision of --model.")(f)
    f = click.option("--trust-remote-code", is_flag=True, help="allow the model repository's own code.")(f)
    f = click.option("--model", "model_name", default=None,
                     help="hub id or local directory (default: the embedded testbed model).")(f)
    return f


def _load(model_name: str | None, dtype: str, device: str | None, device_map: str | None, revision: str | None,
          trust_remote_code: bool):
    import os

    from .. import model as model_mod

    if device is None and device_map is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch
        from accelerate import PartialState  # under `accelerate launch` / torchrun: one device per process

        device = str(PartialState(cpu=not torch.cuda.is_available()).device)
    return model_mod.load(model_name, dtype=dtype, device=device, device_map=device_map, revision=revision,
                          trust_remote_code=trust_remote_code)


def _default_image_and_prompt(lvlm: Any, image: str | None, prompt: str | None) -> tuple[Any, str]:
    """The image and prompt to use; on the testbed model both have offline defaults."""
    from ..model import DEFAULT_MODEL, open_image

    if image is not None:
        return open_image(image), prompt or "Please describe this image in detail."
    if lvlm.name != DEFAULT_MODEL:
        raise InputError("--image is required with --model; pass an image file")
    from ..testbed.world import World

    world = World()  # a validation-stream scene the benchmark does not use (stream 999)
    scene = world.scene("val", 0, stream=999, min_categories=3)
    return world.render(scene), prompt or "Please describe this image in detail."


def _read_jsonl(path: str) -> list[dict[str, str]]:
    """Rows ``{"image": path, "prompt": text}``; image paths relative to the file's folder."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"jsonl file not found: {p}; pass an existing file")
    rows = []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{p}:{i}: not valid JSON ({e.msg}); each line must be {{\"image\": ..., \"prompt\": ...}}") from None
        if not isinstance(row, dict) or not isinstance(row.get("image"), str) or not isinstance(row.get("prompt"), str):
            raise InputError(f"{p}:{i}: each line needs string fields \"image\" and \"prompt\"; got {line.strip()[:80]}")
        img = Path(row["image"])
        row["image"] = str(img if img.is_absolute() else p.parent / img)
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
def list_cmd() -> None:
    """List the methods and evals."""
    from ..interventions import METHODS

    click.echo("methods:")
    click.echo(f"  {'none':8s} the vanilla model (baseline)")
    for name in METHODS.names():
        doc = (METHODS.get(name).__doc__ or "").strip().splitlines()[0]
        click.echo(f"  {name:8s} {doc}")
    click.echo("evals:")
    from ..evals.runner import list_benches

    for name, doc in list_benches().items():
        click.echo(f"  {name:8s} {doc}")


@cli.command("run", epilog=EXAMPLES)
@_model_options
@click.option("--image", default=None, help="image file (default on the testbed: a synthetic scene).")
@click.option("--prompt", default=None, help='user prompt (default: "Please describe this image in detail.").')
@click.option("--jsonl", default=None, help='rows {"image": path, "prompt": text} to run batched.')
@click.option("--method", default="none", show_default=True, help="a method, several joined by +, or none.")
@click.option("--compare", is_flag=True, help="also run the baseline and print both, with what the method touched.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--do-sample", is_flag=True, help="sample instead of greedy decoding.")
@click.option("--num-beams", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--out", default=None,
              help=f"write answers (jsonl) and method artifacts here (with --compare, artifacts go to ./{ARTIFACT_DIR}).")
def run_cmd(model_name, dtype, device, device_map, revision, trust_remote_code, image, prompt, jsonl, method, compare,
            batch_size, max_new_tokens, do_sample, num_beams, seed, out, **kwargs) -> None:
    """Generate answers with a method applied (optionally beside the baseline)."""
    from tqdm import tqdm

    from ..api import generate
    from ..interventions import build_methods
    from ..model import open_image

    params = _split_method_params(kwargs)
    build_methods(method, **params)  # validate names and values before loading any weights
    lvlm = _load(model_name, dtype, device, device_map, revision, trust_remote_code)
    if jsonl:
        rows = _read_jsonl(jsonl)
        items = [(r["image"], r["prompt"]) for r in rows]
    else:
        img, text = _default_image_and_prompt(lvlm, image, prompt)
        items = [(img, text)]
    gen = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, num_beams=num_beams, seed=seed)
    out_dir = Path(out) if out else None
    results = []
    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    for batch in tqdm(batches, desc="generating", unit="batch", disable=len(batches) == 1, file=sys.stderr):
        imgs = [open_image(x) if isinstance(x, str) else x for x, _ in batch]
        prompts = [p for _, p in batch]
        res = generate(lvlm, imgs, prompts, method, **gen, **params)
        base = generate(lvlm, imgs, prompts, None, **gen) if compare and method != "none" else None
        for i, (src, p) in enumerate(batch):
            row = {"image": src if isinstance(src, str) else "<testbed scene>", "prompt": p, "method": method,
                   "answer": res.texts[i]}
            if base is not None:
                row["baseline"] = base.texts[i]
            results.append(row)
        if compare:
            _print_touched(res.report)
        if res.artifacts and (out_dir is not None or compare):  # e.g. CARVE's masks, beside the answers
            _save_artifacts(res.artifacts, out_dir or Path(ARTIFACT_DIR), start=len(results) - len(batch))
    for row in results:
        if "baseline" in row:
            click.echo(f"[baseline] {row['baseline']}\n[{method}] {row['answer']}")
        else:
            click.echo(row["answer"])
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / "answers.jsonl", "a") as f:
            for row in results:
                f.write(json.dumps(row) + "\n")
        click.echo(f"wrote {out_dir / 'answers.jsonl'}", err=True)


def _print_touched(report: dict[str, Any]) -> None:
    for name, rep in report.items():
        summary = json.dumps(rep, default=str)
        click.echo(f"[{name} touched] {summary[:600]}{'...' if len(summary) > 600 else ''}", err=True)


def _save_artifacts(artifacts: dict[str, Any], out_dir: Path, start: int) -> None:
    """Save PIL images found in method artifacts (e.g. CARVE's masks) as PNGs."""
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    for method, art in artifacts.items():
        for key, value in (art or {}).items():
            if isinstance(value, list):
                for i, im in enumerate(value):
                    if isinstance(im, Image.Image):
                        path = out_dir / f"{method}_{key}_{start + i}.png"
                        im.save(path)
                        click.echo(f"saved {path}", err=True)


@cli.command("heads")
@_model_options
@click.option("--image", default=None, help="image file (default on the testbed: a synthetic scene).")
@click.option("--prompt", default=None, help="user prompt.")
@click.option("--out", required=True, help="folder for stats.json and the PNG figures.")
def heads_cmd(model_name, dtype, device, device_map, revision, trust_remote_code, image, prompt, out) -> None:
    """Head diagnostics: VHD per layer x head, visual sinks, attention entropy, image mass."""
    from ..diagnostics import head_statistics, write_outputs

    lvlm = _load(model_name, dtype, device, device_map, revision, trust_remote_code)
    img, text = _default_image_and_prompt(lvlm, image, prompt)
    report = head_statistics(lvlm, img, text)
    for path in write_outputs(report, Path(out)):
        click.echo(f"wrote {path}")
    vhd = report["vhd_filtered"]
    top = sorted(((v, l, h) for l, row in zip(report["layers"], vhd) for h, v in enumerate(row)), reverse=True)[:5]
    click.echo("top vision-aware heads (layer, head, VHD): " + ", ".join(f"({l}, {h}, {v:.3g})" for v, l, h in top))
    click.echo(f"sink dims: {report['sink_dims']} ({report['sink_dims_source']}); "
               f"layers with visual sinks: {sum(1 for v in report['visual_sinks'].values() if v[0])}")


def _data_options(f: Any) -> Any:
    f = click.option("--coco-annotations", default=None, help="CHAIR: folder with instances/captions_val2014.json.")(f)
    f = click.option("--hf-dataset", default=None, help="POPE from `datasets`: lmms-lab/POPE or a local copy.")(f)
    f = click.option("--image-dir", default=None, help="images of --pope-questions / --coco-annotations.")(f)
    f = click.option("--pope-questions", default=None, help="POPE question file, or a folder of *_<split>.json.")(f)
    return f


# -- bench flags generated from the eval registry ------------------------------------------------------
def _bench_option_defs() -> dict[str, tuple[Any, str]]:
    """option name -> (an Option, help joined over the benches that take it)."""
    from ..evals.bench import registry

    reg = registry()
    defs: dict[str, tuple[Any, str]] = {}
    for name in reg.names():
        for opt in reg.get(name).options:
            first, help_ = defs.get(opt.name, (opt, ""))
            if opt.help not in help_:
                help_ = help_ + (" " if help_ else "") + opt.help
            defs[opt.name] = (first, help_)
    return defs


def bench_options(command: click.Command) -> click.Command:
    """Add every bench's own flags (``--prompt-preset``, ``--chair-mode``, ...) and the --bench choices."""
    from ..evals.bench import registry

    for name, (opt, help_) in sorted(_bench_option_defs().items()):
        if opt.flag:
            param = click.Option([opt.cli, name], is_flag=True, default=False, help=help_)
        else:
            param = click.Option([opt.cli, name], type=click.Choice(opt.choices) if opt.choices else str,
                                 default=None, help=help_ + (f" [default: {opt.default}]" if opt.default else ""))
        command.params.append(param)
    for param in command.params:
        if param.name == "bench":
            param.type = click.Choice(registry().names())
    return command


def _bench_flags(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The bench flags the user gave (unset ones are None / False)."""
    names = set(_bench_option_defs())
    return {k: kwargs.pop(k) for k in list(kwargs) if k in names and kwargs[k] not in (None, False)}


def _system_prompt(value: str | None) -> str | None:
    if value == "vicuna":
        from ..evals.pope import VICUNA_SYSTEM_PROMPT

        return VICUNA_SYSTEM_PROMPT
    return value


@cli.command("eval", epilog=EXAMPLES)
@_model_options
@click.option("--bench", default="pope", show_default=True, help="an eval of `lvlm-fix list`.")
@click.option("--split", default=None,
              help="POPE: random, popular, adversarial (default) or all; AMBER: generative, discriminative or all "
                   "(default); CHAIR takes none.")
@click.option("--methods", default="none", show_default=True, help="comma-separated: none,vhr,var,vhr+var ...")
@click.option("--method", "method_alias", default=None, hidden=True)
@click.option("--limit", default=None, type=int, help="samples per split (CHAIR: images, default 500).")
@click.option("--batch-size", default=16, show_default=True, type=int)
@click.option("--max-new-tokens", default=None, type=int,
              help="default: the bench's (POPE: the preset's; CHAIR 512; AMBER 512 generative, 32 yes/no).")
@click.option("--prompt-template", default=None,
              help="user-turn template with {question} (default: the bench's; POPE: the preset's).")
@click.option("--system-prompt", default=None,
              help="system prompt for every sample: text, 'vicuna' (LLaVA-1.5's), or '' for none (default: the "
                   "preset's).")
@click.option("--seed", default=None, type=int, help="CHAIR image sampling and generation seed (default 0; vcd 55).")
@click.option("--n-boot", default=1000, show_default=True, type=click.IntRange(min=1), help="bootstrap replicates.")
@click.option("--out", default="results", show_default=True, help="run folder (resumable).")
def eval_cmd(model_name, dtype, device, device_map, revision, trust_remote_code, bench, split, methods, method_alias,
             limit, batch_size, max_new_tokens, prompt_template, system_prompt, seed, n_boot, out, **kwargs) -> None:
    """POPE / CHAIR / AMBER: baseline and methods on the same samples, with CIs and paired tests."""
    from ..evals.runner import prepare_eval
    from ..interventions import build_methods

    params = _split_method_params(kwargs)
    options = _bench_flags(kwargs)
    names = [m.strip() for m in (method_alias or methods).split(",") if m.strip()]
    if not names:
        raise ConfigError(f"--methods {methods!r} names no method; pass e.g. --methods none,vhr")
    # Each method gets the flags it takes; a flag no listed method takes is an error.
    per_method = {}
    for m in names:
        fields = {f.name for x in build_methods(None if m == "none" else m) for f in dataclasses.fields(x.config)}
        per_method[m] = {k: v for k, v in params.items() if k in fields}
    unused = set(params) - {k for p in per_method.values() for k in p}
    if unused:
        raise ConfigError(f"--{sorted(unused)[0].replace('_', '-')} is not a parameter of any of {names}")
    job = prepare_eval(bench, split, names, limit=limit, batch_size=batch_size, out_dir=out,
                       max_new_tokens=max_new_tokens, prompt_template=prompt_template,
                       system_prompt=_system_prompt(system_prompt), seed=seed, method_params=per_method,
                       n_boot=n_boot, **options)
    with job.lock():  # before the model loads: a second run into --out is refused at once
        lvlm = _load(model_name, dtype, device, device_map, revision, trust_remote_code)
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
@click.option("--seed", default=0, show_default=True, type=int, help="bootstrap seed.")
@click.option("--out", required=True, help="run folder; score several files into one folder to compare them.")
def score_cmd(bench, input_file, split, name, id_key, text_key, label_key, n_boot, seed, out, **kwargs) -> None:
    """Score captions / answers generated elsewhere (any model, a paper's released files), as eval does."""
    from ..evals.runner import score_outputs

    summary = score_outputs(bench, input_file, out_dir=out, split=split, name=name, id_key=id_key, text_key=text_key,
                            label_key=label_key, n_boot=n_boot, seed=seed, **_bench_flags(kwargs))
    if summary:
        click.echo((Path(out) / "results.md").read_text())
        click.echo(f"wrote {Path(out) / 'summary.json'}")


@cli.command("calibrate")
@_model_options
@_data_options
@click.option("--method", default="act", show_default=True, type=click.Choice(["act"]))
@click.option("--bench", default="pope", show_default=True, type=click.Choice(["pope"]))
@click.option("--split", default="random", show_default=True, help="POPE split used as the calibration set.")
@click.option("--limit", default=100, show_default=True, type=int, help="calibration samples.")
@click.option("--out", required=True, help="head-list JSON file to write (pass it as --heads-file).")
def calibrate_cmd(model_name, dtype, device, device_map, revision, trust_remote_code, pope_questions, image_dir,
                  hf_dataset, coco_annotations, method, bench, split, limit, out) -> None:
    """ACT's per-head search on a calibration split; writes the head-list file."""
    from ..calibration import calibrate_act, write_head_file
    from ..evals.bench import make_bench

    if limit < 1:
        raise ConfigError(f"--limit {limit} selects no sample; pass a positive number")
    pope = make_bench(bench, split, pope_questions=pope_questions, image_dir=image_dir, hf_dataset=hf_dataset)
    samples, dataset = pope.load(limit, seed=0)
    lvlm = _load(model_name, dtype, device, device_map, revision, trust_remote_code)
    result = calibrate_act(lvlm, [s.data for s in samples], limit=limit)
    result.setdefault("calibration", {})["dataset"] = dataset
    write_head_file(result, out)
    click.echo(f"wrote {out}")


@cli.group("testbed")
def testbed_group() -> None:
    """The embedded testbed model: train it, write its synthetic benchmark."""


@testbed_group.command("train")
@click.option("--out", required=True, help="checkpoint folder to write.")
@click.option("--steps", default=None, type=click.IntRange(min=1), help="training steps (default: the shipped recipe).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default="cpu", show_default=True)
def testbed_train_cmd(out, steps, seed, device) -> None:
    """Train the testbed LVLM from scratch (the recipe of the shipped checkpoint)."""
    from ..testbed.train import train

    path = train(out, steps=steps, seed=seed, device=device)
    click.echo(f"wrote {path}")


_METHOD_FLAGS_ADDED = False


@testbed_group.command("benchmark")
@click.option("--out", required=True, help="folder to write (POPE jsonl files, images/, COCO-format JSON).")
@click.option("--seed", default=0, show_default=True, type=int, help="another seed gives disjoint scenes and questions.")
@click.option("--n-images", default=500, show_default=True, type=click.IntRange(min=1))
def testbed_benchmark_cmd(out, seed, n_images) -> None:
    """Write a synthetic POPE + CHAIR benchmark (e.g. a calibration set disjoint from the default one)."""
    from ..testbed.benchmark import write_benchmark

    write_benchmark(out, seed=seed, n_images=n_images)
    click.echo(f"wrote {out}")


_show_warning = warnings.showwarning


def _one_line_warning(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    """lvlm-fix's own warnings (e.g. a repaired samples.jsonl) as one ``warning:`` line."""
    if issubclass(category, LvlmFixWarning):
        click.echo(f"warning: {message}", err=True)
    else:
        _show_warning(message, category, *args, **kwargs)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors print one line and exit 2, never a traceback."""
    from ..interventions import METHODS  # noqa: F401 - registers the methods before flags are built

    global _METHOD_FLAGS_ADDED
    if not _METHOD_FLAGS_ADDED:  # once per process: tests call main() many times
        method_options(run_cmd)
        method_options(eval_cmd)
        bench_options(eval_cmd)
        bench_options(score_cmd)
        warnings.showwarning = _one_line_warning
        _METHOD_FLAGS_ADDED = True
    try:
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
