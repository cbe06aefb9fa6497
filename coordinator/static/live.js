// Kiln dashboard: the live parts only. Every page reads without this file.
//
// - A stage page's log (<ol id="log" data-events=URL>) follows the stage's
//   Server-Sent Events. Each event's id is the line's sequence number; when
//   the connection drops, the browser reconnects by itself and sends
//   Last-Event-ID, and the server continues after that line, so no line is
//   lost or shown twice. The search box filters lines as you type.
// - A running run's page (<div id="live-run" data-refresh=MS>) re-reads
//   itself and swaps in the new DAG, stage table and header.
"use strict";

(function followLog() {
  const log = document.getElementById("log");
  const status = document.getElementById("live-status");
  const search = document.getElementById("log-search");
  const matches = (li) => !search || !search.value || li.textContent.includes(search.value);
  if (search && log) {
    search.addEventListener("input", () => {
      for (const li of log.children) li.hidden = !matches(li);
    });
  }
  if (!log || !log.dataset.events) return;
  const say = (state, text) => {
    if (!status) return;
    status.dataset.state = state;
    status.textContent = text;
  };
  const source = new EventSource(log.dataset.events);
  source.onopen = () => say("live", "live");
  source.onerror = () => {
    if (source.readyState !== EventSource.CLOSED) say("reconnecting", "reconnecting…");
  };
  source.onmessage = (event) => {
    const number = Number(event.lastEventId) + 1;
    const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
    const li = document.createElement("li");
    li.id = "L" + number;
    const anchor = document.createElement("a");
    anchor.href = "#L" + number;
    anchor.textContent = String(number);
    anchor.setAttribute("aria-hidden", "true");
    anchor.tabIndex = -1;
    const code = document.createElement("code");
    // Rendered and escaped on the server (ANSI colours as spans).
    code.innerHTML = event.data;
    li.append(anchor, code);
    li.hidden = !matches(li);
    log.append(li);
    if (atBottom) log.scrollTop = log.scrollHeight;
  };
  source.addEventListener("end", async () => {
    source.close();
    say("ended", "finished");
    // The stage's state, exit code and duration as they are now; the log
    // itself is complete already.
    try {
      const response = await fetch(location.pathname + location.search, { credentials: "same-origin" });
      if (!response.ok) return;
      const page = new DOMParser().parseFromString(await response.text(), "text/html");
      for (const id of ["stage-state", "stage-facts"]) {
        const mine = document.getElementById(id);
        const theirs = page.getElementById(id);
        if (mine && theirs) mine.replaceWith(document.adoptNode(theirs));
      }
    } catch (_) {
      // The page still shows every line; a reload shows the rest.
    }
  });
  source.addEventListener("attempt", () => {
    source.close();
    say("ended", "a new attempt started");
    const notice = document.getElementById("new-attempt");
    if (notice) notice.hidden = false;
  });
})();

(function refreshRun() {
  const live = document.getElementById("live-run");
  if (!live || !live.dataset.refresh) return;
  const every = Number(live.dataset.refresh);
  const tick = async () => {
    try {
      const response = await fetch(location.pathname, { credentials: "same-origin" });
      if (response.ok) {
        const page = new DOMParser().parseFromString(await response.text(), "text/html");
        const next = page.getElementById("live-run");
        if (next) {
          const hadWaiting = live.querySelectorAll("section.waiting").length;
          const hasWaiting = next.querySelectorAll("section.waiting").length;
          if (hadWaiting !== hasWaiting || !next.dataset.refresh) {
            // Buttons came or went, or the run finished: take it all.
            live.replaceWith(document.adoptNode(next));
            if (next.dataset.refresh) refreshRun();
            return;
          }
          // Otherwise swap only what changed, so focus stays where it is.
          for (const id of ["run-state", "dag", "stages"]) {
            const mine = document.getElementById(id);
            const theirs = page.getElementById(id);
            if (mine && theirs && mine.innerHTML !== theirs.innerHTML) {
              mine.replaceWith(document.adoptNode(theirs));
            }
          }
        }
      }
    } catch (_) {
      // Offline for a moment: try again at the next tick.
    }
    setTimeout(tick, every);
  };
  setTimeout(tick, every);
})();
