// Export and import of analyses. JSONL mirrors the API's NDJSON stream: a `request` line
// (what was asked, of which lens), the `meta` line, then one `row` line per token, so a saved
// file reads like a replayed stream. CSV is one line per token for spreadsheets.
// The API key is never written: it is not part of a tab.

export const FORMAT = "lens-serve/analysis-v1";

/** The JSONL text of a tab. */
export function toJsonl(tab) {
  const head = {
    event: "request",
    format: FORMAT,
    title: tab.title,
    lens_id: tab.lensId,
    group_id: tab.groupId ?? tab.meta?.group_id ?? null,
    request: tab.request,
    exported_at: new Date().toISOString(),
  };
  const lines = [JSON.stringify(head), JSON.stringify({ event: "meta", meta: tab.meta })];
  for (const row of tab.rows) lines.push(JSON.stringify({ event: "row", row }));
  return lines.join("\n") + "\n";
}

const CSV_COLUMNS = [
  ["position", (r) => r.position],
  ["token", (r) => r.token],
  ["token_id", (r) => r.token_id],
  ["explanation", (r) => r.explanation],
  ["explanation_tokens", (r) => (r.explanation_tokens || []).join("|")],
  ["token_salience", (r) => (r.token_salience || []).join("|")],
  ["mse", (r) => r.mse],
  ["relative_rmse", (r) => r.relative_rmse],
  ["kl", (r) => r.kl ?? ""],
  ["logit_lens_top", (r) => (r.logit_lens_top || []).map((e) => e.token).join("|")],
];

function csvCell(value, isText) {
  let text = value === null || value === undefined ? "" : String(value);
  // A text cell starting with = + - @ would run as a formula in a spreadsheet.
  if (isText && /^[=+\-@\t\r]/.test(text)) text = `'${text}`;
  return /[",\n\r]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
}

/** The CSV text of a tab: a header line and one line per token. */
export function toCsv(tab) {
  const textColumns = new Set(["token", "explanation", "explanation_tokens", "logit_lens_top"]);
  const lines = [CSV_COLUMNS.map(([name]) => name).join(",")];
  for (const row of tab.rows) {
    lines.push(CSV_COLUMNS.map(([name, get]) => csvCell(get(row), textColumns.has(name))).join(","));
  }
  return lines.join("\r\n") + "\r\n";
}

/** Offer `text` as a download named `filename`. */
export function download(filename, text, type) {
  const url = URL.createObjectURL(new Blob([text], { type }));
  const link = document.createElement("a");
  link.href = url;
  link.download = filename;
  link.style.display = "none";
  document.body.appendChild(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

/** "qwen2-tiny-l1-2026-12-01T18-03-11" (a file name without an extension). */
export function exportName(tab) {
  const stamp = new Date().toISOString().slice(0, 19).replace(/:/g, "-");
  const lens = String(tab.lensId || "analysis").replace(/[^A-Za-z0-9._-]/g, "_");
  return `${lens}-${stamp}`;
}

function isRow(value) {
  return value && typeof value === "object" && Number.isInteger(value.position) && "token" in value;
}

/**
 * Parse a saved analysis: our JSONL, an NDJSON stream saved from the API, or the plain JSON
 * answer of `POST /analyze` / `lens-serve analyze --json`. Returns the tab's fields.
 * Throws an Error naming the line that is wrong.
 */
export function parseImport(text, filename = "file") {
  const trimmed = text.trim();
  if (!trimmed) throw new Error(`${filename} is empty`);
  if (trimmed.startsWith("{") && !trimmed.includes("\n")) {
    const whole = tryParse(trimmed);
    if (whole && whole.meta && Array.isArray(whole.rows)) return fromAnswer(whole, filename);
  }
  if (trimmed.startsWith("{") && trimmed.includes('"rows"')) {
    const whole = tryParse(trimmed);
    if (whole && whole.meta && Array.isArray(whole.rows)) return fromAnswer(whole, filename);
  }
  const result = { title: null, lensId: null, groupId: null, request: null, meta: null, rows: [] };
  trimmed.split(/\r?\n/).forEach((line, index) => {
    if (!line.trim()) return;
    const item = tryParse(line);
    if (!item || typeof item !== "object") {
      throw new Error(`${filename}, line ${index + 1}: not a JSON object`);
    }
    if (item.event === "request") {
      result.title = typeof item.title === "string" ? item.title : null;
      result.lensId = item.lens_id ?? null;
      result.groupId = item.group_id ?? null;
      result.request = item.request ?? null;
    } else if (item.event === "meta") result.meta = item.meta;
    else if (item.event === "row" && isRow(item.row)) result.rows.push(item.row);
    else if (isRow(item)) result.rows.push(item);
    else if (item.event === "error") {
      throw new Error(`${filename} holds a failed analysis: ${item.error?.code}: ${item.error?.message}`);
    }
  });
  if (result.rows.length === 0) throw new Error(`${filename} has no result rows`);
  if (!result.meta) result.meta = { lens_id: result.lensId };
  result.lensId = result.lensId ?? result.meta.lens_id ?? null;
  result.groupId = result.groupId ?? result.meta.group_id ?? null;
  return result;
}

function fromAnswer(answer, filename) {
  if (!answer.rows.every(isRow)) throw new Error(`${filename}: a row lacks position or token`);
  return {
    title: null,
    lensId: answer.meta.lens_id ?? null,
    groupId: answer.meta.group_id ?? null,
    request: null,
    meta: answer.meta,
    rows: answer.rows,
  };
}

function tryParse(text) {
  try {
    return JSON.parse(text);
  } catch {
    return null;
  }
}
