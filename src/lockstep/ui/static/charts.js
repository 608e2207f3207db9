// Hand-written SVG charts: a line chart with version marks, and a sparkline. No library, no network.

import {s, fill, versionColor, fmtNum} from "./dom.js";

/** About `count` round tick values covering [lo, hi] (none when either end is not a finite number). */
export function niceTicks(lo, hi, count = 5) {
  if (!Number.isFinite(lo) || !Number.isFinite(hi)) return [];
  if (!(hi - lo > Math.abs(lo) * 1e-12)) { hi = lo + Math.max(1, Math.abs(lo) * 0.1); }
  const raw = (hi - lo) / Math.max(1, count);
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((st) => st >= raw) || raw;
  // Counted by index, and a few at most: adding the step to a tick near 1e17 gives the same tick again.
  const first = Math.ceil(lo / step), ticks = [];
  for (let i = 0; i <= 2 * count + 2; i++) {
    const v = Number(((first + i) * step).toFixed(10));
    if (v > hi + step * 1e-9) break;
    if (v !== ticks[ticks.length - 1]) ticks.push(v);
  }
  return ticks;
}

/** A tick label with just the decimals its spacing needs (0.025, not 0.0250; 2, not 2.000). */
export function tickLabel(v, ticks) {
  const step = ticks.length > 1 ? Math.abs(ticks[1] - ticks[0]) : 1;
  const digits = step.toFixed(10).replace(/0+$/, "").split(".")[1] || "";
  return (Object.is(v, -0) ? 0 : v).toFixed(Math.min(10, digits.length));
}

/** Linear map from [d0, d1] to [r0, r1]. */
export function scale(d0, d1, r0, r1) {
  const span = d1 - d0 || 1;
  return (v) => r0 + ((v - d0) / span) * (r1 - r0);
}

/**
 * Draw a line chart into `el`.
 * opts: {series: [{name, color, points: [{x, y, version?, detail?}]}], marks: [{x, version}], width, height, xLabel, label,
 * empty}; a point's `detail` (text) is added to its tooltip.
 */
