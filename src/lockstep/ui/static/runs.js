// Training runs: start one, stop it, follow its progress, loss and reward curves, and sample answers per version.

import {$, $$, h, fill, vchip, outcome, fmtTime, fmtNum, fmtSeconds, listOf, fieldError, toast} from "./dom.js";
import {api} from "./api.js";
import {lineChart} from "./charts.js";
import {on, store} from "./store.js";

/** The main parameters of each kind of run (bounds as the trainer checks them); it has defaults for the rest. */
export const PARAMS = {
  finetune: [
    {name: "task", label: "Task", type: "choice", options: ["digits", "target_word"], value: "digits",
      help: "what the reward scores"},
    {name: "algorithm", label: "Algorithm", type: "choice", options: ["grpo", "reinforce", "sft_best"], value: "grpo"},
    {name: "steps", label: "Steps", type: "int", min: 1, max: 100000, value: 30, help: "optimizer steps in all"},
    {name: "publish_every", label: "Publish every (steps)", type: "int", min: 1, max: 100000, value: 3,
      help: "a new version every N steps"},
    {name: "batch_size", label: "Prompts per step", type: "int", min: 1, max: 1024, value: 8},
    {name: "group_size", label: "Samples per prompt", type: "int", min: 2, max: 64, value: 4},
    {name: "learning_rate", label: "Learning rate", type: "float", min: 1e-9, max: 1, value: 0.003},
    {name: "max_new_tokens", label: "Max new tokens", type: "int", min: 1, max: 1024, value: 16},
    {name: "async", label: "Asynchronous rollouts", type: "bool", value: false,
      help: "the fleet keeps answering while the model trains"},
    {name: "max_staleness", label: "Max staleness (versions)", type: "int", min: 0, max: 64, value: 0,
      help: "how far behind the newest version a sample's writer may be; 0: on-policy"},
  ],
  simulation: [
    {name: "rounds", label: "Swap rounds", type: "int", min: 1, max: 1000, value: 4,
      help: "publishes, alternating two models"},
    {name: "interval_s", label: "Seconds between rounds", type: "float", min: 0, max: 3600, value: 0},
    {name: "requests_per_replica", label: "Checks per replica", type: "int", min: 0, max: 1000, value: 4,
      help: "requests after each switch"},
    {name: "max_new_tokens", label: "Max new tokens", type: "int", min: 1, max: 1024, value: 8},
    {name: "background_load", label: "Load during each switch", type: "bool", value: true},
  ],
};
const ACTIVE = new Set(["queued", "running", "starting", "stopping"]);

let selected = null;    // id of the run shown in the detail pane
let detail = null;      // its last full body
let detailTimer = null;

function runId(run) { return String(run.id ?? run.run_id ?? ""); }

/** Progress as a fraction in [0, 1], whatever shape the trainer reports it in. */
export function fraction(run) {
  const p = run.progress;
  if (typeof p === "number") return Math.max(0, Math.min(1, p > 1 ? p / 100 : p));
  if (p && typeof p === "object") {
    const done = p.done ?? p.step ?? p.round ?? p.current;
    const total = p.total ?? p.steps ?? p.rounds;
    if (typeof p.fraction === "number") return Math.max(0, Math.min(1, p.fraction));
    if (typeof done === "number" && typeof total === "number" && total > 0) return Math.max(0, Math.min(1, done / total));
  }
  return ["succeeded"].includes(run.status) ? 1 : 0;
}

function kindOf() { return ($("input[name=kind]:checked") || {}).value || "finetune"; }

