// The grouped lens switcher (issue 10 §1): one collapsible section per group with what it
// costs to switch to each lens, where each lens lives on each replica, preload and
// "analyse with every lens". Renders from store.state.groups / groupStatus / preload.
import { h, formatBytes, formatSeconds, replace } from "./dom.js";
import { loadedCount, residencyOf, switchEstimate } from "./lenses.js";
import { errorBox } from "./notices.js";

const GROUP_HELP =
  "A group is one base model and the lenses trained on it. Every replica of the group holds " +
  "the base model once and swaps only the small lens modules on top of it, so switching " +
  "between lenses of one group costs a copy from host RAM or a read of the lens file. A group " +
  "with no running replica must first start one and load its base (a cold start), which is " +
  "the expensive switch.";

const TIER_LABEL = {
  device: "on device",
  host: "host RAM",
  disk: "on disk",
  failed: "failed",
};

function estimateText(estimate) {
  const mark = estimate.source === "measured" ? "measured" : "est.";
  switch (estimate.kind) {
    case "ready":
      return "ready: no switch";
    case "host":
      return `switch ≈ ${formatSeconds(estimate.seconds)} from host RAM (${mark})`;
    case "disk":
      return `switch ≈ ${formatSeconds(estimate.seconds)} from disk (${mark})`;
    case "cold":
      return `cold start ≈ ${formatSeconds(estimate.seconds)} (${mark})`;
    default:
      return `load failed; a retry reads disk ≈ ${formatSeconds(estimate.seconds)}`;
  }
}

const SWITCH_HELP = {
  host: "a lens evicted from the device but kept in host RAM: a copy back to the device",
  disk: "a lens on disk only: a read of its tensors",
  cold: "no replica of the group is running: start one and load its base model, then the lens",
};

function switchSummary(group) {
  const est = group.estimated_switch_seconds || {};
  const src = (kind) => ((est.sources && est.sources[kind]) || est.source) === "measured" ? "measured" : "estimated";
  const item = (kind) =>
    h(
      "li",
      { class: `est est-${src(kind)}`, title: SWITCH_HELP[kind], dataset: { testid: `switch-${kind}`, source: src(kind) } },
      `${kind === "cold" ? "cold start" : `from ${kind}`} ≈ ${formatSeconds(est[kind])} `,
      h("span", { class: "est-source" }, src(kind) === "measured" ? "(measured)" : "(est.)"),
    );
  return h(
    "div",
    { class: "switch-summary", dataset: { testid: "group-switch-times" } },
    h("span", null, "switch to a lens: "),
    h("ul", null, item("host"), item("disk"), item("cold")),
  );
}

/** A "?" button and its tip; `open` (store.state.openHelp) keeps it open across re-renders. */
function helpButton(text, label, key, open) {
  const tip = h("span", { class: "help-tip", role: "tooltip", hidden: !open[key] }, text);
  const button = h(
    "button",
    {
      type: "button",
      class: "help",
      "aria-label": label,
      "aria-expanded": "false",
      title: text,
      onclick: (event) => {
        event.preventDefault();
        event.stopPropagation();
        tip.hidden = !tip.hidden;
        open[key] = !tip.hidden;
        button.setAttribute("aria-expanded", String(!tip.hidden));
      },
    },
    "?",
  );
  button.setAttribute("aria-expanded", String(!tip.hidden));
  return [button, tip];
}

function preloadNote(item) {
  if (!item) return null;
  const text = {
    loading: "loading…",
    ok: `loaded ${formatSeconds(item.seconds)} (${item.kind})`,
    failed: `failed: ${item.error?.code}`,
    unknown: "no answer",
  }[item.state];
  return h(
    "span",
    {
      class: `preload-note preload-${item.state}`,
      dataset: { testid: "preload-progress", state: item.state },
      title: item.error ? item.error.message : "",
    },
    text,
  );
}

function lensOption(state, group, lens, actions) {
  const status = state.groupStatus[group.group_id];
  const residency = residencyOf(group, lens, status && !status.error ? status : null);
  const estimate = switchEstimate(group, residency);
  const selected = state.selectedLensId === lens.lens_id;
  const preloadItem = state.preload[group.group_id]?.items?.[lens.lens_id];
  const replicas = residency.replicas.map((r) =>
    h(
      "span",
      {
        class: `replica-tier tier-${r.tier}`,
        dataset: { testid: "replica-residency", tier: r.tier },
        title: r.reason ? `replica ${r.replicaId}: ${r.reason}` : `replica ${r.replicaId}${r.device ? ` (${r.device})` : ""}`,
      },
      `${r.replicaId.slice(0, 6)}: ${TIER_LABEL[r.tier]}`,
    ),
  );
  return h(
    "li",
    { class: "lens-item" },
    h(
      "button",
      {
        type: "button",
        class: `lens-option${selected ? " selected" : ""}`,
        role: "radio",
        "aria-checked": String(selected),
        dataset: { testid: "lens-option", lensId: lens.lens_id, residency: residency.tier },
        onclick: () => actions.selectLens(lens.lens_id),
      },
      h(
        "span",
        { class: "lens-head" },
        h("span", { class: `tier-dot tier-${residency.tier}`, "aria-hidden": "true" }),
        h("span", { class: "lens-name" }, lens.name),
        h("span", { class: `badge tier-${residency.tier}`, dataset: { testid: "residency" } }, TIER_LABEL[residency.tier]),
      ),
      h(
        "span",
        { class: "lens-facts" },
        h("span", { title: "lens id" }, lens.lens_id),
        h("span", { title: "layer read by the lens" }, `layer ${lens.layer}`),
        lens.donor ? h("span", { title: "donor model whose activations the lens reads" }, `donor ${lens.donor}`) : null,
        h("span", { title: "lens tensor bytes" }, formatBytes(lens.bytes)),
        lens.t_text ? h("span", { title: "explanation length in tokens" }, `t=${lens.t_text}`) : null,
      ),
      h(
        "span",
        {
          class: `switch-estimate est-${estimate.source}`,
          dataset: { testid: "switch-estimate", kind: estimate.kind, source: estimate.source },
        },
        estimateText(estimate),
      ),
      residency.reason
        ? h("span", { class: "lens-failure", dataset: { testid: "lens-failure" } }, residency.reason)
        : null,
      replicas.length ? h("span", { class: "replicas" }, replicas) : null,
      preloadNote(preloadItem),
    ),
  );
}

