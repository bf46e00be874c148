"""A benchmark's results file: the command that re-runs it, the date, the machine, the minutes so far, its
arguments and its rows, rewritten as a run goes (benchmarks/results/<name>.json; readme.py and the notebooks read
them)."""
import datetime
import json
import platform
import time
from pathlib import Path


def write(out: Path, script: str, args, start: float, rows: dict, **extra) -> None:
    """Write out for the run of `script` (its __file__) with argparse `args`, started at time.perf_counter() `start`;
    extra keys (a curve) go beside the rows."""
    out.write_text(json.dumps({
        "command": f"python benchmarks/{Path(script).name} " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {args.threads} threads (a 2-core machine shared with other jobs)",
        "minutes": round((time.perf_counter() - start) / 60, 1), "args": vars(args), "results": rows, **extra},
        indent=1) + "\n")
