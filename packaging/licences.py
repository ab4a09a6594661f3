"""Writes /usr/share/doc/edge-agent/copyright: the agent's licence and every bundled wheel's.

    python packaging/licences.py WHEELHOUSE > copyright

Each wheel's licence is named from its own metadata (License-Expression, else a one-line
License field, else its "License ::" classifiers), and the licence texts it carries are copied
in. A wheel whose metadata names no licence fails the build: the file must be complete.
"""

from __future__ import annotations

import email.parser
import re
import sys
import zipfile
from dataclasses import dataclass
from email.message import Message
from pathlib import Path

# A licence text inside a wheel: in its .dist-info, or beside its top-level package.
TEXT = re.compile(r"(^|/)(LICEN[CS]E|COPYING|NOTICE|ThirdPartyNotices)[^/]*$", re.IGNORECASE)
COMMON = {"Apache-2.0": "/usr/share/common-licenses/Apache-2.0"}
# Full texts of licences every Debian system has in /usr/share/common-licenses (base-files):
# Debian policy 12.5 wants a reference there instead of another copy. Each pattern spans the
# title and the terms, up to their last sentence (and "END OF TERMS AND CONDITIONS" where a
# copy has it); what a wheel adds around them (copyright lines, appendix) stays.
IN_COMMON_LICENCES = (
    (
        re.compile(
            r"(?:Apache License\s*(?:Version 2\.0, January 2004\s*)?"
            r"(?:https?://www\.apache\.org/licenses/?\s*)?)?"
            r"TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION"
            r".*?additional\s+liability\.(?:\s*END OF TERMS AND CONDITIONS)?",
            re.S,
        ),
        lambda _: "[the Apache License 2.0: /usr/share/common-licenses/Apache-2.0]",
    ),
    (
        re.compile(
            r"GNU GENERAL PUBLIC LICENSE\s+Version ([23]),.*?END OF TERMS AND CONDITIONS", re.S
        ),
        lambda m: (
            f"[the GNU General Public License version {m.group(1)}: "
            f"/usr/share/common-licenses/GPL-{m.group(1)}]"
        ),
    ),
)
SELF = "edge-agent"


class LicenceError(Exception):
    """A wheel says nothing about its licence, or is not a wheel."""


@dataclass(frozen=True, slots=True)
class Bundled:
    """One wheel: project, version, the licence it names, and the texts it carries."""

    project: str
    version: str
    licence: str
    texts: tuple[tuple[str, str], ...]  # (path in the wheel, text)


def licence_of(metadata: Message, wheel: str) -> str:
    """The licence a wheel's METADATA names.

    Raises:
        LicenceError: it names none.
    """
    expression = (metadata.get("License-Expression") or "").strip()
    if expression:
        return expression
    field = (metadata.get("License") or "").strip()
    if field and "\n" not in field and len(field) <= 100:
        return field
    classifiers = [
        c.split("::")[-1].strip()
        for c in metadata.get_all("Classifier") or []
        if c.startswith("License ::")
    ]
    if classifiers:
        return " / ".join(classifiers)
    raise LicenceError(f"{wheel}: its metadata names no licence (License-Expression, License)")


def licence_texts(names: list[str]) -> list[str]:
    """The licence files of a wheel, given its member names: those in .dist-info, else those
    at the top of its packages (onnxruntime keeps LICENSE and ThirdPartyNotices.txt there)."""
    files = [n for n in names if not n.endswith("/") and TEXT.search(n)]
    in_dist_info = [n for n in files if ".dist-info/" in n]
    if in_dist_info:
        return sorted(in_dist_info)
    return sorted(n for n in files if n.count("/") == 1)


def shorten_common(text: str) -> str:
    """``text`` with each full text of a licence in /usr/share/common-licenses replaced by a
    reference to it."""
    for pattern, reference in IN_COMMON_LICENCES:
        text = pattern.sub(reference, text)
    return text


def read_wheel(path: Path) -> Bundled:
    """Raises LicenceError: not a wheel, or no licence named."""
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise LicenceError(f"{path.name}: not a wheel ({exc})") from None
    with archive:
        names = archive.namelist()
        metadata_name = next((n for n in names if n.endswith(".dist-info/METADATA")), None)
        if metadata_name is None:
            raise LicenceError(f"{path.name}: no .dist-info/METADATA")
        metadata = email.parser.BytesParser().parsebytes(archive.read(metadata_name))
        texts = tuple(
            (name, shorten_common(archive.read(name).decode("utf-8", errors="replace")))
            for name in licence_texts(names)
        )
    return Bundled(
        project=str(metadata["Name"]),
        version=str(metadata["Version"]),
        licence=licence_of(metadata, path.name),
        texts=texts,
    )


def render(bundled: list[Bundled]) -> str:
    """The copyright file (free-form: the wheels' own words, not a DEP-5 summary)."""
    own = next((b for b in bundled if b.project == SELF), None)
    wheels = sorted((b for b in bundled if b.project != SELF), key=lambda b: b.project.lower())
    lines = [
        "edge-agent: verified model delivery and local inference for edge devices.",
        "",
        "The package carries edge-agent and the Python wheels it depends on, in",
        "/opt/edge-agent/wheelhouse; its postinst installs them into /opt/edge-agent/venv.",
        "",
    ]
    if own is not None:
        where = COMMON.get(own.licence)
        lines += [
            f"edge-agent {own.version}",
            "Copyright: edge-agent developers",
            f"License: {own.licence}" + (f" (full text: {where})" if where else ""),
            "",
        ]
    width = max((len(b.project) + len(b.version) + 1 for b in wheels), default=0)
    lines += ["Bundled wheels and the licences their metadata names:", ""]
    for b in wheels:
        lines.append(f"  {f'{b.project} {b.version}':<{width}}  {b.licence}")
    lines += [
        "",
        "The licence texts each wheel carries follow, as it carries them, except that the",
        "full terms of the Apache License 2.0 and the GNU GPL 2 and 3 are referred to in",
        "/usr/share/common-licenses. A wheel that carries no text is listed with the",
        "licence its metadata names.",
    ]
    for b in wheels:
        lines += ["", "=" * 78, f"{b.project} {b.version}: {b.licence}", "=" * 78]
        if not b.texts:
            lines += ["", "(the wheel carries no licence text)"]
        for name, text in b.texts:
            lines += ["", f"--- {name} ---", "", text.rstrip()]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: licences.py WHEELHOUSE", file=sys.stderr)
        return 2
    wheels = sorted(Path(argv[0]).glob("*.whl"))
    if not wheels:
        print(f"licences.py: no wheels in {argv[0]}", file=sys.stderr)
        return 1
    try:
        bundled = [read_wheel(w) for w in wheels]
    except LicenceError as exc:
        print(f"licences.py: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(render(bundled))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
