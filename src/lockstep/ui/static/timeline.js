// Timeline view: when each version was published, staged and committed, when each replica flipped, what aborted.

import {$, h, s, fill, vchip, versionColor, outcome, fmtTime, fmtSeconds, listOf} from "./dom.js";
import {scale} from "./charts.js";
import {rollbackTo} from "./control.js";
import {on, store} from "./store.js";

const TIME_STEPS = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200, 86400];

function publishesOf(history) {
  return listOf(history, "publishes").filter((p) => p && typeof p === "object");
}

function flipsOf(history) {
  return listOf(history && history.flips ? history.flips : [], "flips")
    .filter((f) => f && typeof f.at === "number" && f.replica_id !== undefined);
}

/** When a publish had every replica staged, when known. */
function stagedAt(p) {
  if (typeof p.staged_at === "number") return p.staged_at;
  if (typeof p.prepare_s === "number" && typeof p.started_at === "number") return p.started_at + p.prepare_s;
  const times = listOf(p.replicas).map((r) => r.stage_seconds).filter((x) => typeof x === "number");
  return times.length && typeof p.started_at === "number" ? p.started_at + Math.max(...times) : null;
}

function endedAt(p) {
  if (typeof p.finished_at === "number") return p.finished_at;
  if (typeof p.total_s === "number" && typeof p.started_at === "number") return p.started_at + p.total_s;
  return p.activate_at || stagedAt(p) || p.started_at;
}

function cross(x, y, r, color) {
  return s("path", {d: `M${x - r},${y - r}L${x + r},${y + r}M${x - r},${y + r}L${x + r},${y - r}`, stroke: color, "stroke-width": 2.6, "stroke-linecap": "round"});
}

/**
 * Draw the timeline into `el`. opts.windowS: only the last N seconds (the fleet view's strip);
 * opts.id: the svg's id; opts.empty: the element to show when there is nothing to draw.
 */
