# shellcheck shell=bash
# tools/apt-sources.sh -- the Debian mirrors this host's apt already uses; sourced by
# tools/install-deps, tools/xen-testbed and tools/check-fresh, so that what they add or
# debootstrap comes from the same place as the host's own packages.

# apt_uri SUITE: the mirror apt uses for SUITE (deb822 .sources or one-line sources.list),
# empty if none.
apt_uri() {
  { awk -v want="$1" '/^URIs:/{u=$2} /^Suites:/{for(i=2;i<=NF;i++) if($i==want){print u; exit}}' \
        /etc/apt/sources.list.d/*.sources 2>/dev/null
    awk -v want="$1" '$1=="deb" && $3==want {print $2; exit}' /etc/apt/sources.list 2>/dev/null; } | head -1 || true
}
