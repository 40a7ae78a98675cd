// The dashboard: a thin page over the REST API (the same routes the CLI uses).
// Routes: #/ lists jobs, #/jobs/<id> shows one job with live charts fed by its SSE stream.
"use strict";

const KEY_STORAGE = "finetune-api-key";
const POLL_MS = 3000;

const $ = (selector) => document.querySelector(selector);
const views = ["key-view", "jobs-view", "job-view"];

// What the page shows, readable by tests: the chart objects and the metric rows they plot.
const dashboard = (window.dashboard = { charts: {}, rows: [], job: null });
let viewAbort = null; // aborts the current view's stream and timers on navigation

class Unauthorized extends Error {}

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE);
}

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (apiKey()) headers.Authorization = `Bearer ${apiKey()}`;
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) throw new Unauthorized();
  if (!response.ok) {
    const body = await response.json().catch(() => ({}));
    const detail = Array.isArray(body.detail)
      ? body.detail.map((d) => `${d.field}: ${d.message}`).join("; ")
      : body.detail;
    throw new Error(`${response.status} ${body.error || ""}: ${detail || response.statusText}`);
  }
  return response;
}

const getJSON = async (path) => (await api(path)).json();
const postJSON = async (path, body) =>
  (await api(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body ?? {}),
  })).json();

function show(view) {
  for (const id of views) $(`#${id}`).hidden = id !== view;
  $("#forget-key").hidden = !apiKey();
}

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

const fmtTime = (iso) => new Date(iso).toLocaleString();
const fmtBytes = (n) => (n > 1 << 20 ? `${(n / (1 << 20)).toFixed(1)} MiB` : `${(n / 1024).toFixed(0)} KiB`);

function progressBar(job) {
  const percent = job.total_steps ? (100 * job.current_step) / job.total_steps : 0;
  const bar = element("div", { class: "progress" }, element("div"));
  bar.firstChild.style.width = `${percent}%`;
  return bar;
}

// --- key ------------------------------------------------------------------------------------
function askForKey(message = "") {
  show("key-view");
  $("#key-error").textContent = message;
  $("#key-input").focus();
}

$("#key-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY_STORAGE, $("#key-input").value.trim());
  $("#key-input").value = "";
  route();
});

$("#forget-key").addEventListener("click", () => {
  sessionStorage.removeItem(KEY_STORAGE);
  route();
});

// --- jobs list --------------------------------------------------------------------------------
async function showJobs(signal) {
  show("jobs-view");
  const refresh = async () => {
    const page = await getJSON("/jobs?limit=100");
    const body = $("#jobs-table tbody");
    body.replaceChildren(
      ...page.items.map((job) =>
        element(
          "tr",
          { "data-job": job.id },
          element("td", { class: "mono" }, element("a", { href: `#/jobs/${job.id}` }, job.id)),
          element("td", {}, element("span", { class: `status ${job.status}` }, job.status)),
          element("td", {}, progressBar(job), `${job.current_step}/${job.total_steps ?? "?"}`),
          element("td", {}, fmtTime(job.created_at)),
          element("td", { class: "mono" }, job.spec.base_model),
        ),
      ),
    );
    $("#jobs-empty").hidden = page.items.length > 0;
  };
  await refresh();
  poll(signal, refresh);
}

function poll(signal, task) {
  const timer = setInterval(() => task().catch(handleError), POLL_MS);
  signal.addEventListener("abort", () => clearInterval(timer));
}

// --- one job ----------------------------------------------------------------------------------
function makeChart(container, series, { scales = { y: {} }, axes = [{}] } = {}) {
  const width = Math.max(container.clientWidth - 10, 320);
  const options = {
    width,
    height: 220,
    scales: { x: { time: false }, ...scales },
    axes: [{ label: "step" }, ...axes],
    series: [{ label: "step" }, ...series],
    legend: { live: true },
  };
  return new uPlot(options, [[], ...series.map(() => [])], container);
}

