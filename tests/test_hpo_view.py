"""The HPO plugin on the real Airflow API server: the plugin as Airflow lists it, the view and its
JSON API behind Airflow's auth, the extra links, the plots and back-links on MLflow; then the same
in headless Chromium (Debian's ``chromium`` driven by Playwright): the view inside the UI watching
a run until it ends, a trial task's extra link opening its MLflow run, and the trigger form.

One study run serves every test of the file: the module's fixture triggers it, the first browser
test watches it live, the others read it once it has finished (:meth:`Ui.finished`).
Screenshots go to ``test-artifacts/browser/`` (git-ignored; ``HPO_TEST_ARTIFACTS`` moves it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import mlflow
import pytest
import requests
from airflow.models.taskinstancekey import TaskInstanceKey
from airflow.serialization.serialized_objects import DagSerialization
from hpo_airflow import build_study_dag, links
from hpo_airflow.backends.kubernetes_operator import SlotPodOperator
from playwright.sync_api import Browser, Locator, Page, sync_playwright

from hpo_core.deployment import Deployment
from hpo_core.keys import Tag
from hpo_core.study.progress import find_study, load_progress
from hpo_core.study.state import load_run
from tests.fixtures_core import ROOT, make_spec, study_mapping, write_study
from tests.services import AirflowClient, AirflowDeployment
from tests.ui_auth import OUTSIDER

pytestmark = pytest.mark.slow

NAME = "ui_study"
DAG_ID = f"hpo_{NAME}"
#: Six trials in two rounds of three tasks (one trial each): enough for importances. Each sleeps 3 s
#: (``seconds``) so that a browser watches the run change; the objective logs a model to register.
STUDY = {
    "objective": "tests.chaos_objectives:slow_first_attempt",
    "search_space": {
        "x": {"type": "float", "low": -5.0, "high": 5.0},
        "y": {"type": "float", "low": -5.0, "high": 5.0},
        "seconds": {"type": "categorical", "choices": [3]},
    },
    "budget": {"n_trials": 6, "batch_size": 3, "max_rounds": 2, "max_batch_size": 4},
    "trial": {"retries": 0, "retry_delay": 0, "execution_timeout": 120},
    "mlflow": {"experiment": NAME, "registered_model": NAME},
}
VIEW_PATHS = (
    "/hpo/",
    "/hpo/dags/{dag}",
    "/hpo/dags/{dag}/runs/{run}",
    "/hpo/api/studies",
    "/hpo/api/dags/{dag}/runs/{run}",
    "/hpo/api/dags/{dag}/runs/{run}/plots",
    "/hpo/links/mlflow-run?dag_id={dag}&run_id={run}&task_id=round_1.evaluate&map_index=0",
    "/hpo/links/registered-model?dag_id={dag}&run_id={run}",
)


@dataclass
class Ui:
    """The shared Airflow with the UI study, and the run the fixture triggered."""

    airflow: AirflowDeployment
    deployment: Deployment
    run_id: str
    hpo_env: dict[str, str]
    _state: str | None = field(default=None, repr=False)

    @property
    def client(self) -> AirflowClient:
        return self.airflow.client

    def finished(self) -> str:
        """Wait (once) until the run has ended, which it must do in success; its run id."""
        if self._state is None:
            self._state = self.client.wait_for_run(DAG_ID, self.run_id, timeout=420)
        assert self._state == "success", f"the study run {self.run_id} ended {self._state}"
        return self.run_id

    def paths(self) -> list[str]:
        return [p.format(dag=DAG_ID, run=self.run_id) for p in VIEW_PATHS]

    def outsider(self) -> AirflowClient:
        """A client signed in as the user whom the auth manager denies the ``hpo_ui_*`` DAGs."""
        passwords = json.loads((self.airflow.home / "simple_auth_manager_passwords.json").read_text())
        return AirflowClient(self.airflow.api_url, username=OUTSIDER, password=passwords[OUTSIDER])

    def study_json(self) -> dict[str, Any]:
        return dict(self.client._json("GET", f"/hpo/api/dags/{DAG_ID}/runs/{self.finished()}"))


@pytest.fixture(scope="module")
def ui(airflow: AirflowDeployment, airflow_dags_folder: Path, hpo_env: dict[str, str]) -> Ui:
    """The UI study in the shared Airflow, and a run of it triggered (not waited for)."""
    write_study(airflow_dags_folder / "studies", study_mapping(name=NAME, **STUDY))
    shutil.copy(ROOT / "dags" / "hpo_studies.py", airflow_dags_folder / "hpo_studies.py")
    client = airflow.client
    parsed = client.wait_for_dag(DAG_ID, timeout=180, fileloc="hpo_studies.py")
    assert parsed.dag is not None, parsed.import_errors
    client.unpause(DAG_ID)
    return Ui(airflow, Deployment.from_env(hpo_env), client.trigger(DAG_ID), hpo_env)


def _secrets(env: dict[str, str]) -> list[str]:
    """Strings that must never reach a page or its JSON."""
    return [env["HPO_STORAGE_URL"], env["AWS_SECRET_ACCESS_KEY"], env["AWS_ACCESS_KEY_ID"], "postgresql"]


# --- the links on the serialized DAG (what the API server computes; no server needed) ---------


@pytest.mark.parametrize("backend", ["local", "kubernetes"])
def test_serialized_slot_task_has_the_live_mlflow_run_link_per_map_index(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The plugin's links on the deserialized tasks (not the XCom ones pushed at task end), on both
    backends, per map index; the plugin names the pod operator without importing the provider."""
    monkeypatch.setenv("HPO_WORKER_BACKEND", backend)
    # As the API server reads a DAG (SerializedDagModel.load_op_links): a class attribute that an
    # in-process dag.test() or task clear earlier in this session leaves False.
    monkeypatch.setattr(DagSerialization, "_load_operator_extra_links", True)
    dag = DagSerialization.from_dict(DagSerialization.to_dict(build_study_dag(make_spec())))
    evaluate, finalize = dag.get_task("round_1.evaluate"), dag.get_task("finalize")
    assert evaluate.extra_links == ["MLflow run"]
    assert sorted(finalize.extra_links) == ["Registered model", "Study"]
    assert isinstance(evaluate.operator_extra_link_dict["MLflow run"], links.MlflowRunLink)
    key = TaskInstanceKey(
        dag_id=dag.dag_id, task_id="round_1.evaluate", run_id="manual__1", try_number=1, map_index=3
    )
    assert evaluate.operator_extra_link_dict["MLflow run"].get_link(evaluate, ti_key=key) == (
        "/hpo/links/mlflow-run?dag_id=hpo_quadratic&run_id=manual__1&task_id=round_1.evaluate&map_index=3"
    )
    stand_in = links.SLOT_POD_OPERATOR
    assert (stand_in.__name__, stand_in.__module__) == (SlotPodOperator.__name__, SlotPodOperator.__module__)


