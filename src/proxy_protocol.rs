//! The PROXY protocol (HAProxy's, versions 1 and 2): the client's address
//! as a load balancer in front of Postern saw it, and the same header sent
//! on to backends that want it (Dovecot's `haproxy = yes`).
//!
//! Inbound, a header is read only on listeners that ask for it and only
//! from their trusted networks; the caller closes a connection from
//! anywhere else before reading a byte. The header is read exactly — not
//! a byte of the TLS handshake or IMAP command behind it — within a size
//! limit; the caller bounds the time.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The version 2 signature.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// Longest version 1 header, CRLF included (the specification's limit).
const V1_MAX: usize = 107;

/// Longest version 2 address block accepted (addresses and TLVs). The
/// specification allows 64 KiB; load balancers send a few hundred bytes.
pub const V2_MAX_BLOCK: usize = 2048;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProxyHeaderError {
    #[error("not a PROXY protocol header")]
    NotProxy,
    #[error("malformed PROXY header: {0}")]
    Malformed(&'static str),
    #[error("PROXY header too long")]
    TooLong,
    #[error("connection closed inside the PROXY header")]
    Closed,
}

/// What a header says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyHeader {
    /// The client's address, and the address it connected to.
    Proxied {
        source: SocketAddr,
        destination: SocketAddr,
    },
    /// The balancer's own connection (a health check), or an address
    /// family without IP addresses: keep the socket's addresses.
    Local,
}

/// Reads one header (either version) from `tcp`, consuming exactly its bytes.
pub async fn read_header(tcp: &mut TcpStream) -> Result<ProxyHeader, ProxyHeaderError> {
    let mut start = [0u8; 12];
    read_exact(tcp, &mut start[..6]).await?;
    if &start[..6] == b"PROXY " {
        return read_v1(tcp).await;
    }
    if start[..6] != V2_SIGNATURE[..6] {
        return Err(ProxyHeaderError::NotProxy);
    }
    read_exact(tcp, &mut start[6..]).await?;
    if &start != V2_SIGNATURE {
        return Err(ProxyHeaderError::NotProxy);
    }
    let mut fixed = [0u8; 4];
    read_exact(tcp, &mut fixed).await?;
    let len = u16::from_be_bytes([fixed[2], fixed[3]]) as usize;
    if len > V2_MAX_BLOCK {
        return Err(ProxyHeaderError::TooLong);
    }
    let mut block = vec![0u8; len];
    read_exact(tcp, &mut block).await?;
    parse_v2(fixed[0], fixed[1], &block)
}

async fn read_exact(tcp: &mut TcpStream, buf: &mut [u8]) -> Result<(), ProxyHeaderError> {
    tcp.read_exact(buf)
        .await
        .map(|_| ())
        .map_err(|_| ProxyHeaderError::Closed)
}

/// The rest of a version 1 line after `PROXY `. The line is found by
/// peeking, then read exactly; a line split over segments is read a byte
/// at a time.
async fn read_v1(tcp: &mut TcpStream) -> Result<ProxyHeader, ProxyHeaderError> {
    let mut line = Vec::with_capacity(V1_MAX);
    line.extend_from_slice(b"PROXY ");
    let mut peeked = [0u8; V1_MAX];
    let n = tcp
        .peek(&mut peeked[..V1_MAX - 6])
        .await
        .map_err(|_| ProxyHeaderError::Closed)?;
    match peeked[..n].iter().position(|&b| b == b'\n') {
        Some(end) => {
            let mut rest = vec![0u8; end + 1];
            read_exact(tcp, &mut rest).await?;
            line.extend_from_slice(&rest);
        }
        None => loop {
            if line.len() >= V1_MAX {
                return Err(ProxyHeaderError::TooLong);
            }
            let mut byte = [0u8; 1];
            read_exact(tcp, &mut byte).await?;
            line.push(byte[0]);
            if byte[0] == b'\n' {
                break;
            }
        },
    }
    if line.len() > V1_MAX {
        return Err(ProxyHeaderError::TooLong);
    }
    parse_v1(&line)
}

