// The analysis panel of the active tab: what was asked and how it ran, progress with cancel,
// its error, the view switch (table / transposed / full text), column toggles, the legend and
// export. The body is rebuilt only when the rows or the view change.
import { copyText, formatSeconds, h, replace } from "./dom.js";
import { legend, salienceDomain, SALIENCE_HELP } from "./colour.js";
import { renderCompare } from "./compare.js";
import { renderFullText } from "./fulltext.js";
import { errorBox } from "./notices.js";
import { applyColumns, availableColumns, COLUMNS, renderTable } from "./table.js";
import { renderTransposed } from "./transposed.js";

const VIEWS = [
  { view: "table", label: "Table", testid: "view-table" },
  { view: "transposed", label: "Transposed", testid: "view-transposed" },
  { view: "fulltext", label: "Full text", testid: "view-fulltext" },
];

function inputSummary(request) {
  if (!request) return "";
  if (request.text !== undefined) return request.text;
  return (request.messages || []).map((m) => `${m.role}: ${m.content}`).join("\n");
}

function metaLine(tab) {
  const m = tab.meta || {};
  const parts = [];
  if (tab.lensId) parts.push(`lens ${tab.lensId}`);
  if (m.group_id || tab.groupId) parts.push(`group ${m.group_id || tab.groupId}`);
  if (m.layer !== undefined) parts.push(`layer ${m.layer}`);
  if (m.replica_id) parts.push(`replica ${m.replica_id}`);
  if (m.switch) parts.push(`switch ${m.switch.kind} ${formatSeconds(m.switch.seconds)}`);
  if (m.timings?.total_seconds !== undefined) parts.push(`analysis ${formatSeconds(m.timings.total_seconds)}`);
  if (m.n_tokens !== undefined) parts.push(`${m.n_tokens} tokens`);
  if (m.options?.seed !== undefined && m.options?.seed !== null) parts.push(`seed ${m.options.seed}`);
  if (m.options?.temperature !== undefined) parts.push(`temperature ${m.options.temperature}`);
  if (tab.source) parts.push(`imported from ${tab.source.file}`);
  return parts.join(" · ");
}

/** The progress row of a running tab: built once per run, then updated in place (a cancel
 *  button that is re-created under the pointer would swallow the click). */
function progressRow(tab, actions) {
  const fill = h("div", { class: "progress-fill" });
  const label = h("span", { class: "progress-label" });
  const bar = h(
    "div",
    {
      class: "progress",
      role: "progressbar",
      "aria-label": "analysis progress",
      "aria-valuemin": "0",
      dataset: { testid: "progress" },
    },
    fill,
    label,
  );
  const idle = h("span", { class: "idle", dataset: { testid: "idle" } });
  const cancel = h(
    "button",
    {
      type: "button",
      dataset: { testid: "cancel-button" },
      "aria-label": `cancel the analysis ${tab.title}`,
      onclick: () => actions.cancel(tab.id),
    },
    "Cancel",
  );
  const row = h("div", { class: "progress-row" }, bar, idle, cancel);
  row.update = (t) => {
    const { done, total } = t.progress;
    const elapsed = t.startedAt ? (Date.now() - t.startedAt) / 1000 : 0;
    fill.style.width = `${((total ? done / total : 0) * 100).toFixed(1)}%`;
    label.textContent = total
      ? `${done} / ${total} positions · ${formatSeconds(elapsed)}`
      : `waiting for the lens (a switch or a cold start may come first) · ${formatSeconds(elapsed)}`;
    bar.setAttribute("aria-valuemax", String(total || 0));
    bar.setAttribute("aria-valuenow", String(done));
    bar.dataset.done = String(done);
    bar.dataset.total = String(total ?? "");
    idle.textContent = t.idleSeconds >= 5 ? `no data for ${t.idleSeconds} s` : "";
  };
  row.update(tab);
  return row;
}

