"""W/report.md: one page that gathers what the pipeline's stages made (issue 12).

Each section is read from the files its stage wrote (never recomputed), with
a short explanation of what the numbers mean: the data, the models, the
synthetic sets, the downstream segmentation (Dice table, gains with their
intervals, figures), the synthesis quality table, the privacy audit. A
section whose stage did not run says so instead of inventing numbers.

The report is PRIVATE (it lives in the workdir beside the private stages and
links figures of private test slices). Links are relative to W, so the
workdir can be moved or zipped whole.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

from dfgm_jax import stage_io

REPORT = "report.md"


def _read_json(path: str) -> Any | None:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _last_metrics(path: str) -> dict:
  """The last row of a metrics.jsonl (the trainer dedupes replayed steps)."""
  last = {}
  try:
    with open(path) as f:
      for line in f:
        if line.strip():
          last = json.loads(line)
  except (OSError, ValueError):
    pass
  return last


def _data(workdir: str) -> list[str]:
  manifest = _read_json(os.path.join(workdir, "slices", "manifest.json"))
  if not manifest:
    return ["No preprocessed slices (the preprocess stage did not run)."]
  lines = [f"{manifest.get('image_size', '?')} px 2D slices of "
           f"{', '.join(manifest.get('modalities', []) or ['?'])}; splits (slices / "
           "patients / origin of the slices: public = a non-private center's volume, "
           "private = a private center's patient). `healthy` is the memory bank of "
           "the shareable set; `<center>_train` and `<center>_test` hold the private "
           "tumor slices of each center, split by patient; `<center>_healthy` a "
           "private center's own healthy slices (its local synthesis).", "",
           "| split | slices | patients | public | private |", "|---|---|---|---|---|"]
  for name, split in sorted(manifest.get("splits", {}).items()):
    origins = split.get("origins") or {}
    lines.append(f"| {name} | {split.get('num_slices', '?')} | "
                 f"{split.get('num_cases', '?')} | {origins.get('public', '?')} | "
                 f"{origins.get('private', '?')} |")
  healthy = manifest.get("healthy")
  if healthy and healthy.get("private"):
    lines += ["", f"**The `healthy` split holds {healthy['private']} slices of private "
              "patients** (`data.healthy_include_private`): a synthetic set made on it "
              "is not shareable."]
  elif healthy and healthy.get("num_slices", 0) < healthy.get("asked", 0):
    lines += ["", f"The `healthy` split holds the {healthy['num_slices']} public-origin "
              f"slices there are ({healthy.get('public_volumes')} public volumes), fewer "
              f"than the {healthy['asked']} asked."]
  return lines


def _training(m: dict, folder: str) -> tuple[str, int | None]:
  """How a model trained (from its last metrics row) and its optimizer steps
  in all. Federated rows carry the round and the steps per client ((r + 1)
  * local steps); in all = per client x clients, as central steps count."""
  centers = [k[:-len("/loss")] for k in m if k.endswith("/loss")]
  step = m.get("step")
  if not isinstance(step, (int, float)):
    return ("central" if folder != "g2" else "shareable data only"), None
  if "round" in m and centers:
    rounds, per_client = int(m["round"]), int(step)
    return (f"federated, {rounds} rounds of {per_client // max(rounds, 1)} local steps "
            f"over {', '.join(centers)} ({per_client} steps per client)",
            per_client * len(centers))
  return ("shareable data only" if folder == "g2" else "central"), int(step)


def _models(workdir: str) -> list[str]:
  rows, steps = [], {}
  for name, folder in (("G1 (dfgm)", "g1"),
                       ("anomalydiffusion", os.path.join("baselines", "anomalydiffusion",
                                                         "g1")),
                       ("G2 (shared; export g2_model/ SHAREABLE)", "g2")):
    m = _last_metrics(os.path.join(workdir, folder, "metrics.jsonl"))
    if not m:
      continue
    how, steps[folder] = _training(m, folder)
    loss = m.get("loss")
    loss = f"{loss:.4f}" if isinstance(loss, (int, float)) else "?"
    total = steps[folder] if steps[folder] is not None else "?"
    rows.append(f"| {name} | {folder} | {how} | {total} | {loss} |")
  if not rows:
    return ["No diffusion model was trained."]
  lines = ["Diffusion models: G1 (dfgm, trained to regenerate the boundary ring; "
           "federated when the run says so), when the anomalydiffusion baseline is made "
           "its own model trained on the dilated tumor region (ALGORITHM.md 8), and the "
           "shared model G2 (fresh, trained on the public synthetic set and the healthy "
           "slices only). Steps: optimizer steps in all (federated: steps per client x "
           "clients); loss: the last logged training loss.", "",
           "| model | folder | training | steps in all | last loss |", "|---|---|---|---|---|",
           *rows]
  g1, ad = steps.get("g1"), steps.get(os.path.join("baselines", "anomalydiffusion", "g1"))
  if g1 is not None and ad is not None:
    lines += ["", f"The anomalydiffusion model trained {ad} steps, G1 {g1}: " + (
        "the same budget (the fair baseline)." if ad == g1 else
        "not the same budget; its synthetic set's quality and Dice are not a like-for-"
        "like comparison with dfgm's.")]
  return lines


def _synthetic(workdir: str) -> list[str]:
  sets = [("dfgm (SHAREABLE)", "synthetic"),
          ("dfgm (NOT shareable)", os.path.join("private", "synthetic"))]
  root = os.path.join(workdir, "baselines")
  for mode in sorted(os.listdir(root)) if os.path.isdir(root) else []:
    sets.append((f"{mode} (private, evaluation only)", os.path.join("baselines", mode, "set")))
  sets.append(("local synthesis with G2 (the institute's own)",
               os.path.join("local", "synthetic")))
  lines = ["Each private tumor slice is pasted into its k closest public healthy "
           "slices; dfgm regenerates only the ring around the tumor, "
           "anomalydiffusion the tumor and the ring from the mask alone, cutpaste "
           "nothing. Local synthesis does the same with G2's export alone, the "
           "published set's tumors and the institute's own healthy slices.", "",
           "| set | folder | mode | images | per center | images/s | backgrounds |",
           "|---|---|---|---|---|---|---|"]
  found, why_not = False, []
  for name, folder in sets:
    s = _read_json(os.path.join(workdir, folder, "summary.json"))
    if not s:
      continue
    found = True
    per_center = ", ".join(f"{c}: {v.get('synthetic')}"
                           for c, v in s.get("centers", {}).items())
    origins = s.get("healthy_origins") or {}
    bank = (f"{origins.get('public', '?')} public, {origins.get('private', '?')} private"
            if origins else "origin not recorded")
    lines.append(f"| {name} | {folder} | {s.get('mode')} | {s.get('synthetic_total')} | "
                 f"{per_center} | {s.get('images_per_s')} | {bank} |")
    if s.get("not_shareable_because") and folder == os.path.join("private", "synthetic"):
      why_not.append(f"The dfgm set is NOT shareable: {s['not_shareable_because']}; it is "
                     "kept in `private/synthetic/` and G2 is not trained on it.")
  lines += [""] + why_not if why_not else []
  figure = os.path.join(workdir, "private", "figures")
  if os.path.isdir(figure):
    for f in sorted(os.listdir(figure)):
      if f.endswith(".png"):
        lines += ["", f"![{f} (private tumor slices)]({os.path.join('private', 'figures', f)})"]
  return lines if found else ["No synthetic set was made."]


def _evaluation(workdir: str) -> list[str]:
  md = os.path.join(workdir, "eval", "results.md")
  if not os.path.exists(md):
    return ["The evaluation did not run."]
  with open(md) as f:
    body = [l for l in f.read().splitlines() if not l.startswith("# ")]
  # results.md's sections become subsections; its figure links are relative
  # to W/eval, the report sits in W.
  return [("#" + l if l.startswith("## ") else l).replace("](figures/", "](eval/figures/")
          for l in body]


def _quality(workdir: str, table: Callable[[dict], str] | None) -> list[str]:
  quality = _read_json(os.path.join(workdir, "eval", "quality.json"))
  if quality is None or table is None:
    return ["The quality table was not computed."]
  return table(quality).splitlines()


def _privacy(workdir: str) -> list[str]:
  """The audit's verdicts and per-region numbers (W/privacy, issue 14)."""
  audit = _read_json(os.path.join(workdir, "privacy", "privacy.json"))
  if not audit or "summary" not in audit:
    return ["The privacy audit did not run (or its center has no held-out slices)."]
  s = audit["summary"]
  lines = [f"Candidates: {s.get('candidates')} of {s.get('center')} ({s.get('n_candidates')} "
           f"slices) against {s.get('n_training')} training and {s.get('n_heldout')} "
           "held-out slices; every threshold is calibrated on the held-out slices (the "
           "README's \"Privacy audit: how to read the numbers\"). The tumor interior is "
           "copied by design.", "", f"**Overall: {s.get('overall', '?').upper()}**", ""]
  lines += [f"- **{v.get('status')}**: {v.get('text')}"
            for v in audit.get("verdicts", {}).values()]
  lines += ["", "| region | DCR median | held-out DCR median | below held-out threshold | exact "
            "copies | NN ratio flagged | Carlini below |", "|---|---|---|---|---|---|---|"]
  for region, r in s.get("regions", {}).items():
    lines.append(f"| {region} | {r['dcr_median']:.4f} | {r['dcr_heldout_median']:.4f} | "
                 f"{r['dcr_fraction_below']:.1%} | {r['fraction_exact_copies']:.1%} | "
                 f"{r['nn_ratio_fraction_flagged']:.1%} | {r['carlini_fraction_below']:.1%} |")
  lines += ["", "Details: [privacy/privacy.md](privacy/privacy.md) (private); shareable "
            "summary: `privacy/summary.json`."]
  if audit.get("figure"):
    lines += ["", f"![closest candidate-training pairs (private training slices)]"
              f"(privacy/{audit['figure']})"]
  return lines


