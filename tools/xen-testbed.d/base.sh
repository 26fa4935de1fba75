# shellcheck shell=bash
# tools/xen-testbed.d/base.sh -- the BASE of the Xen test bed: a Debian 12 dom0 root file system
# (Xen toolstack, Linux, Ceph, the C libraries rbdback links), the Xen hypervisor and an
# uncompressed PV kernel, and a static fio for the domU.  Sourced by tools/xen-testbed.
#
# The cache key of the base is the sha256 of THIS file (plus the mirror and suite), so any
# change here rebuilds the base; keep everything that shapes the base in this file.
# Needs: $BASE (output dir), $MIRROR, $SECURITY_MIRROR, $SUITE, and say() from the caller.

XENVER=4.17
# Packages of the dom0 root file system (installed with --no-install-recommends).
DOM0_PACKAGES=(
  # Xen toolstack (xl, xenstored, hotplug scripts) and the libraries rbdback links
  xen-utils-4.17 xenstore-utils
  libxenevtchn1 libxengnttab1 libxenstore4 libxenmisc4.17 libxenhypfs1 libxentoollog1 libxenforeignmemory1
  libxencall1 libxendevicemodel1 libxentoolcore1
  # kernel for dom0 AND domU (the domU gets xen-blkfront from its modules)
  linux-image-amd64
  # Ceph in dom0: mon, mgr, bluestore OSD, CLIs, and the libraries rbdback links
  ceph-mon ceph-osd ceph-mgr ceph-common librados2 librbd1 python3 uuid-runtime
  # plumbing for the init scripts and initrds
  busybox-static kmod util-linux procps iproute2 e2fsprogs cpio
)
# fio for the domU: built static from Debian's own fio source, no optional engines.
FIO_CONFIGURE=(--build-static --disable-native --disable-numa --disable-rdma --disable-rados --disable-rbd
  --disable-http --disable-gfapi --disable-libnfs --disable-pmem --disable-xnvme --disable-tcmalloc
  --disable-dfs --disable-lex --disable-libzbc)

base_rootfs() {
  local R=$BASE/rootfs
  [ -e "$BASE/.rootfs.done" ] && return 0
  rm -rf "$R"; mkdir -p "$BASE"
  say "debootstrap $SUITE minbase -> $R"
  nice -n 15 debootstrap --variant=minbase "$SUITE" "$R" "$MIRROR" >"$BASE/debootstrap.log" 2>&1 ||
    { tail -20 "$BASE/debootstrap.log" >&2; return 1; }
  cat >"$R/etc/apt/sources.list" <<EOS
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $SECURITY_MIRROR $SUITE-security main
EOS
  # no daemons start in the chroot; keep the (unused) Debian initrd small
  printf '#!/bin/sh\nexit 101\n' >"$R/usr/sbin/policy-rc.d"; chmod +x "$R/usr/sbin/policy-rc.d"
  mkdir -p "$R/etc/initramfs-tools/conf.d"
  printf 'MODULES=list\nCOMPRESS=gzip\n' >"$R/etc/initramfs-tools/conf.d/xenlab"
  mount -t proc proc "$R/proc"
  say "apt-get install ${#DOM0_PACKAGES[@]} packages in the chroot (Xen, Linux, Ceph)"
  local rc=0
  chroot "$R" /usr/bin/env DEBIAN_FRONTEND=noninteractive LC_ALL=C nice -n 15 /bin/sh -c \
    "apt-get update -q && apt-get install -y -q --no-install-recommends ${DOM0_PACKAGES[*]} &&
     cd /root && apt-get download -q xen-hypervisor-$XENVER-amd64" >"$BASE/chroot-install.log" 2>&1 || rc=$?
  umount "$R/proc"
  [ $rc = 0 ] || { tail -30 "$BASE/chroot-install.log" >&2; return $rc; }
  rm -f "$R"/var/cache/apt/archives/*.deb "$R"/var/lib/apt/lists/*_Packages "$R"/boot/initrd.img-*
  echo /dev/vda / ext4 rw 0 1 >"$R/etc/fstab"
  echo xenlab-dom0 >"$R/etc/hostname"
  printf '127.0.0.1 localhost\n127.0.1.1 xenlab-dom0\n' >"$R/etc/hosts"
  touch "$BASE/.rootfs.done"
}

base_xen() {
  local R=$BASE/rootfs B=$BASE/boot
  [ -e "$B/xen" ] && [ -e "$B/vmlinux" ] && return 0
  mkdir -p "$B"
  local deb; deb=$(ls "$R"/root/xen-hypervisor-$XENVER-amd64_*.deb | head -1)
  local v; v=$(chroot "$R" dpkg-query -W -f='${Version}' xen-utils-$XENVER)
  case $deb in *"$(echo "$v" | sed 's/:/%3a/')"*) ;; *) say "WARNING: hypervisor $deb differs from xen-utils $v" ;; esac
  local x; x=$(mktemp -d "$BASE/xdeb.XXXXXX")
  dpkg-deb -x "$deb" "$x"
  zcat "$x/boot/xen-$XENVER-amd64.gz" >"$B/xen.tmp" && mv "$B/xen.tmp" "$B/xen"  # ELF32 multiboot: qemu -kernel loads it
  rm -rf "$x"
  local kv; kv=$(ls "$R/lib/modules" | sort -V | tail -1); echo "$kv" >"$B/kver"
  cp "$R/boot/vmlinuz-$kv" "$B/vmlinuz"
  # uncompressed ELF vmlinux (PV entry point); saves libxc an xz decompression per boot
  python3 - "$B/vmlinuz" "$B/vmlinux.tmp" <<'EOP'
import lzma, sys
d = open(sys.argv[1], 'rb').read(); off = d.find(b'\xfd7zXZ\x00')
open(sys.argv[2], 'wb').write(lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(d[off:]))
EOP
  mv "$B/vmlinux.tmp" "$B/vmlinux"
}

base_fio() {
  local B=$BASE/boot
  [ -e "$B/fio" ] && return 0
  local s=$BASE/src; rm -rf "$s"; mkdir -p "$s/apt/lists/partial" "$s/apt/cache/archives/partial"
  echo "deb-src $MIRROR $SUITE main" >"$s/apt/sources.list"
  local o=(-o "Dir::Etc::SourceList=$s/apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
           -o "Dir::State::Lists=$s/apt/lists" -o "Dir::Cache=$s/apt/cache")
  say "building a static fio from Debian's source"
  (cd "$s" && apt-get "${o[@]}" update -q >/dev/null 2>&1 && apt-get "${o[@]}" source --download-only fio >/dev/null 2>&1) ||
    { say "could not download fio's source"; return 1; }
  (cd "$s" && tar xzf fio_*.orig.tar.gz && cd fio-*/ &&
   ./configure "${FIO_CONFIGURE[@]}" >../fio-configure.log 2>&1 &&
   nice -n 15 make -j2 fio >../fio-make.log 2>&1 && strip -o "$B/fio" fio) ||
    { tail -20 "$s"/fio-*.log >&2; return 1; }
  rm -rf "$s"
}