function columnToggles(state, available, actions) {
  return h(
    "fieldset",
    { class: "columns" },
    h("legend", null, "columns"),
    COLUMNS.map((c) => {
      const has = available.includes(c.name);
      return h(
        "label",
        { class: "inline", title: has ? "" : "not computed: enable it in the options" },
        h("input", {
          type: "checkbox",
          checked: state.ui.columns[c.name] !== false && has,
          disabled: !has,
          dataset: { testid: `column-${c.name}` },
          onchange: (event) => actions.setColumn(c.name, event.target.checked),
        }),
        ` ${c.label}`,
      );
    }),
  );
}

function visibleColumns(state, available) {
  return available.filter((name) => state.ui.columns[name] !== false);
}

/** Mount the panel into `root`; it follows the active tab (or the comparison). */
export function mountAnalysis(root, store, actions, { toast }) {
  const head = h("div", { class: "analysis-head" });
  const body = h("div", { class: "analysis-body" });
  root.append(head, body);
  let shown = { tabId: null, rows: null, view: null, compare: null };
  let rendering = null;
  let unsubscribe = () => {};

  const regions = {
    title: h("div", { class: "analysis-title" }),
    meta: h("p", { class: "meta-line", dataset: { testid: "meta-line" } }),
    input: h("div"),
    progress: h("div"),
    note: h("div"),
    error: h("div"),
    toolbar: h("div"),
  };
  head.append(...Object.values(regions));
  let progress = null; // the progress row and the run it shows

  function renderProgress(tab) {
    const running = tab && (tab.status === "running" || tab.status === "queued");
    if (!running) {
      progress = null;
      replace(regions.progress);
      return;
    }
    if (!progress || progress.tabId !== tab.id || progress.startedAt !== tab.startedAt) {
      progress = { tabId: tab.id, startedAt: tab.startedAt, row: progressRow(tab, actions) };
      replace(regions.progress, progress.row);
    }
    progress.row.update(tab);
  }

  function renderHead(state, tab) {
    renderProgress(tab);
    if (!tab) {
      for (const region of Object.values(regions)) replace(region);
      replace(regions.note, h("p", { class: "muted empty" }, "No analysis yet: pick a lens, enter a text and press Analyse. Saved analyses can be imported from a .jsonl file."));
      return;
    }
    replace(
      regions.title,
      h("h2", null, tab.title),
      h("span", { class: `status status-${tab.status}`, dataset: { testid: "tab-status" } }, tab.status),
    );
    regions.meta.textContent = metaLine(tab);
    replace(regions.input, h("details", { class: "input-summary" }, h("summary", null, "input"), h("pre", null, inputSummary(tab.request))));
    replace(
      regions.note,
      tab.status === "cancelled"
        ? h("p", { class: "muted", dataset: { testid: "cancelled-note" } }, `Cancelled after ${tab.progress.done} of ${tab.progress.total ?? "?"} positions.`)
        : null,
    );
    replace(
      regions.error,
      tab.error
        ? errorBox(tab.error, {
            context: `analysing with lens ${tab.lensId}`,
            onRetry: tab.request ? () => actions.rerun(tab.id) : null,
            onKey: () => document.querySelector("[data-testid=api-key-input]")?.focus(),
          })
        : null,
    );
    const canRerun = tab.request && tab.lensId && tab.status !== "running" && tab.status !== "queued";
    replace(
      regions.toolbar,
      tab.rows.length ? toolbar(state, tab) : null,
      canRerun
        ? h("button", { type: "button", class: "rerun", dataset: { testid: "rerun-button" }, onclick: () => actions.rerun(tab.id) }, "Run again")
        : null,
    );
  }

  function toolbar(state, tab) {
    const available = availableColumns(tab.rows);
    return h(
      "div",
      { class: "toolbar" },
      h(
        "div",
        { class: "views", role: "group", "aria-label": "view" },
        VIEWS.map((v) =>
          h(
            "button",
            {
              type: "button",
              "aria-pressed": String(tab.view === v.view),
              dataset: { testid: v.testid },
              onclick: () => actions.setView(tab.id, v.view === "transposed" && tab.view === "transposed" ? "table" : v.view),
            },
            v.label,
          ),
        ),
      ),
      tab.view === "table" ? columnToggles(state, available, actions) : null,
      h(
        "div",
        { class: "exports" },
        h("button", { type: "button", dataset: { testid: "export-button" }, onclick: () => actions.exportTab(tab.id, "jsonl"), title: "request, meta and rows, one JSON object per line" }, "Export JSONL"),
        h("button", { type: "button", dataset: { testid: "export-csv-button" }, onclick: () => actions.exportTab(tab.id, "csv") }, "Export CSV"),
      ),
      tab.rows.some((r) => Array.isArray(r.token_salience))
        ? legend(salienceDomain(tab.rows))
        : h("span", { class: "muted small", title: SALIENCE_HELP }, "salience not computed"),
      h("span", { class: "muted small" }, "Click a cell to copy it."),
    );
  }

  function renderBody(state, tab) {
    if (rendering) rendering.cancel();
    rendering = null;
    replace(body);
    if (!tab || !tab.rows.length) return;
    const domain = salienceDomain(tab.rows);
    const onRendered = (ms) => {
      body.dataset.renderMs = ms.toFixed(1);
      performance.measure?.("lens-render", { start: performance.now() - ms, duration: ms });
    };
    if (tab.view === "transposed") rendering = renderTransposed(body, tab.rows, { domain, onRendered });
    else if (tab.view === "fulltext") rendering = renderFullText(body, tab.rows, { domain, onRendered });
    else {
      const available = availableColumns(tab.rows);
      rendering = renderTable(body, tab.rows, {
        domain,
        columns: visibleColumns(state, available),
        onRendered,
        onCopy: async (text, target) => {
          const ok = await copyText(text);
          target.classList.add("copied");
          setTimeout(() => target.classList.remove("copied"), 600);
          toast(ok ? `Copied: ${text.slice(0, 60)}` : "Copy failed: select the text instead");
        },
      });
    }
  }

  function renderCompareView(state) {
    const a = state.tabs.find((t) => t.id === state.compare.a);
    const b = state.tabs.find((t) => t.id === state.compare.b);
    if (rendering) rendering.cancel();
    renderProgress(null);
    for (const region of Object.values(regions)) replace(region);
    replace(body);
    if (!a || !b) return;
    rendering = renderCompare(body, a, b, { onClose: () => actions.compare(null, null) });
  }

  function render(state) {
    if (state.compare) {
      const key = `${state.compare.a}|${state.compare.b}`;
      if (shown.compare !== key) {
        shown = { tabId: null, rows: null, view: null, compare: key };
        unsubscribe();
        unsubscribe = () => {};
        renderCompareView(state);
      }
      return;
    }
    const tab = state.tabs.find((t) => t.id === state.activeTabId) || null;
    if (!tab || shown.tabId !== tab.id) {
      unsubscribe();
      unsubscribe = tab
        ? store.subscribe([`tab:${tab.id}`, `progress:${tab.id}`], (s, topic) => {
            if (topic.startsWith("progress:")) renderProgress(tab);
            else render(s);
          })
        : () => {};
    }
    renderHead(state, tab);
    if (!tab || shown.tabId !== tab.id || shown.rows !== tab.rows || shown.view !== tab.view || shown.compare) {
      renderBody(state, tab);
      shown = { tabId: tab?.id ?? null, rows: tab?.rows ?? null, view: tab?.view ?? null, compare: null };
    }
  }

  store.subscribe(["tabs"], render);
  store.subscribe(["ui"], (state) => {
    const tab = state.tabs.find((t) => t.id === state.activeTabId);
    const table = body.querySelector(".result-table");
    if (tab && table) applyColumns(table, visibleColumns(state, availableColumns(tab.rows)));
  });
  render(store.state);

  // The elapsed time on a running analysis moves even when no event arrives.
  setInterval(() => {
    const tab = store.state.tabs.find((t) => t.id === store.state.activeTabId);
    if (tab && tab.status === "running" && !store.state.compare) renderProgress(tab);
  }, 1000);
}
