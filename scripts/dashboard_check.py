#!/usr/bin/env python3
"""Drives the dashboard in headless Chromium as a person would, and reports what it shows.

Usage: scripts/dashboard_check.py --url http://127.0.0.1:8080 --key-file KEYFILE [--shots DIR]
       [--task NAME] [--run RUN_ID]

Chromium is driven over the DevTools protocol on a pipe (--remote-debugging-pipe: fds 3 and 4),
so nothing but the Python standard library and Debian's chromium is needed. It signs in by
typing the key, visits every page, waits until each has loaded its data, and prints one JSON
object: page -> the text a person would read there. With --shots it saves a PNG of each page.
The caller (Tests/ConveyorIntegrationTests/DashboardTests.swift) asserts on that text.
"""
import argparse
import base64
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time


class Browser:
    def __init__(self):
        exe = shutil.which("chromium")
        if not exe:
            sys.exit("chromium is not installed: apt-get install chromium (scripts/services.sh installs it)")
        self.profile = tempfile.mkdtemp(prefix="conveyor-chromium-")
        to_chrome_r, self.to_chrome = os.pipe()
        self.from_chrome, from_chrome_w = os.pipe()

        def wire():
            # Chromium reads commands on fd 3 and writes replies on fd 4. Move both ends above
            # 10 first, so that placing one cannot overwrite the other.
            high_r = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 10)
            high_w = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 10)
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        self.proc = subprocess.Popen(
            [exe, "--headless=new", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu",
             "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check",
             "--window-size=1280,900", "--user-data-dir=" + self.profile, "about:blank"],
            pass_fds=(3, 4), preexec_fn=wire,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self.buffer = b""
        self.next_id = 0
        self.session = None
        self.events = []

    def send(self, method, params=None, session=True):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self.to_chrome, json.dumps(msg).encode() + b"\0")
        while True:
            reply = self.read()
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def read(self):
        while b"\0" not in self.buffer:
            chunk = os.read(self.from_chrome, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self.buffer += chunk
        raw, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(raw)

    def open(self, url):
        target = self.send("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True}, session=False)["sessionId"]
        self.send("Page.enable")
        self.send("Runtime.enable")
        self.send("Page.navigate", {"url": url})

    def js(self, expression):
        r = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait(self, expression, what, timeout=15):
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if self.js(expression):
                    return
            except RuntimeError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"timed out waiting for {what}; page shows: {self.js('document.body.innerText')[:500]!r}")

    def screenshot(self, path):
        data = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))

    def close(self):
        try:
            self.send("Browser.close", session=False)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--key-file", required=True)
    ap.add_argument("--shots")
    ap.add_argument("--task")
    ap.add_argument("--run")
    a = ap.parse_args()
    key = open(a.key_file).read().strip()
    if a.shots:
        os.makedirs(a.shots, exist_ok=True)
    seen = {}
    b = Browser()
    try:
        b.open(a.url.rstrip("/") + "/")
        b.wait("document.getElementById('signin') && !document.getElementById('signin').hidden", "the sign-in form")
        seen["signin"] = b.js("document.body.innerText")
        if a.shots:
            b.screenshot(os.path.join(a.shots, "signin.png"))
        # Type the key and press the button, as a person would.
        b.js("document.getElementById('credential').focus()")
        b.send("Input.insertText", {"text": key})
        b.js("document.querySelector('#signin-form button').click()")
        pages = [("overview", "#/overview"), ("tasks", "#/tasks"), ("runs", "#/runs"), ("workers", "#/workers"), ("dead", "#/dead")]
        if a.task:
            pages.append(("task", "#/tasks/" + a.task))
        if a.run:
            pages.append(("run", "#/run/" + a.run))
        for name, hash_ in pages:
            b.js(f"document.getElementById('view').removeAttribute('data-loaded'); location.hash = {json.dumps(hash_)}")
            b.wait(f"document.getElementById('view').getAttribute('data-loaded') === {json.dumps(name)}", f"page {name}")
            seen[name] = b.js("document.getElementById('view').innerText")
            if name == "overview":
                seen["overview_chart_total"] = b.js("document.getElementById('throughput').getAttribute('data-total')")
                # Live: the overview redraws from the event stream without a reload.
                first = b.js("document.getElementById('updated').textContent")
                b.wait(f"document.getElementById('updated').textContent !== {json.dumps(first)}", "a live update", timeout=10)
                seen["overview_live"] = True
            if a.shots:
                b.screenshot(os.path.join(a.shots, name + ".png"))
        # Re-drive from the dead-letters page, with the button.
        if "Re-drive" in seen.get("dead", ""):
            b.js("location.hash = '#/dead'")
            b.wait("document.getElementById('view').getAttribute('data-loaded') === 'dead'", "page dead")
            b.js("document.getElementById('view').removeAttribute('data-loaded'); document.querySelector('button[data-run]').click()")
            b.wait("document.getElementById('view').getAttribute('data-loaded') === 'dead' && document.getElementById('action-result').textContent", "the re-drive result")
            seen["redrive"] = b.js("document.getElementById('action-result').textContent")
        # Signing out forgets the key.
        b.js("document.getElementById('signout').click()")
        seen["signed_out_storage"] = b.js("window.sessionStorage.getItem('credential')")
    finally:
        b.close()
    print(json.dumps(seen))


if __name__ == "__main__":
    main()
