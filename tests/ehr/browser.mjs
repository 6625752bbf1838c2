// Browser test of Courier's web app in real Chromium (Debian's, driven by playwright-core).
// Called by the Rust test `browser::clinician_and_patient_message_each_other_in_real_browsers`
// with one JSON argument (see that test): the launch URLs, the people's names, a colleague's token.
//
// A patient signs in through the portal (standalone launch, phone size 390×844), a clinician
// through an EHR launch with the patient in context (desktop 1280×800). Courier already holds two
// threads with the same subject about two patients and a 120-message thread. The test walks
// issue 20 point by point as a clinician and as a patient:
// - right patient at a glance: every row names its patient (name, birth date, MRN) with time,
//   last sender and preview; "This patient" first and "All my patients" one click away; a thread
//   about another patient carries its own banner;
// - finding things: search by patient name, the unread / urgent / waiting filters, newest first;
// - whom to write to: the patient picks from the nurse line and the care team (no references);
//   a clinician chooses "Message the patient" or "Staff only";
// - composing: drafts saved on the server and restored after a reload; per-thread composer;
//   a photo with no text shows as a thumbnail; withdrawing one's own message; mark unread;
//   long threads open at the newest message and load older ones;
// - user content is inert (XSS payloads in subject, text and file name);
// - urgent messages to a clinician raise an alert; the live region announces only new messages;
// - sign-out leaves nothing on screen; offline shows; axe-core finds no serious or critical
//   violation on any screen; touch targets are ≥ 44 px on the phone; 320 px wide works.
// Screenshots of both pages are saved in `artifacts` at the end (and on failure).
import { chromium } from 'playwright-core';
import { mkdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { crc32, deflateSync } from 'node:zlib';
import { axeAudit, smallFields, smallTargets, smallText } from './axe.mjs';

const cfg = JSON.parse(process.argv[2]);
mkdirSync(cfg.artifacts, { recursive: true });

const XSS_TEXT = 'Results are fine <img src=x onerror="window.__xss=1"><script>window.__xss=2</script>';
const XSS_TOPIC = 'Lab results <b onmouseover="window.__xss=3">bold</b>';
const XSS_FILE = '<img src=x onerror=window.__xss=4>.txt';
const REPLY = 'Thank you, doctor & team!';
const STAFF_TOPIC = 'Pharmacy fill history';
const URGENT_NEWS = 'BP 165/100 and headache';
const STAFF_TEXT = 'I suspect she is not taking her meds, can you check?';
const DRAFT = 'Please book a follow-up for next week';
const PATIENT_TOPIC = 'Question about my inhaler';
// A 2×2 red PNG.
// How long a state waited for across browsers may take to show (a message, a receipt, a
// thumbnail): every wait is on the state itself; this only bounds a failure. Under the full test
// suite's load one took over 10 s (the machine has 2 cores); alone, well under a second.
const DELIVERY = 30000;
// A w × h grey PNG (RGB, 8 bits).
function pngOf(w, h) {
  const chunk = (type, data) => {
    const len = Buffer.alloc(4);
    len.writeUInt32BE(data.length);
    const body = Buffer.concat([Buffer.from(type), data]);
    const crc = Buffer.alloc(4);
    crc.writeUInt32BE(crc32(body));
    return Buffer.concat([len, body, crc]);
  };
  const head = Buffer.alloc(13);
  head.writeUInt32BE(w, 0);
  head.writeUInt32BE(h, 4);
  head[8] = 8;
  head[9] = 2;
  const raw = Buffer.alloc((w * 3 + 1) * h, 0x80);
  for (let y = 0; y < h; y++) raw[y * (w * 3 + 1)] = 0;
  return Buffer.concat([Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]), chunk('IHDR', head), chunk('IDAT', deflateSync(raw)), chunk('IEND', Buffer.alloc(0))]);
}
const PNG = Buffer.from('iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAIAAAD91JpzAAAAFklEQVR4nGP8z8DAwMDAxMDAwMDAAAANHQEDasKb6QAAAABJRU5ErkJggg==', 'base64');

const browser = await chromium.launch({
  executablePath: process.env.COURIER_CHROMIUM || '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
    '--disable-component-update', '--no-first-run', '--disable-quic', '--disable-sync'],
});
const problems = [];
const pages = {};
const steps = [];

async function open(name, viewport) {
  const context = await browser.newContext({ viewport });
  const page = await context.newPage();
  page.on('dialog', (d) => { problems.push(`${name}: a dialog opened: ${d.message()}`); d.dismiss(); });
  page.on('pageerror', (e) => problems.push(`${name}: page error: ${e.message}`));
  page.on('console', (m) => { if (m.type() === 'error' && !/Failed to load resource/.test(m.text())) problems.push(`${name}: console error: ${m.text()}`); });
  pages[name] = page;
  return page;
}

async function shots(suffix) {
  for (const [name, page] of Object.entries(pages)) {
    await page.screenshot({ path: join(cfg.artifacts, `${name}-${suffix}.png`), fullPage: false }).catch(() => {});
  }
}

function check(cond, what) {
  if (!cond) throw new Error(what);
}

function step(what) { steps.push(what); }

// Typing on a phone with the on-screen keyboard up (390 × 430 visible): at least 140 px of the
// thread show above the field, and what must stay in view does (`inView`: whom it goes to, the
// emergency notice, whose record it is about); the header comes back once the keyboard is down.
async function keyboardUp(page, who, inView, size = { width: 390, height: 430 }, want = 140) {
  await page.setViewportSize(size);
  await page.focus('#compose-text');
  await page.evaluate(() => window.scrollTo(0, document.documentElement.scrollHeight));
  await page.waitForTimeout(200);
  const room = await page.evaluate(() => {
    const box = document.querySelector('#messages-box').getBoundingClientRect();
    const field = document.querySelector('#compose').getBoundingClientRect();
    const about = document.querySelector('#thread-patient');
    const above = about && !about.hidden ? about.getBoundingClientRect().bottom : 0;
    return Math.round(Math.min(box.bottom, field.top) - Math.max(box.top, above, 0));
  });
  await page.screenshot({ path: join(cfg.artifacts, `${who}-keyboard-up-${size.width}x${size.height}.png`), fullPage: false }).catch(() => {});
  check(room >= want, `${who}: with the keyboard up at ${size.width} × ${size.height}, ${room} px of the thread show above the field (want at least ${want})`);
  for (const sel of inView) {
    const shown = await page.evaluate((sel) => {
      const e = document.querySelector(sel);
      if (!e || !e.textContent.trim()) return false;
      const r = e.getBoundingClientRect();
      return r.height > 0 && r.top >= 0 && r.bottom <= innerHeight;
    }, sel);
    check(shown, `${who}: with the keyboard up ${sel} shows, in view`);
  }
  // Offline while typing: the composer says so, in view (the header is set aside).
  await page.context().setOffline(true);
  await page.waitForFunction(() => {
    const e = document.querySelector('#compose-offline');
    if (!e || e.hidden) return false;
    const r = e.getBoundingClientRect();
    return r.top >= 0 && r.bottom <= innerHeight;
  }, null, { timeout: 5000 }).catch(() => check(false, `${who}: offline while typing, the composer does not say so in view`));
  await page.context().setOffline(false);
  await page.waitForSelector('#compose-offline', { state: 'hidden', timeout: 15000 }).catch(() => check(false, `${who}: back online, the composer still says offline`));
  await page.evaluate(() => document.activeElement.blur());
  await page.setViewportSize({ width: 390, height: 844 });
  check(await page.isVisible('header.top'), `${who}: the header is back once the keyboard is down`);
}

// axe-core on the screen as it is now, and (on the phone) the touch targets.
async function a11y(page, screen, phone) {
  problems.push(...await axeAudit(page, screen));
  if (phone) problems.push(...await smallTargets(page, screen), ...await smallFields(page, screen), ...await smallText(page, screen));
}

async function noScriptRan(page, name) {
  const xss = await page.evaluate(() => window.__xss);
  check(xss === undefined, `${name}: an XSS payload ran (window.__xss = ${xss})`);
  const injected = await page.evaluate(() => document.querySelectorAll('#messages img:not(.thumb), #messages script, #messages b, #threads b, #thread-title b').length);
  check(injected === 0, `${name}: user content became markup (${injected} elements)`);
}

// Where in the page any of `strings` still shows (for a readable failure).
async function phiWhere(page, strings) {
  return page.evaluate((strings) => {
    const out = [];
    const walk = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
    for (let n = walk.nextNode(); n; n = walk.nextNode()) {
      if (strings.some((s) => n.nodeValue.includes(s))) {
        const e = n.parentElement;
        out.push((e.id ? '#' + e.id : e.tagName.toLowerCase() + '.' + e.className) + ': ' + n.nodeValue.slice(0, 60));
      }
    }
    return out;
  }, strings);
}

const rows = (page) => page.locator('#threads li');
const row = (page, text) => page.locator('#threads li', { hasText: text });

