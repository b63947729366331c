"""Dataset loaders for POPE and CHAIR: plain sample records whose images load lazily.

Loaders validate eagerly (files, splits, labels, that every referenced image exists) and fail
with one-line :class:`DataError` messages that name the bad value and the fix; images are only
decoded when a sample's :meth:`load_image` is called.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union

from lvlm_fix.errors import ConfigError, DataError, UnknownNameError
from lvlm_fix.extras import require
from lvlm_fix.evals.pope import SPLITS

if TYPE_CHECKING:
    from PIL import Image

    from lvlm_fix.evals.chair import ChairEvaluator

StrPath = Union[str, os.PathLike[str]]

DEFAULT_POPE_HF_ID = "lmms-lab/POPE"
_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json"}
_POPE_HF_COLUMNS = ("question_id", "question", "answer", "image_source", "image", "category")
_POPE_JSONL_KEYS = ("question_id", "image", "text", "label")


def _open_rgb(path: Path) -> Image.Image:
    from lvlm_fix.images import load_image  # deferred: importing the loaders should not import PIL

    return load_image(path)  # the one loader: EXIF orientation, 16-bit, alpha read as everywhere else


def _rgb(image: Image.Image) -> Image.Image:
    """A caller's ``image_loader`` result as RGB, the way :func:`lvlm_fix.images.to_rgb` reads any image."""
    from lvlm_fix.images import to_rgb

    return image if image.mode == "RGB" else to_rgb(image)


@dataclass(frozen=True)
class PopeSample:
    """One POPE question; ``load_image()`` reads its image on demand."""

    question_id: str
    image_key: str
    question: str
    label: Literal["yes", "no"]
    split: str
    image_loader: Callable[[], Image.Image] = field(repr=False, compare=False)

    def load_image(self) -> Image.Image:
        """The question's image as an RGB PIL image."""
        return _rgb(self.image_loader())


@dataclass(frozen=True)
class CocoImageSample:
    """One COCO image of the CHAIR subset; ``load_image()`` reads it on demand."""

    image_id: int
    file_name: str
    image_loader: Callable[[], Image.Image] = field(repr=False, compare=False)

    def load_image(self) -> Image.Image:
        """The image as an RGB PIL image."""
        return _rgb(self.image_loader())


Record = Union[PopeSample, CocoImageSample, Mapping[str, Any]]
"""What :func:`dataset_fingerprint` accepts besides file paths."""


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise UnknownNameError("POPE split", split, SPLITS)


def _label(value: Any, where: str) -> Literal["yes", "no"]:
    label = str(value).strip().lower()
    if label not in ("yes", "no"):
        raise DataError(
            f"{where}: label {value!r} is not 'yes' or 'no'; check that this is a POPE file"
        )
    return "yes" if label == "yes" else "no"


def _check_image_dir(image_dir: Path) -> None:
    if not image_dir.is_dir():
        raise DataError(
            f"image directory not found: {image_dir}; pass the folder with the COCO val2014 images"
        )


def _first_missing_image(image_dir: Path, names: Sequence[str]) -> None:
    for name in dict.fromkeys(names):  # unique, in order of first use
        if not (image_dir / name).is_file():
            raise DataError(
                f"image {name!r} not found in {image_dir}; point image_dir at the folder "
                "holding the COCO images (e.g. val2014/)"
            )


def load_pope_jsonl(questions_path: StrPath, image_dir: StrPath, split: str) -> list[PopeSample]:
    """Load an original POPE question file: one ``{question_id, image, text, label}`` per line.

    Args:
        questions_path: E.g. ``coco_pope_adversarial.json`` from AoiDragon/POPE.
        image_dir: Folder with the referenced images (COCO val2014 for the COCO splits).
        split: One of :data:`~lvlm_fix.evals.pope.SPLITS`; recorded on each sample.

    Returns:
        Samples in file order.

    Raises:
        UnknownNameError: For a split that is not random / popular / adversarial.
        DataError: For a missing file or folder, a malformed line, a duplicate question id, an
            empty file, or the first image that does not exist.
    """
    _check_split(split)
    path, image_root = Path(questions_path), Path(image_dir)
    if not path.is_file():
        raise DataError(f"POPE question file not found: {path}; pass e.g. coco_pope_{split}.json")
    _check_image_dir(image_root)
    samples: list[PopeSample] = []
    seen: set[str] = set()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); save "
                        "the file as UTF-8") from None
    for lineno, line in enumerate(text.split("\n"), 1):  # only newlines end a line, as iterating the file did
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{where} is not valid JSON ({err.msg}); POPE files hold one object per line"
            ) from None
        missing = [k for k in _POPE_JSONL_KEYS if not isinstance(row, dict) or k not in row]
        if missing:
            raise DataError(f"{where} lacks {missing}; expected keys {list(_POPE_JSONL_KEYS)}")
        if isinstance(row["question_id"], (bool, float)) or not isinstance(row["question_id"], (int, str)):
            raise DataError(f"{where}: question_id {row['question_id']!r} is not an integer or a string")
        question_id = str(row["question_id"])
        if question_id in seen:
            raise DataError(
                f"{where}: duplicate question_id {question_id!r}; question ids must be unique"
            )
        seen.add(question_id)
        image = str(row["image"])
        samples.append(
            PopeSample(
                question_id=question_id,
                image_key=image,
                question=str(row["text"]),
                label=_label(row["label"], where),
                split=split,
                image_loader=functools.partial(_open_rgb, image_root / image),
            )
        )
    if not samples:
        raise DataError(f"{path} holds no questions; pass a non-empty POPE question file")
    _first_missing_image(image_root, [s.image_key for s in samples])
    return samples


