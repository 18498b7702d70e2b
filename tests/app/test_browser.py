"""End to end in Debian's headless Chromium: tabs, a slider that moves the size readout, Generate."""
import os
import shutil
import socket

import pytest

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="Debian's chromium and chromium-driver are not installed")


@pytest.fixture(scope="module")
def url(app_state):
    from demo.ui import LAUNCH_OPTIONS, QUEUE_OPTIONS, build_app

    demo = build_app(app_state)
    demo.queue(**QUEUE_OPTIONS)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **LAUNCH_OPTIONS)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture(scope="module")
def browser():
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not try to download anything
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-dev-shm-usage", "--window-size=1400,1000"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=DRIVER))
    yield driver
    driver.quit()


def open_tab(driver, wait, name):
    tab = wait.until(EC.element_to_be_clickable((By.XPATH, f"//button[@role='tab'][normalize-space()='{name}']")))
    tab.click()
    wait.until(lambda d: tab.get_attribute("aria-selected") == "true")


def test_tabs_slider_readout_and_generate(url, browser):
    wait = WebDriverWait(browser, 60)
    browser.get(url)
    for name in ("Fisher", "Quantize", "Compare", "Quality", "Inside"):
        open_tab(browser, wait, name)
    # Fisher: the heatmap is drawn on page load.
    open_tab(browser, wait, "Fisher")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".js-plotly-plot"))

    open_tab(browser, wait, "Quantize")
    readout = wait.until(EC.visibility_of_element_located((By.ID, "size-readout")))
    wait.until(lambda d: "% of FP32" in readout.text)
    before = readout.text
    slider = browser.find_element(By.CSS_SELECTOR, "input[aria-label='range slider for layer-ratio: p']")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'}); arguments[0].focus();", slider)
    slider.send_keys(Keys.END)  # p = 1: every tensor to fp16, as a keyboard user would
    wait.until(lambda d: readout.text != before and "50.0% of FP32" in readout.text)

    open_tab(browser, wait, "Compare")
    browser.find_element(By.ID, "generate").click()
    for elem_id in ("img-fp32", "img-plan"):
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f"#{elem_id} img[src]"))
    wait.until(lambda d: "ms/image" in d.find_element(By.ID, "compare-timing").text)
