// The operator console: every view is an admin action on POST /api/v1
// (the session cookie of POST /api/login), the live strip follows
// GET /api/events. No framework, no build step; data goes into the page as
// text only (textContent), never as markup.
"use strict";

const $ = (id) => document.getElementById(id);
const PAGE_SIZE = 20;
const state = { me: null, products: [], pages: {}, details: null, events: null };

// ---- the API ---------------------------------------------------------------

class ApiError extends Error {
  constructor(body) {
    super(body.Message || body.Code || "request failed");
    this.body = body;
  }
}

async function post(path, body) {
  const r = await fetch(path, {
    method: "POST",
    credentials: "same-origin",
    headers: { "Content-Type": "application/json", "X-Requested-With": "console" },
    body: JSON.stringify(body),
  });
  let json;
  try {
    json = await r.json();
  } catch (e) {
    json = { Code: "HTTP" + r.status, Message: r.statusText };
  }
  if (r.status === 401 && path !== "/api/login") {
    showLogin("Your session has ended; log in again.");
  }
  return json;
}

// One admin action: its answer, or an ApiError with the answer.
async function call(action, params) {
  const body = await post("/api/v1", Object.assign({ Action: action }, params || {}));
  if (body.Code !== "OK") throw new ApiError(body);
  return body;
}

const may = (action) => !!state.me && state.me.Actions.includes(action);

// ---- small DOM helpers -------------------------------------------------------

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function row(cells) {
  const tr = el("tr");
  for (const c of cells) {
    const td = el("td");
    if (c instanceof Node) td.appendChild(c);
    else td.textContent = c === null || c === undefined ? "" : String(c);
    tr.appendChild(td);
  }
  return tr;
}

function fill(tableId, rows, emptyText) {
  const tbody = $(tableId).querySelector("tbody");
  tbody.replaceChildren();
  for (const r of rows) tbody.appendChild(r);
  if (rows.length === 0) {
    const cols = $(tableId).querySelectorAll("thead th").length;
    const td = el("td", emptyText || "Nothing found.", "empty");
    td.colSpan = cols;
    tbody.appendChild(el("tr")).appendChild(td);
  }
}

function showError(where, e) {
  const p = $(where);
  p.textContent = e instanceof ApiError ? `${e.body.Code}: ${e.body.Message}` : String(e);
  p.hidden = false;
}

const validity = (a) => (a && a.ValiditySeconds ? duration(a.ValiditySeconds) : "–");
function duration(s) {
  if (s % 86400 === 0) return `${s / 86400} d`;
  if (s % 3600 === 0) return `${s / 3600} h`;
  return `${s} s`;
}
const orders = (list) => (list || []).map((o) => `${o.OrderId} ×${o.Quantity}`).join(", ");

// A pager under a table: page numbers of `key`, calling `load(page)`.
function pager(key, answer, load) {
  const div = document.querySelector(`.pager[data-for="${key}"]`);
  div.replaceChildren();
  const pages = Math.max(1, Math.ceil(answer.TotalRecordCount / answer.PageSize));
  const prev = el("button", "‹ Previous");
  prev.type = "button";
  prev.disabled = answer.PageNumber <= 1;
  prev.onclick = () => load(answer.PageNumber - 1);
  const next = el("button", "Next ›");
  next.type = "button";
  next.disabled = answer.PageNumber >= pages;
  next.onclick = () => load(answer.PageNumber + 1);
  div.append(prev, el("span", ` page ${answer.PageNumber} of ${pages} · ${answer.TotalRecordCount} records `), next);
}

// ---- login -------------------------------------------------------------------

function showLogin(message) {
  state.me = null;
  if (state.events) state.events.close();
  state.events = null;
  $("app").hidden = true;
  $("who").hidden = true;
  $("login").hidden = false;
  const err = $("login-error");
  err.hidden = !message;
  err.textContent = message || "";
  $("login-account").focus();
}

