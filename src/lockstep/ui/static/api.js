// Calls to the UI server's /api. Errors come back as Error objects whose message is plain words.
// Every change carries the CSRF value the login gave this page: a page on another site can neither read it nor
// send the header, so it cannot act with the operator's session.

export const CSRF_HEADER = "X-Lockstep-CSRF";
let csrf = "";

/** Keep the CSRF value of the current login (empty when logged out). */
export function setCsrf(value) { csrf = value || ""; }

/** The headers of a change (POST): the CSRF value, and the JSON type when there is a body. */
export function changeHeaders(withBody) {
  const headers = {[CSRF_HEADER]: csrf};
  if (withBody) headers["Content-Type"] = "application/json";
  return headers;
}

/** Tell the page the session is gone (expired, logged out elsewhere, the UI server restarted). */
export function loggedOut() { window.dispatchEvent(new CustomEvent("lockstep:logged-out")); }

export function messageOf(body) {
  if (body && typeof body === "object") {
    if (body.error && typeof body.error.message === "string") return body.error.message;
    if (typeof body.detail === "string") return body.detail;
  }
  return null;
}

export async function api(path, {method = "GET", body} = {}) {
  let response;
  try {
    response = await fetch(path, {
      method,
      headers: method === "GET" ? {} : changeHeaders(body !== undefined),
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "same-origin",
    });
  } catch (err) {
    throw new Error(`The UI server did not answer (${err.message}). Is \`lockstep ui\` still running?`);
  }
  let data = null;
  try { data = await response.json(); } catch { /* not JSON: the status says enough */ }
  if (response.status === 401) loggedOut();
  if (!response.ok) {
    const error = new Error(messageOf(data) || `${response.status} ${response.statusText || "error"}`);
    error.status = response.status; // a 404 can mean "none yet" rather than a failure (GET /api/rollout)
    throw error;
  }
  return data;
}

/** Read a text/event-stream body: calls onEvent(name, data) for every event until the stream ends. */
export async function readEvents(response, onEvent, signal) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    if (signal && signal.aborted) { await reader.cancel(); return; }
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
      }
      if (data.length) onEvent(name, JSON.parse(data.join("\n")));
    }
  }
}
