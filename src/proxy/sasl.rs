//! SASL on the client listener (`listener.sasl`): SaslHandshake v1 and SaslAuthenticate
//! v0-v2 (KIP-152 framing), PLAIN and SCRAM-SHA-256/512 checked by `auth`, KIP-368
//! re-authentication. Until a connection has authenticated only ApiVersions and the SASL
//! requests are served; anything else closes it, as Kafka does. A failed authentication is
//! answered SASL_AUTHENTICATION_FAILED after a short delay and the connection closed; it is
//! logged (address, mechanism, user; never a password or proof), counted, and an address with
//! too many failures within a minute is refused without checking.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kafka_protocol::messages::{
    ApiKey, SaslAuthenticateRequest, SaslAuthenticateResponse, SaslHandshakeRequest,
    SaslHandshakeResponse,
};
use kafka_protocol::protocol::StrBytes;

use super::Reply;
use crate::auth::scram::ScramServer;
use crate::auth::{AuthError, Authenticator, Mechanism, Step};
use crate::protocol::{RequestFrame, codes, encode_response};

/// Kafka's `connection.failed.authentication.delay.ms` default: a failure is answered this
/// late, so guessing costs time.
const FAILURE_DELAY: Duration = Duration::from_millis(100);

/// Before authentication nothing larger is read: an unauthenticated peer must not hold the
/// memory budget with announced 100 MiB frames.
const PRE_AUTH_MAX_FRAME: usize = 512 * 1024;

pub struct SaslConn {
    auth: Option<Arc<Authenticator>>,
    peer: IpAddr,
    state: State,
    principal: Option<String>,
    expires: Option<Instant>,
}

enum State {
    /// Waiting for a handshake (first, or a re-authentication).
    Idle,
    Handshaken(Mechanism),
    Scram(Mechanism, Box<ScramServer>),
}

/// What became of a SASL request.
pub struct Answered {
    pub reply: Reply,
    /// Close the connection after the answer.
    pub close: bool,
    /// Set at a successful (re-)authentication.
    pub principal: Option<String>,
}

pub fn is_sasl(api: ApiKey) -> bool {
    matches!(api, ApiKey::SaslHandshake | ApiKey::SaslAuthenticate)
}

impl SaslConn {
    pub fn new(auth: Option<Arc<Authenticator>>, peer: IpAddr) -> Self {
        Self {
            auth,
            peer,
            state: State::Idle,
            principal: None,
            expires: None,
        }
    }

    /// The largest frame read from a client that has not authenticated (Kafka's
    /// `sasl.server.max.receive.size`); None when there is no such limit.
    pub fn frame_limit(&self) -> Option<usize> {
        (self.auth.is_some() && self.principal.is_none()).then_some(PRE_AUTH_MAX_FRAME)
    }

    /// Whether a request of `api` may be served now; if not, (metric label, reason to close).
    pub fn check(&self, api: ApiKey) -> Result<(), (&'static str, &'static str)> {
        if self.auth.is_none() || api == ApiKey::ApiVersions || is_sasl(api) {
            return Ok(());
        }
        if self.principal.is_none() {
            return Err(("unauthenticated_request", "request before authentication"));
        }
        if self.expires.is_some_and(|e| Instant::now() >= e) {
            return Err((
                "expired",
                "authentication expired (no re-authentication in time)",
            ));
        }
        Ok(())
    }

    pub async fn answer(&mut self, req: &RequestFrame) -> Answered {
        match req.api_key {
            ApiKey::SaslHandshake => self.handshake(req),
            _ => self.authenticate(req).await,
        }
    }

    fn handshake(&mut self, req: &RequestFrame) -> Answered {
        let enabled: Vec<StrBytes> = self.auth.as_ref().map_or(Vec::new(), |a| {
            a.mechanisms
                .iter()
                .map(|m| StrBytes::from_static_str(m.name()))
                .collect()
        });
        let respond = |code: i16, close: bool| Answered {
            reply: frame(
                req,
                ApiKey::SaslHandshake,
                &SaslHandshakeResponse::default()
                    .with_error_code(code)
                    .with_mechanisms(enabled.clone()),
            ),
            close,
            principal: None,
        };
        let Some(auth) = self.auth.clone() else {
            return self.refused(
                "no_sasl_listener",
                None,
                respond(codes::ILLEGAL_SASL_STATE, true),
            );
        };
        if !matches!(self.state, State::Idle) {
            return self.refused(
                "illegal_state",
                None,
                respond(codes::ILLEGAL_SASL_STATE, true),
            );
        }
        let asked = req
            .decode_body::<SaslHandshakeRequest>()
            .map(|b| b.mechanism.to_string())
            .unwrap_or_default();
        match Mechanism::parse(&asked).filter(|m| auth.mechanisms.contains(m)) {
            Some(m) => {
                self.state = State::Handshaken(m);
                respond(codes::NONE, false)
            }
            None => {
                let shown: String = asked.chars().take(64).collect();
                tracing::warn!(peer = %self.peer, mechanism = %shown, "SASL mechanism not enabled on this listener; closing");
                self.refused(
                    "unsupported_mechanism",
                    None,
                    respond(codes::UNSUPPORTED_SASL_MECHANISM, true),
                )
            }
        }
    }

