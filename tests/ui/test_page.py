"""The page in a real headless Chromium, against a real local cluster: two replicas, the trainer and the UI.

Set LOCKSTEP_UI_SCREENSHOT_DIR=docs/screenshots to refresh the screenshots in the docs.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lockstep.sync.gates import GATES
from tests.support.cluster import LocalCluster, Proc, free_port, local_cluster, spawn, wait_for
from tests.ui.conftest import CHROMIUM

pytest.importorskip("playwright.sync_api", reason="the page tests need playwright (pip install playwright)")
if not Path(CHROMIUM).exists():
    pytest.skip(f"the page tests need Debian's chromium at {CHROMIUM} (apt-get install chromium)",
                allow_module_level=True)

from playwright.sync_api import BrowserContext, Page, expect  # noqa: E402

pytestmark = pytest.mark.e2e

WAIT_MS = 60_000  # the longest the page may take to show something the cluster did (loads on a busy CPU)
TOKEN = "ui-test-token-7f3a"  # every process requires it on mutating calls; only the UI server may hold it


@dataclass
class System:
    cluster: LocalCluster
    trainer: Proc
    ui: Proc


def _healthy(proc: Proc) -> bool:
    assert proc.alive(), f"{proc.name} exited:\n{proc.log()[-3000:]}"
    return proc.get("/healthz", timeout=2).status_code == 200


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory, builtin_dir: Path) -> Iterator[System]:
    root = tmp_path_factory.mktemp("ui-page")
    with local_cluster(root, builtin_dir, replicas=2, LOCKSTEP_API_TOKEN=TOKEN) as cluster:
        port = free_port()
        trainer = spawn("trainer", ["trainer", "--port", str(port), "--shared", str(cluster.shared)],
                        cluster.env(), root / "logs", port)
        cluster.others.append(trainer)
        wait_for(lambda: _healthy(trainer), 120, 0.1, "the trainer to answer")
        port = free_port()
        ui = spawn("ui", ["ui", "--port", str(port), "--trainer-url", trainer.url], cluster.env(),
                   root / "logs", port)
        cluster.others.append(ui)
        wait_for(lambda: _healthy(ui), 60, 0.1, "the UI server to answer")
        wait_for(lambda: len(trainer.get("/cluster").json()["replicas"]) == 2, 60, 0.1,
                 "the trainer to see both replicas")
        yield System(cluster, trainer, ui)


def log_in(page: Page, token: str = TOKEN) -> None:
    """What an operator does first: the token into the login form, once."""
    expect(page.locator("#login")).to_be_visible()
    page.fill("#login-token", token)
    page.click("#login-submit")


@pytest.fixture
def fresh_page(context: BrowserContext, system: System) -> Iterator[Page]:
    """The page, opened on the UI and not logged in; a script error on it fails the test."""
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    # The browser also logs every HTTP error status; the page handles those, so only script errors count.
    page.on("console", lambda msg: errors.append(msg.text)
            if msg.type == "error" and not msg.text.startswith("Failed to load resource") else None)
    page.goto(system.ui.url + "/")
    yield page
    assert not errors, f"errors on the page: {errors}"


@pytest.fixture(name="page")
def logged_in_page(fresh_page: Page) -> Page:
    """The page after the operator logged in with the token."""
    log_in(fresh_page)
    expect(fresh_page.locator("#main")).to_be_visible()
    expect(fresh_page.locator("#login")).to_be_hidden()
    return fresh_page


def screenshot(page: Page, name: str, tmp_path: Path) -> None:
    """Always into the test's folder; also into LOCKSTEP_UI_SCREENSHOT_DIR when set (the docs' pictures)."""
    page.evaluate("document.getElementById('toasts').replaceChildren()")  # passing notices hide the charts
    page.wait_for_timeout(300)  # let the last frame paint
    page.screenshot(path=str(tmp_path / f"{name}.png"), full_page=True)
    target = os.environ.get("LOCKSTEP_UI_SCREENSHOT_DIR")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(target) / f"{name}.png"), full_page=True)


def committed(system: System) -> int:
    body: dict[str, Any] = system.trainer.get("/cluster").json()
    return int((body.get("committed") or {}).get("version") or 0)


def card(page: Page, replica: str) -> Any:
    return page.locator(f'#replicas .replica[data-replica-id="{replica}"]')


# -------------------------------------------------------------------------------------------- login
def test_nothing_shows_before_the_login_and_a_wrong_token_is_refused(fresh_page: Page, system: System) -> None:
    page = fresh_page
    expect(page.locator("#login")).to_be_visible()
    expect(page.locator("#main")).to_be_hidden()
    expect(page.locator("#replicas .replica")).to_have_count(0)
    assert system.ui.get("/api/cluster").status_code == 401
    log_in(page, TOKEN + "-wrong")
    expect(page.locator("#login-error")).to_contain_text("not the API token")
    expect(page.locator("#main")).to_be_hidden()
    log_in(page)
    expect(page.locator("#replicas .replica")).to_have_count(2)
    expect(page.locator("#session-user")).to_have_text("operator")
    expect(page.locator("#login-token")).to_have_value("")


def test_the_session_cookie_is_out_of_the_pages_reach(page: Page, system: System) -> None:
    expect(page.locator("#replicas .replica")).to_have_count(2)
    [cookie] = page.context.cookies()
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict", cookie
    assert TOKEN not in cookie["value"]
    assert page.evaluate("document.cookie") == "", "scripts cannot read the session"
    # A request without the page's CSRF header (what a form on another site sends) is refused even with the cookie.
    status = page.evaluate("""async () => (await fetch("/api/rollback", {method: "POST",
        headers: {"Content-Type": "text/plain"}, body: "{}"})).status""")
    assert status == 403


def test_logging_out_shows_the_login_again(page: Page, system: System) -> None:
    expect(page.locator("#replicas .replica")).to_have_count(2)
    page.click("#logout-button")
    expect(page.locator("#login")).to_be_visible()
    expect(page.locator("#main")).to_be_hidden()
    expect(page.locator("#live-status")).to_have_class(re.compile(r"\boff\b"))
    assert page.context.cookies() == []
    page.reload()
    expect(page.locator("#login")).to_be_visible()


# -------------------------------------------------------------------------------------------- fleet
def test_the_token_stays_on_the_server(page: Page, system: System) -> None:
    refused = system.trainer.post("/publish", json={"model": "builtin:tiny-s1"})
    assert refused.status_code == 401, "the trainer wants it: the page's publishes prove the UI adds it"
    expect(page.locator("#replicas .replica")).to_have_count(2)
    assert TOKEN not in page.content()
    assert TOKEN not in system.ui.get("/api/config").text
    assert TOKEN not in system.ui.get("/static/app.js").text


def test_fleet_shows_both_replicas_live(page: Page, system: System) -> None:
    version = committed(system)
    expect(page.locator("#replicas .replica")).to_have_count(2)
    for replica in ("replica-1", "replica-2"):
        expect(card(page, replica).locator('[data-field="serving"]')).to_contain_text(f"v{version}")
        expect(card(page, replica).locator('[data-field="ready"]')).to_have_text("ready")
        expect(card(page, replica)).to_contain_text("http://127.0.0.1:")
    expect(page.locator("#convergence-badge")).to_have_text(f"2/2 replicas at v{version}")
    expect(page.locator("#trainer-status")).to_have_text("trainer: connected")
    expect(page.locator("#live-status")).to_have_class(re.compile(r"\bon\b"))


def test_bad_publish_input_is_caught_in_the_page(page: Page) -> None:
    page.click("#publish-button")
    expect(page.locator("#publish-model-error")).to_contain_text("Enter a model reference")
    expect(page.locator("#publish-model")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#publish-model")).to_be_focused()
    page.fill("#publish-model", "rm -rf /")
    page.keyboard.press("Enter")
    expect(page.locator("#publish-model-error")).to_contain_text("no spaces")
    expect(page.locator("#confirm")).not_to_be_visible()


def test_cancelled_publish_changes_nothing(page: Page, system: System) -> None:
    before = system.trainer.get("/publishes").json()
    page.focus("#publish-model")
    page.keyboard.type("builtin:tiny-s2")
    page.keyboard.press("Enter")
    expect(page.locator("#confirm")).to_be_visible()
    expect(page.locator("#confirm-title")).to_contain_text("builtin:tiny-s2")
    expect(page.locator("#confirm-cancel")).to_be_focused()
    page.keyboard.press("Escape")
    expect(page.locator("#confirm")).not_to_be_visible()
    page.wait_for_timeout(500)
    assert system.trainer.get("/publishes").json() == before


def test_every_control_is_labelled_and_views_open_from_the_keyboard(page: Page) -> None:
    for view in ("timeline", "runs", "playground", "fleet"):
        page.focus(f"#tab-{view}")
        page.keyboard.press("Enter")
        expect(page.locator(f"#view-{view}")).to_be_visible()
        expect(page.locator(f"#tab-{view}")).to_have_attribute("aria-current", "page")
        unlabelled = page.evaluate("""() => [...document.querySelectorAll("input, select, textarea, button")]
            .filter((el) => el.offsetParent !== null)
            .filter((el) => !(el.labels && el.labels.length) && !el.getAttribute("aria-label")
                            && !el.textContent.trim())
            .map((el) => el.outerHTML.slice(0, 100))""")
        assert not unlabelled, f"controls without a label on {view}: {unlabelled}"


def test_a_failed_publish_says_why(page: Page) -> None:
    page.fill("#publish-model", "versions/999")
    page.click("#publish-button")
    page.click("#confirm-ok")
    box = page.locator("#operation")
    expect(box).to_have_class(re.compile(r"\bbad\b"), timeout=WAIT_MS)
    expect(box).to_contain_text("999")


def test_publish_from_the_page_flips_both_replicas(page: Page, system: System) -> None:
    before = committed(system)
    for replica in ("replica-1", "replica-2"):
        expect(card(page, replica).locator('[data-field="serving"]')).to_contain_text(f"v{before}")
    page.fill("#publish-model", "builtin:tiny-s1" if before == 0 else "builtin:tiny-s2")
    page.click("#publish-button")
    expect(page.locator("#confirm")).to_be_visible()
    page.click("#confirm-ok")
    wait_for(lambda: committed(system) > before, WAIT_MS / 1000, 0.1, "the publish to commit")
    version = committed(system)  # an aborted publish before this one may have used a number
    for replica in ("replica-1", "replica-2"):
        serving = card(page, replica).locator('[data-field="serving"]')
        expect(serving).to_contain_text(f"v{version}", timeout=WAIT_MS)
        # Where the version's bytes came from (its chunks: from the replica's own copies or the shared folder).
        transfer = card(page, replica).locator('[data-field="transfer"]')
        expect(transfer).to_contain_text(re.compile(rf"v{version} staged: .*(local|origin)"), timeout=WAIT_MS)
    expect(page.locator("#convergence-badge")).to_have_text(f"2/2 replicas at v{version}", timeout=WAIT_MS)
    expect(page.locator("#operation")).to_contain_text(f"v{version} committed", timeout=WAIT_MS)
    expect(page.locator('[data-field="last-flip"]')).to_contain_text(f"v{version}", timeout=WAIT_MS)
    assert system.cluster.replicas[0].status()["serving_version"] == version


# --------------------------------------------------------------------------------------------- runs
def test_finetune_run_draws_its_reward_curve(page: Page, system: System, tmp_path: Path) -> None:
    page.click("#tab-runs")
    page.check('input[name="kind"][value="finetune"]')
    page.fill("#param-steps", "")
    page.click("#run-start")
    expect(page.locator("#param-steps-error")).to_contain_text("Enter steps")
    page.fill("#param-steps", "6")
    page.fill("#param-publish_every", "2")
    page.fill("#param-batch_size", "2")
    page.fill("#param-group_size", "2")
    page.fill("#param-max_new_tokens", "8")
    page.check("#param-async")
    page.fill("#param-max_staleness", "1")
    page.click("#run-start")
    expect(page.locator("#run-title")).to_contain_text("Run ", timeout=WAIT_MS)
    curve = page.locator('#reward-chart path.series[data-series="reward"]')
    expect(curve).to_have_count(1, timeout=WAIT_MS * 2)
    wait_for(lambda: int(curve.get_attribute("data-points") or 0) >= 2, WAIT_MS * 2 / 1000, 0.2,
             "two points on the reward curve")
    expect(page.locator("#runs-list button[aria-pressed=true]")).to_have_count(1)
    expect(page.locator("#samples .sample-group").first).to_be_visible(timeout=WAIT_MS * 2)
    expect(page.locator("#run-title .outcome")).to_have_text("succeeded", timeout=WAIT_MS * 2)
    expect(page.locator("#run-stop")).to_be_hidden()
    assert int(curve.get_attribute("data-points") or 0) == 6, "one reward point per step"
    run_id = page.locator("#runs-list button[aria-pressed=true]").get_attribute("data-run")
    run = system.trainer.get(f"/runs/{run_id}").json()
    assert run["params"]["async"] is True and run["params"]["max_staleness"] == 1, "the form sent both"
    check_samples_per_version(page, run)
    check_curves_follow_the_version_tags(page, run)
    screenshot(page, "runs", tmp_path)


def test_an_ended_run_is_deleted_from_the_page_once_confirmed(page: Page, system: System) -> None:
    created = system.trainer.post("/runs", json={"kind": "simulation", "params": {
        "rounds": 1, "background_load": False, "requests_per_replica": 0}},
        headers={"Authorization": f"Bearer {TOKEN}"})
    assert created.status_code == 201, created.text
    run_id = created.json()["id"]
    wait_for(lambda: system.trainer.get(f"/runs/{run_id}").json()["active"] is False, WAIT_MS / 1000, 0.2,
             f"run {run_id} to end")
    page.click("#tab-runs")
    row = page.locator(f'#runs-list button[data-run="{run_id}"]')
    row.click(timeout=WAIT_MS)
    expect(page.locator("#run-title .outcome")).to_have_text("succeeded", timeout=WAIT_MS)
    delete = page.locator("#run-delete")
    expect(delete).to_be_visible()
    page.once("dialog", lambda dialog: dialog.dismiss())
    delete.click()
    expect(row).to_be_visible()  # dismissed: nothing sent
    assert system.trainer.get(f"/runs/{run_id}").status_code == 200
    page.once("dialog", lambda dialog: dialog.accept())
    delete.click()
    expect(page.locator(".toast").last).to_contain_text(f"Run {run_id} deleted", timeout=WAIT_MS)
    expect(row).to_have_count(0, timeout=WAIT_MS)
    assert system.trainer.get(f"/runs/{run_id}").status_code == 404


def test_charts_draw_values_equal_but_for_rounding_and_huge_values(page: Page) -> None:
    # A held-out mean of 0.20000000000000004 beside a training reward of 0.2, or a loss of 1e17 beside 1e17 + 16:
    # the tick step is then below the floats' spacing, and a loop adding it to a tick never ended (the tab froze).
    labels = page.evaluate("""async () => {
        const {lineChart} = await import("/static/charts.js");
        return [[0.2, 0.20000000000000004], [1e17, 1e17 + 16], [0.5, 0.25]].map((ys) => {
            const el = document.createElement("div");
            lineChart(el, {series: [{name: "reward", color: "#000", points: ys.map((y, i) => ({x: i + 1, y}))}]});
            return [...el.querySelectorAll(".axis text")].map((t) => t.textContent);
        });
    }""")
    for drawn in labels:
        assert 2 <= len(drawn) <= 20 and len(set(drawn)) == len(drawn), drawn


def check_samples_per_version(page: Page, run: dict[str, Any]) -> None:
    """One row per version the run published, newest first, with the trainer's count of samples used."""
    box = page.locator("#version-samples-box")
    expect(box.locator("#version-samples-mode")).to_contain_text("asynchronous, max staleness 1")
    by_version = run["version_samples"]
    assert by_version and set(by_version) == {str(v) for v in run["versions"]}, by_version
    rows = box.locator("tbody tr")
    expect(rows).to_have_count(len(by_version))
    newest_first = sorted(by_version, key=int, reverse=True)
    assert [rows.nth(i).get_attribute("data-version") for i in range(len(by_version))] == newest_first
    for version, samples in by_version.items():
        row = box.locator(f'tbody tr[data-version="{version}"]')
        expect(row.locator('[data-col="version"]')).to_have_text(f"v{version}")
        expect(row.locator('[data-col="used"]')).to_have_text(str(samples["used"]))
        expect(row.locator('[data-col="stale"]')).to_have_text(str(samples["dropped_stale"]))
        # The histogram's segments (a title each) add up to the samples used.
        titles = row.locator(".stale-seg").evaluate_all("segs => segs.map((s) => s.title)")
        assert sum(int(t.split(" of ")[0]) for t in titles) == samples["used"], titles
    used = sum(s["used"] for s in by_version.values())
    expect(box.locator("#version-samples-mode")).to_contain_text(f"{used} samples used")


