// The one salience colour scale (STYLE §9): reversed viridis, so a word that matters is dark
// and one that does not is pale; both ends stay apart in lightness for colour-blind readers.
// Words get one of BINS classes (a stylesheet built once), and the legend is drawn from the
// same bins, so legend and words cannot disagree.
import { h, formatNumber } from "./dom.js";

// viridis at 0, 0.1, ..., 1 (matplotlib's colormap; d3's interpolateViridis gives the same).
const VIRIDIS = [
  "#440154", "#482475", "#414487", "#355f8d", "#2a788e", "#21918c",
  "#22a884", "#44bf70", "#7ad151", "#bddf26", "#fde725",
].map(hexToRgb);

export const BINS = 32;

function hexToRgb(hex) {
  const n = parseInt(hex.slice(1), 16);
  return [(n >> 16) & 255, (n >> 8) & 255, n & 255];
}

/** Colour of t in [0, 1] (0 = no salience, 1 = most): reversed viridis over a white wash. */
export function colourAt(t) {
  const x = (1 - Math.min(1, Math.max(0, t))) * (VIRIDIS.length - 1);
  const i = Math.min(VIRIDIS.length - 2, Math.floor(x));
  const f = x - i;
  const rgb = VIRIDIS[i].map((c, k) => c + (VIRIDIS[i + 1][k] - c) * f);
  // Low values fade towards white so that a table of mostly-unimportant words stays readable.
  const alpha = 0.2 + 0.8 * Math.min(1, Math.max(0, t));
  return rgb.map((c) => Math.round(255 + (c - 255) * alpha));
}

function luminance([r, g, b]) {
  const lin = (c) => {
    const s = c / 255;
    return s <= 0.03928 ? s / 12.92 : ((s + 0.055) / 1.055) ** 2.4;
  };
  return 0.2126 * lin(r) + 0.7152 * lin(g) + 0.0722 * lin(b);
}

/** Text colour with the better contrast on a background. */
function inkOn(rgb) {
  const bg = luminance(rgb);
  return (1.05) / (bg + 0.05) > (bg + 0.05) / 0.05 ? "#ffffff" : "#111111";
}

/** Insert the `.sal-0` .. `.sal-31` rules once. */
export function installSalienceStyles() {
  if (document.getElementById("salience-styles")) return;
  const rules = [];
  for (let bin = 0; bin < BINS; bin += 1) {
    const rgb = colourAt((bin + 0.5) / BINS);
    rules.push(`.sal-${bin}{background:rgb(${rgb.join(",")});color:${inkOn(rgb)}}`);
  }
  document.head.appendChild(h("style", { id: "salience-styles" }, rules.join("\n")));
}

// Rows arrays are replaced, never edited in place, so a domain can be kept per array.
const domains = new WeakMap();

/** The colour domain of one analysis: 0 .. the 98th percentile of its positive salience. */
export function salienceDomain(rows) {
  if (!domains.has(rows)) domains.set(rows, computeDomain(rows));
  return domains.get(rows);
}

function computeDomain(rows) {
  const values = [];
  for (const row of rows) {
    for (const v of row.token_salience || []) if (v > 0 && Number.isFinite(v)) values.push(v);
  }
  if (values.length === 0) return { lo: 0, hi: 1, empty: true };
  values.sort((a, b) => a - b);
  const hi = values[Math.min(values.length - 1, Math.floor(values.length * 0.98))];
  return { lo: 0, hi: hi > 0 ? hi : 1, empty: false };
}

/** The bin (class index) of a salience value in a domain. */
export function binOf(value, domain) {
  if (!Number.isFinite(value)) return 0;
  const t = (value - domain.lo) / (domain.hi - domain.lo);
  return Math.min(BINS - 1, Math.max(0, Math.floor(t * BINS)));
}

/** A legend: the bins as a strip, with the domain's numbers under it. */
export function legend(domain) {
  const strip = h("div", { class: "legend-strip", "aria-hidden": "true" });
  for (let bin = 0; bin < BINS; bin += 1) strip.appendChild(h("span", { class: `sal-${bin}` }));
  const mid = (domain.lo + domain.hi) / 2;
  return h(
    "figure",
    {
      class: "legend",
      dataset: { testid: "salience-legend" },
      "aria-label": `salience colour scale from ${formatNumber(domain.lo)} to ${formatNumber(domain.hi)}`,
    },
    h("figcaption", { title: SALIENCE_HELP }, "word salience"),
    strip,
    h(
      "div",
      { class: "legend-ticks" },
      h("span", null, `≤ ${formatNumber(domain.lo)}`),
      h("span", null, formatNumber(mid)),
      h("span", null, `≥ ${formatNumber(domain.hi)}`),
    ),
  );
}

export const SALIENCE_HELP =
  "Salience of an explanation word: how much worse the activation is reconstructed " +
  "(relative mse increase) when that word is blanked. Darker = the word matters more. " +
  "The scale runs from 0 to this analysis's 98th percentile.";
