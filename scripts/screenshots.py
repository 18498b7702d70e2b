"""Screenshots of every tab of the real app (python app.py) in headless Chromium -> docs/screenshots/.

    python scripts/screenshots.py            # starts app.py on a free port, shoots, stops it
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


def main() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(REPO)}
    app = subprocess.Popen([sys.executable, "app.py"], cwd=REPO, env=env)
    os.environ["SE_OFFLINE"] = "true"
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--window-size=1400,1800", "--hide-scrollbars"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=shutil.which("chromedriver")))
    wait = WebDriverWait(driver, 600)
    try:
        url = f"http://127.0.0.1:{port}/"
        wait.until(lambda d: _get(d, url))
        OUT.mkdir(parents=True, exist_ok=True)

        def tab(name):
            t = wait.until(lambda d: d.find_element(By.XPATH, f"//button[@role='tab'][normalize-space()='{name}']"))
            t.click()
            wait.until(lambda d: t.get_attribute("aria-selected") == "true")

        def click(text):
            b = driver.find_element(By.XPATH, f"//button[normalize-space()='{text}']")
            driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", b)
            b.click()

        def shoot(name):
            driver.execute_script("window.scrollTo(0, 0);")
            driver.save_screenshot(str(OUT / f"{name}.png"))
            print("wrote", OUT / f"{name}.png")

        tab("Fisher")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".js-plotly-plot")) >= 3)
        shoot("fisher")
        tab("Quantize")
        wait.until(lambda d: "% of FP32" in d.find_element(By.ID, "size-readout").text)
        shoot("quantize")
        tab("Compare")
        click("Generate")
        wait.until(lambda d: "ms/image" in d.find_element(By.ID, "compare-timing").text)
        shoot("compare")
        tab("Quality")
        click("Evaluate")
        wait.until(lambda d: "backend=" in d.find_element(By.ID, "fid-result").text)
        shoot("quality")
        tab("Inside")
        click("Activations along the trajectory")
        click("Saliency map")
        click("Quantization error along the trajectory (current plan)")
        wait.until(lambda d: len([e for e in d.find_elements(By.CSS_SELECTOR, ".js-plotly-plot") if e.is_displayed()]) >= 4)
        shoot("inside")
    finally:
        driver.quit()
        app.terminate()
        app.wait(timeout=30)


def _get(driver, url) -> bool:
    try:
        driver.get(url)
        return bool(driver.find_elements(By.XPATH, "//button[@role='tab']"))
    except Exception:
        return False


if __name__ == "__main__":
    main()
