"""A model that derivation cannot read, served through the escape hatch (``wrap(..., adapter=...)``).

Its decoder layers keep their self-attention one level down (``block.self_attn``), as some
remote-code models do, so ``lvlm_fix.wrap`` finds no attention module and refuses it, naming the
field to pass. With ``adapter=ADAPTER`` it is served: the methods act on it exactly as on the model
it was made from. Runs offline on a tiny random-weight LLaVA (``python docs/examples/nested_layers.py``);
``tests/test_escape_hatch.py`` runs it and checks it against the unmodified model.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText

import lvlm_fix
from lvlm_fix.errors import UnsupportedModelError
from lvlm_fix.processors import load_processor
from lvlm_fix.testing.tiny import build_image, build_tiny

# Where this model keeps what the hooks need; each path dotted, as model.named_modules() writes it.
ADAPTER = {
    "text_layers": "model.language_model.layers",  # from the model: the text decoder's list of layers
    "attention": "block.self_attn",                 # from a decoder layer: its self-attention module
    "out_proj": "o_proj",                           # from that module: its output projection
    "image_token_ids": "<image>",                   # the image token (text, or its id)
}


class Block(torch.nn.Module):
    """A decoder layer kept one level down, under ``block``; it runs the layer unchanged."""

    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.block = layer

    def forward(self, *args, **kwargs):
        return self.block(*args, **kwargs)


def nested_model(path: str | Path) -> torch.nn.Module:
    """The model saved at ``path`` with each text decoder layer inside a :class:`Block`."""
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    text = model.model.language_model
    text.layers = torch.nn.ModuleList(Block(layer) for layer in text.layers)
    return model


def main() -> None:
    path = build_tiny("llava", Path(tempfile.mkdtemp()) / "llava")
    model, processor = nested_model(path), load_processor(path)
    try:
        lvlm_fix.wrap(model, processor)
    except UnsupportedModelError as e:
        print("without an adapter:", e)
    handle = lvlm_fix.wrap(model, processor, adapter=ADAPTER)
    out = lvlm_fix.generate(handle, [build_image(0)], ["Is there a dog in the image?"], method="vhr+var",
                            max_new_tokens=8)
    print("with the adapter:", out.texts, "VHR heads:", out.report["vhr"]["selected_heads"])


if __name__ == "__main__":
    main()
