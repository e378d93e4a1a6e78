//! TFTP file names → relative paths. Pure.
//!
//! `\` is treated as `/` (Windows-style clients), leading and repeated `/` collapse
//! (GRUB asks for `/grub/grub.cfg`), `.` segments drop, case is kept as sent. A `..`
//! segment or a control character is an access violation: nothing escapes the root.
//! (Symlinks pointing out of the root are refused where files are opened.)

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("empty file name")]
    Empty,
    #[error("file name leaves the root")]
    Escape,
    #[error("file name has control characters")]
    Control,
}

/// Cleans a requested file name into a relative path without `.`/`..` segments.
pub fn clean(name: &str) -> Result<String, PathError> {
    if name.chars().any(char::is_control) {
        return Err(PathError::Control);
    }
    let mut parts = Vec::new();
    for seg in name.split(['/', '\\']) {
        match seg {
            "" | "." => {}
            ".." => return Err(PathError::Escape),
            s => parts.push(s),
        }
    }
    if parts.is_empty() {
        return Err(PathError::Empty);
    }
    Ok(parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        assert_eq!(clean("/grub/grub.cfg").unwrap(), "grub/grub.cfg");
        assert_eq!(clean("//grubx64.efi").unwrap(), "grubx64.efi");
        assert_eq!(
            clean("pxelinux.cfg\\01-aa-bb").unwrap(),
            "pxelinux.cfg/01-aa-bb"
        );
        assert_eq!(clean("./a//./B").unwrap(), "a/B");
        assert_eq!(clean("../etc/passwd"), Err(PathError::Escape));
        assert_eq!(clean("a/../b"), Err(PathError::Escape));
        assert_eq!(clean("..\\..\\x"), Err(PathError::Escape));
        assert_eq!(clean("/"), Err(PathError::Empty));
        assert_eq!(clean("a\0b"), Err(PathError::Control));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(5000))]
        #[test]
        fn never_escapes(s in "[a-z./\\\\\\x00-\\x1f]{0,40}") {
            if let Ok(p) = clean(&s) {
                proptest::prop_assert!(!p.starts_with('/'));
                proptest::prop_assert!(!p.contains('\\'));
                proptest::prop_assert!(p.split('/').all(|seg| !seg.is_empty() && seg != "." && seg != ".."));
            }
        }
    }
}
