// Browser test of Courier's web app in real Chromium (Debian's, driven by playwright-core).
// Called by the Rust test `browser::clinician_and_patient_message_each_other_in_real_browsers`
// with one JSON argument: {clinician_url, patient_url, patient_name, clinician_name, artifacts}.
//
// Two browsers (separate contexts): a patient signs in through the portal (standalone launch, at
// phone width), a clinician through an EHR launch with the patient in context. The clinician starts
// a conversation whose text and subject carry XSS payloads; it appears in the patient's list without
// a reload; the patient opens it (a read receipt goes back to the clinician's screen, live) and
// replies with an attachment whose file name is an XSS payload, which appears on the clinician's
// screen live. Nothing of the payloads may run or become markup. The clinician then starts a
// staff-only conversation about the patient (refused with the patient in it; a banner; the composer
// does not carry over to the next thread) that never reaches the patient's screen; after the
// patient signs out nothing of the inbox remains in the page. Screenshots of both pages are
// saved in `artifacts` at the end (and on failure).
import { chromium } from 'playwright-core';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';

const cfg = JSON.parse(process.argv[2]);
mkdirSync(cfg.artifacts, { recursive: true });

const XSS_TEXT = 'Results are fine <img src=x onerror="window.__xss=1"><script>window.__xss=2</script>';
const XSS_TOPIC = 'Lab results <b onmouseover="window.__xss=3">bold</b>';
const XSS_FILE = '<img src=x onerror=window.__xss=4>.txt';
const REPLY = 'Thank you, doctor & team!';
const STAFF_TOPIC = 'Pharmacy fill history';
const URGENT_NEWS = 'BP 165/100 and headache';
const STAFF_TEXT = 'I suspect she is not taking her meds, can you check?';

const browser = await chromium.launch({
  executablePath: process.env.COURIER_CHROMIUM || '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
    '--disable-component-update', '--no-first-run', '--disable-quic', '--disable-sync'],
});
const problems = [];
const pages = {};

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
    await page.screenshot({ path: join(cfg.artifacts, `${name}-${suffix}.png`), fullPage: true }).catch(() => {});
  }
}

function check(cond, what) {
  if (!cond) throw new Error(what);
}

async function noScriptRan(page, name) {
  const xss = await page.evaluate(() => window.__xss);
  check(xss === undefined, `${name}: an XSS payload ran (window.__xss = ${xss})`);
  const injected = await page.evaluate(() => document.querySelectorAll('#messages img, #messages script, #messages b, #threads b, #thread-title b').length);
  check(injected === 0, `${name}: user content became markup (${injected} elements)`);
}

