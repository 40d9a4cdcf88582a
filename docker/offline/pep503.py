"""Write a PEP 503 "simple" index over a folder of downloaded distributions (wheels and sdists).

    python docker/offline/pep503.py out/wheelhouse     # reads out/wheelhouse/files/*, writes out/wheelhouse/simple/

Layout: ``simple/index.html`` lists the projects, ``simple/<normalized-name>/index.html`` links each file as
``../../files/<file>#sha256=<digest>`` (pip checks the digest). Any static HTTP server then serves it as an index,
e.g. ``python -m http.server 8765 --bind 127.0.0.1 --directory out/wheelhouse`` -> ``http://127.0.0.1:8765/simple``.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import re
import sys
from collections import defaultdict
from pathlib import Path

SDIST_SUFFIXES = (".tar.gz", ".zip")


def normalize(name: str) -> str:
    """PEP 503 name normalization: runs of ``-``, ``_`` and ``.`` become one ``-``, lower case."""
    return re.sub(r"[-_.]+", "-", name).lower()


def project_of(filename: str) -> str | None:
    """The normalized project name of a wheel or sdist file name; None for anything else."""
    if filename.endswith(".whl"):
        return normalize(filename.split("-", 1)[0])
    for suffix in SDIST_SUFFIXES:
        if filename.endswith(suffix):
            stem = filename[: -len(suffix)]
            name, sep, _version = stem.rpartition("-")
            return normalize(name) if sep else None
    return None


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def page(title: str, links: list[tuple[str, str]]) -> str:
    anchors = "\n".join(f'<a href="{html.escape(href)}">{html.escape(text)}</a><br>' for href, text in links)
    return f"<!DOCTYPE html>\n<html><head><title>{html.escape(title)}</title></head><body>\n{anchors}\n</body></html>\n"


def write_index(root: Path) -> dict[str, list[str]]:
    """Index ``root/files`` into ``root/simple``; returns project -> file names. Raises if there is nothing to index."""
    files = root / "files"
    projects: dict[str, list[str]] = defaultdict(list)
    for path in sorted(files.iterdir()) if files.is_dir() else []:
        name = project_of(path.name)
        if name and path.is_file():
            projects[name].append(path.name)
    if not projects:
        raise FileNotFoundError(f"no wheels or sdists in {files}")
    simple = root / "simple"
    simple.mkdir(exist_ok=True)
    (simple / "index.html").write_text(page("Simple index", [(f"{p}/", p) for p in sorted(projects)]))
    for project, names in projects.items():
        (simple / project).mkdir(exist_ok=True)
        links = [(f"../../files/{n}#sha256={sha256(files / n)}", n) for n in names]
        (simple / project / "index.html").write_text(page(f"Links for {project}", links))
    return dict(projects)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path, help="wheelhouse folder holding files/ (simple/ is written beside it)")
    args = p.parse_args(argv)
    try:
        projects = write_index(args.root)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    n_files = sum(len(v) for v in projects.values())
    print(f"{args.root / 'simple'}: {len(projects)} projects, {n_files} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
