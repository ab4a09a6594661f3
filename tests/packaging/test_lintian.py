"""The built .deb through Debian's own checker, and what /usr/share/doc/edge-agent holds.

lintian's errors are defects, except those about files in /opt: the agent's virtualenv and
wheelhouse live there on purpose (an add-on package, Filesystem Hierarchy Standard 3.13).
"""

from __future__ import annotations

import gzip
import importlib.util
import re
import shutil
import subprocess
import sys
import zipfile
from email.message import Message
from pathlib import Path
from types import ModuleType

import pytest

from .debs import TOP, build

ALLOWED_ERRORS = {"dir-or-file-in-opt"}


def _licences() -> ModuleType:
    """packaging/licences.py, the build's script (packaging/ is no Python package)."""
    spec = importlib.util.spec_from_file_location("licences", TOP / "packaging" / "licences.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["licences"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


licences = _licences()


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build("amd64", tmp_path_factory.mktemp("deb"))


def lintian_tags(deb: Path) -> list[tuple[str, str, str]]:
    """(severity letter, tag, detail) of every tag lintian reports, informational included."""
    assert shutil.which("lintian"), "lintian missing: make system-deps"
    result = subprocess.run(
        ["lintian", "--display-info", "--tag-display-limit", "0", str(deb)],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    tags = re.findall(r"^([EWIPX]): edge-agent(?: \w+)?: (\S+)[ \t]*(.*)$", result.stdout, re.M)
    # Its exit status does not tell errors found from a failed run: every run here has tags
    # (dir-or-file-in-opt at least), a failed one has none.
    assert tags, result.stdout[-2000:] + result.stderr[-2000:]
    return tags


def test_lintian_finds_no_error_but_files_in_opt(deb: Path) -> None:
    tags = lintian_tags(deb)
    errors = [t for t in tags if t[0] == "E" and t[1] not in ALLOWED_ERRORS]
    assert errors == [], errors
    assert any(t[1] == "dir-or-file-in-opt" for t in tags)  # lintian did look at the files


def test_doc_carries_copyright_of_every_wheel_and_the_changelog(deb: Path, tmp_path: Path) -> None:
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp_path)], check=True)
    doc = tmp_path / "usr/share/doc/edge-agent"
    copyright_text = (doc / "copyright").read_text()
    wheels = sorted((tmp_path / "opt/edge-agent/wheelhouse").glob("*.whl"))
    assert len(wheels) > 10
    for wheel in wheels:
        bundled = licences.read_wheel(wheel)
        listed = re.search(
            rf"^  {re.escape(bundled.project)} {re.escape(bundled.version)}\s+(.+)$",
            copyright_text,
            re.M,
        )
        if bundled.project == "edge-agent":
            assert "License: Apache-2.0" in copyright_text
            continue
        assert listed is not None, f"{wheel.name} is not listed"
        assert listed.group(1) == bundled.licence
        for name, _ in bundled.texts:
            assert f"--- {name} ---" in copyright_text, name
    assert "onnxruntime/ThirdPartyNotices.txt" in copyright_text  # texts outside .dist-info too
    changelog = gzip.decompress((doc / "changelog.gz").read_bytes()).decode()
    version = subprocess.run(
        ["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert changelog.startswith(f"edge-agent ({version}) ")


def metadata(**fields: str | list[str]) -> Message:
    message = Message()
    for key, value in fields.items():
        for item in value if isinstance(value, list) else [value]:
            message[key.replace("_", "-")] = item
    return message


def test_licence_named_by_expression_field_or_classifiers() -> None:
    name = licences.licence_of
    assert name(metadata(License_Expression="MIT OR Apache-2.0", License="x"), "w") == (
        "MIT OR Apache-2.0"
    )
    assert name(metadata(License="BSD-3-Clause"), "w") == "BSD-3-Clause"
    classified = metadata(
        License="Copyright (c) 2001\nall of the licence's text, not a name",
        Classifier=["Programming Language :: Python", "License :: OSI Approved :: MIT License"],
    )
    assert name(classified, "w") == "MIT License"
    with pytest.raises(licences.LicenceError, match=r"w-1\.0\.whl: its metadata names no licence"):
        name(metadata(Classifier="Programming Language :: Python"), "w-1.0.whl")


def test_licence_texts_in_dist_info_else_beside_the_package() -> None:
    texts = licences.licence_texts
    names = ["p-1.dist-info/METADATA", "p-1.dist-info/licenses/LICENSE", "p/LICENSE", "p/x.py"]
    assert texts(names) == ["p-1.dist-info/licenses/LICENSE"]
    assert texts(["q/LICENSE", "q/ThirdPartyNotices.txt", "q/sub/COPYING", "q/a.py"]) == [
        "q/LICENSE",
        "q/ThirdPartyNotices.txt",
    ]


def test_a_wheel_without_a_licence_fails_the_copyright(tmp_path: Path) -> None:
    wheel = tmp_path / "anon-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("anon-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: anon\n")
    out = subprocess.run(
        [sys.executable, str(TOP / "packaging" / "licences.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 1
    assert "anon-1.0-py3-none-any.whl: its metadata names no licence" in out.stderr


def test_full_common_licences_become_references() -> None:
    apache = (
        "Copyright 2024 Someone\n\n                                 Apache License\n"
        "                           Version 2.0, January 2004\n\n"
        "   TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION\n   …\n"
        "   of your accepting any such warranty or additional\n   liability.\n\n"
        "   END OF TERMS AND CONDITIONS\n\n   APPENDIX: How to apply\n"
    )
    assert licences.shorten_common(apache) == (
        "Copyright 2024 Someone\n\n                                 "
        "[the Apache License 2.0: /usr/share/common-licenses/Apache-2.0]\n\n"
        "   APPENDIX: How to apply\n"
    )
    gpl = (
        "x\nGNU GENERAL PUBLIC LICENSE\n   Version 3, 29 June 2007\n…\nEND OF TERMS AND CONDITIONS"
    )
    assert licences.shorten_common(gpl) == (
        "x\n[the GNU General Public License version 3: /usr/share/common-licenses/GPL-3]"
    )
    # A copy without its title or its closing line (onnxruntime's notices have both kinds).
    bare = (
        "x\nTERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION\n…additional liability.\ny"
    )
    assert licences.shorten_common(bare) == (
        "x\n[the Apache License 2.0: /usr/share/common-licenses/Apache-2.0]\ny"
    )
    mit = "MIT License\n\nCopyright (c) 2020\n\nPermission is hereby granted…"
    assert licences.shorten_common(mit) == mit
