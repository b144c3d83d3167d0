// Separation page: poll the job while it runs; once done, a two-channel mixer over two <audio>
// elements kept in sync (volume, mute, solo, one transport).
(function () {
  const section = document.getElementById("separation");
  if (!section) return;

  // --- progress -----------------------------------------------------------------------------
  const state = section.dataset.state;
  if (state === "queued" || state === "running") {
    const bar = document.getElementById("progress");
    const percent = document.getElementById("progress-percent");
    const message = document.getElementById("progress-message");
    const poll = function () {
      fetch(section.dataset.statusUrl, {cache: "no-store"})
        .then(function (r) { return r.json(); })
        .then(function (job) {
          if (job.state !== "queued" && job.state !== "running") { window.location.reload(); return; }
          bar.value = job.progress;
          percent.textContent = Math.floor(job.progress * 100) + " %";
          message.textContent = job.state === "queued"
            ? "waiting for a free worker" + (job.queue_position ? " (" + job.queue_position + " ahead)" : "")
            : job.message;
          setTimeout(poll, 700);
        })
        .catch(function () { setTimeout(poll, 3000); });
    };
    setTimeout(poll, 500);
    const cancel = document.getElementById("cancel");
    if (cancel) cancel.addEventListener("click", function () {
      cancel.disabled = true;
      fetch(cancel.dataset.url, {method: "POST"});
    });
    return;
  }

  // --- mixer --------------------------------------------------------------------------------
  const instrument = document.getElementById("player-instrument");
  const rest = document.getElementById("player-rest");
  if (!instrument || !rest) return;
  const players = {instrument: instrument, rest: rest};
  const mixer = {instrument: {volume: 1, mute: false, solo: false}, rest: {volume: 1, mute: false, solo: false}};
  const play = document.getElementById("play");
  const seek = document.getElementById("seek");
  const clock = document.getElementById("clock");

  function applyGains() {
    const anySolo = mixer.instrument.solo || mixer.rest.solo;
    for (const stem of ["instrument", "rest"]) {
      const channel = mixer[stem];
      const audible = !channel.mute && (!anySolo || channel.solo);
      players[stem].volume = audible ? channel.volume : 0;
      document.getElementById("mute-" + stem).setAttribute("aria-pressed", String(channel.mute));
      document.getElementById("solo-" + stem).setAttribute("aria-pressed", String(channel.solo));
    }
  }
  for (const stem of ["instrument", "rest"]) {
    document.getElementById("volume-" + stem).addEventListener("input", function (e) {
      mixer[stem].volume = Number(e.target.value);
      applyGains();
    });
    document.getElementById("mute-" + stem).addEventListener("click", function () {
      mixer[stem].mute = !mixer[stem].mute;
      applyGains();
    });
    document.getElementById("solo-" + stem).addEventListener("click", function () {
      mixer[stem].solo = !mixer[stem].solo;
      applyGains();
    });
  }

  function formatTime(seconds) {
    const s = Math.floor(seconds);
    return Math.floor(s / 60) + ":" + String(s % 60).padStart(2, "0");
  }
  // The instrument player leads; the rest follows it when it drifts more than 40 ms.
  function follow() {
    if (Math.abs(rest.currentTime - instrument.currentTime) > 0.04) rest.currentTime = instrument.currentTime;
  }
  play.addEventListener("click", function () {
    if (instrument.paused) {
      follow();
      Promise.all([instrument.play(), rest.play()]).catch(function () {});
    } else {
      instrument.pause();
      rest.pause();
    }
  });
  instrument.addEventListener("play", function () { play.textContent = "Pause"; if (rest.paused) { follow(); rest.play().catch(function () {}); } });
  instrument.addEventListener("pause", function () { play.textContent = "Play"; if (!rest.paused) rest.pause(); });
  instrument.addEventListener("seeked", follow);
  instrument.addEventListener("ended", function () { rest.pause(); });
  instrument.addEventListener("timeupdate", function () {
    seek.value = instrument.currentTime;
    clock.textContent = formatTime(instrument.currentTime);
    if (!instrument.paused) follow();
  });
  seek.addEventListener("input", function () {
    instrument.currentTime = Number(seek.value);
    rest.currentTime = Number(seek.value);
  });
  applyGains();
  window.stemlabMixer = mixer;  // for the browser test and the curious
})();
