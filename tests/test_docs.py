"""The docs as tests: `mkdocs build --strict`, a doc line for every flag, recipe key and public name,
the README's first screen, the plots, a line on docs/architecture.md for every module, and every block
marked runnable in README.md and docs/.

A runnable block is a ```bash or ```python fence with `<!-- runnable -->` on the line directly above
it. The blocks of one page run in order, from a scratch copy of the repo root (data/ and configs/
copied, everything else linked), so whatever they write stays out of the checkout: python blocks in
this process and in one namespace per page (a later block uses an earlier block's names; they see the
8 CPU devices conftest.py fakes), each bash block as `bash -e -o pipefail` in a user's environment
(one CPU device, the venv's python first on PATH, HF_HUB_OFFLINE=1; files carry over between blocks,
shell variables do not).
"""

from __future__ import annotations

import dataclasses
import glob
import importlib
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import docs_pages  # noqa: E402

MARKER = "<!-- runnable -->"
FENCE = re.compile(r"^```(bash|python)\s*$")
COPIED = ("data", "configs")  # small, and blocks may write next to them: copies
NOT_LINKED = {".git", ".venv", "runs", "site", "out", "tmp", ".pytest_cache", "__pycache__"}
BASH_TIMEOUT_S = 300


@dataclasses.dataclass(frozen=True)
class Block:
    page: str
    line: int  # 1-based line of the opening fence
    lang: str
    code: str


def pages() -> list[str]:
    """README.md and every Markdown page under docs/, relative to the repo root."""
    found = glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True)
    return ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in found)


def runnable_blocks(page: str) -> list[Block]:
    """The page's runnable blocks, in order; a marker that is not directly above a bash/python fence,
    or a fence left open, is an error naming the line."""
    lines = open(os.path.join(ROOT, page), encoding="utf-8").read().split("\n")
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == MARKER:
            fence = FENCE.match(lines[i + 1].strip()) if i + 1 < len(lines) else None
            if not fence:
                raise ValueError(f"{page}:{i + 1}: {MARKER} must be directly above a ```bash or ```python fence")
            end = next((j for j in range(i + 2, len(lines)) if lines[j].strip() == "```"), None)
            if end is None:
                raise ValueError(f"{page}:{i + 2}: the runnable block's fence is never closed")
            blocks.append(Block(page, i + 2, fence.group(1), "\n".join(lines[i + 2:end]) + "\n"))
            i = end
        i += 1
    return blocks


def scratch_root(where: str) -> str:
    """A folder that looks like the repo root to the blocks: data/ and configs/ copied, the rest linked."""
    os.makedirs(where)
    for name in sorted(os.listdir(ROOT)):
        if name in NOT_LINKED:
            continue
        source, target = os.path.join(ROOT, name), os.path.join(where, name)
        if name in COPIED:
            shutil.copytree(source, target)
        else:
            os.symlink(source, target)
    return where


def checkout_state() -> str | None:
    """`git status` of the checkout (None outside a git checkout): the blocks must not change it."""
    try:
        return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None


def run_page(page: str, work: str) -> None:
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
           "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # a user's CPU: one device (conftest.py fakes 8 for this process only)
    namespace: dict = {"__name__": "__docs__"}
    for block in runnable_blocks(page):
        where = f"{block.page}:{block.line}"
        if block.lang == "python":
            exec(compile(block.code, where, "exec"), namespace)
            continue
        proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block.code], cwd=work, env=env,
                              capture_output=True, text=True, timeout=BASH_TIMEOUT_S)
        assert proc.returncode == 0, f"{where}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


PAGES_WITH_BLOCKS = [p for p in pages()  # by the marker alone: a misplaced one fails that page's test
                     if any(line.strip() == MARKER for line in open(os.path.join(ROOT, p), encoding="utf-8"))]


@pytest.mark.parametrize("page", PAGES_WITH_BLOCKS)
def test_runnable_blocks_run_on_the_tiny_artifacts(page, tmp_path, monkeypatch):
    before = checkout_state()
    work = scratch_root(str(tmp_path / "root"))
    monkeypatch.chdir(work)
    run_page(page, work)
    assert checkout_state() == before, f"{page}'s blocks changed the checkout: write under the working folder"