def check_curves_follow_the_version_tags(page: Page, run: dict[str, Any]) -> None:
    """The last reward point is drawn as the version that wrote most of its samples, not the step's newest."""
    last = run["metrics"][-1]
    writers = {int(v): n for v, n in last["sample_versions"].items() if n > 0}
    dominant = max(writers, key=lambda v: (writers[v], v))
    dots = page.locator('#reward-chart path.series[data-series="reward"] + g.dots circle title')
    title = dots.last.text_content() or ""
    assert f"(v{dominant}); samples written by " in title, title
    for version, n in writers.items():
        assert f"v{version}: {n}" in title, title


def test_rollback_to_a_chosen_version_from_the_page(page: Page, system: System, tmp_path: Path) -> None:
    wait_for(lambda: system.trainer.get("/cluster").json()["convergence"]["at_version"] == 2, 120, 0.2,
             "the fleet to converge after the run")
    before = committed(system)
    assert before >= 2, "a publish and a run came before"
    expect(page.locator('#rollback-to option[value="1"]')).to_have_count(1, timeout=WAIT_MS)
    page.select_option("#rollback-to", "1")
    page.click("#rollback-button")
    expect(page.locator("#confirm-title")).to_have_text("Roll back to v1?")
    page.click("#confirm-ok")
    for replica in ("replica-1", "replica-2"):
        serving = card(page, replica).locator('[data-field="serving"]')
        expect(serving).to_contain_text("v1", timeout=WAIT_MS)
    expect(page.locator("#operation")).to_contain_text("v1 committed", timeout=WAIT_MS)
    assert committed(system) == 1
    for replica in ("replica-1", "replica-2"):  # the flip back is drawn on the fleet's strip
        segments = page.locator(f'#recent-svg g.lane[data-replica="{replica}"] text.seg-label')
        expect(segments.last).to_have_text("v1", timeout=WAIT_MS)
    screenshot(page, "fleet", tmp_path)


