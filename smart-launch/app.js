// Courier web app: thread list, thread view, compose, receipts, real-time updates.
// Every piece of user content is put into the page with textContent (never innerHTML), so message
// text, names and file names render as text whatever they contain.
'use strict';

const $ = (id) => document.getElementById(id);
const STORE_KEY = 'courier.session';
const SEQ_KEY = 'courier.seq';
const AGAIN_KEY = 'courier.sign-in-again'; // {href, text}: not PHI (a registered EHR's name)
// When this page was last alive (ms; not PHI). A browser that restores a closed window ("Restore
// pages", Ctrl+Shift+T, a restart) gives the tab its sessionStorage back, token and all: a start
// this long after the page was left is such a restore, not a reload, and is signed out (a
// ward PC's next user must not find the last one's inbox). The launch and step-up pages clear it.
const LEFT_KEY = 'courier.left';
const RESTORED_AFTER_MS = 15000;
const ALERTS_KEY = 'courier.alerts-asked';
const URGENT = ['urgent', 'asap', 'stat'];
const PAGE = 50; // messages per page in a thread (older ones load on scroll)
const DRAFT_DELAY = 1200; // ms of quiet typing before a draft is saved

let session = null;
let token = null;
let tokenExpires = 0;
let lastActivity = Date.now();
let lastRefresh = Date.now();
let config = {};
let ws = null;
let wsBackoff = 1000;
let current = null; // the open thread: {header, messages: Map id -> resource, older: next-page path}
const threads = new Map(); // id -> header Communication
const latest = new Map(); // thread id -> newest message in it (orders the list, gives the preview)
// thread id -> newest message a person wrote (not Courier's automatic reply or forward): the
// preview and "Waiting for my reply" go by it (a walk-through: back from leave, a clinician's
// unanswered request read "You: Forwarded automatically…" and was not among those waiting).
const latestWritten = new Map();
const draftThreads = new Set(); // threads where I have an unsent draft
let unread = {total: 0, urgent: 0, byThread: new Map()};
let unreadKnown = false; // $unread has answered at least once
const fresh = new Set(); // messages that arrived live since (not yet in the counts)
const filters = {scope: 'patient', text: '', show: 'all', when: '', patient: '', inbox: ''};
const blobs = new Map(); // Binary path -> object URL (image previews), revoked at sign-out
let draft = null; // {thread, id, timer, saving} — the open thread's draft on the server
let noticeCause = null;
let again = null; // {href, text}: where the signed-out screen signs in again (a portal session's EHR)

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

// ----- notices: plain words, gone when their cause is ----------------------------------------

// `cause` names what went wrong ('network', 'send', …): the notice is cleared when that cause is
// seen to be gone (the next successful call, the socket back).
function showNotice(text, cause) {
  if (!token && text) return; // signed out: the signed-out screen says all there is to say
  $('notice-text').textContent = text || '';
  $('notice').hidden = !text;
  noticeCause = text ? (cause || 'other') : null;
}
function clearNotice(cause) {
  if (noticeCause && (!cause || noticeCause === cause)) showNotice('');
}

// The kinds of file Courier takes (its configuration), in words.
function sendable() {
  const names = {'image/jpeg': 'JPEG', 'image/png': 'PNG', 'image/gif': 'GIF', 'image/webp': 'WebP', 'image/heic': 'HEIC', 'application/pdf': 'PDF', 'text/plain': 'plain text'};
  const kinds = (config.attachment_types || []).map((t) => names[t] || t);
  return kinds.length ? kinds.join(', ') + ' files' : 'photos and PDF documents';
}

// What an error means to the person using the app.
function plain(e) {
  if (!e) return 'Something went wrong.';
  if (e.name === 'TypeError' || e.status === 0) return 'Courier cannot be reached. Check your internet connection; the app keeps trying.';
  switch (e.status) {
    case 400: case 422: return e.plain || 'Courier could not accept this: ' + (e.message || 'it is not valid') + '.';
    case 401: return 'Your session has ended. Open Courier again to continue.';
    case 403: return 'You do not have access to that.';
    case 404: case 410: return 'That is no longer available. It may have been removed.';
    case 409: case 412: return 'Someone changed this at the same time. Please try again.';
    case 413: return 'That is too large to send' + (config.attachment_max_bytes ? ' (the limit is ' + Math.round(config.attachment_max_bytes / 1048576) + ' MB).' : '.');
    case 415: return /content is not/.test(e.message || '')
      ? 'This file is not what its name or type says (it may be damaged, or a text file not saved as UTF-8). Save it again and send it, or send a photo or PDF of it.'
      : 'That kind of file cannot be sent. You can send ' + sendable() + '.';
    case 429: return 'Too many requests at once. Wait a moment and try again.';
    default: return e.status >= 500 ? 'Courier is having a problem right now. Try again in a moment.' : (e.message || 'Something went wrong.');
  }
}

// The session is over (signed out, logged off for inactivity, revoked elsewhere): every trace of
// PHI leaves the page and the app's memory, nothing actionable stays, and one clear screen says so.
function end(why) {
  // Where to sign in again (not PHI: the EHR's registered name), kept past the session's end and
  // a reload of this tab (a new session clears it).
  if (session && session.portal && session.ehr) {
    again = {href: '/smart/launch?ehr=' + encodeURIComponent(session.ehr), text: 'Sign in again'};
    sessionStorage.setItem(AGAIN_KEY, JSON.stringify(again));
  } else if (!again && !(session && session.fhirUser)) {
    try { again = JSON.parse(sessionStorage.getItem(AGAIN_KEY)); } catch (e) { again = null; }
    if (!again || typeof again.href !== 'string' || !again.href.startsWith('/smart/launch?ehr=')) again = null;
  }
  // The server may end an idle session a moment before this page's own check: say so.
  const idle = (config.idle_timeout_secs || 0) * 1000;
  if (token && idle && Date.now() - lastActivity > idle - 20000 && (!why || why.startsWith('Your session has ended'))) {
    why = idleWords(idle);
  }
  // Where to open Courier again, in the person's own words.
  // A portal's sign-in link, kept for this tab, says where also after a reload.
  const place = session && session.fhirUser ? (isPatient() ? 'your patient portal' : 'your EHR') : again ? 'your patient portal' : 'your EHR or your patient portal';
  const againText = 'Open Courier again from ' + place + ' to continue.';
  if (why && !why.includes(againText)) why += ' ' + againText;
  sessionStorage.removeItem(STORE_KEY);
  sessionStorage.removeItem(SEQ_KEY);
  sessionStorage.removeItem(LEFT_KEY);
  token = null;
  session = session ? {fhirUser: null} : null;
  $('step-up').hidden = true;
  $('step-up-session').value = '';
  if (ws) { ws.onclose = null; ws.onmessage = null; ws.close(); ws = null; }
  if (draft && draft.timer) clearTimeout(draft.timer);
  draft = null;
  current = null;
  threads.clear();
  latest.clear();
  latestWritten.clear();
  draftThreads.clear();
  people.clear();
  asked.clear();
  askedAt.clear();
  receipts.clear();
  delivered.clear();
  marked.clear();
  fresh.clear();
  unreadKnown = false;
  recipientsList = [];
  for (const url of blobs.values()) URL.revokeObjectURL(url);
  blobs.clear();
  unread = {total: 0, urgent: 0, byThread: new Map()};
  for (const id of ['threads', 'messages', 'patient-banner', 'thread-patient', 'announce', 'new-to', 'filter-patient', 'me', 'new-about', 'compose-error', 'compose-to', 'notice-text', 'new-error', 'file-name', 'compose-away', 'new-away']) $(id).replaceChildren();
  for (const id of ['main', 'patient-banner', 'compose', 'staff-banner', 'notice', 'thread-actions', 'thread-patient', 'logout', 'alerts', 'older', 'file-chosen', 'compose-away', 'new-away']) $(id).hidden = true;
  document.querySelector('.skip').hidden = true;
  $('thread-title').textContent = '';
  $('threads-count').textContent = '';
  $('threads-title').textContent = 'Conversations';
  $('scope-patient').textContent = 'This patient';
  $('scope-all').textContent = 'All my patients';
  $('draft-state').textContent = '';
  $('filter-inbox').replaceChildren(el('option', {value: ''}, 'All inboxes'));
  for (const id of ['filter-patient', 'filter-inbox']) delete $(id).dataset.list;
  $('compose').reset();
  $('new-form').reset();
  $('filter-text').value = '';
  if ($('new-dialog').open) $('new-dialog').close();
  if ($('notices-dialog').open) $('notices-dialog').close();
  if ($('idle-dialog').open) $('idle-dialog').close();
  if ($('photo-dialog').open) $('photo-dialog').close();
  $('photo-full').removeAttribute('src');
  $('photo-full').alt = '';
  $('photo-dialog').setAttribute('aria-label', 'Photo');
  $('idle-error').hidden = true;
  $('file-name').title = '';
  if ($('away-dialog').open) $('away-dialog').close();
  $('away').hidden = true;
  awayRole = null;
  $('away-form').reset();
  $('away-delegate').replaceChildren();
  for (const id of ['away-now', 'away-status', 'away-error']) $(id).textContent = '';
  $('idle-text').textContent = '';
  $('notices').hidden = true;
  for (const id of ['notices-email-label', 'notices-sms-label', 'notices-zone', 'notices-status']) $(id).replaceChildren();
  $('notices-value').value = '';
  $('notices-code').value = '';
  document.title = 'Courier messages';
  $('ended').hidden = false;
  $('ended-pending').hidden = true;
  $('ended-why').textContent = why || againText;
  // A portal sign-in can be started again here; an EHR launch only from the EHR.
  $('ended-again').hidden = !again;
  if (again) { $('ended-again').href = again.href; $('ended-again').textContent = again.text; }
  $('connection').textContent = 'Signed out';
  $('connection').classList.remove('offline');
  window.scrollTo(0, 0);
  $('ended').focus();
}

// The chosen file's name beside the picker (as text: a file name is the sender's own words), and
// a way to take it off again.
function showChosen() {
  const f = $('compose-file').files[0];
  $('file-chosen').hidden = !f;
  $('file-name').textContent = f ? f.name : '';
  $('file-name').title = f ? f.name : '';
  $('file-remove').setAttribute('aria-label', f ? 'Remove the attached file ' + f.name : 'Remove the attached file');
}

// 'auto-reply' or 'forward' for a message Courier wrote for someone out of office, else null.
function automaticKind(c) {
  const x = ((c && c.extension) || []).find((e) => e.url === 'https://courier.example.org/fhir/StructureDefinition/automatic');
  return x ? (x.valueCode || 'auto-reply') : null;
}

// A staff-only message carries the HL7 security label NOPAT (Courier labels it at write time).
function isStaffOnly(c) {
  return ((c && c.meta && c.meta.security) || []).some((x) => x.code === 'NOPAT' && x.system === 'http://terminology.hl7.org/CodeSystem/v3-ActCode');
}

// ----- tokens and the session ---------------------------------------------------------------

// One refresh at a time: every caller shares the one in flight (a burst of activity after a
// pause must not send a burst of refreshes, which an EHR that rotates refresh tokens would take
// as reuse and end the session).
let refreshing = null;
// `asActivity`: the person answered (the idle warning); else activity is what the page saw.
function refreshToken(asActivity) {
  if (!refreshing) refreshing = refreshOnce(asActivity).finally(() => { refreshing = null; });
  return refreshing;
}
async function refreshOnce(asActivity) {
  if (!token || !session || !session.session) return false;
  const body = new URLSearchParams({session: session.session});
  // Nothing done since the last refresh (the socket's token ran out, a background call met 401):
  // a new token, but not activity: the session still ends at the idle limit.
  if (!asActivity && !(lastActivity > lastRefresh)) body.set('background', '1');
  const mine = session;
  let r;
  try {
    r = await fetch('/smart/session/refresh', {method: 'POST', body, headers: {Authorization: 'Bearer ' + token}});
  } catch (e) {
    return false; // offline: keep the old token until it expires, try again later
  }
  // Signed out meanwhile: the answer must not bring the session back to this page.
  if (!token || session !== mine) return false;
  if (r.ok) {
    const t = await r.json();
    if (!token || session !== mine) return false;
    token = t.access_token;
    tokenExpires = Date.now() + t.expires_in * 1000;
    lastRefresh = Date.now();
    session.access_token = token;
    sessionStorage.setItem(STORE_KEY, JSON.stringify(session));
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({type: 'auth', token}));
    return true;
  }
  if (r.status === 400 || r.status === 401) {
    end('Your session has ended (signed out here or elsewhere, or by your EHR).');
  }
  return false;
}

async function signOut(why) {
  const s = session && session.session;
  const t = token;
  end(why);
  if (s && t) {
    // Offline: ended here at once; the server is told as soon as the network is back (while
    // this page is open; otherwise the session ends at its idle limit).
    // A few tries with growing waits (the server may be restarting), and again when the
    // browser is back online.
    let tries = 0;
    const tell = async () => {
      tries += 1;
      try {
        const r = await fetch('/smart/logout', {method: 'POST', body: new URLSearchParams({session: s}), headers: {Authorization: 'Bearer ' + t}, keepalive: true});
        if (r.status < 500) { $('ended-pending').hidden = true; return; }
      } catch (e) { /* not reached: tried again below */ }
      // Said on the screen: the server has not confirmed it (the session ends at its idle limit
      // at the latest).
      if (!token) $('ended-pending').hidden = false;
      if (tries < 6) setTimeout(tell, 2000 * 2 ** tries);
      window.addEventListener('online', tell, {once: true});
    };
    await tell();
  }
}

