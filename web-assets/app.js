// rollcall web UI: plain JavaScript, no framework, nothing fetched from elsewhere. Every
// page is drawn from the JSON API under /api/v1 (the same one scripts use). Pages are
// addressed by the URL's hash (#/users, #/bulk, ...); all text from the server is set as
// text, never as HTML.

const state = { me: null, tenants: [], tenant: null, tenantInfo: null, timers: [], streams: [] };

// ---------- small helpers ----------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else if (v === true) el.setAttribute(k, '');
    else el.setAttribute(k, String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

let idCounter = 0;
function uid(prefix) { idCounter += 1; return `${prefix}-${idCounter}`; }

/** A labelled control: returns [wrapper, control]. */
function field(labelText, control, hint) {
  if (!control.id) control.id = uid('f');
  const parts = [h('label', { for: control.id }, labelText), control];
  if (hint) {
    const hid = uid('hint');
    control.setAttribute('aria-describedby', hid);
    parts.push(h('span', { id: hid, class: 'muted' }, hint));
  }
  return h('div', { class: 'field' }, parts);
}

function checkbox(labelText, checked) {
  const box = h('input', { type: 'checkbox', id: uid('c'), checked: !!checked });
  return [h('div', { class: 'check' }, box, ' ', h('label', { for: box.id }, labelText)), box];
}

function fmtTime(t) {
  if (!t) return '';
  const d = new Date(t);
  return Number.isNaN(d.getTime()) ? t : d.toLocaleString();
}

function plural(n, one, many) { return `${n} ${n === 1 ? one : many}`; }

function badge(text) { return h('span', { class: `badge ${text}` }, String(text).replace('_', ' ')); }

function table(headers, rows, caption) {
  return h('div', { class: 'table-wrap' },
    h('table', {},
      caption ? h('caption', { class: 'muted' }, caption) : null,
      h('thead', {}, h('tr', {}, headers.map((x) => h('th', { scope: 'col', class: x.endsWith('#') ? 'num' : '' }, x.replace(/#$/, ''))))),
      h('tbody', {}, rows.length ? rows : [h('tr', {}, h('td', { colspan: headers.length, class: 'muted' }, 'Nothing to show.'))])));
}

function showError(message) {
  const b = document.getElementById('banner');
  b.textContent = message;
  b.hidden = false;
  b.scrollIntoView({ block: 'nearest' });
}

function notice(message) {
  const n = document.getElementById('notice');
  n.textContent = message;
  n.hidden = false;
}

function clearMessages() {
  document.getElementById('banner').hidden = true;
  document.getElementById('notice').hidden = true;
}

class ApiError extends Error {
  constructor(status, code, message, details) { super(message); this.status = status; this.code = code; this.details = details; }
}

/** Calls the API; throws ApiError with the server's words. */
async function api(method, path, body, extra) {
  const headers = {};
  if (method !== 'GET' && state.me && state.me.csrf_token) headers['X-CSRF-Token'] = state.me.csrf_token;
  let payload;
  if (body instanceof Blob) { payload = body; headers['Content-Type'] = 'application/octet-stream'; }
  else if (body !== undefined) { payload = JSON.stringify(body); headers['Content-Type'] = 'application/json'; }
  let resp;
  try {
    resp = await fetch(`/api/v1${path}`, { method, headers, body: payload, credentials: 'same-origin', ...(extra || {}) });
  } catch (e) {
    throw new ApiError(0, 'network', 'The rollcall server cannot be reached. Check that it is running, then try again.');
  }
  const text = await resp.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (e) { data = null; }
  if (!resp.ok) {
    const err = data && data.error ? data.error : { code: 'http', message: `The server answered ${resp.status}.` };
    if (resp.status === 401 && path !== '/session') { state.me = null; route(); }
    throw new ApiError(resp.status, err.code, err.message, err.details);
  }
  return data;
}

/** Runs an action, showing its error (never a stack trace) in the banner. */
async function attempt(fn) {
  clearMessages();
  try { return await fn(); } catch (e) {
    showError(e instanceof ApiError ? e.message : `Something went wrong in this page: ${e.message}`);
    return undefined;
  }
}

function t(path) { return `/tenants/${encodeURIComponent(state.tenant)}${path}`; }
function apiUrl(path) { return `/api/v1${path}`; }

function stopLive() {
  state.timers.forEach((x) => clearInterval(x));
  state.streams.forEach((s) => s.close());
  state.timers = []; state.streams = [];
}

function isOperator() { return state.me && state.me.role === 'operator'; }
function canWrite() { return state.me && state.me.role !== 'auditor'; }

// ---------- routing ----------

const pages = [
  { path: 'users', title: 'Users', draw: usersPage },
  { path: 'bulk', title: 'Bulk options', draw: bulkPage, write: true },
  { path: 'jobs', title: 'Jobs', draw: jobsPage },
  { path: 'pools', title: 'Licence pools', draw: poolsPage },
  { path: 'audit', title: 'Audit', draw: auditPage },
  { path: 'rules', title: 'Rules', draw: rulesPage },
  { path: 'settings', title: 'Settings', draw: settingsPage, operator: true },
];

function drawNav(current) {
  const nav = document.getElementById('nav');
  nav.replaceChildren(...pages
    .filter((p) => (!p.operator || isOperator()) && (!p.write || canWrite()))
    .map((p) => h('li', {}, h('a', { href: `#/${p.path}`, 'aria-current': p.path === current ? 'page' : null }, p.title))));
}

async function route() {
  stopLive();
  const main = document.getElementById('main');
  if (!state.me) {
    try { state.me = await api('GET', '/session'); } catch (e) { state.me = null; }
  }
  const top = document.getElementById('top');
  if (!state.me) { top.hidden = true; main.replaceChildren(signInPage()); focusMain(); return; }
  if (state.me.must_change_password) { top.hidden = true; main.replaceChildren(passwordPage(true)); focusMain(); return; }
  if (!state.tenants.length) {
    const r = await attempt(() => api('GET', '/tenants'));
    state.tenants = r ? r.tenants.map((x) => x.name) : [];
    const saved = sessionStorage.getItem('tenant');
    state.tenant = state.tenants.includes(saved) ? saved : (state.tenants[0] || null);
  }
  top.hidden = false;
  drawHeader();
  const parts = location.hash.replace(/^#\/?/, '').split('/').map((x) => {
    try { return decodeURIComponent(x); } catch (e) { return x; }
  });
  // Links in messages name the tenant: #/t/TENANT/jobs/12.
  if (parts[0] === 't' && parts.length > 2) {
    if (state.tenants.includes(parts[1])) { state.tenant = parts[1]; sessionStorage.setItem('tenant', parts[1]); drawHeader(); }
    parts.splice(0, 2);
  }
  const page = pages.find((p) => p.path === parts[0]) || pages[0];
  drawNav(page.path);
  if (parts[0] === 'password') { main.replaceChildren(passwordPage(false)); focusMain(); return; }
  if (!state.tenant && page.path !== 'settings') {
    main.replaceChildren(h('h1', {}, 'No tenant yet'), h('p', {}, isOperator()
      ? 'Create the first tenant in Settings (or at the console: rollcall tenant create NAME).'
      : 'Your account has no tenant; ask an operator.'));
    return;
  }
  document.title = `${page.title} — rollcall`;
  main.replaceChildren(h('p', { class: 'muted' }, 'Loading…'));
  try {
    const content = await page.draw(parts.slice(1));
    main.replaceChildren(...[].concat(content));
  } catch (e) {
    main.replaceChildren(h('h1', {}, page.title), h('p', { class: 'error-text' },
      e instanceof ApiError ? e.message : `This page could not be shown: ${e.message}`));
  }
  focusMain();
}

function focusMain() {
  const first = document.querySelector('main h1');
  if (first) { first.setAttribute('tabindex', '-1'); first.focus({ preventScroll: true }); }
}

function drawHeader() {
  const picker = document.getElementById('tenant-picker');
  picker.replaceChildren(...state.tenants.map((n) => h('option', { value: n, selected: n === state.tenant }, n)));
  picker.hidden = state.tenants.length < 2;
  picker.previousElementSibling.hidden = state.tenants.length < 2;
  document.getElementById('who-name').textContent = `${state.me.name} (${state.me.role.replace('_', ' ')})`;
}

// ---------- sign-in and password ----------

function signInPage() {
  const user = h('input', { type: 'text', autocomplete: 'username', required: true, autofocus: true });
  const pass = h('input', { type: 'password', autocomplete: 'current-password', required: true });
  const button = h('button', { type: 'submit' }, 'Sign in');
  const form = h('form', { class: 'stack panel', onsubmit: async (ev) => {
    ev.preventDefault();
    button.disabled = true;
    const me = await attempt(() => api('POST', '/session', { username: user.value, password: pass.value }));
    button.disabled = false;
    if (me) { state.me = me; state.tenants = []; pass.value = ''; route(); } else { pass.value = ''; pass.focus(); }
  } }, field('User name', user), field('Password', pass), h('div', {}, button));
  return h('section', { 'aria-labelledby': 'sign-in-title' },
    h('h1', { id: 'sign-in-title' }, 'Sign in to rollcall'), form,
    h('p', { class: 'muted' }, 'Forgot your password? An operator can give you a new one-time password (rollcall admin reset-password NAME at the console).'));
}

function passwordPage(required) {
  const cur = h('input', { type: 'password', autocomplete: 'current-password', required: true });
  const nw = h('input', { type: 'password', autocomplete: 'new-password', required: true, minlength: 12 });
  const again = h('input', { type: 'password', autocomplete: 'new-password', required: true, minlength: 12 });
  const form = h('form', { class: 'stack panel', onsubmit: async (ev) => {
    ev.preventDefault();
    if (nw.value !== again.value) { showError('The two new passwords differ; type the same one twice.'); return; }
    const ok = await attempt(() => api('POST', '/session/password', { current: cur.value, new: nw.value }));
    if (ok) { state.me = null; notice('Your password is changed.'); location.hash = '#/users'; route(); }
  } },
  field(required ? 'One-time password' : 'Current password', cur),
  field('New password', nw, 'At least 12 characters.'),
  field('New password again', again),
  h('div', {}, h('button', { type: 'submit' }, 'Change password')));
  return h('section', {}, h('h1', {}, required ? 'Choose your password' : 'Change your password'),
    required ? h('p', {}, 'You signed in with a one-time password. Choose your own before going on.') : null, form);
}

// ---------- users ----------

async function usersPage(args) {
  if (args[0]) return userPage(args[0]);
  const info = await api('GET', t(''));
  state.tenantInfo = info;
  const q = h('input', { type: 'search', placeholder: 'Start of an email or name' });
  const status = h('select', {}, h('option', { value: '' }, 'Any'), h('option', { value: 'active' }, 'Active'), h('option', { value: 'deactivated' }, 'Deactivated'));
  const team = h('select', {}, h('option', { value: '' }, 'Any'), info.teams.map((x) => h('option', { value: x }, x)));
  const pool = h('select', {}, h('option', { value: '' }, 'Any'), info.pools.map((x) => h('option', { value: x.name }, x.name)));
  const sort = h('select', {}, h('option', { value: 'email' }, 'Email'), h('option', { value: 'name' }, 'Last name'));
  const results = h('div', {});
  const cursors = [null];
  let pageIndex = 0;
  // Users chosen for a Getting Started email (kept across pages).
  const chosen = new Set();
  const sendChosen = h('button', { type: 'button', class: 'secondary', disabled: true, onclick: async () => {
    const r = await attempt(() => api('POST', t('/welcome'), { emails: [...chosen] }));
    if (r) { notice(r.message); chosen.clear(); load(); }
  } }, 'Send Getting Started email to the chosen users');
  const sendNew = h('button', { type: 'button', class: 'secondary', onclick: async () => {
    if (!window.confirm('Send a Getting Started email to every active user who never got one?')) return;
    const r = await attempt(() => api('POST', t('/welcome'), { not_welcomed: true }));
    if (r) notice(r.message);
  } }, 'Send it to everyone who never got one');
  const showChosen = () => {
    sendChosen.disabled = chosen.size === 0;
    sendChosen.textContent = chosen.size ? `Send Getting Started email to ${plural(chosen.size, 'chosen user', 'chosen users')}` : 'Send Getting Started email to the chosen users';
  };
  async function load() {
    const params = new URLSearchParams({ limit: '50', sort: sort.value });
    if (q.value.trim()) params.set('q', q.value.trim());
    if (status.value) params.set('status', status.value);
    if (team.value) params.set('team', team.value);
    if (pool.value) params.set('pool', pool.value);
    if (cursors[pageIndex]) params.set('after', cursors[pageIndex]);
    const r = await attempt(() => api('GET', t(`/users?${params}`)));
    if (!r) return;
    cursors[pageIndex + 1] = r.next;
    const rows = r.users.map((u) => h('tr', {},
      canWrite() ? h('td', {}, h('input', { type: 'checkbox', 'aria-label': `Choose ${u.email}`, checked: chosen.has(u.email),
        disabled: u.status !== 'active',
        onchange: (e) => { if (e.target.checked) chosen.add(u.email); else chosen.delete(u.email); showChosen(); } })) : null,
      h('td', {}, h('a', { href: `#/users/${encodeURIComponent(u.email)}` }, u.email)),
      h('td', {}, `${u.first_name} ${u.last_name}`), h('td', {}, u.team || ''), h('td', {}, u.role),
      h('td', {}, u.pool), h('td', {}, badge(u.status))));
    const prev = h('button', { type: 'button', class: 'secondary', disabled: pageIndex === 0, onclick: () => { pageIndex -= 1; load(); } }, 'Previous page');
    const next = h('button', { type: 'button', class: 'secondary', disabled: !r.next, onclick: () => { pageIndex += 1; load(); } }, 'Next page');
    const headers = ['Email', 'Name', 'Team', 'Role', 'Licence pool', 'Status'];
    results.replaceChildren(table(canWrite() ? ['Choose', ...headers] : headers, rows),
      h('div', { class: 'pager' }, prev, h('span', { class: 'muted' }, `Page ${pageIndex + 1}`), next));
  }
  const restart = () => { cursors.length = 1; pageIndex = 0; load(); };
  let debounce;
  q.addEventListener('input', () => { clearTimeout(debounce); debounce = setTimeout(restart, 250); });
  [status, team, pool, sort].forEach((s) => s.addEventListener('change', restart));
  load();
  return [h('h1', {}, `Users of ${state.tenant}`),
    h('p', { class: 'muted' }, `${info.users.active} active, ${info.users.deactivated} deactivated.`),
    h('form', { class: 'row panel', role: 'search', onsubmit: (e) => { e.preventDefault(); restart(); } },
      field('Search', q), field('Status', status), field('Team', team), field('Licence pool', pool), field('Sort by', sort)),
    canWrite() ? h('div', { class: 'row' }, sendChosen, sendNew) : null,
    results];
}

async function userPage(email) {
  const u = await api('GET', t(`/users/${encodeURIComponent(email)}`));
  const facts = [['Email', u.email], ['First name', u.first_name], ['Last name', u.last_name], ['Job title', u.job_title || ''],
    ['Team', u.team || ''], ['Role', u.role], ['Language', u.language], ['Licence pool', u.pool], ['Status', u.status],
    ['Created', fmtTime(u.created_at)], ['Last changed', fmtTime(u.updated_at)],
    ['Getting Started email', u.welcome_count ? `sent ${plural(u.welcome_count, 'time', 'times')}, last ${fmtTime(u.welcome_sent_at)}` : 'never sent']];
  for (const [k, v] of Object.entries(u.custom || {})) facts.push([k, v]);
  const act = async (action, body) => {
    const r = await attempt(() => api('POST', t(`/users/${encodeURIComponent(u.email)}/${action}`), body || {}));
    if (r) {
      notice(r.message || 'Done.');
      if (action === 'delete') location.hash = '#/users'; else route();
    }
  };
  const confirmInput = h('input', { type: 'text', autocomplete: 'off' });
  const more = [];
  if (canWrite()) {
    if (u.status === 'active') {
      more.push(h('button', { type: 'button', class: 'secondary', onclick: () => act('welcome') }, 'Send Getting Started email'));
      more.push(h('button', { type: 'button', class: 'secondary', onclick: () => act('deactivate') }, 'Deactivate'));
    } else {
      more.push(h('button', { type: 'button', class: 'secondary', onclick: () => act('reactivate') }, 'Reactivate'));
    }
    more.push(h('div', { class: 'stack' },
      field(`To delete, type the email (${u.email})`, confirmInput, 'Deleting erases this user for good; the audit log keeps only what the retention policy says.'),
      h('div', {}, h('button', { type: 'button', class: 'danger', onclick: () => act('delete', { confirm: confirmInput.value }) }, 'Delete this user'))));
  }
  return [h('p', {}, h('a', { href: '#/users' }, '← All users')),
    h('h1', {}, `${u.first_name} ${u.last_name}`),
    h('div', { class: 'panel' }, h('dl', { class: 'facts' }, facts.map(([k, v]) => [h('dt', {}, k), h('dd', {}, v)]))),
    more.length ? h('details', { class: 'more panel' }, h('summary', {}, 'More options'), h('div', { class: 'stack' }, more)) : null,
    h('p', {}, h('a', { href: `#/audit/${encodeURIComponent(u.email)}` }, 'This user in the audit log'))];
}

// ---------- bulk options ----------

const OPERATIONS = [
  ['add', 'Add users'], ['update', 'Update users'], ['deactivate', 'Deactivate users'],
  ['reactivate', 'Reactivate users'], ['delete', 'Delete users'],
];

async function bulkPage(args) {
  if (args[0] === 'upload' && args[1]) {
    const up = await api('GET', t(`/uploads/${encodeURIComponent(args[1])}`));
    return [h('p', {}, h('a', { href: '#/bulk' }, '← Bulk options')), h('h1', {}, `Upload ${up.id}: ${up.file_name}`), uploadResult(up)];
  }
  let op = sessionStorage.getItem('operation') || 'add';
  const info = await api('GET', t(''));
  const templateLink = h('a', { class: 'button secondary', download: '' });
  // Add and reactivate: one licence pool for every row that leaves its cell empty.
  const poolChoice = h('select', {}, h('option', { value: '' }, 'Each row names its pool'),
    info.pools.map((p) => h('option', { value: p.name }, `${p.name} (${p.free} of ${p.seats} seats free)`)));
  const poolPanel = h('div', { class: 'panel' }, h('h2', {}, 'Licence pool'),
    field('Pool for rows whose Licence Pool cell is empty', poolChoice, 'A pool named in a row wins over this choice.'));
  const setOp = (v) => {
    op = v; sessionStorage.setItem('operation', v);
    templateLink.href = apiUrl(t(`/templates/${v}`));
    templateLink.textContent = `Download the ${v} template`;
    poolPanel.hidden = !(v === 'add' || v === 'reactivate');
  };
  const radios = OPERATIONS.map(([v, label]) => {
    const r = h('input', { type: 'radio', name: 'operation', id: `op-${v}`, value: v, checked: v === op, onchange: () => setOp(v) });
    return h('div', { class: 'check' }, r, ' ', h('label', { for: r.id }, label));
  });
  setOp(op);
  const input = h('input', { type: 'file', accept: '.xlsx,.xls,.ods,.csv' });
  const progress = h('progress', { max: 100, value: 0, hidden: true, 'aria-label': 'Upload progress' });
  const status = h('p', { class: 'muted', 'aria-live': 'polite' });
  const result = h('div', {});
  const drop = h('div', { class: 'drop' },
    h('p', {}, 'Drop the filled-in file here, or choose it:'), field('File to upload (.xlsx, .xls, .ods or .csv)', input));
  drop.addEventListener('dragover', (e) => { e.preventDefault(); drop.classList.add('over'); });
  drop.addEventListener('dragleave', () => drop.classList.remove('over'));
  drop.addEventListener('drop', (e) => {
    e.preventDefault(); drop.classList.remove('over');
    if (e.dataTransfer.files.length) send(e.dataTransfer.files[0]);
  });
  input.addEventListener('change', () => { if (input.files.length) send(input.files[0]); });
  function send(file) {
    clearMessages();
    result.replaceChildren();
    progress.hidden = false; progress.value = 0;
    status.textContent = `Sending ${file.name}…`;
    const xhr = new XMLHttpRequest();
    const pool = !poolPanel.hidden && poolChoice.value ? `&default_pool=${encodeURIComponent(poolChoice.value)}` : '';
    xhr.open('POST', apiUrl(t(`/uploads?operation=${op}&file_name=${encodeURIComponent(file.name)}${pool}`)));
    xhr.setRequestHeader('X-CSRF-Token', state.me.csrf_token);
    xhr.setRequestHeader('Content-Type', 'application/octet-stream');
    xhr.upload.onprogress = (e) => {
      if (e.lengthComputable) {
        progress.value = Math.round((e.loaded / e.total) * 100);
        if (e.loaded === e.total) status.textContent = 'Checking every row…';
      }
    };
    xhr.onerror = () => { progress.hidden = true; status.textContent = ''; showError('The upload did not reach the server; check the connection and try again.'); };
    xhr.onload = () => {
      progress.hidden = true; status.textContent = '';
      let data = null;
      try { data = JSON.parse(xhr.responseText); } catch (e) { data = null; }
      if (xhr.status >= 400 || !data) {
        showError(data && data.error ? data.error.message : `The server answered ${xhr.status}.`);
        return;
      }
      result.replaceChildren(uploadResult(data));
      input.value = '';
      // The verdict is what the administrator needs next: bring it into view and focus.
      const heading = result.querySelector('h2');
      if (heading) { heading.setAttribute('tabindex', '-1'); heading.focus(); heading.scrollIntoView({ block: 'start' }); }
    };
    xhr.send(file);
  }
  return [h('h1', {}, 'Bulk options'),
    h('div', { class: 'panel' }, h('fieldset', { class: 'ops' }, h('legend', {}, '1. Choose the operation'), radios)),
    h('div', { class: 'panel' }, h('h2', {}, '2. Download its template and fill it in'),
      h('p', { class: 'muted' }, 'The Read Me First sheet explains every column. Do not add, remove or move columns.'), templateLink),
    poolPanel,
    h('div', { class: 'panel' }, h('h2', {}, '3. Upload it'), drop, progress, status),
    result];
}

function problemsTable(problems) {
  return table(['Row#', 'Column', 'Value', 'Problem', 'Severity'], problems.map((p) => h('tr', {},
    h('td', { class: 'num' }, p.row ?? ''), h('td', {}, p.column ? `${p.column} (${p.column_name || ''})` : (p.column_name || '')),
    h('td', {}, p.value ?? ''), h('td', {}, p.message), h('td', {}, p.severity === 'error' ? h('span', { class: 'error-text' }, 'Error') : h('span', { class: 'warn-text' }, 'Warning')))));
}

function describeEffect(e) {
  switch (e.action) {
    case 'create': return 'Create';
    case 'change': return `Change: ${e.changes.map((c) => `${c.field} ${c.old ?? '(empty)'} → ${c.new ?? '(empty)'}`).join('; ')}`;
    case 'unchanged': return `Unchanged: ${e.reason}`;
    default: return e.action.charAt(0).toUpperCase() + e.action.slice(1);
  }
}

function uploadResult(up) {
  const parts = [];
  if (!up.valid) {
    parts.push(h('div', { class: 'panel' },
      h('h2', { class: 'error-text' }, `${up.file_name} has ${plural(up.errors, 'error', 'errors')}`),
      h('p', {}, 'Nothing can be submitted until they are fixed. Fix the rows in the error workbook (it has your rows and an Errors column) and upload it again as it is.'),
      up.error_workbook ? h('a', { class: 'button', href: apiUrl(t(`/uploads/${up.id}/error-workbook`)), download: '' }, 'Download the error workbook') : null));
  } else {
    parts.push(h('div', { class: 'panel' }, h('h2', { class: 'ok-text' }, up.message),
      h('p', { class: 'muted' }, `${plural(up.rows, 'row', 'rows')} read from ${up.file_name}.`,
        up.default_pool ? ` Rows without a licence pool go to ${up.default_pool}.` : '')));
  }
  if (up.applied_before) {
    parts.push(h('p', { class: 'warn-text panel' }, `This same file was applied before: job ${up.applied_before.job} by ${up.applied_before.by} at ${fmtTime(up.applied_before.at)}.`));
  }
  if (up.forecast && up.forecast.length) {
    parts.push(h('h2', {}, 'Licences'), table(['Pool', 'Seats#', 'Used#', 'Freed#', 'Needed#', 'Free after#'], up.forecast.map((f) => h('tr', {},
      h('td', {}, f.pool), h('td', { class: 'num' }, f.seats), h('td', { class: 'num' }, f.used), h('td', { class: 'num' }, f.freed),
      h('td', { class: 'num' }, f.needed), h('td', { class: `num ${f.free_after < 0 ? 'error-text' : ''}` }, f.free_after)))));
  }
  if (up.problems.length) {
    parts.push(h('h2', {}, `Problems (${up.problems_total})`), problemsTable(up.problems));
    if (up.problems_total > up.problems.length) {
      const more = h('div', {});
      let offset = up.problems.length;
      const btn = h('button', { type: 'button', class: 'secondary', onclick: async () => {
        const r = await attempt(() => api('GET', t(`/uploads/${up.id}/problems?offset=${offset}&limit=500`)));
        if (!r) return;
        offset += r.problems.length;
        more.append(problemsTable(r.problems));
        if (offset >= r.total) btn.remove();
      } }, 'Show more problems');
      parts.push(more, btn);
    }
  }
  if (up.normalisations && up.normalisations.length) {
    parts.push(h('details', { class: 'panel' }, h('summary', {}, `Values tidied up (${up.normalisations.length} kinds)`),
      h('ul', {}, up.normalisations.map((n) => h('li', {}, `${n.column} (${n.column_name}): ${n.kind.replace(/_/g, ' ')} — ${plural(n.count, 'cell', 'cells')}, e.g. row ${n.example_row}: ${n.example}`)))));
  }
  if (up.valid) {
    if (up.preview.length) {
      parts.push(h('h2', {}, 'Preview of the changes'), table(['Row#', 'Email', 'Effect'], up.preview.map((p) => h('tr', {},
        h('td', { class: 'num' }, p.row), h('td', {}, p.email), h('td', {}, describeEffect(p.effect))))),
      up.preview.length < up.rows ? h('p', { class: 'muted' }, `The first ${up.preview.length} of ${up.rows} rows.`) : null);
    }
    if (up.job) {
      parts.push(h('p', { class: 'panel' }, 'Submitted as ', h('a', { href: `#/jobs/${up.job.id}` }, `job ${up.job.id}`), ` (${up.job.state.replace('_', ' ')}).`));
    } else if (canWrite()) {
      parts.push(submitPanel(up));
    }
  }
  return h('section', { 'aria-label': 'Validation result' }, parts);
}

function submitPanel(up) {
  const controls = [];
  const [ackRow, ack] = checkbox(`I have read the ${plural(up.warnings, 'warning', 'warnings')} and want to go ahead`);
  const [gsRow, gs] = checkbox('Send each new user a Getting Started email');
  const [delRow, del] = checkbox('I understand that deleting erases these users for good');
  const phrase = h('input', { type: 'text', autocomplete: 'off' });
  const when = h('input', { type: 'datetime-local' });
  if (up.needs_acknowledgement) controls.push(ackRow);
  if (up.operation === 'add') controls.push(gsRow);
  if (up.needs_delete_confirmation) controls.push(delRow);
  if (up.needs_confirmation) controls.push(field(`${up.needs_confirmation.why}: type ${up.needs_confirmation.phrase} to confirm`, phrase));
  controls.push(field('Not before (optional)', when, 'Leave empty to process as soon as the queue allows.'));
  const button = h('button', { type: 'submit' }, up.submit_label);
  const form = h('form', { class: 'stack', onsubmit: async (ev) => {
    ev.preventDefault();
    if (up.needs_acknowledgement && !ack.checked) { showError('Tick the box to acknowledge the warnings first.'); ack.focus(); return; }
    if (up.needs_delete_confirmation && !del.checked) { showError('Confirm the deletion first.'); del.focus(); return; }
    const body = { acknowledge_warnings: ack.checked, getting_started: gs.checked, confirm_delete: del.checked };
    if (up.needs_confirmation) body.confirm = phrase.value;
    if (when.value) body.not_before = new Date(when.value).toISOString();
    button.disabled = true;
    const job = await attempt(() => api('POST', t(`/uploads/${up.id}/submit`), body));
    button.disabled = false;
    if (job) { notice(`Submitted as job ${job.job.id}.`); location.hash = `#/jobs/${job.job.id}`; }
  } }, controls, h('div', {}, button));
  return h('div', { class: 'panel' }, h('h2', {}, 'Submit'), form);
}

// ---------- jobs ----------

function jobProgress(j, p) {
  if (j.state === 'running') {
    const total = (p && p.rows_total) || j.rows_total || 0;
    const done = p ? p.rows_done : 0;
    const bar = h('progress', { max: total || 1, value: done, 'aria-label': `Job ${j.id} progress` });
    if (!total) bar.removeAttribute('value');
    return h('div', {}, bar, h('span', { class: 'muted' }, total ? `${done} of ${total} rows${p && p.eta_secs != null ? `, about ${Math.ceil(p.eta_secs)} s left` : ''}` : `${done} rows`));
  }
  if (j.position) return `#${j.position} in the queue${j.estimated_start_secs != null ? `, starts in about ${Math.ceil(j.estimated_start_secs)} s` : ''}`;
  if (j.state === 'scheduled') return `not before ${fmtTime(j.not_before)}`;
  return j.error || '';
}

async function jobsPage(args) {
  if (args[0]) return jobPage(args[0]);
  const holder = h('div', {});
  async function load() {
    const r = await api('GET', t('/jobs')).catch((e) => { showError(e.message); return null; });
    if (!r) return;
    holder.replaceChildren(table(['Job#', 'Operation', 'File', 'State', 'Progress', 'Submitted'], r.jobs.map(({ job: j, progress: p }) => h('tr', {},
      h('td', { class: 'num' }, h('a', { href: `#/jobs/${j.id}` }, j.id)), h('td', {}, j.operation), h('td', {}, j.file_name),
      h('td', {}, badge(j.state)), h('td', {}, jobProgress(j, p)), h('td', {}, `${fmtTime(j.submitted_at)} by ${j.submitted_by}`)))));
  }
  await load();
  state.timers.push(setInterval(load, 2000));
  return [h('h1', {}, 'Jobs'), h('p', { class: 'muted' }, 'One job runs at a time; this list updates by itself.'), holder];
}

async function jobPage(id) {
  const holder = h('div', {});
  function draw(v) {
    const j = v.job;
    const actions = [];
    if (canWrite()) {
      if (['queued', 'scheduled', 'awaiting_approval'].includes(j.state)) actions.push(h('button', { type: 'button', class: 'secondary', onclick: () => jobAction('cancel') }, 'Cancel'));
      if (j.state === 'awaiting_approval') actions.push(h('button', { type: 'button', onclick: () => jobAction('approve') }, 'Approve'));
      if (j.state === 'succeeded' && j.operation !== 'undo' && !v.undone_by) actions.push(h('button', { type: 'button', class: 'secondary', onclick: () => jobAction('undo') }, 'Undo this job'));
    }
    const totals = v.result && v.result.totals ? Object.entries(v.result.totals).filter(([, n]) => n > 0).map(([k, n]) => `${n} ${k}`).join(', ') : '';
    holder.replaceChildren(
      h('div', { class: 'panel' }, h('dl', { class: 'facts' },
        h('dt', {}, 'State'), h('dd', {}, badge(j.state)),
        h('dt', {}, 'Operation'), h('dd', {}, j.operation),
        h('dt', {}, 'File'), h('dd', {}, j.file_name),
        h('dt', {}, 'Submitted'), h('dd', {}, `${fmtTime(j.submitted_at)} by ${j.submitted_by}`),
        j.started_at ? [h('dt', {}, 'Started'), h('dd', {}, fmtTime(j.started_at))] : null,
        j.finished_at ? [h('dt', {}, 'Finished'), h('dd', {}, fmtTime(j.finished_at))] : null,
        totals ? [h('dt', {}, 'Result'), h('dd', {}, totals)] : null,
        j.error ? [h('dt', {}, 'Why'), h('dd', { class: 'error-text' }, j.error)] : null,
        v.undone_by ? [h('dt', {}, 'Undone by'), h('dd', {}, h('a', { href: `#/jobs/${v.undone_by}` }, `job ${v.undone_by}`))] : null,
        v.undo_of ? [h('dt', {}, 'Undoes'), h('dd', {}, h('a', { href: `#/jobs/${v.undo_of}` }, `job ${v.undo_of}`))] : null),
      h('div', { 'aria-live': 'polite' }, jobProgress(j, v.progress))),
      h('div', { class: 'row' },
        v.results_workbook ? h('a', { class: 'button', href: apiUrl(t(`/jobs/${j.id}/results-workbook`)), download: '' }, 'Download the results workbook') : null,
        v.upload ? h('a', { class: 'button secondary', href: `#/bulk/upload/${v.upload}` }, 'The upload') : null,
        actions));
  }
  async function jobAction(action) {
    if (action === 'undo' && !window.confirm('Undo this job? Every change it made is reverted in one step (or none, if a user changed since).')) return;
    const v = await attempt(() => api('POST', t(`/jobs/${id}/${action}`), {}));
    if (v) {
      notice(action === 'undo' ? `Undo submitted as job ${v.job.id}.` : `Job ${action === 'cancel' ? 'cancelled' : 'approved'}.`);
      location.hash = `#/jobs/${v.job.id}`;
      if (String(v.job.id) === String(id)) route();
    }
  }
  const first = await api('GET', t(`/jobs/${encodeURIComponent(id)}`));
  draw(first);
  // Live until it ends; a job that has just succeeded gets its results workbook a moment
  // after its commit, which the stream also waits for.
  const ended = ['succeeded', 'failed', 'cancelled'].includes(first.job.state);
  if (!ended || (first.job.state === 'succeeded' && !first.results_workbook)) {
    const es = new EventSource(apiUrl(t(`/jobs/${encodeURIComponent(id)}/events`)));
    es.addEventListener('job', (e) => {
      const v = JSON.parse(e.data);
      draw(v);
      if (['succeeded', 'failed', 'cancelled'].includes(v.job.state)) es.close();
    });
    // The browser reconnects by itself after a dropped connection; when the server refuses
    // (signed out, restarted without the job), fall back to asking every few seconds.
    es.onerror = () => {
      if (es.readyState !== EventSource.CLOSED) return;
      const timer = setInterval(async () => {
        const v = await api('GET', t(`/jobs/${encodeURIComponent(id)}`)).catch(() => null);
        if (!v) return;
        draw(v);
        if (['succeeded', 'failed', 'cancelled'].includes(v.job.state)) clearInterval(timer);
      }, 3000);
      state.timers.push(timer);
    };
    state.streams.push(es);
  }
  return [h('p', {}, h('a', { href: '#/jobs' }, '← All jobs')), h('h1', {}, `Job ${id}`), holder];
}

// ---------- licence pools ----------

async function poolsPage() {
  const info = await api('GET', t(''));
  const editable = isOperator() || (state.me.role === 'tenant_admin' && info.settings.tenant_admins_edit_seats);
  const rows = info.pools.map((p) => {
    const seats = h('input', { type: 'number', min: 0, value: p.seats, 'aria-label': `Seats of ${p.name}` });
    const save = h('button', { type: 'button', class: 'secondary', onclick: async () => {
      const r = await attempt(() => api('PUT', t(`/pools/${encodeURIComponent(p.name)}`), { seats: Number(seats.value) }));
      if (r) { notice(`${r.name}: ${r.seats} seats, ${r.free} free.`); route(); }
    } }, 'Save');
    return h('tr', {}, h('td', {}, p.name), h('td', { class: 'num' }, editable ? h('span', { class: 'row' }, seats, save) : p.seats),
      h('td', { class: 'num' }, p.used), h('td', { class: `num ${p.free < 0 ? 'error-text' : ''}` }, p.free));
  });
  return [h('h1', {}, `Licence pools of ${state.tenant}`), table(['Pool', 'Seats#', 'Used#', 'Free#'], rows),
    h('p', { class: 'muted' }, 'An active user holds one seat of its pool; deactivated and deleted users hold none.')];
}

// ---------- audit ----------

async function auditPage(args) {
  const fields = { user: h('input', { type: 'text', value: args[0] || '' }), job: h('input', { type: 'text', inputmode: 'numeric' }),
    actor: h('input', { type: 'text' }), action: h('input', { type: 'text', placeholder: 'e.g. user. or job.' }),
    since: h('input', { type: 'datetime-local' }), until: h('input', { type: 'datetime-local' }) };
  const results = h('div', {});
  const verify = h('div', {});
  // Operators and auditors of all tenants can also read what belongs to no tenant
  // (sign-ins, administrators, tokens) and every tenant at once.
  const everything = state.me.role === 'operator' || (state.me.role === 'auditor' && !state.me.tenant);
  const scope = h('select', {}, h('option', { value: 'tenant' }, `${state.tenant} only`), h('option', { value: 'all' }, 'Everything (all tenants, sign-ins, administrators)'));
  const base = () => (scope.value === 'all' ? '/audit' : t('/audit'));
  const query = () => {
    const p = new URLSearchParams();
    for (const [k, el] of Object.entries(fields)) {
      if (!el.value.trim()) continue;
      p.set(k, el.type === 'datetime-local' ? new Date(el.value).toISOString() : el.value.trim());
    }
    return p;
  };
  const exportLink = h('a', { class: 'button secondary', download: '' }, 'Export as CSV');
  async function load() {
    const p = query();
    const e = new URLSearchParams(p); e.set('format', 'csv');
    exportLink.href = apiUrl(`${base()}?${e}`);
    const r = await attempt(() => api('GET', `${base()}?${p}`));
    if (!r) return;
    results.replaceChildren(h('p', { class: 'muted' }, `${r.total} entries${r.total > r.entries.length ? `; the newest ${r.entries.length} shown` : ''}.`),
      table(['#', 'Time', 'Who', 'Action', 'Target', 'Details'], r.entries.map((x) => h('tr', {},
        h('td', { class: 'num' }, x.seq), h('td', {}, fmtTime(x.time)), h('td', {}, x.actor), h('td', {}, x.action), h('td', {}, x.target),
        h('td', {}, h('code', {}, JSON.stringify(x.details)))))));
  }
  load();
  const controls = [h('button', { type: 'submit' }, 'Search'), exportLink];
  if (everything) {
    controls.push(h('button', { type: 'button', class: 'secondary', onclick: async () => {
      const v = await attempt(() => api('GET', '/audit/verify'));
      if (v) verify.replaceChildren(h('p', { class: `panel ${v.problem ? 'error-text' : 'ok-text'}` },
        v.problem ? `BROKEN: ${v.problem} (${v.entries} entries checked in ${v.files} files).` : `The chain is whole: ${v.entries} entries in ${v.files} files verified.`));
    } }, 'Verify the chain'));
  }
  return [h('h1', {}, 'Audit log'),
    h('form', { class: 'panel', role: 'search', onsubmit: (e) => { e.preventDefault(); load(); } },
      h('div', { class: 'row' }, everything ? field('Scope', scope) : null, field('User (email)', fields.user), field('Job', fields.job), field('Who', fields.actor),
        field('Action starts with', fields.action), field('Since', fields.since), field('Until', fields.until)),
      h('div', { class: 'row' }, controls)),
    verify, results];
}

// ---------- rules ----------

async function rulesPage() {
  const r = await api('GET', t('/rules'));
  const words = { ok: 'In use and up to date.', stale: 'A newer version did not load; the last good one is in use.', none: 'No rules: the built-in checks only.', broken: 'The rules cannot be used.' };
  const parts = [h('h1', {}, `Rules of ${state.tenant}`),
    h('div', { class: 'panel' }, h('dl', { class: 'facts' },
      h('dt', {}, 'Status'), h('dd', { class: r.status === 'ok' || r.status === 'none' ? 'ok-text' : 'error-text' }, words[r.status] || r.status),
      h('dt', {}, 'Folder'), h('dd', {}, `${r.folder} (${r.origin})`),
      h('dt', {}, 'Version'), h('dd', {}, h('code', {}, r.hash.slice(0, 12)))),
    r.active && r.active.notes ? h('ul', {}, r.active.notes.map((n) => h('li', { class: 'warn-text' }, n))) : null,
    r.active && r.active.problem ? h('p', { class: 'error-text' }, r.active.problem) : null),
    h('p', { class: 'muted' }, 'Scripts are edited on the server (rules/<tenant>/ in the data directory) and checked with rollcall rules check; this page shows them read-only.')];
  if (r.active && r.active.columns && r.active.columns.length) {
    parts.push(h('h2', {}, 'Custom columns'), table(['Column', 'Required', 'Allowed values', 'Help', 'Script'], r.active.columns.map((c) => h('tr', {},
      h('td', {}, c.name), h('td', {}, c.required ? 'yes (add)' : 'no'), h('td', {}, (c.choices || []).join(', ')), h('td', {}, c.help), h('td', {}, `${c.script}:${c.line ?? ''}`)))));
  }
  if (isOperator()) parts.push(rulesTestPanel());
  for (const s of r.scripts) parts.push(h('h2', {}, s.name), h('pre', { class: 'code', tabindex: 0 }, s.source));
  return parts;
}

/** Operators: try a file against the scripts as they are on disk now (stores nothing). */
function rulesTestPanel() {
  const op = h('select', {}, OPERATIONS.map(([v, label]) => h('option', { value: v }, label)));
  const file = h('input', { type: 'file', accept: '.xlsx,.xls,.ods,.csv' });
  const out = h('div', { 'aria-live': 'polite' });
  const button = h('button', { type: 'submit' }, 'Test the file');
  return h('div', { class: 'panel' }, h('h2', {}, 'Test a file against these rules'),
    h('p', { class: 'muted' }, 'Uses the scripts as they are on the server now, even before they are in use. Nothing is stored or changed.'),
    h('form', { class: 'row', onsubmit: async (e) => {
      e.preventDefault();
      if (!file.files.length) { showError('Choose a file first.'); return; }
      const f = file.files[0];
      button.disabled = true;
      const r = await attempt(() => api('POST', t(`/rules/test?operation=${op.value}&file_name=${encodeURIComponent(f.name)}`), f));
      button.disabled = false;
      if (!r) return;
      if (!r.loaded) { out.replaceChildren(h('p', { class: 'error-text' }, 'The scripts do not load:'), h('ul', {}, r.load_problems.map((x) => h('li', {}, x)))); return; }
      out.replaceChildren(h('p', { class: r.valid ? 'ok-text' : 'error-text' }, r.message),
        r.problems.length ? problemsTable(r.problems) : null);
    } }, field('Operation', op), field('File', file), button),
    out);
}

// ---------- settings (operators) ----------

async function settingsPage() {
  const [settings, admins, tokens, mail] = await Promise.all([api('GET', '/settings'), api('GET', '/admins'), api('GET', '/tokens'), api('GET', '/mail')]);
  const parts = [h('h1', {}, 'Settings')];

  // Tenants
  const tname = h('input', { type: 'text', required: true });
  parts.push(h('h2', {}, 'Tenants'), h('p', {}, state.tenants.join(', ') || 'None yet.'),
    h('form', { class: 'row panel', onsubmit: async (e) => {
      e.preventDefault();
      const r = await attempt(() => api('POST', '/tenants', { name: tname.value }));
      if (r) { notice(`Created tenant ${r.name}.`); state.tenants = []; route(); }
    } }, field('New tenant', tname), h('button', { type: 'submit' }, 'Create tenant')));

  // Safeguards of the current tenant
  if (state.tenant) {
    const info = await api('GET', t(''));
    const s = info.settings;
    const pct = h('input', { type: 'number', min: 0, max: 100, value: s.large_change_percent });
    const cnt = h('input', { type: 'number', min: 0, value: s.large_change_count ?? '' });
    const [apRow, ap] = checkbox('Deactivations and deletions need a second administrator\'s approval', s.require_approval);
    const [seRow, se] = checkbox('Tenant admins may change their pools\' seats', s.tenant_admins_edit_seats);
    const approvers = h('input', { type: 'text', value: (s.approvers || []).join(', ') });
    parts.push(h('h2', {}, `Safeguards of ${state.tenant}`), h('form', { class: 'stack panel', onsubmit: async (e) => {
      e.preventDefault();
      const body = { large_change_percent: Number(pct.value), large_change_count: cnt.value === '' ? null : Number(cnt.value),
        require_approval: ap.checked, tenant_admins_edit_seats: se.checked,
        approvers: approvers.value.split(',').map((x) => x.trim()).filter(Boolean) };
      if (await attempt(() => api('PATCH', t('/settings'), body))) notice('Saved.');
    } }, field('Typed confirmation above this share of users (%)', pct), field('… or above this many users (optional)', cnt),
    apRow, field('Approvers told by email (comma-separated)', approvers), seRow, h('div', {}, h('button', { type: 'submit' }, 'Save safeguards'))));
  }

  // Administrators
  const oneTime = h('div', { 'aria-live': 'polite' });
  const showSecret = (label, secret) => oneTime.replaceChildren(h('p', { class: 'panel' }, `${label} `, h('span', { class: 'secret' }, secret), ' — shown only now; hand it over safely.'));
  const roleSelect = (value) => h('select', {}, ['operator', 'tenant_admin', 'auditor'].map((r) => h('option', { value: r, selected: r === value }, r.replace('_', ' '))));
  const tenantSelect = (value) => h('select', {}, h('option', { value: '' }, '(all / none)'), state.tenants.map((n) => h('option', { value: n, selected: n === value }, n)));
  const adminRows = admins.admins.map((a) => {
    const role = roleSelect(a.role); const ten = tenantSelect(a.tenant);
    role.setAttribute('aria-label', `Role of ${a.username}`); ten.setAttribute('aria-label', `Tenant of ${a.username}`);
    return h('tr', {}, h('td', {}, a.username), h('td', {}, a.email || ''), h('td', {}, role), h('td', {}, ten),
      h('td', {}, a.disabled ? badge('disabled') : 'enabled'),
      h('td', {}, h('div', { class: 'row' },
        h('button', { type: 'button', class: 'secondary', onclick: async () => {
          const r = await attempt(() => api('PATCH', `/admins/${encodeURIComponent(a.username)}`, { role: role.value, tenant: ten.value }));
          if (r) notice(`${a.username} is now ${r.role.replace('_', ' ')}${r.tenant ? ` of ${r.tenant}` : ''}.`);
        } }, 'Save role'),
        h('button', { type: 'button', class: 'secondary', onclick: async () => {
          const r = await attempt(() => api('PATCH', `/admins/${encodeURIComponent(a.username)}`, { disabled: !a.disabled }));
          if (r) route();
        } }, a.disabled ? 'Enable' : 'Disable'),
        h('button', { type: 'button', class: 'secondary', onclick: async () => {
          const r = await attempt(() => api('POST', `/admins/${encodeURIComponent(a.username)}/reset-password`, {}));
          if (r) showSecret(`New one-time password of ${a.username}:`, r.one_time_password);
        } }, 'Reset password'))));
  });
  const nu = h('input', { type: 'text', required: true }); const ne = h('input', { type: 'email' });
  const nr = roleSelect('tenant_admin'); const nt = tenantSelect(state.tenant);
  parts.push(h('h2', {}, 'Administrators'), table(['User name', 'Email', 'Role', 'Tenant', 'State', 'Actions'], adminRows), oneTime,
    h('form', { class: 'row panel', onsubmit: async (e) => {
      e.preventDefault();
      const r = await attempt(() => api('POST', '/admins', { username: nu.value, email: ne.value, role: nr.value, tenant: nt.value }));
      if (r) { await route(); showSecret(`One-time password of ${r.admin.username}:`, r.one_time_password); }
    } }, field('User name', nu), field('Email', ne), field('Role', nr), field('Tenant', nt), h('button', { type: 'submit' }, 'Create administrator')));

  // API tokens
  const tokRows = tokens.tokens.map((k) => h('tr', {}, h('td', {}, k.name), h('td', {}, k.role.replace('_', ' ')), h('td', {}, k.tenant || 'all'),
    h('td', {}, `${fmtTime(k.created_at)} by ${k.created_by}`), h('td', {}, k.last_used_at ? fmtTime(k.last_used_at) : 'never'),
    h('td', {}, k.revoked_at ? `revoked ${fmtTime(k.revoked_at)}` : h('button', { type: 'button', class: 'secondary', onclick: async () => {
      if (await attempt(() => api('DELETE', `/tokens/${k.id}`))) route();
    } }, 'Revoke'))));
  const tn = h('input', { type: 'text', required: true }); const tr = roleSelect('tenant_admin'); const tt = tenantSelect(state.tenant);
  const tokenOut = h('div', { 'aria-live': 'polite' });
  parts.push(h('h2', {}, 'API tokens'), table(['Name', 'Role', 'Tenant', 'Created', 'Last used', ''], tokRows), tokenOut,
    h('form', { class: 'row panel', onsubmit: async (e) => {
      e.preventDefault();
      const r = await attempt(() => api('POST', '/tokens', { name: tn.value, role: tr.value, tenant: tt.value }));
      if (r) { await route(); notice('Token created.'); }
      if (r) document.getElementById('main').append(h('p', { class: 'panel' }, 'The new token (shown only now): ', h('span', { class: 'secret' }, r.token)));
    } }, field('Token name', tn), field('Role', tr), field('Tenant', tt), h('button', { type: 'submit' }, 'Create token')));

  // Mail and retention: changed here at once, over rollcall.toml.
  const m = settings.mail;
  const mailFields = {
    transport: h('select', {}, h('option', { value: 'outbox', selected: m.transport === 'outbox' }, 'Outbox folder (.eml files; air-gapped sites)'),
      h('option', { value: 'smtp', selected: m.transport === 'smtp' }, 'SMTP server')),
    from: h('input', { type: 'text', value: m.from }),
    support_contact: h('input', { type: 'text', value: m.support_contact }),
    web_url: h('input', { type: 'text', value: m.web_url, placeholder: 'https://rollcall.example.com' }),
    sign_in_url: h('input', { type: 'text', value: m.sign_in_url }),
    smtp_host: h('input', { type: 'text', value: m.smtp_host }),
    smtp_port: h('input', { type: 'number', min: 1, max: 65535, value: m.smtp_port ?? '' }),
    smtp_security: h('select', {}, ['starttls', 'tls', 'none'].map((x) => h('option', { value: x, selected: m.smtp_security === x }, x))),
    smtp_username: h('input', { type: 'text', value: m.smtp_username, autocomplete: 'off' }),
    smtp_password: h('input', { type: 'password', autocomplete: 'new-password', placeholder: m.smtp_password_set ? '(set; leave empty to keep)' : '(none)' }),
    attach_max_mib: h('input', { type: 'number', min: 0, max: 100, value: m.attach_max_mib }),
    max_attempts: h('input', { type: 'number', min: 1, max: 100, value: m.max_attempts }),
  };
  const labels = { transport: 'Transport', from: 'From', support_contact: 'Support contact', web_url: 'Address of this web UI (for links in messages)',
    sign_in_url: 'Where users sign in (Getting Started)', smtp_host: 'SMTP host', smtp_port: 'SMTP port (empty: by security)', smtp_security: 'SMTP security',
    smtp_username: 'SMTP user name', smtp_password: 'SMTP password', attach_max_mib: 'Largest attachment (MiB)', max_attempts: 'Tries before a message fails' };
  const numeric = new Set(['smtp_port', 'attach_max_mib', 'max_attempts']);
  const mailChanges = () => {
    const out = {};
    for (const [k, el] of Object.entries(mailFields)) {
      if (k === 'smtp_password') { if (el.value) out[k] = el.value; continue; }
      const v = numeric.has(k) ? (el.value === '' ? null : Number(el.value)) : el.value;
      if (v !== (m[k] ?? null)) out[k] = v;
    }
    return out;
  };
  const to = h('input', { type: 'email', required: true });
  const changedMail = settings.changed_here.mail;
  parts.push(h('h2', {}, 'Email'), h('form', { class: 'panel', onsubmit: async (e) => {
    e.preventDefault();
    const changes = mailChanges();
    if (!Object.keys(changes).length) { notice('Nothing to change.'); return; }
    if (await attempt(() => api('PATCH', '/settings', { mail: changes }))) { notice('Mail settings saved; they apply to the next message.'); route(); }
  } }, h('div', { class: 'row' }, Object.entries(mailFields).map(([k, el]) => field(labels[k], el))),
  h('p', { class: 'muted' }, changedMail.length ? `Changed here (over rollcall.toml): ${changedMail.join(', ')}.` : 'All as in rollcall.toml.'),
  h('div', { class: 'row' }, h('button', { type: 'submit' }, 'Save mail settings'),
    changedMail.length ? h('button', { type: 'button', class: 'secondary', onclick: async () => {
      const reset = Object.fromEntries(changedMail.map((k) => [k, null]));
      if (await attempt(() => api('PATCH', '/settings', { mail: reset }))) { notice('Back to the values of rollcall.toml.'); route(); }
    } }, 'Use rollcall.toml\'s values') : null)),
  h('form', { class: 'row panel', onsubmit: async (e) => {
    e.preventDefault();
    const r = await attempt(() => api('POST', '/settings/test-email', { to: to.value }));
    if (r) notice(r.message || 'Sent.');
  } }, field('Send a test message to', to), h('button', { type: 'submit' }, 'Send test email')),
  table(['To', 'Subject', 'State', 'Tries#', 'Queued', ''], mail.messages.map((x) => h('tr', {}, h('td', {}, x.recipient), h('td', {}, x.subject),
    h('td', {}, badge(x.state)), h('td', { class: 'num' }, x.attempts), h('td', {}, fmtTime(x.created_at)),
    h('td', {}, x.state === 'failed' ? h('button', { type: 'button', class: 'secondary', onclick: async () => {
      if (await attempt(() => api('POST', `/mail/${x.id}/retry`, {}))) route();
    } }, 'Retry') : (x.last_error || ''))))));

  // Retention
  const undoDays = h('input', { type: 'number', min: 1, max: 3650, value: settings.jobs.undo_days });
  const keepDays = h('input', { type: 'number', min: 1, max: 3650, value: settings.jobs.file_retention_days });
  parts.push(h('h2', {}, 'Retention'), h('form', { class: 'row panel', onsubmit: async (e) => {
    e.preventDefault();
    const body = { jobs: { undo_days: Number(undoDays.value), file_retention_days: Number(keepDays.value) } };
    if (await attempt(() => api('PATCH', '/settings', body))) { notice('Retention saved.'); route(); }
  } }, field('Jobs can be undone for (days)', undoDays), field('Uploaded files and reports are kept for (days)', keepDays),
  h('button', { type: 'submit' }, 'Save retention')));

  // Server
  parts.push(h('h2', {}, 'Server'), h('div', { class: 'panel' }, h('dl', { class: 'facts' },
    h('dt', {}, 'Data directory'), h('dd', {}, settings.data_dir), h('dt', {}, 'Listening on'), h('dd', {}, settings.listen),
    h('dt', {}, 'Largest file'), h('dd', {}, `${Math.round(settings.limits.max_file_bytes / 1048576)} MiB, ${settings.limits.max_rows} rows`),
    h('dt', {}, 'Sessions'), h('dd', {}, `end after ${settings.web.session_idle_minutes} idle minutes, at most ${settings.web.session_max_hours} hours`)),
  h('p', { class: 'muted' }, settings.note)),
  table(['Task', 'What it does', 'Last run', 'Next run', 'Last result'], settings.tasks.map((x) => h('tr', {}, h('td', {}, x.name), h('td', {}, x.description),
    h('td', {}, fmtTime(x.last_run)), h('td', {}, fmtTime(x.next_run)), h('td', { class: x.last_error ? 'error-text' : '' }, x.last_error || x.last_result || '')))));
  return parts;
}

// ---------- start ----------

window.addEventListener('hashchange', () => { clearMessages(); route(); });
document.getElementById('tenant-picker').addEventListener('change', (e) => {
  state.tenant = e.target.value; sessionStorage.setItem('tenant', state.tenant); route();
});
document.getElementById('sign-out').addEventListener('click', async () => {
  await attempt(() => api('DELETE', '/session'));
  state.me = null; state.tenants = []; location.hash = '#/users'; route();
});
route();
