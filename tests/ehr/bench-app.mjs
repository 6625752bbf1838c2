// Browser benchmark of Courier's web app in real Chromium (Debian's, driven by playwright-core):
// the inbox's first render with many threads, and opening a thread of many messages. Called by
// `cargo bench --profile dev --bench app_render` (benches/app_render.rs), which starts Courier,
// seeds it and passes one JSON argument:
//   {base, tokens: [one access token per run], fhir_user, user_name, threads, big_thread,
//    big_messages, runs, profile}
// Optional flags after it: --runs N (at most tokens.length), --profile.
//
// Each run is a fresh browser context (empty cache and storage) with the session put in
// sessionStorage['courier.session'] before the page loads, as the launch hand-off does.
// (a) first render: from navigation start to the moment the thread list holds all the threads
//     (or stops growing, if the app shows fewer) and body[data-ready="true"], then one frame
//     painted; timed in the page (performance.now(), a MutationObserver), so no playwright
//     round trip is counted.
// (b) opening the big thread: from the click on its row to `#messages > li` ≥ big_messages, then
//     one frame painted; timed in the page likewise. "settled" is when the requests the opening
//     starts (read marks, receipts) are all answered (node's clock, approximate).
// Prints one line per run, then the medians with the aims; the last line is JSON.
// --profile adds one extra run (not counted) under the DevTools CPU profiler and prints where the
// time goes: Chromium's script / layout / style totals and the functions with the most self time.
import { chromium } from 'playwright-core';

const cfg = JSON.parse(process.argv[2]);
const flag = (name) => process.argv.indexOf(name);
const runs = flag('--runs') > 0 ? Number(process.argv[flag('--runs') + 1]) : (cfg.runs || 7);
const profile = flag('--profile') > 0 || !!cfg.profile;
const AIM_INBOX_MS = 1000;
const AIM_THREAD_MS = 200;
const STABLE_MS = 2000; // the thread list counts as complete when it has not grown for this long
const STABLE_OPEN_MS = 1000; // the same for the messages of the opened thread
if (cfg.tokens.length < runs + (profile ? 1 : 0)) throw new Error('one token per run is needed');

const browser = await chromium.launch({
  executablePath: process.env.COURIER_CHROMIUM || '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
    '--disable-component-update', '--no-first-run', '--disable-quic', '--disable-sync'],
});

// Runs in the page before any of its scripts: the session, and the observer timing the list.
function initPage({ session, target }) {
  sessionStorage.setItem('courier.session', JSON.stringify(session));
  const b = window.__bench = { count: 0, countAt: 0, readyAt: 0, doneAt: 0, paintedAt: 0, shown: 0 };
  const check = () => {
    const n = document.querySelectorAll('#threads [data-id]').length;
    const now = performance.now();
    if (n !== b.count) { b.count = n; b.countAt = now; }
    if (!b.readyAt && document.body && document.body.dataset.ready === 'true') b.readyAt = now;
    if (!b.doneAt && b.readyAt && n >= target) {
      b.doneAt = now;
      b.shown = n;
      requestAnimationFrame(() => setTimeout(() => { b.paintedAt = performance.now(); }, 0));
    }
  };
  new MutationObserver(check).observe(document, { childList: true, subtree: true, attributes: true, attributeFilter: ['data-ready'] });
}

