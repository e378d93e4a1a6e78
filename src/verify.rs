//! OpenPGP verification of clearsigned SimpleStreams documents (sequoia-openpgp).
//!
//! Only this module can make a [`Verified`] value: either the signed text of a document
//! whose signature checked out against the source's keyring, or the text of a document
//! from a source the operator explicitly marked unsigned. Everything downstream
//! (selection, planning) only ever sees `Verified` documents.
//!
//! Policy: the certificates in the keyring may carry SHA-1 self-signatures (the real
//! `ubuntu-cloudimage-keyring.gpg` keys do), but the signature over the data must use
//! SHA-256 or stronger. A document is accepted when a signature by a keyring key is
//! good and no signature by a keyring key is bad (as gpgv does). The signing key must
//! be alive and unrevoked now, not only when it signed: an old document signed
//! before the key expired is refused.

use std::io::Read;
use std::path::Path;
use std::time::SystemTime;

use sequoia_openpgp as openpgp;

use openpgp::cert::amalgamation::ValidAmalgamation as _;
use openpgp::cert::CertParser;
use openpgp::parse::stream::{
    MessageLayer, MessageStructure, VerificationError, VerificationHelper, VerifierBuilder,
};
use openpgp::parse::Parse;
use openpgp::policy::{HashAlgoSecurity, StandardPolicy};
use openpgp::types::HashAlgorithm;
use openpgp::{Cert, KeyHandle};

const CLEARSIGN_HEADER: &[u8] = b"-----BEGIN PGP SIGNED MESSAGE-----";

/// Why a signed document was refused. The caller adds the URL.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("not a clearsigned document (no \"-----BEGIN PGP SIGNED MESSAGE-----\" header)")]
    NotClearsigned,
    #[error("signed by an unknown key {0} (not in the keyring)")]
    UnknownKey(String),
    #[error("bad signature by key {key}: {reason}")]
    BadSignature { key: String, reason: String },
    #[error("signing key {key} is not valid: {reason}")]
    BadKey { key: String, reason: String },
    #[error("data signature uses {0}, which is too weak (SHA-256 or stronger required)")]
    WeakHash(HashAlgorithm),
    #[error("malformed signature: {0}")]
    Malformed(String),
    #[error("signed text is not UTF-8")]
    NotUtf8,
}

/// A keyring error (config problem): names the file.
#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    // Not a `source` field: the message already carries it, and a source would make
    // the error chain print it a second time.
    #[error("cannot read keyring {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("keyring {origin} is not an OpenPGP keyring: {reason}")]
    Parse { origin: String, reason: String },
    #[error("keyring {0} holds no certificates")]
    Empty(String),
}

/// The certificates trusted for one boot source.
#[derive(Clone, Debug)]
pub struct Keyring {
    certs: Vec<Cert>,
}

impl Keyring {
    /// Loads a binary or ASCII-armored keyring file.
    pub fn from_file(path: &Path) -> Result<Keyring, KeyringError> {
        let bytes = std::fs::read(path).map_err(|error| KeyringError::Read {
            path: path.display().to_string(),
            error,
        })?;
        Keyring::from_bytes(&bytes, &path.display().to_string())
    }

    /// Parses keyring bytes; `origin` names them in errors.
    pub fn from_bytes(bytes: &[u8], origin: &str) -> Result<Keyring, KeyringError> {
        let parse_err = |e: anyhow::Error| KeyringError::Parse {
            origin: origin.to_string(),
            reason: format!("{e:#}"),
        };
        let mut certs = Vec::new();
        for cert in CertParser::from_bytes(bytes).map_err(parse_err)? {
            certs.push(cert.map_err(parse_err)?);
        }
        if certs.is_empty() {
            return Err(KeyringError::Empty(origin.to_string()));
        }
        Ok(Keyring { certs })
    }

    /// Fingerprints of the certificates, for logs and status.
    pub fn fingerprints(&self) -> Vec<String> {
        self.certs
            .iter()
            .map(|c| c.fingerprint().to_hex())
            .collect()
    }