/// Parses a whole version 1 line, `PROXY … \r\n`.
pub fn parse_v1(line: &[u8]) -> Result<ProxyHeader, ProxyHeaderError> {
    let text = std::str::from_utf8(line).map_err(|_| ProxyHeaderError::Malformed("not ASCII"))?;
    let text = text
        .strip_suffix("\r\n")
        .ok_or(ProxyHeaderError::Malformed("line does not end in CRLF"))?;
    let mut words = text.split(' ');
    if words.next() != Some("PROXY") {
        return Err(ProxyHeaderError::NotProxy);
    }
    let family = words
        .next()
        .ok_or(ProxyHeaderError::Malformed("no family"))?;
    if family == "UNKNOWN" {
        return Ok(ProxyHeader::Local);
    }
    let fields: Vec<&str> = words.collect();
    let [src, dst, sport, dport] = fields[..] else {
        return Err(ProxyHeaderError::Malformed("expected four fields"));
    };
    let ip = |s: &str| -> Result<IpAddr, ProxyHeaderError> {
        let ip: IpAddr = s
            .parse()
            .map_err(|_| ProxyHeaderError::Malformed("bad address"))?;
        match (family, ip) {
            ("TCP4", IpAddr::V4(_)) | ("TCP6", IpAddr::V6(_)) => Ok(ip),
            ("TCP4" | "TCP6", _) => Err(ProxyHeaderError::Malformed(
                "address does not match the family",
            )),
            _ => Err(ProxyHeaderError::Malformed("unknown family")),
        }
    };
    let port = |s: &str| -> Result<u16, ProxyHeaderError> {
        if s.is_empty() || (s.len() > 1 && s.starts_with('0')) {
            return Err(ProxyHeaderError::Malformed("bad port"));
        }
        s.parse()
            .map_err(|_| ProxyHeaderError::Malformed("bad port"))
    };
    Ok(ProxyHeader::Proxied {
        source: SocketAddr::new(ip(src)?, port(sport)?),
        destination: SocketAddr::new(ip(dst)?, port(dport)?),
    })
}

/// Parses a version 2 header's fields after the signature: version and
/// command, family and protocol, the address block.
pub fn parse_v2(ver_cmd: u8, family: u8, block: &[u8]) -> Result<ProxyHeader, ProxyHeaderError> {
    if ver_cmd >> 4 != 2 {
        return Err(ProxyHeaderError::Malformed("version is not 2"));
    }
    match ver_cmd & 0x0f {
        0x0 => return Ok(ProxyHeader::Local),
        0x1 => {}
        _ => return Err(ProxyHeaderError::Malformed("unknown command")),
    }
    match family {
        // TCP over IPv4
        0x11 => {
            let b: &[u8; 12] = block
                .get(..12)
                .and_then(|b| b.try_into().ok())
                .ok_or(ProxyHeaderError::Malformed("short IPv4 address block"))?;
            let src = Ipv4Addr::new(b[0], b[1], b[2], b[3]);
            let dst = Ipv4Addr::new(b[4], b[5], b[6], b[7]);
            Ok(ProxyHeader::Proxied {
                source: SocketAddr::new(src.into(), u16::from_be_bytes([b[8], b[9]])),
                destination: SocketAddr::new(dst.into(), u16::from_be_bytes([b[10], b[11]])),
            })
        }
        // TCP over IPv6
        0x21 => {
            let b: &[u8; 36] = block
                .get(..36)
                .and_then(|b| b.try_into().ok())
                .ok_or(ProxyHeaderError::Malformed("short IPv6 address block"))?;
            let src: [u8; 16] = b[..16].try_into().expect("16 bytes");
            let dst: [u8; 16] = b[16..32].try_into().expect("16 bytes");
            Ok(ProxyHeader::Proxied {
                source: SocketAddr::new(
                    Ipv6Addr::from(src).into(),
                    u16::from_be_bytes([b[32], b[33]]),
                ),
                destination: SocketAddr::new(
                    Ipv6Addr::from(dst).into(),
                    u16::from_be_bytes([b[34], b[35]]),
                ),
            })
        }
        // UNSPEC, UDP, UNIX sockets: no IP addresses to use.
        _ => Ok(ProxyHeader::Local),
    }
}

/// A version 2 header for a backend: the client's address and the address
/// it connected to, or LOCAL (a health check) without them.
pub fn v2_header(addresses: Option<(SocketAddr, SocketAddr)>) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + 36);
    out.extend_from_slice(V2_SIGNATURE);
    let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    match addresses.map(|(s, d)| (canonical(s), canonical(d))) {
        Some((SocketAddr::V4(s), SocketAddr::V4(d))) => {
            out.extend_from_slice(&[0x21, 0x11, 0, 12]);
            out.extend_from_slice(&s.ip().octets());
            out.extend_from_slice(&d.ip().octets());
            out.extend_from_slice(&s.port().to_be_bytes());
            out.extend_from_slice(&d.port().to_be_bytes());
        }
        Some((s, d)) => {
            let v6 = |a: SocketAddr| match a.ip() {
                IpAddr::V4(ip) => ip.to_ipv6_mapped(),
                IpAddr::V6(ip) => ip,
            };
            out.extend_from_slice(&[0x21, 0x21, 0, 36]);
            out.extend_from_slice(&v6(s).octets());
            out.extend_from_slice(&v6(d).octets());
            out.extend_from_slice(&s.port().to_be_bytes());
            out.extend_from_slice(&d.port().to_be_bytes());
        }
        None => out.extend_from_slice(&[0x20, 0x00, 0, 0]),
    }
    out
}

/// An IP network in CIDR notation, e.g. `10.0.0.0/8` or `2001:db8::/32`; a
/// bare address is a single host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl std::str::FromStr for Network {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("`{s}` is not an IP network (use 10.0.0.0/8 or 2001:db8::/32)"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("`{s}`: prefix length must be 0 to {max}"))?,
        };
        Ok(Network { addr, prefix })
    }
}