// Runs in the page: clicks the thread's row (or the button or link inside it) and times until
// `#messages > li` ≥ want, then one painted frame. An app that shows fewer at first (the newest
// page, older ones on scroll) is timed until its list stops growing for `stable` ms: to its last
// change and the frame painted after it.
function openAndTime({ id, want, stable }) {
  const row = document.querySelector(`#threads [data-id="${CSS.escape(id)}"]`);
  if (!row) return Promise.resolve({ dom: NaN, painted: NaN, shown: 0, error: `no row #threads [data-id="${id}"] in the list` });
  const target = row.matches('button, a[href]') ? row : (row.querySelector('button, a[href], [role=button]') || row);
  target.scrollIntoView({ block: 'center' });
  const count = () => document.querySelectorAll('#messages > li').length;
  return new Promise((resolve) => {
    let t0 = 0;
    let n = count();
    let changedAt = 0;
    let paintedAt = 0;
    let done = false;
    const finish = (dom, painted, error) => {
      if (done) return;
      done = true;
      obs.disconnect();
      clearInterval(poll);
      resolve({ dom, painted, shown: count(), error });
    };
    const obs = new MutationObserver(() => {
      const now = performance.now();
      const c = count();
      if (c === n) return;
      n = c;
      changedAt = now;
      paintedAt = 0;
      if (c >= want) {
        obs.disconnect();
        requestAnimationFrame(() => setTimeout(() => finish(now - t0, performance.now() - t0), 0));
      } else {
        requestAnimationFrame(() => setTimeout(() => { if (changedAt === now) paintedAt = performance.now(); }, 0));
      }
    });
    obs.observe(document.body, { childList: true, subtree: true });
    const poll = setInterval(() => {
      const now = performance.now();
      if (n > 0 && changedAt && paintedAt && now - changedAt > stable) finish(changedAt - t0, paintedAt - t0);
      else if (now - t0 > 30000) finish(NaN, NaN, `no messages shown after 30 s (${n} in the list)`);
    }, 50);
    t0 = performance.now();
    target.click();
  });
}

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};
const ms = (x) => `${Math.round(x)} ms`;

