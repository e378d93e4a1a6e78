#!/bin/bash
# Builds the rackboot appliance: a bootable raw GPT disk image for amd64 or arm64 UEFI
# machines, and its RAUC update bundles. Run by `cargo xtask image [--arch arm64]` (which
# installs the tools and builds the binaries); as root.
#
#   ARCH             the Debian architecture: amd64 (default) or arm64. One definition
#                    serves both; what differs is chosen in the `case` below. arm64 on
#                    an amd64 host runs the root's maintainer scripts under
#                    qemu-aarch64-static through binfmt_misc (`cargo xtask image`
#                    registers the handler).
#   RACKBOOT_BIN     the static rackboot binary (`cargo xtask dist`) of this version
#   RACKBOOT_BIN_V2  the same source built with another version string (the check's v2);
#                    optional: without it only this version's bundle is made (arm64)
#   OUT              the image to write (written as OUT.tmp, renamed when complete)
#   WORK             a scratch directory (emptied first)
#   CACHE            keeps the Debian base tarball between builds (see below)
#   UPDATES          the update artefacts: UPDATES/release/ (this version's bundle,
#                    SHA256SUMS, SHA256SUMS.sig) and the check's UPDATES/v2/, UPDATES/v3/
#   KEYS             the signing CA and key (made here when missing; keep them: every
#                    image trusts the CA it was built with, ca.cert.pem)
#   EFI_ROOT         where shim-signed and grub-efi-<ARCH>-signed of ARCH are unpacked
#                    (default /: the host's installed packages, right for amd64)
#   MIRROR           Debian mirror (default http://deb.debian.org/debian)
#   SECURITY_MIRROR  (default http://deb.debian.org/debian-security)
#
# Layout (GPT): 1 the 64 MiB ESP with shim (/EFI/BOOT/BOOTX64.EFI; arm64:
# BOOTAA64.EFI), Debian's signed GRUB, the A/B boot-selection script /EFI/debian/grub.cfg and its variables
# /EFI/debian/grubenv (RAUC's GRUB backend); 2 root slot A; 3 the 32 MiB FAT settings
# partition (GPT name RACKBOOT-CFG, type "Microsoft basic data" so any laptop shows it,
# FAT label RACKBOOTCFG: FAT labels hold 11 characters) seeded from
# images/appliance/config/; 4 root slot B (empty until the first update); 5 the data
# partition (ext4, mounted at /data, grown over the disk at first boot by systemd-repart
# + x-systemd.growfs) holding /var/lib/rackboot (bind-mounted), the journal and RAUC's
# status, so synced images and logs survive updates. Slots are found by partition UUID
# (root=PARTUUID=) since a slot's filesystem is whatever bundle was written to it.
# Nothing is mounted and no loop device is used: the filesystems are written by
# `mkfs.ext4 -d` (at the partition's offset, or as the bundle's image) and mtools.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
: "${RACKBOOT_BIN:?RACKBOOT_BIN is not set}" "${OUT:?OUT is not set}" "${WORK:?WORK is not set}"
: "${CACHE:?CACHE is not set}" "${UPDATES:?UPDATES is not set}" "${KEYS:?KEYS is not set}"
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${SECURITY_MIRROR:-http://deb.debian.org/debian-security}
ESP_MIB=64
CFG_MIB=32
# Each root slot holds one version's root filesystem; the data partition starts small
# and grows over the disk at first boot.
SLOT_MIB=1536
DATA_MIB=256
ARCH=${ARCH:-amd64}
EFI_ROOT=${EFI_ROOT:-}
# What differs between the architectures: the GPT root type, the EFI file names (the
# removable-media path the firmware boots, and shim's second stage), the signed GRUB's
# directory and the serial console.
case $ARCH in
amd64)
    ROOT_TYPE=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709 # "Linux root (x86-64)"
    EFI_SUFFIX=x64 GRUB_DIR=x86_64-efi-signed CONSOLE=ttyS0 ;;
arm64)
    ROOT_TYPE=B921B045-1DF0-41C3-AF44-4C6F280D3FAE # "Linux root (ARM-64)"
    EFI_SUFFIX=aa64 GRUB_DIR=arm64-efi-signed CONSOLE=ttyAMA0 ;;
*)
    echo "build.sh: ARCH must be amd64 or arm64, not $ARCH" >&2
    exit 1 ;;