// A preference method's figures (named as TRL's DPO logs them), charted once the job's rows carry
// any: the rewards of the chosen and rejected replies, and how often and by how much the chosen
// one wins. Training as lines, the eval set's dashed with points; other methods' figures are
// only in the logs.
const EVAL_STYLE = { width: 2, dash: [5, 4], spanGaps: true, points: { show: true, size: 5 } };
const FIGURE_CHARTS = {
  rewards: {
    figure: "#figure-rewards",
    container: "#chart-rewards",
    series: [
      { figure: "rewards/chosen", label: "chosen", stroke: "#2e8b57" },
      { figure: "rewards/rejected", label: "rejected", stroke: "#c0392b" },
      { figure: "eval_rewards/chosen", label: "eval chosen", stroke: "#2e8b57", ...EVAL_STYLE },
      { figure: "eval_rewards/rejected", label: "eval rejected", stroke: "#c0392b", ...EVAL_STYLE },
    ],
  },
  preference: {
    figure: "#figure-preference",
    container: "#chart-preference",
    series: [
      { figure: "rewards/accuracies", label: "accuracy", stroke: "#2f6fd6", scale: "accuracy" },
      { figure: "rewards/margins", label: "margin", stroke: "#e67e22", scale: "margin" },
      { figure: "eval_rewards/accuracies", label: "eval accuracy", stroke: "#2f6fd6", scale: "accuracy", ...EVAL_STYLE },
      { figure: "eval_rewards/margins", label: "eval margin", stroke: "#e67e22", scale: "margin", ...EVAL_STYLE },
    ],
    scales: { accuracy: { range: [0, 1] }, margin: {} },
    axes: [
      { scale: "accuracy", label: "accuracy" },
      { scale: "margin", label: "margin", side: 1, grid: { show: false } },
    ],
  },
};
const CHARTED_FIGURES = Object.values(FIGURE_CHARTS).flatMap((chart) => chart.series.map((s) => s.figure));

function createFigureCharts() {
  for (const [name, chart] of Object.entries(FIGURE_CHARTS)) {
    $(chart.figure).hidden = false; // first, so that the chart takes the figure's width
    const series = chart.series.map(({ figure, ...style }) => ({ width: 1.5, ...style }));
    dashboard.charts[name] = makeChart($(chart.container), series, chart);
  }
}

function createCharts() {
  for (const id of ["#chart-loss", "#chart-lr", "#chart-throughput"]) $(id).replaceChildren();
  for (const chart of Object.values(FIGURE_CHARTS)) {
    $(chart.figure).hidden = true; // until the job's rows carry the figures
    $(chart.container).replaceChildren();
  }
  dashboard.charts = {
    loss: makeChart($("#chart-loss"), [
      { label: "loss", stroke: "#2f6fd6", width: 1.5 },
      { label: "eval loss", stroke: "#e67e22", width: 2, spanGaps: true, points: { show: true, size: 6 } },
    ]),
    learningRate: makeChart($("#chart-lr"), [{ label: "learning rate", stroke: "#8e44ad", width: 1.5 }]),
    throughput: makeChart($("#chart-throughput"), [{ label: "tokens/s", stroke: "#2e8b57", width: 1.5 }]),
  };
}

function drawCharts() {
  const rows = dashboard.rows;
  const steps = rows.map((r) => r.step);
  const { loss, learningRate, throughput } = dashboard.charts;
  loss.setData([steps, rows.map((r) => r.loss), rows.map((r) => r.eval_loss)]);
  learningRate.setData([steps, rows.map((r) => r.learning_rate)]);
  throughput.setData([steps, rows.map((r) => r.tokens_per_second)]);
  const charted = (r) => r.figures && CHARTED_FIGURES.some((name) => name in r.figures);
  if (!dashboard.charts.rewards && rows.some(charted)) createFigureCharts();
  for (const [name, chart] of Object.entries(FIGURE_CHARTS)) {
    const figures = chart.series.map((s) => rows.map((r) => r.figures?.[s.figure] ?? null));
    dashboard.charts[name]?.setData([steps, ...figures]);
  }
}

function addRows(newRows) {
  const last = dashboard.rows.length ? dashboard.rows[dashboard.rows.length - 1].step : -1;
  dashboard.rows.push(...newRows.filter((r) => r.step > last));
  drawCharts();
}

// An evaluation result for a step already drawn: the stream sends that step's row again.
function updateRow(row) {
  const index = dashboard.rows.findIndex((r) => r.step === row.step);
  if (index >= 0) dashboard.rows[index] = row;
  drawCharts();
}

async function loadAllRows(jobId) {
  let rows = [];
  let after = null;
  for (;;) {
    const query = after === null ? "" : `&after_step=${after}`;
    const page = await getJSON(`/jobs/${jobId}/logs?limit=10000${query}`);
    rows = rows.concat(page.items);
    if (!page.next) return rows;
    after = page.next;
  }
}