// Self time by function from a DevTools CPU profile, biggest first.
function topFunctions(prof, n = 12) {
  const byId = new Map(prof.nodes.map((x) => [x.id, x]));
  const self = new Map();
  const dt = prof.timeDeltas;
  for (let i = 0; i < prof.samples.length; i++) {
    const node = byId.get(prof.samples[i]);
    const f = node.callFrame;
    const file = f.url ? f.url.replace(/^.*\//, '') : '';
    const key = `${f.functionName || '(anonymous)'}${file ? ` ${file}:${f.lineNumber + 1}` : ''}`;
    self.set(key, (self.get(key) || 0) + (dt[i] || 0) / 1000);
  }
  const total = [...self.values()].reduce((a, b) => a + b, 0);
  return [...self.entries()].sort((a, b) => b[1] - a[1]).slice(0, n)
    .map(([k, v]) => `    ${v.toFixed(1).padStart(7)} ms  ${(100 * v / total).toFixed(0).padStart(3)}%  ${k}`).join('\n');
}

const METRICS = ['ScriptDuration', 'LayoutDuration', 'RecalcStyleDuration', 'TaskDuration', 'Nodes'];
async function metrics(cdp) {
  const m = Object.fromEntries((await cdp.send('Performance.getMetrics')).metrics.map((x) => [x.name, x.value]));
  return Object.fromEntries(METRICS.map((k) => [k, m[k] || 0]));
}
function breakdown(a, b) {
  const d = (k) => `${Math.round((b[k] - a[k]) * 1000)} ms`;
  return `script ${d('ScriptDuration')}, layout ${d('LayoutDuration')}, style ${d('RecalcStyleDuration')}, all tasks ${d('TaskDuration')}; DOM nodes ${b.Nodes}`;
}

async function run(i, { profiled }) {
  const session = {
    access_token: cfg.tokens[i], expires_in: 300, session: null, fhirUser: cfg.fhir_user, patient: null,
    need_patient_banner: false, user_display: { name: cfg.user_name },
  };
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  await context.addInitScript(initPage, { session, target: cfg.threads });
  const page = await context.newPage();
  const errors = [];
  page.on('pageerror', (e) => errors.push(`page error: ${e.message}`));
  page.on('console', (m) => { if (m.type() === 'error') errors.push(`console error: ${m.text()}`); });
  // Requests in flight and when the last one ended (node's clock), for "settled".
  const net = { inflight: 0, lastEnd: performance.now(), started: [] };
  page.on('request', (r) => { net.inflight++; net.started.push({ url: r.url(), method: r.method(), at: performance.now(), r }); });
  const ended = () => { net.inflight--; net.lastEnd = performance.now(); };
  page.on('requestfinished', ended);
  page.on('requestfailed', ended);
  let cdp = null;
  let m0 = null;
  if (profiled) {
    cdp = await context.newCDPSession(page);
    await cdp.send('Performance.enable');
    await cdp.send('Profiler.enable');
    await cdp.send('Profiler.setSamplingInterval', { interval: 100 });
    m0 = await metrics(cdp);
    await cdp.send('Profiler.start');
  }

  // (a) first render.
  await page.goto(cfg.base + '/app/', { waitUntil: 'commit' });
  await page.waitForFunction(({ target, stable }) => {
    const b = window.__bench;
    if (!b || !b.readyAt) return false;
    if (b.doneAt) return b.paintedAt > 0;
    return performance.now() - Math.max(b.countAt, b.readyAt) > stable; // stopped growing short of the target
  }, { target: cfg.threads, stable: STABLE_MS }, { timeout: 120000, polling: 100 });
  const b = await page.evaluate(() => window.__bench);
  const inbox = b.doneAt
    ? { ms: b.paintedAt, dom: b.doneAt, shown: b.shown }
    : { ms: Math.max(b.countAt, b.readyAt), dom: Math.max(b.countAt, b.readyAt), shown: b.count };
  let prof = null;
  if (profiled) {
    prof = { inbox: (await cdp.send('Profiler.stop')).profile, inboxMetrics: breakdown(m0, await metrics(cdp)) };
    prof.inboxRequests = net.started.map((x) => timed(x, net.started[0].at));
    prof.navigation = await page.evaluate(() => {
      const n = performance.getEntriesByType('navigation')[0];
      const r = (name) => performance.getEntriesByType('resource').find((e) => e.name.endsWith(name));
      const js = r('/app/app.js');
      const f = (x) => Math.round(x);
      return `response end ${f(n.responseEnd)} ms, app.js loaded ${js ? f(js.responseEnd) : '?'} ms, DOMContentLoaded ${f(n.domContentLoadedEventEnd)} ms, load ${f(n.loadEventEnd)} ms, ready ${f(window.__bench.readyAt)} ms (page clock)`;
    });
  }
  // Let the start-up requests (unread counts, the WebSocket) finish before the click.
  await waitSettled(net, 300, 10000);

  // (b) opening the big thread.
  if (profiled) { m0 = await metrics(cdp); await cdp.send('Profiler.start'); }
  const before = net.started.length;
  const clickAt = performance.now();
  const open = await page.evaluate(openAndTime, { id: cfg.big_thread, want: cfg.big_messages, stable: STABLE_OPEN_MS });
  if (profiled) { prof.open = (await cdp.send('Profiler.stop')).profile; prof.openMetrics = breakdown(m0, await metrics(cdp)); }
  const settledAt = open.error && net.started.length === before ? clickAt : await waitSettled(net, 1000, 60000);
  const after = net.started.slice(before);
  const kinds = {};
  for (const r of after) {
    const k = `${r.method} ${r.url.replace(cfg.base, '').replace(/\/Communication\/[^/?]+\//, '/Communication/{id}/').replace(/\?.*$/, '?…')}`;
    kinds[k] = (kinds[k] || 0) + 1;
  }
  if (profiled) prof.openRequests = after.slice(0, 12).map((x) => timed(x, clickAt));
  const settled = { ms: Math.max(settledAt - clickAt, open.painted || 0), requests: after.length, kinds };
  await context.close();
  return { inbox, open, settled, errors, prof };
}

// "GET /path: at +12 ms, first byte after 30 ms, done after 31 ms" (node's clock for the start).
function timed(x, origin) {
  const t = x.r.timing();
  let path = x.url.replace(cfg.base, '');
  if (path.length > 110) path = `${path.slice(0, 100)}… (${path.length} chars)`;
  const at = `+${Math.round(x.at - origin)} ms`;
  if (!(t.responseEnd >= 0)) return `    ${x.method} ${path}: at ${at}, unfinished`;
  return `    ${x.method} ${path}: at ${at}, first byte after ${Math.round(t.responseStart)} ms, done after ${Math.round(t.responseEnd)} ms`;
}

// Waits until no request has been in flight for `quiet` ms; returns when the last one ended.
async function waitSettled(net, quiet, max) {
  const start = performance.now();
  while (performance.now() - start < max) {
    if (net.inflight <= 0 && performance.now() - net.lastEnd >= quiet) break;
    await new Promise((r) => setTimeout(r, 50));
  }
  return net.lastEnd;
}

const results = [];
let failed = false;
try {
  for (let i = 0; i < runs; i++) {
    const r = await run(i, { profiled: false });
    results.push(r);
    const shortOf = r.inbox.shown < cfg.threads ? ` — ONLY ${r.inbox.shown} of ${cfg.threads} threads shown (list stopped growing)` : '';
    console.log(`run ${i + 1}/${runs}: inbox ${ms(r.inbox.ms)} (${r.inbox.shown} threads in the DOM at ${ms(r.inbox.dom)})${shortOf}; `
      + `open thread ${ms(r.open.painted)} (${r.open.shown} messages in the DOM at ${ms(r.open.dom)})${r.open.error ? ` — ${r.open.error}` : ''}${!r.open.error && r.open.shown < cfg.big_messages ? ` — the app shows ${r.open.shown} of ${cfg.big_messages} at first (list stopped growing)` : ''}; `
      + `settled after ${ms(r.settled.ms)} (${r.settled.requests} requests)`);
    for (const e of r.errors) console.log(`  ${e}`);
  }
  const inboxMed = median(results.map((r) => r.inbox.ms));
  const opened = results.filter((r) => !r.open.error);
  const openMed = opened.length ? median(opened.map((r) => r.open.painted)) : NaN;
  const settledMed = median(results.map((r) => r.settled.ms));
  const shown = Math.min(...results.map((r) => r.inbox.shown));
  const verdict = (x, aim) => (x <= aim ? `within the aim of ≤ ${aim} ms` : `OVER the aim of ≤ ${aim} ms`);
  console.log(`requests after opening the thread (run 1): ${Object.entries(results[0].settled.kinds).map(([k, v]) => `${v} × ${k}`).join(', ')}`);
  const inboxVerdict = shown < cfg.threads ? `not comparable with the aim of ≤ ${AIM_INBOX_MS} ms: the app shows ${shown} of ${cfg.threads} threads` : verdict(inboxMed, AIM_INBOX_MS);
  console.log(`inbox first render, ${cfg.threads} threads${shown < cfg.threads ? ` (the app shows ${shown})` : ''}: median ${ms(inboxMed)} (runs: ${results.map((r) => Math.round(r.inbox.ms)).join(', ')}) — ${inboxVerdict}`);
  const firstPage = opened.length ? Math.min(...opened.map((r) => r.open.shown)) : 0;
  if (opened.length) console.log(`open a thread of ${cfg.big_messages} messages${firstPage < cfg.big_messages ? ` (the app shows the newest ${firstPage} at first)` : ''}: median ${ms(openMed)} (runs: ${opened.map((r) => Math.round(r.open.painted)).join(', ')}) — ${verdict(openMed, AIM_THREAD_MS)}`);
  if (opened.length < results.length) console.log(`open a thread of ${cfg.big_messages} messages: ${results.length - opened.length} of ${results.length} runs failed: ${results.find((r) => r.open.error).open.error}`);
  console.log(`  then read marks and receipts settle: median ${ms(settledMed)} after the click (runs: ${results.map((r) => Math.round(r.settled.ms)).join(', ')})`);
  if (profile) {
    const r = await run(runs, { profiled: true });
    console.log(`\nprofiled run (not counted): inbox ${ms(r.inbox.ms)}, open ${ms(r.open.painted)}`);
    console.log(`  inbox first render — ${r.prof.inboxMetrics}`);
    console.log(`  navigation: ${r.prof.navigation}`);
    console.log(`  requests (from the first):\n${r.prof.inboxRequests.join('\n')}`);
    console.log(`  self time by function:\n${topFunctions(r.prof.inbox)}`);
    console.log(`  opening the thread (until the click's promise resolved) — ${r.prof.openMetrics}`);
    console.log(`  self time by function:\n${topFunctions(r.prof.open)}`);
    console.log(`  requests after the click (the first 12):\n${r.prof.openRequests.join('\n')}`);
  }
  console.log(JSON.stringify({
    ok: opened.length === results.length, threads: cfg.threads, threads_shown: shown, messages: cfg.big_messages, messages_shown: firstPage,
    inbox_median_ms: Math.round(inboxMed), open_median_ms: opened.length ? Math.round(openMed) : null, settled_median_ms: Math.round(settledMed),
    inbox_runs_ms: results.map((r) => Math.round(r.inbox.ms)), open_runs_ms: results.map((r) => Math.round(r.open.painted)),
    aims_ms: { inbox: AIM_INBOX_MS, open: AIM_THREAD_MS },
  }));
} catch (e) {
  failed = true;
  console.log(JSON.stringify({ ok: false, error: String(e.stack || e) }));
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);