def test_timeline_draws_publishes_and_flips(page: Page, system: System, tmp_path: Path) -> None:
    history = system.trainer.get("/history").json()
    committed_versions = {p["version"] for p in history["publishes"] if p["outcome"] == "committed"}
    assert len(committed_versions) >= 3, "a publish, a run's versions and a rollback came before"
    page.click("#tab-timeline")
    expect(page.locator("#view-timeline")).to_be_visible()
    for version in committed_versions:
        commit_line = page.locator(f'#timeline-svg g.commit[data-version="{version}"]')
        expect(commit_line.first).to_be_attached(timeout=WAIT_MS)
    for replica in ("replica-1", "replica-2"):
        expect(page.locator(f'#timeline-svg g.lane[data-replica="{replica}"] rect').first).to_be_visible()
    expect(page.locator("#publishes-table tbody tr").first).to_contain_text("rollback")
    published = system.trainer.get("/versions").json()["versions"]
    expect(page.locator("#versions-table tbody tr")).to_have_count(len(published))
    screenshot(page, "timeline", tmp_path)


# --------------------------------------------------------------------------------------- playground
def test_playground_streams_text_with_its_version(page: Page, system: System, tmp_path: Path) -> None:
    page.click("#tab-playground")
    page.click("#play-send")
    expect(page.locator("#play-error")).to_contain_text("Write a prompt first")
    wait_for(lambda: system.trainer.get("/cluster").json()["convergence"]["at_version"] == 2, 120, 0.2,
             "the fleet to converge after the run")
    version = committed(system)
    page.fill("#play-prompt", "Once upon a time")
    page.fill("#play-max-tokens", "24")
    page.keyboard.press("Control+Enter")
    expect(page.locator('#play-meta [data-field="version"]')).to_have_text(f"v{version}", timeout=WAIT_MS)
    expect(page.locator("#play-output")).to_have_attribute("data-done", "true", timeout=WAIT_MS)
    assert page.locator("#play-output").inner_text().strip(), "some text was streamed"
    expect(page.locator("#play-output")).not_to_have_class(re.compile("failed"))

    page.select_option("#play-target", "replica-2")
    page.fill("#play-prompt", "The cat")
    page.evaluate("document.querySelector('#play-output').removeAttribute('data-done')")
    page.click("#play-send")
    expect(page.locator("#play-output")).to_have_attribute("data-done", "true", timeout=WAIT_MS)
    expect(page.locator('#play-meta [data-field="replica"]')).to_have_text("replica-2")
    expect(page.locator("#play-history li")).to_have_count(2)
    screenshot(page, "playground", tmp_path)


