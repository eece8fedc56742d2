// Participant pages: progressive enhancements; every page also works without this file.
// - Start step: resumes an AudioContext inside the tap (unlocks sound on iOS/Safari).
// - Question pages: response time, a behaviour log (first play, plays and listening time
//   per item, blur/focus, visibility, load failures), keys A/B and ←/→ (can be switched
//   off), one candidate playing at a time, optional play-before-answer with a minimum
//   listening time, a load time limit with a Retry button, one click = one submit; the answer goes in one
//   request and the next question of the block is shown in place, its buttons live only
//   after a moment (a double tap must not answer a question not yet seen); an answer sent
//   without a connection waits on the page and goes when the connection is back.
// - Sound check: a play button a tone, one tone playing at a time.
// - End pages: back to the recruiting platform after some seconds, unless one stays.
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

  var onward = document.getElementById("continue");
  if (onward && onward.dataset.afterS) goOnwardSoon(onward);

  // End pages: back to the recruiting platform after a few seconds, unless the participant
  // stays (WCAG 2.2.1: a time limit they can turn off).
  function goOnwardSoon(link) {
    var timer = window.setTimeout(function () {
      window.location.assign(link.href);
    }, Number(link.dataset.afterS) * 1000);
    document.getElementById("stay").addEventListener("click", function (event) {
      window.clearTimeout(timer);
      event.target.remove();
      document.getElementById("onward-note").remove();
      link.focus();
    });
  }

  // localStorage, where the browser lets this page have it (not always in a frame).
  function remembered(key) {
    try { return window.localStorage.getItem(key); } catch (error) { return null; }
  }
  function remember(key, value) {
    try { window.localStorage.setItem(key, value); } catch (error) { /* this page only */ }
  }

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
    var SETTLE_MS = 500; // a new question's buttons wait this long: longer than a double tap
    var SLOW_MS = 3000; // no reply to an answer by then: say that it is being saved
    var SEND_TIMEOUT_MS = 30000; // no reply by then: the plain form submission instead
    var RETRY_MS = [500, 1000, 2000, 4000, 8000]; // a server restarting: 15 s of tries
    var GATEWAY_ERRORS = [502, 503, 504];
    // Per question (reset when the next one is shown in place): the behaviour log sent
    // with the answer (exported with it), what has been heard enough, what failed to load.
    var shownAt, log, enough, failed, sent, choice, heard, settled, shown = 0;

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
        heard[element.dataset.role] = { last: null, wall: 0, playing: false };
      });
      settled = false;
      var question = shown;
      window.setTimeout(function () {
        if (question !== shown) return;
        settled = true;
        updateButtons();
      }, SETTLE_MS);
      form.classList.remove("is-sending");
      if (retry) retry.hidden = true;
      say("");
      updateButtons();
    }

    function since() { return Math.round(performance.now() - shownAt); }

    function note(event) { if (log.events.length < 50) log.events.push([since(), event]); }

    function say(text, isError) {
      if (!status) return;
      status.textContent = text;
      status.classList.toggle("is-error", !!isError);
    }

    // A live region announces a change only: the same words, cleared and set again.
    function sayAgain() {
      var text = status && status.textContent;
      if (!text) return;
      say("");
      window.setTimeout(function () { say(text, status.classList.contains("is-error")); }, 100);
    }

    function hasFailed(role) {
      return failed.some(function (element) { return element.dataset.role === role; });
    }

    // The answer buttons: live once the question has settled and, with play-before-answer,
    // each candidate has been heard long enough or could not be loaded (no dead end).
    function updateButtons() {
      var waiting = !gated ? [] : ["a", "b"].filter(function (role) {
        return !(log.plays[role] && enough[role]) && !hasFailed(role);
      });
      Object.keys(buttons).forEach(function (k) {
        buttons[k].disabled = sent || !settled || waiting.length > 0;
      });
      if (!gated || sent || failed.length) return; // a failure's message stays
      // The gate lifting is said too: a screen reader gives no other sign of it.
      if (!waiting.length) say(settled ? form.dataset.readyMessage || "You can choose now." : "");
      else if (waiting.length === 1) { // name the one that needs more
        var letter = waiting[0].toUpperCase();
        say((form.dataset.listenOneMessage || "Keep listening to {letter}.").replace("{letter}", letter));
      } else if (!log.plays.a || !log.plays.b) say(form.dataset.gateMessage || "Play both candidates to answer.");
      else say(form.dataset.listenMessage || "Keep listening to answer.");
    }

    function nameOf(element) {
      var label = element.getAttribute("aria-labelledby");
      var heading = label && document.getElementById(label);
      return heading ? heading.textContent : element.getAttribute("aria-label") || "";
    }

    function fail(element, reason) {
      var role = element.dataset.role;
      if (failed.indexOf(element) >= 0) return;
      failed.push(element);
      log.errors.push({ role: role, reason: reason, ms: since() });
      note("error:" + role);
      var names = failed.map(nameOf).join(", ");
      say((form.dataset.errorMessage || "{name} could not be loaded. Press Retry.").replace("{name}", names), true);
      if (retry) retry.hidden = false;
      updateButtons();
    }

    function watchLoading(elements) {
      // An error before this (deferred) script listened is an event nobody heard.
      elements.forEach(function (element) {
        if (element.error && element.getAttribute("src")) fail(element, "error");
      });
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
        updateButtons();
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
        var now = performance.now();
        if (state.playing && state.last !== null) {
          var step = element.currentTime - state.last;
          // Playing cannot outrun the clock: a longer step is a seek (a busy page that
          // heard no timeupdate for a while still counts what played meanwhile).
          var most = ((now - state.wall) / 1000) * (element.playbackRate || 1) + 0.25;
          if (step > 0 && step <= most) log.listened_ms[role] += step * 1000;
        }
        state.last = element.currentTime;
        state.wall = now;
        if (log.plays[role] && log.listened_ms[role] >= needed() && !enough[role]) {
          enough[role] = true;
          updateButtons();
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
        updateButtons();
      });
      element.addEventListener("timeupdate", count);
      element.addEventListener("seeked", function () { heard[role].last = element.currentTime; });
      // Played to its end is not enough by itself: a seek there would skip the listening.
      element.addEventListener("ended", function () {
        count();
        heard[role].playing = false;
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

    // Answer keys can be switched off (WCAG 2.1.4: a stray letter from speech input or a
    // screen reader would answer), and stay so on this browser.
    var answerKeys = form.querySelector("[data-answer-keys]");
    answerKeys.checked = remembered("answerKeys") !== "off";
    answerKeys.addEventListener("change", function () {
      remember("answerKeys", answerKeys.checked ? "on" : "off");
    });

    document.addEventListener("keydown", function (event) {
      if (event.altKey || event.ctrlKey || event.metaKey || !answerKeys.checked) return;
      var tag = event.target && event.target.tagName;
      if (tag === "INPUT" || tag === "TEXTAREA") return;
      var letters = { a: "a", A: "a", b: "b", B: "b" };
      // The arrows choose only where nothing else takes them: on a button they move a keyboard
      // or screen-reader user between controls (an audit's → on "Choose A" answered B), in a
      // player they seek, and Shift with an arrow selects. Letters choose anywhere.
      var taken = ["BUTTON", "A", "AUDIO", "VIDEO", "SELECT"].indexOf(tag) >= 0;
      var arrows = taken || event.shiftKey ? {} : { ArrowLeft: "a", ArrowRight: "b" };
      var key = arrows[event.key] || letters[event.key];
      if (!key || !buttons[key]) return;
      event.preventDefault();
      if (event.repeat) return; // a held key answers once
      if (buttons[key].disabled && gated && !sent) sayAgain(); // why it waits, said again
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
    // an error, no reply) is left to the plain form submission and the server's page. The
    // browser offline, the answer waits here and is sent again once it is back (sending
    // twice is harmless: the server keeps the first answer to a position).
    function send(letter, attempt) {
      attempt = attempt || 0;
      var body = new URLSearchParams(new FormData(form));
      body.set("choice", letter);
      var controller = window.AbortController ? new window.AbortController() : null;
      var slow = window.setTimeout(function () {
        say(form.dataset.savingMessage || "Saving your answer…");
      }, SLOW_MS);
      var limit = controller && window.setTimeout(function () { controller.abort(); }, SEND_TIMEOUT_MS);
      function stopTimers() { window.clearTimeout(slow); window.clearTimeout(limit); }
      window.fetch(form.action, {
        method: "POST",
        body: body,
        credentials: "same-origin",
        headers: { Accept: "application/json" },
        signal: controller ? controller.signal : undefined
      }).then(function (response) {
        var json = (response.headers.get("Content-Type") || "").indexOf("application/json") === 0;
        if (GATEWAY_ERRORS.indexOf(response.status) >= 0) throw new TypeError("HTTP " + response.status);
        if (!response.ok || !json) throw new Error("HTTP " + response.status);
        return response.json();
      }).then(function (next) {
        stopTimers();
        if (next.step === "question" && next.direction === form.dataset.direction) showNext(next);
        else window.location.assign(next.location);
      }).catch(function (error) {
        stopTimers();
        if (navigator.onLine === false) waitForConnection(letter);
        // No reply (TypeError), or a proxy's while the server restarts: the same answer
        // again (the server takes it once), then the plain form, which shows what is wrong.
        else if (error instanceof TypeError && attempt < RETRY_MS.length) {
          say(form.dataset.savingMessage || "Saving your answer…");
          window.setTimeout(function () { send(letter, attempt + 1); }, RETRY_MS[attempt]);
        } else submitPlainly(letter);
      });
    }

    function waitForConnection(letter) {
      say(form.dataset.offlineMessage || "No connection: your answer will be sent when it is back.", true);
      var again = function () {
        window.removeEventListener("online", again);
        window.clearTimeout(timer);
        send(letter);
      };
      window.addEventListener("online", again);
      var timer = window.setTimeout(again, 5000); // in case no "online" event comes
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
      updateButtons();
      window.scrollTo(0, 0);
      // The answer button was disabled while sending: give focus back at the new question
      // (keyboard and screen-reader users; the counter announces its number).
      form.querySelector(".prompt").focus({ preventScroll: true });
    }

    reset();
    watchLoading(media);
    updateButtons();
  }

  // The sound check: a play button a tone instead of the player's controls (their volume
  // slider would let one tone be made louder, and each player took six Tab stops), one tone
  // at a time, each from its start.
  var check = document.querySelector("form[data-sound-check]");
  if (check) {
    var tones = Array.prototype.slice.call(check.querySelectorAll("audio[data-tone]"));
    tones.forEach(function (tone) {
      var button = tone.parentNode.querySelector("[data-play]");
      tone.controls = false;
      button.addEventListener("click", function () {
        if (!tone.paused) { tone.pause(); return; }
        tone.currentTime = 0;
        tone.play();
      });
      tone.addEventListener("play", function () {
        tones.forEach(function (other) { if (other !== tone) other.pause(); });
        button.setAttribute("aria-pressed", "true");
      });
      ["pause", "ended"].forEach(function (name) {
        tone.addEventListener(name, function () { button.setAttribute("aria-pressed", "false"); });
      });
    });
    var missing = document.getElementById("sound-error"); // back with rows unanswered: say which
    if (missing) missing.focus();
  }
})();
