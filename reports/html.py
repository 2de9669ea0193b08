"""``index.html``: the overview as one self-contained page (no server, no CDN): the method x scheme matrices and
every record in sortable tables, the plots inlined as PNG data, and each number's provenance (config hash, code
revision, calibration, protocol, seed, device) as its tooltip and, on click, in the provenance panel."""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from quantbench.reports import leaderboard

COLUMNS = ("model", "method", "scheme", "task", "metric", "value", "95 % CI", "Δ vs fp16 [95 % CI]", "protocol",
           "calibration",
           "quantize", "backend", "config", "revision")

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1400px;padding:0 16px;color:#222}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0 16px;font-size:13px}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:left;white-space:nowrap}
th{background:#f3f3f3;cursor:pointer;user-select:none}th[aria-sort=ascending]::after{content:" \\25B2"}
th[aria-sort=descending]::after{content:" \\25BC"}td.num{text-align:right;font-variant-numeric:tabular-nums}
td.tie,p.tie{color:#777;font-style:italic}td[data-prov]{cursor:help}td[data-prov]:hover{background:#fff6d5}.swatch{display:inline-block;width:10px;
height:10px;margin-right:5px;border-radius:2px}.warn{background:#fff0f0;border-left:4px solid #c33;padding:6px 10px}
#prov{position:sticky;top:0;background:#f7fbff;border:1px solid #9bd;padding:6px 10px;min-height:1.4em;
font:12px monospace;white-space:pre-wrap;z-index:1}img{max-width:100%;border:1px solid #eee;margin:6px 0}
input#filter{padding:3px 6px;width:320px}
"""

SCRIPT = """
function cellValue(td){const v=td.getAttribute('data-v');return v===null?td.textContent.trim():v}
function sortBy(th){
  const table=th.closest('table'),body=table.tBodies[0],i=[...th.parentNode.children].indexOf(th);
  const asc=th.getAttribute('aria-sort')!=='ascending';
  table.querySelectorAll('th').forEach(h=>h.removeAttribute('aria-sort'));
  th.setAttribute('aria-sort',asc?'ascending':'descending');
  const rows=[...body.rows],num=rows.every(r=>{const v=cellValue(r.cells[i]);return v===''||!isNaN(parseFloat(v))});
  rows.sort((a,b)=>{let x=cellValue(a.cells[i]),y=cellValue(b.cells[i]);
    if(num){x=x===''?Infinity:parseFloat(x);y=y===''?Infinity:parseFloat(y);return asc?x-y:y-x}
    return asc?x.localeCompare(y):y.localeCompare(x)});
  rows.forEach(r=>body.appendChild(r));
}
document.querySelectorAll('th').forEach(th=>th.addEventListener('click',()=>sortBy(th)));
document.querySelectorAll('td[data-prov]').forEach(td=>td.addEventListener('click',()=>{
  const p=JSON.parse(td.getAttribute('data-prov'));
  document.getElementById('prov').textContent=Object.entries(p).map(([k,v])=>k+': '+v).join('\\n')}));
const f=document.getElementById('filter');
if(f)f.addEventListener('input',()=>{const q=f.value.toLowerCase();
  document.querySelectorAll('#records tbody tr').forEach(r=>{r.hidden=!r.textContent.toLowerCase().includes(q)})});
"""


def provenance(r: dict) -> dict:
    """What a reader needs to trust and re-run one number."""
    c = r.get("calibration")
    return {"config hash": r["config_hash"], "run": r.get("run_id", ""),
            "code revision": (r.get("versions") or {}).get("quantbench", "?"),
            "protocol": r["protocol"], "calibration": leaderboard._calib(r) or "none",
            "calibration windows sha256": (c or {}).get("windows_sha256", ""),
            "model revision": r.get("model_revision", ""), "seed": r.get("seed", ""),
            "device": (r.get("device") or {}).get("name", ""), "torch": (r.get("versions") or {}).get("torch", ""),
            "plan": r.get("plan_source", ""), "created": r.get("created", ""),
            "95 % CI": leaderboard.ci(r) or "none", "interval": (r.get("interval") or {}).get("method", "none")}


def _prov_attr(r: dict) -> str:
    p = provenance(r)
    tip = " · ".join(f"{k} {p[k]}" for k in ("config hash", "code revision", "calibration", "protocol"))
    return f' data-prov="{html.escape(json.dumps(p))}" title="{html.escape(tip)}"'


def _table(headers: list[str], rows: list[list[tuple[str, str]]], tid: str = "") -> str:
    """rows: lists of (cell html, extra td attributes)."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td{attrs}>{text}</td>" for text, attrs in row) + "</tr>" for row in rows)
    return f'<table{f" id={tid!r}" if tid else ""}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _num(r: dict) -> tuple[str, str]:
    return html.escape(leaderboard.plus_minus(r)), f' class="num" data-v="{r["value"]!r}"' + _prov_attr(r)