function groupSection(state, group, actions) {
  const status = state.groupStatus[group.group_id];
  const { loaded, total } = loadedCount(group, status && !status.error ? status : null);
  const full = total > 0 && loaded === total;
  const preloadState = state.preload[group.group_id];
  const memory = group.memory_estimate || {};
  const section = h(
    "details",
    {
      class: "group",
      open: !state.collapsed[group.group_id],
      dataset: { testid: "group", groupId: group.group_id },
      ontoggle: (event) => actions.toggleGroup(group.group_id, event.target.open),
    },
    h(
      "summary",
      null,
      h("span", { class: "group-name" }, group.name),
      " ",
      h(
        "span",
        {
          class: `badge ${full ? "loaded" : "partial"}`,
          dataset: { testid: "group-loaded", loaded: String(full) },
          title: "lenses on the device of a replica / lenses in the group",
        },
        full ? `all ${total} loaded` : `${loaded}/${total} loaded`,
      ),
      " ",
      h("span", { class: "badge replicas-badge", title: "running replicas" }, `${group.replicas_running} replica${group.replicas_running === 1 ? "" : "s"}`),
    ),
    h(
      "div",
      { class: "group-body" },
      h(
        "p",
        { class: "group-facts" },
        h("span", null, group.description),
        h("br"),
        h("span", { title: "base model" }, `base ${group.base_model}`),
        " · ",
        h("span", { title: "base / all lenses / donors" }, `memory ${formatBytes(memory.base_bytes)} + ${formatBytes(memory.lens_bytes_total)} lenses`),
        " ",
        ...helpButton(GROUP_HELP, `What is a group? (${group.name})`, group.group_id, state.openHelp),
      ),
      switchSummary(group),
      status && status.error ? errorBox(status.error, { context: `reading the status of ${group.group_id}` }) : null,
      h(
        "div",
        { class: "group-actions" },
        h(
          "button",
          {
            type: "button",
            dataset: { testid: "preload-button" },
            disabled: Boolean(preloadState?.running),
            "aria-label": `Preload every lens of ${group.name}`,
            onclick: () => actions.preload(group.group_id),
          },
          preloadState?.running ? "Preloading…" : "Preload",
        ),
        h(
          "button",
          {
            type: "button",
            dataset: { testid: "analyze-group-button" },
            "aria-label": `Analyse the input with every lens of ${group.name}`,
            title: "One tab per lens, all running at once",
            onclick: () => actions.analyzeGroup(group.group_id),
          },
          "Analyse with every lens",
        ),
      ),
      preloadState?.error ? errorBox(preloadState.error, { context: `preloading ${group.group_id}` }) : null,
      h(
        "ul",
        { class: "lens-list", role: "radiogroup", "aria-label": `lenses of ${group.name}` },
        group.lenses.filter((l) => l.visible !== false).map((lens) => lensOption(state, group, lens, actions)),
      ),
    ),
  );
  return section;
}

/** Mount the switcher into `root`. */
export function mountSwitcher(root, store, actions) {
  const body = h("div", { class: "switcher-body" });
  const stamp = h("span", { class: "refreshed", dataset: { testid: "refreshed" } });
  root.append(
    h(
      "div",
      { class: "panel-head" },
      h("h2", null, "Lenses"),
      stamp,
      h("button", { type: "button", onclick: () => actions.refresh(), "aria-label": "Refresh residency" }, "↻"),
    ),
    body,
  );

  function render(state) {
    const focused = document.activeElement?.closest?.("[data-testid]");
    const focusKey = focused && body.contains(focused)
      ? [focused.dataset.testid, focused.dataset.lensId || focused.closest("[data-group-id]")?.dataset.groupId]
      : null;
    const parts = [];
    if (state.groupsError) {
      parts.push(
        errorBox(state.groupsError, {
          context: "listing the groups (GET /api/v2/groups)",
          onRetry: () => actions.refresh(),
          onKey: () => document.querySelector("[data-testid=api-key-input]")?.focus(),
        }),
      );
    }
    if (state.groups === null && !state.groupsError) parts.push(h("p", { class: "muted" }, "Loading groups…"));
    for (const group of state.groups || []) parts.push(groupSection(state, group, actions));
    replace(body, parts);
    stamp.textContent = state.refreshedAt ? `updated ${new Date(state.refreshedAt).toLocaleTimeString()}` : "";
    if (focusKey) restoreFocus(body, focusKey);
  }

  store.subscribe(["groups", "selection", "preload"], render);
  render(store.state);
}

function restoreFocus(body, [testid, id]) {
  const selector = testid === "lens-option"
    ? `[data-testid="lens-option"][data-lens-id="${CSS.escape(id || "")}"]`
    : `[data-group-id="${CSS.escape(id || "")}"] [data-testid="${CSS.escape(testid)}"]`;
  body.querySelector(selector)?.focus();
}
