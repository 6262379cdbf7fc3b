// The catalog's little bit of JavaScript: copy buttons, and live job progress on /jobs (polls the JSON API
// with the login cookie). No framework, no build step. Text goes into the page with textContent only.
"use strict";

function humanSize(n) {  // the same as registry.render.human_size
  if (n === null || n === undefined) return "-";
  var units = ["B", "KiB", "MiB", "GiB", "TiB"], size = n;
  for (var i = 0; i < units.length; i++) {
    if (size < 1024 || units[i] === "TiB") return units[i] === "B" ? Math.round(size) + " B" : size.toFixed(1) + " " + units[i];
    size /= 1024;
  }
  return n + " B";
}

function when(iso) { return iso ? iso.slice(0, 19).replace("T", " ") : "-"; }

function el(tag, attrs, children) {
  var node = document.createElement(tag);
  Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
  (children || []).forEach(function (c) { node.append(c); });
  return node;
}

function progressText(job) {
  var p = job.progress || {}, fmt = function (v) { return p.unit === "B" ? humanSize(v) : String(v); };
  if (p.total) {
    var unit = p.unit && p.unit !== "B" ? " " + p.unit : "";
    return fmt(p.done) + " / " + fmt(p.total) + unit + " (" + Math.round(100 * p.done / p.total) + "%)";
  }
  return p.done ? fmt(p.done) : "";
}

function jobRow(job) {
  var p = job.progress || {};
  var pct = p.total ? 100 * p.done / p.total : (job.state === "succeeded" ? 100 : 0);
  var fill = el("div", {"class": "fill"});
  fill.style.width = pct.toFixed(1) + "%";
  var bar = el("div", {"class": "bar" + (!p.total && job.state === "running" ? " indeterminate" : ""),
                       "role": "progressbar", "aria-valuemin": "0", "aria-valuemax": "100",
                       "aria-valuenow": String(Math.round(pct))}, [fill]);
  return el("tr", {"id": "job-" + job.id, "data-job": String(job.id)}, [
    el("td", {}, ["#" + job.id]),
    el("td", {}, [job.type]),
    el("td", {}, [el("span", {"class": "state state-" + job.state}, [job.state])]),
    el("td", {"class": "progress-col"}, [bar, el("span", {"class": "progress-text"}, [progressText(job)])]),
    el("td", {"class": "wide message"}, [job.error || job.message || ""]),
    el("td", {"class": "wide"}, [when(job.created_at)]),
  ]);
}

var FAST_POLL_MS = 1000, SLOW_POLL_MS = 10000;

function anyUnfinished(states) {
  return states.some(function (s) { return s === "queued" || s === "running"; });
}

// Every second while a job on the page is queued or running; once all have finished, every 10 s (a new job
// shows up within that) and at once when the tab comes back into view or gets the focus.
function pollJobs(status) {
  var body = document.getElementById("jobs-body"), url = status.getAttribute("data-poll");
  var failures = 0, timer = null, busy = false;
  var shown = Array.prototype.map.call(body.querySelectorAll(".state"), function (e) { return e.textContent; });
  function schedule(ms) { clearTimeout(timer); timer = setTimeout(tick, ms); }
  function tick() {
    if (document.hidden || busy) return;  // visibilitychange ticks again when the tab is shown
    busy = true;
    fetch(url, {credentials: "same-origin", headers: {"Accept": "application/json"}}).then(function (r) {
      if (r.status === 401) { status.textContent = "Logged out: log in again to see live progress."; return null; }
      if (!r.ok) throw new Error("HTTP " + r.status);
      return r.json();
    }).then(function (jobs) {
      busy = false;
      if (jobs === null) return;
      failures = 0;
      var active = anyUnfinished(jobs.map(function (j) { return j.state; }));
      status.textContent = (active ? "The newest jobs; progress updates live" : "No job is running; checking " +
                            "for new ones every " + SLOW_POLL_MS / 1000 + " s") +
                           " (last update " + new Date().toLocaleTimeString() + ").";
      var rows = jobs.map(jobRow);
      if (!rows.length) rows = [el("tr", {"class": "empty"}, [el("td", {"colspan": "6"}, ["No jobs yet."])])];
      body.replaceChildren.apply(body, rows);
      schedule(active ? FAST_POLL_MS : SLOW_POLL_MS);
    }).catch(function (err) {
      busy = false;
      failures += 1;
      status.textContent = "Cannot reach the server (" + err.message + "); retrying.";
      schedule(Math.min(1000 * Math.pow(2, failures), 30000));
    });
  }
  document.addEventListener("visibilitychange", function () { if (!document.hidden) tick(); });
  window.addEventListener("focus", tick);
  schedule(anyUnfinished(shown) ? FAST_POLL_MS : SLOW_POLL_MS);
}

function copyButtons() {
  document.querySelectorAll("button[data-copy]").forEach(function (button) {
    button.addEventListener("click", function () {
      var text = document.getElementById(button.getAttribute("data-copy")).textContent;
      var done = function () { button.textContent = "Copied"; setTimeout(function () { button.textContent = "Copy"; }, 1500); };
      if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(text).then(done);
      } else {  // plain http to a team host: no Clipboard API, select the text for Ctrl-C instead
        var range = document.createRange();
        range.selectNodeContents(document.getElementById(button.getAttribute("data-copy")));
        var sel = window.getSelection(); sel.removeAllRanges(); sel.addRange(range);
        button.textContent = document.execCommand && document.execCommand("copy") ? "Copied" : "Selected";
      }
    });
  });
}

function showCurrentNode() {  // on a phone the graph scrolls sideways: start with this artifact in view
  var wrap = document.querySelector(".lineage-wrap"), node = document.querySelector("svg.lineage .node.current rect");
  if (!wrap || !node || wrap.scrollWidth <= wrap.clientWidth) return;
  var box = node.getBoundingClientRect(), frame = wrap.getBoundingClientRect();
  wrap.scrollLeft += box.left - frame.left - (frame.width - box.width) / 2;
}

document.addEventListener("DOMContentLoaded", function () {
  copyButtons();
  showCurrentNode();
  var status = document.getElementById("live-status");
  if (status) pollJobs(status);
});
