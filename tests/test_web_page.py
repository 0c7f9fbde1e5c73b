"""The web page at / in a real headless Chromium, against the real app (SmolLM2, the shipped demo adapter) with
API keys on: the key field, a streamed answer with its sources, adapters and a weighted mix, switching the
active backend, errors as messages, the Chinese interface, the documents panel (upload, ask, delete, refusals).
Screenshots go to test-output/web-page/.

Needs Debian's `chromium` and `chromium-driver` (`bash scripts/setup.sh test` installs them when it runs as
root with apt); without them the browser tests are skipped, saying so. The page's files are checked over HTTP
either way.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from app.main import create_app
from tests.conftest import REPO_ROOT, make_settings, running_server
from tests.ollama_wire_server import OllamaWireServer

pytestmark = pytest.mark.slow

USER_KEY = "user-web-5b1e"
ADMIN_KEY = "admin-web-c07d"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOTS = REPO_ROOT / "test-output" / "web-page"
QUESTION = "How many kilograms does a blue basket hold?"
# The document the documents test uploads, into a collection of its own that the module's store lacks.
NOTE_COLLECTION = "灯塔"
NOTE_NAME = "灯塔值班.md"
NOTE = """# 灯塔值班手册

灯塔管理员每天午夜换班。换班时，下一班的管理员要先检查透镜是否干净，再记录燃油的存量，最后在值班日志上签名。
如果海上起雾，值班的管理员要每隔十五分钟拉响一次雾笛，直到雾散为止。

## 补给

补给船每周二上午从北码头出发，运来燃油、淡水和食物。管理员要在码头清点货物，把燃油桶搬进灯塔底层的油库，
淡水倒进屋顶的水箱。冬季风浪大时补给船可能推迟，所以油库里至少要留够两周的燃油。

## 访客

灯塔每月第一个星期六对访客开放，参观时间是上午十点到下午三点，每次最多二十人，登塔要戴安全帽。
十二岁以下的儿童要由成人陪同，塔顶的观景台风大，雨天和大风天不开放。访客不能触碰透镜和灯具，拍照时不要使用闪光灯。

## 设备维护

透镜每个月用软布和专用清洁液擦拭一次，灯泡每半年更换一次，旧灯泡要登记后交回仓库。雾笛的压缩机每季度检修，
检修前要先关掉电源并挂上警示牌。发电机每周试运行半小时，试运行的时间和油耗都要写进维护记录。
台风季节到来之前，管理员要检查所有门窗的密封条，加固屋顶的天线，并把备用电池充满电。

## 紧急情况

看到遇险船只的信号弹时，值班的管理员要立即用无线电的十六频道呼叫海岸救援中心，报告船只的方位、距离和天气，
然后打开探照灯照向海面，帮助救援船找到位置。灯塔断电时要在五分钟内启动备用发电机，并把断电的时间和原因记入日志。
有人在礁石上受伤时，先用对讲机通知码头的医务室，再带上急救箱过去，不要独自在涨潮时走上礁石。
"""

T = TypeVar("T")


@pytest.fixture(scope="module")
def ollama() -> Iterator[OllamaWireServer]:
    with OllamaWireServer(models=["qwen3:4b"], token_delay=0.01) as server:
        yield server


@pytest.fixture(scope="module")
def service_url(
    tmp_path_factory: pytest.TempPathFactory, corpus_store: Path, ollama: OllamaWireServer
) -> Iterator[str]:
    home = tmp_path_factory.mktemp("web")
    store = home / "store"  # a copy: the documents test writes a collection into it
    shutil.copytree(corpus_store, store)
    settings = make_settings(
        home, vector_store_path=store, ollama_base_url=ollama.base_url,
        lora_model_path=REPO_ROOT / "lora_adapters", api_keys=USER_KEY, admin_api_keys=ADMIN_KEY,
        max_new_tokens=64,  # room for a cited answer: a quoted sentence, then the answer
    )
    with running_server(create_app(settings)) as url:
        yield url


def _browser_missing() -> str | None:
    """Why no browser test can run here, or None."""
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not path.exists():
            return (f"{path} not found: install Debian's {package} (`apt-get install chromium chromium-driver`; "
                    "`bash scripts/setup.sh test` does it when it runs as root with apt)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed: pip install -r requirements-dev.txt"
    return None


def _start_browser(language: str) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1800",
                     f"--lang={language}"):
        options.add_argument(argument)
    options.add_experimental_option("prefs", {"intl.accept_languages": language})
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium whose browser language is English."""
    reason = _browser_missing()
    if reason is not None:
        pytest.skip(reason)
    driver = _start_browser("en-US")
    try:
        yield driver
    finally:
        driver.quit()


