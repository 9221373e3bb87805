r"""Collect fine-tuning runs into a table shaped like the paper's.

  python -m bsf_jax.report runs/s3_f0 runs/s3_f1 ... [--csv out.csv] [--by size]

Each RUN is a stage-3 workdir with `evaluation.json` (from
`python -m bsf_jax.evaluate --workdir RUN`, which the demo and the sweep
scripts run) and `config.json`. Rows are grouped by the run's protocol: model
size (depths), modalities, few-shot fraction and whether it was initialised
from a pretrained stage; within a group the folds / repeats are averaged, as
in the paper's Tables 4, 5, 8 and 9 (mean and standard deviation of the
per-run mean Dice, n = runs).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys

import numpy as np


def _protocol(config: dict) -> dict[str, str]:
  data, model = config["data"], config["model"]
  return {
      "depths": "-".join(str(d) for d in model["depths"]),
      "modalities": "+".join(data["modalities"]),
      "fraction": f"{data.get('fraction', 1.0):g}",
      "init": "pretrained" if config.get("init_from") else "scratch",
  }


def load_run(run: str) -> dict:
  paths = {n: os.path.join(run, n) for n in ("evaluation.json", "config.json")}
  for name, path in paths.items():
    if not os.path.exists(path):
      raise FileNotFoundError(
          f"{run}: no {name} (run `python -m bsf_jax.evaluate --workdir {run}`)")
  with open(paths["evaluation.json"]) as f:
    evaluation = json.load(f)
  with open(paths["config.json"]) as f:
    config = json.load(f)
  return {"run": run, **_protocol(config),
          **{k: v for k, v in evaluation["mean"].items() if k != "volume"}}


def summarise(rows: list[dict]) -> list[dict]:
  keys = ("depths", "modalities", "fraction", "init")
  metrics = [k for k in rows[0] if k not in keys and k != "run"]
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    groups.setdefault(tuple(r[k] for k in keys), []).append(r)
  table = []
  for group, members in sorted(groups.items()):
    row = dict(zip(keys, group), n=len(members))
    for m in metrics:
      values = np.array([r[m] for r in members], float)
      row[m] = f"{np.nanmean(values):.4f} ± {np.nanstd(values):.4f}"
    table.append(row)
  return table


def markdown(table: list[dict]) -> str:
  cols = list(table[0])
  lines = ["| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
  lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in table]
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m bsf_jax.report",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("runs", nargs="+", help="stage-3 workdirs")
  parser.add_argument("--csv", help="also write the per-run rows here")
  args = parser.parse_args(argv)
  try:
    rows = [load_run(r) for r in args.runs]
  except (FileNotFoundError, KeyError, json.JSONDecodeError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  if args.csv:
    with open(args.csv, "w", newline="") as f:
      writer = csv.DictWriter(f, list(rows[0]))
      writer.writeheader()
      writer.writerows(rows)
  print(markdown(summarise(rows)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
