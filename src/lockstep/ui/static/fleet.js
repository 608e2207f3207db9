// Fleet view: convergence at a glance, and one live card per replica.

import {$, h, fill, vchip, versionColor, fmtNum, fmtSeconds, fmtTime, listOf, sentence} from "./dom.js";
import {sparkline} from "./charts.js";
import {on, store} from "./store.js";

const HISTORY = 60; // tokens/s samples kept per replica (one a second: the last minute)
const rates = new Map(); // replica_id → recent tokens/s
const cards = new Map(); // replica_id → card element

/** How one replica stands against the committed version. */
export function standing(r, cluster) {
  const committed = cluster.committed ? cluster.committed.version : 0;
  const pending = cluster.pending;
  if (r.reachable === false || ["failed", "unreachable", "gone"].includes(r.state)) return "bad";
  if (r.ready && r.serving_version === committed) {
    if (pending && pending.phase === "prepare" && r.staged_version === pending.version && r.staged_state !== "staged") return "staging";
    return "at";
  }
  if (r.staged_state === "staging") return "staging";
  return "behind";
}

function stateWord(r) {
  if (r.reachable === false) return "unreachable";
  return r.state || "unknown";
}

export function convergence(cluster) {
  const conv = cluster.convergence || {};
  const replicas = cluster.replicas || [];
  // Version 0 is the initial model of a cluster that never published (docs/protocol.md §3).
  const committed = cluster.committed ? cluster.committed.version : 0;
  const version = conv.version ?? committed ?? 0;
  const total = conv.total ?? replicas.length;
  const counted = replicas.filter((r) => r.ready && r.serving_version === version).length;
  const at = conv.version === null || conv.version === undefined ? counted : conv.at_version ?? counted;
  return {version, total, at};
}

function renderHeader(cluster) {
  const badge = $("#convergence-badge");
  const {version, total, at} = convergence(cluster);
  const text = `${at}/${total} replica${total === 1 ? "" : "s"} at v${version}`;
  badge.textContent = text;
  badge.className = "badge " + (total && at === total ? "ok" : at > 0 ? "warn" : "bad");

  const trainer = cluster.trainer || {};
  const pill = $("#trainer-status");
  pill.textContent = trainer.reachable ? "trainer: connected" : "trainer: unreachable";
  pill.className = "pill " + (trainer.reachable ? "pill-ok" : "pill-bad");
  pill.title = trainer.reachable ? trainer.url || "" : trainer.error || "";

  const banner = $("#banner");
  if (!trainer.reachable) {
    banner.hidden = false;
    banner.textContent = `${sentence(trainer.error || "the trainer is unreachable.")} The fleet below is read from the replicas directly; publishing, rollbacks and runs need the trainer.`;
  } else if (cluster.discovery && cluster.discovery.error) {
    banner.hidden = false;
    banner.textContent = `Replica discovery (${cluster.discovery.mode || "?"}) reports: ${cluster.discovery.error}`;
  } else {
    banner.hidden = true;
  }
}

/** When the replicas flipped to the committed version, and how far apart (the point of lockstep). */
export function lastFlip(cluster, history) {
  const c = cluster.committed;
  if (!c || !history) return null;
  const latest = new Map(); // replica_id → its latest flip to the committed version
  for (const f of listOf(history.flips || [])) {
    if (f.version === c.version && typeof f.at === "number" && !(latest.get(f.replica_id) > f.at)) latest.set(f.replica_id, f.at);
  }
  if (!latest.size) return null;
  const ats = [...latest.values()];
  return {version: c.version, at: Math.min(...ats), spread: Math.max(...ats) - Math.min(...ats), replicas: latest.size};
}

/** The pending version in words; a commit whose flip time has passed is done, not pending. */
function pendingText(cluster) {
  const p = cluster.pending, c = cluster.committed;
  if (!p) return "none";
  const now = Date.now() / 1000;
  if (p.phase === "commit" && c && c.version === p.version && !(p.activate_at > now)) return "none";
  const when = p.phase === "commit" && p.activate_at > now ? `, flips at ${fmtTime(p.activate_at)}` : "";
  const why = p.reason ? ` — ${p.reason}` : "";
  return h("span", {}, vchip(p.version, "small"), ` ${p.phase === "prepare" ? "staging" : p.phase}${when}${why}`);
}

