//! OAUTHBEARER tokens for shardgate's own upstream authentication: read from a file at every
//! authentication, or asked from a token endpoint with the client-credentials grant (RFC 6749
//! §4.4, as Kafka's `HttpAccessTokenRetriever` asks) and kept until 80 % of their lifetime
//! (Kafka's `sasl.login.refresh.window.factor`), so a new connection never presents a token
//! about to expire. One cache per instance, shared by every broker connection.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;

use crate::config::{OAuthBearer, TokenSource};
use crate::http::Trust;

/// A token endpoint that does not answer within this is an error (the connection attempt is
/// retried like any other).
const ENDPOINT_TIMEOUT: Duration = Duration::from_secs(10);
/// Share of a token's lifetime after which a new one is fetched.
const REFRESH_AT: f64 = 0.8;
/// Lifetime assumed when neither `expires_in` nor the JWT's `exp` gives one.
const UNKNOWN_LIFETIME: Duration = Duration::from_secs(60);
/// Longest a token is kept, whatever it claims (a token "for ever" is asked for again daily).
const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);

pub struct Tokens {
    config: OAuthBearer,
    trust: Option<Trust>,
    cached: Mutex<Option<Cached>>,
}

struct Cached {
    token: String,
    refresh_at: Instant,
}

impl Tokens {
    pub fn new(config: OAuthBearer) -> Result<Self, crate::tls::TlsError> {
        let trust = match &config.source {
            TokenSource::Endpoint { ca: Some(ca), .. } => {
                Some(Trust::from_pem("upstream.sasl.token_endpoint_ca", ca)?)
            }
            _ => None,
        };
        Ok(Self {
            config,
            trust,
            cached: Mutex::new(None),
        })
    }

    /// The SASL client's first (and only) message, RFC 7628 §3.1 as Kafka parses it:
    /// `n,,` SEP `auth=Bearer <token>` SEP (`key=value` SEP)* SEP.
    pub fn initial_response(&self, token: &str) -> Vec<u8> {
        let mut m = format!("n,,\u{1}auth=Bearer {token}\u{1}");
        for (k, v) in &self.config.extensions {
            m.push_str(&format!("{k}={v}\u{1}"));
        }
        m.push('\u{1}');
        m.into_bytes()
    }

