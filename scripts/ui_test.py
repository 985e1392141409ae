#!/usr/bin/env python3
"""Browser test of the coordinator's dashboard (issue 16, Deliver 6).

Starts a real coordinator (mTLS, certificates from tabbify-mesh-ca) on a loopback
ephemeral port, registers members through the API with their own peer certificates,
then drives Debian's chromium headless with Playwright (launched from /usr/bin/chromium;
no browser is downloaded):

  * logs in through the link `tabbify-mesh-coordinator admin-login` prints;
  * sees every member (paging through the table);
  * runs the policy tester (allowed, and refused by default deny), from the keyboard;
  * mints a join token and revokes it;
  * revokes a member from the page and another through the API, and sees both disappear
    live (SSE, no reload);
  * checks accessibility with axe-core (no serious or critical violation).

Screenshots and the axe report go to target/ui-artifacts/. The coordinator is stopped
by its PID on exit, whatever happens.
"""

import base64
import http.client
import json
import os
import secrets
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MEMBERS = int(os.environ.get("TABBIFY_UI_MEMBERS", "60"))


def fail(msg):
    print(f"test-ui: FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:
    fail("the Python package playwright is missing: run scripts/setup.sh with TABBIFY_SETUP_UI=1 "
         "(or pip install playwright==1.65.2 in target/ui-venv)")
try:
    from axe_playwright_python.sync_playwright import Axe
except ImportError:
    fail("the Python package axe-playwright-python is missing: run scripts/setup.sh with "
         "TABBIFY_SETUP_UI=1 (or pip install axe-playwright-python==0.1.8 in target/ui-venv)")

CHROMIUM = os.environ.get("TABBIFY_CHROMIUM", "/usr/bin/chromium")
if not os.access(CHROMIUM, os.X_OK):
    fail(f"{CHROMIUM} not found: install the Debian package chromium (apt-get install chromium)")


def target_dir():
    meta = subprocess.run(["cargo", "metadata", "--format-version", "1", "--no-deps"],
                          cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return Path(json.loads(meta)["target_directory"])


TARGET = target_dir()
BIN = TARGET / "debug"
ART = TARGET / "ui-artifacts"


def run(*args):
    out = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    if out.returncode != 0:
        fail(f"{' '.join(map(str, args))}: {out.stderr}")
    return out.stdout


class Api:
    """HTTPS with a client certificate, trusting only the mesh CA."""

    def __init__(self, port, ca, who):
        self.port = port
        self.ctx = ssl.create_default_context(cafile=str(ca / "ca.pem"))
        self.ctx.load_cert_chain(str(who / "cert.pem"), str(who / "key.pem"))

    def call(self, method, path, body=None):
        c = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.ctx, timeout=10)
        headers = {"content-type": "application/json"} if body is not None else {}
        c.request(method, path, None if body is None else json.dumps(body), headers)
        r = c.getresponse()
        data = r.read()
        c.close()
        return r.status, (json.loads(data) if data else None)


def main():
    ART.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="tabbify-ui-"))
    ca = work / "ca"
    run(BIN / "tabbify-mesh-ca", "init", "--out", ca)
    run(BIN / "tabbify-mesh-ca", "issue-coordinator", "--name", "coordinator", "--san",
        "127.0.0.1", "--ca-dir", ca, "--out", work / "coord")
    run(BIN / "tabbify-mesh-ca", "issue-admin", "--name", "admin", "--ca-dir", ca,
        "--out", work / "admin")
    (work / "policy.json").write_text(json.dumps({
        "tags": ["node", "supervisor"],
        "app_hosts": ["tag:supervisor"],
        "allow": [{"src": ["tag:node"], "dst": ["tag:supervisor:8730"]}],
        "deny": [],
    }))
    proc = subprocess.Popen(
        [str(BIN / "tabbify-mesh-coordinator"), "--bind", "127.0.0.1:0",
         "--tls-cert", str(work / "coord/cert.pem"), "--tls-key", str(work / "coord/key.pem"),
         "--tls-ca", str(ca / "ca.pem"), "--policy-file", str(work / "policy.json"),
         "--state-dir", str(work / "state"), "--stun-bind", "off"],
        stdout=subprocess.PIPE, stderr=open(work / "coordinator.log", "w"), text=True,
        env={**os.environ, "RUST_LOG": "warn"})
    try:
        line = proc.stdout.readline()
        if not line.startswith("listening on "):
            fail(f"coordinator did not start: {(work / 'coordinator.log').read_text()}")
        port = int(line.rsplit(":", 1)[1])
        origin = f"https://127.0.0.1:{port}"
        print(f"test-ui: coordinator on {origin}, {MEMBERS} members")
        admin = Api(port, ca, work / "admin")
        members = register(admin, port, ca, work)
        browse(origin, port, ca, work, admin, members)
    finally:
        proc.kill()
        proc.wait()
    print(f"test-ui: PASS (screenshots and the axe report in {ART})")


def register(admin, port, ca, work):
    """Registers MEMBERS members (every fifth a supervisor), each with its own certificate."""
    members = {}
    for i in range(MEMBERS):
        name = f"s{i}" if i % 5 == 0 else f"n{i}"
        tag = "supervisor" if i % 5 == 0 else "node"
        run(BIN / "tabbify-mesh-ca", "issue-peer", "--name", name, "--ca-dir", ca,
            "--out", work / name)
        st, tok = admin.call("POST", "/v1/tokens", {"tags": [tag]})
        assert st == 200, tok
        key = base64.b64encode(secrets.token_bytes(32)).decode()
        st, reg = Api(port, ca, work / name).call("POST", "/v1/mesh/register", {
            "name": name, "public_key": key, "wg_listen_port": 51820,
            "endpoints": [f"127.0.0.1:{20000 + i}"], "join_token": tok["token"]})
        assert st == 200, reg
        members[name] = reg["peer_id"]
    return members