async function loggedIn(me) {
  state.me = me;
  $("login").hidden = true;
  $("app").hidden = false;
  $("who").hidden = false;
  $("who-name").textContent = me.Account;
  $("who-role").textContent = me.Role;
  for (const b of document.querySelectorAll("[data-action]")) {
    b.disabled = !may(b.dataset.action);
  }
  startEvents();
  await refresh();
}

$("login-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  $("login-submit").disabled = true;
  try {
    const body = await post("/api/login", {
      Account: $("login-account").value,
      Password: $("login-password").value,
    });
    if (body.Code === "OK") {
      $("login-password").value = "";
      await loggedIn(body);
    } else {
      showLogin(body.Message || "Login failed");
    }
  } finally {
    $("login-submit").disabled = false;
  }
});

$("logout").addEventListener("click", async () => {
  await post("/api/logout", {});
  showLogin("Logged out.");
});

// ---- counters ------------------------------------------------------------------

async function loadSummary() {
  const s = await call("DescribeActivationSummary");
  $("card-total").textContent = s.Total;
  $("card-consumed").textContent = s.Consumed;
  $("card-available").textContent = s.Available;
  $("card-unassigned").textContent = s.Unassigned;
  $("card-near-expiry").textContent = s.NearExpiry;
  $("card-near-days").textContent = `(${s.NearExpiryWithinDays} d)`;
  $("card-forfeited").textContent = s.Forfeited;
  $("forfeited-line").hidden = !s.Forfeited;
}

async function refresh() {
  const jobs = [loadSummary(), loadProducts(state.pages.products || 1)];
  const tab = currentTab();
  if (tab === "assignments") jobs.push(loadAssignments(state.pages.assignments || 1));
  if (tab === "near") jobs.push(loadNear(state.pages.near || 1));
  if (tab === "unassigned") jobs.push(loadUnassigned());
  if (tab === "details" && state.details) jobs.push(loadDetails(state.pages.details || 1));
  const results = await Promise.allSettled(jobs);
  for (const r of results) if (r.status === "rejected") console.warn(r.reason);
}
$("refresh").addEventListener("click", refresh);

// ---- tabs ----------------------------------------------------------------------

function currentTab() {
  const b = document.querySelector("#tabs button.active");
  return b ? b.dataset.tab : "products";
}

function showTab(name) {
  for (const b of document.querySelectorAll("#tabs button")) {
    b.classList.toggle("active", b.dataset.tab === name);
  }
  for (const p of document.querySelectorAll("section.tab")) {
    p.hidden = p.id !== `pane-${name}`;
  }
  if (name === "assignments") loadAssignments(1).catch(console.warn);
  if (name === "near") loadNear(1).catch(console.warn);
  if (name === "unassigned") loadUnassigned().catch(console.warn);
  if (name === "products") loadProducts(1).catch(console.warn);
}
for (const b of document.querySelectorAll("#tabs button")) {
  b.addEventListener("click", () => showTab(b.dataset.tab));
}

// ---- products --------------------------------------------------------------------

async function loadProducts(page) {
  const params = { PageNumber: page, PageSize: PAGE_SIZE };
  const name = $("products-name").value.trim();
  const key = $("products-key").value.trim();
  if (name) params.Name = name;
  if (key) params.ProductKey = key;
  const answer = await call("DescribeProducts", params);
  state.pages.products = page;
  state.products = answer.Items;
  fill(
    "products-table",
    answer.Items.map((p) => {
      const sw = el("input");
      sw.type = "checkbox";
      sw.checked = p.AutoRenewal;
      sw.disabled = !may("SetAutoRenewal");
      sw.dataset.product = p.ProductKey;
      sw.className = "renewal-switch";
      sw.onchange = () => setRenewal(p.ProductKey, sw.checked, sw);
      const open = el("button", "Details");
      open.type = "button";
      open.dataset.product = p.ProductKey;
      open.onclick = () => openDetails(p);
      const r = row([p.ProductKey, p.Name, p.Total, p.Consumed, p.Available, validity(p.Allowance), sw, open]);
      r.dataset.product = p.ProductKey;
      return r;
    }),
    "No products.",
  );
  pager("products", answer, (n) => loadProducts(n).catch(console.warn));
}
$("products-filter").addEventListener("submit", (ev) => {
  ev.preventDefault();
  loadProducts(1).catch(console.warn);
});

