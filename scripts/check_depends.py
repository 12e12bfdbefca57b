#!/usr/bin/env python3
"""Each subsystem README's "Depends on" sentence names exactly the subsystems its CMake target
links (src/NAME/CMakeLists.txt: sluice_subsystem(NAME ... DEPS sluice_X ...)). Prints each
difference naming the README and exits 1; run by scripts/test.sh before any build."""

from __future__ import annotations

import re
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"


def cmake_deps(cmake: Path) -> set[str] | None:
    text = cmake.read_text()
    m = re.search(r"sluice_subsystem\((\w+)(.*?)\)", text, re.S)
    if not m:
        return None
    deps = re.search(r"\bDEPS\b(.*?)(?:\bPRIVATE_DEPS\b|$)", m.group(2), re.S)
    words = deps.group(1).split() if deps else []
    return {w[len("sluice_"):] for w in words if w.startswith("sluice_")}


def readme_deps(readme: Path, names: set[str]) -> tuple[set[str], int] | None:
    text = readme.read_text()
    m = re.search(r"Depends\s+(?:only\s+)?on\b(.*?)(?:;|\.\s|\.$)", text, re.S)
    if not m:
        return None
    line = text[:m.start()].count("\n") + 1
    return {w for w in re.findall(r"`([^`]+)`", m.group(1)) if w in names}, line


def main() -> int:
    names = {d.name for d in SRC.iterdir() if (d / "CMakeLists.txt").exists()}
    bad = 0
    for d in sorted(SRC.iterdir()):
        cmake = d / "CMakeLists.txt"
        if not cmake.exists():
            continue
        deps = cmake_deps(cmake)
        if deps is None:
            continue
        readme = d / "README.md"
        said = readme_deps(readme, names) if readme.exists() else None
        if said is None:
            print(f"{readme}: no \"Depends on\" sentence (CMake: {', '.join(sorted(deps))})")
            bad += 1
            continue
        listed, line = said
        if listed != deps:
            missing, extra = sorted(deps - listed), sorted(listed - deps)
            print(f"{readme}:{line}: \"Depends on\" differs from {cmake.relative_to(SRC.parent)}:"
                  + (f" not named: {', '.join(missing)}" if missing else "")
                  + (f"; named but not linked: {', '.join(extra)}" if extra else ""))
            bad += 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
