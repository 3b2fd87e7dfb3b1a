"""The book's own Sphinx extension (loaded from book/_config.yml, `sphinx.local_extensions`).

- Each page's scripts are written once. Sphinx 7.4 registers an inline script that an extension adds after
  the builder started twice: once as given (file name None) and once more, as '', when it writes the pages,
  and the two copies do not compare equal. sphinx-thebe's `const THEBE_JS_URL = ...` is such a script, and
  its second copy throws "Identifier 'THEBE_JS_URL' has already been declared" on every page.
- The bibliography is labelled by author and year ("Yang et al., 2026"), as the text cites it
  (`bibtex_reference_style: author_year`), instead of pybtex's alpha labels ("YHH+26").
- The proof index lists each proposition and remark by its title and page, not by its raw label.
- Offline search shows a snippet under each hit. Sphinx's search page fetches each hit's page to cut a
  snippet from it, which a browser refuses for files opened from disk (file://); the extension writes the
  text of every page into `_static/cgm-search-text.js`, which `_static/cgm-search.js` serves to the search
  page in place of the refused request.
- The single-page build that the PDF is printed from writes the proofs and exercises as the HTML does.
- `html_context["book_pdf"]` (set by the build when it makes the PDF) shows a link to it in the side bar.
"""
from __future__ import annotations

import html
import json
import re
from collections import defaultdict
from pathlib import Path

from docutils import nodes


# ---------------------------------------------------------------------------------- scripts written once
def _scripts_once(app, pagename, templatename, context, doctree) -> None:
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, unique = set(), []
    for js in scripts:
        filename = getattr(js, "filename", js) or ""
        attrs = getattr(js, "attributes", {})
        key = (filename, getattr(js, "priority", 500), tuple(sorted(attrs.items())))
        if key not in seen:
            seen.add(key)
            unique.append(js)
    context["script_files"] = unique


# ------------------------------------------------------------------------------- author-year bibliography
def _register_author_year_style() -> None:
    import pybtex.plugin
    from pybtex.style.formatting.unsrt import Style as UnsrtStyle
    from pybtex.style.labels import BaseLabelStyle

    def last_names(person) -> str:
        return re.sub(r"[{}]", "", " ".join(person.prelast_names + person.last_names))

    class AuthorYearLabelStyle(BaseLabelStyle):
        """'Matena and Raffel, 2022', 'Yang et al., 2026'; a letter after the year tells apart two works
        with the same label."""

        def format_labels(self, sorted_entries):
            labels = []
            for entry in sorted_entries:
                people = entry.persons.get("author") or entry.persons.get("editor") or []
                names = [last_names(p) for p in people]
                who = (names[0] if len(names) == 1 else " and ".join(names) if len(names) == 2
                       else f"{names[0]} et al." if names else entry.key)
                labels.append(f"{who}, {entry.fields.get('year', 'n.d.')}")
            count = defaultdict(int)
            for label in labels:
                count[label] += 1
            seen = defaultdict(int)
            for label in labels:
                if count[label] > 1:
                    seen[label] += 1
                    yield label + "abcdefghijklmnopqrstuvwxyz"[seen[label] - 1]
                else:
                    yield label

    class AuthorYearStyle(UnsrtStyle):
        default_label_style = "cgm_author_year"
        default_sorting_style = "author_year_title"

    pybtex.plugin.register_plugin("pybtex.style.labels", "cgm_author_year", AuthorYearLabelStyle)
    pybtex.plugin.register_plugin("pybtex.style.formatting", "cgm_author_year", AuthorYearStyle)


# ------------------------------------------------------------------------------------ readable proof index
# env.cgm_proof_titles: label -> (docname, kind, title). Sphinx emits env-purge-doc for every page before
# it reads it again (and for every page removed), so a page's old entries go there, and only there.
def _collect_proof_titles(app, doctree) -> None:
    env = app.env
    titles = getattr(env, "cgm_proof_titles", {})
    for node in doctree.findall(nodes.Element):
        if "realtype" in node.attributes and node.get("label"):
            title = node.get("title", "").strip()
            title = title[1:-1].strip() if title.startswith("(") and title.endswith(")") else title
            titles[node["label"]] = (env.docname, node["realtype"], title)
    env.cgm_proof_titles = titles


