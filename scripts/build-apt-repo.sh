#!/usr/bin/env bash
# Makes a signed apt repository of the Debian packages (scripts/build-debs.sh), with Debian's own
# tools (apt-ftparchive from apt-utils, gpg), for hosts to install and upgrade pwsync from:
#
#   scripts/build-apt-repo.sh --key SIGNING-KEY.asc [--debs DIR] [--out DIR] [--suite NAME]
#
#   --key    the repository's secret signing key, ASCII-armoured (`gpg --export-secret-keys
#            --armor KEYID`), mode 0600 or it is refused; never written anywhere else
#   --debs   the packages to publish (default target/debian); every .deb in it
#   --out    the repository (default target/apt); published packages stay in its pool, so
#            older versions remain installable; the indexes are made again each run
#   --suite  the suite hosts name in their sources (default stable); the component is main
#
# The repository holds dists/SUITE/{InRelease,Release,Release.gpg}, the Packages indexes and
# pool/main/, and pwsync-archive-keyring.gpg: the public key for hosts (see the README's section
# on installing from a repository).
set -euo pipefail
cd "$(dirname "$0")/.."
key=
debs=target/debian
out=target/apt
suite=stable
while [ $# -gt 0 ]; do
    case "$1" in
        --key) key="$2"; shift 2 ;;
        --debs) debs="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --suite) suite="$2"; shift 2 ;;
        *) echo "usage: $0 --key SIGNING-KEY.asc [--debs DIR] [--out DIR] [--suite NAME]" >&2; exit 2 ;;
    esac
done
if [ -z "$key" ]; then
    echo "$0: give --key: the repository's secret signing key (ASCII-armoured, mode 0600)" >&2
    exit 2
fi
if [ ! -f "$key" ]; then
    echo "$0: no signing key at $key" >&2
    exit 1
fi
mode=$(stat -c %a "$key")
if [ "$mode" != 600 ] && [ "$mode" != 400 ]; then
    echo "$0: $key is mode $mode; a secret key must be readable by its owner only (chmod 600 $key)" >&2
    exit 1
fi
for tool in apt-ftparchive gpg dpkg-deb; do
    command -v "$tool" >/dev/null || { echo "$0: $tool is missing (apt-get install apt-utils gnupg dpkg)" >&2; exit 1; }
done
shopt -s nullglob
packages=("$debs"/*.deb)
if [ ${#packages[@]} = 0 ]; then
    echo "$0: no .deb in $debs (build them with scripts/build-debs.sh)" >&2
    exit 1
fi

mkdir -p "$out/pool/main"
out=$(cd "$out" && pwd)
for p in "${packages[@]}"; do
    cp "$p" "$out/pool/main/"
done
archs=$(for p in "$out"/pool/main/*.deb; do dpkg-deb -f "$p" Architecture; done | sort -u)
rm -rf "$out/dists/$suite"
for arch in $archs; do
    dir="$out/dists/$suite/main/binary-$arch"
    mkdir -p "$dir"
    (cd "$out" && apt-ftparchive --arch "$arch" packages pool/main) >"$dir/Packages"
    gzip -9nk "$dir/Packages"
done
(cd "$out" && apt-ftparchive \
    -o APT::FTPArchive::Release::Origin=pwsync \
    -o APT::FTPArchive::Release::Label=pwsync \
    -o "APT::FTPArchive::Release::Suite=$suite" \
    -o "APT::FTPArchive::Release::Codename=$suite" \
    -o "APT::FTPArchive::Release::Architectures=$(echo $archs)" \
    -o APT::FTPArchive::Release::Components=main \
    -o APT::FTPArchive::Release::Description="pwsync packages" \
    release "dists/$suite") >"$out/dists/$suite/Release.new"
mv "$out/dists/$suite/Release.new" "$out/dists/$suite/Release"

# Sign with a keyring of its own, removed afterwards: the key never joins the user's keyring.
home=$(mktemp -d)
trap 'rm -rf "$home"' EXIT
gpg --homedir "$home" --batch --quiet --import "$key"
gpg --homedir "$home" --batch --yes --quiet --clearsign -o "$out/dists/$suite/InRelease" "$out/dists/$suite/Release"
gpg --homedir "$home" --batch --yes --quiet --armor --detach-sign -o "$out/dists/$suite/Release.gpg" "$out/dists/$suite/Release"
gpg --homedir "$home" --batch --yes --quiet --export -o "$out/pwsync-archive-keyring.gpg"
echo "$out: suite $suite, $(ls "$out"/pool/main/*.deb | wc -l) packages, signed; hosts trust $out/pwsync-archive-keyring.gpg"