def _load_hf_table(dataset_id: str, data_dir: str | None, cache_dir: str | None) -> Any:
    """Load a hub dataset or a local copy (save_to_disk folder, data folder, or one file)."""
    datasets = require("datasets", "--hf-dataset")  # deferred: heavy, and only the HF loader needs it

    local = Path(dataset_id).expanduser()
    looks_local = local.is_absolute() or dataset_id.startswith((".", "~")) or dataset_id.count("/") > 1
    if looks_local and not local.exists():
        # Fail here: datasets would otherwise try the hub, with retries, for a mistyped path.
        raise DataError(f"local dataset path not found: {local}; pass an existing folder or file")
    saved = (local / "state.json").is_file() or (local / "dataset_dict.json").is_file()
    try:
        if local.is_dir() and saved:
            loaded = datasets.load_from_disk(str(local))
        elif local.is_file():
            builder = _FILE_BUILDERS.get(local.suffix)
            if builder is None:
                raise DataError(
                    f"cannot read {local}: use a .parquet, .arrow or .jsonl file, or a dataset folder"
                )
            loaded = datasets.load_dataset(builder, data_files=str(local), cache_dir=cache_dir)
        else:
            loaded = datasets.load_dataset(str(dataset_id), data_dir=data_dir, cache_dir=cache_dir)
    except (ConnectionError, FileNotFoundError) as err:
        reason = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
        raise DataError(
            f"could not load dataset {dataset_id!r} ({reason}); "
            "check the id and network, or pass the path of a local copy"
        ) from err
    if isinstance(loaded, datasets.DatasetDict):
        if "test" in loaded:
            return loaded["test"]
        if len(loaded) == 1:
            return next(iter(loaded.values()))
        raise DataError(
            f"{dataset_id!r} has splits {sorted(loaded)} but no 'test'; pass a single-split copy"
        )
    return loaded


def load_pope_hf(
    dataset_id: str = DEFAULT_POPE_HF_ID,
    split: str | None = None,
    *,
    data_dir: str | None = None,
    cache_dir: str | None = None,
) -> list[PopeSample]:
    """Load POPE in the ``lmms-lab/POPE`` schema from the hub or a local copy.

    The schema has columns ``question_id, question, answer, image_source, image, category``
    with everything in one "test" split; ``category`` holds the POPE split name. Images stay in
    the dataset and are decoded per sample by ``load_image()``.

    Args:
        dataset_id: Hub id, or a local path: a ``save_to_disk`` folder, a folder of parquet
            files, or a single ``.parquet`` / ``.arrow`` file.
        split: One of :data:`~lvlm_fix.evals.pope.SPLITS`; required (its default only lets
            ``dataset_id`` keep the hub id as default).
        data_dir: Passed to ``datasets.load_dataset``.
        cache_dir: Passed to ``datasets.load_dataset``.

    Returns:
        The split's samples in dataset order.

    Raises:
        ConfigError: If no split is given.
        UnknownNameError: For an unknown split.
        DataError: If the dataset cannot be loaded, lacks a column, has no rows for the split,
            or holds a label other than yes/no.
    """
    if split is None:
        raise ConfigError(f"load_pope_hf needs a split; pass split= one of {', '.join(SPLITS)}")
    _check_split(split)
    table = _load_hf_table(dataset_id, data_dir, cache_dir)
    missing = [c for c in _POPE_HF_COLUMNS if c not in table.column_names]
    if missing:
        raise DataError(
            f"{dataset_id!r} lacks columns {missing}; "
            f"expected the lmms-lab/POPE schema {list(_POPE_HF_COLUMNS)}"
        )
    # Read the text columns only: touching the image column would decode every image.
    meta = table.select_columns([c for c in _POPE_HF_COLUMNS if c != "image"]).to_dict()
    rows = [i for i, category in enumerate(meta["category"]) if category == split]
    if not rows:
        found = sorted(set(meta["category"]))
        raise DataError(
            f"{dataset_id!r} has no questions in category {split!r} (found {found}); "
            "pass a full POPE copy"
        )
    images = table.select_columns(["image"])
    return [
        PopeSample(
            question_id=str(meta["question_id"][i]),
            image_key=str(meta["image_source"][i]),
            question=str(meta["question"][i]),
            label=_label(meta["answer"][i], f"{dataset_id} row {i}"),
            split=split,
            image_loader=functools.partial(_hf_image, images, i),
        )
        for i in rows
    ]


