"""The docs site's generated pages: every CLI flag (from the argparse parsers), every recipe key (from
train/config.py) and the public Python API (from docstrings); also the mkdocs hook that adds them.

    mkdocs build --strict                  # this file is mkdocs.yml's hook: the pages are made at build time
    python scripts/docs_pages.py OUT       # the same pages as files in OUT, to read without mkdocs

Nothing here is written by hand, so nothing can drift: a new `python -m` command (a `__main__.py` or a
module with `if __name__ == "__main__":` under llama_jax/, train/, sharding/) appears by itself once it
exposes `build_parser()`, a new flag with its help text, a new recipe key with its trailing `# comment`
in train/config.py. `undocumented()` lists what lacks its line (tests/test_docs.py fails on any).
The hook also appends every docs/guides/*.md page that mkdocs.yml's nav does not list to the Guides
section, and turns a link to a repo file outside docs/ into that file's path (the site does not hold it).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import glob
import importlib
import inspect
import io
import os
import re
import sys
import tokenize
from typing import Any, Iterator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _this_checkout() -> None:
    """Import the project from this checkout (mkdocs loads the hook by path and restores sys.path after)."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)

CLI_PACKAGES = ("sharding", "llama_jax", "train")
# The public Python API, in the order a user meets it; each module's __all__ (else its own public
# functions and classes). A name shown under an earlier module is not repeated.
API_MODULES = ("llama_jax", "llama_jax.generate", "llama_jax.eval", "llama_jax.eval.harness", "llama_jax.lora",
               "llama_jax.quant", "llama_jax.convert", "llama_jax.convert.hub", "sharding", "train", "train.data")
PAGES = {"reference/cli.md": "cli_reference", "reference/recipe.md": "recipe_reference",
         "reference/api.md": "api_reference"}


# ---------------------------------------------------------------- command lines

def cli_modules() -> dict[str, str]:
    """{command: module} of every `python -m` command under the project's packages, by command name."""
    found = {}
    for package in CLI_PACKAGES:
        for path in glob.glob(os.path.join(ROOT, package, "**", "*.py"), recursive=True):
            with open(path, encoding="utf-8") as f:
                if not re.search(r"^if __name__ == .__main__.:", f.read(), re.M):
                    continue
            module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
            found[module.removesuffix(".__main__")] = module
    return dict(sorted(found.items()))


def cli_parser(command: str) -> argparse.ArgumentParser:
    """The parser of `python -m COMMAND`, from its module's build_parser()."""
    module = importlib.import_module(cli_modules()[command])
    if not hasattr(module, "build_parser"):
        raise AttributeError(f"{module.__file__}: a command line must expose build_parser() -> ArgumentParser "
                             "(the docs' CLI reference is generated from it)")
    return module.build_parser()


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str | None, argparse.ArgumentParser]]:
    """[(name, its help, its parser)] of a parser with subcommands, in the order they were added."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            out += [(name, helps.get(name), sub) for name, sub in action.choices.items()]
    return out


def _options(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    for action in parser._actions:
        if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            yield action


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The action's help text as --help prints it (%(default)s expanded), on one line."""
    return " ".join(parser._get_formatter()._expand_help(action).split()) if action.help else ""


def _default(action: argparse.Action) -> str:
    if action.required or not action.option_strings:
        return "required" if action.nargs not in ("*", "?") else ""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return "off" if isinstance(action, argparse._StoreTrueAction) else "on"
    if action.default is None or action.default == argparse.SUPPRESS:
        return ""
    if action.dest == "api_key":  # read from the environment when the parser was built: not a value to print
        return "$LLAMA_JAX_API_KEY"
    return f"`{action.default}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _flags_table(parser: argparse.ArgumentParser) -> list[str]:
    lines = ["| flag | default | meaning |", "|---|---|---|"]
    for action in _options(parser):
        if action.option_strings:
            name = ", ".join(f"`{s}`" for s in action.option_strings)
            if action.nargs != 0 and not action.choices:
                name += f" `{action.metavar or action.dest.upper()}`"
        else:
            name = f"`{action.metavar or action.dest.upper()}`" + (" ..." if action.nargs in ("+", "*") else "")
        choices = f" (one of: {', '.join(f'`{c}`' for c in action.choices)})" if action.choices else ""
        lines.append(f"| {name} | {_default(action)} | {_cell(_help(parser, action) + choices)} |")
    return lines


