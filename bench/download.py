"""Verified download benchmark: the agent's update cycle against curl + sha256sum, same file,
same nginx over TLS on loopback.

    .venv/bin/python bench/download.py [--mb 100] [--runs 3]

The agent's side is the whole cycle a device runs: refresh the TUF metadata, download the
target through the httpx fetcher while hashing, check length and SHA-256 against the signed
metadata, fsync, install into the store (rename + directory fsync). The baseline is the least
work a verified download needs: ``curl -o FILE`` then ``sha256sum FILE`` then ``sync``.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import encrypted  # noqa: E402  (bench/encrypted.py, beside this script)

from agent.delivery.fetcher import FetchConfig, HttpxFetcher  # noqa: E402
from agent.delivery.updater import ModelUpdater, UpdaterConfig  # noqa: E402
from agent.models.store import ModelStore  # noqa: E402
from cloud_stub.certs import make_pki  # noqa: E402
from cloud_stub.ports import free_port  # noqa: E402
from cloud_stub.publish import publish  # noqa: E402
from cloud_stub.repo import Repository  # noqa: E402
from cloud_stub.samples import matmul_model  # noqa: E402


def start_nginx(
    work: Path, root: Path, cert: Path, key: Path
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    conf = work / "nginx.conf"
    conf.write_text(
        f"""daemon off; user root root; worker_processes 1; pid {work}/nginx.pid;
error_log {work}/nginx-error.log; events {{ worker_connections 64; }}
http {{ access_log off; sendfile on; client_body_temp_path {work}/b; proxy_temp_path {work}/p;
  fastcgi_temp_path {work}/f; uwsgi_temp_path {work}/u; scgi_temp_path {work}/s;
  server {{ listen 127.0.0.1:{port} ssl; ssl_certificate {cert}; ssl_certificate_key {key};
    root {root}; }} }}
"""
    )
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    process = subprocess.Popen([nginx, "-c", str(conf), "-p", str(work)])
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return process, port
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("nginx did not start")


def cpu_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--no-encrypted", action="store_true", help="skip the encrypted row (issue 14)"
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edge-dl-"))
    try:
        side = int((args.mb * 1024 * 1024 / 4) ** 0.5)
        model = matmul_model(work / "big.onnx", k=side, n=side)
        pki = make_pki(work / "pki")
        repo = Repository.init(work / "repo")
        publish(repo, model, "big", 1, log=lambda *_: None)
        if not args.no_encrypted:  # the same bytes, encrypted for one enrolled device
            encrypted.enrol_device(repo, work / "identity")
            publish(repo, model, "bigenc", 1, encrypt="devices", log=lambda *_: None)
        info = next(t for _, t in repo.targets() if t.path.endswith("model.onnx"))
        size_mb = info.length / 1e6
        nginx, port = start_nginx(work, repo.public, pki.server_cert, pki.server_key)
        url = f"https://127.0.0.1:{port}/targets/models/big/1/{info.hashes['sha256']}.model.onnx"
        try:
            curl_wall, curl_cpu = [], []
            for i in range(args.runs):
                out = work / f"curl-{i}.bin"
                c0, t0 = cpu_children(), time.perf_counter()
                subprocess.run(
                    ["curl", "-sS", "--cacert", str(pki.ca_cert), "-o", str(out), url], check=True
                )
                digest = subprocess.run(
                    ["sha256sum", str(out)], check=True, capture_output=True, text=True
                ).stdout.split()[0]
                subprocess.run(["sync"], check=True)
                curl_wall.append(time.perf_counter() - t0)
                curl_cpu.append(cpu_children() - c0)
                assert digest == info.hashes["sha256"]
                out.unlink()
            agent_wall, agent_cpu = [], []
            for i in range(args.runs):
                store = ModelStore(work / f"device-{i}" / "models")
                fetcher = HttpxFetcher(FetchConfig(ca_file=pki.ca_cert))
                updater = ModelUpdater(
                    UpdaterConfig(
                        metadata_url=f"https://127.0.0.1:{port}/metadata/",
                        targets_url=f"https://127.0.0.1:{port}/targets/",
                        trusted_root=repo.metadata_dir / "1.root.json",
                        metadata_dir=work / f"device-{i}" / "tuf",
                        device_id="bench",
                        channel="stable",
                        models=("big",),
                        agent_version="0.1.0",
                    ),
                    store,
                    fetcher,
                )
                c0, t0 = cpu_self(), time.perf_counter()
                report = updater.check_once()
                agent_wall.append(time.perf_counter() - t0)
                agent_cpu.append(cpu_self() - c0)
                fetcher.close()
                assert report.installed == [("big", 1)], report.error
                shutil.rmtree(work / f"device-{i}")
            if not args.no_encrypted:

                def make_updater(device: Path, name: str, keys: Path | None) -> ModelUpdater:
                    return ModelUpdater(
                        UpdaterConfig(
                            metadata_url=f"https://127.0.0.1:{port}/metadata/",
                            targets_url=f"https://127.0.0.1:{port}/targets/",
                            trusted_root=repo.metadata_dir / "1.root.json",
                            metadata_dir=device / "tuf",
                            device_id="bench",
                            channel="stable",
                            models=(name,),
                            agent_version="0.1.0",
                            identity_dir=keys,
                        ),
                        ModelStore(device / "models"),
                        HttpxFetcher(FetchConfig(ca_file=pki.ca_cert)),
                    )

                sealed = encrypted.compare(work, args.runs, make_updater)
                rss = encrypted.rss_runs(work, args.runs)
        finally:
            nginx.terminate()
            nginx.wait(10)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    curl_t, agent_t = statistics.median(curl_wall), statistics.median(agent_wall)
    print(f"target: {size_mb:.1f} MB over TLS from nginx on loopback, {args.runs} runs, medians")
    curl_c, agent_c = statistics.median(curl_cpu), statistics.median(agent_cpu)
    print(f"  curl -o + sha256sum + sync   {curl_t:6.3f} s wall  {curl_c:6.3f} s CPU")
    print(f"  edge-agent update cycle      {agent_t:6.3f} s wall  {agent_c:6.3f} s CPU")
    print(f"  ratio (agent / curl+sha256sum): {agent_t / curl_t:.2f}x (bar: <= 1.25x)")
    if not args.no_encrypted:
        encrypted.report(*sealed, rss)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
