"""Summary of one benchmark run: ``python -m bench.report OUT [--publish bench/README.md]``.

Collects each benchmark's table (``*/<name>.md``) and the machine it ran on into ``OUT/summary.md``;
with ``--publish``, replaces the block between the results markers of the README with it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

START, END = "<!-- results:start -->", "<!-- results:end -->"
PARTS = ("orchestration", "sample", "scale")


def machine_line(out: Path) -> str:
    """The machine and date of the run, from the first JSON that recorded them."""
    for part in PARTS:
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


def summary(out: Path) -> str:
    """The Markdown summary of the run in ``out``."""
    lines = [machine_line(out), ""]
    for part in PARTS:
        md = out / part / f"{part}.md"
        if md.exists():
            pngs = sorted(p.name for p in (out / part).glob("*.png"))
            lines += [f"### {part}", "", md.read_text().strip(), ""]
            if pngs:
                lines += [f"Plots: {', '.join(f'`{part}/{p}`' for p in pngs)}", ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write ``summary.md`` and optionally publish it into the README."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--publish", type=Path, help="README whose results block is replaced")
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
        _, tail = rest.split(END, 1)
        args.publish.write_text(f"{head}{START}\n{text}{END}{tail}")
        print(f"published into {args.publish}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
