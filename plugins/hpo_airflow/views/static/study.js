// The HPO view's study run page (views/study.py): progress, best trial, plots and the trial table;
// it refreshes while the run is live. Plots are drawn with the plotly.js the plugin serves.
"use strict";

(function () {
  const { main, root, airflow, REFRESH_MS, esc, num, duration, path, out, getJson, modelCell, bar, start } =
    window.hpo;
  let finished = -1;
  let wasLive = null;

  const PLOTS = [
    ["history", "Objective value and best so far"],
    ["parallel", "Parallel coordinates"],
    ["importance", "Parameter importances"],
  ];

  function trialRow(t, data) {
    const task = t.task_id ? `${t.task_id}${t.slot !== null ? "[" + t.slot + "]" : ""}` : "";
    const params = Object.entries(t.params).map(([k, v]) => `${esc(k)}=${num(v)}`).join(" ");
    return `<tr class="${t.counted ? "" : "replaced"}" data-trial="${t.number}">
      <td class="num">${t.number}</td><td class="num">${num(t.round)}</td><td class="num">${num(t.slot)}</td>
      <td><span class="badge state-${esc(t.state)}">${esc(t.state)}</span>${t.counted ? "" : ' <span class="muted">replaced</span>'}</td>
      <td class="params">${params}</td><td class="num">${num(t.value)}</td>
      <td class="num">${duration(t.duration_s)}</td><td class="num">${num(t.attempt)}</td>
      <td class="reason">${esc(t.fail_reason || "")}</td><td class="num">${num(t.retry_of)}</td>
      <td>${out(t.task_url, task, "_top")}</td>
      <td>${out(t.mlflow_url, "MLflow run", "_blank")}</td></tr>`;
  }

  function renderStudy(data) {
    const c = data.counts;
    const liveNote = data.live ? `<span class="live" id="live">live · refreshing every ${REFRESH_MS / 1000} s</span>` : "";
    const best = data.best_trial === null ? "no completed trial yet" :
      `${num(data.best_value)} <span class="muted">(${esc(data.metric)}, ${esc(data.direction)}; trial ${data.best_trial})</span>
       <span class="params">${Object.entries(data.best_params || {}).map(([k, v]) => `${esc(k)}=${num(v)}`).join(" ")}</span>`;
    const runLink = out(`${airflow}/dags/${path(data.dag_id, "runs", data.run_id)}`, "DAG run in Airflow", "_top");
    const facts = `<dl class="facts">
      <dt>Progress</dt><dd id="progress-text">${c.complete + c.pruned + c.failed} / ${data.n_trials ?? c.counted} trials finished:
        ${c.complete} complete, ${c.pruned} pruned, ${c.failed} failed, ${c.running} running · round ${data.rounds_run} of at most ${data.max_rounds}</dd>
      <dt>Best</dt><dd id="best">${best}</dd>
      <dt>Registered model</dt><dd>${modelCell(data.registered_model)}</dd>
      <dt>Stop reason</dt><dd>${esc(data.stop_reason || "–")}</dd>
      <dt>Outcome</dt><dd>${esc(data.outcome || "–")}</dd>
      <dt>Settings</dt><dd>batch ${num(data.batch_size)}, ${num(data.trials_per_task)} trial(s) per task · study ${esc(data.study_name)}</dd>
      <dt>Links</dt><dd>${runLink} · ${data.parent_run_url ? out(data.parent_run_url, "MLflow parent run", "_blank") : "MLflow UI address unknown"}</dd>
    </dl>`;
    let table = document.getElementById("trials");
    const tableHtml = `<table id="trials"><thead><tr><th>#</th><th>Round</th><th>Slot</th><th>State</th><th>Params</th>
      <th>Value</th><th>Duration</th><th>Attempt</th><th>Failure reason</th><th>Retry of</th><th>Task</th><th>MLflow</th></tr></thead>
      <tbody>${data.trials.map((t) => trialRow(t, data)).join("")}</tbody></table>`;
    const head = `<h1>${esc(data.dag_id)} · ${esc(data.run_id)}</h1>
      <p><span class="badge state-${esc(data.airflow_state)}" id="run-state">${esc(data.airflow_state || "unknown")}</span> ${liveNote}</p>
      ${bar(data)}${facts}`;
    if (!table) {
      main.innerHTML = `<div id="head">${head}</div><h2>Plots</h2><div class="plots">` +
        PLOTS.map(([key, title]) => `<div class="plot" id="plot-${key}" aria-label="${title}"><div class="note muted">${title}: loading…</div></div>`).join("") +
        `</div><h2>Trials</h2><div id="table">${tableHtml}</div>`;
    } else {
      document.getElementById("head").innerHTML = head;
      document.getElementById("table").innerHTML = tableHtml;
    }
  }

  async function renderPlots() {
    const figures = await getJson(`${root}/api/dags/${path(main.dataset.dagId, "runs", main.dataset.runId)}/plots`);
    for (const [key, title] of PLOTS) {
      const el = document.getElementById(`plot-${key}`);
      const figure = figures[key];
      if (!figure) {
        if (el.dataset.drawn) window.Plotly.purge(el);
        delete el.dataset.drawn;
        el.innerHTML = `<div class="note muted">${esc(title)}: ${esc(figures.notes[key] || "not available yet")}</div>`;
        continue;
      }
      const layout = Object.assign({}, figure.layout, { autosize: true, margin: { l: 60, r: 20, t: 40, b: 50 } });
      if (!el.dataset.drawn) el.innerHTML = "";
      await window.Plotly.react(el, figure.data, layout, { responsive: true, displaylogo: false });
      el.dataset.drawn = "1";
    }
  }

  async function refreshStudy() {
    const data = await getJson(`${root}/api/dags/${path(main.dataset.dagId, "runs", main.dataset.runId)}`);
    renderStudy(data);
    const count = data.counts.complete + data.counts.pruned + data.counts.failed;
    if (count !== finished || (wasLive && !data.live)) {
      finished = count;
      await renderPlots();
    }
    wasLive = data.live;
    return data.live;
  }

  start(refreshStudy, "No study for this run yet: has its start task run?");
})();
