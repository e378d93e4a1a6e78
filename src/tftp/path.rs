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
        use PathError::{Control, Empty, Escape};
        let cases = [
            ("/grub/grub.cfg", Ok("grub/grub.cfg")),
            ("//grubx64.efi", Ok("grubx64.efi")),
            ("pxelinux.cfg\\01-aa-bb", Ok("pxelinux.cfg/01-aa-bb")),
            ("./a//./B", Ok("a/B")),
            ("../etc/passwd", Err(Escape)),
            ("a/../b", Err(Escape)),
            ("..\\..\\x", Err(Escape)),
            ("/", Err(Empty)),
            ("a\0b", Err(Control)),
        ];
        for (name, want) in cases {
            assert_eq!(clean(name), want.map(String::from), "{name:?}");
        }
    }

    use proptest::prelude::*;

    /// Names built from the pieces that matter (separators of both kinds, `.` and
    /// `..`, case, non-ASCII, control characters), plus arbitrary strings.
    fn name() -> impl Strategy<Value = String> {
        const PIECES: &[&str] = &[
            "/", "\\", "//", ".", "..", "...", "..a", "grub", "Grub.CFG", "é", " ",
        ];
        // Each piece as likely as each pattern.
        prop_oneof![
            proptest::collection::vec(
                prop_oneof![
                    PIECES.len() as u32 => proptest::sample::select(PIECES).prop_map(String::from),
                    1 => "[\\x00-\\x1f\\x7f]",
                    1 => "[a-zA-Z0-9._-]{1,6}",
                ],
                0..16,
            )
            .prop_map(|v| v.concat()),
            any::<String>(),
            "[a-z./\\\\\\x00-\\x1f]{0,40}",
        ]
    }

    /// The segments a name has once `\` counts as `/`, empty and `.` ones dropped.
    fn segments(s: &str) -> Vec<&str> {
        s.split(['/', '\\'])
            .filter(|seg| !seg.is_empty() && *seg != ".")
            .collect()
    }

    proptest! {
        #![proptest_config(crate::tftp::fuzz_config(20_000))]

        #[test]
        fn never_escapes(s in name()) {
            if let Ok(p) = clean(&s) {
                prop_assert!(!p.is_empty());
                prop_assert!(!p.starts_with('/'), "absolute: {p:?}");
                prop_assert!(!p.contains('\\'), "backslash: {p:?}");
                prop_assert!(!p.chars().any(char::is_control), "control: {p:?}");
                prop_assert!(
                    p.split('/').all(|seg| !seg.is_empty() && seg != "." && seg != ".."),
                    "bad segment in {p:?}"
                );
            }
        }

        #[test]
        fn a_dotdot_segment_is_always_refused(s in name()) {
            if segments(&s).contains(&"..") {
                prop_assert!(clean(&s).is_err());
            }
        }

        /// Segments come out as sent (case, bytes), only separators are normalised.
        #[test]
        fn keeps_segments_and_normalises_separators(s in name()) {
            match clean(&s) {
                Ok(p) => prop_assert_eq!(p.split('/').collect::<Vec<_>>(), segments(&s)),
                Err(PathError::Empty) => prop_assert!(segments(&s).is_empty()),
                Err(PathError::Escape) => prop_assert!(segments(&s).contains(&"..")),
                Err(PathError::Control) => prop_assert!(s.chars().any(char::is_control)),
            }
        }

        #[test]
        fn idempotent(s in name()) {
            if let Ok(p) = clean(&s) {
                prop_assert_eq!(clean(&p), Ok(p.clone()));
            }
        }

        /// `\` is `/`; leading, repeated and `.` separators change nothing.
        #[test]
        fn separator_spellings_are_equivalent(s in name()) {
            let want = clean(&s);
            prop_assert_eq!(clean(&s.replace('\\', "/")), want.clone());
            prop_assert_eq!(clean(&s.replace('/', "//")), want.clone());
            prop_assert_eq!(clean(&format!("/{s}")), want.clone());
            prop_assert_eq!(clean(&format!("\\\\./{s}")), want);
        }
    }
}
