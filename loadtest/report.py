"""Outputs of a run: the JSON summary (vLLM key names), a CSV row per request, PNG plots, a console table."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

CSV_FIELDS = ["model", "task", "target_tokens", "prompt_tokens", "depth_target", "depth", "needle_offsets", "ok",
              "status", "error", "correct", "ttft_ms", "tpot_ms", "e2el_ms", "output_tokens", "start_s", "itls_ms",
              "output"]


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.write_text(json.dumps(report, indent=2, default=str))


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def plot_ttft_vs_length(path: Path, rows: list[dict[str, Any]]) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for model in sorted({r["model"] for r in rows}):
        lengths = sorted({r["target_tokens"] for r in rows if r["model"] == model})
        medians = [np.median([r["ttft_ms"] / 1000 for r in rows if r["model"] == model and r["target_tokens"] == n
                              and r["ok"]] or [np.nan]) for n in lengths]
        ax.plot(lengths, medians, marker="o", label=model)
    ax.set(xlabel="prompt tokens", ylabel="median TTFT (s)", title="Time to first token by prompt length")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_accuracy_heatmap(path: Path, cells: list[dict[str, Any]]) -> None:
    """One panel per (task, model): needle depth x prompt length, the share answered right."""
    cells = [c for c in cells if c["depth"] != "-"]  # the short questions have no needle: the table shows them
    models = sorted({c["model"] for c in cells})
    tasks = sorted({c["task"] for c in cells})
    lengths = sorted({c["target_tokens"] for c in cells})
    depths = sorted({c["depth"] for c in cells}, key=lambda d: (d.startswith("@"), float(d.lstrip("@"))))
    fig, axes = plt.subplots(len(tasks), len(models), figsize=(3.2 * len(models) + 1, 3 * len(tasks) + 0.5),
                             squeeze=False)
    for (row, task), (col, model) in ((t, m) for t in enumerate(tasks) for m in enumerate(models)):
        ax = axes[row][col]
        grid = np.full((len(depths), len(lengths)), np.nan)
        for c in cells:
            if c["model"] == model and c["task"] == task:
                grid[depths.index(c["depth"]), lengths.index(c["target_tokens"])] = c["accuracy"]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set(xticks=range(len(lengths)), xticklabels=lengths, yticks=range(len(depths)), yticklabels=depths,
               xlabel="prompt tokens" if row == len(tasks) - 1 else "",
               ylabel=f"{task}: needle depth" if col == 0 else "")
        if row == 0:
            ax.set_title(model, fontsize=8)
        for (y, x), v in np.ndenumerate(grid):
            if not np.isnan(v):
                ax.text(x, y, f"{v:.0%}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="accuracy")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_latency_cdf(path: Path, rows: list[dict[str, Any]]) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for key, ax in zip(("ttft_ms", "e2el_ms"), axes):
        for model in sorted({r["model"] for r in rows}):
            values = np.sort([r[key] / 1000 for r in rows if r["model"] == model and r["ok"]])
            if values.size:
                ax.step(values, np.arange(1, values.size + 1) / values.size, where="post", label=model)
        ax.set(xlabel=f"{key.split('_')[0].upper()} (s)", ylabel="fraction of requests", title=f"{key[:-3]} CDF")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def console_table(per_model: dict[str, dict[str, Any]], cells: list[dict[str, Any]]) -> str:
    lines = ["| model | completed | failed | median TTFT ms | median TPOT ms | p99 E2EL ms | accuracy |",
             "|---|---|---|---|---|---|---|"]
    for model, s in per_model.items():
        mine = [c for c in cells if c["model"] == model]
        acc = sum(c["correct"] for c in mine) / max(1, sum(c["requests"] for c in mine))
        lines.append(f"| {model} | {s['completed']} | {s['failed']} | {s['median_ttft_ms']:.0f} | "
                     f"{s['median_tpot_ms']:.1f} | {s['p99_e2el_ms']:.0f} | {acc:.0%} |")
    return "\n".join(lines)
