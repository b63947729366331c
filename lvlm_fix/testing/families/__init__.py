"""Every family of the installed transformers' image-text-to-text mapping, built tiny and checked.

For each ``model_type`` of ``MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES``: a tiny random model is
built from the family's default config (:func:`tiny_config`: a generic shrinker, then the family's
fix-ups where dimensions are coupled), wrapped with :func:`lvlm_fix.wrap`, and driven through the
seam (:func:`verify`):

* **no-plan parity**: logits through lvlm-fix's attention function with no plan == stock sdpa, bit for bit;
* **eager path**: an identity plan that takes every layer down the eager path == stock eager (1e-4);
* **image span**: the image tokens the seam sees == the positions where the model puts image features;
* **noop parity**: ``generate()`` under each method's ``noop()`` config == vanilla ``generate()``, scores bit for bit;
* **methods act**: VHR, VAR and ACT run through ``generate()`` and change the logits; what each touched is reported;
* **batch**: each row of the left-padded batch == the row alone (tokens; scores to :data:`BATCH_TOL`), without a
  method and under each; not checked where the model's own rows already differ by more (the table says so).

Inputs come from the real processor for the families :mod:`lvlm_fix.testing.tiny` builds one for (the
"processor" path: chat template, image-token expansion, padding), and otherwise are built by hand
the way the model expects them ("model-only"): pixel tensors of the vision tower's shape, the
number of image tokens the vision tower produces, extras such as ``image_grid_thw``,
``image_sizes`` and ``mm_token_type_ids``. Families the seam cannot serve are refused with the
reason :func:`lvlm_fix.adapters.derive_adapter` gives; families that cannot be built offline say why.
Every verdict is decided by a build on the installed transformers, whose version the table names:
another transformers has another mapping and other verdicts.

Three concerns, one module each: :mod:`.build` makes the tiny models and inputs, :mod:`.checks`
runs the checks and gives each family its verdict, :mod:`.table` renders the verdicts as the
support table and the README's family count; :mod:`.command` is the command line. It writes only
where it is told (relative paths from the current directory)::

    python -m lvlm_fix.testing.families                  # every family: a line each, then "works on N of M families"
    python -m lvlm_fix.testing.families qwen2_vl gemma3  # some families
    # from the repository root: also (re)write docs/supported-models.md and README.md's family count
    python -m lvlm_fix.testing.families --write-docs docs/supported-models.md --readme README.md
"""

from __future__ import annotations

from .build import FIXES, OTHER, TEXT, VQ_CODE_NAMES, family_types, image_token_count, tiny_batch, tiny_config, tiny_model
from .checks import FamilyResult, check, verify
from .command import main
from .table import readme_claim, support_table, sync_readme, table_headline, write_docs

__all__ = ["FIXES", "OTHER", "TEXT", "VQ_CODE_NAMES", "FamilyResult", "check", "family_types", "image_token_count",
           "main", "readme_claim", "support_table", "sync_readme", "table_headline", "tiny_batch", "tiny_config",
           "tiny_model", "verify", "write_docs"]
