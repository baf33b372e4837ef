"""
The report of an evaluation: a table with one column per encoder and deltas against the first, report.json (every
number), report.md (the tables) and report.png (bar charts and a depth panel of the first test image).

    print(write_report("runs/eval", report, names, results, examples, qa))
"""

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from storage.atomic import write_file_atomically, write_text_atomically

LOWER_IS_BETTER = {"rmse", "absrel", "si_rmse", "rmse_aligned", "absrel_aligned", "rel_err", "rel_err_median",
                   "err_m", "err_m_median", "err_px_median", "image_err_px_median"}
HEADLINE = [("depth_lin1", "rmse"), ("depth_lin4", "rmse"), ("depth_lin1", "d1"), ("depth_lin1", "si_rmse"),
            ("depth_lin1", "rmse_aligned"), ("segmentation", "miou"), ("classification", "linear_acc"),
            ("classification", "knn_acc"), ("retrieval", "map"), ("rgbd_depth_lin1", "rmse"),
            ("stereo", "pck16"), ("mujoco_depth_lin1", "rmse"), ("mujoco_segmentation", "miou"), ("robot", "average")]


def table_rows(results: list) -> list:
    """[(probe, metric, [value per encoder])] for every number the encoders report (timings and counts left out)."""
    return [(probe, metric, [r.get(probe, {}).get(metric, float("nan")) for r in results])
            for probe, metrics in results[0].items() if probe != "time_s" and isinstance(metrics, dict)  # not
            for metric, value in metrics.items()  # dual_channel (a list per layer), nor counts
            if isinstance(value, (int, float)) and metric not in ("queries", "n")]


def format_table(names: list, rows: list, markdown: bool = False) -> str:
    """Text (or markdown) table: metric, then each encoder's value; after the first, the delta against it."""
    head = ["probe", "metric"] + [names[0]] + [f"{n} (delta)" for n in names[1:]]
    body = []
    for probe, metric, values in rows:
        arrow = "sd over seeds" if probe.endswith("_sd") else "lower better" if metric in LOWER_IS_BETTER \
            else "higher better"
        cells = [f"{values[0]:.3f}"] + [f"{v:.3f} ({v - values[0]:+.3f})" for v in values[1:]]
        body.append([probe, f"{metric} ({arrow})"] + cells)
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in body])


def _colormap(x: np.ndarray) -> np.ndarray:
    """values in [0, 1] -> (..., 3) uint8 along viridis' anchor colours."""
    anchors = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], float)
    pos = np.clip(np.nan_to_num(x), 0, 1) * (len(anchors) - 1)
    lo = np.minimum(pos.astype(int), len(anchors) - 2)
    w = (pos - lo)[..., None]
    return (anchors[lo] * (1 - w) + anchors[lo + 1] * w).astype(np.uint8)


PALETTE = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
                    [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128], [220, 190, 255],
                    [170, 110, 40], [255, 250, 200], [128, 0, 0], [170, 255, 195]], np.uint8)
