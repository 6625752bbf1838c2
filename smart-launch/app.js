// Courier web app: thread list, thread view, compose, receipts, real-time updates.
// Every piece of user content is put into the page with textContent (never innerHTML), so message
// text, names and file names render as text whatever they contain.
'use strict';

const $ = (id) => document.getElementById(id);
const STORE_KEY = 'courier.session';
const SEQ_KEY = 'courier.seq';
const URGENT = ['urgent', 'asap', 'stat'];

let session = null;
let token = null;
let tokenExpires = 0;
let lastActivity = Date.now();
let lastRefresh = Date.now();
let config = {};
let ws = null;
let wsBackoff = 1000;
let current = null; // the open thread: {header, messages: Map id -> resource}
const threads = new Map(); // id -> header Communication
const activity = new Map(); // thread id -> ISO time of its newest message (orders the list)
let unread = {total: 0, urgent: 0, byThread: new Map()};

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === 'class') e.className = v; else e.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function showNotice(text) {
  if (!token && text) return; // signed out: the ended screen says all there is to say
  const n = $('notice');
  n.textContent = text;
  n.hidden = !text;
}

// The session is over (signed out, logged off for inactivity, revoked elsewhere): every trace of
// PHI leaves the page and the app's memory, nothing actionable stays, and one clear screen says so.
function end(why) {
  sessionStorage.removeItem(STORE_KEY);
  sessionStorage.removeItem(SEQ_KEY);
  token = null;
  session = session ? {fhirUser: null} : null;
  if (ws) { ws.onclose = null; ws.onmessage = null; ws.close(); ws = null; }
  current = null;
  threads.clear();
  activity.clear();
  names.clear();
  receipts.clear();
  unread = {total: 0, urgent: 0, byThread: new Map()};
  for (const id of ['threads', 'messages', 'patient-banner']) $(id).replaceChildren();
  for (const id of ['main', 'patient-banner', 'compose', 'staff-banner', 'notice']) $(id).hidden = true;
  $('thread-title').textContent = '';
  $('me').textContent = '';
  $('compose').reset();
  $('new-form').reset();
  if ($('new-dialog').open) $('new-dialog').close();
  $('logout').hidden = true;
  document.title = 'Courier messages';
  $('ended').hidden = false;
  $('ended-why').textContent = why || 'Open Courier again from your EHR or your patient portal to continue.';
  $('connection').textContent = 'Signed out';
  $('connection').classList.remove('offline');
  window.scrollTo(0, 0);
  $('ended').setAttribute('tabindex', '-1');
  $('ended').focus();
}

// A staff-only message carries the HL7 security label NOPAT (Courier labels it at write time).
function isStaffOnly(c) {
  return ((c && c.meta && c.meta.security) || []).some((x) => x.code === 'NOPAT' && x.system === 'http://terminology.hl7.org/CodeSystem/v3-ActCode');
}

// ----- tokens and the session ---------------------------------------------------------------

async function refreshToken() {
  if (!token || !session || !session.session) return false;
  const body = new URLSearchParams({session: session.session});
  let r;
  try {
    r = await fetch('/smart/session/refresh', {method: 'POST', body, headers: {Authorization: 'Bearer ' + token}});
  } catch (e) {
    return false; // offline: keep the old token until it expires, try again later
  }
  if (r.ok) {
    const t = await r.json();
    token = t.access_token;
    tokenExpires = Date.now() + t.expires_in * 1000;
    lastRefresh = Date.now();
    session.access_token = token;
    sessionStorage.setItem(STORE_KEY, JSON.stringify(session));
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({type: 'auth', token}));
    return true;
  }
  if (r.status === 400 || r.status === 401) {
    let why = 'Your session has ended.';
    try { why = (await r.json()).error_description || why; } catch (e) { /* keep the default */ }
    end(why.charAt(0).toUpperCase() + why.slice(1));
  }
  return false;
}

// The token is refreshed shortly before it expires while the user is active; an idle user's
// session is left to end (Courier's automatic log-off decides, not the app).
setInterval(() => {
  if (!token) return;
  if (tokenExpires - Date.now() < 60000 && lastActivity > lastRefresh) refreshToken();
}, 15000);
for (const ev of ['keydown', 'pointerdown', 'focus']) {
  window.addEventListener(ev, () => {
    lastActivity = Date.now();
    if (token && Date.now() > tokenExpires) refreshToken();
  }, true);
}

