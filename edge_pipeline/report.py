"""The HTML report: one self-contained file (plots embedded as PNG, no network) read from a run folder."""

from __future__ import annotations

import html
import json
from pathlib import Path

from edge_pipeline.plots import figure as _figure
from edge_pipeline.plots import plt
from edge_pipeline.runstore import find_stage
from edge_pipeline.stages import stages


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated (smaller x and higher y are better)."""
    keep = []
    for i, (x, y) in enumerate(points):
        if not any((x2 <= x and y2 >= y) and (x2, y2) != (x, y) for x2, y2 in points):
            keep.append(i)
    return keep


def _waterfall(run_dir: Path, targets: dict) -> str | None:
    rows = []
    made = [stage.name for stage in stages() if stage.produces_model]
    for label in made:
        rec = find_stage(run_dir, label)
        if not rec:
            continue
        m = rec[1]["metrics"]
        params = m.get("params", m.get("params_after"))
        macs = m.get("macs", m.get("macs_after"))
        size = m.get("state_bytes")
        acc = m.get("test_metric", m.get("val_metric_finetuned"))
        rows.append((label, params, macs, size, acc))
    for name, t in targets.items():
        if t.get("precision") == "int8" and "size_bytes" in t:
            rows.append((name, None, None, t["size_bytes"], t.get("test_metric")))
    if not rows:
        return None
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    titles = ("parameters (count)", "MACs per inference", "size (bytes)", f"test {_metric(run_dir)}")
    for ax, idx, title in zip(axes, (1, 2, 3, 4), titles, strict=True):
        labels = [r[0] for r in rows if r[idx] is not None]
        vals = [r[idx] for r in rows if r[idx] is not None]
        ax.bar(range(len(vals)), vals, color="#4c72b0")
        ax.set_xticks(range(len(vals)), labels, rotation=35, ha="right", fontsize=7)
        ax.set_title(title)
        if idx == 4 and vals and max(vals) <= 1.0:
            ax.set_ylim(max(0.0, min(vals) - 0.05), 1.0)
    return _figure(f"Stage waterfall: {' → '.join(made)} → int8", fig)


def _device_bars(results: dict) -> str | None:
    rows = [(t, d, m) for t, by in results.items() for d, m in by.items() if "latency" in m]
    if not rows:
        return None
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(16, 3.8))
    labels = [f"{t}\n@{d}" for t, d, _ in rows]
    a1.bar(range(len(rows)), [m["latency"]["p50_ms"] for _, _, m in rows], color="#dd8452")
    a1.set_title("p50 latency (ms)")
    a2.bar(range(len(rows)), [m["size_bytes"] for _, _, m in rows], color="#55a868")
    a2.set_title("size (bytes)")
    memory = [(m.get("memory") or {}).get("model_bytes") for _, _, m in rows]
    a3.bar(range(len(rows)), [0 if b is None else b / 2**20 for b in memory], color="#8172b3")
    a3.set_title("model memory (MB): resident set\nafter load and runs, less before load")
    for ax in (a1, a2, a3):
        ax.set_xticks(range(len(rows)), labels, rotation=35, ha="right", fontsize=7)
    return _figure("Latency, size and the model's own memory per target × device (not the harness's: the "
                   "runtime's import is counted before the model loads)", fig)


def _scatter(results: dict, metric: str) -> str | None:
    pts = []
    for t, by in results.items():
        for d, m in by.items():
            if "latency" in m and m.get("test_metric") is not None:
                pts.append((t, d, m["size_bytes"], m["latency"]["p50_ms"], m["test_metric"]))
    if not pts:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(14, 4))
    for ax, xi, xlabel in ((axes[0], 2, "size (bytes)"), (axes[1], 3, "p50 latency (ms)")):
        xy = [(p[xi], p[4]) for p in pts]
        front = set(pareto(xy))
        for i, p in enumerate(pts):  # numbered points, names in the legend: names beside points overlap
            ax.scatter(p[xi], p[4], color="#c44e52" if i in front else "#8c8c8c", zorder=3,
                       label=f"{i + 1}. {p[0]} @ {p[1]}")
            ax.annotate(str(i + 1), (p[xi], p[4]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        fr = sorted(xy[i] for i in front)
        ax.plot([f[0] for f in fr], [f[1] for f in fr], "--", color="#c44e52", label="Pareto front")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"test {metric}")
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return _figure(f"{metric} vs size and vs latency (Pareto front in red)", fig)


def _quant_sensitivity(targets: dict) -> str | None:
    sens = {t: m["layer_error_db"] for t, m in targets.items() if m.get("layer_error_db")}
    if len({v for s in sens.values() for v in s.values()}) <= 1:
        return None  # nothing measured, or every layer alike: a flat line says nothing
    fig, ax = plt.subplots(figsize=(10, 3.6))
    for i, (t, s) in enumerate(sens.items()):
        layers = list(s)
        ax.bar([j + i * 0.25 for j in range(len(layers))], [s[n] for n in layers], width=0.25, label=t)
        ax.set_xticks(range(len(layers)), layers, rotation=35, ha="right", fontsize=7)
    ax.set_ylabel("own int8 SQNR (dB);\nlower = more error")
    ax.legend(fontsize=7)
    return _figure("Per-layer int8 error: each layer's own share of one calibrated build's error (torchao's "
                   "numeric debugger for ExecuTorch, ORT's qdq_loss_debug for ONNX Runtime)", fig)


def _coverage_table(targets: dict) -> str:
    rows = []
    for name, t in targets.items():
        d = t.get("describe") or {}
        # a backend's own one-line summary where it has one (ExecuTorch: delegated subgraphs), else its op counts
        cov = d.get("coverage") or ", ".join(f"{k}×{v}" for k, v in sorted((d.get("ops") or {}).items()))
        status = "failed: " + "; ".join(t.get("failures", [])) if t.get("failures") else "ok"
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{html.escape(str(t.get('size_bytes', '')))}</td>"
                    f"<td>{html.escape(cov)}</td><td>{html.escape(_fallback_text(t))}</td>"
                    f"<td>{html.escape(status)}</td></tr>")
    return ("<table><tr><th>target</th><th>bytes</th><th>operator coverage</th><th>float fallback</th>"
            "<th>status</th></tr>" + "".join(rows) + "</table>")


def _fallback_text(t: dict) -> str:
    """What the accuracy-aware float fallback did for one target, in a few words."""
    fb = t.get("fallback") or {}
    if t.get("precision") != "int8" or "error" in t:
        return "-"
    dynamic = ""
    if t.get("activations") == "dynamic":
        static, p50 = fb.get("static") or {}, t.get("host_p50_ms")
        price = (f" (host p50 {p50:.3f} ms against the static build's {static['host_p50_ms']:.3f} ms)"
                 if p50 and static.get("host_p50_ms") else "")
        dynamic = "activations quantized per inference" + price
    why = f" (static int8 passed on val, but {t['static_int8_fragile']})" if t.get("static_int8_fragile") else ""
    if t.get("float_layers"):
        kept = f"kept in float: {', '.join(t['float_layers'])} (+{fb.get('size_cost_bytes', 0)} B)"
        return (f"{kept}; {dynamic}" if dynamic else kept) + why
    if dynamic:
        return dynamic + why
    if t.get("dynamic_activations_refused") and t.get("fallback_exports", 1) == 2:
        return f"static activations kept; tried {t['dynamic_activations_refused']}"
    return fb.get("not_tried") or fb.get("unsupported") or ("tried, did not help" if t.get("fallback_exports", 1) > 1
                                                            else "not needed")


def _budget(value, limit, fmt: str) -> str:
    if value is None:
        return "–"
    shown = format(value, fmt)
    if limit is None:
        return shown
    ok = value <= limit + 1e-9
    return f'{shown} <span class="{"ok" if ok else "bad"}">(≤ {format(limit, fmt)} {"✓" if ok else "✗"})</span>'


def _verdict(run_dir: Path, lower, results: dict) -> str:
    """The first thing the report shows: each target on each device, pass or fail, its figures against its
    budgets, and the reason for any failure."""
    doc = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    failed = ""
    if doc.get("status") in ("failed", "interrupted"):
        failed = (f'<p class="bad"><b>The run {doc["status"]}</b>'
                  f'{" in stage " + html.escape(str(doc["failed_stage"])) if doc.get("failed_stage") else ""}:</p>'
                  f'<pre>{html.escape(str(doc.get("error", "")))}</pre>')
    if lower is None:
        return failed + "<p>No lower stage: nothing was built.</p>"
    budgets = {p["name"]: p.get("budgets", {}) for p in lower[1].get("config", {}).get("targets", [])}
    metric = _metric(run_dir)
    rows, passed, total = [], 0, 0
    for name, t in lower[1]["metrics"]["targets"].items():
        b = budgets.get(name, {})
        for device, m in (results.get(name) or {"(not device-tested)": {}}).items():
            why = list(t.get("failures") or []) + list(m.get("failures") or [])
            why += [m["error"]] if "error" in m and m["error"] not in why else []
            ok = not why and ("error" not in t)
            total += 1
            passed += ok
            verdict = ('<b class="ok">pass</b>' if ok else
                       '<b class="warn">unreachable</b>' if m.get("unreachable") else '<b class="bad">fail</b>')
            p50 = (m.get("latency") or {}).get("p50_ms")
            drop = m.get("metric_drop", t.get("metric_drop"))
            score = m.get("test_metric", t.get("test_metric"))
            parity = (t.get("parity") or {}).get("worst", {}).get("cosine")
            rows.append(
                f"<tr><td>{html.escape(name)}</td><td>{html.escape(device)}</td><td>{verdict}</td>"
                f"<td>{_budget(t.get('size_bytes'), b.get('max_size_bytes'), 'd')}</td>"
                f"<td>{_budget(p50, b.get('max_latency_ms'), '.3f')}</td>"
                f"<td>{'–' if score is None else format(score, '.4f')}</td>"
                f"<td>{_budget(drop, b.get('max_accuracy_drop'), '.4f')}</td>"
                f"<td>{'–' if parity is None else format(parity, '.5f')}</td>"
                f"<td>{'<br>'.join(html.escape(str(w)) for w in why)}</td></tr>")
    head = (f'<p id="verdict-summary"><b>{passed} of {total}</b> target × device checks pass.</p>'
            f"<table id=\"verdict\"><tr><th>target</th><th>device</th><th>verdict</th><th>size (bytes)</th>"
            f"<th>p50 (ms)</th><th>test {html.escape(metric)}</th><th>{html.escape(metric)} drop vs float</th>"
            f"<th>parity cosine (worst output)</th><th>why it failed</th></tr>")
    return failed + head + "".join(rows) + "</table>"


def _run_facts(run_dir: Path) -> str:
    """The model's inputs and outputs, the preprocessing the data had, and the toolchain: what an integrator
    must reproduce on the device."""
    doc = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    teacher = find_stage(run_dir, "teacher")  # the report is written before run.json gets its final interface
    iface = (teacher[1]["metrics"].get("interface") if teacher else None) or doc.get("interface") or {}
    rows = [f"<tr><td>{kind}</td><td>{html.escape(str(t.get('name')))}</td><td>{html.escape(str(t.get('shape')))}"
            f"</td><td>{html.escape(str(t.get('dtype')))}</td></tr>"
            for kind in ("inputs", "outputs") for t in iface.get(kind, [])]
    head = "<tr><th></th><th>name</th><th>shape (per sample, batch dimension left out)</th><th>dtype</th></tr>"
    io = f"<table>{head}{''.join(rows)}</table>" if rows else "<p>(no interface recorded)</p>"
    pre = (doc.get("recipe") or {}).get("preprocess")
    tools = doc.get("toolchain") or {}
    return ("<h2>Model I/O</h2>" + io + "<h2>Preprocessing</h2><pre>" + html.escape(json.dumps(pre, indent=1))
            + "</pre><h2>Toolchain</h2><table>" + "".join(
                f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>" for k, v in tools.items())
            + "</table>")


def _metric(run_dir: Path) -> str:
    rec = find_stage(run_dir, "teacher")
    return (rec[1]["metrics"].get("metric") if rec else None) or "metric"


OVERHEAD_COLORS = {"pad": "#c44e52", "convert": "#dd8452", "transpose": "#8172b3", "copy": "#937860"}


def _profile_bars(results: dict, targets: dict) -> str | None:
    """Per target x device, where the operator time goes: the model's own ops and each overhead class, stacked,
    int8 beside fp32 of the same backend; the targets with no profile listed with the reason."""
    rows, missing = [], []
    for target in sorted(results, key=lambda t: (targets.get(t, {}).get("backend", ""), t)):
        for device, m in results[target].items():
            prof = m.get("profile") or {}
            if "summary" in prof:
                rows.append((f"{target}\n{device}", prof["summary"]))
            elif "unavailable" in prof:
                missing.append(f"{target} on {device}: {prof['unavailable']}")
    if not rows and not missing:
        return None
    parts = []
    if rows:
        fig, ax = plt.subplots(figsize=(9, 0.5 + 0.45 * len(rows)))
        for i, (_, s) in enumerate(rows):
            left = (1 - s["overhead_share"]) * s["total_ms"]
            ax.barh(i, left, color="#4c72b0", label="model's own ops" if i == 0 else None)
            for cls, share in s["overhead"].items():
                ms = share * s["total_ms"]
                ax.barh(i, ms, left=left, color=OVERHEAD_COLORS.get(cls, "#999999"),
                        label=cls if cls not in ax.get_legend_handles_labels()[1] else None)
                left += ms
            top = s["top_kinds"][0] if s["top_kinds"] else None
            ax.text(left, i, f"  {s['total_ms']:.3f} ms" + (f"; most: {top['kind'][:40]} {top['share']:.0%}"
                                                              if top else ""), va="center", fontsize=7)
        ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("operator time per inference (ms, sum of the runtime profiler's per-op medians)")
        ax.legend(fontsize=7, loc="lower right")
        parts.append(_figure("Where the time goes: each runtime's own per-operator profile, the model's ops and "
                             "the overhead (pads, converts/quantize/dequantize, layout transposes)", fig))
    if missing:
        parts.append("<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in missing) + "</ul>")
    return "<h2>Per-operator profiles</h2>" + "".join(parts)


def _stage_sections(run_dir: Path, targets: dict) -> list[str | None]:
    """Each stage's own section (its curves, its scan), in pipeline order, for the stages this run has."""
    return [stage.report(rec[0], rec[1]["metrics"], targets) for stage in stages()
            if stage.report is not None and (rec := find_stage(run_dir, stage.name))]