# --- the plugin, auth, JSON API, links (HTTP) -------------------------------------------------


def test_plugin_is_listed_by_the_api_with_its_views_and_links(ui: Ui) -> None:
    plugins = ui.client._json("GET", "/api/v2/plugins")["plugins"]
    (hpo,) = [p for p in plugins if p["name"] == "hpo"]
    assert [(a["name"], a["url_prefix"]) for a in hpo["fastapi_apps"]] == [("hpo", "/hpo")]
    views = {v["destination"]: v for v in hpo["external_views"]}
    assert set(views) == {"nav", "dag", "dag_run"}
    assert views["nav"]["href"] == "/hpo/" and views["nav"]["nav_top_level"] is True
    assert views["dag_run"]["href"] == "/hpo/dags/{DAG_ID}/runs/{RUN_ID}"
    assert {link.rsplit(".", 1)[-1].rstrip(" object>") for link in hpo["operator_extra_links"]} == {
        "MlflowRunLink",
        "StudyLink",
        "RegisteredModelLink",
    }
    errors = ui.client._json("GET", "/api/v2/plugins/importErrors")["import_errors"]
    assert not [e for e in errors if "hpo_airflow" in e["source"]], errors


# --- in the browser (headless Chromium) -------------------------------------------------------

CHROMIUM = os.environ.get("HPO_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update"]  # fmt: skip
ARTIFACTS = Path(os.environ.get("HPO_TEST_ARTIFACTS") or ROOT / "test-artifacts") / "browser"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's Chromium, headless, driven by Playwright (no browser download)."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"no Chromium at {CHROMIUM}: run scripts/ensure_chromium.sh, or as root "
            "`apt-get install chromium chromium-driver` (HPO_CHROMIUM names another binary)",
            pytrace=False,
        )
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@dataclass
class Tab:
    """A signed-in browser page and the console errors it collected."""

    page: Page
    errors: list[tuple[str, str]]

    def view_errors(self) -> list[tuple[str, str]]:
        """Errors raised by the HPO view's own pages (the Airflow UI around it may log its own)."""
        return [(text, url) for text, url in self.errors if "/hpo/" in url or url == ""]

    def shot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        print(f"\nscreenshot: {path}")
        return path


