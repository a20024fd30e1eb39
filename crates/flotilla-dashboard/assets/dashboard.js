// Flotilla's dashboard: the live parts only. Pages are rendered on the
// server; this keeps them current without reloads and drives the buttons.
"use strict";
(function () {
  const live = document.body.dataset.live || "";
  const notice = document.getElementById("notice");
  const say = (text) => { notice.textContent = text; notice.classList.add("shown"); };
  const token = document.getElementById("token");
  token.value = localStorage.getItem("flotilla-token") || "";
  token.addEventListener("change", () => localStorage.setItem("flotilla-token", token.value.trim()));

  // Re-renders the parts named by `selectors` from the server's page, at
  // most once per `delay` ms however often it is poked, whenever the
  // coordinator's event feed carries one of `kinds` and every `every` ms.
  const follow = (selectors, delay, kinds, every) => {
    let pending = null;
    const refresh = async () => {
      pending = null;
      const r = await fetch(location.href, { headers: { Accept: "text/html" } });
      if (!r.ok) return;
      const doc = new DOMParser().parseFromString(await r.text(), "text/html");
      for (const sel of selectors) {
        const fresh = doc.querySelector(sel);
        const old = document.querySelector(sel);
        if (fresh && old) old.replaceWith(fresh);
      }
    };
    const poke = () => { if (!pending) pending = setTimeout(refresh, delay); };
    const events = new EventSource("/v1/events");
    for (const kind of kinds) events.addEventListener(kind, poke);
    if (every) setInterval(poke, every);
  };

  // Grid, run and queue pages: <main> follows the coordinator's events;
  // the queue page also looks every 2 s, whatever the feed carries.
  if (live === "events") {
    follow(["#main"], 500, ["run", "build", "project"], location.pathname === "/ui/queue" ? 2000 : 0);
  }

  // A build page while the build runs: append lines as they are stored.
  if (live.startsWith("log:")) {
    const [, build, from, line] = live.split(":");
    const log = document.getElementById("log");
    const stream = new EventSource(`/ui/builds/${build}/log?from=${from}&line=${line}`);
    stream.addEventListener("lines", (e) => {
      const atEnd = window.innerHeight + window.scrollY >= document.body.scrollHeight - 40;
      log.insertAdjacentHTML("beforeend", e.data);
      if (atEnd) window.scrollTo(0, document.body.scrollHeight);
    });
    stream.addEventListener("done", () => { stream.close(); setTimeout(() => location.reload(), 300); });
    // The header and the timeline follow the build: on its events, and
    // every 2 s while a step runs (a running stage's bar grows).
    follow(["h1", "p.meta", ".timeline"], 300, ["build"], 2000);
  }

  // Cancel and retry: the API, with the token from the header field.
  const act = async (button, what) => {
    const id = button.dataset.build;
    const headers = {};
    const t = token.value.trim();
    if (t) headers.Authorization = `Bearer ${t}`;
    const r = await fetch(`/v1/builds/${id}/${what}`, { method: "POST", headers });
    const body = await r.json().catch(() => ({}));
    if (r.status === 401) { say(`${what} refused: paste the coordinator's token (HOME/coordinator/token) above`); return; }
    if (!r.ok) { say(`${what} failed: ${body.message || r.status}`); return; }
    if (what === "retry" && body.builds && body.builds.length) { location.href = `/ui/builds/${body.builds[0]}`; return; }
    location.reload();
  };
  for (const what of ["cancel", "retry"]) {
    const b = document.getElementById(what);
    if (b) b.addEventListener("click", () => act(b, what));
  }
})();
