"""The results page (captioner/viz/html.py, ``captioner-caption --html``): its content, bad input, and a real browser.

The browser test drives headless Chromium with selenium. It skips, naming what is missing, when
chromium / chromedriver / selenium are not installed, except under CI=true, where it fails instead
(.ci/install-browser.sh installs the browser; selenium is in the test extra).
"""

from __future__ import annotations

import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CLI_WORDS, tiny_captioner

from captioner.cli import caption as cli
from captioner.data.sources import ImageRecord
from captioner.decoding.caption import Caption
from captioner.models.checkpoint import save_checkpoint
from captioner.viz.html import PageItem, decode_attention, encode_attention, write_results_page, write_split_page

WORDS = CLI_WORDS


# --------------------------------------------------------------------------------------------------
# Reading a page back
class _Page(HTMLParser):
    """Every element of a page with its attributes, the item (section) it is in, and the text of word buttons."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str], str | None]] = []
        self.words: dict[str, list[str]] = {}  # caption id -> its words, in order
        self.section: str | None = None
        self.caption: str | None = None
        self.in_word = False
        self.in_error = False
        self.errors: dict[str, str] = {}
        self.scripts: list[str] = []
        self.in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "section":
            self.section = a.get("id")
        if tag == "li" and "caption" in a.get("class", "").split():
            self.caption = a["data-caption"]
            self.words[self.caption] = []
        self.in_word = tag == "button" and "word" in a.get("class", "").split()
        self.in_error = tag == "p" and "error" in a.get("class", "").split()
        self.in_script = tag == "script"
        self.elements.append((tag, a, self.section))

    def handle_endtag(self, tag: str) -> None:
        if tag == "section":
            self.section = None
        self.in_word = self.in_word and tag != "button"
        self.in_error = self.in_error and tag != "p"
        self.in_script = self.in_script and tag != "script"

    def handle_data(self, data: str) -> None:
        if self.in_word and self.caption is not None:
            self.words[self.caption].append(data)
        if self.in_error and self.section is not None:
            self.errors[self.section] = self.errors.get(self.section, "") + data
        if self.in_script:
            self.scripts.append(data)

    def find(self, tag: str, cls: str | None = None) -> list[tuple[dict[str, str], str | None]]:
        return [(a, s) for t, a, s in self.elements if t == tag and (cls is None or cls in a.get("class", "").split())]


def page_table(text: str) -> dict[str, tuple[str, str]]:
    """The metrics table of a page: {metric: (value, x100)}."""
    table = re.search(r'<table class="metrics">(.*?)</table>', text, re.S).group(1)
    names = re.findall(r'<th scope="col">(.*?)</th>', table)
    rows = [re.findall(r"<td>(.*?)</td>", row) for row in re.findall(r'<th scope="row">.*?</th>(.*?)</tr>', table)]
    return {n: (rows[0][i], rows[1][i]) for i, n in enumerate(names)}


def read_page(path: Path) -> _Page:
    p = _Page()
    p.feed(path.read_text(encoding="utf-8"))
    return p


# --------------------------------------------------------------------------------------------------
# Fixtures
def _caption(words: list[str], L: int, seed: int, locations: bool = False, finished: bool = True) -> Caption:
    g = torch.Generator().manual_seed(seed)
    att = 0.7 * torch.softmax(4 * torch.randn(len(words), L, generator=g), dim=-1) + 0.3 / L  # (T, L) peaked, not one-hot
    locs = att.argmax(-1).tolist() if locations else None
    return Caption(tokens=list(range(4, 4 + len(words))), words=words, score=-1.5 * len(words), attention=att,
                   finished=finished, locations=locs)


def _photo(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def synthetic_items() -> list[PageItem]:
    """A photo with two captions, a hard-attention one (outlined cells), a broken file, and a small shapes-like image."""
    return [
        PageItem("photos/dog <1>.jpg", _photo(0, (500, 375)), [_caption(["a", "dog", "runs"], 16, 0), _caption(["a", "dog"], 16, 1)],
                 labels=["beam 1", "beam 2"]),
        PageItem("photos/hard.png", _photo(1, (300, 300)), [_caption(["two", "red", "circles"], 9, 2, locations=True)]),
        PageItem("photos/broken.jpg", None, [], error="unreadable or truncated image (image file is truncated)"),
        PageItem("shapes/000001.png", _photo(2, (64, 64)), [_caption(["a", "blue", "square", "and", "a"], 16, 3, finished=False)]),
    ]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, *tiny_captioner())
    return path


@pytest.fixture(scope="module")
def hard_ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny_hard.pt"
    save_checkpoint(path, *tiny_captioner("hard", seed=1))
    return path


@pytest.fixture
def photos(tmp_path) -> Path:
    """Three good images and one truncated file."""
    d = tmp_path / "photos"
    d.mkdir()
    for i in range(3):
        _photo(i, (40 + 10 * i, 30)).save(d / f"img{i}.png")
    (d / "zbroken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return d


# --------------------------------------------------------------------------------------------------
# Page content
def test_page_has_every_image_caption_and_word_with_its_attention(tmp_path):
    items = synthetic_items()
    path = write_results_page(tmp_path / "page", items, "test page", meta={"checkpoint": "x.pt"})
    assert path == tmp_path / "page" / "index.html"
    page = read_page(path)
    sections = page.find("section", "item")
    assert [a["data-name"] for a, _ in sections] == [it.name for it in items]
    captions = page.find("li", "caption")
    assert len(captions) == sum(len(it.captions) for it in items)
    by_id = {a["data-caption"]: a for a, _ in captions}
    for i, item in enumerate(items):
        for k, c in enumerate(item.captions):
            a = by_id[f"item-{i}-{k}"]
            assert page.words[f"item-{i}-{k}"] == c.words  # one button per word, in order
            h, w = map(int, a["data-grid"].split("x"))
            assert h * w == c.attention.size(1)
            got = decode_attention(a["data-attn"], len(c.words), h * w)  # (T, L), each row / its peak
            peaks = np.array([float(x) for x in a["data-peaks"].split(",")])
            want = c.attention.numpy()
            np.testing.assert_allclose(peaks, want.max(1), rtol=1e-3)
            np.testing.assert_allclose(got * peaks[:, None], want, atol=want.max() / 255 + 1e-6)  # within one quantisation step
            assert ("data-locs" in a) == (c.locations is not None)
            if c.locations is not None:
                assert [int(x) for x in a["data-locs"].split(",")] == c.locations
    buttons = page.find("button", "word")
    assert len(buttons) == sum(len(c.words) for it in items for c in it.captions)
    assert all(b.get("type") == "button" for b, _ in buttons)  # keyboard-focusable, Enter/Space activate
    # Pictures: written beside the page, referenced relatively, one per good image; small ones as PNG.
    imgs = page.find("img", "photo")
    assert [s for _, s in imgs] == ["item-0", "item-1", "item-3"]
    for a, _ in imgs:
        f = path.parent / unquote(a["src"])
        assert f.is_file() and f.parent.name == "images"
        with Image.open(f) as im:
            assert max(im.size) <= 384 and (a["width"], a["height"]) == (str(im.size[0]), str(im.size[1]))
    assert imgs[0][0]["src"].endswith(".jpg") and imgs[2][0]["src"].endswith(".png")
    assert sorted(p.name for p in (path.parent / "images").iterdir()) == ["00000_dog_1.jpg", "00001_hard.jpg", "00003_000001.png"]
    # Self-contained: no network, no external script or style.
    text = path.read_text(encoding="utf-8")
    assert not re.search(r"(src|href)\s*=\s*\"(https?:)?//", text) and "<link" not in text and "@import" not in text
    assert "x.pt" in text and "(unfinished)" in text


def test_broken_image_gets_a_row_with_its_error_and_the_rest_is_written(tmp_path):
    items = synthetic_items()
    path = write_results_page(tmp_path, items, "t")
    page = read_page(path)
    broken = [a for a, _ in page.find("section", "broken")]
    assert [a["id"] for a in broken] == ["item-2"]
    assert "truncated" in page.errors["item-2"]
    assert not [a for a, s in page.find("img") if s == "item-2"]  # no <img> that would fail to load
    assert len(page.find("img", "photo")) == 3 and "1 could not be captioned" in path.read_text()


def test_a_picture_that_cannot_be_drawn_keeps_its_captions(tmp_path):
    class Bad:
        def convert(self, mode):
            raise OSError("decoder exploded")

    item = PageItem("odd.png", Bad(), [_caption(["a", "cat"], 4, 0)])  # type: ignore[arg-type]
    page = read_page(write_results_page(tmp_path, [item, synthetic_items()[0]], "t"))
    assert "decoder exploded" in page.errors["item-0"] and page.words["item-0-0"] == ["a", "cat"]
    assert len(page.find("img", "photo")) == 1


def test_a_rerun_replaces_the_old_pictures_and_leaves_other_files(tmp_path):
    write_results_page(tmp_path, synthetic_items(), "t")
    (tmp_path / "images" / "mine.txt").write_text("user file")
    write_results_page(tmp_path, synthetic_items()[1:2], "t")
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["00000_hard.jpg", "mine.txt"]


def test_encode_attention_round_trip_and_shapes():
    att = torch.tensor([[0.1, 0.6, 0.3], [0.0, 0.0, 0.0], [0.5, 0.25, 0.25]])
    data, peaks = encode_attention(att)
    assert peaks == pytest.approx([0.6, 0.0, 0.5])
    got = decode_attention(data, 3, 3)
    np.testing.assert_allclose(got[0], [0.1 / 0.6, 1.0, 0.5], atol=1 / 255)
    assert (got[1] == 0).all()  # an all-zero row stays zero, no division by zero
    with pytest.raises(ValueError):
        encode_attention(torch.zeros(3))
    with pytest.raises(ValueError):
        write_results_page(Path("/nonexistent-never-written"), [], "t", order="best")


def test_split_page_sorts_worst_first_with_references_cider_and_metrics(tmp_path):
    files = []
    for i in range(3):
        f = tmp_path / f"im{i}.jpg"
        _photo(i, (120, 90)).save(f)
        files.append(f)
    files[2].unlink()  # a record whose picture has gone missing: captions and scores still shown
    records = [ImageRecord(f"id{i}", files[i], "test", [f"ref {i} a", f"ref {i} b"], [["ref"], ["ref"]]) for i in range(3)]
    caps = [_caption(["a", "dog"], 16, i) for i in range(3)]
    cider = {"id0": {"CIDEr-D": 0.9, "BLEU-4": 0.3}, "id1": {"CIDEr-D": 0.1}, "id2": {"CIDEr-D": 0.5}}
    metrics = {"BLEU-4": 0.2345, "CIDEr-D": 0.5, "images": 3, "per_image": cider}
    path = write_split_page(tmp_path / "page", records, caps, cider, metrics)
    page = read_page(path)
    names = [a["data-name"] for a, _ in page.find("section", "item")]
    assert names == ["id1", "id2", "id0"]  # worst first
    text = path.read_text()
    for r in records:
        for ref in r.captions:
            assert ref in text
    assert "CIDEr-D <b>0.100</b>" in text and "sorted by CIDEr-D, worst first" in text
    table = page_table(text)
    assert table["BLEU-4"] == ("0.2345", "23.45") and table["CIDEr-D"] == ("0.5000", "50.00") and table["images"] == ("3", "")
    assert "per_image" not in text  # only numbers go in the table
    assert "file not found" in page.errors["item-2"] and page.words["item-2-0"] == ["a", "dog"]  # missing picture
    assert len(page.find("img", "photo")) == 2
    # Scores aligned with the records work too; a custom loader is used for the pictures.
    path = write_split_page(tmp_path / "p2", records, caps, [0.3, 0.2, 0.1], metrics, load_image=lambda r: _photo(7, (50, 50)))
    assert [a["data-name"] for a, _ in read_page(path).find("section", "item")] == ["id2", "id1", "id0"]
    with pytest.raises(ValueError):
        write_split_page(tmp_path / "p3", records, caps[:2], cider, metrics)


# --------------------------------------------------------------------------------------------------
# The command-line flag
def test_cli_html_flag_writes_a_page_with_every_input(ckpt, photos, tmp_path, capsys):
    out = tmp_path / "page"
    rc = cli.main([str(photos), "-c", str(ckpt), "--max-len", "4", "--html", str(out), "--n-best", "2", "--beam", "3"])
    stdout, stderr = capsys.readouterr()
    assert rc == 1  # one input could not be captioned
    lines = [ln.split("\t") for ln in stdout.splitlines()]
    assert [Path(p).name for p, _ in lines] == ["img0.png", "img1.png", "img2.png"]  # stdout unchanged by --html
    assert f"results page: {out / 'index.html'}" in stderr
    page = read_page(out / "index.html")
    sections = page.find("section", "item")
    assert [Path(a["data-name"]).name for a, _ in sections] == ["img0.png", "img1.png", "img2.png", "zbroken.jpg"]
    assert [a["id"] for a in (s for s, _ in page.find("section", "broken"))] == ["item-3"]
    assert "zbroken.jpg" not in page.errors.get("item-3", "x") and page.errors["item-3"]  # the reason, not the path again
    for i, (_, caption) in enumerate(lines):
        assert " ".join(page.words[f"item-{i}-0"]) == caption  # the best caption is the printed one
        assert f"item-{i}-1" in page.words  # and the second best is listed
    assert len(page.find("img", "photo")) == 3
    assert not page.find("li", "caption")[0][0].get("data-locs")  # soft attention: no chosen cell


def test_cli_html_hard_attention_outlines_cells_and_masks_flags(hard_ckpt, photos, tmp_path, capsys):
    out = tmp_path / "page"
    rc = cli.main([str(photos / "img0.png"), "-c", str(hard_ckpt), "--greedy", "--max-len", "3", "--html", str(out),
                   "--block-bad-endings"])
    capsys.readouterr()
    assert rc == 0
    page = read_page(out / "index.html")
    (cap, _), = page.find("li", "caption")
    assert len(cap["data-locs"].split(",")) == len(page.words["item-0-0"])
    assert "bad endings" in (out / "index.html").read_text()
    assert not page.words["item-0-0"] or page.words["item-0-0"][-1] not in {"a", "and"}


def test_cli_html_bad_arguments(ckpt, photos, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    rc = cli.main([str(photos / "img0.png"), "-c", str(ckpt), "--html", str(blocker / "page")])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and "cannot write the results page" in err
    for argv in (["--greedy", "--n-best", "2"], ["--beam", "2", "--n-best", "3"], ["--n-best", "0"]):
        with pytest.raises(SystemExit) as e:
            cli.main([str(photos), "-c", str(ckpt), *argv])
        assert e.value.code == 2
    assert cli.main([str(photos / "img0.png"), "-c", str(ckpt), "--n-best", "4"]) == 2  # wider than the default beam of 3
    assert "--beam 4" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# A real browser
def _browser_or_skip():
    """A headless Chromium WebDriver; skip (fail under CI=true) naming what is missing."""
    missing = []
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install selenium)")
    chromium = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if chromium is None:
        missing.append("chromium (Debian package chromium)")
    chromedriver = shutil.which("chromedriver")
    if chromedriver is None:
        missing.append("chromedriver (Debian package chromium-driver)")
    if missing:
        msg = "browser test needs " + ", ".join(missing) + "; .ci/install-browser.sh installs the browser"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager reach for the network
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,1400",
                "--allow-file-access-from-files", "--force-device-scale-factor=1"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=chromedriver), options=opts)


@pytest.mark.parametrize("ci", ["true", ""])
def test_missing_browser_skips_outside_ci_and_fails_under_ci(monkeypatch, ci):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.fail.Exception if ci else pytest.skip.Exception, match="chromedriver .Debian package chromium-driver"):
        _browser_or_skip()


@pytest.fixture(scope="module")
def browser():
    driver = _browser_or_skip()
    try:
        yield driver
    finally:
        driver.quit()


CANVAS_STATE = """
const c = arguments[0], d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
let dark = 0, yellow = 0;
for (let i = 0; i < d.length; i += 4) { dark += d[i + 3]; if (d[i] > 200 && d[i + 1] > 200 && d[i + 2] < 80 && d[i + 3] > 200) yellow++; }
return [dark, yellow, c.dataset.shown || ""];
"""


def hover(driver, element) -> None:
    """Move the pointer onto an element (quickly: the default 250 ms per move adds up)."""
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver, duration=20).move_to_element(element).perform()


def assert_pictures_load(driver) -> None:
    """Every picture loads (they are lazy: scrolled into view one by one), then back to the top."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    for img in driver.find_elements(By.CSS_SELECTOR, "img.photo"):
        driver.execute_script("arguments[0].scrollIntoView()", img)
        WebDriverWait(driver, 10).until(lambda d: d.execute_script("return arguments[0].complete", img))
        assert driver.execute_script("return arguments[0].naturalWidth > 0", img), img.get_attribute("src")
    driver.execute_script("window.scrollTo(0, 0)")