    async fn authenticate(&mut self, req: &RequestFrame) -> Answered {
        let version = req.api_version;
        let (Some(auth), state) = (
            self.auth.clone(),
            std::mem::replace(&mut self.state, State::Idle),
        ) else {
            let a = fail(
                req,
                codes::ILLEGAL_SASL_STATE,
                "SASL is not enabled on this listener",
            );
            return self.refused("no_sasl_listener", None, a);
        };
        let Ok(body) = req.decode_body::<SaslAuthenticateRequest>() else {
            let a = fail(req, codes::ILLEGAL_SASL_STATE, "malformed SaslAuthenticate");
            return self.refused("illegal_state", None, a);
        };
        let token = body.auth_bytes;
        let (mechanism, step) = match state {
            State::Idle => {
                let a = fail(
                    req,
                    codes::ILLEGAL_SASL_STATE,
                    "SaslAuthenticate before SaslHandshake",
                );
                return self.refused("illegal_state", None, a);
            }
            State::Handshaken(m) => {
                if !auth.may_try(self.peer) {
                    tokio::time::sleep(FAILURE_DELAY).await;
                    let a = fail(
                        req,
                        codes::SASL_AUTHENTICATION_FAILED,
                        "too many failed authentications from this address; try again later",
                    );
                    return self.refused("rate_limited", Some(m), a);
                }
                let step = match m {
                    // PBKDF2 of the given password: off the worker threads.
                    Mechanism::Plain => {
                        let permit = auth.plain_checks.clone().acquire_owned().await;
                        let a = auth.clone();
                        tokio::task::spawn_blocking(move || {
                            let _running = permit;
                            a.first(m, &token)
                        })
                        .await
                        .unwrap_or(Err(AuthError::Invalid))
                    }
                    Mechanism::Scram(_) => auth.first(m, &token),
                };
                (m, step)
            }
            State::Scram(m, server) => (m, auth.last(*server, &token)),
        };
        match step {
            Ok(Step::Continue(out, server)) => {
                self.state = State::Scram(mechanism, Box::new(server));
                Answered {
                    reply: frame(
                        req,
                        ApiKey::SaslAuthenticate,
                        &SaslAuthenticateResponse::default().with_auth_bytes(out.into()),
                    ),
                    close: false,
                    principal: None,
                }
            }
            Ok(Step::Done(user, out)) => {
                if self.principal.as_ref().is_some_and(|p| *p != user) {
                    tracing::warn!(peer = %self.peer, previous = ?self.principal, user = %user, "re-authentication as another user; closing");
                    let a = fail(
                        req,
                        codes::SASL_AUTHENTICATION_FAILED,
                        "re-authentication must be as the same user",
                    );
                    return self.refused("reauth_other_user", Some(mechanism), a);
                }
                let again = self.principal.is_some();
                let lifetime = auth.session_lifetime;
                self.expires = (!lifetime.is_zero()).then(|| Instant::now() + lifetime);
                self.principal = Some(user.clone());
                metrics::counter!("shardgate_sasl_authentications_total", "mechanism" => mechanism.name(), "result" => if again { "reauthenticated" } else { "ok" })
                    .increment(1);
                tracing::debug!(peer = %self.peer, mechanism = mechanism.name(), user = %user, again, "SASL authenticated");
                let mut resp = SaslAuthenticateResponse::default().with_auth_bytes(out.into());
                if version >= 1 {
                    resp.session_lifetime_ms = lifetime.as_millis().min(i64::MAX as u128) as i64;
                }
                Answered {
                    reply: frame(req, ApiKey::SaslAuthenticate, &resp),
                    close: false,
                    principal: Some(user),
                }
            }
            Err(e) => {
                auth.failed(self.peer);
                tracing::warn!(peer = %self.peer, mechanism = mechanism.name(), error = %e, "SASL authentication failed; closing");
                tokio::time::sleep(FAILURE_DELAY).await;
                let message = format!(
                    "Authentication failed during authentication due to invalid credentials with SASL mechanism {}",
                    mechanism.name()
                );
                let a = fail(req, codes::SASL_AUTHENTICATION_FAILED, &message);
                self.refused("failed", Some(mechanism), a)
            }
        }
    }

    /// Counts a refusal (the answer closes the connection).
    fn refused(&mut self, reason: &'static str, m: Option<Mechanism>, a: Answered) -> Answered {
        self.state = State::Idle;
        metrics::counter!("shardgate_sasl_failures_total", "reason" => reason, "mechanism" => m.map_or("", Mechanism::name))
            .increment(1);
        a
    }
}

fn frame<R: kafka_protocol::protocol::Encodable>(
    req: &RequestFrame,
    api: ApiKey,
    resp: &R,
) -> Reply {
    match encode_response(api, req.api_version, req.correlation_id(), resp) {
        Ok(f) => Reply::Frame(f),
        Err(e) => Reply::Close(e.to_string()),
    }
}

fn fail(req: &RequestFrame, code: i16, message: &str) -> Answered {
    Answered {
        reply: frame(
            req,
            ApiKey::SaslAuthenticate,
            &SaslAuthenticateResponse::default()
                .with_error_code(code)
                .with_error_message(Some(StrBytes::from_string(message.to_string()))),
        ),
        close: true,
        principal: None,
    }
}