async function setRenewal(pk, enabled, input) {
  input.disabled = true;
  try {
    await call("SetAutoRenewal", { ProductKey: pk, Enabled: enabled });
  } catch (e) {
    input.checked = !enabled;
    alert(e.message);
  } finally {
    input.disabled = !may("SetAutoRenewal");
  }
  for (const s of document.querySelectorAll(`input.renewal-switch[data-product="${CSS.escape(pk)}"]`)) {
    s.checked = input.checked;
  }
  if (state.details && state.details.ProductKey === pk) {
    await loadRenewal().catch(console.warn);
  }
}

// ---- assignment history, near expiry, unassigned ---------------------------------------

async function loadAssignments(page) {
  const params = { PageNumber: page, PageSize: PAGE_SIZE };
  const key = $("assignments-key").value.trim();
  const name = $("assignments-name").value.trim();
  if (key) params.ProductKey = key;
  if (name) params.ProductName = name;
  const answer = await call("DescribeAssignmentHistory", params);
  state.pages.assignments = page;
  fill(
    "assignments-table",
    answer.Items.map((a) => row([a.GmtCreated, a.ProductKey, a.ProductName, a.Quantity, validity(a.Allowance), orders(a.Orders)])),
    "No assignments yet.",
  );
  pager("assignments", answer, (n) => loadAssignments(n).catch(console.warn));
}
$("assignments-filter").addEventListener("submit", (ev) => {
  ev.preventDefault();
  loadAssignments(1).catch(console.warn);
});

async function loadNear(page) {
  const params = { PageNumber: page, PageSize: PAGE_SIZE };
  const days = $("near-days").value.trim();
  const key = $("near-key").value.trim();
  const dev = $("near-device").value.trim();
  if (days) params.WithinDays = Number(days);
  if (key) params.ProductKey = key;
  if (dev) params.DeviceKey = dev;
  const answer = await call("DescribeNearExpiryDevices", params);
  state.pages.near = page;
  fill(
    "near-table",
    answer.Items.map((c) => row([c.ProductKey, c.DeviceKey, c.ActivateAt, c.ExpireAt, c.Kind, c.OrderId])),
    `No device expires within ${answer.WithinDays} days.`,
  );
  pager("near", answer, (n) => loadNear(n).catch(console.warn));
}
$("near-filter").addEventListener("submit", (ev) => {
  ev.preventDefault();
  loadNear(1).catch(console.warn);
});

async function loadUnassigned() {
  const answer = await call("DescribeUnassignedActivationCodes", { PageSize: 100 });
  fill(
    "unassigned-table",
    answer.Items.map((g) => row([validity(g.Allowance), g.Quantity, orders(g.Orders)])),
    "No unassigned codes.",
  );
}

// ---- product details ---------------------------------------------------------------------

function openDetails(p) {
  state.details = p;
  $("details-product").textContent = `${p.Name} (${p.ProductKey})`;
  $("tab-details").hidden = false;
  $("history").hidden = true;
  showTab("details");
  loadRenewal().catch(console.warn);
  loadDetails(1).catch(console.warn);
}

function day(id, end) {
  const v = $(id).value;
  return v ? `${v} ${end ? "23:59:59" : "00:00:00"}` : null;
}

