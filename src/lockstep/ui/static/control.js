// Control: publish a model reference, roll back to a chosen version. Each asks first and says plainly what happened.

import {$, h, fill, fmtSeconds, fmtTime, listOf, fieldError, toast} from "./dom.js";
import {api} from "./api.js";
import {on, store} from "./store.js";

export const REF_PATTERN = /^[A-Za-z0-9_./:@~+-]+$/; // the server checks the same pattern again
const FINAL = new Set(["committed", "aborted", "unchanged", "failed", "succeeded", "error", "done", "cancelled",
  "rolled back"]);
const MAX_STEPS = 20; // canary shares the trainer takes (lockstep.sync.rollout.MAX_STEPS)

/** "5, 25, 100" (or "5% 25%") as increasing shares in (0, 100]; {shares} or {error} in words. */
function parseShares(text) {
  const items = text.split(/[\s,]+/).filter(Boolean);
  if (!items.length) return {shares: null};
  if (items.length > MAX_STEPS) return {error: `At most ${MAX_STEPS} shares.`};
  const shares = [];
  for (const item of items) {
    const share = Number(item.replace(/%$/, ""));
    if (!Number.isFinite(share) || !(share > 0 && share <= 100)) {
      return {error: `${item} is not a percent above 0 and at most 100 (like 5,25,100).`};
    }
    if (shares.length && share <= shares[shares.length - 1]) {
      return {error: `Shares must increase: ${item} follows ${shares[shares.length - 1]}.`};
    }
    shares.push(share);
  }
  return {shares};
}

/** A number field in [lo, hi] (whole when `whole`): {value} (null when empty) or {error} in words. */
function numberIn(input, lo, hi, whole) {
  const text = input.value.trim();
  if (!text) return {value: null};
  const value = Number(text);
  if (!Number.isFinite(value) || value < lo || value > hi || (whole && !Number.isInteger(value))) {
    return {error: `${whole ? "A whole number" : "A number"} from ${lo} to ${hi}, or empty for the default.`};
  }
  return {value};
}

/** The rollout fields of the publish form: {fields} to add to the body (none: an ordinary publish), or {ok: false}. */
function rolloutFields() {
  const canary = $("#publish-canary"), shadow = $("#publish-shadow");
  const step = $("#publish-step-seconds"), min = $("#publish-min-requests");
  const parsed = parseShares(canary.value);
  const sh = numberIn(shadow, 0, 100, false);
  const st = numberIn(step, 0, 86400, false);
  const mr = numberIn(min, 0, 1e9, true);
  const rollout = Boolean(parsed.shares) || sh.value > 0;
  const needsRollout = "Applies to a rollout: enter canary shares or a shadow percent too.";
  let ok = fieldError(canary, $("#publish-canary-error"), parsed.error || "");
  ok = fieldError(shadow, $("#publish-shadow-error"), sh.error || "") && ok;
  ok = fieldError(step, $("#publish-step-seconds-error"),
    st.error || (st.value !== null && !rollout ? needsRollout : "")) && ok;
  ok = fieldError(min, $("#publish-min-requests-error"),
    mr.error || (mr.value !== null && !rollout ? needsRollout : "")) && ok;
  if (!ok) return {ok: false, invalid: [canary, shadow, step, min].find((el) => el.getAttribute("aria-invalid"))};
  if (!rollout) return {ok: true, fields: null};
  const fields = {};
  if (parsed.shares) fields.canary = parsed.shares;
  if (sh.value !== null) fields.shadow = sh.value;
  if (st.value !== null) fields.step_seconds = st.value;
  if (mr.value !== null) fields.min_requests = mr.value;
  return {ok: true, fields};
}

/** The steps of a rollout in words, as the trainer will take them: "shadow 10% → 5% → 25% → 100%". */
function stepsText(fields) {
  const shares = [...(fields.canary || [])];
  if (!shares.length || shares[shares.length - 1] !== 100) shares.push(100);
  const steps = shares.map((x) => `${x}%`);
  if (fields.shadow > 0) steps.unshift(`shadow ${fields.shadow}%`);
  return steps.join(" → ");
}

/** Ask with the page's dialog; resolves true only on an explicit confirm. */
export function confirmDialog(title, text, okLabel = "Confirm") {
  const dialog = $("#confirm");
  $("#confirm-title").textContent = title;
  $("#confirm-text").textContent = text;
  $("#confirm-ok").textContent = okLabel;
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), {once: true});
    dialog.returnValue = "";
    dialog.showModal();
    $("#confirm-cancel").focus(); // the safe choice has the focus; Escape also cancels
  });
}

