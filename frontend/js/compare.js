// Two analyses side by side, aligned by token position: token, then each lens's explanation
// (coloured by its own salience scale, with its own legend) and relative rmse.
import { formatNumber, h, runChunked, visibleToken } from "./dom.js";
import { legend, salienceDomain } from "./colour.js";
import { appendWords } from "./words.js";

function byPosition(rows) {
  const map = new Map();
  for (const row of rows) map.set(row.position, row);
  return map;
}

function sideCells(row, domain) {
  const words = document.createElement("div");
  words.className = "cell c-explanation";
  if (row) appendWords(words, row, domain);
  const score = document.createElement("div");
  score.className = "cell num";
  score.textContent = row ? formatNumber(row.relative_rmse) : "";
  return [words, score];
}

/** Render the comparison of tabs `a` and `b` into `container`. */
export function renderCompare(container, a, b, { onClose }) {
  const domainA = salienceDomain(a.rows);
  const domainB = salienceDomain(b.rows);
  const rowsA = byPosition(a.rows);
  const rowsB = byPosition(b.rows);
  const positions = [...new Set([...rowsA.keys(), ...rowsB.keys()])].sort((x, y) => x - y);
  const sameInput = JSON.stringify(a.request?.text ?? a.request?.messages ?? null)
    === JSON.stringify(b.request?.text ?? b.request?.messages ?? null);
  const body = h("div", { class: "tbody" });
  const table = h(
    "div",
    { class: "result-table compare-table", role: "table", "aria-label": "two analyses by position" },
    h(
      "div",
      { class: "trow thead", role: "row" },
      h("div", { class: "cell" }, "#"),
      h("div", { class: "cell" }, "token"),
      h("div", { class: "cell" }, a.title),
      h("div", { class: "cell num" }, "rel. rmse"),
      h("div", { class: "cell" }, b.title),
      h("div", { class: "cell num" }, "rel. rmse"),
    ),
    body,
  );
  container.appendChild(
    h(
      "section",
      { class: "compare", dataset: { testid: "compare-view" } },
      h(
        "div",
        { class: "compare-head" },
        h("h2", null, `Compare: ${a.title} | ${b.title}`),
        h("button", { type: "button", onclick: onClose, dataset: { testid: "compare-close" } }, "Close comparison"),
      ),
      sameInput ? null : h("p", { class: "warning" }, "The two analyses have different inputs: rows are aligned by position only."),
      h("div", { class: "legends" }, legend(domainA), legend(domainB)),
      table,
    ),
  );
  let block = null;
  return runChunked(positions.length, (i) => {
    if (i % 100 === 0) {
      block = document.createElement("div");
      block.className = "tblock";
      body.appendChild(block);
    }
    const position = positions[i];
    const ra = rowsA.get(position);
    const rb = rowsB.get(position);
    const row = document.createElement("div");
    row.className = "trow";
    row.dataset.testid = "compare-row";
    const pos = document.createElement("div");
    pos.className = "cell";
    pos.textContent = String(position);
    const tok = document.createElement("div");
    tok.className = "cell c-token";
    const ta = ra ? visibleToken(ra.token) : "";
    const tb = rb ? visibleToken(rb.token) : "";
    for (const text of ra && rb && ta !== tb ? [ta, tb] : [ta || tb]) {
      const span = document.createElement("span");
      span.className = "tok";
      span.textContent = text;
      tok.append(span, " ");
    }
    row.append(pos, tok, ...sideCells(ra, domainA), ...sideCells(rb, domainB));
    block.appendChild(row);
  });
}
