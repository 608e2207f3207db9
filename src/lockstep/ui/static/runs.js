// Training runs: start one, stop it, follow its progress, loss and reward curves, and sample answers per version.

import {$, $$, h, fill, vchip, outcome, fmtTime, fmtNum, fmtSeconds, listOf, fieldError, toast} from "./dom.js";
import {api} from "./api.js";
import {lineChart} from "./charts.js";
import {on, store} from "./store.js";

/** The main parameters of each kind of run; the trainer has defaults for everything else. */
export const PARAMS = {
  finetune: [
    {name: "steps", label: "Steps", type: "int", min: 1, max: 100000, value: 30, help: "optimizer steps in all"},
    {name: "publish_every", label: "Publish every (steps)", type: "int", min: 1, max: 100000, value: 10, help: "a new version every N steps"},
    {name: "learning_rate", label: "Learning rate", type: "float", min: 1e-7, max: 1, value: 0.001, step: "any"},
    {name: "batch_size", label: "Batch size", type: "int", min: 1, max: 1024, value: 8},
  ],
  simulation: [
    {name: "rounds", label: "Swap rounds", type: "int", min: 1, max: 1000, value: 3, help: "publishes, alternating two models"},
    {name: "interval_s", label: "Seconds between rounds", type: "float", min: 0, max: 3600, value: 5, step: "any"},
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

function renderParamFields() {
  const kind = kindOf();
  fill($("#run-params"), PARAMS[kind].map((p) => h("div", {class: "field"},
    h("label", {for: `param-${p.name}`}, p.label),
    h("input", {id: `param-${p.name}`, name: p.name, type: "number", min: p.min, max: p.max, step: p.step || (p.type === "int" ? 1 : "any"),
      value: p.value, required: true, inputmode: p.type === "int" ? "numeric" : "decimal", "aria-describedby": `param-${p.name}-error`}),
    p.help ? h("small", {class: "help"}, p.help) : null,
    h("small", {class: "field-error", id: `param-${p.name}-error`, "aria-live": "polite"}))));
}

function readParams() {
  const kind = kindOf();
  const params = {};
  let firstBad = null;
  for (const p of PARAMS[kind]) {
    const input = $(`#param-${p.name}`);
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

function versionMarks(points) {
  const marks = [];
  let last;
  for (const p of points) {
    if (p.version !== undefined && p.version !== null && p.version !== last) {
      if (last !== undefined) marks.push({x: p.step, version: p.version});
      last = p.version;
    }
  }
  return marks;
}

function renderRounds(rounds) {
  const box = $("#rounds-box");
  box.hidden = !rounds.length;
  if (!rounds.length) return;
  const keys = [...new Set(rounds.flatMap((r) => Object.keys(r)))].filter((k) => typeof rounds[0][k] !== "object").slice(0, 8);
  fill($("#rounds-table thead"), h("tr", {}, keys.map((k) => h("th", {scope: "col"}, k.replaceAll("_", " ")))));
  fill($("#rounds-table tbody"), rounds.map((r) => h("tr", {}, keys.map((k) => h("td", {},
    typeof r[k] === "number" ? (k.endsWith("_at") || k === "time" ? fmtTime(r[k]) : k.endsWith("_s") ? fmtSeconds(r[k]) : fmtNum(r[k])) : String(r[k] ?? ""))))));
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

function renderDetail() {
  const run = detail;
  const stop = $("#run-stop"), resume = $("#run-resume");
  if (!run) {
    $("#run-title").textContent = "No run selected";
    stop.hidden = resume.hidden = true;
    return;
  }
  const id = runId(run);
  fill($("#run-title"), `Run ${id} `, outcome(run.status));
  stop.hidden = !ACTIVE.has(run.status);
  resume.hidden = run.status !== "interrupted";
  const frac = fraction(run);
  const bar = $("#run-progress");
  bar.setAttribute("aria-valuenow", String(Math.round(frac * 100)));
  $(".progress-fill", bar).style.width = `${(frac * 100).toFixed(1)}%`;

  const points = listOf(run.metrics, "points").filter((p) => p && typeof p.step === "number");
  const last = points[points.length - 1] || {};
  const versions = [...new Set(points.map((p) => p.version).filter((v) => v !== undefined && v !== null))];
  fill($("#run-summary"),
    h("div", {}, h("span", {}, "kind"), h("b", {}, run.kind || "?")),
    h("div", {}, h("span", {}, "progress"), h("b", {}, `${Math.round(frac * 100)}%`)),
    h("div", {}, h("span", {}, "step"), h("b", {}, last.step ?? "–")),
    h("div", {}, h("span", {}, "loss"), h("b", {}, fmtNum(last.loss, 4))),
    h("div", {}, h("span", {}, "reward"), h("b", {}, fmtNum(last.reward, 4))),
    h("div", {}, h("span", {}, "versions"), h("b", {}, versions.length ? versions.map((v) => `v${v}`).join(" ") : "–")),
    h("div", {}, h("span", {}, "started"), h("b", {}, fmtTime(run.started_at || run.created_at))));
  const err = $("#run-error");
  err.hidden = !run.error;
  err.textContent = run.error ? `This run failed: ${run.error}` : "";

  const marks = versionMarks(points);
  lineChart($("#loss-chart"), {series: [{name: "loss", color: "#f0883e", points: points.filter((p) => typeof p.loss === "number").map((p) => ({x: p.step, y: p.loss, version: p.version}))}],
    marks, xLabel: "step", label: `Loss of run ${id} over ${points.length} steps`, empty: run.kind === "simulation" ? "a simulation has no loss" : "no loss yet"});
  lineChart($("#reward-chart"), {series: [{name: "reward", color: "#3fb950", points: points.filter((p) => typeof p.reward === "number").map((p) => ({x: p.step, y: p.reward, version: p.version}))}],
    marks, xLabel: "step", label: `Reward of run ${id} over ${points.length} steps`, empty: "no reward yet"});
  renderRounds(listOf(run.rounds, "rounds"));
  renderSamples(listOf(run.samples, "samples"));
}

export function init() {
  renderParamFields();
  $$("input[name=kind]").forEach((r) => r.addEventListener("change", renderParamFields));
  $("#run-form").addEventListener("submit", startRun);
  $("#run-stop").addEventListener("click", () => act("stop"));
  $("#run-resume").addEventListener("click", () => act("resume"));
  let lastSelected = null;
  on("runs", (body) => {
    renderList(body);
    // The list changed: the selected run may have new points (when not already followed every second).
    if (selected && (selected !== lastSelected || !detail || !ACTIVE.has(detail.status))) refreshDetail();
    lastSelected = selected;
  });
  renderDetail();
}
