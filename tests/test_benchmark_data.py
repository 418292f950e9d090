"""benchmarks/data/ holds what the documents cite and nothing else (STYLE.md, Benchmarks): every
file there is named by README.md, benchmarks/RESULTS.md or a page of docs/, and every data path
those documents name exists. Git keeps the files no document cites any more."""

import fnmatch
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "benchmarks" / "data"
DOCUMENTS = [ROOT / "README.md", ROOT / "benchmarks" / "RESULTS.md", *sorted((ROOT / "docs").rglob("*.md"))]
# A citation: `data/NAME` (relative to benchmarks/, as RESULTS.md writes it) or `benchmarks/data/NAME`;
# NAME may hold shell braces ({128,32}) and wildcards (*) naming several files at once.
CITATION = re.compile(r"(?<![\w/])(?:benchmarks/)?data/([\w.{},*-]+)")


def expand_braces(pattern: str) -> list[str]:
    """"a_{x,y}_t{1,2}.json" -> the four names, as the shell expands them."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, tail = pattern[:match.start()], pattern[match.end():]
    return [name for option in match.group(1).split(",") for name in expand_braces(head + option + tail)]


def cited_patterns() -> dict[str, str]:
    """Each cited name pattern (braces expanded) -> the document that cites it."""
    patterns = {}
    for document in DOCUMENTS:
        for match in CITATION.finditer(document.read_text()):
            for pattern in expand_braces(match.group(1).rstrip(".,")):
                patterns.setdefault(pattern, document.relative_to(ROOT).as_posix())
    return patterns


def data_files() -> list[str]:
    return sorted(p.name for p in DATA.iterdir())


def test_expand_braces_as_the_shell_does():
    assert expand_braces("v_{b,t}_t{1,64}.json") == ["v_b_t1.json", "v_b_t64.json", "v_t_t1.json", "v_t_t64.json"]


def test_every_data_file_is_cited():
    patterns = cited_patterns()
    uncited = [name for name in data_files() if not any(fnmatch.fnmatchcase(name, p) for p in patterns)]
    assert not uncited, f"no document names these files in benchmarks/data/ (cite them or git rm them): {uncited}"


def test_every_cited_data_path_exists():
    files = data_files()
    missing = {p: doc for p, doc in cited_patterns().items() if not fnmatch.filter(files, p)}
    assert not missing, f"cited, not in benchmarks/data/: {missing}"
