// The one API module (STYLE §9): every call of the page goes through here. It adds the
// bearer key, turns every failure into an ApiError with the server's {code, message, detail},
// and reads the streaming answers (NDJSON analyses, server-sent preload events).

// Statuses of error codes reported inside a stream, where no HTTP status carries them
// (deployments/errors.py STATUS).
const STATUS_OF_CODE = {
  malformed_json: 400, unauthorized: 401, not_found: 404, unknown_lens: 404,
  unknown_group: 404, incompatible_lens: 409, corrupt_checkpoint: 409,
  missing_checkpoint: 409, checkpoint_refused: 409, base_unavailable: 409,
  text_too_long: 413, bad_input: 422, rate_limited: 429, cancelled: 499, internal: 500,
  not_ready: 503, out_of_memory: 503, overloaded: 503, replica_unavailable: 503, timeout: 504,
};

/** Seconds without a byte after which a stream is given up (the server's timeout is 300 s). */
export const STREAM_GIVE_UP_SECONDS = 360;

export class ApiError extends Error {
  constructor({ status = 0, code, message, detail = {}, retryAfterSeconds = null }) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.detail = detail || {};
    this.retryAfterSeconds = retryAfterSeconds;
  }

  /** Plain data (kept in the store and in browser storage). */
  toJSON() {
    return {
      status: this.status,
      code: this.code,
      message: this.message,
      detail: this.detail,
      retryAfterSeconds: this.retryAfterSeconds,
    };
  }
}

/** The caller aborted (cancel button, closed tab): not an error to show as a failure. */
export class Aborted extends Error {
  constructor() {
    super("cancelled");
    this.name = "Aborted";
  }
}

function networkError(exc) {
  return new ApiError({
    status: 0,
    code: "network_error",
    message: `could not reach the server, or the connection dropped (${exc.message || exc})`,
  });
}

async function errorFrom(response) {
  const retryHeader = response.headers.get("Retry-After");
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  const error = body && body.error && typeof body.error === "object" ? body.error : null;
  const retry = retryHeader !== null ? Number(retryHeader) : null;
  return new ApiError({
    status: response.status,
    code: error ? String(error.code) : `http_${response.status}`,
    message: error ? String(error.message) : `${response.status} ${response.statusText}`,
    detail: error ? error.detail : {},
    retryAfterSeconds: retry ?? error?.detail?.retry_after_seconds ?? null,
  });
}

/** An error event inside a stream ({"event": "error", "error": {...}}) as an ApiError. */
function inBandError(error) {
  return new ApiError({
    status: STATUS_OF_CODE[error.code] ?? 500,
    code: String(error.code),
    message: String(error.message),
    detail: error.detail || {},
    retryAfterSeconds: error.detail?.retry_after_seconds ?? null,
  });
}

/**
 * The API client. `getKey()` returns the current key (or ""); URLs resolve against the page's
 * base, so the page works under any route prefix.
 */
export function createApi({ getKey, base = document.baseURI }) {
  const url = (path) => new URL(path, base).toString();

  async function send(method, path, { body, accept, signal } = {}) {
    const headers = { Accept: accept || "application/json" };
    const key = getKey();
    if (key) headers.Authorization = `Bearer ${key}`;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let response;
    try {
      response = await fetch(url(path), {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        signal,
        cache: "no-store",
      });
    } catch (exc) {
      if (signal?.aborted) throw new Aborted();
      throw networkError(exc);
    }
    if (!response.ok) throw await errorFrom(response);
    return response;
  }

  async function json(method, path, options) {
    const response = await send(method, path, options);
    try {
      return await response.json();
    } catch (exc) {
      if (options?.signal?.aborted) throw new Aborted();
      throw networkError(exc);
    }
  }

  /**
   * Yield decoded lines of a streamed body. `onIdle(seconds)` is told every second that no byte
   * arrived for a while; after STREAM_GIVE_UP_SECONDS the stream is abandoned as dropped.
   */
  async function* lines(response, { signal, onIdle }) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let lastByteAt = performance.now();
    let giveUp = false;
    const watchdog = setInterval(() => {
      const idle = (performance.now() - lastByteAt) / 1000;
      if (onIdle) onIdle(idle);
      if (idle > STREAM_GIVE_UP_SECONDS) {
        giveUp = true;
        reader.cancel().catch(() => {});
      }
    }, 1000);
    let buffer = "";
    try {
      for (;;) {
        let chunk;
        try {
          chunk = await reader.read();
        } catch (exc) {
          if (signal?.aborted) throw new Aborted();
          throw networkError(exc);
        }
        if (giveUp) {
          throw new ApiError({
            code: "stream_stalled",
            message: `no data from the server for ${STREAM_GIVE_UP_SECONDS} s; gave up`,
          });
        }
        if (chunk.done) break;
        lastByteAt = performance.now();
        if (onIdle) onIdle(0);
        buffer += decoder.decode(chunk.value, { stream: true });
        let newline;
        while ((newline = buffer.indexOf("\n")) >= 0) {
          const line = buffer.slice(0, newline);
          buffer = buffer.slice(newline + 1);
          yield line;
        }
      }
      buffer += decoder.decode();
      if (buffer) yield buffer;
    } finally {
      clearInterval(watchdog);
      reader.cancel().catch(() => {});
    }
  }

  function parseLine(line) {
    try {
      return JSON.parse(line);
    } catch {
      throw new ApiError({ code: "bad_stream", message: `the server sent a line that is not JSON: ${line.slice(0, 80)}` });
    }
  }

  return {
    listGroups: (signal) => json("GET", "api/v2/groups", { signal }),
    groupStatus: (groupId, signal) =>
      json("GET", `api/v2/groups/${encodeURIComponent(groupId)}/status`, { signal }),
    lens: (lensId, signal) => json("GET", `api/v2/lenses/${encodeURIComponent(lensId)}`, { signal }),
    generate: (lensId, body, signal) =>
      json("POST", `api/v2/lenses/${encodeURIComponent(lensId)}/generate`, { body, signal }),

    /**
     * Analyse with NDJSON streaming: yields {event: "progress"|"meta"|"row"|"done"}; an error
     * (HTTP or in-band) is thrown as ApiError; a stream that ends before `done` is an error.
     */
    async *analyze(lensId, body, { signal, onIdle } = {}) {
      const path = `api/v2/lenses/${encodeURIComponent(lensId)}/analyze?stream=true`;
      const response = await send("POST", path, { body, signal, accept: "application/x-ndjson" });
      let done = false;
      for await (const line of lines(response, { signal, onIdle })) {
        if (!line.trim()) continue;
        const event = parseLine(line);
        if (event.event === "error") throw inBandError(event.error || {});
        if (event.event === "done") done = true;
        yield event;
      }
      if (!done) {
        throw new ApiError({
          code: "stream_ended",
          message: "the connection closed before the analysis finished",
        });
      }
    },

    /** Preload with server-sent events: yields {event: "lens"|"done", data}. */
    async *preload(groupId, lensIds, { signal } = {}) {
      const path = `api/v2/groups/${encodeURIComponent(groupId)}/preload`;
      const body = lensIds ? { lens_ids: lensIds } : undefined;
      const response = await send("POST", path, { body, signal, accept: "text/event-stream" });
      let event = "message";
      let data = "";
      for await (const line of lines(response, { signal })) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
        else if (line === "" && data) {
          yield { event, data: parseLine(data) };
          event = "message";
          data = "";
        }
      }
    },
  };
}
