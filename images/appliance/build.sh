#!/bin/bash
# Builds the rackboot appliance: a bootable raw GPT disk image for amd64 UEFI machines.
# Run by `cargo xtask image` (which installs the tools and builds the binary); as root.
#
#   RACKBOOT_BIN  the static rackboot binary (`cargo xtask dist`)
#   OUT           the image to write (written as OUT.tmp, renamed when complete)
#   WORK          a scratch directory (emptied first)
#   MIRROR        Debian mirror (default http://deb.debian.org/debian)
#   SECURITY_MIRROR  (default http://deb.debian.org/debian-security)
#
# Layout: partition 1 is a 64 MiB ESP with shim (/EFI/BOOT/BOOTX64.EFI), Debian's
# signed GRUB and a grub.cfg that finds the root filesystem by UUID; partition 2 is the
# ext4 root (GPT type "Linux root x86-64", grown over the disk at first boot by
# systemd-repart + x-systemd.growfs); partition 3, placed between the two so the root
# stays last and can grow, is the 32 MiB FAT settings partition (GPT name RACKBOOT-CFG,
# type "Microsoft basic data" so any laptop shows it, FAT label RACKBOOTCFG: FAT labels
# hold 11 characters) seeded from images/appliance/config/. Nothing is mounted and no loop device is used:
# the root filesystem is written by `mkfs.ext4 -d` at the partition's offset and the
# ESP by mtools, so a failed build leaves nothing behind but files.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
: "${RACKBOOT_BIN:?RACKBOOT_BIN is not set}" "${OUT:?OUT is not set}" "${WORK:?WORK is not set}"
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${SECURITY_MIRROR:-http://deb.debian.org/debian-security}
ESP_MIB=64
CFG_MIB=32
SHIM=/usr/lib/shim/shimx64.efi.signed
MOKMANAGER=/usr/lib/shim/mmx64.efi.signed
GRUB=/usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed

step() { echo "== $*" >&2; }

# `cargo xtask image` starts this script as the leader of its own process group, with
# SIGTERM as its parent-death signal: pass a SIGTERM or SIGINT on to the whole group
# (mmdebstrap then unmounts what it mounted in the chroot). Long steps run in the
# background + `wait` so the trap runs at once.
trap 'trap - TERM INT; kill -TERM 0 2>/dev/null; exit 143' TERM INT

for f in "$RACKBOOT_BIN" "$SHIM" "$MOKMANAGER" "$GRUB"; do
    [ -f "$f" ] || { echo "build.sh: $f is missing" >&2; exit 1; }
done

rm -rf "$WORK"
mkdir -p "$WORK"
rootfs=$WORK/rootfs
packages=$(sed 's/#.*//' "$here/packages.txt" | xargs | tr ' ' ,)

step "mmdebstrap bookworm: $packages"
# bookworm-backports only for what bookworm lacks (ubuntu-keyring): its default
# priority (100) keeps every other package on bookworm.
# The initramfs settings go in before the kernel package builds its first initramfs.
mmdebstrap --variant=apt --format=directory \
    --aptopt='APT::Install-Recommends "false"' \
    --dpkgopt="$here/dpkg.cfg" \
    --include="$packages" \
    --setup-hook='mkdir -p "$1/etc/initramfs-tools/conf.d"' \
    --setup-hook="copy-in $here/rootfs/etc/initramfs-tools/conf.d/rackboot.conf /etc/initramfs-tools/conf.d" \
    bookworm "$rootfs" \
    "deb $MIRROR bookworm main" \
    "deb $MIRROR bookworm-updates main" \
    "deb $SECURITY_MIRROR bookworm-security main" \
    "deb $MIRROR bookworm-backports main" &
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

step "users, directories, enabled units"
systemd-sysusers --root="$rootfs"
systemd-tmpfiles --root="$rootfs" --create rackboot.conf
systemctl --root="$rootfs" enable rackboot.service systemd-networkd.service \
    systemd-resolved.service systemd-timesyncd.service rackboot-config.service \
    rackboot-issue.timer ssh.service
# Each appliance makes its own SSH host keys at first boot (ssh.service.d/rackboot.conf).
rm -f "$rootfs"/etc/ssh/ssh_host_*
ln -sf ../run/systemd/resolve/stub-resolv.conf "$rootfs/etc/resolv.conf"
# Each appliance gets its own machine id (and random seed) at first boot.
: > "$rootfs/etc/machine-id"
rm -f "$rootfs/var/lib/dbus/machine-id" "$rootfs/var/lib/systemd/random-seed"
rm -rf "$rootfs/var/cache/apt/"*.bin "$rootfs/var/lib/apt/lists/"* "$rootfs/tmp/"* \
    "$rootfs/var/log/"*.log "$rootfs/var/cache/debconf/"*-old

kernel=$(cd "$rootfs/boot" && ls vmlinuz-* | sort -V | tail -n 1)
kver=${kernel#vmlinuz-}
[ -f "$rootfs/boot/initrd.img-$kver" ] || { echo "build.sh: no initramfs for $kver" >&2; exit 1; }
# The kernel package keeps /vmlinuz and /initrd.img pointing at the newest kernel;
# make sure they exist (GRUB boots through them).
[ -e "$rootfs/vmlinuz" ] || ln -sf "boot/vmlinuz-$kver" "$rootfs/vmlinuz"
[ -e "$rootfs/initrd.img" ] || ln -sf "boot/initrd.img-$kver" "$rootfs/initrd.img"

root_uuid=$(cat /proc/sys/kernel/random/uuid)
esp_id=$(od -An -N4 -tx4 /dev/urandom | tr -d ' \n' | tr a-f A-F)
esp_uuid="${esp_id:0:4}-${esp_id:4:4}"
cat > "$rootfs/etc/fstab" <<EOF
# <file system> <mount point> <type> <options> <dump> <pass>
UUID=$root_uuid / ext4 rw,errors=remount-ro,x-systemd.growfs 0 1
UUID=$esp_uuid /boot/efi vfat umask=0077,nofail 0 2
EOF
mkdir -p "$rootfs/boot/efi" "$rootfs/boot/grub"
sed "s/@ROOT_UUID@/$root_uuid/g" "$here/boot/grub.cfg" > "$rootfs/boot/grub/grub.cfg"

step "ESP (shim, signed GRUB)"
esp=$WORK/esp.img
rm -f "$esp"
mkfs.vfat -F 32 -S 512 -s 1 -n ESP -i "$esp_id" -C "$esp" $((ESP_MIB * 1024)) >/dev/null
sed "s/@ROOT_UUID@/$root_uuid/g" "$here/boot/esp-grub.cfg" > "$WORK/esp-grub.cfg"
mmd -i "$esp" ::/EFI ::/EFI/BOOT ::/EFI/debian
mcopy -i "$esp" "$SHIM" ::/EFI/BOOT/BOOTX64.EFI
mcopy -i "$esp" "$MOKMANAGER" ::/EFI/BOOT/mmx64.efi
mcopy -i "$esp" "$GRUB" ::/EFI/BOOT/grubx64.efi
mcopy -i "$esp" "$WORK/esp-grub.cfg" ::/EFI/debian/grub.cfg

step "settings partition RACKBOOT-CFG (images/appliance/config)"
cfg=$WORK/cfg.img
rm -f "$cfg"
mkfs.fat -F 16 -n RACKBOOTCFG -C "$cfg" $((CFG_MIB * 1024)) >/dev/null
mcopy -s -i "$cfg" "$here/config/"* ::/

step "disk: GPT, ESP, settings, root filesystem"
used_mib=$(du -s --block-size=1M "$rootfs" | cut -f1)
root_mib=$((used_mib * 5 / 4 + 256))
esp_start=2048
esp_sectors=$((ESP_MIB * 2048))
cfg_start=$((esp_start + esp_sectors))
cfg_sectors=$((CFG_MIB * 2048))
root_start=$((cfg_start + cfg_sectors))
root_sectors=$((root_mib * 2048))
# + 1 MiB at the end for the backup GPT.
total=$(((root_start + root_sectors + 2048) * 512))
tmp=$OUT.tmp
rm -f "$tmp"
truncate -s "$total" "$tmp"
sfdisk -q "$tmp" <<EOF
label: gpt
first-lba: 2048
start=$esp_start, size=$esp_sectors, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name="esp"
start=$root_start, size=$root_sectors, type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, name="root"
start=$cfg_start, size=$cfg_sectors, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7, name="RACKBOOT-CFG"
EOF
dd if="$esp" of="$tmp" bs=1M seek=1 conv=notrunc,sparse status=none
dd if="$cfg" of="$tmp" bs=512 seek=$cfg_start conv=notrunc,sparse status=none
# GRUB 2.06 reads neither orphan_file nor metadata_csum_seed: leave them off.
mkfs.ext4 -q -F -L rackboot-root -U "$root_uuid" -b 4096 -T default \
    -O ^orphan_file,^metadata_csum_seed \
    -E offset=$((root_start * 512)) -d "$rootfs" "$tmp" "${root_mib}M" &
wait $!
mv "$tmp" "$OUT"
echo "kernel=$kver root_uuid=$root_uuid rootfs_mib=$used_mib root_fs_mib=$root_mib root_offset=$((root_start * 512)) cfg_offset=$((cfg_start * 512)) image_bytes=$total"
