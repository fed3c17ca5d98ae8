// The input panel (issue 10 §2): plain text or chat messages (a message editor; pasted chat
// JSON switches to it), every v2 analysis option with its bounds, and generation.
// Fields write to store.state.input as they change; the panel re-renders only the parts that
// depend on other state (lens name, messages list, problems, continuations).
import { h, replace } from "./dom.js";
import { findLens } from "./lenses.js";
import { errorBox } from "./notices.js";
import { BOUNDS } from "./request.js";

const ROLES = ["system", "user", "assistant"];

function numberInput(store, group, name, label, { step = "1", placeholder = "", help = "" } = {}) {
  const bounds = BOUNDS[name];
  const input = h("input", {
    type: "number",
    name,
    min: bounds ? String(bounds.min) : null,
    max: bounds && bounds.max < 1e9 ? String(bounds.max) : null,
    step,
    placeholder,
    "aria-label": label,
    dataset: { testid: `${group === "options" ? "opt" : "gen"}-${name}` },
    value: store.state.input[group][name],
    oninput: (event) => {
      store.state.input[group][name] = event.target.value;
    },
  });
  return h("label", { class: "opt", title: help }, h("span", null, label), input);
}

function checkbox(store, name, label, help) {
  return h(
    "label",
    { class: "opt opt-check", title: help },
    h("input", {
      type: "checkbox",
      name,
      checked: Boolean(store.state.input.options[name]),
      dataset: { testid: `opt-${name}` },
      onchange: (event) => {
        store.state.input.options[name] = event.target.checked;
      },
    }),
    h("span", null, label),
  );
}

function optionsFieldset(store) {
  const o = store.state.input.options;
  const batchManual = h("input", {
    type: "number",
    min: "1",
    max: "512",
    step: "1",
    "aria-label": "batch size",
    dataset: { testid: "opt-batch_size" },
    value: o.batch_size,
    disabled: o.batch_size === "",
    oninput: (event) => {
      o.batch_size = event.target.value;
    },
  });
  const batchAuto = h("input", {
    type: "checkbox",
    checked: o.batch_size === "",
    "aria-label": "automatic batch size",
    dataset: { testid: "opt-batch-auto" },
    onchange: (event) => {
      batchManual.disabled = event.target.checked;
      o.batch_size = event.target.checked ? "" : batchManual.value || "8";
      batchManual.value = o.batch_size;
    },
  });
  return h(
    "fieldset",
    { class: "options" },
    h("legend", null, "Analysis options"),
    numberInput(store, "options", "temperature", "temperature", { step: "0.1", help: "0–2; 0 = greedy" }),
    numberInput(store, "options", "seed", "seed", { placeholder: "random", help: "blank: a random seed, shown in the result" }),
    numberInput(store, "options", "best_of_k", "best of k", { help: "1–64 explanations sampled per token; the best reconstruction wins" }),
    numberInput(store, "options", "optimize_temperature", "best-of-k temperature", {
      step: "0.1",
      placeholder: "default",
      help: "(0, 2]; blank: the temperature, or 1 when it is 0",
    }),
    h(
      "span",
      { class: "opt", title: "Positions per batch, 1–512; auto: the lens's default" },
      h("span", null, "batch size"),
      h("label", { class: "inline" }, batchAuto, " auto"),
      batchManual,
    ),
    checkbox(store, "calculate_salience", "salience", "Colour explanation words by how much each one matters"),
    checkbox(store, "logit_lens", "logit lens", "Top tokens of the LM head applied to the activation"),
    checkbox(store, "kl", "KL", "KL divergence of next-token predictions with the reconstructed activation"),
    numberInput(store, "options", "last_n_messages", "last n messages", {
      placeholder: "all",
      help: "Chat only: analyse the tokens of the last N messages",
    }),
    h(
      "label",
      { class: "opt opt-wide", title: "Positions to analyse, e.g. 0-10, 15; blank: all" },
      h("span", null, "positions"),
      h("input", {
        type: "text",
        placeholder: "all, or e.g. 0-10, 15",
        dataset: { testid: "opt-positions" },
        value: o.positions,
        oninput: (event) => {
          o.positions = event.target.value;
        },
      }),
    ),
  );
}

