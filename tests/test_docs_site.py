"""The documentation site (`make docs`): built with the network refused, served on localhost, opened in headless
Chromium through the DevTools protocol: every page of the navigation loads without a console message, the search
finds `load_model`, and the API page shows every public name of headlab."""

import functools
import http.server
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin
from urllib.request import urlopen

import pytest

import headlab

ROOT = Path(__file__).resolve().parent.parent


class DevTools:
    """One headless Chromium, driven over its DevTools websocket: open a page, read console messages, evaluate JS."""

    def __init__(self, profile: Path):
        import websocket  # websocket-client, with Jupyter's server

        binary = shutil.which("chromium") or shutil.which("chromium-browser")
        assert binary, "chromium is not installed (make test installs the Debian package `chromium`)"
        self.process = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-extensions", "--no-first-run", "--disable-sync", "--disable-component-update",
             "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"
        for _ in range(300):
            if port_file.exists() and port_file.read_text().count("\n") >= 1:
                break
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = json.load(urlopen(f"http://127.0.0.1:{port}/json"))
        page = next(t for t in targets if t["type"] == "page")
        self.socket = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        self.next_id, self.messages = 0, []
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == self.next_id:
                assert "error" not in message, message
                return message.get("result", {})
            self._record(message)

    def _record(self, message: dict) -> None:
        method, params = message.get("method"), message.get("params", {})
        if method == "Runtime.consoleAPICalled":
            self.messages.append(f"console.{params['type']}: " +
                                 " ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
        elif method == "Runtime.exceptionThrown":
            self.messages.append(f"exception: {params['exceptionDetails'].get('exception', {}).get('description')}")
        elif method == "Log.entryAdded":
            self.messages.append(f"log {params['entry']['level']}: {params['entry']['text']} "
                                 f"{params['entry'].get('url', '')}")

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete'")

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def wait_for(self, expression: str, seconds: float = 20) -> None:
        deadline = time.monotonic() + seconds
        while not self.evaluate(f"Boolean({expression})"):
            assert time.monotonic() < deadline, f"timed out waiting for {expression}"
            time.sleep(0.1)

    def settle(self, seconds: float = 0.5) -> None:
        """Let late messages (scripts, workers) arrive."""
        end = time.monotonic() + seconds
        self.socket.settimeout(0.1)
        try:
            while time.monotonic() < end:
                try:
                    self._record(json.loads(self.socket.recv()))
                except Exception:  # a receive timeout: nothing new
                    pass
        finally:
            self.socket.settimeout(60)

    def close(self) -> None:
        self.socket.close()
        self.process.terminate()
        self.process.wait(timeout=30)


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class NavLinks(HTMLParser):
    """The href of every link of the primary navigation (Material marks them md-nav__link)."""

    def __init__(self):
        super().__init__()
        self.links = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "a" and "md-nav__link" in (attrs.get("class") or "") and attrs.get("href"):
            self.links.append(attrs["href"])


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The site built as `make docs` builds it (network refused), served on a free localhost port."""
    out = tmp_path_factory.mktemp("site")
    start = time.perf_counter()
    built = subprocess.run([sys.executable, "docs/offline_build.py", "--clean", "--site-dir", str(out)], cwd=ROOT,
                           capture_output=True, text=True, timeout=900)
    assert built.returncode == 0, built.stderr[-3000:]
    print(f"docs built in {time.perf_counter() - start:.1f} s")
    handler = functools.partial(Quiet, directory=str(out))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", out
    server.shutdown()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    devtools = DevTools(tmp_path_factory.mktemp("chromium-profile"))
    yield devtools
    devtools.close()


def nav_pages(base: str, out: Path) -> list[str]:
    parser = NavLinks()
    parser.feed((out / "index.html").read_text())
    pages = {urljoin(base, href.split("#")[0]) for href in parser.links}
    return sorted(pages)


@pytest.mark.browser
@pytest.mark.slow
def test_every_page_in_the_navigation_loads_without_console_messages(site, browser):
    base, out = site
    pages = nav_pages(base, out)
    from headlab.probes import probes as registry


    probes = list(registry())
    assert len(pages) >= 12 + len(probes)  # the fixed pages, every probe's and every notebook's
    assert all(f"{base}probes/{name}.html" in pages for name in probes)
    assert all(f"{base}notebooks/{p.stem}.html" in pages for p in (ROOT / "notebooks").glob("*.ipynb"))
    scanned = (ROOT / "docs" / "smollm2-scan" / "heads.csv").read_text().splitlines()[0].split(",")
    assert {"detectors", "retrieval", "sinks", "flow"} <= set(scanned)
    failures = {}
    for url in pages:
        browser.messages.clear()
        browser.open(url)
        browser.settle()
        title = browser.evaluate("document.querySelector('article h1') && document.querySelector('article h1')"
                                 ".textContent")
        if browser.messages or not title:
            failures[url] = browser.messages[:] or ["no h1 in the article"]
        name = url.rsplit("/", 1)[-1].removesuffix(".html")
        if "/probes/" in url and name in scanned and not browser.evaluate(
                "document.querySelectorAll('.js-plotly-plot').length"):
            failures[url] = ["the heatmap of the committed scan was not drawn"]
    assert not failures, failures


@pytest.mark.browser
@pytest.mark.slow
def test_search_finds_load_model(site, browser):
    base, _ = site
    browser.open(base + "index.html")
    browser.evaluate("""(() => { const input = document.querySelector('[data-md-component=search-query]');
        document.querySelector('[data-md-toggle=search]').checked = true;
        input.value = 'load_model'; input.focus();
        input.dispatchEvent(new KeyboardEvent('keyup', {bubbles: true})); return true; })()""")
    browser.wait_for("document.querySelectorAll('.md-search-result__item').length > 0")
    links = browser.evaluate("[...document.querySelectorAll('.md-search-result__item a')].map(a => a.href)")
    assert any(re.search(r"/api\.html(\?[^#]*)?#headlab\.loading\.load_model$", link) for link in links), links


@pytest.mark.browser
@pytest.mark.slow
def test_the_api_page_shows_every_public_name(site, browser):
    base, _ = site
    browser.open(base + "api.html")
    ids = set(browser.evaluate("[...document.querySelectorAll('[id^=\"headlab.\"]')].map(e => e.id)"))
    documented = {name: headlab._LAZY.get(name, "").partition(":")[2] or name  # the object's own name
                  for name in headlab.__all__}
    missing = [name for name in headlab.__all__ if not any(i.endswith("." + documented[name]) for i in ids)]
    assert not missing
    functions = [name for name in headlab.__all__ if callable(getattr(headlab, name)) and name[0].islower()]
    assert {"load_model", "models", "head_name", "parse_head", "scan"} <= set(functions)
    text = browser.evaluate("document.querySelector('article').innerText")
    assert all(f"{documented[name]}(" in text for name in functions)  # each function with its signature
