//! shardgate's own SASL authentication to a broker (`upstream.sasl`), on a new connection
//! before it carries any request: SaslHandshake v1, then SaslAuthenticate v2 round trips
//! (PLAIN, or SCRAM-SHA-256/512 with the server's signature checked). The broker's session
//! lifetime (KIP-368) comes back so the connection can be retired and replaced before it ends.

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
use crate::auth::Mechanism;
use crate::auth::scram::ScramClient;
use crate::config::UpstreamSasl;
use crate::protocol::{decode_response, encode_request};

/// Authenticates on `stream`: the session lifetime the broker gave (None: unlimited).
pub async fn authenticate(
    stream: &mut Box<dyn Stream>,
    sasl: &UpstreamSasl,
    broker: i32,
) -> Result<Option<Duration>, UpstreamError> {
    let fail = |message: String| UpstreamError::Sasl { broker, message };
    let handshake: SaslHandshakeResponse = call(
        stream,
        ApiKey::SaslHandshake,
        1,
        &SaslHandshakeRequest::default()
            .with_mechanism(StrBytes::from_static_str(sasl.mechanism.name())),
    )
    .await?;
    if handshake.error_code != 0 {
        let offered: Vec<String> = handshake.mechanisms.iter().map(|m| m.to_string()).collect();
        return Err(fail(format!(
            "the broker does not offer {} (error {}; it offers {offered:?})",
            sasl.mechanism.name(),
            handshake.error_code
        )));
    }
    let last = match sasl.mechanism {
        Mechanism::Plain => {
            let token = format!("\0{}\0{}", sasl.username, sasl.password).into_bytes();
            step(stream, sasl, broker, token).await?
        }
        Mechanism::Scram(hash) => {
            let (mut client, first) = ScramClient::start(hash, &sasl.username, &sasl.password);
            let server_first = step(stream, sasl, broker, first).await?;
            // PBKDF2 of the password: off the runtime's worker threads.
            let (client, answer) = tokio::task::spawn_blocking(move || {
                let answer = client.respond(&server_first.auth_bytes);
                (client, answer)
            })
            .await
            .map_err(|e| fail(e.to_string()))?;
            let answer = answer.map_err(|e| fail(e.to_string()))?;
            let server_final = step(stream, sasl, broker, answer).await?;
            client
                .verify(&server_final.auth_bytes)
                .map_err(|e| fail(format!("the broker's SCRAM signature: {e}")))?;
            server_final
        }
    };
    Ok((last.session_lifetime_ms > 0)
        .then(|| Duration::from_millis(last.session_lifetime_ms as u64)))
}

/// One SaslAuthenticate round trip; a refusal is an error naming the broker's message.
async fn step(
    stream: &mut Box<dyn Stream>,
    sasl: &UpstreamSasl,
    broker: i32,
    token: Vec<u8>,
) -> Result<SaslAuthenticateResponse, UpstreamError> {
    let req = SaslAuthenticateRequest::default().with_auth_bytes(Bytes::from(token));
    let r: SaslAuthenticateResponse = call(stream, ApiKey::SaslAuthenticate, 2, &req).await?;
    if r.error_code != 0 {
        return Err(UpstreamError::Sasl {
            broker,
            message: format!(
                "{} as {} refused: {} (error {})",
                sasl.mechanism.name(),
                sasl.username,
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
