#!/usr/bin/env python3
"""Browser test of the coordinator's dashboard (issue 16, Deliver 6).

Starts a real coordinator (mTLS, certificates from tabbify-mesh-ca) on an ephemeral port
of a veth this test adds, registers members through the API with their own peer
certificates, starts two REAL joiners (`tabbify-mesh join`) in network namespaces the test
creates on a bridge next to it (removed on exit, whatever happens; needs root and `ip`),
pings between them over the mesh, then drives Debian's chromium headless with Playwright
(launched from /usr/bin/chromium; no browser is downloaded):

  * logs in through the link `tabbify-mesh-coordinator admin-login` prints;
  * sees every member (paging through the table);
  * sees the real joiners' traffic, handshake and path columns filled from their
    heartbeats' traffic reports ("reported by the member"), and the reach graph, from the
    keyboard;
  * runs the policy tester (allowed, and refused by default deny), from the keyboard;
  * mints a join token and revokes it;
  * revokes a member from the page and another through the API, and sees both disappear
    live (SSE, no reload);
  * checks accessibility with axe-core (no serious or critical violation).

Screenshots and the axe report go to target/ui-artifacts/. The coordinator and the
joiners are stopped by their PIDs on exit, whatever happens.
"""

import base64
import http.client
import re
import shutil
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
# Namespaces and links of this test (unique names: other tests may run alongside).
NS_PREFIX = "tui-ops-ui"
LAN_NS = f"{NS_PREFIX}-lan"
JOINERS = {"j1": "10.216.16.11", "j2": "10.216.16.12"}
HOST_IP = "10.216.16.254"


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

if os.geteuid() != 0:
    fail("the real joiners run in network namespaces: run as root (the test creates and removes "
         f"{LAN_NS} and {NS_PREFIX}-j1/j2)")
if not shutil.which("ip"):
    fail("`ip` is missing: install the Debian package iproute2")

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


def lan_down():
    """Removes this test's namespaces (their veths go with them). Idempotent."""
    for ns in [LAN_NS] + [f"{NS_PREFIX}-{j}" for j in JOINERS]:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    subprocess.run(["ip", "link", "del", "toui-host"], capture_output=True)


def lan_up():
    """A bridge in its own namespace, one namespace per joiner on it, and a veth from this
    machine (HOST_IP, where the coordinator listens)."""
    lan_down()
    run("ip", "netns", "add", LAN_NS)
    run("ip", "-n", LAN_NS, "link", "set", "lo", "up")
    run("ip", "-n", LAN_NS, "link", "add", "toui-br", "type", "bridge")
    run("ip", "-n", LAN_NS, "link", "set", "toui-br", "up")
    for j, addr in JOINERS.items():
        ns = f"{NS_PREFIX}-{j}"
        run("ip", "netns", "add", ns)
        run("ip", "-n", ns, "link", "set", "lo", "up")
        run("ip", "link", "add", f"toui-{j}", "type", "veth", "peer", "name", f"toui-{j}-b")
        run("ip", "link", "set", f"toui-{j}", "netns", ns)
        run("ip", "link", "set", f"toui-{j}-b", "netns", LAN_NS)
        run("ip", "-n", LAN_NS, "link", "set", f"toui-{j}-b", "master", "toui-br", "up")
        run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", f"toui-{j}")
        run("ip", "-n", ns, "link", "set", f"toui-{j}", "up")
    run("ip", "link", "add", "toui-host", "type", "veth", "peer", "name", "toui-host-b")
    run("ip", "link", "set", "toui-host-b", "netns", LAN_NS)
    run("ip", "-n", LAN_NS, "link", "set", "toui-host-b", "master", "toui-br", "up")
    run("ip", "addr", "add", f"{HOST_IP}/24", "dev", "toui-host")
    run("ip", "link", "set", "toui-host", "up")


