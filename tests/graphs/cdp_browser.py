"""A small driver for headless Chromium over the DevTools protocol on `--remote-debugging-pipe` (no package
needed: the browser reads JSON commands, each ended by a NUL byte, on file descriptor 3 and writes replies and
events on 4). Enough to load a page, collect its console messages, exceptions, log entries and network
requests, evaluate JavaScript, and send real mouse events.

    with Browser("/usr/bin/chromium", tmp_path / "profile") as b:
        b.open(path.as_uri())
        b.click(*b.centre("#graph .node"), shift=True)
        assert b.console == []
"""

import json
import os
import select
import subprocess
import time
from pathlib import Path

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync")


class Browser:
    """One Chromium process with one page; `console` collects what a page reports as wrong."""

    def __init__(self, exe: str, profile: Path, size: tuple[int, int] = (1500, 1000), timeout: float = 30.0):
        self.timeout, self._buf, self._id, self._events = timeout, b"", 0, []
        self.console: list[str] = []  # console calls, exceptions and log entries, as text
        self.requests: list[str] = []  # every URL the page asked for
        cmd_r, self._cmd_w = os.pipe()
        self._out_r, out_w = os.pipe()

        # the browser's fd 3 reads our commands, its fd 4 carries its replies: bash moves the pipe ends
        # there (a preexec_fn would make subprocess fork, and JAX warns at every fork)
        move = f'exec "$0" "$@" 3<&{cmd_r} 4>&{out_w} {cmd_r}<&- {out_w}>&-'
        self.proc = subprocess.Popen(["/bin/bash", "-c", move, exe, *FLAGS, "--remote-debugging-pipe",
                                      f"--user-data-dir={profile}", "about:blank"], pass_fds=(cmd_r, out_w),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(cmd_r)
        os.close(out_w)
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable", session=True)
        self.call("Emulation.setDeviceMetricsOverride", session=True, width=size[0], height=size[1],
                  deviceScaleFactor=1, mobile=False)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        try:
            self.call("Browser.close")
        except (OSError, TimeoutError, EOFError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        os.close(self._cmd_w)
        os.close(self._out_r)

    def call(self, method: str, session: bool = False, **params) -> dict:
        """Send one command and wait for its reply (events seen meanwhile are recorded)."""
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._next()
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method} failed: {reply['error']}")
                return reply.get("result", {})

    def open(self, url: str) -> None:
        """Navigate and wait for the load event (console and requests then hold this page's only)."""
        self._events.clear()
        self.console.clear()
        self.requests.clear()
        self.call("Page.navigate", session=True, url=url)
        self.wait_for("Page.loadEventFired")

    def wait_for(self, event: str) -> dict:
        while True:
            for e in self._events:
                if e.get("method") == event:
                    self._events.remove(e)
                    return e
            self._next()

    def js(self, expression: str):
        """Evaluate JavaScript in the page; its value (JSON-like), raising if it threw."""
        r = self.call("Runtime.evaluate", session=True, expression=expression, returnByValue=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression!r} threw: {r['exceptionDetails']}")
        return r["result"].get("value")

    def centre(self, selector: str) -> tuple[float, float]:
        """The viewport centre of the first element matching `selector`, scrolled into view."""
        return tuple(self.js(f"(function () {{ var e = document.querySelector({json.dumps(selector)}); "
                             "e.scrollIntoView({block: 'center', inline: 'center'}); "
                             "var r = e.getBoundingClientRect(); "
                             "return [r.x + r.width / 2, r.y + r.height / 2]; })()"))

    def hover(self, x: float, y: float) -> None:
        self.call("Input.dispatchMouseEvent", session=True, type="mouseMoved", x=x, y=y)

    def click(self, x: float, y: float, shift: bool = False) -> None:
        mods = 8 if shift else 0
        self.hover(x, y)
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", session=True, type=kind, x=x, y=y, button="left",
                      clickCount=1, modifiers=mods)

    def _next(self) -> dict:
        deadline = time.monotonic() + self.timeout
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._out_r], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer over the DevTools pipe.")
            chunk = os.read(self._out_r, 1 << 16)
            if not chunk:
                raise EOFError("Chromium closed the DevTools pipe.")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        msg = json.loads(raw)
        if "method" in msg:
            self._record(msg)
        return msg

    def _record(self, e: dict) -> None:
        self._events.append(e)
        m, p = e["method"], e.get("params", {})
        if m == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
            self.console.append(f"console.{p.get('type')}: {text}")
        elif m == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            self.console.append(f"exception: {d.get('exception', {}).get('description', d.get('text'))}")
        elif m == "Log.entryAdded":
            entry = p.get("entry", {})
            self.console.append(f"log.{entry.get('level')}: {entry.get('text')} {entry.get('url', '')}")
        elif m == "Network.requestWillBeSent":
            self.requests.append(p.get("request", {}).get("url", ""))
