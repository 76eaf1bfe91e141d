/* The console's charts (Chart.js, served from this package) and the run page's live view. */
"use strict";

const PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
                 "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];
const POLL_MS = 2000;

function colour(index) { return PALETTE[index % PALETTE.length]; }

function lineChart(id, xTitle, yTitle) {
  return new Chart(document.getElementById(id), {
    type: "line",
    data: { datasets: [] },
    options: {
      animation: false,
      parsing: false,
      interaction: { mode: "nearest", intersect: false },
      scales: {
        x: { type: "linear", title: { display: true, text: xTitle }, ticks: { precision: 0 } },
        y: { title: { display: true, text: yTitle } },
      },
    },
  });
}

/* Replace a chart's series by `series` ({name: [[x, y], ...]}), keeping hidden ones hidden. */
function setSeries(chart, series) {
  const hidden = new Set(chart.data.datasets.filter((d, i) => !chart.isDatasetVisible(i))
                                            .map((d) => d.label));
  chart.data.datasets = Object.entries(series).map(([name, points], index) => ({
    label: name,
    data: points.filter(([, y]) => y !== null).map(([x, y]) => ({ x: x, y: y })),
    borderColor: colour(index),
    backgroundColor: colour(index),
    hidden: hidden.has(name),
  }));
  chart.update("none");
}

/* The run page: poll the run's files (through the console) and redraw what changed. */
function followRun(progressUrl, resultsUrl, filesUrl) {
  let metrics, epsilon, hadBaselines = null;
  document.addEventListener("DOMContentLoaded", () => {
    metrics = lineChart("metrics-chart", "round", "test metric");
    epsilon = lineChart("epsilon-chart", "round", "epsilon (sample-level, per client)");
    poll();
  });

  async function poll() {
    try {
      const response = await fetch(progressUrl, { cache: "no-store" });
      if (response.ok) { await show(await response.json()); }
    } finally {
      setTimeout(poll, POLL_MS);
    }
  }

  function showFiles(names) {
    const files = document.getElementById("files");
    if (files.querySelectorAll("a").length === names.length) { return; }
    files.replaceChildren(...names.flatMap((name) => {
      const link = document.createElement("a");
      link.href = filesUrl + name;
      link.textContent = name;
      return [" \u00b7 ", link];
    }));
  }

  async function show(progress) {
    document.getElementById("status").textContent = progress.status;
    document.getElementById("rounds").textContent =
      progress.rounds + "/" + progress.planned_rounds;
    const rounds = progress.metrics.rounds;
    const series = {};
    for (const [name, values] of Object.entries(progress.metrics.series)) {
      series[name] = values.map((value, i) => [rounds[i], value]);
    }
    setSeries(metrics, series);
    setSeries(epsilon, progress.epsilon);
    showFiles(progress.files);
    document.getElementById("metrics-chart").dataset.rounds = rounds.length;
    if (hadBaselines === false && progress.has_baselines) {
      const response = await fetch(resultsUrl, { cache: "no-store" });
      if (response.ok) { document.getElementById("results").innerHTML = await response.text(); }
    }
    hadBaselines = progress.has_baselines;
  }
}

/* The compare page: one point per run, epsilon against the headline metric. */
function privacyUtilityChart(id, points) {
  document.addEventListener("DOMContentLoaded", () => {
    new Chart(document.getElementById(id), {
      type: "scatter",
      data: {
        datasets: points.map((point, index) => ({
          label: point.run + " (" + point.metric
                 + (point.level === "client" ? ", client-level epsilon" : "") + ")",
          data: [{ x: point.epsilon, y: point.value }],
          backgroundColor: colour(index),
          pointRadius: 6,
        })),
      },
      options: {
        animation: false,
        scales: {
          x: { title: { display: true, text: "epsilon: max over clients (sample-level DP)" } },
          y: { title: { display: true, text: "headline metric, last round" } },
        },
      },
    });
    document.getElementById(id).dataset.points = points.length;
  });
}