// The token is refreshed shortly before it expires while the user is active. An idle user is
// signed out here at the configured idle limit (Courier's own log-off ends the session too).
// The server counts the session idle from its last refresh: while the person is active it is
// refreshed at least every half idle limit too (an idle limit shorter than a token's life would
// otherwise end the session on the server before the warning here).
setInterval(() => {
  if (!token) return;
  const idle = (config.idle_timeout_secs || 0) * 1000;
  const due = tokenExpires - Date.now() < 60000 || (idle && Date.now() - lastRefresh > idle / 2);
  if (due && lastActivity > lastRefresh) refreshToken();
}, 15000);

// Warned before the idle sign-out (WCAG 2.2.1: at least 20 seconds to keep the session with one
// simple action): a minute before it — a quarter of the limit when that is shorter, never under
// 20 s — a dialog counts down, above any other dialog (a half-written new conversation would be
// lost). "Stay signed in", or any activity, keeps the session and tells the server at once.
function idleCheck() {
  const dialog = $('idle-dialog');
  const idle = (config.idle_timeout_secs || 0) * 1000;
  if (!token || !idle) {
    if (dialog.open) dialog.close();
    return;
  }
  const left = lastActivity + idle - Date.now();
  if (left <= 0) {
    signOut(idleWords(idle));
    return;
  }
  const warn = Math.max(20000, Math.min(60000, idle / 4));
  if (left > warn) {
    if (dialog.open) { dialog.close(); renderThreads(); }
    return;
  }
  const secs = Math.ceil(left / 1000);
  // The tab's title says it too, for a window in the background.
  document.title = 'Signing out in ' + secs + ' s — Courier';
  $('idle-text').textContent = 'You will be signed out in ' + (secs === 1 ? '1 second' : secs + ' seconds') + ' because Courier has not been used for a while.';
  if (!dialog.open) {
    idleOpening = true;
    dialog.showModal();
    idleOpening = false;
  }
}
let idleOpening = false;
setInterval(idleCheck, 1000);
document.addEventListener('visibilitychange', () => { if (!document.hidden) idleCheck(); });
// "Stay signed in": the server is told first; the warning closes once it has agreed (else it
// stays, saying so, and the countdown goes on).
async function stayIn() {
  if (!token) return;
  $('idle-stay').disabled = true;
  // An answer is activity: the refresh says so to the server (a review: sent as a background
  // refresh, the server would have signed the person out at the old limit).
  const ok = await refreshToken(true);
  $('idle-stay').disabled = false;
  if (!token) return;
  if (ok) {
    $('idle-error').hidden = true;
    if ($('idle-dialog').open) $('idle-dialog').close();
    // Active as of that refresh (which told the server so), also after the focus the closed
    // warning hands back: not newer, or the next timer tick would send another refresh as
    // activity (a walk-through: the server kept the session two minutes past the limit).
    lastActivity = lastRefresh;
    renderThreads();
  } else {
    $('idle-error').textContent = 'Courier could not keep you signed in just now. Check the connection and press "Stay signed in" again.';
    $('idle-error').hidden = false;
  }
}
// "after 1 minute", "after 15 minutes", "after 90 seconds".
function idleWords(ms) {
  const min = Math.round(ms / 60000);
  const span = ms < 120000 && ms % 60000 ? Math.round(ms / 1000) + ' seconds' : min === 1 ? '1 minute' : min + ' minutes';
  return 'You were signed out after ' + span + ' without activity.';
}
// Reading counts as activity: the wheel, a touch moving, the keys, pressing, and moving the
// pointer some way (not the jitter of a resting mouse or a remote desktop). Not `scroll`: the
// app scrolls by itself when messages arrive, and that is nobody at the screen.
let pointerAt = null;
function active(e) {
  const dialog = $('idle-dialog');
  // While the warning shows, only its buttons (and Escape) decide: a Tab, an arrow key of a
  // screen reader or the press on "Sign out now" inside it is not "I am here" (a review: the
  // next tick closed the warning under the press, and the click landed on the page beneath).
  // Nor is the focus the warning takes.
  if (dialog.open || idleOpening) return;
  if (e && e.target instanceof Node && dialog.contains(e.target)) return;
  // Back after the limit (a background tab's timers may run once a minute): signed out, not
  // revived.
  const idle = (config.idle_timeout_secs || 0) * 1000;
  if (token && idle && Date.now() - lastActivity > idle) {
    signOut(idleWords(idle));
    return;
  }
  lastActivity = Date.now();
  if (token && Date.now() > tokenExpires) refreshToken();
}
for (const ev of ['keydown', 'pointerdown', 'focus', 'wheel', 'touchmove']) window.addEventListener(ev, active, true);
window.addEventListener('pointermove', (e) => {
  if (pointerAt && Math.hypot(e.screenX - pointerAt[0], e.screenY - pointerAt[1]) < 24) return;
  pointerAt = [e.screenX, e.screenY];
  active();
}, {capture: true, passive: true});

async function api(method, path, body, headers) {
  if (!token) { const e = new Error('you are signed out'); e.status = 401; throw e; }
  const send = () => fetch(path, {
    method,
    headers: Object.assign({Authorization: 'Bearer ' + token, Accept: 'application/fhir+json'},
      body !== undefined ? {'Content-Type': 'application/fhir+json'} : {}, headers || {}),
    body: body !== undefined ? JSON.stringify(body) : undefined,
  });
  let r;
  try {
    r = await send();
    if (r.status === 401 && await refreshToken()) r = await send();
  } catch (e) {
    showNotice(plain(e), 'network');
    throw e;
  }
  clearNotice('network');
  let json = null;
  try { json = await r.json(); } catch (e) { /* empty body */ }
  if (!r.ok) {
    const issue = json && json.issue && json.issue[0];
    const err = new Error(issue ? (issue.diagnostics || issue.code) : ('the server answered ' + r.status));
    err.status = r.status;
    if (r.status === 401 && token) end('Your session has ended.');
    throw err;
  }
  return json;
}

// A `next` link of this server as a path the app may call.
function ownPath(url) {
  if (typeof url !== 'string') return null;
  try {
    const u = new URL(url, location.origin);
    return u.origin === location.origin ? u.pathname + u.search : null;
  } catch (e) { return null; }
}
function nextOf(bundle) {
  const l = ((bundle && bundle.link) || []).find((x) => x.relation === 'next');
  return l ? ownPath(l.url) : null;
}
function matches(bundle) {
  return ((bundle && bundle.entry) || []).filter((e) => !e.search || e.search.mode === 'match').map((e) => e.resource);
}

// ----- people --------------------------------------------------------------------------------

// A reference to this server as `Type/id`; a reference elsewhere stays whole (so it can never be
// mistaken for a local person).
function refOf(x) {
  if (!x || typeof x.reference !== 'string') return null;
  const own = location.origin + '/';
  return x.reference.startsWith(own) ? x.reference.slice(own.length) : x.reference;
}

// People by name: Courier's summaries (from the EHR, $participants), asked for in batches.
const people = new Map(); // ref -> {name, birthDate, gender, mrn, role}
const asked = new Set(); // every reference asked for
const askedAt = new Map(); // reference -> when it was last asked (ms)
let pending = [];
let askTimer = null;
let askWaiters = [];
// A clinician's summary says whether they are away: asked again when older than `maxAge` ms
// (0: whenever a conversation opens; an outside walk-through: an open page said a clinician was
// away after they came back, and said nothing when they went away after it loaded).
const AWAY_FRESH_MS = 60000;

function wantPeople(refs, maxAge) {
  for (const r of refs) {
    if (!r || !/^(Patient|Practitioner|PractitionerRole|RelatedPerson|Group|CareTeam)\/[A-Za-z0-9.-]{1,64}$/.test(r)) continue;
    const stale = maxAge !== undefined && /^Practitioner(Role)?\//.test(r) && Date.now() - (askedAt.get(r) || 0) >= maxAge;
    if ((asked.has(r) || people.has(r)) && !stale) continue;
    asked.add(r);
    askedAt.set(r, Date.now());
    if (!pending.includes(r)) pending.push(r);
  }
  if (!pending.length) return Promise.resolve();
  return new Promise((resolve) => {
    askWaiters.push(resolve);
    clearTimeout(askTimer);
    askTimer = setTimeout(askNow, 20);
  });
}

// While a conversation is open in view, whether its clinicians are away stays current.
// (Asked when older than half a minute, looked at every 20 s: said within a minute; a
// walk-through saw a notice stay 87 s when both were a minute.)
setInterval(() => { if (token && current && !document.hidden) wantPeople(participants(current.header), AWAY_FRESH_MS / 2); }, 20000);

async function askNow() {
  const waiters = askWaiters;
  const todo = pending;
  askWaiters = [];
  pending = [];
  for (let i = 0; i < todo.length; i += 100) {
    const batch = todo.slice(i, i + 100);
    try {
      const p = await api('GET', '/Communication/$participants?' + batch.map((r) => 'reference=' + encodeURIComponent(r)).join('&'));
      for (const x of (p.parameter || [])) learnPerson(x);
    } catch (e) { /* names are shown as soon as they are known */ }
  }
  waiters.forEach((w) => w());
  if (token) { renderThreads(); if (current) renderThreadHead(); }
}

function learnPerson(param) {
  const v = {};
  for (const q of (param.part || [])) {
    const val = q.valueString ?? q.valueDate ?? q.valueDateTime ?? q.valueBoolean ?? q.valueCode ?? (q.valueReference && q.valueReference.reference);
    v[q.name] = val;
  }
  if (v.reference) people.set(v.reference, v);
  return v;
}

// "until 11 Dec 2026" (a date), "until 11 Dec 2026, 17:00" (a time): when someone away is back.
function untilText(p) {
  if (!p.awayUntil) return '';
  if (/^\d{4}-\d{2}-\d{2}$/.test(p.awayUntil)) return ' until ' + born(p.awayUntil);
  const t = new Date(p.awayUntil);
  return isNaN(t) ? '' : ' until ' + FULL.format(t);
}

// Whom of `refs` is away, in words, with their own automatic reply: said before sending (the
// message still goes to them; the covering colleague gets a copy).
function awayNotice(refs) {
  const lines = [];
  for (const r of refs) {
    const p = people.get(r);
    if (!p || p.away !== true || r === session.fhirUser) continue;
    lines.push(nameOf(r) + ' is away' + untilText(p) + '.' + (p.awayReply ? ' Their message: “' + p.awayReply + '”' : ''));
  }
  return lines.join(' ');
}
function showAway(id, refs) {
  const text = awayNotice(refs);
  $(id).textContent = text;
  $(id).hidden = !text;
}

function nameOf(ref) {
  if (!ref) return 'Unknown';
  if (ref === session.fhirUser) return 'You';
  const p = people.get(ref);
  if (p && p.name) return p.name + twin(ref, p);
  if (ref === session.patient && session.patient_display && session.patient_display.name) return session.patient_display.name;
  if (/^Patient\//.test(ref)) return 'Patient (name not known)';
  if (/^(Group|CareTeam)\//.test(ref)) return 'Care team';
  return 'Clinician (name not known)';
}

// Two people of one name are told apart (an outside walk-through: two "Grace Hopper"s in a
// patient's list, and in a colleague's staff-only picker): by role, else birth date, else the
// end of their reference.
function twin(ref, p) {
  const key = p.name.trim().toLowerCase();
  let other = null;
  for (const [r, q] of people) {
    if (r !== ref && q && q.name && q.name.trim().toLowerCase() === key) { other = q; break; }
  }
  return other ? ' (' + tellApart(ref, p, other) + ')' : '';
}

function tellApart(ref, p, other) {
  if (p.role && p.role !== other.role) return p.role;
  if (p.birthDate && p.birthDate !== other.birthDate) return 'born ' + born(p.birthDate);
  return '…' + ref.split('/').pop().slice(-4);
}

function referenceTo(ref) {
  const p = people.get(ref);
  const display = ref === session.fhirUser ? myName() : (p && p.name);
  return display ? {reference: ref, display} : {reference: ref};
}

function myName() { return session.user_display && session.user_display.name; }

function participants(c) {
  const all = [refOf(c.sender), ...(c.recipient || []).map(refOf)].filter(Boolean);
  return [...new Set(all)];
}

// " (covering for Ada Lovelace)" for a participant Courier added to the thread while a colleague
// is away, else "": everyone in the conversation is told why they are there.
function coveringFor(h, r) {
  const entry = (h.recipient || []).find((x) => refOf(x) === r);
  const note = ((entry && entry.extension) || []).find((e) => e.url === 'https://courier.example.org/fhir/StructureDefinition/covering-for');
  const who = note && refOf(note.valueReference);
  return who ? ' (covering for ' + (who === session.fhirUser ? 'you' : nameOf(who)) + ')' : '';
}

function isPatient() { return /^(Patient|RelatedPerson)\//.test(session.fhirUser || ''); }

// The patient a thread is about: its subject, else the patient among its participants.
function patientOf(c) {
  const s = refOf(c.subject);
  if (s && s.startsWith('Patient/')) return s;
  return participants(c).find((r) => r.startsWith('Patient/')) || null;
}

function born(d) {
  if (!d) return null;
  const t = new Date(d + 'T00:00:00');
  return isNaN(t) ? d : DAY.format(t);
}

// "Ada Lovelace · born 10 Dec 1990 · MRN 0042" — the patient, as a clinician must see them.
function patientLine(ref) {
  if (!ref) return 'No patient';
  const p = people.get(ref) || (ref === session.patient ? Object.assign({}, session.patient_display) : {});
  const parts = [p.name || 'Patient (name not known)'];
  if (p.birthDate) parts.push('born ' + born(p.birthDate));
  if (p.gender) parts.push(p.gender);
  if (p.mrn) parts.push('MRN ' + p.mrn);
  return parts.join(' · ');
}

// ----- thread list ---------------------------------------------------------------------------

async function loadThreads(onFirstPage) {
  threads.clear();
  latest.clear();
  latestWritten.clear();
  // Every thread header, a page at a time (the newest first): the list shows as soon as they
  // are in; the newest messages (previews, order), the unread counts and the names follow in
  // parallel and fill the rows in as they land.
  let path = '/Communication?part-of:missing=true&_sort=-_lastUpdated&_count=500';
  for (let pages = 0; path && pages < 10; pages++) {
    const b = await api('GET', path);
    for (const h of matches(b)) threads.set(h.id, h);
    path = nextOf(b);
    if (pages === 0) renderThreadsNow();
  }
  if (onFirstPage) onFirstPage();
  const refs = new Set();
  for (const t of threads.values()) participants(t).concat([patientOf(t)]).forEach((r) => refs.add(r));
  const names = wantPeople(refs);
  const replies = (async () => {
    let p = '/Communication?part-of:missing=false&_sort=-_lastUpdated&_count=1000';
    for (let pages = 0; p && pages < 5; pages++) {
      let b;
      try { b = await api('GET', p); } catch (e) { break; }
      for (const m of matches(b)) {
        noteLatest(m);
        // My unsent drafts: their threads are marked in the list.
        if (m.status === 'preparation' && refOf(m.sender) === session.fhirUser) draftThreads.add(threadIdOf(m));
      }
      p = nextOf(b);
    }
    wantPeople([...latest.values()].map((m) => refOf(m.sender)));
    renderThreads();
  })();
  await Promise.all([replies, loadUnread(), names]);
}

// Runs `fn` over `items`, at most `n` at a time.
async function each(items, n, fn) {
  const queue = [...items];
  const worker = async () => { while (queue.length) await fn(queue.shift()); };
  await Promise.all(Array.from({length: Math.min(n, queue.length)}, worker));
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
        const header = get('header');
        unread.byThread.set(get('thread').valueReference.reference, {n: get('unread').valueInteger, urgent: get('urgent').valueInteger, header: !!(header && header.valueBoolean)});
      }
    }
    unreadKnown = true;
    fresh.clear();
  } catch (e) { /* counts are a convenience; the list still works */ }
  renderThreads();
}

