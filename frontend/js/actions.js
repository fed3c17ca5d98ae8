// What the page does (issue 10 §4): analyses as tabs, group runs, generation, preload,
// polling residency, export/import. Views call these; these change the store and call the API.
import { Aborted } from "./api.js";
import { download, exportName, parseImport, toCsv, toJsonl } from "./exchange.js";
import { findLens } from "./lenses.js";
import { errorData } from "./notices.js";
import { loadTabs, saveKey, saveTabs, saveUi } from "./persist.js";
import { analyzeBody, detectMessages, generateBody } from "./request.js";
import { newId } from "./store.js";

export const POLL_SECONDS = 10;

export function createActions(store, api) {
  const controllers = new Map(); // tab id -> AbortController of its running analysis
  let pollTimer = null;
  let refreshing = null;
  let saveTimer = null;

  const tab = (id) => store.state.tabs.find((t) => t.id === id);
  const touchTab = (id, mutate) => store.update([`tab:${id}`, "tabstate"], (s) => {
    const t = s.tabs.find((x) => x.id === id);
    if (t && mutate) mutate(t);
  });

  /** A 401 means the key is missing or wrong; any other answer from the server means it is not. */
  function noteAuthFailure(error) {
    if (error.status === 0) return;
    store.update("auth", (s) => {
      s.auth.required = error.status === 401;
      s.auth.error = error.status === 401 ? error : null;
    });
  }

  // --- groups and residency ---------------------------------------------------------------

  async function fetchStatuses(groups) {
    const statuses = {};
    await Promise.all(
      groups
        .filter((g) => g.replicas_running > 0 && !store.state.collapsed[g.group_id])
        .map(async (g) => {
          try {
            statuses[g.group_id] = await api.groupStatus(g.group_id);
          } catch (exc) {
            statuses[g.group_id] = { error: errorData(exc) };
          }
        }),
    );
    return statuses;
  }

  /** Read groups and the status of open groups; one refresh at a time. */
  function refresh() {
    if (!refreshing) {
      refreshing = doRefresh().finally(() => {
        refreshing = null;
      });
    }
    return refreshing;
  }

  async function doRefresh() {
    try {
      const answer = await api.listGroups();
      const statuses = await fetchStatuses(answer.groups);
      store.update(["groups", "connection", "auth"], (s) => {
        s.groups = answer.groups;
        s.groupsError = null;
        s.groupStatus = statuses;
        s.refreshedAt = Date.now();
        s.connection = { ok: true, message: "", checkedAt: Date.now() };
        s.auth.required = false;
        s.auth.error = null;
        if (!s.selectedLensId || !findLens(s.groups, s.selectedLensId)) {
          s.selectedLensId = firstLens(s.groups);
        }
      });
      store.update("selection");
      return POLL_SECONDS;
    } catch (exc) {
      const error = errorData(exc);
      noteAuthFailure(error);
      store.update(["groups", "connection"], (s) => {
        s.groupsError = error;
        s.connection = {
          ok: error.status !== 0,
          message: error.status === 0 ? error.message : "",
          checkedAt: Date.now(),
        };
      });
      return Math.max(POLL_SECONDS, Number(error.retryAfterSeconds) || 0);
    }
  }

  function firstLens(groups) {
    for (const group of groups || []) {
      const lens = group.lenses.find((l) => l.visible !== false);
      if (lens) return lens.lens_id;
    }
    return null;
  }

  /** Poll residency while the page is visible; a 429 or a failure waits longer. */
  function startPolling() {
    const loop = async () => {
      let wait = POLL_SECONDS;
      if (document.visibilityState === "visible") wait = await refresh();
      pollTimer = setTimeout(loop, wait * 1000);
    };
    loop();
    document.addEventListener("visibilitychange", () => {
      if (document.visibilityState === "visible") refresh();
    });
  }

  let soonTimer = null;
  /** Refresh shortly (after an analysis or a preload changed what replicas hold). */
  function refreshSoon() {
    clearTimeout(soonTimer);
    soonTimer = setTimeout(refresh, 300);
  }

  // --- selection and auth --------------------------------------------------------------------

  function selectLens(lensId) {
    store.update("selection", (s) => {
      s.selectedLensId = lensId;
    });
  }

  function setKey(key, remember) {
    saveKey(key, remember);
    store.update("auth", (s) => {
      s.auth.key = key;
      s.auth.remember = remember;
    });
    return refresh();
  }

  function toggleGroup(groupId, open) {
    // A re-rendered <details> fires "toggle" too: only a real change counts.
    if (!store.state.collapsed[groupId] === open) return;
    store.update([], (s) => {
      s.collapsed[groupId] = !open;
    });
    if (open) refreshSoon();
  }

  // --- analyses --------------------------------------------------------------------------------

  function titleFor(lensId) {
    const found = findLens(store.state.groups, lensId);
    const base = found ? found.lens.name : lensId;
    const same = store.state.tabs.filter((t) => t.title === base || t.title.startsWith(`${base} #`));
    return same.length ? `${base} #${same.length + 1}` : base;
  }

  function checkedBody() {
    const { body, problems } = analyzeBody(store.state.input);
    store.update("input-problems", (s) => {
      s.input.problems = problems;
    });
    return problems.length ? null : body;
  }

  function newTab(lensId, request, fields = {}) {
    const found = findLens(store.state.groups, lensId);
    const t = {
      id: newId("tab"),
      title: titleFor(lensId),
      lensId,
      groupId: found ? found.group.group_id : null,
      request,
      status: "queued",
      progress: { done: 0, total: null },
      idleSeconds: 0,
      meta: null,
      rows: [],
      error: null,
      view: "table",
      source: null,
      startedAt: null,
      finishedAt: null,
      ...fields,
    };
    store.update(["tabs", "tabstate"], (s) => {
      s.tabs.push(t);
      s.activeTabId = t.id;
      s.compare = null;
    });
    return t;
  }

  /** Analyse the input with one lens (the selected one by default) in a new tab. */
  function analyze(lensId = store.state.selectedLensId) {
    if (!lensId) return null;
    const body = checkedBody();
    if (!body) return null;
    const t = newTab(lensId, body);
    run(t.id);
    return t.id;
  }

  /** One tab per visible lens of the group, all running at once. */
  function analyzeGroup(groupId) {
    const group = (store.state.groups || []).find((g) => g.group_id === groupId);
    const body = checkedBody();
    if (!group || !body) return [];
    const ids = group.lenses
      .filter((lens) => lens.visible !== false)
      .map((lens) => newTab(lens.lens_id, structuredClone(body)).id);
    store.update("tabs", (s) => {
      s.activeTabId = ids[0] ?? s.activeTabId;
    });
    for (const id of ids) run(id);
    return ids;
  }

  async function run(id) {
    const controller = new AbortController();
    controllers.set(id, controller);
    touchTab(id, (t) => {
      Object.assign(t, { status: "running", error: null, meta: null, rows: [], idleSeconds: 0 });
      t.source = null; // a re-run of an imported analysis is no longer the file's
      t.progress = { done: 0, total: null };
      t.startedAt = Date.now();
      t.finishedAt = null;
    });
    const rows = [];
    let meta = null;
    const target = tab(id);
    try {
      const events = api.analyze(target.lensId, target.request, {
        signal: controller.signal,
        onIdle: (seconds) => noteIdle(id, seconds),
      });
      for await (const event of events) {
        if (event.event === "progress") {
          store.update([`progress:${id}`, "tabstate"], () => {
            target.progress = { done: event.done, total: event.total };
          });
        } else if (event.event === "meta") meta = event.meta;
        else if (event.event === "row") rows.push(event.row);
      }
      touchTab(id, (t) => {
        Object.assign(t, { status: "done", meta, rows, finishedAt: Date.now() });
        t.progress = { done: rows.length, total: rows.length };
      });
    } catch (exc) {
      if (exc instanceof Aborted || controller.signal.aborted) {
        touchTab(id, (t) => Object.assign(t, { status: "cancelled", finishedAt: Date.now() }));
      } else {
        const error = errorData(exc);
        noteAuthFailure(error);
        touchTab(id, (t) => Object.assign(t, { status: "error", error, finishedAt: Date.now() }));
      }
    } finally {
      if (controllers.get(id) === controller) controllers.delete(id);
      saveSoon();
      refreshSoon();
    }
  }

  function noteIdle(id, seconds) {
    const t = tab(id);
    const shown = seconds >= 5 ? Math.floor(seconds) : 0;
    if (!t || t.idleSeconds === shown) return;
    store.update([`progress:${id}`], () => {
      t.idleSeconds = shown;
    });
  }

  function cancel(id) {
    const controller = controllers.get(id);
    if (controller) controller.abort();
    touchTab(id, (t) => {
      if (t.status === "running" || t.status === "queued") {
        t.status = "cancelled";
        t.finishedAt = Date.now();
      }
    });
  }

  /** Run a tab's request again in place (retry after an error, or re-run). */
  function rerun(id) {
    if (controllers.has(id)) return;
    run(id);
  }

  function activate(id) {
    store.update(["tabs"], (s) => {
      s.activeTabId = id;
      s.compare = null;
    });
    saveSoon();
  }

  function close(id) {
    cancel(id);
    store.update(["tabs", "tabstate"], (s) => {
      const index = s.tabs.findIndex((t) => t.id === id);
      if (index < 0) return;
      s.tabs.splice(index, 1);
      if (s.activeTabId === id) {
        s.activeTabId = (s.tabs[index] || s.tabs[index - 1] || {}).id ?? null;
      }
      if (s.compare && (s.compare.a === id || s.compare.b === id)) s.compare = null;
    });
    saveSoon();
  }

  function rename(id, title) {
    const clean = String(title).trim().slice(0, 200);
    if (!clean) return;
    touchTab(id, (t) => {
      t.title = clean;
    });
    store.update("tabs");
    saveSoon();
  }

  function setView(id, view) {
    touchTab(id, (t) => {
      t.view = view;
    });
    saveSoon();
  }

  function compare(a, b) {
    store.update(["tabs"], (s) => {
      s.compare = a && b && a !== b ? { a, b } : null;
    });
  }

  function setColumn(name, visible) {
    store.update("ui", (s) => {
      s.ui.columns[name] = visible;
    });
    saveUi(store.state.ui);
  }

  // --- generation ------------------------------------------------------------------------------

  async function generate(lensId = store.state.selectedLensId) {
    const { body, problems } = generateBody(store.state.input);
    store.update("input-problems", (s) => {
      s.input.problems = problems;
    });
    if (problems.length || !lensId) return;
    store.update("continuations", (s) => {
      s.continuations = { running: true, lensId, items: [], error: null, base: body };
    });
    try {
      const answer = await api.generate(lensId, body);
      store.update("continuations", (s) => {
        s.continuations = { ...s.continuations, running: false, items: answer.continuations, meta: answer.meta };
      });
    } catch (exc) {
      const error = errorData(exc);
      noteAuthFailure(error);
      store.update("continuations", (s) => {
        s.continuations = { ...s.continuations, running: false, error };
      });
    } finally {
      refreshSoon();
    }
  }

  /** Put a continuation after the input (text) or into the assistant's turn (chat). */
  function pickContinuation(index, { thenAnalyze = false } = {}) {
    const { items, base, lensId } = store.state.continuations;
    const item = items[index];
    if (!item || !base) return;
    store.update(["input", "input-text"], (s) => {
      if (base.messages) {
        const messages = base.messages.map((m) => ({ ...m }));
        const last = messages[messages.length - 1];
        if (last.role === "assistant") last.content += item.text;
        else messages.push({ role: "assistant", content: item.text });
        s.input.mode = "chat";
        s.input.messages = messages;
      } else {
        s.input.mode = "text";
        s.input.text = base.text + item.text;
      }
      s.input.notice = `Continuation ${index + 1} added to the input.`;
      s.continuations.picked = index;
    });
    store.update("continuations");
    if (thenAnalyze) analyze(lensId);
  }

  // --- input -------------------------------------------------------------------------------------

  /** Switch to the chat editor when pasted text is chat JSON; returns whether it was. */
  function pasteMaybeMessages(text) {
    const messages = detectMessages(text);
    if (!messages) return false;
    store.update(["input", "input-text"], (s) => {
      s.input.previousPasted = text;
      s.input.mode = "chat";
      s.input.messages = messages;
      s.input.notice = `Read ${messages.length} chat message(s) from the pasted JSON.`;
      s.input.canUndoPaste = true;
    });
    return true;
  }

  function undoPaste(text) {
    store.update(["input", "input-text"], (s) => {
      s.input.mode = "text";
      s.input.text = text;
      s.input.notice = null;
      s.input.canUndoPaste = false;
    });
  }

  // --- preload -----------------------------------------------------------------------------------

  async function preload(groupId) {
    const group = (store.state.groups || []).find((g) => g.group_id === groupId);
    if (!group || store.state.preload[groupId]?.running) return;
    const items = {};
    for (const lens of group.lenses) items[lens.lens_id] = { state: "loading" };
    store.update("preload", (s) => {
      s.preload[groupId] = { running: true, error: null, items };
    });
    try {
      for await (const { event, data } of api.preload(groupId)) {
        if (event !== "lens") continue;
        store.update("preload", (s) => {
          s.preload[groupId].items[data.lens_id] = data.ok
            ? { state: "ok", kind: data.kind, seconds: data.seconds, replicaId: data.replica_id }
            : { state: "failed", error: data.error };
        });
      }
      store.update("preload", (s) => {
        s.preload[groupId].running = false;
        for (const item of Object.values(s.preload[groupId].items)) {
          if (item.state === "loading") item.state = "unknown";
        }
      });
    } catch (exc) {
      const error = errorData(exc);
      noteAuthFailure(error);
      store.update("preload", (s) => {
        s.preload[groupId].running = false;
        s.preload[groupId].error = error;
        for (const item of Object.values(s.preload[groupId].items)) {
          if (item.state === "loading") item.state = "unknown";
        }
      });
    } finally {
      refresh();
    }
  }

  // --- export, import, storage ----------------------------------------------------------------

  function exportTab(id, format) {
    const t = tab(id);
    if (!t || !t.rows.length) return;
    if (format === "csv") download(`${exportName(t)}.csv`, toCsv(t), "text/csv");
    else download(`${exportName(t)}.jsonl`, toJsonl(t), "application/x-ndjson");
  }

  async function importFile(file) {
    try {
      const parsed = parseImport(await file.text(), file.name);
      const t = newTab(parsed.lensId, parsed.request, {
        title: parsed.title || `${parsed.lensId || "analysis"} (imported)`,
        groupId: parsed.groupId,
        meta: parsed.meta,
        rows: parsed.rows,
        status: "done",
        source: { file: file.name },
        progress: { done: parsed.rows.length, total: parsed.rows.length },
      });
      store.update("import", (s) => {
        s.importError = null;
      });
      saveSoon();
      return t.id;
    } catch (exc) {
      store.update("import", (s) => {
        s.importError = { status: 0, code: "bad_import", message: String(exc.message || exc), detail: {} };
      });
      return null;
    }
  }

  function saveNow() {
    clearTimeout(saveTimer);
    saveTimer = null;
    saveTabs(store.state.tabs, store.state.activeTabId);
  }

  function saveSoon() {
    clearTimeout(saveTimer);
    saveTimer = setTimeout(saveNow, 200);
  }

  // A reload or a closed window must not lose the last rename or result still waiting to be saved.
  window.addEventListener("pagehide", () => {
    if (saveTimer !== null) saveNow();
  });

  function restoreTabs() {
    const saved = loadTabs();
    store.update(["tabs", "tabstate"], (s) => {
      s.tabs = saved.tabs.map((t) => ({
        progress: { done: t.rows?.length ?? 0, total: t.rows?.length ?? 0 },
        idleSeconds: 0,
        rows: [],
        view: "table",
        ...t,
      }));
      s.activeTabId = s.tabs.some((t) => t.id === saved.activeTabId)
        ? saved.activeTabId
        : (s.tabs[s.tabs.length - 1] || {}).id ?? null;
    });
  }

  return {
    refresh,
    refreshSoon,
    startPolling,
    selectLens,
    setKey,
    toggleGroup,
    analyze,
    analyzeGroup,
    cancel,
    rerun,
    activate,
    close,
    rename,
    setView,
    compare,
    setColumn,
    generate,
    pickContinuation,
    pasteMaybeMessages,
    undoPaste,
    preload,
    exportTab,
    importFile,
    restoreTabs,
    stopPolling: () => clearTimeout(pollTimer),
  };
}
