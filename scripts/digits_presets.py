r"""Trains every method's digits preset and checks it beats the random-init encoder.

COMMAND:
  .venv/bin/python scripts/digits_presets.py --root=runs/digits_presets [--methods=simclr,tico]
Runs `experiments/train.py --config=configs/<method>.py:digits` for each method (resuming
finished runs instantly), reads each run's eval.json and prints a Markdown table of linear-probe
and kNN accuracy, pretrained vs. random init, with each run's wall time. Exits 1 if any
pretrained encoder fails to beat its random initialisation on linear-probe accuracy.
"""
import argparse
import json
import os
import subprocess
import sys
import time

from clrjax import methods

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = methods.names()  # every registered method


def run_method(method: str, root: str) -> dict:
    workdir = os.path.join(root, method)
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "train.py"),
           f"--config={os.path.join(ROOT, 'configs', method + '.py')}:digits", f"--workdir={workdir}"]
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    with open(os.path.join(workdir, "eval.json")) as f:
        report = json.load(f)
    report["wall_s"] = time.time() - start
    return report


def table(results: dict) -> str:
    rows = ["| method | linear pretrained | linear random init | kNN-20 pretrained | kNN-20 random init | wall s |",
            "|---|---|---|---|---|---|"]
    for method, r in results.items():
        p, q = r["pretrained"], r["random_init"]
        rows.append(f"| {method} | {p['linear_top1']:.4f} | {q['linear_top1']:.4f} | "
                    f"{p['knn20_top1']:.4f} | {q['knn20_top1']:.4f} | {r['wall_s']:.0f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="runs/digits_presets")
    parser.add_argument("--methods", default=",".join(METHODS))
    args = parser.parse_args(argv)
    results = {m: run_method(m, args.root) for m in args.methods.split(",")}
    print(table(results))
    losers = [m for m, r in results.items()
              if r["pretrained"]["linear_top1"] <= r["random_init"]["linear_top1"]]
    if losers:
        print(f"did not beat random init: {', '.join(losers)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
