#!/usr/bin/env python3
"""Drives the edge benchmark (see run.sh): starts the app, tabbify-node and nginx on
loopback, runs wrk against each proxy alternately, and writes one JSON result."""
import argparse, json, os, platform, re, shutil, signal, socket, statistics, subprocess, sys, tempfile, threading, time

KEY = "bench-key-0123456789abcdef"
APP = "5b6d0f2e-4c1a-4e8b-9f3d-2a7c6e1b0d94"
SCENARIOS = {
    "get_small": {"path": f"/app/{APP}/bytes/64", "method": "GET"},
    "get_1mib": {"path": f"/app/{APP}/bytes/1048576", "method": "GET"},
    "post_1mib": {"path": f"/app/{APP}/sink", "method": "POST", "body": 1 << 20},
}
NGINX_CONF = """
worker_processes {workers};
daemon off;
master_process on;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; multi_accept on; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  client_max_body_size 0;
  upstream app {{ server {upstream}; keepalive 128; keepalive_requests 1000000; }}
  server {{
    listen {listen} backlog=4096;
    keepalive_requests 1000000;
    location /app/ {{
      if ($http_authorization != "Bearer {key}") {{ return 401; }}
      rewrite ^/app/[0-9a-fA-F-]+(/.*)$ $1 break;
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "";
      proxy_set_header X-Forwarded-For $remote_addr;
      proxy_set_header X-Forwarded-Proto $scheme;
      proxy_set_header X-Forwarded-Host $http_host;
      proxy_buffering {buffering};
      proxy_request_buffering {buffering};
    }}
  }}
}}
"""

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