export function lineChart(el, opts) {
  const W = opts.width || 560, H = opts.height || 230;
  const M = {l: 48, r: 16, t: 22, b: 30};
  const series = (opts.series || []).map((sr) => ({...sr, points: (sr.points || []).filter((p) => Number.isFinite(p.x) && Number.isFinite(p.y))}));
  const all = series.flatMap((sr) => sr.points);
  const svg = s("svg", {viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": opts.label || "chart"});
  if (!all.length) {
    svg.append(s("text", {x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty-msg"}, opts.empty || "no points yet"));
    fill(el, svg);
    return svg;
  }
  let x0 = Math.min(...all.map((p) => p.x)), x1 = Math.max(...all.map((p) => p.x));
  if (x1 === x0) { x0 -= 1; x1 += 1; }
  let y0 = Math.min(...all.map((p) => p.y)), y1 = Math.max(...all.map((p) => p.y));
  // Values equal but for rounding (a mean of 0.20000000000000004 beside 0.2) draw as a flat line.
  const span = y1 - y0, flat = !(span > Math.max(Math.abs(y0), Math.abs(y1)) * 1e-9);
  const pad = flat ? Math.abs(y0) * 0.1 || 1 : span * 0.08;
  y0 -= pad; y1 += pad;
  // Steps and rounds are whole numbers: no tick between two of them.
  const wholeX = all.every((p) => Number.isInteger(p.x));
  const yt = niceTicks(y0, y1, 4);
  const xt = niceTicks(x0, x1, 6).filter((v) => v >= x0 && v <= x1 && (!wholeX || Number.isInteger(v)));
  if (yt.length) { y0 = Math.min(y0, yt[0]); y1 = Math.max(y1, yt[yt.length - 1]); }
  const X = scale(x0, x1, M.l, W - M.r), Y = scale(y0, y1, H - M.b, M.t);

  const grid = s("g", {class: "grid"});
  for (const v of yt) grid.append(s("line", {x1: M.l, x2: W - M.r, y1: Y(v), y2: Y(v)}));
  svg.append(grid);

  const axis = s("g", {class: "axis"});
  axis.append(s("line", {x1: M.l, x2: W - M.r, y1: H - M.b, y2: H - M.b}));
  for (const v of yt) axis.append(s("text", {x: M.l - 6, y: Y(v) + 3.5, "text-anchor": "end"}, tickLabel(v, yt)));
  for (const v of xt) {
    axis.append(s("line", {x1: X(v), x2: X(v), y1: H - M.b, y2: H - M.b + 4}));
    axis.append(s("text", {x: X(v), y: H - M.b + 16, "text-anchor": "middle"}, tickLabel(v, xt)));
  }
  if (opts.xLabel) axis.append(s("text", {x: W - M.r, y: H - 2, "text-anchor": "end"}, opts.xLabel));
  svg.append(axis);

  // A dashed line where the served version changed, labelled with the new version in its colour.
  const marks = s("g", {class: "vmarks"});
  for (const mk of opts.marks || []) {
    if (!(mk.x >= x0 && mk.x <= x1)) continue;
    const c = versionColor(mk.version);
    const g = s("g", {class: "vmark"});
    g.append(s("line", {x1: X(mk.x), x2: X(mk.x), y1: M.t - 4, y2: H - M.b, stroke: c}));
    const nearRight = X(mk.x) > W - M.r - 30;
    g.append(s("text", {x: X(mk.x) + (nearRight ? -3 : 3), y: M.t - 8, fill: c, "text-anchor": nearRight ? "end" : "start"}, `v${mk.version}`));
    g.append(s("title", {}, `version ${mk.version} from ${opts.xLabel || "x"} ${fmtNum(mk.x)}`));
    marks.append(g);
  }
  svg.append(marks);

  for (const sr of series) {
    if (!sr.points.length) continue;
    const d = sr.points.map((p, i) => `${i ? "L" : "M"}${X(p.x).toFixed(1)},${Y(p.y).toFixed(1)}`).join("");
    svg.append(s("path", {d, class: "series", stroke: sr.color, "data-series": sr.name, "data-points": sr.points.length}));
    const dots = s("g", {class: "dots"});
    const few = sr.points.length <= 60;
    sr.points.forEach((p, i) => {
      if (!few && i !== sr.points.length - 1) return;
      const dot = s("circle", {cx: X(p.x), cy: Y(p.y), r: i === sr.points.length - 1 ? 3.6 : 2.4, fill: sr.color});
      dot.append(s("title", {}, `${sr.name}: ${fmtNum(p.y, 4)} at ${opts.xLabel || "x"} ${fmtNum(p.x)}${p.version !== undefined && p.version !== null ? ` (v${p.version})` : ""}${p.detail ? `; ${p.detail}` : ""}`));
      dots.append(dot);
    });
    svg.append(dots);
  }
  fill(el, svg);
  return svg;
}

/** A small line of recent values (e.g. tokens/s), scaled to its own maximum. */
export function sparkline(values, color, label) {
  const W = 240, H = 34;
  const svg = s("svg", {viewBox: `0 0 ${W} ${H}`, class: "spark", role: "img", "aria-label": label, preserveAspectRatio: "none"});
  const vals = values.filter((v) => Number.isFinite(v));
  if (vals.length < 2) return svg;
  const hi = Math.max(1, ...vals);
  const X = scale(0, Math.max(1, values.length - 1), 0, W), Y = scale(0, hi, H - 2, 2);
  const pts = values.map((v, i) => `${X(i).toFixed(1)},${Y(Number.isFinite(v) ? v : 0).toFixed(1)}`);
  svg.append(s("path", {d: `M0,${H}L${pts.join("L")}L${W},${H}Z`, fill: color, "fill-opacity": "0.15", stroke: "none"}));
  svg.append(s("path", {d: `M${pts.join("L")}`, fill: "none", stroke: color, "stroke-width": "1.6", "vector-effect": "non-scaling-stroke"}));
  return svg;
}
