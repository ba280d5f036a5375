#!/usr/bin/env bash
# Builds the test suite's Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager,
# kubectl: one binary from scripts/testcluster, linked under each name) and Helm, from their Go
# modules at pinned versions, once: the binaries are cached by version under
# ${TRELLIS_TESTCLUSTER_CACHE:-~/.cache/trellis/testcluster}. Prints the directory that holds them.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# Go as the toolchain image installs it, when it is not on PATH.
command -v go >/dev/null || export PATH="$PATH:/usr/local/go/bin"

kube_version=$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v/ {print $2; exit}' "$here/testcluster/go.mod")
helm_version=v3.21.4
minor=$(echo "$kube_version" | cut -d. -f2)
# The components report the version they were built from (as a release build does).
ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$kube_version -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/client-go/pkg/version.gitVersion=$kube_version"
helm_ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$helm_version"
# The module file, main.go and the flags are the cache key: a change to any rebuilds.
key=$( (cat "$here/testcluster/go.mod" "$here/testcluster/main.go"; echo "$ldflags $helm_ldflags") | sha256sum | cut -c1-12)
cache="${TRELLIS_TESTCLUSTER_CACHE:-$HOME/.cache/trellis/testcluster}"
dir="$cache/$kube_version-$key"

if [ ! -x "$dir/testcluster" ]; then
  echo "building the test cluster ($kube_version: etcd, kube-apiserver, kube-controller-manager, kubectl) into $dir" >&2
  mkdir -p "$dir"
  (cd "$here/testcluster" && go build -buildvcs=false -trimpath -ldflags="$ldflags" -o "$dir/testcluster.tmp" .)
  mv "$dir/testcluster.tmp" "$dir/testcluster"
fi
for name in etcd kube-apiserver kube-controller-manager kubectl; do
  ln -sf testcluster "$dir/$name"
done
if [ ! -x "$dir/helm" ]; then
  echo "building helm $helm_version into $dir" >&2
  GOBIN="$dir/helm.bin" go install -trimpath -ldflags="$helm_ldflags" "helm.sh/helm/v3/cmd/helm@$helm_version"
  mv "$dir/helm.bin/helm" "$dir/helm" && rmdir "$dir/helm.bin"
fi
# Builds of other versions or flags are not used any more.
for old in "$cache"/*; do
  [ "$old" = "$dir" ] || [ ! -d "$old" ] || rm -rf "$old"
done
echo "$dir"
