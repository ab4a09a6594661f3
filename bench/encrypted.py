"""The encrypted row of ``bench/download.py`` (issue 14): a verified download plus decryption
into memory against the verified download of the same model in clear, interleaved in one
run; and peak RSS while an encrypted model loads, measured in a fresh process.

    .venv/bin/python bench/encrypted.py rss STORE NAME VERSION {encrypted,clear}

(the child ``download.py`` runs for each load; it prints one JSON line).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _status_mb(field: str) -> float:
    with Path("/proc/self/status").open() as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def rss_child(store: Path, name: str, version: int, mode: str) -> None:
    """Load one stored version as the daemon's validation does; print idle and peak RSS."""
    from agent.confidential import decrypt
    from agent.models import onnx  # ONNX Runtime loaded before the idle reading
    from agent.models.runtime import RuntimeOptions, load_session
    from agent.models.store import ModelStore

    del onnx
    stored = ModelStore(store).get(name, version)
    options = RuntimeOptions()
    idle = _status_mb("VmRSS")
    with Path("/proc/self/clear_refs").open("w") as fh:
        fh.write("5")  # resets VmHWM to the current RSS
    started = time.perf_counter()
    size = stored.model_path.stat().st_size
    if mode.startswith("encrypted"):
        custom = stored.manifest.custom
        plaintext, _smoke = decrypt.open_version(
            stored.directory, name, version, custom, stored.manifest.model_file
        )
        held = decrypt.open_weights(stored.directory, name, version, custom)
        size += held.plaintext.size if held is not None else 0
        with plaintext:  # as validation does: the graph's buffer wiped once the session is built
            if mode == "encrypted":
                options = dataclasses.replace(options, weights=held)
                session: Any = load_session(stored.model_path, "onnx", options, plaintext.data)
            else:  # encrypted-prepacked: the same, ONNX Runtime's pre-packing left on
                session = _prepacked(plaintext.data, held)
        held = None  # the session keeps it
    else:
        session = load_session(stored.model_path, "onnx", options)
    seconds = time.perf_counter() - started
    doc = {
        "idle_mb": idle,
        "peak_mb": _status_mb("VmHWM"),
        "after_mb": _status_mb("VmRSS"),
        "size_mb": size / 2**20,
        "seconds": seconds,
        "infer_ms": _infer_ms(session),
    }
    session.close()
    print(json.dumps(doc))


def _prepacked(graph: bytes, held: Any) -> Any:
    """ONNX Runtime over the split weights as the agent builds it, pre-packing on."""
    import onnxruntime as ort

    from agent.models.onnx import OnnxSession

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.enable_cpu_mem_arena = False
    names = list(held.arrays)
    values = [ort.OrtValue.ortvalue_from_numpy(held.arrays[n]) for n in names]
    so.add_external_initializers(names, values)
    for n, v in zip(names, values, strict=True):
        so.add_initializer(n, v)
    inner = ort.InferenceSession(graph, so, providers=["CPUExecutionProvider"])
    inner._model_bytes = None
    session = OnnxSession.__new__(OnnxSession)
    session._session, session._weights = inner, (held, values)
    session._output_names = [o.name for o in inner.get_outputs()]
    session.path = Path("prepacked")
    session._inputs = ()
    return session


def _infer_ms(session: Any, runs: int = 20) -> float:
    """Median milliseconds of one inference on a one-row input."""
    import numpy as np

    spec = session._session.get_inputs()[0]
    x = np.random.default_rng(0).standard_normal((1, spec.shape[1])).astype(np.float32)
    session.run({spec.name: x})
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        session.run({spec.name: x})
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def enrol_device(repo: object, keys: Path, device_id: str = "bench") -> None:
    """A device key pair in ``keys``, enrolled in ``repo`` as ``device_id``."""
    from agent.confidential import identity
    from cloud_stub import enroll

    public = identity.ensure(keys)
    assert public is not None
    root = repo.root  # type: ignore[attr-defined]
    enroll.enroll(root, device_id, base64.b64encode(public).decode())