def start_joiners(admin, origin, ca, work):
    """`tabbify-mesh join` in each joiner's namespace (tag supervisor: they may reach each
    other), as scripts/demo.sh starts them; returns the processes."""
    procs = []
    for j in JOINERS:
        run(BIN / "tabbify-mesh-ca", "issue-peer", "--name", j, "--ca-dir", ca, "--out", work / j)
        st, tok = admin.call("POST", "/v1/tokens", {"tags": ["supervisor"], "name": j})
        assert st == 200, tok
        (work / j / "token").write_text(tok["token"] + "\n")
        procs.append(subprocess.Popen(
            ["ip", "netns", "exec", f"{NS_PREFIX}-{j}", str(BIN / "tabbify-mesh"), "join",
             "--name", j, "--tag", "supervisor", "--coordinator", origin,
             "--join-token-file", str(work / j / "token"),
             "--tls-cert", str(work / j / "cert.pem"), "--tls-key", str(work / j / "key.pem"),
             "--tls-ca", str(ca / "ca.pem"), "--interface", f"toui-{j}-wg",
             "--state-dir", str(work / j / "state"), "--threads", "1", "--dns", "off",
             "--metrics-bind", "off", "--speedtest-bind", "off"],
            stdout=subprocess.DEVNULL, stderr=open(work / f"{j}.log", "w"),
            env={**os.environ, "RUST_LOG": "info"}))
    return procs


def status(work, j):
    out = subprocess.run(["ip", "netns", "exec", f"{NS_PREFIX}-{j}", str(BIN / "tabbify-mesh"),
                          "status", "-i", f"toui-{j}-wg", "--json"],
                         capture_output=True, text=True)
    try:
        return json.loads(out.stdout)
    except ValueError:
        return {}


def joined(admin, work):
    """Waits (up to 60 s) until every joiner registered; returns {name: peer_id}."""
    deadline = time.monotonic() + 60
    while True:
        st, v = admin.call("GET", "/v1/admin/members")
        assert st == 200, v
        found = {m["display_name"]: m["peer_id"] for m in v["members"]
                 if m["display_name"] in JOINERS}
        if len(found) == len(JOINERS):
            return found
        if time.monotonic() > deadline:
            logs = {j: (work / f"{j}.log").read_text()[-2000:] for j in JOINERS}
            fail(f"the real joiners did not register within 60 s (registered: {found}); logs: {logs}")
        time.sleep(0.5)


def ping_over_the_mesh(work):
    """j1 pings j2's ULA through the mesh until it answers (the first handshake), so both
    have traffic and a direct path to report."""
    ula = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ula = ula or status(work, "j2").get("ula")
        if ula:
            r = subprocess.run(["ip", "netns", "exec", f"{NS_PREFIX}-j1", "ping", "-c", "3",
                                "-i", "0.2", "-W", "1", ula], capture_output=True, text=True)
            if r.returncode == 0:
                return
        time.sleep(0.5)
    fail(f"j1 could not ping j2 ({ula}) over the mesh within 60 s; "
         f"j1: {(work / 'j1.log').read_text()[-2000:]}")


