// Participant pages: progressive enhancements; every page also works without this file.
// - Start step: resumes an AudioContext inside the tap (unlocks sound on iOS/Safari).
// - Question pages: response time, a behaviour log (first play, plays and listening time
//   per item, blur/focus, visibility, load failures), keys A/B and ←/→, one candidate
//   playing at a time, optional play-before-answer with a minimum listening time, a load
//   time limit with a Retry button, one click = one submit; the answer goes in one
//   request and the next question of the block is shown in place.
// - Sound check: one tone playing at a time.
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
    var media = Array.prototype.slice.call(form.querySelectorAll("audio[data-role], video[data-role]"));
    var buttons = {};
    form.querySelectorAll("button[name=choice]").forEach(function (b) { buttons[b.value] = b; });
    var status = form.querySelector("[data-status]");
    var retry = form.querySelector("[data-retry]");
    var gated = form.hasAttribute("data-play-before-answer");
    var minListen = Number(form.dataset.minListenMs || 0);
    var loadTimeout = Number(form.dataset.loadTimeoutMs || 20000);
    // Per question (reset when the next one is shown in place): the behaviour log sent
    // with the answer (exported with it), what has been heard enough, what failed to load.
    var shownAt, log, enough, failed, sent, choice, heard, shown = 0;

    function reset() {
      shownAt = performance.now();
      log = {
        plays: {}, listened_ms: {}, first_play_ms: null, first_play: {}, loaded_ms: {},
        blur: 0, focus: 0, hidden: 0, visible: 0, events: [], errors: [], retries: 0
      };
      enough = {};
      failed = [];
      sent = false;
      choice = null;
      heard = {};
      shown += 1;
      media.forEach(function (element) {
        log.listened_ms[element.dataset.role] = 0;
        heard[element.dataset.role] = { last: null, playing: false };
      });
      Object.keys(buttons).forEach(function (k) { buttons[k].disabled = false; });
      form.classList.remove("is-sending");
      if (retry) retry.hidden = true;
      say("");
    }

    function since() { return Math.round(performance.now() - shownAt); }

    function note(event) { if (log.events.length < 50) log.events.push([since(), event]); }

    function say(text, isError) {
      if (!status) return;
      status.textContent = text;
      status.classList.toggle("is-error", !!isError);
    }

    function updateGate() {
      if (!gated || failed.length) return;
      var played = log.plays.a && log.plays.b;
      var ready = played && enough.a && enough.b;
      Object.keys(buttons).forEach(function (k) { buttons[k].disabled = !ready || sent; });
      if (ready) say("");
      else if (!played) say(form.dataset.gateMessage || "Play both candidates to answer.");
      else if (enough.a !== enough.b) {  // name the one that needs more
        var letter = enough.a ? "B" : "A";
        say((form.dataset.listenOneMessage || "Keep listening to {letter}.").replace("{letter}", letter));
      } else say(form.dataset.listenMessage || "Keep listening to answer.");
    }

    function fail(element, reason) {
      var role = element.dataset.role;
      if (failed.indexOf(element) >= 0) return;
      failed.push(element);
      log.errors.push({ role: role, reason: reason, ms: since() });
      note("error:" + role);
      say(form.dataset.errorMessage || "A clip could not be loaded. Press Retry.", true);
      if (retry) retry.hidden = false;
    }

    function watchLoading(elements) {
      var question = shown;
      window.setTimeout(function () {
        if (question !== shown) return; // another question is on show by now
        elements.forEach(function (element) {
          // NETWORK_IDLE with nothing loaded is a browser that waits for a tap (iOS): fine.
          var stuck = element.readyState < 1 && element.networkState !== 1;
          if (element.error || stuck) fail(element, element.error ? "error" : "timeout");
        });
      }, loadTimeout);
    }

    if (retry) {
      retry.querySelector("button").addEventListener("click", function () {
        var again = failed;
        failed = [];
        log.retries += 1;
        retry.hidden = true;
        say("");
        again.forEach(function (element) { element.load(); });
        watchLoading(again);
        updateGate();
      });
    }

    media.forEach(function (element) {
      var role = element.dataset.role;
      function needed() {
        var duration = element.duration;
        var cap = isFinite(duration) && duration > 0 ? duration * 1000 - 250 : minListen;
        return Math.max(0, Math.min(minListen, cap));
      }
      function count() {
        var state = heard[role];
        if (state.playing && state.last !== null) {
          var step = element.currentTime - state.last;
          if (step > 0 && step < 1.5) log.listened_ms[role] += step * 1000; // not a seek
        }
        state.last = element.currentTime;
        if (log.plays[role] && log.listened_ms[role] >= needed() && !enough[role]) {
          enough[role] = true;
          updateGate();
        }
      }
      element.addEventListener("loadeddata", function () {
        if (!(role in log.loaded_ms)) log.loaded_ms[role] = since();
      });
      element.addEventListener("play", function () {
        log.plays[role] = (log.plays[role] || 0) + 1;
        if (log.first_play_ms === null) log.first_play_ms = since();
        if (!(role in log.first_play)) log.first_play[role] = since();
        heard[role].last = element.currentTime;
        heard[role].playing = true;
        if (role !== "query") {
          // One candidate at a time: playing A pauses B and the reverse.
          media.forEach(function (other) {
            if (other !== element && other.dataset.role !== "query") other.pause();
          });
        }
        var card = element.closest(".candidate");
        if (card) card.classList.add("is-playing");
        count();
        updateGate();
      });
      element.addEventListener("timeupdate", count);
      element.addEventListener("seeked", function () { heard[role].last = element.currentTime; });
      element.addEventListener("ended", function () {
        count();
        heard[role].playing = false;
        if (log.plays[role]) { enough[role] = true; updateGate(); }
      });
      element.addEventListener("pause", function () {
        count();
        heard[role].playing = false;
        heard[role].last = null;
        var card = element.closest(".candidate");
        if (card) card.classList.remove("is-playing");
      });
      element.addEventListener("error", function () {
        if (element.getAttribute("src")) fail(element, "error");
      });
    });

    document.addEventListener("visibilitychange", function () {
      var hidden = document.visibilityState === "hidden";
      if (hidden) log.hidden += 1; else log.visible += 1;
      note(hidden ? "hidden" : "visible");
    });
    window.addEventListener("blur", function () { log.blur += 1; note("blur"); });
    window.addEventListener("focus", function () { log.focus += 1; note("focus"); });

    document.addEventListener("keydown", function (event) {
      if (event.altKey || event.ctrlKey || event.metaKey || event.shiftKey) return;
      var tag = event.target && event.target.tagName;
      if (tag === "AUDIO" || tag === "VIDEO" || tag === "INPUT" || tag === "TEXTAREA") return;
      var key = { a: "a", A: "a", ArrowLeft: "a", b: "b", B: "b", ArrowRight: "b" }[event.key];
      if (!key || !buttons[key]) return;
      event.preventDefault();
      buttons[key].click(); // a disabled button ignores the click
    });

    // Which button sent the form (the keys click it too): the answer a script-sent POST
    // carries, and the one a plain submission falls back to.
    Object.keys(buttons).forEach(function (k) {
      buttons[k].addEventListener("click", function () { choice = k; });
    });

    form.addEventListener("submit", function (event) {
      if (sent) { event.preventDefault(); return; }
      sent = true;
      media.forEach(function (element) { element.pause(); });
      Object.keys(log.listened_ms).forEach(function (role) {
        log.listened_ms[role] = Math.round(log.listened_ms[role]);
      });
      form.elements.response_ms.value = String(since());
      form.elements.behaviour.value = JSON.stringify(log);
      form.classList.add("is-sending");
      function disable() {
        Object.keys(buttons).forEach(function (k) { buttons[k].disabled = true; });
      }
      if (window.fetch && window.URLSearchParams && choice) {
        event.preventDefault();
        disable();
        send(choice);
      } else {
        // Disable only after the browser has collected the form data (a disabled
        // submitter would drop the choice).
        window.setTimeout(disable, 0);
      }
    });

    // The answer in one request: the server replies with the next question, shown here in
    // place (no page load, its media already prefetched). Anything else (a break, the end,
    // an error, no connection) is left to the plain form submission and the server's page.
    function send(letter) {
      var body = new URLSearchParams(new FormData(form));
      body.set("choice", letter);
      window.fetch(form.action, {
        method: "POST",
        body: body,
        credentials: "same-origin",
        headers: { Accept: "application/json" }
      }).then(function (response) {
        var json = (response.headers.get("Content-Type") || "").indexOf("application/json") === 0;
        if (!response.ok || !json) throw new Error("HTTP " + response.status);
        return response.json();
      }).then(function (next) {
        if (next.step === "question" && next.direction === form.dataset.direction) showNext(next);
        else window.location.assign(next.location);
      }).catch(function () { submitPlainly(letter); });
    }

    function submitPlainly(letter) {
      var field = document.createElement("input");
      field.type = "hidden";
      field.name = "choice";
      field.value = letter;
      form.appendChild(field);
      form.submit(); // no submit event: straight to the server
    }

    function showNext(next) {
      var counter = (form.dataset.counter || "{number} / {total}")
        .replace("{number}", next.position).replace("{total}", next.total);
      document.getElementById("counter").textContent = counter;
      document.title = counter;
      var bar = document.querySelector("header.progress progress");
      if (bar) { bar.value = next.answered; bar.textContent = next.answered + " / " + next.total; }
      form.elements.position.value = String(next.position);
      form.elements.response_ms.value = "";
      form.elements.behaviour.value = "";
      media.forEach(function (element) {
        var card = element.closest(".candidate");
        if (card) card.classList.remove("is-playing");
        element.src = next.media[element.dataset.role];
      });
      document.querySelectorAll("link[rel=prefetch]").forEach(function (link) { link.remove(); });
      next.prefetch.forEach(function (url) {
        var link = document.createElement("link");
        link.rel = "prefetch";
        link.href = url;
        document.head.appendChild(link);
      });
      reset();
      watchLoading(media);
      updateGate();
      window.scrollTo(0, 0);
      // The answer button was disabled while sending: give focus back at the new question
      // (keyboard and screen-reader users; the counter announces its number).
      form.querySelector(".prompt").focus({ preventScroll: true });
    }

    reset();
    watchLoading(media);
    updateGate();
  }

  // The sound check: one tone at a time.
  var check = document.querySelector("form[data-sound-check]");
  if (check) {
    var tones = Array.prototype.slice.call(check.querySelectorAll("audio[data-tone]"));
    tones.forEach(function (tone) {
      tone.addEventListener("play", function () {
        tones.forEach(function (other) { if (other !== tone) other.pause(); });
      });
    });
  }
})();