impl<'de> serde::Deserialize<'de> for Network {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Network {
    /// The prefix length: 0 is every address of the family.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` is in the network; IPv4-mapped IPv6 addresses (from a
    /// dual-stack listener) count as IPv4.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - self.prefix as u32).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - self.prefix as u32).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_lines() {
        assert_eq!(
            parse_v1(b"PROXY TCP4 192.0.2.7 198.51.100.1 51334 993\r\n"),
            Ok(ProxyHeader::Proxied {
                source: addr("192.0.2.7:51334"),
                destination: addr("198.51.100.1:993"),
            })
        );
        assert_eq!(
            parse_v1(b"PROXY TCP6 2001:db8::7 2001:db8::1 4000 143\r\n"),
            Ok(ProxyHeader::Proxied {
                source: addr("[2001:db8::7]:4000"),
                destination: addr("[2001:db8::1]:143"),
            })
        );
        assert_eq!(parse_v1(b"PROXY UNKNOWN\r\n"), Ok(ProxyHeader::Local));
        for bad in [
            &b"PROXY TCP4 192.0.2.7 198.51.100.1 51334 993\n"[..],
            b"PROXY TCP4 2001:db8::7 198.51.100.1 1 2\r\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 051334 993\r\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 70000 993\r\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 1\r\n",
            b"PROXY UDP4 192.0.2.7 198.51.100.1 1 2\r\n",
        ] {
            assert!(
                matches!(parse_v1(bad), Err(ProxyHeaderError::Malformed(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn v2_round_trip_and_local() {
        for (src, dst) in [
            ("192.0.2.7:51334", "198.51.100.1:993"),
            ("[2001:db8::7]:4000", "[2001:db8::1]:143"),
        ] {
            let header = v2_header(Some((addr(src), addr(dst))));
            assert_eq!(&header[..12], V2_SIGNATURE);
            let len = u16::from_be_bytes([header[14], header[15]]) as usize;
            assert_eq!(header.len(), 16 + len);
            assert_eq!(
                parse_v2(header[12], header[13], &header[16..]),
                Ok(ProxyHeader::Proxied {
                    source: addr(src),
                    destination: addr(dst),
                })
            );
        }
        // A dual-stack listener's mapped IPv4 addresses go out as IPv4.
        let mapped = v2_header(Some((
            addr("[::ffff:192.0.2.7]:1"),
            addr("[::ffff:10.0.0.1]:2"),
        )));
        assert_eq!(mapped[13], 0x11);
        let local = v2_header(None);
        assert_eq!(
            parse_v2(local[12], local[13], &local[16..]),
            Ok(ProxyHeader::Local)
        );
        assert!(parse_v2(0x21, 0x11, &[0; 11]).is_err(), "short block");
        assert!(
            parse_v2(0x11, 0x11, &[0; 12]).is_err(),
            "version 1 in a v2 header"
        );
        assert!(parse_v2(0x22, 0x11, &[0; 12]).is_err(), "unknown command");
    }

    #[test]
    fn networks() {
        let n: Network = "10.0.0.0/8".parse().unwrap();
        assert!(n.contains("10.1.2.3".parse().unwrap()));
        assert!(n.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!n.contains("11.0.0.1".parse().unwrap()));
        let host: Network = "127.0.0.1".parse().unwrap();
        assert!(host.contains("127.0.0.1".parse().unwrap()));
        assert!(!host.contains("127.0.0.2".parse().unwrap()));
        let v6: Network = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains("2001:db8:1::1".parse().unwrap()));
        assert!(!v6.contains("10.0.0.1".parse().unwrap()));
        let all: Network = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("203.0.113.9".parse().unwrap()));
        for bad in ["10.0.0.0/33", "mail.example.com", "10.0.0.0/", "::/129"] {
            assert!(bad.parse::<Network>().is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn a_header_is_read_exactly() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        for (header, expect) in [
            (
                b"PROXY TCP4 192.0.2.7 198.51.100.1 51334 993\r\n".to_vec(),
                Ok(addr("192.0.2.7:51334")),
            ),
            (
                v2_header(Some((addr("192.0.2.8:1"), addr("198.51.100.1:993")))),
                Ok(addr("192.0.2.8:1")),
            ),
            (
                b"GET / HTTP/1.1\r\n".to_vec(),
                Err(ProxyHeaderError::NotProxy),
            ),
        ] {
            let mut client = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            let mut sent = header.clone();
            sent.extend_from_slice(b"a1 CAPABILITY\r\n");
            client.write_all(&sent).await.unwrap();
            let (mut server, _) = listener.accept().await.unwrap();
            let got = read_header(&mut server).await.map(|h| match h {
                ProxyHeader::Proxied { source, .. } => source,
                ProxyHeader::Local => unreachable!(),
            });
            assert_eq!(got, expect);
            if got.is_ok() {
                let mut rest = [0u8; 15];
                server.read_exact(&mut rest).await.unwrap();
                assert_eq!(
                    &rest, b"a1 CAPABILITY\r\n",
                    "nothing after the header was consumed"
                );
            }
        }
    }
}