async function loadDetails(page) {
  const pk = state.details.ProductKey;
  const params = { ProductKey: pk, PageNumber: page, PageSize: PAGE_SIZE };
  const dk = $("details-device-key").value.trim();
  if (dk) params.DeviceKey = dk;
  for (const [param, id, end] of [
    ["ActivateFrom", "details-activate-from", false],
    ["ActivateTo", "details-activate-to", true],
    ["ExpireFrom", "details-expire-from", false],
    ["ExpireTo", "details-expire-to", true],
  ]) {
    const v = day(id, end);
    if (v) params[param] = v;
  }
  const answer = await call("DescribeActivationCodes", params);
  state.pages.details = page;
  fill(
    "details-codes",
    answer.Items.map((c) => {
      const h = el("button", "History");
      h.type = "button";
      h.onclick = () => loadHistory(pk, c.DeviceKey).catch(console.warn);
      const r = row([c.Id, c.DeviceKey, c.Kind, c.ActivateAt, c.ExpireAt, c.OrderId, h]);
      r.dataset.device = c.DeviceKey;
      return r;
    }),
    "No activation codes match.",
  );
  pager("details", answer, (n) => loadDetails(n).catch(console.warn));
}
$("details-filter").addEventListener("submit", (ev) => {
  ev.preventDefault();
  loadDetails(1).catch((e) => alert(e.message));
});

async function loadHistory(pk, dk) {
  const answer = await call("DescribeActivationHistory", { ProductKey: pk, DeviceKey: dk, PageSize: 100 });
  $("history-device").textContent = dk;
  fill(
    "history-table",
    answer.Items.map((c) => row([c.Id, c.Kind, c.ActivateAt, c.ExpireAt, c.OrderId])),
    "No codes.",
  );
  $("history").hidden = false;
}

async function loadRenewal() {
  const pk = state.details.ProductKey;
  const r = await call("DescribeAutoRenewal", { ProductKey: pk });
  const sw = $("details-auto-renewal");
  sw.checked = r.Enabled;
  sw.dataset.product = pk;
  $("details-renewal-state").textContent = r.Enabled ? "on" : "off";
  const ul = $("blacklist");
  ul.replaceChildren();
  for (const dk of r.Blacklist) {
    const li = el("li", dk + " ");
    const b = el("button", "Remove");
    b.type = "button";
    b.disabled = !may("RemoveAutoRenewalBlacklist");
    b.onclick = async () => {
      try {
        await call("RemoveAutoRenewalBlacklist", { ProductKey: pk, DeviceKeys: [dk] });
      } catch (e) {
        alert(e.message);
      }
      await loadRenewal();
    };
    li.appendChild(b);
    ul.appendChild(li);
  }
  if (r.Blacklist.length === 0) ul.appendChild(el("li", "No device is blacklisted.", "hint"));
}

$("details-auto-renewal").addEventListener("change", (ev) => {
  setRenewal(state.details.ProductKey, ev.target.checked, ev.target).catch(console.warn);
});

$("blacklist-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const dk = $("blacklist-device").value.trim();
  if (!dk) return;
  try {
    await call("AddAutoRenewalBlacklist", { ProductKey: state.details.ProductKey, DeviceKeys: [dk] });
    $("blacklist-device").value = "";
  } catch (e) {
    alert(e.message);
  }
  await loadRenewal();
});

// ---- the Assign Activation Code dialog --------------------------------------------------

async function openAssign() {
  const select = $("assign-product");
  select.replaceChildren();
  const answer = await call("DescribeProducts", { PageSize: 100 });
  for (const p of answer.Items) {
    const o = el("option", `${p.Name} (${p.ProductKey}) — ${validity(p.Allowance)}`);
    o.value = p.ProductKey;
    o.dataset.validity = p.Allowance ? p.Allowance.ValiditySeconds : "";
    select.appendChild(o);
  }
  if (state.details) select.value = state.details.ProductKey;
  resetAssign();
  $("assign-dialog").showModal();
}

function resetAssign() {
  $("assign-preview").hidden = true;
  $("assign-error").hidden = true;
  $("assign-result").hidden = true;
  $("assign-confirm").disabled = true;
  const o = $("assign-product").selectedOptions[0];
  $("assign-validity-row").hidden = !!(o && o.dataset.validity);
}