// EventSource can't send an Authorization header, so the stream is read with fetch.
async function streamMetrics(jobId, signal) {
  for (;;) {
    const last = dashboard.rows.length ? dashboard.rows[dashboard.rows.length - 1].step : -1;
    try {
      const response = await api(`/jobs/${jobId}/logs?after_step=${last}`, {
        headers: { Accept: "text/event-stream" },
        signal,
      });
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value.replaceAll("\r\n", "\n");
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const event = parseEvent(block);
          if (event.name === "end") {
            refreshJob(jobId).catch(handleError);
            return;
          }
          if (event.name === "metric") addRows([event.data]);
          if (event.name === "eval") updateRow(event.data);
        }
      }
    } catch (error) {
      if (signal.aborted) return;
      if (error instanceof Unauthorized) throw error;
    }
    await new Promise((resolve) => setTimeout(resolve, 2000)); // reconnect from the last step
  }
}

function parseEvent(block) {
  let name = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) name = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
  }
  return { name, data: data.length ? JSON.parse(data.join("\n")) : null };
}

// How the job teaches (its spec's method: supervised, or dpo and its beta) and the earlier job's
// adapter it starts from, if any (init_from).
function methodLine(spec) {
  const method = spec.method || { type: "supervised" };
  const beta = method.type === "dpo" && method.dpo ? ` (beta ${method.dpo.hyperparameters.beta})` : "";
  const line = [`method ${method.type}${beta}`];
  if (spec.init_from) {
    const { job, checkpoint } = spec.init_from;
    line.push(" · from ", element("a", { href: `#/jobs/${job}` }, element("code", {}, job)), ` ${checkpoint || "final adapter"}`);
  }
  return line;
}

async function refreshJob(jobId) {
  const [job, checkpoints, events, exports] = await Promise.all([
    getJSON(`/jobs/${jobId}`),
    getJSON(`/jobs/${jobId}/checkpoints`),
    getJSON(`/jobs/${jobId}/events?limit=1000`),
    getJSON(`/jobs/${jobId}/exports`),
  ]);
  dashboard.job = job;
  $("#job-id").textContent = job.id;
  const status = $("#job-status");
  const stopping = job.cancel_requested ? "cancelling" : job.pause_requested ? "pausing" : null;
  status.textContent = stopping && job.status === "running" ? stopping : job.status;
  status.className = `status ${job.status}`;
  $("#job-progress-bar").style.width = job.total_steps ? `${(100 * job.current_step) / job.total_steps}%` : "0";
  $("#job-summary").textContent =
    `step ${job.current_step}/${job.total_steps ?? "?"} · ${job.spec.base_model} on ${job.spec.dataset.source}` +
    ` · attempt ${job.attempts} · created ${fmtTime(job.created_at)}`;
  $("#job-method").replaceChildren(...methodLine(job.spec));
  // a queued job's place in line and what it waits for, as the dispatcher sees it (GET /jobs/{id})
  $("#job-waiting").textContent = job.waiting_for
    ? `${job.spec.priority} priority · ${job.queue_position ? `place ${job.queue_position} in line` : "on its way to a worker"} · waiting for ${job.waiting_for}`
    : "";
  $("#job-error").textContent = job.error || "";
  // Which actions a job allows now is the server's rule (app/lifecycle.py): the job says.
  for (const action of ["cancel", "pause", "resume"]) {
    $(`#${action}-button`).disabled = !job.actions.includes(action);
  }

  $("#checkpoints-table tbody").replaceChildren(
    ...checkpoints.items.map((c) =>
      element(
        "tr",
        {},
        element("td", { class: "mono" }, c.name),
        element("td", {}, String(c.step)),
        element("td", {}, fmtBytes(c.size_bytes)),
        element(
          "td",
          {},
          element("button", { onclick: () => download(`/jobs/${job.id}/checkpoints/${c.name}/download`, `${job.id}-${c.name}.zip`) }, "Download"),
        ),
      ),
    ),
  );
  for (const select of [$("#resume-checkpoint"), $("#sample-checkpoint")]) {
    const chosen = select.value;
    select.replaceChildren(select.firstElementChild, ...checkpoints.items.map((c) => element("option", { value: c.name }, c.name)));
    select.value = checkpoints.items.some((c) => c.name === chosen) ? chosen : "";
  }
  $("#adapter-button").hidden = !job.adapter_sha256;
  $("#export-button").hidden = job.status !== "succeeded";
  // Exports a worker makes: the merged model, downloadable once it is made.
  $("#exports").replaceChildren(
    ...exports.items.map((x) =>
      element(
        "li",
        {},
        `${x.format} of ${x.checkpoint || "the final adapter"}: ${x.status}`,
        x.status === "succeeded"
          ? element("button", { onclick: () => download(`/jobs/${job.id}/exports/${x.id}/download`, x.filename) }, `Download (${fmtBytes(x.size_bytes)})`)
          : x.error
            ? element("span", { class: "error" }, ` ${x.error}`)
            : "",
      ),
    ),
  );

  $("#events").replaceChildren(
    ...events.items
      .slice()
      .reverse()
      .map((e) => element("li", {}, element("time", {}, fmtTime(e.time)), e.message)),
  );
  return job;
}