async function api(method, path, body, headers) {
  if (!token) throw new Error('you are signed out');
  const send = () => fetch(path, {
    method,
    headers: Object.assign({Authorization: 'Bearer ' + token, Accept: 'application/fhir+json'},
      body !== undefined ? {'Content-Type': 'application/fhir+json'} : {}, headers || {}),
    body: body !== undefined ? JSON.stringify(body) : undefined,
  });
  let r = await send();
  if (r.status === 401 && await refreshToken()) r = await send();
  let json = null;
  try { json = await r.json(); } catch (e) { /* empty body */ }
  if (!r.ok) {
    const issue = json && json.issue && json.issue[0];
    const msg = issue ? (issue.diagnostics || issue.code) : ('the server answered ' + r.status);
    const err = new Error(msg);
    err.status = r.status;
    throw err;
  }
  return json;
}

// ----- people --------------------------------------------------------------------------------

// A reference to this server as `Type/id`; a reference elsewhere stays whole (so it can never be
// mistaken for a local person).
function refOf(x) {
  if (!x || typeof x.reference !== 'string') return null;
  const own = location.origin + '/';
  return x.reference.startsWith(own) ? x.reference.slice(own.length) : x.reference;
}

// Display names travel in the messages themselves (Reference.display, set by the sender's app
// from the EHR's record); the launch tells the app its own user's and patient's names.
const names = new Map();

// A sender names only themself: recipients' displays in someone else's message are not trusted.
function learnNames(c) {
  const r = c.sender;
  if (r && typeof r.display === 'string' && refOf(r) && !names.has(refOf(r))) names.set(refOf(r), r.display);
}

function nameOf(ref) {
  if (!ref) return 'Unknown';
  if (ref === session.fhirUser) return 'You';
  if (ref === session.patient && session.patient_display && session.patient_display.name) return session.patient_display.name;
  return names.get(ref) || ref;
}

function referenceTo(ref) {
  const display = ref === session.fhirUser ? myName() : (ref === session.patient && session.patient_display ? session.patient_display.name : names.get(ref));
  return display ? {reference: ref, display} : {reference: ref};
}

function myName() { return session.user_display && session.user_display.name; }

function participants(c) {
  const all = [refOf(c.sender), ...(c.recipient || []).map(refOf)].filter(Boolean);
  return [...new Set(all)];
}

// ----- thread list ---------------------------------------------------------------------------

async function loadThreads() {
  const b = await api('GET', '/Communication?part-of:missing=true&_sort=-_lastUpdated&_count=100');
  threads.clear();
  for (const e of (b.entry || [])) {
    if (e.search && e.search.mode !== 'match') continue;
    threads.set(e.resource.id, e.resource);
    learnNames(e.resource);
  }
  // The newest replies put their threads first (a new "BP 165/100" must not sit 12th of 12).
  try {
    const r = await api('GET', '/Communication?part-of:missing=false&_sort=-_lastUpdated&_count=200');
    for (const e of (r.entry || [])) if (!e.search || e.search.mode === 'match') noteActivity(e.resource);
  } catch (e) { /* the list still works, ordered by its headers */ }
  await loadUnread();
}

async function loadUnread() {
  try {
    const p = await api('GET', '/Communication/$unread');
    unread = {total: 0, urgent: 0, byThread: new Map()};
    for (const x of (p.parameter || [])) {
      if (x.name === 'unread') unread.total = x.valueInteger;
      if (x.name === 'urgent') unread.urgent = x.valueInteger;
      if (x.name === 'thread') {
        const get = (n) => x.part.find((q) => q.name === n);
        unread.byThread.set(get('thread').valueReference.reference, {n: get('unread').valueInteger, urgent: get('urgent').valueInteger});
      }
    }
  } catch (e) { /* counts are a convenience; the list still works */ }
  renderThreads();
}