def _merge_proof_titles(app, env, docnames, other) -> None:
    env.cgm_proof_titles = {**getattr(env, "cgm_proof_titles", {}), **getattr(other, "cgm_proof_titles", {})}


def _purge_proof_titles(app, env, docname) -> None:
    env.cgm_proof_titles = {k: v for k, v in getattr(env, "cgm_proof_titles", {}).items() if v[0] != docname}


def _readable_proof_index():
    from sphinx_proof.domain import ProofIndex

    class ReadableProofIndex(ProofIndex):
        """Entries grouped by kind ('Propositions', 'Remarks'), each named by its title, with its page."""

        localname = "Propositions and remarks"

        def generate(self, docnames=None):
            env = self.domain.env
            proofs = getattr(env, "proof_list", {})
            titles = getattr(env, "cgm_proof_titles", {})
            content = defaultdict(list)
            for anchor, values in proofs.items():
                kind = values["realtype"]
                title = titles.get(anchor, ("", kind, ""))[2]
                page = env.titles.get(values["docname"])
                where = page.astext() if page is not None else values["docname"]
                name = f"{kind.capitalize()}: {title}" if title else f"{kind.capitalize()} in {where}"
                content[kind.capitalize() + "s"].append((name, 0, values["docname"], anchor, where, "", ""))
            return sorted((k, sorted(v)) for k, v in content.items()), False

    return ReadableProofIndex


# ------------------------------------------------------------------------ the single-page build (the PDF)
def _singlehtml_like_html(app) -> None:
    """sphinx-proof and sphinx-exercise tell the `html` builder how to write their nodes, not `singlehtml`
    (the builder of the whole-book PDF): give singlehtml every html visitor it lacks."""
    if app.builder.name != "singlehtml":
        return
    handlers = app.registry.translation_handlers
    single = handlers.setdefault("singlehtml", {})
    for node, visitors in handlers.get("html", {}).items():
        single.setdefault(node, visitors)


# ------------------------------------------------------------------------------ search snippets offline
_TAG = re.compile(r"<(script|style)\b.*?</\1>|<a class=\"headerlink\".*?</a>|<[^>]+>", re.S)
_MATH_DELIMITERS = re.compile(r"\\[()\[\]]")         # \( \) \[ \]: MathJax renders the page, not the snippet


def _page_text(app, pagename, templatename, context, doctree) -> None:
    if doctree is None or app.builder.name != "html" or "body" not in context:
        return
    text = _MATH_DELIMITERS.sub("", html.unescape(_TAG.sub(" ", context["body"])))
    text = re.sub(r"\s+", " ", text).strip()
    if not hasattr(app.env, "cgm_page_text"):
        app.env.cgm_page_text = {}
    app.env.cgm_page_text[pagename] = text[:40_000]


def _write_page_text(app, exception) -> None:
    if exception is not None or app.builder.name != "html":
        return
    pages = dict(sorted(getattr(app.env, "cgm_page_text", {}).items()))
    path = Path(app.outdir) / "_static" / "cgm-search-text.js"
    path.write_text("window.CGM_SEARCH_TEXT = " + json.dumps(pages, ensure_ascii=True) + ";\n", encoding="utf-8")


def setup(app):
    app.connect("html-page-context", _scripts_once, priority=900)
    app.connect("html-page-context", _page_text)
    app.connect("build-finished", _write_page_text)
    app.connect("builder-inited", _singlehtml_like_html)
    _register_author_year_style()
    app.connect("doctree-read", _collect_proof_titles)
    app.connect("env-merge-info", _merge_proof_titles)
    app.connect("env-purge-doc", _purge_proof_titles)
    from sphinx_proof.domain import ProofDomain
    ProofDomain.indices = [_readable_proof_index()]
    # Writing stays serial: the page texts for the search are gathered in this process while pages are written.
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": False, "env_version": 1}