def browse(origin, port, ca, work, admin, members):
    url = run(BIN / "tabbify-mesh-coordinator", "admin-login", "--coordinator", origin,
              "--tls-cert", work / "admin/cert.pem", "--tls-key", work / "admin/key.pem",
              "--tls-ca", ca / "ca.pem", "--ttl", "2m").strip()
    assert url.startswith(origin + "/ui/login?link=tml_"), url
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu"])
        # The coordinator's certificate chains to the mesh CA, which the browser does not
        # know; the test trusts it the way an operator would after importing the CA.
        ctx = browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 900})
        page = ctx.new_page()
        errors = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))

        # Log in through the link; the link is single use.
        started = time.monotonic()
        page.goto(url)
        expect(page).to_have_url(origin + "/ui/")
        expect(page.locator("#session")).to_contain_text("Signed in as admin")
        expect(page.locator("#live")).to_contain_text("Live")
        expect(page.locator("#member-count")).to_have_text(f"({len(members)})")
        loaded = time.monotonic() - started
        # The table holds one page of rows, however many members there are.
        rows = page.locator("#member-rows tr").count()
        assert rows == min(len(members), 50), rows
        render_ms = page.evaluate("""() => {
            const t = performance.now();
            for (let i = 0; i < 20; i++) renderMembers();
            return (performance.now() - t) / 20;
        }""")
        print(f"test-ui: {len(members)} members loaded in {loaded:.2f} s (login to table); "
              f"one table render {render_ms:.1f} ms")
        page.screenshot(path=str(ART / "01-members.png"), full_page=True)
        other = browser.new_context(ignore_https_errors=True).new_page()
        resp = other.goto(url)
        assert resp.status == 401, f"a replayed login link answered {resp.status}"
        other.context.close()

        # Every member, page by page.
        seen = set()
        shown = 1
        while True:
            expect(page.locator("#page")).to_contain_text(f"Page {shown} of")
            seen.update(page.locator("#member-rows tr").evaluate_all(
                "rows => rows.map(r => r.dataset.peer)"))
            if page.locator("#next").is_disabled():
                break
            page.locator("#next").press("Enter")  # the keyboard pages too
            shown += 1
        missing = set(members.values()) - seen
        assert not missing, f"members not shown: {missing}"
        page.locator("#filter").fill(members["s0"])
        expect(page.locator("#member-rows tr")).to_have_count(1)
        page.locator("#filter").fill("")

        # Who may reach whom.
        expect(page.locator("#reach-rows")).to_contain_text("tag:node")
        expect(page.locator("#reach-rows")).to_contain_text("8730")

        # The policy tester, from the keyboard.
        page.locator("#t-src").focus()
        page.keyboard.type("n1")
        page.keyboard.press("Tab")
        page.keyboard.type("s0")
        page.keyboard.press("Tab")
        page.keyboard.press("Tab")
        page.keyboard.press("Control+A")
        page.keyboard.type("8730")
        page.keyboard.press("Enter")
        expect(page.locator("#t-result")).to_contain_text("Allowed")
        expect(page.locator("#t-result")).to_contain_text("allow rule 0")
        page.screenshot(path=str(ART / "02-policy-tester.png"), full_page=True)
        page.locator("#t-src").fill("s0")
        page.locator("#t-dst").fill("n1")
        page.locator("#tester button[type=submit]").click()
        expect(page.locator("#t-result")).to_contain_text("default deny")

        # Mint a token, then revoke it.
        page.locator("#m-tags").fill("node")
        page.locator("#mint button[type=submit]").click()
        expect(page.locator("#m-result")).to_contain_text("tmj_")
        token_id = page.locator("#m-result").inner_text().split()[1]
        row = page.locator(f'#token-rows tr[data-token="{token_id}"]')
        expect(row).to_have_count(1)
        page.screenshot(path=str(ART / "03-token-minted.png"), full_page=True)
        row.get_by_role("button", name=f"Revoke token {token_id}").click()
        expect(row).to_have_count(0)
        st, tokens = admin.call("GET", "/v1/tokens")
        assert token_id not in [t["token_id"] for t in tokens], tokens

        # Revoke a member from the page: it disappears live.
        page.on("dialog", lambda d: d.accept())
        page.locator("#filter").fill("n1")
        victim = members["n1"]
        page.get_by_role("button", name="Revoke n1", exact=True).click()
        expect(page.locator(f'#member-rows tr[data-peer="{victim}"]')).to_have_count(0)
        page.locator("#filter").fill("")
        expect(page.locator("#member-count")).to_have_text(f"({len(members) - 1})")
        # And one revoked elsewhere (an admin's API call) disappears without a reload.
        gone = members["n2"]
        st, _ = admin.call("DELETE", f"/v1/mesh/peers/{gone}")
        assert st == 200
        expect(page.locator("#member-count")).to_have_text(f"({len(members) - 2})")
        expect(page.locator(f'#member-rows tr[data-peer="{gone}"]')).to_have_count(0)
        page.screenshot(path=str(ART / "04-member-revoked.png"), full_page=True)

        # Accessibility: no serious or critical violation.
        results = Axe().run(page)
        (ART / "axe.json").write_text(json.dumps(results.response, indent=2))
        bad = [v for v in results.response["violations"]
               if v.get("impact") in ("serious", "critical")]
        assert not bad, "axe: " + "; ".join(f"{v['id']}: {v['help']}" for v in bad)
        assert not errors, f"browser console errors: {errors}"
        browser.close()


if __name__ == "__main__":
    main()