def build(workdir: str, *, title: str = "DFGM run report",
          quality_table: Callable[[dict], str] | None = None,
          extra: dict[str, list[str]] | None = None) -> str:
  """The report's markdown, from the files under `workdir`.

  Args:
    workdir: W.
    title: the first heading.
    quality_table: quality.json -> markdown (eval/quality_report.table).
    extra: further sections (title -> lines), appended in order.
  """
  sections = [("Data", _data(workdir)), ("Models", _models(workdir)),
              ("Synthetic sets", _synthetic(workdir)),
              ("Does the synthetic data help? Downstream segmentation",
               _evaluation(workdir)),
              ("Synthesis quality", _quality(workdir, quality_table)),
              ("Privacy audit", _privacy(workdir))]
  sections += list((extra or {}).items())
  out = [f"# {title}", "",
         f"Workdir `{os.path.basename(os.path.normpath(workdir))}`. Everything in it "
         "is private except `synthetic/`, `g2_model/` and `privacy/summary.json` (see "
         "the README's workdir layout); this "
         "report links private figures, so keep it inside the center.", ""]
  for name, lines in sections:
    out += [f"## {name}", "", *lines, ""]
  return "\n".join(out)


def write(workdir: str, **kwargs) -> str:
  """Writes W/report.md (atomically); returns its path."""
  path = os.path.join(workdir, REPORT)
  stage_io.write_text(path, build(workdir, **kwargs))
  return path
