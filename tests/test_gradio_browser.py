"""End to end in a real browser: ``flowalign.apps.gradio_app`` on a free 127.0.0.1 port with a tiny pipeline and LoRA,
driven by headless Chromium (selenium + chromedriver): move the RLG slider, click Generate, check both
images appear and the run used the slider's value; the Flow-NRG slider; with ``--runs``, pick a run's second adapter
in the list (another aligned image, the same base), the toy reward's verdict under both images, and the training
curves tab. Skipped (with the reason) only when no browser is found; ``.ci/install-browser`` installs Debian's
chromium + chromium-driver."""

import contextlib
import os
import shutil
import socket

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,1600"]


def _chrome(webdriver, binary: str, driver_path: str, tmp_path):
    """A headless Chromium driven by selenium, with a profile folder of its own under tmp_path."""
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    return webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)


def _browser():
    """(chromium binary, chromedriver) or pytest.skip with the reason."""
    binary = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    driver = shutil.which("chromedriver")
    if binary is None or driver is None:
        reason = "no headless browser: " + ", ".join(
            n for n, p in (("chromium", binary), ("chromedriver", driver)) if p is None) + \
            " not found (run .ci/install-browser)"
        print(reason)
        pytest.skip(reason)
    return binary, driver


@contextlib.contextmanager
def _driven(driver, tmp_path):
    """The browser session of one test: a screenshot in tmp_path when it fails, the browser closed either way."""
    try:
        yield driver
    except Exception:
        driver.save_screenshot(str(tmp_path / "failure.png"))
        print(f"screenshot: {tmp_path / 'failure.png'}")
        raise
    finally:
        driver.quit()


def _generate(driver, By, wait, done) -> list:
    """Click Generate, wait until ``done(driver)``, then for both images until they have loaded -> their srcs."""
    driver.find_element(By.ID, "generate").click()
    wait.until(done)
    srcs = []
    for elem_id in ("base_image", "aligned_image"):
        img = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, f"#{elem_id} img"))
        wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img))
        srcs.append(img.get_attribute("src"))
    return srcs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def app_url(tiny_model):
    pytest.importorskip("gradio", reason='gradio not installed: pip install -e ".[dev]"')
    from flowalign.apps.gradio_app import launch

    model, lora_dir = tiny_model
    port = _free_port()
    ui = launch(model, lora_dir, host="127.0.0.1", port=port, block=False, default_steps=2)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        ui.close()


def test_generate_in_browser(app_url, tmp_path):
    binary, driver_path = _browser()
    webdriver = pytest.importorskip("selenium.webdriver", reason='selenium not installed: pip install -e ".[dev]"')
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    driver = _chrome(webdriver, binary, driver_path, tmp_path)
    with _driven(driver, tmp_path):
        wait = WebDriverWait(driver, 40)
        driver.get(app_url)
        slider = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#rlg_scale input[type=range]"))
        number = driver.find_element(By.CSS_SELECTOR, "#rlg_scale input[type=number]")
        assert float(number.get_attribute("value")) == pytest.approx(1.0)
        slider.click()  # focus (a click may also move the thumb): set a known value with the keyboard
        slider.send_keys(Keys.HOME)  # -> minimum -1.0
        for _ in range(25):  # 25 x 0.1 -> 1.5
            slider.send_keys(Keys.ARROW_RIGHT)
        wait.until(lambda d: abs(float(number.get_attribute("value")) - 1.5) < 1e-6)
        driver.find_element(By.ID, "generate").click()
        info = lambda d: d.find_element(By.CSS_SELECTOR, "#info textarea, #info input").get_attribute("value")  # noqa
        wait.until(lambda d: "w=1.5" in (info(d) or ""))
        for elem_id in ("base_image", "aligned_image"):
            img = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, f"#{elem_id} img"))
            assert img.get_attribute("src"), f"{elem_id}: empty img src"
            wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img))