# ------------------------------------------------------------------------------------------ rollout
def test_a_rollout_from_the_page_shows_its_steps_and_gates_and_a_person_aborts_it(
        page: Page, system: System, tmp_path: Path) -> None:
    wait_for(lambda: system.trainer.get("/cluster").json()["convergence"]["at_version"] == 2, 120, 0.2,
             "the fleet to converge before the rollout")
    before = committed(system)
    expect(page.locator("#rollout-panel")).to_be_hidden()  # no rollout has run on this trainer
    page.fill("#publish-model", "builtin:tiny-s2")  # v1 (committed since the rollback) is tiny-s1
    page.fill("#publish-canary", "25,5")
    page.click("#publish-button")
    expect(page.locator("#publish-canary-error")).to_contain_text("must increase")
    expect(page.locator("#confirm")).not_to_be_visible()
    page.fill("#publish-canary", "5, 50")
    page.fill("#publish-step-seconds", "0")
    page.fill("#publish-min-requests", "0")
    page.click("#publish-button")
    expect(page.locator("#confirm-title")).to_have_text("Roll out builtin:tiny-s2?")
    expect(page.locator("#confirm-text")).to_contain_text("5% → 50% → 100%")
    page.click("#confirm-ok")

    panel = page.locator("#rollout-panel")
    expect(panel.locator('#rollout-head [data-field="phase"]')).to_have_text("step", timeout=WAIT_MS)
    view = system.trainer.get("/rollout").json()
    version = view["version"]
    assert view["plan"]["steps"] == [5, 50, 100] and view["plan"]["min_requests"] == 0, "the form sent the plan"
    steps = panel.locator("#rollout-steps li")
    expect(steps).to_have_count(3)
    expect(steps.nth(0)).to_have_attribute("aria-current", "step")
    expect(steps.nth(0)).to_contain_text("5%")
    expect(steps.nth(2)).to_contain_text("100%")
    expect(panel.locator("#rollout-split rect.split-candidate")).to_have_attribute("data-share", "5")
    expect(panel.locator("#rollout-status")).to_contain_text(f"Step 1 of 3: v{version} answers 5% of requests")
    gates = panel.locator("#rollout-gates tbody tr")
    expect(gates).to_have_count(len(GATES), timeout=WAIT_MS)
    kl = panel.locator('#rollout-gates tr[data-gate="kl_divergence"]')
    expect(kl.locator('[data-col="threshold"]')).to_have_text("≤ 1")
    expect(kl.locator('[data-col="samples"]')).to_have_text("0/20", timeout=WAIT_MS)
    expect(kl.locator('[data-col="verdict"]')).to_have_text("waiting")  # no request has reached the candidate
    expect(kl.locator(".gate-reason")).to_contain_text("no prompts compared yet")
    expect(kl.locator(".gate-name")).to_have_attribute("title", re.compile("KL divergence"))
    agreement = panel.locator('#rollout-gates tr[data-gate="token_agreement"] [data-col="threshold"]')
    expect(agreement).to_have_text("≥ 0.3")
    screenshot(page, "rollout", tmp_path)

    page.click("#rollout-abort")
    expect(page.locator("#confirm-title")).to_have_text(f"Abort the rollout of v{version}?")
    expect(page.locator("#confirm-cancel")).to_be_focused()
    page.click("#confirm-ok")
    expect(panel.locator('#rollout-head [data-field="phase"]')).to_have_text("rolled back", timeout=WAIT_MS)
    expect(panel.locator("#rollout-status")).to_have_text(
        "Rolled back by a person: aborted by a person at step 0")
    expect(steps.nth(0)).to_contain_text("rolled back")
    expect(steps.nth(1)).to_contain_text("not reached")
    expect(panel.locator("#rollout-split rect.split-candidate")).to_have_attribute("data-share", "0")
    expect(panel.locator("#rollout-actions")).to_be_hidden()
    expect(page.locator("#operation")).to_contain_text(f"v{version} rolled back", timeout=WAIT_MS)
    assert committed(system) == before


