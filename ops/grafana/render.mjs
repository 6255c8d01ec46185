// Renders ops/grafana/skylark-dashboard.json without Grafana: every panel's
// queries are run by a real Prometheus (its HTTP API, over the time range
// given) and drawn as line charts laid out by the panels' gridPos, then the
// page is screenshotted with headless Chromium (playwright-core).
//
//   node render.mjs PROMETHEUS_URL START_S END_S OUT.png
//
// render.sh runs the server, Prometheus and a load, then this.

import { readFileSync } from "node:fs";

// From the web client test's packages (render.sh points here after `npm ci` there).
const { chromium } = await import(process.env.PLAYWRIGHT_CORE || "playwright-core");

const [prom, start, end, out] = process.argv.slice(2);
const dashboard = JSON.parse(readFileSync(new URL("./skylark-dashboard.json", import.meta.url), "utf8"));
const step = Math.max(1, Math.round((end - start) / 120));

async function range(expr) {
  const q = expr.replaceAll("$instance", ".*").replaceAll("$__rate_interval", "5s");
  const url = `${prom}/api/v1/query_range?query=${encodeURIComponent(q)}&start=${start}&end=${end}&step=${step}`;
  const body = await (await fetch(url)).json();
  if (body.status !== "success") throw new Error(`Prometheus refused ${q}: ${body.error}`);
  return body.data.result;
}

const legend = (format, metric) =>
  (format || "").replace(/\{\{\s*(\w+)\s*\}\}/g, (_, k) => metric[k] ?? "") || JSON.stringify(metric);

const COLOURS = ["#3274d9", "#56a64b", "#e0b400", "#e02f44", "#8f3bb8", "#ff780a"];

function unitOf(panel, v) {
  const unit = panel.fieldConfig?.defaults?.unit;
  if (unit === "s") return v >= 1 ? `${v.toFixed(2)} s` : `${(v * 1000).toFixed(v * 1000 < 10 ? 1 : 0)} ms`;
  if (Math.abs(v) >= 1000) return `${(v / 1000).toFixed(1)}k`;
  return Number.isInteger(v) ? String(v) : v.toFixed(2);
}

function chart(panel, series) {
  const [w, h, pad] = [560, 170, 40];
  const values = series.flatMap((s) => s.points.map(([, v]) => v)).filter(Number.isFinite);
  const top = Math.max(0, ...values);
  const max = top > 0 ? top * 1.1 : 1; // an all-zero panel gets a plain 0–1 scale
  const x = (t) => pad + ((t - start) / (end - start)) * (w - pad - 8);
  const y = (v) => h - 18 - (v / max) * (h - 30);
  const grid = [0, 0.5, 1].map((f) => {
    const v = max * f;
    return `<line x1="${pad}" x2="${w - 8}" y1="${y(v)}" y2="${y(v)}" stroke="#2c3235"/>`
      + `<text x="${pad - 4}" y="${y(v) + 4}" text-anchor="end">${unitOf(panel, v)}</text>`;
  }).join("");
  const lines = series.map((s, i) => {
    const d = s.points.filter(([, v]) => Number.isFinite(v)).map(([t, v], j) => `${j ? "L" : "M"}${x(t).toFixed(1)},${y(v).toFixed(1)}`).join("");
    return `<path d="${d}" fill="none" stroke="${COLOURS[i % COLOURS.length]}" stroke-width="1.6"/>`;
  }).join("");
  const keys = series.map((s, i) => `<span><i style="background:${COLOURS[i % COLOURS.length]}"></i>${s.name}</span>`).join("");
  return `<svg viewBox="0 0 ${w} ${h}" width="100%">${grid}${lines}</svg><div class="legend">${keys || "<span>no data</span>"}</div>`;
}

const cells = [];
for (const panel of dashboard.panels) {
  const series = [];
  for (const target of panel.targets || []) {
    for (const r of await range(target.expr)) {
      series.push({ name: legend(target.legendFormat, r.metric), points: r.values.map(([t, v]) => [Number(t), Number(v)]) });
    }
  }
  const { x, y, w, h } = panel.gridPos;
  cells.push(`<section style="grid-column:${x + 1}/span ${w};grid-row:${y + 1}/span ${h}"><h2>${panel.title}</h2>${chart(panel, series)}</section>`);
}

const when = (s) => new Date(s * 1000).toISOString().replace("T", " ").slice(0, 19);
const html = `<!doctype html><meta charset="utf-8"><style>
body { background:#111217; color:#ccccdc; font:13px system-ui, sans-serif; margin:12px; }
h1 { font-size:16px; margin:0 0 8px; } h2 { font-size:13px; margin:0 0 4px; font-weight:600; }
main { display:grid; grid-template-columns:repeat(24, 1fr); grid-auto-rows:28px; gap:8px; }
section { background:#181b1f; border:1px solid #2c3235; border-radius:3px; padding:6px 8px; overflow:hidden; }
svg text { fill:#8e8e8e; font-size:10px; } .legend span { margin-right:12px; font-size:11px; }
.legend i { display:inline-block; width:10px; height:3px; margin-right:4px; vertical-align:middle; }
</style><h1>${dashboard.title} — ${when(start)} to ${when(end)} UTC (rendered from Prometheus)</h1><main>${cells.join("")}</main>`;

const browser = await chromium.launch({ executablePath: process.env.CHROMIUM || "/usr/bin/chromium", args: ["--no-sandbox"] });
const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
await page.setContent(html);
await page.screenshot({ path: out, fullPage: true });
await browser.close();
console.log(`rendered ${dashboard.panels.length} panels to ${out}`);
