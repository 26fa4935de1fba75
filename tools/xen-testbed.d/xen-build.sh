# shellcheck shell=bash
# tools/xen-testbed.d/xen-build.sh -- the bed's Xen hypervisor: Debian 12's own Xen 4.17 (the
# source of the very version the base's xen-utils come from, Debian's patches applied), built
# with Debian's own configuration plus CONFIG_SHADOW_PAGING=y.  Sourced by tools/xen-testbed.
#
# Why: Debian builds its hypervisor without shadow paging, and a PV guest's live migration needs
# it -- `xl migrate` puts the guest in log-dirty mode, which for a PV guest is a shadow-paging
# mode.  With Debian's binary it fails at once: "xc: error: Failed to enable logdirty: 95,22,0
# (22 = Invalid argument)".  Nothing else changes (same source, same tools in dom0).
#
# Cached as $BASE/xen-<key>/xen (key: this file, the base's key and the source version); a
# fresh machine builds it (~5 minutes on 2 busy cores: only the hypervisor, not the tools).
# Needs on the host: build-essential, dpkg-dev, bison and flex (Xen's kconfig), python3.
XEN_EXTRA_CONFIG=(CONFIG_SHADOW_PAGING=y)

# xen_build: prints the path of the hypervisor to boot (multiboot ELF)
xen_build() {
  local R=$BASE/rootfs ver key out
  ver=$(chroot "$R" dpkg-query -W -f='${Version}' xen-utils-$XENVER) || return 1
  key=$( { cat "$D/xen-build.sh"; echo "$BASE_KEY $ver"; } | sha256sum | cut -c1-16)
  out=$BASE/xen-$key
  if [ -e "$out/.done" ]; then say "hypervisor $key (Xen $(cat "$out/version"), ${XEN_EXTRA_CONFIG[*]}): cached"; echo "$out/xen"; return 0; fi
  local o; for o in "$BASE"/xen-*; do [ -d "$o" ] && [ "$o" != "$out" ] && rm -rf "$o"; done
  local t s; t=$(date +%s.%N); s=$out/src
  rm -rf "$out"; mkdir -p "$s/apt/lists/partial" "$s/apt/cache/archives/partial"
  # the source of exactly the installed version: main, updates or security
  printf 'deb-src %s %s main\ndeb-src %s %s-updates main\ndeb-src %s %s-security main\n' \
    "$MIRROR" "$SUITE" "$MIRROR" "$SUITE" "$SECURITY_MIRROR" "$SUITE" >"$s/apt/sources.list"
  local ao=(-o "Dir::Etc::SourceList=$s/apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
            -o "Dir::State::Lists=$s/apt/lists" -o "Dir::Cache=$s/apt/cache")
  say "building Xen $ver's hypervisor with ${XEN_EXTRA_CONFIG[*]} (Debian's source and configuration)"
  # (a mirror may list a security update's source and not serve it: then the suite's own 4.17,
  # whose hypercall interfaces are the same -- one stable series)
  (cd "$s" && apt-get "${ao[@]}" update -q >"$s/apt.log" 2>&1 &&
   { apt-get "${ao[@]}" source --download-only "xen=$ver" >>"$s/apt.log" 2>&1 ||
     { rm -f xen_*; apt-get "${ao[@]}" source --download-only "xen/$SUITE" >>"$s/apt.log" 2>&1; }; } &&
   dpkg-source -x xen_*.dsc tree >"$s/dpkg-source.log" 2>&1) ||
    { tail -20 "$s"/*.log >&2; say "could not get Xen $ver's source"; return 1; }
  local sv; sv=$(sed -n 's/^Version: //p' "$s"/xen_*.dsc)
  case $sv in "${XENVER}".*) ;; *) say "Xen's source is $sv, not $XENVER"; return 1 ;; esac
  [ "$sv" = "$ver" ] || say "the mirror serves no source of Xen $ver: building $sv (dom0's tools stay $ver)"
  echo "$sv" >"$out/version"
  # Debian's configuration of this very build, from the hypervisor package the base downloaded
  local x; x=$(mktemp -d "$out/deb.XXXXXX")
  dpkg-deb -x "$(ls "$R"/root/xen-hypervisor-$XENVER-amd64_*.deb | head -1)" "$x"
  cp "$x/boot/xen-$XENVER-amd64.config" "$s/tree/xen/.config"; rm -rf "$x"
  local c; for c in "${XEN_EXTRA_CONFIG[@]}"; do
    sed -i "/^# ${c%%=*} is not set/d; /^${c%%=*}=/d" "$s/tree/xen/.config"; echo "$c" >>"$s/tree/xen/.config"
  done
  (cd "$s/tree" && nice -n 15 make -C xen XEN_TARGET_ARCH=x86_64 olddefconfig >"$s/make.log" 2>&1 &&
   for c in "${XEN_EXTRA_CONFIG[@]}"; do grep -qx "$c" xen/.config || { echo "olddefconfig dropped $c" >>"$s/make.log"; exit 1; }; done &&
   nice -n 15 make -C xen XEN_TARGET_ARCH=x86_64 -j2 >>"$s/make.log" 2>&1 && cp xen/xen "$out/xen") ||
    { tail -30 "$s/make.log" >&2; say "building the hypervisor failed (log $s/make.log)"; return 1; }
  rm -rf "$s"; touch "$out/.done"
  say "hypervisor $key (Xen $sv, ${XEN_EXTRA_CONFIG[*]}) built in $(since "$t") s"
  echo "$out/xen"
}