let unreadTimer = null;
function loadUnreadSoon() {
  clearTimeout(unreadTimer);
  unreadTimer = setTimeout(loadUnread, 250);
}

function whenOf(c) { return (c && c.meta && c.meta.lastUpdated) || ''; }

// Remembers the newest activity of the thread `c` belongs to (or heads).
function noteActivity(c) {
  const parent = (c.partOf || []).map(refOf).find(Boolean);
  const id = parent ? parent.replace(/^Communication\//, '') : c.id;
  const t = whenOf(c);
  if (t > (activity.get(id) || '')) activity.set(id, t);
}

function threadTime(t) {
  const a = activity.get(t.id) || '';
  return a > whenOf(t) ? a : whenOf(t);
}

function renderThreads() {
  const list = $('threads');
  list.replaceChildren();
  const sorted = [...threads.values()].sort((a, b) => threadTime(b).localeCompare(threadTime(a)));
  for (const t of sorted) {
    const counts = unread.byThread.get('Communication/' + t.id);
    const topic = (t.topic && t.topic.text) || firstText(t) || '(no subject)';
    const li = el('li', {tabindex: 0, role: 'link', 'data-id': t.id, 'aria-current': current && current.header.id === t.id ? 'true' : null},
      el('span', {class: 'topic'}, topic),
      t.status === 'preparation' ? el('span', {class: 'badge'}, 'Draft') : null,
      isStaffOnly(t) ? el('span', {class: 'badge staff'}, 'Staff only') : null,
      counts && counts.urgent ? el('span', {class: 'badge urgent', 'aria-label': counts.urgent + ' urgent unread'}, '! ' + counts.urgent) : null,
      counts && counts.n ? el('span', {class: 'badge', 'aria-label': counts.n + ' unread'}, counts.n) : null);
    li.addEventListener('click', () => openThread(t.id));
    li.addEventListener('keydown', (ev) => { if (ev.key === 'Enter' || ev.key === ' ') { ev.preventDefault(); openThread(t.id); } });
    list.append(li);
  }
  $('threads-empty').hidden = threads.size > 0;
  $('threads-title').textContent = unread.total ? 'Conversations (' + unread.total + ' unread)' : 'Conversations';
  document.title = (unread.total ? '(' + unread.total + ') ' : '') + 'Courier messages';
}

function firstText(c) {
  const p = (c.payload || []).find((x) => x.contentString);
  return p ? p.contentString.slice(0, 80) : null;
}

// ----- thread view ---------------------------------------------------------------------------

async function openThread(id) {
  let header = threads.get(id);
  if (!header) header = await api('GET', '/Communication/' + encodeURIComponent(id));
  current = {header, messages: new Map()};
  $('main').classList.add('reading');
  $('thread-title').textContent = (header.topic && header.topic.text) || '(no subject)';
  $('staff-banner').hidden = !isStaffOnly(header);
  // The composer belongs to one thread: nothing typed or chosen for another carries over.
  $('compose').reset();
  updateCount();
  $('compose').hidden = false;
  const b = await api('GET', '/Communication?part-of=' + encodeURIComponent('Communication/' + id) + '&_sort=sent&_count=200');
  current.messages.set(header.id, header);
  learnNames(header);
  for (const e of (b.entry || [])) {
    if (e.search && e.search.mode !== 'match') continue;
    current.messages.set(e.resource.id, e.resource);
    learnNames(e.resource);
  }
  renderMessages();
  renderThreads();
  $('thread-view').focus();
  await markSeen();
  await loadReceipts();
}

function renderMessages() {
  const list = $('messages');
  list.replaceChildren();
  for (const m of current.messages.values()) {
    // The thread header is the title; it shows as a message only if it carries one.
    if (m.id === current.header.id && !(m.payload || []).length) continue;
    list.append(renderMessage(m));
  }
}

function renderMessage(m) {
  const mine = refOf(m.sender) === session.fhirUser;
  const withdrawn = m.status === 'entered-in-error';
  const li = el('li', {id: 'msg-' + m.id, class: (mine ? 'mine ' : '') + (withdrawn ? 'withdrawn' : '')});
  li.append(el('div', {class: 'meta'},
    el('span', {class: 'from'}, nameOf(refOf(m.sender))),
    el('time', {datetime: m.sent || m.meta.lastUpdated}, new Date(m.sent || m.meta.lastUpdated).toLocaleString()),
    m.priority && m.priority !== 'routine' ? el('span', {class: 'priority'}, m.priority) : null,
    m.status === 'preparation' ? el('span', {class: 'badge'}, 'Draft') : null));
  if (withdrawn) {
    li.append(el('p', {class: 'text'}, 'This message was withdrawn by its sender.'));
    return li;
  }
  for (const p of (m.payload || [])) {
    if (p.contentString) li.append(el('p', {class: 'text'}, p.contentString));
    if (p.contentAttachment) li.append(attachmentLink(p.contentAttachment));
  }
  if (mine) li.append(el('div', {class: 'status', id: 'status-' + m.id}));
  return li;
}

// Only a Binary on this server is ever fetched (with the user's token); any other URL is shown as
// text and never followed, so a message cannot send the token elsewhere.
function binaryPath(url) {
  const own = location.origin + '/';
  const rel = typeof url === 'string' && url.startsWith(own) ? url.slice(own.length) : url;
  return typeof rel === 'string' && /^Binary\/[A-Za-z0-9.-]{1,64}$/.test(rel) ? '/' + rel : null;
}

function attachmentLink(a) {
  const name = a.title || 'attachment';
  const path = binaryPath(a.url);
  if (!path) return el('span', {class: 'attachment'}, 'Attachment (not stored in Courier, not opened): ' + name);
  const b = el('button', {type: 'button', class: 'quiet attachment', 'aria-label': 'Download attachment ' + name}, 'Attachment: ' + name);
  b.addEventListener('click', async () => {
    try {
      const bin = await api('GET', path);
      const bytes = Uint8Array.from(atob(bin.data || ''), (c) => c.charCodeAt(0));
      const url = URL.createObjectURL(new Blob([bytes], {type: 'application/octet-stream'}));
      const link = el('a', {href: url, download: name});
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
    } catch (e) { showNotice('Could not open the attachment: ' + e.message); }
  });
  return b;
}

// Messages addressed to me in the open thread are marked read while the page is visible.
async function markSeen() {
  if (!current || document.visibilityState !== 'visible') return;
  let changed = false;
  for (const m of current.messages.values()) {
    const toMe = (m.recipient || []).some((r) => refOf(r) === session.fhirUser);
    if (!toMe || m.status === 'preparation' || m.status === 'entered-in-error' || m._read) continue;
    try {
      await api('POST', '/Communication/' + m.id + '/$mark-read');
      m._read = true;
      changed = true;
    } catch (e) { /* shown again next time */ }
  }
  if (changed) loadUnreadSoon();
}
document.addEventListener('visibilitychange', markSeen);

async function loadReceipts() {
  for (const m of current.messages.values()) {
    if (refOf(m.sender) !== session.fhirUser || m.status === 'preparation') continue;
    try {
      const p = await api('GET', '/Communication/' + m.id + '/$receipts');
      for (const x of (p.parameter || [])) showReceipt(m.id, receiptOf(x));
    } catch (e) { /* not shown */ }
  }
}

function receiptOf(param) {
  const get = (n) => (param.part || []).find((q) => q.name === n);
  return {recipient: get('recipient').valueReference.reference, delivered: get('delivered') && get('delivered').valueInstant, read: get('read') && get('read').valueInstant};
}

const receipts = new Map(); // message id -> Map recipient -> receipt
function showReceipt(id, r) {
  if (!receipts.has(id)) receipts.set(id, new Map());
  receipts.get(id).set(r.recipient, r);
  const box = $('status-' + id);
  if (!box) return;
  const lines = [...receipts.get(id).values()].map((x) => (x.read ? 'Read by ' : 'Delivered to ') + nameOf(x.recipient));
  box.textContent = lines.join(' · ');
}

// ----- compose -------------------------------------------------------------------------------

function toBase64(buf) {
  let s = '';
  const bytes = new Uint8Array(buf);
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

async function upload(file) {
  if (config.attachment_max_bytes && file.size > config.attachment_max_bytes) {
    throw new Error('the file is larger than ' + Math.round(config.attachment_max_bytes / 1048576) + ' MB');
  }
  const type = file.type || 'application/octet-stream';
  const bin = await api('POST', '/Binary', {resourceType: 'Binary', contentType: type, data: toBase64(await file.arrayBuffer())}, {Prefer: 'return=representation'});
  return {contentType: type, url: 'Binary/' + bin.id, title: file.name, size: file.size};
}

function isPatient() { return (session.fhirUser || '').startsWith('Patient/'); }

async function send(ev) {
  ev.preventDefault();
  const text = $('compose-text').value.trim();
  const file = $('compose-file').files[0];
  if (!text && !file) return;
  if (!current || !token) return;
  const h = current.header;
  const payload = [];
  if (text) payload.push({contentString: text});
  $('send').disabled = true;
  try {
    if (file) payload.push({contentAttachment: await upload(file)});
    const msg = {
      resourceType: 'Communication',
      status: 'completed',
      partOf: [{reference: 'Communication/' + h.id}],
      sender: referenceTo(session.fhirUser),
      recipient: participants(h).filter((r) => r !== session.fhirUser).map(referenceTo),
      sent: new Date().toISOString(),
      payload,
    };
    if (h.subject) msg.subject = h.subject;
    if (h.category) msg.category = h.category;
    if (!isPatient()) msg.priority = $('compose-priority').value;
    const saved = await api('POST', '/Communication', msg, {Prefer: 'return=representation'});
    noteActivity(saved);
    renderThreads();
    current.messages.set(saved.id, saved);
    if (!$('msg-' + saved.id)) $('messages').append(renderMessage(saved));
    $('compose-text').value = '';
    $('compose-file').value = '';
    showNotice('');
  } catch (e) {
    showNotice('Your message was not sent: ' + e.message);
  } finally {
    $('send').disabled = false;
    updateCount();
  }
}

function updateCount() {
  const max = isPatient() ? config.patient_max_message_chars : 0;
  const n = $('compose-text').value.length;
  $('compose-count').textContent = max ? n + ' / ' + max + ' characters' : '';
}

function newError(text) {
  $('new-error').textContent = text;
  $('new-error').hidden = !text;
}

// A clinician with a patient in context chooses: message the patient, or staff only (the patient
// is the subject, never a participant, and Courier labels the thread NOPAT).
function chooseAudience() {
  const staff = $('audience-staff').checked;
  const to = $('new-recipient');
  if (staff && /^(Patient|RelatedPerson)\//.test(to.value)) to.value = '';
  if (!staff && !to.value && session.patient) to.value = session.patient;
  newError('');
}

async function startThread(ev) {
  ev.preventDefault();
  const to = $('new-recipient').value.trim();
  if (!/^(Patient|Practitioner|PractitionerRole|RelatedPerson|CareTeam|Group)\/[A-Za-z0-9\-.]{1,64}$/.test(to)) {
    newError('“To” must be a reference such as Patient/123.');
    return;
  }
  const staffOnly = !isPatient() && $('audience-staff').checked;
  if (staffOnly && /^(Patient|RelatedPerson)\//.test(to)) {
    newError('A staff-only conversation cannot include the patient or their relatives. Choose “Message the patient” instead.');
    return;
  }
  const base = {
    resourceType: 'Communication',
    sender: referenceTo(session.fhirUser),
    recipient: [referenceTo(to)],
  };
  if (session.patient) base.subject = {reference: session.patient};
  const category = $('new-category').value;
  if (category) base.category = [{coding: [{system: config.category_system, code: category}]}];
  try {
    const header = await api('POST', '/Communication', Object.assign({status: 'in-progress', topic: {text: $('new-topic').value.trim()}}, base), {Prefer: 'return=representation'});
    await api('POST', '/Communication', Object.assign({status: 'completed', partOf: [{reference: 'Communication/' + header.id}], sent: new Date().toISOString(), payload: [{contentString: $('new-text').value}]}, base));
    threads.set(header.id, header);
    $('new-dialog').close();
    $('new-form').reset();
    newError('');
    showNotice('');
    await openThread(header.id);
  } catch (e) {
    newError('The conversation was not started: ' + e.message);
  }
}

// ----- real time -----------------------------------------------------------------------------

function setConnection(text, offline) {
  const c = $('connection');
  c.textContent = text;
  c.classList.toggle('offline', !!offline);
}

function connect() {
  if (!token) return;
  const url = (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/ws';
  ws = new WebSocket(url);
  ws.onopen = () => {
    const since = Number(sessionStorage.getItem(SEQ_KEY));
    ws.send(JSON.stringify(Object.assign({type: 'auth', token}, since ? {since} : {})));
  };
  ws.onmessage = (m) => {
    let f;
    try { f = JSON.parse(m.data); } catch (e) { return; }
    if (f.type === 'ready') { wsBackoff = 1000; setConnection('Connected'); remember(f.seq); }
    else if (f.type === 'resync') { remember(f.seq); loadThreads().then(() => current && openThread(current.header.id)); }
    else if (f.type === 'event') { remember(f.seq); onEvent(f); }
    else if (f.type === 'error' && (f.code === 'expired' || f.code === 'login' || f.code === 'revoked')) {
      ws.onclose = null;
      refreshToken().then((ok) => { if (ok) connect(); });
    }
  };
  ws.onclose = () => {
    setConnection(navigator.onLine ? 'Reconnecting…' : 'Offline — reconnecting when the network is back', true);
    setTimeout(connect, wsBackoff);
    wsBackoff = Math.min(wsBackoff * 2, 30000);
  };
}

function remember(seq) {
  if (typeof seq === 'number' && seq > Number(sessionStorage.getItem(SEQ_KEY) || 0)) sessionStorage.setItem(SEQ_KEY, String(seq));
}

function onEvent(f) {
  if (f.resourceType === 'CommunicationRequest') {
    // Courier's escalation of an unread urgent message: a reminder for its recipient (or backup).
    const c = f.resource;
    const escalation = c && (c.category || []).some((x) => (x.coding || []).some((k) => k.code === 'unread-urgent'));
    if (escalation && c.status === 'active' && (c.recipient || []).some((r) => refOf(r) === session.fhirUser)) {
      showNotice('Reminder: an urgent message is waiting to be read.');
    }
    return;
  }
  if (f.resourceType !== 'Communication') return;
  if (f.event === 'receipt') {
    const r = f.receipt;
    showReceipt(f.id, {recipient: r.recipient.reference, delivered: r.delivered, read: r.read});
    return;
  }
  const c = f.resource;
  if (c) learnNames(c);
  if (f.event === 'delete') {
    threads.delete(f.id);
    if (current) { current.messages.delete(f.id); const li = $('msg-' + f.id); if (li) li.remove(); }
    renderThreads();
    return;
  }
  const parent = (c.partOf || []).map(refOf).find(Boolean);
  if (!parent) threads.set(c.id, c);
  noteActivity(c);
  renderThreads();
  const toMe = (c.recipient || []).some((r) => refOf(r) === session.fhirUser);
  if (f.event === 'create' && toMe && c.status !== 'preparation') {
    api('POST', '/Communication/' + c.id + '/$mark-delivered').catch(() => {});
  }
  if (current && c.id === current.header.id) {
    current.header = c;
    $('thread-title').textContent = (c.topic && c.topic.text) || '(no subject)';
  }
  if (current && (parent === 'Communication/' + current.header.id || (c.id === current.header.id && (c.payload || []).length))) {
    const old = current.messages.get(c.id);
    current.messages.set(c.id, c);
    const li = renderMessage(c);
    const existing = $('msg-' + c.id);
    if (existing) existing.replaceWith(li); else $('messages').append(li);
    if (old && old._read) c._read = true;
    const rs = receipts.get(c.id);
    if (rs) for (const r of rs.values()) showReceipt(c.id, r);
    markSeen();
  }
  loadUnreadSoon();
}

window.addEventListener('offline', () => setConnection('Offline — reconnecting when the network is back', true));
window.addEventListener('online', () => { if (!ws || ws.readyState !== WebSocket.OPEN) { wsBackoff = 1000; connect(); } });

// ----- styling from the EHR -------------------------------------------------------------------

// The EHR's style (smart_style_url), fetched by Courier at launch and handed over with the session.
function applyStyle(s) {
  try {
    const map = {color_background: '--bg', color_text: '--fg', color_highlight: '--accent', color_error: '--error',
      color_success: '--success', dim_border_radius: '--radius', dim_spacing_size: '--space', font_family_body: '--font', dim_font_size: '--font-size'};
    for (const [k, v] of Object.entries(map)) {
      // Only plain values: a colour, a length or a font list (no url(), no expressions).
      if (typeof s[k] === 'string' && /^[#\w\s,.%'"-]{1,100}$/.test(s[k])) document.documentElement.style.setProperty(v, s[k]);
    }
  } catch (e) { /* the default look */ }
}

// ----- start ----------------------------------------------------------------------------------

async function start() {
  try { session = JSON.parse(sessionStorage.getItem(STORE_KEY)); } catch (e) { session = null; }
  if (!session || !session.access_token) { end(); return; }
  token = session.access_token;
  tokenExpires = Date.now() + (session.expires_in || 300) * 1000;
  const me = session.user_display && session.user_display.name;
  $('me').textContent = me ? 'Signed in as ' + me : session.fhirUser;
  if (session.need_patient_banner && session.patient) {
    const d = session.patient_display || {};
    const b = $('patient-banner');
    b.replaceChildren(el('span', {}, d.name || session.patient),
      d.birthDate ? el('span', {}, ' · Born ' + d.birthDate) : null,
      d.gender ? el('span', {}, ' · ' + d.gender) : null);
    b.hidden = false;
  }
  if (session.smart_style) applyStyle(session.smart_style);
  try { config = await (await fetch('/app/config.json')).json(); } catch (e) { config = {}; }
  const categories = $('new-category');
  categories.append(el('option', {value: ''}, isPatient() ? 'Choose one…' : '(none)'));
  for (const c of (config.categories || [])) categories.append(el('option', {value: c.code}, c.display));
  categories.required = isPatient();
  $('priority-field').hidden = isPatient();
  // Patients are told, where they write and before they write, that messages are not for
  // emergencies — with the number to call.
  if (isPatient() && config.emergency_number) {
    for (const e of document.querySelectorAll('.emergency')) {
      e.textContent = 'Not for emergencies. If this is an emergency, call ' + config.emergency_number + ' now.';
      e.hidden = false;
    }
  }
  if (isPatient() && config.expected_response_notice) {
    for (const id of ['response-notice', 'new-notice']) {
      $(id).textContent = config.expected_response_notice;
      $(id).hidden = false;
    }
  }
  if (isPatient() && config.patient_max_message_chars) {
    $('compose-text').maxLength = config.patient_max_message_chars;
    $('new-text').maxLength = config.patient_max_message_chars;
  }
  $('main').hidden = false;
  $('compose').addEventListener('submit', send);
  $('compose-text').addEventListener('input', updateCount);
  $('audience').hidden = isPatient() || !session.patient;
  for (const id of ['audience-patient', 'audience-staff']) $(id).addEventListener('change', chooseAudience);
  $('new-thread').addEventListener('click', () => {
    $('new-form').reset();
    newError('');
    if (!isPatient() && session.patient) $('new-recipient').value = session.patient;
    $('new-dialog').showModal();
  });
  $('new-form').addEventListener('submit', startThread);
  $('new-cancel').addEventListener('click', () => $('new-dialog').close());
  $('back').addEventListener('click', () => {
    $('main').classList.remove('reading');
    current = null;
    $('compose').hidden = true;
    $('staff-banner').hidden = true;
    renderThreads();
  });
  $('logout').addEventListener('click', async () => {
    try { await fetch('/smart/logout', {method: 'POST', body: new URLSearchParams({session: session.session}), headers: {Authorization: 'Bearer ' + token}}); } catch (e) { /* ended locally anyway */ }
    end('You have signed out.');
  });
  try {
    await loadThreads();
  } catch (e) {
    if (e.status === 401) { end('Your session has expired.'); return; }
    showNotice('Could not load your conversations: ' + e.message);
  }
  connect();
  document.body.dataset.ready = 'true';
}

start();