ENCODER_COLOURS = [(90, 90, 90), (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]


def plot_report(path, names: list, rows: list, examples: list) -> None:
    """report.png: a bar chart per headline metric (a bar per encoder), then the first test image: RGB, true depth
    and each encoder's lin.1 depth (one colour scale), the segmentation labels and each encoder's prediction."""
    font = ImageFont.load_default(size=13)
    by_key = {(p, m): v for p, m, v in rows}
    charts = [(p, m, by_key[(p, m)]) for p, m in HEADLINE if (p, m) in by_key]
    pw, ph, cols, tile = 230, 190, 5, 160
    qual = examples and "rgb" in examples[0]
    width = max(cols * pw, (2 + len(names)) * (tile + 10) + 10)
    height = 30 + -(-len(charts) // cols) * ph + (2 * (tile + 25) + 10 if qual else 0)
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    for k, name in enumerate(names):  # legend
        x = 10 + k * (width - 20) // max(len(names), 1)
        d.rectangle([x, 8, x + 14, 22], fill=ENCODER_COLOURS[k % len(ENCODER_COLOURS)])
        d.text((x + 20, 8), name[:40], fill="black", font=font)
    for c, (probe, metric, values) in enumerate(charts):
        x0, y0 = (c % cols) * pw, 30 + (c // cols) * ph
        better = "lower" if metric in LOWER_IS_BETTER else "higher"
        d.text((x0 + 8, y0 + 4), f"{probe} {metric}", fill="black", font=font)
        d.text((x0 + 8, y0 + 19), f"({better} is better)", fill=(110, 110, 110), font=font)
        top = max([v for v in values if np.isfinite(v)] + [1e-9])
        bw = (pw - 40) / len(values)
        for k, v in enumerate(values):
            h = 0 if not np.isfinite(v) else (ph - 80) * v / top
            bx = x0 + 20 + k * bw
            d.rectangle([bx + 4, y0 + ph - 25 - h, bx + bw - 4, y0 + ph - 25], fill=ENCODER_COLOURS[k % 6])
            d.text((bx + 4, y0 + ph - 40 - h), f"{v:.3f}", fill="black", font=font)
    if qual:
        y = 30 + -(-len(charts) // cols) * ph + 10
        depth = examples[0]["depth"]
        vmax = float(np.percentile(depth[depth > 0], 99)) if (depth > 0).any() else 1.0
        show = lambda a: Image.fromarray(a).resize((tile, tile), Image.NEAREST)
        row1 = [("image", show(examples[0]["rgb"])), (f"depth 0-{vmax:.1f} m (truth)", show(_colormap(depth / vmax)))]
        row1 += [(f"lin.1: {n}", show(_colormap(e["depth_lin1"] / vmax))) for n, e in zip(names, examples)]
        row2 = []
        if "labels" in examples[0]:
            row2 = [("", None), ("classes (truth)", show(PALETTE[examples[0]["labels"] % len(PALETTE)]))]
            row2 += [(f"seg: {n}", show(PALETTE[e["segmentation"] % len(PALETTE)])) for n, e in zip(names, examples)]
        for r, row in enumerate([row1, row2]):
            for k, (label, im) in enumerate(row):
                if im is not None:
                    x = 10 + k * (tile + 10)
                    img.paste(im, (x, y + r * (tile + 25) + 15))
                    d.text((x, y + r * (tile + 25)), label[:24], fill="black", font=font)
    write_file_atomically(path, lambda tmp: img.save(tmp, format="PNG"))


def qa_rows(qa: dict) -> list:
    """Table rows of score_qa results {column name: scores}: overall, per level, per question type."""
    names = list(qa)
    get = lambda n, group, key, metric: qa[n][group].get(key, {}).get(metric, float("nan"))
    rows = [("qa", "overall accuracy", [qa[n]["overall"]["accuracy"] for n in names])]
    rows += [("qa level", f"{lv} accuracy", [get(n, "by_level", lv, "accuracy") for n in names])
             for lv in qa[names[0]]["by_level"]]
    for kind, first in qa[names[0]]["by_type"].items():
        for metric in ("accuracy", "within10", "within25", "rel_err", "err_m", "recall"):
            if metric in first:
                rows.append((f"qa {kind}", metric, [get(n, "by_type", kind, metric) for n in names]))
    return rows


def write_report(out_dir, report: dict, names: list, results: list, examples: list, qa: dict | None = None) -> str:
    """report.json, report.md and, with encoders, report.png in out_dir; returns the text tables."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text, md = [], [f"# SpatialBoost evaluation\n\n{report.get('summary', '')}\n"]
    if names:
        rows = table_rows(results)
        text.append(format_table(names, rows))
        md.append(format_table(names, rows, markdown=True))
        plot_report(out / "report.png", names, rows, examples)
    if qa:
        text.append("Spatial QA\n" + format_table(list(qa), qa_rows(qa)))
        md.append("\n## Spatial QA\n\n" + format_table(list(qa), qa_rows(qa), markdown=True))
    write_text_atomically(out / "report.json", json.dumps(report, indent=1, default=float))
    write_text_atomically(out / "report.md", "\n".join(md) + "\n")
    return "\n\n".join(text)