def test_every_runnable_marker_sits_on_a_fence_and_the_guides_have_blocks():
    for page in pages():
        runnable_blocks(page)  # raises on a misplaced marker
    # every guide runs something: a new docs/guides/*.md page without a runnable block fails here
    guides = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "guides", "*.md")))
    assert len(guides) >= 9
    assert [g for g in guides if not runnable_blocks(g)] == []


def test_a_misplaced_marker_is_refused(tmp_path, monkeypatch):
    page = tmp_path / "bad.md"
    page.write_text(f"text\n{MARKER}\n\n```bash\necho hi\n```\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", str(tmp_path))
    with pytest.raises(ValueError, match=r"bad.md:2: .* directly above"):
        runnable_blocks("bad.md")


def test_site_builds_strict(tmp_path, monkeypatch):
    from mkdocs.commands.build import build
    from mkdocs.config import load_config

    monkeypatch.setenv("NO_MKDOCS_2_WARNING", "1")
    build(load_config(os.path.join(ROOT, "mkdocs.yml"), site_dir=str(tmp_path / "site"), strict=True))
    html = open(tmp_path / "site" / "reference" / "cli" / "index.html", encoding="utf-8").read()
    assert "--max-new-tokens" in html and "export-peft" in html


def test_a_guide_the_nav_does_not_list_is_appended_to_the_guides(tmp_path):
    (tmp_path / "guides").mkdir()
    for name in ("convert.md", "long-prompts.md"):
        (tmp_path / "guides" / name).write_text("# x\n")
    config = {"docs_dir": str(tmp_path), "nav": [{"Home": "index.md"}, {"Guides": ["guides/convert.md"]}]}
    assert docs_pages.on_config(config)["nav"][1] == {"Guides": ["guides/convert.md", "guides/long-prompts.md"]}


def test_a_link_to_a_repo_file_outside_docs_becomes_its_path():
    class Page:
        class file:
            src_path = "guides/x.md"

    config = {"docs_dir": os.path.join(ROOT, "docs")}
    text = "See [the results](../../bench/RESULTS.md#serving-cpu), [serve](serve.md) and [gone](../../nothing.md)."
    assert docs_pages.on_page_markdown(text, Page, config, None) == (
        "See the results (`bench/RESULTS.md`), [serve](serve.md) and [gone](../../nothing.md).")


def test_every_flag_recipe_key_and_public_name_has_its_doc_line():
    assert docs_pages.undocumented() == []


def test_the_commands_of_the_design_are_all_found_and_every_flag_help_prints_is_in_the_reference():
    commands = docs_pages.cli_modules()
    assert {"llama_jax.convert", "llama_jax.generate", "llama_jax.serve", "llama_jax.eval", "train", "train.tokenize",
            "train.plan"} <= set(commands)
    reference = docs_pages.cli_reference()
    for command in commands:
        parser = docs_pages.cli_parser(command)
        helps = [parser.format_help()] + [p.format_help() for _, _, p in docs_pages._subcommands(parser)]
        flags = {f for text in helps for f in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text)} - {"--help"}
        missing = [f for f in sorted(flags) if f"`{f}`" not in reference]
        assert missing == [], f"python -m {command}: {missing} not in the CLI reference"


@pytest.mark.parametrize("command, subcommand", [("llama_jax.generate", None), ("llama_jax.eval", "perplexity")])
def test_a_flag_without_help_is_reported(monkeypatch, command, subcommand):
    cli = importlib.import_module(f"{command}.__main__")  # (lj.generate is the function, not the package)
    original = cli.build_parser

    def with_new_flag():
        parser = original()
        target = dict((name, p) for name, _, p in docs_pages._subcommands(parser))[subcommand] if subcommand else parser
        target.add_argument("--new-flag", type=int, default=3)
        return parser

    monkeypatch.setattr(cli, "build_parser", with_new_flag)
    where = f"{command} {subcommand}" if subcommand else command
    assert docs_pages.undocumented() == [f"python -m {where} --new-flag: the flag has no help= text"]


