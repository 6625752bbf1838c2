// Courier's service worker: it shows web push notices. A notice never carries PHI (the server
// sends only the clinic's name, that something is waiting, and a link), because a notification
// can show on a locked screen. It caches nothing: messages are never stored on the device.
'use strict';

self.addEventListener('install', () => self.skipWaiting());
self.addEventListener('activate', (event) => event.waitUntil(self.clients.claim()));

function sameOrigin(url) {
  if (typeof url !== 'string' || !url) return null;
  try {
    const u = new URL(url, self.location.origin);
    return u.origin === self.location.origin ? u.href : null;
  } catch (e) {
    return null;
  }
}

self.addEventListener('push', (event) => {
  let d = {};
  try { d = event.data ? event.data.json() : {}; } catch (e) { d = {}; }
  const title = typeof d.title === 'string' && d.title ? d.title.slice(0, 100) : 'Courier';
  const body = typeof d.body === 'string' && d.body ? d.body.slice(0, 200) : 'You have a new secure message.';
  event.waitUntil(self.registration.showNotification(title, {
    body,
    tag: typeof d.tag === 'string' ? d.tag.slice(0, 64) : 'courier',
    renotify: true,
    data: {url: sameOrigin(d.url) || self.location.origin + '/app/'},
  }));
});

// A click opens Courier: an open Courier tab if there is one, else the sign-in link.
self.addEventListener('notificationclick', (event) => {
  event.notification.close();
  const url = (event.notification.data && sameOrigin(event.notification.data.url)) || self.location.origin + '/app/';
  event.waitUntil(self.clients.matchAll({type: 'window', includeUncontrolled: true}).then((list) => {
    for (const c of list) {
      if (new URL(c.url).pathname.startsWith('/app/') && 'focus' in c) return c.focus();
    }
    return self.clients.openWindow(url);
  }));
});
