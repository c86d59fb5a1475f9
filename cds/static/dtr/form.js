// The clinician's DTR form: fetch the package, render it with LHC-Forms, mark what came from the record, submit,
// show the decision. No inline script anywhere: this module is the page's only code besides LHC-Forms itself.
// Every failure ends in the error panel (never a blank screen).

const ORIGIN = "http://hl7.org/fhir/us/davinci-dtr/StructureDefinition/information-origin";
const AUTO = new Set(["auto-server", "auto-client"]);
const LOAD_TIMEOUT_MS = 20000;
const DECISIONS = {
  approved: "Approved",
  "needs-information": "More information needed",
  "not-covered": "Not covered",
  "dose-review": "Sent to dose review",
  "off-label-review": "Sent to off-label review",
  "documentation-required": "Documentation required",
};
const STATES = { met: "Met", "not-met": "Not met", unknown: "Unknown" };

const root = document.getElementById("dtr");
const token = new URLSearchParams(window.location.search).get("t") || "";
const state = { questionnaire: null, prefilled: null, busy: false };

function $(id) {
  return document.getElementById(id);
}

function setStatus(text) {
  const status = $("status");
  if (status) {
    status.textContent = text;
    status.hidden = !text;
  }
}

// -- errors ------------------------------------------------------------------------------------------------------

class PageError extends Error {
  constructor(message, details = []) {
    super(message);
    this.details = details;
  }
}

function showError(message, details = []) {
  const panel = $("errors");
  $("error-text").textContent = message;
  const list = $("error-list");
  list.replaceChildren(
    ...details.map((d) => {
      const li = document.createElement("li");
      li.textContent = d;
      return li;
    }),
  );
  panel.hidden = false;
  setStatus("");
  panel.focus();
}

function clearError() {
  $("errors").hidden = true;
  $("error-list").replaceChildren();
}

function fail(err) {
  if (err instanceof PageError) {
    showError(err.message, err.details);
  } else {
    showError("The form stopped working: " + (err && err.message ? err.message : String(err)));
  }
}

window.addEventListener("error", (event) => fail(event.error || event.message));
window.addEventListener("unhandledrejection", (event) => fail(event.reason));

function outcomeMessages(body) {
  if (!body || body.resourceType !== "OperationOutcome" || !Array.isArray(body.issue)) return [];
  return body.issue
    .map((i) => {
      const text = (i.details && i.details.text) || i.diagnostics || i.code || "";
      const where = Array.isArray(i.expression) && i.expression.length ? ` (${i.expression.join(", ")})` : "";
      return text + where;
    })
    .filter(Boolean);
}

async function call(url, options, what) {
  let resp;
  try {
    resp = await fetch(url, {
      ...options,
      headers: { Accept: "application/json", "X-Form-Link": token, ...(options.headers || {}) },
      credentials: "same-origin",
      cache: "no-store",
      referrerPolicy: "no-referrer",
    });
  } catch (err) {
    throw new PageError(`Could not reach the service to ${what}. Check the network connection and try again.`);
  }
  let body = null;
  try {
    body = await resp.json();
  } catch (err) {
    body = null;
  }
  if (!resp.ok) {
    const messages = outcomeMessages(body);
    if (resp.status === 401) {
      throw new PageError("This form link is not valid. Open the form again from the order in the EHR.");
    }
    throw new PageError(
      messages.length === 1 ? messages[0] : `The service could not ${what} (HTTP ${resp.status}).`,
      messages.length > 1 ? messages : [],
    );
  }
  if (body === null) throw new PageError(`The service answered, but not in JSON, when asked to ${what}.`);
  return body;
}

// -- loading LHC-Forms ---------------------------------------------------------------------------------------------

function withTimeout(promise, ms, message) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new PageError(message)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

async function formLibrary() {
  const missing = "The form library (LHC-Forms) did not load, so the form cannot be shown. Reload the page; if this " +
    "persists, the service's installation is incomplete.";
  if (!window.LForms || !window.LForms.Util || !window.LForms.FHIR || !window.LForms.FHIR.R4) {
    throw new PageError(missing);
  }
  await withTimeout(customElements.whenDefined("wc-lhc-form"), LOAD_TIMEOUT_MS, missing);
  return window.LForms;
}

// -- the package ---------------------------------------------------------------------------------------------------

function walk(items, visit) {
  for (const item of items || []) {
    visit(item);
    walk(item.item, visit);
    for (const answer of item.answer || []) walk(answer.item, visit);
  }
}

function originOf(answer) {
  const ext = (answer.extension || []).find((e) => e.url === ORIGIN);
  const source = ext && (ext.extension || []).find((e) => e.url === "source");
  return source ? source.valueCode : null;
}

