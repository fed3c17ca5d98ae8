// The transposed view (the old page's favourite): tokens as columns, each token's explanation
// words stacked under it, coloured by salience. Columns are built in slices into blocks with
// `content-visibility: auto`, like the table.
import { formatNumber, h, runChunked, visibleToken } from "./dom.js";
import { appendWords } from "./words.js";

const COLUMNS_PER_BLOCK = 40;

export function renderTransposed(container, rows, { domain, onRendered }) {
  const started = performance.now();
  const view = h("div", {
    class: "transposed",
    dataset: { testid: "transposed-view" },
    role: "list",
    tabindex: "0",
    "aria-label": "tokens as columns, explanation words under each",
  });
  container.appendChild(view);
  let block = null;
  return runChunked(rows.length, (i) => {
    if (i % COLUMNS_PER_BLOCK === 0) {
      block = document.createElement("div");
      block.className = "tr-block";
      view.appendChild(block);
    }
    const row = rows[i];
    const column = document.createElement("div");
    column.className = "tr-col";
    column.setAttribute("role", "listitem");
    column.dataset.testid = "transposed-column";
    column.dataset.position = String(row.position);
    const token = document.createElement("div");
    token.className = "tr-token";
    token.textContent = visibleToken(row.token);
    token.title = `position ${row.position}, token id ${row.token_id}`;
    column.appendChild(token);
    const words = document.createElement("div");
    words.className = "tr-words";
    appendWords(words, row, domain, "div");
    column.appendChild(words);
    const score = document.createElement("div");
    score.className = "tr-score";
    score.textContent = formatNumber(row.relative_rmse, 2);
    score.title = "relative rmse";
    column.appendChild(score);
    block.appendChild(column);
  }, {
    onDone: () => {
      view.dataset.rendered = "true";
      if (onRendered) onRendered(performance.now() - started);
    },
  });
}
