/**
 * Cross-origin isolation for hosts that cannot send headers (GitHub Pages, a plain file server).
 *
 * WebAssembly threads need SharedArrayBuffer, which a browser grants only to a page served with
 * Cross-Origin-Opener-Policy: same-origin and Cross-Origin-Embedder-Policy: require-corp. A service
 * worker may answer the page's requests itself, so this one re-issues each request and adds those
 * headers to the response; demo.html registers it and reloads once, after which the page (now
 * controlled by this worker) is isolated. Hosts that read `_headers` (Netlify, Cloudflare Pages)
 * or `vlmexport serve` send the headers themselves and the page never registers it.
 *
 * Written for vlmexport (the technique is the one of the coi-serviceworker project; no code of it).
 */
const ISOLATION = {
  'Cross-Origin-Opener-Policy': 'same-origin',
  'Cross-Origin-Embedder-Policy': 'require-corp',
  // Everything this site loads is its own; saying so lets require-corp accept it.
  'Cross-Origin-Resource-Policy': 'same-origin',
};

self.addEventListener('install', () => self.skipWaiting());
self.addEventListener('activate', (event) => event.waitUntil(self.clients.claim()));

self.addEventListener('fetch', (event) => {
  const { request } = event;
  // Only same-origin requests: other origins' responses are theirs to label, and an opaque
  // response cannot be rewritten anyway. (only-if-cached outside same-origin mode throws in fetch.)
  if (new URL(request.url).origin !== self.location.origin) return;
  if (request.cache === 'only-if-cached' && request.mode !== 'same-origin') return;
  event.respondWith(
    fetch(request).then((response) => {
      if (response.type === 'opaque' || response.type === 'opaqueredirect') return response;
      const headers = new Headers(response.headers);
      for (const [name, value] of Object.entries(ISOLATION)) headers.set(name, value);
      return new Response(response.body, { status: response.status, statusText: response.statusText, headers });
    }),
  );
});
