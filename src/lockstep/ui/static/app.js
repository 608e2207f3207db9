// The page: one view at a time (by #hash), one live feed from the UI server, everything else reacts to the store.

import {$, $$} from "./dom.js";
import {set, store} from "./store.js";
import * as fleet from "./fleet.js";
import * as control from "./control.js";
import * as timeline from "./timeline.js";
import * as runs from "./runs.js";
import * as playground from "./playground.js";

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

/** The feed: EventSource reconnects by itself (the server says after 2 s) when the UI server restarts. */
function connect() {
  const source = new EventSource("/api/events");
  source.addEventListener("open", () => liveState("on", "live"));
  source.addEventListener("error", () => liveState("off", "reconnecting…"));
  for (const name of FEEDS) {
    source.addEventListener(name, (event) => {
      let data;
      try { data = JSON.parse(event.data); } catch { return; }
      if (name === "cluster") { store.receivedAt = Date.now(); liveState("on", "live"); }
      set(name, data);
    });
  }
  return source;
}

function main() {
  fleet.init();
  control.init();
  timeline.init();
  runs.init();
  playground.init();
  window.addEventListener("hashchange", route);
  route();
  // Moving to a view by keyboard puts the focus at its start.
  $$(".tabs a").forEach((a) => a.addEventListener("click", () => setTimeout(() => $("#main").focus({preventScroll: true}), 0)));
  connect();
}

main();
