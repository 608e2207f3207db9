// The page: a login first (unless reads are public), then one view at a time (by #hash), one live feed from the
// UI server; everything else reacts to the store.

import {$, $$} from "./dom.js";
import {set, store} from "./store.js";
import * as fleet from "./fleet.js";
import * as control from "./control.js";
import * as rollout from "./rollout.js";
import * as timeline from "./timeline.js";
import * as runs from "./runs.js";
import * as playground from "./playground.js";
import * as login from "./login.js";

const VIEWS = ["fleet", "timeline", "runs", "playground"];
const FEEDS = ["cluster", "runs", "publishes", "history", "versions"];

function route() {
  const wanted = location.hash.replace("#", "");
  const view = VIEWS.includes(wanted) ? wanted : "fleet";
  for (const name of VIEWS) {
    $(`#view-${name}`).hidden = name !== view;
    const tab = $(`#tab-${name}`);
    if (name === view) tab.setAttribute("aria-current", "page");
    else tab.removeAttribute("aria-current");
  }
  document.title = `Lockstep · ${$(`#tab-${view}`).textContent}`;
}

function liveState(kind, text) {
  const live = $("#live-status");
  live.className = `live ${kind}`;
  $(".live-text", live).textContent = text;
}

let source = null;

/** The feed: EventSource reconnects by itself (the server says after 2 s) when the UI server restarts. */
function connect() {
  if (source) return;
  source = new EventSource("/api/events");
  source.addEventListener("open", () => liveState("on", "live"));
  source.addEventListener("error", () => {
    liveState("off", "reconnecting…");
    // Closed for good: the server refused the stream (401: the session ended). Ask who we are now.
    if (source && source.readyState === EventSource.CLOSED) { source = null; login.refresh(); }
  });
  for (const name of FEEDS) {
    source.addEventListener(name, (event) => {
      let data;
      try { data = JSON.parse(event.data); } catch { return; }
      if (name === "cluster") { store.receivedAt = Date.now(); liveState("on", "live"); }
      set(name, data);
    });
  }
}

function disconnect() {
  if (source) { source.close(); source = null; }
  liveState("off", "logged out");
}

/** Who is logged in changed: the feed runs only while this page may read. */
function onSession(session) {
  if (session.logged_in || session.public_reads) connect();
  else disconnect();
}

function main() {
  fleet.init();
  control.init();
  rollout.init();
  timeline.init();
  runs.init();
  playground.init();
  login.init(onSession);
  window.addEventListener("hashchange", route);
  window.addEventListener("lockstep:logged-out", () => login.refresh());
  route();
  // Moving to a view by keyboard puts the focus at its start.
  $$(".tabs a").forEach((a) => a.addEventListener("click", () => setTimeout(() => $("#main").focus({preventScroll: true}), 0)));
  login.refresh();
}

main();