esac
EFI_UPPER=$(echo "$EFI_SUFFIX" | tr a-z A-Z)
# RAUC refuses a bundle whose compatible differs: an amd64 bundle never goes on arm64.
COMPATIBLE=rackboot-appliance-$ARCH
SHIM=$EFI_ROOT/usr/lib/shim/shim$EFI_SUFFIX.efi.signed
MOKMANAGER=$EFI_ROOT/usr/lib/shim/mm$EFI_SUFFIX.efi.signed
GRUB=$EFI_ROOT/usr/lib/grub/$GRUB_DIR/grub$EFI_SUFFIX.efi.signed

step() { echo "== $*" >&2; }

# `cargo xtask image` starts this script as the leader of its own process group, with
# SIGTERM as its parent-death signal: pass a SIGTERM or SIGINT on to the whole group
# (mmdebstrap then unmounts what it mounted in the chroot). Long steps run in the
# background + `wait` so the trap runs at once.
trap 'trap - TERM INT; kill -TERM 0 2>/dev/null; exit 143' TERM INT

for f in "$RACKBOOT_BIN" ${RACKBOOT_BIN_V2:+"$RACKBOOT_BIN_V2"} "$SHIM" "$MOKMANAGER" "$GRUB"; do
    [ -f "$f" ] || { echo "build.sh: $f is missing" >&2; exit 1; }
done

rm -rf "$WORK"
mkdir -p "$WORK" "$CACHE"
rootfs=$WORK/rootfs
# packages.txt names the kernel as linux-image-@ARCH@.
packages=$(sed -e 's/#.*//' -e "s/@ARCH@/$ARCH/g" "$here/packages.txt" | xargs | tr ' ' ,)

# The Debian base (mmdebstrap) is kept in CACHE as a tarball named by the hash of what
# makes it (architecture, package list, dpkg excludes, initramfs settings, mirrors) and the day, so
# rebuilding the image the same day reuses it and a new day picks up security updates.
key=$( (cat "$here/packages.txt" "$here/dpkg.cfg" "$here/rootfs/etc/initramfs-tools/conf.d/rackboot.conf"
    echo "$ARCH $MIRROR $SECURITY_MIRROR $(date -u +%Y%m%d)") | sha256sum | cut -c1-16)
base=$CACHE/base-$ARCH-$key.tar
if [ ! -f "$base" ]; then
    step "mmdebstrap bookworm ($ARCH): $packages"
    rm -f "$CACHE"/base-"$ARCH"-*.tar
    # bookworm-backports only for what bookworm lacks (ubuntu-keyring): its default
    # priority (100) keeps every other package on bookworm.
    # The initramfs settings go in before the kernel package builds its first initramfs.
    mmdebstrap --variant=apt --format=tar --architectures="$ARCH" \
        --aptopt='APT::Install-Recommends "false"' \
        --dpkgopt="$here/dpkg.cfg" \
        --include="$packages" \
        --setup-hook='mkdir -p "$1/etc/initramfs-tools/conf.d"' \
        --setup-hook="copy-in $here/rootfs/etc/initramfs-tools/conf.d/rackboot.conf /etc/initramfs-tools/conf.d" \
        bookworm "$base.tmp" \
        "deb $MIRROR bookworm main" \
        "deb $MIRROR bookworm-updates main" \
        "deb $SECURITY_MIRROR bookworm-security main" \
        "deb $MIRROR bookworm-backports main" &
    wait $!
    mv "$base.tmp" "$base"
else
    step "Debian base from the cache: $base"
fi
[ "${BASE_ONLY:-}" = 1 ] && exit 0
mkdir "$rootfs"
tar -C "$rootfs" --numeric-owner --xattrs --xattrs-include='*' -xpf "$base" &
wait $!

step "rackboot, its unit, sysusers.d, tmpfiles.d and default config"
install -m 0755 "$RACKBOOT_BIN" "$rootfs/usr/bin/rackboot"
install -D -m 0644 "$repo/systemd/rackboot.service" "$rootfs/usr/lib/systemd/system/rackboot.service"
install -D -m 0644 "$repo/systemd/rackboot.sysusers" "$rootfs/usr/lib/sysusers.d/rackboot.conf"
install -D -m 0644 "$repo/systemd/rackboot.tmpfiles" "$rootfs/usr/lib/tmpfiles.d/rackboot.conf"
install -D -m 0644 "$repo/systemd/rackboot.toml" "$rootfs/etc/rackboot/rackboot.toml"
install -d -m 0755 "$rootfs/etc/rackboot/rackboot.toml.d"
install -D -m 0644 "$repo/README.md" "$rootfs/usr/share/doc/rackboot/README.md"
cp -r --no-preserve=ownership "$here/rootfs/." "$rootfs/"
sed -i "s/@COMPATIBLE@/$COMPATIBLE/" "$rootfs/etc/rauc/system.conf"

