//! TFTP packets (RFC 1350, options RFC 2347): parse and serialise. Pure.
//!
//! Parsing never panics: truncated packets, missing NULs, unknown opcodes, bad UTF-8,
//! floods of options all come back as a [`ParseError`].

/// Opcodes.
pub const RRQ: u16 = 1;
pub const WRQ: u16 = 2;
pub const DATA: u16 = 3;
pub const ACK: u16 = 4;
pub const ERROR: u16 = 5;
pub const OACK: u16 = 6;

/// Most options a request may carry (RFC 2347 has no limit; real clients send ≤ 5).
pub const MAX_OPTIONS: usize = 32;

/// TFTP error codes.
pub mod code {
    pub const NOT_DEFINED: u16 = 0;
    pub const NOT_FOUND: u16 = 1;
    pub const ACCESS_VIOLATION: u16 = 2;
    pub const ILLEGAL_OPERATION: u16 = 4;
    pub const UNKNOWN_TID: u16 = 5;
    pub const OPTION_REFUSED: u16 = 8;
}

/// Transfer mode of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Octet,
    Netascii,
}

/// A read or write request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub filename: String,
    pub mode: Mode,
    /// Options in the order sent, names lowercased; duplicates dropped (first wins).
    pub options: Vec<(String, String)>,
}

/// A parsed packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Packet<'a> {
    Rrq(Request),
    Wrq(Request),
    Data { block: u16, data: &'a [u8] },
    Ack { block: u16 },
    Error { code: u16, message: String },
    Oack { options: Vec<(String, String)> },
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("packet too short")]
    Short,
    #[error("unknown opcode {0}")]
    Opcode(u16),
    #[error("string not terminated")]
    Unterminated,
    #[error("unsupported transfer mode {0:?}")]
    Mode(String),
    #[error("more than {MAX_OPTIONS} options")]
    TooManyOptions,
    #[error("option {0:?} has no value")]
    OptionWithoutValue(String),
}

/// Splits `buf` at NULs into strings (the last one must be terminated too).
fn strings(buf: &[u8]) -> Result<Vec<String>, ParseError> {
    let Some((&last, body)) = buf.split_last() else {
        return Err(ParseError::Short);
    };
    if last != 0 {
        return Err(ParseError::Unterminated);
    }
    let parts: Vec<String> = body
        .split(|b| *b == 0)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    if parts.len() > 2 + 2 * MAX_OPTIONS {
        return Err(ParseError::TooManyOptions);
    }
    Ok(parts)
}

fn options(parts: &[String]) -> Result<Vec<(String, String)>, ParseError> {
    let mut out: Vec<(String, String)> = Vec::new();
    for pair in parts.chunks(2) {
        let (name, value) = match pair {
            [name, value] => (name.to_ascii_lowercase(), value),
            [name] => return Err(ParseError::OptionWithoutValue(name.to_ascii_lowercase())),
            _ => continue, // chunks(2) yields one or two
        };
        if !out.iter().any(|(n, _)| *n == name) {
            out.push((name, value.clone()));
        }
    }
    Ok(out)
}

fn request(body: &[u8]) -> Result<Request, ParseError> {
    let parts = strings(body)?;
    let [filename, mode, opts @ ..] = parts.as_slice() else {
        return Err(ParseError::Unterminated);
    };
    let mode = match mode.to_ascii_lowercase().as_str() {
        "octet" => Mode::Octet,
        "netascii" => Mode::Netascii,
        other => return Err(ParseError::Mode(other.to_string())),
    };
    Ok(Request {
        filename: filename.clone(),
        mode,
        options: options(opts)?,
    })
}

/// Parses one datagram.
pub fn parse(buf: &[u8]) -> Result<Packet<'_>, ParseError> {
    let [op0, op1, body @ ..] = buf else {
        return Err(ParseError::Short);
    };
    let op = u16::from_be_bytes([*op0, *op1]);
    // The 16-bit field after the opcode (block or error code), and what follows it.
    let block = || -> Result<(u16, &[u8]), ParseError> {
        match body {
            [b0, b1, rest @ ..] => Ok((u16::from_be_bytes([*b0, *b1]), rest)),
            _ => Err(ParseError::Short),
        }
    };
    Ok(match op {
        RRQ => Packet::Rrq(request(body)?),
        WRQ => Packet::Wrq(request(body)?),
        DATA => {
            let (block, data) = block()?;
            Packet::Data { block, data }
        }
        ACK => Packet::Ack { block: block()?.0 },
        ERROR => {
            let (code, rest) = block()?;
            let message = rest
                .split(|b| *b == 0)
                .next()
                .map(|m| String::from_utf8_lossy(m).into_owned())
                .unwrap_or_default();
            Packet::Error { code, message }
        }
        OACK => {
            let parts = if body.is_empty() {
                vec![]
            } else {
                strings(body)?
            };
            Packet::Oack {
                options: options(&parts)?,
            }
        }
        other => return Err(ParseError::Opcode(other)),
    })
}

