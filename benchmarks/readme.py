"""The README's measured tables, rendered from the results files the benchmarks write, never typed.

    python benchmarks/readme.py           # rewrite each table between its markers in README.md
    python benchmarks/readme.py --check   # exit 1 if README.md is not what the results files give

Tables: time and memory per notebook (results/notebooks_*.json and gpu_validate.json, from benchmarks/notebooks.py)
and speed against diffusers (results/speed_*.json, from benchmarks/speed.py). tests/test_gpu_profile.py runs the
check.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"


def _minutes(s: float) -> str:
    return f"{s:.0f} s" if s < 60 else f"{int(s // 60)} min {s % 60:02.0f} s"


def notebook_table() -> str:
    """One column per results file, one row per notebook: wall time (peak kernel memory, peak GPU memory; the
    date and the reference time measured just before it, where the record has them)."""
    files = sorted(RESULTS.glob("notebooks_*.json")) + sorted(RESULTS.glob("gpu_validate.json"))
    runs = [json.loads(f.read_text()) for f in files]
    if not runs:
        return "(no results yet: run `python benchmarks/notebooks.py --profile smoke`)"
    head = [f"{r['profile']}{' (dry run)' if r['dry_run'] else ''}, {r['machine']}, last run {r['date']}" for r in runs]
    lines = ["| notebook | " + " | ".join(head) + " |", "| --- |" + " --- |" * len(runs)]
    names = sorted({n for r in runs for n in r["notebooks"]})
    for n in names:
        cells = []
        for r in runs:
            rec = r["notebooks"].get(n)
            if rec is None:
                cells.append("")
                continue
            mem = f"{rec['peak_kernel_rss_mib'] / 1024:.1f} GiB RAM"
            if rec.get("peak_gpu_mib") is not None:
                mem += f", {rec['peak_gpu_mib'] / 1024:.1f} GiB GPU"
            when = f"; {rec['date']}, reference {rec['reference_s']} s" if "reference_s" in rec else ""
            cells.append(f"{_minutes(rec['wall_s'])} ({mem}{when})" + ("" if rec["passed"] else " **failed**"))
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines.append("| all | " + " | ".join(_minutes(r["total_s"]) + ("" if len(r["notebooks"]) == len(names) else
                                          f" ({len(r['notebooks'])} notebooks)") for r in runs) + " |")
    return "\n".join(lines)


def speed_table() -> str:
    """One row per model and results file: step times, the ratios sdlearn / diffusers, FLOPs; then throughput."""
    runs = [json.loads(f.read_text()) for f in sorted(RESULTS.glob("speed_*.json"))]
    if not runs:
        return "(no results yet: run `python benchmarks/speed.py`)"
    lines = ["| model | machine | train step: sdlearn / diffusers (ratio) | sampling step (ratio) | "
             "train GFLOP (achieved TFLOP/s, MFU) | other variants (train / sampling ratio) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in runs:
        where = f"{r['machine']}, {r['threads']} threads{', bf16' if r['bf16'] else ''}, {r['date']}"
        for name, m in r["models"].items():
            tr, sa = m["train_step_ms"], m["sample_step_ms"]
            rate = f"{m['train_tflops_achieved']}" + (f", MFU {m['train_mfu']:.1%}" if "train_mfu" in m else "")
            variants = [f"{k}: {v['train_ratio']} / {v['sample_ratio']}" for k, v in m["variants"].items()]
            ratio = {k: f"**{m[k]}**" + (f", IQR {m[k + '_iqr'][0]}-{m[k + '_iqr'][1]}" if k + "_iqr" in m else "")
                     for k in ("train_ratio", "sample_ratio")}
            lines.append(f"| {name} (batch {m['train_batch']} / {m['sample_batch']}) | {where} | "
                         f"{tr['sdlearn']:.0f} / {tr['diffusers']:.0f} ms ({ratio['train_ratio']}) | "
                         f"{sa['sdlearn']:.0f} / {sa['diffusers']:.0f} ms ({ratio['sample_ratio']}) | "
                         f"{m['train_step_gflop']} ({rate}) | {'; '.join(variants)} |")
    for r in runs:
        gen = ", ".join(f"{k} {v['images_per_s']}" for k, v in r["generate"].items())
        if gen:
            steps = next(iter(r["generate"].values()))["steps"]
            lines.append(f"\nReleased pipelines, images per second ({steps} steps, guidance, {r['machine']}, "
                         f"{r['date']}): {gen}.")
    return "\n".join(lines)


TABLES = {"notebook-times": notebook_table, "speed": speed_table}


def render(check: bool = False) -> bool:
    """Write every table between its markers (<!-- name: ... --> and <!-- /name -->); True if nothing changed."""
    text = new = README.read_text()
    for name, make in TABLES.items():
        pattern = re.compile(rf"(<!-- {name}:[^>]*-->)\n.*?(<!-- /{name} -->)", re.S)
        if not pattern.search(new):
            raise SystemExit(f"error: README.md has no <!-- {name}: ... --> ... <!-- /{name} --> block")
        new = pattern.sub(lambda m, make=make: f"{m[1]}\n{make()}\n{m[2]}", new)
    if not check:
        README.write_text(new)
    return new == text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only say whether README.md is up to date")
    args = ap.parse_args(argv)
    current = render(check=args.check)
    if args.check and not current:
        print("README.md's measured tables are out of date: run python benchmarks/readme.py")
    return 0 if current or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