def _matrix(model, protocol, headers, rows, cells, tied, palette) -> str:
    out = []
    for row in rows:
        method = row[0]
        tds = [(f'<span class="swatch" style="background:{palette.get(method, "#999")}"></span>'
                f"{html.escape(method)}", "")]
        for scheme, text in zip(headers[1:], row[1:]):
            recs = cells.get((method, scheme), [])
            if len(recs) == 1:
                tds.append(_num(recs[0]))
            elif recs:  # several records of one cell: each value with its own provenance
                inner = " / ".join(f'<span{_prov_attr(r)}>{html.escape(leaderboard.plus_minus(r))}</span>'
                                   for r in recs)
                tds.append((inner, f' class="num" data-v="{min(r["value"] for r in recs)!r}"'))
            else:
                tds.append((html.escape(text), ' class="num" data-v=""'))
        out.append(tds)
    fp = cells.get(("fp16", "w16a16"))
    ref = f"FP16 reference: <b>{leaderboard._fmt(fp[0]['value'])}</b>. " if fp else ""
    return (f"<h2>{html.escape(model)}: perplexity, <code>{html.escape(protocol)}</code></h2><p>{ref}Click a column "
            "to sort; hover or click a number for its provenance and 95 % interval. ± = the larger side of the 95 % "
            "bootstrap interval. · = not run; n/a = weight-only, outside the method's scope. Differences to FP16 "
            f"with their paired intervals are in the table of every record ({leaderboard.TIE} and grey: within "
            "noise).</p>" + _table(headers, out)
            + (f'<p class="tie">Within noise (the paired 95 % interval of the difference contains 0): '
               f"{html.escape('; '.join(tied))}.</p>" if tied else ""))


def _records(records: list[dict], palette) -> str:
    recs = sorted(leaderboard.latest(records), key=lambda r: (r["model"], r["protocol"], r["metric"],
                                                             leaderboard._row_key(r)))
    base = {(r["model"], r["protocol"], r["metric"]): r for r in recs if r["method"] == "fp16"}
    rows = []
    for r in recs:
        d = leaderboard.delta(r, base.get((r["model"], r["protocol"], r["metric"])))
        cells = {"model": r["model"], "method": leaderboard._method(r), "scheme": r["scheme"], "task": r["task"],
                 "metric": r["metric"], "95 % CI": leaderboard.ci(r), "Δ vs fp16 [95 % CI]": leaderboard.delta_text(d),
                 "protocol": r["protocol"],
                 "calibration": leaderboard._calib(r), "quantize": leaderboard._quant_time(r),
                 "backend": r["backend"], "config": r["config_hash"],
                 "revision": (r.get("versions") or {}).get("quantbench", "")}
        row = []
        for c in COLUMNS:
            if c == "value":
                row.append(_num(r))
            elif c == "method":
                row.append((f'<span class="swatch" style="background:{palette.get(leaderboard.row_name(r), "#999")}"></span>'
                            + html.escape(cells[c]), ""))
            else:
                tie = ' class="num tie" title="the 95 % interval of the difference contains 0: within noise"'
                row.append((html.escape(str(cells[c])), (tie if d and d["tie"] else ' class="num"')
                            if c == "Δ vs fp16 [95 % CI]" else ""))
        rows.append(row)
    return ("<h2>Every record</h2><p>The latest record of each configuration and metric. Filter: "
            '<input id="filter" placeholder="e.g. duquant or w4a4"></p>' + _table(list(COLUMNS), rows, "records"))


def page(records: list[dict], matrices: list[tuple], plots: list[Path], warnings: list[str],
         palette: dict[str, str], results_dir: str) -> str:
    parts = [f"<h1>quantbench results</h1><p>{len(records)} records from <code>{html.escape(results_dir)}</code>. "
             "Every number carries its config hash, code revision, calibration and protocol (hover or click it).</p>"]
    parts += [f'<p class="warn">Warning: {html.escape(w)}.</p>' for w in warnings]
    parts.append('<div id="prov">click a number for its provenance</div>')
    parts += [_matrix(*m, palette) for m in matrices if m[4]]
    for p in plots:
        data = base64.b64encode(Path(p).read_bytes()).decode()
        parts.append(f'<img alt="{html.escape(p.stem)}" src="data:image/png;base64,{data}">')
    parts.append(_records(records, palette))
    return ("<!doctype html><html lang=en><head><meta charset=utf-8><title>quantbench results</title>"
            f"<style>{STYLE}</style></head><body>{''.join(parts)}<script>{SCRIPT}</script></body></html>\n")