impl Packet<'_> {
    /// The packet on the wire. For any packet [`parse`] returned, parsing this gives
    /// the same packet back.
    pub fn to_bytes(&self) -> Vec<u8> {
        match self {
            Packet::Rrq(r) | Packet::Wrq(r) => {
                let op = if matches!(self, Packet::Rrq(_)) {
                    RRQ
                } else {
                    WRQ
                };
                let mode = match r.mode {
                    Mode::Octet => "octet",
                    Mode::Netascii => "netascii",
                };
                let mut v = op.to_be_bytes().to_vec();
                for s in [r.filename.as_str(), mode] {
                    v.extend_from_slice(s.as_bytes());
                    v.push(0);
                }
                put_options(&mut v, &r.options);
                v
            }
            Packet::Data { block, data } => {
                let mut v = Vec::with_capacity(4 + data.len());
                v.extend_from_slice(&DATA.to_be_bytes());
                v.extend_from_slice(&block.to_be_bytes());
                v.extend_from_slice(data);
                v
            }
            Packet::Ack { block } => ack(*block),
            Packet::Error { code, message } => error(*code, message),
            Packet::Oack { options } => oack(options),
        }
    }
}

fn put_options(v: &mut Vec<u8>, options: &[(String, String)]) {
    for (k, val) in options {
        v.extend_from_slice(k.as_bytes());
        v.push(0);
        v.extend_from_slice(val.as_bytes());
        v.push(0);
    }
}

/// Writes a DATA header for `block` into the first 4 bytes of `buf` (a shorter
/// `buf` is left alone: callers size their slots from `4 + blksize`).
pub fn data_header(buf: &mut [u8], block: u16) {
    if let Some(h) = buf.get_mut(..4) {
        let [d0, d1] = DATA.to_be_bytes();
        let [b0, b1] = block.to_be_bytes();
        h.copy_from_slice(&[d0, d1, b0, b1]);
    }
}

pub fn ack(block: u16) -> Vec<u8> {
    let mut v = ACK.to_be_bytes().to_vec();
    v.extend_from_slice(&block.to_be_bytes());
    v
}

pub fn error(code: u16, message: &str) -> Vec<u8> {
    let mut v = ERROR.to_be_bytes().to_vec();
    v.extend_from_slice(&code.to_be_bytes());
    v.extend_from_slice(message.as_bytes());
    v.push(0);
    v
}

pub fn oack(options: &[(String, String)]) -> Vec<u8> {
    let mut v = OACK.to_be_bytes().to_vec();
    put_options(&mut v, options);
    v
}