def test_the_recipe_reference_has_every_key_of_the_schema():
    from train.config import TrainConfig

    def flat(d: dict, prefix: str = "") -> list[str]:
        return [k for key, v in d.items() for k in ([prefix + key] + (flat(v, f"{prefix}{key}.") if
                                                                    isinstance(v, dict) and key != "overrides" else []))]

    reference = docs_pages.recipe_reference()
    assert [k for k in flat(TrainConfig().to_dict()) if f"| `{k}` |" not in reference] == []


def test_readme_is_short_with_set_up_and_test_commands_on_its_first_screen():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    test_command = next(line.strip() for line in ci.splitlines() if line.strip().startswith("python -m pytest"))
    first_screen = "\n".join(readme.splitlines()[:30])
    assert len(readme.splitlines()) < 200
    for command in ("pip install -r requirements.txt", "python -m train --config configs/demo.yaml", test_command):
        assert command in first_screen, command
    for link in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme):
        if "://" not in link:
            assert os.path.exists(os.path.join(ROOT, link)), f"README links to {link}, which does not exist"


def test_plots_are_drawn_from_the_bench_sources_and_every_one_the_docs_show_exists(tmp_path):
    import make_plots

    drawn = {os.path.basename(plot(str(tmp_path))) for plot in make_plots.PLOTS}
    shown = {os.path.basename(m) for page in pages()
             for m in re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", open(os.path.join(ROOT, page)).read())}
    assert shown == drawn
    assert all(os.path.getsize(tmp_path / name) > 10_000 for name in drawn)
    assert all(os.path.isfile(os.path.join(ROOT, "docs", "img", name)) for name in drawn)


ARCHITECTURE_FLOORS = ("sharding", "llama_jax", "train", "bench", "scripts")


def modules_not_on_architecture(root: str = ROOT) -> list[str]:
    """Every .py under the floors and scripts/ (package __init__.py aside: the page names a package's
    modules, not its __init__) that docs/architecture.md does not name: by its path in backticks
    (`train/step.py`), or by its file name in backticks on a table row whose first cell is its folder
    (`llama_jax/checkpoint/` | ... `files.py` ...)."""
    text = open(os.path.join(root, "docs", "architecture.md"), encoding="utf-8").read()
    named = set(re.findall(r"`([^`\s]+\.py)`", text))
    for line in text.splitlines():
        cells = line.strip().strip("|").split("|") if line.lstrip().startswith("|") else []
        if len(cells) < 2:
            continue
        folders = re.findall(r"`([^`\s]+/)`", cells[0])
        names = re.findall(r"`([\w.]+\.py)`", "|".join(cells[1:]))
        named.update(folder + name for folder in folders for name in names)
    found = [os.path.relpath(p, root).replace(os.sep, "/") for floor in ARCHITECTURE_FLOORS
             for p in glob.glob(os.path.join(root, floor, "**", "*.py"), recursive=True)]
    return sorted(p for p in found if os.path.basename(p) != "__init__.py" and p not in named)


def test_architecture_names_every_module():
    assert modules_not_on_architecture() == [], "add a line per module to docs/architecture.md"


def test_a_module_architecture_does_not_name_is_found(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "architecture.md").write_text(
        "| module | its one job |\n|---|---|\n| `train/step.py` | the step |\n"
        "| `llama_jax/eval/` | `scoring.py` scores; `__main__.py` the CLI |\n")
    for path in ("train/step.py", "train/new.py", "train/__init__.py", "llama_jax/eval/scoring.py",
                 "llama_jax/eval/__main__.py", "llama_jax/eval/reward.py", "llama_jax/reward.py"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text('"""x."""\n')
    assert modules_not_on_architecture(str(tmp_path)) == ["llama_jax/eval/reward.py", "llama_jax/reward.py",
                                                         "train/new.py"]
