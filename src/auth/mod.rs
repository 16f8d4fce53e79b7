//! Client authentication, independent of the wire protocol: SASL mechanisms (PLAIN,
//! SCRAM-SHA-256/512) checked against salted credentials, and the limit on failed attempts per
//! source address. `proxy::sasl` speaks SaslHandshake/SaslAuthenticate on top of it.

pub mod acl;
pub mod credentials;
pub mod scram;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub use credentials::Credentials;
use scram::{Hash, ScramCredential, ScramError, ScramServer};

/// Equality whose time does not depend on where the inputs first differ.
pub fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mechanism {
    Plain,
    Scram(Hash),
}

impl Mechanism {
    pub const ALL: [Mechanism; 3] = [
        Mechanism::Plain,
        Mechanism::Scram(Hash::Sha256),
        Mechanism::Scram(Hash::Sha512),
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mechanism::Plain => "PLAIN",
            Mechanism::Scram(h) => h.mechanism(),
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }
}

/// The window failed attempts are counted in, per source address.
const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Addresses tracked at once; beyond, the oldest windows are dropped.
const MAX_TRACKED: usize = 10_000;

/// What a listener accepts and from whom.
pub struct Authenticator {
    pub mechanisms: Vec<Mechanism>,
    /// Replaced whole when the store's copy changes (`replace_credentials`).
    credentials: arc_swap::ArcSwap<Credentials>,
    /// How long an authentication lasts (KIP-368); zero: for the connection's life.
    pub session_lifetime: Duration,
    max_failures: u32,
    failures: Mutex<HashMap<IpAddr, (Instant, u32)>>,
    /// Keys the made-up salts of unknown users (stable per process and user).
    decoy_key: ring::hmac::Key,
    /// PLAIN checks (PBKDF2, milliseconds each) running at once, so a flood of logins from
    /// many connections cannot take every core.
    pub plain_checks: std::sync::Arc<tokio::sync::Semaphore>,
}

/// The outcome of one SASL token.
pub enum Step {
    /// Send this and wait for the next token.
    Continue(Vec<u8>, ScramServer),
    /// Authenticated as the user; send this (possibly empty) last token.
    Done(String, Vec<u8>),
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error(transparent)]
    Scram(#[from] ScramError),
    #[error("malformed PLAIN message")]
    PlainMalformed,
    #[error("the authorization id must be empty or the user name")]
    PlainAuthzId,
    #[error("invalid credentials")]
    Invalid,
}