def _usage(parser: argparse.ArgumentParser) -> list[str]:
    """The usage lines, wrapped at 100 columns whatever the terminal (the page must not depend on it)."""
    formatter = argparse.HelpFormatter(parser.prog, width=100)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups, prefix="")
    return ["```", formatter.format_help().strip("\n"), "```"]


def cli_reference() -> str:
    """Markdown: every command, its subcommands and their flags."""
    out = ["# Command lines", "",
           "Every `python -m ...` command of the project, generated from its argparse parser when the site is "
           "built (`scripts/docs_pages.py`), so the flags here are the flags the code accepts. "
           "Each command also prints this with `--help`. User mistakes end with one `error: ...` line and "
           "exit status 2.", ""]
    for name in cli_modules():
        parser = cli_parser(name)
        out += [f"## python -m {name} {{#{name}}}", "", " ".join((parser.description or "").split()), ""]
        subs = _subcommands(parser)
        if not subs:
            out += _usage(parser) + [""] + _flags_table(parser) + [""]
            continue
        out += ["| subcommand | what it does |", "|---|---|"]
        out += [f"| [`{sub}`](#{name}-{sub}) | {_cell(h or '')} |" for sub, h, _ in subs] + [""]
        for sub, help_text, subparser in subs:
            out += [f"### {name} {sub} {{#{name}-{sub}}}", "",
                    " ".join((subparser.description or help_text or "").split()), ""]
            out += _usage(subparser) + [""] + _flags_table(subparser) + [""]
    return "\n".join(out)


# ---------------------------------------------------------------- recipe keys

def _trailing_comments(cls: type) -> dict[str, str]:
    """{field: its trailing `# comment`} for the fields of a dataclass, read from its source."""
    source = inspect.getsource(cls)
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    out = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            text = " ".join(comments[line] for line in range(node.lineno, node.end_lineno + 1) if line in comments)
            if text:
                out[node.target.id] = text
    return out


@dataclasses.dataclass(frozen=True)
class RecipeKey:
    key: str  # dotted, e.g. optim.lr
    type: str
    default: Any
    doc: str  # the trailing comment in train/config.py ("" = missing)
    range: str | None  # train/config.py RANGES
    resumable: bool  # train/run_folder.py CHANGEABLE_ON_RESUME


def recipe_keys() -> list[RecipeKey]:
    """Every recipe key: sections first-level keys, then each section's, in declaration order."""
    from train.config import RANGES, TrainConfig
    from train.run_folder import changeable

    def walk(cls: type, prefix: str) -> Iterator[RecipeKey]:
        docs, defaults = _trailing_comments(cls), cls()
        nested = []
        for f in dataclasses.fields(cls):
            default, key = getattr(defaults, f.name), prefix + f.name
            if dataclasses.is_dataclass(default):
                nested.append((type(default), key + "."))
            kind = "section" if dataclasses.is_dataclass(default) else str(f.type).replace(" | ", " or ")
            yield RecipeKey(key, kind, default,
                            docs.get(f.name, ""), RANGES.get(key), changeable(key))
        for sub, sub_prefix in nested:
            yield from walk(sub, sub_prefix)

    return list(walk(TrainConfig, ""))


