// Small DOM and formatting helpers. Text always goes in as text (never as HTML), so data cannot inject markup.

export const $ = (sel, root = document) => root.querySelector(sel);
export const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));

const SVG_NS = "http://www.w3.org/2000/svg";

/** An element: h("div", {class: "x", onclick: fn}, "text", child). */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  setAttrs(el, attrs);
  append(el, children);
  return el;
}

/** An SVG element, same shape as h(). */
export function s(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  setAttrs(el, attrs);
  append(el, children);
  return el;
}

function setAttrs(el, attrs) {
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(el.dataset, value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** Replace every child of el. */
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

/** Colour of a version: v0 grey, then a fixed cycle, the same on every view. */
const PALETTE = ["#4cc2ff", "#3fb950", "#d2a8ff", "#f0883e", "#39c5cf", "#ff9bce", "#e3b341", "#a5d6ff"];
export function versionColor(v) {
  if (v === null || v === undefined || Number.isNaN(v)) return "#5c6773";
  if (v === 0) return "#8b98a5";
  return PALETTE[(v - 1) % PALETTE.length];
}

/** A "v12" chip with its colour swatch. */
export function vchip(v, extraClass = "") {
  if (v === null || v === undefined) return h("span", {class: `vchip ${extraClass}`}, "–");
  const sw = h("span", {class: "sw", "aria-hidden": "true"});
  sw.style.background = versionColor(v);
  return h("span", {class: `vchip ${extraClass}`}, sw, `v${v}`);
}

export function outcome(word) {
  const w = String(word || "unknown");
  return h("span", {class: `outcome ${w.replace(/[^a-z_-]/gi, "")}`}, w);
}

export function fmtTime(t) {
  if (!t) return "–";
  const d = new Date(t * 1000);
  return d.toLocaleTimeString([], {hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23"});
}

export function fmtDateTime(t) {
  if (!t) return "–";
  const d = new Date(t * 1000);
  return d.toLocaleString([], {month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23"});
}

export function fmtSeconds(s) {
  if (s === null || s === undefined || Number.isNaN(s)) return "–";
  if (s < 0.1) return `${(s * 1000).toFixed(s < 0.001 ? 2 : 1)} ms`;
  if (s < 1) return `${Math.round(s * 1000)} ms`;
  if (s < 120) return `${s.toFixed(s < 10 ? 2 : 1)} s`;
  return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
}

export function fmtNum(x, digits = 3) {
  if (x === null || x === undefined || Number.isNaN(Number(x))) return "–";
  const n = Number(x);
  if (Number.isInteger(n)) return String(n);
  return Math.abs(n) >= 100 ? n.toFixed(1) : n.toPrecision(digits);
}

/** A list from a body that is either a list or {key: list}. */
export function listOf(body, ...keys) {
  if (Array.isArray(body)) return body;
  for (const key of keys) if (body && Array.isArray(body[key])) return body[key];
  return [];
}

/** First letter upper-case: server messages start lower-case, banners read as sentences. */
export function sentence(text) {
  const t = String(text || "");
  return t ? t[0].toUpperCase() + t.slice(1) : t;
}

export function toast(message, kind = "") {
  const box = document.getElementById("toasts");
  const el = h("div", {class: `toast ${kind}`, role: kind === "bad" ? "alert" : "status"}, message);
  box.append(el);
  setTimeout(() => el.remove(), kind === "bad" ? 9000 : 5000);
}

/** Mark a form field invalid with a message (or clear it). */
export function fieldError(input, errorEl, message) {
  if (message) {
    input.setAttribute("aria-invalid", "true");
    errorEl.textContent = message;
  } else {
    input.removeAttribute("aria-invalid");
    errorEl.textContent = "";
  }
  return !message;
}
