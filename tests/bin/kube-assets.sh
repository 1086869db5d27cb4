#!/usr/bin/env bash
# Provides a real kube-apiserver, kube-controller-manager, etcd and a matching
# kubectl for the test harness and `keysmith dev`, following the envtest
# convention:
#
#   * if KUBEBUILDER_ASSETS is set, it must already hold the binaries; it is
#     printed back and nothing is built;
#   * otherwise the binaries are built once with Go from the Go module proxy,
#     at the releases pinned by the wrapper modules in tests/kube/ (go.mod and
#     go.sum are committed), and cached outside the work tree in
#     ${XDG_CACHE_HOME:-~/.cache}/keysmith/kube-<version>-<pin hash>.
#     A changed pin (go.mod, go.sum, or this script's BUILD_REVISION) is a
#     new directory, so it is rebuilt; an unchanged one never is. Builds of
#     other pins are left alone (another checkout may use them) and named,
#     so they can be removed by hand.
#
# Usage: kube-assets.sh [MINOR]   MINOR is a directory of tests/kube (1.37, the
# newest, by default; or $KEYSMITH_KUBE_VERSION). On success the last line on
# stdout is the assets directory; progress goes to stderr.
#
# Needs Go (the version named by the go lines of tests/kube/*/go.mod, or newer)
# on PATH or in /usr/local/go/bin, and the Go module proxy.
set -euo pipefail

NEWEST=1.37
# Bump to force a rebuild when something other than a pin changes the build.
BUILD_REVISION=1

log() { echo "kube-assets: $*" >&2; }

if [ -n "${KUBEBUILDER_ASSETS:-}" ]; then
  for bin in kube-apiserver etcd; do
    [ -x "$KUBEBUILDER_ASSETS/$bin" ] || { log "KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS has no executable $bin"; exit 1; }
  done
  echo "$KUBEBUILDER_ASSETS"
  exit 0
fi

here="$(cd "$(dirname "$0")/.." && pwd)"
minor="${1:-${KEYSMITH_KUBE_VERSION:-$NEWEST}}"
kube_mod="$here/kube/$minor"
etcd_mod="$here/kube/etcd"
if [ ! -f "$kube_mod/go.mod" ]; then
  log "no pinned Kubernetes $minor: pins are $(cd "$here/kube" && ls -d 1.* | paste -sd' ')"
  exit 2
fi
pinned() { # $1: module, $2: go.mod; prints the required version without its v
  sed -nE "s#^(require)?[[:space:]]*$1 v([0-9][^[:space:]]*).*#\\2#p" "$2" | head -n 1
}
kube_version=$(pinned k8s.io/kubernetes "$kube_mod/go.mod")
etcd_version=$(pinned go.etcd.io/etcd/server/v3 "$etcd_mod/go.mod")
[ -n "$kube_version" ] && [ -n "$etcd_version" ] || { log "cannot read the pinned versions from $kube_mod/go.mod and $etcd_mod/go.mod"; exit 2; }
pin=$(cat "$kube_mod/go.mod" "$kube_mod/go.sum" "$etcd_mod/go.mod" "$etcd_mod/go.sum" "$etcd_mod/main.go" \
  <(echo "$BUILD_REVISION") | sha256sum | cut -c1-12)
cache="${XDG_CACHE_HOME:-$HOME/.cache}/keysmith"
dest="$cache/kube-$kube_version-$pin"

complete() {
  [ -x "$dest/kube-apiserver" ] && [ -x "$dest/kube-controller-manager" ] && [ -x "$dest/kubectl" ] && [ -x "$dest/etcd" ]
}
if complete; then
  echo "$dest"
  exit 0
fi

mkdir -p "$(dirname "$dest")"
# One builder at a time: parallel test binaries may all ask at once.
exec 9>"$dest.lock"
if ! flock -n 9; then
  log "another build of $dest is running; waiting for it"
  flock 9
fi
if complete; then
  echo "$dest"
  exit 0
fi