function showOperation(kind, title, ...body) {
  const box = $("#operation");
  box.hidden = false;
  box.className = `operation ${kind}`;
  box.setAttribute("role", kind === "bad" ? "alert" : "status");
  fill(box, h("div", {class: "op-title"}, title), ...body);
}

function liveReplicas() {
  const cluster = store.cluster;
  return cluster ? (cluster.replicas || []).filter((r) => r.reachable !== false).length : 0;
}

/** The result part of a publish job, whatever the trainer nests it under. */
function resultOf(job) {
  return job.result && typeof job.result === "object" ? job.result : job;
}

function describeJob(job) {
  const result = resultOf(job);
  const outcome = result.outcome || job.outcome || job.status || "running";
  const version = result.version ?? job.version;
  const reason = result.reason || job.reason || job.error || null;
  const replicas = listOf(result.replicas || job.replicas);
  return {outcome, version, reason, replicas, final: FINAL.has(outcome) || FINAL.has(job.status)};
}

function replicaLines(replicas) {
  if (!replicas.length) return null;
  return h("ul", {}, replicas.map((r) => h("li", {},
    `${r.replica_id}: ${r.outcome}`,
    r.stage_seconds !== null && r.stage_seconds !== undefined ? ` in ${fmtSeconds(r.stage_seconds)}` : "",
    r.error ? ` — ${r.error}` : "")));
}

/** Follow a publish job until it ends, showing its progress; returns the last job seen. */
async function follow(publishId, what) {
  for (let i = 0; i < 3600; i++) { // polls every 0.5 s: at most half an hour
    let job;
    try {
      job = await api(`/api/publishes/${encodeURIComponent(publishId)}`);
    } catch (err) {
      showOperation("bad", `${what}: cannot follow its progress`, err.message);
      return null;
    }
    const d = describeJob(job);
    if (d.final) {
      const ok = ["committed", "unchanged", "succeeded", "done"].includes(d.outcome);
      showOperation(ok ? "ok" : "bad",
        d.version !== undefined && d.version !== null ? `v${d.version} ${d.outcome}` : `${what}: ${d.outcome}`,
        d.reason ? h("div", {}, ok ? d.reason : `Why: ${d.reason}`) : null, replicaLines(d.replicas));
      toast(ok ? `v${d.version} ${d.outcome}` : `${what} ${d.outcome}${d.reason ? `: ${d.reason}` : ""}`, ok ? "ok" : "bad");
      return job;
    }
    const progress = job.progress && typeof job.progress === "object" ? job.progress : null;
    const rolling = job.kind === "rollout" && !["resolve", "prepare", "staging", "queued"].includes(job.phase);
    const line = rolling ? `phase: ${job.phase}; its steps and gates are in the Rollout panel below`
      : progress && progress.live !== undefined
        ? `${progress.staged ?? 0}/${progress.live} replicas staged${progress.failed ? `, ${progress.failed} failed` : ""}`
        : `phase: ${job.phase || d.outcome}`;
    showOperation("busy", `${what}…`, line);
    await new Promise((r) => setTimeout(r, 500));
  }
  showOperation("", `${what} is still running`, "The Timeline lists it when it ends.");
  return null;
}

