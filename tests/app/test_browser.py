"""End to end in Debian's headless Chromium: the first visit (example, presets), a slider that moves the size
readout, Generate, and a Fisher recompute whose progress bar moves and whose Cancel stops the server job."""
import json
import os
import shutil

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
    from tests.app.conftest import launch

    demo, url = launch(app_state)
    yield url
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


def choose(driver, wait, label, option):
    """Pick `option` in the Gradio dropdown labelled `label`, as a mouse user would."""
    box = driver.find_element(By.CSS_SELECTOR, f"input[role='combobox'][aria-label='{label}']")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", box)
    box.click()
    wait.until(EC.element_to_be_clickable((By.XPATH, f"//ul[@role='listbox']/li[contains(normalize-space(), '{option}')]"))).click()


def test_a_first_visit_shows_the_example_presets_and_how_to_lines(url, browser):
    from demo.presets import PRESETS, UNIFORM_INT4

    wait = WebDriverWait(browser, 120)
    browser.get(url)
    open_tab(browser, wait, "Compare")  # the example is there without pressing Generate
    for elem_id in ("img-fp32", "img-plan", "img-uniform"):
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f"#{elem_id} img[src]"))
    wait.until(lambda d: "mean |Δ| to FP32" in d.find_element(By.ID, "compare-timing").text)
    assert "How to" in browser.find_element(By.ID, "howto-compare").text
    open_tab(browser, wait, "Inside")  # activations are drawn on arrival too
    wait.until(lambda d: len([e for e in d.find_elements(By.CSS_SELECTOR, ".js-plotly-plot") if e.is_displayed()]) >= 2)
    open_tab(browser, wait, "Quantize")
    readout = wait.until(EC.visibility_of_element_located((By.ID, "size-readout")))
    wait.until(lambda d: "% of FP32" in readout.text and "budget" in readout.text)  # the default preset
    box = browser.find_element(By.CSS_SELECTOR, "input[role='combobox'][aria-label='preset']")
    box.click()
    def options(d):  # once the list has rendered every option's text
        texts = [li.text for li in d.find_elements(By.XPATH, "//ul[@role='listbox']/li")]
        return texts if texts and all(texts) else False
    listed = wait.until(options)
    assert all(any(t.endswith(name) for t in listed) for name in PRESETS), listed  # the chosen one has a ✓
    wait.until(EC.element_to_be_clickable(
        (By.XPATH, f"//ul[@role='listbox']/li[contains(normalize-space(), '{UNIFORM_INT4}')]"))).click()
    wait.until(lambda d: UNIFORM_INT4 in readout.text, message=f"the readout did not follow the preset: {readout.text!r}")


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
    choose(browser, wait, "preset", "source: layer-ratio p=0.25 → FP16")  # shows the p slider
    wait.until(lambda d: "layer-ratio p=0.25" in readout.text)
    before = readout.text
    slider = browser.find_element(By.CSS_SELECTOR, "input[aria-label='range slider for layer-ratio: p']")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'}); arguments[0].focus();", slider)
    slider.send_keys(Keys.END)  # p = 1: every tensor to fp16, as a keyboard user would
    wait.until(lambda d: readout.text != before and "50.0% of FP32" in readout.text)

    open_tab(browser, wait, "Compare")
    browser.find_element(By.ID, "generate").click()
    for elem_id in ("img-fp32", "img-plan"):
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f"#{elem_id} img[src]"))
    wait.until(lambda d: "mean |Δ| to FP32" in d.find_element(By.ID, "compare-timing").text)


def test_a_fisher_recompute_shows_a_moving_progress_bar_and_cancel_stops_it(url, browser, app_state):
    wait = WebDriverWait(browser, 120)
    browser.get(url)
    open_tab(browser, wait, "Fisher")
    browser.find_element(By.XPATH, "//button[contains(normalize-space(), 'Recompute the Fisher map')]").click()
    for label, value in (("timestep bins", 100), ("samples per bin", 256)):  # long enough to watch
        box = wait.until(EC.visibility_of_element_located(
            (By.CSS_SELECTOR, f"input[aria-label='number input for {label}'], input[aria-label='{label}']")))
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", box)
        box.clear()
        box.send_keys(str(value), Keys.ENTER)
    button = browser.find_element(By.ID, "recompute")
    button.click()  # 25,600 gradients: the first press shows the estimate, the second starts
    wait.until(lambda d: button.text.startswith("Start (about")
               and "per-sample gradients" in d.find_element(By.ID, "fisher-status").text)
    button.click()

    def progress(d):
        texts = [e.text for e in d.find_elements(By.CSS_SELECTOR, ".progress-level") if "bin " in e.text]
        return texts[0] if texts else False
    first = wait.until(progress)
    wait.until(lambda d: progress(d) not in (False, first))  # it moves
    browser.find_element(By.ID, "recompute-cancel").click()
    wait.until(lambda d: "Cancelled" in d.find_element(By.ID, "fisher-status").text)
    assert app_state.heavy.acquire(timeout=300)  # the server job stopped too
    app_state.heavy.release()
    assert not _error_toasts(browser)


