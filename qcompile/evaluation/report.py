"""report.json (the contract in DESIGN §4), report.html with plots, and the short table the CLI prints."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from qcompile.atomic import write_json, write_text
from qcompile.config import Thresholds
from qcompile.evaluation.validate import StepResult
from qcompile.manifest import BucketRecord


def summarize(steps: Sequence[StepResult], *, size_bytes: int, fp32_size_bytes: int,
              extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    sqnr = np.array([s.eps_sqnr_db for s in steps])
    cos = np.array([s.eps_cos for s in steps])
    summary: dict[str, Any] = {
        "eps_sqnr_db_min": round(float(sqnr.min()), 4),
        "eps_sqnr_db_mean": round(float(sqnr.mean()), 4),
        "eps_cos_min": round(float(cos.min()), 6),
        "eps_cos_mean": round(float(cos.mean()), 6),
        "sample_psnr_db": None,
        "sample_ssim": None,
        "size_bytes": int(size_bytes),
        "fp32_size_bytes": int(fp32_size_bytes),
        "size_ratio": round(size_bytes / fp32_size_bytes, 4) if fp32_size_bytes else None,
    }
    summary.update(extra or {})
    return summary


def make_report(*, target: str, precision: str, buckets: Sequence[BucketRecord], runtime: Mapping[str, str],
                steps: Sequence[StepResult], summary: Mapping[str, Any], thresholds: Thresholds) -> dict[str, Any]:
    checks = thresholds.check(summary)
    return {
        "target": target,
        "precision": precision,
        "buckets": [{"index": b.index, "timestep_range": list(b.timestep_range),
                     **({"precision": dict(b.precision)} if b.precision else {})} for b in buckets],
        "runtime": dict(runtime),
        "per_step": [s.as_dict() for s in steps],
        "summary": dict(summary),
        "thresholds": {k: v for k, v in asdict(thresholds).items() if v is not None},
        "checks": checks,
        "passed": all(checks.values()),
    }


def format_table(report: Mapping[str, Any]) -> str:
    s = report["summary"]
    lines = [
        f"target {report['target']} ({report['precision']}) on {report['runtime']['name']} "
        f"{report['runtime']['version']}, {len(report['buckets'])} bucket(s)",
        f"  eps SQNR dB   min {s['eps_sqnr_db_min']:7.2f}   mean {s['eps_sqnr_db_mean']:7.2f}",
        f"  eps cosine    min {s['eps_cos_min']:.5f}   mean {s['eps_cos_mean']:.5f}",
    ]
    if s.get("sample_psnr_db") is not None:
        lines.append(f"  sample PSNR dB {s['sample_psnr_db']:.2f}   SSIM {s.get('sample_ssim') or float('nan'):.4f}")
    if s.get("cfg_gap_ratio_max") is not None:
        lines.append(f"  CFG-gap ratio  max {s['cfg_gap_ratio_max']:.3f}   mean {s['cfg_gap_ratio_mean']:.3f} "
                     "(quantization error of cond - uncond / its float magnitude)")
    for b in report["buckets"]:
        p = b.get("precision")
        if p and "wide_activation_bytes_fraction" in p:
            layers = f"{len(p['layers'])} layer(s) raised, " if "layers" in p else ""
            lines.append(f"  bucket {b['index']}: {layers}{100 * p['wide_activation_bytes_fraction']:.1f}% of "
                         f"activation bytes and {100 * p['wide_mac_fraction']:.1f}% of MACs at {p['wide_dtype']}")
    lines.append(f"  size {s['size_bytes'] / 1e6:.2f} MB vs fp32 {s['fp32_size_bytes'] / 1e6:.2f} MB "
                 f"({s['size_ratio']:.3f}x)")
    if s.get("htp_vs_fp32_sqnr_db_min") is not None:
        line = (f"  on HTP: output SQNR vs fp32 min {s['htp_vs_fp32_sqnr_db_min']:.2f} dB, vs CPU EP min "
                f"{s['htp_vs_cpu_ep_sqnr_db_min']:.2f} dB, cosine min {s['htp_cosine_min']:.5f}")
        if s.get("htp_vs_cpu_ep_mean_error_max") is not None:
            line += f", mean error vs CPU EP {s['htp_vs_cpu_ep_mean_error_max']:+.5f}"
        if s.get("htp_sample_psnr_db_vs_fp32") is not None:
            line += (f"; sample PSNR vs fp32 {s['htp_sample_psnr_db_vs_fp32']:.2f} dB (CPU EP on the same images "
                     f"{s['htp_cpu_ep_sample_psnr_db_vs_fp32']:.2f})")
        lines.append(line)
    if s.get("htp_context_bytes") is not None:
        shared = f", weight-shared by {len(report['buckets'])} buckets" if s["htp_context_weight_shared"] else ""
        same = "bit-identical" if s["htp_context_identical"] else "NOT identical"
        unverified = ("" if s.get("htp_context_shipped_verified", True) else
                      "; the shipped weight-shared binary is unverified (the x86 simulator cannot load it), "
                      "each bucket was checked compiled into a context of its own")
        lines.append(f"  context binary {s['htp_context_bytes'] / 1e6:.2f} MB{shared}; compiled graphs {same} "
                     f"to the Q/DQ graphs on HTP{unverified}")
    verdict = "PASSED" if report["passed"] else "FAILED"
    failed = [k for k, ok in report["checks"].items() if not ok]
    lines.append(f"  {verdict}" + (f": threshold missed {', '.join(failed)}" if failed else ""))
    return "\n".join(lines)


def write_reports(folder: Path, report: Mapping[str, Any], *, json_name: str, html_name: str,
                  images: Mapping[str, str] | None = None) -> None:
    write_json(folder / json_name, report)
    write_text(folder / html_name, render_html(report, images))


def _plot_png(report: Mapping[str, Any]) -> str | None:
    steps = [s for s in report["per_step"] if s["timestep"] is not None]
    if not steps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["timestep"] for s in steps]
    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=100)
    ax.plot(t, [s["eps_sqnr_db"] for s in steps], "o-", label="eps SQNR (dB)")
    device_steps = ((report.get("device") or {}).get("sampling") or {}).get("per_step") or []
    if device_steps:  # the same per-step metric measured on the device (a few samples)
        ax.plot([s["timestep"] for s in device_steps], [s["eps_sqnr_db"] for s in device_steps], "^:",
                color="tab:green", label="eps SQNR on the device (dB)")
        ax.legend(loc="lower left", fontsize=8)
    gaps = [(s["timestep"], s["cfg_gap_ratio"]) for s in steps if s.get("cfg_gap_ratio") is not None]
    if gaps:
        ax2 = ax.twinx()
        ax2.plot(*zip(*gaps, strict=True), "s--", color="tab:red", label="CFG gap ratio")
        ax2.set_ylabel("CFG gap ratio")
    ax.set_xlabel("timestep")
    ax.set_ylabel("eps SQNR (dB)")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.set_title("Error per timestep (sampling order, left to right)")
    return figure_png_base64(fig)


def figure_png_base64(fig) -> str:
    """A matplotlib figure as base64 PNG for embedding in report.html; the figure is closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def render_html(report: Mapping[str, Any], images: Mapping[str, str] | None = None) -> str:
    """A single self-contained page: summary table, error-per-timestep plot, per-step table."""
    esc = html.escape
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(str(v))}</td></tr>" for k, v in report["summary"].items())
    checks = "".join(f"<li>{esc(k)}: {'ok' if ok else 'THRESHOLD MISSED'}</li>" for k, ok in report["checks"].items())
    plot = _plot_png(report)
    figures = [("Error per timestep", plot)] if plot else []
    figures += list((images or {}).items())
    figs = "".join(f"<h2>{esc(title)}</h2><img src='data:image/png;base64,{data}'>" for title, data in figures)
    head = "".join(f"<th>{k}</th>" for k in ("timestep", "bucket", "eps_sqnr_db", "eps_cos", "cfg_gap_ratio"))
    steps = "".join(
        "<tr>" + "".join(f"<td>{esc(str(s.get(k)))}</td>" for k in
                         ("timestep", "bucket", "eps_sqnr_db", "eps_cos", "cfg_gap_ratio")) + "</tr>"
        for s in report["per_step"]
    )
    sens = report.get("sensitivity_top20") or []
    if sens:
        rows_s = "".join(f"<tr><td>{esc(s['node'])}</td><td>{esc(s['module'])}</td><td>{esc(s['op'])}</td>"
                         f"<td>{s['sqnr_db']}</td></tr>" for s in sens)
        figs += ("<h2>Most sensitive layers (output SQNR with only that layer quantized)</h2><table>"
                 f"<tr><th>node</th><th>module</th><th>op</th><th>SQNR dB</th></tr>{rows_s}</table>")
    device = report.get("device")
    if device:
        keys = list(dict.fromkeys(k for b in device.get("buckets", []) for k in b))  # each target's own checks
        rows_d = "".join("<tr>" + "".join(f"<td>{esc(str(b.get(k)))}</td>" for k in keys) + "</tr>"
                         for b in device.get("buckets", []))
        figs += (f"<h2>On the device: {esc(str(device.get('device')))}</h2><table><tr>"
                 + "".join(f"<th>{k}</th>" for k in keys) + f"</tr>{rows_d}</table>")
    verdict = "passed" if report["passed"] else "FAILED"
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>qcompile report</title>
<style>body{{font-family:sans-serif;max-width:960px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:left}}</style></head><body>
<h1>qcompile: {esc(report['target'])} ({esc(report['precision'])}): {verdict}</h1>
<p>runtime {esc(report['runtime']['name'])} {esc(report['runtime']['version'])},
{len(report['buckets'])} timestep bucket(s)</p>
<h2>Summary</h2><table>{rows}</table><ul>{checks}</ul>{figs}
<h2>Per step (teacher-forced)</h2><table><tr>{head}</tr>{steps}</table></body></html>
"""
