//! A small HTTP/1.0 client for Postern's own calls: the nginx-compatible
//! auth service and the identity provider's JWKS. One request per
//! connection (as nginx's `auth_http` does), optional TLS, the response
//! head parsed by httparse and bounded, the body read to its
//! `Content-Length` or the end of the connection and bounded. An HTTP/1.0
//! request cannot be answered with chunked encoding, so none is handled.

use std::sync::Arc;

use hyper::Uri;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::imap::Secret;

/// Most bytes of response head read.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;

/// Where requests go: parsed once from the configured URL.
pub struct Endpoint {
    host: String,
    port: u16,
    /// Path and query of the request.
    pub target: String,
    /// `Host` header value.
    pub authority: String,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
}

/// A response: status, headers as sent, and the body (kept as a secret:
/// it may carry credentials).
pub struct Response {
    pub code: u16,
    /// Values as secrets: an auth service may send a password (Auth-Pass).
    pub headers: Vec<(String, Secret)>,
    pub body: Secret,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.expose())
    }
}

impl Endpoint {
    /// `key` names the configuration key in errors; `tls` is required for
    /// `https://` URLs.
    pub fn parse(
        url: &str,
        key: &str,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<Endpoint, String> {
        let uri: Uri = url.parse().map_err(|e| format!("key `{key}`: {e}"))?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(format!("key `{key}`: must start with http:// or https://")),
        };
        let host = uri
            .host()
            .ok_or(format!("key `{key}`: no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let target = uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| "/".into());
        // Host and port only: credentials in the URL are neither sent as
        // the Host header nor shown in errors.
        let authority = uri
            .authority()
            .map(|a| a.as_str().rsplit('@').next().unwrap_or_default().to_owned())
            .unwrap_or_default();
        let tls = if https {
            let config = tls.ok_or(format!(
                "key `{key}`: https needs a TLS client configuration"
            ))?;
            let name =
                ServerName::try_from(host.clone()).map_err(|e| format!("key `{key}`: {e}"))?;
            Some((tokio_rustls::TlsConnector::from(config), name))
        } else {
            None
        };
        Ok(Endpoint {
            host,
            port,
            target,
            authority,
            tls,
        })
    }

    /// Sends `request` (a whole HTTP/1.0 request) on a new connection and
    /// reads the response, with at most `max_body` bytes of body (0: the
    /// body is not read).
    pub async fn exchange(&self, request: &Secret, max_body: usize) -> Result<Response, String> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| format!("connect {}:{}: {e}", self.host, self.port))?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => exchange(tcp, request, max_body).await,
            Some((connector, name)) => {
                let tls = connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| format!("TLS to {}: {e}", self.authority))?;
                exchange(tls, request, max_body).await
            }
        }
    }
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    request: &Secret,
    max_body: usize,
) -> Result<Response, String> {
    let io = |e: std::io::Error| format!("HTTP: {e}");
    stream.write_all(request.expose()).await.map_err(io)?;
    stream.flush().await.map_err(io)?;
    let mut buf = Secret::new(Vec::with_capacity(2048));
    let mut chunk = vec![0u8; 8192];
    let (code, headers, body_start) = loop {
        let n = stream.read(&mut chunk).await.map_err(io)?;
        if n == 0 {
            return Err("the server closed the connection before answering".into());
        }
        let mut grown = buf.expose().to_vec();
        grown.extend_from_slice(&chunk[..n]);
        buf = Secret::new(grown);
        let mut slots = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut slots);
        match response.parse(buf.expose()) {
            Ok(httparse::Status::Complete(len)) => {
                let headers = response
                    .headers
                    .iter()
                    .map(|h| (h.name.to_owned(), Secret::new(h.value.to_vec())))
                    .collect::<Vec<_>>();
                break (response.code.unwrap_or(0), headers, len);
            }
            Ok(httparse::Status::Partial) if buf.expose().len() < MAX_RESPONSE_HEAD => continue,
            Ok(httparse::Status::Partial) => {
                return Err(format!("response head over {MAX_RESPONSE_HEAD} bytes"))
            }
            Err(e) => return Err(format!("invalid HTTP response: {e}")),
        }
    };
    chunk.fill(0);
    let mut body = buf.expose()[body_start..].to_vec();
    if max_body == 0 {
        body.clear();
    } else {
        let length = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("Content-Length"))
            .and_then(|(_, v)| {
                std::str::from_utf8(v.expose())
                    .ok()?
                    .trim()
                    .parse::<usize>()
                    .ok()
            });
        if length.is_some_and(|l| l > max_body) {
            return Err(format!("response body over {max_body} bytes"));
        }
        loop {
            if length.is_some_and(|l| body.len() >= l) {
                body.truncate(length.unwrap_or(0));
                break;
            }
            let n = stream.read(&mut chunk).await.map_err(io)?;
            if n == 0 {
                if length.is_some_and(|l| body.len() < l) {
                    return Err("the response body ended early".into());
                }
                break;
            }
            body.extend_from_slice(&chunk[..n]);
            if body.len() > max_body {
                return Err(format!("response body over {max_body} bytes"));
            }
        }
    }
    Ok(Response {
        code,
        headers,
        body: Secret::new(body),
    })
}
