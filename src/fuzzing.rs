//! Entry points for fuzzing the code that reads untrusted bytes: the
//! pre-auth command framing and parser, the SASL decoders, the PROXY
//! protocol parsers, the backend greeting judge and the configuration
//! loader. Each takes arbitrary bytes and must neither panic nor hang.
//! Used by the cargo-fuzz targets in `fuzz/` and by the bounded run in
//! `tests/fuzz.rs`.

use std::path::Path;

use crate::imap::{command, framing::CommandReader, sasl, Capabilities};

/// Pre-auth framing (lines, literals, limits) and parsing, over `data` as
/// a client's byte stream.
pub fn preauth(data: &[u8]) {
    thread_local! {
        static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
    }
    RT.with(|rt| {
        rt.block_on(async {
            let mut stream = tokio::io::join(data, tokio::io::sink());
            let mut reader = CommandReader::new(8192, 8192);
            // Each command consumes at least one line end; the data is finite.
            while let Ok(raw) = reader.read_command(&mut stream).await {
                let _ = command::parse(&raw);
            }
        })
    });
}

/// SASL responses: base64, then PLAIN, OAUTHBEARER and XOAUTH2, on the
/// decoded bytes and on the raw ones.
pub fn sasl(data: &[u8]) {
    let raw = crate::imap::Secret::new(data.to_vec());
    for message in [
        sasl::decode_response_up_to(data, sasl::MAX_TOKEN_MESSAGE).ok(),
        Some(raw),
    ]
    .into_iter()
    .flatten()
    {
        let _ = sasl::decode_plain(&message);
        let _ = sasl::decode_oauthbearer(&message);
        let _ = sasl::decode_xoauth2(&message);
    }
}

/// PROXY protocol v1 lines and v2 blocks (first two bytes: version and
/// command, family).
pub fn proxy_header(data: &[u8]) {
    let _ = crate::proxy_protocol::parse_v1(data);
    if let [ver_cmd, family, block @ ..] = data {
        let _ = crate::proxy_protocol::parse_v2(*ver_cmd, *family, block);
    }
}

/// A backend's greeting line and capability lists.
pub fn backend_greeting(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = crate::backend::judge_greeting(&text);
    let caps = Capabilities::parse(&text);
    let _ = caps.has("STARTTLS");
}

/// The configuration loader (YAML, keys, values, cross-checks).
pub fn config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = crate::config::Config::parse(text, Path::new("/fuzz/postern.yaml"));
    }
}
