// Rollout: the candidate's share of requests step by step, its gates, and a person's promote or abort.
// GET /api/rollout is asked every second while a rollout runs, and again whenever the rollout jobs on the feed change.

import {$, h, s, fill, vchip, versionColor, outcome, fmtTime, listOf, sentence, toast} from "./dom.js";
import {api} from "./api.js";
import {confirmDialog} from "./control.js";
import {on, store} from "./store.js";

const FINAL = new Set(["promoted", "rolled back", "aborted", "unchanged"]);
const POLL_MS = 1000;
const RETRY_MS = 5000; // after a failed read (the trainer away): slower, so a down trainer is not hammered

let view = null;     // the last GET /api/rollout; null: no rollout has run
let error = "";      // why the last read failed ("" when it did not)
let timer = null;
let reading = false;
let again = false;   // a read was asked for while one was on its way: its answer may be older than the ask
let jobsKey = null;  // the rollout jobs of the last publishes event (id, status, phase)

/** A number as short as it reads: 0.02, 1.5, 25 (not 0.0200). */
function num(x) {
  if (x === null || x === undefined || !Number.isFinite(Number(x))) return "–";
  return String(Number(Number(x).toPrecision(4)));
}

/** The version the rollout started from: the one its stats compare against, else the fleet's committed one. */
function baseVersion(v) {
  if (v.committed && typeof v.committed.version === "number") return v.committed.version;
  const c = store.cluster && store.cluster.committed;
  return c && c.version !== v.version ? c.version : 0;
}

/** The candidate's share now: all of it once promoted, none once rolled back or aborted. */
function candidateShare(v) {
  if (v.phase === "promoted") return 100;
  if (v.phase === "rolled back" || v.phase === "aborted" || v.phase === "unchanged") return 0;
  return Number(v.share) || 0;
}

/** The steps to draw: those taken (with their outcome), then those of the plan not taken. */
function stepItems(v) {
  const final = FINAL.has(v.phase);
  const taken = listOf(v.steps);
  const items = taken.map((st, i) => ({share: st.share, outcome: st.outcome, record: st,
    current: !final && i === taken.length - 1 && !st.outcome}));
  const reached = taken.length ? Math.max(...taken.map((st) => st.share)) : -1;
  const planned = v.plan ? listOf(v.plan.steps) : [];
  for (const share of planned.slice(taken.length)) {
    if (share > reached) items.push({share, outcome: final ? "not reached" : null, record: null, current: false});
  }
  return items;
}

/** The publish job that ran this rollout, for a reason the view lacks (a rollout that never started). */
function jobOf(v) {
  return listOf(store.publishes, "publishes").find((j) => j.kind === "rollout"
    && ((j.result && j.result.rollout && j.result.rollout.id === v.id) || (v.version != null && j.version === v.version)));
}

/** What became of a finished rollout, in one line; what is going on for a running one. */
function statusLine(v) {
  const job = jobOf(v);
  const reason = v.reason || (job && ((job.result && job.result.reason) || job.error)) || "";
  const cand = `v${v.version ?? "?"}`;
  switch (v.phase) {
    case "promoted":
      return v.human === "promote" ? `Promoted by a person: ${cand} answers every request.`
        : `Promoted: every step passed its gates; ${cand} answers every request.`;
    case "rolled back":
      if (v.automatic_rollback) return `Rolled back automatically: ${reason}`;
      return v.human === "abort" ? `Rolled back by a person: ${reason}` : `Rolled back: ${reason || "no reason given"}`;
    case "aborted":
      return `Aborted before any request reached ${cand}: ${reason || "no reason given"}`;
    case "unchanged":
      return `Nothing to roll out: ${reason || "the committed version already has this content"}.`;
    case "staging":
      return `Staging ${cand} on every replica beside the committed version.`;
    case "evaluating":
      return `Scoring ${cand} on the trainer's task before it takes any request.`;
    case "step": {
      const share = Number(v.share) || 0;
      const n = v.plan ? listOf(v.plan.steps).length : 0;
      const what = share > 0 ? `${cand} answers ${num(share)}% of requests` : `${cand} shadows the committed version`;
      return `Step ${(v.step ?? 0) + 1}${n ? ` of ${n}` : ""}: ${what}; it holds until its gates pass.`;
    }
    case "promoting":
      return `Promoting: the commit of ${cand} is written; every replica flips to it at one moment.`;
    case "rolling back":
      return `Rolling back: ${reason}`;
    case "orphaned":
      return sentence(reason || "its coordinator is gone; abort rolls it back");
    case "elsewhere":
      return sentence(reason || "another coordinator drives it; stop it there");
    default:
      return v.phase || "";
  }
}