async function download(path, filename) {
  const blob = await (await api(path)).blob();
  const link = element("a", { href: URL.createObjectURL(blob), download: filename });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
}

async function showJob(jobId, signal) {
  show("job-view");
  dashboard.rows = [];
  $("#sample-output").textContent = "";
  $("#action-message").textContent = "";
  await refreshJob(jobId);
  createCharts();
  addRows(await loadAllRows(jobId));
  dashboard.ready = true;
  poll(signal, () => refreshJob(jobId));
  // For a finished job the stream sends any rows written since and ends at once.
  streamMetrics(jobId, signal).catch(handleError);
}

async function jobAction(action) {
  const job = dashboard.job;
  const message = $("#action-message");
  message.textContent = "";
  try {
    if (action === "cancel" || action === "pause") await postJSON(`/jobs/${job.id}/${action}`);
    else {
      const checkpoint = $("#resume-checkpoint").value;
      await postJSON(`/jobs/${job.id}/resume`, checkpoint ? { checkpoint } : {});
    }
    const updated = await refreshJob(job.id);
    message.textContent = action === "resume" ? `queued from ${updated.resume_from || "the start"}` : `${action} requested`;
    if (action === "resume") {
      // the run continues from the checkpoint: later rows were dropped, reload and stream again
      route();
    }
  } catch (error) {
    if (error instanceof Unauthorized) throw error;
    message.textContent = error.message;
  }
}

$("#cancel-button").addEventListener("click", () => jobAction("cancel").catch(handleError));
$("#pause-button").addEventListener("click", () => jobAction("pause").catch(handleError));
$("#resume-button").addEventListener("click", () => jobAction("resume").catch(handleError));
$("#adapter-button").addEventListener("click", () =>
  download(`/jobs/${dashboard.job.id}/adapter`, `${dashboard.job.id}-adapter.zip`).catch(handleError),
);

$("#export-button").addEventListener("click", () =>
  postJSON(`/jobs/${dashboard.job.id}/exports`, { format: "merged" })
    .then(() => refreshJob(dashboard.job.id))
    .catch(handleError),
);

$("#sample-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const output = $("#sample-output");
  output.textContent = "generating…";
  const checkpoint = $("#sample-checkpoint").value;
  try {
    let sample = await postJSON(`/jobs/${dashboard.job.id}/generate`, {
      prompt: $("#sample-prompt").value,
      ...(checkpoint ? { checkpoint } : {}),
    });
    while (!["succeeded", "failed"].includes(sample.status)) {
      await new Promise((resolve) => setTimeout(resolve, 1000));
      sample = await getJSON(`/jobs/${dashboard.job.id}/samples/${sample.id}`);
    }
    dashboard.lastSample = sample;
    output.textContent =
      sample.status === "succeeded" ? sample.completion || "(an empty answer)" : `failed: ${sample.error}`;
  } catch (error) {
    output.textContent = error.message;
  }
});

// --- routing --------------------------------------------------------------------------------
function handleError(error) {
  if (error instanceof Unauthorized) {
    if (viewAbort) viewAbort.abort();
    askForKey(apiKey() ? "That key was not accepted." : "");
    sessionStorage.removeItem(KEY_STORAGE);
    return;
  }
  console.error(error);
}

function route() {
  if (viewAbort) viewAbort.abort();
  viewAbort = new AbortController();
  dashboard.ready = false;
  const match = location.hash.match(/^#\/jobs\/(job_[0-9a-f]+)$/);
  const page = match ? showJob(match[1], viewAbort.signal) : showJobs(viewAbort.signal);
  page.catch(handleError);
}

window.addEventListener("hashchange", route);
route();