function paramField(p) {
  const id = `param-${p.name}`;
  const error = h("small", {class: "field-error", id: `${id}-error`, "aria-live": "polite"});
  const help = p.help ? h("small", {class: "help"}, p.help) : null;
  if (p.type === "bool") {
    return h("div", {class: "field check"},
      h("label", {for: id}, h("input", {id, name: p.name, type: "checkbox", checked: p.value}), ` ${p.label}`), help, error);
  }
  const control = p.type === "choice"
    ? h("select", {id, name: p.name}, p.options.map((o) => h("option", {value: o, selected: o === p.value}, o.replace("_", " "))))
    : h("input", {id, name: p.name, type: "number", min: p.min, max: p.max, step: p.type === "int" ? 1 : "any", value: p.value,
      required: true, inputmode: p.type === "int" ? "numeric" : "decimal", "aria-describedby": `${id}-error`});
  return h("div", {class: "field"}, h("label", {for: id}, p.label), control, help, error);
}

function renderParamFields() {
  fill($("#run-params"), PARAMS[kindOf()].map(paramField));
}

/** The form's parameters, checked as the trainer will check them; null (and the first bad field focused) if not. */
function readParams() {
  const kind = kindOf();
  const params = {};
  let firstBad = null;
  for (const p of PARAMS[kind]) {
    const input = $(`#param-${p.name}`);
    if (p.type === "bool") { params[p.name] = input.checked; continue; }
    if (p.type === "choice") { params[p.name] = input.value; continue; }
    const raw = input.value.trim();
    const value = Number(raw);
    let message = "";
    if (raw === "") message = `Enter ${p.label.toLowerCase()}.`;
    else if (!Number.isFinite(value)) message = "Must be a number.";
    else if (p.type === "int" && !Number.isInteger(value)) message = "Must be a whole number.";
    else if (value < p.min || value > p.max) message = `Between ${p.min} and ${p.max}.`;
    if (!fieldError(input, $(`#param-${p.name}-error`), message) && !firstBad) firstBad = input;
    params[p.name] = value;
  }
  if (firstBad) { firstBad.focus(); return null; }
  return {kind, params};
}

async function startRun(event) {
  event.preventDefault();
  const form = readParams();
  const error = $("#run-form-error");
  error.textContent = "";
  if (!form) return;
  const button = $("#run-start");
  button.disabled = true;
  try {
    const run = await api("/api/runs", {method: "POST", body: form});
    selected = runId(run);
    detail = run;
    toast(`Run ${selected} started (${form.kind})`, "ok");
    renderDetail();
    refreshDetail();
  } catch (err) {
    error.textContent = err.message;
  } finally {
    button.disabled = false;
  }
}

async function act(verb) {
  if (!selected) return;
  try {
    await api(`/api/runs/${encodeURIComponent(selected)}/${verb}`, {method: "POST"});
    toast(`Run ${selected}: ${verb} sent`, "ok");
    refreshDetail();
  } catch (err) {
    toast(`Could not ${verb} run ${selected}: ${err.message}`, "bad");
  }
}

/** Delete the selected run and its files, once it has ended; the versions it published stay in the store. */
async function deleteRun() {
  const id = selected;
  if (!id || !confirm(`Delete run ${id} and its files? The versions it published stay.`)) return;
  try {
    await api(`/api/runs/${encodeURIComponent(id)}`, {method: "DELETE"});
    toast(`Run ${id} deleted`, "ok");
    if (selected === id) { selected = null; detail = null; renderDetail(); } // the next list picks another run
  } catch (err) {
    toast(`Could not delete run ${id}: ${err.message}`, "bad");
  }
}

function renderList(body) {
  const runs = listOf(body, "runs", "items");
  const list = $("#runs-list");
  $("#runs-empty").hidden = runs.length > 0;
  const ordered = runs.slice().sort((a, b) => (b.created_at || b.started_at || 0) - (a.created_at || a.started_at || 0));
  if (!selected && ordered.length) selected = runId(ordered.find((r) => ACTIVE.has(r.status)) || ordered[0]);
  const focused = list.contains(document.activeElement) ? document.activeElement.dataset.run : null;
  fill(list, ordered.map((run) => {
    const id = runId(run);
    const bar = h("div", {});
    bar.style.width = `${Math.round(fraction(run) * 100)}%`;
    return h("li", {}, h("button", {type: "button", "aria-pressed": String(id === selected), "data-run": id,
      onclick: () => { selected = id; renderList(store.runs); refreshDetail(); }},
      h("span", {class: "run-name"}, id), outcome(run.status),
      h("span", {class: "run-sub"}, `${run.kind || "?"} · ${fmtTime(run.created_at || run.started_at)}`),
      h("span", {class: "mini-progress", "aria-hidden": "true"}, bar)));
  }));
  // The list is rebuilt as runs progress; keyboard focus stays on the run it was on.
  if (focused) { const again = $$("button[data-run]", list).find((b) => b.dataset.run === focused); if (again) again.focus(); }
}

