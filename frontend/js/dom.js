// Element builder and formatters. Server strings (tokens, explanations, error messages) only
// ever become text nodes or attribute values here: nothing is parsed as HTML.

/**
 * Build an element: h("button", {class: "x", dataset: {testid: "y"}, onclick: fn}, "text", child).
 * Strings and numbers become text nodes; null/false children are skipped.
 */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  if (attrs) {
    for (const [name, value] of Object.entries(attrs)) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "dataset") Object.assign(el.dataset, value);
      else if (name === "class") el.className = value;
      else if (name === "style") el.style.cssText = value;
      else if (name === "text") el.textContent = value;
      else if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
      else if (name === "value") el.value = value;
      else if (name in el && typeof value !== "string") el[name] = value;
      else el.setAttribute(name, value === true ? "" : String(value));
    }
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else if (child instanceof Node) el.appendChild(child);
    else el.appendChild(document.createTextNode(String(child)));
  }
}

/** Replace every child of `el` with `children`. */
export function replace(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

/** "12.3 KiB", "1.50 GiB"; null: "?". */
export function formatBytes(bytes) {
  if (bytes === null || bytes === undefined) return "?";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return unit === 0 ? `${value} B` : `${value.toFixed(value < 10 ? 2 : 1)} ${units[unit]}`;
}

/** "<1 ms", "12 ms", "1.2 s", "2 min 5 s". */
export function formatSeconds(seconds) {
  if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return "?";
  if (seconds < 0.001) return "<1 ms";
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
  if (seconds < 60) return `${seconds.toFixed(seconds < 10 ? 1 : 0)} s`;
  const minutes = Math.floor(seconds / 60);
  return `${minutes} min ${Math.round(seconds - minutes * 60)} s`;
}

/** A number with `digits` significant digits, or "" for null. */
export function formatNumber(value, digits = 3) {
  if (value === null || value === undefined) return "";
  if (!Number.isFinite(value)) return String(value);
  const abs = Math.abs(value);
  if (abs !== 0 && (abs >= 1e5 || abs < 1e-3)) return value.toExponential(digits - 1);
  return Number(value.toPrecision(digits)).toString();
}

/** Show a token's whitespace: newlines as ↵, tabs as →; spaces stay (cells use pre). */
export function visibleToken(token) {
  return token.replace(/\n/g, "↵").replace(/\t/g, "→").replace(/\r/g, "␍");
}

/** Copy text to the clipboard (also on plain-http origins, where navigator.clipboard is absent). */
export async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    try {
      await navigator.clipboard.writeText(text);
      return true;
    } catch {
      // fall through to the selection copy (e.g. the document lost focus)
    }
  }
  const area = h("textarea", { style: "position:fixed;left:-9999px;top:0", readonly: true });
  area.value = text;
  document.body.appendChild(area);
  area.select();
  let copied = false;
  try {
    copied = document.execCommand("copy");
  } finally {
    area.remove();
  }
  return copied;
}

/** Run `work(i)` for i in [0, n) in slices of ~`budgetMs`, yielding to the browser between. */
export function runChunked(n, work, { budgetMs = 12, onDone } = {}) {
  let next = 0;
  let cancelled = false;
  const step = () => {
    if (cancelled) return;
    const until = performance.now() + budgetMs;
    while (next < n && performance.now() < until) {
      work(next);
      next += 1;
    }
    if (next < n) yieldThen(step);
    else if (onDone) onDone();
  };
  // The first slice runs in a task of its own, too: whatever led here (parsing a stream or a
  // file) has used its share of the frame.
  yieldThen(step);
  return {
    cancel() {
      cancelled = true;
    },
  };
}

const channel = new MessageChannel();
const queued = [];
channel.port1.onmessage = () => {
  const fn = queued.shift();
  if (fn) fn();
};

/** Run `fn` after the browser had a chance to paint and handle input (faster than setTimeout 0). */
function yieldThen(fn) {
  // A message task runs after pending input and rendering work, without setTimeout's clamping.
  queued.push(fn);
  channel.port2.postMessage(null);
}