# --------------------------------------------------------------------------------------- no trainer
def test_a_trainer_that_goes_away_shows_and_the_page_keeps_working(page: Page, system: System) -> None:
    expect(page.locator("#trainer-status")).to_have_text("trainer: connected")
    system.trainer.kill()
    expect(page.locator("#trainer-status")).to_have_text("trainer: unreachable", timeout=WAIT_MS)
    expect(page.locator("#banner")).to_contain_text("unreachable")
    expect(page.locator("#replicas .replica")).to_have_count(2)
    expect(card(page, "replica-1").locator('[data-field="ready"]')).to_have_text("ready")

    page.click("#tab-playground")
    page.fill("#play-prompt", "Hello")
    page.click("#play-send")
    expect(page.locator("#play-output")).to_have_attribute("data-done", "true", timeout=WAIT_MS)
    expect(page.locator('#play-meta [data-field="version"]')).to_have_text(re.compile(r"v\d+"))

    page.click("#tab-fleet")
    page.fill("#publish-model", "builtin:tiny-s2")
    page.click("#publish-button")
    page.click("#confirm-ok")
    expect(page.locator("#operation")).to_contain_text("unreachable", timeout=WAIT_MS)

    system.cluster.replicas[1].kill()  # replica-2 goes away too: its card says so, the other one stays
    state = card(page, "replica-2").locator('[data-field="state"]')
    expect(state).to_have_text("unreachable", timeout=WAIT_MS)
    expect(card(page, "replica-2")).to_contain_text("unreachable:")
    expect(card(page, "replica-1").locator('[data-field="ready"]')).to_have_text("ready")
    expect(page.locator("#convergence-badge")).to_contain_text("1/2 replicas")