async function refreshDetail() {
  clearTimeout(detailTimer);
  if (!selected) return;
  try {
    detail = await api(`/api/runs/${encodeURIComponent(selected)}`);
    renderDetail();
  } catch (err) {
    $("#run-error").hidden = false;
    $("#run-error").textContent = `Cannot read run ${selected}: ${err.message}`;
  }
  // While a run is active its curves grow: follow it every second.
  if (detail && ACTIVE.has(detail.status)) detailTimer = setTimeout(refreshDetail, 1000);
}

/**
 * A mark where the curve's points first come from a version newer than every one before. Only forward: an
 * asynchronous run's points can go v3, v2, v3 as older answers are used up, and that is no new version.
 */
function versionMarks(points) {
  const marks = [];
  let newest = null;
  for (const p of points) {
    if (typeof p.version !== "number") continue;
    if (newest !== null && p.version > newest) marks.push({x: p.x, version: p.version});
    if (newest === null || p.version > newest) newest = p.version;
  }
  return marks;
}

/** A count from the trainer's JSON, or null when it is missing or not a number. */
function count(x) { return typeof x === "number" && Number.isFinite(x) ? x : null; }

/** {"0": 96, "1": 32} as [[0, 96], [1, 32]], by key; keys that are not whole numbers and bad counts are skipped. */
function tally(obj) {
  if (!obj || typeof obj !== "object" || Array.isArray(obj)) return [];
  return Object.entries(obj)
    .filter(([key, n]) => /^\d+$/.test(key) && count(n) !== null)
    .map(([key, n]) => [Number(key), n])
    .sort((a, b) => a[0] - b[0]);
}

const total = (pairs) => pairs.reduce((sum, [, n]) => sum + n, 0);

/** The version that wrote most of a step's samples (their version tags), the newer one on a tie; null if none. */
export function producerVersion(point) {
  let best = null;
  for (const [version, n] of tally(point.sample_versions)) if (n > 0 && (!best || n >= best[1])) best = [version, n];
  return best ? best[0] : null;
}

/** The version a training point is drawn as: who wrote its samples (points from before the tags: the step's). */
function trainedBy(point) {
  return point.sample_versions === undefined ? point.version : producerVersion(point);
}

/** A training point's tooltip addition: every version that wrote its samples, and the run's newest then. */
function producersText(point) {
  const writers = tally(point.sample_versions).reverse().filter(([, n]) => n > 0).map(([v, n]) => `v${v}: ${n}`);
  if (!writers.length) return "";
  const newest = typeof point.version === "number" ? ` (newest v${point.version})` : "";
  return `samples written by ${writers.join(" · ")}${newest}`;
}

const MAX_VERSION_ROWS = 20;

/** The run's version_samples as rows, newest version first; entries that are not objects are skipped. */
function versionSampleRows(byVersion) {
  if (!byVersion || typeof byVersion !== "object" || Array.isArray(byVersion)) return [];
  return Object.entries(byVersion)
    .filter(([key, vs]) => /^\d+$/.test(key) && vs && typeof vs === "object")
    .map(([key, vs]) => ({version: Number(key), used: count(vs.used), stale: count(vs.dropped_stale),
      foreign: count(vs.foreign), failed: count(vs.errors), mislabeled: count(vs.mislabeled),
      staleness: tally(vs.staleness)}))
    .sort((a, b) => b.version - a.version);
}

