// How an API error is shown (issue 10 §5): status, code and message next to what caused it,
// with what to do (a key for 401, a countdown for 429/503) and the detail on demand.
import { h } from "./dom.js";

const HINTS = {
  401: "This server needs an API key: enter it at the top of the page.",
  403: "This key may not do that.",
  404: "The id is unknown to the server (the group files may have changed).",
  409: "The lens cannot be served as it is (its checkpoint or donor failed to load).",
  413: "The input is longer than the server accepts.",
  422: "The request was refused: check the options.",
  429: "Too many requests for this key.",
  499: "The request was cancelled.",
  503: "The server is busy or out of memory.",
  504: "The server did not answer in time.",
  0: "Check that the server is running and reachable.",
};

/** Plain data of any thrown value (ApiError or a bug), for the store. */
export function errorData(exc) {
  if (exc && typeof exc.toJSON === "function" && "code" in exc) return exc.toJSON();
  return {
    status: 0,
    code: "page_error",
    message: String((exc && exc.message) || exc),
    detail: {},
    retryAfterSeconds: null,
  };
}

/**
 * An error box. `context`: what was being done ("analysing with lens x");
 * `onRetry`: a retry action (offered for 429/503/504 and network failures);
 * `onKey`: focus the key field (offered for 401).
 */
export function errorBox(error, { context, onRetry, onKey } = {}) {
  const status = error.status || 0;
  const title = status ? `${status} ${error.code}` : error.code;
  const box = h(
    "div",
    {
      class: "error-box",
      role: "alert",
      dataset: { testid: "error", code: error.code, status: String(status) },
    },
    h("strong", { class: "error-title" }, title),
    " ",
    h("span", { class: "error-message" }, error.message),
    context ? h("div", { class: "error-context" }, `while ${context}`) : null,
  );
  const hint = HINTS[status];
  if (hint) box.appendChild(h("div", { class: "error-hint" }, hint));
  if (status === 401 && onKey) {
    box.appendChild(h("button", { type: "button", onclick: onKey }, "Enter API key"));
  }
  const retryable = [0, 429, 503, 504].includes(status) || error.code === "stream_ended";
  if (retryable && onRetry) box.appendChild(retryButton(error, onRetry));
  if (error.detail && Object.keys(error.detail).length > 0) {
    box.appendChild(
      h(
        "details",
        { class: "error-detail" },
        h("summary", null, "detail"),
        h("pre", null, JSON.stringify(error.detail, null, 2)),
      ),
    );
  }
  return box;
}

/** A retry button that counts down Retry-After before it is enabled. */
function retryButton(error, onRetry) {
  const wait = Number(error.retryAfterSeconds) || 0;
  const button = h("button", { type: "button", class: "retry", onclick: onRetry }, "Retry");
  if (wait <= 0) return button;
  const until = Date.now() + wait * 1000;
  const note = h("span", { class: "retry-after", dataset: { testid: "retry-after" } });
  const tick = () => {
    const left = Math.ceil((until - Date.now()) / 1000);
    if (left > 0) {
      note.textContent = ` retry in ${left} s`;
      button.disabled = true;
      if (button.isConnected || left === Math.ceil(wait)) setTimeout(tick, 250);
    } else {
      note.textContent = "";
      button.disabled = false;
    }
  };
  tick();
  return h("span", null, button, note);
}
