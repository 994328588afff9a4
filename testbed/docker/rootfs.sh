#!/usr/bin/env bash
# Assemble an image root filesystem from files already on this host (no registry, no download).
#   rootfs.sh busybox DIR   static busybox + its applets
#   rootfs.sh python  DIR   the host's Debian python3.11 (stdlib + shared libs) + busybox
set -euo pipefail
kind=$1 root=$2
mkdir -p "$root"/{usr/bin,usr/sbin,usr/lib,usr/lib64,etc,tmp,root,proc,sys,dev,var/tmp}
chmod 1777 "$root/tmp" "$root/var/tmp"
# merged /usr like the host, so paths that ldd reports (/lib/..., /lib64/...) resolve the same way
for d in bin sbin lib lib64; do ln -sfn "usr/$d" "$root/$d"; done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
echo 'hosts: files dns' >"$root/etc/nsswitch.conf"

# busybox-static needs no libraries; link each applet unless a real program of that name exists
cp /usr/bin/busybox "$root/usr/bin/busybox"
for a in $(/usr/bin/busybox --list); do
  [ -e "$root/usr/bin/$a" ] || ln -s busybox "$root/usr/bin/$a"
done
[ "$kind" = busybox ] && exit 0

# python: files of the Debian packages, plus every shared library they load (found with ldd),
# copied with their directory symlinks resolved so that they land under usr/ in the image.
list=$(mktemp)
trap 'rm -f "$list"' EXIT
dpkg -L python3.11-minimal libpython3.11-minimal libpython3.11-stdlib python3.11 \
  | while read -r f; do [ -d "$f" ] && [ ! -L "$f" ] || echo "$f"; done \
  | grep -Ev '^/usr/share/(doc|man)/|/test/|/idlelib/|/tkinter/|/__pycache__/' >"$list"
libs() {  # canonical path of each library (the soname link and the file it points to)
  find /usr/bin/python3.11 /usr/lib/python3.11/lib-dynload -type f -print0 \
    | xargs -0 ldd 2>/dev/null | grep -o '/[^ ]*' | sort -u \
    | while read -r p; do
        [ -e "$p" ] || continue
        echo "$(readlink -f "$(dirname "$p")")/$(basename "$p")"; readlink -f "$p"
      done
}
libs >>"$list"
sed 's|^/||' "$list" | sort -u | tar -C / -cf - --no-recursion -T - | tar -C "$root" -xf - --keep-directory-symlink
rm -f "$root/usr/bin/python3" && ln -s python3.11 "$root/usr/bin/python3"
