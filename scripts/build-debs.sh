#!/usr/bin/env bash
# Builds the Debian packages, one per role, with dpkg-deb (Debian's own tool; nothing to install):
#   pwsync-agent     the agent, ldap-sock and samba-sync, the PAM module and its pam-auth-update
#                    profiles (off until `pam-auth-update --enable pwsync pwsync-check`)
#   pwsync-relay     the relay
#   pwsync-consumer  the consumer (the kerberos target loads libkadm5clnt-mit12, suggested)
# Each has its binary in /usr/bin, its systemd units (started only once /etc/pwsync/ROLE.toml
# exists), the commented example config in /usr/share/doc/pwsync-ROLE/examples, man pages and
# bash/zsh/fish completions generated from the programs' own command-line definitions, and
# maintainer scripts that make the `pwsync` system user and the state folders.
#
# They pass lintian (tests/tests/packages.rs runs it): a changelog (deploy/debian/changelog, whose
# newest entry must be the workspace's version), a machine-readable copyright file, and the
# systemd units handled by deb-systemd-helper and deb-systemd-invoke as debhelper's
# dh_installsystemd does.
#
#   scripts/build-debs.sh [--profile release|dev] [--out DIR] [--prebuilt] [--version V]
#                         [--maintainer "NAME <ADDRESS>"]
# (default: release, target/debian, the workspace's version, deploy/debian/changelog's
# maintainer; --prebuilt packages the binaries of that profile as they are, as the test suite
# does after its own build; --version packages them as another version, with a changelog entry
# for it, as an upgrade test needs).
set -euo pipefail
cd "$(dirname "$0")/.."
profile=release
out=target/debian
prebuilt=no
version=
maintainer=
while [ $# -gt 0 ]; do
    case "$1" in
        --profile) profile="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --prebuilt) prebuilt=yes; shift ;;
        --version) version="$2"; shift 2 ;;
        --maintainer) maintainer="$2"; shift 2 ;;
        *) echo "usage: $0 [--profile release|dev] [--out DIR] [--prebuilt] [--version V] [--maintainer 'NAME <ADDRESS>']" >&2; exit 2 ;;
    esac
done
if [ "$prebuilt" = no ]; then
    cargo build --locked --profile "$profile" -p pwsync-agent -p pwsync-relay -p pwsync-consumer -p pwsync-pam
fi
bin="target/$([ "$profile" = dev ] && echo debug || echo "$profile")"
workspace_version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
changelog=deploy/debian/changelog
newest=$(sed -n '1s/^[^ ]* (\([^)]*\)).*/\1/p' "$changelog")
if [ "$newest" != "$workspace_version" ]; then
    echo "$changelog: its newest entry is $newest, the workspace is $workspace_version; add an entry for $workspace_version" >&2
    exit 1
fi
[ -n "$maintainer" ] || maintainer=$(sed -n 's/^ -- \(.*>\)  .*/\1/p' "$changelog" | head -1)
[ -n "$version" ] || version=$workspace_version
arch=$(dpkg --print-architecture)
multiarch=$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || echo "$(uname -m)-linux-gnu")
mkdir -p "$out"
out=$(cd "$out" && pwd)