/** Samples used by staleness: a stacked bar (a title per segment) and the same numbers as text. */
function stalenessHistogram(pairs) {
  const used = pairs.filter(([, n]) => n > 0);
  if (!used.length) return "–";
  const all = total(used);
  const bar = h("span", {class: "stale-bar"}, used.map(([behind, n]) => {
    const seg = h("span", {class: `stale-seg st${Math.min(behind, 3)}`,
      title: `${n} of ${all} samples written ${behind} version${behind === 1 ? "" : "s"} behind the newest`});
    seg.style.flexGrow = String(n);
    return seg;
  }));
  return h("span", {class: "stale-hist"}, bar,
    h("span", {class: "stale-text"}, used.map(([behind, n]) => `${behind}: ${n}`).join(" · ")));
}

const dash = (n) => (n === null ? "–" : String(n));

const VERSION_SAMPLE_COLUMNS = [
  ["used", "used", (r) => dash(r.used)],
  ["staleness", "used by staleness", (r) => stalenessHistogram(r.staleness)],
  ["stale", "dropped as stale", (r) => dash(r.stale)],
  ["foreign", "foreign", (r) => dash(r.foreign)],
  ["failed", "errors + mislabeled", (r) => (r.failed === null && r.mislabeled === null ? "–"
    : String((r.failed ?? 0) + (r.mislabeled ?? 0)))],
];

/** "asynchronous, max staleness 2" from the run's parameters, as the trainer defaults them when unset. */
function runMode(params) {
  const p = params && typeof params === "object" ? params : {};
  const k = Number.isInteger(p.max_staleness) ? p.max_staleness : 0;
  if (p.async === true) return `asynchronous, max staleness ${k}`;
  return k > 0 ? `synchronous, max staleness ${k}` : "synchronous";
}

/** What trained each version a fine-tune published: samples used by staleness, and those dropped. */
function renderVersionSamples(run) {
  const box = $("#version-samples-box");
  box.hidden = !run || run.kind !== "finetune";
  if (box.hidden) return;
  const rows = versionSampleRows(run.version_samples);
  const used = rows.reduce((sum, r) => sum + (r.used ?? 0), 0);
  const dropped = rows.reduce((sum, r) => sum + (r.stale ?? 0), 0);
  const shown = rows.slice(0, MAX_VERSION_ROWS);
  fill($("#version-samples-mode"), h("b", {}, runMode(run.params)),
    ` · ${used} sample${used === 1 ? "" : "s"} used · ${dropped} dropped as stale`,
    rows.length > shown.length ? ` · newest ${shown.length} of ${rows.length} versions shown` : "");
  $("#version-samples-empty").hidden = rows.length > 0;
  $("#version-samples-table").hidden = !rows.length;
  fill($("#version-samples-table thead"), h("tr", {}, h("th", {scope: "col"}, "version"),
    VERSION_SAMPLE_COLUMNS.map(([key, label]) => h("th", {scope: "col", "data-col": key}, label))));
  fill($("#version-samples-table tbody"), shown.map((r) => h("tr", {"data-version": r.version},
    h("th", {scope: "row", "data-col": "version"}, vchip(r.version, "small")),
    VERSION_SAMPLE_COLUMNS.map(([key, , cell]) => h("td", {"data-col": key}, cell(r))))));
}

const ROUND_COLUMNS = [
  ["round", "round", (r) => r.round],
  ["switch", "switch", (r) => `v${r.from_version ?? "?"} → v${r.version ?? "?"}`],
  ["outcome", "outcome", (r) => outcome(r.outcome)],
  ["converged", "converged", (r) => (r.converged ? "yes" : "no")],
  ["propagation", "propagation", (r) => fmtSeconds(r.propagation_s)],
  ["skew", "flip skew", (r) => fmtSeconds(r.skew_s)],
  ["requests", "requests", (r) => r.requests ?? "–"],
  ["failed", "failed", (r) => r.failed ?? "–"],
  ["mislabeled", "mislabeled", (r) => r.mislabeled ?? "–"],
];

