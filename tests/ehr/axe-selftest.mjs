// Self-check of axe.mjs in Debian's Chromium (or COURIER_CHROMIUM): a page with known serious and
// critical violations and small targets must give problems, a clean one none, and axe-core must
// load into a page whose Content-Security-Policy refuses inline scripts (as Courier's `/app/`
// does). Prints one JSON line: {"ok":true} (exit 0), or {"ok":false,"problems":[...]} (exit 1).
//
//   cd tests/ehr && node axe-selftest.mjs
import { chromium } from 'playwright-core';
import { axeAudit, smallFields, smallTargets, smallText } from './axe.mjs';

const CSP = `<meta http-equiv="Content-Security-Policy" content="default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; img-src data:">`;
const PIXEL = 'data:image/gif;base64,R0lGODlhAQABAIAAAP///wAAACH5BAEAAAAALAAAAAABAAEAAAICRAEAOw==';

// image-alt (critical), button-name (critical), color-contrast (serious), label (critical);
// a 20 × 20 button, an unlabelled checkbox.
const BAD = `<!doctype html><html lang="en"><head>${CSP}<title>Bad</title></head><body><main><h1>Bad</h1>
<img src="${PIXEL}" width="50" height="50">
<button style="width:20px;height:20px"></button>
<p style="color:#bbb;background:#fff">Hard to read</p>
<input type="text">
<input type="checkbox" id="c">
<input type="text" id="tiny" aria-label="Tiny" style="font-size:13px">
<p id="fine-print" style="font-size:12px">Read at arm's length</p>
</main></body></html>`;

// The same kinds of content, done right; a hidden button (no box) and a skip link parked off the
// page are not targets.
const CLEAN = `<!doctype html><html lang="en"><head>${CSP}<title>Clean</title></head><body><main><h1>Clean</h1>
<img src="${PIXEL}" width="50" height="50" alt="Logo">
<button style="min-width:48px;min-height:48px;font-size:16px">Go</button>
<p style="color:#222;background:#fff">Easy to read</p>
<label style="display:inline-block;min-height:44px;min-width:44px;padding:12px">Name <input type="text" style="min-height:44px;font-size:16px"></label>
<label style="display:inline-block;min-height:44px;min-width:44px;padding:12px"><input type="checkbox"> Remember</label>
<button hidden>Hidden</button>
<a href="#main" style="position:absolute;left:-9999px">Skip to the content</a>
</main></body></html>`;

const problems = [];
const check = (cond, what) => { if (!cond) problems.push(what); };

const browser = await chromium.launch({
  executablePath: process.env.COURIER_CHROMIUM || '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
    '--disable-component-update', '--no-first-run', '--disable-quic', '--disable-sync'],
});
try {
  const page = await browser.newPage({ viewport: { width: 800, height: 600 } });
  const consoleErrors = [];
  page.on('console', (m) => { if (m.type() === 'error') consoleErrors.push(m.text()); });

  await page.setContent(BAD);
  const bad = await axeAudit(page, 'bad');
  for (const id of ['image-alt', 'button-name', 'color-contrast', 'label']) {
    check(bad.some((p) => p.startsWith(`bad: axe ${id} (`)), `bad page: axe reports ${id} (got ${JSON.stringify(bad)})`);
  }
  check(bad.every((p) => / \((serious|critical)\): /.test(p)), `bad page: only serious or critical violations (got ${JSON.stringify(bad)})`);
  const badSmall = await smallTargets(page, 'bad');
  check(badSmall.some((p) => p.includes('20 × 20 px')), `bad page: the 20 × 20 button is small (got ${JSON.stringify(badSmall)})`);
  check(badSmall.some((p) => p.includes('input#c[type=checkbox]')), `bad page: the unlabelled checkbox is small (got ${JSON.stringify(badSmall)})`);
  const badFields = await smallFields(page, 'bad');
  check(badFields.some((p) => p.includes('input#tiny 13px')), `bad page: the 13px field is small (got ${JSON.stringify(badFields)})`);

  const badText = await smallText(page, 'bad');
  check(badText.some((p) => p.includes('p#fine-print 12px')), `bad page: the 12px text is small (got ${JSON.stringify(badText)})`);

  await page.setContent(CLEAN);
  const clean = await axeAudit(page, 'clean');
  check(clean.length === 0, `clean page: no serious or critical violations (got ${JSON.stringify(clean)})`);
  const cleanSmall = await smallTargets(page, 'clean');
  check(cleanSmall.length === 0, `clean page: no small targets (got ${JSON.stringify(cleanSmall)})`);
  const cleanFields = await smallFields(page, 'clean');
  check(cleanFields.length === 0, `clean page: no small fields (got ${JSON.stringify(cleanFields)})`);

  const cleanText = await smallText(page, 'clean');
  check(cleanText.length === 0, `clean page: no small text (got ${JSON.stringify(cleanText)})`);

  // Loading axe under `script-src 'self'` made no CSP violation (nothing for a test to trip on).
  check(consoleErrors.length === 0, `no console errors (got ${JSON.stringify(consoleErrors)})`);
} catch (e) {
  problems.push(`threw: ${e.stack || e}`);
} finally {
  await browser.close();
}
console.log(JSON.stringify(problems.length ? { ok: false, problems } : { ok: true }));
process.exit(problems.length ? 1 : 0);
