// The tab bar (issue 10 §4): one tab per analysis with its state and progress, rename
// (double-click or the pencil), close, compare two, import a saved analysis.
import { h, replace } from "./dom.js";
import { errorBox } from "./notices.js";

const STATE_MARK = { queued: "…", running: "", done: "✓", error: "✗", cancelled: "■", interrupted: "!" };

function tabState(tab) {
  if (tab.status === "running") {
    const { done, total } = tab.progress;
    return total ? `${Math.floor((100 * done) / total)}%` : "…";
  }
  return STATE_MARK[tab.status] ?? "";
}

export function mountTabs(root, store, actions) {
  const list = h("div", { class: "tab-list", role: "tablist", "aria-label": "analyses" });
  const tools = h("div", { class: "tab-tools" });
  const comparePicker = h("div", { class: "compare-picker", hidden: true });
  const importError = h("div");
  root.append(h("div", { class: "tab-bar" }, list, tools), comparePicker, importError);
  let renaming = null;

  const importInput = h("input", {
    type: "file",
    accept: ".jsonl,.ndjson,.json,application/json",
    class: "visually-hidden",
    id: "import-input",
    dataset: { testid: "import-input" },
    onchange: async (event) => {
      for (const file of event.target.files) await actions.importFile(file);
      event.target.value = "";
    },
  });
  tools.append(
    h("button", {
      type: "button",
      dataset: { testid: "compare-button" },
      onclick: () => {
        comparePicker.hidden = !comparePicker.hidden;
        renderPicker(store.state);
      },
    }, "Compare…"),
    h("label", { class: "button-like", for: "import-input", title: "Open a saved .jsonl analysis as a tab" }, "Import…", importInput),
  );

  function renderPicker(state) {
    if (comparePicker.hidden) return;
    const done = state.tabs.filter((t) => t.rows.length);
    const select = (testid, label, index) =>
      h(
        "select",
        { "aria-label": label, dataset: { testid } },
        done.map((t, i) => h("option", { value: t.id, selected: i === index }, t.title)),
      );
    const a = select("compare-a", "first analysis", done.length - 2);
    const b = select("compare-b", "second analysis", done.length - 1);
    replace(
      comparePicker,
      done.length < 2
        ? h("span", { class: "muted" }, "Compare needs two finished analyses.")
        : [
            "Compare ", a, " with ", b, " ",
            h("button", {
              type: "button",
              dataset: { testid: "compare-show" },
              onclick: () => {
                actions.compare(a.value, b.value);
                comparePicker.hidden = true;
              },
            }, "Show"),
          ],
    );
  }

  function startRename(tab, titleEl) {
    renaming = tab.id;
    const input = h("input", {
      type: "text",
      value: tab.title,
      "aria-label": "tab name",
      dataset: { testid: "tab-title-input" },
      onkeydown: (event) => {
        if (event.key === "Enter") input.blur();
        if (event.key === "Escape") {
          input.value = tab.title;
          input.blur();
        }
      },
      onblur: () => {
        renaming = null;
        actions.rename(tab.id, input.value);
        render(store.state);
      },
    });
    titleEl.replaceWith(input);
    input.focus();
    input.select();
  }

  function tabElement(state, tab) {
    const selected = !state.compare && state.activeTabId === tab.id;
    const title = h("span", { class: "tab-title" }, tab.title);
    const mark = h("span", { class: "tab-state", dataset: { testid: "tab-state" } }, tabState(tab));
    const bar = h("span", { class: "tab-progress", dataset: { testid: "tab-progress" } });
    if (tab.status === "running" && tab.progress.total) {
      bar.style.width = `${(100 * tab.progress.done) / tab.progress.total}%`;
    }
    return h(
      "div",
      { class: `tab status-${tab.status}${selected ? " active" : ""}`, dataset: { testid: "tab", tabId: tab.id, status: tab.status } },
      h(
        "button",
        {
          type: "button",
          role: "tab",
          class: "tab-main",
          "aria-selected": String(selected),
          onclick: () => actions.activate(tab.id),
          ondblclick: () => startRename(tab, title),
        },
        title,
        " ",
        mark,
        bar,
      ),
      h("button", { type: "button", class: "tab-icon", "aria-label": `rename ${tab.title}`, dataset: { testid: "tab-rename" }, onclick: () => startRename(tab, title) }, "✎"),
      h("button", { type: "button", class: "tab-icon", "aria-label": `close ${tab.title}`, dataset: { testid: "tab-close" }, onclick: () => actions.close(tab.id) }, "×"),
    );
  }

  function render(state) {
    if (renaming) return;
    replace(list, state.tabs.map((t) => tabElement(state, t)));
    renderPicker(state);
  }

  /** Progress and state marks change often: update them in place. */
  function renderStates(state) {
    if (renaming) return;
    for (const tab of state.tabs) {
      const el = list.querySelector(`[data-tab-id="${CSS.escape(tab.id)}"]`);
      if (!el) return render(state);
      if (el.dataset.status !== tab.status) {
        el.replaceWith(tabElement(state, tab));
        continue;
      }
      el.querySelector("[data-testid=tab-state]").textContent = tabState(tab);
      const bar = el.querySelector("[data-testid=tab-progress]");
      bar.style.width = tab.status === "running" && tab.progress.total ? `${(100 * tab.progress.done) / tab.progress.total}%` : "0";
    }
  }

  store.subscribe(["tabs"], render);
  store.subscribe(["tabstate"], renderStates);
  store.subscribe(["import"], (state) => {
    replace(importError, state.importError ? errorBox(state.importError, { context: "importing a saved analysis" }) : null);
  });
  render(store.state);
}