    /// Number of certificates whose primary key is valid under rackboot's policy now.
    pub fn usable_certs(&self, now: SystemTime) -> usize {
        let policy = policy();
        self.certs
            .iter()
            .filter(|c| c.with_policy(&policy, now).is_ok())
            .count()
    }
}

/// A document whose content rackboot may trust: signature verified, or the source
/// was configured unsigned by the operator.
#[derive(Clone, Debug)]
pub struct Verified<T> {
    inner: T,
    signer: Option<String>,
}

impl<T> Verified<T> {
    pub fn get(&self) -> &T {
        &self.inner
    }
    /// Fingerprint of the key that signed it, `None` for an unsigned source.
    pub fn signer(&self) -> Option<&str> {
        self.signer.as_deref()
    }
    /// Carries the trust over to a value derived (purely) from the verified one.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Verified<U> {
        Verified {
            inner: f(self.inner),
            signer: self.signer,
        }
    }
    /// Same as [`Verified::map`] for a fallible derivation (parsing).
    pub fn try_map<U, E>(self, f: impl FnOnce(T) -> Result<U, E>) -> Result<Verified<U>, E> {
        Ok(Verified {
            inner: f(self.inner)?,
            signer: self.signer,
        })
    }
}

/// Marker that the operator configured a source as unsigned; only the config loader
/// constructs it.
#[derive(Clone, Copy, Debug)]
pub struct UnsignedSource(pub(crate) ());

/// The unsigned-source marker for the fuzz targets (`fuzz/`), which drive parse →
/// select → plan without signing every input. Only `cargo fuzz` builds (`--cfg
/// fuzzing`) have it.
#[cfg(fuzzing)]
pub fn unsigned_for_fuzzing() -> UnsignedSource {
    UnsignedSource(())
}

/// Accepts the text of a document from an explicitly unsigned source.
pub fn accept_unsigned(text: String, _proof: UnsignedSource) -> Verified<String> {
    Verified {
        inner: text,
        signer: None,
    }
}

/// The text of a clearsigned document *without checking its signature* (what
/// `rackboot mirror --no-verify` asks for): it must still start with the clearsign
/// header; armor headers are skipped and dash-escaped lines (`- -…`) unescaped.
pub fn clearsigned_text(data: &[u8]) -> Result<String, VerifyError> {
    let text = std::str::from_utf8(data).map_err(|_| VerifyError::NotUtf8)?;
    let mut lines = text.trim_start().lines();
    if lines.next().map(str::trim_end) != Some("-----BEGIN PGP SIGNED MESSAGE-----") {
        return Err(VerifyError::NotClearsigned);
    }
    // Armor headers ("Hash: SHA512") end at the first empty line.
    for line in lines.by_ref() {
        if line.trim_end().is_empty() {
            break;
        }
    }
    let mut body = Vec::new();
    for line in lines {
        if line.trim_end() == "-----BEGIN PGP SIGNATURE-----" {
            return Ok(body.join("\n"));
        }
        body.push(line.strip_prefix("- ").unwrap_or(line));
    }
    Err(VerifyError::Malformed("no signature block".into()))
}

/// sequoia's standard policy, relaxed for SHA-1 only where certificate self-signatures
/// need it (see the module docs); the data signature is checked separately.
fn policy() -> StandardPolicy<'static> {
    let mut p = StandardPolicy::new();
    p.accept_hash_property(
        HashAlgorithm::SHA1,
        HashAlgoSecurity::SecondPreImageResistance,
    );
    p.accept_hash_property(HashAlgorithm::SHA1, HashAlgoSecurity::CollisionResistance);
    p
}

struct Helper<'a> {
    certs: &'a [Cert],
    policy: &'a StandardPolicy<'static>,
    now: SystemTime,
    /// Written by `check`; outlives the verifier, which drops the helper on failure.
    outcome: &'a mut Option<Result<String, VerifyError>>,
}

fn key_name(sig: &openpgp::packet::Signature) -> String {
    sig.get_issuers()
        .first()
        .map(|h| h.to_hex())
        .unwrap_or_else(|| "<no issuer>".to_string())
}

