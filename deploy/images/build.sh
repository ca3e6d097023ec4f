#!/usr/bin/env bash
# Builds the release binaries and the three OCI images of the install (deploy/kubernetes), without
# a container daemon, then checks each image. As root (buildah's storage, chroot). CI runs it.
#
#   deploy/images/build.sh
#
# Images, written as OCI archives target/images/<name>.oci.tar, named localhost/<name>:<version>
# (the names deploy/kubernetes/overlays/default uses; the version is the workspace's):
#   ambient-ztunnel     ztunnel (entrypoint) + ambient-cni (the DaemonSet's init container runs
#                       it) + iproute2's `ip` (ztunnel installs its routing rule with it). Runs as
#                       root: loading and pinning eBPF needs uid 0 on the host's bpffs, with the
#                       capabilities the DaemonSet grants.
#   ambient-waypoint    waypoint, as user 65532:65532.
#   ambient-controller  ambient-controller, as user 65532:65532.
# Each is `scratch` plus its binaries (debug info stripped, symbols kept), exactly the shared
# libraries `ldd` lists for them with the dynamic loader, and /etc/passwd and /etc/group with
# root and nonroot (65532). No CA bundle: the binaries verify istiod and their peers against
# the mesh's roots only (and the API server against the cluster CA Kubernetes mounts).
#
# buildah runs with the vfs driver, its storage and run root under target/images/ (removed at
# the end), and chroot isolation. What buildah and skopeo write elsewhere (caches, network
# configuration, scratch files) goes to overlays private to the script's mount namespace: nothing
# outside the repository is touched.
# Each archive is then read back: `skopeo inspect` (user, entrypoint, architecture, labels),
# unpacked (skopeo copy to an OCI layout, umoci raw unpack), and its binaries run with
# `--version` inside the unpacked root file system (`chroot`, so with the image's own
# libraries, as the image's user). Any mismatch stops the script with the reason.
#
# To publish: skopeo copy oci-archive:target/images/ambient-ztunnel.oci.tar \
#               docker://<registry>/ambient-ztunnel:<version>
set -euo pipefail

say() { echo "images: $*"; }
fail() { echo "images: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || fail "needs root (buildah's storage and chroot into the built images): run it with sudo"
for tool in cargo buildah skopeo umoci ldd strip readelf python3 chroot git unshare mount; do
  command -v "$tool" >/dev/null || fail "$tool is missing: run deploy/setup.sh"
done
# Runs in a mount namespace of its own, so that the overlays of sandbox() below stay private.
if [ "${AMBIENT_IMAGES_NAMESPACE:-}" != 1 ]; then
  AMBIENT_IMAGES_NAMESPACE=1 exec unshare --mount --propagation private -- "$(readlink -f "$0")" "$@"
fi
cd "$(dirname "$0")/../.."

out=target/images
storage="$out/storage"
runroot="$out/run"
work=""
containers=()
buildah_() { buildah --root "$storage" --runroot "$runroot" --storage-driver vfs "$@"; }
sandboxed=()
cleanup() {
  local c dir
  for c in "${containers[@]}"; do buildah_ rm "$c" >/dev/null 2>&1 || true; done
  for dir in "${sandboxed[@]}"; do umount -l "$dir" || true; done
  sandboxed=()
  rm -rf "$storage" "$runroot"
  [ -z "$work" ] || rm -rf "$work"
}
# buildah and skopeo write outside their storage whatever their flags: a blob cache in
# /var/lib/containers, network configuration in /etc/containers and /run/containers, scratch
# files in /var/tmp. In this script's mount namespace those directories become overlays whose
# writes land in $work and are removed with it; the machine's own stay untouched.
sandbox() {
  local dir key
  for dir in /etc /var/lib /var/tmp /run; do
    key=${dir//\//_}
    mkdir -p "$work/sandbox/$key/upper" "$work/sandbox/$key/work"
    mount -t overlay overlay \
      -o "lowerdir=$dir,upperdir=$work/sandbox/$key/upper,workdir=$work/sandbox/$key/work" "$dir" \
      || fail "cannot put an overlay on $dir (needs overlayfs)"
    sandboxed+=("$dir")
  done
}
trap cleanup EXIT
export BUILDAH_ISOLATION=chroot

mkdir -p "$out"
# What a killed run may have left.
cleanup
rm -rf "$out"/work.*
work=$(mktemp -d "$out/work.XXXXXX")

version=$(cargo pkgid -p ztunnel | sed 's/.*[#@]//')
revision=$(git rev-parse HEAD)
[ -z "$(git status --porcelain --untracked-files=no)" ] || revision="$revision-dirty"
# The commit's time stamps the images (and their files), so a rebuild of a commit has the same
# image digest (the archive around it differs only in its own tar headers).
epoch=$(git log -1 --format=%ct)
case "$(uname -m)" in
  x86_64) arch=amd64 ;;
  aarch64) arch=arm64 ;;
  *) fail "unsupported machine $(uname -m)" ;;