def compare(
    work: Path,
    runs: int,
    make_updater: Callable[[Path, str, Path | None], object],
) -> tuple[list[float], list[float], list[float], list[float], dict[str, list[float]]]:
    """Interleaved, the order alternated: the clear model's cycle, the encrypted one's + decryption.

    ``runs`` pairs, rounded up to an even number so that each kind goes first in as many
    pairs as the other (an odd count let the clear one go first once more).
    ``make_updater(device_dir, model, identity_dir)`` builds a ModelUpdater for one model.
    Returns the wall times of the clear, the encrypted (download + decryption) and of the
    decryption alone, of zeroing the weights buffer afterwards (the agent does that when the
    session is unloaded: timed apart, not counted), and the CPU times.
    """
    from agent.confidential import decrypt

    clear, sealed, decrypting, wiping = [], [], [], []
    cpu: dict[str, list[float]] = {"clear": [], "encrypted": []}
    pairs = runs + runs % 2
    for i in range(pairs):
        order = ("clear", "encrypted") if i % 2 == 0 else ("encrypted", "clear")
        for kind in order:  # alternated: neither always runs second
            device = work / f"dev-{kind}-{i}"
            keys = device / "identity"
            shutil.copytree(work / "identity", keys)
            updater: object = make_updater(device, "big" if kind == "clear" else "bigenc", keys)
            started, cpu_started = time.perf_counter(), _cpu()
            report = updater.check_once()  # type: ignore[attr-defined]
            assert report.installed, report.error
            if kind == "clear":
                clear.append(time.perf_counter() - started)
                cpu["clear"].append(_cpu() - cpu_started)
            else:
                at = time.perf_counter()
                from agent.models.store import ModelStore

                stored = ModelStore(device / "models").get("bigenc", 1)
                custom = stored.manifest.custom
                plaintext, _ = decrypt.open_version(
                    stored.directory, "bigenc", 1, custom, "model.onnx"
                )
                held = decrypt.open_weights(stored.directory, "bigenc", 1, custom)
                assert held is not None  # split: the graph, then its weights
                plaintext.wipe()  # validation wipes the graph once the session is built
                now = time.perf_counter()
                decrypting.append(now - at)
                sealed.append(now - started)
                cpu["encrypted"].append(_cpu() - cpu_started)
                held.plaintext.wipe()  # the weights live as long as the session: at unload
                wiping.append(time.perf_counter() - now)
            if i < pairs - 1:
                shutil.rmtree(device)
    return clear, sealed, decrypting, wiping, cpu


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


RSS_MODES = ("clear", "encrypted", "encrypted-prepacked")


def rss_runs(work: Path, runs: int) -> dict[str, list[dict[str, float]]]:
    """Each load in a fresh process, clear and encrypted interleaved (the stores of the
    last devices ``compare`` left)."""
    found: dict[str, list[dict[str, float]]] = {m: [] for m in RSS_MODES}
    for _ in range(runs):
        for mode in RSS_MODES:
            kind, name = ("clear", "big") if mode == "clear" else ("encrypted", "bigenc")
            store = work / f"dev-{kind}-{runs + runs % 2 - 1}" / "models"
            done = subprocess.run(
                [sys.executable, __file__, "rss", str(store), name, "1", mode],
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, "ORT_DISABLE_TELEMETRY": "1"},
            )
            found[mode].append(json.loads(done.stdout.strip().splitlines()[-1]))
    return found


def report(
    clear: list[float],
    sealed: list[float],
    decrypting: list[float],
    wiping: list[float],
    cpu: dict[str, list[float]],
    rss: dict[str, list[dict[str, float]]],
) -> None:
    c, s, d = statistics.median(clear), statistics.median(sealed), statistics.median(decrypting)
    cc, cs = statistics.median(cpu["clear"]), statistics.median(cpu["encrypted"])
    print("encrypted model (issue 14), the same bytes published in clear and encrypted:")
    print(f"  update cycle, model in clear                 {c:6.3f} s wall  {cc:6.3f} s CPU")
    print(f"  update cycle + decryption into memory        {s:6.3f} s wall  {cs:6.3f} s CPU")
    wipe = statistics.median(wiping)
    print(f"  (decryption alone {d:.3f} s wall; zeroing the weights at unload {wipe:.3f} s)")
    ratios = sorted(b / a for a, b in zip(clear, sealed, strict=True))
    print(
        f"  ratio (encrypted / clear): {s / c:.2f}x of the medians, per pair "
        f"{', '.join(f'{r:.2f}' for r in ratios)} (median {statistics.median(ratios):.2f}x; "
        f"bar: <= 1.2x); CPU {cs / cc:.2f}x; {len(ratios)} pairs"
    )
    alone = sorted(
        (b - d) / a for a, b, d in zip(clear, sealed, decrypting, strict=True)
    )  # the same pair's cycles: is the encrypted download itself slower?
    print(
        f"  the encrypted cycle alone / the clear one, per pair: "
        f"{', '.join(f'{r:.2f}' for r in alone)} (median {statistics.median(alone):.2f}x)"
    )
    print(f"  (with the zeroing at unload counted too: {(s + wipe) / c:.2f}x)")
    print("  load, each in a fresh process, interleaved (encrypted: graph + weights in place):")
    for mode in RSS_MODES:
        rows = rss[mode]
        size = rows[0]["size_mb"]
        above = statistics.median(r["peak_mb"] - r["idle_mb"] for r in rows)
        after = statistics.median(r["after_mb"] - r["idle_mb"] for r in rows)
        infer = statistics.median(r["infer_ms"] for r in rows)
        bar = 2 * size + 64
        print(
            f"  {mode:19}: peak {above:6.1f} MB above idle, {after:6.1f} MB after "
            f"(bar 2 x {size:.1f} + 64 = {bar:.1f} MB); inference {infer:6.2f} ms"
        )


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "rss":
    rss_child(Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5])