# stage ROLE: the files of pwsync-ROLE under $out/stage/pwsync-ROLE.
stage() {
    local role=$1 root="$out/stage/pwsync-$1"
    rm -rf "$root"
    install -d "$root/DEBIAN" "$root/usr/bin" "$root/lib/systemd/system" \
        "$root/usr/share/doc/pwsync-$role/examples" "$root/usr/share/man/man1" \
        "$root/usr/share/bash-completion/completions" "$root/usr/share/zsh/vendor-completions" \
        "$root/usr/share/fish/vendor_completions.d"
    install -m 0755 "$bin/pwsync-$role" "$root/usr/bin/pwsync-$role"
    strip --strip-unneeded --remove-section=.comment "$root/usr/bin/pwsync-$role"
    "$root/usr/bin/pwsync-$role" manpages "$root/usr/share/man/man1"
    gzip -9n "$root"/usr/share/man/man1/*.1
    "$root/usr/bin/pwsync-$role" completions bash >"$root/usr/share/bash-completion/completions/pwsync-$role"
    "$root/usr/bin/pwsync-$role" completions zsh >"$root/usr/share/zsh/vendor-completions/_pwsync-$role"
    "$root/usr/bin/pwsync-$role" completions fish >"$root/usr/share/fish/vendor_completions.d/pwsync-$role.fish"
    install -m 0644 "deploy/$role.toml" "$root/usr/share/doc/pwsync-$role/examples/$role.toml"
    install -m 0644 README.md "$root/usr/share/doc/pwsync-$role/README.md"
    install -m 0644 deploy/debian/copyright "$root/usr/share/doc/pwsync-$role/copyright"
    # The changelog of a native package: this package's name, this version first.
    {
        if [ "$version" != "$workspace_version" ]; then
            printf 'pwsync-%s (%s) unstable; urgency=medium\n\n  * Packaged as version %s.\n\n -- %s  %s\n\n' \
                "$role" "$version" "$version" "$maintainer" "$(date -R -u -d @"${SOURCE_DATE_EPOCH:-$(date +%s)}")"
        fi
        sed "s/^pwsync (/pwsync-$role (/" "$changelog"
    } | gzip -9n >"$root/usr/share/doc/pwsync-$role/changelog.gz"
}

# unit FILE ROLE_CONFIG ROOT ROLE MANPAGE: a unit of deploy/systemd with the packaged paths and
# documentation, started only once its config exists.
unit() {
    local file=$1 config=$2 root=$3 page=$5
    sed -e 's#/usr/local/bin/#/usr/bin/#g' \
        -e "s#^\[Unit\]#[Unit]\nConditionPathExists=$config#" \
        -e 's#^Documentation=.*#Documentation=man:'"$page"'(1) file:///usr/share/doc/pwsync-'"$4"'/README.md#' \
        "deploy/systemd/$file" >"$root/lib/systemd/system/$file"
}

# scripts ROLE UNITS...: the maintainer scripts.
scripts() {
    local role=$1 root="$out/stage/pwsync-$1"
    shift
    local units="$*"
    local holds
    case "$role" in
        agent) holds="pwsync-agent --config /etc/pwsync/agent.toml spool stats" ;;
        relay) holds="pwsync-relay --config /etc/pwsync/relay.toml journal stats" ;;
        consumer) holds="" ;;
    esac
    # The systemd parts are dh_installsystemd's: enabled at install (a unit starts only once
    # /etc/pwsync/$role.toml exists: ConditionPathExists), restarted on upgrade, stopped on
    # removal, masked while removed, forgotten at purge.
    cat >"$root/DEBIAN/postinst" <<EOF
#!/bin/sh
set -e
if [ "\$1" = configure ]; then
    if ! getent passwd pwsync >/dev/null; then
        adduser --system --group --home /var/lib/pwsync --no-create-home --quiet pwsync
    fi
    [ -d /etc/pwsync ] || install -d -m 0750 -o root -g pwsync /etc/pwsync
    [ -d /var/lib/pwsync ] || install -d -m 0755 /var/lib/pwsync
    [ -d /var/lib/pwsync/$role ] || install -d -m 0700 -o pwsync -g pwsync /var/lib/pwsync/$role
    rm -f /var/lib/pwsync/$role/.pwsync-holds-records
fi
if [ "\$1" = configure ] || [ "\$1" = abort-upgrade ] || [ "\$1" = abort-deconfigure ] || [ "\$1" = abort-remove ]; then
    for unit in $units; do
        deb-systemd-helper unmask "\$unit" >/dev/null || true
        if deb-systemd-helper --quiet was-enabled "\$unit"; then
            deb-systemd-helper enable "\$unit" >/dev/null || true
        else
            deb-systemd-helper update-state "\$unit" >/dev/null || true
        fi
    done
    if [ -d /run/systemd/system ]; then
        systemctl --system daemon-reload >/dev/null || true
        if [ -n "\$2" ]; then action=restart; else action=start; fi
        deb-systemd-invoke "\$action" $units >/dev/null || true
    fi
fi
if [ "\$1" = configure ] && [ ! -e /etc/pwsync/$role.toml ]; then
    echo "pwsync-$role: no /etc/pwsync/$role.toml yet, so nothing is started. Start from /usr/share/doc/pwsync-$role/examples/$role.toml, then: systemctl start pwsync-$role (it is enabled: it starts at boot once the config is there)"
$([ "$role" = agent ] && echo '    echo "pwsync-agent: to capture PAM password changes, with the password policy checked before pam_unix sets anything: pam-auth-update --enable pwsync pwsync-check"')
fi
EOF
    cat >"$root/DEBIAN/prerm" <<EOF
#!/bin/sh
set -e
if [ "\$1" = remove ]; then
$([ "$role" = agent ] && echo '    pam-auth-update --package --remove pwsync pwsync-check || true')
    if [ -d /run/systemd/system ]; then
        deb-systemd-invoke stop $units >/dev/null || true
    fi
    # For a later purge (the program is gone by then): does the state still hold records?
    if [ -n "$holds" ] && [ -e /etc/pwsync/$role.toml ] && [ -d /var/lib/pwsync/$role ]; then
        if ! n=\$($holds 2>/dev/null | sed -n 's/^records: *//p'); then n=unknown; fi
        if [ "\$n" != 0 ]; then echo "\${n:-unknown}" >/var/lib/pwsync/$role/.pwsync-holds-records; fi
    fi
fi
EOF
    cat >"$root/DEBIAN/postrm" <<EOF
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl --system daemon-reload >/dev/null || true
fi
if [ "\$1" = remove ] && command -v deb-systemd-helper >/dev/null; then
    deb-systemd-helper mask $units >/dev/null || true
fi
if [ "\$1" = purge ]; then
    if command -v deb-systemd-helper >/dev/null; then
        deb-systemd-helper purge $units >/dev/null || true
        deb-systemd-helper unmask $units >/dev/null || true
    fi
    if [ -d /var/lib/pwsync/$role ]; then
        keep=no
        # The agent's spool and the relay's journal: kept while they hold records (prerm
        # counted them). The consumer's state (its cursor, retry queues, dead letters): kept
        # whenever it is not empty.
        [ -e /var/lib/pwsync/$role/.pwsync-holds-records ] && keep=yes
        [ "$role" = consumer ] && [ -n "\$(ls -A /var/lib/pwsync/$role)" ] && keep=yes
        if [ "\$keep" = yes ]; then
            echo "pwsync-$role: /var/lib/pwsync/$role still holds data that has not reached the next hop (records: \$(cat /var/lib/pwsync/$role/.pwsync-holds-records 2>/dev/null || echo 'the consumer state')); KEPT. Deliver it (install and run pwsync-$role again) or remove the folder by hand."
        else
            rm -rf /var/lib/pwsync/$role
        fi
    fi
    rmdir --ignore-fail-on-non-empty /var/lib/pwsync /etc/pwsync 2>/dev/null || true
fi
EOF
    chmod 0755 "$root/DEBIAN/postinst" "$root/DEBIAN/prerm" "$root/DEBIAN/postrm"
}