impl Authenticator {
    pub fn new(
        mechanisms: Vec<Mechanism>,
        credentials: Credentials,
        session_lifetime: Duration,
        max_failures: u32,
    ) -> Self {
        let seed = scram::random_b64(32);
        Self {
            mechanisms,
            credentials: arc_swap::ArcSwap::from_pointee(credentials),
            session_lifetime,
            max_failures,
            failures: Mutex::default(),
            decoy_key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, seed.as_bytes()),
            plain_checks: std::sync::Arc::new(tokio::sync::Semaphore::new(2)),
        }
    }

    /// Takes new credentials (the store's copy changed); exchanges under way finish with the
    /// credential they started with.
    pub fn replace_credentials(&self, credentials: Credentials) {
        self.credentials.store(std::sync::Arc::new(credentials));
    }

    /// How many users can authenticate.
    pub fn users(&self) -> usize {
        self.credentials.load().len()
    }

    /// The first token of an exchange with `mechanism`. PLAIN derives the salted password:
    /// milliseconds of CPU, so call it off the runtime's worker threads.
    pub fn first(&self, mechanism: Mechanism, token: &[u8]) -> Result<Step, AuthError> {
        match mechanism {
            Mechanism::Plain => {
                let mut parts = token.split(|b| *b == 0);
                let (Some(authzid), Some(user), Some(password), None) =
                    (parts.next(), parts.next(), parts.next(), parts.next())
                else {
                    return Err(AuthError::PlainMalformed);
                };
                fn text(b: &[u8]) -> Result<&str, AuthError> {
                    std::str::from_utf8(b).map_err(|_| AuthError::PlainMalformed)
                }
                let (authzid, user, password) = (text(authzid)?, text(user)?, text(password)?);
                if user.is_empty() {
                    return Err(AuthError::PlainMalformed);
                }
                if !authzid.is_empty() && authzid != user {
                    return Err(AuthError::PlainAuthzId);
                }
                match self.credentials.load().any(user) {
                    Some((h, c)) if c.verify_password(h, password) => {
                        Ok(Step::Done(user.to_string(), Vec::new()))
                    }
                    Some(_) => Err(AuthError::Invalid),
                    None => {
                        // The same work as for a known user: the answer's time must not tell
                        // which user names exist.
                        let (salt, iterations) = self.decoy(user);
                        ScramCredential::derive(Hash::Sha512, password, &salt, iterations);
                        Err(AuthError::Invalid)
                    }
                }
            }
            Mechanism::Scram(h) => {
                let (server, first) = ScramServer::start(
                    h,
                    token,
                    |u| self.credentials.load().scram(u, h),
                    |u| self.decoy(u),
                    None,
                )?;
                Ok(Step::Continue(first, server))
            }
        }
    }

    /// The client-final token of a SCRAM exchange.
    pub fn last(&self, server: ScramServer, token: &[u8]) -> Result<Step, AuthError> {
        let user = server.user().to_string();
        let last = server.finish(token)?;
        Ok(Step::Done(user, last))
    }

    /// A made-up salt (stable per user) and the usual iteration count, for unknown users.
    fn decoy(&self, user: &str) -> (Vec<u8>, u32) {
        let salt = ring::hmac::sign(&self.decoy_key, user.as_bytes()).as_ref()
            [..credentials::SALT_LEN]
            .to_vec();
        (salt, self.credentials.load().usual_iterations())
    }

    /// Failures are counted per address, IPv6 per /64 (one host holds a whole /64).
    fn source(ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V6(v6) => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
            v4 => v4,
        }
    }

    /// Whether `ip` may try (again): fewer than the limit of failures in the window.
    pub fn may_try(&self, ip: IpAddr) -> bool {
        let now = Instant::now();
        let map = self.failures.lock().expect("failures");
        map.get(&Self::source(ip)).is_none_or(|(since, n)| {
            now.duration_since(*since) > FAILURE_WINDOW || *n < self.max_failures
        })
    }

    /// Counts a failed attempt from `ip`.
    pub fn failed(&self, ip: IpAddr) {
        let now = Instant::now();
        let mut map = self.failures.lock().expect("failures");
        if map.len() >= MAX_TRACKED {
            map.retain(|_, (since, _)| now.duration_since(*since) <= FAILURE_WINDOW);
            if map.len() >= MAX_TRACKED {
                // Still full: forget the oldest half, not everyone (clearing all would let
                // an attacker with many addresses reset everybody's count).
                let mut starts: Vec<Instant> = map.values().map(|(s, _)| *s).collect();
                starts.sort();
                let cut = starts[starts.len() / 2];
                map.retain(|_, (since, _)| *since > cut);
            }
        }
        let e = map.entry(Self::source(ip)).or_insert((now, 0));
        if now.duration_since(e.0) > FAILURE_WINDOW {
            *e = (now, 0);
        }
        e.1 += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(max_failures: u32) -> Authenticator {
        let text = credentials::entry("alice", "pw-alice", &[Hash::Sha256], 4096);
        Authenticator::new(
            Mechanism::ALL.to_vec(),
            Credentials::parse(&text, "t").unwrap(),
            Duration::ZERO,
            max_failures,
        )
    }

    #[test]
    fn plain_checks_the_salted_password() {
        let a = auth(3);
        assert!(matches!(
            a.first(Mechanism::Plain, b"\0alice\0pw-alice"),
            Ok(Step::Done(u, _)) if u == "alice"
        ));
        assert!(matches!(
            a.first(Mechanism::Plain, b"alice\0alice\0pw-alice"),
            Ok(Step::Done(..))
        ));
        assert!(matches!(
            a.first(Mechanism::Plain, b"\0alice\0wrong"),
            Err(AuthError::Invalid)
        ));
        assert!(matches!(
            a.first(Mechanism::Plain, b"\0bob\0pw-alice"),
            Err(AuthError::Invalid)
        ));
        assert!(matches!(
            a.first(Mechanism::Plain, b"bob\0alice\0pw-alice"),
            Err(AuthError::PlainAuthzId)
        ));
        assert!(matches!(
            a.first(Mechanism::Plain, b"alice"),
            Err(AuthError::PlainMalformed)
        ));
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(same(b"0123456789abcdef", b"0123456789abcdef"));
        assert!(!same(b"0123456789abcdef", b"0123456789abcdeg"));
        assert!(!same(b"0123456789abcdef", b"0123456789abcde"));
        assert!(!same(b"", b"x"));
    }

    #[test]
    fn failures_are_limited_per_address() {
        let a = auth(2);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        assert!(a.may_try(ip));
        a.failed(ip);
        assert!(a.may_try(ip));
        a.failed(ip);
        assert!(!a.may_try(ip));
        assert!(a.may_try(other));
        // IPv6: one /64 is one source.
        let v6a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let v6b: IpAddr = "2001:db8:1:2::ffff".parse().unwrap();
        a.failed(v6a);
        a.failed(v6a);
        assert!(!a.may_try(v6b));
        assert_eq!(
            Mechanism::parse("SCRAM-SHA-512"),
            Some(Mechanism::Scram(Hash::Sha512))
        );
        assert_eq!(Mechanism::parse("GSSAPI"), None);
    }
}
