// Courier's second step after signing in through an EHR or portal (server: src/mfa).
// Passkeys (WebAuthn) first, an authenticator app (TOTP) as the fallback, recovery codes when
// both are lost. The sign-in waiting on this step is named by a single-use ticket the callback
// put in this tab's sessionStorage; this page asks the server what to show for it, so a reload
// or Back keeps the step. Once a factor passes, the hidden form posts the ticket and the server
// starts the session.
(async () => {
  'use strict';
  let main = document.getElementById('mfa');
  if (!main) return;
  const held = sessionStorage.getItem('courier.mfa');
  const gone = (text) => {
    main.textContent = '';
    const h = document.createElement('h1');
    h.textContent = 'Sign-in expired';
    const p = document.createElement('p');
    p.setAttribute('role', 'alert');
    p.textContent = text;
    main.append(h, p);
  };
  if (!held) {
    gone('This sign-in has expired or is finished. Start again from your EHR or portal.');
    return;
  }
  let view;
  try {
    const r = await fetch('/smart/mfa/view', {
      method: 'POST', headers: { 'content-type': 'application/json' }, credentials: 'omit',
      body: JSON.stringify({ ticket: held }),
    });
    view = await r.json();
    if (!r.ok) {
      if (view.error === 'expired') sessionStorage.removeItem('courier.mfa');
      gone(view.message || 'This sign-in has expired. Start again from your EHR or portal.');
      return;
    }
  } catch {
    gone('Courier cannot be reached. Check your connection, then reload this page.');
    return;
  }
  const doc = new DOMParser().parseFromString(view.html, 'text/html');
  document.title = doc.title;
  const fresh = document.importNode(doc.getElementById('mfa'), true);
  main.replaceWith(fresh);
  main = fresh;
  const ticket = main.dataset.ticket;
  const stepUp = main.dataset.stepUp === 'true';
  const framed = window.top !== window.self;
  const $ = (id) => document.getElementById(id);
  const error = $('error');
  const status = $('status');

  // A new sign-in in this tab: whoever was signed in here before is signed out now, so that
  // Back cannot show their inbox under this person's second step. (A step-up keeps its session.)
  if (!stepUp) {
    try {
      const old = JSON.parse(sessionStorage.getItem('courier.session') || 'null');
      sessionStorage.removeItem('courier.session');
      if (old && old.session) navigator.sendBeacon('/smart/logout', new URLSearchParams({ session: old.session }));
    } catch { /* nothing stored */ }
  }
  // Inside the EHR's window a passkey cannot be set up (browsers mark it cross-origin, and it
  // would not be accepted): enrolment offers the authenticator app there.
  if (framed && $('enrol-passkey')) {
    $('enrol-passkey').hidden = true;
    for (const p of document.querySelectorAll('#enrol .hint')) p.hidden = true;
    const note = document.createElement('p');
    note.className = 'hint';
    note.textContent = 'To set up a passkey instead, open Courier in its own window.';
    $('enrol-totp').after(note);
  }

  const toBuf = (s) => {
    const b64 = s.replace(/-/g, '+').replace(/_/g, '/').padEnd(Math.ceil(s.length / 4) * 4, '=');
    return Uint8Array.from(atob(b64), (c) => c.charCodeAt(0)).buffer;
  };
  const fromBuf = (buf) => {
    let s = '';
    for (const x of new Uint8Array(buf)) s += String.fromCharCode(x);
    return btoa(s).replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
  };

  let focusAfter = null;
  const say = (msg) => {
    error.textContent = msg || '';
    for (const i of main.querySelectorAll('input[name=code]')) {
      if (msg) i.setAttribute('aria-invalid', 'true'); else i.removeAttribute('aria-invalid');
    }
  };

  async function post(path, body) {
    let r;
    try {
      r = await fetch(`/smart/mfa/${path}`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        credentials: 'omit',
        body: JSON.stringify({ ticket, ...body }),
      });
    } catch {
      throw new Error('Courier cannot be reached. Check your connection and try again.');
    }
    let data = {};
    try { data = await r.json(); } catch { /* no body */ }
    if (!r.ok) {
      const e = new Error(data.message || 'Something went wrong. Try again.');
      e.code = data.error;
      throw e;
    }
    return data;
  }

  let working = false;
  async function run(fn) {
    if (working) return;
    working = true;
    say('');
    for (const b of main.querySelectorAll('button')) b.disabled = true;
    try {
      await fn();
    } catch (e) {
      say(e.message);
      if (e.code === 'expired') sessionStorage.removeItem('courier.mfa');
      if (e.code === 'expired' || e.code === 'locked') {
        // Nothing more to try on this page.
        for (const f of main.querySelectorAll('form:not(#done) input, form:not(#done) button, #enrol button, #verify-passkey')) f.disabled = true;
        working = false;
        error.focus();
        return;
      }
    } finally {
      if (working) {
        working = false;
        for (const b of main.querySelectorAll('button')) b.disabled = false;
      }
      const target = focusAfter;
      focusAfter = null;
      if (target) target.focus();
      else if (error.textContent && document.activeElement === document.body) error.focus();
    }
  }

  function complete() {
    status.textContent = 'Signing you in…';
    $('done').submit();
  }

  function passed(data) {
    const codes = data.recovery_codes || [];
    if (!codes.length) return complete();
    $('enrol').hidden = true;
    $('verify').hidden = true;
    const list = $('code-list');
    list.textContent = '';
    for (const c of codes) {
      const li = document.createElement('li');
      li.textContent = c;
      list.append(li);
    }
    $('codes').hidden = false;
    focusAfter = $('codes-saved');
  }

  // A browser or EHR frame that cannot use passkeys says so in words, not in a DOMException.
  function passkeyError(e) {
    if (framed && e && (e.name === 'NotAllowedError' || e.name === 'SecurityError')) {
      return new Error('Your passkey cannot be used inside this EHR window. Use your authenticator app or a recovery code, or open Courier in its own window.');
    }
    if (e && e.name === 'NotAllowedError') {
      return new Error('No passkey answered (it was cancelled, timed out, or is not on this device). Try again, or use another way.');
    }
    if (e && e.name === 'SecurityError') {
      return new Error('Passkeys cannot be used in this window. Use your authenticator app, or open Courier in its own window.');
    }
    if (e && e.name === 'InvalidStateError') {
      return new Error('This device already holds a passkey for you. Use it to sign in.');
    }
    return e;
  }

  $('enrol-passkey')?.addEventListener('click', () => run(async () => {
    if (!window.PublicKeyCredential) throw new Error('This browser cannot use passkeys: use an authenticator app.');
    const o = await post('passkey/register/begin', {});
    const pk = o.publicKey;
    pk.challenge = toBuf(pk.challenge);
    pk.user.id = toBuf(pk.user.id);
    for (const c of pk.excludeCredentials || []) c.id = toBuf(c.id);
    let cred;
    try { cred = await navigator.credentials.create({ publicKey: pk }); } catch (e) { throw passkeyError(e); }
    const credential = {
      id: cred.id,
      rawId: fromBuf(cred.rawId),
      type: cred.type,
      response: {
        attestationObject: fromBuf(cred.response.attestationObject),
        clientDataJSON: fromBuf(cred.response.clientDataJSON),
      },
      extensions: {},
    };
    passed(await post('passkey/register/finish', { credential }));
  }));

  $('verify-passkey')?.addEventListener('click', () => run(async () => {
    const o = await post('passkey/begin', {});
    const pk = o.publicKey;
    pk.challenge = toBuf(pk.challenge);
    for (const c of pk.allowCredentials || []) c.id = toBuf(c.id);
    let cred;
    try { cred = await navigator.credentials.get({ publicKey: pk }); } catch (e) { throw passkeyError(e); }
    const credential = {
      id: cred.id,
      rawId: fromBuf(cred.rawId),
      type: cred.type,
      response: {
        authenticatorData: fromBuf(cred.response.authenticatorData),
        clientDataJSON: fromBuf(cred.response.clientDataJSON),
        signature: fromBuf(cred.response.signature),
        userHandle: cred.response.userHandle ? fromBuf(cred.response.userHandle) : null,
      },
      extensions: {},
    };
    passed(await post('passkey/finish', { credential }));
  }));

  $('enrol-totp')?.addEventListener('click', () => run(async () => {
    // Shown already: the key the person may have scanned stays the one to confirm.
    if (!$('totp-setup').hidden) {
      focusAfter = $('totp-enrol-code');
      return;
    }
    const o = await post('totp/enrol/begin', {});
    $('totp-secret').textContent = o.secret.replace(/(.{4})/g, '$1 ').trim();
    if (o.qr) $('totp-qr').src = o.qr;
    $('totp-setup').hidden = false;
    focusAfter = $('totp-enrol-code');
  }));

  const onSubmit = (form, path, input) => $(form)?.addEventListener('submit', (ev) => {
    ev.preventDefault();
    run(async () => {
      const field = $(input);
      try {
        passed(await post(path, { code: field.value.trim() }));
      } finally {
        field.value = '';
        if (!focusAfter) focusAfter = field;
      }
    });
  });
  onSubmit('totp-enrol-form', 'totp/enrol/finish', 'totp-enrol-code');
  onSubmit('totp-form', 'totp/verify', 'totp-code');
  onSubmit('recovery-form', 'recovery/verify', 'recovery-code');

  $('codes-saved')?.addEventListener('click', complete);

  // The first thing to press has the focus.
  const first = [$('verify-passkey'), $('totp-code'), $('enrol-passkey'), $('enrol-totp')]
    .find((el) => el && !el.hidden && !el.closest('[hidden]'));
  first?.focus();
})();