def _wait(what: str, check: Callable[[], T | None], timeout: float = 120) -> T:
    import time

    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _open(driver: Any, url: str, key: str | None) -> None:
    """The page, freshly loaded, with `key` (or none) in the browser's storage as if typed before."""
    driver.get(f"{url}/")
    _js(driver, "localStorage.clear(); if (arguments[0]) localStorage.setItem('lora-rag.apiKey', arguments[0]);", key)
    driver.get(f"{url}/")
    _wait("the page to load what the server offers", lambda: _js(driver, "return document.body.dataset.ready"))


def _js(driver: Any, script: str, *args: Any) -> Any:
    return driver.execute_script(script, *args)


def _text(driver: Any, element_id: str) -> str:
    return str(_js(driver, "return document.getElementById(arguments[0]).textContent", element_id))


def _messages(driver: Any) -> list[dict[str, str]]:
    return list(_js(driver, """return [...document.querySelectorAll('#messages .message')].map(m => (
        {topic: m.dataset.topic, kind: m.className, text: m.querySelector('.message-text').textContent}));"""))


def _select(driver: Any, element_id: str, value: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element(By.ID, element_id)).select_by_value(value)


def _ask(driver: Any, question: str) -> list[str]:
    """Type `question`, press Ask, wait for the answer; the answer box's text each time it changed."""
    from selenium.webdriver.common.by import By

    # Records what a user sees: the answer box's text after each change, not the events on the wire.
    _js(driver, """
        window.__seen = [];
        const box = document.getElementById('answer');
        window.__observer && window.__observer.disconnect();
        window.__observer = new MutationObserver(() => window.__seen.push(box.textContent));
        window.__observer.observe(box, {childList: true, characterData: true, subtree: true});""")
    field = driver.find_element(By.ID, "question")
    field.clear()
    if question:
        field.send_keys(question)
    driver.find_element(By.ID, "ask-button").click()
    _wait("the question to finish", lambda: _js(driver, """
        const state = document.getElementById('ask-state').dataset.state;
        const busy = !document.getElementById('stop-button').disabled;
        return !busy && state !== 'ask.waiting' && state !== 'ask.generating';"""))
    return [str(text) for text in _js(driver, "return window.__seen")]


def _sources(driver: Any) -> list[dict[str, str]]:
    return list(_js(driver, """return [...document.querySelectorAll('#sources .source')].map(s => ({
        file: s.querySelector('.source-file').textContent, score: s.querySelector('.source-score').textContent,
        passage: s.querySelector('.source-passage').textContent}));"""))


def _documents(driver: Any) -> list[dict[str, str]]:
    """The rows of the documents panel's table, as shown."""
    return list(_js(driver, """return [...document.querySelectorAll('#documents-body tr.document')].map(r => ({
        id: r.dataset.documentId, source: r.querySelector('.document-source').textContent,
        collection: r.querySelector('.document-collection').textContent,
        chunks: r.querySelector('.document-chunks').textContent}));"""))


def _collections(driver: Any) -> dict[str, str]:
    """The collection picker's options: value -> label."""
    return dict(_js(driver, "return [...document.getElementById('collection').options].map(o => [o.value, o.text])"))


def _documents_outcome(driver: Any, act: Callable[[], None]) -> dict[str, str]:
    """Do `act` (an upload or a deletion), wait until the page has said how it went and drawn the documents
    and the collection picker again; the message it said it with."""
    _js(driver, "const old = document.querySelector('#messages [data-topic=documents]'); if (old) old.remove();")
    act()
    said = _wait("a message about the documents", lambda: [m for m in _messages(driver) if m["topic"] == "documents"])
    _wait("the documents to be read again", lambda: _js(
        driver, "return document.getElementById('documents-panel').getAttribute('aria-busy') !== 'true'"))
    return said[0]


