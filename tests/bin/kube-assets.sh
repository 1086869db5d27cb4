#!/usr/bin/env bash
# Provides a real kube-apiserver, kube-controller-manager and etcd for the test
# harness and `keysmith dev`, following the envtest convention:
#
#   * if KUBEBUILDER_ASSETS is set, it must already hold the binaries; it is
#     printed back and nothing is built;
#   * otherwise the binaries are built once from Debian's `kubernetes` source
#     package (upstream 1.20.2 with vendor/) with Debian's Go toolchain, and
#     cached outside the work tree, in $KEYSMITH_ASSETS_DIR or
#     ${XDG_CACHE_HOME:-~/.cache}/keysmith/kube-1.20.2.
#
# On success the last line on stdout is the assets directory. Everything else
# goes to stderr. Installing packages needs root (CI and the dev machines run
# as root); without root, install golang-go, etcd-server, dpkg-dev and
# golang-github-modern-go-reflect2-dev yourself first.
set -euo pipefail

KUBE_VERSION=1.20.2
DEB_VERSION='1.20.5+really1.20.2-1.1+deb12u1'

log() { echo "kube-assets: $*" >&2; }

if [ -n "${KUBEBUILDER_ASSETS:-}" ]; then
  for bin in kube-apiserver etcd; do
    [ -x "$KUBEBUILDER_ASSETS/$bin" ] || { log "KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS has no executable $bin"; exit 1; }
  done
  echo "$KUBEBUILDER_ASSETS"
  exit 0
fi

dest="${KEYSMITH_ASSETS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/keysmith/kube-$KUBE_VERSION}"
complete() {
  [ -x "$dest/kube-apiserver" ] && [ -x "$dest/kube-controller-manager" ] && [ -x "$dest/etcd" ]
}
if complete; then
  echo "$dest"
  exit 0
fi

mkdir -p "$(dirname "$dest")"
# One builder at a time: parallel test binaries may all ask at once.
exec 9>"$dest.lock"
flock 9
if complete; then
  echo "$dest"
  exit 0
fi

need_pkgs=()
command -v go >/dev/null 2>&1 || need_pkgs+=(golang-go)
[ -x /usr/bin/etcd ] || need_pkgs+=(etcd-server)
command -v dpkg-source >/dev/null 2>&1 || need_pkgs+=(dpkg-dev)
[ -d /usr/share/gocode/src/github.com/modern-go/reflect2 ] || need_pkgs+=(golang-github-modern-go-reflect2-dev)
command -v rsync >/dev/null 2>&1 || need_pkgs+=(rsync)

src_list=/etc/apt/sources.list.d/keysmith-deb-src.sources
if ! apt-cache showsrc kubernetes 2>/dev/null | grep -q "^Version: $DEB_VERSION\$"; then
  if [ ! -f "$src_list" ]; then
    log "adding a deb-src entry ($src_list)"
    cat >"$src_list" <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  fi
  apt-get update -qq >&2
fi
if [ ${#need_pkgs[@]} -gt 0 ]; then
  log "installing ${need_pkgs[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >&2
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/keysmith-kube-build.XXXXXX")"
trap 'rm -rf "$work"' EXIT
log "fetching Debian source kubernetes=$DEB_VERSION"
(cd "$work" && apt-get source -qq --download-only "kubernetes=$DEB_VERSION" >&2 \
  && dpkg-source --no-check -x ./*.dsc src >&2)

export GOPATH="$work/gopath" GO111MODULE=off GOFLAGS= CGO_ENABLED=0 GOCACHE="$work/gocache"
mkdir -p "$GOPATH/src/k8s.io"
ln -s "$work/src" "$GOPATH/src/k8s.io/kubernetes"
cd "$GOPATH/src/k8s.io/kubernetes"

# Go >= 1.18 needs reflect2 >= 1.0.2; the vendored copy is older.
rm -rf vendor/github.com/modern-go/reflect2
cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 vendor/github.com/modern-go/reflect2

log "generating the OpenAPI definitions (not shipped in the tarball)"
go build -o "$work/openapi-gen" ./vendor/k8s.io/kube-openapi/cmd/openapi-gen
inputs=$(find ./staging/src/k8s.io/api ./staging/src/k8s.io/apimachinery ./staging/src/k8s.io/apiextensions-apiserver/pkg/apis \
  ./staging/src/k8s.io/kube-aggregator/pkg/apis ./pkg/apis ./staging/src/k8s.io/metrics/pkg/apis \
  ./staging/src/k8s.io/apiserver/pkg/apis ./staging/src/k8s.io/kube-proxy/config ./staging/src/k8s.io/kubelet/config \
  ./staging/src/k8s.io/kube-scheduler/config ./staging/src/k8s.io/kube-controller-manager/config \
  ./staging/src/k8s.io/cloud-provider/config ./staging/src/k8s.io/controller-manager/config ./pkg/kubelet/apis/config \
  ./staging/src/k8s.io/component-base/config \
  -name '*.go' -print0 2>/dev/null | xargs -0 grep -l '+k8s:openapi-gen=' | xargs -n1 dirname | sort -u \
  | sed 's#^\./staging/src/#k8s.io/kubernetes/vendor/#; s#^\./#k8s.io/kubernetes/#' | paste -sd, -)
"$work/openapi-gen" --input-dirs "$inputs,k8s.io/kubernetes/vendor/k8s.io/apimachinery/pkg/version,k8s.io/kubernetes/vendor/k8s.io/apimachinery/pkg/runtime,k8s.io/kubernetes/vendor/k8s.io/apimachinery/pkg/util/intstr,k8s.io/kubernetes/vendor/k8s.io/apimachinery/pkg/api/resource,k8s.io/kubernetes/vendor/k8s.io/apimachinery/pkg/apis/meta/v1" \
  --output-base "$GOPATH/src" --output-package k8s.io/kubernetes/pkg/generated/openapi \
  --output-file-base zz_generated.openapi --go-header-file hack/boilerplate/boilerplate.generatego.txt \
  --report-filename /dev/null >&2

ldflags=""
for pkg in k8s.io/kubernetes/vendor/k8s.io/component-base/version k8s.io/kubernetes/vendor/k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=v$KUBE_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=20"
  ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done
mkdir -p "$work/out"
for cmd in kube-apiserver kube-controller-manager; do
  log "building $cmd (a few minutes)"
  go build -trimpath -ldflags "-s -w $ldflags" -o "$work/out/$cmd" "./cmd/$cmd"
done
ln -sf /usr/bin/etcd "$work/out/etcd"

rm -rf "$dest.tmp"
mkdir -p "$dest.tmp"
cp -a "$work/out/." "$dest.tmp/"
rm -rf "$dest"
mv "$dest.tmp" "$dest"
log "ready: $dest"
echo "$dest"