try {
  // The patient signs in first and sees an empty inbox.
  const patient = await open('patient', { width: 375, height: 740 });
  await patient.goto(cfg.patient_url);
  await patient.waitForSelector('body[data-ready="true"]', { timeout: 20000 });
  await patient.waitForSelector('#threads-empty:not([hidden])');
  check(!(await patient.isVisible('#priority-field')), 'patient: no priority choice for patients');

  // The clinician launches from the EHR with the patient in context: banner with the name.
  const clinician = await open('clinician', { width: 1280, height: 800 });
  await clinician.goto(cfg.clinician_url);
  await clinician.waitForSelector('body[data-ready="true"]', { timeout: 20000 });
  const banner = await clinician.textContent('#patient-banner');
  check(banner.includes(cfg.patient_name), `clinician: the patient banner names the patient (got "${banner}")`);
  check((await clinician.textContent('#me')).includes(cfg.clinician_name), 'clinician: signed-in name shown');
  // The EHR's style applies (smart_style_url): its highlight colour on the buttons.
  await clinician.waitForFunction(() => getComputedStyle(document.querySelector('#new-thread')).backgroundColor === 'rgb(122, 46, 140)', null, { timeout: 5000 });
  await clinician.waitForSelector('#connection:text-is("Connected")');
  await patient.waitForSelector('#connection:text-is("Connected")');

  // The clinician starts a conversation (keyboard only: labelled fields, Enter on the button).
  await clinician.click('#new-thread');
  check(await clinician.inputValue('#new-recipient') !== '', 'clinician: the patient in context is the default recipient');
  await clinician.getByLabel('Subject').fill(XSS_TOPIC);
  await clinician.fill('#new-text', XSS_TEXT);
  await clinician.focus('#new-send');
  await clinician.keyboard.press('Enter');
  await clinician.waitForSelector('#messages li .text');
  check((await clinician.textContent('#thread-title')) === XSS_TOPIC, 'clinician: the subject shows literally');

  // It appears in the patient's list without a reload, marked unread; the patient opens it.
  const item = patient.locator('#threads li', { hasText: 'Lab results' });
  await item.waitFor({ timeout: 10000 });
  await patient.waitForSelector('#threads li .badge');
  await item.focus();
  await patient.keyboard.press('Enter');
  await patient.waitForSelector('#messages li .text');
  const shown = await patient.locator('#messages li .text').first().textContent();
  check(shown === XSS_TEXT, `patient: the message text shows literally (got "${shown}")`);
  await noScriptRan(patient, 'patient');
  const from = await patient.locator('#messages li .from').first().textContent();
  check(from === cfg.clinician_name, `patient: the sender is shown by name (got "${from}")`);
  check(await patient.isVisible('#response-notice'), 'patient: the expected-response notice is shown where they write');
  // The emergency number sits above the message box, in view when the thread opens.
  const emergency = patient.locator('#compose .emergency');
  check(await emergency.isVisible() && (await emergency.textContent()).includes('call 911'), 'patient: the emergency notice with its number is shown where they write');
  check(!(await clinician.isVisible('#compose .emergency')), 'clinician: no patient emergency notice');

  // The read receipt reaches the clinician's screen live.
  await clinician.waitForSelector(`.status:text("Read by ${cfg.patient_name}")`, { timeout: 10000 });

  // The patient replies with an attachment whose name is a payload.
  await patient.getByLabel('Message', { exact: true }).first().fill(REPLY);
  await patient.setInputFiles('#compose-file', { name: XSS_FILE, mimeType: 'text/plain', buffer: Buffer.from('a note') });
  await patient.click('#send');
  await patient.waitForSelector(`#messages li .text:text("${REPLY}")`);

  // The reply and its attachment appear on the clinician's screen live, names inert.
  await clinician.waitForSelector(`#messages li .text:text("${REPLY}")`, { timeout: 10000 });
  const file = await clinician.locator('#messages .attachment').first().textContent();
  check(file.includes(XSS_FILE), `clinician: the file name shows literally (got "${file}")`);
  await noScriptRan(clinician, 'clinician');

  // An attachment pointing elsewhere is shown, never fetched (the token must not leave Courier).
  const status = await patient.evaluate(async () => {
    const s = JSON.parse(sessionStorage.getItem('courier.session'));
    const h = { Authorization: 'Bearer ' + s.access_token, 'Content-Type': 'application/fhir+json' };
    const list = await (await fetch('/Communication?part-of:missing=true', { headers: h })).json();
    const header = list.entry.find((e) => e.search.mode === 'match').resource;
    const msg = { resourceType: 'Communication', status: 'completed', partOf: [{ reference: 'Communication/' + header.id }],
      sender: { reference: s.fhirUser }, recipient: [header.sender],
      payload: [{ contentAttachment: { contentType: 'application/pdf', url: '//attacker.example/steal', title: 'labs.pdf' } }] };
    return (await fetch('/Communication', { method: 'POST', headers: h, body: JSON.stringify(msg) })).status;
  });
  check(status === 201, `patient: posting the message failed (${status})`);
  await clinician.waitForSelector('#messages span.attachment:text("labs.pdf")', { timeout: 10000 });
  check(await clinician.locator('#messages button.attachment', { hasText: 'labs.pdf' }).count() === 0, 'clinician: a foreign attachment URL is not clickable');

  // Staff only: the clinician talks to a colleague about the patient. The dialog offers the
  // choice, refuses to put the patient in such a thread, and the thread carries a banner.
  const patientRef = await clinician.evaluate(() => JSON.parse(sessionStorage.getItem('courier.session')).patient);
  await clinician.click('#new-thread');
  check(await clinician.isVisible('#audience'), 'clinician: chooses who a new conversation is with');
  await clinician.check('#audience-staff');
  check(await clinician.inputValue('#new-recipient') === '', 'clinician: staff only takes the patient out of "To"');
  await clinician.fill('#new-recipient', patientRef);
  await clinician.getByLabel('Subject').fill(STAFF_TOPIC);
  await clinician.fill('#new-text', STAFF_TEXT);
  await clinician.click('#new-send');
  await clinician.waitForSelector('#new-error:not([hidden])');
  check((await clinician.textContent('#new-error')).includes('cannot include the patient'), 'clinician: the refusal is explained in the dialog');
  await clinician.fill('#new-recipient', 'Practitioner/dr-b');
  await clinician.click('#new-send');
  await clinician.waitForSelector('#staff-banner:not([hidden])', { timeout: 10000 });
  await clinician.waitForSelector('#threads li .badge.staff');
  // The composer belongs to its thread: text and priority do not follow to the next one.
  await clinician.fill('#compose-text', 'half-written note for the pharmacist');
  await clinician.selectOption('#compose-priority', 'urgent');
  await clinician.locator('#threads li', { hasText: 'Lab results' }).click();
  await clinician.waitForSelector('#staff-banner', { state: 'hidden' });
  check(await clinician.inputValue('#compose-text') === '', 'clinician: typed text does not leak into another thread');
  check(await clinician.inputValue('#compose-priority') === 'routine', 'clinician: priority resets per thread');
  // The patient never sees it (give the live channel time to deliver anything it would).
  await patient.waitForTimeout(1500);
  const patientText = await patient.evaluate(() => document.body.textContent);
  check(!patientText.includes(STAFF_TOPIC) && !patientText.includes(STAFF_TEXT), 'patient: a staff-only conversation reached the portal');

  // New activity moves a thread up: the patient writes in the older thread, and it comes first
  // in the clinician's list (above the newer staff-only one).
  check((await clinician.locator('#threads li .topic').first().textContent()) === STAFF_TOPIC, 'clinician: the newest thread is first');
  await patient.getByLabel('Message', { exact: true }).first().fill(URGENT_NEWS);
  await patient.click('#send');
  await patient.waitForSelector(`#messages li .text:text("${URGENT_NEWS}")`);
  await clinician.waitForFunction((t) => document.querySelector('#threads li .topic').textContent.startsWith(t), 'Lab results', { timeout: 10000 });

  // Offline: the connection state says so.
  await patient.context().setOffline(true);
  await patient.evaluate(() => window.dispatchEvent(new Event('offline')));
  await patient.waitForSelector('#connection.offline');
  await patient.context().setOffline(false);

  // Signing out ends the session: the app says so, and the token no longer works.
  const token = await patient.evaluate(() => JSON.parse(sessionStorage.getItem('courier.session')).access_token);
  await patient.click('#logout');
  await patient.waitForSelector('#ended:not([hidden])');
  // Nothing of the inbox stays on screen, in the page or actionable; the notice is in view.
  check(!(await patient.isVisible('#main')) && !(await patient.isVisible('#compose')), 'patient: the inbox stays visible after sign-out');
  const left = await patient.evaluate(() => document.body.textContent);
  check(!left.includes(REPLY) && !left.includes('Lab results') && !left.includes(cfg.clinician_name), 'patient: PHI left in the page after sign-out');
  const box = await patient.locator('#ended').boundingBox();
  check(box && box.y < 740, 'patient: the signed-out notice is in view');
  check(!(await patient.isVisible('#logout')), 'patient: nothing actionable without a session');
  const after = await patient.evaluate(async (t) => (await fetch('/Communication', { headers: { Authorization: 'Bearer ' + t } })).status, token);
  check(after === 401, `patient: the token is revoked on sign-out (got ${after})`);

  check(problems.length === 0, problems.join('\n'));
  await shots('final');
  console.log(JSON.stringify({ ok: true }));
  await browser.close();
} catch (e) {
  await shots('failure');
  console.log(JSON.stringify({ ok: false, error: String(e && e.message || e), problems }));
  await browser.close();
  process.exit(1);
}
