// Multi-factor sign-in in real Chromium (issue 22 §3), driven by the Rust test
// `browser::a_clinician_signs_in_with_a_passkey_and_a_patient_with_an_authenticator_app` with one
// JSON argument: the launch URLs and where to put screenshots.
//
// - A clinician (EHR launch, desktop) whose EHR shows no second factor enrols a passkey on a
//   Chrome DevTools Protocol virtual authenticator (WebAuthn.addVirtualAuthenticator: CTAP2,
//   internal, resident keys, user verification), saves the recovery codes and lands in the app;
//   the next launch signs in with the passkey; with the authenticator removed (another device
//   with no passkey for Courier) the passkey step fails in plain words and nothing signs in.
// - A patient (portal, phone) enrols an authenticator app: the test reads the key off the page
//   and computes the RFC 6238 codes itself; a wrong code is refused; the next sign-in refuses
//   the code already used and takes the next one.
// - axe-core finds no serious or critical violation on the second-step screens; targets ≥ 44 px.
import { chromium } from 'playwright-core';
import { createHmac } from 'node:crypto';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { axeAudit, smallTargets } from './axe.mjs';

const cfg = JSON.parse(process.argv[2]);
mkdirSync(cfg.artifacts, { recursive: true });

// RFC 6238 TOTP (SHA-1, 6 digits, 30 s) from a base32 key (RFC 4648).
function base32(s) {
  const alphabet = 'ABCDEFGHIJKLMNOPQRSTUVWXYZ234567';
  let bits = '';
  for (const c of s.replace(/[\s=]/g, '').toUpperCase()) {
    const v = alphabet.indexOf(c);
    if (v < 0) throw new Error(`not base32: ${c}`);
    bits += v.toString(2).padStart(5, '0');
  }
  const bytes = [];
  for (let i = 0; i + 8 <= bits.length; i += 8) bytes.push(parseInt(bits.slice(i, i + 8), 2));
  return Buffer.from(bytes);
}
function totp(key, at = Date.now() / 1000) {
  const counter = Buffer.alloc(8);
  counter.writeBigUInt64BE(BigInt(Math.floor(at / 30)));
  const h = createHmac('sha1', base32(key)).update(counter).digest();
  const o = h[h.length - 1] & 0xf;
  const n = ((h[o] & 0x7f) << 24) | (h[o + 1] << 16) | (h[o + 2] << 8) | h[o + 3];
  return String(n % 1_000_000).padStart(6, '0');
}

const browser = await chromium.launch({
  executablePath: process.env.COURIER_CHROMIUM || '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
    '--disable-component-update', '--no-first-run', '--disable-quic', '--disable-sync'],
});
const problems = [];
const steps = [];
const pages = {};
const step = (s) => steps.push(s);
const check = (ok, what) => { if (!ok) throw new Error(what); };

async function open(name, viewport) {
  const context = await browser.newContext({ viewport });
  const page = await context.newPage();
  page.on('pageerror', (e) => problems.push(`${name}: page error: ${e.message}`));
  page.on('dialog', (d) => { problems.push(`${name}: a dialog opened: ${d.message()}`); d.dismiss(); });
  pages[name] = page;
  return page;
}

async function a11y(page, screen, phone = false) {
  const v = await axeAudit(page, screen);
  problems.push(...v);
  if (phone) problems.push(...(await smallTargets(page, screen)));
}

async function shots(tag) {
  for (const [name, page] of Object.entries(pages)) {
    try { await page.screenshot({ path: join(cfg.artifacts, `mfa-${name}-${tag}.png`), fullPage: true }); } catch { /* closed */ }
  }
}

const session = (page) => page.evaluate(() => JSON.parse(sessionStorage.getItem('courier.session') || 'null'));
const claims = (token) => JSON.parse(Buffer.from(token.split('.')[1], 'base64url').toString());