def _hf_image(images: Any, row: int) -> Image.Image:
    from lvlm_fix.images import to_rgb

    return to_rgb(images[row]["image"], name=f"POPE row {row}")  # decoded by datasets: oriented and made RGB here


def load_coco_captions_for_chair(
    annotations_dir: StrPath | None,
    image_dir: StrPath,
    *,
    n: int = 500,
    seed: int = 0,
    instances_paths: StrPath | Sequence[StrPath] | None = None,
    captions_paths: StrPath | Sequence[StrPath] | None = None,
    mode: str | None = None,
    singularizer: str | None = None,
    tagger: str | None = None,
) -> tuple[list[CocoImageSample], ChairEvaluator]:
    """The CHAIR image subset and its evaluator (VHR protocol: ``n`` val2014 images, seeded).

    Args:
        annotations_dir: COCO ``annotations/`` folder; ``instances_val2014.json`` and
            ``captions_val2014.json`` are read from it unless explicit paths are given.
        image_dir: Folder with the COCO images (``val2014/``).
        n: Number of images to sample.
        seed: Sampling seed (see :func:`~lvlm_fix.evals.chair.sample_chair_image_ids`).
        instances_paths: Explicit instance files (override ``annotations_dir``).
        captions_paths: Explicit caption files; their images, in file order, are the pool.
        mode: CHAIR mode of the evaluator (default :data:`~lvlm_fix.evals.chair.DEFAULT_MODE`).
        singularizer: original mode's singulariser (``"pattern"`` or ``"inflect"``).
        tagger: opera mode's tagger (``"perceptron"``, ``"noun"``; None: the perceptron where installed).

    Returns:
        ``(samples, evaluator)``, samples in draw order.

    Raises:
        DataError: Naming a missing annotation file or folder, or the first sampled image that
            is not in ``image_dir``.
    """
    from lvlm_fix.evals.chair import DEFAULT_MODE, ChairEvaluator, sample_chair_image_ids

    if annotations_dir is None:
        if instances_paths is None or captions_paths is None:
            raise DataError(
                "no COCO annotations given; pass annotations_dir or both instances_paths and "
                "captions_paths"
            )
        root = Path()
    else:
        root = Path(annotations_dir)
        if not root.is_dir():
            raise DataError(
                f"annotations directory not found: {root}; pass the annotations/ folder of COCO 2014"
            )
    instances = instances_paths if instances_paths is not None else root / "instances_val2014.json"
    captions = captions_paths if captions_paths is not None else root / "captions_val2014.json"
    image_root = Path(image_dir)
    _check_image_dir(image_root)
    evaluator = ChairEvaluator.from_coco(instances, captions, mode=mode or DEFAULT_MODE, singularizer=singularizer,
                                        tagger=tagger)
    ids = sample_chair_image_ids(evaluator.image_ids, n=n, seed=seed)
    names = [evaluator.file_names[i] for i in ids]
    _first_missing_image(image_root, names)
    samples = [
        CocoImageSample(i, name, image_loader=functools.partial(_open_rgb, image_root / name))
        for i, name in zip(ids, names)
    ]
    return samples, evaluator


def _record_key(record: Any) -> list[Any]:
    if isinstance(record, PopeSample):
        r = record
        return ["pope", r.question_id, r.image_key, r.question, r.label, r.split]
    if isinstance(record, CocoImageSample):
        return ["coco", record.image_id, record.file_name]
    if isinstance(record, Mapping):
        # Plain fields only: loaders and images are not part of a sample's identity.
        plain = (str, int, float, bool, type(None))
        return ["record", {str(k): v for k, v in record.items() if isinstance(v, plain)}]
    raise DataError(
        f"cannot fingerprint {type(record).__name__}; pass file paths, samples or mappings"
    )


def dataset_fingerprint(source: StrPath | Sequence[StrPath] | Sequence[Record]) -> str:
    """A ``sha256:<hex>`` digest identifying the evaluated data, for provenance.

    * Paths (one, or a sequence of ``str`` / ``PathLike``): the files' bytes, in order, each
      prefixed by its length, so a content change or a reordering changes the digest; file names
      do not matter.
    * Records (samples or mappings): their identifying fields in order (question id, image key,
      question, label, split for POPE; image id and file name for CHAIR; the plain-valued
      fields of a mapping).

    Raises:
        DataError: For an empty source, a missing file, or a mix of paths and records.
    """
    items = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if not items:
        raise DataError("nothing to fingerprint; pass file paths or a non-empty list of samples")
    digest = hashlib.sha256()
    is_path = [isinstance(item, (str, os.PathLike)) for item in items]
    if all(is_path):
        for item in items:
            path = Path(item)  # type: ignore[arg-type]
            if not path.is_file():
                raise DataError(
                    f"cannot fingerprint {path}: file not found; pass existing data files"
                )
            digest.update(f"{path.stat().st_size}:".encode())
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    elif not any(is_path):
        for item in items:
            digest.update(json.dumps(_record_key(item), sort_keys=True, default=str).encode() + b"\n")
    else:
        raise DataError("dataset_fingerprint got both paths and records; pass one kind")
    return f"sha256:{digest.hexdigest()}"
