"""Summary of one benchmark run: ``python -m bench.report OUT [--publish bench/README.md]``.

Collects each benchmark's table (``*/<name>.md``) and the machine it ran on into ``OUT/summary.md``;
with ``--publish``, replaces the sections of the benchmarks that ran in the block between the results
markers of the README (the other benchmarks' sections stay as they were, each with the line of the run
it came from) and copies their headline JSON (``OUT/<name>/<name>.json``, for the benchmarks listed in
``RESULT_FILES``) into ``bench/results/``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

START, END = "<!-- results:start -->", "<!-- results:end -->"
PARTS = ("orchestration", "sample", "scale")
#: Benchmarks whose ``<name>.json`` is small enough to keep in the repository when published.
RESULT_FILES = ("orchestration", "sample", "scale")
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine_line(out: Path, parts: tuple[str, ...] = PARTS) -> str:
    """The machine and date of the run, from the first JSON that recorded them."""
    for part in parts:
        path = out / part / f"{part}.json"
        if path.exists():
            data = json.loads(path.read_text())
            m = data.get("machine_start") or data.get("machine") or {}
            return (
                f"Run of {m.get('date')} on {m.get('nproc')} cores ({m.get('cpu_model')}), "
                f"{m.get('memory_gib')} GiB, Python {m.get('python')}, commit {m.get('git_commit')}; "
                f"load average at start {m.get('load_avg')} (the machine was shared)."
            )
    return "No results found."


def sections(out: Path) -> dict[str, str]:
    """The Markdown section of each benchmark that ran in ``out``, its machine line first."""
    found: dict[str, str] = {}
    for part in PARTS:
        md = out / part / f"{part}.md"
        if md.exists():
            pngs = sorted(p.name for p in (out / part).glob("*.png"))
            lines = [f"### {part}", "", machine_line(out, (part,)), "", md.read_text().strip(), ""]
            if pngs:
                lines += [f"Plots: {', '.join(f'`{part}/{p}`' for p in pngs)}", ""]
            found[part] = "\n".join(lines).rstrip() + "\n"
    return found


def summary(out: Path) -> str:
    """The Markdown summary of the run in ``out``."""
    return "\n".join(sections(out).values()) or "No results found.\n"


def merge_block(old_block: str, new: dict[str, str]) -> str:
    """The results block with ``new``'s sections replacing theirs; other sections kept.

    A kept section of an older block whose machine line was at the top of the block (one line for
    all benchmarks) gets that line under its heading, so every section says which run it is from.
    """
    head, *chunks = re.split(r"(?m)^(?=### )", old_block.strip("\n") + "\n")
    head_line = next((line for line in head.splitlines() if line.startswith("Run of ")), None)
    old: dict[str, str] = {}
    for chunk in chunks:
        name = chunk.splitlines()[0].removeprefix("### ").strip()
        body = chunk.rstrip() + "\n"
        if head_line and "\nRun of " not in body:
            first, rest = body.split("\n", 1)
            body = f"{first}\n\n{head_line}\n{rest}"
        old[name] = body
    merged = [new.get(part) or old.get(part) for part in PARTS]
    extra = [body for name, body in old.items() if name not in PARTS]
    return "\n".join(s for s in [*merged, *extra] if s)


def main(argv: list[str] | None = None) -> int:
    """Write ``summary.md`` and optionally publish it into the README and ``bench/results/``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--publish", type=Path, help="README whose results block is updated")
    args = parser.parse_args(argv)
    text = summary(args.out)
    (args.out / "summary.md").write_text(text)
    print(f"summary: {args.out / 'summary.md'}")
    if args.publish:
        readme = args.publish.read_text()
        if START not in readme or END not in readme:
            print(f"{args.publish} has no {START} ... {END} block; not published", file=sys.stderr)
            return 1
        head, rest = readme.split(START, 1)
        block, tail = rest.split(END, 1)
        merged = merge_block(block, sections(args.out))
        args.publish.write_text(f"{head}{START}\n{merged}{END}{tail}")
        print(f"published into {args.publish}")
        for part in RESULT_FILES:
            source = args.out / part / f"{part}.json"
            if source.exists():
                RESULTS_DIR.mkdir(exist_ok=True)
                shutil.copy(source, RESULTS_DIR / f"{part}.json")
                print(f"published {RESULTS_DIR / f'{part}.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