let unreadTimer = null;
function loadUnreadSoon() {
  clearTimeout(unreadTimer);
  unreadTimer = setTimeout(loadUnread, 250);
}

function whenOf(c) { return (c && (c.sent || (c.meta && c.meta.lastUpdated))) || ''; }
function updatedOf(c) { return (c && c.meta && c.meta.lastUpdated) || ''; }

function threadIdOf(c) {
  const parent = (c.partOf || []).map(refOf).find(Boolean);
  return parent ? parent.replace(/^Communication\//, '') : null;
}

// Remembers the newest message of the thread `m` belongs to (drafts are not activity).
function noteLatest(m) {
  const t = threadIdOf(m);
  if (!t || m.status === 'preparation') return;
  const old = latest.get(t);
  if (!old || updatedOf(m) >= updatedOf(old)) latest.set(t, m);
  if (automaticKind(m)) return;
  const wrote = latestWritten.get(t);
  if (!wrote || updatedOf(m) >= updatedOf(wrote)) latestWritten.set(t, m);
}

function activityOf(t) {
  const m = latest.get(t.id);
  const a = m ? updatedOf(m) : '';
  return a > updatedOf(t) ? a : updatedOf(t);
}

// Formatters made once (a new Intl.DateTimeFormat per row cost ~40 ms for 500 rows).
const TIME = new Intl.DateTimeFormat(undefined, {hour: '2-digit', minute: '2-digit'});
const WEEKDAY = new Intl.DateTimeFormat(undefined, {weekday: 'short', hour: '2-digit', minute: '2-digit'});
const DAY = new Intl.DateTimeFormat(undefined, {year: 'numeric', month: 'short', day: 'numeric'});
const FULL = new Intl.DateTimeFormat(undefined, {dateStyle: 'medium', timeStyle: 'short'});

function shortTime(iso) {
  if (!iso) return '';
  const d = new Date(iso);
  const now = Date.now();
  const today = new Date(now).setHours(0, 0, 0, 0);
  if (d >= today) return TIME.format(d);
  if (now - d < 6 * 86400000) return WEEKDAY.format(d);
  return DAY.format(d);
}

function textOf(c) {
  const p = (c.payload || []).find((x) => x.contentString);
  if (p) return p.contentString;
  const a = (c.payload || []).find((x) => x.contentAttachment);
  return a ? 'Attachment: ' + ((a.contentAttachment.title || '').replace(DIRECTION_CONTROLS, '') || 'file') : '';
}

function topicOf(t) {
  return (t.topic && t.topic.text) || textOf(t).slice(0, 80) || '(no subject)';
}

// Which group inboxes (Group, CareTeam) a thread is addressed to.
function inboxesOf(t) {
  return participants(t).filter((r) => /^(Group|CareTeam)\//.test(r));
}

function visibleThreads() {
  const q = filters.text.trim().toLowerCase();
  const since = filters.when ? Date.now() - (filters.when === '1' ? (Date.now() - new Date().setHours(0, 0, 0, 0)) : Number(filters.when) * 86400000) : 0;
  const out = [];
  for (const t of threads.values()) {
    const pt = patientOf(t);
    if (!isPatient() && session.patient && filters.scope === 'patient' && pt !== session.patient) continue;
    if (filters.patient && pt !== filters.patient) continue;
    if (filters.inbox === 'me' && !participants(t).includes(session.fhirUser)) continue;
    if (filters.inbox && filters.inbox !== 'me' && !inboxesOf(t).includes(filters.inbox)) continue;
    const counts = shownUnread(t);
    if (filters.show === 'unread' && !(counts && counts.n)) continue;
    if (filters.show === 'urgent' && !(counts && counts.urgent) && !URGENT.includes((latest.get(t.id) || {}).priority)) continue;
    if (filters.show === 'waiting') {
      const last = latestWritten.get(t.id);
      if (!last || refOf(last.sender) === session.fhirUser || last.status === 'entered-in-error') continue;
    }
    if (since && new Date(activityOf(t)).getTime() < since) continue;
    if (q) {
      // The patient's name in any order ("lovelace ada"), birth date as shown or as stored
      // ("Mar 2, 1985", "1985-03-02", "1985"), MRN, topic, participants: every word must match.
      const p = people.get(pt) || {};
      const hay = [topicOf(t), pt ? nameOf(pt) : '', p.mrn || '', p.birthDate || '', p.birthDate ? born(p.birthDate) : '', ...participants(t).map(nameOf)].join(' ').toLowerCase();
      if (!q.split(/\s+/).every((w) => hay.includes(w))) continue;
    }
    out.push(t);
  }
  return out.sort((a, b) => activityOf(b).localeCompare(activityOf(a)));
}

let renderQueued = false;
function renderThreads() {
  if (renderQueued) return;
  renderQueued = true;
  // Not requestAnimationFrame: a tab in the background must still update its title's count.
  setTimeout(() => { renderQueued = false; renderThreadsNow(); }, 0);
}

function renderThreadsNow() {
  if (!token) return;
  const list = $('threads');
  const shown = visibleThreads();
  const rows = shown.map(threadRow);
  list.replaceChildren(...rows);
  $('threads-empty').hidden = threads.size > 0;
  // None shown of some: what to do about it (a walk-through: "Showing 0 of 1 conversations",
  // no more).
  const filtered = $('filter-text').value.trim() || ['filter-show', 'filter-when', 'filter-patient', 'filter-inbox'].some((id) => $(id).value && $(id).value !== 'all');
  const hidden = threads.size && !shown.length
    ? (!filtered && $('scope-patient').getAttribute('aria-pressed') === 'true' ? ': none is about this patient. “All my patients” shows the others.' : ': change or clear the search and the filters to see them.')
    : '';
  $('threads-count').textContent = threads.size && shown.length !== threads.size ? 'Showing ' + shown.length + ' of ' + threads.size + (threads.size === 1 ? ' conversation' : ' conversations') + hidden : '';
  // Launched with one patient open, what is new about others is said where one switches to it
  // (a walk-through: a covering colleague saw "1 unread" and "Showing 0 of 1", nothing more).
  if (!isPatient() && session.patient) {
    let elsewhere = 0;
    for (const t of threads.values()) {
      if (patientOf(t) === session.patient) continue;
      const c = shownUnread(t);
      elsewhere += (c && c.n) || 0;
    }
    $('scope-all').textContent = 'All my patients' + (elsewhere ? ' (' + elsewhere + ' unread)' : '');
  }
  const total = shownTotal();
  $('threads-title').textContent = total ? 'Conversations (' + total + ' unread)' : 'Conversations';
  document.title = (total ? '(' + total + ') ' : '') + 'Courier messages';
  refreshFilterChoices();
}

// Unread as a person counts them: a thread's header without a message of its own (its title)
// is not one (the server counts it, and this app marks it read with the thread).
function shownUnread(t) {
  const counts = unread.byThread.get('Communication/' + t.id);
  if (!counts || !counts.header || (t.payload || []).length) return counts;
  return {n: counts.n - 1, urgent: Math.max(0, counts.urgent - (URGENT.includes(t.priority) ? 1 : 0)), header: false};
}
function shownTotal() {
  let total = unread.total;
  for (const t of threads.values()) {
    const c = unread.byThread.get('Communication/' + t.id);
    if (c && c.header && !(t.payload || []).length) total -= 1;
  }
  return Math.max(0, total);
}

function threadRow(t) {
  const counts = shownUnread(t);
  const last = latest.get(t.id);
  const pt = patientOf(t);
  // Clinicians see the patient first; a patient sees whom the conversation is with.
  const who = isPatient()
    ? participants(t).filter((r) => r !== session.fhirUser && r !== pt).map(nameOf).join(', ') || 'Your care team'
    : patientLine(pt);
  const said = latestWritten.get(t.id) || last;
  const preview = said ? (nameOf(refOf(said.sender)) + ': ' + (said.status === 'entered-in-error' ? '(withdrawn)' : textOf(said))) : '';
  const urgent = (counts && counts.urgent) || (last && URGENT.includes(last.priority));
  // The time shown is when the newest message was sent (the list is ordered by activity).
  const when = (last && (last.sent || updatedOf(last))) || t.sent || updatedOf(t);
  const b = el('button', {type: 'button', class: 'row', 'data-id': t.id, 'aria-current': current && current.header.id === t.id ? 'true' : null},
    el('span', {class: 'who', dir: 'auto'}, who),
    el('time', {class: 'when', datetime: when}, shortTime(when)),
    el('span', {class: 'topic', dir: 'auto'}, topicOf(t)),
    preview ? el('span', {class: 'preview', dir: 'auto'}, preview.slice(0, 140)) : null,
    el('span', {class: 'badges'},
      t.status === 'preparation' || draftThreads.has(t.id) ? el('span', {class: 'badge draft'}, 'Draft') : null,
      isStaffOnly(t) ? el('span', {class: 'badge staff'}, 'Staff only') : null,
      !isPatient() && !isStaffOnly(t) && last && isStaffOnly(last) ? el('span', {class: 'badge staff'}, 'Staff note') : null,
      urgent ? el('span', {class: 'badge urgent'}, counts && counts.urgent ? 'Urgent · ' + counts.urgent : 'Urgent') : null,
      counts && counts.n ? el('span', {class: 'badge'}, counts.n + ' unread') : null));
  b.addEventListener('click', () => openThread(t.id));
  return el('li', {class: counts && counts.n ? 'unread' : null}, b);
}

// The patient and inbox filters list what the loaded threads hold.
function refreshFilterChoices() {
  if (isPatient()) return;
  $('filter-more').hidden = false;
  const sel = $('filter-patient');
  const pts = [...new Set([...threads.values()].map(patientOf).filter(Boolean))];
  const want = ['', ...pts].join('|');
  if (sel.dataset.list !== want || sel.dataset.names !== String(people.size)) {
    const keep = sel.value;
    sel.replaceChildren(el('option', {value: ''}, 'All patients'),
      ...pts.map((p) => [p, patientLine(p)]).sort((a, b) => a[1].localeCompare(b[1])).map(([p, line]) => el('option', {value: p}, line)));
    sel.value = pts.includes(keep) ? keep : '';
    sel.dataset.list = want;
    sel.dataset.names = String(people.size);
  }
  const inbox = $('filter-inbox');
  const boxes = [...new Set([...threads.values()].flatMap(inboxesOf))];
  const wantBoxes = boxes.join('|') + people.size;
  if (inbox.dataset.list !== wantBoxes) {
    const keep = inbox.value;
    inbox.replaceChildren(el('option', {value: ''}, 'All inboxes'), el('option', {value: 'me'}, 'Addressed to me'),
      ...boxes.map((g) => el('option', {value: g}, nameOf(g))));
    inbox.value = keep === 'me' || boxes.includes(keep) ? keep : '';
    inbox.dataset.list = wantBoxes;
  }
}

// ----- thread view ---------------------------------------------------------------------------

// The conversation whose messages could not be loaded when it was opened.
let unopened = null;

async function openThread(id) {
  await flushDraft();
  let header = threads.get(id);
  try {
    if (!header) header = await api('GET', '/Communication/' + encodeURIComponent(id));
  } catch (e) { showNotice(plain(e), 'open'); return; }
  current = {header, messages: new Map(), older: null};
  draft = null;
  $('main').classList.add('reading');
  wantPeople(participants(header), 0);
  renderThreadHead();
  // The composer belongs to one thread: nothing typed or chosen for another carries over.
  $('compose').reset();
  $('draft-state').textContent = '';
  composeError('');
  $('file-chart').textContent = 'File to chart';
  $('file-chart').disabled = false;
  updateCount();
  $('compose').hidden = false;
  $('messages').replaceChildren();
  $('older').hidden = true;
  $('announce').textContent = '';
  let page;
  try {
    // The newest page first; older ones load when scrolled to (or with the button).
    page = await api('GET', '/Communication?part-of=' + encodeURIComponent('Communication/' + id) + '&_sort=-sent&_count=' + PAGE);
  } catch (e) {
    // Not an empty conversation to reply into: no composer until it loads (when Courier is
    // back, see `connect`, or in a few seconds). Only if it is still the one open.
    if (!current || current.header.id !== id) return;
    $('compose').hidden = true;
    $('thread-actions').hidden = true;
    unopened = id;
    showNotice('This conversation could not be loaded. ' + plain(e), 'open');
    setTimeout(() => { if (token && unopened === id && current && current.header.id === id) openThread(id); }, 10000);
    return;
  }
  unopened = null;
  if (!token || !current || current.header.id !== id) return;
  current.messages.set(header.id, header);
  const got = matches(page);
  // My draft in this thread, wherever it sorts (a draft has no send time).
  let mine = [];
  try {
    const drafts = await api('GET', '/Communication?part-of=' + encodeURIComponent('Communication/' + id) + '&status=preparation&sender=' + encodeURIComponent(session.fhirUser) + '&_sort=-_lastUpdated&_count=1');
    mine = matches(drafts);
  } catch (e) { /* no draft shown */ }
  if (!token || !current || current.header.id !== id) return;
  for (const m of got.reverse()) if (m.status !== 'preparation') current.messages.set(m.id, m);
  current.older = nextOf(page);
  wantPeople([...current.messages.values()].flatMap(participants).concat([patientOf(header)]));
  renderMessages();
  markCurrentRow();
  $('older').hidden = !current.older;
  clearNotice('open');
  restoreDraft(mine[0] || null);
  scrollToNewest();
  $('thread-view').focus({preventScroll: true});
  await markSeen();
  await loadReceipts();
}

// Moves the "current" mark in the list without rebuilding it.
function markCurrentRow() {
  for (const b of document.querySelectorAll('#threads button.row[aria-current]')) b.removeAttribute('aria-current');
  const b = current && document.querySelector('#threads button.row[data-id="' + CSS.escape(current.header.id) + '"]');
  if (b) b.setAttribute('aria-current', 'true');
}

function renderThreadHead() {
  if (!current) return;
  const h = current.header;
  $('thread-title').textContent = topicOf(h);
  $('staff-banner').hidden = !isStaffOnly(h);
  const pt = patientOf(h);
  const box = $('thread-patient');
  // Clinicians always see whom the thread is about; a thread about a patient other than the one
  // the EHR has open says so.
  if (!isPatient()) {
    const other = session.patient && pt && pt !== session.patient;
    box.textContent = (other ? 'Another patient — not the one open in your EHR: ' : 'Patient: ') + patientLine(pt);
    box.classList.toggle('other', !!other);
    box.hidden = false;
  } else {
    box.hidden = true;
  }
  $('thread-actions').hidden = false;
  $('file-chart').hidden = isPatient();
  // Beside the message box (which stays in view on a phone when the banners have scrolled away):
  // whom a reply goes to, and for a clinician which patient it is about.
  // A patient among them is named once, as the patient ("To: Bob Other (the patient)").
  const others = participants(h).filter((r) => r !== session.fhirUser);
  const toPatient = !isPatient() && pt && others.includes(pt);
  // Two patients may share a name: the birth date goes with it, and a patient other than the
  // one open in the EHR is said to be so.
  const bornOf = (r) => {
    const p = people.get(r) || (r === session.patient ? session.patient_display || {} : {});
    return p.birthDate ? ', born ' + born(p.birthDate) : '';
  };
  const other = !isPatient() && session.patient && pt && pt !== session.patient;
  const to = others.map((r) => nameOf(r) + (toPatient && r === pt ? ' (the patient' + bornOf(r) + ')' : '') + coveringFor(h, r)).join(', ');
  $('compose-to').textContent = 'To: ' + (to || 'the conversation') + (!isPatient() && pt && !toPatient ? ' · about ' + nameOf(pt) + bornOf(pt) : '') +
    (other ? ' · another patient, not the one open in your EHR' : '');
  showAway('compose-away', others);
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

function scrollBox() {
  return window.matchMedia('(max-width: 700px)').matches ? document.scrollingElement : $('messages-box');
}

function scrollToNewest() {
  const box = scrollBox();
  box.scrollTop = box.scrollHeight;
}

// Is the conversation shown to its end, but for `slack` pixels?
function nearEnd(slack) {
  const box = scrollBox();
  return box.scrollHeight - box.scrollTop - box.clientHeight <= slack;
}

async function loadOlder() {
  const open = current;
  if (!open || !open.older || open.loadingOlder) return;
  open.loadingOlder = true;
  const box = $('messages-box');
  const before = box.scrollHeight - box.scrollTop;
  try {
    const page = await api('GET', open.older);
    // Another thread opened meanwhile: these messages are not its (never show them there).
    if (current !== open || !token) return;
    const older = matches(page).filter((m) => m.status !== 'preparation').reverse();
    const all = new Map();
    all.set(current.header.id, current.header);
    for (const m of older) all.set(m.id, m);
    for (const [k, v] of current.messages) all.set(k, v);
    current.messages = all;
    current.older = nextOf(page);
    const first = $('messages').firstChild;
    for (const m of older) $('messages').insertBefore(renderMessage(m), first);
    wantPeople(older.map((m) => refOf(m.sender)));
    box.scrollTop = box.scrollHeight - before;
    $('older').hidden = !current.older;
  } catch (e) {
    showNotice(plain(e), 'older');
  } finally {
    open.loadingOlder = false;
  }
}

function renderMessage(m) {
  const mine = refOf(m.sender) === session.fhirUser;
  const withdrawn = m.status === 'entered-in-error';
  // A staff-only message inside a conversation the patient is part of: marked, since the
  // conversation's banner does not say so (the patient never receives it).
  const staffNote = !isPatient() && isStaffOnly(m) && !(current && isStaffOnly(current.header));
  const li = el('li', {id: 'msg-' + m.id, class: (mine ? 'mine ' : '') + (withdrawn ? 'withdrawn ' : '') + (staffNote ? 'staff-note' : '')});
  const when = m.sent || m.meta.lastUpdated;
  // Written by Courier for someone out of office, not by them (an outside walk-through's patient
  // could take the reply for the clinician's own answer).
  const auto = automaticKind(m);
  li.append(el('div', {class: 'meta'},
    staffNote ? el('span', {class: 'badge staff'}, 'Staff only — not shown to the patient') : null,
    auto ? el('span', {class: 'badge auto'}, auto === 'forward' ? 'Forwarded automatically' : 'Automatic reply: away') : null,
    el('span', {class: 'from', dir: 'auto'}, nameOf(refOf(m.sender))),
    el('time', {datetime: when}, FULL.format(new Date(when))),
    m.priority && m.priority !== 'routine' ? el('span', {class: 'priority'}, m.priority) : null));
  if (withdrawn) {
    li.append(el('p', {class: 'text'}, 'This message was withdrawn by its sender.'));
    return li;
  }
  for (const p of (m.payload || [])) {
    // A right-to-left message reads right to left (its punctuation at its own end).
    if (p.contentString) li.append(el('p', {class: 'text', dir: 'auto'}, p.contentString));
    if (p.contentAttachment) li.append(attachmentView(p.contentAttachment));
  }
  if (mine) {
    li.append(el('div', {class: 'status', id: 'status-' + m.id}, receiptText(m.id) || (m.status === 'completed' ? 'Sent' : '')));
    if (m.id !== (current && current.header.id)) li.append(withdrawButton(m, when));
  }
  return li;
}

// Withdrawing one's own message takes two presses (no browser dialog): the message stays in the
// thread as "withdrawn" for everyone (status entered-in-error).
function withdrawButton(m, when) {
  // Which message it withdraws, for a screen reader (every button reads "Withdraw" on screen).
  const words = (textOf(m) || '').slice(0, 40);
  const label = 'Withdraw your message of ' + FULL.format(new Date(when)) + (words ? ': ' + words : '');
  const b = el('button', {type: 'button', class: 'quiet small withdraw', 'aria-label': label}, 'Withdraw');
  let armed = null;
  b.addEventListener('click', async () => {
    if (!armed) {
      b.textContent = 'Press again to withdraw';
      b.setAttribute('aria-label', 'Press again to withdraw. ' + label);
      armed = setTimeout(() => { armed = null; b.textContent = 'Withdraw'; b.setAttribute('aria-label', label); }, 5000);
      return;
    }
    clearTimeout(armed);
    armed = null;
    b.disabled = true;
    try {
      const fresh = await api('GET', '/Communication/' + m.id);
      fresh.status = 'entered-in-error';
      const saved = await api('PUT', '/Communication/' + m.id, fresh, {Prefer: 'return=representation', 'If-Match': 'W/"' + fresh.meta.versionId + '"'});
      replaceMessage(saved);
      clearNotice('withdraw');
    } catch (e) {
      showNotice('The message was not withdrawn. ' + plain(e), 'withdraw');
      b.disabled = false;
      b.textContent = 'Withdraw';
      b.setAttribute('aria-label', label);
    }
  });
  return b;
}

function replaceMessage(m) {
  if (!current) return;
  current.messages.set(m.id, m);
  const li = renderMessage(m);
  const existing = $('msg-' + m.id);
  if (existing) existing.replaceWith(li); else $('messages').append(li);
  const rs = receipts.get(m.id);
  if (rs) for (const r of rs.values()) showReceipt(m.id, r);
}

// Only a Binary on this server is ever fetched (with the user's token); any other URL is shown as
// text and never followed, so a message cannot send the token elsewhere.
function binaryPath(url) {
  const own = location.origin + '/';
  const rel = typeof url === 'string' && url.startsWith(own) ? url.slice(own.length) : url;
  return typeof rel === 'string' && /^Binary\/[A-Za-z0-9.-]{1,64}$/.test(rel) ? '/' + rel : null;
}

const IMAGE = /^image\/(jpeg|png|gif|webp)$/;

async function binaryUrl(path, type) {
  if (blobs.has(path)) return blobs.get(path);
  const bin = await api('GET', path);
  const bytes = Uint8Array.from(atob(bin.data || ''), (c) => c.charCodeAt(0));
  const safe = IMAGE.test(type || '') ? type : 'application/octet-stream';
  const url = URL.createObjectURL(new Blob([bytes], {type: safe}));
  blobs.set(path, url);
  return url;
}

// Text-direction controls make a file name read as another ("report\u202Efdp.exe" shows as
// "reportexe.pdf"); Courier refuses them, and a name stored before is shown without them.
const DIRECTION_CONTROLS = /[\u202A-\u202E\u2066-\u2069\u200E\u200F\u061C]/g;

function attachmentView(a) {
  const name = (a.title || '').replace(DIRECTION_CONTROLS, '') || 'attachment';
  const path = binaryPath(a.url);
  if (!path) return el('span', {class: 'attachment'}, 'Attachment (not stored in Courier, not opened): ' + name);
  const wrap = el('div', {class: 'attachment'});
  if (IMAGE.test(a.contentType || '')) {
    const img = el('img', {class: 'thumb', alt: 'Photo: ' + name});
    // Enlarged in the page (an outside walk-through: the only full-size view was a download,
    // which leaves the photo in a shared computer's Downloads folder).
    const open = el('button', {type: 'button', class: 'thumb-open', 'aria-label': 'Enlarge photo: ' + name}, img);
    open.addEventListener('click', () => {
      if (!img.src) return;
      $('photo-full').src = img.src;
      $('photo-full').alt = 'Photo: ' + name;
      $('photo-dialog').setAttribute('aria-label', 'Photo: ' + name);
      $('photo-dialog').showModal();
    });
    wrap.append(open);
    const broken = () => open.replaceWith(el('span', {}, 'The photo could not be shown.'));
    img.addEventListener('error', broken, {once: true});
    // A photo grows its message once loaded: one that was shown to the end stays so (a
    // walk-through: a new photo's lower part, its file and its status were below the fold).
    img.addEventListener('load', () => { if (current && nearEnd(img.offsetHeight + 80)) scrollToNewest(); }, {once: true});
    binaryUrl(path, a.contentType).then((u) => { img.src = u; }).catch(() => { open.replaceWith(el('span', {}, 'The photo could not be loaded.')); });
  }
  const size = a.size ? ' (' + (a.size > 1048576 ? (a.size / 1048576).toFixed(1) + ' MB' : Math.max(1, Math.round(a.size / 1024)) + ' KB') + ')' : '';
  const b = el('button', {type: 'button', class: 'quiet small', 'aria-label': 'Download ' + name}, '⬇ ', el('bdi', {}, name), size);
  b.addEventListener('click', async () => {
    try {
      const url = await binaryUrl(path, 'application/octet-stream');
      const link = el('a', {href: url, download: name});
      document.body.append(link);
      link.click();
      link.remove();
    } catch (e) { showNotice('The file could not be opened. ' + plain(e), 'download'); }
  });
  wrap.append(b);
  return wrap;
}

// Messages addressed to me in the open thread are marked read while the page is visible (once:
// what this app marked read is remembered; a thread with nothing unread needs no calls).
const marked = new Set();
async function markSeen() {
  const open = current;
  if (!open || document.visibilityState !== 'visible') return;
  const counts = unread.byThread.get('Communication/' + open.header.id);
  const todo = [...open.messages.values()].filter((m) => {
    const toMe = (m.recipient || []).some((r) => refOf(r) === session.fhirUser);
    if (!toMe || m.status === 'preparation' || m.status === 'entered-in-error' || marked.has(m.id)) return false;
    // Replies are counted per thread (with the header, when it is unread): none unread there
    // but the header means only the header needs a mark.
    const replies = counts ? counts.n - (counts.header ? 1 : 0) : 0;
    return m.id === open.header.id || !unreadKnown || replies > 0 || fresh.has(m.id);
  });
  let changed = false;
  await each(todo, 6, async (m) => {
    if (!token) return;
    try {
      await api('POST', '/Communication/' + m.id + '/$mark-read');
      marked.add(m.id);
      changed = true;
    } catch (e) { /* shown again next time */ }
  });
  if (changed) loadUnreadSoon();
}
document.addEventListener('visibilitychange', markSeen);

async function loadReceipts() {
  const open = current;
  if (!open) return;
  const mine = [...open.messages.values()].filter((m) => refOf(m.sender) === session.fhirUser && m.status !== 'preparation');
  await each(mine, 6, async (m) => {
    if (!token || current !== open) return;
    try {
      const p = await api('GET', '/Communication/' + m.id + '/$receipts');
      for (const x of (p.parameter || [])) showReceipt(m.id, receiptOf(x));
    } catch (e) { /* not shown */ }
  });
}

function receiptOf(param) {
  const get = (n) => (param.part || []).find((q) => q.name === n);
  return {recipient: get('recipient').valueReference.reference, delivered: get('delivered') && get('delivered').valueInstant, read: get('read') && get('read').valueInstant};
}

const receipts = new Map(); // message id -> Map recipient -> receipt
const delivered = new Set(); // messages to me this app has marked delivered
function showReceipt(id, r) {
  if (!receipts.has(id)) receipts.set(id, new Map());
  receipts.get(id).set(r.recipient, r);
  const box = $('status-' + id);
  if (box) box.textContent = receiptText(id);
}

function receiptText(id) {
  const rs = receipts.get(id);
  return rs ? [...rs.values()].map((x) => (x.read ? 'Read by ' : 'Delivered to ') + nameOf(x.recipient)).join(' · ') : '';
}

// Mark unread: the thread's newest message to me counts as unread again (my own flag); the thread
// closes so that opening it is what reads it again.
async function markUnread() {
  if (!current) return;
  const mine = [...current.messages.values()].filter((m) => (m.recipient || []).some((r) => refOf(r) === session.fhirUser) && m.status !== 'preparation' && m.status !== 'entered-in-error');
  const last = mine[mine.length - 1];
  if (!last) { showNotice('There is no message to you in this conversation to mark unread.', 'unread'); return; }
  try {
    await api('POST', '/Communication/' + last.id + '/$mark-unread');
    marked.delete(last.id);
    clearNotice('unread');
    closeThread();
    await loadUnread();
  } catch (e) { showNotice(plain(e), 'unread'); }
}

async function fileToChart() {
  if (!current) return;
  const b = $('file-chart');
  b.disabled = true;
  try {
    const said = await api('POST', '/Communication/' + current.header.id + '/$file-to-chart');
    b.textContent = 'Filed to the chart';
    clearNotice('chart');
    // Staff-only messages go to the chart with their label; the clinician is told, since what
    // the EHR shows its patient portal is the EHR's to decide. The server counts the whole
    // thread (the page holds only its newest messages).
    const m = /(\d+) of them staff-only/.exec(((said && said.issue) || []).map((i) => i.diagnostics || '').join(' '));
    const staff = m ? Number(m[1]) : 0;
    if (staff) {
      showNotice('Filed to the chart. ' + (staff === 1 ? '1 staff-only message was' : staff + ' staff-only messages were') +
        ' filed with the label “no disclosure to the patient”: check that your EHR keeps ' + (staff === 1 ? 'it' : 'them') + ' out of the patient portal.', 'chart');
    }
  } catch (e) {
    showNotice('The conversation was not filed to the chart. ' + (e.status === 404 || e.status === 409 || e.status === 422 ? 'No EHR Courier is connected to knows this patient (and you).' : plain(e)), 'chart');
    b.disabled = false;
  }
}

async function closeThread() {
  await flushDraft();
  const was = current && current.header.id;
  $('main').classList.remove('reading');
  current = null;
  draft = null;
  for (const id of ['compose', 'staff-banner', 'thread-actions', 'thread-patient', 'older']) $(id).hidden = true;
  $('messages').replaceChildren();
  $('thread-title').textContent = 'Select a conversation';
  $('file-chart').textContent = 'File to chart';
  $('file-chart').disabled = false;
  renderThreadsNow();
  // Keyboard focus goes back to the conversation just left (else the list).
  const row = was && document.querySelector('#threads button.row[data-id="' + CSS.escape(was) + '"]');
  (row || $('new-thread')).focus();
}

// ----- compose and drafts --------------------------------------------------------------------

function toBase64(buf) {
  let s = '';
  const bytes = new Uint8Array(buf);
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

// A file to send, checked here first (size, kind): the Binary to create and the attachment that
// names it. Sent in one transaction with its message (see send), so a message Courier refuses
// leaves no file behind on the server.
async function attachmentOf(file) {
  if (config.attachment_max_bytes && file.size > config.attachment_max_bytes) {
    const e = new Error('too large');
    e.status = 413;
    throw e;
  }
  const type = file.type || 'application/octet-stream';
  if (config.attachment_types && config.attachment_types.length && !config.attachment_types.includes(type)) {
    const e = new Error('type');
    e.status = 415;
    throw e;
  }
  const ref = 'urn:uuid:' + uuid();
  return {
    entry: {fullUrl: ref, resource: {resourceType: 'Binary', contentType: type, data: toBase64(await file.arrayBuffer())}, request: {method: 'POST', url: 'Binary'}},
    // The name without direction controls (Courier refuses them: they make a name read as another).
    attachment: {contentType: type, url: ref, title: file.name.replace(DIRECTION_CONTROLS, '') || 'file', size: file.size},
  };
}

// A random (version 4) UUID, also where crypto.randomUUID is not offered (a page not served
// over https).
function uuid() {
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = [...b].map((x) => x.toString(16).padStart(2, '0')).join('');
  return h.slice(0, 8) + '-' + h.slice(8, 12) + '-' + h.slice(12, 16) + '-' + h.slice(16, 20) + '-' + h.slice(20);
}

function messageFor(h, payload, status, priority) {
  const msg = {
    resourceType: 'Communication',
    status,
    partOf: [{reference: 'Communication/' + h.id}],
    sender: referenceTo(session.fhirUser),
    recipient: participants(h).filter((r) => r !== session.fhirUser).map(referenceTo),
    payload,
  };
  if (status === 'completed') msg.sent = new Date().toISOString();
  if (h.subject) msg.subject = h.subject;
  if (h.category) msg.category = h.category;
  if (!isPatient()) msg.priority = priority || $('compose-priority').value;
  return msg;
}

// Drafts live on the server (a Communication in status `preparation`, its author's alone), so a
// message begun on one device can be finished on another.
function restoreDraft(d) {
  if (!current) return;
  // Typed while the thread was loading (see draftChanged): that text wins and is saved as this
  // thread's draft, over the stored one if there is one; nothing typed is replaced.
  if (draft && draft.thread === current.header.id && draft.early) {
    draft.early = false;
    if (d && !draft.id) { draft.id = d.id; draft.version = d.meta.versionId; }
    return;
  }
  draft = {thread: current.header.id, id: d ? d.id : null, version: d ? d.meta.versionId : null, timer: null};
  if (d) {
    $('compose-text').value = ((d.payload || []).find((p) => p.contentString) || {}).contentString || '';
    if (d.priority && !isPatient()) $('compose-priority').value = d.priority;
    $('draft-state').textContent = 'Draft restored.';
    updateCount();
  }
}

function draftChanged() {
  if (!current || document.body.dataset.readOnly) return;
  // Typing before the thread's stored draft was looked up (a slow network): kept all the same.
  if (!draft) draft = {thread: current.header.id, id: null, version: null, timer: null, early: true};
  clearTimeout(draft.timer);
  $('draft-state').textContent = '';
  draft.timer = setTimeout(() => saveDraft(), DRAFT_DELAY);
}

async function saveDraft() {
  const d = draft;
  if (!d || !current || d.thread !== current.header.id) return;
  clearTimeout(d.timer);
  d.timer = null;
  if (d.saving) { await d.saving; }
  const text = $('compose-text').value;
  const work = (async () => {
    try {
      if (!text.trim()) {
        if (d.id) { await api('DELETE', '/Communication/' + d.id); d.id = null; $('draft-state').textContent = ''; }
        draftThreads.delete(d.thread);
        renderThreads();
        return;
      }
      const body = messageFor(current.header, [{contentString: text}], 'preparation');
      if (d.id) {
        body.id = d.id;
        const saved = await api('PUT', '/Communication/' + d.id, body, {Prefer: 'return=representation'});
        d.version = saved.meta.versionId;
      } else {
        const saved = await api('POST', '/Communication', body, {Prefer: 'return=representation'});
        d.id = saved.id;
        d.version = saved.meta.versionId;
      }
      $('draft-state').textContent = 'Draft saved.';
      draftThreads.add(d.thread);
      renderThreads();
    } catch (e) {
      $('draft-state').textContent = 'The draft could not be saved: ' + plain(e);
    }
  })();
  d.saving = work;
  await work;
  d.saving = null;
}

async function flushDraft() {
  if (draft && draft.timer) await saveDraft();
  else if (draft && draft.saving) await draft.saving;
}

async function send(ev) {
  ev.preventDefault();
  if (!current || !token) return;
  // The thread, its draft and its composer's content as they are now: whatever happens while
  // this sends (another thread opened), the message goes to this thread and only its screen
  // changes.
  const open = current;
  const d = draft && draft.thread === open.header.id ? draft : null;
  const text = $('compose-text').value.trim();
  const file = $('compose-file').files[0];
  if (!text && !file) { composeError('Write a message or choose a photo or file to send.'); return; }
  if (tooLong(text)) { composeError(tooLong(text)); return; }
  const h = open.header;
  const payload = [];
  if (text) payload.push({contentString: text});
  const priority = isPatient() ? null : $('compose-priority').value;
  // Sent with the keyboard up: the field keeps focus after (the keyboard stays, the screen too).
  const typing = document.body.classList.contains('typing');
  $('send').disabled = true;
  composeError('');
  try {
    const file_ = file ? await attachmentOf(file) : null;
    if (file_) payload.push({contentAttachment: file_.attachment});
    if (d && d.timer) { clearTimeout(d.timer); d.timer = null; }
    if (d && d.saving) await d.saving;
    const msg = messageFor(h, payload, 'completed', priority);
    // The draft becomes the message (one resource, sent now).
    if (d && d.id) msg.id = d.id;
    const write = d && d.id
      ? {resource: msg, request: {method: 'PUT', url: 'Communication/' + d.id}}
      : {fullUrl: 'urn:uuid:' + uuid(), resource: msg, request: {method: 'POST', url: 'Communication'}};
    let saved;
    if (file_) {
      // The file and its message in one transaction: both are stored, or neither.
      const done = await api('POST', '/', {resourceType: 'Bundle', type: 'transaction', entry: [file_.entry, write]}, {Prefer: 'return=representation'});
      saved = done && done.entry && done.entry[1] && done.entry[1].resource;
      if (!saved || saved.resourceType !== 'Communication') throw new Error('the answer did not carry the message');
    } else {
      saved = await api(write.request.method, '/' + write.request.url, msg, {Prefer: 'return=representation'});
    }
    if (d) { d.id = null; d.version = null; }
    draftThreads.delete(h.id);
    noteLatest(saved);
    renderThreads();
    if (current === open) {
      replaceMessage(saved);
      $('compose-text').value = '';
      $('compose-file').value = '';
      showChosen();
      // Urgency is chosen for one message: the next one starts routine again.
      if (!isPatient()) $('compose-priority').value = 'routine';
      $('draft-state').textContent = '';
      scrollToNewest();
    }
    clearNotice('send');
  } catch (e) {
    const why = 'Your message was not sent. ' + (e.name === 'TypeError' ? 'Courier cannot be reached: check your connection, then press Send again.' : plain(e));
    if (current === open) composeError(why); else showNotice(why + ' (in “' + topicOf(h) + '”)', 'send');
  } finally {
    $('send').disabled = false;
    updateCount();
    // The field keeps focus (with the keyboard up on a phone; on a desktop Send was pressed
    // from the keyboard or the mouse and focus would fall back to the page's start).
    // (Not on a touch screen: focusing the field there opens the keyboard.)
    const lost = (document.activeElement === document.body || document.activeElement === $('send')) && matchMedia('(pointer: fine)').matches;
    if ((typing || lost) && current === open && !$('compose').hidden) $('compose-text').focus();
  }
}

// A send's error, beside Send (in view on a phone, where the page's notice is scrolled away).
function composeError(text) {
  $('compose-error').textContent = text;
  $('compose-error').hidden = !text;
  if (text) $('compose-error').scrollIntoView({block: 'nearest'});
}

function updateCount() {
  const max = isPatient() ? config.patient_max_message_chars : 0;
  const n = $('compose-text').value.length;
  $('compose-count').textContent = max && n > max
    ? n + ' / ' + max + ' characters: too long to send. Shorten it, or send it in two messages.'
    : max && n > max * 0.8 ? n + ' / ' + max + ' characters' : '';
}

// A patient's text over the limit: said, and not sent (nothing is cut off).
function tooLong(text) {
  const max = isPatient() ? config.patient_max_message_chars : 0;
  return max && text.length > max ? 'This message is ' + text.length + ' characters long; at most ' + max + ' can be sent. Shorten it, or send it in two messages.' : '';
}

// ----- new conversation -----------------------------------------------------------------------

let recipientsList = [];
let recipientsError = null;

function newError(text, field) {
  $('new-error').textContent = text;
  $('new-error').hidden = !text;
  // The field at fault is marked and takes focus (a screen reader says what is wrong with it).
  for (const f of document.querySelectorAll('#new-form [aria-invalid]')) f.removeAttribute('aria-invalid');
  if (text && field) {
    const f = $(field);
    f.setAttribute('aria-invalid', 'true');
    f.setAttribute('aria-describedby', 'new-error');
    f.focus();
  }
}

async function loadRecipients() {
  try {
    const q = !isPatient() && session.patient ? '?patient=' + encodeURIComponent(session.patient) : '';
    const p = await api('GET', '/Communication/$recipients' + q);
    recipientsList = (p.parameter || []).map(learnPerson);
    recipientsError = null;
  } catch (e) {
    recipientsList = [];
    recipientsError = e;
  }
}

const SOURCE = {pool: 'Shared inboxes', 'care-team': 'Your care team', correspondent: 'Who has written with you'};

// A patient picks from their care team and the clinic's shared inboxes, never a reference. A
// clinician with a patient in context picks "the patient" or, for a staff-only conversation,
// a colleague (or types a reference for someone not listed).
function fillTo() {
  const sel = $('new-to');
  const keep = sel.value;
  sel.replaceChildren();
  const staff = !isPatient() && $('audience-staff').checked;
  if (!isPatient() && !staff && session.patient) {
    sel.append(el('option', {value: session.patient}, 'The patient: ' + patientLine(session.patient)));
  } else {
    sel.append(el('option', {value: ''}, 'Choose…'));
  }
  const groups = {};
  for (const r of recipientsList) {
    if (!r.reference || r.reference === session.fhirUser) continue;
    if (staff && /^(Patient|RelatedPerson)\//.test(r.reference)) continue;
    (groups[r.source] = groups[r.source] || []).push(r);
  }
  // "Message the patient" writes to the patient in context, and to no one else.
  const toThePatient = !isPatient() && !staff && session.patient;
  for (const src of ['pool', 'care-team', 'correspondent']) {
    if (!groups[src] || toThePatient) continue;
    const og = el('optgroup', {label: SOURCE[src]});
    for (const r of groups[src]) {
      // Of two of one name (and role), each says which it is.
      const twins = recipientsList.filter((x) => x.reference !== r.reference && r.name && x.name === r.name && x.role === r.role);
      const which = twins.length ? ' (…' + r.reference.split('/').pop().slice(-4) + ')' : '';
      const away = r.away === true ? ' (away' + untilText(r) + ')' : '';
      og.append(el('option', {value: r.reference}, (r.name || nameOf(r.reference)) + (r.role ? ' — ' + r.role : '') + which + away));
    }
    sel.append(og);
  }
  if (!isPatient() && (staff || !session.patient)) sel.append(el('option', {value: 'other'}, 'Someone else (enter their reference)…'));
  if (keep && [...sel.options].some((o) => o.value === keep)) sel.value = keep;
  if (recipientsError) {
    // Not "no care team": the list could not be fetched.
    newError('Whom you can write to could not be loaded. ' + plain(recipientsError));
  } else if (isPatient() && sel.options.length === 1) {
    newError('Courier does not know your care team yet. Please call your clinic, or reply in an existing conversation.');
  }
  $('ref-field').hidden = sel.value !== 'other';
  showAwayFresh('new-away', sel.value);
}

function chooseTo() {
  $('ref-field').hidden = $('new-to').value !== 'other';
  newError('');
  showAwayFresh('new-away', $('new-to').value);
}

// Whether the one chosen is away, as known now; then as Courier says, if that was not recent.
function showAwayFresh(id, ref) {
  showAway(id, [ref]);
  wantPeople([ref], 0).then(() => { if ($('new-to').value === ref) showAway(id, [ref]); });
}

// Notifications: which channels, and quiet hours in this browser's time zone.
function noticesError(text) {
  $('notices-error').textContent = text || '';
  $('notices-error').hidden = !text;
}

async function openNotices() {
  noticesError('');
  $('notices-status').textContent = '';
  let p;
  try {
    p = await api('GET', '/notify/preferences');
  } catch (e) {
    showNotice('Your notification settings could not be loaded. ' + plain(e));
    return;
  }
  if (!token) return;
  for (const [kind, label] of [['email', 'Email'], ['sms', 'Text message']]) {
    const c = p[kind] || {};
    $('notices-' + kind).checked = !!c.on;
    $('notices-' + kind).disabled = !c.to;
    $('notices-' + kind + '-label').textContent = c.bounced
      ? label + ' to ' + c.to + ': could not be delivered there. Give another address below.'
      : c.to ? label + ' to ' + c.to : label + ' (no ' + (kind === 'sms' ? 'mobile number' : 'address') + ' on your record)';
    if (c.bounced) $('notices-' + kind).disabled = true;
  }
  await showPushState(p.push || {});
  if (!token) return;
  const langs = $('notices-language');
  langs.replaceChildren(...(p.languages || []).map((l) => new Option(l.name, l.code)));
  langs.value = p.language || p.default_language || 'en';
  if (!langs.value) langs.value = p.default_language || 'en';
  langs.dataset.initial = langs.value;
  const kinds = p.kinds || {};
  $('notices-kind-new-message').checked = kinds['new-message'] !== false;
  $('notices-kind-reminder').checked = kinds.reminder !== false;
  const digest = String(p.digest_minutes || 0);
  $('notices-digest').value = [...$('notices-digest').options].some((o) => o.value === digest) ? digest : '0';
  const zone = Intl.DateTimeFormat().resolvedOptions().timeZone || 'UTC';
  $('notices-quiet').checked = !!p.quiet;
  if (p.quiet) { $('notices-from').value = p.quiet.from; $('notices-to').value = p.quiet.to; }
  $('notices-hours').hidden = !p.quiet;
  $('notices-zone').textContent = '(' + ((p.quiet && p.quiet.time_zone) || zone) + ')';
  $('notices-dialog').showModal();
}

// ----- out of office (practitioners) --------------------------------------------------------
// Kept as FHIR: the practitioner's own PractitionerRole, its notAvailable period (the automatic
// reply as its description) and the delegate extension. The dialog keeps one period.

const EXT_DELEGATE = 'https://courier.example.org/fhir/StructureDefinition/delegate';
let awayRole = null; // my PractitionerRole holding the out-of-office, as last read or saved

function awayError(text) {
  $('away-error').textContent = text || '';
  $('away-error').hidden = !text;
}

// A FHIR dateTime as the value of a datetime-local field (a date alone: the start of that day, or
// for an end its last minute: FHIR's "until 2026-12-11" includes that day).
function localValue(v, end) {
  if (!v) return '';
  if (/^\d{4}-\d{2}-\d{2}$/.test(v)) return v + (end ? 'T23:59' : 'T00:00');
  const t = new Date(v);
  if (isNaN(t)) return '';
  const pad = (n) => String(n).padStart(2, '0');
  return t.getFullYear() + '-' + pad(t.getMonth() + 1) + '-' + pad(t.getDate()) + 'T' + pad(t.getHours()) + ':' + pad(t.getMinutes());
}

// The period in force now or next, of a PractitionerRole.
function awayPeriod(role) {
  const now = Date.now();
  const ends = (n) => (n.during && n.during.end ? new Date(localValue(n.during.end, true)).getTime() : Infinity);
  return ((role && role.notAvailable) || []).filter((n) => ends(n) >= now)[0] || null;
}

// The header button says when I am away now ("Away until 11 Dec 2026"), so it is not forgotten.
function showAwayState() {
  const n = awayPeriod(awayRole);
  const start = n && n.during && n.during.start ? new Date(localValue(n.during.start)).getTime() : 0;
  const now = n && start <= Date.now();
  $('away').textContent = now ? 'Away' + untilText({awayUntil: n.during && n.during.end}) : 'Out of office';
  $('away').classList.toggle('on', !!now);
}

async function loadAway() {
  // The 20 last changed, as Courier reads them to tell whether someone is away.
  const b = await api('GET', '/PractitionerRole?practitioner=' + encodeURIComponent(session.fhirUser) + '&_sort=-_lastUpdated&_count=20');
  const roles = matches(b);
  awayRole = roles.find((r) => (r.notAvailable || []).length) || roles[0] || null;
  showAwayState();
}

async function openAway() {
  awayError('');
  $('away-status').textContent = '';
  try {
    await Promise.all([loadAway(), loadRecipients()]);
  } catch (e) {
    showNotice('Your out-of-office could not be loaded. ' + plain(e));
    return;
  }
  if (!token) return;
  const n = awayPeriod(awayRole);
  const delegate = awayRole && ((awayRole.extension || []).find((x) => x.url === EXT_DELEGATE) || {}).valueReference;
  $('away-from').value = localValue(n && n.during && n.during.start) || localValue(new Date().toISOString());
  $('away-until').value = localValue(n && n.during && n.during.end, true);
  $('away-reply').value = (n && n.description) || '';
  // Colleagues by name: those Courier has named in this session, the care team, the current
  // delegate; never a patient.
  const refs = new Set();
  for (const [r] of people) if (/^(Practitioner|PractitionerRole)\//.test(r)) refs.add(r);
  for (const r of recipientsList) if (r.reference && /^(Practitioner|PractitionerRole)\//.test(r.reference)) refs.add(r.reference);
  const cover = delegate && refOf(delegate);
  if (cover) refs.add(cover);
  refs.delete(session.fhirUser);
  await wantPeople([...refs]);
  if (!token) return;
  const sel = $('away-delegate');
  sel.replaceChildren(el('option', {value: ''}, 'No one'));
  for (const r of [...refs].sort((a, b) => nameOf(a).localeCompare(nameOf(b)))) {
    const p = people.get(r) || {};
    sel.append(el('option', {value: r}, nameOf(r) + (p.role ? ' — ' + p.role : '')));
  }
  sel.value = cover || '';
  const on = n && n.during && new Date(localValue(n.during.start)).getTime() <= Date.now();
  $('away-now').textContent = on ? 'You are away now' + untilText({awayUntil: n.during.end}) + '.' : '';
  $('away-now').hidden = !on;
  $('away-off').hidden = !n;
  $('away-dialog').showModal();
}

async function saveAway(ev) {
  ev.preventDefault();
  awayError('');
  const from = $('away-from').value;
  const until = $('away-until').value;
  if (!from) { awayError('Say from when you are away.'); $('away-from').focus(); return; }
  const start = new Date(from);
  const end = until ? new Date(until) : null;
  if (isNaN(start) || (end && isNaN(end))) { awayError('A date is not complete.'); return; }
  if (end && end <= start) { awayError('You are back before you leave: check the dates.'); $('away-until').focus(); return; }
  if (end && end <= new Date()) { awayError('That time is already over: check the dates.'); $('away-until').focus(); return; }
  const d = $('away-delegate').value;
  let reply = $('away-reply').value.trim();
  if (!reply) {
    reply = 'I am away' + (end ? ' until ' + FULL.format(end) : '') + '.' + (d ? ' ' + nameOf(d) + ' is covering for me.' : '') + ' If it is urgent, please call the clinic.';
  }
  const body = awayRole ? JSON.parse(JSON.stringify(awayRole)) : {resourceType: 'PractitionerRole', active: true, practitioner: {reference: session.fhirUser}};
  delete body.meta;
  body.notAvailable = [{description: reply, during: Object.assign({start: start.toISOString()}, end ? {end: end.toISOString()} : {})}];
  body.extension = (body.extension || []).filter((x) => x.url !== EXT_DELEGATE);
  if (d) body.extension.push({url: EXT_DELEGATE, valueReference: {reference: d}});
  if (!body.extension.length) delete body.extension;
  await putAway(body, 'Saved. ' + 'Whoever writes to you ' + (start <= new Date() ? 'now' : 'from ' + FULL.format(start)) + ' is told you are away.');
}

async function awayOff() {
  if (!awayRole) return;
  const body = JSON.parse(JSON.stringify(awayRole));
  delete body.meta;
  delete body.notAvailable;
  body.extension = (body.extension || []).filter((x) => x.url !== EXT_DELEGATE);
  if (!body.extension.length) delete body.extension;
  await putAway(body, 'Turned off: you are not shown as away, and nobody gets an automatic reply.');
}

async function putAway(body, said) {
  $('away-save').disabled = true;
  $('away-off').disabled = true;
  try {
    awayRole = awayRole
      ? await api('PUT', '/PractitionerRole/' + encodeURIComponent(awayRole.id), Object.assign(body, {id: awayRole.id}), {Prefer: 'return=representation', 'If-Match': 'W/"' + awayRole.meta.versionId + '"'})
      : await api('POST', '/PractitionerRole', body, {Prefer: 'return=representation'});
    showAwayState();
    $('away-status').textContent = said;
    $('away-off').hidden = !awayPeriod(awayRole);
    const n = awayPeriod(awayRole);
    const on = n && n.during && new Date(localValue(n.during.start)).getTime() <= Date.now();
    $('away-now').textContent = on ? 'You are away now' + untilText({awayUntil: n.during.end}) + '.' : '';
    $('away-now').hidden = !on;
  } catch (e) {
    awayError((e.status === 412 ? 'Your out-of-office was changed elsewhere meanwhile: close this and open it again. ' : 'Not saved. ') + plain(e));
  } finally {
    $('away-save').disabled = false;
    $('away-off').disabled = false;
  }
}

// Web push in this browser: a service worker shows what the push service delivers.
let pushKey = null;

function pushSupported() {
  return !!pushKey && window.isSecureContext && 'serviceWorker' in navigator && 'PushManager' in window && 'Notification' in window;
}

async function browserSubscription() {
  if (!('serviceWorker' in navigator)) return null;
  try {
    const reg = await navigator.serviceWorker.getRegistration('/app/');
    return reg && reg.pushManager ? await reg.pushManager.getSubscription() : null;
  } catch (e) {
    return null;
  }
}

async function showPushState(push) {
  pushKey = push.public_key || null;
  const box = $('notices-push');
  const denied = 'Notification' in window && Notification.permission === 'denied';
  box.disabled = !pushSupported() || denied;
  const sub = pushSupported() ? await browserSubscription() : null;
  box.checked = !!sub && push.devices > 0;
  $('notices-push-label').textContent = !pushSupported()
    ? 'Notifications in this browser (not available in this browser)'
    : denied ? 'Notifications in this browser (blocked: allow them in the browser’s settings for this site)'
      : 'Notifications in this browser';
}

function keyBytes(b64url) {
  const s = atob(b64url.replace(/-/g, '+').replace(/_/g, '/'));
  return Uint8Array.from(s, (c) => c.charCodeAt(0));
}

// Turned on or off at once (the browser asks for permission on this click).
async function togglePush() {
  const box = $('notices-push');
  const on = box.checked;
  noticesError('');
  box.disabled = true;
  try {
    if (on) {
      const permission = await Notification.requestPermission();
      if (permission !== 'granted') {
        throw new Error('This browser is not allowed to show notifications. Allow them in the browser’s settings for this site, then try again.');
      }
      const reg = await navigator.serviceWorker.register('/app/sw.js', {scope: '/app/'});
      await navigator.serviceWorker.ready;
      const key = keyBytes(pushKey);
      let sub = await reg.pushManager.getSubscription();
      const old = sub && sub.options && sub.options.applicationServerKey && new Uint8Array(sub.options.applicationServerKey);
      if (sub && old && (old.length !== key.length || old.some((b, i) => b !== key[i]))) {
        await sub.unsubscribe();
        sub = null;
      }
      if (!sub) {
        try {
          sub = await reg.pushManager.subscribe({userVisibleOnly: true, applicationServerKey: key});
        } catch (e) {
          throw new Error('This browser could not turn on notifications: its push service did not answer. Try again later, or use email or text messages.');
        }
      }
      await contactCall('/notify/push', sub.toJSON());
      $('notices-status').textContent = 'Notifications are on in this browser.';
    } else {
      const sub = await browserSubscription();
      if (sub) {
        await fetch('/notify/push', {
          method: 'DELETE',
          headers: {Authorization: 'Bearer ' + token, 'Content-Type': 'application/json'},
          body: JSON.stringify({endpoint: sub.endpoint}),
        });
        await sub.unsubscribe().catch(() => {});
      }
      $('notices-status').textContent = 'Notifications are off in this browser.';
    }
  } catch (e) {
    box.checked = !on;
    noticesError(e.message || 'Notifications could not be changed. Try again.');
    box.focus();
  } finally {
    box.disabled = !pushSupported();
  }
}

async function contactCall(path, body) {
  const r = await fetch(path, {
    method: 'POST',
    headers: {Authorization: 'Bearer ' + token, 'Content-Type': 'application/json'},
    body: JSON.stringify(body),
  });
  let json = null;
  try { json = await r.json(); } catch (e) { /* none */ }
  if (!r.ok) {
    const issue = json && json.issue && json.issue[0];
    throw new Error(issue ? issue.diagnostics : 'Something went wrong. Try again.');
  }
  return json;
}

async function sendContactCode() {
  noticesError('');
  try {
    const v = await contactCall('/notify/contacts', {kind: $('notices-kind').value, value: $('notices-value').value});
    $('notices-status').textContent = 'We sent a code to ' + v.pending + '. Enter it below.';
    $('notices-code-field').hidden = false;
    $('notices-code').focus();
  } catch (e) {
    noticesError(e.message);
    $('notices-value').focus();
  }
}

async function verifyContact() {
  noticesError('');
  try {
    await contactCall('/notify/contacts/verify', {kind: $('notices-kind').value, code: $('notices-code').value});
    $('notices-code').value = '';
    $('notices-value').value = '';
    $('notices-code-field').hidden = true;
    $('notices-change').open = false;
    $('notices-dialog').close();
    await openNotices();
    $('notices-status').textContent = 'Changed.';
  } catch (e) {
    noticesError(e.message);
    $('notices-code').focus();
  }
}

async function saveNotices(ev) {
  ev.preventDefault();
  noticesError('');
  const zone = Intl.DateTimeFormat().resolvedOptions().timeZone || 'UTC';
  const body = {
    email: {on: $('notices-email').checked},
    sms: {on: $('notices-sms').checked},
    kinds: {'new-message': $('notices-kind-new-message').checked, reminder: $('notices-kind-reminder').checked},
    digest_minutes: Number($('notices-digest').value),
    // Sent only when changed: until then the language of the person's record applies.
    ...($('notices-language').value !== $('notices-language').dataset.initial ? {language: $('notices-language').value} : {}),
    quiet: $('notices-quiet').checked ? {from: $('notices-from').value, to: $('notices-to').value, time_zone: zone} : null,
  };
  if (body.quiet && (!body.quiet.from || !body.quiet.to || body.quiet.from === body.quiet.to)) {
    noticesError('Choose when quiet hours start and end (two different times).');
    $('notices-from').focus();
    return;
  }
  try {
    const r = await fetch('/notify/preferences', {
      method: 'PUT',
      headers: {Authorization: 'Bearer ' + token, 'Content-Type': 'application/json'},
      body: JSON.stringify(body),
    });
    if (!r.ok) {
      let why = 'Your settings could not be saved.';
      try { const o = await r.json(); if (o.issue && o.issue[0]) why = o.issue[0].diagnostics; } catch (e) { /* none */ }
      noticesError(why);
      return;
    }
    $('notices-status').textContent = 'Saved.';
    $('notices-dialog').close();
    $('announce').textContent = 'Notification settings saved.';
  } catch (e) {
    noticesError('Courier cannot be reached. Try again.');
  }
}

async function openNew() {
  $('new-form').reset();
  newError('');
  typedConfirmed = null;
  if ($('new-thread').dataset.busy) return;
  $('new-thread').dataset.busy = '1';
  try { await loadRecipients(); } finally { delete $('new-thread').dataset.busy; }
  if (!token) return;
  fillTo();
  // Which patient the new conversation is about, said before anything is written — and that it
  // is not the patient of the thread being read, when it is not.
  const about = $('new-about');
  if (!isPatient() && session.patient) {
    const reading = current && patientOf(current.header);
    const other = reading && reading !== session.patient;
    about.textContent = 'About: ' + patientLine(session.patient) + ' (the patient open in your EHR)' +
      (other ? '. Not ' + nameOf(reading) + ', whose conversation you are reading.' : '');
    about.classList.toggle('other', !!other);
    about.hidden = false;
  } else {
    about.hidden = true;
  }
  $('new-dialog').showModal();
}

// The typed reference whose person the dialog has named (a second Start goes on).
let typedConfirmed = null;

async function startThread(ev) {
  ev.preventDefault();
  newError('');
  let to = $('new-to').value;
  if (to === 'other') to = $('new-recipient').value.trim();
  const toField = $('new-to').value === 'other' ? 'new-recipient' : 'new-to';
  if (!to) { newError('Choose whom to write to.', toField); return; }
  if (!/^(Patient|Practitioner|PractitionerRole|RelatedPerson|CareTeam|Group)\/[A-Za-z0-9\-.]{1,64}$/.test(to)) {
    newError('That is not a reference Courier knows. It looks like Practitioner/456.', toField);
    return;
  }
  const staffOnly = !isPatient() && $('audience-staff').checked;
  if (!isPatient() && !staffOnly && session.patient && /^(Patient|RelatedPerson)\//.test(to) && to !== session.patient) {
    newError('This conversation is about ' + nameOf(session.patient) + '; it cannot be sent to another patient.', toField);
    return;
  }
  if (staffOnly && /^(Patient|RelatedPerson)\//.test(to)) {
    newError('A staff-only conversation cannot include the patient or their relatives. Choose “Message the patient” instead.', toField);
    return;
  }
  if (!$('new-topic').value.trim()) { newError('Give the conversation a subject.', 'new-topic'); return; }
  if (isPatient() && !$('new-category').value) { newError('Choose what this is about.', 'new-category'); return; }
  const text = $('new-text').value.trim();
  if (!text) { newError('Write your message.', 'new-text'); return; }
  if (tooLong(text)) { newError(tooLong(text), 'new-text'); return; }
  // A typed reference: whom it names is said before anything is sent (an outside walk-through
  // wrote to a patient, and to a practitioner who does not exist, by reference alone).
  if ($('new-to').value === 'other' && typedConfirmed !== to) {
    await wantPeople([to]);
    if (!token) return;
    const p = people.get(to);
    typedConfirmed = to;
    newError(p && p.name
      ? 'You are writing to ' + nameOf(to) + (p.birthDate ? ', born ' + born(p.birthDate) : '') + (p.role ? ' — ' + p.role : '') +
        (/^Patient\//.test(to) ? ' (the patient: they will read it)' : '') + '. Press Start conversation again to go on.'
      : 'Courier does not know ' + to + ': check the reference — a message to it may reach no one. Press Start conversation again to write to it anyway.', toField);
    return;
  }
  const base = {
    resourceType: 'Communication',
    sender: referenceTo(session.fhirUser),
    recipient: [referenceTo(to)],
  };
  if (session.patient) base.subject = {reference: session.patient};
  else if (/^Patient\//.test(to)) base.subject = {reference: to};
  const category = $('new-category').value;
  if (category) base.category = [{coding: [{system: config.category_system, code: category}]}];
  $('new-send').disabled = true;
  try {
    // The conversation, its first message and a photo or file in one transaction: all are
    // stored, or none (a walk-through's patient could attach her photo only after starting).
    const file = $('new-file').files[0];
    const file_ = file ? await attachmentOf(file) : null;
    const payload = [{contentString: text}];
    if (file_) payload.push({contentAttachment: file_.attachment});
    const hid = 'urn:uuid:' + uuid();
    const entry = [
      {fullUrl: hid, resource: Object.assign({status: 'in-progress', topic: {text: $('new-topic').value.trim()}}, base), request: {method: 'POST', url: 'Communication'}},
      {fullUrl: 'urn:uuid:' + uuid(), resource: Object.assign({status: 'completed', partOf: [{reference: hid}], sent: new Date().toISOString(), payload}, base), request: {method: 'POST', url: 'Communication'}},
    ];
    if (file_) entry.unshift(file_.entry);
    const done = await api('POST', '/', {resourceType: 'Bundle', type: 'transaction', entry}, {Prefer: 'return=representation'});
    const written = ((done && done.entry) || []).map((e) => e.resource).filter((r) => r && r.resourceType === 'Communication');
    const header = written.find((r) => !(r.partOf || []).length);
    const first = written.find((r) => (r.partOf || []).length);
    if (!header || !first) throw new Error('the answer did not carry the conversation');
    threads.set(header.id, header);
    noteLatest(first);
    $('new-dialog').close();
    $('new-form').reset();
    await openThread(header.id);
  } catch (e) {
    newError('The conversation was not started. ' + plain(e));
  } finally {
    $('new-send').disabled = false;
  }
}

// ----- alerts for clinicians -----------------------------------------------------------------

function alertsOn() { return 'Notification' in window && Notification.permission === 'granted'; }

function beep() {
  try {
    const ctx = new (window.AudioContext || window.webkitAudioContext)();
    const o = ctx.createOscillator();
    const g = ctx.createGain();
    o.frequency.value = 880;
    g.gain.value = 0.15;
    o.connect(g); g.connect(ctx.destination);
    o.start();
    o.stop(ctx.currentTime + 0.25);
    o.onended = () => ctx.close();
  } catch (e) { /* no sound */ }
}

// A new urgent message to a clinician: a browser notification (no PHI in it: it can show on a
// locked screen) and a sound, while the app is open.
function alertUrgent() {
  window.__courierAlerts = (window.__courierAlerts || 0) + 1;
  beep();
  if (alertsOn()) {
    try { new Notification('Courier: new urgent message', {body: 'Open Courier to read it.', tag: 'courier-urgent'}); } catch (e) { /* shown in the app */ }
  }
}

// A new message while this tab is in the background: a browser notification, if allowed. No
// PHI in it (it can show on a locked screen or a shared screen).
function notifyHidden() {
  if (!alertsOn()) return;
  const title = 'Courier';
  const options = {body: 'You have a new secure message.', tag: 'courier-new-message'};
  try {
    new Notification(title, options);
  } catch (e) {
    // Where pages cannot make notifications (Android), the service worker can.
    if ('serviceWorker' in navigator) navigator.serviceWorker.getRegistration('/app/').then((r) => r && r.showNotification(title, options)).catch(() => {});
  }
}

// ----- real time -----------------------------------------------------------------------------

function setConnection(text, offline) {
  const c = $('connection');
  c.textContent = text;
  c.classList.toggle('offline', !!offline);
  // Also where one writes: the header is scrolled away (or set aside while typing) on a phone.
  $('compose-offline').textContent = offline ? (/[.…]$/.test(text) ? text : text + '.') + ' Messages cannot be sent until then.' : '';
  $('compose-offline').hidden = !offline;
}

function connect() {
  if (!token) return;
  const url = (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/ws';
  ws = new WebSocket(url);
  ws.onopen = () => {
    const since = sessionStorage.getItem(SEQ_KEY);
    ws.send(JSON.stringify(Object.assign({type: 'auth', token}, since ? {since} : {})));
  };
  ws.onmessage = (m) => {
    let f;
    try { f = JSON.parse(m.data); } catch (e) { return; }
    if (f.type === 'ready') {
      wsBackoff = 1000; setConnection('Connected'); clearNotice('network'); remember(f.seq);
      // A conversation opened while Courier could not be reached loads now.
      if (unopened && current && current.header.id === unopened) openThread(unopened);
      // A new-conversation dialog opened while Courier could not be reached lists whom one can
      // write to now.
      if ($('new-dialog').open && recipientsError) loadRecipients().then(() => { if (token && $('new-dialog').open) { newError(''); fillTo(); } });
    }
    else if (f.type === 'resync') { remember(f.seq); loadThreads().then(() => current && openThread(current.header.id)); }
    else if (f.type === 'event') { remember(f.seq); onEvent(f); }
    else if (f.type === 'error' && (f.code === 'expired' || f.code === 'login' || f.code === 'revoked')) {
      // A fresh token, then the socket again; if no token can be had now (Courier busy or out of
      // reach), the socket is tried again later, waiting longer each time (live updates must not
      // stop without a word, nor a loop mint token after token).
      ws.onclose = null;
      refreshToken().then((ok) => {
        if (!token) return;
        if (ok) { connect(); return; }
        setConnection('Reconnecting…', true);
        setTimeout(connect, wsBackoff);
        wsBackoff = Math.min(wsBackoff * 2, 30000);
      });
    }
  };
  ws.onclose = () => {
    if (!token) return;
    setConnection(navigator.onLine ? 'Reconnecting…' : 'Offline — reconnecting when the network is back', true);
    setTimeout(connect, wsBackoff);
    wsBackoff = Math.min(wsBackoff * 2, 30000);
  };
}

// Where the socket's events have been read up to: Courier's sealed token (opaque; frames come in
// order, so the latest is the furthest).
function remember(seq) {
  if (typeof seq === 'string' && seq) sessionStorage.setItem(SEQ_KEY, seq);
}

function onEvent(f) {
  if (f.resourceType === 'CommunicationRequest') {
    // Courier's escalation of an unread urgent message: a reminder for its recipient (or backup).
    const c = f.resource;
    const escalation = c && (c.category || []).some((x) => (x.coding || []).some((k) => k.system === 'https://courier.example.org/fhir/CodeSystem/escalation' && k.code === 'unread-urgent'));
    if (escalation && c.status === 'active' && (c.recipient || []).some((r) => refOf(r) === session.fhirUser)) {
      showNotice('Reminder: an urgent message is waiting to be read.', 'reminder');
      if (!isPatient()) alertUrgent();
    }
    return;
  }
  if (f.resourceType !== 'Communication') return;
  if (f.event === 'receipt') {
    const r = f.receipt;
    showReceipt(f.id, {recipient: r.recipient.reference, delivered: r.delivered, read: r.read});
    // Read on another of my devices: my counts change too.
    if (r.recipient.reference === session.fhirUser) loadUnreadSoon();
    return;
  }
  const c = f.resource;
  if (f.event === 'delete') {
    threads.delete(f.id);
    if (current) { current.messages.delete(f.id); const li = $('msg-' + f.id); if (li) li.remove(); }
    renderThreads();
    return;
  }
  if (c.status === 'preparation') return; // drafts are their author's, and not activity
  const parent = threadIdOf(c);
  if (!parent) threads.set(c.id, c); else noteLatest(c);
  fresh.add(c.id);
  wantPeople(participants(c).concat([patientOf(c)]));
  renderThreads();
  const mine = refOf(c.sender) === session.fhirUser;
  const toMe = (c.recipient || []).some((r) => refOf(r) === session.fhirUser);
  // A message is new to its recipient when first seen sent (created so, or a draft sent now).
  if (toMe && c.status !== 'entered-in-error' && !delivered.has(c.id)) {
    delivered.add(c.id);
    api('POST', '/Communication/' + c.id + '/$mark-delivered').catch(() => {});
    if (!isPatient() && URGENT.includes(c.priority)) alertUrgent();
    else if (document.hidden) notifyHidden();
  }
  if (current && c.id === current.header.id) {
    current.header = c;
    renderThreadHead();
  }
  if (current && (parent === current.header.id || (c.id === current.header.id && (c.payload || []).length))) {
    const old = current.messages.get(c.id);
    const box = $('messages-box');
    const atEnd = box.scrollHeight - box.scrollTop - box.clientHeight < 80;
    replaceMessage(c);
    // The live region says only what is new, not the whole thread.
    if (!old && !mine) $('announce').textContent = 'New message from ' + nameOf(refOf(c.sender)) + '.';
    if (!old && (atEnd || mine)) scrollToNewest();
    markSeen();
  }
  loadUnreadSoon();
}

window.addEventListener('offline', () => { if (token) setConnection('Offline — reconnecting when the network is back', true); });
// Back online: a fresh socket at once (one that looks open may be dead after a network change;
// the new one resumes from the last event seen).
window.addEventListener('online', () => {
  if (!token) return;
  if (ws) { ws.onclose = null; ws.onmessage = null; try { ws.close(); } catch (e) { /* already closed */ } }
  wsBackoff = 1000;
  setConnection('Reconnecting…', true);
  connect();
});

// The on-screen keyboard: while the composer has focus on a phone and the visible height is short
// (the keyboard is up), body.typing compacts the screen around the thread (app.css). Focus moving
// from the field to Send (a tap) keeps it: the layout must not move under the finger; it ends
// when focus leaves the composer or the keyboard goes down.
function updateTyping() {
  const vv = window.visualViewport;
  const visible = vv ? vv.height : window.innerHeight;
  const inCompose = $('compose').contains(document.activeElement);
  const typing = inCompose && window.innerWidth <= 700 && visible < 560;
  document.body.classList.toggle('typing', typing);
}
if (window.visualViewport) window.visualViewport.addEventListener('resize', updateTyping);
window.addEventListener('resize', updateTyping);
document.addEventListener('focusin', updateTyping);
document.addEventListener('focusout', () => setTimeout(updateTyping, 0));

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

function setScope(scope) {
  filters.scope = scope;
  $('scope-patient').setAttribute('aria-pressed', String(scope === 'patient'));
  $('scope-all').setAttribute('aria-pressed', String(scope === 'all'));
  renderThreads();
}

function alive() { if (token) sessionStorage.setItem(LEFT_KEY, String(Date.now())); }

async function start() {
  try { session = JSON.parse(sessionStorage.getItem(STORE_KEY)); } catch (e) { session = null; }
  if (!session || !session.access_token) { end(); return; }
  sessionStorage.removeItem(AGAIN_KEY);
  token = session.access_token;
  const left = Number(sessionStorage.getItem(LEFT_KEY) || 0);
  // A tab the browser discarded to save memory and reloads when shown again was never closed,
  // and a reload is the person here pressing it (after Courier was unreachable, say); a restored
  // window comes back as a history navigation.
  const nav = (performance.getEntriesByType && performance.getEntriesByType('navigation')[0]) || {};
  if (left && !document.wasDiscarded && nav.type !== 'reload' && Date.now() - left > RESTORED_AFTER_MS) {
    signOut('Your session has ended because this window left Courier (it was closed, or another page was opened in it).');
    return;
  }
  alive();
  setInterval(alive, 5000);
  for (const e of ['pagehide', 'pageshow', 'focus']) window.addEventListener(e, alive);
  document.addEventListener('visibilitychange', alive);
  document.addEventListener('resume', alive);
  tokenExpires = Date.now() + (session.expires_in || 300) * 1000;
  const me = myName();
  $('me').textContent = me ? 'Signed in as ' + me : 'Signed in';
  $('logout').hidden = false;
  if (session.patient && session.patient_display) {
    people.set(session.patient, Object.assign({reference: session.patient}, session.patient_display));
  }
  if (session.user_display) people.set(session.fhirUser, Object.assign({reference: session.fhirUser}, session.user_display));
  if (session.need_patient_banner && session.patient) {
    const b = $('patient-banner');
    b.textContent = patientLine(session.patient);
    b.hidden = false;
  }
  if (session.smart_style) applyStyle(session.smart_style);
  // Policy "writes": this session reads only until the person confirms it's them (Courier's
  // second factor); then the server hands back a token that may write, and the page reloads.
  if (session.step_up === 'writes') {
    document.body.dataset.readOnly = 'true';
    $('step-up-session').value = session.session;
    $('step-up').hidden = false;
  }
  try { config = await (await fetch('/app/config.json')).json(); } catch (e) { config = {}; }
  const categories = $('new-category');
  categories.append(el('option', {value: ''}, isPatient() ? 'Choose one…' : '(none)'));
  for (const c of (config.categories || [])) categories.append(el('option', {value: c.code}, c.display));
  categories.required = isPatient();
  $('priority-field').hidden = isPatient();
  if (config.attachment_types) $('compose-file').accept = $('new-file').accept = config.attachment_types.join(',');
  // Patients are told, where they write and before they write, that messages are not for
  // emergencies — with the number to call.
  if (isPatient() && config.emergency_number) {
    for (const e of document.querySelectorAll('.emergency')) {
      // The short form shows while typing with the keyboard up (app.css).
      e.replaceChildren(
        el('span', {class: 'long'}, 'Not for emergencies. If this is an emergency, call ' + config.emergency_number + ' now.'),
        el('span', {class: 'short'}, 'Emergency? Call ' + config.emergency_number + ' now.'));
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
    // No maxlength: a pasted text longer than the limit is kept whole and said to be too long
    // (a field that cut it would silently lose its end: "… I also take warfarin.").
    $('new-text').dataset.max = config.patient_max_message_chars;
  }
  // A clinician launched with a patient sees that patient's conversations first.
  if (!isPatient() && session.patient) {
    $('scope').hidden = false;
    $('scope-patient').textContent = 'This patient' + (session.patient_display && session.patient_display.name ? ' (' + session.patient_display.name + ')' : '');
  }
  $('audience').hidden = isPatient() || !session.patient;
  if (isPatient()) $('filter-text').placeholder = 'Search your conversations';
  if (!isPatient() && 'Notification' in window && Notification.permission === 'default' && !localStorage.getItem(ALERTS_KEY)) $('alerts').hidden = false;
  $('main').hidden = false;
  $('compose').addEventListener('submit', send);
  $('compose-text').addEventListener('input', () => { updateCount(); draftChanged(); });
  // About to write: whether those it goes to are away, as Courier says now.
  $('compose-text').addEventListener('focus', () => { if (current) wantPeople(participants(current.header), AWAY_FRESH_MS); });
  $('compose-priority').addEventListener('change', draftChanged);
  for (const id of ['audience-patient', 'audience-staff']) $(id).addEventListener('change', () => { newError(''); fillTo(); });
  $('new-to').addEventListener('change', chooseTo);
  $('new-thread').addEventListener('click', openNew);
  $('new-form').addEventListener('submit', startThread);
  $('new-cancel').addEventListener('click', () => $('new-dialog').close());
  $('photo-close').addEventListener('click', () => $('photo-dialog').close());
  $('photo-dialog').addEventListener('close', () => {
    $('photo-full').removeAttribute('src');
    $('photo-full').alt = '';
    $('photo-dialog').setAttribute('aria-label', 'Photo');
  });
  $('new-dialog').addEventListener('close', () => { if (token) $('new-thread').focus(); });
  $('back').addEventListener('click', closeThread);
  $('older').addEventListener('click', loadOlder);
  $('messages-box').addEventListener('scroll', () => { if ($('messages-box').scrollTop < 40) loadOlder(); }, {passive: true});
  $('mark-unread').addEventListener('click', markUnread);
  $('file-chart').addEventListener('click', fileToChart);
  $('notice-close').addEventListener('click', () => showNotice(''));
  $('scope-patient').addEventListener('click', () => setScope('patient'));
  $('scope-all').addEventListener('click', () => setScope('all'));
  $('filter-text').addEventListener('input', () => { filters.text = $('filter-text').value; renderThreads(); });
  for (const [id, key] of [['filter-show', 'show'], ['filter-when', 'when'], ['filter-patient', 'patient'], ['filter-inbox', 'inbox']]) {
    $(id).addEventListener('change', () => { filters[key] = $(id).value; renderThreads(); });
  }
  $('alerts').addEventListener('click', async () => {
    localStorage.setItem(ALERTS_KEY, '1');
    $('alerts').hidden = true;
    try { await Notification.requestPermission(); } catch (e) { /* the sound still plays */ }
  });
  $('logout').addEventListener('click', () => signOut('You have signed out.'));
  $('idle-stay').addEventListener('click', stayIn);
  $('compose-file').addEventListener('change', showChosen);
  $('compose').addEventListener('reset', () => setTimeout(showChosen, 0));
  $('file-remove').addEventListener('click', () => {
    $('compose-file').value = '';
    showChosen();
    $('compose-file').focus();
  });
  $('idle-leave').addEventListener('click', () => signOut('You have signed out.'));
  // Escape closes a dialog; here it means "I am here" as any key does.
  $('idle-dialog').addEventListener('cancel', (e) => { e.preventDefault(); stayIn(); });
  if (/^Practitioner\//.test(session.fhirUser || '')) {
    $('away').hidden = false;
    $('away').addEventListener('click', openAway);
    $('away-form').addEventListener('submit', saveAway);
    $('away-off').addEventListener('click', awayOff);
    $('away-cancel').addEventListener('click', () => $('away-dialog').close());
    $('away-dialog').addEventListener('close', () => { if (token) $('away').focus(); });
    loadAway().catch(() => { /* the button still opens the dialog, which says what failed */ });
  }
  $('notices').hidden = false;
  $('notices').addEventListener('click', openNotices);
  $('notices-form').addEventListener('submit', saveNotices);
  $('notices-cancel').addEventListener('click', () => $('notices-dialog').close());
  $('notices-dialog').addEventListener('close', () => { if (token) $('notices').focus(); });
  $('notices-push').addEventListener('change', togglePush);
  $('notices-quiet').addEventListener('change', () => { $('notices-hours').hidden = !$('notices-quiet').checked; });
  $('notices-send-code').addEventListener('click', sendContactCode);
  $('notices-verify').addEventListener('click', verifyContact);
  // The inbox is ready when its threads show; counts, previews and names fill in after.
  let ready = false;
  const shown = () => {
    if (ready || !token) return;
    ready = true;
    connect();
    document.body.dataset.ready = 'true';
  };
  try {
    await loadThreads(shown);
  } catch (e) {
    if (e.status === 401) { end('Your session has expired.'); return; }
    showNotice('Your conversations could not be loaded. ' + plain(e), 'network');
  }
  shown();
}

start();
