// What every page of the HPO view shares: formatting, links out of the view, its JSON API, and the
// refresh loop. Each view's own script (studies.js, study.js) draws its page with these helpers and
// starts the loop: window.hpo.start(refresh). Served by the plugin itself (no CDN).
"use strict";

(function () {
  const main = document.getElementById("hpo");
  const root = main.dataset.root; // where the view is mounted, e.g. /hpo
  const airflow = main.dataset.airflow; // the Airflow UI's base path, usually ""
  const REFRESH_MS = 5000;
  const state = { refreshes: 0, live: null };
  window.hpoView = state; // read by the browser tests

  function esc(value) {
    return String(value === null || value === undefined ? "" : value).replace(/[&<>"']/g, (c) => ({
      "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;",
    })[c]);
  }
  function num(value) {
    if (value === null || value === undefined) return "–";
    return typeof value === "number" ? Number(value.toPrecision(6)).toString() : esc(value);
  }
  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    if (seconds < 60) return seconds.toFixed(1) + " s";
    const m = Math.floor(seconds / 60);
    return m + " min " + Math.round(seconds - 60 * m) + " s";
  }
  function when(epoch) {
    return epoch ? new Date(epoch * 1000).toLocaleString() : "–";
  }
  function path(...parts) {
    return parts.map((p) => encodeURIComponent(p)).join("/");
  }
  // A link out of the view. Inside the Airflow UI the view sits in a sandboxed frame that may not
  // navigate the page or open a tab itself; the page it is embedded in (same origin) follows it.
  function out(href, text, target) {
    if (!href) return "";
    return `<a href="${esc(href)}" target="${target}" data-out="${target}"` +
      (target === "_blank" ? ' rel="noopener"' : "") + `>${esc(text)}</a>`;
  }
  document.addEventListener("click", (event) => {
    const link = event.target.closest ? event.target.closest("a[data-out]") : null;
    if (!link || window.top === window) return;
    try {
      const doc = window.top.document;
      const proxy = doc.createElement("a");
      proxy.href = link.href;
      proxy.target = link.dataset.out;
      if (proxy.target === "_blank") proxy.rel = "noopener";
      proxy.style.display = "none";
      doc.body.appendChild(proxy);
      proxy.click();
      proxy.remove();
      event.preventDefault();
    } catch (e) {
      // Another origin embeds the view: the link works as an ordinary link.
    }
  });

  async function getJson(url) {
    const response = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
    if (!response.ok) {
      let detail = response.statusText;
      try { detail = (await response.json()).detail || detail; } catch (e) { /* not JSON */ }
      const error = new Error(`${response.status}: ${detail}`);
      error.status = response.status;
      throw error;
    }
    return response.json();
  }

  function countsCell(row) {
    const c = row.counts;
    const done = c.complete + c.pruned + c.failed;
    return `${done} / ${row.n_trials ?? c.counted}` +
      ` <span class="muted">(${c.complete} complete, ${c.pruned} pruned, ${c.failed} failed, ${c.running} running)</span>`;
  }
  function modelCell(model) {
    if (!model) return "–";
    const aliases = model.aliases === null ? "aliases unavailable" : (model.aliases.length ? "@" + model.aliases.join(", @") : "no alias");
    const label = `${model.name} v${model.version}`;
    return (model.url ? out(model.url, label, "_blank") : esc(label)) + ` <span class="muted">${esc(aliases)}</span>`;
  }
  function bar(row) {
    const c = row.counts;
    const total = Math.max(row.n_trials || 0, c.counted, 1);
    const seg = (n, cls, title) => n ? `<span class="seg-${cls}" title="${n} ${title}" style="width:${100 * n / total}%"></span>` : "";
    return `<div class="bar" role="img" aria-label="progress by state">${seg(c.complete, "complete", "complete")}` +
      `${seg(c.pruned, "pruned", "pruned")}${seg(c.failed, "failed", "failed")}${seg(c.running, "running", "running")}</div>`;
  }

  // Refresh the page with `refresh` (which draws it and says whether the run is live) every
  // REFRESH_MS while it is; `notFound`: what a 404 means on this page.
  function start(refresh, notFound) {
    async function tick() {
      let live = false;
      try {
        live = await refresh();
        state.refreshes += 1;
        state.live = live;
        main.dataset.updated = String(state.refreshes);
      } catch (error) {
        const message = error.status === 404 ? notFound : `Could not load the study: ${error.message}`;
        if (!state.refreshes) main.innerHTML = `<p class="error">${esc(message)}</p>`;
        live = error.status !== 401 && error.status !== 403;
      }
      if (live) setTimeout(tick, REFRESH_MS);
    }
    tick();
  }

  window.hpo = { main, root, airflow, REFRESH_MS, state, esc, num, duration, when, path, out, getJson,
    countsCell, modelCell, bar, start };
})();
