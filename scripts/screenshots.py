"""Screenshots of every tab of the real app (python app.py) in headless Chromium -> docs/screenshots/.

    python scripts/screenshots.py            # starts app.py on a free port, shoots, stops it
    python scripts/screenshots.py quantize phone   # only these (desktop tab names, "phone")

Desktop (1400 px wide): every tab, Compare as a first visit shows it (the example, no click). Phone
(390 CSS px wide, emulated; 2400 px of the page): Fisher, Quantize, Compare and Inside as `<tab>-phone.png`.
Dark (desktop, ?__theme=dark): Fisher and Quantize as `<tab>-dark.png`.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "docs" / "screenshots"
DESKTOP = ("fisher", "quantize", "compare", "quality", "inside")


def want(name: str) -> bool:
    """Shots named on the command line (default: all)."""
    return not sys.argv[1:] or name in sys.argv[1:]


def main() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(REPO)}
    app = subprocess.Popen([sys.executable, "app.py"], cwd=REPO, env=env)
    try:
        url = f"http://127.0.0.1:{port}/"
        OUT.mkdir(parents=True, exist_ok=True)
        if any(want(n) for n in DESKTOP):
            desktop(url)
        if want("phone"):
            phone(url)
        if want("dark"):
            dark(url)
    finally:
        app.terminate()
        app.wait(timeout=30)


def _driver(phone: bool = False):
    os.environ["SE_OFFLINE"] = "true"
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--window-size=390,2400" if phone else "--window-size=1400,1800", "--hide-scrollbars"):
        opts.add_argument(arg)
    if phone:
        opts.add_experimental_option("mobileEmulation", {"deviceMetrics": {"width": 390, "height": 2400, "pixelRatio": 1}})
    return webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=shutil.which("chromedriver")))


def _helpers(driver, wait):
    def tab(name):
        wait.until(lambda d: d.find_elements(By.XPATH, "//button[@role='tab']"))
        shown = [t for t in driver.find_elements(By.XPATH, f"//button[@role='tab'][normalize-space()='{name}']")
                 if t.is_displayed()]
        if shown:
            shown[0].click()
            wait.until(lambda d: shown[0].get_attribute("aria-selected") == "true")
            return
        # Narrow screens put the other tabs under "More tabs".
        driver.find_element(By.CSS_SELECTOR, "button[aria-label='More tabs']").click()
        item = wait.until(lambda d: [b for b in d.find_elements(By.XPATH, f"//button[normalize-space()='{name}']")
                                     if b.is_displayed()])
        item[0].click()

    def click(text):
        b = driver.find_element(By.XPATH, f"//button[normalize-space()='{text}']")
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", b)
        b.click()

    def shoot(name):
        # The first screen's example picture (computed while the app starts) is in every shot: wait for it.
        wait.until(lambda d: d.execute_script(
            "const i = document.querySelector('#hero img[src]'); return !!i && i.complete && i.naturalWidth > 0;"))
        driver.execute_script("window.scrollTo(0, 0);")
        driver.save_screenshot(str(OUT / f"{name}.png"))
        print("wrote", OUT / f"{name}.png")
    return tab, click, shoot


def phone(url) -> None:
    driver = _driver(phone=True)
    wait = WebDriverWait(driver, 600)
    tab, click, shoot = _helpers(driver, wait)
    try:
        wait.until(lambda d: _get(d, url))
        tab("Fisher")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".js-plotly-plot")) >= 3 and idle(d))
        shoot("fisher-phone")
        tab("Quantize")
        wait.until(lambda d: "% of FP32" in d.find_element(By.ID, "size-readout").text)
        shoot("quantize-phone")
        tab("Compare")
        wait.until(lambda d: "mean |Δ| to FP32" in d.find_element(By.ID, "compare-timing").text)
        shoot("compare-phone")
        tab("Inside")  # the arrival example
        wait.until(lambda d: len([e for e in d.find_elements(By.CSS_SELECTOR, ".js-plotly-plot") if e.is_displayed()]) >= 2
                   and idle(d))
        shoot("inside-phone")
    finally:
        driver.quit()


def desktop(url) -> None:
    driver = _driver()
    wait = WebDriverWait(driver, 600)
    tab, click, shoot = _helpers(driver, wait)
    try:
        wait.until(lambda d: _get(d, url))

        if want("fisher"):
            tab("Fisher")
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".js-plotly-plot")) >= 3)
            shoot("fisher")
        if want("quantize"):
            tab("Quantize")
            wait.until(lambda d: "% of FP32" in d.find_element(By.ID, "size-readout").text)
            shoot("quantize")
        if want("compare"):
            tab("Compare")  # the example a first visit sees
            wait.until(lambda d: "mean |Δ| to FP32" in d.find_element(By.ID, "compare-timing").text)
            shoot("compare")
        if want("quality"):
            tab("Quality")
            click("Evaluate")
            # Over 30 s here: the first press shows the estimate, the second starts the run.
            wait.until(lambda d: "ΔFID" in d.find_element(By.ID, "fid-result").text
                       or d.find_element(By.ID, "evaluate").text.startswith("Start"))
            if driver.find_element(By.ID, "evaluate").text.startswith("Start"):
                driver.find_element(By.ID, "evaluate").click()
            wait.until(lambda d: "ΔFID" in d.find_element(By.ID, "fid-result").text)
            shoot("quality")
        if want("inside"):
            tab("Inside")
            click("Saliency map")
            click("Quantization error along the trajectory (current plan)")
            wait.until(lambda d: len([e for e in d.find_elements(By.CSS_SELECTOR, ".js-plotly-plot") if e.is_displayed()]) >= 4
                       and idle(d))
            shoot("inside")
    finally:
        driver.quit()


def dark(url) -> None:
    driver = _driver()
    wait = WebDriverWait(driver, 600)
    tab, click, shoot = _helpers(driver, wait)
    themes = "return Array.from(document.querySelectorAll('.js-plotly-plot')).map(g => (g.layout.meta || {}).lafq_theme)"
    try:
        wait.until(lambda d: _get(d, url + "?__theme=dark"))
        tab("Fisher")
        wait.until(lambda d: len(d.execute_script(themes)) >= 3 and set(d.execute_script(themes)) == {"dark"})
        shoot("fisher-dark")
        tab("Quantize")
        wait.until(lambda d: "% of FP32" in d.find_element(By.ID, "size-readout").text
                   and set(d.execute_script(themes)) == {"dark"})
        shoot("quantize-dark")
    finally:
        driver.quit()


def idle(driver) -> bool:
    """No component shows Gradio's "processing" overlay."""
    return "processing" not in driver.find_element(By.TAG_NAME, "body").text


def _get(driver, url) -> bool:
    try:
        driver.get(url)
        return bool(driver.find_elements(By.XPATH, "//button[@role='tab']"))
    except Exception:
        return False


if __name__ == "__main__":
    main()