def _upload(driver: Any, path: Path | None, collection: str) -> dict[str, str]:
    """Choose `path` (None: no file) in the page's file input, name the collection, press Upload; the message."""
    from selenium.webdriver.common.by import By

    def act() -> None:
        chooser = driver.find_element(By.ID, "upload-file")
        _js(driver, "arguments[0].value = '';", chooser)  # what a user chose before is not chosen again
        if path is not None:
            chooser.send_keys(str(path))
        field = driver.find_element(By.ID, "upload-collection")
        field.clear()
        field.send_keys(collection)
        driver.find_element(By.ID, "upload-button").click()

    return _documents_outcome(driver, act)


def _delete(driver: Any, document_id: str) -> tuple[str, dict[str, str]]:
    """Press Delete on the document's row and confirm; the confirmation's question and the message."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    asked: list[str] = []

    def act() -> None:
        driver.find_element(By.CSS_SELECTOR, f"tr[data-document-id='{document_id}'] .document-delete").click()
        confirm = WebDriverWait(driver, 10).until(expected_conditions.alert_is_present())
        asked.append(confirm.text)
        confirm.accept()

    said = _documents_outcome(driver, act)
    return asked[0], said


def _screenshot(driver: Any, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))


def _script_errors(driver: Any) -> list[str]:
    """Console errors other than the refused requests the test provokes on purpose (401, 403, 404)."""
    return [entry["message"] for entry in driver.get_log("browser")
            if entry["level"] == "SEVERE" and "Failed to load resource" not in entry["message"]]


def test_the_page_and_its_files_are_open_typed_and_confined(service_url: str) -> None:
    with httpx.Client(base_url=service_url, timeout=30) as client:
        page = client.get("/")
        script = client.get("/web/app.js")
        style = client.get("/web/style.css")
        again = client.get("/web/app.js", headers={"If-None-Match": script.headers["ETag"]})
        head = client.head("/")
        refused = [client.get(path).status_code for path in (
            "/web/..%2Fweb_router.py", "/web/%2e%2e/security.py", "/web/%2e%2e%2fmain.py", "/web/.hidden",
            "/web/web_router.py", "/web/nothing.js", "/web/index.html%00.js", "/web/APP.JS")]
        api = client.get("/model_info")
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    assert 'src="/web/app.js"' in page.text and "http" not in page.text.split("<body>")[0]  # nothing from elsewhere
    assert script.headers["content-type"] == "text/javascript; charset=utf-8" and "textContent" in script.text
    assert style.headers["content-type"] == "text/css; charset=utf-8"
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff" and page.headers["cache-control"] == "no-cache"
    assert again.status_code == 304 and not again.content
    assert head.status_code == 200 and not head.content
    assert all(status == 404 for status in refused), refused
    assert api.status_code == 401  # the page is open, the API behind it is not


def test_with_a_key_a_question_streams_its_answer_and_shows_sources(browser: Any, service_url: str) -> None:
    from selenium.webdriver.common.by import By

    _open(browser, service_url, None)
    refused = _wait("a message about the missing key", lambda: [m for m in _messages(browser) if "401" in m["text"]])
    assert "API key" in refused[0]["text"] and "error" in refused[0]["kind"]
    assert _js(browser, "return document.getElementById('health').dataset.status") == "key"
    _screenshot(browser, "01-no-key")

    browser.find_element(By.ID, "api-key").send_keys(USER_KEY)
    browser.find_element(By.ID, "key-save").click()
    _wait("the adapters the server reports", lambda: _js(
        browser, "return [...document.getElementById('adapter').options].some(o => o.value === 'default')"))
    assert _js(browser, "return localStorage.getItem('lora-rag.apiKey')") == USER_KEY
    _wait("the health badge", lambda: _js(
        browser, "return ['healthy', 'degraded'].includes(document.getElementById('health').dataset.status)"))
    assert _js(browser, "return [...document.getElementById('collection').options].map(o => o.value)") == ["default"]
    assert _text(browser, "active-backend") == "local model (LoRA)"

    seen = _ask(browser, QUESTION)
    answer = _text(browser, "answer")
    # The answer box's texts in the order they appeared; the last is the full answer replacing the pieces.
    growing = [text for text in dict.fromkeys(seen) if text][:-1]
    assert len(growing) >= 2, f"the answer did not appear piece by piece: {seen}"
    assert all(later.startswith(earlier) for earlier, later in zip(growing, growing[1:], strict=False)), growing
    assert answer.strip() and answer.lstrip().startswith(growing[0].strip())
    sources = _sources(browser)
    assert sources[0]["file"] == "corpus/orchards.md"
    assert all(s["score"].startswith("score ") and any(c.isdigit() for c in s["score"]) for s in sources)
    assert all(s["passage"].strip() for s in sources) and "basket" in sources[0]["passage"].lower()
    assert browser.find_element(By.ID, "answer-meta").get_attribute("data-model-used") == "lora"
    assert not [m for m in _messages(browser) if "error" in m["kind"]]
    _screenshot(browser, "02-streamed-answer")
    assert not _script_errors(browser)


def test_switching_adapter_and_mixing_changes_what_answers(browser: Any, service_url: str) -> None:
    from selenium.webdriver.common.by import By

    _open(browser, service_url, USER_KEY)
    meta = browser.find_element(By.ID, "answer-meta")
    answered: dict[str, tuple[str | None, str | None]] = {}
    for choice in ("__base__", "default"):
        _select(browser, "adapter", choice)
        _ask(browser, QUESTION)
        answered[choice] = (meta.get_attribute("data-model-used"), meta.get_attribute("data-adapters"))
    _select(browser, "adapter", "__mix__")
    weight = browser.find_element(By.CSS_SELECTOR, "#mix-rows .mix-row[data-name='default'] input[type=number]")
    weight.clear()
    weight.send_keys("0.5")
    _screenshot(browser, "03-weighted-mix")
    _ask(browser, QUESTION)
    answered["mix"] = (meta.get_attribute("data-model-used"), meta.get_attribute("data-adapters"))
    assert answered == {"__base__": ("base", ""), "default": ("lora", "default"), "mix": ("lora", "default*0.5")}
    assert "with default*0.5" in meta.text
    assert not _script_errors(browser)


def test_ticking_citations_marks_the_quoted_sentences_in_their_passages(browser: Any, service_url: str) -> None:
    from selenium.webdriver.common.by import By

    _open(browser, service_url, USER_KEY)
    browser.find_element(By.ID, "citations").click()
    _ask(browser, QUESTION)
    marked = _js(browser, """return [...document.querySelectorAll('#sources .source-passage')].map(p => ({
        passage: p.textContent, marks: [...p.querySelectorAll('mark.citation')].map(m => m.textContent)}));""")
    quotes = [(source["passage"], mark) for source in marked for mark in source["marks"]]
    assert quotes, f"no citation was marked: {marked}"
    assert all(mark and mark in passage for passage, mark in quotes)  # a sentence of the passage it is shown in
    answer = _text(browser, "answer")
    assert not answer.lstrip().startswith("{")  # the answer, never its JSON
    # 64 tokens may all go to the quotes: a blank answer then says so.
    assert answer.strip() or browser.find_element(By.ID, "answer-notice").is_displayed()
    _screenshot(browser, "03b-citations")
    browser.find_element(By.ID, "citations").click()  # off again: no marks
    _ask(browser, QUESTION)
    assert _js(browser, "return document.querySelectorAll('#sources mark.citation').length") == 0
    assert not _script_errors(browser)


def test_an_empty_question_is_an_error_message_not_a_request(browser: Any, service_url: str) -> None:
    _open(browser, service_url, USER_KEY)
    _js(browser, "window.__asked = 0; const f = window.fetch; "
                 "window.fetch = (u, o) => { if (String(u) === '/ask') window.__asked++; return f(u, o); };")
    _ask(browser, "   ")
    errors = [m for m in _messages(browser) if m["topic"] == "ask"]
    assert len(errors) == 1 and "error" in errors[0]["kind"] and errors[0]["text"] == "Type a question first."
    assert _js(browser, "return window.__asked") == 0
    assert _text(browser, "answer") == "" and "lora-rag" in browser.find_element("tag name", "h1").text
    _screenshot(browser, "04-empty-question")


def test_switching_the_active_backend_needs_an_admin_key(browser: Any, service_url: str) -> None:
    from selenium.webdriver.common.by import By

    _open(browser, service_url, USER_KEY)
    browser.find_element(By.ID, "switch-button").click()
    refused = _wait("the refusal", lambda: [m for m in _messages(browser) if m["topic"] == "switch"])
    assert "403" in refused[0]["text"] and "admin" in refused[0]["text"] and "error" in refused[0]["kind"]
    assert _js(browser, "return document.getElementById('documents-panel').dataset.state") == "admin"

    key = browser.find_element(By.ID, "api-key")
    key.clear()
    key.send_keys(ADMIN_KEY)
    browser.find_element(By.ID, "key-save").click()
    _wait("the admin key to be used", lambda: _js(
        browser, "return document.getElementById('documents-panel').dataset.state !== 'admin'"))
    try:
        browser.find_element(By.ID, "switch-button").click()
        _wait("the switch to Ollama", lambda: _text(browser, "active-backend") == "Ollama")
        assert "now Ollama" in [m for m in _messages(browser) if m["topic"] == "switch"][0]["text"]
        assert _js(browser, "return document.getElementById('adapter').disabled") is True  # Ollama takes no adapter
        _ask(browser, "ferry times?")
        assert browser.find_element(By.ID, "answer-meta").get_attribute("data-model-used") == "ollama"
        _screenshot(browser, "05-switched-to-ollama")
    finally:
        httpx.post(f"{service_url}/switch_model", json={"use_lora": True}, timeout=60,
                   headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert not _script_errors(browser)


def test_a_chinese_browser_gets_the_chinese_page_and_chinese_sources(service_url: str) -> None:
    reason = _browser_missing()
    if reason is not None:
        pytest.skip(reason)
    from selenium.webdriver.common.by import By

    driver = _start_browser("zh-CN")
    try:
        _open(driver, service_url, USER_KEY)
        assert _js(driver, "return document.documentElement.lang") == "zh-CN"
        assert driver.find_element(By.ID, "ask-button").text == "提问"
        _ask(driver, "茶园的参观费用是多少？")
        assert _sources(driver)[0]["file"] == "corpus/zh/茶园.md"
        assert "云雾茶园" in "".join(s["passage"] for s in _sources(driver))
        assert driver.find_element(By.ID, "answer-meta").text.startswith("由 lora")
        _screenshot(driver, "06-chinese")
        _select(driver, "lang", "en")  # the switch overrides the browser's language, and is remembered
        assert driver.find_element(By.ID, "ask-button").text == "Ask"
        driver.refresh()
        _wait("the page again", lambda: _js(driver, "return document.body.dataset.ready"))
        assert driver.find_element(By.ID, "ask-button").text == "Ask"
        assert not _script_errors(driver)
    finally:
        driver.quit()


def test_the_page_says_when_the_server_cannot_be_reached(browser: Any, service_url: str) -> None:
    _open(browser, service_url, USER_KEY)
    # As if the server went away under the open page: every later request fails before any answer.
    _js(browser, "window.fetch = () => Promise.reject(new TypeError('Failed to fetch'));")
    _ask(browser, QUESTION)
    errors = [m for m in _messages(browser) if m["topic"] == "ask"]
    assert errors and "cannot be reached" in errors[0]["text"] and "Failed to fetch" in errors[0]["text"]


def test_an_admin_key_uploads_asks_in_and_deletes_a_document_on_the_page(
    browser: Any, service_url: str, tmp_path: Path
) -> None:
    note = tmp_path / NOTE_NAME
    note.write_text(NOTE, encoding="utf-8")
    _open(browser, service_url, ADMIN_KEY)
    _wait("the documents list", lambda: _js(
        browser, "return document.getElementById('documents-panel').dataset.state === 'list'"))
    listed_before = _documents(browser)
    assert "corpus/orchards.md" in [d["source"] for d in listed_before]
    assert NOTE_COLLECTION not in _collections(browser)

    added = _upload(browser, note, NOTE_COLLECTION)
    with httpx.Client(base_url=service_url, timeout=30, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as client:
        served = client.get("/documents", params={"collection": NOTE_COLLECTION}).json()["documents"]
    assert [(d["source"], d["collection"]) for d in served] == [(NOTE_NAME, NOTE_COLLECTION)]
    chunks = served[0]["chunks"]
    assert chunks >= 2, "the note is meant to be more than one chunk"
    assert "info" in added["kind"] and added["text"] == f"Added {NOTE_NAME} to {NOTE_COLLECTION} ({chunks} chunks)."
    shown = [d for d in _documents(browser) if d["collection"] == NOTE_COLLECTION]
    assert shown == [{"id": served[0]["document_id"], "source": NOTE_NAME, "collection": NOTE_COLLECTION,
                      "chunks": str(chunks)}]
    assert len(_documents(browser)) == len(listed_before) + 1
    # The new collection is in the picker at once, with its document count, without reloading the page.
    assert _collections(browser)[NOTE_COLLECTION] == f"{NOTE_COLLECTION} (1 document)"
    again = _upload(browser, note, NOTE_COLLECTION)  # the same content again: said so, nothing added
    assert "info" in again["kind"] and "already in" in again["text"] and "nothing added" in again["text"]
    assert len(_documents(browser)) == len(listed_before) + 1

    _select(browser, "collection", NOTE_COLLECTION)
    _ask(browser, "灯塔管理员什么时候换班？")
    sources = _sources(browser)
    assert sources and {s["file"] for s in sources} == {NOTE_NAME}, sources
    assert "午夜换班" in "".join(s["passage"] for s in sources)
    assert not [m for m in _messages(browser) if "error" in m["kind"]]
    _screenshot(browser, "07-document-uploaded-and-cited")

    asked, deleted = _delete(browser, served[0]["document_id"])
    assert NOTE_NAME in asked and NOTE_COLLECTION in asked
    assert "info" in deleted["kind"] and deleted["text"] == f"Deleted {NOTE_NAME} ({chunks} chunks)."
    assert [d for d in _documents(browser) if d["source"] == NOTE_NAME] == []
    assert _documents(browser) == listed_before
    assert _collections(browser)[NOTE_COLLECTION] == f"{NOTE_COLLECTION} (0 documents)"

    # Refused uploads: the server's own message and code, as an error that stays; the list as it was.
    nothing = _upload(browser, None, NOTE_COLLECTION)
    assert "error" in nothing["kind"] and nothing["text"] == "Choose a file to upload."
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    refused_empty = _upload(browser, empty, NOTE_COLLECTION)
    assert "error" in refused_empty["kind"]
    assert refused_empty["text"] == "Documents: empty.txt is empty (HTTP 400 empty_document)"
    image = tmp_path / "photo.txt"
    image.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    refused_image = _upload(browser, image, NOTE_COLLECTION)
    assert "error" in refused_image["kind"] and "a PNG image" in refused_image["text"]
    assert refused_image["text"].endswith("(HTTP 415 unsupported_media_type)")
    _screenshot(browser, "08-document-refused")
    assert _documents(browser) == listed_before
    assert not _script_errors(browser)


def test_with_a_user_key_the_documents_panel_says_an_admin_key_is_needed(browser: Any, service_url: str) -> None:
    from selenium.webdriver.common.by import By

    _open(browser, service_url, USER_KEY)
    panel = browser.find_element(By.ID, "documents-panel")
    assert panel.get_attribute("data-state") == "admin"
    assert _text(browser, "documents-status") == "Managing documents needs an admin API key."
    assert browser.find_element(By.ID, "documents-status").is_displayed()
    assert not browser.find_element(By.ID, "upload-file").is_enabled()
    assert not browser.find_element(By.ID, "upload-button").is_enabled()
    assert not browser.find_element(By.ID, "documents-table").is_displayed()
    assert not [m for m in _messages(browser) if "error" in m["kind"]]  # a state, not a failure
    assert "default" in _collections(browser)  # the rest of the page works with the user key
    _screenshot(browser, "09-documents-user-key")
    assert not _script_errors(browser)