# control ROLE DEPENDS [EXTRA]: DEBIAN/control.
control() {
    local role=$1 depends=$2 extra=${3:-} description=$4 root="$out/stage/pwsync-$1"
    local size
    size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
    cat >"$root/DEBIAN/control" <<EOF
Package: pwsync-$role
Version: $version
Architecture: $arch
Maintainer: $maintainer
Section: admin
Priority: optional
Installed-Size: $size
Depends: $depends
${extra}Description: $description
 pwsync carries password changes, encrypted and signed, through a durable
 store-and-forward path (agent, MQTT, relay, consumer) to every system a
 person uses. Configure /etc/pwsync/$role.toml (see the example in
 /usr/share/doc/pwsync-$role/examples) before the service starts.
EOF
}

build() {
    local root="$out/stage/pwsync-$1"
    (cd "$root" && find . -type f ! -path './DEBIAN/*' -printf '%P\0' | LC_ALL=C sort -z | xargs -0 md5sum) >"$root/DEBIAN/md5sums"
    dpkg-deb --root-owner-group -Zgzip --build "$out/stage/pwsync-$1" "$out/pwsync-$1_${version}_$arch.deb" >/dev/null
    echo "$out/pwsync-$1_${version}_$arch.deb"
}

base="libc6, libgcc-s1, adduser, init-system-helpers (>= 1.54)"

stage agent
root="$out/stage/pwsync-agent"
unit pwsync-agent.service /etc/pwsync/agent.toml "$root" agent pwsync-agent
unit pwsync-ldap-sock.service /etc/pwsync/agent.toml "$root" agent pwsync-agent-ldap-sock
unit pwsync-samba-sync.service /etc/pwsync/agent.toml "$root" agent pwsync-agent-samba-sync
install -d "$root/lib/$multiarch/security" "$root/usr/share/pam-configs"
install -m 0644 "$bin/libpam_pwsync.so" "$root/lib/$multiarch/security/pam_pwsync.so"
strip --strip-unneeded --remove-section=.comment "$root/lib/$multiarch/security/pam_pwsync.so"
install -m 0644 deploy/pam.d/pam-configs-pwsync "$root/usr/share/pam-configs/pwsync"
install -m 0644 deploy/pam.d/pam-configs-pwsync-check "$root/usr/share/pam-configs/pwsync-check"
install -m 0644 deploy/pam.d/README.md "$root/usr/share/doc/pwsync-agent/PAM.md"
scripts agent pwsync-agent.service
control agent "$base, libpam0g, libpam-runtime" "" "pwsync agent: captures password changes and forwards them (PAM, OpenLDAP, Samba)"
build agent

stage relay
unit pwsync-relay.service /etc/pwsync/relay.toml "$out/stage/pwsync-relay" relay pwsync-relay
scripts relay pwsync-relay.service
control relay "$base" "" "pwsync relay: the central journal between agents and consumer groups"
build relay

stage consumer
unit pwsync-consumer.service /etc/pwsync/consumer.toml "$out/stage/pwsync-consumer" consumer pwsync-consumer
scripts consumer pwsync-consumer.service
control consumer "$base" "Suggests: libkadm5clnt-mit12
" "pwsync consumer: sets each change on LDAP, AD, PostgreSQL, Kerberos"
build consumer