// linkId -> the answers the service prefilled (with their origin)
function prefilledAnswers(qr) {
  const found = new Map();
  walk(qr && qr.item, (item) => {
    if (item.answer && item.answer.length) found.set(item.linkId, item.answer);
  });
  return found;
}

function valueKey(answer) {
  const name = Object.keys(answer).find((k) => k.startsWith("value"));
  if (!name) return "";
  const v = answer[name];
  if (name === "valueCoding") return `${name}:${v.system || ""}|${v.code || ""}`;
  if (name === "valueQuantity") return `${name}:${Number(v.value)}|${v.code || v.unit || ""}`;
  if (name === "valueDecimal" || name === "valueInteger") return `${name}:${Number(v)}`;
  return `${name}:${JSON.stringify(v)}`;
}

function fillHeader(header) {
  $("title").textContent = header.title;
  if (header.publisher) $("publisher").textContent = `${header.publisher} · prior authorization`;
  const policy = header.policy;
  const parts = [];
  if (header.drug) parts.push(`Drug: ${header.drug}`);
  if (policy) parts.push(`Policy ${policy.number}: ${policy.title}`);
  $("subtitle").textContent = parts.join(" · ") || header.description || "";
  if (policy) {
    const link = $("policy-link");
    link.textContent = `${policy.number} (${policy.ref}) as encoded`;
    link.href = policy.url;
    $("policy-line").hidden = false;
  }
  const n = header.asked.length;
  $("asked").textContent =
    n === 0
      ? "The record settled every criterion; only your attestation is asked."
      : `This form asks about ${n === 1 ? "one policy criterion" : `${n} policy criteria`} the record did not ` +
        `settle (${header.asked.map((q) => q.linkId).join(", ")}); questions that do not apply to the answers ` +
        "given stay hidden.";
}

// -- marking answers from the record -------------------------------------------------------------------------------

// LHC-Forms gives each item's element the id "item-<linkId path>/<repetition>" (nested items: the parents' path first)
function itemElements(container, linkId) {
  return Array.from(container.querySelectorAll("lhc-item[id^='item-'], .lhc-item[id^='item-']")).filter((el) => {
    const path = el.id.slice("item-".length).replace(/\/[0-9]+$/, "");
    return path === linkId || path.endsWith(`/${linkId}`);
  });
}

// linkId -> "record" (answered as the record had it) | "changed" (the record's answer was changed or cleared)
function currentMarks(LForms, container) {
  const marks = new Map();
  let now = null;
  try {
    now = prefilledAnswers(LForms.Util.getFormFHIRData("QuestionnaireResponse", "R4", container));
  } catch (err) {
    now = null; // while LHC-Forms re-renders; the next change marks again
  }
  for (const [linkId, answers] of state.prefilled) {
    if (!answers.some((a) => AUTO.has(originOf(a)))) continue;
    const given = now ? now.get(linkId) || [] : answers;
    const same = given.length === answers.length && given.every((g) => answers.some((a) => valueKey(a) === valueKey(g)));
    marks.set(linkId, same ? "record" : "changed");
  }
  return marks;
}

function setBadge(el, mark) {
  const label = el.querySelector(".lhc-de-label label") || el;
  let badge = label.querySelector(".badge-origin");
  if (!badge) {
    badge = document.createElement("span");
    label.append(" ", badge);
  }
  const text = mark === "record" ? "from the record" : "changed: your answer";
  if (badge.textContent !== text) badge.textContent = text;
  badge.className = `badge badge-origin ${mark === "record" ? "badge-record" : "badge-changed"}`;
  el.dataset.origin = mark;
}

function markPrefilled(LForms, container) {
  const marks = currentMarks(LForms, container);
  for (const [linkId, mark] of marks) {
    for (const el of itemElements(container, linkId)) setBadge(el, mark);
  }
  $("record-legend").hidden = marks.size === 0;
}

// Marks again after each change (the clinician's answers, and LHC-Forms re-rendering items it shows or hides)
function keepMarking(LForms, container) {
  let pending = false;
  const again = () => {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => {
      pending = false;
      observer.disconnect();
      markPrefilled(LForms, container);
      observer.observe(container, { childList: true, subtree: true });
    });
  };
  const observer = new MutationObserver(again);
  observer.observe(container, { childList: true, subtree: true });
  for (const type of ["change", "input", "click", "keyup"]) container.addEventListener(type, again);
}

// -- submitting ----------------------------------------------------------------------------------------------------

function originExtension(source, author) {
  const ext = [{ url: "source", valueCode: source }];
  if (author && (source === "override" || source === "manual")) ext.push({ url: "author", valueReference: author });
  return { url: ORIGIN, extension: ext };
}