impl Helper<'_> {
    /// A good signature's key must also be usable *now*: sequoia judges a key at the
    /// time of the signature, so a key that expired (or was revoked) since would
    /// still pass. Refused here: expiry is how a publisher retires a key, and an old
    /// document signed while it lived is what a replaying man in the middle holds.
    fn alive_now(&self, good: &openpgp::parse::stream::GoodChecksum) -> Result<(), VerifyError> {
        let fpr = good.ka.key().fingerprint();
        let bad = |reason: String| VerifyError::BadKey {
            key: fpr.to_hex(),
            reason,
        };
        let vc = good
            .ka
            .cert()
            .with_policy(self.policy, self.now)
            .map_err(|e| bad(format!("{e:#}")))?;
        vc.alive()
            .map_err(|e| bad(format!("its certificate is not alive now: {e:#}")))?;
        if let openpgp::types::RevocationStatus::Revoked(_) = vc.revocation_status() {
            return Err(bad("its certificate is revoked".into()));
        }
        let ka = vc
            .keys()
            .key_handle(fpr.clone())
            .next()
            .ok_or_else(|| bad("the key is not valid now".into()))?;
        ka.alive()
            .map_err(|e| bad(format!("the key is not alive now: {e:#}")))?;
        if let openpgp::types::RevocationStatus::Revoked(_) = ka.revocation_status() {
            return Err(bad("the key is revoked".into()));
        }
        Ok(())
    }
}

impl VerificationHelper for Helper<'_> {
    fn get_certs(&mut self, _ids: &[KeyHandle]) -> openpgp::Result<Vec<Cert>> {
        Ok(self.certs.to_vec())
    }

    /// Accepts only when at least one signature is good and no signature by a key of
    /// the keyring is bad (as gpgv does); signatures by keys outside the keyring are
    /// ignored when a good one is there.
    fn check(&mut self, structure: MessageStructure) -> openpgp::Result<()> {
        let mut good_signer = None;
        // A signature by a keyring key that failed: refuses the document.
        let mut refused = None;
        // Failures that only matter when nothing is good (unknown keys).
        let mut other = None;
        for layer in structure.into_iter() {
            let MessageLayer::SignatureGroup { results } = layer else {
                refused.get_or_insert(VerifyError::Malformed(
                    "unexpected compression or encryption layer".into(),
                ));
                continue;
            };
            for result in results {
                match result {
                    Ok(good) => {
                        let algo = good.sig.hash_algo();
                        if !matches!(
                            algo,
                            HashAlgorithm::SHA256
                                | HashAlgorithm::SHA384
                                | HashAlgorithm::SHA512
                                | HashAlgorithm::SHA3_256
                                | HashAlgorithm::SHA3_512
                        ) {
                            refused.get_or_insert(VerifyError::WeakHash(algo));
                            continue;
                        }
                        match self.alive_now(&good) {
                            Ok(()) => {
                                good_signer.get_or_insert(good.ka.cert().fingerprint().to_hex());
                            }
                            Err(e) => {
                                refused.get_or_insert(e);
                            }
                        }
                    }
                    Err(VerificationError::MissingKey { sig }) => {
                        other.get_or_insert(VerifyError::UnknownKey(key_name(sig)));
                    }
                    Err(e) => {
                        let err = match e {
                            VerificationError::BadSignature { sig, error, .. } => {
                                VerifyError::BadSignature {
                                    key: key_name(sig),
                                    reason: format!("{error:#}"),
                                }
                            }
                            VerificationError::BadKey { sig, error, .. }
                            | VerificationError::UnboundKey { sig, error, .. } => {
                                VerifyError::BadKey {
                                    key: key_name(sig),
                                    reason: format!("{error:#}"),
                                }
                            }
                            VerificationError::MalformedSignature { error, .. } => {
                                VerifyError::Malformed(format!("{error:#}"))
                            }
                            VerificationError::UnknownSignature { .. } => {
                                VerifyError::Malformed("unknown signature packet".into())
                            }
                            other => VerifyError::Malformed(other.to_string()),
                        };
                        refused.get_or_insert(err);
                    }
                }
            }
        }
        let err = match (refused, good_signer) {
            (None, Some(signer)) => {
                *self.outcome = Some(Ok(signer));
                return Ok(());
            }
            (Some(e), _) => e,
            (None, None) => {
                other.unwrap_or_else(|| VerifyError::Malformed("no signature found".into()))
            }
        };
        let msg = err.to_string();
        *self.outcome = Some(Err(err));
        Err(anyhow::anyhow!(msg))
    }
}

