//! shardgate's own SASL authentication to a broker (`upstream.sasl`), on a new connection
//! before it carries any request: SaslHandshake v1, then SaslAuthenticate v2 round trips
//! (PLAIN, SCRAM-SHA-256/512 with the server's signature checked, or OAUTHBEARER with a token
//! from `oauth`). The broker's session lifetime (KIP-368) comes back so the connection can be
//! retired and replaced before it ends.

use std::time::Duration;

use bytes::Bytes;
use kafka_protocol::messages::{
    ApiKey, SaslAuthenticateRequest, SaslAuthenticateResponse, SaslHandshakeRequest,
    SaslHandshakeResponse,
};
use kafka_protocol::protocol::StrBytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::UpstreamError;
use super::connection::Stream;
use super::oauth::Tokens;
use crate::auth::Mechanism;
use crate::auth::scram::ScramClient;
use crate::config::UpstreamSasl;
use crate::protocol::{decode_response, encode_request};

/// shardgate's upstream identity: the validated `[upstream.sasl]` and, for OAUTHBEARER, its
/// token cache (shared by every broker connection).
pub struct Login {
    sasl: UpstreamSasl,
    tokens: Option<Tokens>,
}

impl Login {
    pub fn new(sasl: UpstreamSasl) -> Result<Self, crate::tls::TlsError> {
        let tokens = match &sasl {
            UpstreamSasl::OAuthBearer(o) => Some(Tokens::new(o.clone())?),
            UpstreamSasl::Password { .. } => None,
        };
        Ok(Self { sasl, tokens })
    }

    /// The token to present on a new connection (None: not OAUTHBEARER).
    pub async fn token(&self, broker: i32) -> Result<Option<String>, UpstreamError> {
        match &self.tokens {
            None => Ok(None),
            Some(t) => t.current().await.map(Some).map_err(|message| {
                tracing::warn!(broker, error = %message, "no OAuth token for the upstream login");
                UpstreamError::Sasl { broker, message }
            }),
        }
    }
}

/// Authenticates on `stream` (`token`: the OAUTHBEARER token from `Login::token`): the
/// session lifetime the broker gave (None: unlimited).
pub async fn authenticate(
    stream: &mut Box<dyn Stream>,
    login: &Login,
    token: Option<&str>,
    broker: i32,
) -> Result<Option<Duration>, UpstreamError> {
    let fail = |message: String| UpstreamError::Sasl { broker, message };
    let mechanism = login.sasl.mechanism_name();
    let handshake: SaslHandshakeResponse = call(
        stream,
        ApiKey::SaslHandshake,
        1,
        &SaslHandshakeRequest::default().with_mechanism(StrBytes::from_static_str(mechanism)),
    )
    .await?;
    if handshake.error_code != 0 {
        let offered: Vec<String> = handshake.mechanisms.iter().map(|m| m.to_string()).collect();
        return Err(fail(format!(
            "the broker does not offer {mechanism} (error {}; it offers {offered:?})",
            handshake.error_code
        )));
    }
    let last = match (&login.sasl, &login.tokens) {
        (
            UpstreamSasl::Password {
                mechanism: Mechanism::Plain,
                username,
                password,
            },
            _,
        ) => {
            let token = format!("\0{username}\0{password}").into_bytes();
            step(stream, login, broker, token).await?
        }
        (
            UpstreamSasl::Password {
                mechanism: Mechanism::Scram(hash),
                username,
                password,
            },
            _,
        ) => {
            let (mut client, first) = ScramClient::start(*hash, username, password);
            let server_first = step(stream, login, broker, first).await?;
            // PBKDF2 of the password: off the runtime's worker threads.
            let (client, answer) = tokio::task::spawn_blocking(move || {
                let answer = client.respond(&server_first.auth_bytes);
                (client, answer)
            })
            .await
            .map_err(|e| fail(e.to_string()))?;
            let answer = answer.map_err(|e| fail(e.to_string()))?;
            let server_final = step(stream, login, broker, answer).await?;
            client
                .verify(&server_final.auth_bytes)
                .map_err(|e| fail(format!("the broker's SCRAM signature: {e}")))?;
            server_final
        }
        (UpstreamSasl::OAuthBearer(_), Some(tokens)) => {
            let token = token.ok_or_else(|| fail("no OAuth token".into()))?;
            let r = step(stream, login, broker, tokens.initial_response(token)).await?;
            if r.auth_bytes.is_empty() {
                r
            } else {
                // RFC 7628 §3.2.2: a refused token comes back as a JSON error challenge
                // the client acknowledges with a lone separator; the failure follows.
                tokens.forget();
                let status = String::from_utf8_lossy(&r.auth_bytes).into_owned();
                return Err(match step(stream, login, broker, vec![1]).await {
                    Err(UpstreamError::Sasl { message, .. }) => {
                        fail(format!("{message}; token refused: {status}"))
                    }
                    _ => fail(format!("token refused: {status}")),
                });
            }
        }
        (UpstreamSasl::OAuthBearer(_), None) => return Err(fail("no OAuth token source".into())),
    };
    Ok((last.session_lifetime_ms > 0)
        .then(|| Duration::from_millis(last.session_lifetime_ms as u64)))
}

/// One SaslAuthenticate round trip; a refusal is an error naming the broker's message.
async fn step(
    stream: &mut Box<dyn Stream>,
    login: &Login,
    broker: i32,
    token: Vec<u8>,
) -> Result<SaslAuthenticateResponse, UpstreamError> {
    let req = SaslAuthenticateRequest::default().with_auth_bytes(Bytes::from(token));
    let r: SaslAuthenticateResponse = call(stream, ApiKey::SaslAuthenticate, 2, &req).await?;
    if r.error_code != 0 {
        if let Some(tokens) = &login.tokens {
            tokens.forget();
        }
        return Err(UpstreamError::Sasl {
            broker,
            message: format!(
                "{:?} refused: {} (error {})",
                login.sasl,
                r.error_message.as_deref().unwrap_or(""),
                r.error_code
            ),
        });
    }
    Ok(r)
}

/// One request and its answer on a connection nothing else uses yet.
async fn call<Req, Resp>(
    stream: &mut Box<dyn Stream>,
    api: ApiKey,
    version: i16,
    req: &Req,
) -> Result<Resp, UpstreamError>
where
    Req: kafka_protocol::protocol::Encodable + kafka_protocol::protocol::HeaderVersion,
    Resp: kafka_protocol::protocol::Decodable,
{
    let io = |e: std::io::Error| UpstreamError::Protocol(format!("SASL exchange: {e}"));
    let frame = encode_request(
        api,
        version,
        Some(StrBytes::from_static_str("shardgate")),
        req,
    )?;
    stream
        .write_all(&(frame.len() as u32).to_be_bytes())
        .await
        .map_err(io)?;
    stream.write_all(&frame).await.map_err(io)?;
    stream.flush().await.map_err(io)?;
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).await.map_err(io)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > 1 << 20 {
        return Err(UpstreamError::Protocol(format!(
            "SASL answer of {len} bytes"
        )));
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await.map_err(io)?;
    Ok(decode_response::<Resp>(api, version, Bytes::from(body))?)
}
