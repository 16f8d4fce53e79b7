//! A minimal blocking HTTP/1.1 client, plain or over TLS: one request, one connection. It
//! serves the CLI (`shardgate shards ...`), an instance forwarding an admin request to the
//! leader instance, and the OAuth token request of upstream OAUTHBEARER — a handful of calls
//! that do not justify an HTTP client stack. Callers on the runtime use `spawn_blocking`.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::ServerName;

/// Whom an `https://` request trusts (a rustls client configuration from PEM CAs).
#[derive(Clone)]
pub struct Trust(Arc<rustls::ClientConfig>);

impl Trust {
    /// Trusts the CA certificates in the PEM file `ca` (`key` names the setting in errors).
    pub fn from_pem(key: &'static str, ca: &std::path::Path) -> Result<Self, crate::tls::TlsError> {
        crate::tls::client_config(key, ca, None).map(Trust)
    }
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Trust(..)")
    }
}

/// One request.
pub struct Request<'a> {
    pub method: &'a str,
    /// `http://host:port/path` or `https://...`; a bare `host:port` base is plain HTTP.
    pub url: &'a str,
    /// Extra headers (e.g. `Authorization`).
    pub headers: &'a [(&'a str, &'a str)],
    /// Content type and body.
    pub body: Option<(&'a str, &'a [u8])>,
    pub timeout: Duration,
}

/// Sends `req`: the status and the body (de-chunked). `trust` is needed for `https://`.
pub fn send(req: &Request<'_>, trust: Option<&Trust>) -> std::io::Result<(u16, String)> {
    let invalid = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, m);
    let (https, rest) = match req.url.split_once("://") {
        Some(("https", rest)) => (true, rest),
        Some(("http", rest)) => (false, rest),
        Some((scheme, _)) => return Err(invalid(format!("unsupported scheme {scheme}://"))),
        None => (false, req.url),
    };
    let trust = match (https, trust) {
        (true, None) => {
            return Err(invalid(format!(
                "{} is HTTPS: a CA to trust is needed",
                req.url
            )));
        }
        (true, Some(t)) => Some(t),
        (false, _) => None,
    };
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = hostport
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| invalid(format!("{hostport} has no address")))?;
    let tcp = TcpStream::connect_timeout(&addr, req.timeout)?;
    tcp.set_read_timeout(Some(req.timeout))?;
    tcp.set_write_timeout(Some(req.timeout))?;
    let mut head = format!(
        "{} {path} HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\n",
        req.method
    );
    for (name, value) in req.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    // No body, no content type: a JSON content type with an empty body is a malformed body
    // to the admin API (a bodiless split forwarded to the leader was refused so).
    let body = match req.body {
        Some((kind, body)) if !body.is_empty() => {
            head.push_str(&format!("Content-Type: {kind}\r\n"));
            body
        }
        _ => &[][..],
    };
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let mut resp = Vec::new();
    if let Some(trust) = trust {
        let host = hostport
            .rsplit_once(':')
            .map_or(hostport, |(h, _)| h)
            .trim_start_matches('[')
            .trim_end_matches(']');
        let name = ServerName::try_from(host.to_string()).map_err(|e| invalid(e.to_string()))?;
        let conn = rustls::ClientConnection::new(trust.0.clone(), name)
            .map_err(|e| invalid(e.to_string()))?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        tls.write_all(head.as_bytes())?;
        tls.write_all(body)?;
        tls.flush()?;
        read_all(&mut tls, &mut resp)?;
    } else {
        let mut tcp = tcp;
        tcp.write_all(head.as_bytes())?;
        tcp.write_all(body)?;
        tcp.read_to_end(&mut resp)?;
    }
    Ok(parse(&resp))
}

/// Reads to the end; a peer closing without TLS close_notify after a complete answer (common
/// with `Connection: close`) is the end, not an error.
fn read_all(r: &mut impl Read, out: &mut Vec<u8>) -> std::io::Result<()> {
    match r.read_to_end(out) {
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !out.is_empty() => Ok(()),
        other => other.map(|_| ()),
    }
}

fn parse(resp: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(resp);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_parsed_plain_and_chunked() {
        assert_eq!(
            parse(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\n{}"),
            (201, "{}".to_string())
        );
        assert_eq!(
            parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"),
            (200, "abcde".to_string())
        );
        assert_eq!(parse(b"garbage").0, 0);
    }

    #[test]
    fn https_without_a_ca_and_unknown_schemes_are_refused_before_connecting() {
        let req = |url| Request {
            method: "GET",
            url,
            headers: &[],
            body: None,
            timeout: Duration::from_secs(1),
        };
        let e = send(&req("ftp://127.0.0.1:1/x"), None).unwrap_err();
        assert!(e.to_string().contains("ftp"), "{e}");
        let e = send(&req("https://127.0.0.1:1/x"), None).unwrap_err();
        assert!(e.to_string().contains("CA"), "{e}");
    }
}
