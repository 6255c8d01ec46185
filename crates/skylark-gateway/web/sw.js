// Skylark's service worker: keeps the page's own files so that it opens
// without a connection (showing the chats kept in IndexedDB), and shows a
// notification when a push wakes this browser.
//
// Pushes carry no content (`{"type":"wake"}`, see docs/PROTOCOL.md): the
// server sends one when messages wait for a device with no live
// connection, so the notification says only that there is something new.

const SHELL = "skylark-shell-v2";
const FILES = [
  "/", "/app.js", "/proto.js", "/store.js", "/style.css", "/favicon.svg",
  "/e2ee.js", "/e2ee/skylark_e2ee_web.js", "/e2ee/skylark_e2ee_web_bg.wasm",
];

self.addEventListener("install", (event) => {
  event.waitUntil(caches.open(SHELL).then((cache) => cache.addAll(FILES)).then(() => self.skipWaiting()));
});

self.addEventListener("activate", (event) => {
  event.waitUntil((async () => {
    for (const name of await caches.keys()) if (name !== SHELL) await caches.delete(name);
    await self.clients.claim();
  })());
});

// The network first, so a new version shows at once; the kept copy when
// the server cannot be reached.
self.addEventListener("fetch", (event) => {
  const url = new URL(event.request.url);
  if (event.request.method !== "GET" || url.origin !== self.location.origin || !FILES.includes(url.pathname)) return;
  event.respondWith((async () => {
    try {
      const response = await fetch(event.request);
      if (response.ok) {
        const copy = response.clone();
        event.waitUntil(caches.open(SHELL).then((cache) => cache.put(event.request, copy)));
      }
      return response;
    } catch (err) {
      const kept = await caches.match(event.request);
      if (kept) return kept;
      throw err;
    }
  })());
});

self.addEventListener("push", (event) => {
  let kind = "wake";
  try {
    kind = event.data ? event.data.json().type : "wake";
  } catch {
    kind = "wake";
  }
  if (kind !== "wake") return;
  // One notification however many pushes: the newest replaces the others.
  event.waitUntil(self.registration.showNotification("Skylark", {
    body: "You have new messages.",
    tag: "skylark-wake",
    renotify: true,
    icon: "/favicon.svg",
    data: { url: "/" },
  }));
});

self.addEventListener("notificationclick", (event) => {
  event.notification.close();
  event.waitUntil((async () => {
    const windows = await self.clients.matchAll({ type: "window", includeUncontrolled: true });
    const open = windows.find((w) => new URL(w.url).origin === self.location.origin);
    if (open) {
      await open.focus();
      if (event.notification.data && event.notification.data.chat) open.postMessage({ open: event.notification.data.chat });
    } else {
      await self.clients.openWindow("/");
    }
  })());
});