/// Verifies a clearsigned document against `keyring` at time `now` and returns the
/// signed text (never the raw file: text outside the signed part is dropped).
pub fn verify_clearsigned(
    keyring: &Keyring,
    data: &[u8],
    now: SystemTime,
) -> Result<Verified<String>, VerifyError> {
    let start = data
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(0);
    if !data[start..].starts_with(CLEARSIGN_HEADER) {
        return Err(VerifyError::NotClearsigned);
    }
    let policy = policy();
    let mut outcome = None;
    let read = {
        let helper = Helper {
            certs: &keyring.certs,
            policy: &policy,
            now,
            outcome: &mut outcome,
        };
        VerifierBuilder::from_bytes(data)
            .and_then(|b| {
                b.buffer_size(crate::simplestreams::MAX_METADATA_BYTES + (1 << 20))
                    .with_policy(&policy, Some(now), helper)
            })
            .and_then(|mut v| {
                let mut out = Vec::with_capacity(data.len());
                v.read_to_end(&mut out)?;
                Ok(out)
            })
    };
    match (outcome, read) {
        (Some(Ok(signer)), Ok(text)) => Ok(Verified {
            inner: String::from_utf8(text).map_err(|_| VerifyError::NotUtf8)?,
            signer: Some(signer),
        }),
        (Some(Err(e)), _) => Err(e),
        (_, Err(e)) => Err(VerifyError::Malformed(format!("{e:#}"))),
        (None, Ok(_)) => Err(VerifyError::Malformed("no signature found".into())),
    }
}

#[cfg(test)]
mod tests {

    /// The I/O error is said once, not again as a cause in the chain.
    #[test]
    fn io_error_is_printed_once() {
        crate::fsutil::assert_io_cause_said_once(|error| KeyringError::Read {
            path: "/etc/rackboot/k.gpg".into(),
            error,
        });
    }
    use super::*;

    #[test]
    fn clearsigned_text_without_verification() {
        let doc = b"-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA512\n\n{\"a\":\n- -1}\n-----BEGIN PGP SIGNATURE-----\nxx\n-----END PGP SIGNATURE-----\n";
        assert_eq!(clearsigned_text(doc).unwrap(), "{\"a\":\n-1}");
        assert!(matches!(
            clearsigned_text(b"{}"),
            Err(VerifyError::NotClearsigned)
        ));
        assert!(matches!(
            clearsigned_text(b"-----BEGIN PGP SIGNED MESSAGE-----\n\n{}\n"),
            Err(VerifyError::Malformed(_))
        ));
    }

    #[test]
    fn refuses_documents_without_clearsign_header() {
        let kr = Keyring { certs: vec![] };
        assert!(matches!(
            verify_clearsigned(&kr, b"{\"format\":\"index:1.0\"}", SystemTime::now()),
            Err(VerifyError::NotClearsigned)
        ));
    }

    use openpgp::cert::prelude::{CertBuilder, CipherSuite};
    use openpgp::serialize::stream::{Message, Signer};
    use openpgp::serialize::Serialize as _;
    use openpgp::types::KeyFlags;
    use std::io::Write as _;
    use std::time::Duration;

    const DAY: Duration = Duration::from_secs(86_400);

    /// A signing key created `age` ago, valid for `validity` (forever if `None`).
    fn key(age: Duration, validity: Option<Duration>) -> Cert {
        CertBuilder::new()
            .add_userid("t <t@rackboot.invalid>")
            .set_cipher_suite(CipherSuite::Cv25519)
            .set_primary_key_flags(KeyFlags::empty().set_signing().set_certification())
            .set_creation_time(SystemTime::now() - age)
            .set_validity_period(validity)
            .generate()
            .unwrap()
            .0
    }