class Api:
    """HTTPS with a client certificate, trusting only the mesh CA."""

    def __init__(self, port, ca, who):
        self.port = port
        self.host = HOST_IP
        self.ctx = ssl.create_default_context(cafile=str(ca / "ca.pem"))
        self.ctx.load_cert_chain(str(who / "cert.pem"), str(who / "key.pem"))

    def call(self, method, path, body=None):
        c = http.client.HTTPSConnection(self.host, self.port, context=self.ctx, timeout=10)
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
        HOST_IP, "--ca-dir", ca, "--out", work / "coord")
    run(BIN / "tabbify-mesh-ca", "issue-admin", "--name", "admin", "--ca-dir", ca,
        "--out", work / "admin")
    (work / "policy.json").write_text(json.dumps({
        "tags": ["node", "supervisor"],
        "app_hosts": ["tag:supervisor"],
        "allow": [{"src": ["tag:node"], "dst": ["tag:supervisor:8730"]},
                  {"src": ["tag:supervisor"], "dst": ["tag:supervisor"]}],
        "deny": [],
    }))
    lan_up()
    joiners = []
    proc = subprocess.Popen(
        [str(BIN / "tabbify-mesh-coordinator"), "--bind", f"{HOST_IP}:0",
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
        origin = f"https://{HOST_IP}:{port}"
        print(f"test-ui: coordinator on {origin}, {MEMBERS} members + {len(JOINERS)} real joiners")
        admin = Api(port, ca, work / "admin")
        joiners += start_joiners(admin, origin, ca, work)
        members = register(admin, port, ca, work)
        real = joined(admin, work)
        members.update(real)
        ping_over_the_mesh(work)
        browse(origin, port, ca, work, admin, members, real)
    finally:
        for j in joiners:
            j.kill()
            j.wait()
        proc.kill()
        proc.wait()
        lan_down()
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


def browse(origin, port, ca, work, admin, members, real):
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

        # Who may reach whom: the table, and the graph from the keyboard.
        expect(page.locator("#reach-rows")).to_contain_text("tag:node")
        expect(page.locator("#reach-rows")).to_contain_text("8730")
        nodes = page.locator("#reach-graph svg g.node")
        expect(nodes).to_have_count(2)
        nodes.first.focus()
        expect(page.locator("#reach-detail")).to_contain_text("may reach")
        page.keyboard.press("ArrowRight")
        expect(nodes.nth(1)).to_be_focused()
        expect(page.locator("#reach-detail")).to_contain_text("tag:supervisor")
        page.locator("#reach").screenshot(path=str(ART / "06-reach-graph.png"))
        # At 1,000 members with a `peer:` selector each (1,000 classes), nodes merge by tags.
        big = page.evaluate("""() => {
            const classes = [], edges = [];
            for (let i = 0; i < 1000; i++) {
                const tag = i % 2 ? "tag:node" : "tag:supervisor";
                classes.push({ id: i, label: tag + " peer:m" + i, members: ["p" + i] });
                if (i > 0) edges.push({ from: i, to: i - 1, ports: "22" });
            }
            const r = { policy_revision: 1, classes, edges };
            const t = performance.now();
            drawReachGraph(r);
            const ms = performance.now() - t;
            return { ms, nodes: document.querySelectorAll("#reach-graph svg g.node").length };
        }""")
        assert big["nodes"] == 2, big
        print(f"test-ui: reach graph of 1,000 classes drawn as {big['nodes']} nodes in {big['ms']:.1f} ms")
        page.evaluate("loadReach()")
        expect(nodes).to_have_count(2)

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

        # A member's report arrives live (SSE, no reload): n3 (an API member) sends one.
        page.locator("#filter").fill("n3")
        n3_row = page.locator(f'#member-rows tr[data-peer="{members["n3"]}"]')
        expect(n3_row.locator(".traffic-rxtx")).to_have_text("not reported")
        st, v = Api(port, ca, work / "n3").call("POST", "/v1/mesh/heartbeat", {
            "peer_id": members["n3"], "endpoints": ["127.0.0.1:20003"],
            "traffic": {"rx_bytes": 3 * 1024 * 1024, "tx_bytes": 2048, "peers": [
                {"peer_id": members["s0"], "rx_bytes": 3 * 1024 * 1024, "tx_bytes": 2048,
                 "last_handshake_secs": 5, "path": "relay"}]}})
        assert st == 200, v
        expect(n3_row.locator(".traffic-rxtx")).to_have_text("3.0 MiB / 2.0 KiB")
        expect(n3_row.locator(".traffic-path")).to_have_text("0 direct, 1 relay, 0 none")

        # The real joiners' columns, from their heartbeats' traffic reports (live: the
        # next heartbeat after the ping fills them without a reload).
        started = time.monotonic()
        for name, peer in real.items():
            page.locator("#filter").fill(name)
            row = page.locator(f'#member-rows tr[data-peer="{peer}"]')
            expect(row).to_have_count(1)
            expect(row.locator(".traffic-rxtx")).not_to_have_text("not reported", timeout=40_000)
            expect(row.locator(".traffic-path")).to_have_text(re.compile(r"[1-9][0-9]* direct"),
                                                              timeout=40_000)
            expect(row.locator(".traffic-handshake")).to_have_text(re.compile(r"ago$"))
            print(f"test-ui: {name}: {row.locator('.traffic-rxtx').inner_text()}, handshake "
                  f"{row.locator('.traffic-handshake').inner_text()}, "
                  f"{row.locator('.traffic-path').inner_text()}")
        print(f"test-ui: real joiners' traffic shown after {time.monotonic() - started:.1f} s")
        page.locator("#filter").fill("j")
        page.screenshot(path=str(ART / "05-real-joiners-traffic.png"), full_page=True)
        page.locator("#filter").fill("")

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