/// A request packet (for tests and clients).
pub fn rrq(filename: &str, mode: &str, options: &[(&str, &str)]) -> Vec<u8> {
    let mut v = RRQ.to_be_bytes().to_vec();
    for s in [filename, mode] {
        v.extend_from_slice(s.as_bytes());
        v.push(0);
    }
    for (k, val) in options {
        v.extend_from_slice(k.as_bytes());
        v.push(0);
        v.extend_from_slice(val.as_bytes());
        v.push(0);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_options() {
        let p = rrq(
            "/grub/grub.cfg",
            "OCTET",
            &[("BlkSize", "1468"), ("tsize", "0"), ("blksize", "8")],
        );
        let Ok(Packet::Rrq(r)) = parse(&p) else {
            panic!()
        };
        assert_eq!(r.filename, "/grub/grub.cfg");
        assert_eq!(r.mode, Mode::Octet);
        assert_eq!(
            r.options,
            vec![
                ("blksize".into(), "1468".into()),
                ("tsize".into(), "0".into())
            ]
        );
        assert_eq!(
            parse(&rrq("x", "mail", &[])),
            Err(ParseError::Mode("mail".into()))
        );
        assert_eq!(parse(b"\x00\x01abc"), Err(ParseError::Unterminated));
        assert_eq!(parse(b"\x00\x09"), Err(ParseError::Opcode(9)));
        assert_eq!(parse(b"\x00"), Err(ParseError::Short));
        assert_eq!(parse(b"\x00\x04\x00"), Err(ParseError::Short));
        let many: Vec<(String, String)> = (0..1000)
            .map(|i| (format!("o{i}"), "1".to_string()))
            .collect();
        let refs: Vec<(&str, &str)> = many.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        assert_eq!(
            parse(&rrq("x", "octet", &refs)),
            Err(ParseError::TooManyOptions)
        );
    }

    #[test]
    fn round_trips() {
        assert_eq!(parse(&ack(65535)), Ok(Packet::Ack { block: 65535 }));
        assert_eq!(
            parse(&error(1, "file not found")),
            Ok(Packet::Error {
                code: 1,
                message: "file not found".into()
            })
        );
        let o = vec![("blksize".to_string(), "1468".to_string())];
        assert_eq!(parse(&oack(&o)), Ok(Packet::Oack { options: o }));
        let mut d = vec![0u8; 8];
        data_header(&mut d, 7);
        d[4..].copy_from_slice(b"abcd");
        assert_eq!(
            parse(&d),
            Ok(Packet::Data {
                block: 7,
                data: b"abcd"
            })
        );
    }

    use proptest::prelude::*;

    /// Strings as they appear in packets: no NUL (it ends them), anything else,
    /// including non-ASCII and control characters.
    fn field() -> impl Strategy<Value = String> {
        "[^\\x00]{0,24}"
    }

    /// Options in parsed (canonical) form: lowercase names, first of each name only.
    fn options(max: usize) -> impl Strategy<Value = Vec<(String, String)>> {
        proptest::collection::vec(("[a-z0-9_]{0,12}", field()), 0..=max).prop_map(|v| {
            let mut out: Vec<(String, String)> = Vec::new();
            for (k, val) in v {
                if !out.iter().any(|(n, _)| *n == k) {
                    out.push((k, val));
                }
            }
            out
        })
    }

    fn request() -> impl Strategy<Value = Request> {
        (field(), any::<bool>(), options(MAX_OPTIONS)).prop_map(|(filename, octet, options)| {
            Request {
                filename,
                mode: if octet { Mode::Octet } else { Mode::Netascii },
                options,
            }
        })
    }

    /// Datagrams that look like TFTP: a known or unknown opcode, then NUL-separated
    /// fields (sometimes unterminated), sometimes more than the option limit.
    fn tftp_like() -> impl Strategy<Value = Vec<u8>> {
        (
            0u16..9,
            proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..12), 0..80),
            any::<bool>(),
        )
            .prop_map(|(op, fields, terminate)| {
                let mut v = op.to_be_bytes().to_vec();
                for (i, f) in fields.iter().enumerate() {
                    v.extend(f.iter().filter(|b| **b != 0));
                    if terminate || i + 1 < fields.len() {
                        v.push(0);
                    }
                }
                v
            })
    }

    proptest! {
        #![proptest_config(crate::tftp::fuzz_config(20_000))]

        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1200)) {
            let _ = parse(&bytes);
        }

        /// Whatever parses, serialises back to something that parses the same.
        #[test]
        fn parsed_packets_round_trip(bytes in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..600),
            tftp_like(),
        ]) {
            if let Ok(p) = parse(&bytes) {
                let again = p.to_bytes();
                prop_assert_eq!(parse(&again), Ok(p));
            }
        }
    }

    proptest! {
        #![proptest_config(crate::tftp::fuzz_config(5_000))]

        /// Every packet the builders make parses back to itself.
        #[test]
        fn built_packets_round_trip(
            req in request(),
            block in any::<u16>(),
            data in proptest::collection::vec(any::<u8>(), 0..1500),
            code in any::<u16>(),
            message in field(),
            oack_opts in options(MAX_OPTIONS),
        ) {
            let packets = [
                Packet::Rrq(req.clone()),
                Packet::Wrq(req.clone()),
                Packet::Data { block, data: &data },
                Packet::Ack { block },
                Packet::Error { code, message: message.clone() },
                Packet::Oack { options: oack_opts.clone() },
            ];
            for p in packets {
                let bytes = p.to_bytes();
                prop_assert_eq!(parse(&bytes), Ok(p.clone()));
            }
            // The dedicated builders agree with `to_bytes`.
            prop_assert_eq!(ack(block), Packet::Ack { block }.to_bytes());
            prop_assert_eq!(error(code, &message), Packet::Error { code, message: message.clone() }.to_bytes());
            let refs: Vec<(&str, &str)> = req.options.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
            let mode = if req.mode == Mode::Octet { "octet" } else { "netascii" };
            prop_assert_eq!(rrq(&req.filename, mode, &refs), Packet::Rrq(req.clone()).to_bytes());
        }

    }

    proptest! {
        #![proptest_config(crate::tftp::fuzz_config(256))]

        /// More options than the limit is an error, never a panic or a huge allocation.
        #[test]
        fn option_floods_are_refused(n in (MAX_OPTIONS + 1)..2000) {
            let many: Vec<(String, String)> = (0..n).map(|i| (format!("o{i}"), "1".to_string())).collect();
            let refs: Vec<(&str, &str)> = many.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
            let bytes = rrq("x", "octet", &refs);
            prop_assert_eq!(parse(&bytes), Err(ParseError::TooManyOptions));
        }

        #[test]
        fn requests_round_trip(name in "[a-zA-Z0-9/._-]{1,40}", bs in 8u32..65464, ws in 1u32..100) {
            let (b, w) = (bs.to_string(), ws.to_string());
            let p = rrq(&name, "octet", &[("blksize", &b), ("windowsize", &w)]);
            let Ok(Packet::Rrq(r)) = parse(&p) else { panic!("not parsed") };
            prop_assert_eq!(r.filename, name);
            prop_assert_eq!(r.options, vec![("blksize".to_string(), b), ("windowsize".to_string(), w)]);
        }
    }
}
