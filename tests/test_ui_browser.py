"""The web page end to end in headless Chromium (Debian's `chromium` and `chromedriver`, driven by Selenium):
upload the bundled example, wait for the stems, check the players and spectrograms, download a stem.

`UPDATE_SCREENSHOT=1` also saves the finished page as docs/images/ui.png.
"""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from bsmamba2 import hub  # noqa: E402
from bsmamba2.pretrained import example_song  # noqa: E402
from ui_server import TIMEOUT, running_app  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip("needs chromium and chromedriver (Debian: apt-get install chromium chromium-driver)",
                allow_module_level=True)

SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "images" / "ui.png"


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # with the driver's path below, Selenium downloads nothing
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1240,900"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(tmp_path / "downloads"),
                                              "download.prompt_for_download": False})
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.execute_cdp_cmd("Browser.setDownloadBehavior",
                           {"behavior": "allow", "downloadPath": str(tmp_path / "downloads")})
    yield driver
    driver.quit()


@pytest.mark.slow
def test_separate_the_example_in_the_page(browser, tmp_path):
    example = example_song()
    cli = subprocess.run([sys.executable, "-m", "bsmamba2", "separate", str(example), "-o", str(tmp_path / "cli"),
                          "-q"], capture_output=True, text=True, timeout=TIMEOUT)
    assert cli.returncode == 0, cli.stderr
    wait = WebDriverWait(browser, TIMEOUT)
    with running_app() as app:
        browser.get(app.url)
        wait.until(lambda driver: driver.find_elements(By.CSS_SELECTOR, "#model option"))
        assert browser.find_element(By.ID, "model").get_attribute("value") == hub.DEFAULT_MODEL
        browser.find_element(By.ID, "files").send_keys(str(example))
        card = wait.until(lambda driver: driver.find_element(By.CSS_SELECTOR, ".job[data-status='done']"))
        assert card.find_element(By.TAG_NAME, "h2").text == "example.flac"
        assert card.find_element(By.CLASS_NAME, "status").text.startswith("Done in ")

        rows = card.find_elements(By.CLASS_NAME, "stem")
        stems = ["mixture", "vocals", "drums", "bass", "other"]  # the default model's, in its order
        assert [row.get_attribute("data-stem") for row in rows] == stems
        # every player has loaded its audio's length, every spectrogram has been drawn
        durations = wait.until(lambda driver: driver.execute_script(
            "const players = [...document.querySelectorAll('.job audio')];"
            "return players.every((p) => p.readyState >= 1) && players.map((p) => p.duration);"))
        assert len(durations) == len(stems) and all(abs(duration - durations[0]) < 0.01 for duration in durations)
        pictures = browser.execute_script(
            "return [...document.querySelectorAll('.job .spectrogram img')].map((i) => [i.complete, i.naturalWidth]);")
        assert pictures == [[True, 800]] * len(stems)
        axes = browser.execute_script(  # each picture's ticks: the 10 s example every 2 s, kHz on a log scale
            "return [...document.querySelectorAll('.job .spectrogram')].map((figure) => ['time', 'frequency'].map("
            "(kind) => [...figure.querySelectorAll('.' + kind)].map((tick) => tick.textContent)));")
        assert axes == [[["2 s", "4 s", "6 s", "8 s"], ["0.1 kHz", "1 kHz", "10 kHz"]]] * len(stems)

        card.find_element(By.CSS_SELECTOR, "a[data-stem='vocals']").click()
        downloaded = tmp_path / "downloads" / "example_vocals.wav"
        deadline = time.monotonic() + TIMEOUT
        while not downloaded.exists():
            assert time.monotonic() < deadline, list((tmp_path / "downloads").glob("*"))
            time.sleep(0.1)
        assert downloaded.read_bytes() == (tmp_path / "cli" / "example" / "vocals.wav").read_bytes()

        if os.environ.get("UPDATE_SCREENSHOT") == "1":
            height = browser.execute_script("return document.documentElement.scrollHeight")
            browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",  # the whole page, not the window
                                    {"width": 1240, "height": height, "deviceScaleFactor": 1, "mobile": False})
            SCREENSHOT.parent.mkdir(exist_ok=True)
            assert browser.save_screenshot(str(SCREENSHOT))

        # a file that is not audio: the card says why, in the command line's words
        notes = tmp_path / "notes.mp3"
        notes.write_text("lyrics, not a song\n")
        browser.find_element(By.ID, "files").send_keys(str(notes))
        failed = wait.until(lambda driver: driver.find_element(By.CSS_SELECTOR, ".job[data-status='failed']"))
        assert failed.find_element(By.CLASS_NAME, "status").text.startswith("notes.mp3: not an audio file")
        errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
        assert len(errors) == 1 and "400" in errors[0]["message"], errors  # only the refused upload's answer
