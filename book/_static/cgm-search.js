// Offline search snippets. Sphinx's search page fetches the page of each hit to show a snippet from it;
// a browser refuses such requests for a book opened from disk (file://), so every hit would come without
// its snippet and with an error in the console. On the search page of a book read from disk, this serves
// those requests from the text of every page that the build wrote into _static/cgm-search-text.js.
(() => {
  if (window.location.protocol !== "file:") return;
  if (!/\/search\.html$/.test(window.location.pathname)) return;
  const root = document.documentElement.dataset.content_root || "";
  const suffix = ".html";
  const realFetch = window.fetch.bind(window);
  let pages = null;
  const loadPages = () => pages || (pages = new Promise((resolve) => {
    const script = document.createElement("script");
    script.src = root + "_static/cgm-search-text.js";
    script.onload = () => resolve(window.CGM_SEARCH_TEXT || {});
    script.onerror = () => resolve({});
    document.head.appendChild(script);
  }));
  const escape = (text) => text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
  window.fetch = (input, init) => {
    const url = new URL(typeof input === "string" ? input : input.url, window.location.href);
    if (url.protocol !== "file:") return realFetch(input, init);
    return loadPages().then((texts) => {
      for (const [name, text] of Object.entries(texts)) {
        if (new URL(root + name + suffix, window.location.href).pathname === url.pathname) {
          return new Response(`<div role="main">${escape(text)}</div>`,
                              {status: 200, headers: {"Content-Type": "text/html"}});
        }
      }
      return new Response("", {status: 404});
    });
  };
})();