// The answers the clinician left as the record had them keep their automatic origin; an answer changed is
// "override", one given where the record suggested nothing is "manual" (the service checks this again).
function markOrigins(response, prefilled, author) {
  walk(response.item, (item) => {
    const before = prefilled.get(item.linkId) || [];
    for (const answer of item.answer || []) {
      const same = before.find((b) => valueKey(b) === valueKey(answer));
      const kept = same && AUTO.has(originOf(same)) ? originOf(same) : null;
      const source = kept || (before.length ? "override" : "manual");
      answer.extension = (answer.extension || []).filter((e) => e.url !== ORIGIN);
      answer.extension.push(originExtension(source, author));
    }
  });
  return response;
}

function completedResponse(LForms, container) {
  const filled = LForms.Util.getFormFHIRData("QuestionnaireResponse", "R4", container);
  const draft = state.draft || {};
  const response = {
    resourceType: "QuestionnaireResponse",
    ...(draft.meta ? { meta: draft.meta } : {}),
    ...(draft.extension ? { extension: draft.extension } : {}),
    ...(draft.identifier ? { identifier: draft.identifier } : {}),
    questionnaire: draft.questionnaire || filled.questionnaire || state.canonical,
    status: "completed",
    ...(draft.subject ? { subject: draft.subject } : {}),
    authored: new Date().toISOString(),
    ...(draft.author ? { author: draft.author } : {}),
    item: filled.item || [],
  };
  return markOrigins(response, state.prefilled, draft.author || null);
}

function validityProblems(LForms, container) {
  const problems = LForms.Util.checkValidity(container);
  return Array.isArray(problems) ? problems : [];
}

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  row.append(td);
  return td;
}

function showDecision(result) {
  const section = $("decision");
  $("decision-label").textContent = DECISIONS[result.decision] || result.decision;
  $("decision-label").dataset.decision = result.decision;
  $("decision-summary").textContent = result.summary || "";
  const pa = $("pa-number");
  pa.hidden = !result.paId;
  $("pa-id").textContent = result.paId || "";
  const body = $("criteria").querySelector("tbody");
  body.replaceChildren(
    ...(result.criteria || []).map((c) => {
      const row = document.createElement("tr");
      row.dataset.criterion = c.id;
      cell(row, c.id, "id");
      const text = cell(row, c.text);
      if (c.note) {
        const note = document.createElement("span");
        note.className = "note";
        note.textContent = c.note;
        text.append(note);
      }
      cell(row, STATES[c.state] || c.state, `state state-${c.state}`);
      cell(row, (c.evidence || []).join("; ") || "—");
      return row;
    }),
  );
  if (result.policy && result.policy.url) {
    const link = $("decision-policy");
    link.href = result.policy.url;
    link.textContent = `${result.policy.title || "The policy"} (${result.policy.ref})`;
  }
  $("form-section").hidden = true;
  section.hidden = false;
  setStatus("");
  section.focus();
}

async function onSubmit(LForms, container) {
  if (state.busy) return;
  clearError();
  const problems = validityProblems(LForms, container);
  if (problems.length) {
    showError("Some answers are missing or not valid; nothing was sent.", problems);
    return;
  }
  const button = $("submit");
  state.busy = true;
  button.disabled = true;
  button.setAttribute("aria-busy", "true");
  root.setAttribute("aria-busy", "true");
  button.textContent = "Submitting…";
  setStatus("Submitting your answers…");
  try {
    const response = completedResponse(LForms, container);
    const result = await call(
      root.dataset.submitUrl,
      { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(response) },
      "take the answers",
    );
    showDecision(result);
  } catch (err) {
    fail(err);
  } finally {
    state.busy = false;
    button.disabled = false;
    button.removeAttribute("aria-busy");
    root.removeAttribute("aria-busy");
    button.textContent = "Sign and submit";
  }
}

// -- start ---------------------------------------------------------------------------------------------------------

async function start() {
  const data = await call(root.dataset.packageUrl, { method: "GET" }, "load the form");
  fillHeader(data.header);
  const LForms = await formLibrary();
  state.questionnaire = data.questionnaire;
  state.canonical = `${data.questionnaire.url}|${data.questionnaire.version}`;
  state.draft = data.response;
  state.prefilled = prefilledAnswers(data.response);
  const container = $("formContainer");
  const options = { fhirVersion: "R4" };
  if (data.response) options.questionnaireResponse = data.response;
  setStatus("Rendering the form…");
  $("form-section").hidden = false;
  await withTimeout(
    LForms.Util.addFormToPage(data.questionnaire, container, options),
    LOAD_TIMEOUT_MS,
    "The form library could not render this form.",
  );
  markPrefilled(LForms, container);
  keepMarking(LForms, container);
  $("submit").addEventListener("click", () => onSubmit(LForms, container));
  root.dataset.ready = "true";
  setStatus("");
}

if (root && root.dataset.packageUrl) {
  start().catch(fail);
}