def wait_port(port, proc, what):
    for _ in range(200):
        if proc.poll() is not None:
            sys.exit(f"perf/edge: {what} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close(); return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"perf/edge: {what} did not listen on {port}")

def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0

def tree_rss_kib(pid):
    """RSS of pid plus its children (nginx workers)."""
    total = rss_kib(pid)
    try:
        for child in open(f"/proc/{pid}/task/{pid}/children").read().split():
            total += rss_kib(int(child))
    except OSError:
        pass
    return total

def parse_latency(text, label):
    m = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
    if not m:
        return None
    v, unit = float(m.group(1)), m.group(2)
    return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v

def run_wrk(args, port, scenario, lua_dir, cpu):
    sc = SCENARIOS[scenario]
    cmd = ["wrk", f"-t{args.wrk_threads}", f"-c{args.connections}", f"-d{args.duration}s", "--latency",
           "-H", f"Authorization: Bearer {KEY}"]
    if sc["method"] == "POST":
        lua = os.path.join(lua_dir, f"{scenario}.lua")
        with open(lua, "w") as f:
            f.write(f'wrk.method = "POST"\nwrk.body = string.rep("x", {sc["body"]})\n'
                    'wrk.headers["Content-Type"] = "application/octet-stream"\n')
        cmd += ["-s", lua]
    cmd.append(f"http://127.0.0.1:{port}{sc['path']}")
    if cpu is not None:
        cmd = ["taskset", "-c", cpu] + cmd
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    sock_err = re.search(r"Socket errors:.*", out)
    return {"rps": rps, "p50_ms": parse_latency(out, "50"), "p99_ms": parse_latency(out, "99"),
            "non_2xx": int(errors.group(1)) if errors else 0,
            "socket_errors": sock_err.group(0) if sock_err else None}

def stream_rss(node_pid, port, size):
    """Edge RSS (KiB) sampled while `size` bytes go up, then down, through the edge."""
    samples = []
    stop = threading.Event()
    def sample():
        while not stop.is_set():
            samples.append(rss_kib(node_pid)); time.sleep(0.05)
    base = rss_kib(node_pid)
    t = threading.Thread(target=sample); t.start()
    url = f"http://127.0.0.1:{port}/app/{APP}"
    hdr = ["-H", f"Authorization: Bearer {KEY}"]
    t0 = time.time()
    up = subprocess.run(f"head -c {size} /dev/zero | curl -sS --fail -T - -X POST " +
                        f"-H 'Authorization: Bearer {KEY}' {url}/sink",
                        shell=True, capture_output=True, text=True, check=True).stdout
    t_up = time.time() - t0
    t0 = time.time()
    down = subprocess.run(["curl", "-sS", "--fail", "-o", "/dev/null", "-w", "%{size_download}", *hdr,
                           f"{url}/bytes/{size}"], capture_output=True, text=True, check=True).stdout
    t_down = time.time() - t0
    stop.set(); t.join()
    return {"bytes": size, "upload_received_by_app": json.loads(up)["bytes"],
            "download_bytes": int(down), "upload_s": round(t_up, 2), "download_s": round(t_down, 2),
            "rss_before_kib": base, "rss_max_kib": max(samples + [base]),
            "rss_growth_kib": max(samples + [base]) - base, "samples": len(samples)}

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--node", required=True); ap.add_argument("--upstream", required=True)
    ap.add_argument("--runs", type=int, default=3); ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--connections", type=int, default=50); ap.add_argument("--wrk-threads", type=int, default=1)
    ap.add_argument("--proxy-workers", type=int, default=1, help="tabbify-node workers = nginx worker_processes")
    ap.add_argument("--pin", default="1", help="1: proxies on CPU 0, wrk and app on CPU 1; 0: no pinning")
    ap.add_argument("--nginx-buffering", default="off", choices=["on", "off"])
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--stream-bytes", type=int, default=1 << 30)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    pin = args.pin == "1" and (os.cpu_count() or 1) >= 2
    proxy_cpu, load_cpu = ("0", "1") if pin else (None, None)
    taskset = lambda cpu: ["taskset", "-c", cpu] if cpu is not None else []

    work = tempfile.mkdtemp(prefix="edge-bench-")
    procs = []
    def cleanup(*_):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try: p.wait(timeout=5)
            except subprocess.TimeoutExpired: p.kill()
        shutil.rmtree(work, ignore_errors=True)
    signal.signal(signal.SIGTERM, lambda *_: (cleanup(), sys.exit(1)))
    try:
        up_port, node_port, ngx_port = free_port(), free_port(), free_port()
        upstream = subprocess.Popen(taskset(load_cpu) + [args.upstream, f"127.0.0.1:{up_port}"],
                                    stdout=subprocess.DEVNULL, env={**os.environ, "UPSTREAM_WORKERS": "1"})
        procs.append(upstream); wait_port(up_port, upstream, "edge-upstream")
        env = {**os.environ, "TABBIFY_NODE_KEY": KEY, "RUST_LOG": "warn"}
        node = subprocess.Popen(taskset(proxy_cpu) + [args.node, "--bind", f"127.0.0.1:{node_port}",
                                "--workers", str(args.proxy_workers), "--upstream-override", f"127.0.0.1:{up_port}"],
                                env=env, stderr=open(os.path.join(work, "node.log"), "w"))
        procs.append(node); wait_port(node_port, node, "tabbify-node")
        for d in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            os.makedirs(os.path.join(work, d))
        conf = os.path.join(work, "nginx.conf")
        with open(conf, "w") as f:
            f.write(NGINX_CONF.format(workers=args.proxy_workers, dir=work, upstream=f"127.0.0.1:{up_port}",
                                      listen=f"127.0.0.1:{ngx_port}", key=KEY, buffering=args.nginx_buffering))
        nginx = subprocess.Popen(taskset(proxy_cpu) + ["nginx", "-c", conf, "-p", work],
                                 stderr=open(os.path.join(work, "nginx.log"), "w"))
        procs.append(nginx); wait_port(ngx_port, nginx, "nginx")

        scenarios = args.scenarios.split(",")
        targets = {"tabbify-node": node_port, "nginx": ngx_port}
        results = {s: {t: [] for t in targets} for s in scenarios}
        for s in scenarios:  # warm-up: pools, page cache, CPU frequency
            for port in targets.values():
                w = argparse.Namespace(**{**vars(args), "duration": 2})
                run_wrk(w, port, s, work, load_cpu)
        for r in range(args.runs):
            for s in scenarios:
                order = list(targets.items()) if r % 2 == 0 else list(reversed(targets.items()))
                for name, port in order:
                    res = run_wrk(args, port, s, work, load_cpu)
                    results[s][name].append(res)
                    print(f"run {r+1} {s:10} {name:13} {res['rps']:10.0f} req/s  p50 {res['p50_ms']:.3f} ms  p99 {res['p99_ms']:.3f} ms", file=sys.stderr)
        summary = {}
        for s in scenarios:
            med = {t: {k: statistics.median(x[k] for x in results[s][t]) for k in ("rps", "p50_ms", "p99_ms")}
                   for t in targets}
            summary[s] = {"median": med,
                          "rps_ratio_edge_over_nginx": med["tabbify-node"]["rps"] / med["nginx"]["rps"],
                          "p99_ratio_edge_over_nginx": med["tabbify-node"]["p99_ms"] / med["nginx"]["p99_ms"],
                          "runs": results[s]}
        stream = stream_rss(node.pid, node_port, args.stream_bytes) if args.stream_bytes else None
        result = {
            "benchmark": "edge-proxy", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "kernel": platform.release(), "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?"),
            "cores": os.cpu_count(), "nginx": subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip(),
            "wrk": {"threads": args.wrk_threads, "connections": args.connections, "duration_s": args.duration},
            "runs": args.runs, "proxy_workers": args.proxy_workers, "pinned": pin,
            "nginx_buffering": args.nginx_buffering, "scenarios": summary, "stream_rss": stream,
        }
        print("\nscenario     proxy          req/s      p50 ms   p99 ms")
        for s in scenarios:
            for t in targets:
                m = summary[s]["median"][t]
                print(f"{s:12} {t:13} {m['rps']:10.0f} {m['p50_ms']:8.3f} {m['p99_ms']:8.3f}")
            print(f"{s:12} {'edge/nginx':13} {summary[s]['rps_ratio_edge_over_nginx']:10.3f}          "
                  f"{summary[s]['p99_ratio_edge_over_nginx']:8.3f}")
        if stream:
            print(f"\n{stream['bytes'] / 2**30:g} GiB up + down through tabbify-node: RSS {stream['rss_before_kib']} KiB before, "
                  f"max {stream['rss_max_kib']} KiB (+{stream['rss_growth_kib']} KiB), "
                  f"up {stream['upload_s']} s, down {stream['download_s']} s")
        out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                        time.strftime("edge-%Y%m%dT%H%M%SZ.json", time.gmtime()))
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"\nwrote {out}")
    finally:
        cleanup()

if __name__ == "__main__":
    main()
