"""mkdocs hook: the per-method parameter tables of the docs site, generated at build time.

A page that holds ``<!-- params: NAME -->`` gets, in its place, the table of method NAME's parameters
as its config declares them (:meth:`lvlm_fix.interventions.MethodConfig.param_docs`, the same
description ``lvlm-fix list NAME`` prints), so no parameter is described by hand in the docs.
"""

from __future__ import annotations

import re

from mkdocs.exceptions import PluginError

_MARKER = re.compile(r"<!-- params: ([\w.-]+) -->")


def _cell(text: str) -> str:
    """``text`` safe in a Markdown table cell: code spans kept, elsewhere no emphasis, links or HTML."""
    out = []
    for i, part in enumerate(re.split(r"(`[^`]*`)", text)):
        if i % 2:  # a code span: only the column separator needs escaping
            out.append(part.replace("|", "\\|"))
            continue
        part = part.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "&#124;")
        out.append(re.sub(r"([\\*_\[\]])", r"\\\1", part))
    return "".join(out)


def param_table(name: str) -> str:
    """A table (name, type, default, range, meaning) and, below it, each parameter's whole help and source."""
    from lvlm_fix.interventions import METHODS

    if name not in METHODS:
        raise PluginError(f"<!-- params: {name} -->: no method {name!r}; registered: {', '.join(METHODS.names())}")
    docs = METHODS.get(name).config_cls.param_docs()
    rows = ["| parameter | type | default | range | meaning |", "|---|---|---|---|---|"]
    details = []
    for d in docs:
        # a text default is shown quoted, so that its leading space (CARVE's suffix) is seen
        default = f"`{d.default!r}`" if d.type == "str" and d.default != "None" else f"`{d.default}`"
        rows.append(f"| [`{d.name}`](#param-{d.name}) | {d.type} | {default} | {_cell(d.range) or 'any'} "
                    f"| {_cell(d.meaning)} |")
        details.append(f"`{d.name}` {{ #param-{d.name} }}\n:   {_cell(d.help)}\n\n    *Source:* {_cell(d.source)}")
    return "\n".join(rows) + "\n\n" + "\n\n".join(details)


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 (mkdocs' hook signature)
    return _MARKER.sub(lambda m: param_table(m.group(1)), markdown)