step "users, directories, enabled units"
systemd-sysusers --root="$rootfs"
systemd-tmpfiles --root="$rootfs" --create rackboot.conf
systemctl --root="$rootfs" enable rackboot.service systemd-networkd.service \
    systemd-resolved.service systemd-timesyncd.service rackboot-config.service \
    rackboot-issue.timer ssh.service rackboot-healthy.service
# Each appliance makes its own SSH host keys at first boot (ssh.service.d/rackboot.conf).
rm -f "$rootfs"/etc/ssh/ssh_host_*
ln -sf ../run/systemd/resolve/stub-resolv.conf "$rootfs/etc/resolv.conf"
# Each appliance gets its own machine id (and random seed) at first boot.
: > "$rootfs/etc/machine-id"
rm -f "$rootfs/var/lib/dbus/machine-id" "$rootfs/var/lib/systemd/random-seed"
rm -rf "$rootfs/var/cache/apt/"*.bin "$rootfs/var/lib/apt/lists/"* "$rootfs/tmp/"* \
    "$rootfs/var/log/"*.log "$rootfs/var/cache/debconf/"*-old
mkdir -p "$rootfs/data" "$rootfs/var/log/journal" "$rootfs/boot/efi"

kernel=$(cd "$rootfs/boot" && ls vmlinuz-* | sort -V | tail -n 1)
kver=${kernel#vmlinuz-}
[ -f "$rootfs/boot/initrd.img-$kver" ] || { echo "build.sh: no initramfs for $kver" >&2; exit 1; }
# The kernel package keeps /vmlinuz and /initrd.img pointing at the newest kernel;
# make sure they exist (GRUB boots each slot through them).
[ -e "$rootfs/vmlinuz" ] || ln -sf "boot/vmlinuz-$kver" "$rootfs/vmlinuz"
[ -e "$rootfs/initrd.img" ] || ln -sf "boot/initrd.img-$kver" "$rootfs/initrd.img"

step "signing keys ($KEYS) and RAUC's keyring"
mkdir -p "$KEYS"
if [ ! -f "$KEYS/ca.cert.pem" ] || [ ! -f "$KEYS/signing.key.pem" ]; then
    # A build-time CA and a signing key it certifies (RAUC checks the chain to the CA).
    openssl req -x509 -newkey rsa:3072 -nodes -days 3650 -subj "/CN=rackboot appliance update CA" \
        -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
        -keyout "$KEYS/ca.key.pem" -out "$KEYS/ca.cert.pem" 2>/dev/null
    openssl req -newkey rsa:3072 -nodes -subj "/CN=rackboot appliance update signing" \
        -keyout "$KEYS/signing.key.pem" -out "$KEYS/signing.csr" 2>/dev/null
    printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n' >"$KEYS/signing.ext"
    openssl x509 -req -in "$KEYS/signing.csr" -CA "$KEYS/ca.cert.pem" -CAkey "$KEYS/ca.key.pem" \
        -CAcreateserial -days 3650 -extfile "$KEYS/signing.ext" -out "$KEYS/signing.cert.pem" 2>/dev/null
    chmod 0600 "$KEYS"/*.key.pem
fi
install -D -m 0644 "$KEYS/ca.cert.pem" "$rootfs/etc/rauc/keyring.pem"

# Version markers: the one rackboot reports, and the image's.
version=$("$RACKBOOT_BIN" --version | awk '{print $2}')
if [ -n "${RACKBOOT_BIN_V2:-}" ]; then
    version_v2=$("$RACKBOOT_BIN_V2" --version | awk '{print $2}')
    [ "$version" != "$version_v2" ] || { echo "build.sh: RACKBOOT_BIN_V2 reports the same version $version" >&2; exit 1; }
else
    version_v2=none
fi

# The disk's fixed identities: partition UUIDs (GRUB and the kernel find slots by them)
# and the ESP's FAT serial.
uuid() { cat /proc/sys/kernel/random/uuid; }
slot_a=$(uuid) slot_b=$(uuid) data_uuid=$(uuid)
esp_id=$(od -An -N4 -tx4 /dev/urandom | tr -d ' \n' | tr a-f A-F)
esp_uuid="${esp_id:0:4}-${esp_id:4:4}"
cat > "$rootfs/etc/fstab" <<EOF
# <file system> <mount point> <type> <options> <dump> <pass>
# The root is the slot GRUB booted (root=PARTUUID= on the kernel command line, rw).
PARTLABEL=esp /boot/efi vfat umask=0077,nofail 0 2
PARTLABEL=rackboot-data /data ext4 rw,x-systemd.growfs 0 2
/data/rackboot /var/lib/rackboot none bind,x-systemd.requires-mounts-for=/data 0 0
/data/journal /var/log/journal none bind,x-systemd.requires-mounts-for=/data 0 0
EOF

# One slot's root filesystem as a file: the tree with VERSION in /etc/rackboot-image.
root_mib=
slot_image() { # VERSION OUTFILE
    echo "$1" >"$rootfs/etc/rackboot-image"
    used_mib=$(du -s --block-size=1M "$rootfs" | cut -f1)
    root_mib=$((used_mib * 5 / 4 + 256))
    [ "$root_mib" -le "$SLOT_MIB" ] || { echo "build.sh: the root needs $root_mib MiB, a slot has $SLOT_MIB" >&2; exit 1; }
    rm -f "$2"
    # GRUB 2.06 reads neither orphan_file nor metadata_csum_seed: leave them off.
    mkfs.ext4 -q -F -L rackboot-root -b 4096 -T default -O ^orphan_file,^metadata_csum_seed \
        -d "$rootfs" "$2" "${root_mib}M" &
    wait $!
}

# A signed RAUC bundle of a slot image, with SHA256SUMS and its detached CMS signature
# (openssl cms, the same key) next to it, in DIR: what an update server serves.
bundle() { # VERSION SLOTIMAGE DIR
    local d=$WORK/bundle-$1 name="rackboot-appliance-$ARCH-$1.raucb"
    rm -rf "$d" "$3"
    mkdir -p "$d" "$3"
    ln "$2" "$d/rootfs.ext4"
    cat >"$d/manifest.raucm" <<EOF
[update]
compatible=$COMPATIBLE
version=$1

[bundle]
format=plain

[image.rootfs]
filename=rootfs.ext4
EOF
    rauc bundle --cert="$KEYS/signing.cert.pem" --key="$KEYS/signing.key.pem" \
        --keyring="$KEYS/ca.cert.pem" --mksquashfs-args="-comp zstd -Xcompression-level 6" \
        "$d" "$3/$name" >/dev/null &
    wait $!
    (cd "$3" && sha256sum "$name" >SHA256SUMS)
    openssl cms -sign -binary -in "$3/SHA256SUMS" -signer "$KEYS/signing.cert.pem" \
        -inkey "$KEYS/signing.key.pem" -outform DER -out "$3/SHA256SUMS.sig"
    cp "$KEYS/ca.cert.pem" "$3/ca.cert.pem"
    rm -rf "$d"
}

step "slot images and bundles: this version ($version); v2 ($version_v2), v3 (rackboot cannot start)"
slot_image "$version" "$WORK/root-v1.ext4"
root_v1_mib=$root_mib
bundle "$version" "$WORK/root-v1.ext4" "$UPDATES/release"
# The check's v2 and v3 (the update check), when a v2 binary is given.
if [ -n "${RACKBOOT_BIN_V2:-}" ]; then
    # v2: the same tree with the rackboot built with another version string.
    install -m 0755 "$RACKBOOT_BIN_V2" "$rootfs/usr/bin/rackboot"
    slot_image "$version_v2-image2" "$WORK/root-v2.ext4"
    # v3: v2 with a config rackboot refuses (an unknown key), so rackboot.service fails.
    v3_version="${version_v2}-image3-broken"
    printf '# The check'"'"'s v3: rackboot refuses this key, so it cannot start.\n[http]\nno_such_key = true\n' \
        >"$rootfs/etc/rackboot/rackboot.toml.d/05-broken.toml"
    slot_image "$v3_version" "$WORK/root-v3.ext4"
    bundle "$version_v2-image2" "$WORK/root-v2.ext4" "$UPDATES/v2"
    bundle "$v3_version" "$WORK/root-v3.ext4" "$UPDATES/v3"
    rm -f "$WORK/root-v2.ext4" "$WORK/root-v3.ext4"
else
    rm -rf "$UPDATES/v2" "$UPDATES/v3"
fi

step "ESP (shim, signed GRUB, A/B script, grubenv)"
esp=$WORK/esp.img
rm -f "$esp"
mkfs.vfat -F 32 -S 512 -s 1 -n ESP -i "$esp_id" -C "$esp" $((ESP_MIB * 1024)) >/dev/null
sed -e "s/@ESP_UUID@/$esp_uuid/g" -e "s/@CONSOLE@/$CONSOLE/g" -e "s/@SLOT_A@/$slot_a/g" -e "s/@SLOT_B@/$slot_b/g" \
    "$here/boot/esp-grub.cfg" > "$WORK/esp-grub.cfg"
# RAUC's GRUB backend keeps ORDER and <slot>_OK / <slot>_TRY here; GRUB's save_env
# rewrites the file in place, so it must exist at its full 1 KiB.
grub-editenv "$WORK/grubenv" create
grub-editenv "$WORK/grubenv" set ORDER="A B" A_OK=1 A_TRY=0 B_OK=0 B_TRY=0
mmd -i "$esp" ::/EFI ::/EFI/BOOT ::/EFI/debian
mcopy -i "$esp" "$SHIM" "::/EFI/BOOT/BOOT$EFI_UPPER.EFI"
mcopy -i "$esp" "$MOKMANAGER" "::/EFI/BOOT/mm$EFI_SUFFIX.efi"
mcopy -i "$esp" "$GRUB" "::/EFI/BOOT/grub$EFI_SUFFIX.efi"
mcopy -i "$esp" "$WORK/esp-grub.cfg" ::/EFI/debian/grub.cfg
mcopy -i "$esp" "$WORK/grubenv" ::/EFI/debian/grubenv

step "settings partition RACKBOOT-CFG (images/appliance/config)"
cfg=$WORK/cfg.img
rm -f "$cfg"
mkfs.fat -F 16 -n RACKBOOTCFG -C "$cfg" $((CFG_MIB * 1024)) >/dev/null
mcopy -s -i "$cfg" "$here/config/"* ::/

step "disk: GPT, ESP, settings, slot A, empty slot B, data"
esp_start=2048
esp_sectors=$((ESP_MIB * 2048))
cfg_start=$((esp_start + esp_sectors))
cfg_sectors=$((CFG_MIB * 2048))
a_start=$((cfg_start + cfg_sectors))
slot_sectors=$((SLOT_MIB * 2048))
b_start=$((a_start + slot_sectors))
data_start=$((b_start + slot_sectors))
data_sectors=$((DATA_MIB * 2048))
# + 1 MiB at the end for the backup GPT.
total=$(((data_start + data_sectors + 2048) * 512))
tmp=$OUT.tmp
rm -f "$tmp"
truncate -s "$total" "$tmp"
sfdisk -q "$tmp" <<EOF
label: gpt
first-lba: 2048
start=$esp_start, size=$esp_sectors, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name="esp"
start=$a_start, size=$slot_sectors, type=$ROOT_TYPE, uuid=$slot_a, name="rootA"
start=$cfg_start, size=$cfg_sectors, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7, name="RACKBOOT-CFG"
start=$b_start, size=$slot_sectors, type=$ROOT_TYPE, uuid=$slot_b, name="rootB"
start=$data_start, size=$data_sectors, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, uuid=$data_uuid, name="rackboot-data"
EOF
dd if="$esp" of="$tmp" bs=1M seek=1 conv=notrunc,sparse status=none
dd if="$cfg" of="$tmp" bs=512 seek=$cfg_start conv=notrunc,sparse status=none
dd if="$WORK/root-v1.ext4" of="$tmp" bs=1M seek=$((a_start / 2048)) conv=notrunc,sparse status=none &
wait $!
# The data partition: rackboot's state directory (owned by its user, as tmpfiles.d
# makes it) and the persistent journal.
data=$WORK/data
mkdir -p "$data/journal"
cp -a "$rootfs/var/lib/rackboot" "$data/rackboot"
mkfs.ext4 -q -F -L rackboot-data -b 4096 -O ^orphan_file,^metadata_csum_seed \
    -E offset=$((data_start * 512)) -d "$data" "$tmp" "${DATA_MIB}M"
mv "$tmp" "$OUT"
used_mib=$(du -s --block-size=1M "$rootfs" | cut -f1)
echo "arch=$ARCH kernel=$kver version=$version version_v2=$version_v2 rootfs_mib=$used_mib root_fs_mib=$root_v1_mib slot_mib=$SLOT_MIB root_offset=$((a_start * 512)) cfg_offset=$((cfg_start * 512)) image_bytes=$total"
