// The full-text view: the analysed text as it reads, one span per token; hovering or
// focusing a token (arrow keys move between tokens) shows its explanation in a panel.
import { formatNumber, h, replace, runChunked } from "./dom.js";
import { appendWords } from "./words.js";

export function renderFullText(container, rows, { domain, onRendered }) {
  const started = performance.now();
  const detail = h(
    "div",
    { class: "ft-detail", dataset: { testid: "fulltext-detail" }, "aria-live": "polite" },
    h("span", { class: "muted" }, "Hover a token (or focus the text and use the arrow keys) to read its explanation."),
  );
  const text = h("div", {
    class: "fulltext",
    dataset: { testid: "fulltext-view" },
    tabindex: "0",
    role: "group",
    "aria-label": "analysed text; arrow keys move between tokens",
  });
  container.append(detail, text);
  let active = -1;

  function show(index) {
    const row = rows[index];
    if (!row) return;
    text.querySelector(".ft-tok.active")?.classList.remove("active");
    text.children[index]?.classList.add("active");
    active = index;
    const words = h("span", { class: "ft-words" });
    appendWords(words, row, domain);
    replace(
      detail,
      h("span", { class: "ft-pos" }, `#${row.position}`),
      " ",
      h("code", { class: "tok" }, row.token),
      " → ",
      words,
      h("span", { class: "muted" }, `  mse ${formatNumber(row.mse)} · rel. rmse ${formatNumber(row.relative_rmse)}${row.kl != null ? ` · KL ${formatNumber(row.kl)}` : ""}`),
    );
  }

  text.addEventListener("mouseover", (event) => {
    const tok = event.target.closest(".ft-tok");
    if (tok) show(Number(tok.dataset.index));
  });
  text.addEventListener("keydown", (event) => {
    const step = { ArrowRight: 1, ArrowDown: 1, ArrowLeft: -1, ArrowUp: -1 }[event.key];
    if (!step) return;
    event.preventDefault();
    const next = Math.min(rows.length - 1, Math.max(0, active + step));
    show(next);
    text.children[next]?.scrollIntoView({ block: "nearest" });
  });

  return runChunked(rows.length, (i) => {
    const tok = document.createElement("span");
    tok.className = "ft-tok";
    tok.dataset.index = String(i);
    tok.dataset.testid = "fulltext-token";
    tok.textContent = rows[i].token;
    text.appendChild(tok);
  }, {
    budgetMs: 12,
    onDone: () => {
      text.dataset.rendered = "true";
      if (onRendered) onRendered(performance.now() - started);
    },
  });
}