def _yaml(value: Any) -> str:
    """A default as a recipe writes it (null, true, [a, b], 3.0e-4)."""
    import yaml

    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def recipe_reference() -> str:
    """Markdown: every recipe key with its type, default, allowed range and meaning."""
    from train.config import OVERRIDABLE

    out = ["# Recipe keys", "",
           "`python -m train --config configs/NAME.yaml [key=value ...]` reads these keys (YAML, or dotted "
           "`key=value` overrides such as `optim.lr=1e-4`). Generated from the recipe schema in "
           "`train/config.py` (types and defaults from its dataclasses, meanings from each field's comment, "
           "ranges from `RANGES`) and `train/run_folder.py` (`CHANGEABLE_ON_RESUME`: what the same command may "
           "change when it resumes a run). An unknown key, a wrong type or a value out of range stops the run "
           "at start-up with one line naming the key.", ""]
    section = None
    for k in recipe_keys():
        head = k.key.rsplit(".", 1)[0] if "." in k.key else ""
        if head != section:
            section = head
            out += ["", f"## {section or 'top level'} {{#{section or 'top-level'}}}", "",
                    "| key | type = default | range | on resume | meaning |", "|---|---|---|---|---|"]
        kind = f"[section](#{k.key})" if k.type == "section" else f"`{k.type} = {_yaml(k.default)}`"
        out.append(f"| `{k.key}` | {_cell(kind)} | {k.range or ''} | "
                   f"{'may change' if k.resumable else 'fixed'} | {_cell(k.doc)} |")
    out += ["", f"`model.overrides` may set any of these `LlamaConfig` fields: "
                f"{', '.join(f'`{name}`' for name in OVERRIDABLE)}.", ""]
    return "\n".join(out)


# ---------------------------------------------------------------- Python API

def _public(module: Any) -> list[str]:
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n, v in vars(module).items() if not n.startswith("_") and
                 (inspect.isfunction(v) or inspect.isclass(v)) and v.__module__ == module.__name__]
    return list(names)


def _annotation(a: Any) -> str:
    return a if isinstance(a, str) else inspect.formatannotation(a)


def _signature(name: str, obj: Any, method: bool = False) -> str:
    """`name(a: int, b: str = 'x') -> T` with annotations as written (no quotes); a Flax module without
    Flax's own `parent`/`name` fields; a method without self/cls."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return name
    params = list(sig.parameters.values())[1 if method else 0:]
    if inspect.isclass(obj) and any(c.__module__.startswith("flax.") for c in obj.__mro__[1:]):
        params = [p for p in params if p.name not in ("parent", "name")]
    parts, star_done = [], False
    for p in params:
        text = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "") + p.name
        if p.kind == p.KEYWORD_ONLY and not star_done and not any(q.kind == q.VAR_POSITIONAL for q in params):
            parts.append("*")
        star_done = star_done or p.kind in (p.KEYWORD_ONLY, p.VAR_POSITIONAL)
        if p.annotation is not p.empty:
            text += f": {_annotation(p.annotation)}"
        if p.default is not p.empty:
            text += f" = {p.default!r}" if p.annotation is not p.empty else f"={p.default!r}"
        parts.append(text)
    ret = "" if sig.return_annotation in (sig.empty, None, "None") or inspect.isclass(obj) \
        else f" -> {_annotation(sig.return_annotation)}"
    return f"{name}({', '.join(parts)}){ret}"


FIELD_LINE = re.compile(r"^\s*(\w[\w.]*|`[^`]+`)( \([^)]*\))?: ")  # "positions: (B, T) int, ..." in a docstring


def _doc_markdown(doc: str) -> str:
    """A docstring as Markdown: its `name: meaning` lines and `- ` items keep their own lines (Markdown
    would run them into one paragraph); the rest is prose and reflows."""
    out: list[str] = []
    for line in doc.split("\n"):
        item = line.lstrip().startswith(("- ", "* "))
        if out and out[-1] and (item or FIELD_LINE.match(line)):
            out.append("")  # a paragraph (or list item) of its own
        out.append(line)
    return "\n".join(out)


def _own_doc(obj: Any) -> str:
    """The object's own docstring (not inherited, not a dataclass's generated one), cleaned."""
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else getattr(obj, "__doc__", None)
    if not doc or (inspect.isclass(obj) and dataclasses.is_dataclass(obj) and doc.startswith(f"{obj.__name__}(")):
        return ""
    return inspect.cleandoc(doc)


def _members(cls: type) -> Iterator[tuple[str, Any, bool]]:
    """(name, function or property, is a method taking self/cls) of the class's own public members."""
    for name, value in vars(cls).items():
        if name.startswith("_") and name != "__call__":
            continue
        if isinstance(value, staticmethod):
            yield name, value.__func__, False
        elif isinstance(value, classmethod):
            yield name, value.__func__, True
        elif inspect.isfunction(value) or isinstance(value, property):
            yield name, value, True


