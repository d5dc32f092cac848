// Live progress of a queued or running submission. Polls the JSON API every few seconds and
// reloads the page once the run is over (the server then renders the results). Without
// JavaScript the page refreshes itself instead (a <noscript> meta refresh).
(function () {
  "use strict";
  var box = document.querySelector("[data-poll-url]");
  if (!box || !window.fetch) {
    return;
  }
  var url = box.getAttribute("data-poll-url");
  var interval = parseInt(box.getAttribute("data-poll-interval"), 10) || 3000;
  var failures = 0;
  var FINAL = { finished: true, failed: true, cancelled: true };

  function set(name, text) {
    var el = box.querySelector('[data-field="' + name + '"]');
    if (el && el.textContent !== text) {
      el.textContent = text;
    }
  }

  function duration(seconds) {
    if (seconds < 60) {
      return seconds.toFixed(1) + " s";
    }
    var minutes = Math.round(seconds / 60);
    if (minutes < 60) {
      return minutes + " min";
    }
    var rest = minutes % 60;
    return Math.floor(minutes / 60) + " h " + (rest < 10 ? "0" : "") + rest + " min";
  }

  function show(s) {
    var status = box.querySelector('[data-field="status"]');
    if (status) {
      status.className = "status status-" + s.status;
    }
    set("status", s.status);
    set("phase", s.phase ? "phase: " + s.phase : s.status === "queued" ? "waiting for a worker" : "starting");
    var bar = document.getElementById("progress");
    if (bar) {
      bar.value = s.progress;
      bar.textContent = Math.round(s.progress * 100) + "%";
    }
    set("percent", (s.progress * 100).toFixed(1) + "%");
    set("forward_passes", s.forward_passes.toLocaleString("en-US"));
    set("eta", s.eta_seconds === null ? "estimating…" : "about " + duration(s.eta_seconds));
    if (s.cancel_requested) {
      set("note", "Cancelling…");
    }
  }

  function tick() {
    fetch(url, { headers: { Accept: "application/json" }, cache: "no-store", credentials: "same-origin" })
      .then(function (response) {
        if (!response.ok) {
          throw new Error("HTTP " + response.status);
        }
        return response.json();
      })
      .then(function (s) {
        failures = 0;
        if (FINAL[s.status]) {
          window.location.reload();
          return;
        }
        show(s);
        window.setTimeout(tick, interval);
      })
      .catch(function () {
        // The server may be restarting: back off, up to a minute between tries.
        failures += 1;
        window.setTimeout(tick, Math.min(60000, interval * Math.pow(2, failures)));
      });
  }

  window.setTimeout(tick, interval);
})();
