"""The bench's outputs: the Markdown summary and per-layer tables, ``bench.json`` and
``bench.md``, and the list of methods that failed."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from lance_cl.units import format_bytes

from .perf_config import REFERENCE


def _fmt_ratio(r: Optional[float], digits: int = 2) -> str:
    if r is None:
        return "-"
    if r >= 100:
        return f"{r:.0f}x"
    return f"{r:.{digits}f}x"


def _fmt_ranks(ranks: Sequence[Optional[int]]) -> str:
    if not ranks or all(r is None for r in ranks):
        return "-"
    return ",".join("-" if r is None else str(r) for r in ranks)


def render_markdown(result: dict[str, Any], details: bool = True) -> str:
    """Summary table (one row per model and method); with ``details`` also per-layer tables."""
    lines = []
    m = result["machine"]
    cfg = result["config"]
    lines.append(f"Machine: {m['cpu_model']}, {m['cpu_usable']} usable cores, torch {m['torch']}, "
                 f"{m['torch_threads']} threads, device {m['device']}"
                 + (f" ({m['gpu']})" if "gpu" in m else "")
                 + (f"; load average {m['load_average_1_5_15min'][0]:.2f} at start, "
                    f"{m['load_average_at_end'][0]:.2f} at end"
                    if m.get("load_average_1_5_15min") and m.get("load_average_at_end") else ""))
    lines.append(f"Data: {result['data']['dataset']} {result['data']['split']}, batch {cfg['batch_size']}; "
                 f"{cfg['repeats']} timed steps per method (median), {cfg['warmup']} warm-up; "
                 f"weights after {cfg['train_steps']} SGD steps (lr {cfg['lr']}).")
    lines.append("")
    lines.append("Memory ratios are vanilla / method (higher = fewer bytes); time and FLOPs ratios are "
                 "method / vanilla (lower = faster). \"compressed layers\" = bytes autograd saves for the "
                 "compressed layers; \"whole step\" = every tensor saved in the step; \"peak step\" = "
                 "the most bytes allocated at once during forward + backward (gradients and "
                 "temporaries included) above the step's start.")
    lines.append("")
    head = ("| model | method | layers | act. bytes, compressed layers (analytic) | ratio "
            "| act. bytes, whole step | ratio | peak step mem. | ratio | step time (ms) | time ratio "
            "| FLOPs ratio | grad cosine | grad angle |")
    lines.append(head)
    lines.append("|" + "---|" * 14)
    for model_name, res in result["results"].items():
        for method, r in res["methods"].items():
            if "error" in r:
                lines.append(f"| {model_name} | {method} | {len(r['layers'])} | failed: "
                             f"{_md_escape(r['error'])} |" + " |" * 10)
                continue
            mem, t, fid, fl = r["memory"], r["time"], r["fidelity"]["overall"], r["flops"]
            lines.append(
                f"| {model_name} | {method} | {len(r['layers'])} | {format_bytes(mem['selected'])} "
                f"({format_bytes(mem['analytic_selected'])}) "
                f"| {_fmt_ratio(mem['selected_ratio'], 1)} | {format_bytes(mem['total'])} "
                f"| {_fmt_ratio(mem['total_ratio'])} | {format_bytes(mem.get('peak_step'))} "
                f"| {_fmt_ratio(mem.get('peak_step_ratio'))} | {t['median_s'] * 1e3:.1f} | {t['ratio']:.2f}x "
                f"| {fl['ratio']:.3f}x | {fid['cosine']:.4f} | {fid['angle_deg']:.1f} deg |")
    if not details:
        return "\n".join(lines) + "\n"
    for model_name, res in result["results"].items():
        lines.append("")
        lines.append(f"### {model_name}: per layer ({res['model']})")
        lines.append("")
        tr = res["training"]
        if tr["loss_first5_mean"] is not None:
            lines.append(f"Training before measuring: {tr['steps']} SGD steps, loss "
                         f"{tr['loss_first5_mean']:.3f} (first 5) -> {tr['loss_last5_mean']:.3f} (last 5).")
            lines.append("")
        lines.append("| layer | input | method | ranks | measured bytes | analytic bytes | vs vanilla "
                     "| grad cosine | grad angle | FLOPs ratio |")
        lines.append("|" + "---|" * 10)
        van = res["methods"][REFERENCE]["memory"]["per_layer_measured"]
        for method, r in res["methods"].items():
            if "error" in r:
                continue
            shapes = {row["name"]: row["input_shape"] for row in r["report"]}
            for name in r["layers"]:
                meas = r["memory"]["per_layer_measured"][name]
                ana = r["memory"]["per_layer_analytic"].get(name)
                fid = r["fidelity"]["per_layer"][name]
                fl = r["flops"]["per_layer"][name]
                shape = "x".join(map(str, shapes.get(name) or ())) or "?"
                lines.append(
                    f"| {name} | {shape} | {method} | {_fmt_ranks(r['ranks'].get(name, ()))} "
                    f"| {format_bytes(meas)} | {format_bytes(ana)} | {_fmt_ratio(van[name] / meas if meas else None, 1)} "
                    f"| {fid['cosine']:.4f} | {fid['angle_deg']:.1f} | {fl['total'] / fl['vanilla_total']:.3f}x |")
    return "\n".join(lines) + "\n"


def _md_escape(text: str, limit: int = 160) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def failures(result: dict[str, Any]) -> list[str]:
    """"model / method: error" for every method that could not be measured."""
    return [f"{model} / {method}: {r['error']}" for model, res in result["results"].items()
            for method, r in res["methods"].items() if "error" in r]


def write_outputs(result: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    """Write ``bench.json`` and ``bench.md`` into ``out`` (created); returns both paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "bench.json", out / "bench.md"
    json_path.write_text(json.dumps(result, indent=1, default=_json_default) + "\n", encoding="utf-8")
    md_path.write_text(render_markdown(result, details=True), encoding="utf-8")
    return json_path, md_path


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (tuple, set)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Size):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")

