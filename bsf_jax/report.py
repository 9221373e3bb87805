r"""Collect fine-tuning runs into a table shaped like the paper's.

  python -m bsf_jax.report runs/s3_f0 runs/s3_f1 ... [--csv out.csv]
  python -m bsf_jax.report runs/folds/fold* evals/fold*_held_out evals/ensemble evals/ensemble_mirror

Each RUN is a stage-3 workdir with `evaluation.json` (from
`python -m bsf_jax.evaluate --workdir RUN`, which the demo and the sweep
scripts run) and `config.json`, or an `evaluate --output` folder (an
ensemble, a mirrored or a held-out evaluation; its config is the workdir's
that `evaluation.json` names). Rows are grouped by the run's protocol: model
size (depths), modalities, few-shot fraction and whether it was initialised
from a pretrained stage; then by the data scored (the run's own validation
split, or a datalist), the scoring convention and the inference (models
averaged, flips, post-processing). Within a group the folds / repeats are
averaged, as in the paper's Tables 4, 5, 8 and 9 (mean and standard
deviation of the per-run mean Dice, n = runs).

When one protocol was scored on the same data several ways (single folds,
their ensemble, the ensemble with mirroring), a second table sets their mean
Dice side by side.
"""

from __future__ import annotations

import csv
import json
import os
import sys

from absl import app, flags
import numpy as np

from bsf_jax import tool_flags

FLAGS = tool_flags.flag_values(__name__)
flags.DEFINE_string("csv", None, "also write the per-run rows here", flag_values=FLAGS)

PROTOCOL = ("depths", "modalities", "fraction", "init")
# What else a row is grouped by: the data scored, how, and what predicted it.
SETTING = ("data", "scoring", "inference")
GROUP = PROTOCOL + SETTING


def _protocol(config: dict) -> dict[str, str]:
  data, model = config["data"], config["model"]
  return {
      "depths": "-".join(str(d) for d in model["depths"]),
      "modalities": "+".join(data["modalities"]),
      "fraction": f"{data.get('fraction', 1.0):g}",
      "init": "pretrained" if config.get("init_from") else "scratch",
  }


def _inference(evaluation: dict) -> tuple[str, tuple]:
  """A name for what predicted (`1 model`, `5 models x 8 flips`), and its rank."""
  info = evaluation.get("inference") or {}  # Before ensembles: one model.
  n = len(info.get("checkpoints", [None]))
  flips = int(info.get("flips", 1))
  post = ",".join(f"{k}={v}" for k, v in info.get("postprocess", {}).items())
  name = f"{n} model{'s' if n > 1 else ''}"
  if flips > 1:
    name += f" x {flips} flips"
  if post:
    name += f" + {post}"
  return name, (n, flips, post)


def load_run(run: str) -> dict:
  path = os.path.join(run, "evaluation.json")
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{run}: no evaluation.json (run `python -m bsf_jax.evaluate --workdir {run}`)")
  with open(path) as f:
    evaluation = json.load(f)
  config_path = os.path.join(run, "config.json")
  if not os.path.exists(config_path) and evaluation.get("workdir"):
    config_path = os.path.join(evaluation["workdir"], "config.json")
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"{run}: no config.json (nor in the workdir its "
                            "evaluation.json names)")
  with open(config_path) as f:
    config = json.load(f)
  datalist = (evaluation.get("data") or {}).get("datalist")
  inference, rank = _inference(evaluation)
  return {"run": run, **_protocol(config),
          "data": os.path.basename(datalist) if datalist else "validation split",
          "scoring": evaluation.get("convention", "monai"),
          "inference": inference, "_rank": rank,
          **{k: v for k, v in evaluation["mean"].items() if k != "volume"}}


def _metrics(rows: list[dict]) -> list[str]:
  """Every metric column, in order of first appearance."""
  names = []
  for r in rows:
    names += [k for k in r if k not in GROUP and k not in ("run", "_rank")
              and k not in names]
  return names


def _mean_std(members: list[dict], metric: str) -> str:
  values = np.array([r.get(metric, np.nan) for r in members], float)
  if np.isnan(values).all():
    return "-"
  return f"{np.nanmean(values):.4f} ± {np.nanstd(values):.4f}"


def _groups(rows: list[dict], keys) -> list[tuple[tuple, list[dict]]]:
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    groups.setdefault(tuple(r[k] for k in keys), []).append(r)
  return sorted(groups.items(),
                key=lambda g: (g[0][:-1], g[1][0]["_rank"]) if keys[-1] ==
                "inference" else g[0])


def summarise(rows: list[dict]) -> list[dict]:
  """One row per protocol, data, scoring and inference: mean ± std, n."""
  metrics = _metrics(rows)
  table = []
  for group, members in _groups(rows, GROUP):
    row = dict(zip(GROUP, group), n=len(members))
    row.update({m: _mean_std(members, m) for m in metrics})
    table.append(row)
  return table


def side_by_side(rows: list[dict], metric: str = "dice_mean") -> list[dict]:
  """`metric` of each inference in a column, per protocol, data and scoring.

  Empty unless some protocol was scored on the same data more than one way.
  """
  order = [name for name, _ in sorted(
      {(r["inference"], r["_rank"]) for r in rows}, key=lambda x: x[1])]
  keys = PROTOCOL + ("data", "scoring")
  table = []
  for group, members in _groups(rows, keys):
    by_inference = {}
    for r in members:
      by_inference.setdefault(r["inference"], []).append(r)
    if len(by_inference) < 2:
      continue
    row = dict(zip(keys, group))
    for name in order:
      runs = by_inference.get(name)
      row[name] = (f"{_mean_std(runs, metric)} (n={len(runs)})" if runs
                   else "")
    table.append(row)
  if not table:
    return []
  used = [n for n in order if any(r[n] for r in table)]
  return [{**{k: r[k] for k in keys}, **{n: r[n] for n in used}} for r in table]


def markdown(table: list[dict]) -> str:
  cols = list(table[0])
  lines = ["| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
  lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in table]
  return "\n".join(lines)


def main(argv=None) -> int:
  """The command line (module docstring); argv: the words after the program name."""
  runs = tool_flags.parse(FLAGS, argv, positional=True)
  if not runs:
    raise app.UsageError("the following arguments are required: runs (stage-3 workdirs)")
  try:
    rows = [load_run(r) for r in runs]
  except (FileNotFoundError, KeyError, json.JSONDecodeError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  if FLAGS.csv:
    with open(FLAGS.csv, "w", newline="") as f:
      writer = csv.DictWriter(f, ["run", *GROUP, *_metrics(rows)],
                              extrasaction="ignore")
      writer.writeheader()
      writer.writerows(rows)
  print(markdown(summarise(rows)))
  compared = side_by_side(rows)
  if compared:
    print("\nMean Dice (dice_mean) of each inference, side by side:\n")
    print(markdown(compared))
  return 0


if __name__ == "__main__":
  tool_flags.run(main)
