//! SCRAM-SHA-256 and SCRAM-SHA-512 (RFC 5802, RFC 7677) as Kafka speaks them: no channel
//! binding, an optional authzid that must name the user, at least 4,096 iterations. The
//! server side needs only the salted form of a password (salt, iterations, StoredKey,
//! ServerKey): shardgate never holds SCRAM passwords.

use std::num::NonZeroU32;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ring::{digest, hmac, pbkdf2, rand::SecureRandom};

/// Kafka refuses SCRAM credentials with fewer iterations,
pub const MIN_ITERATIONS: u32 = 4096;
/// or more (a broker asking for more is refused: each one costs CPU here).
pub const MAX_ITERATIONS: u32 = 16384;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hash {
    Sha256,
    Sha512,
}

impl Hash {
    pub fn mechanism(self) -> &'static str {
        match self {
            Hash::Sha256 => "SCRAM-SHA-256",
            Hash::Sha512 => "SCRAM-SHA-512",
        }
    }

    fn hmac(self) -> hmac::Algorithm {
        match self {
            Hash::Sha256 => hmac::HMAC_SHA256,
            Hash::Sha512 => hmac::HMAC_SHA512,
        }
    }

    fn pbkdf2(self) -> pbkdf2::Algorithm {
        match self {
            Hash::Sha256 => pbkdf2::PBKDF2_HMAC_SHA256,
            Hash::Sha512 => pbkdf2::PBKDF2_HMAC_SHA512,
        }
    }

    fn digest(self) -> &'static digest::Algorithm {
        match self {
            Hash::Sha256 => &digest::SHA256,
            Hash::Sha512 => &digest::SHA512,
        }
    }

    /// Bytes of its digests (StoredKey, ServerKey).
    pub fn digest_len(self) -> usize {
        match self {
            Hash::Sha256 => 32,
            Hash::Sha512 => 64,
        }
    }
}

/// A password in SCRAM's salted form.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramCredential {
    pub salt: Vec<u8>,
    pub iterations: u32,
    pub stored_key: Vec<u8>,
    pub server_key: Vec<u8>,
}

impl std::fmt::Debug for ScramCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ScramCredential(iterations {})", self.iterations)
    }
}

fn sign(hash: Hash, key: &[u8], data: &[u8]) -> Vec<u8> {
    hmac::sign(&hmac::Key::new(hash.hmac(), key), data)
        .as_ref()
        .to_vec()
}

impl ScramCredential {
    /// The salted form of `password` (PBKDF2: milliseconds of CPU; not for a runtime thread).
    pub fn derive(hash: Hash, password: &str, salt: &[u8], iterations: u32) -> Self {
        let mut salted = vec![0u8; hash.digest_len()];
        pbkdf2::derive(
            hash.pbkdf2(),
            NonZeroU32::new(iterations.max(1)).expect("max(1)"),
            salt,
            password.as_bytes(),
            &mut salted,
        );
        let client_key = sign(hash, &salted, b"Client Key");
        Self {
            salt: salt.to_vec(),
            iterations,
            stored_key: digest::digest(hash.digest(), &client_key).as_ref().to_vec(),
            server_key: sign(hash, &salted, b"Server Key"),
        }
    }

    /// Whether `password` is the one this was derived from (SASL/PLAIN against the same
    /// stored form).
    pub fn verify_password(&self, hash: Hash, password: &str) -> bool {
        let other = Self::derive(hash, password, &self.salt, self.iterations);
        super::same(&other.stored_key, &self.stored_key)
    }
}

/// Random bytes, base64 (nonces, salts).
pub fn random_b64(n: usize) -> String {
    let mut b = vec![0u8; n];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .expect("system random");
    B64.encode(b)
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScramError {
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("channel binding is not supported")]
    ChannelBinding,
    #[error("SCRAM extensions (delegation tokens) are not supported")]
    Extensions,
    #[error("the authorization id must be the user name")]
    AuthzId,
    #[error("invalid credentials")]
    Invalid,
}

/// One SCRAM exchange, server side: client-first → server-first → client-final →
/// server-final.
pub struct ScramServer {
    hash: Hash,
    user: String,
    /// None for an unknown user: the exchange goes on (with a made-up salt) and fails at the
    /// proof, so the answer does not tell which user names exist.
    cred: Option<ScramCredential>,
    client_first_bare: String,
    server_first: String,
    nonce: String,
    gs2_header: String,
}