export function drawTimeline(el, history, cluster, opts = {}) {
  const pubs = publishesOf(history).slice();
  const flips = flipsOf(history);
  const pending = cluster && cluster.pending;
  const ids = new Set((cluster && cluster.replicas || []).map((r) => String(r.replica_id)));
  for (const f of flips) ids.add(String(f.replica_id));
  const lanes = [...ids].sort();
  const now = Date.now() / 1000;

  const times = [...pubs.map((p) => p.started_at), ...flips.map((f) => f.at), pending && pending.started_at]
    .filter((t) => typeof t === "number");
  if (opts.empty) opts.empty.hidden = times.length > 0;
  if (!times.length) { el.replaceChildren(); return null; }
  let t0 = Math.min(...times), t1 = now;
  if (opts.windowS) t0 = Math.max(t0, now - opts.windowS);
  const span0 = Math.max(t1 - t0, 10);
  t0 -= span0 * 0.03;
  t1 += span0 * 0.02;

  // The publish lane is taller: abort reasons are written under its markers.
  const W = 1200, laneH = 34, pubH = 50, M = {l: 132, r: 20, t: 30, b: 30};
  const H = M.t + pubH + laneH * lanes.length + M.b;
  const laneTop = (i) => (i === 0 ? M.t : M.t + pubH + laneH * (i - 1));
  const X = scale(t0, t1, M.l, W - M.r);
  const laneY = (i) => (i === 0 ? M.t + 17 : laneTop(i) + laneH / 2);
  const svg = s("svg", {viewBox: `0 0 ${W} ${H}`, role: "img", id: opts.id || null,
    "aria-label": `Timeline of ${pubs.length} publishes and ${flips.length} replica flips`});

  // lanes and time grid
  const grid = s("g", {class: "grid"});
  const span = t1 - t0;
  const step = TIME_STEPS.find((st) => span / st <= 9) || 86400;
  for (let t = Math.ceil(t0 / step) * step; t <= t1; t += step) {
    grid.append(s("line", {x1: X(t), x2: X(t), y1: M.t - 6, y2: H - M.b}));
    if (X(t) > M.l + 20 && X(t) < W - 30) svg.append(s("text", {x: X(t), y: H - M.b + 16, "text-anchor": "middle"}, fmtTime(t)));
  }
  for (let i = 0; i <= lanes.length + 1; i++) grid.append(s("line", {x1: M.l, x2: W - M.r, y1: laneTop(i), y2: laneTop(i)}));
  svg.prepend(grid);
  svg.append(s("text", {x: 8, y: laneY(0) + 4, class: "lane-label"}, "publishes"));
  lanes.forEach((id, i) => svg.append(s("text", {x: 8, y: laneY(i + 1) + 4, class: "lane-label"}, id.length > 17 ? id.slice(0, 16) + "…" : id)));

  // replica lanes: what each served, between flips
  const current = new Map((cluster && cluster.replicas || []).map((r) => [String(r.replica_id), r.serving_version]));
  lanes.forEach((id, i) => {
    const y = laneY(i + 1);
    const mine = flips.filter((f) => String(f.replica_id) === id).sort((a, b) => a.at - b.at);
    const segs = [];
    if (!mine.length && current.get(id) !== undefined && current.get(id) !== null) segs.push([t0, t1, current.get(id)]);
    mine.forEach((f, k) => segs.push([f.at, k + 1 < mine.length ? mine[k + 1].at : t1, f.version]));
    const g = s("g", {class: "lane", "data-replica": id});
    for (const [a, b, v] of segs) {
      const x = X(Math.max(a, t0)), w = Math.max(1.5, X(b) - x);
      const rect = s("rect", {x, y: y - 10, width: w, height: 20, rx: 4, fill: versionColor(v), "fill-opacity": 0.85});
      rect.append(s("title", {}, `${id} served v${v} from ${fmtTime(a)}`));
      g.append(rect);
      if (w > 30) g.append(s("text", {x: x + 6, y: y + 4, class: "seg-label"}, `v${v}`));
    }
    for (const f of mine) {
      if (f.at < t0) continue;
      const tick = s("path", {d: `M${X(f.at)},${y - 14}L${X(f.at)},${y + 14}`, stroke: "#e6edf3", "stroke-width": 2});
      tick.append(s("title", {}, `${id} flipped to v${f.version} at ${new Date(f.at * 1000).toLocaleTimeString()}.${String(Math.round((f.at % 1) * 1000)).padStart(3, "0")}`));
      g.append(tick);
    }
    svg.append(g);
  });

  // publish lane: published ●, all staged ◆, committed | (across every lane), aborted ✕
  const y0 = laneY(0);
  const pg = s("g", {class: "lane publishes"});
  let lastLabelX = -Infinity;
  const byCommit = (a, b) => (a.activate_at || a.started_at || 0) - (b.activate_at || b.started_at || 0);
  pubs.sort(byCommit);
  const aborts = pubs.filter((p) => p.outcome === "aborted" || p.outcome === "failed").map(endedAt)
    .filter((t) => typeof t === "number").sort((a, b) => a - b);
  for (const p of pubs) {
    if (typeof p.started_at !== "number" || (endedAt(p) || p.started_at) < t0) continue;
    if (p.activate_at && p.activate_at < t0) continue;
    const v = p.version, c = versionColor(v);
    const staged = stagedAt(p), end = endedAt(p);
    const committed = p.outcome === "committed" && typeof p.activate_at === "number";
    const x0 = X(Math.max(t0, p.started_at)), x1 = X(committed ? p.activate_at : end || p.started_at);
    pg.append(s("rect", {x: x0, y: y0 - 3, width: Math.max(1, x1 - x0), height: 6, rx: 3, fill: c, "fill-opacity": 0.45}));
    const dot = s("circle", {cx: x0, cy: y0, r: 5, fill: "#0d1117", stroke: c, "stroke-width": 2.2});
    dot.append(s("title", {}, `v${v} published at ${fmtTime(p.started_at)} (${p.model || ""})${p.rollback ? ", a rollback" : ""}`));
    pg.append(dot);
    if (staged && p.outcome !== "aborted") {
      const d = s("rect", {x: X(staged) - 4.5, y: y0 - 4.5, width: 9, height: 9, fill: "#e3b341", transform: `rotate(45 ${X(staged)} ${y0})`});
      d.append(s("title", {}, `v${v}: every replica staged at ${fmtTime(staged)}`));
      pg.append(d);
    }
    if (committed) {
      const line = s("g", {class: "commit", "data-version": v});
      line.append(s("line", {x1: X(p.activate_at), x2: X(p.activate_at), y1: M.t - 8, y2: H - M.b, stroke: c, "stroke-width": 1.6, "stroke-opacity": 0.9}));
      // Labels closer than one label's width would overlap: the later one is left out (its line keeps a title).
      if (X(p.activate_at) - lastLabelX >= 30) {
        line.append(s("text", {x: X(p.activate_at) + 3, y: M.t - 12, fill: c, "font-weight": 700}, `v${v}${p.rollback ? " ↩" : ""}`));
        lastLabelX = X(p.activate_at);
      }
      line.append(s("title", {}, `v${v} committed: every replica flips at ${fmtTime(p.activate_at)}`));
      svg.append(line);
    }
    if (p.outcome === "aborted" || p.outcome === "failed") {
      const g = s("g", {class: "abort", "data-version": v});
      const xa = X(end || p.started_at);
      g.append(cross(xa, y0, 6, "#ff7b72"));
      g.append(s("title", {}, `v${v} ${p.outcome}: ${p.reason || "no reason given"}`));
      // The reason under the marker, as much as fits before the next abort (about 6 px a character at 11 px).
      const next = aborts.find((t) => t > (end || p.started_at));
      const room = (next ? X(next) : W - M.r) - xa - 8;
      const words = `v${v} ${p.outcome}${p.reason ? `: ${p.reason}` : ""}`;
      const fit = Math.floor(room / 6.2);
      if (fit >= 8) {
        g.append(s("text", {x: xa - 6, y: y0 + 22, class: "abort-label"}, words.length > fit ? words.slice(0, fit - 1) + "…" : words));
      }
      pg.append(g);
    }
  }
  if (pending && typeof pending.started_at === "number" && !pubs.some((p) => p.version === pending.version && p.outcome)) {
    const c = versionColor(pending.version);
    pg.append(s("rect", {x: X(pending.started_at), y: y0 - 5, width: Math.max(2, X(now) - X(pending.started_at)), height: 10, rx: 4,
      fill: "none", stroke: c, "stroke-dasharray": "4 3"}));
    pg.append(s("text", {x: X(pending.started_at), y: y0 - 9, fill: c}, `v${pending.version} ${pending.phase}`));
  }
  svg.append(pg);
  const nowLine = s("g", {class: "now"});
  nowLine.append(s("line", {x1: X(now), x2: X(now), y1: M.t - 6, y2: H - M.b}));
  svg.append(nowLine);
  fill(el, svg);
  return svg;
}