@pytest.fixture
def tab(browser: Browser, ui: Ui) -> Iterator[Tab]:
    """A fresh browser context signed in as the admin (the UI's session cookie holds the JWT)."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.add_cookies([{"name": "_token", "value": ui.client.token(), "url": ui.airflow.api_url}])
    page = context.new_page()
    page.set_default_timeout(60_000)
    errors: list[tuple[str, str]] = []
    page.on(
        "console",
        lambda m: m.type == "error" and errors.append((m.text, str(m.location.get("url", "")))),
    )
    page.on("pageerror", lambda e: errors.append((str(e), "")))
    try:
        yield Tab(page, errors)
    finally:
        context.close()


def _view_frame(page: Page) -> Any:
    return page.frame_locator('iframe[title="HPO"]')


def test_browser_view_inside_the_ui_follows_the_run_live_then_shows_its_trials_and_plots(
    tab: Tab, ui: Ui
) -> None:
    """The run's "HPO" tab, opened while the run is live: it refreshes by itself until the run ends,
    then shows the finished study's real trials and draws its plots without a console error."""
    page, run = tab.page, quote(ui.run_id, safe="")
    assert ui.client.dag_run(DAG_ID, ui.run_id)["state"] in ("queued", "running"), (
        "the run ended before the browser could watch it: this test must run first in the module"
    )
    page.goto(f"{ui.airflow.api_url}/dags/{DAG_ID}/runs/{run}/plugin/hpo-run")
    frame = _view_frame(page)
    live = frame.locator("#live")
    live.wait_for(timeout=180_000)
    frame.locator("main").evaluate("m => { window.loadedOnce = true; }")  # gone if the page reloads
    tab.shot("live_run_started")
    seen, self_refreshes = _watch_progress(frame, timeout=360)
    assert frame.locator("#run-state").inner_text() == "success", seen
    assert live.count() == 0
    assert len(seen) >= 3, seen  # the counts changed at least twice while the page stayed open
    assert seen[-1].startswith("6 / 6 trials finished: 6 complete"), seen
    # While the run was live, the page that was first loaded redrew itself at least twice (read
    # then: the UI may mount the tab's frame again when the run ends).
    assert self_refreshes > 2, (self_refreshes, seen)
    ui.finished()
    _check_finished_view(frame, ui)
    tab.shot("finished_study_in_ui")
    # In the navigation: the list of study runs.
    page.goto(f"{ui.airflow.api_url}/plugin/hpo")
    _view_frame(page).locator(f'#studies tr[data-run="{ui.run_id}"]').wait_for()
    tab.shot("study_list_in_ui")
    assert tab.view_errors() == []
    # On its own, the page logs no error at all.
    tab.errors.clear()
    page.goto(f"{ui.airflow.api_url}/hpo/dags/{DAG_ID}/runs/{run}")
    page.locator("#plot-importance .main-svg").first.wait_for()
    assert tab.errors == []


def _watch_progress(frame: Any, *, timeout: float) -> tuple[list[str], int]:
    """The study page's progress line each time it changes, until the run's state is success, and
    the most refreshes seen while the run was live in the page first loaded (0 if reloaded)."""
    seen: list[str] = []
    refreshes = 0
    deadline = time.monotonic() + timeout
    first_page = "m => window.loadedOnce === true ? window.hpoView.refreshes : 0"
    while time.monotonic() < deadline:
        text = frame.locator("#progress-text").inner_text()
        if not seen or seen[-1] != text:
            seen.append(text)
        refreshes = max(refreshes, int(frame.locator("main").evaluate(first_page)))
        if frame.locator("#run-state").inner_text() in ("success", "failed"):
            break
        time.sleep(1)
    return seen, refreshes