try {
  // ---- The clinician: a passkey. ----
  step('clinician: enrols a passkey');
  const clinician = await open('clinician', { width: 1280, height: 800 });
  const cdp = await clinician.context().newCDPSession(clinician);
  await cdp.send('WebAuthn.enable');
  const { authenticatorId } = await cdp.send('WebAuthn.addVirtualAuthenticator', {
    options: { protocol: 'ctap2', transport: 'internal', hasResidentKey: true, hasUserVerification: true,
      isUserVerified: true, automaticPresenceSimulation: true },
  });
  // The EHR launch's policy is "writes": the clinician reads at once, and confirms it's her
  // before she can write.
  async function readOnlyThenStepUp(url) {
    await clinician.goto(url);
    await clinician.waitForSelector('body[data-ready="true"]', { timeout: 20000 });
    const ro = await session(clinician);
    check(ro.step_up === 'writes' && !claims(ro.access_token).scope.includes('.cruds'), 'clinician: the session reads only before the step-up');
    check(await clinician.isVisible('#step-up'), 'clinician: the step-up notice shows');
    check(!(await clinician.isVisible('#new-thread')), 'clinician: nothing to write with before the step-up');
    await a11y(clinician, 'app: reading only');
    await clinician.click('#step-up-go');
  }
  async function writing() {
    await clinician.waitForSelector('body[data-ready="true"]', { timeout: 20000 });
    const s = await session(clinician);
    const c = claims(s.access_token);
    check(c.amr.includes('mfa') && c.scope.includes('user/Communication.cruds'), `clinician: after the step-up: ${c.amr} / ${c.scope}`);
    check(!(await clinician.isVisible('#step-up')), 'clinician: the step-up notice is gone');
    check(await clinician.isVisible('#new-thread'), 'clinician: may write after the step-up');
    return c;
  }
  await readOnlyThenStepUp(cfg.clinician_urls[0]);
  await clinician.waitForSelector('h1:text("Set up a second step")');
  await a11y(clinician, 'second step: enrolment');
  await shots('enrolment');
  await clinician.click('#enrol-passkey');
  await clinician.waitForSelector('#codes:not([hidden])');
  const codes = await clinician.locator('#code-list li').allTextContents();
  check(codes.length === 10 && codes.every((c) => /^[a-z2-9]{6}(-[a-z2-9]{6}){3}$/.test(c)), `clinician: recovery codes shown: ${codes}`);
  const creds = await cdp.send('WebAuthn.getCredentials', { authenticatorId });
  check(creds.credentials.length === 1 && creds.credentials[0].rpId === 'localhost', 'clinician: one passkey for localhost on the authenticator');
  await a11y(clinician, 'second step: recovery codes');
  await clinician.click('#codes-saved');
  let c = await writing();
  check(c.amr.includes('pop'), `clinician: the token's amr after a passkey: ${c.amr}`);

  step('clinician: signs in with the passkey');
  await readOnlyThenStepUp(cfg.clinician_urls[1]);
  await clinician.waitForSelector('h1:text("Confirm it\'s you")');
  check(await clinician.isVisible('#verify-passkey'), 'clinician: the passkey button is offered');
  check(!(await clinician.isVisible('#enrol')), 'clinician: enrolment is not offered again');
  await a11y(clinician, 'second step: verify');
  await clinician.click('#verify-passkey');
  await writing();
  const signCount = (await cdp.send('WebAuthn.getCredentials', { authenticatorId })).credentials[0].signCount;
  check(signCount >= 1, `clinician: the passkey signed (${signCount})`);

  step('clinician: a device without the passkey');
  await cdp.send('WebAuthn.removeVirtualAuthenticator', { authenticatorId });
  await cdp.send('WebAuthn.addVirtualAuthenticator', {
    options: { protocol: 'ctap2', transport: 'internal', hasResidentKey: true, hasUserVerification: true,
      isUserVerified: true, automaticPresenceSimulation: true },
  });
  await readOnlyThenStepUp(cfg.clinician_urls[2]);
  await clinician.waitForSelector('h1:text("Confirm it\'s you")');
  await clinician.click('#verify-passkey');
  await clinician.waitForSelector('#error:text("No passkey answered")', { timeout: 60000 });
  check((await session(clinician)).step_up === 'writes', 'clinician: may write without the passkey');
  // A recovery code still works (the phone is lost).
  await clinician.click('#recovery summary');
  await clinician.fill('#recovery-code', codes[0]);
  await clinician.click('#recovery-form button');
  await writing();
  let s;

  // ---- The patient: an authenticator app, on a phone. ----
  step('patient: enrols an authenticator app');
  const patient = await open('patient', { width: 390, height: 844 });
  await patient.goto(cfg.patient_url);
  await patient.waitForSelector('h1:text("Set up a second step")');
  await a11y(patient, 'second step: enrolment (phone)', true);
  await patient.click('#enrol-totp');
  await patient.waitForSelector('#totp-setup:not([hidden])');
  const key = (await patient.textContent('#totp-secret')).replace(/\s/g, '');
  check(key.length >= 32, `patient: the key is shown (${key})`);
  check((await patient.getAttribute('#totp-qr', 'src')).startsWith('data:image/svg+xml'), 'patient: a QR code is shown');
  await a11y(patient, 'second step: authenticator app set-up (phone)', true);
  await shots('totp-setup');
  const wrong = totp(key) === '000000' ? '111111' : '000000';
  await patient.fill('#totp-enrol-code', wrong);
  await patient.click('#totp-enrol-form button');
  await patient.waitForSelector('#error:text("That code does not match")');
  const first = totp(key);
  await patient.fill('#totp-enrol-code', first);
  await patient.click('#totp-enrol-form button');
  await patient.waitForSelector('#codes:not([hidden])');
  await patient.click('#codes-saved');
  await patient.waitForSelector('body[data-ready="true"]', { timeout: 20000 });
  s = await session(patient);
  c = claims(s.access_token);
  check(c.amr.includes('otp') && c.amr.includes('mfa'), `patient: the token's amr after TOTP: ${c.amr}`);
  check(c.fhirUser.startsWith('Patient/'), 'patient: signed in as the patient');

  step('patient: a used code is refused, the next one passes');
  const before = await session(patient);
  await patient.goto(cfg.patient_url);
  await patient.waitForSelector('h1:text("Confirm it\'s you")');
  // A new sign-in in this tab signs out whoever was signed in before: Back cannot show their
  // inbox, and their session is over.
  check(await session(patient) === null, 'patient: the earlier session is still in the tab');
  let ended = 0;
  for (let i = 0; i < 20 && ended !== 401; i++) {
    ended = await patient.evaluate(async (h) => (await fetch('/smart/session/refresh', { method: 'POST', body: new URLSearchParams({ session: h }) })).status, before.session);
    if (ended !== 401) await patient.waitForTimeout(100);
  }
  check(ended === 401, `patient: the earlier session still refreshes (${ended})`);
  // Reading the code off the phone may reload the tab: the step is still there.
  await patient.reload();
  await patient.waitForSelector('h1:text("Confirm it\'s you")');
  check(!(await patient.url()).includes('/smart/callback'), 'patient: the callback URL stayed in the tab');
  check(await patient.isVisible('#totp-form'), 'patient: the code form is offered');
  check(!(await patient.isVisible('#verify-passkey')), 'patient: no passkey is offered to someone without one');
  await patient.fill('#totp-code', first);
  await patient.click('#totp-form button');
  await patient.waitForSelector('#error:text("used already")');
  check(await session(patient) === null, 'patient: a replayed code signed in');
  await patient.fill('#totp-code', totp(key, Date.now() / 1000 + 30));
  await patient.click('#totp-form button');
  await patient.waitForSelector('body[data-ready="true"]', { timeout: 20000 });

  step('patient: notification settings');
  await patient.click('#notices');
  await patient.waitForSelector('#notices-dialog[open]');
  check((await patient.textContent('#notices-email-label')).includes('a***@example.org'), 'patient: her email, masked, is offered');
  check(await patient.isDisabled('#notices-sms'), 'patient: no mobile number: text messages cannot be turned on');
  await a11y(patient, 'app: notification settings (phone)', true);
  // Another address: this clinic sends no email here, and says so in words.
  await patient.click('#notices-change summary');
  await patient.selectOption('#notices-kind', 'email');
  await patient.fill('#notices-value', 'ada.new@example.org');
  await patient.click('#notices-send-code');
  await patient.waitForSelector('#notices-error:text("does not send notices by email")');
  await a11y(patient, 'app: changing the address (phone)', true);
  await patient.uncheck('#notices-email');
  await patient.check('#notices-quiet');
  await patient.fill('#notices-from', '21:30');
  await patient.fill('#notices-to', '06:45');
  await patient.click('#notices-save');
  await patient.waitForSelector('#notices-dialog:not([open])', { state: 'attached' });
  const saved = await patient.evaluate(async () => {
    const s = JSON.parse(sessionStorage.getItem('courier.session'));
    return (await fetch('/notify/preferences', { headers: { Authorization: 'Bearer ' + s.access_token } })).json();
  });
  check(saved.email.on === false && saved.quiet && saved.quiet.from === '21:30' && saved.quiet.to === '06:45' && saved.quiet.time_zone, `patient: settings saved: ${JSON.stringify(saved)}`);
  await shots('final');

  check(problems.length === 0, problems.join('\n'));
  console.log(JSON.stringify({ ok: true, steps: steps.length }));
  await browser.close();
} catch (e) {
  await shots('failure');
  console.log(JSON.stringify({ ok: false, step: steps[steps.length - 1], error: String(e && e.message || e), problems }));
  await browser.close();
  process.exit(1);
}