function renderPublishes(history) {
  const body = $("#publishes-table tbody");
  const pubs = publishesOf(history).slice().sort((a, b) => (b.started_at || 0) - (a.started_at || 0));
  fill(body, pubs.length ? pubs.map((p) => {
    const took = typeof p.total_s === "number" ? p.total_s
      : typeof p.activate_at === "number" && typeof p.started_at === "number" ? p.activate_at - p.started_at : null;
    return h("tr", {class: p.outcome === "aborted" ? "aborted" : ""},
      h("td", {}, vchip(p.version, "small"), p.rollback ? h("span", {class: "muted small"}, " rollback") : null),
      h("td", {class: "mono clip", title: p.model || ""}, p.model || ""),
      h("td", {}, outcome(p.outcome || "running"), p.reason ? h("span", {class: "reason"}, p.reason) : null),
      h("td", {class: "nowrap"}, fmtTime(p.started_at)),
      h("td", {class: "nowrap"}, fmtSeconds(took)),
      h("td", {}, h("div", {class: "replica-outcomes"}, listOf(p.replicas).map((r) =>
        h("span", {class: `rchip ${String(r.outcome || "").replace(/[^a-z_-]/gi, "")}`, title: r.error || `${r.replica_id}: ${r.outcome}`},
          `${r.replica_id}: ${r.outcome}`)))));
  }) : h("tr", {}, h("td", {colspan: 6, class: "muted"}, "No publish yet.")));
}

function renderVersions(versionsBody) {
  const body = $("#versions-table tbody");
  const committed = store.cluster && store.cluster.committed ? store.cluster.committed.version : null;
  const versions = listOf(versionsBody, "versions").slice().sort((a, b) => (b.version || 0) - (a.version || 0));
  fill(body, versions.length ? versions.map((v) => h("tr", {},
    h("td", {}, vchip(v.version, "small"), v.version === committed ? h("span", {class: "muted small"}, " committed") : null),
    h("td", {}, fmtTime(v.created_at)),
    h("td", {class: "mono clip", title: v.source || ""}, v.source || ""),
    h("td", {class: "mono"}, (v.digest || "").slice(0, 12)),
    h("td", {}, h("button", {type: "button", class: "link", disabled: v.version === committed,
      "aria-label": `Roll back to version ${v.version}`, onclick: () => rollbackTo(v.version)}, "Roll back")))) :
    h("tr", {}, h("td", {colspan: 5, class: "muted"}, "No version published yet.")));
}

const RECENT_S = 300; // seconds of history in the fleet view's strip

export function init() {
  const redraw = () => {
    if (!$("#view-timeline").hidden) {
      const windowS = Number($("#timeline-window").value) || 0;
      drawTimeline($("#timeline-chart"), store.history, store.cluster, {id: "timeline-svg", windowS, empty: $("#timeline-empty")});
    }
    if (!$("#view-fleet").hidden) {
      drawTimeline($("#recent-chart"), store.history, store.cluster, {id: "recent-svg", windowS: RECENT_S, empty: $("#recent-empty")});
    }
  };
  on("history", (hist) => { redraw(); renderPublishes(hist); });
  on("versions", renderVersions);
  let lastKey = "";
  on("cluster", (cluster) => {
    // "now" moves every second; the bars of the replicas follow it, cheaply.
    redraw();
    const key = JSON.stringify(cluster.committed && cluster.committed.version);
    if (key !== lastKey && store.versions) { lastKey = key; renderVersions(store.versions); }
  });
  window.addEventListener("hashchange", redraw);
  $("#timeline-window").addEventListener("change", redraw);
}