function stepChip(item, v) {
  const share = item.share > 0 ? `${num(item.share)}%` : "shadow";
  const word = item.outcome || (item.current ? "now" : "next");
  const r = item.record;
  const title = r ? `in force from ${fmtTime(r.activate_at)}${r.ended_at ? `, ended ${fmtTime(r.ended_at)}` : ""}`
    : item.share > 0 ? `${num(item.share)}% of requests` : `${num(v.plan ? v.plan.shadow : 0)}% of prompts also run on the candidate`;
  return h("li", {class: `rstep ${word.replace(/[^a-z]/g, "")}`, "data-share": String(item.share),
    "aria-current": item.current ? "step" : null, title},
  h("b", {}, share), h("span", {class: "rstep-outcome"}, word));
}

/** The split as a bar: the candidate's share in its colour, the committed version's in its own. */
function splitBar(v) {
  const W = 600, H = 18;
  const share = candidateShare(v), base = baseVersion(v);
  const x = (W * share) / 100;
  const label = `v${v.version} answers ${num(share)}% of requests, v${base} ${num(100 - share)}%`;
  const svg = s("svg", {viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", role: "img", "aria-label": label,
    class: "split-svg"});
  svg.append(
    s("rect", {x: 0, y: 0, width: x, height: H, fill: versionColor(v.version), class: "split-candidate",
      "data-share": String(share)}, s("title", {}, `v${v.version}: ${num(share)}%`)),
    s("rect", {x, y: 0, width: W - x, height: H, fill: versionColor(base), "fill-opacity": 0.45,
      class: "split-committed"}, s("title", {}, `v${base}: ${num(100 - share)}%`)));
  const shadow = v.plan && v.plan.shadow > 0
    ? h("span", {class: "muted"}, ` · shadow: ${num(v.plan.shadow)}% of v${base}'s prompts also run on v${v.version}, unanswered`)
    : null;
  return [svg, h("div", {class: "split-legend"},
    h("span", {}, vchip(v.version, "small"), ` ${num(share)}%`),
    h("span", {}, vchip(base, "small"), ` ${num(100 - share)}%`), shadow)];
}

/** The gates' last readings; before the first, the plan's gates with nothing measured. */
function gateRows(v) {
  const results = listOf(v.gates);
  if (results.length) return results;
  return Object.entries((v.plan && v.plan.gates) || {}).map(([name, g]) => ({name, value: null,
    threshold: g.threshold, direction: g.direction, samples: 0, min_samples: g.min_samples, verdict: "pending",
    reason: "not measured yet"}));
}

function renderGates(v) {
  const descriptions = v.gate_descriptions || {};
  fill($("#rollout-gates tbody"), gateRows(v).map((g) => {
    const verdict = String(g.verdict || "pending").replace(/[^a-z]/g, "");
    return h("tr", {class: `gate ${verdict}`, "data-gate": g.name},
      h("th", {scope: "row"}, h("span", {class: "gate-name", title: descriptions[g.name] || null}, g.name),
        g.reason ? h("span", {class: "gate-reason"}, g.reason) : null),
      h("td", {"data-col": "value"}, g.value === null || g.value === undefined ? "–" : num(g.value)),
      h("td", {"data-col": "threshold", title: g.direction === "min" ? "a lower bound" : "an upper bound"},
        `${g.direction === "min" ? "≥" : "≤"} ${num(g.threshold)}`),
      h("td", {"data-col": "samples"}, `${g.samples ?? 0}/${g.min_samples ?? "–"}`),
      h("td", {"data-col": "verdict"}, h("span", {class: `verdict ${verdict}`}, verdict)));
  }));
}

function facts(v) {
  const out = [];
  const plan = v.plan;
  if (plan) {
    out.push(`each step holds ≥ ${num(plan.step_seconds)} s and ≥ ${num(plan.min_requests)} answers of v${v.version}`);
  }
  const answers = (st) => st ? `v${st.version}: ${st.requests} answered, ${st.errors} errors${st.compared ? `, ${st.compared} compared` : ""}` : null;
  if (v.candidate) out.push(answers(v.candidate));
  if (v.committed) out.push(answers(v.committed));
  const t = v.task_score;
  if (t) out.push(`task score ${num(t.score)}${t.baseline !== null && t.baseline !== undefined ? ` (committed: ${num(t.baseline)})` : ""} on ${t.samples} prompts`);
  if (v.human) out.push(`a person asked to ${v.human}`);
  return out.join(" · ");
}