def _documentable(obj: Any) -> bool:
    """A function or class (decorated functions such as jit or lru_cache wrappers count as functions)."""
    target = inspect.unwrap(obj) if callable(obj) else obj
    return inspect.isfunction(target) or inspect.isclass(obj)


def api_objects() -> Iterator[tuple[str, str, Any]]:
    """(module, name, object) of every public name, each function or class once."""
    seen = set()
    for module_name in API_MODULES:
        module = importlib.import_module(module_name)
        for name in _public(module):
            obj = getattr(module, name)
            if _documentable(obj):
                if id(obj) in seen:
                    continue
                seen.add(id(obj))
            yield module_name, name, obj


def api_reference() -> str:
    """Markdown: each public module's names with their signatures and docstrings."""
    out = ["# Python API", "",
           "The public names of each module (its `__all__`), with signatures and docstrings read from the code "
           "when the site is built (`scripts/docs_pages.py`). `import llama_jax as lj` gives the first group. "
           "A function or class is listed once, under the first module that exports it.", ""]
    module_seen = None
    for module_name, name, obj in api_objects():
        if module_name != module_seen:
            module_seen = module_name
            doc = inspect.getdoc(importlib.import_module(module_name)) or ""
            out += [f"## {module_name} {{#module-{module_name}}}", "", doc.split("\n\n")[0], ""]  # Sphinx's ids
        out += [f"### {name} {{#{module_name}.{name}}}", ""]
        if not _documentable(obj):
            shown = repr(sorted(obj)) if isinstance(obj, dict) else repr(obj)
            out += [f"`{type(obj).__name__}`: `{_cell(shown if len(shown) <= 300 else shown[:300] + ' ...')}`", ""]
            continue
        target = obj if inspect.isclass(obj) else inspect.unwrap(obj)
        out += ["```python", _signature(name, target), "```", "", _doc_markdown(_own_doc(obj) or _own_doc(target)), ""]
        notes = _trailing_comments(obj) if inspect.isclass(obj) and dataclasses.is_dataclass(obj) else {}
        if notes:  # a dataclass whose fields say what they are: a table of them
            out += ["| field | default | meaning |", "|---|---|---|"]
            out += [f"| `{f.name}` | {_cell(repr(f.default)) if f.default is not dataclasses.MISSING else ''} | "
                    f"{_cell(notes.get(f.name, ''))} |" for f in dataclasses.fields(obj)] + [""]
        if inspect.isclass(obj):
            for member, value, method in _members(obj):
                fn = value.fget if isinstance(value, property) else value
                sig = member if isinstance(value, property) else _signature(member, fn, method)
                text = " ".join(_own_doc(fn).split())
                out.append(f"- `{name}.{sig}`" + (f": {text}" if text else ""))
            out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------- what lacks its line

def undocumented() -> list[str]:
    """Every flag or subcommand without help text, recipe key without a comment, and public function or
    class without a docstring: each as one line saying where to add it."""
    missing = []
    for name in cli_modules():
        parser = cli_parser(name)
        parsers = [(name, parser)] + [(f"{name} {sub}", p) for sub, _, p in _subcommands(parser)]
        missing += [f"python -m {name} {sub}: the subcommand has no help= text"
                    for sub, help_text, _ in _subcommands(parser) if not help_text]
        for where, p in parsers:
            missing += [f"python -m {where} {'/'.join(a.option_strings) or a.dest}: the flag has no help= text"
                        for a in _options(p) if not a.help]
    missing += [f"recipe key {k.key}: no trailing # comment on its field in train/config.py"
                for k in recipe_keys() if not k.doc]
    missing += [f"{module}.{name}: no docstring" for module, name, obj in api_objects()
                if _documentable(obj) and not (_own_doc(obj) or _own_doc(inspect.unwrap(obj)))]
    return missing