function messageEditor(store, rerender) {
  const messages = store.state.input.messages;
  const rows = messages.map((message, index) =>
    h(
      "li",
      { class: "message", dataset: { testid: "chat-message" } },
      h(
        "select",
        {
          "aria-label": `role of message ${index + 1}`,
          onchange: (event) => {
            message.role = event.target.value;
          },
        },
        ROLES.map((role) => h("option", { value: role, selected: role === message.role }, role)),
      ),
      h("textarea", {
        "aria-label": `content of message ${index + 1}`,
        rows: "2",
        value: message.content,
        oninput: (event) => {
          message.content = event.target.value;
        },
      }),
      h(
        "button",
        {
          type: "button",
          "aria-label": `remove message ${index + 1}`,
          onclick: () => {
            messages.splice(index, 1);
            rerender();
          },
        },
        "×",
      ),
    ),
  );
  const nextRole = messages.length && messages[messages.length - 1].role === "user" ? "assistant" : "user";
  return h(
    "div",
    { class: "chat-editor" },
    h("ol", { class: "messages" }, rows),
    h(
      "button",
      {
        type: "button",
        dataset: { testid: "add-message" },
        onclick: () => {
          messages.push({ role: nextRole, content: "" });
          rerender();
        },
      },
      `+ ${nextRole} message`,
    ),
  );
}

function continuationsView(state, actions) {
  const c = state.continuations;
  if (c.running) return h("p", { class: "muted", dataset: { testid: "generate-running" } }, "Generating…");
  const parts = [];
  if (c.error) parts.push(errorBox(c.error, { context: `generating with ${c.lensId}`, onRetry: () => actions.generate(c.lensId) }));
  if (c.items.length) {
    parts.push(
      h(
        "ol",
        { class: "continuations", "aria-label": "continuations" },
        c.items.map((item, index) =>
          h(
            "li",
            { class: c.picked === index ? "picked" : "" },
            h(
              "button",
              {
                type: "button",
                class: "continuation",
                dataset: { testid: "continuation", index: String(index) },
                title: "Add this continuation to the input",
                onclick: () => actions.pickContinuation(index),
              },
              h("span", { class: "prompt-end" }, "…"),
              h("span", { class: "continuation-text" }, item.text),
            ),
            h(
              "button",
              {
                type: "button",
                dataset: { testid: "continuation-analyze" },
                "aria-label": `add continuation ${index + 1} and analyse`,
                onclick: () => actions.pickContinuation(index, { thenAnalyze: true }),
              },
              "Use and analyse",
            ),
          ),
        ),
      ),
    );
  }
  return parts;
}