def heatmap_rows(driver) -> list:
    """The Fisher heatmap's row names as Plotly holds them (empty until it is drawn)."""
    return driver.execute_script(
        "const p = document.querySelector('#fisher-heatmap .js-plotly-plot');"
        "return p && p.data && p.data.length ? Array.from(p.data[0].y || []) : [];")


def test_switching_the_model_switches_every_tab_and_back(models_url, browser, app_state, models):
    tiny = models.get(models.ids[1])
    mnist_bytes, tiny_bytes = (f"FP32 is {4 * sum(p.numel() for p in s.model.parameters()):,} bytes"
                               for s in (app_state, tiny))
    wait = WebDriverWait(browser, 120)
    browser.get(models_url)
    wait.until(lambda d: "embed" in heatmap_rows(d))  # the MNIST U-Net's layers
    choose(browser, wait, "model", tiny.title)
    wait.until(lambda d: "down_blocks.0" in heatmap_rows(d) and "embed" not in heatmap_rows(d))
    assert tiny.title in browser.find_element(By.ID, "fisher-note").text
    open_tab(browser, wait, "Quantize")
    readout = wait.until(EC.visibility_of_element_located((By.ID, "size-readout")))
    wait.until(lambda d: tiny_bytes in readout.text)
    assert browser.find_element(By.ID, "quantize-note").text == ""  # every preset works on its own layers

    open_tab(browser, wait, "Compare")
    timing = browser.find_element(By.ID, "compare-timing")
    wait.until(lambda d: "press Generate" in timing.text)  # the previous model's images are cleared
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda d: "mean |Δ| to FP32" in timing.text and tiny.title in timing.text)
    for elem_id in ("img-fp32", "img-plan", "img-uniform"):
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f"#{elem_id} img[src]"))
    open_tab(browser, wait, "Quality")
    assert "no classifier shipped" in browser.find_element(By.ID, "quality-note").text
    open_tab(browser, wait, "Inside")
    wait.until(lambda d: "conv_in" in d.execute_script(  # its own layers, traced on the switch
        "const p = document.querySelector('#inside-activations .js-plotly-plot');"
        "return p && p.data && p.data.length ? Array.from(p.data[0].y || []).join(' ') : '';"))

    choose(browser, wait, "model", app_state.title)  # and back
    open_tab(browser, wait, "Quantize")
    wait.until(lambda d: mnist_bytes in readout.text and "budget" in readout.text)
    open_tab(browser, wait, "Fisher")
    wait.until(lambda d: "embed" in heatmap_rows(d))


def test_the_shipped_fashion_model_is_one_switch_away_with_its_own_map_size_and_classifier(models_url, browser,
                                                                                           app_state):
    from demo.models import FASHION

    if not (FASHION / "lafq.json").is_file():
        pytest.skip("checkpoints/fashion is not in this checkout")
    title = json.loads((FASHION / "lafq.json").read_text())["name"]
    params = json.loads((FASHION / "lafq.json").read_text())["train"]["params"]
    wait = WebDriverWait(browser, 120)
    browser.get(models_url)
    wait.until(lambda d: "embed" in heatmap_rows(d))
    choose(browser, wait, "model", title)
    wait.until(lambda d: "conv_out" in heatmap_rows(d) and "embed" not in heatmap_rows(d))
    open_tab(browser, wait, "Quantize")
    readout = wait.until(EC.visibility_of_element_located((By.ID, "size-readout")))
    wait.until(lambda d: f"FP32 is {4 * params:,} bytes" in readout.text)
    open_tab(browser, wait, "Quality")
    assert "no classifier shipped" not in browser.find_element(By.ID, "quality-note").text
    choose(browser, wait, "model", app_state.title)
    open_tab(browser, wait, "Fisher")
    wait.until(lambda d: "embed" in heatmap_rows(d))


