// Explanation words coloured by salience: the one component the table, transposed, full-text
// and compare views share (CircuitsVis' colored_tokens, fed plain data).
import { visibleToken } from "./dom.js";
import { binOf } from "./colour.js";

/** Append one element per explanation word of `row` to `parent`, coloured within `domain`. */
export function appendWords(parent, row, domain, tag = "span") {
  const words = row.explanation_tokens || [row.explanation ?? ""];
  const salience = Array.isArray(row.token_salience) && row.token_salience.length === words.length
    ? row.token_salience
    : null;
  for (let i = 0; i < words.length; i += 1) {
    const word = document.createElement(tag);
    word.textContent = visibleToken(words[i]);
    if (salience) {
      const value = salience[i];
      word.className = `w sal-${binOf(value, domain)}`;
      word.dataset.salience = String(value);
      word.title = `salience ${Number(value).toPrecision(3)}`;
    } else {
      word.className = "w";
    }
    parent.appendChild(word);
  }
}

/** The explanation as plain text (the words joined, without the API's "[token]" suffix). */
export function explanationText(row) {
  return (row.explanation_tokens || [row.explanation ?? ""]).join("");
}
