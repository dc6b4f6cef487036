"""The notebook series as a whole: find the chapters, run them headless, export HTML, keep them clean.

    python -m frcnn_tutorial.series run   [--out build] [--only 00 03] [--timeout 1800]
    python -m frcnn_tutorial.series strip [NOTEBOOK ...]     # drop outputs and execution counts
    python -m frcnn_tutorial.series check [NOTEBOOK ...]     # exit 1 if a notebook is dirty

`make run` and `make clean-notebooks` call this module; the tests call the same functions.
"""

from __future__ import annotations

import argparse
import html
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import nbformat

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"


@dataclass
class RunResult:
    notebook: Path
    title: str
    seconds: float
    ok: bool
    error: str = ""


def notebook_paths(notebook_dir: Path = NOTEBOOK_DIR) -> list[Path]:
    """The chapters in course order: files named NN_something.ipynb, sorted by their number."""
    paths = [p for p in notebook_dir.glob("[0-9][0-9]_*.ipynb")]
    return sorted(paths, key=lambda p: p.name)


def notebook_title(nb: nbformat.NotebookNode, fallback: str) -> str:
    """The first Markdown heading of a notebook, without its leading #s."""
    for cell in nb.cells:
        if cell.cell_type != "markdown":
            continue
        for line in cell.source.splitlines():
            if line.startswith("#"):
                return line.lstrip("#").strip()
    return fallback


def dirty_cells(nb: nbformat.NotebookNode) -> list[int]:
    """Indices of code cells that carry outputs or an execution count."""
    return [
        i
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count"))
    ]


def strip_notebook(path: Path) -> bool:
    """Remove outputs and execution counts in place; return True if the file changed."""
    nb = nbformat.read(path, as_version=4)
    if not dirty_cells(nb):
        return False
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    nbformat.write(nb, path)
    return True


def run_notebook(path: Path, out_dir: Path, timeout: int = 1800) -> RunResult:
    """Execute one notebook in its own folder; write the executed copy and its HTML to out_dir."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError

    nb = nbformat.read(path, as_version=4)
    title = notebook_title(nb, path.stem)
    client = NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    start = time.perf_counter()
    error = ""
    try:
        client.execute()
    except (CellExecutionError, CellTimeoutError) as exc:
        error = _first_lines(str(exc))
    seconds = time.perf_counter() - start
    out_dir.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, out_dir / path.name)
    _write_html(nb, out_dir / f"{path.stem}.html")
    return RunResult(path, title, seconds, ok=not error, error=error)


def _first_lines(text: str, n: int = 12) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return "\n".join(lines[-n:])


def _write_html(nb: nbformat.NotebookNode, target: Path) -> None:
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(nb)
    tmp = target.with_suffix(".html.tmp")
    tmp.write_text(body, encoding="utf-8")
    tmp.replace(target)  # atomic: a half-written page never replaces a good one


def write_index(results: list[RunResult], out_dir: Path) -> Path:
    """build/index.html: the chapters in order, each linked with its title, time and status."""
    rows = "\n".join(
        f'<li><a href="{r.notebook.stem}.html">{html.escape(r.title)}</a> '
        f"&mdash; {r.seconds:.0f} s, {'ok' if r.ok else 'FAILED'}</li>"
        for r in results
    )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>frcnn-tutorial</title></head>"
        f"<body><h1>Faster R-CNN with FPN, step by step</h1><ol>\n{rows}\n</ol></body></html>\n"
    )
    index = out_dir / "index.html"
    index.write_text(page, encoding="utf-8")
    return index


def run_series(out_dir: Path, only: list[str] | None = None, timeout: int = 1800) -> list[RunResult]:
    """Run every chapter in order (or those whose number is in `only`), printing one line each."""
    results = []
    for path in notebook_paths():
        if only and path.name[:2] not in only:
            continue
        result = run_notebook(path, out_dir, timeout=timeout)
        status = "ok" if result.ok else "FAILED"
        print(f"{path.name:<40} {result.seconds:7.1f} s  {status}", flush=True)
        if not result.ok:
            print(result.error, file=sys.stderr)
        results.append(result)
    write_index(results, out_dir)
    (out_dir / "timings.json").write_text(
        json.dumps({r.notebook.name: round(r.seconds, 1) for r in results}, indent=2)
    )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m frcnn_tutorial.series", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute the notebooks in order, write HTML to --out")
    run.add_argument("--out", type=Path, default=Path("build"))
    run.add_argument("--only", nargs="*", help="chapter numbers, e.g. 00 03")
    run.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    for name in ("strip", "check"):
        p = sub.add_parser(name)
        p.add_argument("notebooks", nargs="*", type=Path)
    args = parser.parse_args(argv)

    if args.command == "run":
        results = run_series(args.out, args.only, args.timeout)
        failed = [r for r in results if not r.ok]
        total = sum(r.seconds for r in results)
        print(f"{len(results) - len(failed)} of {len(results)} notebooks ran in {total:.0f} s; "
              f"HTML in {args.out}/index.html")
        return 1 if failed or not results else 0
    paths = args.notebooks or notebook_paths()
    if args.command == "strip":
        for path in paths:
            if strip_notebook(path):
                print(f"stripped {path}")
        return 0
    dirty = [p for p in paths if dirty_cells(nbformat.read(p, as_version=4))]
    for path in dirty:
        print(f"{path}: has outputs or execution counts (run `make clean-notebooks`)")
    return 1 if dirty else 0


if __name__ == "__main__":
    sys.exit(main())