def test_missing_lora_is_one_clear_line(tmp_path, capsys, monkeypatch):
    pytest.importorskip("gradio", reason='gradio not installed: pip install -e ".[dev]"')
    from flowalign.cli import main

    monkeypatch.chdir(tmp_path)  # no demo_out/ here
    assert main(["gradio", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "no aligned adapter at 'demo_out/lora': run `flowalign demo` first" in err and "\n" not in err
    assert main(["gradio", "--lora", str(tmp_path / "nope")]) == 2
    assert "LoRA folder" in capsys.readouterr().err


def test_config_gives_the_app_its_defaults(tmp_path, tiny_model, capsys, monkeypatch):
    pytest.importorskip("gradio", reason='gradio not installed: pip install -e ".[dev]"')
    import shutil

    import flowalign.apps.gradio_app as app
    from flowalign.cli import main

    model, lora_dir = tiny_model
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model:\n  path: {model}\nsampling:\n  eval_num_steps: 3\n  guidance_scale: 6.0\n"
                      f"train:\n  out_dir: {tmp_path / 'run'}\n")
    assert main(["gradio", "--config", str(recipe)]) == 2  # the recipe's run has not been trained yet
    err = capsys.readouterr().err.strip()
    assert f"train it with `flowalign train {recipe}` or pass --lora DIR" in err and "\n" not in err
    shutil.copytree(lora_dir, tmp_path / "run" / "lora")
    calls = []
    monkeypatch.setattr(app, "launch", lambda **kw: calls.append(kw))
    assert main(["gradio", "--config", str(recipe)]) == 0
    assert main(["gradio", "--config", str(recipe), "--steps", "5", "--guidance-scale", "2", "--lora", lora_dir]) == 0
    pick = lambda kw: (kw["model"], kw["lora_dir"], kw["default_steps"], kw["default_cfg"])  # noqa: E731
    assert [pick(kw) for kw in calls] == [(model, str(tmp_path / "run" / "lora"), 3, 6.0), (model, lora_dir, 5, 2.0)]


def test_ui_sliders_start_at_the_given_defaults():
    pytest.importorskip("gradio", reason='gradio not installed: pip install -e ".[dev]"')
    from types import SimpleNamespace

    from flowalign.apps.gradio_app import build_ui

    stub = SimpleNamespace(model="m", adapter_labels=["run/lora"], adapter="run/lora", run_dir="run",
                           generate=lambda *a, **kw: None, select_adapter=print, rescan=print, curves=print)
    ui = build_ui(stub, default_steps=7, default_cfg=2.5)
    values = {b.elem_id: getattr(b, "value", None) for b in ui.blocks.values() if getattr(b, "elem_id", None)}
    assert values["steps"] == 7 and values["cfg"] == 2.5
    assert values["adapter"] == "run/lora" and values["run_dir"] == "run"


def test_nrg_slider_guides_the_aligned_image_in_browser(app_url, tmp_path):
    # the app offers a Flow-NRG slider for clip_score (the shipped tiny CLIP) next to the RLG slider; moving it to
    # its maximum guides the aligned image (a new image) and leaves the base image as it was (same seed, no guidance)
    binary, driver_path = _browser()
    webdriver = pytest.importorskip("selenium.webdriver", reason='selenium not installed: pip install -e ".[dev]"')
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from flowalign.apps.gradio_app import NRG_MAX_WEIGHT

    driver = _chrome(webdriver, binary, driver_path, tmp_path)
    info = lambda d: d.find_element(By.CSS_SELECTOR, "#info textarea, #info input").get_attribute("value")  # noqa

    def generate(wait, expect):
        return _generate(driver, By, wait, lambda d: expect in (info(d) or ""))

    with _driven(driver, tmp_path):
        wait = WebDriverWait(driver, 40)
        driver.get(app_url)
        slider = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#nrg_clip_score input[type=range]"))
        number = driver.find_element(By.CSS_SELECTOR, "#nrg_clip_score input[type=number]")
        assert float(number.get_attribute("value")) == 0.0  # off by default
        base0, aligned0 = generate(wait, "RLG w=1 |")  # no NRG in the summary at weight 0
        slider.click()
        slider.send_keys(Keys.END)  # -> the maximum weight
        wait.until(lambda d: abs(float(number.get_attribute("value")) - NRG_MAX_WEIGHT) < 1e-6)
        base1, aligned1 = generate(wait, f"NRG clip_score={NRG_MAX_WEIGHT:g}")
        assert base1 == base0, "the base image changed with the NRG weight"
        assert aligned1 != aligned0, "the NRG weight did not change the aligned image"


@pytest.fixture(scope="module")
def runs_url(two_adapter_run):
    """The app with ``runs=[run]``: run/lora and run/ckpt-3 (two different adapters) and a short metrics.jsonl /
    evals.jsonl."""
    pytest.importorskip("gradio", reason='gradio not installed: pip install -e ".[dev]"')
    import json

    import flowalign.apps.gradio_app as app
    from flowalign.apps.gradio_app import launch

    model, run = two_adapter_run
    with open(os.path.join(run, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps({"iteration": i, "reward_mean": 0.1 * i}) + "\n" for i in (1, 2, 3))
    with open(os.path.join(run, "evals.jsonl"), "w") as f:
        f.writelines(json.dumps({"iteration": i, "toy_geneval": v}) + "\n" for i, v in ((0, 0.4), (3, 0.6)))
    port = _free_port()
    every, app.CURVES_EVERY_S = app.CURVES_EVERY_S, 1.0  # the curves tab's timer: 1 s, not to wait 5 s
    try:
        ui = launch(model, runs=[run], host="127.0.0.1", port=port, block=False, default_steps=2, nrg_rewards={})
    finally:
        app.CURVES_EVERY_S = every
    try:
        yield f"http://127.0.0.1:{port}/", run
    finally:
        ui.close()


def _selenium():
    webdriver = pytest.importorskip("selenium.webdriver", reason='selenium not installed: pip install -e ".[dev]"')
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    return webdriver, By, WebDriverWait


def _value(driver, By, elem_id: str) -> str:
    return driver.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea, #{elem_id} input").get_attribute("value") or ""


def test_pick_an_adapter_and_read_the_verdicts_in_browser(runs_url, tmp_path):
    # the run's second adapter (ckpt-3) draws another aligned image from the same seed at w = 1; the base image
    # stays; each image gets the toy reward's verdict line ("a red circle" is a toy GenEval prompt)
    binary, driver_path = _browser()
    webdriver, By, WebDriverWait = _selenium()
    driver = _chrome(webdriver, binary, driver_path, tmp_path)

    def generate(wait, expect):
        return _generate(driver, By, wait, lambda d: expect in _value(d, By, "info"))

    with _driven(driver, tmp_path):
        wait = WebDriverWait(driver, 40)
        driver.get(runs_url[0])
        prompt = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#prompt textarea, #prompt input"))
        prompt.clear()
        prompt.send_keys("a red circle")
        assert _value(driver, By, "adapter") == "run/lora"
        base0, aligned0 = generate(wait, "adapter run/lora |")
        for elem_id in ("base_verdict", "aligned_verdict"):
            text = _value(driver, By, elem_id)
            assert text.startswith("exact ") and "| lenient " in text and "present(red circle)" in text, text
        driver.find_element(By.CSS_SELECTOR, "#adapter input").click()
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, '#adapter li[aria-label="run/ckpt-3"]')).click()
        wait.until(lambda d: "adapter run/ckpt-3:" in _value(d, By, "info"))  # loaded on the switch
        base1, aligned1 = generate(wait, "adapter run/ckpt-3 |")
        assert base1 == base0, "the base image changed with the adapter"
        assert aligned1 != aligned0, "the second adapter drew the same aligned image"


