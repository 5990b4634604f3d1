#!/usr/bin/env bash
# Installs what the test suite needs from Debian's packages. Idempotent: a machine that has
# everything is left alone. Needs root (or sudo) for apt-get. `install-deps.sh build` installs only
# what building the binaries needs (scripts/quickstart.sh).
set -euo pipefail

# Debian packages the tests start as real peers;
# mosquitto is the peer baseline of the benchmark suite (pwsync-bench e2e); faketime runs an agent
# with its clock far ahead; the samba set provisions a throwaway AD domain controller inside a network
# namespace (iproute2), with krb5-user for kinit/kpasswd against it and gnupg + python3-gpg for
# `samba-tool user syncpasswords --decrypt-samba-gpg`; krb5-kdc and krb5-admin-server make a
# throwaway MIT realm (tests/src/krb5.rs); libkrb5-dev, pkg-config and libclang-dev build the
# kadmin binding of the kerberos target (libkadm5clnt-mit12 comes with libkrb5-dev); dpkg-dev,
# binutils, man-db, bash-completion, systemd, adduser, libpam-runtime and init-system-helpers
# build, install and check the Debian packages, lintian checks them and apt-utils (apt-ftparchive)
# makes the signed repository (tests/tests/packages.rs); nats-server runs the three-node JetStream cluster
# of the relay HA tests (tests/tests/ha.rs).
BUILD=(libkrb5-dev pkg-config libclang-dev libpam0g-dev)
PACKAGES=("${BUILD[@]}" apache2-utils pamtester slapd ldap-utils postgresql mosquitto faketime
  samba samba-ad-dc samba-ad-provision samba-dsdb-modules samba-vfs-modules winbind krb5-user gnupg
  python3-gpg iproute2 krb5-kdc krb5-admin-server dpkg-dev binutils man-db bash-completion systemd
  adduser libpam-runtime init-system-helpers lintian apt-utils nats-server)
if [ "${1:-}" = build ]; then PACKAGES=("${BUILD[@]}"); fi

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update
  echo 'slapd slapd/no_configuration boolean true' | $SUDO debconf-set-selections
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends "${missing[@]}"
fi