function renderRounds(rounds) {
  const box = $("#rounds-box");
  box.hidden = !rounds.length;
  if (!rounds.length) return;
  fill($("#rounds-table thead"), h("tr", {}, ROUND_COLUMNS.map(([, label]) => h("th", {scope: "col"}, label))));
  fill($("#rounds-table tbody"), rounds.slice().reverse().map((r) => h("tr", {class: r.failed || r.mislabeled ? "aborted" : ""},
    ROUND_COLUMNS.map(([key, , cell]) => h("td", {"data-col": key}, cell(r))))));
}

function renderSamples(samples) {
  const byVersion = new Map();
  for (const smp of samples) {
    const v = smp.version ?? null;
    if (!byVersion.has(v)) byVersion.set(v, []);
    byVersion.get(v).push(smp);
  }
  const versions = [...byVersion.keys()].sort((a, b) => (b ?? -1) - (a ?? -1));
  fill($("#samples"), versions.length ? versions.map((v) => h("section", {class: "sample-group", "data-version": v ?? ""},
    h("h4", {}, vchip(v, "small"), h("span", {class: "muted small"}, `${byVersion.get(v).length} sample${byVersion.get(v).length === 1 ? "" : "s"}`)),
    byVersion.get(v).slice(-4).map((smp) => h("div", {class: "sample"},
      typeof smp.reward === "number" ? h("span", {class: "r", title: "reward"}, `r=${fmtNum(smp.reward, 3)}`) : null,
      h("div", {class: "q"}, smp.prompt || ""),
      h("div", {class: "a"}, smp.answer || smp.text || ""))))) :
    h("p", {class: "empty"}, "Sample answers appear here as versions are published."));
}

/** One of the two charts of a run, with its caption and last value. */
function chart(el, captionEl, lastEl, caption, name, color, points, marks, xLabel, id, extra = null) {
  const pts = points.filter((p) => typeof p.y === "number" && typeof p.x === "number");
  const series = [{name, color, points: pts}];
  if (extra) series.push(extra);
  const key = (c, text) => { const sw = h("i", {class: "key", "aria-hidden": "true"}); sw.style.background = c; return h("span", {}, sw, text); };
  fill($(captionEl), key(color, caption), extra ? key(extra.color, extra.name) : null);
  const last = pts[pts.length - 1];
  $(lastEl).textContent = last ? `${fmtNum(last.y, 4)}${extra && extra.points.length ? ` · ${extra.name} ${fmtNum(extra.points[extra.points.length - 1].y, 3)}` : ""}` : "";
  lineChart($(el), {series, marks, xLabel, label: `${caption} of run ${id} over ${pts.length} ${xLabel}s`, empty: `no ${name} yet`});
}