async function submitPublish(event) {
  event.preventDefault();
  const input = $("#publish-model"), timeout = $("#publish-timeout");
  const model = input.value.trim();
  let ok = fieldError(input, $("#publish-model-error"),
    !model ? "Enter a model reference, e.g. builtin:tiny-s1 or versions/3."
      : model.length > 500 ? "A model reference is at most 500 characters."
        : !REF_PATTERN.test(model) ? "Use letters, digits and . _ - / : @ ~ + only (no spaces)." : "");
  const t = timeout.value.trim();
  ok = fieldError(timeout, $("#publish-timeout-error"),
    t && !(Number(t) >= 1 && Number(t) <= 3600) ? "Between 1 and 3600 seconds, or empty for the default." : "") && ok;
  const rollout = rolloutFields();
  if (!ok || !rollout.ok) { (input.getAttribute("aria-invalid") ? input : rollout.invalid || timeout).focus(); return; }

  const policy = $("#publish-policy").value;
  const n = liveReplicas();
  const stage = `All ${n} live replica${n === 1 ? "" : "s"} stage it beside the model they serve`;
  const yes = rollout.fields
    ? await confirmDialog(`Roll out ${model}?`,
      `It becomes the next version. ${stage}, then it takes a growing share of requests: ${stepsText(rollout.fields)}. ` +
      "Each step holds while its gates pass; a failing gate rolls every replica back at once. You can promote or " +
      "abort it from the Rollout panel.", "Roll out")
    : await confirmDialog(`Publish ${model}?`,
      `It becomes the next version. ${stage}, then flip together. ` +
      `${policy === "quorum" ? "Replicas that fail go unready." : "If any replica fails, the publish is aborted."}`,
      "Publish");
  if (!yes) return;
  const body = {model, ...(rollout.fields || {})};
  if (policy) body.policy = policy;
  if (t) body.timeout_s = Number(t);
  const button = $("#publish-button");
  button.disabled = true;
  showOperation("busy", `Publishing ${model}…`, "asking the trainer");
  try {
    const job = await api("/api/publish", {method: "POST", body});
    const id = job.publish_id || job.id;
    if (id) await follow(id, `${rollout.fields ? "Rollout" : "Publish"} of ${model}`);
    else showOperation("ok", `Publish of ${model} started`);
  } catch (err) {
    showOperation("bad", `Publish of ${model} failed`, err.message);
  } finally {
    button.disabled = false;
  }
}

async function submitRollback(event) {
  event.preventDefault();
  const select = $("#rollback-to");
  const to = select.value === "" ? null : Number(select.value);
  const committed = store.cluster && store.cluster.committed ? store.cluster.committed.version : null;
  if (!fieldError(select, $("#rollback-error"),
    to !== null && !(Number.isInteger(to) && to >= 0) ? "Choose a version from the list." : "")) return;
  const target = to === null ? "the version before the committed one" : `v${to}`;
  const yes = await confirmDialog(`Roll back to ${target}?`,
    `Every replica stages ${target} again and flips to it together${committed !== null ? `, replacing v${committed}` : ""}.`,
    "Roll back");
  if (!yes) return;
  const button = $("#rollback-button");
  button.disabled = true;
  showOperation("busy", `Rolling back to ${target}…`, "asking the trainer");
  try {
    const job = await api("/api/rollback", {method: "POST", body: to === null ? {} : {to}});
    const id = job.publish_id || job.id;
    if (id) await follow(id, `Rollback to ${target}`);
    else showOperation("ok", `Rollback to ${target} started`);
  } catch (err) {
    showOperation("bad", `Rollback to ${target} failed`, err.message);
  } finally {
    button.disabled = false;
  }
}

/** Start a rollback to `version` from elsewhere (the versions table): same confirmation. */
export function rollbackTo(version) {
  const select = $("#rollback-to");
  renderRollbackOptions(store.versions);
  select.value = String(version);
  location.hash = "#fleet";
  $("#rollback-form").requestSubmit();
}

let optionsKey = "";

function renderRollbackOptions(versionsBody) {
  const select = $("#rollback-to");
  const keep = select.value;
  const committed = store.cluster && store.cluster.committed ? store.cluster.committed.version : null;
  const versions = listOf(versionsBody, "versions").filter((v) => typeof v.version === "number")
    .sort((a, b) => b.version - a.version);
  // Rebuilding the options closes an open drop-down: only do it when they change.
  const key = JSON.stringify([committed, versions.map((v) => [v.version, v.created_at])]);
  if (key === optionsKey) return;
  optionsKey = key;
  const options = [h("option", {value: ""}, "the version before the committed one")];
  for (const v of versions) {
    const label = `v${v.version} — ${v.source || v.model || ""} (${fmtTime(v.created_at)})${v.version === committed ? " · committed" : ""}`;
    options.push(h("option", {value: String(v.version), disabled: v.version === committed}, label));
  }
  fill(select, options);
  if ([...select.options].some((o) => o.value === keep && !o.disabled)) select.value = keep;
}

export function init() {
  $("#publish-form").addEventListener("submit", submitPublish);
  $("#rollback-form").addEventListener("submit", submitRollback);
  $("#publish-model").addEventListener("input", () => fieldError($("#publish-model"), $("#publish-model-error"), ""));
  for (const id of ["canary", "shadow", "step-seconds", "min-requests"]) {
    $(`#publish-${id}`).addEventListener("input", () => fieldError($(`#publish-${id}`), $(`#publish-${id}-error`), ""));
  }
  on("versions", renderRollbackOptions);
  on("cluster", () => { if (store.versions) renderRollbackOptions(store.versions); });
}

