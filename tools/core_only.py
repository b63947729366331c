"""The core install at work: run it in a venv made with ``pip install lvlm-fix`` alone (no extras).

    python -m venv core && core/bin/pip install torch==2.13.0 .   # from a checkout, no extras
    core/bin/python tools/core_only.py

It imports lvlm_fix, loads the embedded testbed, applies VHR, VAR and VCD around the model's own
``generate()``, scores a few POPE questions, and prints which optional packages (the extras' ones)
got imported: none may.
"""

import sys

import lvlm_fix
from lvlm_fix.extras import EXTRAS
from lvlm_fix.testbed.world import World

print("lvlm_fix", lvlm_fix.__version__, "from", lvlm_fix.__file__)
world = World()
image = world.render(world.scene("val", 0, stream=999, min_categories=3))
handle = lvlm_fix.load()  # the embedded testbed model
batch = handle.encode([image], ["Is there a dog in the image?"])


def answer(ids):
    return handle.processor.batch_decode(ids[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)[0]


print("baseline:", repr(answer(handle.model.generate(**batch, max_new_tokens=8, do_sample=False))))
for method in ("vhr", "var", "vcd"):
    with lvlm_fix.apply(handle, method):
        print(f"{method}:", repr(answer(handle.model.generate(**batch, max_new_tokens=8, do_sample=False))))
summary = lvlm_fix.evaluate(handle, "pope", "adversarial", ["none", "vhr"], limit=4, progress=False)
print("POPE accuracy:", {m: r["splits"]["adversarial"]["accuracy"] for m, r in summary["methods"].items()})
imported = sorted(m for m, module in sys.modules.items() if module is not None and m.partition(".")[0] in EXTRAS)
print("optional packages imported:", imported)
sys.exit(1 if imported else 0)