def _release_line(release: dict | None) -> str:
    if not release:
        return ""
    return (f"<p>Measurements of the release <code>{html.escape(release['archive'])}</code>, sha256 "
            f"<code>{html.escape(release['archive_sha256'])}</code>.</p>")


def write_report(run_dir: Path, dest: Path, release: dict | None = None) -> Path:
    """``release``: the archive this report measures (``archive``, ``archive_sha256``), named at the top."""
    run_dir = Path(run_dir)
    lower = find_stage(run_dir, "lower")
    targets = lower[1]["metrics"]["targets"] if lower else {}
    dev = find_stage(run_dir, "device-test")
    results = dev[1]["metrics"]["results"] if dev else {}
    sections = [s for s in (_waterfall(run_dir, targets), _device_bars(results), _scatter(results, _metric(run_dir)),
                            _profile_bars(results, targets),
                            *_stage_sections(run_dir, targets), _quant_sensitivity(targets)) if s]
    title = f"edge-pipeline report: {run_dir.parent.name}/{run_dir.name}"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}img.plot{{max-width:100%}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;font-size:13px}}
.ok{{color:#176d2c}}.bad{{color:#b3261e}}.warn{{color:#8a5a00}}</style></head>
<body><h1>{html.escape(title)}</h1>{_release_line(release)}
<h2>Verdict</h2>{_verdict(run_dir, lower, results)}{''.join(sections)}
<h2>Operator coverage</h2>{_coverage_table(targets)}{_run_facts(run_dir)}
<script>
window.addEventListener('load', () => {{
  const imgs = [...document.querySelectorAll('img.plot')];
  document.body.dataset.plots = imgs.length;
  document.body.dataset.rendered = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  const verdict = document.getElementById('verdict');  // the report's first screen must hold the verdict
  document.body.dataset.verdictBottom = verdict ? Math.ceil(verdict.getBoundingClientRect().bottom) : -1;
  document.body.dataset.viewport = window.innerHeight;
}});
</script></body></html>"""
    dest.write_text(page)
    return dest