def _hero_in_first_screen(driver):
    """The hero picture's box within the first screen (top of the page), once its image has loaded; else None."""
    return driver.execute_script(
        "const i = document.querySelector('#hero img[src]');"
        "if (!i || !i.complete || i.naturalWidth === 0) return null;"
        "const b = i.getBoundingClientRect(), y = window.scrollY;"
        "return (b.top + y >= 0 && b.bottom + y <= window.innerHeight && b.width > 0) ? [i.src, b.width] : null;")


@pytest.mark.parametrize("width, height, mobile", [(1440, 900, False), (390, 844, True)], ids=["desktop", "phone"])
def test_the_side_by_side_example_is_on_the_first_screen_for_each_model(models_url, browser, app_state, width, height,
                                                                        mobile):
    from demo.models import FASHION

    if not (FASHION / "lafq.json").is_file():
        pytest.skip("checkpoints/fashion is not in this checkout")
    fashion = json.loads((FASHION / "lafq.json").read_text())["name"]
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile})
    try:
        wait = WebDriverWait(browser, 180)
        browser.get(models_url)
        line = wait.until(EC.presence_of_element_located((By.ID, "hero-line")))
        first = wait.until(_hero_in_first_screen, message="the example is not in the first screen on arrival")
        assert browser.execute_script("return window.scrollY") == 0
        assert app_state.title in line.text and "Next:" in line.text
        if mobile:
            assert first[1] >= 0.8 * width  # one picture across the phone, not three stacked below the fold
        for title in (fashion, app_state.title):  # a switch brings that model's own example; and back
            choose(browser, wait, "model", title)
            wait.until(lambda d: title in d.find_element(By.ID, "hero-line").text)
            browser.execute_script("window.scrollTo(0, 0)")
            shown = wait.until(_hero_in_first_screen, message=f"no example in the first screen for {title}")
            if title == fashion:
                assert shown[0] != first[0]
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def _error_toasts(driver) -> list[str]:
    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".toast-body") if "error" in e.text.lower()]


def test_a_bad_seed_and_a_refused_upload_keep_the_last_results_and_say_why_beside_them(url, browser, tmp_path):
    wait = WebDriverWait(browser, 120)
    browser.get(url)
    open_tab(browser, wait, "Compare")
    timing = browser.find_element(By.ID, "compare-timing")
    wait.until(lambda d: "mean |Δ| to FP32" in timing.text)  # the arrival example's images
    srcs = {i: browser.find_element(By.CSS_SELECTOR, f"#{i} img").get_attribute("src") for i in ("img-fp32", "img-plan")}
    readout = timing.text
    seed = browser.find_element(By.CSS_SELECTOR, "input[aria-label='seed']")
    seed.clear()
    seed.send_keys("-5", Keys.TAB)  # a typed value counts once the box loses focus, as for a person
    browser.find_element(By.ID, "generate").click()
    note = browser.find_element(By.ID, "compare-note")
    wait.until(lambda d: "seed must be in" in note.text, message=f"no refusal beside the button: {note.text!r}")
    assert {i: browser.find_element(By.CSS_SELECTOR, f"#{i} img").get_attribute("src") for i in srcs} == srcs
    assert timing.text == readout  # the sizes and mean |Δ| of the images shown stay too
    assert not _error_toasts(browser)

    open_tab(browser, wait, "Quantize")
    readout = wait.until(EC.visibility_of_element_located((By.ID, "size-readout")))
    wait.until(lambda d: "% of FP32" in readout.text)
    before = readout.text
    bad = tmp_path / "notes.txt"
    bad.write_text("not a plan")
    browser.find_element(By.CSS_SELECTOR, "#upload input[type='file']").send_keys(str(bad))
    note = browser.find_element(By.ID, "upload-note")
    wait.until(lambda d: "accepted files are" in note.text, message=f"no inline refusal: {note.text!r}")
    assert readout.text == before  # the last good readout stays
    wait.until(lambda d: "notes.txt" not in d.find_element(By.ID, "upload").text)  # the refused file is not shown
    assert not _error_toasts(browser)


def test_the_preset_box_says_custom_as_soon_as_a_control_departs_from_the_preset(url, browser):
    from demo.presets import BUDGET_45, CUSTOM

    wait = WebDriverWait(browser, 120)
    browser.get(url)
    open_tab(browser, wait, "Quantize")
    readout = wait.until(EC.visibility_of_element_located((By.ID, "size-readout")))
    wait.until(lambda d: "budget" in readout.text)
    box = browser.find_element(By.CSS_SELECTOR, "input[role='combobox'][aria-label='preset']")
    assert box.get_attribute("value") == BUDGET_45
    slider = browser.find_element(By.CSS_SELECTOR, "input[aria-label^='range slider for budget']")
    assert float(slider.get_attribute("max")) == 8  # the useful range: floor ... 8 bits
    before = readout.text
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'}); arguments[0].focus();", slider)
    slider.send_keys(Keys.ARROW_RIGHT)  # 4.6 bits: no preset any more
    wait.until(lambda d: readout.text != before and box.get_attribute("value") == CUSTOM,
               message=f"preset box: {box.get_attribute('value')!r}")
    choose(browser, wait, "preset", BUDGET_45)  # and back: the box names it again
    wait.until(lambda d: readout.text == before and box.get_attribute("value") == BUDGET_45)


