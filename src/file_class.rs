//! What kind of file a served path is (kernel, initrd, …): the label of the per-class
//! counters. A leaf both transports (`http`, `tftp`) use, so they count by class without
//! reaching up into `serve::metrics`, which only reads the counters.

use std::ops::Index;
use std::sync::atomic::AtomicU64;

/// The class of a served file; also the index of its slot in [`ClassCounters`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileClass {
    Kernel,
    Initrd,
    Squashfs,
    Bootloader,
    Config,
    Other,
}

impl FileClass {
    /// Every class, in counter order.
    pub const ALL: [FileClass; 6] = [
        FileClass::Kernel,
        FileClass::Initrd,
        FileClass::Squashfs,
        FileClass::Bootloader,
        FileClass::Config,
        FileClass::Other,
    ];

    /// The class of a path of the snapshot (or of a dynamic boot config).
    pub fn of(path: &str) -> FileClass {
        let name = path.rsplit('/').next().unwrap_or(path);
        match name {
            "boot-kernel" => FileClass::Kernel,
            "boot-initrd" => FileClass::Initrd,
            "squashfs" => FileClass::Squashfs,
            _ if name.starts_with("grub.cfg")
                || name.starts_with("ipxe.cfg")
                || name.ends_with(".ipxe")
                || name.ends_with(".lst")
                || path.starts_with("pxelinux.cfg/") =>
            {
                FileClass::Config
            }
            _ if name.ends_with(".efi")
                || name.ends_with(".0")
                || name.ends_with(".c32")
                || name.ends_with(".mod")
                || path.starts_with("bootloader/") =>
            {
                FileClass::Bootloader
            }
            _ => FileClass::Other,
        }
    }

    /// The `class` label value in `/metrics`.
    pub fn label(self) -> &'static str {
        match self {
            FileClass::Kernel => "kernel",
            FileClass::Initrd => "initrd",
            FileClass::Squashfs => "squashfs",
            FileClass::Bootloader => "bootloader",
            FileClass::Config => "config",
            FileClass::Other => "other",
        }
    }
}

/// One counter per [`FileClass`], indexed by the class.
pub type ClassCounters = [AtomicU64; FileClass::ALL.len()];

/// The counter of `class` (no indexing: the modules that deny panics use this).
pub fn counter(counters: &ClassCounters, class: FileClass) -> &AtomicU64 {
    let [kernel, initrd, squashfs, bootloader, config, other] = counters;
    match class {
        FileClass::Kernel => kernel,
        FileClass::Initrd => initrd,
        FileClass::Squashfs => squashfs,
        FileClass::Bootloader => bootloader,
        FileClass::Config => config,
        FileClass::Other => other,
    }
}

impl Index<FileClass> for ClassCounters {
    type Output = AtomicU64;

    fn index(&self, class: FileClass) -> &AtomicU64 {
        counter(self, class)
    }
}

#[cfg(test)]
mod tests {
    use super::FileClass;

    #[test]
    fn classes_of_paths() {
        let cases = [
            (
                "ubuntu/amd64/ga-24.04/noble/stable/boot-kernel",
                FileClass::Kernel,
            ),
            (
                "ubuntu/amd64/ga-24.04/noble/stable/boot-initrd",
                FileClass::Initrd,
            ),
            (
                "ubuntu/amd64/ga-24.04/noble/stable/squashfs",
                FileClass::Squashfs,
            ),
            ("grub/grub.cfg-01-52-54-00-12-34-56", FileClass::Config),
            ("pxelinux.cfg/default", FileClass::Config),
            ("boot.ipxe", FileClass::Config),
            ("bootx64.efi", FileClass::Bootloader),
            ("pxelinux.0", FileClass::Bootloader),
            ("bootloader/uefi/amd64/grubx64.efi", FileClass::Bootloader),
            ("streams/v1/index.json", FileClass::Other),
        ];
        for (path, class) in cases {
            assert_eq!(FileClass::of(path), class, "{path}");
        }
        for (i, c) in FileClass::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
    }
}