# Go: the one on PATH if new enough, else /usr/local/go (where the official
# tarball installs), never a download of another toolchain.
need_go=$(awk '$1 == "go" { print $2 }' "$kube_mod/go.mod" "$etcd_mod/go.mod" | sort -V | tail -n 1)
go_ok() { # $1: a go binary
  local have
  have=$("$1" env GOVERSION 2>/dev/null | sed 's/^go//') || return 1
  [ -n "$have" ] && [ "$(printf '%s\n%s\n' "$need_go" "$have" | sort -V | head -n 1)" = "$need_go" ]
}
go_bin=
for candidate in "$(command -v go || true)" /usr/local/go/bin/go; do
  if [ -n "$candidate" ] && [ -x "$candidate" ] && go_ok "$candidate"; then go_bin="$candidate"; break; fi
done
if [ -z "$go_bin" ]; then
  log "Go $need_go or newer is needed to build the control plane (found: $(go version 2>/dev/null || echo none));"
  log "install it, or point KUBEBUILDER_ASSETS at a directory holding kube-apiserver, kube-controller-manager and etcd"
  exit 1
fi
export GOTOOLCHAIN=local GOFLAGS=-mod=readonly CGO_ENABLED=0

work="$(mktemp -d "${TMPDIR:-/tmp}/keysmith-kube-build.XXXXXX")"
watcher=
trap '[ -n "$watcher" ] && kill "$watcher" 2>/dev/null; rm -rf "$work"' EXIT

# Runs "$@", saying every 30 s (KEYSMITH_PROGRESS_SECONDS) that it is still
# working, so a first build is never minutes of silence. The watcher holds
# neither stdout (which callers read to the end) nor the lock.
with_progress() { # $1: what is being built; rest: the command
  local what=$1 started=$SECONDS
  shift
  log "building $what"
  (
    sleeper=
    trap '[ -n "$sleeper" ] && kill "$sleeper" 2>/dev/null; exit 0' TERM
    while :; do
      sleep "${KEYSMITH_PROGRESS_SECONDS:-30}" &
      sleeper=$!
      wait "$sleeper"
      log "still building $what ($((SECONDS - started))s so far)"
    done
  ) >/dev/null 9>&- &
  watcher=$!
  local status=0
  "$@" >"$work/build.log" 2>&1 || status=$?
  kill "$watcher" 2>/dev/null || true
  wait "$watcher" 2>/dev/null || true
  watcher=
  if [ "$status" -ne 0 ]; then
    log "building $what failed; its output:"
    cat "$work/build.log" >&2
    exit "$status"
  fi
  log "built $what in $((SECONDS - started))s"
}

log "first use of this control plane: building Kubernetes $kube_version (kube-apiserver, kube-controller-manager,"
log "kubectl) and etcd $etcd_version with $("$go_bin" version | cut -d' ' -f3) from the Go module proxy into $dest."
log "This takes about 5 to 10 minutes on 2 cores, once; later runs reuse it."

IFS=. read -r major minor_n _ <<<"$kube_version"
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=v$kube_version -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor_n"
  ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done
mkdir -p "$work/out"
with_progress "kube-apiserver, kube-controller-manager and kubectl $kube_version" \
  env -C "$kube_mod" "$go_bin" build -trimpath -ldflags "$ldflags" -o "$work/out/" \
  k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kubectl
with_progress "etcd $etcd_version" \
  env -C "$etcd_mod" "$go_bin" build -trimpath -ldflags "-s -w" -o "$work/out/etcd" .

rm -rf "$dest.tmp"
mkdir -p "$dest.tmp"
cp -a "$work/out/." "$dest.tmp/"
rm -rf "$dest"
mv "$dest.tmp" "$dest"
# Builds of other pins of this release stay: another checkout may use them.
for other in "$cache/kube-$major.$minor_n".*-*; do
  case "$other" in "$dest" | *.lock | *.tmp) continue ;; esac
  [ -d "$other" ] && log "another pin's build is still cached (remove it if no checkout uses it): $other"
done
log "ready: $dest"
echo "$dest"