def _check_finished_view(frame: Any, ui: Ui) -> None:
    """The trial table shows the storage's trials, and the three plots are drawn."""
    name, _ = find_study(ui.deployment, DAG_ID, ui.run_id)
    trials = load_progress(ui.deployment, name, run_id=ui.run_id).trials
    rows: Locator = frame.locator("#trials tbody tr")
    rows.nth(len(trials) - 1).wait_for()
    shown = rows.evaluate_all("rs => rs.map(r => Number(r.dataset.trial))")
    assert shown == [t.number for t in trials]
    for row, trial in zip(rows.all(), trials, strict=True):
        cells = row.locator("td").all_inner_texts()
        assert cells[3].startswith(trial.state)
        assert (cells[1], cells[2]) == (str(trial.round), str(trial.slot))
        assert all(f"{k}=" in cells[4] for k in trial.params)
    for key in ("history", "parallel", "importance"):
        frame.locator(f"#plot-{key} .main-svg").first.wait_for()
    assert frame.locator("#plot-history .scatterlayer .point").count() >= len(trials)
    assert "6 / 6 trials finished" in frame.locator("#progress-text").inner_text()


# --- the JSON API, auth and links (HTTP), on the finished run ----------------------------------


def test_anonymous_requests_to_the_view_and_its_api_are_refused(ui: Ui) -> None:
    for path in ui.paths():
        response = requests.get(ui.airflow.api_url + path, timeout=30, allow_redirects=False)
        assert response.status_code == 401, (path, response.status_code, response.text[:300])
        assert ui.run_id not in response.text and "trial" not in response.text.lower(), path
    # A forged or expired token is no better than none.
    bad = requests.get(
        ui.airflow.api_url + ui.paths()[4], cookies={"_token": "not-a-jwt"}, timeout=30, allow_redirects=False
    )
    assert bad.status_code in (401, 403) and ui.run_id not in bad.text
    # The assets carry no data and load for anyone (the login page may need none of them).
    assert requests.get(ui.airflow.api_url + "/hpo/vendor/plotly.min.js", timeout=30).status_code == 200


def test_a_user_without_access_to_the_dag_cannot_read_its_study(ui: Ui) -> None:
    ui.finished()
    outsider = ui.outsider()
    # The core API and the view agree: the auth manager denies this user the DAG.
    assert outsider.request("GET", f"/api/v2/dags/{DAG_ID}").status_code == 403
    for path in ui.paths()[1:]:
        if path.startswith("/hpo/api/studies"):
            continue
        response = outsider.request("GET", path, allow_redirects=False)
        assert response.status_code == 403, (path, response.status_code, response.text[:300])
        assert ui.run_id not in response.text, path
    response = outsider.request("GET", f"/hpo/api/studies?dag_id={DAG_ID}")
    assert response.status_code == 403
    listed = outsider._json("GET", "/hpo/api/studies")["studies"]
    assert not [s for s in listed if s["dag_id"].startswith("hpo_ui_")]
    # The same request as the admin reads it.
    assert ui.client.request("GET", ui.paths()[4]).status_code == 200