try {
  // ---- The patient signs in (phone) and sees the conversations her clinicians started. ----
  step('patient signs in');
  const patient = await open('patient', { width: 390, height: 844 });
  await patient.goto(cfg.patient_url);
  await patient.waitForSelector('body[data-ready="true"]', { timeout: 45000 });
  check(!(await patient.isVisible('#priority-field')), 'patient: no priority choice for patients');
  check(!(await patient.isVisible('#scope')), 'patient: no patient scope choice');
  await row(patient, 'Blood pressure diary').waitFor();
  check(await row(patient, 'Chest pain').count() === 1, 'patient: sees only her own "Chest pain" thread');
  // Names fill in as they arrive (the list shows first).
  await patient.waitForFunction((n) => [...document.querySelectorAll('#threads li')].some((l) => l.textContent.includes('Blood pressure diary') && l.textContent.includes(n)), cfg.clinician_name, { timeout: DELIVERY })
    .catch(() => {});
  const prow = await row(patient, 'Blood pressure diary').textContent();
  check(prow.includes(cfg.clinician_name), `patient: the row names whom the conversation is with (got "${prow}")`);
  await a11y(patient, 'patient inbox (phone)', true);

  // ---- The clinician launches from the EHR with Ada in context. ----
  step('clinician launches');
  const clinician = await open('clinician', { width: 1280, height: 800 });
  await clinician.goto(cfg.clinician_url);
  await clinician.waitForSelector('body[data-ready="true"]', { timeout: 45000 });
  const banner = await clinician.textContent('#patient-banner');
  check(banner.includes(cfg.patient_name) && banner.includes(cfg.patient_mrn), `clinician: the patient banner names the patient and MRN (got "${banner}")`);
  check((await clinician.textContent('#me')).includes(cfg.clinician_name), 'clinician: signed-in name shown');
  // The EHR's style applies (smart_style_url): its highlight colour on the buttons.
  await clinician.waitForFunction(() => getComputedStyle(document.querySelector('#new-thread')).backgroundColor === 'rgb(122, 46, 140)', null, { timeout: 5000 });
  await clinician.waitForSelector('#connection:text-is("Connected")');
  await patient.waitForSelector('#connection:text-is("Connected")');

  // Right patient at a glance: "This patient" first; every row names the patient, with MRN.
  step('clinician: this patient / all my patients');
  check(await clinician.getAttribute('#scope-patient', 'aria-pressed') === 'true', 'clinician: "This patient" is the first view');
  await row(clinician, 'Blood pressure diary').waitFor();
  await clinician.waitForFunction((n) => [...document.querySelectorAll('#threads li .who')].every((w) => w.textContent.includes(n)), cfg.patient_name, { timeout: 5000 });
  check(await row(clinician, 'Chest pain').count() === 1, 'clinician: "This patient" shows only Ada\'s threads');
  // Previews fill in as the newest messages arrive (the list shows first).
  await clinician.waitForFunction(() => [...document.querySelectorAll('#threads li')].some((l) => l.textContent.includes('Reading 118')), null, { timeout: DELIVERY }).catch(() => {});
  const crow = await row(clinician, 'Blood pressure diary').textContent();
  check(crow.includes(cfg.patient_mrn) && /born/.test(crow), `clinician: the row shows birth date and MRN (got "${crow}")`);
  check(/Reading 118/.test(crow), `clinician: the row previews the newest message (got "${crow}")`);
  await a11y(clinician, 'clinician inbox');
  await clinician.click('#scope-all');
  await clinician.waitForFunction(() => document.querySelectorAll('#threads li').length >= 3);
  const chest = await row(clinician, 'Chest pain').allTextContents();
  check(chest.length === 2 && chest.some((t) => t.includes(cfg.patient_name)) && chest.some((t) => t.includes(cfg.other_patient_name)),
    `clinician: the two "Chest pain" threads are told apart by patient (got ${JSON.stringify(chest)})`);
  // A thread about another patient carries its own banner.
  await row(clinician, cfg.other_patient_name).locator('button').click();
  await clinician.waitForSelector('#thread-patient.other');
  const other = await clinician.textContent('#thread-patient');
  check(other.includes(cfg.other_patient_name) && other.includes('not the one open in your EHR'), `clinician: another patient's thread says so (got "${other}")`);
  // A long patient name in "This patient (…)" wraps rather than being cut off (an outside
  // walk-through saw "Wolfeschlegelsteinhaus" and no more).
  const clipped = await clinician.evaluate(() => {
    const b = document.querySelector('#scope-patient');
    const was = b.textContent;
    b.textContent = 'This patient (Hubert Wolfeschlegelsteinhausenbergerdorff)';
    const cut = b.scrollWidth > b.clientWidth + 1;
    b.textContent = was;
    return cut;
  });
  check(!clipped, 'clinician: a long patient name in "This patient (…)" is not cut off');
  // An out-of-office reply written for her says so (not her own words).
  const autoText = await clinician.locator('#messages li', { hasText: 'Away until Monday.' }).textContent({ timeout: DELIVERY });
  check(/Automatic reply/.test(autoText), `clinician: an automatic reply is marked as one (got "${autoText}")`);
  await a11y(clinician, 'clinician thread about another patient');
  // Search by patient name.
  await clinician.fill('#filter-text', 'bob');
  await clinician.waitForFunction(() => document.querySelectorAll('#threads li').length === 1);
  check((await rows(clinician).first().textContent()).includes(cfg.other_patient_name), 'clinician: search finds the patient by name');
  // … by family name first, and by birth year (the row shows the birth date).
  await clinician.fill('#filter-text', 'other bob');
  await clinician.waitForFunction(() => document.querySelectorAll('#threads li').length === 1);
  await clinician.fill('#filter-text', '1950');
  await clinician.waitForFunction(() => document.querySelectorAll('#threads li').length === 1);
  check((await rows(clinician).first().textContent()).includes(cfg.other_patient_name), 'clinician: search finds the patient by birth year');
  await clinician.fill('#filter-text', '');
  await clinician.click('#scope-patient');

  // A long thread opens at its newest message, with the composer in view; older ones load.
  step('clinician: long thread');
  await row(clinician, 'Blood pressure diary').locator('button').click();
  await clinician.waitForSelector('#messages li .text:text("Reading 118: 128 over 86")');
  const inView = await clinician.evaluate(() => {
    const last = document.querySelector('#messages li:last-child').getBoundingClientRect();
    const compose = document.querySelector('#compose').getBoundingClientRect();
    return last.bottom <= innerHeight + 1 && last.top >= 0 && compose.bottom <= innerHeight + 1;
  });
  check(inView, 'clinician: a long thread opens at the newest message with the composer in view');
  const composeTo = await clinician.textContent('#compose-to');
  // The patient is named once: "(the patient)" when the reply goes to them, "about …" when not.
  check(composeTo.split(cfg.patient_name).length === 2 && /about|\(the patient/.test(composeTo), `clinician: the composer says whom the reply goes to and about whom, naming the patient once (got "${composeTo}")`);
  // Two patients may share a name: the composer gives the birth date too.
  check(/born /.test(composeTo), `clinician: the composer names the patient with their birth date (got "${composeTo}")`);
  const first = await clinician.locator('#messages > li').count();
  check(first <= 51 && await clinician.isVisible('#older'), `clinician: a long thread loads a page, not all (${first})`);
  await clinician.evaluate(() => { document.querySelector('#messages-box').scrollTop = 0; });
  await clinician.waitForFunction((n) => document.querySelectorAll('#messages > li').length > n, first, { timeout: 5000 });
  check(!(await clinician.locator('#thread-patient.other').count()), 'clinician: Ada\'s thread is not flagged as another patient');
  check((await clinician.textContent('#thread-patient')).includes(cfg.patient_name), 'clinician: the thread names its patient');
  check(await clinician.getAttribute('#messages', 'aria-live') === null, 'clinician: the message list is not a live region (a whole thread would be read aloud)');

  // ---- Slow network: nothing of one thread lands in another. ----
  step('clinician: slow network races');
  // Older messages of Ada's long thread arrive after Bob's thread was opened.
  await clinician.route(/_offset=/, async (route) => { await new Promise((r) => setTimeout(r, 1500)); await route.continue(); });
  await clinician.click('#older');
  await clinician.click('#scope-all');
  await row(clinician, cfg.other_patient_name).locator('button').click();
  await clinician.waitForSelector('#thread-patient.other');
  const otherTo = await clinician.textContent('#compose-to');
  check(otherTo.includes(cfg.other_patient_name) && /born /.test(otherTo) && /another patient/.test(otherTo),
    `clinician: the composer of another patient's thread says so, with the birth date (got "${otherTo}")`);
  await clinician.waitForTimeout(2500);
  check(!(await clinician.locator('#messages li .text', { hasText: 'Reading' }).count()), 'clinician: older messages of another thread appeared in this one');
  await clinician.unroute(/_offset=/);
  // A reply still sending when another thread is opened stays in its own thread.
  await row(clinician, 'Blood pressure diary').locator('button').click();
  await clinician.waitForSelector('#messages li .text:text("Reading 118: 128 over 86")');
  await clinician.route('**/Communication', async (route) => { if (route.request().method() === 'POST') await new Promise((r) => setTimeout(r, 1500)); await route.continue(); });
  await clinician.fill('#compose-text', 'Slow reply for the diary');
  await clinician.click('#send');
  await row(clinician, cfg.other_patient_name).locator('button').click();
  await clinician.waitForSelector('#thread-patient.other');
  await clinician.waitForTimeout(2500);
  check(!(await clinician.locator('#messages li .text', { hasText: 'Slow reply' }).count()), 'clinician: a reply sent in one thread appeared in another');
  check(await clinician.inputValue('#compose-text') === '', 'clinician: the other thread\'s composer was touched');
  await clinician.unroute('**/Communication');
  await row(clinician, 'Blood pressure diary').locator('button').click();
  await clinician.waitForSelector('#messages li .text:text("Slow reply for the diary")', { timeout: DELIVERY });
  // The new-conversation dialog says which patient it is about, and that it is not the one read.
  await row(clinician, cfg.other_patient_name).locator('button').click();
  await clinician.waitForSelector('#thread-patient.other');
  await clinician.click('#new-thread');
  await clinician.waitForSelector('#new-dialog[open]');
  const about = await clinician.textContent('#new-about');
  check(about.includes(cfg.patient_name) && about.includes('Not ' + cfg.other_patient_name), `clinician: the dialog names whom it is about (got "${about}")`);
  check(!(await clinician.locator('#new-to option', { hasText: 'Someone else' }).count()), 'clinician: "Message the patient" offers only the patient');
  await clinician.click('#new-cancel');
  await clinician.click('#scope-patient');

  // ---- A new conversation with the patient (keyboard only; XSS payloads stay text). ----
  step('clinician: new conversation');
  await clinician.click('#new-thread');
  await clinician.waitForFunction(() => document.querySelector('#new-to').value.startsWith('Patient/'));
  check((await clinician.locator('#new-to option:checked').textContent()).includes(cfg.patient_name), 'clinician: the patient in context is the default recipient, by name');
  await a11y(clinician, 'clinician new conversation');
  // What is typed is never kept in the browser's form history (a walk-through found a subject in
  // a shared computer's profile after sign-out).
  const remembered = await clinician.evaluate(() => [...document.querySelectorAll('input:not([type=hidden]):not([type=file]):not([type=checkbox]):not([type=radio]):not([type=time]):not([type=datetime-local]), textarea')].filter((x) => !/^(off|one-time-code)$/.test(x.getAttribute('autocomplete') || '')).map((x) => x.id));
  check(remembered.length === 0, `clinician: fields the browser would remember: ${remembered.join(', ')}`);
  await clinician.getByLabel('Subject').fill(XSS_TOPIC);
  await clinician.fill('#new-text', XSS_TEXT);
  await clinician.focus('#new-send');
  await clinician.keyboard.press('Enter');
  await clinician.waitForFunction((t) => document.querySelector('#thread-title').textContent === t, XSS_TOPIC, { timeout: DELIVERY });
  await clinician.waitForSelector('#messages li .text');
  // A message of one's own says at once that it was sent (before any receipt, an offline
  // recipient's included); it never shows no status at all.
  const sentStatus = (await clinician.locator('#messages li .status').first().textContent()).trim();
  check(/^(Sent|Delivered to |Read by )/.test(sentStatus), `clinician: a sent message shows its status at once (got "${sentStatus}")`);

  // It appears first in the patient's list without a reload, marked unread; she opens it.
  step('patient: opens the new thread');
  const item = row(patient, 'Lab results');
  await item.waitFor({ timeout: DELIVERY });
  await patient.waitForFunction(() => document.querySelector('#threads li .topic').textContent.startsWith('Lab results'));
  await patient.waitForSelector('#threads li.unread .badge');
  // The heading's unread total is what the rows add up to (a thread's title is not a message).
  const [headed, rowsSum] = await patient.evaluate(() => {
    const m = /\((\d+) unread\)/.exec(document.querySelector('#threads-title').textContent);
    const rows = [...document.querySelectorAll('#threads li .badge')].map((x) => /^(\d+) unread$/.exec(x.textContent.trim())).filter(Boolean);
    return [m ? Number(m[1]) : 0, rows.reduce((a, x) => a + Number(x[1]), 0)];
  });
  check(headed === rowsSum && headed > 0, `patient: the unread total (${headed}) is what the rows add up to (${rowsSum})`);
  await item.locator('button').focus();
  await patient.keyboard.press('Enter');
  await patient.waitForSelector('#messages li .text');
  const shown = await patient.locator('#messages li .text').first().textContent();
  check(shown === XSS_TEXT, `patient: the message text shows literally (got "${shown}")`);
  await noScriptRan(patient, 'patient');
  const from = await patient.locator('#messages li .from').first().textContent();
  check(from === cfg.clinician_name, `patient: the sender is shown by name (got "${from}")`);
  check(await patient.isVisible('#response-notice'), 'patient: the expected-response notice is shown where they write');
  const emergency = patient.locator('#compose .emergency');
  check(await emergency.isVisible() && (await emergency.textContent()).includes('call 911'), 'patient: the emergency notice with its number is shown where they write');
  check(!(await clinician.isVisible('#compose .emergency')), 'clinician: no patient emergency notice');
  // On a 360 × 640 phone the composer (stuck to the bottom) leaves most of the screen to the thread.
  await patient.setViewportSize({ width: 360, height: 640 });
  const composeHeight = await patient.evaluate(() => document.querySelector('#compose').getBoundingClientRect().height);
  check(composeHeight <= 320, `patient: the composer takes at most half of a 360 × 640 screen (got ${Math.round(composeHeight)} px)`);
  await patient.screenshot({ path: join(cfg.artifacts, 'patient-thread-360x640.png'), fullPage: false }).catch(() => {});
  await patient.setViewportSize({ width: 390, height: 844 });
  await a11y(patient, 'patient thread (phone)', true);

  // The read receipt reaches the clinician's screen live, by name.
  await clinician.waitForSelector(`.status:text("Read by ${cfg.patient_name}")`, { timeout: DELIVERY });

  // The patient replies with an attachment whose name is a payload; the live region announces
  // only the new message on the clinician's side.
  step('patient: replies with a file');
  await patient.fill('#compose-text', REPLY);
  await patient.setInputFiles('#compose-file', { name: XSS_FILE, mimeType: 'text/plain', buffer: Buffer.from('a note') });
  await patient.click('#send');
  await patient.waitForSelector(`#messages li .text:text("${REPLY}")`);
  await clinician.waitForSelector(`#messages li .text:text("${REPLY}")`, { timeout: DELIVERY });
  const file = await clinician.locator('#messages .attachment').first().textContent();
  check(file.includes(XSS_FILE), `clinician: the file name shows literally (got "${file}")`);
  await noScriptRan(clinician, 'clinician');
  const said = await clinician.textContent('#announce');
  check(said === `New message from ${cfg.patient_name}.`, `clinician: the live region announces just the new message (got "${said}")`);

  // A photo with no text: a thumbnail on the other side.
  step('patient: photo only');
  await patient.setInputFiles('#compose-file', { name: 'rash.png', mimeType: 'image/png', buffer: PNG });
  // The picker on a phone: a button that says what it does (the browser's own control read
  // "Choose File No", cut off beside Send), the chosen file's name beside it, all in view.
  const picker = await patient.locator('label.file-label').boundingBox();
  const pickerSays = (await patient.locator('label.file-label').innerText()).trim();
  check(picker && picker.x >= 0 && picker.x + picker.width <= 390 && picker.height >= 44 && pickerSays === 'Attach',
    `patient: the file picker is an "Attach" button in view on a phone (got "${pickerSays}", ${JSON.stringify(picker)})`);
  const under = await patient.evaluate(() => { const b = document.querySelector('label.file-label').getBoundingClientRect(); const e = document.elementFromPoint(b.x + b.width / 2, b.y + b.height / 2); return e && e.id; });
  check(under === 'compose-file', `patient: under "Attach" is the file control itself (a screen reader's touch finds it; got ${under})`);
  const chosen = (await patient.textContent('#file-name')) || '';
  const chosenBox = await patient.locator('#file-chosen').boundingBox();
  check(chosen === 'rash.png' && chosenBox && chosenBox.x + chosenBox.width <= 390, `patient: the chosen file's name shows beside the picker (got "${chosen}")`);
  const sendBox = await patient.locator('#send').boundingBox();
  check(sendBox && sendBox.x + sendBox.width <= 390, 'patient: Send stays in view beside the picker and the file name');
  // A very long name is cut, not pushed past the screen's edge.
  await patient.setInputFiles('#compose-file', { name: 'scan-of-my-discharge-letter-from-the-hospital-'.repeat(3) + 'page1.png', mimeType: 'image/png', buffer: PNG });
  const wide = await patient.evaluate(() => document.documentElement.scrollWidth);
  const removeBox = await patient.locator('#file-remove').boundingBox();
  check(wide <= 390 && removeBox && removeBox.x + removeBox.width <= 390 && removeBox.width >= 44,
    `patient: a long file name does not widen the page or squeeze "Remove" (page ${wide} px, Remove ${JSON.stringify(removeBox)})`);
  await patient.click('#file-remove');
  check((await patient.evaluate(() => document.getElementById('compose-file').files.length)) === 0 && !(await patient.isVisible('#file-chosen')),
    'patient: "Remove" takes the chosen file off');
  await patient.setInputFiles('#compose-file', { name: 'rash.png', mimeType: 'image/png', buffer: PNG });
  await patient.click('#send');
  await clinician.waitForSelector('#messages img.thumb[alt="Photo: rash.png"]', { timeout: DELIVERY });
  await clinician.waitForFunction(() => { const i = document.querySelector('#messages img.thumb'); return i && i.complete && i.naturalWidth === 2; }, null, { timeout: DELIVERY });
  const thumb = await clinician.locator('#messages img.thumb').first().boundingBox();
  check(thumb && thumb.width >= 96 && thumb.height >= 96, `clinician: a tiny photo shows at a size one can tap and see (got ${thumb && Math.round(thumb.width)} × ${thumb && Math.round(thumb.height)})`);
  // A tall photo: once it has loaded, the conversation is still shown to its end (a walk-through:
  // a phone photo's lower part, its file and its status were below the fold); it enlarges in the
  // page (not only as a download), and nothing of it stays when closed.
  step('patient: a tall photo');
  await patient.setInputFiles('#compose-file', { name: 'tall.png', mimeType: 'image/png', buffer: pngOf(20, 400) });
  await patient.click('#send');
  const tallLoaded = await clinician.waitForFunction(() => { const i = document.querySelector('#messages img.thumb[alt="Photo: tall.png"]'); return i && i.complete && i.naturalHeight === 400; }, null, { timeout: DELIVERY }).then(() => true, () => false);
  check(tallLoaded, 'clinician: the tall photo arrives');
  const fold = await clinician.evaluate(() => { const b = scrollBox(); return {gap: b.scrollHeight - b.scrollTop - b.clientHeight, scrolls: b.scrollHeight > b.clientHeight}; });
  check(fold.scrolls && fold.gap <= 4, `clinician: after a tall photo loads, the conversation is still shown to its end (${JSON.stringify(fold)})`);
  await clinician.click('#messages button.thumb-open[aria-label="Enlarge photo: tall.png"]');
  await clinician.waitForSelector('#photo-dialog[open]');
  const big = await clinician.evaluate(() => { const i = document.getElementById('photo-full'); return i.complete ? i.naturalHeight : 0; });
  check(big === 400, `clinician: the photo opens enlarged in the page (${big})`);
  await clinician.click('#photo-close');
  await clinician.waitForSelector('#photo-dialog', { state: 'hidden' });
  const leftOfPhoto = await clinician.evaluate(() => [document.getElementById('photo-full').getAttribute('src'), document.getElementById('photo-full').alt, document.getElementById('photo-dialog').getAttribute('aria-label')]);
  check(!leftOfPhoto[0] && !leftOfPhoto[1].includes('tall.png') && !leftOfPhoto[2].includes('tall.png'), `clinician: a closed photo leaves nothing behind, not even its name (${JSON.stringify(leftOfPhoto)})`);

  // A message Courier refuses leaves no file behind: the file goes in one transaction with its
  // message (the Rust side then finds every stored file attached to a message).
  step('patient: a refused message with a photo');
  const rootPost = (u) => new URL(u).pathname === '/';
  let tampered = 0;
  await patient.route(rootPost, async (route) => {
    const req = route.request();
    if (req.method() !== 'POST') return route.continue();
    const b = JSON.parse(req.postData());
    b.entry[b.entry.length - 1].resource.status = 'not-a-status';
    tampered++;
    await route.continue({ postData: JSON.stringify(b) });
  });
  await patient.fill('#compose-text', 'refused with a photo');
  await patient.setInputFiles('#compose-file', { name: 'refused.png', mimeType: 'image/png', buffer: PNG });
  await patient.click('#send');
  await patient.waitForSelector('#compose-error:not([hidden])');
  check(tampered === 1, `patient: the photo and its message went in one transaction (${tampered})`);
  check((await patient.textContent('#compose-error')).startsWith('Your message was not sent.'), 'patient: the refused send is said');
  await patient.unroute(rootPost);
  // Sent again as it stands (the text and the photo were kept): now it goes.
  await patient.click('#send');
  await patient.waitForSelector('#compose-error', { state: 'hidden', timeout: DELIVERY });
  await clinician.waitForSelector('#messages li .text:text("refused with a photo")', { timeout: DELIVERY });

  step('patient: types with the keyboard up');
  await keyboardUp(patient, 'patient', ['#compose .emergency', '#compose-to']);
  await keyboardUp(patient, 'patient', ['#compose .emergency', '#compose-to'], { width: 360, height: 330 }, 100);

  // The patient withdraws her own message (two presses, no browser dialog).
  step('patient: withdraws a message');
  const mineReply = patient.locator('#messages li.mine', { hasText: REPLY });
  // Each Withdraw button says which message it withdraws (a screen reader hears the label).
  const labels = await patient.$$eval('#messages button.withdraw', (bs) => bs.map((b) => b.getAttribute('aria-label')));
  check(labels.length > 0 && new Set(labels).size === labels.length && labels.every((l) => /^Withdraw your message of /.test(l || '')), `patient: Withdraw buttons are told apart (${labels.join(' | ')})`);
  check((await mineReply.locator('button.withdraw').getAttribute('aria-label')).includes(REPLY.slice(0, 20)), 'patient: the Withdraw button names its message');
  // Message text takes its direction from its own script.
  check(await patient.$$eval('#messages li .text', (ps) => ps.length > 0 && ps.every((p) => p.getAttribute('dir') === 'auto')), 'patient: message text has dir=auto');
  await mineReply.locator('button.withdraw').click();
  await mineReply.locator('button.withdraw:text("Press again to withdraw")').click();
  await clinician.waitForSelector('#messages li.withdrawn', { timeout: DELIVERY });
  check(!(await clinician.locator('#messages li .text', { hasText: REPLY }).count()), 'clinician: a withdrawn message no longer shows its text');

  // An attachment pointing elsewhere is shown, never fetched (the token must not leave Courier).
  const status = await patient.evaluate(async () => {
    const s = JSON.parse(sessionStorage.getItem('courier.session'));
    const h = { Authorization: 'Bearer ' + s.access_token, 'Content-Type': 'application/fhir+json' };
    const list = await (await fetch('/Communication?part-of:missing=true&_sort=-_lastUpdated', { headers: h })).json();
    const header = list.entry.find((e) => e.search.mode === 'match').resource;
    const msg = { resourceType: 'Communication', status: 'completed', partOf: [{ reference: 'Communication/' + header.id }],
      sender: { reference: s.fhirUser }, recipient: [header.sender],
      payload: [{ contentAttachment: { contentType: 'application/pdf', url: '//attacker.example/steal', title: 'labs.pdf' } }] };
    return (await fetch('/Communication', { method: 'POST', headers: h, body: JSON.stringify(msg) })).status;
  });
  check(status === 201, `patient: posting the message failed (${status})`);
  await clinician.waitForSelector('#messages span.attachment:text("labs.pdf")', { timeout: DELIVERY });
  check(await clinician.locator('#messages .attachment button', { hasText: 'labs.pdf' }).count() === 0, 'clinician: a foreign attachment URL is not clickable');

  // ---- Drafts: saved on the server, restored after a reload, sent as the message. ----
  step('clinician: draft');
  await clinician.fill('#compose-text', DRAFT);
  await clinician.waitForSelector('#draft-state:text("Draft saved.")', { timeout: DELIVERY });
  await clinician.reload();
  await clinician.waitForSelector('body[data-ready="true"]', { timeout: 45000 });
  // The list marks the thread with an unsent draft.
  await clinician.waitForFunction(() => [...document.querySelectorAll('#threads li')].some((l) => l.textContent.includes('Lab results') && l.querySelector('.badge.draft')), null, { timeout: DELIVERY });
  await row(clinician, 'Lab results').locator('button').click();
  await clinician.waitForFunction((t) => document.querySelector('#compose-text').value === t, DRAFT, { timeout: DELIVERY });
  check((await clinician.textContent('#draft-state')).includes('restored'), 'clinician: the draft says it was restored');
  check(!(await patient.locator('#messages li .text', { hasText: DRAFT }).count()), 'patient: a draft is not shown to the recipient');
  await clinician.selectOption('#compose-priority', 'asap');
  await clinician.click('#send');
  await patient.waitForSelector(`#messages li .text:text("${DRAFT}")`, { timeout: DELIVERY });
  await clinician.waitForFunction(() => document.querySelector('#compose-text').value === '', null, { timeout: DELIVERY });
  check(await clinician.inputValue('#compose-priority') === 'routine', 'clinician: the priority starts routine again after a send');

  // ---- Staff only: the clinician writes to a colleague about the patient. ----
  step('clinician: staff only');
  await clinician.click('#new-thread');
  await clinician.waitForSelector('#new-dialog[open]');
  check(await clinician.isVisible('#audience'), 'clinician: chooses who a new conversation is with');
  await clinician.check('#audience-staff');
  await clinician.waitForFunction(() => !document.querySelector('#new-to').value.startsWith('Patient/'));
  await clinician.selectOption('#new-to', 'other');
  await clinician.fill('#new-recipient', cfg.patient_ref);
  await clinician.getByLabel('Subject').fill(STAFF_TOPIC);
  await clinician.fill('#new-text', STAFF_TEXT);
  await clinician.click('#new-send');
  await clinician.waitForSelector('#new-error:not([hidden])');
  check((await clinician.textContent('#new-error')).includes('cannot include the patient'), 'clinician: the refusal is explained in the dialog');
  // A typed reference is named (or said to be unknown) before anything is sent.
  await clinician.fill('#new-recipient', 'Practitioner/does-not-exist');
  await clinician.click('#new-send');
  await clinician.waitForFunction(() => /does not know Practitioner\/does-not-exist/.test(document.querySelector('#new-error').textContent), null, { timeout: 5000 });
  // The care team is offered by name.
  const offered = await clinician.locator('#new-to option').allTextContents();
  check(offered.some((o) => o.includes(cfg.colleague_name)), `clinician: the care team is offered by name (got ${JSON.stringify(offered)})`);
  await clinician.selectOption('#new-to', cfg.colleague_ref);
  // A slow network: the new thread's stored draft is looked up late, and the clinician types
  // before it is. What she typed is still kept as the thread's draft (checked after the run:
  // four staff-only resources, this draft one of them).
  const slowDraftLookup = async (r) => { await new Promise((done) => setTimeout(done, 2000)); await r.continue().catch(() => {}); };
  await clinician.route(/status=preparation/, slowDraftLookup);
  await clinician.click('#new-send');
  await clinician.waitForSelector('#staff-banner:not([hidden])', { timeout: DELIVERY });
  await clinician.waitForSelector('#threads li .badge.staff');
  // The composer belongs to its thread: text and priority do not follow to the next one.
  await clinician.fill('#compose-text', 'half-written note for the pharmacist');
  await clinician.selectOption('#compose-priority', 'urgent');
  await clinician.unroute(/status=preparation/, slowDraftLookup);
  await row(clinician, 'Lab results').locator('button').click();
  await clinician.waitForSelector('#staff-banner', { state: 'hidden' });
  check(await clinician.inputValue('#compose-text') === '', 'clinician: typed text does not leak into another thread');
  check(await clinician.inputValue('#compose-priority') === 'routine', 'clinician: priority resets per thread');
  await patient.waitForTimeout(1500);
  const patientText = await patient.evaluate(() => document.body.textContent);
  check(!patientText.includes(STAFF_TOPIC) && !patientText.includes(STAFF_TEXT), 'patient: a staff-only conversation reached the portal');

  // A side note to a colleague inside the patient's conversation (staff-only by its recipients):
  // marked as such for the clinician, since the conversation's banner does not say it; never
  // shown to the patient.
  step('clinician: a staff-only side note in the patient\'s conversation');
  const SIDE = 'Side note: recheck adherence before calling';
  const sideStatus = await clinician.evaluate(async ([text, colleague]) => {
    const s = JSON.parse(sessionStorage.getItem('courier.session'));
    const h = { Authorization: 'Bearer ' + s.access_token, 'Content-Type': 'application/fhir+json' };
    const list = await (await fetch('/Communication?part-of:missing=true&_sort=-_lastUpdated&_count=200', { headers: h })).json();
    const header = (list.entry || []).map((e) => e.resource).find((r) => JSON.stringify(r.topic || {}).includes('Lab results') && r.subject && r.subject.reference === s.patient);
    const note = { resourceType: 'Communication', status: 'completed', partOf: [{ reference: 'Communication/' + header.id }],
      subject: header.subject, sender: { reference: s.fhirUser }, recipient: [{ reference: colleague }], payload: [{ contentString: text }] };
    return (await fetch('/Communication', { method: 'POST', headers: h, body: JSON.stringify(note) })).status;
  }, [SIDE, cfg.colleague_ref]);
  check(sideStatus === 201, `clinician: posting the side note failed (${sideStatus})`);
  await clinician.waitForSelector(`#messages li.staff-note .text:text("${SIDE}")`, { timeout: DELIVERY });
  check((await clinician.textContent('#messages li.staff-note .badge.staff')).includes('not shown to the patient'), 'clinician: a staff-only message in the patient\'s conversation is marked');
  await patient.waitForTimeout(1000);
  check(!(await patient.evaluate(() => document.body.textContent)).includes(SIDE), 'patient: a staff-only side note reached the portal');

  // ---- The patient starts a conversation: she picks from the care team, never a reference. ----
  step('patient: new conversation');
  await patient.click('#back');
  await patient.click('#new-thread');
  await patient.waitForSelector('#new-dialog[open]');
  await patient.waitForFunction(() => document.querySelectorAll('#new-to option').length > 1);
  const choices = await patient.locator('#new-to option').allTextContents();
  check(choices.some((c) => c.includes('Nurse line')) && choices.some((c) => c.includes(cfg.colleague_name)) && choices.some((c) => c.includes(cfg.clinician_name)),
    `patient: offered the nurse line, her care team and her clinician (got ${JSON.stringify(choices)})`);
  check(!choices.some((c) => /Patient\/|Practitioner\//.test(c)) && !(await patient.isVisible('#new-recipient')), 'patient: never asked for a reference');
  check(await patient.isVisible('#new-dialog .emergency'), 'patient: the emergency notice is in the new-conversation dialog');
  await a11y(patient, 'patient new conversation (phone)', true);
  await patient.click('#new-send');
  await patient.waitForSelector('#new-error:not([hidden])');
  check((await patient.textContent('#new-error')).includes('Choose whom'), 'patient: a missing recipient is explained in the dialog');
  check(await patient.evaluate(() => document.activeElement.id === 'new-to' && document.activeElement.getAttribute('aria-invalid') === 'true'),
    'patient: the field at fault takes focus and is marked invalid');
  await patient.selectOption('#new-to', cfg.colleague_ref);
  await patient.getByLabel('Subject').fill(PATIENT_TOPIC);
  await patient.selectOption('#new-category', { index: 1 });
  await patient.fill('#new-text', 'Can I use it twice a day?');
  // With a photo from the start (a walk-through's patient could attach one only after).
  await patient.setInputFiles('#new-file', { name: 'inhaler.png', mimeType: 'image/png', buffer: PNG });
  await patient.click('#new-send');
  await patient.waitForSelector(`#thread-title:text("${PATIENT_TOPIC}")`, { timeout: DELIVERY });
  const withPhoto = await patient.waitForSelector('#messages img.thumb[alt="Photo: inhaler.png"]', { timeout: DELIVERY }).then(() => true, () => false);
  check(withPhoto, 'patient: a new conversation starts with its photo');

  // ---- New activity moves a thread up; the filters find it. ----
  step('new activity moves a thread up');
  await patient.click('#back');
  await row(patient, 'Lab results').locator('button').click();
  await patient.fill('#compose-text', URGENT_NEWS);
  await patient.click('#send');
  await patient.waitForSelector(`#messages li .text:text("${URGENT_NEWS}")`);
  await clinician.waitForFunction((t) => document.querySelector('#threads li .topic').textContent.startsWith(t), 'Lab results', { timeout: DELIVERY });
  await clinician.selectOption('#filter-show', 'waiting');
  await clinician.waitForFunction(() => [...document.querySelectorAll('#threads li .topic')].some((t) => t.textContent.startsWith('Lab results')));
  check(!(await row(clinician, STAFF_TOPIC).count()), 'clinician: "waiting for my reply" leaves out threads where I wrote last');
  await clinician.selectOption('#filter-show', 'all');
  // A search that finds nothing says what to do, not only "Showing 0 of N".
  await clinician.fill('#filter-text', 'zzz-no-such-conversation');
  const none = await clinician.waitForFunction(() => /^Showing 0 of \d+ conversations?: change or clear the search/.test(document.getElementById('threads-count').textContent), null, { timeout: 5000 }).then(() => true, () => false);
  check(none, `clinician: an empty result says what to do (got "${await clinician.textContent('#threads-count')}")`);
  await clinician.fill('#filter-text', '');
  // "All conversations" is not cut off in the list's filters (a walk-through at 1280 × 800).
  const viewport = clinician.viewportSize();
  await clinician.setViewportSize({ width: 1280, height: 800 });
  const cut = await clinician.evaluate(() => {
    const s = document.getElementById('filter-show');
    const cs = getComputedStyle(s);
    const span = document.createElement('span');
    Object.assign(span.style, {position: 'absolute', visibility: 'hidden', whiteSpace: 'nowrap', fontFamily: cs.fontFamily, fontSize: cs.fontSize, fontWeight: cs.fontWeight});
    span.textContent = 'All conversations';
    document.body.append(span);
    const text = span.getBoundingClientRect().width;
    span.remove();
    // The text, the select's own padding, and its arrow (~28 px).
    return {need: Math.round(text + parseFloat(cs.paddingLeft) + parseFloat(cs.paddingRight) + 28), box: s.clientWidth, font: cs.fontSize};
  });
  check(cut.need <= cut.box, `clinician: the "Show" choice is not cut off (${JSON.stringify(cut)})`);
  await clinician.setViewportSize(viewport);

  // ---- Mark unread: the thread she has read is unread again for her. ----
  step('patient: mark unread');
  await patient.waitForFunction(() => { const r = [...document.querySelectorAll('#threads li')].find((l) => l.textContent.includes('Lab results')); return r && !r.classList.contains('unread'); }, null, { timeout: DELIVERY });
  await patient.click('#mark-unread');
  await patient.waitForFunction(() => { const r = [...document.querySelectorAll('#threads li')].find((l) => l.textContent.includes('Lab results')); return r && r.classList.contains('unread'); }, null, { timeout: DELIVERY });
  check(!(await patient.isVisible('#compose')), 'patient: marking unread closes the thread (opening it reads it again)');

  // ---- Urgent messages raise an alert for the clinician (sound / notification). ----
  step('clinician: urgent alert');
  const alertsBefore = await clinician.evaluate(() => window.__courierAlerts || 0);
  const urgent = await fetch(cfg.base + 'Communication', {
    method: 'POST',
    headers: { Authorization: 'Bearer ' + cfg.colleague_token, 'Content-Type': 'application/fhir+json' },
    body: JSON.stringify({ resourceType: 'Communication', status: 'completed', priority: 'urgent', subject: { reference: cfg.patient_ref },
      sender: { reference: cfg.colleague_ref }, recipient: [{ reference: cfg.clinician_ref }], payload: [{ contentString: 'Call me about her potassium' }] }),
  });
  check(urgent.status === 201, `colleague: the urgent message was not sent (${urgent.status})`);
  await clinician.waitForFunction((n) => (window.__courierAlerts || 0) > n, alertsBefore, { timeout: DELIVERY });

  // ---- Offline: the connection state says so. ----
  await patient.context().setOffline(true);
  await patient.evaluate(() => window.dispatchEvent(new Event('offline')));
  await patient.waitForSelector('#connection.offline');
  // A new conversation started offline: the list of whom to write to could not be loaded (not
  // "no care team"), and it fills itself once Courier is back.
  if (await patient.isVisible('#back')) await patient.click('#back');
  await patient.click('#new-thread');
  await patient.waitForSelector('#new-dialog[open]');
  await patient.waitForSelector('#new-error:not([hidden])');
  check((await patient.textContent('#new-error')).includes('could not be loaded'), 'patient: offline, the dialog says whom to write to could not be loaded');
  await patient.context().setOffline(false);
  await patient.evaluate(() => window.dispatchEvent(new Event('online')));
  await patient.waitForSelector('#connection:text-is("Connected")', { timeout: 15000 });
  const refilled = await patient.waitForFunction(() => document.querySelectorAll('#new-to option').length > 1 && document.querySelector('#new-error').hidden, null, { timeout: 15000 }).then(() => true, () => false);
  check(refilled, 'patient: back online, the open dialog lists whom to write to');
  await patient.keyboard.press('Escape');
  await patient.waitForSelector('#new-dialog[open]', { state: 'hidden' });

  // ---- Errors in plain words, gone when their cause is. ----
  step('patient: plain-word errors');
  await row(patient, 'Lab results').locator('button').click();
  await patient.waitForSelector('#compose:not([hidden])');
  // A pasted text over the limit (2,000) is kept whole, said to be too long, and not sent.
  const long = 'x'.repeat(2100) + ' END: I also take warfarin.';
  await patient.fill('#compose-text', long);
  check((await patient.inputValue('#compose-text')) === long, 'patient: a long pasted text is kept whole (not cut off)');
  await patient.click('#send');
  await patient.waitForSelector('#compose-error:not([hidden])');
  check((await patient.textContent('#compose-error')).includes('at most 2000'), 'patient: a text over the limit is said to be too long');
  await patient.fill('#compose-text', '');
  await patient.setInputFiles('#compose-file', { name: 'setup.exe', mimeType: 'application/x-msdownload', buffer: Buffer.from('MZ') });
  await patient.click('#send');
  // Beside Send (in view on a phone), not at the top of the page.
  await patient.waitForSelector('#compose-error:not([hidden])');
  const err = await patient.textContent('#compose-error');
  const errBox = await patient.locator('#compose-error').boundingBox();
  check(errBox && errBox.y >= 0 && errBox.y < 844, 'patient: the send error is in view');
  check(err.includes('That kind of file cannot be sent') && !/MIME|application\//.test(err), `patient: a refused file type is explained in plain words (got "${err}")`);
  await patient.setInputFiles('#compose-file', []);
  await patient.fill('#compose-text', 'Sorry, here it is in words');
  await patient.click('#send');
  await patient.waitForSelector('#compose-error', { state: 'hidden', timeout: DELIVERY });
  await patient.click('#back');

  // ---- The clinician on a phone and the patient on a desktop: the same checks. ----
  step('clinician on a phone');
  await clinician.setViewportSize({ width: 390, height: 844 });
  if (await clinician.isVisible('#back')) await clinician.click('#back');
  await clinician.click('#scope-all');
  await a11y(clinician, 'clinician inbox (phone)', true);
  await row(clinician, cfg.other_patient_name).locator('button').click();
  await clinician.waitForSelector('#thread-patient.other');
  check(await clinician.isVisible('#back') && !(await clinician.isVisible('#threads')), 'clinician: on a phone the thread takes the screen, with a way back');
  await a11y(clinician, 'clinician thread (phone)', true);
  await keyboardUp(clinician, 'clinician', ['#thread-patient', '#compose-to']);
  await clinician.click('#back');
  await clinician.click('#scope-patient');
  await clinician.setViewportSize({ width: 1280, height: 800 });
  await patient.setViewportSize({ width: 1280, height: 800 });
  await row(patient, 'Lab results').locator('button').click();
  await patient.waitForSelector('#compose:not([hidden])');
  await a11y(patient, 'patient thread (desktop)');
  // A short desktop window (1920 × 1080 at 200 % zoom): a failed send's error can be seen.
  await patient.setViewportSize({ width: 960, height: 540 });
  const failPost = async (r) => { if (r.request().method() === 'POST') await r.fulfill({ status: 500, contentType: 'application/fhir+json', body: '{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"exception"}]}' }); else await r.continue(); };
  await patient.route('**/Communication', failPost);
  await patient.fill('#compose-text', 'This one will fail');
  await patient.click('#send');
  await patient.waitForSelector('#compose-error:not([hidden])');
  const shortBox = await patient.locator('#compose-error').boundingBox();
  check(shortBox && shortBox.y >= 0 && shortBox.y + shortBox.height <= 540 + 1, `patient: a failed send's error is in view at 960 × 540 (got ${JSON.stringify(shortBox)})`);
  await patient.screenshot({ path: join(cfg.artifacts, 'patient-send-failed-960x540.png'), fullPage: false }).catch(() => {});
  await patient.unroute('**/Communication', failPost);
  await patient.fill('#compose-text', '');
  await patient.setViewportSize({ width: 390, height: 844 });
  await patient.click('#back');

  // ---- Desktop: every filter within the list; 320 px: the clinician's pages fit too. ----
  const fits = await clinician.evaluate(() => {
    const pane = document.querySelector('#threads-pane').getBoundingClientRect();
    return ['#filter-inbox', '#filter-when', '#filter-text'].every((id) => document.querySelector(id).getBoundingClientRect().right <= pane.right + 1);
  });
  check(fits, 'clinician: a filter runs out of the conversation list');
  await clinician.setViewportSize({ width: 320, height: 640 });
  const cw = await clinician.evaluate(() => document.scrollingElement.scrollWidth);
  check(cw <= 320, `clinician: the inbox is wider than 320 px (${cw})`);
  await row(clinician, 'Lab results').locator('button').click();
  await clinician.waitForSelector('#compose:not([hidden])');
  const tw = await clinician.evaluate(() => document.scrollingElement.scrollWidth);
  check(tw <= 320, `clinician: the thread is wider than 320 px (${tw})`);
  await clinician.click('#back');
  await clinician.setViewportSize({ width: 1280, height: 800 });

  // ---- 320 px wide: nothing runs off the side. ----
  await patient.setViewportSize({ width: 320, height: 640 });
  const overflow = await patient.evaluate(() => document.scrollingElement.scrollWidth);
  check(overflow <= 320, `patient: the page is wider than 320 px (${overflow})`);
  await patient.setViewportSize({ width: 390, height: 844 });
  await shots('final');

  // ---- Notifications in this browser: the app registers its service worker and asks the
  // browser's push service for a subscription. Headless Chromium here has no push service (it
  // needs Google's, out of reach), so the subscription itself fails, and the app must say so in
  // plain words; a push delivered to the service worker (CDP) then shows a notification without
  // PHI. (The server side — encryption, VAPID, expiry — is tested against a stand-in push
  // service by notify::web_push_is_encrypted_for_the_browser_and_signed.) ----
  step('patient: notifications in this browser');
  const origin = new URL(cfg.base).origin;
  await patient.context().grantPermissions(['notifications'], { origin });
  await patient.click('#notices');
  await patient.waitForSelector('#notices-dialog[open]');
  check(await patient.isEnabled('#notices-push'), 'patient: "Notifications in this browser" can be turned on');
  check(!(await patient.isChecked('#notices-push')), 'patient: notifications start off in this browser');
  await patient.click('#notices-push');
  await patient.waitForFunction(() => !document.getElementById('notices-push').disabled, null, { timeout: 20000 });
  const subscribed = await patient.isChecked('#notices-push');
  await patient.screenshot({ path: join(cfg.artifacts, 'patient-notifications-dialog.png'), fullPage: false }).catch(() => {});
  await a11y(patient, 'patient notifications dialog (phone)', true);
  if (!subscribed) {
    const why = await patient.textContent('#notices-error');
    check(/could not turn on notifications/.test(why) && !/Error|DOMException|Abort/.test(why), `patient: a failed push subscription is explained in plain words (got "${why}")`);
  }
  const scope = await patient.evaluate(async () => (await navigator.serviceWorker.getRegistration('/app/'))?.scope);
  check(scope === origin + '/app/', `patient: the service worker is registered for /app/ (got ${scope})`);
  // What the service worker does with a push: in a browser profile of its own (Chromium
  // dispatches pushes only outside private contexts), a push delivered by CDP shows one
  // notification, and its link can only open Courier.
  {
    const profile = join(cfg.artifacts, 'push-profile');
    rmSync(profile, { recursive: true, force: true });
    const own = await chromium.launchPersistentContext(profile, { executablePath: process.env.COURIER_CHROMIUM || '/usr/bin/chromium',
      args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update', '--no-first-run', '--disable-sync'] });
    try {
      await own.grantPermissions(['notifications'], { origin });
      const page = own.pages()[0] || await own.newPage();
      await page.goto(origin + '/app/');
      const ocdp = await own.newCDPSession(page);
      const regs = [];
      ocdp.on('ServiceWorker.workerRegistrationUpdated', (e) => regs.push(...e.registrations.filter((r) => !r.isDeleted)));
      await ocdp.send('ServiceWorker.enable');
      await page.evaluate(async () => { await navigator.serviceWorker.register('/app/sw.js', { scope: '/app/' }); await navigator.serviceWorker.ready; });
      for (let i = 0; i < 50 && !regs.some((r) => r.scopeURL === origin + '/app/'); i++) await new Promise((r) => setTimeout(r, 100));
      const swReg = regs.find((r) => r.scopeURL === origin + '/app/');
      check(swReg, 'patient: CDP sees the service worker');
      // Headless Chromium 156 resolves showNotification but keeps no notification to list
      // (getNotifications() is mostly empty), so the test records what the service worker asks
      // the browser to show, and whether the browser accepted it.
      let worker = own.serviceWorkers().find((w) => w.url() === origin + '/app/sw.js');
      for (let i = 0; i < 50 && !worker; i++) {
        await new Promise((r) => setTimeout(r, 100));
        worker = own.serviceWorkers().find((w) => w.url() === origin + '/app/sw.js');
      }
      check(worker, 'patient: the service worker runs');
      await worker.evaluate(() => {
        self.__shown = [];
        const show = self.registration.showNotification.bind(self.registration);
        self.registration.showNotification = (title, o) => {
          const rec = { title, body: o && o.body, url: o && o.data && o.data.url, accepted: null };
          self.__shown.push(rec);
          return show(title, o).then(() => { rec.accepted = true; }, (e) => { rec.accepted = String(e); throw e; });
        };
      });
      const pushed = async (data) => {
        await ocdp.send('ServiceWorker.deliverPushMessage', { origin, registrationId: swReg.registrationId, data });
        for (let i = 0; i < 50; i++) {
          const shown = await worker.evaluate(() => self.__shown);
          if (shown.length && shown.every((n) => n.accepted !== null)) break;
          await new Promise((res) => setTimeout(res, 100));
        }
        return worker.evaluate(() => self.__shown.splice(0));
      };
      const pushShown = await pushed(JSON.stringify({ title: 'Riverside Clinic', body: 'You have a new secure message.', url: 'https://elsewhere.example/phish', tag: 'courier-new-message' }));
      check(pushShown.length === 1 && pushShown[0].title === 'Riverside Clinic' && pushShown[0].body === 'You have a new secure message.', `patient: the push shows one notification (got ${JSON.stringify(pushShown)})`);
      check(pushShown.length === 1 && pushShown[0].accepted === true, `patient: the browser accepts the notification (got ${JSON.stringify(pushShown)})`);
      check(pushShown[0]?.url === origin + '/app/', `patient: a notification opens Courier only, never another site (got ${pushShown[0]?.url})`);
      // A push with nothing usable in it still shows the clinic's plain notice, opening Courier.
      const bare = await pushed('not json');
      check(bare.length === 1 && bare[0].title === 'Courier' && bare[0].body === 'You have a new secure message.' && bare[0].url === origin + '/app/',
        `patient: a push without usable data shows the plain notice and opens Courier (got ${JSON.stringify(bare)})`);
    } finally {
      await own.close();
    }
  }
  await patient.keyboard.press('Escape');
  await patient.waitForSelector('#notices-dialog[open]', { state: 'hidden' });
  // Chromium logs why it refused the subscription (no Push API in a private context); the app
  // has said so in its own words above.
  for (let i = problems.length - 1; i >= 0; i--) if (/does not support the Push API/.test(problems[i])) problems.splice(i, 1);

  // ---- Warned before the idle sign-out (WCAG 2.2.1): a countdown above an open dialog, one
  // press keeps the session and what was typed. ----
  step('patient: warned before the idle sign-out');
  const idleSecs = await patient.evaluate(() => config.idle_timeout_secs);
  await patient.click('#new-thread');
  await patient.waitForSelector('#new-dialog[open]');
  await patient.fill('#new-text', 'Half-written before the warning');
  // As if nobody had touched the page for all but 30 s of the limit.
  await patient.evaluate((s) => { lastActivity = Date.now() - (s * 1000 - 30000); }, idleSecs);
  await patient.waitForSelector('#idle-dialog[open]', { timeout: 5000 });
  const warned = await patient.textContent('#idle-text');
  const n = Number((warned.match(/signed out in (\d+) seconds/) || [])[1]);
  check(n > 20 && n <= 30, `patient: the warning counts down the seconds left (got "${warned}")`);
  check(/^Signing out in \d+ s/.test(await patient.title()), `patient: the tab's title says it too (got "${await patient.title()}")`);
  const idleBox = await patient.locator('#idle-stay').boundingBox();
  check(idleBox && idleBox.y >= 0 && idleBox.y + idleBox.height <= 844, 'patient: "Stay signed in" is in view on a phone');
  check((await patient.evaluate(() => document.activeElement && document.activeElement.closest('#idle-dialog') !== null)), 'patient: the warning takes the focus (keyboard, screen reader)');
  await a11y(patient, 'idle warning (phone)', true);
  // Moving between its buttons (as a keyboard or screen-reader user does) is not an answer.
  await patient.keyboard.press('Tab');
  await patient.waitForTimeout(1500);
  check(await patient.isVisible('#idle-dialog'), 'patient: the warning stays until answered (its own focus, a Tab inside it, are not activity)');
  const refreshes = [];
  patient.on('request', (r) => { if (r.url().endsWith('/smart/session/refresh')) refreshes.push(r.postData() || ''); });
  await patient.click('#idle-stay');
  await patient.waitForSelector('#idle-dialog', { state: 'hidden' });
  check(await patient.isVisible('#new-dialog') && (await patient.inputValue('#new-text')) === 'Half-written before the warning',
    'patient: after "Stay signed in" the half-written conversation is still there');
  for (let i = 0; i < 50 && refreshes.length === 0; i++) await patient.waitForTimeout(100);
  check(refreshes.length >= 1, 'patient: "Stay signed in" tells the server at once (the session is refreshed)');
  check(!refreshes[0].includes('background=1'), `patient: "Stay signed in" is activity to the server, not a background refresh (sent ${refreshes[0]})`);
  check(await patient.evaluate(() => lastActivity <= lastRefresh), 'patient: after "Stay signed in", the next refresh is activity only if the person does something');
  await patient.waitForTimeout(1500);
  check(!(await patient.isVisible('#idle-dialog')) && !(await patient.isVisible('#ended')), 'patient: still signed in after the warning was answered');
  check(!/Signing out/.test(await patient.title()), 'patient: the title is back to normal after the warning');
  await patient.click('#new-cancel');
  await patient.waitForSelector('#new-dialog[open]', { state: 'hidden' });

  // ---- A colleague out of office is said to be away before anyone writes to them. ----
  step('patient: writing to someone who is away');
  const back = new Date(Date.now() + 3 * 86400000).toISOString().slice(0, 10);
  const ooo = await fetch(cfg.base + 'PractitionerRole', {
    method: 'POST',
    headers: { Authorization: 'Bearer ' + cfg.admin_token, 'Content-Type': 'application/fhir+json' },
    body: JSON.stringify({ resourceType: 'PractitionerRole', active: true, practitioner: { reference: cfg.colleague_ref },
      notAvailable: [{ description: 'On leave; the nurse line covers.', during: { start: new Date(Date.now() - 3600000).toISOString(), end: back } }] }),
  });
  check(ooo.status === 201, `admin: the colleague's out-of-office was not set (${ooo.status})`);
  await patient.click('#new-thread');
  await patient.waitForSelector('#new-dialog[open]');
  await patient.waitForFunction((r) => [...document.querySelectorAll('#new-to option')].some((o) => o.value === r), cfg.colleague_ref, { timeout: DELIVERY });
  const option = await patient.evaluate((r) => [...document.querySelectorAll('#new-to option')].find((o) => o.value === r).textContent, cfg.colleague_ref);
  check(option.includes(cfg.colleague_name) && /\(away until /.test(option), `patient: whom to write to says who is away (got "${option}")`);
  await patient.selectOption('#new-to', cfg.colleague_ref);
  const awaySaid = (await patient.textContent('#new-away')) || '';
  check(await patient.isVisible('#new-away') && awaySaid.startsWith(cfg.colleague_name + ' is away until ') && awaySaid.includes('On leave; the nurse line covers.'),
    `patient: choosing someone away says so, with their own message, before sending (got "${awaySaid}")`);
  await patient.keyboard.press('Escape');
  await patient.waitForSelector('#new-dialog[open]', { state: 'hidden' });

  // ---- The clinician sets their own out-of-office in the app, and turns it off. ----
  step('clinician: out of office');
  await clinician.setViewportSize({ width: 1280, height: 800 });
  await clinician.click('#away');
  await clinician.waitForSelector('#away-dialog[open]');
  check((await clinician.inputValue('#away-from')) !== '', 'clinician: "away from" starts filled (now)');
  const delegates = await clinician.evaluate(() => [...document.querySelectorAll('#away-delegate option')].map((o) => [o.value, o.textContent]));
  check(delegates.some(([v, t]) => v === cfg.colleague_ref && t.includes(cfg.colleague_name)),
    `clinician: colleagues are offered by name to cover (got ${JSON.stringify(delegates)})`);
  check(!delegates.some(([, t]) => t.includes(cfg.patient_name)), 'clinician: no patient is offered to cover');
  // Back before leaving: refused in words, nothing saved.
  await clinician.fill('#away-from', '2031-05-10T09:00');
  await clinician.fill('#away-until', '2031-05-09T09:00');
  await clinician.click('#away-save');
  await clinician.waitForSelector('#away-error:not([hidden])');
  check((await clinician.textContent('#away-error')).includes('back before you leave'), 'clinician: dates the wrong way round are said so');
  const inTwoDays = new Date(Date.now() + 2 * 86400000);
  const pad = (n) => String(n).padStart(2, '0');
  const local = (t) => `${t.getFullYear()}-${pad(t.getMonth() + 1)}-${pad(t.getDate())}T${pad(t.getHours())}:${pad(t.getMinutes())}`;
  await clinician.fill('#away-from', local(new Date(Date.now() - 60000)));
  await clinician.fill('#away-until', local(inTwoDays));
  await clinician.fill('#away-reply', 'At a conference; Alan Turing covers.');
  await clinician.selectOption('#away-delegate', cfg.colleague_ref);
  await clinician.click('#away-save');
  await clinician.waitForFunction(() => /Saved/.test(document.getElementById('away-status').textContent), null, { timeout: DELIVERY });
  check(/^Away until /.test((await clinician.textContent('#away')).trim()), `clinician: the header says they are away (got "${await clinician.textContent('#away')}")`);
  const roles = await (await fetch(cfg.base + 'PractitionerRole?practitioner=' + encodeURIComponent(cfg.clinician_ref), { headers: { Authorization: 'Bearer ' + cfg.admin_token } })).json();
  const saved = (roles.entry || []).map((e) => e.resource).find((r) => (r.notAvailable || []).length);
  check(saved && saved.notAvailable[0].description === 'At a conference; Alan Turing covers.' &&
    (saved.extension || []).some((x) => x.valueReference && x.valueReference.reference === cfg.colleague_ref) &&
    Math.abs(new Date(saved.notAvailable[0].during.end) - inTwoDays) < 120000,
    `clinician: the out-of-office is kept as FHIR (PractitionerRole.notAvailable, the delegate) (got ${JSON.stringify(saved)})`);
  await a11y(clinician, 'out-of-office dialog', false);
  await clinician.click('#away-cancel');
  // The patient's page loaded before the clinician went away: opening the conversation, she is
  // told (an outside walk-through: the page said nothing until it was reloaded).
  if (await patient.isVisible('#back')) await patient.click('#back');
  await row(patient, 'Lab results').locator('button').click();
  const toldAway = await patient.waitForFunction((n) => { const a = document.getElementById('compose-away'); return !a.hidden && a.textContent.includes(n + ' is away'); }, cfg.clinician_name, { timeout: 5000 }).then(() => true, () => false);
  check(toldAway, `patient: opening the conversation, she is told her clinician went away after her page loaded (got "${await patient.textContent('#compose-away')}")`);
  // The patient writes meanwhile and is answered automatically in her name: her list still shows
  // the patient's words (not "You: …" her automatic reply), among the threads waiting for her.
  const labId = await clinician.evaluate(() => [...threads.values()].find((t) => t.topic && (t.topic.text || '').startsWith('Lab results')).id);
  const asked = await fetch(cfg.base + 'Communication', {
    method: 'POST',
    headers: { Authorization: 'Bearer ' + cfg.admin_token, 'Content-Type': 'application/fhir+json', Prefer: 'return=representation' },
    body: JSON.stringify({ resourceType: 'Communication', status: 'completed', sent: new Date().toISOString(), partOf: [{ reference: 'Communication/' + labId }],
      subject: { reference: cfg.patient_ref }, sender: { reference: cfg.patient_ref }, recipient: [{ reference: cfg.clinician_ref }],
      category: [{ text: 'question' }], payload: [{ contentString: 'Is the appointment still on?' }] }),
  });
  check(asked.status === 201, `patient: the message to the away clinician was not sent (${asked.status})`);
  await clinician.waitForFunction((id) => { const m = latest.get(id); return m && automaticKind(m) !== null; }, labId, { timeout: DELIVERY });
  const labRow = (await row(clinician, 'Lab results').first().textContent()) || '';
  check(labRow.includes(cfg.patient_name + ': Is the appointment still on?'), `clinician: the list previews the patient's words, not her automatic reply (got "${labRow}")`);
  await clinician.selectOption('#filter-show', 'waiting');
  const waiting = await clinician.waitForFunction(() => [...document.querySelectorAll('#threads li .topic')].some((t) => t.textContent.startsWith('Lab results')), null, { timeout: 5000 }).then(() => true, () => false);
  check(waiting, 'clinician: a thread answered only automatically is still waiting for her reply');
  await clinician.selectOption('#filter-show', 'all');
  // The colleague covering joins the conversation, and the page says why they are in it.
  const covering = await clinician.waitForFunction((a) => { const t = threads.get(a.id); return t && (t.recipient || []).some((r) => r.reference === a.ref && (r.extension || []).some((e) => /covering-for$/.test(e.url))); },
    { id: labId, ref: cfg.colleague_ref }, { timeout: DELIVERY }).then(() => true, () => false);
  check(covering, 'clinician: the colleague covering joins the thread, marked as covering');
  await row(clinician, 'Lab results').first().locator('button').click();
  await clinician.waitForFunction((n) => (document.getElementById('compose-to').textContent || '').includes(n + ' (covering for '), cfg.colleague_name, { timeout: 5000 }).catch(() => {});
  const coverTo = (await clinician.textContent('#compose-to')) || '';
  check(coverTo.includes(cfg.colleague_name + ' (covering for you)'), `clinician: beside the message box, that the colleague covers for her (got "${coverTo}")`);
  await clinician.click('#away');
  await clinician.waitForSelector('#away-dialog[open]');
  await clinician.click('#away-off');
  await clinician.waitForFunction(() => /Turned off/.test(document.getElementById('away-status').textContent), null, { timeout: DELIVERY });
  await clinician.click('#away-cancel');
  check((await clinician.textContent('#away')).trim() === 'Out of office', 'clinician: turned off, the header says so');
  // ... and the patient, opening the conversation again, is no longer told she is away.
  if (await patient.isVisible('#back')) await patient.click('#back');
  await row(patient, 'Lab results').locator('button').click();
  const clearedAway = await patient.waitForFunction(() => document.getElementById('compose-away').hidden, null, { timeout: 5000 }).then(() => true, () => false);
  check(clearedAway, `patient: once her clinician is back, the conversation no longer says she is away (got "${await patient.textContent('#compose-away')}")`);
  if (await patient.isVisible('#back')) await patient.click('#back');


  // ---- Signing out ends the session: nothing of the inbox stays, the token is revoked. ----
  step('patient: signs out');
  const token = await patient.evaluate(() => JSON.parse(sessionStorage.getItem('courier.session')).access_token);
  await row(patient, 'Lab results').locator('button').click();
  // A sign-out the server could not confirm (here: its first answer is 503) is said so on the
  // signed-out screen, and told again until it is.
  await patient.route('**/smart/logout', (r) => r.fulfill({ status: 503, contentType: 'application/json', body: '{"signed_out":false}' }), { times: 1 });
  await patient.click('#logout');
  await patient.waitForSelector('#ended:not([hidden])');
  const pendingSaid = await patient.waitForSelector('#ended-pending:not([hidden])', { timeout: 5000 }).then(() => true, () => false);
  check(pendingSaid, 'patient: a sign-out the server has not confirmed is said so');
  check(!(await patient.isVisible('#main')) && !(await patient.isVisible('#compose')), 'patient: the inbox stays visible after sign-out');
  const left = await phiWhere(patient, [REPLY, 'Lab results', cfg.clinician_name, cfg.patient_name, cfg.colleague_name, 'Nurse line', 'On leave']);
  check(left.length === 0, `patient: PHI left in the page after sign-out: ${left.join('; ')}`);
  const box = await patient.locator('#ended').boundingBox();
  check(box && box.y < 740, 'patient: the signed-out notice is in view');
  check(!(await patient.isVisible('#logout')) && !(await patient.isVisible('#new-thread')), 'patient: nothing actionable without a session');
  await patient.screenshot({ path: join(cfg.artifacts, 'patient-signed-out.png'), fullPage: false }).catch(() => {});
  const confirmed = await patient.waitForSelector('#ended-pending', { state: 'hidden', timeout: 15000 }).then(() => true, () => false);
  check(confirmed, 'patient: the sign-out is told again and the note goes once the server confirms it');
  const again = await patient.getAttribute('#ended-again', 'href');
  const portal = new URL(cfg.patient_url);
  check(await patient.isVisible('#ended-again') && again === portal.pathname + portal.search, `patient: the signed-out screen offers to sign in again through the portal (got ${again})`);
  await a11y(patient, 'patient signed out (phone)', true);
  await patient.reload();
  await patient.waitForSelector('#ended:not([hidden])');
  check(await patient.isVisible('#ended-again'), 'patient: "Sign in again" is still offered after a reload of the signed-out page');
  const placeSaid = await patient.textContent('#ended-why');
  check(!/your EHR/.test(placeSaid) || /patient portal/.test(placeSaid), `patient: the signed-out screen speaks of the portal (got "${placeSaid}")`);
  const after = await patient.evaluate(async (t) => (await fetch('/Communication', { headers: { Authorization: 'Bearer ' + t } })).status, token);
  check(after === 401, `patient: the token is revoked on sign-out (got ${after})`);

  // ---- Revoked elsewhere: the clinician's session ends outside this page (another device, the
  // EHR, an administrator); the page clears itself without any click. ----
  // A window closed without signing out and restored later ("Restore pages", Ctrl+Shift+T)
  // gets its sessionStorage back; the restored page signs the session out, and so the
  // clinician's open page ends too (revoked elsewhere).
  step('clinician: a closed window restored later; session revoked elsewhere');
  const cs = await clinician.evaluate(() => JSON.parse(sessionStorage.getItem('courier.session')));
  const stored = await clinician.evaluate(() => Object.fromEntries(Object.entries(sessionStorage)));
  check(Date.now() - Number(stored['courier.left'] || 0) < 15000, 'clinician: the page records that it is alive');
  const restored = await clinician.context().newPage();
  await restored.addInitScript((s) => {
    if (sessionStorage.getItem('courier.session')) return;
    for (const [k, v] of Object.entries(s)) sessionStorage.setItem(k, v);
    sessionStorage.setItem('courier.left', String(Date.now() - 60000)); // closed a minute ago
  }, stored);
  await restored.goto(cfg.base + 'app/');
  await restored.waitForSelector('#ended:not([hidden])');
  const why = await restored.textContent('#ended-why');
  check(/closed/.test(why), `clinician: a restored window says why it is signed out (got "${why}")`);
  const rleft = await phiWhere(restored, [cfg.patient_name, 'Lab results', cfg.patient_mrn, cfg.colleague_name]);
  check(rleft.length === 0, `clinician: PHI in a restored window: ${rleft.join('; ')}`);
  let revoked = 0;
  for (let i = 0; i < 50 && revoked !== 401; i++) {
    revoked = (await fetch(cfg.base + 'Communication', { headers: { Authorization: 'Bearer ' + cs.access_token } })).status;
    if (revoked !== 401) await new Promise((r) => setTimeout(r, 100));
  }
  check(revoked === 401, `clinician: the restored window's token is revoked (got ${revoked})`);
  await restored.close();
  await clinician.waitForSelector('#ended:not([hidden])', { timeout: 15000 });
  const cleft = await phiWhere(clinician, [cfg.patient_name, 'Lab results', cfg.patient_mrn, cfg.other_patient_name, cfg.colleague_name]);
  check(cleft.length === 0, `clinician: PHI left in the page after the session was revoked elsewhere: ${cleft.join('; ')}`);
  check(!(await clinician.isVisible('#main')) && !(await clinician.isVisible('#patient-banner')), 'clinician: the inbox stays visible after revocation');
  check(!(await clinician.isVisible('#ended-again')), 'clinician: an EHR launch is not offered a portal sign-in');

  check(problems.length === 0, problems.join('\n'));
  console.log(JSON.stringify({ ok: true, steps: steps.length }));
  await browser.close();
} catch (e) {
  await shots('failure');
  console.log(JSON.stringify({ ok: false, step: steps[steps.length - 1], error: String(e && e.message || e), problems }));
  await browser.close();
  process.exit(1);
}
