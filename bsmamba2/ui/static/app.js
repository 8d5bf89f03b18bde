"use strict";
// The page: settings, uploads, and one card per job, refreshed by polling /api/jobs (server.py lists the API).

const $ = (id) => document.getElementById(id);
const ACTIVE = ["queued", "loading", "separating", "finishing"];
const POLL_MS = 600;
let options = null;
const cards = new Map();  // job id → its card

async function api(path, init) {
  const response = await fetch(path, init);
  const body = response.status === 204 ? null : await response.json();
  if (!response.ok) throw new Error((body && body.error) || `${response.status} ${response.statusText}`);
  return body;
}

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
}

function duration(seconds) {
  if (seconds < 60) return `${Math.max(1, Math.round(seconds))} s`;
  const minutes = Math.floor(seconds / 60);
  return `${minutes} min ${String(Math.round(seconds - 60 * minutes)).padStart(2, "0")} s`;
}

async function start() {
  options = await api("/api/options");
  for (const model of options.models) {
    $("model").append(element("option", {value: model.id}, `${model.label} (${model.note})`));
  }
  $("model").value = options.default_model;
  for (const format of options.formats) $("format").append(element("option", {value: format}, format));
  $("format").value = options.default_format;
  $("tta").checked = options.default_tta;
  $("int8-choice").hidden = !options.int8;
  $("int8").checked = options.default_int8;
  $("limit").textContent = options.max_upload_mb;
  $("model").addEventListener("change", showStems);
  showStems();

  $("files").addEventListener("change", (event) => { addFiles(event.target.files); event.target.value = ""; });
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    addFiles(event.dataTransfer.files);
  });
  poll();
}

function showStems() {
  const model = options.models.find((m) => m.id === $("model").value);
  const select = $("stems");
  select.replaceChildren();
  if (model.stems.length === 1) {  // a one-stem model gives that stem and what is left of the mixture
    select.append(element("option", {value: ""}, `${model.stems[0]} + no_${model.stems[0]}`));
  } else {
    select.append(element("option", {value: ""}, model.stems.length ? `all (${model.stems.join(", ")})` : "all"));
    for (const stem of model.stems) select.append(element("option", {value: stem}, `${stem} + no_${stem}`));
  }
  $("model-note").textContent = model.description || "";
}

async function addFiles(files) {
  const settings = {model: $("model").value, stems: $("stems").value, format: $("format").value,
                    tta: $("tta").checked ? "1" : "0", int8: $("int8").checked && options.int8 ? "1" : "0"};
  for (const file of files) {  // one after the other, so that the queue keeps the order chosen
    const card = newCard(file.name);
    card.querySelector(".status").textContent = "Uploading…";
    try {
      const job = await api(`/api/jobs?${new URLSearchParams({name: file.name, ...settings})}`,
                            {method: "POST", body: file});
      cards.set(job.id, card);
      update(card, job);
    } catch (error) {
      card.dataset.status = "failed";
      card.querySelector(".status").textContent = error.message;
      const dismiss = element("button", {type: "button"}, "Dismiss");
      dismiss.addEventListener("click", () => card.remove());
      card.querySelector(".actions").replaceChildren(dismiss);
    }
  }
}

function newCard(name) {
  const card = element("article", {class: "job", "data-status": "uploading"},
    element("div", {class: "job-head"},
      element("h2", {}, name), element("span", {class: "settings"}), element("span", {class: "actions"})),
    element("div", {class: "bar"}, element("div", {class: "fill"})),
    element("p", {class: "status", role: "status"}),
    element("div", {class: "results"}));
  $("jobs").prepend(card);
  return card;
}

function update(card, job) {
  card.dataset.id = job.id;
  card.dataset.status = job.status;
  const s = job.settings;
  card.querySelector(".settings").textContent = [s.model, s.two_stems ? `${s.two_stems} + no_${s.two_stems}` : "",
    s.file_format, s.tta ? "TTA" : "", s.quantize || ""].filter(Boolean).join(" · ");
  const percent = Math.floor(100 * job.fraction);
  const status = {
    queued: `Waiting: number ${job.position} in line`,
    loading: "Loading the model…",
    separating: `Separating: ${percent}%` + (job.seconds_left == null ? "" : `, about ${duration(job.seconds_left)} left`),
    finishing: "Drawing the spectrograms…",
    done: `Done in ${duration(job.wall_seconds)}`,
    failed: job.error,
    cancelled: "Cancelled",
  }[job.status];
  card.querySelector(".status").textContent = status;
  card.querySelector(".fill").style.width = `${job.status === "done" ? 100 : percent}%`;

  const active = ACTIVE.includes(job.status);
  const actions = card.querySelector(".actions");
  if (actions.dataset.active !== String(active)) {
    actions.dataset.active = String(active);
    const button = element("button", {type: "button", class: active ? "cancel" : "remove"}, active ? "Cancel" : "Remove");
    button.addEventListener("click", () => (active ? api(`/api/jobs/${job.id}/cancel`, {method: "POST"})
                                                   : api(`/api/jobs/${job.id}`, {method: "DELETE"})).then(poll));
    actions.replaceChildren(button);
  }
  if (job.status === "done" && !card.querySelector(".stem")) showResults(card, job);
}

function showResults(card, job) {
  const url = (key) => `/api/jobs/${job.id}/files/${encodeURIComponent(key)}`;
  const rows = ["mixture", ...job.stems].map((name) => {
    const player = element("audio", {controls: "", preload: "metadata", src: url(name)});
    const links = name === "mixture" ? [] : [element("a", {href: url(name), download: "", "data-stem": name}, "Download")];
    return element("div", {class: "stem", "data-stem": name},
      element("div", {class: "stem-name"}, name, ...links), player, spectrogram(url(`${name}.png`), name, job.axes));
  });
  const zip = element("a", {class: "button", href: url("stems.zip"), download: "", "data-stem": "zip"},
                      "Download all stems (zip)");
  card.querySelector(".results").replaceChildren(...rows, zip);
  // playing one player pauses the others of the song and starts where they were: switch stems to compare them
  const players = [...card.querySelectorAll("audio")];
  for (const player of players) {
    player.addEventListener("play", () => {
      for (const other of players) {
        if (other !== player && !other.paused) {
          player.currentTime = other.currentTime;
          other.pause();
        }
      }
    });
  }
}

// the picture with light axes: frequency ticks over its left edge, time ticks in a strip below it
function spectrogram(src, name, axes) {
  const ticks = (kind, side) => axes[kind].map(([position, label]) =>
    element("span", {class: kind, style: `${side}: ${(100 * position).toFixed(2)}%`}, label));
  return element("figure", {class: "spectrogram"},
    element("div", {class: "plot"},
      element("img", {src, alt: `spectrogram of ${name}`}), ...ticks("frequency", "bottom")),
    element("div", {class: "time-axis"}, ...ticks("time", "left")));
}

async function poll() {
  clearTimeout(poll.timer);
  try {
    const jobs = await api("/api/jobs");
    const listed = new Set(jobs.map((job) => job.id));
    for (const job of jobs) update(cards.get(job.id) || cards.set(job.id, newCard(job.name)).get(job.id), job);
    for (const [id, card] of cards) {
      if (!listed.has(id)) { card.remove(); cards.delete(id); }
    }
    $("jobs").dataset.connected = "yes";
  } catch (error) {
    $("jobs").dataset.connected = "no";  // the app stopped: keep the page as it was
  }
  poll.timer = setTimeout(poll, POLL_MS);
}

start();