function renderDetail() {
  const run = detail;
  const stop = $("#run-stop"), resume = $("#run-resume"), remove = $("#run-delete");
  if (!run) {
    $("#run-title").textContent = "No run selected";
    stop.hidden = resume.hidden = remove.hidden = true;
    renderVersionSamples(null);
    for (const el of ["#loss-chart", "#reward-chart"]) lineChart($(el), {series: [], empty: "start a run to see its curves"});
    return;
  }
  const id = runId(run);
  fill($("#run-title"), `Run ${id} `, outcome(run.status));
  stop.hidden = !ACTIVE.has(run.status);
  resume.hidden = !["interrupted", "stopped"].includes(run.status); // the trainer resumes both from a checkpoint
  remove.hidden = ACTIVE.has(run.status); // the trainer refuses (409) to delete a queued or running run
  const frac = fraction(run);
  const bar = $("#run-progress");
  bar.setAttribute("aria-valuenow", String(Math.round(frac * 100)));
  $(".progress-fill", bar).style.width = `${(frac * 100).toFixed(1)}%`;

  const points = listOf(run.metrics, "points").filter((p) => p && typeof p.step === "number");
  const rounds = listOf(run.rounds, "rounds");
  const versions = Array.isArray(run.versions) && run.versions.length ? run.versions
    : [...new Set(points.map((p) => p.version).filter((v) => v !== undefined && v !== null))];
  const p = run.progress && typeof run.progress === "object" ? run.progress : {};
  const fact = (label, value) => h("div", {}, h("span", {}, label), h("b", {}, value));
  fill($("#run-summary"),
    fact("kind", run.kind || "?"),
    fact("progress", `${Math.round(frac * 100)}%`),
    run.kind === "simulation" ? fact("rounds", `${rounds.length}${p.total ? ` of ${p.total}` : ""}`)
      : fact("step", `${p.step ?? (points.length ? points[points.length - 1].step : 0)}${p.total ? ` of ${p.total}` : ""}`),
    fact("published", versions.length ? h("span", {class: "vlist"}, versions.slice(-6).map((v) => vchip(v, "small"))) : "–"),
    fact("started", fmtTime(run.started_at || run.created_at)),
    p.message ? h("div", {class: "now"}, h("span", {}, "now"), h("b", {class: "small-b"}, p.message)) : null);
  const err = $("#run-error");
  err.hidden = !run.error;
  err.textContent = run.error ? `This run failed: ${run.error}` : "";

  if (run.kind === "simulation") {
    // A simulation has no loss: its pictures are how long each switch took and how far apart replicas flipped.
    const rounds = listOf(run.rounds, "rounds");
    const rmarks = rounds.filter((r) => typeof r.version === "number").map((r) => ({x: r.round, version: r.version}));
    chart("#loss-chart", "#left-caption", "#left-last", "Propagation (s)", "propagation", "#58a6ff",
      rounds.map((r) => ({x: r.round, y: r.propagation_s, version: r.version})), rmarks, "round", id);
    chart("#reward-chart", "#right-caption", "#right-last", "Flip skew (ms)", "skew", "#d2a8ff",
      rounds.map((r) => ({x: r.round, y: typeof r.skew_s === "number" ? r.skew_s * 1000 : null, version: r.version})), rmarks, "round", id);
  } else {
    // A step's loss and reward come from the samples it trained on: they belong to the versions that wrote
    // those samples (the answers' version tags), which in an asynchronous run can be versions behind the newest.
    // The held-out reward stays with the version it evaluated.
    const trained = points.map((p) => ({x: p.step, version: trainedBy(p), detail: producersText(p)}));
    const marks = versionMarks(trained);
    chart("#loss-chart", "#left-caption", "#left-last", "Loss", "loss", "#f0883e",
      trained.map((t, i) => ({...t, y: points[i].loss})), marks, "step", id);
    const evals = listOf(run.evals, "evals").filter((e) => e && typeof e === "object")
      .map((e) => ({x: e.step, y: e.reward, version: e.version}));
    chart("#reward-chart", "#right-caption", "#right-last", "Reward", "reward", "#3fb950",
      trained.map((t, i) => ({...t, y: points[i].reward})), marks, "step", id,
      evals.length ? {name: "held-out", color: "#e3b341", points: evals} : null);
  }
  renderVersionSamples(run);
  renderRounds(listOf(run.rounds, "rounds"));
  renderSamples(listOf(run.samples, "samples"));
}

export function init() {
  renderParamFields();
  $$("input[name=kind]").forEach((r) => r.addEventListener("change", renderParamFields));
  $("#run-form").addEventListener("submit", startRun);
  $("#run-stop").addEventListener("click", () => act("stop"));
  $("#run-resume").addEventListener("click", () => act("resume"));
  $("#run-delete").addEventListener("click", deleteRun);
  let lastSelected = null;
  on("runs", (body) => {
    renderList(body);
    // The list changed: the selected run may have new points (when not already followed every second).
    if (selected && (selected !== lastSelected || !detail || !ACTIVE.has(detail.status))) refreshDetail();
    lastSelected = selected;
  });
  renderDetail();
}
