"""Pool several runs of tools/qnn_sample_on_htp.py (other seeds, same artifacts) into one table.

    python tools/pool_sample_tables.py out/qnn-sample-on-htp/mse out/qnn-sample-on-htp/mse-seed1 ...

The simulator takes 17-27 min per artifact per 20 images, so a 100-image comparison is run as
several sessions' worth of seed sets. Their means pool exactly, weighted by image count; the
standard error of the gain needs every image's PSNR, which only newer tables keep, so it is printed
only when every table has them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

DEVICES = ("htp", "cpu_ep")


def better_of(row: dict, device: str) -> tuple[int, int]:
    """(images better than the first artifact, images) from a row's "k/n"."""
    better, images = row[f"{device}_images_better"].split("/")
    return int(better), int(images)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="+", help="folders holding a table.json")
    args = ap.parse_args()
    tables = [json.loads((run / "table.json").read_text()) for run in args.runs]
    artifacts = [row["artifact"] for row in tables[0]]
    for run, table in zip(args.runs, tables, strict=True):
        if [row["artifact"] for row in table] != artifacts:
            raise SystemExit(f"{run / 'table.json'}: artifacts {[r['artifact'] for r in table]} "
                             f"differ from {artifacts}")
    devices = [d for d in DEVICES if all(f"{d}_psnr_db" in table[0] for table in tables)]
    cols = ["artifact", "buckets"] + [f"{d}_{c}" for d in devices for c in ("psnr_db", "gain_vs_first_db",
                                                                         "gain_stderr_db", "images_better")]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for i, artifact in enumerate(artifacts):
        row = {"artifact": artifact, "buckets": tables[0][i]["buckets"]}
        for d in devices:
            better, counts = np.array([better_of(table[i], d) for table in tables]).T
            weights = counts / counts.sum()
            for key in (f"{d}_psnr_db", f"{d}_gain_vs_first_db"):
                row[key] = round(float(sum(w * t[i][key] for w, t in zip(weights, tables, strict=True))), 3)
            per_image = f"{d}_per_image"
            if all(per_image in t[i] and per_image in t[0] for t in tables):
                diff = np.concatenate([np.subtract(t[i][per_image], t[0][per_image]) for t in tables])
                row[f"{d}_gain_stderr_db"] = round(float(diff.std() / np.sqrt(len(diff))), 3)
            else:
                row[f"{d}_gain_stderr_db"] = "-"
            row[f"{d}_images_better"] = f"{int(better.sum())}/{int(counts.sum())}"
        lines.append("| " + " | ".join(str(row[c]) for c in cols) + " |")
    print("\n".join(lines))
    print(f"\npooled from {', '.join(str(run) for run in args.runs)}")


if __name__ == "__main__":
    main()
