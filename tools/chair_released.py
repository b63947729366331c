"""Development tool: check CHAIR against a paper's released CHAIR files (not part of the package).

Repositories that score CHAIR with OPERA's ``chair.py`` ship ``chair.pkl``, its cached evaluator:
the ground-truth objects of every COCO 2014 image (instance categories plus the objects of the
reference captions, extracted with NLTK's real tagger), and some ship the scorer's own per-caption
output (``--save_path``: ``{"sentences": [...], "overall_metrics": {...}}``).

``convert`` turns a ``chair.pkl`` into the JSON that ``lvlm-fix score --chair-ground-truth`` reads
(``{"<image id>": [objects, sorted]}``), for the images of the given captions files only. The pickle
is read with a restricted unpickler: the only globals it may name are the three the cache needs
(``collections.defaultdict``, ``builtins.list`` and OPERA's ``CHAIR`` class, which is replaced by
an empty stand-in that receives its attributes and runs none of its code); anything else is
refused. The product itself never unpickles.

``agree`` compares lvlm-fix's per-caption records (``samples.jsonl`` of ``lvlm-fix score``) with the
scorer's own output, caption by caption: hallucinated objects, mentioned objects, and the totals.

    python tools/chair_released.py convert PAINT/chair.pkl --images PAINT/results/outputs.json \\
        --out gt.json
    lvlm-fix score --bench chair --chair-mode opera --chair-ground-truth gt.json \\
        --captions PAINT/results/outputs.json --out scored/
    python tools/chair_released.py agree PAINT/results/outputs.json scored/outputs/samples.jsonl
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import pickle
import sys
from collections import Counter
from pathlib import Path
from typing import Any


class CachedChair:
    """Stands in for OPERA's ``CHAIR`` class: unpickling sets its attributes and nothing else."""


_ALLOWED = {
    ("collections", "defaultdict"): collections.defaultdict,
    ("builtins", "list"): list,
    ("__main__", "CHAIR"): CachedChair,
    ("chair", "CHAIR"): CachedChair,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals of :data:`_ALLOWED`."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CHAIR cache; refusing to load it "
                                         "(only defaultdict, list and CHAIR may appear)") from None


def load_cache(path: Path) -> dict[int, set[str]]:
    """Image id -> ground-truth objects of a released ``chair.pkl``."""
    with path.open("rb") as fh:
        obj = RestrictedUnpickler(fh).load()
    objects = getattr(obj, "imid_to_objects", None)
    if not isinstance(objects, dict):
        raise SystemExit(f"{path}: no imid_to_objects mapping in this pickle; pass OPERA's chair.pkl")
    return {int(k): set(v) for k, v in objects.items()}


def scorer_sentences(path: Path) -> list[dict[str, Any]]:
    """The per-caption rows of a scorer output (``{"sentences": [...]}``), a JSON list or JSON lines."""
    text = path.read_text("utf-8")
    if text.lstrip().startswith("{") and '"sentences"' in text[:200_000]:
        try:
            return list(json.loads(text)["sentences"])
        except (json.JSONDecodeError, KeyError):
            pass
    if text.lstrip().startswith("["):
        return list(json.loads(text))
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def convert(args: argparse.Namespace) -> None:
    cache = load_cache(args.pkl)
    ids = sorted({int(row["image_id"]) for f in args.images for row in scorer_sentences(f)}) if args.images else \
        sorted(cache)
    missing = [i for i in ids if i not in cache]
    if missing:
        raise SystemExit(f"{args.pkl}: images {missing[:5]} are not in the cache")
    out = {str(i): sorted(cache[i]) for i in ids}
    lines = [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in out.items()]  # one image per line
    args.out.write_text("{\n" + ",\n".join(lines) + "\n}\n")
    digest = hashlib.sha256(args.pkl.read_bytes()).hexdigest()
    print(f"{args.out}: {len(out)} images from {args.pkl} (sha256 {digest}, {len(cache)} images in the cache)")


def agree(args: argparse.Namespace) -> None:
    theirs = scorer_sentences(args.scorer)
    ours = [json.loads(line) for line in args.samples.read_text("utf-8").splitlines() if line.strip()]
    if len(theirs) != len(ours):
        raise SystemExit(f"{len(theirs)} scorer rows vs {len(ours)} lvlm-fix records; score the same file")
    same_h = same_m = same_verdict = 0
    h_theirs = h_ours = m_theirs = m_ours = s_theirs = s_ours = 0
    differ = []
    for t, o in zip(theirs, ours):
        if int(t["image_id"]) != int(o["image_id"]) or t["caption"] != o["caption"]:
            raise SystemExit(f"row order differs at image {t['image_id']}; score the scorer's own file")
        th = sorted(node for _, node in t["mscoco_hallucinated_words"])
        tm = sorted(t["mscoco_generated_words"])
        oh, om = sorted(o["hallucinated"]), sorted(o["mentioned"])
        same_h += th == oh
        same_m += tm == om
        same_verdict += bool(th) == bool(oh)
        h_theirs, h_ours = h_theirs + len(th), h_ours + len(oh)
        m_theirs, m_ours = m_theirs + len(tm), m_ours + len(om)
        s_theirs, s_ours = s_theirs + bool(th), s_ours + bool(oh)
        if tm != om:
            differ.append((t["image_id"], sorted((Counter(tm) - Counter(om)).elements()),
                           sorted((Counter(om) - Counter(tm)).elements())))
    n = len(theirs)
    print(f"captions: {n}")
    print(f"hallucinated objects equal: {same_h}/{n}; hallucination verdict equal: {same_verdict}/{n}")
    print(f"mentioned objects equal: {same_m}/{n}")
    print(f"CHAIR_S: scorer {100 * s_theirs / n:.1f}, lvlm-fix {100 * s_ours / n:.1f}")
    print(f"CHAIR_I: scorer {100 * h_theirs / max(m_theirs, 1):.1f} ({h_theirs}/{m_theirs}), "
          f"lvlm-fix {100 * h_ours / max(m_ours, 1):.1f} ({h_ours}/{m_ours})")
    for image_id, only_theirs, only_ours in differ[: args.show]:
        print(f"  image {image_id}: scorer only {only_theirs}, lvlm-fix only {only_ours}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="chair.pkl -> ground-truth JSON (restricted unpickler)")
    c.add_argument("pkl", type=Path)
    c.add_argument("--images", type=Path, action="append", default=[],
                   help="captions or scorer-output file whose image ids to keep (repeatable; default: all)")
    c.add_argument("--out", type=Path, required=True)
    a = sub.add_parser("agree", help="per-caption agreement of lvlm-fix's records with a scorer output")
    a.add_argument("scorer", type=Path, help="the scorer's --save_path JSON")
    a.add_argument("samples", type=Path, help="lvlm-fix score's samples.jsonl for the same captions")
    a.add_argument("--show", type=int, default=10, help="differing captions to list")
    args = parser.parse_args(argv)
    {"convert": convert, "agree": agree}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
