// The input panel's fields as an API body, checked against the v2 bounds (LENS_FORMAT
// §Analysis options, deployments schemas) before anything is sent; the server checks again.

export const BOUNDS = {
  temperature: { min: 0, max: 2 },
  best_of_k: { min: 1, max: 64 },
  optimize_temperature: { min: 0, max: 2, exclusiveMin: true },
  batch_size: { min: 1, max: 512 },
  last_n_messages: { min: 1, max: 1000 },
  max_new_tokens: { min: 1, max: 1024 },
  num_continuations: { min: 1, max: 16 },
  // JavaScript numbers are exact up to 2^53 - 1; the API takes up to 2^63 - 1.
  seed: { min: 0, max: Number.MAX_SAFE_INTEGER },
};

const MAX_POSITIONS = 100_000;

function numberField(problems, name, raw, { integer = false } = {}) {
  const text = String(raw ?? "").trim();
  if (text === "") return undefined;
  const value = Number(text);
  const bounds = BOUNDS[name];
  const low = bounds.exclusiveMin ? `(${bounds.min}` : `[${bounds.min}`;
  if (!Number.isFinite(value) || (integer && !Number.isInteger(value))) {
    problems.push(`${name}: "${text}" is not ${integer ? "an integer" : "a number"}`);
    return undefined;
  }
  const tooLow = bounds.exclusiveMin ? value <= bounds.min : value < bounds.min;
  if (tooLow || value > bounds.max) {
    problems.push(`${name}: ${text} is outside ${low}, ${bounds.max}]`);
    return undefined;
  }
  return value;
}

/** "0-3, 7, 9-10" -> [0, 1, 2, 3, 7, 9, 10]. */
export function parsePositions(problems, raw) {
  const text = String(raw ?? "").trim();
  if (text === "") return undefined;
  const out = new Set();
  for (const part of text.split(/[\s,]+/).filter(Boolean)) {
    const match = /^(\d+)(?:-(\d+))?$/.exec(part);
    if (!match) {
      problems.push(`positions: "${part}" is neither a position nor a range like 3-9`);
      return undefined;
    }
    const first = Number(match[1]);
    const last = match[2] === undefined ? first : Number(match[2]);
    if (last < first || last - first > MAX_POSITIONS) {
      problems.push(`positions: range ${part} is empty or too long`);
      return undefined;
    }
    for (let p = first; p <= last; p += 1) out.add(p);
    if (out.size > MAX_POSITIONS) {
      problems.push(`positions: more than ${MAX_POSITIONS} positions`);
      return undefined;
    }
  }
  return [...out].sort((a, b) => a - b);
}

/** A random seed that survives JSON in a browser (below 2^53). */
export function randomSeed() {
  const words = crypto.getRandomValues(new Uint32Array(2));
  return (words[0] & 0x1fffff) * 2 ** 32 + words[1];
}

function inputPart(input, problems) {
  if (input.mode === "chat") {
    const messages = input.messages.map((m) => ({ role: m.role, content: m.content }));
    if (messages.length === 0) problems.push("messages: add at least one message");
    return { messages };
  }
  if (!input.text) problems.push("text: enter a text to analyse");
  return { text: input.text };
}

/** {body, problems}: the analyze body of the input panel. A blank seed becomes a random one. */
export function analyzeBody(input) {
  const problems = [];
  const o = input.options;
  const options = {};
  const set = (name, value) => {
    if (value !== undefined) options[name] = value;
  };
  set("temperature", numberField(problems, "temperature", o.temperature));
  set("seed", numberField(problems, "seed", o.seed, { integer: true }));
  set("best_of_k", numberField(problems, "best_of_k", o.best_of_k, { integer: true }));
  set("optimize_temperature", numberField(problems, "optimize_temperature", o.optimize_temperature));
  set("batch_size", numberField(problems, "batch_size", o.batch_size, { integer: true }));
  options.calculate_salience = Boolean(o.calculate_salience);
  options.logit_lens = Boolean(o.logit_lens);
  options.kl = Boolean(o.kl);
  if (input.mode === "chat") {
    set("last_n_messages", numberField(problems, "last_n_messages", o.last_n_messages, { integer: true }));
  }
  set("positions", parsePositions(problems, o.positions));
  if (options.positions && options.last_n_messages) {
    problems.push("positions and last_n_messages: give one of them, not both");
  }
  if (options.seed === undefined) options.seed = randomSeed();
  return { body: { ...inputPart(input, problems), options }, problems };
}

/** {body, problems}: the generate body of the input panel. */
export function generateBody(input) {
  const problems = [];
  const g = input.generate;
  const body = inputPart(input, problems);
  const set = (name, value) => {
    if (value !== undefined) body[name] = value;
  };
  set("max_new_tokens", numberField(problems, "max_new_tokens", g.max_new_tokens, { integer: true }));
  set("num_continuations", numberField(problems, "num_continuations", g.num_continuations, { integer: true }));
  set("temperature", numberField(problems, "temperature", g.temperature));
  set("seed", numberField(problems, "seed", g.seed, { integer: true }));
  return { body, problems };
}

/**
 * Chat messages in pasted text: a JSON array of {role, content}, or {"messages": [...]}.
 * Returns the messages, or null when the text is not such JSON.
 */
export function detectMessages(text) {
  const trimmed = String(text || "").trim();
  if (!(trimmed.startsWith("[") || trimmed.startsWith("{"))) return null;
  let value;
  try {
    value = JSON.parse(trimmed);
  } catch {
    return null;
  }
  const list = Array.isArray(value) ? value : value && value.messages;
  if (!Array.isArray(list) || list.length === 0) return null;
  const roles = new Set(["system", "user", "assistant"]);
  const ok = list.every(
    (m) => m && typeof m === "object" && roles.has(m.role) && typeof m.content === "string",
  );
  return ok ? list.map((m) => ({ role: m.role, content: m.content })) : null;
}
