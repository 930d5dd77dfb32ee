"""`make screenshots`: the TensorBoard pages and two terminal outputs, as PNGs in docs/images/.

Trains a small comparison (configs/smoke.yaml: CE and MSE, mean and sum) into a temporary
folder, serves it with the real TensorBoard and photographs each page with headless
Chromium (Debian's `chromium` package), driven over its DevTools pipe so that each picture
is taken once the page has fetched and drawn its data. The terminal pictures are the real
CLI's output: run with colours forced, turned into an SVG by rich, photographed the same way.

    python scripts/screenshots.py [--out docs/images] [--keep-logdir] [--logdir RUNS]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CHROMIUM = Path("/usr/bin/chromium")
WINDOW = (1400, 1000)
TERMINAL_COLUMNS = 110
Click = tuple[int, int, int]  # x, y, number of clicks
# page file name -> TensorBoard URL fragment (and query) for that dashboard
# Double-clicks that open ReferenceNet, then its Sequential, then "Fit to screen": the
# Graphs page shows the tutorial's layers instead of one collapsed box.
OPEN_GRAPH = [(440, 261, 2), (458, 382, 2), (104, 144, 1)]
# picture -> (TensorBoard URL fragment and query, window size, clicks (x, y, count) to make)
PAGES = {
    "tensorboard-time-series": ("?tagFilter=%5E%28train%7Ctest%29%2F#timeseries", WINDOW, []),
    "tensorboard-custom-scalars": ("#custom_scalars", WINDOW, []),
    "tensorboard-scalars": ("#scalars", WINDOW, []),
    "tensorboard-images": ("#images", WINDOW, []),
    "tensorboard-histograms": ("#histograms", WINDOW, []),
    "tensorboard-graphs": ("#graphs", WINDOW, OPEN_GRAPH),
    "tensorboard-hparams": ("#hparams", (1800, 700), []),  # wide: the metric columns too
}
TERMINALS = {
    "terminal-losses": ["losses"],
    "terminal-inspect-grads": ["inspect-grads", "--config", "configs/smoke.yaml"],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    parser.add_argument("--keep-logdir", action="store_true", help="keep the trained runs")
    parser.add_argument("--logdir", type=Path, help="photograph these runs instead of training")
    args = parser.parse_args()
    if not CHROMIUM.exists():
        print(f"screenshots skipped: {CHROMIUM} not found (apt-get install chromium)",
              file=sys.stderr)  # fmt: skip
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="cifar-bp-shots-"))
    browser = Browser(work)
    try:
        for name, command in TERMINALS.items():
            shoot_terminal(browser, command, args.out / f"{name}.png", work)
        logdir = args.logdir or train(work / "runs")
        with tensorboard(logdir) as base:
            browser.page("Page.navigate", url=base)
            browser.settle()
            settings = json.dumps(json.dumps(TB_SETTINGS))
            browser.evaluate(f"localStorage.setItem('_tb_global_settings', {settings})")
            for name, (fragment, size, clicks) in PAGES.items():
                browser.shoot(f"{base}/{fragment}", args.out / f"{name}.png", size, clicks)
    finally:
        browser.close()
        if args.keep_logdir:
            print(f"runs kept in {work / 'runs'}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def train(parent: Path) -> Path:
    """A comparison of four runs: the HParams table and mean-vs-sum layout need several."""
    subprocess.run(
        [str(BIN / "cifar-bp"), "compare", "--config", "configs/smoke.yaml", "--losses", "ce,mse",
         "--reductions", "mean,sum", "--logdir", str(parent), "--run-name", "compare", "-q"],
        cwd=ROOT, check=True,
    )  # fmt: skip
    return parent / "compare"


class tensorboard:  # a context manager: `with tensorboard(logdir) as base:`
    """The real server on a free loopback port, stopped on exit."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir

    def __enter__(self) -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.process = subprocess.Popen(
            [str(BIN / "tensorboard"), "--logdir", str(self.logdir), "--port", str(port),
             "--host", "127.0.0.1", "--load_fast", "false"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # ready once every run's scalars are loaded
            try:
                with urllib.request.urlopen(f"{base}/data/plugin/scalars/tags", timeout=5) as r:
                    if r.read().count(b"train/loss_per_image") >= 4:
                        return base
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(1)
        self.__exit__()
        raise SystemExit(f"TensorBoard did not come up on {base}")

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars"]  # fmt: skip
# TensorBoard keeps its settings in localStorage: the pictures show the charts, not the
# settings pane, and raw points (a smoke run has three evaluations; smoothing bends them).
TB_SETTINGS = {"timeSeriesSettingsPaneOpened": False, "scalarSmoothing": 0}


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (fds 3 and 4): wait
    until a page has drawn, then take its picture. Standard library only."""

    def __init__(self, work: Path) -> None:
        to_chrome, self._out = os.pipe()
        self._in, from_chrome = os.pipe()
        profile = tempfile.mkdtemp(prefix="chromium-", dir=work)

        def wire() -> None:  # in the child: the protocol pipe on fds 3 (in) and 4 (out)
            high_in, high_out = os.dup(to_chrome), os.dup(from_chrome)
            os.dup2(high_in, 3)
            os.dup2(high_out, 4)

        self.process = subprocess.Popen(
            [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe",
             f"--window-size={WINDOW[0]},{WINDOW[1]}", "about:blank"],
            preexec_fn=wire, close_fds=False,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        os.close(to_chrome)
        os.close(from_chrome)
        self._buffer, self._id = b"", 0
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]

    def call(self, method: str, session: str | None = None, **params: object) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        while True:  # skip events until our answer arrives
            while b"\0" not in self._buffer:
                chunk = os.read(self._in, 1 << 20)
                if not chunk:
                    raise SystemExit("chromium closed the DevTools pipe")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            answer = json.loads(raw)
            if answer.get("id") == self._id:
                if "error" in answer:
                    raise SystemExit(f"chromium: {method}: {answer['error']}")
                return answer["result"]

    def page(self, method: str, **params: object) -> dict:
        return self.call(method, self.session, **params)

    def evaluate(self, expression: str) -> object:
        result = self.page("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def shoot(
        self, url: str, png: Path, size: tuple[int, int], clicks: Sequence[Click] = ()
    ) -> None:
        self.page("Emulation.setDeviceMetricsOverride", width=size[0], height=size[1],
                  deviceScaleFactor=1, mobile=False)  # fmt: skip
        self.page("Page.navigate", url=url)
        self.settle()
        for x, y, count in clicks:
            self.click(x, y, count)
            self.settle()
        data = self.page("Page.captureScreenshot", format="png")["data"]
        png.write_bytes(base64.b64decode(data))
        print(f"wrote {png.relative_to(ROOT) if png.is_relative_to(ROOT) else png}")

    def click(self, x: int, y: int, count: int) -> None:
        """A real mouse click (count 2: a double-click), as the page's handlers expect."""
        for n in range(1, count + 1):
            for kind in ("mousePressed", "mouseReleased"):
                self.page("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left",
                          clickCount=n)  # fmt: skip

    def settle(self, quiet_s: float = 2.5, limit_s: float = 60) -> None:
        """Wait until the page has loaded and made no new request for `quiet_s` (the
        dashboards fetch their data, then draw it), then a moment more to draw."""
        count = "performance.getEntriesByType('resource').length"
        deadline, last, since = time.monotonic() + limit_s, -1, time.monotonic()
        while time.monotonic() < deadline:
            now = self.evaluate(f"document.readyState === 'complete' ? {count} : -1")
            if now != last:
                last, since = now, time.monotonic()
            elif now != -1 and time.monotonic() - since >= quiet_s:
                break
            time.sleep(0.25)
        time.sleep(1.5)

    def close(self) -> None:
        with contextlib.suppress(SystemExit, OSError):
            self.call("Browser.close")
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        os.close(self._in)
        os.close(self._out)


# rich's HTML export, set like a dark terminal: DejaVu Sans Mono draws box lines that meet.
TERMINAL_PAGE = """<!DOCTYPE html>
<html><head><meta charset="UTF-8"><style>
{stylesheet}
body {{ margin: 0; background: #1e1e1e; color: #d4d4d4; }}
pre {{ margin: 0; padding: 14px 18px; display: inline-block;
      font: 14px/1.164 "DejaVu Sans Mono", "Liberation Mono", monospace; }}
</style></head>
<body><pre><code>{code}</code></pre></body></html>
"""


def shoot_terminal(browser: Browser, command: list[str], png: Path, work: Path) -> None:
    """The real CLI's output, colours and all, as a terminal would show it."""
    from rich.console import Console
    from rich.terminal_theme import MONOKAI
    from rich.text import Text

    env = {**os.environ, "FORCE_COLOR": "1", "COLUMNS": str(TERMINAL_COLUMNS), "TERM": "xterm"}
    result = subprocess.run([str(BIN / "cifar-bp"), *command], cwd=ROOT, env=env, check=True,
                            capture_output=True, text=True)  # fmt: skip
    console = Console(record=True, width=TERMINAL_COLUMNS, force_terminal=True, file=io.StringIO())
    console.print(f"[bold green]$[/] cifar-bp {' '.join(command)}")
    console.print(Text.from_ansi(result.stdout))
    page = work / f"{png.stem}.html"
    console.save_html(str(page), theme=MONOKAI, code_format=TERMINAL_PAGE)
    browser.page("Page.navigate", url=page.as_uri())
    browser.settle(quiet_s=0.5)
    size = browser.evaluate(
        "[document.querySelector('pre').offsetWidth, document.body.scrollHeight]"
    )
    browser.shoot(page.as_uri(), png, (int(size[0]), int(size[1])))  # type: ignore[index]


if __name__ == "__main__":
    sys.exit(main())