    /// A token to present now.
    pub async fn current(&self) -> Result<String, String> {
        if let Some(c) = self
            .lock()
            .as_ref()
            .filter(|c| Instant::now() < c.refresh_at)
        {
            return Ok(c.token.clone());
        }
        let fetched = match &self.config.source {
            TokenSource::File(path) => tokio::fs::read_to_string(path)
                .await
                .map(|t| (t.trim().to_string(), None))
                .map_err(|e| format!("token file {}: {e}", path.display())),
            TokenSource::Endpoint { .. } => {
                let (source, trust) = (self.config.source.clone(), self.trust.clone());
                tokio::task::spawn_blocking(move || request(&source, trust.as_ref()))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r)
            }
        };
        let result = if fetched.is_ok() { "ok" } else { "failed" };
        metrics::counter!("shardgate_upstream_oauth_tokens_total", "result" => result).increment(1);
        let (token, expires_in) = fetched?;
        if token.is_empty() || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err("the token is empty or holds spaces".into());
        }
        // A file is read again at every authentication (whatever renews it is followed).
        if matches!(self.config.source, TokenSource::Endpoint { .. }) {
            let lifetime = expires_in
                .or_else(|| jwt_lifetime(&token))
                .unwrap_or(UNKNOWN_LIFETIME)
                .min(MAX_LIFETIME);
            *self.lock() = Some(Cached {
                token: token.clone(),
                refresh_at: Instant::now() + lifetime.mul_f64(REFRESH_AT),
            });
        }
        Ok(token)
    }

    /// The broker refused the token: the next authentication fetches another.
    pub fn forget(&self) {
        *self.lock() = None;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Cached>> {
        self.cached.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One client-credentials request: the token and its `expires_in`.
fn request(
    source: &TokenSource,
    trust: Option<&Trust>,
) -> Result<(String, Option<Duration>), String> {
    let TokenSource::Endpoint {
        url,
        client_id,
        client_secret,
        scope,
        audience,
        ..
    } = source
    else {
        return Err("not a token endpoint".into());
    };
    // RFC 6749 §2.3.1: client id and secret form-encoded, then HTTP Basic.
    let basic = base64::engine::general_purpose::STANDARD.encode(format!(
        "{}:{}",
        form_encode(client_id),
        form_encode(client_secret)
    ));
    let authorization = format!("Basic {basic}");
    let mut body = "grant_type=client_credentials".to_string();
    if let Some(scope) = scope {
        body.push_str(&format!("&scope={}", form_encode(scope)));
    }
    if let Some(audience) = audience {
        body.push_str(&format!("&audience={}", form_encode(audience)));
    }
    let (status, text) = crate::http::send(
        &crate::http::Request {
            method: "POST",
            url,
            headers: &[
                ("Authorization", &authorization),
                ("Accept", "application/json"),
                ("Cache-Control", "no-cache"),
            ],
            body: Some(("application/x-www-form-urlencoded", body.as_bytes())),
            timeout: ENDPOINT_TIMEOUT,
        },
        trust,
    )
    .map_err(|e| format!("token endpoint {url}: {e}"))?;
    let json: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    if !(200..300).contains(&status) {
        // The error fields of RFC 6749 §5.2 only: the body might echo a secret otherwise.
        return Err(format!(
            "token endpoint {url} answered {status}: {} {}",
            json["error"].as_str().unwrap_or(""),
            json["error_description"].as_str().unwrap_or("")
        ));
    }
    let token = json["access_token"]
        .as_str()
        .ok_or_else(|| format!("token endpoint {url} answered no access_token"))?;
    let expires_in = json["expires_in"]
        .as_u64()
        .map(|s| Duration::from_secs(s.min(MAX_LIFETIME.as_secs())));
    Ok((token.to_string(), expires_in))
}

/// `application/x-www-form-urlencoded` for one value.
fn form_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// What remains of a JWT's life by its `exp` claim (None: not a JWT, no `exp`, expired).
fn jwt_lifetime(token: &str) -> Option<Duration> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims["exp"].as_f64()?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .ok()?
        .as_secs_f64();
    (exp > now)
        .then(|| Duration::try_from_secs_f64((exp - now).min(MAX_LIFETIME.as_secs_f64())).ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_initial_response_is_rfc_7628_with_extensions_and_jwt_expiry_is_read() {
        let tokens = Tokens::new(OAuthBearer {
            source: TokenSource::File("/nonexistent".into()),
            extensions: vec![("logicalCluster".into(), "lkc-1".into())],
        })
        .unwrap();
        assert_eq!(
            tokens.initial_response("abc.def.ghi"),
            b"n,,\x01auth=Bearer abc.def.ghi\x01logicalCluster=lkc-1\x01\x01".to_vec()
        );
        let exp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 100;
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(format!("{{\"sub\":\"svc\",\"exp\":{exp}}}"));
        let life = jwt_lifetime(&format!("eyJhbGciOiJub25lIn0.{payload}.")).unwrap();
        assert!(life > Duration::from_secs(95) && life <= Duration::from_secs(100));
        assert_eq!(jwt_lifetime("opaque-token"), None);
        let far = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("{\"exp\":1e300}");
        assert_eq!(jwt_lifetime(&format!("h.{far}.")), Some(MAX_LIFETIME));
        assert_eq!(form_encode("a b&c=d/é"), "a+b%26c%3Dd%2F%C3%A9");
    }

    #[tokio::test]
    async fn a_missing_token_file_is_an_error_naming_it() {
        let tokens = Tokens::new(OAuthBearer {
            source: TokenSource::File("/nonexistent/token".into()),
            extensions: vec![],
        })
        .unwrap();
        let e = tokens.current().await.unwrap_err();
        assert!(e.contains("/nonexistent/token"), "{e}");
    }
}
