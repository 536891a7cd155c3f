"""`make bench`: every benchmark that runs on CPU, one JSON report (ratios against same-run baselines).

Writes ``bench/results-cpu.json``; the GOT ablation (two short pre-training runs) is opt-in with ``--ablation``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results-cpu.json")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--ablation", action="store_true", help="also run the GOT ablation (minutes)")
    args = p.parse_args(argv)
    from bench import data, got

    report: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "python": platform.python_version()}
    }
    report["got"] = got.run(repeats=args.repeats)
    report["data"] = data.run()
    if args.ablation:
        from bench import got_ablation

        report["got_ablation"] = got_ablation.run(
            "configs/demo.yaml", [], str(Path("runs/got-ablation").resolve())
        )
    Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    json.dump(report, sys.stdout, indent=2, default=str)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
