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
            _ if CONFIG.marks(path, name) => FileClass::Config,
            _ if BOOTLOADER.marks(path, name) => FileClass::Bootloader,
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

/// What makes a path a config or a bootloader: its file name starts or ends with one
/// of these, or the path is under `dir`.
struct Marks {
    name_starts: &'static [&'static str],
    name_ends: &'static [&'static str],
    dir: &'static str,
}

const CONFIG: Marks = Marks {
    name_starts: &["grub.cfg", "ipxe.cfg"],
    name_ends: &[".ipxe", ".lst"],
    dir: "pxelinux.cfg/",
};

const BOOTLOADER: Marks = Marks {
    name_starts: &[],
    name_ends: &[".efi", ".0", ".c32", ".mod"],
    dir: "bootloader/",
};

impl Marks {
    fn marks(&self, path: &str, name: &str) -> bool {
        self.name_starts.iter().any(|p| name.starts_with(p))
            || self.name_ends.iter().any(|s| name.ends_with(s))
            || path.starts_with(self.dir)
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