function renderConvergence(cluster) {
  const {version, total, at} = convergence(cluster);
  const big = $("#convergence-text");
  fill(big, `${at}/${total} `, h("span", {class: "of"}, `replica${total === 1 ? "" : "s"} at `), vchip(version));

  const bar = $("#convergence-bar");
  const replicas = cluster.replicas || [];
  fill(bar, replicas.map((r) => {
    const st = standing(r, cluster);
    return h("span", {class: `seg ${st}`, title: `${r.replica_id}: ${stateWord(r)}, serving v${r.serving_version ?? "–"}`});
  }));
  bar.setAttribute("aria-label", `${at} of ${total} replicas serve the committed version`);

  const facts = [];
  const c = cluster.committed;
  facts.push(["committed", c ? h("span", {}, vchip(c.version, "small"), " ", h("code", {}, c.model || ""))
    : h("span", {}, vchip(0, "small"), h("span", {class: "muted"}, " the initial model (nothing published yet)"))]);
  facts.push(["pending", pendingText(cluster)]);
  const flip = lastFlip(cluster, store.history);
  if (flip) {
    facts.push(["last flip", h("span", {"data-field": "last-flip"}, `v${flip.version} at ${fmtTime(flip.at)}`,
      flip.replicas > 1 ? h("span", {class: "muted"}, ` · ${flip.replicas} replicas within ${fmtSeconds(flip.spread)}`) : "")]);
  }
  if (cluster.generation !== null && cluster.generation !== undefined) facts.push(["generation", String(cluster.generation)]);
  if (cluster.discovery) facts.push(["discovery", `${cluster.discovery.mode || "?"}`]);
  facts.push(["source", cluster.source === "replicas" ? "replicas (trainer down)" : "trainer"]);
  fill($("#cluster-facts"), facts.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
}

function field(label, value) {
  return h("div", {}, h("b", {}, value), label);
}

function makeCard(id) {
  const card = h("article", {class: "replica", dataset: {replicaId: id}, "aria-label": `replica ${id}`});
  cards.set(id, card);
  return card;
}

// The last version this replica assembled from chunks: a progress bar while it stages, then where its bytes
// came from (its own copies, its peers, the trainer or shared folder).
function transferRow(t) {
  if (!t || !t.total_bytes) return null;
  const pct = Math.min(100, Math.round(100 * t.done_bytes / t.total_bytes));
  const by = t.bytes_by_source || {};
  const parts = ["local", "peer", "origin"].filter((s) => by[s]).map((s) => `${fmtBytes(by[s])} ${s}`);
  const label = t.failed ? `v${t.version} not assembled: ${t.failed}`
    : t.finished ? `v${t.version} staged: ${parts.join(", ") || "nothing new"}`
    : `v${t.version} arriving: ${fmtBytes(t.done_bytes)} of ${fmtBytes(t.total_bytes)} (${pct}%)`;
  return h("div", {class: "transfer", "data-field": "transfer", title: t.avoided_peers ? `${t.avoided_peers} peer(s) avoided` : ""},
    t.finished ? null : h("progress", {max: 100, value: pct, "aria-label": `v${t.version} transfer`}),
    h("span", {class: "muted small"}, label));
}

function fmtBytes(n) {
  if (n >= 2 ** 30) return `${(n / 2 ** 30).toFixed(1)} GiB`;
  if (n >= 2 ** 20) return `${(n / 2 ** 20).toFixed(1)} MiB`;
  if (n >= 2 ** 10) return `${(n / 2 ** 10).toFixed(0)} KiB`;
  return `${n} B`;
}

function renderCard(card, r, cluster) {
  const st = stateWord(r);
  card.className = `replica st-${st}`;
  const series = rates.get(r.replica_id) || [];
  const ready = r.ready ? h("span", {class: "pill pill-ok", "data-field": "ready"}, "ready")
    : h("span", {class: "pill pill-bad", "data-field": "ready"}, "not ready");
  const staged = r.staged_version !== null && r.staged_version !== undefined
    ? h("span", {}, vchip(r.staged_version, "small"), h("span", {class: "muted small"}, ` ${r.staged_state || ""}`))
    : h("span", {class: "muted"}, "none");
  const age = r.heartbeat_age_s !== null && r.heartbeat_age_s !== undefined ? `heartbeat ${fmtSeconds(r.heartbeat_age_s)} ago` : "";
  const where = [r.in_heartbeats ? "heartbeats" : null, r.in_discovery ? "discovery" : null].filter(Boolean).join(" + ");
  fill(card,
    h("div", {class: "replica-head"},
      h("h3", {title: r.replica_id}, r.replica_id),
      h("span", {class: `outcome ${st}`, "data-field": "state"}, st), ready),
    h("div", {class: "replica-url"}, r.url || "no URL"),
    h("div", {class: "versions-row"},
      h("div", {"data-field": "serving"}, h("span", {class: "label"}, "serving"), vchip(r.serving_version)),
      h("div", {"data-field": "staged"}, h("span", {class: "label"}, "staged"), staged)),
    h("div", {class: "stats"},
      field("queue", r.queue_depth ?? "–"), field("running", r.running ?? "–"), field("tokens/s", fmtNum(r.tokens_per_s, 3))),
    sparkline(series, versionColor(r.serving_version), `tokens per second of ${r.replica_id}, last ${series.length} seconds`),
    transferRow(r.transfer),
    r.last_error ? h("div", {class: "replica-error", "data-field": "error"}, r.last_error) : null,
    h("div", {class: "replica-foot"}, h("span", {}, age), h("span", {}, where)));
}

function renderReplicas(cluster) {
  const list = cluster.replicas || [];
  const grid = $("#replicas");
  $("#replicas-empty").hidden = list.length > 0;
  $("#replica-count").textContent = list.length ? `${list.length} known` : "";
  const seen = new Set();
  list.forEach((r, i) => {
    const id = String(r.replica_id || r.url || `#${i}`);
    seen.add(id);
    const series = rates.get(id) || [];
    series.push(Number(r.tokens_per_s) || 0);
    if (series.length > HISTORY) series.shift();
    rates.set(id, series);
    const card = cards.get(id) || makeCard(id);
    renderCard(card, {...r, replica_id: id}, cluster);
    if (grid.children[i] !== card) grid.insertBefore(card, grid.children[i] || null);
  });
  for (const [id, card] of cards) {
    if (!seen.has(id)) { card.remove(); cards.delete(id); rates.delete(id); }
  }
}

export function init() {
  on("cluster", (cluster) => {
    renderHeader(cluster);
    renderConvergence(cluster);
    renderReplicas(cluster);
  });
  on("history", () => { if (store.cluster) renderConvergence(store.cluster); }); // the last flip
  // A page left open shows when its data stops arriving.
  setInterval(() => {
    if (store.receivedAt && Date.now() - store.receivedAt > 5000) {
      const live = $("#live-status");
      live.className = "live off";
      $(".live-text", live).textContent = "no updates";
    }
  }, 1000);
}