def test_study_json_is_the_storage_read_model_without_credentials(ui: Ui) -> None:
    data = ui.study_json()
    name, _ = find_study(ui.deployment, DAG_ID, ui.run_id)
    expected = load_progress(ui.deployment, name, run_id=ui.run_id).to_dict()
    apart = {"trials", "registered_model"}
    assert {k: data[k] for k in expected if k not in apart} == {
        k: v for k, v in expected.items() if k not in apart
    }
    assert [(t["number"], t["state"], t["value"]) for t in data["trials"]] == [
        (t["number"], t["state"], t["value"]) for t in expected["trials"]
    ]
    assert data["airflow_state"] == "success" and data["live"] is False
    assert (data["counts"]["counted"], data["counts"]["complete"]) == (6, 6)
    model = data["registered_model"]
    assert model["name"] == NAME and model["aliases"] == ["challenger"]
    mlflow_ui = ui.hpo_env["MLFLOW_TRACKING_URI"]
    assert model["url"] == f"{mlflow_ui}/#/models/{NAME}/versions/{model['version']}"
    run = quote(ui.run_id, safe="")
    for t in data["trials"]:
        task = f"round_{t['round']}.evaluate/mapped/{t['slot']}"
        assert t["task_url"] == f"/dags/{DAG_ID}/runs/{run}/tasks/{task}"
        experiment = data["experiment_id"]
        assert t["mlflow_url"] == f"{mlflow_ui}/#/experiments/{experiment}/runs/{t['mlflow_run_id']}"
    listed = ui.client._json("GET", f"/hpo/api/studies?dag_id={DAG_ID}")["studies"]
    assert [(s["run_id"], s["best_value"], s["registered_model"]["aliases"]) for s in listed] == [
        (ui.run_id, data["best_value"], ["challenger"])
    ]
    figures = ui.client._json("GET", f"/hpo/api/dags/{DAG_ID}/runs/{ui.run_id}/plots")
    assert {"history", "parallel", "importance"} <= set(figures)
    assert figures["notes"] == {}
    for path in ui.paths():
        text = ui.client.request("GET", path, allow_redirects=False).text
        for secret in _secrets(ui.hpo_env):
            assert secret not in text, (path, secret[:12])


def test_extra_links_of_trial_tasks_and_finalize(ui: Ui) -> None:
    data = ui.study_json()
    base = f"/api/v2/dags/{DAG_ID}/dagRuns/{ui.run_id}/taskInstances"
    for trial in data["trials"]:
        path = f"{base}/{trial['task_id']}/links"
        extra = ui.client._json("GET", path, params={"map_index": trial["slot"]})["extra_links"]
        link = extra["MLflow run"]
        query = parse_qs(urlsplit(link).query)
        assert urlsplit(link).path == "/hpo/links/mlflow-run"
        assert (query["task_id"], query["map_index"]) == ([trial["task_id"]], [str(trial["slot"])])
        followed = ui.client.request("GET", link, allow_redirects=False)
        assert followed.status_code == 307, followed.text
        assert followed.headers["location"] == trial["mlflow_url"]
    finalize = ui.client._json("GET", f"{base}/finalize/links")["extra_links"]
    assert finalize["Study"] == f"/dags/{DAG_ID}/runs/{quote(ui.run_id, safe='')}/plugin/hpo-run"
    model = ui.client.request("GET", finalize["Registered model"], allow_redirects=False)
    assert model.headers["location"] == data["registered_model"]["url"]
    # The run's MLflow side: plots on the parent run, links back to Airflow on parent and children.
    client = mlflow.MlflowClient(tracking_uri=ui.hpo_env["MLFLOW_TRACKING_URI"])
    parent = data["parent_run_id"]
    with _env(ui.hpo_env):
        plots = {a.path for a in client.list_artifacts(parent, "plots")}
    names = ("optimization_history", "parallel_coordinates", "param_importances")
    assert plots == {f"plots/{n}.png" for n in names}
    tags = client.get_run(parent).data.tags
    run_url = f"{ui.airflow.api_url}/dags/{DAG_ID}/runs/{quote(ui.run_id, safe='')}"
    assert tags[Tag.DAG_RUN_URL] == run_url
    trial = data["trials"][0]
    child = client.get_run(trial["mlflow_run_id"]).data.tags
    assert child[Tag.TASK_INSTANCE_URL] == ui.airflow.api_url + trial["task_url"]


class _env:
    """Set environment variables for a block (boto3 reads the S3 endpoint and keys from it)."""

    def __init__(self, values: dict[str, str]) -> None:
        self.values, self.saved = values, {k: os.environ.get(k) for k in values}

    def __enter__(self) -> None:
        os.environ.update(self.values)

    def __exit__(self, *exc: object) -> None:
        for key, value in self.saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_browser_extra_link_of_a_trial_task_opens_its_mlflow_run(tab: Tab, ui: Ui) -> None:
    page = tab.page
    data = ui.study_json()
    trial = next(t for t in data["trials"] if t["round"] == 2)
    page.goto(
        f"{ui.airflow.api_url}/dags/{DAG_ID}/runs/{quote(ui.run_id, safe='')}"
        f"/tasks/{trial['task_id']}/mapped/{trial['slot']}/details"
    )
    link = page.get_by_role("link", name="MLflow run")
    link.wait_for()
    tab.shot("trial_task_extra_link")
    link.click()
    page.wait_for_url(
        re.compile(re.escape(f"#/experiments/{data['experiment_id']}/runs/{trial['mlflow_run_id']}"))
    )
    assert page.url == trial["mlflow_url"]
    page.get_by_text(f"trial {trial['number']} · attempt 1").first.wait_for()
    tab.shot("trial_mlflow_run")


