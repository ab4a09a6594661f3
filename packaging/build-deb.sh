#!/usr/bin/env bash
# Build edge-agent_VERSION_ARCH.deb: the agent as a wheel, a wheelhouse of its dependencies
# for the target architecture (fetched here with pip's --platform, so the device needs no
# network), the systemd units, sysusers/tmpfiles, the configuration as a conffile, and in
# /usr/share/doc/edge-agent the changelog and a copyright file naming every wheel's licence.
#   packaging/build-deb.sh amd64|arm64 [OUTDIR]
set -euo pipefail
arch=${1:?usage: build-deb.sh amd64|arm64 [OUTDIR]}
top=$(cd "$(dirname "$0")/.." && pwd)
out=${2:-$top/build}
python=${PYTHON:-$top/.venv/bin/python}
case "$arch" in
  amd64) machine=x86_64 ;;
  arm64) machine=aarch64 ;;
  *) echo "unknown architecture $arch (amd64 or arm64)" >&2; exit 2 ;;
esac
version=$("$python" -c 'import tomllib;print(tomllib.load(open("'"$top"'/pyproject.toml","rb"))["project"]["version"])')
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
root=$stage/root
wheels=$root/opt/edge-agent/wheelhouse
mkdir -p "$wheels" "$root/DEBIAN" "$root/lib/systemd/system" "$root/usr/lib/sysusers.d" \
         "$root/usr/lib/tmpfiles.d" "$root/etc/edge-agent" "$root/opt/edge-agent/bin" \
         "$root/usr/share/doc/edge-agent"

"$python" -m pip wheel -q --no-deps --no-build-isolation -w "$wheels" "$top" 2>/dev/null \
  || "$python" -m pip wheel -q --no-deps -w "$wheels" "$top"
platforms=()
for tag in manylinux2014 manylinux_2_17 manylinux_2_27 manylinux_2_28 manylinux_2_31 manylinux_2_34; do
  platforms+=(--platform "${tag}_${machine}")
done
# Every tag the device's glibc (Debian 12: 2.36) accepts must be named: pip does not widen.
# With the [grpc] extra (grpcio and protobuf: 7.7 MB of wheels on amd64, 7.5 on arm64), which
# postinst installs too: a device turns gRPC on by configuration alone, and its idle memory
# does not grow, since nothing imports grpcio unless [serving] grpc_socket/grpc_tcp is set.
download=("$python" -m pip download -q --dest "$wheels" --only-binary=:all:
  --python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none
  "${platforms[@]}" "$wheels/edge_agent-$version-py3-none-any.whl[grpc]")
# WHEEL_CACHE (optional, a directory): the wheels come from it without the network when it
# has all of them, else from the index, and are then kept there for the next build.
if [ -n "${WHEEL_CACHE:-}" ] && [ -d "$WHEEL_CACHE" ] \
    && "${download[@]}" --no-index --find-links "$WHEEL_CACHE" 2>/dev/null; then
  :
else
  "${download[@]}"
  if [ -n "${WHEEL_CACHE:-}" ]; then
    mkdir -p "$WHEEL_CACHE"
    for wheel in "$wheels"/*.whl; do  # each appears whole: builds may share the cache
      name=$(basename "$wheel")
      case "$name" in edge_agent-*) continue ;; esac
      [ -e "$WHEEL_CACHE/$name" ] && continue
      cp "$wheel" "$WHEEL_CACHE/.$name.$$" && mv -f "$WHEEL_CACHE/.$name.$$" "$WHEEL_CACHE/$name"
    done
  fi
fi

install -m 0644 "$top/systemd/edge-agent.service" "$top/systemd/edge-agent.socket" "$root/lib/systemd/system/"
install -m 0644 "$top/systemd/edge-agent.sysusers" "$root/usr/lib/sysusers.d/edge-agent.conf"
install -m 0644 "$top/systemd/edge-agent.tmpfiles" "$root/usr/lib/tmpfiles.d/edge-agent.conf"
install -m 0644 "$top/systemd/agent.toml.example" "$root/etc/edge-agent/agent.toml"
install -m 0644 "$top/README.md" "$root/usr/share/doc/edge-agent/README.md"
"$python" "$top/packaging/licences.py" "$wheels" > "$root/usr/share/doc/edge-agent/copyright"
chmod 0644 "$root/usr/share/doc/edge-agent/copyright"
# A native package (no Debian revision): changelog.gz, its newest entry for this version.
changelog=$top/packaging/debian/changelog
logged=$(sed -n '1s/^edge-agent (\([^)]*\)).*/\1/p' "$changelog")
if [ "$logged" != "$version" ]; then
  echo "packaging/debian/changelog: the newest entry is for ${logged:-nothing}, the package is $version" >&2
  exit 1
fi
gzip -9n < "$changelog" > "$root/usr/share/doc/edge-agent/changelog.gz"
ln -s ../venv/bin/edge-agent "$root/opt/edge-agent/bin/edge-agent"
for script in postinst prerm postrm; do
  install -m 0755 "$top/packaging/debian/$script" "$root/DEBIAN/$script"
done
echo /etc/edge-agent/agent.toml > "$root/DEBIAN/conffiles"
# dpkg --verify checks the installed files against these (conffiles have their own sums).
(cd "$root" && find . -path ./DEBIAN -prune -o -path ./etc -prune -o -type f -printf '%P\0' \
  | sort -z | xargs -0 md5sum) > "$root/DEBIAN/md5sums"
size=$(du -sk "$root" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@SIZE@/$size/" \
  "$top/packaging/debian/control.in" > "$root/DEBIAN/control"
mkdir -p "$out"
deb="$out/edge-agent_${version}_${arch}.deb"
# gzip, not xz: the payload is mostly wheels, zip files already compressed, so xz made the
# package 0.4-0.5 % smaller and took 18.5 of the build's 24 s (arm64; amd64 21 of 25 s);
# gzip takes about 2 s. Not zstd either (0.2 s): Debian 12's lintian rejects zstd members
# as a malformed archive (its dpkg reads them), and Debian's own packages use xz or gzip.
dpkg-deb --root-owner-group -Zgzip --build "$root" "$deb" >/dev/null
echo "$deb"
