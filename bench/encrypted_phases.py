"""Where the encrypted row's time goes: the update cycle of the same 100 MB model in clear and
encrypted, phase by phase, in interleaved pairs whose order alternates (issue 14).

    .venv/bin/python bench/encrypted_phases.py [--mb 100] [--pairs 6]

Each phase is timed by wrapping the agent's own functions (nothing is reimplemented): the
metadata (refresh, listing, choice), each target's download (streamed, hashed, fsynced)
and the fsyncs inside it, the keys document's check, the store's install, then, for the
encrypted model, each content key unwrap and each file's decryption as validation does it
(``decrypt.open_version`` then ``decrypt.open_weights``). Prints the medians per phase, the
per-pair difference encrypted minus clear, and the per-pair ratios.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import download as bench_download  # noqa: E402  (bench/download.py, beside this script)
import encrypted  # noqa: E402

from agent.confidential import decrypt  # noqa: E402
from agent.delivery import download, sealed, updater  # noqa: E402
from agent.delivery.fetcher import FetchConfig, HttpxFetcher  # noqa: E402
from agent.models import store  # noqa: E402
from cloud_stub.certs import make_pki  # noqa: E402
from cloud_stub.publish import publish  # noqa: E402
from cloud_stub.repo import Repository  # noqa: E402
from cloud_stub.samples import matmul_model  # noqa: E402

_phases: dict[str, float] = collections.defaultdict(float)
_stack: list[str] = []


@contextmanager
def phase(name: str) -> Iterator[None]:
    label = f"{_stack[-1]} > {name}" if _stack else name
    _stack.append(label)
    started = time.perf_counter()
    try:
        yield
    finally:
        _phases[label] += time.perf_counter() - started
        _stack.pop()


def _wrap(owner: Any, attr: str, name: Callable[..., str] | str) -> None:
    inner = getattr(owner, attr)

    def timed(*args: Any, **kwargs: Any) -> Any:
        with phase(name(*args, **kwargs) if callable(name) else name):
            return inner(*args, **kwargs)

    setattr(owner, attr, timed)


def _instrument() -> None:
    _wrap(updater.ModelUpdater, "_download_and_install", "download and install")
    _wrap(download.TargetDownloader, "download", lambda _s, _i, dest, *_a, **_k: dest.name)
    _wrap(sealed, "fetch_keys", "keys document")  # the module updater calls it through
    _wrap(store.ModelStore, "install", "store install")
    _wrap(os, "fsync", "fsync")  # os.fsync, wherever it is called from
    _wrap(decrypt, "content_key", "content key unwrap")
    _wrap(decrypt, "decrypt_file", lambda file, *_a, **_k: f"decrypt {file.name}")
    _wrap(decrypt, "Weights", "weights index + views")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--verbose", action="store_true", help="a line per cycle")
    args = parser.parse_args()
    _instrument()
    work = Path(tempfile.mkdtemp(prefix="edge-phases-"))
    runs: dict[str, list[dict[str, float]]] = {"clear": [], "encrypted": []}
    try:
        side = int((args.mb * 1024 * 1024 / 4) ** 0.5)
        model = matmul_model(work / "big.onnx", k=side, n=side)
        pki = make_pki(work / "pki")
        repo = Repository.init(work / "repo")
        publish(repo, model, "big", 1, log=lambda *_: None)
        encrypted.enrol_device(repo, work / "identity")
        publish(repo, model, "bigenc", 1, encrypt="devices", log=lambda *_: None)
        nginx, port = bench_download.start_nginx(work, repo.public, pki.server_cert, pki.server_key)
        try:
            order = ["clear"]  # a warm-up, not counted
            for i in range(args.pairs):
                order += ["clear", "encrypted"] if i % 2 == 0 else ["encrypted", "clear"]
            for i, kind in enumerate(order):
                name = "big" if kind == "clear" else "bigenc"
                device = work / f"dev-{i}"
                shutil.copytree(work / "identity", device / "identity")
                cycle = updater.ModelUpdater(
                    updater.UpdaterConfig(
                        metadata_url=f"https://127.0.0.1:{port}/metadata/",
                        targets_url=f"https://127.0.0.1:{port}/targets/",
                        trusted_root=repo.metadata_dir / "1.root.json",
                        metadata_dir=device / "tuf",
                        device_id="bench",
                        channel="stable",
                        models=(name,),
                        agent_version="0.1.0",
                        identity_dir=device / "identity",
                    ),
                    store.ModelStore(device / "models"),
                    HttpxFetcher(FetchConfig(ca_file=pki.ca_cert)),
                )
                _phases.clear()
                with phase("update cycle"):
                    report = cycle.check_once()
                assert report.installed, report.error
                if kind == "encrypted":
                    with phase("decryption"):
                        stored = store.ModelStore(device / "models").get(name, 1)
                        custom = stored.manifest.custom
                        graph, _smoke = decrypt.open_version(
                            stored.directory, name, 1, custom, "model.onnx"
                        )
                        held = decrypt.open_weights(stored.directory, name, 1, custom)
                        graph.wipe()
                    assert held is not None
                    held.plaintext.wipe()
                cycle.fetcher.close()  # type: ignore[attr-defined]
                shutil.rmtree(device)
                if i:
                    runs[kind].append(dict(_phases))
                if args.verbose:
                    print(f"  {i:2} {kind:9} " + _line(_phases), flush=True)
        finally:
            nginx.terminate()
            nginx.wait(10)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _report(runs)
    return 0


def _report(runs: dict[str, list[dict[str, float]]]) -> None:
    clear, sealed_runs = runs["clear"], runs["encrypted"]
    names = sorted({k for r in clear + sealed_runs for k in r}, key=_order)
    print(f"{len(clear)} pairs, order alternated; medians in ms (load {os.getloadavg()[0]:.2f})")
    print(f"  {'phase':58} {'clear':>8} {'encrypted':>10} {'enc - clear (pairs)':>20}")
    for name in names:
        a = [r.get(name, 0.0) for r in clear]
        b = [r.get(name, 0.0) for r in sealed_runs]
        diff = statistics.median(y - x for x, y in zip(a, b, strict=True))
        print(
            f"  {name:58} {statistics.median(a) * 1e3:8.1f} {statistics.median(b) * 1e3:10.1f} "
            f"{diff * 1e3:+20.1f}"
        )
    total = [r["update cycle"] + r.get("decryption", 0.0) for r in sealed_runs]
    base = [r["update cycle"] for r in clear]
    cycle_only = sorted(r["update cycle"] / c for r, c in zip(sealed_runs, base, strict=True))
    ratios = sorted(t / c for t, c in zip(total, base, strict=True))
    shown = ", ".join(f"{r:.2f}" for r in ratios)
    ratio = statistics.median(total) / statistics.median(base)
    print(
        f"  ratio (cycle + decryption) / clear cycle: {ratio:.2f}x of the medians; per pair {shown}"
    )
    shown = ", ".join(f"{r:.2f}" for r in cycle_only)
    print(f"  encrypted cycle alone / clear cycle, per pair: {shown}")


def _line(found: dict[str, float]) -> str:
    """One cycle's main phases, in ms."""
    big = max((k for k in found if k.count(">") == 2 and "install >" in k), key=lambda k: found[k])
    shown = {
        "cycle": found["update cycle"],
        big.rsplit("> ", 1)[1]: found[big],
        "its fsync": found[f"{big} > fsync"],
        "decryption": found.get("decryption", 0.0),
    }
    return "  ".join(f"{k} {v * 1e3:6.1f}" for k, v in shown.items())


def _order(name: str) -> tuple[int, str]:
    return (1 if name.startswith("decryption") else 0, name)


if __name__ == "__main__":
    raise SystemExit(main())
