// Accessibility checks for Courier's web app in a playwright-core page.
//
//   import { axeAudit, smallTargets } from './axe.mjs';
//   problems.push(...await axeAudit(page, 'clinician inbox'), ...await smallTargets(page, 'clinician inbox'));
//
// `axeAudit` runs axe-core (WCAG 2.0/2.1 A and AA rules plus axe's best practices) on the page as
// it is now and returns one line per serious or critical violation; `smallTargets` returns one line
// per visible interactive element smaller than a touch target (44 × 44 CSS px by default, WCAG
// 2.5.5). Both return [] when all is well, so a test can collect them with its other problems.
// Self-check: `node axe-selftest.mjs`.
import { createRequire } from 'node:module';
import { readFileSync } from 'node:fs';

const AXE_PATH = createRequire(import.meta.url).resolve('axe-core/axe.min.js');
let axeSource = null;

const TAGS = ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa', 'best-practice'];

// Puts axe-core into the page (once per document). Not with page.addScriptTag: its <script> is
// inline, which a page under a Content-Security-Policy like Courier's `/app/` (`script-src 'self'`)
// refuses, with a console error a test would count as a problem (and which cannot be predicted
// from inside the page: the policy is a response header). The same file evaluated through the
// DevTools protocol (page.evaluate) defines the same global `axe`, and no page policy applies
// to it.
async function injectAxe(page) {
  if (await page.evaluate(() => typeof window.axe === 'object')) return;
  axeSource ??= readFileSync(AXE_PATH, 'utf8');
  await page.evaluate(axeSource);
  if (!(await page.evaluate(() => typeof window.axe === 'object'))) throw new Error(`axe-core (${AXE_PATH}) did not load into the page`);
}

/** Serious and critical axe-core violations on the page now, one readable line each. */
export async function axeAudit(page, screen) {
  await injectAxe(page);
  const violations = await page.evaluate(async (values) => {
    const r = await window.axe.run(document, { runOnly: { type: 'tag', values } });
    return r.violations.map((v) => ({ id: v.id, impact: v.impact, help: v.help, targets: v.nodes.map((n) => n.target) }));
  }, TAGS);
  return violations
    .filter((v) => v.impact === 'serious' || v.impact === 'critical')
    .map((v) => {
      const first = v.targets.slice(0, 3).map((t) => (Array.isArray(t) ? t.join(' >>> ') : String(t)));
      const more = v.targets.length > 3 ? ` (+${v.targets.length - 3} more)` : '';
      return `${screen}: axe ${v.id} (${v.impact}): ${v.help} — ${first.join(', ')}${more}`;
    });
}

// Text fields under 16px on the phone screen `screen`: Safari on a phone zooms the page into one
// on focus (the person then pans and zooms back out while typing).
export async function smallFields(page, screen, min = 16) {
  const small = await page.evaluate((min) => {
    const out = [];
    for (const e of document.querySelectorAll('input:not([type=hidden]):not([type=checkbox]):not([type=radio]):not([type=file]):not([type=button]):not([type=submit]), select, textarea')) {
      const box = e.getBoundingClientRect();
      if (box.width <= 1 || box.height <= 1) continue;
      const size = parseFloat(getComputedStyle(e).fontSize);
      if (size < min) out.push(`${e.tagName.toLowerCase()}${e.id ? '#' + e.id : ''} ${size}px`);
    }
    return out;
  }, min);
  return small.map((s) => `${screen}: a field under ${min}px (a phone zooms in on it): ${s}`);
}

// Text under `min` px on the phone screen `screen` (times, receipts, hints read at arm's length):
// each visible element with text of its own, once per distinct element and size.
export async function smallText(page, screen, min = 14) {
  const small = await page.evaluate((min) => {
    const out = [];
    for (const e of document.body.querySelectorAll('*')) {
      if (!Array.from(e.childNodes).some((n) => n.nodeType === 3 && n.textContent.trim())) continue;
      const box = e.getBoundingClientRect();
      if (box.width <= 1 || box.height <= 1 || box.right <= 0 || box.bottom <= 0) continue;
      const style = getComputedStyle(e);
      if (style.visibility === 'hidden') continue;
      const size = parseFloat(style.fontSize);
      if (size < min) out.push(`${e.tagName.toLowerCase()}${e.id ? '#' + e.id : ''}${e.classList.length ? '.' + Array.from(e.classList).join('.') : ''} ${size}px`);
    }
    return [...new Set(out)];
  }, min);
  return small.map((s) => `${screen}: text under ${min}px: ${s}`);
}

/**
 * Visible interactive elements smaller than `min` CSS px in width or height, one line each.
 * Hidden elements are skipped (no box, `visibility: hidden`, a 1 × 1 px "visually hidden" box, or
 * a box moved off the page to the left or top, like a skip link until focused); a checkbox or
 * radio button is measured by the label that encloses it, when one does (the label is what is
 * tapped).
 */
export async function smallTargets(page, screen, min = 44) {
  const small = await page.evaluate((min) => {
    const selector = 'button, a[href], input:not([type=hidden]), select, textarea, [role=button], [tabindex="0"]';
    const seen = new Set();
    const out = [];
    const describe = (e) => {
      let d = e.tagName.toLowerCase();
      if (e.id) d += '#' + e.id;
      else if (e.classList.length) d += '.' + [...e.classList].join('.');
      if (e.getAttribute('type') && e.tagName === 'INPUT') d += `[type=${e.getAttribute('type')}]`;
      const name = (e.getAttribute('aria-label') || e.textContent || e.getAttribute('name') || '').trim().replace(/\s+/g, ' ');
      return name ? `${d} "${name.slice(0, 40)}"` : d;
    };
    for (const e of document.querySelectorAll(selector)) {
      let target = e;
      if (e.matches('input[type=checkbox], input[type=radio]')) target = e.closest('label') || e;
      if (seen.has(target)) continue;
      seen.add(target);
      const box = target.getBoundingClientRect();
      if (box.width === 0 || box.height === 0) continue;
      // Visually hidden on purpose: a 1 px "sr-only" box, or one moved off the page (a skip link
      // until it has focus) — nobody can tap those.
      if (box.width <= 1 && box.height <= 1) continue;
      if (box.right + scrollX <= 0 || box.bottom + scrollY <= 0) continue;
      const style = getComputedStyle(target);
      if (style.visibility === 'hidden' || style.visibility === 'collapse') continue;
      if (box.width < min || box.height < min) {
        out.push({ what: describe(target) + (target !== e ? ` (label of ${describe(e)})` : ''), w: Math.round(box.width * 10) / 10, h: Math.round(box.height * 10) / 10 });
      }
    }
    return out;
  }, min);
  return small.map((s) => `${screen}: small target ${s.what}: ${s.w} × ${s.h} px (under ${min} × ${min})`);
}