    /// Clearsigns `text` with each key (one signature each), dated `at`.
    fn clearsign(keys: &[&Cert], text: &[u8], at: SystemTime) -> Vec<u8> {
        let pair = |c: &Cert| {
            c.primary_key()
                .key()
                .clone()
                .parts_into_secret()
                .unwrap()
                .into_keypair()
                .unwrap()
        };
        let mut out = Vec::new();
        let mut signer = Signer::new(Message::new(&mut out), pair(keys[0])).unwrap();
        for k in &keys[1..] {
            signer = signer.add_signer(pair(k)).unwrap();
        }
        let mut w = signer
            .cleartext()
            .hash_algo(HashAlgorithm::SHA512)
            .unwrap()
            .creation_time(at)
            .build()
            .unwrap();
        w.write_all(text).unwrap();
        w.finalize().unwrap();
        out
    }

    fn ring(certs: &[&Cert]) -> Keyring {
        let mut b = Vec::new();
        for c in certs {
            c.serialize(&mut b).unwrap();
        }
        Keyring::from_bytes(&b, "test").unwrap()
    }

    /// `doc`'s text, signed by the signatures of `first` then those of `second`
    /// (each a clearsigned document, possibly over other text).
    fn splice(doc: &[u8], first: &[u8], second: &[u8]) -> Vec<u8> {
        let at = |d: &[u8]| {
            let t = std::str::from_utf8(d).unwrap();
            t.find("-----BEGIN PGP SIGNATURE-----").unwrap()
        };
        let sigs = |d: &[u8]| {
            openpgp::PacketPile::from_bytes(&d[at(d)..])
                .unwrap()
                .into_children()
                .collect::<Vec<_>>()
        };
        let mut out = doc[..at(doc)].to_vec();
        let mut w = openpgp::armor::Writer::new(&mut out, openpgp::armor::Kind::Signature).unwrap();
        for p in sigs(first).into_iter().chain(sigs(second)) {
            p.serialize(&mut w).unwrap();
        }
        w.finalize().unwrap();
        out
    }

    #[test]
    fn every_keyring_signature_must_be_good() {
        let (a, b) = (key(DAY, None), key(DAY, None));
        let kr = ring(&[&a, &b]);
        let now = SystemTime::now();
        let both = clearsign(&[&a, &b], b"{}", now);
        assert!(verify_clearsigned(&kr, &both, now).is_ok());
        // a's signature over the text, b's over other text: both orders refused.
        let good_a = clearsign(&[&a], b"{}", now);
        let bad_b = clearsign(&[&b], b"{ }", now);
        assert!(verify_clearsigned(&kr, &splice(&good_a, &good_a, &both), now).is_ok());
        for mixed in [
            splice(&good_a, &good_a, &bad_b),
            splice(&good_a, &bad_b, &good_a),
        ] {
            assert!(
                matches!(
                    verify_clearsigned(&kr, &mixed, now),
                    Err(VerifyError::BadSignature { .. })
                ),
                "a bad keyring signature must refuse the document"
            );
        }
        // A signature by a key outside the keyring beside a good one is ignored.
        let stranger = key(DAY, None);
        let with_stranger = clearsign(&[&a, &stranger], b"{}", now);
        assert!(verify_clearsigned(&ring(&[&a]), &with_stranger, now).is_ok());
        assert!(matches!(
            verify_clearsigned(&ring(&[&b]), &good_a, now),
            Err(VerifyError::UnknownKey(_))
        ));
    }

    #[test]
    fn the_signing_key_must_be_alive_now() {
        let now = SystemTime::now();
        let expired = key(10 * DAY, Some(5 * DAY));
        let doc = clearsign(&[&expired], b"{}", now - 7 * DAY);
        let kr = ring(&[&expired]);
        // Valid at the time it signed…
        assert!(verify_clearsigned(&kr, &doc, now - 6 * DAY).is_ok());
        // …but not now.
        match verify_clearsigned(&kr, &doc, now) {
            Err(VerifyError::BadKey { reason, .. }) => {
                assert!(reason.contains("not alive now"), "{reason}")
            }
            other => panic!("expected BadKey, got {other:?}"),
        }
    }

    #[test]
    fn empty_keyring_is_an_error_naming_origin() {
        let err = Keyring::from_bytes(b"", "inline keyring_data").unwrap_err();
        assert!(err.to_string().contains("inline keyring_data"), "{err}");
    }
}
