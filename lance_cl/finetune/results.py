"""``finetune.json`` -> summary over seeds, the Markdown table and the accuracy-vs-memory plot.

Everything here reads only the result dictionary (what ``finetune.json`` holds), so the table and
the plot can be rebuilt from the file: ``render_table(load_result(path))``.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, Optional, Sequence

from ..units import format_bytes
from ..cl.run_files import write_json_atomic, write_text_atomic

__all__ = ["load_result", "plot_accuracy_vs_memory", "render_table", "summarize", "write_outputs"]


def _stats(values: Sequence[Optional[float]]) -> tuple[Optional[float], Optional[float]]:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
    return num / den if num is not None and den else None


def summarize(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per (layers, method), in run order: seeds, failures, mean / std of accuracy,
    means of the memory / FLOPs / time figures and their ratios to vanilla's (same layers)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in result["runs"]:
        groups.setdefault((str(run["layers_spec"]), run["method"]), []).append(run)
    out = []
    for (spec, method), runs in groups.items():
        ok = [r for r in runs if r["status"] == "ok"]
        entry: dict[str, Any] = {"layers_spec": spec, "method": method, "seeds": [r["seed"] for r in ok],
                                 "failed": [{"seed": r["seed"], "error": r["error"]}
                                            for r in runs if r["status"] != "ok"]}
        if ok:
            mean = lambda f: _stats([f(r) for r in ok])[0]  # noqa: E731
            entry["accuracy"], entry["accuracy_std"] = _stats([r["accuracy"] for r in ok])
            entry["layers"] = ok[0]["layers"]
            entry["ranks"] = ok[0]["ranks"]
            entry["finetuned_bytes"] = mean(lambda r: r["memory"]["finetuned_layers"])
            entry["whole_step_bytes"] = mean(lambda r: r["memory"]["whole_step"])
            entry["peak_step_bytes"] = mean(lambda r: r["memory"]["peak_step"])
            entry["flops"] = mean(lambda r: r["flops"]["finetuned_layers"])
            entry["step_s"] = mean(lambda r: r["time"].get("interleaved_median_s",
                                                           r["time"]["step_median_s"]))
            entry["train_step_s"] = mean(lambda r: r["time"]["step_median_s"])
            entry["angle_deg"] = mean(lambda r: statistics.fmean(
                g["angle_deg"] for g in r["gradient"].values()))
        out.append(entry)
    vanilla = {e["layers_spec"]: e for e in out if e["method"] == "vanilla" and "accuracy" in e}
    for e in out:
        v = vanilla.get(e["layers_spec"])
        if v is None or "accuracy" not in e:
            continue
        e["accuracy_delta"] = e["accuracy"] - v["accuracy"]
        for key in ("finetuned_bytes", "whole_step_bytes", "peak_step_bytes"):
            e[key + "_ratio"] = _ratio(v[key], e[key])     # vanilla / method: higher = fewer bytes
        for key in ("flops", "step_s"):
            e[key + "_ratio"] = _ratio(e[key], v[key])     # method / vanilla: lower = cheaper
    return out


def _fmt_x(r: Optional[float], digits: int = 2) -> str:
    return "-" if r is None else f"{r:.{digits}f}x"


def _fmt_rank_list(ranks: Sequence[Optional[int]]) -> str:
    """[None, 16, 2, 2] -> "-,16,2,2"; no compressed mode -> "full"."""
    if not ranks or all(r is None for r in ranks):
        return "full"
    return ",".join("-" if r is None else str(r) for r in ranks)


def render_table(result: dict[str, Any]) -> str:
    """The Markdown report: set-up lines, the summary table, a per-layer table (first seed)."""
    cfg, machine = result["config"], result.get("machine", {})
    lines = [f"Model {cfg['model']} ({result.get('weights', {}).get('source', cfg['weights'])}), "
             f"data {cfg['dataset']} ({result.get('data', {}).get('train_images', '?')} train / "
             f"{result.get('data', {}).get('test_images', '?')} test images, {cfg['image_size']}x"
             f"{cfg['image_size']}); {cfg['epochs']} epochs, batch {cfg['batch_size']}, SGD lr "
             f"{cfg['lr']} momentum {cfg['momentum']} weight decay {cfg['weight_decay']}, cosine "
             f"schedule, clip {cfg['clip_norm']}; seeds {', '.join(map(str, cfg['seeds']))}. "
             + ("Layers N: the last N convolutions, the classifier trained uncompressed on top."
                if cfg.get("head", "compressed") == "plain" else
                "Layers N: the last N Conv2d / Linear layers, the classifier compressed with them.")
             + (" Every model's BatchNorm / activation / dropout / pooling tensors compacted "
                "(lance_cl.compact_activations)." if cfg.get("compact") else ""),
             f"Machine: {machine.get('cpu', '?')}, torch {machine.get('torch', '?')}, "
             f"{machine.get('threads', '?')} thread(s), device {cfg['device']}.",
             "",
             "Accuracy: top-1 on the test split after the last epoch, mean ± std over seeds. Bytes: "
             "what autograd saves in one training step over the fine-tuned layers and over the whole "
             "step, and the peak bytes allocated during the step; ratios are vanilla / method. "
             "FLOPs (fine-tuned layers) and step time ratios are method / vanilla. Step: median of "
             "forward + backward after training, the methods of a seed timed round-robin on one "
             "batch (the median training step, optimizer included, is in the JSON).",
             "",
             "| layers | method | seeds | accuracy (%) | Δ vs vanilla | act. bytes, fine-tuned layers "
             "| ratio | whole step | ratio | peak step | ratio | FLOPs | ratio | step (ms) | ratio "
             "| grad angle |",
             "|" + "---|" * 16]
    for e in summarize(result):
        failed = "; ".join(f"seed {f['seed']}: {f['error']}" for f in e["failed"])
        if "accuracy" not in e:
            lines.append(f"| {e['layers_spec']} | {e['method']} | 0 | failed: "
                         f"{_escape(failed)} |" + " |" * 12)
            continue
        seeds = f"{len(e['seeds'])}" + (f" ({len(e['failed'])} failed)" if e["failed"] else "")
        delta = e.get("accuracy_delta")
        lines.append(
            f"| {e['layers_spec']} | {e['method']} | {seeds} | {e['accuracy']:.2f} ± "
            f"{e['accuracy_std']:.2f} | {'-' if delta is None else f'{delta:+.2f}'} "
            f"| {format_bytes(e['finetuned_bytes'])} | {_fmt_x(e.get('finetuned_bytes_ratio'), 1)} "
            f"| {format_bytes(e['whole_step_bytes'])} | {_fmt_x(e.get('whole_step_bytes_ratio'))} "
            f"| {format_bytes(e['peak_step_bytes'])} | {_fmt_x(e.get('peak_step_bytes_ratio'))} "
            f"| {e['flops'] / 1e6:.2f} M | {_fmt_x(e.get('flops_ratio'), 3)} "
            f"| {e['step_s'] * 1e3:.2f} | {_fmt_x(e.get('step_s_ratio'))} | {e['angle_deg']:.1f}° |")
    lines += ["", "Per fine-tuned layer (first seed of each row): ranks per mode (batch, channel, "
              "height, width; '-' = kept), saved bytes, weight-gradient angle to plain autograd "
              "after training.", "",
              "| layers | method | seed | layer | input | ranks | saved bytes | grad angle |",
              "|" + "---|" * 8]
    seen = set()
    for run in result["runs"]:
        key = (str(run["layers_spec"]), run["method"])
        if run["status"] != "ok" or key in seen:
            continue
        seen.add(key)
        for name in run["layers"]:
            shape = run["memory"]["input_shapes"].get(name)
            ranks = run["ranks"].get(name) or []
            lines.append(
                f"| {key[0]} | {key[1]} | {run['seed']} | {name} | "
                f"{'x'.join(map(str, shape)) if shape else '?'} | "
                f"{_fmt_rank_list(ranks)} | "
                f"{format_bytes(run['memory']['per_layer'][name])} | "
                f"{run['gradient'][name]['angle_deg']:.1f}° |")
    return "\n".join(lines) + "\n"


def _escape(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def plot_accuracy_vs_memory(result: dict[str, Any], path: str | Path) -> Path:
    """Accuracy (mean ± std over seeds) against saved bytes of the fine-tuned layers (log x),
    one marker per method, one colour per layer setting. Writes a PNG; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [e for e in summarize(result) if "accuracy" in e and e["finetuned_bytes"]]
    markers = {"vanilla": "o", "lance": "s", "asi": "^", "hosvd": "D", "gradient_filter": "v"}
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    specs = list(dict.fromkeys(e["layers_spec"] for e in entries))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for e in entries:
        colour = colours[specs.index(e["layers_spec"]) % len(colours)]
        ax.errorbar(e["finetuned_bytes"] / 1024, e["accuracy"], yerr=e["accuracy_std"],
                    marker=markers.get(e["method"], "x"), color=colour, capsize=3, linestyle="none",
                    label=f"{e['method']} (layers {e['layers_spec']})")
    ax.set_xscale("log")
    ax.set_xlabel("saved activations of the fine-tuned layers per step (KiB, log scale)")
    ax.set_ylabel("test accuracy (%)")
    cfg = result["config"]
    ax.set_title(f"{cfg['model']} on {cfg['dataset']}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if entries:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(result: dict[str, Any], out: str | Path, plot: bool = True) -> dict[str, Path]:
    """Write ``finetune.json``, ``finetune.md`` and (``plot``) ``finetune.png`` into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "finetune.json", "table": out / "finetune.md"}
    write_json_atomic(paths["json"], result)
    write_text_atomic(paths["table"], render_table(result))
    if plot:
        paths["plot"] = plot_accuracy_vs_memory(result, out / "finetune.png")
    return paths


def load_result(path: str | Path) -> dict[str, Any]:
    """Read a ``finetune.json`` (or the folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "finetune.json"
    return json.loads(path.read_text(encoding="utf-8"))
