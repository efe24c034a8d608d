"""``python -m ciliary.deploy render [--values FILE] [--out DIR] [--check]``.

Renders the Kubernetes manifests from a values file; ``--check`` writes nothing and
exits 1 naming the files that differ from ``--out``. A bad values file is one error line
naming the field, exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ciliary.deploy.render import differences, render_files, write
from ciliary.deploy.values import ValuesError, load_values

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ciliary.deploy")
    sub = parser.add_subparsers(dest="command", required=True)
    render = sub.add_parser("render", help="render the manifests from a values file")
    render.add_argument("--values", default=str(ROOT / "deploy" / "values.yaml"))
    render.add_argument("--out", default=str(ROOT / "deploy" / "manifests"))
    render.add_argument("--check", action="store_true", help="compare with --out, write nothing")
    args = parser.parse_args(argv)
    try:
        values = load_values(Path(args.values).read_text(), args.values)
    except (OSError, ValuesError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    files = render_files(values)
    out = Path(args.out)
    if args.check:
        changed = differences(files, out)
        for name in changed:
            print(f"{out / name}: differs from a fresh render", file=sys.stderr)
        return 1 if changed else 0
    for path in write(files, out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