function render() {
  const panel = $("#rollout-panel");
  panel.hidden = !view;
  const errorBox = $("#rollout-error");
  errorBox.hidden = !error;
  errorBox.textContent = error;
  if (!view) return;
  const v = view;
  const final = FINAL.has(v.phase);
  panel.dataset.phase = v.phase || "";
  fill($("#rollout-head"), vchip(v.version), v.model ? h("code", {}, v.model) : null,
    h("span", {"data-field": "phase"}, outcome(v.phase)));
  const status = $("#rollout-status");
  const line = statusLine(v);
  if (status.textContent !== line) status.textContent = line; // unchanged text is not announced again
  status.className = `rollout-status ${v.phase === "promoted" ? "ok" : final || v.phase === "orphaned" ? "bad" : "busy"}`;
  fill($("#rollout-steps"), stepItems(v).map((item) => stepChip(item, v)));
  fill($("#rollout-split"), splitBar(v));
  $("#rollout-facts").textContent = facts(v);
  renderGates(v);
  const canAct = !final && document.body.dataset.session !== "none";
  const busy = Boolean(v.human) || v.phase === "promoting" || v.phase === "rolling back";
  $("#rollout-actions").hidden = !canAct || v.phase === "elsewhere"; // the lease holder drives it, not this trainer
  $("#rollout-promote").hidden = v.phase === "orphaned";
  $("#rollout-promote").disabled = busy;
  $("#rollout-abort").disabled = busy;
}

function schedule(ms) {
  clearTimeout(timer);
  timer = ms === null ? null : setTimeout(read, ms);
}

/** GET /api/rollout once; keep asking every second while the rollout runs. */
async function read() {
  if (reading) { again = true; return; }
  reading = true;
  again = false;
  let next = null;
  try {
    view = await api("/api/rollout");
    error = "";
    if (!FINAL.has(view.phase)) next = POLL_MS;
  } catch (err) {
    if (err.status === 404) { view = null; error = ""; }
    else if (err.status !== 401) {
      error = `Cannot read the rollout: ${err.message}`;
      if (view && !FINAL.has(view.phase)) next = RETRY_MS;
    }
  } finally {
    reading = false;
  }
  render();
  schedule(again ? 0 : next);
}

async function act(what) {
  const v = view;
  if (!v) return;
  const base = baseVersion(v);
  const yes = what === "promote"
    ? await confirmDialog(`Promote v${v.version} now?`,
      `Every replica answers every request with v${v.version} from one moment on, whatever the gates say; ` +
      `v${base} is then freed.`, "Promote")
    : await confirmDialog(`Abort the rollout of v${v.version}?`,
      `Every replica goes back to v${base} at one moment, whatever the gates say; v${v.version} is dropped.`,
      "Abort rollout");
  if (!yes) return;
  const buttons = [$("#rollout-promote"), $("#rollout-abort")];
  buttons.forEach((b) => { b.disabled = true; });
  try {
    const answer = await api(what === "promote" ? "/api/rollout/promote" : "/api/rollout/abort", {method: "POST"});
    if (answer && answer.plan) view = answer; // an orphaned rollout's abort answers less than a view
    error = "";
    toast(what === "promote" ? `Promoting v${v.version}` : `Rolling v${v.version} back`, "ok");
  } catch (err) {
    error = `${what === "promote" ? "Promote" : "Abort"} failed: ${err.message}`;
    toast(error, "bad");
  }
  render();
  await read();
}

function onPublishes(body) {
  const jobs = listOf(body, "publishes").filter((j) => j.kind === "rollout");
  const key = JSON.stringify(jobs.map((j) => [j.id, j.status, j.phase]));
  if (key === jobsKey) return;
  jobsKey = key;
  read();
}

export function init() {
  on("publishes", onPublishes);
  $("#rollout-promote").addEventListener("click", () => act("promote"));
  $("#rollout-abort").addEventListener("click", () => act("abort"));
  window.addEventListener("lockstep:logged-out", () => { schedule(null); jobsKey = null; });
}
