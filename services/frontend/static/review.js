// Review page: open a track, play its five parts one after the other, toggle marks by button or key.
(function () {
  const panel = document.getElementById("review-panel");
  if (!panel) return;
  const instrument = panel.dataset.instrument;
  const player = document.getElementById("part-player");
  const errorBox = document.getElementById("review-error");
  const rows = Array.from(document.querySelectorAll("#tracks tbody tr"));
  let current = null;  // the open track (JSON from the API)
  let part = 0;

  function api(path, options) {
    return fetch(path + (path.includes("?") ? "&" : "?") + "instrument=" + encodeURIComponent(instrument), options)
      .then(function (r) {
        return r.json().then(function (body) {
          if (!r.ok) throw new Error(body.error || ("the server answered " + r.status));
          return body;
        });
      });
  }
  function showError(error) { errorBox.textContent = error.message; errorBox.hidden = false; }
  function trackUrl(id) { return "/api/review/tracks/" + encodeURIComponent(id); }

  function showMarks(track) {
    document.querySelectorAll("button.mark").forEach(function (button) {
      button.setAttribute("aria-pressed", String(track.marks.includes(button.dataset.mark)));
      const suggested = track.suggestions.some(function (s) { return s.mark === button.dataset.mark; });
      button.classList.toggle("suggested", suggested);
    });
    const row = rows.find(function (r) { return r.dataset.track === track.id; });
    if (row) row.querySelector(".track-marks").textContent = track.marks.join(", ");
  }

  const classTable = document.getElementById("stem-classes");
  const classNames = classTable.dataset.classes.split(",");

  function showClasses(track) {
    const body = classTable.querySelector("tbody");
    body.innerHTML = "";
    track.all_stems.forEach(function (stem) {
      const row = document.createElement("tr");
      const name = document.createElement("td");
      name.textContent = stem.file.replace(/^stems\//, "") + (stem.name ? " (" + stem.name + ")" : "");
      const choice = document.createElement("select");
      choice.setAttribute("aria-label", "class of " + stem.file);
      ["none"].concat(classNames).forEach(function (c) {
        const option = document.createElement("option");
        option.value = c;
        option.textContent = c === "none" ? "— unmapped —" : c;
        option.selected = (stem.class || "none") === c;
        choice.appendChild(option);
      });
      choice.addEventListener("change", function () { setClass(stem.file, choice.value); });
      const state = document.createElement("td");
      if (stem.suggested) {
        const confirm = document.createElement("button");
        confirm.type = "button";
        confirm.className = "confirm-class";
        confirm.textContent = "confirm " + stem.class + " (guessed from the name)";
        confirm.addEventListener("click", function () { setClass(stem.file, stem.class); });
        state.appendChild(confirm);
      }
      const cell = document.createElement("td");
      cell.appendChild(choice);
      row.append(name, cell, state);
      body.appendChild(row);
    });
  }

  function setClass(file, cls) {
    if (!current) return;
    api(trackUrl(current.id) + "/stems/" + file.split("/").map(encodeURIComponent).join("/") + "/class",
        {method: "PUT", headers: {"Content-Type": "application/json"}, body: JSON.stringify({"class": cls})})
      .then(function () { open(current.id); })  // its stems of this instrument may have changed
      .catch(showError);
  }

  function playPart(index, autoplay) {
    if (!current || !current.parts.length) return;
    part = Math.max(0, Math.min(index, current.parts.length - 1));
    const p = current.parts[part];
    player.src = trackUrl(current.id) + "/parts/" + part + ".wav?instrument=" + encodeURIComponent(instrument);
    document.getElementById("part-label").textContent =
      "part " + (part + 1) + " of " + current.parts.length + " (" + p.start_seconds.toFixed(1) + "–" + p.end_seconds.toFixed(1) + " s)";
    if (autoplay) player.play().catch(function () {});
  }
  player.addEventListener("ended", function () {
    if (current && part + 1 < current.parts.length) playPart(part + 1, true);
  });

  function open(id) {
    errorBox.hidden = true;
    api(trackUrl(id)).then(function (track) {
      current = track;
      panel.hidden = false;
      panel.dataset.track = track.id;
      document.getElementById("review-title").textContent = track.title;
      document.getElementById("review-stems").textContent =
        (track.stems.join(", ") || "no stem") + (track.audible ? "" : " — all below −50 dBFS");
      const list = document.getElementById("suggestions");
      list.innerHTML = "";
      track.suggestions.forEach(function (s) {
        const item = document.createElement("li");
        const evidence = Object.entries(s.evidence || {}).map(function (e) { return e[0] + " " + e[1]; }).join(", ");
        item.textContent = "suggested: " + s.mark + (s.stem ? " for " + s.stem : "") + " (" + s.check + (evidence ? ": " + evidence : "") + ")";
        list.appendChild(item);
      });
      rows.forEach(function (r) { r.classList.toggle("open", r.dataset.track === track.id); });
      // The open track in the address: a reload or a shared link comes back to it.
      if (decodeURIComponent(window.location.hash.slice(1)) !== track.id) {
        history.replaceState(null, "", "#" + encodeURIComponent(track.id));
      }
      showClasses(track);
      showMarks(track);
      playPart(0, false);
    }).catch(showError);
  }

  function toggle(mark) {
    if (!current) return;
    const on = current.marks.includes(mark);
    api(trackUrl(current.id) + "/marks/" + mark, {method: on ? "DELETE" : "PUT"})
      .then(function (track) { current.marks = track.marks; showMarks(current); })
      .catch(showError);
  }

  function step(delta) {
    if (!rows.length) return;
    const index = current ? rows.findIndex(function (r) { return r.dataset.track === current.id; }) : -1;
    const next = rows[Math.max(0, Math.min(rows.length - 1, index + delta))];
    open(next.dataset.track);
  }

  document.querySelectorAll(".open-track").forEach(function (link) {
    link.addEventListener("click", function (e) { e.preventDefault(); open(link.dataset.track); });
  });
  document.querySelectorAll("button.mark").forEach(function (button) {
    button.addEventListener("click", function () { toggle(button.dataset.mark); });
  });
  document.querySelectorAll("button.part").forEach(function (button) {
    button.addEventListener("click", function () { playPart(Number(button.dataset.part), true); });
  });
  document.getElementById("next-part").addEventListener("click", function () { playPart(part + 1, true); });

  const keys = {};
  document.querySelectorAll("button.mark").forEach(function (b) { keys[b.dataset.key] = b.dataset.mark; });
  document.addEventListener("keydown", function (e) {
    if (e.target.tagName === "INPUT" || e.target.tagName === "SELECT" || e.ctrlKey || e.metaKey || e.altKey) return;
    if (keys[e.key]) { toggle(keys[e.key]); }
    else if (e.key === "n") { playPart(part + 1, true); }
    else if (e.key === "j") { step(1); }
    else if (e.key === "k") { step(-1); }
    else if (e.key === " ") { e.preventDefault(); if (player.paused) player.play().catch(function () {}); else player.pause(); }
    else return;
  });

  function openFromHash() {
    const wanted = decodeURIComponent(window.location.hash.slice(1));
    if (wanted && rows.some(function (r) { return r.dataset.track === wanted; })) {
      if (!current || current.id !== wanted) open(wanted);
      return true;
    }
    return false;
  }
  window.addEventListener("hashchange", openFromHash);  // a #track link on the page itself
  if (!openFromHash() && rows.length) open(rows[0].dataset.track);
})();
