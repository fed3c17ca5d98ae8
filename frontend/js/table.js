// The per-token analysis table (issue 10 §3): one row per token, columns that can be hidden,
// explanation words coloured by salience, click-to-copy cells. Rows are built in slices that
// yield to the browser (dom.runChunked) into blocks with `content-visibility: auto`, so 2,000
// rows render in well under a second and only the blocks on screen are laid out.
import { formatNumber, h, runChunked, visibleToken } from "./dom.js";
import { appendWords, explanationText } from "./words.js";

export const COLUMNS = [
  { name: "position", label: "#", width: "3.5rem", copy: (r) => String(r.position) },
  { name: "token", label: "token", width: "minmax(5rem, 10rem)", copy: (r) => r.token },
  { name: "explanation", label: "explanation", width: "minmax(12rem, 3fr)", copy: explanationText },
  { name: "mse", label: "mse", width: "5.5rem", copy: (r) => String(r.mse), numeric: true },
  { name: "relative_rmse", label: "rel. rmse", width: "5.5rem", copy: (r) => String(r.relative_rmse), numeric: true },
  { name: "kl", label: "KL", width: "5rem", copy: (r) => String(r.kl ?? ""), numeric: true, optional: "kl" },
  {
    name: "logit_lens",
    label: "logit lens top",
    width: "minmax(8rem, 2fr)",
    copy: (r) => (r.logit_lens_top || []).map((e) => e.token).join(" "),
    optional: "logit_lens_top",
  },
];

// Small blocks: a block scrolled into view is laid out in one go (content-visibility), so
// 25 rows keep each scroll frame short; bench/render.py compares block sizes.
const ROWS_PER_BLOCK = 25;

/** Which optional columns the rows carry. */
export function availableColumns(rows) {
  const has = { kl: false, logit_lens_top: false };
  for (const row of rows) {
    if (row.kl !== undefined && row.kl !== null) has.kl = true;
    if (Array.isArray(row.logit_lens_top)) has.logit_lens_top = true;
    if (has.kl && has.logit_lens_top) break;
  }
  return COLUMNS.filter((c) => !c.optional || has[c.optional]).map((c) => c.name);
}

/** The CSS grid columns of the visible columns. */
export function gridColumns(visible) {
  return COLUMNS.filter((c) => visible.includes(c.name)).map((c) => c.width).join(" ");
}

function cell(name, text, numeric) {
  const el = document.createElement("div");
  el.className = numeric ? `cell c-${name} num` : `cell c-${name}`;
  el.setAttribute("role", "cell");
  if (text !== null) el.textContent = text;
  return el;
}

function buildRow(row, domain) {
  const el = document.createElement("div");
  el.className = "trow";
  el.setAttribute("role", "row");
  el.dataset.testid = "result-row";
  el.dataset.position = String(row.position);
  el.appendChild(cell("position", String(row.position)));
  const token = cell("token", null);
  const tok = document.createElement("span");
  tok.className = "tok";
  tok.textContent = visibleToken(row.token);
  tok.title = `token id ${row.token_id}`;
  token.appendChild(tok);
  el.appendChild(token);
  const explanation = cell("explanation", null);
  appendWords(explanation, row, domain);
  el.appendChild(explanation);
  el.appendChild(cell("mse", formatNumber(row.mse), true));
  el.appendChild(cell("relative_rmse", formatNumber(row.relative_rmse), true));
  el.appendChild(cell("kl", formatNumber(row.kl), true));
  const logit = cell("logit_lens", null);
  for (const entry of row.logit_lens_top || []) {
    const t = document.createElement("span");
    t.className = "ll";
    t.textContent = visibleToken(entry.token);
    t.title = `logit ${formatNumber(entry.logit)} (id ${entry.token_id})`;
    logit.appendChild(t);
  }
  el.appendChild(logit);
  return el;
}

/**
 * Render `rows` into `container`; `onCopy(text)` is called for a clicked cell and
 * `onRendered(ms)` once every row is in the document. Returns {cancel}.
 */
export function renderTable(container, rows, { domain, columns, onCopy, onRendered }) {
  const started = performance.now();
  const header = h(
    "div",
    { class: "trow thead", role: "row" },
    COLUMNS.map((c) =>
      h("div", { class: `cell c-${c.name}${c.numeric ? " num" : ""}`, role: "columnheader", dataset: { column: c.name } }, c.label),
    ),
  );
  const body = h("div", { class: "tbody", role: "rowgroup" });
  const table = h(
    "div",
    {
      class: "result-table",
      role: "table",
      "aria-label": "one row per token",
      "aria-rowcount": String(rows.length + 1),
      dataset: { testid: "result-table" },
    },
    h("div", { role: "rowgroup", class: "thead-group" }, header),
    body,
  );
  applyColumns(table, columns);
  table.addEventListener("click", (event) => {
    const target = event.target.closest(".cell");
    if (!target || target.closest(".thead") || !onCopy) return;
    const rowEl = target.closest(".trow");
    const row = rows[Number(rowEl.dataset.index)];
    const column = COLUMNS.find((c) => target.classList.contains(`c-${c.name}`));
    if (row && column) onCopy(column.copy(row), target);
  });
  container.appendChild(table);
  let block = null;
  return runChunked(rows.length, (i) => {
    if (i % ROWS_PER_BLOCK === 0) {
      block = document.createElement("div");
      block.className = "tblock";
      body.appendChild(block);
    }
    const el = buildRow(rows[i], domain);
    el.dataset.index = String(i);
    block.appendChild(el);
  }, {
    onDone: () => {
      table.dataset.rendered = "true";
      if (onRendered) onRendered(performance.now() - started);
    },
  });
}

/** Show only `visible` columns (no re-render: a grid template and display rules). */
export function applyColumns(table, visible) {
  table.style.setProperty("--cols", gridColumns(visible));
  for (const c of COLUMNS) table.classList.toggle(`hide-${c.name}`, !visible.includes(c.name));
}
