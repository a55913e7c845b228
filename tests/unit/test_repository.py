"""The repository cites only documents it ships: every `*.md` a source file, benchmark, script or doc
names exists in the repository (facts live in docs/, e.g. docs/reference.md)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CITED_MD = re.compile(r"(?<![\w/.-])([\w.-]+(?:/[\w.-]+)*\.md)\b")
SCANNED = ("src", "benchmarks", "scripts", "docs", "tests")
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".txt", ".toml"}


def cited_documents(path: Path) -> set[str]:
    return set(CITED_MD.findall(path.read_text(encoding="utf-8", errors="replace")))


def resolves(name: str, source: Path) -> bool:
    return any((base / name).exists() for base in (ROOT, ROOT / "docs", ROOT / "benchmarks", source.parent))


def test_every_cited_document_is_shipped():
    files = [ROOT / "README.md", ROOT / "Makefile"]
    for folder in SCANNED:
        files += [p for p in (ROOT / folder).rglob("*") if p.suffix in SUFFIXES and p.is_file()]
    missing = sorted(
        f"{path.relative_to(ROOT)} cites {name}"
        for path in files
        for name in cited_documents(path)
        if not resolves(name, path)
    )
    assert files and not missing, "documents cited but not in the repository:\n" + "\n".join(missing)


def test_the_check_sees_a_missing_citation(tmp_path):
    source = tmp_path / "mod.py"
    absent = "NOTES" + ".md"  # spelled in two parts so this file does not cite it
    source.write_text(f'"""Rules ({absent}, MM-SP); see docs/reference.md."""\n')
    assert cited_documents(source) == {absent, "docs/reference.md"}
    assert not resolves(absent, source) and resolves("docs/reference.md", source)
