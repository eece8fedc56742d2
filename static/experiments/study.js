// Participant pages: progressive enhancements; every page also works without this file.
// - Start step: resumes an AudioContext inside the tap (unlocks sound on iOS/Safari).
// - Question pages: response time, a small behaviour log, keys A/B and ←/→, one
//   candidate playing at a time, optional play-before-answer, one click = one submit.
"use strict";

(function () {
  document.documentElement.classList.replace("no-js", "js");

  // Back/forward cache would show a stale question: let the server say what is current.
  window.addEventListener("pageshow", function (event) {
    if (event.persisted) window.location.reload();
  });

  var start = document.querySelector("form[data-start]");
  if (start) start.addEventListener("submit", unlockAudio);

  var form = document.querySelector("form[data-question]");
  if (form) question(form);

  function unlockAudio() {
    var Context = window.AudioContext || window.webkitAudioContext;
    if (!Context) return;
    try {
      var context = new Context();
      var source = context.createBufferSource();
      source.buffer = context.createBuffer(1, 1, 22050);
      source.connect(context.destination);
      source.start(0);
      context.resume();
    } catch (error) { /* nothing to unlock */ }
  }

  function question(form) {
    var shownAt = performance.now();
    var media = Array.prototype.slice.call(form.querySelectorAll("audio[data-role], video[data-role]"));
    var buttons = {};
    form.querySelectorAll("button[name=choice]").forEach(function (b) { buttons[b.value] = b; });
    var status = form.querySelector("[data-status]");
    var log = { plays: {}, first_play_ms: null, hidden: 0, blur: 0, errors: [] };
    var gated = form.hasAttribute("data-play-before-answer");
    var sent = false;

    function since() { return Math.round(performance.now() - shownAt); }

    function say(text, isError) {
      if (!status) return;
      status.textContent = text;
      status.classList.toggle("is-error", !!isError);
    }

    function updateGate() {
      if (!gated) return;
      var ready = log.plays.a && log.plays.b;
      Object.keys(buttons).forEach(function (k) { buttons[k].disabled = !ready || sent; });
      say(ready ? "" : (form.dataset.gateMessage || "Play both candidates to answer."));
    }

    media.forEach(function (element) {
      var role = element.dataset.role;
      element.addEventListener("play", function () {
        log.plays[role] = (log.plays[role] || 0) + 1;
        if (log.first_play_ms === null) log.first_play_ms = since();
        if (role !== "query") {
          // One candidate at a time: playing A pauses B and the reverse.
          media.forEach(function (other) {
            if (other !== element && other.dataset.role !== "query") other.pause();
          });
        }
        var card = element.closest(".candidate");
        if (card) card.classList.add("is-playing");
        updateGate();
      });
      element.addEventListener("pause", function () {
        var card = element.closest(".candidate");
        if (card) card.classList.remove("is-playing");
      });
      element.addEventListener("error", function () {
        log.errors.push(role);
        say(form.dataset.errorMessage || "A clip could not be loaded. Please reload the page to try again.", true);
      });
    });

    document.addEventListener("visibilitychange", function () {
      if (document.visibilityState === "hidden") log.hidden += 1;
    });
    window.addEventListener("blur", function () { log.blur += 1; });

    document.addEventListener("keydown", function (event) {
      if (event.altKey || event.ctrlKey || event.metaKey || event.shiftKey) return;
      var tag = event.target && event.target.tagName;
      if (tag === "AUDIO" || tag === "VIDEO" || tag === "INPUT" || tag === "TEXTAREA") return;
      var key = { a: "a", A: "a", ArrowLeft: "a", b: "b", B: "b", ArrowRight: "b" }[event.key];
      if (!key || !buttons[key]) return;
      event.preventDefault();
      buttons[key].click(); // a disabled button ignores the click
    });

    form.addEventListener("submit", function (event) {
      if (sent) { event.preventDefault(); return; }
      sent = true;
      form.elements.response_ms.value = String(since());
      form.elements.behaviour.value = JSON.stringify(log);
      media.forEach(function (element) { element.pause(); });
      form.classList.add("is-sending");
      // Disable only after the browser has collected the form data (a disabled
      // submitter would drop the choice).
      window.setTimeout(function () {
        Object.keys(buttons).forEach(function (k) { buttons[k].disabled = true; });
      }, 0);
    });

    updateGate();
  }
})();
