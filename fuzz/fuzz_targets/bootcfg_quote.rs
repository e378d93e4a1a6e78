//! Boot-config quoting of outside strings (kernel parameters, names): a quoted string
//! cannot break out of its place in a pxelinux, GRUB or iPXE config (no line breaks or
//! control characters, GRUB single quotes balanced and reversible, no iPXE `$`
//! expansion); kernel-parameter splitting is stable; MAC parsing round-trips.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rackboot::bootcfg::{split_params, Mac, Quote};

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    let plain: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();

    let p = Quote::Pxelinux(&s).to_string();
    assert!(!p.chars().any(char::is_control), "pxelinux: {p:?}");

    let g = Quote::Grub(&s).to_string();
    assert!(!g.chars().any(char::is_control), "grub: {g:?}");
    let inner = g
        .strip_prefix('\'')
        .and_then(|x| x.strip_suffix('\''))
        .unwrap_or_else(|| panic!("grub: not single-quoted: {g:?}"));
    // Outside the `'\''` sequences no quote may appear (it would end the word).
    let parts: Vec<&str> = inner.split("'\\''").collect();
    assert!(
        parts.iter().all(|x| !x.contains('\'')),
        "grub: stray quote in {g:?}"
    );
    assert_eq!(parts.join("'"), plain, "grub quoting is not reversible");

    let i = Quote::Ipxe(&s).to_string();
    assert!(
        !i.contains('$') && !i.chars().any(char::is_control),
        "ipxe: {i:?}"
    );

    let words = split_params(&s);
    assert!(words.iter().all(|w| !w.is_empty()));
    assert_eq!(split_params(&words.join(" ")), words, "split is not stable");

    if let Some(m) = Mac::parse(&s) {
        assert_eq!(Mac::parse(&m.to_string()), Some(m.clone()));
        assert_eq!(Mac::parse(&m.dashed()), Some(m));
    }
});