esac

say "release build of ztunnel, waypoint, ambient-controller and ambient-cni"
start=$(date +%s)
# Packed relocations (common/build/hot_text.rs): the images carry this host's glibc (>= 2.36).
# Without the release profile's line tables: the images strip debug info anyway (symbols stay),
# and not generating and linking it shortens CI's clean build.
CARGO_PROFILE_RELEASE_DEBUG=false AMBIENT_PACK_RELOCS=1 cargo build --release --locked --bin ztunnel --bin waypoint --bin ambient-controller --bin ambient-cni
build_seconds=$(($(date +%s) - start))
say "release build took ${build_seconds}s"

# Copies binary $2 into root file system $1 at $3, with debug info stripped, and every shared
# library it needs (ldd's closure, the loader included) at its own path.
stage() {
  local root=$1 binary=$2 dest=$3 lib
  install -D -m 0755 "$binary" "$root$dest"
  strip --strip-debug "$root$dest"
  ldd "$binary" >"$work/ldd.txt" || fail "ldd $binary failed"
  if grep -q "not found" "$work/ldd.txt"; then
    cat "$work/ldd.txt" >&2
    fail "$binary needs a library this machine does not have"
  fi
  # "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" and "/lib64/ld-linux-x86-64.so.2 (0x...)"
  while read -r lib; do
    [ -e "$root$lib" ] || install -D -m 0755 "$(readlink -f "$lib")" "$root$lib"
  done < <(awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' "$work/ldd.txt")
}

# The accounts of every image: root, and nonroot for the images that run as 65532.
accounts() {
  local root=$1
  mkdir -p "$root/etc"
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$root/etc/passwd"
  printf 'root:x:0:\nnonroot:x:65532:\n' >"$root/etc/group"
  chmod 0644 "$root/etc/passwd" "$root/etc/group"
}

# build NAME USER ENTRYPOINT DESCRIPTION: commits the staged root $work/rootfs-NAME.
build() {
  local name=$1 user=$2 entrypoint=$3 description=$4 ctr archive="$out/$1.oci.tar"
  ctr=$(buildah_ from --name "build-$name" scratch)
  containers+=("$ctr")
  buildah_ copy --quiet "$ctr" "$work/rootfs-$name/" / >/dev/null
  buildah_ config \
    --entrypoint "[\"$entrypoint\"]" --cmd '' \
    --user "$user" --workingdir / --env PATH=/usr/local/bin:/usr/bin \
    --os linux --arch "$arch" \
    --label "org.opencontainers.image.title=$name" \
    --label "org.opencontainers.image.description=$description" \
    --label "org.opencontainers.image.version=$version" \
    --label "org.opencontainers.image.revision=$revision" \
    --label "org.opencontainers.image.licenses=Apache-2.0" \
    --created-by "deploy/images/build.sh" \
    "$ctr"
  rm -f "$archive"
  buildah_ commit --quiet --format oci --disable-compression=false --timestamp "$epoch" \
    "$ctr" "oci-archive:$archive:localhost/$name:$version" >/dev/null
  buildah_ rm "$ctr" >/dev/null
  say "built $archive"
}

sandbox
export TMPDIR="$work/tmp"
mkdir -p "$TMPDIR"

bin=target/release
root="$work/rootfs-ambient-ztunnel"
stage "$root" "$bin/ztunnel" /usr/local/bin/ztunnel
stage "$root" "$bin/ambient-cni" /usr/local/bin/ambient-cni
ip_path=$(command -v ip) || fail "iproute2's ip is missing: run deploy/setup.sh"
stage "$root" "$(readlink -f "$ip_path")" /usr/bin/ip
accounts "$root"
build ambient-ztunnel 0:0 /usr/local/bin/ztunnel "ztunnel, the L4 node proxy of the ambient mesh, and its CNI plugin"

root="$work/rootfs-ambient-waypoint"
stage "$root" "$bin/waypoint" /usr/local/bin/waypoint
accounts "$root"
build ambient-waypoint 65532:65532 /usr/local/bin/waypoint "waypoint, the L7 proxy of the ambient mesh"

root="$work/rootfs-ambient-controller"
stage "$root" "$bin/ambient-controller" /usr/local/bin/ambient-controller
accounts "$root"
build ambient-controller 65532:65532 /usr/local/bin/ambient-controller "the waypoint controller of the ambient mesh"

# check NAME USER ENTRYPOINT [OTHER-BINARY...]: reads the archive back and runs its binaries.
check() {
  local name=$1 user=$2 entrypoint=$3 archive="$out/$1.oci.tar" unpacked="$work/check-$1" b expected flag got loader
  shift 3
  skopeo inspect --config "oci-archive:$archive" >"$work/config.json" \
    || fail "$archive: skopeo cannot read it"
  python3 - "$work/config.json" "$name" "$user" "$entrypoint" "$arch" "$version" "$revision" <<'EOF' \
    || fail "$archive: its configuration is not what was built (above)"
import json, sys
path, name, user, entrypoint, arch, version, revision = sys.argv[1:]
config = json.load(open(path))
c = config.get("config", {})
labels = c.get("Labels") or {}
wrong = []
def expect(what, got, want):
    if got != want:
        wrong.append("%s is %r, expected %r" % (what, got, want))
expect("user", c.get("User"), user)
expect("entrypoint", c.get("Entrypoint"), [entrypoint])
expect("architecture", config.get("architecture"), arch)
expect("os", config.get("os"), "linux")
expect("title label", labels.get("org.opencontainers.image.title"), name)
expect("version label", labels.get("org.opencontainers.image.version"), version)
expect("revision label", labels.get("org.opencontainers.image.revision"), revision)
for w in wrong:
    print("images: %s: %s" % (name, w), file=sys.stderr)
if not wrong:
    print("images: %s: user %s, entrypoint %s, %s/%s, labels version %s revision %s" % (
        name, user, c.get("Entrypoint"), config.get("os"), arch, version, revision))
sys.exit(1 if wrong else 0)
EOF
  skopeo copy --quiet --insecure-policy "oci-archive:$archive" "oci:$work/layout-$name:$name" \
    || fail "$archive: skopeo cannot copy it to an OCI layout"
  if ! umoci raw unpack --image "$work/layout-$name:$name" "$unpacked" >"$work/umoci.log" 2>&1; then
    cat "$work/umoci.log" >&2
    fail "$archive: umoci cannot unpack it"
  fi
  [ ! -e "$unpacked/etc/ssl" ] || fail "$name: has /etc/ssl; the images carry no CA bundle"
  grep -q "^nonroot:x:65532:65532:" "$unpacked/etc/passwd" || fail "$name: no nonroot user in /etc/passwd"
  for b in "$entrypoint" "$@"; do
    # Ours print "<name> <version>"; iproute2's prints "ip utility, iproute2-...".
    expected="$(basename "$b") $version" flag=--version
    [ "$(basename "$b")" != ip ] || { expected="ip utility"; flag=-V; }
    # The image's own loader lists what the binary would load: nothing may be missing.
    loader=$(readelf -l "$unpacked$b" | sed -n 's/.*program interpreter: \(.*\)\]/\1/p')
    [ -n "$loader" ] || fail "$name: $b names no dynamic loader"
    if ! chroot --userspec="$user" "$unpacked" "$loader" --list "$b" >"$work/libs.txt" 2>&1 \
      || grep -q "not found" "$work/libs.txt"; then
      cat "$work/libs.txt" >&2
      fail "$name: $b cannot load its libraries inside the image"
    fi
    got=$(chroot --userspec="$user" "$unpacked" "$b" "$flag" 2>&1) \
      || fail "$name: $b $flag does not run inside the image: $got"
    # (`ip` may first warn that it cannot read /proc, which a chroot lacks and a container has.)
    case "$got" in
      *"$expected"*) say "$name: $b $flag: $(echo "$got" | grep -F "$expected" | head -1)" ;;
      *) fail "$name: $b $flag printed '$got', expected '$expected'" ;;
    esac
  done
}

check ambient-ztunnel 0:0 /usr/local/bin/ztunnel /usr/local/bin/ambient-cni /usr/bin/ip
check ambient-waypoint 65532:65532 /usr/local/bin/waypoint
check ambient-controller 65532:65532 /usr/local/bin/ambient-controller

say "sizes (archive, gzip layers / unpacked):"
for name in ambient-ztunnel ambient-waypoint ambient-controller; do
  printf 'images:   %-20s %6s / %6s\n' "$name" \
    "$(du -h "$out/$name.oci.tar" | cut -f1)" "$(du -sh "$work/check-$name" | cut -f1)"
done
say "done: release build ${build_seconds}s, images in $out/"
