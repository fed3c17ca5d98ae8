// The page's state lives in one store object (STYLE §9): views read `store.state`, change it
// only through `store.update(topics, mutate)`, and re-render when a topic they follow changes.
// Notifications are batched per microtask, so a burst of stream events renders once.

/** Topics: "auth", "groups", "selection", "preload", "input", "continuations", "tabs",
 *  "tab:<id>" (one analysis), "progress:<id>" (its progress only), "ui". */
export function createStore(state) {
  const subscribers = new Map();
  let pending = new Set();
  let scheduled = false;

  function flush() {
    scheduled = false;
    const topics = pending;
    pending = new Set();
    for (const topic of topics) {
      for (const fn of subscribers.get(topic) || []) fn(state, topic);
    }
  }

  return {
    state,
    update(topics, mutate) {
      if (mutate) mutate(state);
      for (const topic of [].concat(topics)) pending.add(topic);
      if (!scheduled) {
        scheduled = true;
        queueMicrotask(flush);
      }
    },
    subscribe(topics, fn) {
      for (const topic of [].concat(topics)) {
        if (!subscribers.has(topic)) subscribers.set(topic, new Set());
        subscribers.get(topic).add(fn);
      }
      return () => {
        for (const topic of [].concat(topics)) subscribers.get(topic)?.delete(fn);
      };
    },
  };
}

let counter = 0;

/** A page-unique id ("t3-lq2x"). */
export function newId(prefix = "t") {
  counter += 1;
  return `${prefix}${counter}-${Date.now().toString(36)}`;
}

export const DEFAULT_COLUMNS = {
  position: true,
  token: true,
  explanation: true,
  mse: true,
  relative_rmse: true,
  kl: true,
  logit_lens: true,
};

/** The state the page starts from (browser storage fills in tabs and the key). */
export function initialState() {
  return {
    auth: { key: "", remember: false, required: false, error: null },
    connection: { ok: true, message: "", checkedAt: null },
    groups: null, // the last `GET /api/v2/groups` answer's `groups`
    groupsError: null,
    groupStatus: {}, // group_id -> {replicas} or {error}
    refreshedAt: null,
    selectedLensId: null,
    collapsed: {}, // group_id -> true when its section is closed
    openHelp: {}, // group_id -> true while its "what is a group" tip is open
    preload: {}, // group_id -> {running, error, items: {lens_id: {state, ...}}}
    input: {
      mode: "text",
      text: "The cat sat on the mat because it was warm.",
      messages: [
        { role: "user", content: "Hello! What is the capital of France?" },
        { role: "assistant", content: "The capital of France is Paris." },
      ],
      options: {
        temperature: "1",
        seed: "",
        best_of_k: "1",
        optimize_temperature: "",
        batch_size: "",
        calculate_salience: true,
        logit_lens: false,
        kl: false,
        last_n_messages: "",
        positions: "",
      },
      generate: { max_new_tokens: "24", num_continuations: "3", temperature: "1", seed: "" },
      notice: null,
      problems: [],
    },
    continuations: { running: false, lensId: null, items: [], error: null, base: null },
    tabs: [],
    activeTabId: null,
    compare: null, // {a, b} tab ids, shown instead of the active tab
    ui: { columns: { ...DEFAULT_COLUMNS } },
  };
}
