// Browser storage. The API key stays in sessionStorage (this tab only) unless the user ticks
// "remember", which moves it to localStorage. Finished analyses go to localStorage so they
// survive a reload; the key is never written next to them, nor into exported files.

const KEY_NAME = "lens-serve.api-key";
const TABS_NAME = "lens-serve.tabs.v1";
const UI_NAME = "lens-serve.ui.v1";
export const MAX_SAVED_TABS = 12;

export function loadKey() {
  const remembered = localStorage.getItem(KEY_NAME);
  if (remembered !== null) return { key: remembered, remember: true };
  return { key: sessionStorage.getItem(KEY_NAME) || "", remember: false };
}

export function saveKey(key, remember) {
  sessionStorage.removeItem(KEY_NAME);
  localStorage.removeItem(KEY_NAME);
  if (!key) return;
  (remember ? localStorage : sessionStorage).setItem(KEY_NAME, key);
}

/** What of a tab is kept: its request, result and outcome, not live objects (controllers). */
function savedTab(tab) {
  const interrupted = tab.status === "running" || tab.status === "queued";
  return {
    id: tab.id,
    title: tab.title,
    lensId: tab.lensId,
    groupId: tab.groupId,
    request: tab.request,
    meta: tab.meta,
    rows: tab.rows,
    status: interrupted ? "interrupted" : tab.status,
    error: interrupted
      ? { status: 0, code: "interrupted", message: "the page was reloaded while this analysis ran" }
      : tab.error,
    view: tab.view,
    source: tab.source,
    startedAt: tab.startedAt,
    finishedAt: tab.finishedAt,
  };
}

/** Save the last tabs; when storage is full, keep fewer (newest first) rather than none. */
export function saveTabs(tabs, activeTabId) {
  let kept = tabs.slice(-MAX_SAVED_TABS).map(savedTab);
  while (kept.length > 0) {
    try {
      localStorage.setItem(TABS_NAME, JSON.stringify({ activeTabId, tabs: kept }));
      return kept.length;
    } catch {
      kept = kept.slice(1);
    }
  }
  localStorage.removeItem(TABS_NAME);
  return 0;
}

export function loadTabs() {
  try {
    const saved = JSON.parse(localStorage.getItem(TABS_NAME) || "null");
    if (!saved || !Array.isArray(saved.tabs)) return { tabs: [], activeTabId: null };
    return saved;
  } catch {
    return { tabs: [], activeTabId: null };
  }
}

export function saveUi(ui) {
  try {
    localStorage.setItem(UI_NAME, JSON.stringify({ columns: ui.columns }));
  } catch {
    // storage full or disabled: the column choice is not worth an error
  }
}

export function loadUi() {
  try {
    return JSON.parse(localStorage.getItem(UI_NAME) || "null") || {};
  } catch {
    return {};
  }
}
