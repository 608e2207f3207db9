// Playground: a prompt in, a streamed answer out, with the version and the replica that produced it.

import {$, h, fill, vchip, fieldError} from "./dom.js";
import {changeHeaders, loggedOut, messageOf, readEvents} from "./api.js";
import {on} from "./store.js";

const KEEP = 12; // earlier answers kept on the page
let controller = null;

function chip(...children) { return h("span", {class: "chip"}, ...children); }

function renderMeta(meta) {
  const items = [];
  if (meta.version !== undefined && meta.version !== null) items.push(h("span", {class: "chip", "data-field": "version"}, vchip(meta.version, "small")));
  if (meta.replica_id) items.push(chip(h("span", {class: "muted"}, "replica"), h("b", {"data-field": "replica"}, meta.replica_id)));
  if (meta.via) items.push(chip(h("span", {class: "muted"}, "via"), meta.via));
  fill($("#play-meta"), items);
}

function validate() {
  const prompt = $("#play-prompt"), maxTokens = $("#play-max-tokens"), temperature = $("#play-temperature");
  const err = $("#play-error");
  const text = prompt.value;
  const mt = Number(maxTokens.value), temp = Number(temperature.value);
  const checks = [
    [prompt, !text.trim() ? "Write a prompt first." : text.length > 8000 ? "A prompt is at most 8000 characters." : ""],
    [maxTokens, maxTokens.value.trim() === "" || !Number.isInteger(mt) || mt < 1 || mt > 1024
      ? "Max tokens: a whole number from 1 to 1024." : ""],
    [temperature, temperature.value.trim() === "" || !Number.isFinite(temp) || temp < 0 || temp > 2
      ? "Temperature: a number from 0 to 2." : ""],
  ];
  for (const [el] of checks) el.removeAttribute("aria-invalid");
  err.textContent = "";
  for (const [el, message] of checks) {
    if (message) { fieldError(el, err, message); el.focus(); return null; }
  }
  const body = {prompt: text, max_tokens: mt, temperature: temp};
  const replica = $("#play-target").value;
  if (replica) body.replica = replica;
  return body;
}

function remember(prompt, text, meta, failed) {
  const list = $("#play-history");
  $("#play-history-empty").hidden = true;
  const who = h("div", {class: "who"},
    meta.version !== undefined && meta.version !== null ? vchip(meta.version, "small") : h("span", {class: "muted"}, "no version"),
    h("span", {class: "muted small"}, meta.replica_id ? `${meta.replica_id} · ${meta.via || ""}` : meta.via || ""));
  list.prepend(h("li", {class: failed ? "failed" : ""}, who,
    h("div", {class: "text"}, h("span", {class: "prompt"}, prompt.length > 160 ? prompt.slice(0, 160) + "…" : prompt), text)));
  while (list.children.length > KEEP) list.lastElementChild.remove();
}

async function send(event) {
  event.preventDefault();
  const body = validate();
  if (!body) return;
  const out = $("#play-output"), foot = $("#play-foot");
  out.textContent = "";
  out.className = "answer streaming";
  fill($("#play-meta"));
  foot.textContent = "";
  $("#play-send").disabled = true;
  $("#play-stop").disabled = false;
  controller = new AbortController();
  const started = performance.now();
  let meta = {}, text = "", tokens = 0, failed = false, finish = null;
  try {
    const response = await fetch("/api/playground", {method: "POST", headers: changeHeaders(true),
      body: JSON.stringify(body), signal: controller.signal, credentials: "same-origin"});
    if (response.status === 401) loggedOut();
    if (!response.ok) {
      let data = null;
      try { data = await response.json(); } catch { /* not JSON */ }
      throw new Error(messageOf(data) || `${response.status} ${response.statusText}`);
    }
    await readEvents(response, (name, data) => {
      if (name === "meta") { meta = data; renderMeta(meta); }
      else if (name === "token") { text += data.text; tokens += 1; out.textContent = text; }
      else if (name === "done") { finish = data.finish_reason; }
      else if (name === "error") { failed = true; text += (text ? "\n" : "") + data.message; out.textContent = text; }
    }, controller.signal);
  } catch (err) {
    failed = true;
    if (err.name === "AbortError") { text += text ? " [stopped]" : "[stopped]"; failed = false; }
    else text = err.name === "TypeError" ? `The UI server did not answer (${err.message}).` : err.message;
    out.textContent = text;
  } finally {
    out.className = "answer" + (failed ? " failed" : "");
    out.dataset.done = "true";
    $("#play-send").disabled = false;
    $("#play-stop").disabled = true;
    const secs = (performance.now() - started) / 1000;
    foot.textContent = failed ? "" : `${tokens} chunks in ${secs.toFixed(2)} s${finish ? ` · finished: ${finish}` : ""}`;
    remember(body.prompt, text, meta, failed);
    controller = null;
  }
}

let targetsKey = "";

function renderTargets(cluster) {
  const select = $("#play-target");
  const replicas = (cluster.replicas || []).filter((r) => r.url);
  const key = JSON.stringify(replicas.map((r) => [r.replica_id, r.ready]));
  if (key === targetsKey) return; // rebuilding would close an open drop-down
  targetsKey = key;
  const keep = select.value;
  fill(select, h("option", {value: ""}, "round robin"),
    replicas.map((r) => h("option", {value: String(r.replica_id)}, `${r.replica_id}${r.ready ? "" : " (not ready)"}`)));
  if ([...select.options].some((o) => o.value === keep)) select.value = keep;
}

export function init() {
  $("#play-form").addEventListener("submit", send);
  $("#play-stop").addEventListener("click", () => controller && controller.abort());
  $("#play-form").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); $("#play-form").requestSubmit(); }
  });
  on("cluster", renderTargets);
}