/** Mount the input panel into `root`. */
export function mountInput(root, store, actions) {
  const state = store.state;
  const textArea = h("textarea", {
    id: "text-input",
    rows: "5",
    "aria-label": "text to analyse",
    dataset: { testid: "text-input" },
    value: state.input.text,
    oninput: (event) => {
      state.input.text = event.target.value;
    },
    onpaste: (event) => {
      const pasted = event.clipboardData?.getData("text/plain") ?? "";
      const whole = textArea.value.trim() === "" || textArea.selectionStart === 0 && textArea.selectionEnd === textArea.value.length;
      if (whole && actions.pasteMaybeMessages(pasted)) event.preventDefault();
    },
  });
  const chatBox = h("div", { class: "chat-box" });
  const notice = h("div", { class: "notice", role: "status", dataset: { testid: "input-notice" } });
  const problems = h("ul", { class: "problems", role: "alert", dataset: { testid: "input-problems" } });
  const continuations = h("div", { class: "continuations-box" });
  const modeRadios = ["text", "chat"].map((mode) =>
    h(
      "label",
      { class: "inline" },
      h("input", {
        type: "radio",
        name: "input-mode",
        value: mode,
        dataset: { testid: `mode-${mode}` },
        checked: state.input.mode === mode,
        onchange: () => {
          store.update(["input"], (s) => {
            s.input.mode = mode;
          });
        },
      }),
      mode === "text" ? " Text" : " Chat messages",
    ),
  );
  const analyzeButton = h("button", {
    type: "button",
    class: "primary",
    dataset: { testid: "analyze-button" },
    onclick: () => actions.analyze(),
  }, "Analyse");
  const generateButton = h("button", {
    type: "button",
    dataset: { testid: "generate-button" },
    onclick: () => actions.generate(),
  }, "Generate");

  root.append(
    h(
      "details",
      { class: "input-panel", open: true },
      h("summary", null, h("h2", null, "Input")),
      h("div", { class: "modes", role: "radiogroup", "aria-label": "input kind" }, modeRadios),
      h("div", { class: "text-box" }, textArea, h("p", { class: "muted small" }, "Paste chat JSON ([{\"role\", \"content\"}, …] or {\"messages\": […]}) to switch to the message editor.")),
      chatBox,
      notice,
      optionsFieldset(store),
      problems,
      h("div", { class: "run-row" }, analyzeButton, h("span", { class: "muted small", dataset: { testid: "selected-lens" } })),
      h(
        "fieldset",
        { class: "generate" },
        h("legend", null, "Generate continuations from the lens's activation model, pick one, analyse it"),
        numberInput(store, "generate", "max_new_tokens", "new tokens", { help: "1–1024" }),
        numberInput(store, "generate", "num_continuations", "continuations", { help: "1–16" }),
        numberInput(store, "generate", "temperature", "temperature", { step: "0.1", help: "0–2; 0 = greedy" }),
        numberInput(store, "generate", "seed", "seed", { placeholder: "random" }),
        generateButton,
        continuations,
      ),
    ),
  );

  function renderMode(s) {
    const chat = s.input.mode === "chat";
    textArea.parentElement.hidden = chat;
    chatBox.hidden = !chat;
    for (const radio of root.querySelectorAll("input[name=input-mode]")) radio.checked = radio.value === s.input.mode;
    const lastN = root.querySelector("[data-testid=opt-last_n_messages]");
    if (lastN) lastN.disabled = !chat;
    if (chat) replace(chatBox, messageEditor(store, () => renderMode(store.state)));
    const undo = s.input.canUndoPaste
      ? h("button", { type: "button", class: "link", onclick: () => actions.undoPaste(s.input.previousPasted || "") }, "keep it as text instead")
      : null;
    replace(notice, s.input.notice ? [s.input.notice, " ", undo] : []);
  }

  function renderText(s) {
    if (textArea.value !== s.input.text) textArea.value = s.input.text;
  }

  function renderProblems(s) {
    replace(problems, s.input.problems.map((p) => h("li", null, p)));
  }

  function renderSelection(s) {
    const found = findLens(s.groups, s.selectedLensId);
    const name = found ? found.lens.name : s.selectedLensId;
    analyzeButton.textContent = name ? `Analyse with ${name}` : "Analyse";
    analyzeButton.disabled = !s.selectedLensId;
    generateButton.textContent = name ? `Generate with ${name}` : "Generate";
    generateButton.disabled = !s.selectedLensId || s.continuations.running;
    root.querySelector("[data-testid=selected-lens]").textContent = found
      ? `group ${found.group.name}, layer ${found.lens.layer}`
      : "pick a lens on the left";
  }

  store.subscribe(["input"], (s) => {
    renderMode(s);
    renderText(s);
  });
  store.subscribe(["input-text"], renderText);
  store.subscribe(["input-problems"], renderProblems);
  store.subscribe(["selection", "groups"], renderSelection);
  store.subscribe(["continuations"], (s) => {
    replace(continuations, continuationsView(s, actions));
    renderSelection(s);
  });
  renderMode(state);
  renderSelection(state);
}