def test_an_out_of_range_n_bins_or_timestep_is_refused_with_its_range_never_cut_to_it(url, browser):
    wait = WebDriverWait(browser, 120)
    browser.get(url)
    for tab, label, value, button, words in (
            ("Quality", "N per seed", "99999", "//button[@id='evaluate']", "N must be in [10, 2000]"),
            ("Fisher", "timestep bins", "100000", "//button[@id='recompute']", "bins must be in [1, 100]"),
            ("Inside", "saliency timestep", "5000", "//button[normalize-space()='Saliency map']",
             "timestep must be in [0, 999]")):
        open_tab(browser, wait, tab)
        if tab == "Fisher":
            browser.find_element(By.XPATH, "//button[contains(normalize-space(), 'Recompute the Fisher map')]").click()
        box = wait.until(EC.visibility_of_element_located((By.CSS_SELECTOR, f"input[aria-label='{label}']")))
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", box)
        box.clear()
        box.send_keys(value, Keys.TAB)
        browser.find_element(By.XPATH, button).click()
        # Quality and Fisher say it beside their buttons (the last result stays); Inside in a message.
        where = {"Quality": "#fid-estimate", "Fisher": "#fisher-status"}.get(tab, ".toast-body")
        wait.until(lambda d: any(words in e.text for e in d.find_elements(By.CSS_SELECTOR, where)),
                   message=f"{tab}: no refusal naming the range {words!r}")
        assert box.get_attribute("value") == value  # not cut to the range
        for close in browser.find_elements(By.CSS_SELECTOR, ".toast-close"):
            browser.execute_script("arguments[0].click();", close)


def test_in_dark_mode_every_figure_takes_the_dark_layout_and_in_light_mode_none_does(url, browser):
    wait = WebDriverWait(browser, 120)
    themes = "return Array.from(document.querySelectorAll('.js-plotly-plot')).map(g => (g.layout.meta || {}).lafq_theme || 'none')"
    browser.get(url + "?__theme=dark")
    wait.until(lambda d: d.execute_script("return document.body.classList.contains('dark')"))
    wait.until(lambda d: len(d.execute_script(themes)) >= 3 and set(d.execute_script(themes)) == {"dark"},
               message="figures not in the dark layout")
    font = browser.execute_script("return document.querySelector('.js-plotly-plot')._fullLayout.font.color")
    assert font == "#f2f5fa"  # plotly_dark's light text on the page's dark background
    open_tab(browser, wait, "Quantize")  # a figure drawn later (the readout) follows too
    wait.until(lambda d: set(d.execute_script(themes)) == {"dark"} and len(d.execute_script(themes)) >= 4)
    browser.get(url + "?__theme=light")
    wait.until(lambda d: len(d.execute_script(themes)) >= 3)
    assert set(browser.execute_script(themes)) == {"none"}  # as the server built them


def test_a_long_evaluation_shows_its_estimate_and_starts_only_on_a_second_press(url, browser, app_state, monkeypatch):
    monkeypatch.setattr(app_state, "seconds_per_image_step", lambda: 1.0)  # this machine made slow: minutes
    wait = WebDriverWait(browser, 120)
    browser.get(url)
    open_tab(browser, wait, "Quality")
    button = browser.find_element(By.ID, "evaluate")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", button)
    button.click()
    note = browser.find_element(By.ID, "fid-estimate")
    wait.until(lambda d: "Press Start" in note.text and button.text.startswith("Start (about"),
               message=f"no estimate: {note.text!r}, button {button.text!r}")
    assert "images × DDIM-20" in note.text and browser.find_element(By.ID, "fid-result").text == ""  # nothing ran
    box = browser.find_element(By.CSS_SELECTOR, "input[aria-label='N per seed']")
    box.clear()
    box.send_keys("10", Keys.TAB)  # another setting: the estimate no longer applies
    wait.until(lambda d: button.text == "Evaluate" and note.text == "")