# --- the trigger form (last: the run it starts goes on after the module) -----------------------


def _open_trigger_form(page: Page) -> Locator:
    page.get_by_role("button", name="Trigger").first.click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_text("Run Parameters").wait_for()
    return dialog


def _dag_runs(client: AirflowClient) -> dict[str, Any]:
    return dict(client._json("GET", f"/api/v2/dags/{DAG_ID}/dagRuns", params={"order_by": "-run_after"}))


def test_browser_trigger_form_shows_bounds_refuses_out_of_bounds_and_starts_a_valid_run(
    tab: Tab, ui: Ui
) -> None:
    page, client = tab.page, ui.client
    ui.finished()  # the DAG runs one run at a time
    params = client._json("GET", f"/api/v2/dags/{DAG_ID}/details")["params"]
    page.goto(f"{ui.airflow.api_url}/dags/{DAG_ID}")
    dialog = _open_trigger_form(page)
    text = dialog.inner_text()
    for name, param in params.items():
        schema = param["schema"]
        assert schema["title"] in text and param["description"] in text, name
        if schema.get("type") == "integer":
            entry = dialog.locator(f'input[name="element_{name}"]')
            assert entry.get_attribute("aria-valuemin") == str(schema["minimum"]), name
            if "maximum" in schema:
                assert entry.get_attribute("aria-valuemax") == str(schema["maximum"]), name
    tab.shot("trigger_form")
    runs_before = _dag_runs(client)["total_entries"]
    maximum = params["n_trials"]["schema"]["maximum"]
    # The field keeps the value within its bounds...
    trials = dialog.locator('input[name="element_n_trials"]')
    trials.fill("999")
    trials.press("Tab")
    assert trials.input_value() == str(maximum)
    # ...and a conf that bypasses the field is refused by the schema, with its message.
    dialog.get_by_text("Advanced Options").click()
    dialog.locator(".monaco-editor .view-lines").last.click()
    page.keyboard.press("Control+A")
    page.keyboard.press("Delete")
    page.keyboard.insert_text(json.dumps({"n_trials": 999, "batch_size": 2}))
    dialog.get_by_role("button", name="Trigger").click()
    dialog.get_by_text(f"999 is greater than the maximum of {maximum}").wait_for()
    assert "Invalid input for param n_trials" in dialog.inner_text()
    tab.shot("trigger_form_refused")
    assert _dag_runs(client)["total_entries"] == runs_before
    # A valid conf from the form starts a run that uses it.
    page.reload()
    dialog = _open_trigger_form(page)
    dialog.locator('input[name="element_n_trials"]').fill("2")
    dialog.locator('input[name="element_batch_size"]').fill("2")
    dialog.locator('input[name="element_batch_size"]').press("Tab")
    dialog.get_by_role("button", name="Trigger").click()
    dialog.wait_for(state="hidden")
    _check_the_form_run_uses_its_conf(ui, runs_before)


def _check_the_form_run_uses_its_conf(ui: Ui, runs_before: int) -> None:
    """The form's run exists with its conf, and its study takes its settings from it (the run goes on;
    nothing waits for it)."""
    deadline = time.monotonic() + 30
    runs = _dag_runs(ui.client)
    while runs["total_entries"] == runs_before and time.monotonic() < deadline:
        time.sleep(0.5)
        runs = _dag_runs(ui.client)
    assert runs["total_entries"] == runs_before + 1
    new = runs["dag_runs"][0]
    assert (new["conf"]["n_trials"], new["conf"]["batch_size"]) == (2, 2)
    ui.client.wait_for_task_state(DAG_ID, new["dag_run_id"], "start", {"success"}, timeout=180)
    name, _ = find_study(ui.deployment, DAG_ID, new["dag_run_id"])
    config = load_run(ui.deployment, name).config
    assert (config.n_trials, config.batch_size) == (2, 2)