def page(src_uri: str) -> str:
    return globals()[PAGES[src_uri]]()


# ---------------------------------------------------------------- the mkdocs hook

def on_config(config: Any) -> Any:
    """Append each docs/guides/*.md page that the nav does not list to its Guides section."""
    _this_checkout()
    def listed(items: Any) -> Iterator[str]:
        for item in items or []:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            if isinstance(value, list):
                yield from listed(value)
            else:
                yield value

    nav = config["nav"] or []
    guides = next((item["Guides"] for item in nav if isinstance(item, dict) and "Guides" in item), None)
    if guides is None:
        guides = []
        nav.append({"Guides": guides})
    present = set(listed(nav))
    for path in sorted(glob.glob(os.path.join(config["docs_dir"], "guides", "*.md"))):
        uri = os.path.relpath(path, config["docs_dir"]).replace(os.sep, "/")
        if uri not in present:
            guides.append(uri)
    config["nav"] = nav
    return config


LINK = re.compile(r"(?<!!)\[([^\]]+)\]\(([^)\s#:]+)(#[^)\s]*)?\)")  # [text](relative/path#anchor), not images


README_SECTION = re.compile(r'^--8<-- "README\.md:([\w-]+)"$', re.M)


def readme_section(name: str, here: str) -> str:
    """README.md's `name` section, its links (written relative to the repo root) rebased onto the
    folder `here` of the page that includes it, so one text reads right in both places."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    start, end = f"<!-- --8<-- [start:{name}] -->\n", f"<!-- --8<-- [end:{name}] -->"
    if start not in text or end not in text:
        raise ValueError(f"README.md has no section {name!r} (expected the lines {start.strip()} ... {end})")
    section = text.split(start, 1)[1].split(end, 1)[0]

    def rebase(m: re.Match) -> str:
        target = os.path.join(ROOT, m.group(2))
        return f"[{m.group(1)}]({os.path.relpath(target, here)}{m.group(3) or ''})"

    return LINK.sub(rebase, section)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """README sections a page includes are inlined with their links rebased; then a link from a page to
    a file of the repo outside docs/ (`../../bench/RESULTS.md`, which the site does not hold) becomes the
    text and the file's repo path in code; links inside docs/ stay as they are."""
    docs_dir = os.path.abspath(config["docs_dir"])
    here = os.path.dirname(os.path.join(docs_dir, page.file.src_path))
    markdown = README_SECTION.sub(lambda m: readme_section(m.group(1), here), markdown)

    def rewrite(m: re.Match) -> str:
        target = os.path.abspath(os.path.join(here, m.group(2)))
        if target.startswith(docs_dir + os.sep) or not target.startswith(ROOT + os.sep) or not os.path.exists(target):
            return m.group(0)
        return f"{m.group(1)} (`{os.path.relpath(target, ROOT)}`)"

    return LINK.sub(rewrite, markdown)


def on_files(files: Any, config: Any) -> Any:
    """Add the generated reference pages (made in memory; nothing is written into docs/)."""
    from mkdocs.structure.files import File

    for src_uri in PAGES:
        files.append(File.generated(config, src_uri, content=page(src_uri)))
    return files


if __name__ == "__main__":
    _this_checkout()
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/docs_pages.py OUT   (writes OUT/reference/{cli,recipe,api}.md)")
    out = sys.argv[1]
    for src_uri in PAGES:
        path = os.path.join(out, src_uri)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(page(src_uri))
        print(f"wrote {path}")
    for line in undocumented():
        print(f"undocumented: {line}", file=sys.stderr)
