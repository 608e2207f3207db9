// Logging in: the API token is sent once and exchanged for a session cookie this page cannot read (HttpOnly).
// The session answer carries the CSRF value that every change sends back (api.js).

import {$, fieldError} from "./dom.js";
import {changeHeaders, messageOf, setCsrf} from "./api.js";

let current = null;     // the last GET /api/session answer
let listener = () => {};
let formWanted = false; // with public reads, the form shows only when asked for

/** GET /api/session: {logged_in, user, via, csrf, login_required, public_reads}. */
async function fetchSession() {
  const response = await fetch("/api/session", {credentials: "same-origin", cache: "no-store"});
  if (!response.ok) throw new Error(`the UI server answered ${response.status} for the session`);
  return response.json();
}

function render(session) {
  const loggedIn = Boolean(session.logged_in);
  const canRead = loggedIn || Boolean(session.public_reads);
  setCsrf(loggedIn ? session.csrf : "");
  if (loggedIn) formWanted = false;
  $("#login").hidden = loggedIn || (canRead && !formWanted);
  $("#main").hidden = !canRead;
  $(".tabs").hidden = !canRead;
  const user = $("#session-user");
  user.hidden = !loggedIn || session.via === "open";
  user.textContent = loggedIn ? session.user : "";
  user.title = session.via === "proxy" ? "logged in by the proxy in front of the UI" : "logged in with the API token";
  $("#logout-button").hidden = !(loggedIn && session.via === "session");
  $("#login-open").hidden = loggedIn || !canRead || !session.login_required || formWanted;
  document.body.dataset.session = loggedIn ? session.via : "none";
}

/** Ask the server who we are, show it, and tell the page. */
export async function refresh() {
  try {
    current = await fetchSession();
  } catch (err) {
    const error = $("#login-error");
    error.textContent = `The UI server did not answer (${err.message}). Is \`lockstep ui\` still running?`;
    current = {logged_in: false, login_required: true, public_reads: false};
  }
  render(current);
  listener(current);
  return current;
}

async function submit(event) {
  event.preventDefault();
  const input = $("#login-token"), error = $("#login-error");
  input.removeAttribute("aria-invalid");
  error.textContent = "";
  if (!input.value.trim()) { fieldError(input, error, "Enter the API token."); input.focus(); return; }
  $("#login-submit").disabled = true;
  try {
    const response = await fetch("/api/login", {method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({token: input.value}), credentials: "same-origin"});
    let data = null;
    try { data = await response.json(); } catch { /* not JSON: the status says enough */ }
    if (!response.ok) {
      fieldError(input, error, messageOf(data) || `${response.status} ${response.statusText}`);
      input.select();
      return;
    }
    input.value = "";  // the token does not stay in the page
    current = data;
    render(current);
    listener(current);
  } catch (err) {
    error.textContent = `The UI server did not answer (${err.message}).`;
  } finally {
    $("#login-submit").disabled = false;
  }
}

async function logout() {
  try {
    await fetch("/api/logout", {method: "POST", headers: changeHeaders(false), credentials: "same-origin"});
  } finally {
    await refresh();
  }
}

/** Wire the form and the buttons; `onSession(session)` hears every change of who is logged in. */
export function init(onSession) {
  listener = onSession;
  $("#login-form").addEventListener("submit", submit);
  $("#logout-button").addEventListener("click", logout);
  $("#login-open").addEventListener("click", () => {
    formWanted = true;
    render(current || {logged_in: false, login_required: true, public_reads: true});
    $("#login-token").focus();
  });
}
