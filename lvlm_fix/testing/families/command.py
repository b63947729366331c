"""The command line: ``python -m lvlm_fix.testing.families [FAMILY ...] [--write-docs [PATH] --readme PATH]``."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from ...errors import LvlmFixError
from ..output import output_file
from .build import family_types
from .checks import verify
from .table import DEFAULT_DOCS, DEFAULT_README, check_readme, support_table, write_docs


def main(argv: Sequence[str] | None = None) -> int:
    """Check the families (default: every one), print a line each and the count; 1 if any fails."""
    parser = argparse.ArgumentParser(prog="python -m lvlm_fix.testing.families",
                                     description="Every family of the installed transformers' image-text-to-text "
                                                 "mapping, built tiny and checked.")
    parser.add_argument("families", nargs="*", help="model types (default: every family of the mapping)")
    parser.add_argument("--write-docs", nargs="?", const=DEFAULT_DOCS, default=None, metavar="PATH",
                        help=f"write the support table to PATH (default {DEFAULT_DOCS}, from the current directory) "
                             "and its family count into --readme (needs every family)")
    parser.add_argument("--readme", default=None, metavar="PATH",
                        help=f"the README whose family count --write-docs rewrites (default {DEFAULT_README})")
    args = parser.parse_args(argv)
    if args.readme is not None and args.write_docs is None:
        parser.error("--readme goes with --write-docs; add --write-docs PATH")
    if args.write_docs is not None and args.families:
        parser.error("--write-docs writes the table of every family; give no family names with it")
    if args.write_docs is not None:  # refused now, not after minutes of checks
        try:
            docs, readme = output_file(args.write_docs, "--write-docs"), Path(args.readme or DEFAULT_README)
            check_readme(readme)
        except LvlmFixError as e:
            parser.error(str(e))
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(1)  # tiny matrices: a second thread only adds contention
    unknown = sorted(set(args.families) - set(family_types()))
    if unknown:
        parser.error(f"{unknown[0]!r} is not a model type of the image-text-to-text mapping")
    start = time.perf_counter()
    results = []
    for model_type in args.families or family_types():
        results.append(verify(model_type))
        print(results[-1].line(), flush=True)
    works = sum(r.status == "works" for r in results)
    print(f"works on {works} of {len(results)} families of transformers {transformers.__version__} "
          f"({time.perf_counter() - start:.0f} s)")
    if args.write_docs is not None:
        write_docs(support_table(results), docs, readme)
        print(f"wrote {docs} and the family count in {readme}")
    return 1 if any(r.status == "fails" for r in results) else 0
