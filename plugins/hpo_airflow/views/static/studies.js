// The HPO view's study list (views/studies.py): every study run the user may read, or one DAG's.
"use strict";

(function () {
  const { main, root, esc, num, when, path, getJson, countsCell, modelCell, bar, start } = window.hpo;

  async function renderList() {
    const dag = main.dataset.dagId;
    const data = await getJson(`${root}/api/studies` + (dag ? `?dag_id=${encodeURIComponent(dag)}` : ""));
    const title = dag ? `HPO studies of ${esc(dag)}` : "HPO studies";
    if (dag && data.is_study_dag === false) {
      main.innerHTML = `<h1>${title}</h1><p class="muted">This DAG is not an HPO study.</p>`;
      return false;
    }
    const rows = data.studies.map((r) => `<tr data-run="${esc(r.run_id)}">
      <td>${esc(r.dag_id)}</td>
      <td><a href="${root}/dags/${path(r.dag_id, "runs", r.run_id)}">${esc(r.run_id)}</a></td>
      <td><span class="badge state-${esc(r.airflow_state)}">${esc(r.airflow_state || "unknown")}</span></td>
      <td>${countsCell(r)}${bar(r)}</td>
      <td class="num">${num(r.best_value)} <span class="muted">${esc(r.metric)}${r.best_trial !== null ? " · trial " + r.best_trial : ""}</span></td>
      <td>${modelCell(r.registered_model)}</td>
      <td class="muted">${when(r.started_at)}</td></tr>`).join("");
    main.innerHTML = `<h1>${title}</h1>
      <p class="muted">Study runs read from the Optuna storage; open a run for its trials and plots.</p>
      ${data.studies.length ? `<table id="studies"><thead><tr><th>DAG</th><th>Run</th><th>State</th>
        <th>Trials done / budget</th><th>Best value</th><th>Registered model</th><th>Started</th></tr></thead>
        <tbody>${rows}</tbody></table>` : '<p id="studies-empty">No study has run yet.</p>'}`;
    return data.studies.some((r) => r.live);
  }

  start(renderList, "Not found.");
})();