def test_training_curves_tab_in_browser(runs_url, tmp_path):
    # opening the tab plots the run; Refresh re-plots the folder typed in (a missing one: a message); while the tab
    # is open the timer re-plots a run that is still writing (a new row, a half-written one)
    url, run = runs_url
    binary, driver_path = _browser()
    webdriver, By, WebDriverWait = _selenium()
    driver = _chrome(webdriver, binary, driver_path, tmp_path)
    loaded = "return arguments[0].complete && arguments[0].naturalWidth"
    with _driven(driver, tmp_path):
        wait = WebDriverWait(driver, 40)
        driver.get(url)
        wait.until(lambda d: d.find_element(By.ID, "curves_tab-button")).click()
        run_dir = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#run_dir textarea, #run_dir input"))
        assert run_dir.get_attribute("value") == run  # the first --runs folder
        wait.until(lambda d: "3 iterations (reward_mean" in _value(d, By, "curves_info"))
        img = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#curves img"))
        assert wait.until(lambda d: d.execute_script(loaded, img)) > 100
        run_dir.clear()
        run_dir.send_keys(str(tmp_path / "nope"))
        driver.find_element(By.ID, "refresh").click()
        wait.until(lambda d: "not found" in _value(d, By, "curves_info"))  # a message, the app still up
        run_dir.clear()
        run_dir.send_keys(run)
        with open(os.path.join(run, "metrics.jsonl"), "a") as f:
            f.write('{"iteration": 4, "reward_mean": 0.5}\n{"iteration": 5, "rew')
        wait.until(lambda d: "4 iterations (reward_mean, last iteration 4)" in _value(d, By, "curves_info"))
        img = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#curves img"))
        assert wait.until(lambda d: d.execute_script(loaded, img)) > 100
