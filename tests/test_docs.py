"""The docs hold together: their links reach files and headings that exist, and
docs/architecture.md's module maps name every module of the package and of the demo, and no other.

What a single doc says of one part (settings, metrics, problems, commands) is checked with
that part's tests (test_settings.py, test_metrics.py, test_errors.py, test_cli.py).
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "identity_service"
DOCS = [
    ROOT / "README.md",
    ROOT / "CHANGELOG.md",
    *sorted((ROOT / "docs").glob("*.md")),
    *sorted(ROOT.glob("clients/*/README.md")),
    ROOT / "examples" / "checkout" / "README.md",
    ROOT / "bench" / "README.md",
]
# A Markdown link's target: [text](target), not an external URL.
LINK = re.compile(r"\]\((?!https?:|mailto:)([^)\s]+)\)")
# Modules the map leaves out: the package's marker and its ``python -m`` entry.
UNMAPPED = {"__init__.py", "__main__.py", "amp/__init__.py"}


def code_and_prose(path: Path) -> tuple[list[str], str]:
    """``path``'s code: its code blocks' lines and its inline code spans; and its text
    without its code blocks."""
    code: list[str] = []
    prose: list[str] = []
    fenced = False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        else:
            (code if fenced else prose).append(line)
    text = "\n".join(prose)
    return code + re.findall(r"`([^`\n]+)`", text), text


def prose(path: Path) -> str:
    """``path``'s text without its code blocks."""
    return code_and_prose(path)[1]


def anchors(path: Path) -> set[str]:
    """The anchors of ``path``'s headings, as GitHub makes them: lower case, punctuation
    dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", prose(path), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_links_between_the_docs_reach_existing_files_and_headings() -> None:
    broken = []
    for doc in DOCS:
        for target in LINK.findall(prose(doc)):
            path, _, anchor = target.partition("#")
            linked = (doc.parent / path).resolve() if path else doc
            if not linked.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such heading)")
    assert broken == []


def mapped_modules(section: str) -> set[str]:
    """The modules docs/architecture.md's table under ``## <section>`` names: a row's
    module, or, for a directory's row (``amp/``), the modules its text names."""
    architecture = (ROOT / "docs" / "architecture.md").read_text()
    table = architecture.partition(f"\n## {section}\n")[2].partition("\n## ")[0]
    rows = dict(re.findall(r"^\| `([\w/.]+)` \| (.*) \|$", table, re.MULTILINE))
    mapped = {name for name in rows if not name.endswith("/")}
    for directory in (name for name in rows if name.endswith("/")):
        mapped |= {directory + module for module in re.findall(r"`(\w+\.py)`", rows[directory])}
    return mapped


def files_under(directory: Path, *patterns: str) -> set[str]:
    """The files under ``directory`` matching ``patterns``, relative to it."""
    found = (path for pattern in patterns for path in directory.glob(pattern))
    return {str(p.relative_to(directory)) for p in found if "__pycache__" not in p.parts}


def test_the_architecture_maps_every_module_of_the_package_and_the_demo() -> None:
    """Each module is a row of docs/architecture.md's module tables (the amp/ row names its
    modules in its text), and each module the tables name exists."""
    package = files_under(PACKAGE, "**/*.py", "static/*")
    assert sorted(mapped_modules("Modules")) == sorted(package - UNMAPPED)
    demo = files_under(ROOT / "examples" / "checkout", "*.py", "node/*.mjs", "static/*")
    assert sorted(mapped_modules("The demo")) == sorted(demo - {"__init__.py"})