/// The gs2 header and the bare message of a client-first message.
fn split_client_first(msg: &str) -> Result<(String, &str, Option<&str>), ScramError> {
    let mut parts = msg.splitn(3, ',');
    let cb = parts.next().ok_or(ScramError::Malformed("empty"))?;
    let authz = parts.next().ok_or(ScramError::Malformed("no gs2 header"))?;
    let bare = parts
        .next()
        .ok_or(ScramError::Malformed("no client-first-bare"))?;
    match cb {
        "n" | "y" => {}
        c if c.starts_with("p=") => return Err(ScramError::ChannelBinding),
        _ => return Err(ScramError::Malformed("bad channel binding flag")),
    }
    let authzid = match authz {
        "" => None,
        a => Some(
            a.strip_prefix("a=")
                .ok_or(ScramError::Malformed("bad authzid"))?,
        ),
    };
    Ok((format!("{cb},{authz},"), bare, authzid))
}

/// RFC 5802 saslname: "=2C" is ",", "=3D" is "=".
fn unescape(name: &str) -> Result<String, ScramError> {
    let mut out = String::new();
    let mut rest = name;
    while let Some(i) = rest.find('=') {
        out.push_str(&rest[..i]);
        match rest.get(i..i + 3) {
            Some("=2C") => out.push(','),
            Some("=3D") => out.push('='),
            _ => return Err(ScramError::Malformed("bad escape in user name")),
        }
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    Ok(out)
}

fn attr(part: &str, name: char) -> Option<&str> {
    let mut c = part.chars();
    (c.next() == Some(name) && c.next() == Some('=')).then(|| &part[2..])
}

impl ScramServer {
    /// Reads the client-first message and answers the server-first one. `lookup` gives the
    /// stored form of a user's password; `decoy` a stable made-up salt and the usual
    /// iteration count for unknown users (they must look like known ones).
    pub fn start(
        hash: Hash,
        client_first: &[u8],
        lookup: impl Fn(&str) -> Option<ScramCredential>,
        decoy: impl Fn(&str) -> (Vec<u8>, u32),
        server_nonce: Option<&str>,
    ) -> Result<(Self, Vec<u8>), ScramError> {
        let msg = std::str::from_utf8(client_first).map_err(|_| ScramError::Malformed("utf-8"))?;
        let (gs2_header, bare, authzid) = split_client_first(msg)?;
        let mut user = None;
        let mut cnonce = None;
        for (i, part) in bare.split(',').enumerate() {
            match (i, part) {
                (0, p) => {
                    user = Some(unescape(
                        attr(p, 'n').ok_or(ScramError::Malformed("no n="))?,
                    )?)
                }
                (1, p) => cnonce = Some(attr(p, 'r').ok_or(ScramError::Malformed("no r="))?),
                // Kafka's extensions (tokenauth=true: delegation tokens).
                _ => return Err(ScramError::Extensions),
            }
        }
        let user = user.ok_or(ScramError::Malformed("no user"))?;
        let cnonce = cnonce
            .filter(|n| !n.is_empty())
            .ok_or(ScramError::Malformed("no nonce"))?;
        if authzid.is_some_and(|a| a != user) {
            return Err(ScramError::AuthzId);
        }
        let cred = lookup(&user);
        let (salt, iterations) = match &cred {
            Some(c) => (c.salt.clone(), c.iterations),
            None => decoy(&user),
        };
        let nonce = format!(
            "{cnonce}{}",
            server_nonce.map_or_else(|| random_b64(18), str::to_string)
        );
        let server_first = format!("r={nonce},s={},i={iterations}", B64.encode(&salt));
        let answer = server_first.clone().into_bytes();
        Ok((
            Self {
                hash,
                user,
                cred,
                client_first_bare: bare.to_string(),
                server_first,
                nonce,
                gs2_header,
            },
            answer,
        ))
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    /// Checks the client-final message: the server-final message to send.
    pub fn finish(self, client_final: &[u8]) -> Result<Vec<u8>, ScramError> {
        let msg = std::str::from_utf8(client_final).map_err(|_| ScramError::Malformed("utf-8"))?;
        let (without_proof, proof) = msg
            .rsplit_once(",p=")
            .ok_or(ScramError::Malformed("no proof"))?;
        let mut parts = without_proof.split(',');
        let cb = parts
            .next()
            .and_then(|p| attr(p, 'c'))
            .ok_or(ScramError::Malformed("no c="))?;
        let nonce = parts
            .next()
            .and_then(|p| attr(p, 'r'))
            .ok_or(ScramError::Malformed("no r="))?;
        if B64.decode(cb).ok().as_deref() != Some(self.gs2_header.as_bytes()) {
            return Err(ScramError::ChannelBinding);
        }
        if nonce != self.nonce {
            return Err(ScramError::Invalid);
        }
        let proof = B64
            .decode(proof)
            .map_err(|_| ScramError::Malformed("proof is not base64"))?;
        let Some(cred) = &self.cred else {
            return Err(ScramError::Invalid);
        };
        let auth_message = format!(
            "{},{},{without_proof}",
            self.client_first_bare, self.server_first
        );
        let signature = sign(self.hash, &cred.stored_key, auth_message.as_bytes());
        if proof.len() != signature.len() {
            return Err(ScramError::Invalid);
        }
        let client_key: Vec<u8> = proof.iter().zip(&signature).map(|(a, b)| a ^ b).collect();
        let stored = digest::digest(self.hash.digest(), &client_key);
        if !super::same(stored.as_ref(), &cred.stored_key) {
            return Err(ScramError::Invalid);
        }
        let verifier = sign(self.hash, &cred.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(verifier)).into_bytes())
    }
}

/// One SCRAM exchange, client side (shardgate authenticating to Kafka).
pub struct ScramClient {
    hash: Hash,
    password: String,
    client_first_bare: String,
    nonce: String,
    /// Set by `respond`: the ServerSignature the server-final message must carry.
    expected: Option<Vec<u8>>,
}

impl ScramClient {
    /// The exchange and its client-first message.
    pub fn start(hash: Hash, user: &str, password: &str) -> (Self, Vec<u8>) {
        let nonce = random_b64(18);
        let escaped = user.replace('=', "=3D").replace(',', "=2C");
        let client_first_bare = format!("n={escaped},r={nonce}");
        let first = format!("n,,{client_first_bare}").into_bytes();
        (
            Self {
                hash,
                password: password.to_string(),
                client_first_bare,
                nonce,
                expected: None,
            },
            first,
        )
    }

    /// The client-final message answering `server_first` (PBKDF2: milliseconds of CPU).
    pub fn respond(&mut self, server_first: &[u8]) -> Result<Vec<u8>, ScramError> {
        let msg = std::str::from_utf8(server_first).map_err(|_| ScramError::Malformed("utf-8"))?;
        let (mut nonce, mut salt, mut iterations) = (None, None, None);
        for part in msg.split(',') {
            if let Some(v) = attr(part, 'r') {
                nonce = Some(v);
            } else if let Some(v) = attr(part, 's') {
                salt = Some(v);
            } else if let Some(v) = attr(part, 'i') {
                iterations = v.parse::<u32>().ok();
            } else if attr(part, 'e').is_some() {
                return Err(ScramError::Invalid);
            }
        }
        let nonce = nonce.ok_or(ScramError::Malformed("no r="))?;
        if !nonce.starts_with(&self.nonce) || nonce.len() == self.nonce.len() {
            return Err(ScramError::Malformed("server nonce does not extend ours"));
        }
        let salt = B64
            .decode(salt.ok_or(ScramError::Malformed("no s="))?)
            .map_err(|_| ScramError::Malformed("salt is not base64"))?;
        let iterations = iterations.ok_or(ScramError::Malformed("no i="))?;
        if iterations < MIN_ITERATIONS {
            return Err(ScramError::Malformed(
                "fewer iterations than Kafka's minimum",
            ));
        }
        let mut salted = vec![0u8; self.hash.digest_len()];
        pbkdf2::derive(
            self.hash.pbkdf2(),
            NonZeroU32::new(iterations).expect(">= MIN_ITERATIONS"),
            &salt,
            self.password.as_bytes(),
            &mut salted,
        );
        let client_key = sign(self.hash, &salted, b"Client Key");
        let stored_key = digest::digest(self.hash.digest(), &client_key);
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{msg},{without_proof}", self.client_first_bare);
        let signature = sign(self.hash, stored_key.as_ref(), auth_message.as_bytes());
        let proof: Vec<u8> = client_key
            .iter()
            .zip(&signature)
            .map(|(a, b)| a ^ b)
            .collect();
        let server_key = sign(self.hash, &salted, b"Server Key");
        self.expected = Some(sign(self.hash, &server_key, auth_message.as_bytes()));
        Ok(format!("{without_proof},p={}", B64.encode(proof)).into_bytes())
    }

    /// Checks the server-final message: the server knew the password's salted form too.
    pub fn verify(&self, server_final: &[u8]) -> Result<(), ScramError> {
        let msg = std::str::from_utf8(server_final).map_err(|_| ScramError::Malformed("utf-8"))?;
        let v = msg
            .split(',')
            .find_map(|p| attr(p, 'v'))
            .ok_or(ScramError::Invalid)?;
        let got = B64
            .decode(v)
            .map_err(|_| ScramError::Malformed("verifier"))?;
        match &self.expected {
            Some(e) if super::same(e, &got) => Ok(()),
            _ => Err(ScramError::Invalid),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7677's example exchange (SCRAM-SHA-256, user "user", password "pencil").
    #[test]
    fn the_rfc_7677_exchange() {
        let salt = B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let cred = ScramCredential::derive(Hash::Sha256, "pencil", &salt, 4096);
        assert!(cred.verify_password(Hash::Sha256, "pencil"));
        assert!(!cred.verify_password(Hash::Sha256, "pencil2"));
        let lookup = |u: &str| (u == "user").then(|| cred.clone());
        let (server, first) = ScramServer::start(
            Hash::Sha256,
            b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO",
            lookup,
            |_| (vec![0; 16], MIN_ITERATIONS),
            Some("%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"),
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(first).unwrap(),
            "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
        );
        let last = server
            .finish(b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
            .unwrap();
        assert_eq!(
            String::from_utf8(last).unwrap(),
            "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
        );
    }

    #[test]
    fn the_client_side_completes_an_exchange_with_the_server_side() {
        for hash in [Hash::Sha256, Hash::Sha512] {
            let cred = ScramCredential::derive(hash, "p,=w", b"salt-salt-salt", 4096);
            let lookup = |u: &str| (u == "svc,x=y").then(|| cred.clone());
            let (mut client, first) = ScramClient::start(hash, "svc,x=y", "p,=w");
            let (server, server_first) = ScramServer::start(
                hash,
                &first,
                lookup,
                |_| (vec![0; 16], MIN_ITERATIONS),
                None,
            )
            .unwrap();
            let last = client.respond(&server_first).unwrap();
            let server_final = server.finish(&last).unwrap();
            client.verify(&server_final).unwrap();
            assert!(client.verify(b"v=AAAA").is_err());
            // A wrong password fails at the server.
            let (mut wrong, first) = ScramClient::start(hash, "svc,x=y", "nope");
            let (server, server_first) = ScramServer::start(
                hash,
                &first,
                lookup,
                |_| (vec![0; 16], MIN_ITERATIONS),
                None,
            )
            .unwrap();
            let last = wrong.respond(&server_first).unwrap();
            assert_eq!(server.finish(&last), Err(ScramError::Invalid));
        }
    }

    #[test]
    fn wrong_proofs_unknown_users_and_unsupported_forms_fail() {
        let salt = b"0123456789abcdef";
        let cred = ScramCredential::derive(Hash::Sha512, "secret", salt, 4096);
        let lookup = |u: &str| (u == "alice").then(|| cred.clone());
        let start = |first: &[u8]| {
            ScramServer::start(
                Hash::Sha512,
                first,
                lookup,
                |_| (salt.to_vec(), MIN_ITERATIONS),
                Some("S"),
            )
        };
        let (server, _) = start(b"n,,n=alice,r=C").unwrap();
        let bogus = B64.encode([7u8; 64]);
        assert_eq!(
            server.finish(format!("c=biws,r=CS,p={bogus}").as_bytes()),
            Err(ScramError::Invalid)
        );
        // An unknown user gets a server-first message like anyone, and fails at the proof.
        let (server, first) = start(b"n,,n=mallory,r=C").unwrap();
        assert!(String::from_utf8(first).unwrap().contains(",i=4096"));
        assert_eq!(
            server.finish(format!("c=biws,r=CS,p={bogus}").as_bytes()),
            Err(ScramError::Invalid)
        );
        // A nonce other than the joint one.
        let (server, _) = start(b"n,,n=alice,r=C").unwrap();
        assert_eq!(
            server.finish(format!("c=biws,r=CX,p={bogus}").as_bytes()),
            Err(ScramError::Invalid)
        );
        assert_eq!(
            start(b"p=tls-unique,,n=alice,r=C").err(),
            Some(ScramError::ChannelBinding)
        );
        assert_eq!(
            start(b"n,,n=alice,r=C,tokenauth=true").err(),
            Some(ScramError::Extensions)
        );
        assert_eq!(
            start(b"n,a=bob,n=alice,r=C").err(),
            Some(ScramError::AuthzId)
        );
        assert!(start(b"n,a=alice,n=alice,r=C").is_ok());
        assert!(start(b"garbage").is_err());
        assert_eq!(unescape("a=2Cb=3Dc").unwrap(), "a,b=c");
    }
}
