// Start the page: one store, one API client, the views, then the first refresh.
import { createActions } from "./actions.js";
import { createApi } from "./api.js";
import { installSalienceStyles } from "./colour.js";
import { h, replace } from "./dom.js";
import { mountAnalysis } from "./analysis.js";
import { mountInput } from "./input.js";
import { loadKey, loadUi } from "./persist.js";
import { createStore, initialState } from "./store.js";
import { mountSwitcher } from "./switcher.js";
import { mountTabs } from "./tabs.js";

function mountAuth(root, store, actions) {
  const { auth } = store.state;
  const key = h("input", {
    type: "password",
    autocomplete: "off",
    placeholder: "API key (if the server needs one)",
    "aria-label": "API key",
    dataset: { testid: "api-key-input" },
    value: auth.key,
  });
  const remember = h("input", { type: "checkbox", checked: auth.remember, dataset: { testid: "api-key-remember" } });
  const prompt = h("span", { class: "key-prompt", dataset: { testid: "key-prompt" }, role: "status" });
  function save() {
    actions.setKey(key.value.trim(), remember.checked);
  }
  root.addEventListener("submit", (event) => {
    event.preventDefault();
    save();
  });
  // A hidden user name keeps the browser's password manager from guessing one.
  root.append(
    h("input", { type: "text", autocomplete: "username", hidden: true, "aria-hidden": "true", tabindex: "-1" }),
    key,
    h("label", { class: "inline", title: "Keep the key in this browser's local storage; otherwise only for this tab" }, remember, " remember"),
    h("button", { type: "submit", dataset: { testid: "api-key-save" } }, "Use key"),
    prompt,
  );
  store.subscribe(["auth"], (state) => {
    const needs = state.auth.required;
    prompt.textContent = needs
      ? state.auth.key ? "The server refused this key (401)." : "This server needs an API key (401)."
      : state.auth.key ? `key set (${state.auth.remember ? "remembered" : "this tab only"})` : "";
    prompt.classList.toggle("warning", needs);
    root.classList.toggle("needs-key", needs);
    if (needs && document.activeElement === document.body) key.focus();
  });
}

function mountConnection(root, store) {
  const render = (state) => {
    const c = state.connection;
    root.dataset.ok = String(c.ok);
    replace(root, c.ok ? "connected" : `server unreachable: ${c.message} (retrying)`);
  };
  store.subscribe(["connection"], render);
  render(store.state);
}

function makeToast(root) {
  let timer = null;
  return (text) => {
    root.textContent = text;
    root.hidden = false;
    clearTimeout(timer);
    timer = setTimeout(() => {
      root.hidden = true;
    }, 1800);
  };
}

function start() {
  installSalienceStyles();
  const state = initialState();
  Object.assign(state.auth, loadKey());
  Object.assign(state.ui.columns, loadUi().columns || {});
  const store = createStore(state);
  const api = createApi({ getKey: () => store.state.auth.key });
  const actions = createActions(store, api);
  const toast = makeToast(document.getElementById("toast"));
  mountAuth(document.getElementById("auth"), store, actions);
  mountConnection(document.getElementById("connection"), store);
  mountSwitcher(document.getElementById("switcher"), store, actions);
  mountInput(document.getElementById("input"), store, actions);
  mountTabs(document.getElementById("tabs"), store, actions);
  mountAnalysis(document.getElementById("analysis"), store, actions, { toast });
  actions.restoreTabs();
  actions.startPolling();
  document.body.dataset.ready = "true";
}

start();
