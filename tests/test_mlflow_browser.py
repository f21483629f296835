"""The MLflow UI in a real browser: `mlflow server` on 127.0.0.1 over a store that holds a finished
run (written by jobs/tracking.py, as a training job writes it), opened in headless Chromium driven by
Selenium. The experiment page shows the run, the run page its metrics; screenshots of both go to
test-output/. Chromium and chromedriver are Debian's packages, installed by scripts/setup-browser.sh
(which `make test` runs)."""

import os

import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

from conftest import PROJECT_DIR, TEST_OUTPUT, free_port, start_server, stop_server
from interestformer.jobs import tracking
from interestformer.jobs.config import load_config

pytestmark = pytest.mark.slow  # an MLflow server and a browser: 15 s on 2 cores, over a minute when they are busy

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# This network reaches nothing outside: without the background-networking flags Chromium's own
# connections (updates, sync, QUIC probes) are refused, many at a time.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1600,1200"]
METRICS = {"test_ndcg@10": 0.1234, "test_hr@10": 0.2487}  # logged as test_ndcg_at_10, test_hr_at_10
WAIT_S = 60  # the UI is a React single-page app: its content arrives after the page has loaded


@pytest.fixture
def finished_run(tmp_path):
    """A SQLite store holding one finished run with test metrics; (store uri, experiment id, run id)."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(os.path.join(PROJECT_DIR, "configs", "tiny.yaml"),
                      [f"experiment.tracking_uri={store}", "experiment.mlflow_experiment=browser-test"])
    run_id = tracking.start_run(cfg, {"zero_optimization": {"stage": 2}}, {"events": 500}, "tiny-browser-run")
    tracking.log_metrics(store, run_id, METRICS, step=12)
    tracking.end_run(store, run_id)
    return store, tracking.experiment_id(store, "browser-test"), run_id


@pytest.fixture
def chromium(tmp_path):
    """A headless Chromium with a fresh profile, driven through Debian's chromedriver."""
    for path in (CHROMIUM, CHROMEDRIVER):
        assert os.access(path, os.X_OK), f"{path} is missing: run `bash scripts/setup-browser.sh` (make test does)"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    # chromedriver and the browser it starts get a process group of their own, so that teardown can
    # end exactly them if quitting fails.
    service = Service(CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"),
                      popen_kw={"start_new_session": True})
    driver = webdriver.Chrome(service=service, options=options)
    try:
        yield driver
    finally:
        try:
            driver.quit()
        finally:
            if service.process is not None and service.process.poll() is None:
                os.killpg(service.process.pid, 9)
                service.process.wait()


def _text_shown(driver, text: str):
    """Waits for text to appear on the page; on a timeout the page is saved as mlflow_failure.png."""
    try:
        WebDriverWait(driver, WAIT_S).until(EC.text_to_be_present_in_element((By.TAG_NAME, "body"), text))
    except TimeoutException:
        raise AssertionError(f"{text!r} not shown at {driver.current_url} within {WAIT_S} s; the page as it was: "
                             f"{_screenshot(driver, 'mlflow_failure.png')}") from None


def _screenshot(driver, name: str) -> str:
    os.makedirs(TEST_OUTPUT, exist_ok=True)
    path = os.path.join(TEST_OUTPUT, name)
    assert driver.save_screenshot(path), f"no screenshot written to {path}"
    return path


def test_experiment_page_shows_the_run_and_its_metrics(finished_run, chromium):
    store, experiment_id, run_id = finished_run
    port = free_port()
    server = start_server(store, port)
    try:
        # MLflow 3 opens an experiment in its GenAI view (traces); "Model training", top left, switches
        # to the runs table, and the browser remembers the choice.
        chromium.get(f"http://127.0.0.1:{port}/#/experiments/{experiment_id}")
        _text_shown(chromium, "Model training")
        chromium.find_element(By.XPATH, "//*[normalize-space(text())='Model training']").click()
        _text_shown(chromium, "tiny-browser-run")
        assert f"/experiments/{experiment_id}/runs" in chromium.current_url
        assert "1 matching run" in chromium.find_element(By.TAG_NAME, "body").text
        experiment_png = _screenshot(chromium, "mlflow_experiment.png")

        chromium.find_element(By.LINK_TEXT, "tiny-browser-run").click()  # the run's page, as a user gets there
        _text_shown(chromium, "test_ndcg_at_10")
        assert run_id in chromium.current_url
        body = chromium.find_element(By.TAG_NAME, "body").text
        for name, value in METRICS.items():
            assert f"{name.replace('@', '_at_')}\n{value}" in body, f"{name} = {value} is not shown"
        assert "Finished" in body
        metric = chromium.find_element(By.XPATH, "//*[normalize-space(text())='test_ndcg_at_10']")
        chromium.execute_script("arguments[0].scrollIntoView({block: 'center'});", metric)
        run_png = _screenshot(chromium, "mlflow_run.png")
    finally:
        stop_server(server)
    for path in (experiment_png, run_png):
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert os.path.getsize(path) > 20_000, f"{path} looks blank"
    print(f"screenshots: {experiment_png} {run_png}")

