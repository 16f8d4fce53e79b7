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
    if hostport.contains(['\r', '\n', ' ']) || path.contains(['\r', '\n', ' ']) {
        return Err(invalid(format!("{} holds spaces or line breaks", req.url)));
    }
    for (name, value) in req.headers {
        if name.contains(['\r', '\n', ':']) || value.contains(['\r', '\n']) {
            return Err(invalid(format!("header {name} holds a line break")));
        }
    }
    // A URL without a port means the scheme's (an identity provider's token URL usually).
    let has_port = hostport.rsplit_once(':').is_some_and(|(h, p)| {
        !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(':')
    }) && !hostport.ends_with(']');
    let target = if has_port {
        hostport.to_string()
    } else {
        format!("{hostport}:{}", if https { 443 } else { 80 })
    };
    let addr = target
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
        let host = if has_port {
            hostport.rsplit_once(':').map_or(hostport, |(h, _)| h)
        } else {
            hostport
        }
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
    let split = resp.windows(4).position(|w| w == b"\r\n\r\n");
    let (head, body) = match split {
        Some(i) => (&resp[..i], &resp[i + 4..]),
        None => (resp, &[][..]),
    };
    let head = String::from_utf8_lossy(head);
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_vec()
    };
    // Decoded once whole: a character split across chunks stays whole.
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn dechunk(mut s: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(i) = s.windows(2).position(|w| w == b"\r\n") {
        let size = String::from_utf8_lossy(&s[..i]);
        let Ok(n) = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16) else {
            break;
        };
        let rest = &s[i + 2..];
        if n == 0 || rest.len() < n {
            break;
        }
        out.extend_from_slice(&rest[..n]);
        s = rest[n..].strip_prefix(b"\r\n").unwrap_or(&rest[n..]);
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
        // "é" split across two chunks.
        assert_eq!(
            parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n\xc3\r\n1\r\n\xa9\r\n0\r\n\r\n"),
            (200, "\u{e9}".to_string())
        );
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
        let e = send(&req("http://127.0.0.1:1/x\r\nEvil: 1"), None).unwrap_err();
        assert!(e.to_string().contains("line breaks"), "{e}");
    }
}