def _severe(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


def test_browser_hover_focus_and_tap_show_each_words_attention(browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    items = synthetic_items()
    path = write_results_page(tmp_path / "page", items, "browser test")
    browser.get(path.as_uri())
    sections = browser.find_elements(By.CSS_SELECTOR, "section.item")
    assert len(sections) == len(items)
    assert len(browser.find_elements(By.CSS_SELECTOR, "li.caption")) == 4
    assert_pictures_load(browser)
    texts = [" ".join(w.text for w in c.find_elements(By.CSS_SELECTOR, "button.word"))
             for c in browser.find_elements(By.CSS_SELECTOR, "li.caption")]
    assert texts == ["a dog runs", "a dog", "two red circles", "a blue square and a"]

    first = sections[0]
    canvas = first.find_element(By.CSS_SELECTOR, "canvas.attn")
    words = first.find_elements(By.CSS_SELECTOR, "button.word")
    assert browser.execute_script(CANVAS_STATE, canvas)[0] == 0  # nothing shown yet
    hover(browser, words[0])
    dark0, _, shown0 = browser.execute_script(CANVAS_STATE, canvas)
    hover(browser, words[1])
    dark1, _, shown1 = browser.execute_script(CANVAS_STATE, canvas)
    assert (shown0, shown1) == ("item-0-0:0", "item-0-0:1")
    assert dark0 > 0 and dark1 > 0 and dark0 != dark1  # a different map is drawn for each word
    assert "dog" in first.find_element(By.CSS_SELECTOR, ".viz-label").text
    toggle = browser.find_element(By.ID, "stretch")
    browser.execute_script("arguments[0].click()", toggle)  # (the pointer stays on the word) peak scaling instead of min-max
    assert browser.execute_script(CANVAS_STATE, canvas)[2] == "item-0-0:1"
    dark1_peak = browser.execute_script(CANVAS_STATE, canvas)[0]
    assert 0 < dark1_peak < dark1  # min-max stretching darkens more of a map that is not one-hot
    browser.execute_script("arguments[0].click()", toggle)
    assert browser.execute_script(CANVAS_STATE, canvas)[0] == dark1
    hover(browser, browser.find_element(By.TAG_NAME, "h1"))
    assert browser.execute_script(CANVAS_STATE, canvas)[2] == ""  # leaving the word clears the map

    # Tap/click pins a word: it stays shown after the pointer leaves; a second click unpins.
    words[2].click()
    hover(browser, browser.find_element(By.TAG_NAME, "h1"))
    assert browser.execute_script(CANVAS_STATE, canvas)[2] == "item-0-0:2" and words[2].get_attribute("aria-pressed") == "true"
    words[2].click()
    assert words[2].get_attribute("aria-pressed") == "false"

    # Keyboard: Tab to the first word shows it, arrow keys move along, Escape clears.
    browser.get(path.as_uri())  # a fresh page: the first Tab goes to the contrast checkbox, the second to the first word
    first = browser.find_element(By.CSS_SELECTOR, "section.item")
    canvas = first.find_element(By.CSS_SELECTOR, "canvas.attn")
    words = first.find_elements(By.CSS_SELECTOR, "button.word")
    sections = browser.find_elements(By.CSS_SELECTOR, "section.item")
    ActionChains(browser).send_keys(Keys.TAB).perform()
    assert browser.switch_to.active_element.get_attribute("id") == "stretch"
    ActionChains(browser).send_keys(Keys.TAB).perform()
    assert browser.switch_to.active_element == words[0]
    assert browser.execute_script(CANVAS_STATE, canvas)[2] == "item-0-0:0"
    ActionChains(browser).send_keys(Keys.ARROW_RIGHT).perform()
    assert browser.switch_to.active_element == words[1] and browser.execute_script(CANVAS_STATE, canvas)[2] == "item-0-0:1"
    ActionChains(browser).send_keys(Keys.ESCAPE).perform()
    assert browser.execute_script(CANVAS_STATE, canvas)[2] == ""

    # Hard attention: the chosen cell is outlined (yellow pixels), a different cell for different words.
    hard = sections[1]
    hcanvas = hard.find_element(By.CSS_SELECTOR, "canvas.attn")
    hwords = hard.find_elements(By.CSS_SELECTOR, "button.word")
    outlines = []
    for w in hwords:
        hover(browser, w)
        _, yellow, _ = browser.execute_script(CANVAS_STATE, hcanvas)
        assert yellow > 0
        outlines.append(browser.execute_script("return arguments[0].toDataURL()", hcanvas))
    assert len(set(outlines)) == len(hwords)
    # The broken row shows its error and has no picture.
    assert "truncated" in sections[2].find_element(By.CSS_SELECTOR, ".error").text
    assert not sections[2].find_elements(By.TAG_NAME, "img")
    assert _severe(browser) == []  # no JavaScript errors, no failed loads


def test_browser_page_from_the_cli(browser, ckpt, photos, tmp_path, capsys):
    from selenium.webdriver.common.by import By

    out = tmp_path / "page"
    assert cli.main([str(photos), "-c", str(ckpt), "--max-len", "4", "--html", str(out)]) == 1
    capsys.readouterr()
    browser.get((out / "index.html").as_uri())
    assert_pictures_load(browser)
    assert len(browser.find_elements(By.CSS_SELECTOR, "section.item")) == 4
    assert len(browser.find_elements(By.CSS_SELECTOR, "li.caption")) == 3
    for section in browser.find_elements(By.CSS_SELECTOR, "section.item:not(.broken)"):
        canvas = section.find_element(By.CSS_SELECTOR, "canvas.attn")
        for k, w in enumerate(section.find_elements(By.CSS_SELECTOR, "button.word")):
            hover(browser, w)
            assert browser.execute_script(CANVAS_STATE, canvas)[2].endswith(f":{k}")
    assert _severe(browser) == []