function assignParams(dryRun) {
  const params = {
    ProductKey: $("assign-product").value,
    Quantity: Number($("assign-quantity").value),
    DryRun: dryRun,
  };
  const v = $("assign-validity").value.trim();
  if (!$("assign-validity-row").hidden && v) params.ValiditySeconds = Number(v);
  return params;
}

$("assign-open").addEventListener("click", () => openAssign().catch((e) => alert(e.message)));
$("assign-cancel").addEventListener("click", () => $("assign-dialog").close());
for (const id of ["assign-product", "assign-quantity", "assign-validity"]) {
  $(id).addEventListener("input", resetAssign);
}

$("assign-dry-run").addEventListener("click", async () => {
  resetAssign();
  // A dry run answers MaxAssignable even when the quantity is too large
  // (then with the refusal's code): show it either way.
  const body = await post("/api/v1", Object.assign({ Action: "AssignActivationCodes" }, assignParams(true)));
  if (body.MaxAssignable !== undefined) {
    $("assign-max").textContent = body.MaxAssignable;
    $("assign-allowance").textContent = body.Allowance ? `· validity ${validity(body.Allowance)}` : "";
    $("assign-orders").textContent = body.Orders && body.Orders.length ? `from orders ${orders(body.Orders)}` : "";
    $("assign-preview").hidden = false;
  }
  if (body.Code === "OK") {
    $("assign-confirm").disabled = false;
  } else {
    showError("assign-error", new ApiError(body));
  }
});

$("assign-confirm").addEventListener("click", async () => {
  $("assign-confirm").disabled = true;
  try {
    const a = await call("AssignActivationCodes", assignParams(false));
    const p = $("assign-result");
    p.textContent = `Assigned ${a.Quantity} codes to ${a.ProductKey}.`;
    p.hidden = false;
    $("assign-preview").hidden = true;
    await refresh();
  } catch (e) {
    showError("assign-error", e);
  }
});

// ---- the live strip ------------------------------------------------------------------------

const KINDS = [
  "device/activated", "device/renewed", "device/rejected", "device/connected",
  "device/disconnected", "device/expiring", "device/expired", "device/deleted",
  "product/deleted", "codes/purchased", "codes/assigned", "pool/low",
];
let summaryTimer = null;

function startEvents() {
  if (!state.me.Events) {
    $("events-state").textContent = "(this account may not read events)";
    return;
  }
  const src = new EventSource("/api/events");
  state.events = src;
  src.onopen = () => ($("events-state").textContent = "(live)");
  src.onerror = () => ($("events-state").textContent = "(reconnecting…)");
  const onEvent = (m) => {
    let e;
    try {
      e = JSON.parse(m.data);
    } catch (err) {
      return;
    }
    const who = [e.ProductKey, e.DeviceKey].filter(Boolean).join("/");
    const extra = e.Reason ? ` — ${e.Reason}` : e.Quantity ? ` ×${e.Quantity}` : "";
    const li = el("li");
    li.append(el("time", e.At), " ", el("b", e.Event, "kind " + e.Event.replace("/", "-")), " ", who + extra);
    const list = $("events");
    list.prepend(li);
    while (list.children.length > 50) list.lastChild.remove();
    // The counters follow the events (at most every second).
    if (!summaryTimer) {
      summaryTimer = setTimeout(() => {
        summaryTimer = null;
        loadSummary().catch(console.warn);
      }, 1000);
    }
  };
  for (const k of KINDS) src.addEventListener(k, onEvent);
  src.addEventListener("lagged", (m) => {
    $("events").prepend(el("li", `… ${m.data} events skipped`, "hint"));
  });
}

// ---- start -------------------------------------------------------------------------------------

(async () => {
  const r = await fetch("/api/session", {
    credentials: "same-origin",
    headers: { "X-Requested-With": "console" },
  });
  if (r.ok) await loggedIn(await r.json());
  else showLogin();
})();
